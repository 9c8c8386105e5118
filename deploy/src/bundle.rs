//! Blessed bundles: a frozen, hash-verified set of kernels an offline deploy loads without
//! NVRTC. Layout: `manifest.json` (per kernel its key, cubin blake3, key inputs, launch,
//! resources, the DB rule it came from, and `entry_blake3` over everything the loader uses),
//! `manifest.blake3` (digest of the manifest bytes), optionally `manifest.sig` (ed25519 over the
//! manifest, [`crate::signing`]) and `kernels/<key>.cubin`. Written to a temporary folder and
//! renamed, so a bundle is whole or absent.
//!
//! Verification trusts no name in the manifest: each kernel's file must be exactly
//! `kernels/<key>.cubin`, read confined to the bundle ([`crate::confine`]: no `..`, absolute
//! paths, symlinks, FIFOs or devices); its key must be the hash of its inputs; and extra files
//! are reported. Serving re-renders each kernel's template and refuses an entry whose symbol or
//! launch geometry differs from it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mangrove_core::arch::Arch;
use mangrove_core::cache::{CacheEntry, Toolchain};
use mangrove_core::check::Deltas;
use mangrove_core::compile::{Compiler, ResourceReport};
use mangrove_core::key::{KernelKey, KeyInputs};
use mangrove_core::step::Family;
use mangrove_core::template::{Catalog, LaunchDims, RenderedKernel, TemplateError};

use crate::plan::PlannedKernel;

/// Bump when the manifest format changes.
pub const BUNDLE_SCHEMA_VERSION: u32 = 2; // 2: entry_blake3, manifest.sig
const MANIFEST: &str = "manifest.json";
const DIGEST: &str = "manifest.blake3";
/// The ed25519 signature of the manifest (optional; required under a trusted key).
pub const SIGNATURE: &str = "manifest.sig";
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
    /// Path of the cubin relative to the bundle: always `kernels/<key>.cubin`.
    pub file: String,
    pub cubin_blake3: String,
    /// blake3 over the key, file, cubin hash, key inputs, entry symbol, launch geometry and
    /// resources ([`entry_digest`]): what the loader uses, in one hash per kernel.
    pub entry_blake3: String,
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

