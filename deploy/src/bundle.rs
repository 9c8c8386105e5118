//! Blessed bundles: a frozen, hash-verified set of kernels an offline deploy loads without
//! NVRTC. Layout: `manifest.json` (per kernel its key, cubin blake3, key inputs, launch,
//! resources and the DB rule it came from), `manifest.blake3` (digest of the manifest bytes) and
//! `kernels/<key>.cubin`. Written to a temporary folder and renamed, so a bundle is whole or absent.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mangrove_core::arch::Arch;
use mangrove_core::cache::{CacheEntry, Toolchain};
use mangrove_core::check::Deltas;
use mangrove_core::compile::{Compiler, ResourceReport};
use mangrove_core::key::{KernelKey, KeyInputs};
use mangrove_core::step::Family;
use mangrove_core::template::{Catalog, LaunchDims, TemplateError};

use crate::plan::PlannedKernel;

/// Bump when the manifest format changes.
pub const BUNDLE_SCHEMA_VERSION: u32 = 1;
const MANIFEST: &str = "manifest.json";
const DIGEST: &str = "manifest.blake3";
const KERNELS: &str = "kernels";

/// Errors of bundle I/O and verification, each naming the file.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle {path}")]
    Io { path: String, source: std::io::Error },
    #[error("bundle manifest {path} is not valid: {reason}")]
    Manifest { path: String, reason: String },
    #[error("bundle {dir} failed verification:\n{}", .problems.join("\n"))]
    Verify { dir: String, problems: Vec<String> },
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("bundle {dir} was blessed for {bundle}, asked for {asked}")]
    ArchMismatch { dir: String, bundle: Arch, asked: Arch },
}

/// One blessed kernel.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ManifestKernel {
    pub key: String,
    /// Path of the cubin relative to the bundle.
    pub file: String,
    pub cubin_blake3: String,
    pub inputs: KeyInputs,
    pub entry: String,
    pub launch: LaunchDims,
    pub resources: ResourceReport,
    pub compile_ms: f64,
    /// Layer family and M the plan needs it for, and the tuning-DB rule that chose the config.
    pub family: Option<Family>,
    pub m: Option<i64>,
    pub db_rule: Option<String>,
    /// Deltas of the on-GPU check when blessed with --verify-on-gpu.
    pub gpu_check: Option<Deltas>,
}

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    pub arch: Arch,
    pub toolchain: Toolchain,
    pub created: String,
    /// Where the kernels came from (tuning DB, model, command line).
    pub source: BTreeMap<String, String>,
    pub kernels: Vec<ManifestKernel>,
}

/// A kernel to bless with the plan facts that go into its manifest line.
pub struct BlessItem {
    pub entry: CacheEntry,
    pub family: Option<Family>,
    pub m: Option<i64>,
    pub db_rule: Option<String>,
    pub gpu_check: Option<Deltas>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io { path: path.display().to_string(), source }
}

/// Writes a bundle of `items` for `arch` to `out` (replacing any bundle there).
pub fn write(out: &Path, arch: Arch, source: BTreeMap<String, String>, items: Vec<BlessItem>) -> Result<Manifest, BundleError> {
    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("bundle"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join(KERNELS)).map_err(io(&tmp))?;
    let mut kernels = Vec::new();
    let mut toolchain = None;
    for it in items {
        let e = it.entry;
        if e.inputs.arch != arch {
            return Err(BundleError::ArchMismatch { dir: out.display().to_string(), bundle: arch, asked: e.inputs.arch });
        }
        let key = e.inputs.key().to_hex();
        if kernels.iter().any(|k: &ManifestKernel| k.key == key) {
            continue;
        }
        let file = format!("{KERNELS}/{key}.cubin");
        std::fs::write(tmp.join(&file), &e.cubin).map_err(io(&tmp))?;
        toolchain.get_or_insert_with(|| e.toolchain.clone());
        kernels.push(ManifestKernel {
            key,
            file,
            cubin_blake3: blake3::hash(&e.cubin).to_hex().to_string(),
            inputs: e.inputs,
            entry: e.entry,
            launch: e.launch,
            resources: e.resources,
            compile_ms: e.compile_ms,
            family: it.family,
            m: it.m,
            db_rule: it.db_rule,
            gpu_check: it.gpu_check,
        });
    }
    kernels.sort_by(|a, b| a.key.cmp(&b.key));
    let manifest = Manifest {
        schema_version: BUNDLE_SCHEMA_VERSION,
        arch,
        toolchain: toolchain.unwrap_or(Toolchain { nvrtc_version: (0, 0), mangrove_version: env!("CARGO_PKG_VERSION").into() }),
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        source,
        kernels,
    };
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| BundleError::Manifest { path: MANIFEST.into(), reason: e.to_string() })? + "\n";
    std::fs::write(tmp.join(MANIFEST), &text).map_err(io(&tmp))?;
    std::fs::write(tmp.join(DIGEST), blake3::hash(text.as_bytes()).to_hex().to_string() + "\n").map_err(io(&tmp))?;
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(io(out))?;
    }
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(manifest)
}

/// An opened, verified bundle.
#[derive(Debug)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    by_key: BTreeMap<String, usize>,
}

