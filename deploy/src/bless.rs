//! Making bundles and taking them apart: [`bless`] freezes the kernels `serve` needs for a
//! model, a tuning DB and an arch (optionally checking each against the CPU reference on this
//! GPU first); [`export`] writes a cache's kernels into a bundle and [`import`] puts a verified
//! bundle's kernels into a cache.

use std::collections::BTreeSet;
use std::path::Path;

use mangrove_core::arch::Arch;
use mangrove_core::cache::{Cache, CacheError, Lookup};
use mangrove_core::check::DEPLOY_GATE;
use mangrove_core::gpu::{Gpu, GpuError};
use mangrove_core::jit::{Jit, JitError, KernelRequest};
use mangrove_core::key::KernelKey;
use mangrove_core::model_config::{ConfigError, ModelConfig};
use mangrove_core::template::Catalog;
use mangrove_core::tuning_db::{DbError, LookupRule, TuningDb};
use mangrove_core::validate::{check_entry, has_validator};

use crate::bundle::{self, BlessItem, Bundle, BundleError, Manifest};
use crate::plan::plan;

/// Errors of blessing, exporting and importing.
#[derive(Debug, thiserror::Error)]
pub enum BlessError {
    #[error("--max-batch must be in 1..=512, got {0}")]
    MaxBatch(i64),
    #[error("tuning DB folder {} does not exist", .0.display())]
    NoTuningDb(std::path::PathBuf),
    #[error("--verify-on-gpu: this GPU is {gpu}, the bundle is for {arch}")]
    WrongGpu { gpu: Arch, arch: Arch },
    #[error("--verify-on-gpu")]
    Gpu(#[from] GpuError),
    #[error("{kernel}")]
    Kernel { kernel: String, source: Box<JitError> },
    #[error("checking {kernel} on the GPU")]
    Check { kernel: String, source: GpuError },
    #[error("refusing to bless: {} kernels failed the GPU check:\n{}", .0.len(), .0.join("\n"))]
    FailedCheck(Vec<String>),
    #[error("the cache holds no kernels to export")]
    EmptyCache,
    #[error("the cache holds kernels for {0:?}: pass --arch (a bundle is for one arch)")]
    ManyArchs(BTreeSet<Arch>),
    #[error(transparent)]
    Jit(#[from] JitError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    TuningDb(#[from] DbError),
    #[error(transparent)]
    Key(#[from] crate::signing::KeyError),
}

/// What `cache bless` is asked to freeze.
#[derive(Debug, Clone)]
pub struct BlessRequest<'a> {
    pub tuning_db: &'a Path,
    pub model: &'a Path,
    pub arch: Arch,
    pub out: &'a Path,
    /// Largest batch the server will run (every M up to it is blessed).
    pub max_batch: i64,
    /// Run each kernel once against the CPU reference on this GPU before blessing it.
    pub verify_on_gpu: bool,
    /// Sign the manifest with this key (`--sign-key`).
    pub sign: Option<&'a ed25519_dalek::SigningKey>,
}

/// A written bundle and how its kernels were chosen.
#[derive(Debug)]
pub struct Blessed {
    pub manifest: Manifest,
    /// Kernels from tuned records / on template defaults.
    pub tuned: usize,
    pub defaults: usize,
    /// Planned kernels whose shape no template can take (not blessed), with why.
    pub unavailable: Vec<String>,
}

/// Blesses the plan of `r.model` with `r.tuning_db` for `r.arch` from `catalog`, compiling
/// misses into the cache in `cache_dir`; the bundle is whole or absent.
pub fn bless(catalog: &Catalog, cache_dir: &Path, r: &BlessRequest) -> Result<Blessed, BlessError> {
    if !(1..=512).contains(&r.max_batch) {
        return Err(BlessError::MaxBatch(r.max_batch));
    }
    if !r.tuning_db.is_dir() {
        return Err(BlessError::NoTuningDb(r.tuning_db.to_path_buf()));
    }
    let config = ModelConfig::from_model_dir(r.model)?;
    let db = TuningDb::load(r.tuning_db)?;
    let (planned, unavailable): (Vec<_>, Vec<_>) =
        plan(catalog, &config, &db, r.arch, r.max_batch).into_iter().partition(|p| p.unavailable.is_none());
    let gpu = if r.verify_on_gpu {
        let g = Gpu::open(0)?;
        if g.info().arch.cc != r.arch.cc {
            return Err(BlessError::WrongGpu { gpu: g.info().arch, arch: r.arch });
        }
        Some(g)
    } else {
        None
    };
    let jit = Jit::open(catalog.clone(), cache_dir, false)?;
    let reqs: Vec<KernelRequest> = planned.iter().map(|p| p.request.clone()).collect();
    let mut items = Vec::new();
    let mut failed = Vec::new();
    for (p, f) in planned.iter().zip(jit.get_many(&reqs)) {
        let kernel = || format!("{} M={}", p.family, p.m);
        let f = f.map_err(|source| BlessError::Kernel { kernel: kernel(), source: Box::new(source) })?;
        let gpu_check = match &gpu {
            Some(g) if has_validator(&p.request.template) => {
                let d = check_entry(g, &f.entry, 0xB1E55 ^ p.m as u64, DEPLOY_GATE.rel_floor)
                    .map_err(|source| BlessError::Check { kernel: kernel(), source })?
                    .deltas;
                if !d.passes(&DEPLOY_GATE) {
                    failed.push(format!("{}: {d}", kernel()));
                }
                Some(d)
            }
            _ => None,
        };
        items.push(BlessItem { entry: f.entry, family: Some(p.family), m: Some(p.m), db_rule: Some(format!("{:?}", p.rule)), gpu_check });
    }
    if !failed.is_empty() {
        return Err(BlessError::FailedCheck(failed));
    }
    let source = [
        ("tuning_db".to_string(), r.tuning_db.display().to_string()),
        ("model".to_string(), r.model.display().to_string()),
        ("command".to_string(), std::env::args().collect::<Vec<_>>().join(" ")),
    ]
    .into();
    let manifest = bundle::write_signed(r.out, r.arch, source, items, r.sign)?;
    let defaults = planned.iter().filter(|p| p.rule == LookupRule::Default).count();
    let unavailable = unavailable.iter().map(|u| format!("{} M={}: {}", u.family, u.m, u.unavailable.as_deref().unwrap_or_default())).collect();
    Ok(Blessed { manifest, tuned: planned.len() - defaults, defaults, unavailable })
}

/// Writes every kernel of `cache` (of `arch`, or of the one arch it holds) into a bundle at
/// `out`; returns the kernel count and the arch.
pub fn export(
    cache: &Cache,
    cache_dir: &Path,
    out: &Path,
    arch: Option<Arch>,
    sign: Option<&ed25519_dalek::SigningKey>,
) -> Result<(usize, Arch), BlessError> {
    let mut items = Vec::new();
    let mut archs = BTreeSet::new();
    for s in cache.list()? {
        let Some(key) = KernelKey::from_hex(&s.key) else { continue };
        if let Lookup::Hit(e) = cache.get(&key)? {
            if arch.is_none_or(|a| a == e.inputs.arch) {
                archs.insert(e.inputs.arch);
                items.push(BlessItem { entry: *e, family: None, m: None, db_rule: None, gpu_check: None });
            }
        }
    }
    let arch = match (arch, archs.len()) {
        (Some(a), _) => a,
        (None, 1) => *archs.iter().next().expect("one arch"),
        (None, 0) => return Err(BlessError::EmptyCache),
        (None, _) => return Err(BlessError::ManyArchs(archs)),
    };
    let n = items.len();
    bundle::write_signed(out, arch, [("exported_from".to_string(), cache_dir.display().to_string())].into(), items, sign)?;
    Ok((n, arch))
}

/// Inserts every kernel of the bundle at `dir` into `cache` after verifying it (signed by one
/// of `trusted`, when any is given) and re-deriving each entry from `catalog`: its key from its
/// own inputs, its entry symbol and launch geometry from its template. Any problem refuses the
/// whole bundle, naming the files, and writes nothing. Returns how many were imported.
pub fn import(cache: &Cache, dir: &Path, catalog: &Catalog, trusted: &[ed25519_dalek::VerifyingKey]) -> Result<usize, BlessError> {
    let bundle = Bundle::open_trusted(dir, trusted)?;
    let entries = bundle.entries()?;
    let mut problems = Vec::new();
    for e in &entries {
        let key = e.inputs.key();
        let file = format!("kernels/{key}.cubin");
        let kernel = match catalog.get(&e.inputs.template).and_then(|t| Ok((t.content_hash.clone(), t.render(&e.inputs.params)?))) {
            Ok((hash, _)) if hash != e.inputs.template_hash => {
                problems.push(format!("{file}: template {} is not this catalog's (hash {}, the entry's {}): its launch cannot be checked", e.inputs.template, hash, e.inputs.template_hash));
                continue;
            }
            Ok((_, k)) => k,
            Err(err) => {
                problems.push(format!("{file}: {}", mangrove_core::error_chain(&err)));
                continue;
            }
        };
        if e.entry != kernel.entry || e.launch != kernel.launch {
            problems.push(format!("{file}: entry symbol / launch {} {:?} differ from the template's {} {:?}", e.entry, e.launch, kernel.entry, kernel.launch));
        }
    }
    if !problems.is_empty() {
        return Err(BundleError::Verify { dir: dir.display().to_string(), problems }.into());
    }
    for e in &entries {
        cache.put(&e.inputs.key(), e)?;
    }
    Ok(entries.len())
}