/// The per-kernel hash: every field the loader uses, each framed by a tag and a length.
pub fn entry_digest(k: &ManifestKernel) -> String {
    let mut h = blake3::Hasher::new();
    let mut field = |tag: &str, bytes: &[u8]| {
        h.update(tag.as_bytes());
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field("mangrove-bundle-entry", &BUNDLE_SCHEMA_VERSION.to_le_bytes());
    field("key", k.key.as_bytes());
    field("file", k.file.as_bytes());
    field("cubin_blake3", k.cubin_blake3.as_bytes());
    field("inputs", serde_json::to_string(&k.inputs).expect("key inputs serialize").as_bytes());
    field("entry", k.entry.as_bytes());
    for d in k.launch.grid.iter().chain(&k.launch.block) {
        field("dim", &d.to_le_bytes());
    }
    field("shared_bytes", &k.launch.shared_bytes.to_le_bytes());
    field("pdl", &[u8::from(k.launch.pdl)]);
    field("resources", serde_json::to_string(&k.resources).expect("resource reports serialize").as_bytes());
    h.finalize().to_hex().to_string()
}

/// Writes an unsigned bundle of `items` for `arch` to `out` (replacing any bundle there).
pub fn write(out: &Path, arch: Arch, source: BTreeMap<String, String>, items: Vec<BlessItem>) -> Result<Manifest, BundleError> {
    write_signed(out, arch, source, items, None)
}

/// Writes a bundle of `items` for `arch` to `out` (replacing any bundle there), signed with
/// `sign` when given.
pub fn write_signed(
    out: &Path,
    arch: Arch,
    source: BTreeMap<String, String>,
    items: Vec<BlessItem>,
    sign: Option<&ed25519_dalek::SigningKey>,
) -> Result<Manifest, BundleError> {
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
        let mut k = ManifestKernel {
            key,
            file,
            cubin_blake3: blake3::hash(&e.cubin).to_hex().to_string(),
            entry_blake3: String::new(),
            inputs: e.inputs,
            entry: e.entry,
            launch: e.launch,
            resources: e.resources,
            compile_ms: e.compile_ms,
            family: it.family,
            m: it.m,
            db_rule: it.db_rule,
            gpu_check: it.gpu_check,
        };
        k.entry_blake3 = entry_digest(&k);
        kernels.push(k);
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
    if let Some(key) = sign {
        std::fs::write(tmp.join(SIGNATURE), crate::signing::sign(key, text.as_bytes())).map_err(io(&tmp))?;
    }
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
    /// or extra; any problem fails the open and names the file. No signature is required.
    pub fn open(dir: &Path) -> Result<Self, BundleError> {
        Self::open_trusted(dir, &[])
    }

    /// [`Bundle::open`], and with `trusted` keys the manifest must be signed by one of them.
    pub fn open_trusted(dir: &Path, trusted: &[ed25519_dalek::VerifyingKey]) -> Result<Self, BundleError> {
        let manifest = verify_trusted(dir, trusted)?;
        let by_key = manifest.kernels.iter().enumerate().map(|(i, k)| (k.key.clone(), i)).collect();
        Ok(Self { dir: dir.to_path_buf(), manifest, by_key })
    }

    /// The cache entry for `key`, read from disk and hash-checked again.
    pub fn get(&self, key: &KernelKey) -> Result<Option<CacheEntry>, BundleError> {
        let Some(&i) = self.by_key.get(&key.to_hex()) else { return Ok(None) };
        let k = &self.manifest.kernels[i];
        let problem = |p: String| BundleError::Verify { dir: self.dir.display().to_string(), problems: vec![p] };
        let cubin = crate::confine::read(&self.dir, &k.file).map_err(|e| problem(format!("{}: {e}", k.file)))?;
        let digest = blake3::hash(&cubin);
        if digest.to_hex().as_str() != k.cubin_blake3 {
            return Err(problem(format!("{}: cubin hash changed since open", k.file)));
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
        Ok(self.render_for(catalog, req)?.1)
    }

    fn render_for(&self, catalog: &Catalog, req: &mangrove_core::jit::KernelRequest) -> Result<(RenderedKernel, KernelKey), BundleError> {
        if req.arch != self.manifest.arch {
            return Err(BundleError::ArchMismatch { dir: self.dir.display().to_string(), bundle: self.manifest.arch, asked: req.arch });
        }
        let kernel = catalog.get(&req.template)?.render(&req.params)?;
        let inputs = KeyInputs::new(&kernel, req.arch, self.manifest.toolchain.nvrtc_version, &Compiler::options(req.arch));
        let key = inputs.key();
        Ok((kernel, key))
    }

    /// The entry serving `req`, if the bundle has it: its symbol and launch geometry must be the
    /// ones the template renders (the loader launches with them), else it is refused.
    pub fn entry_for(&self, catalog: &Catalog, req: &mangrove_core::jit::KernelRequest) -> Result<Option<CacheEntry>, BundleError> {
        let (kernel, key) = self.render_for(catalog, req)?;
        let Some(e) = self.get(&key)? else { return Ok(None) };
        if e.entry != kernel.entry || e.launch != kernel.launch {
            let file = format!("{KERNELS}/{key}.cubin");
            return Err(BundleError::Verify {
                dir: self.dir.display().to_string(),
                problems: vec![format!(
                    "{file}: entry symbol / launch {} {:?} differ from the template's {} {:?}",
                    e.entry, e.launch, kernel.entry, kernel.launch
                )],
            });
        }
        Ok(Some(e))
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

/// Checks a bundle: the manifest digest, every cubin's hash, confined paths, no missing or
/// extra file. No signature is required.
pub fn verify(dir: &Path) -> Result<Manifest, BundleError> {
    verify_trusted(dir, &[])
}

/// [`verify`], and with `trusted` keys `manifest.sig` must be an ed25519 signature of the
/// manifest by one of them.
pub fn verify_trusted(dir: &Path, trusted: &[ed25519_dalek::VerifyingKey]) -> Result<Manifest, BundleError> {
    let failed = |problems: Vec<String>| BundleError::Verify { dir: dir.display().to_string(), problems };
    let text = crate::confine::read(dir, MANIFEST).map_err(|e| failed(vec![format!("{MANIFEST}: {e}")]))?;
    let mut problems = Vec::new();
    match crate::confine::read(dir, DIGEST) {
        Ok(d) if String::from_utf8_lossy(&d).trim() == blake3::hash(&text).to_hex().as_str() => {}
        Ok(_) => problems.push(format!("{MANIFEST}: does not match {DIGEST}")),
        Err(e) => problems.push(format!("{DIGEST}: {e}")),
    }
    if !trusted.is_empty() {
        match crate::confine::read(dir, SIGNATURE) {
            Ok(sig) => {
                if let Err(why) = crate::signing::check(&String::from_utf8_lossy(&sig), &text, trusted) {
                    problems.push(format!("{SIGNATURE}: {why}"));
                }
            }
            Err(crate::confine::ConfineError::Missing) => problems.push(format!("{SIGNATURE}: missing: the bundle is unsigned and a trusted key is required")),
            Err(e) => problems.push(format!("{SIGNATURE}: {e}")),
        }
    }
    let manifest: Manifest = match serde_json::from_slice(&text) {
        Ok(m) => m,
        Err(e) => {
            problems.push(format!("{MANIFEST}: not a valid manifest: {e}"));
            return Err(failed(problems));
        }
    };
    if manifest.schema_version != BUNDLE_SCHEMA_VERSION {
        problems.push(format!("{MANIFEST}: schema version {} (this mangrove reads {BUNDLE_SCHEMA_VERSION}; bless it again)", manifest.schema_version));
    }
    let mut listed = BTreeSet::new();
    for k in &manifest.kernels {
        let expected = format!("{KERNELS}/{}.cubin", k.key);
        if k.file != expected {
            problems.push(format!("{}: refused: a kernel's file must be {expected}", k.file));
            continue;
        }
        listed.insert(k.key.clone() + ".cubin");
        match crate::confine::read(dir, &k.file) {
            Ok(bytes) if blake3::hash(&bytes).to_hex().as_str() == k.cubin_blake3 => {}
            Ok(_) => problems.push(format!("{}: blake3 does not match the manifest", k.file)),
            Err(e) => problems.push(format!("{}: {e}", k.file)),
        }
        if k.inputs.key().to_hex() != k.key {
            problems.push(format!("{}: key does not match its inputs", k.file));
        }
        if k.inputs.arch != manifest.arch {
            problems.push(format!("{}: compiled for {}, the bundle is for {}", k.file, k.inputs.arch, manifest.arch));
        }
        if entry_digest(k) != k.entry_blake3 {
            problems.push(format!("{}: entry_blake3 does not match its key, inputs, entry symbol, launch geometry or resources", k.file));
        }
    }
    let top: BTreeSet<&str> = [MANIFEST, DIGEST, SIGNATURE, KERNELS].into();
    for e in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !top.contains(name.as_str()) {
            problems.push(format!("{name}: extra file not in the manifest"));
        }
    }
    match std::fs::symlink_metadata(dir.join(KERNELS)) {
        Ok(m) if m.is_dir() => {
            for e in std::fs::read_dir(dir.join(KERNELS)).map_err(io(dir))?.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !listed.contains(&name) {
                    problems.push(format!("{KERNELS}/{name}: extra file not in the manifest"));
                }
            }
        }
        Ok(m) if m.file_type().is_symlink() => problems.push(format!("{KERNELS}: is a symlink (refused: it could point outside the bundle)")),
        Ok(_) => problems.push(format!("{KERNELS}: not a folder")),
        Err(_) if manifest.kernels.is_empty() => {}
        Err(e) => problems.push(format!("{KERNELS}: {e}")),
    }
    if problems.is_empty() {
        Ok(manifest)
    } else {
        Err(failed(problems))
    }
}