impl Bundle {
    /// Opens `dir` after checking every hash, the manifest digest, and that no file is missing
    /// or extra; any problem fails the open and names the file.
    pub fn open(dir: &Path) -> Result<Self, BundleError> {
        let manifest = verify(dir)?;
        let by_key = manifest.kernels.iter().enumerate().map(|(i, k)| (k.key.clone(), i)).collect();
        Ok(Self { dir: dir.to_path_buf(), manifest, by_key })
    }

    /// The cache entry for `key`, read from disk and hash-checked again.
    pub fn get(&self, key: &KernelKey) -> Result<Option<CacheEntry>, BundleError> {
        let Some(&i) = self.by_key.get(&key.to_hex()) else { return Ok(None) };
        let k = &self.manifest.kernels[i];
        let path = self.dir.join(&k.file);
        let cubin = std::fs::read(&path).map_err(io(&path))?;
        let digest = blake3::hash(&cubin);
        if digest.to_hex().as_str() != k.cubin_blake3 {
            return Err(BundleError::Verify { dir: self.dir.display().to_string(), problems: vec![format!("{}: cubin hash changed since open", k.file)] });
        }
        Ok(Some(CacheEntry {
            inputs: k.inputs.clone(),
            entry: k.entry.clone(),
            launch: k.launch,
            cubin,
            ptx: None,
            resources: k.resources.clone(),
            compile_ms: k.compile_ms,
            toolchain: self.manifest.toolchain.clone(),
            blob_blake3: *digest.as_bytes(),
            created_unix: 0,
        }))
    }

    /// The key a request has in this bundle: rendered from `catalog` and keyed with the
    /// bundle's toolchain, so no NVRTC is needed.
    pub fn key_for(&self, catalog: &Catalog, req: &mangrove_core::jit::KernelRequest) -> Result<KernelKey, BundleError> {
        if req.arch != self.manifest.arch {
            return Err(BundleError::ArchMismatch { dir: self.dir.display().to_string(), bundle: self.manifest.arch, asked: req.arch });
        }
        let kernel = catalog.get(&req.template)?.render(&req.params)?;
        let inputs = KeyInputs::new(&kernel, req.arch, self.manifest.toolchain.nvrtc_version, &Compiler::options(req.arch));
        Ok(inputs.key())
    }

    /// The planned kernels this bundle lacks (an offline server refuses to start on any).
    pub fn missing<'a>(&self, catalog: &Catalog, planned: &'a [PlannedKernel]) -> Result<Vec<&'a PlannedKernel>, BundleError> {
        let mut out = Vec::new();
        for p in planned.iter().filter(|p| p.unavailable.is_none()) {
            if !self.by_key.contains_key(&self.key_for(catalog, &p.request)?.to_hex()) {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Every entry, in key order.
    pub fn entries(&self) -> Result<Vec<CacheEntry>, BundleError> {
        self.manifest
            .kernels
            .iter()
            .map(|k| Ok(self.get(&KernelKey::from_hex(&k.key).expect("manifest keys are hex"))?.expect("listed")))
            .collect()
    }
}

/// Checks a bundle: the manifest digest, every cubin's hash, no missing or extra file.
pub fn verify(dir: &Path) -> Result<Manifest, BundleError> {
    let mpath = dir.join(MANIFEST);
    let text = std::fs::read(&mpath).map_err(io(&mpath))?;
    let mut problems = Vec::new();
    let dpath = dir.join(DIGEST);
    match std::fs::read_to_string(&dpath) {
        Ok(d) if d.trim() == blake3::hash(&text).to_hex().as_str() => {}
        Ok(_) => problems.push(format!("{MANIFEST}: does not match {DIGEST}")),
        Err(e) => problems.push(format!("{DIGEST}: {e}")),
    }
    let manifest: Manifest = match serde_json::from_slice(&text) {
        Ok(m) => m,
        Err(e) => {
            problems.push(format!("{MANIFEST}: not a valid manifest: {e}"));
            return Err(BundleError::Verify { dir: dir.display().to_string(), problems });
        }
    };
    if manifest.schema_version != BUNDLE_SCHEMA_VERSION {
        problems.push(format!("{MANIFEST}: schema version {} (this mangrove reads {BUNDLE_SCHEMA_VERSION})", manifest.schema_version));
    }
    let mut listed = BTreeSet::new();
    for k in &manifest.kernels {
        listed.insert(k.file.clone());
        match std::fs::read(dir.join(&k.file)) {
            Ok(bytes) if blake3::hash(&bytes).to_hex().as_str() == k.cubin_blake3 => {}
            Ok(_) => problems.push(format!("{}: blake3 does not match the manifest", k.file)),
            Err(_) => problems.push(format!("{}: missing", k.file)),
        }
        if k.inputs.key().to_hex() != k.key {
            problems.push(format!("{}: key does not match its inputs", k.file));
        }
    }
    let kdir = dir.join(KERNELS);
    if let Ok(rd) = std::fs::read_dir(&kdir) {
        for e in rd.flatten() {
            let rel = format!("{KERNELS}/{}", e.file_name().to_string_lossy());
            if !listed.contains(&rel) {
                problems.push(format!("{rel}: extra file not in the manifest"));
            }
        }
    }
    if problems.is_empty() {
        Ok(manifest)
    } else {
        Err(BundleError::Verify { dir: dir.display().to_string(), problems })
    }
}
