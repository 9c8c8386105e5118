//! Kernel provisioning at server start: obtain every kernel of the plan before the first
//! request, from the JIT (cache or compile), a blessed bundle, or the JIT service. Offline
//! (bundle only) never loads NVRTC and refuses to start, naming every kernel the bundle lacks.
//! Every kernel not served by the preferred source is a counted fallback with its reason.
//! [`prepare`] is the whole start-up step `serve` and `bench decode` run: plan, provision, and a
//! typed [`KernelReport`] that `/health` serializes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use mangrove_core::arch::Arch;
use mangrove_core::cache::CacheEntry;
use mangrove_core::jit::{Fetched, Jit, JitError, Outcome};
use mangrove_core::model_config::{ConfigError, ModelConfig};
use mangrove_core::step::Family;
use mangrove_core::template::Catalog;
use mangrove_core::tuning_db::{DbError, LookupRule, TuningDb};

use crate::bundle::{Bundle, BundleError};
use crate::plan::{plan, PlannedKernel};
use crate::service::client::{ClientError, JitClient};

/// Provisioned kernels by (family, M): what the CUDA engine loads.
pub type KernelEntries = BTreeMap<(Family, i64), CacheEntry>;

/// Where kernels come from.
pub enum KernelSource {
    /// The local JIT: sled cache, NVRTC on a miss.
    Jit(Jit),
    /// A blessed bundle; offline, a kernel it lacks is fatal (and NVRTC is never loaded),
    /// otherwise it is compiled by the local JIT and counted as a fallback.
    Blessed { bundle: Bundle, catalog: Catalog, offline: bool },
    /// The JIT service; the local JIT compiles when it is unreachable.
    Service { client: JitClient },
}

impl KernelSource {
    /// The name `/health` reports.
    pub fn kind(&self) -> SourceKind {
        match self {
            KernelSource::Jit(_) => SourceKind::Jit,
            KernelSource::Blessed { .. } => SourceKind::Blessed,
            KernelSource::Service { .. } => SourceKind::Service,
        }
    }
}

/// Which source served a start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    Jit,
    Blessed,
    Service,
}

impl SourceKind {
    /// The serialized name.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Jit => "jit",
            SourceKind::Blessed => "blessed",
            SourceKind::Service => "service",
        }
    }
}

/// Errors of provisioning.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("offline: the bundle lacks {} kernel(s) this model needs:\n{}", .0.len(), .0.join("\n"))]
    MissingFromBundle(Vec<String>),
    #[error("--strict: {} kernel fallback(s):\n{}", .0.len(), .0.iter().map(|f| format!("  {f}")).collect::<Vec<_>>().join("\n"))]
    Strict(Vec<Fallback>),
    #[error("--max-batch must be in 1..=4096, got {0}")]
    MaxBatch(i64),
    #[error("opening blessed bundle {}", .path.display())]
    OpenBundle { path: PathBuf, source: BundleError },
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Jit(#[from] JitError),
    #[error(transparent)]
    Service(#[from] ClientError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    TuningDb(#[from] DbError),
    #[error(transparent)]
    Key(#[from] crate::signing::KeyError),
}

/// How one kernel was obtained.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Obtained {
    CacheHit,
    Compiled,
    Bundle,
    Service,
}

/// Why a layer family ran a slower path than the tuned kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackReason {
    /// The tuning DB has no record for this shape.
    NoTunedKernel,
    /// The tuned kernel could not be compiled or loaded.
    KernelUnavailable,
    /// No GPU: the CPU reference ran.
    NoGpu,
    /// Not in the blessed bundle: compiled at start.
    NotInBundle,
    /// The JIT service was unreachable: compiled locally.
    ServiceDown,
    /// The JIT service answered an entry that is not the kernel asked for: compiled locally.
    ServiceWrongEntry,
}

impl FallbackReason {
    /// The label value used in metrics (the serialized name).
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::NoTunedKernel => "no_tuned_kernel",
            FallbackReason::KernelUnavailable => "kernel_unavailable",
            FallbackReason::NoGpu => "no_gpu",
            FallbackReason::NotInBundle => "not_in_bundle",
            FallbackReason::ServiceDown => "service_down",
            FallbackReason::ServiceWrongEntry => "service_wrong_entry",
        }
    }
}

/// One kernel not obtained the preferred way.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Fallback {
    pub family: Family,
    pub m: i64,
    pub reason: FallbackReason,
    pub detail: String,
}

impl std::fmt::Display for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} M={}: {} ({})", self.family, self.m, self.reason.as_str(), self.detail)
    }
}

/// The kernels of a plan, ready to load.
#[derive(Debug, Default, serde::Serialize)]
pub struct Provisioned {
    #[serde(skip)]
    pub entries: KernelEntries,
    /// Kernels per way obtained ([`Obtained`] names).
    pub obtained: BTreeMap<String, usize>,
    pub fallbacks: Vec<Fallback>,
    pub ms: f64,
}

/// Obtains every planned kernel from `source`; `local` opens the local JIT, at most once and
/// only when a kernel must be compiled here (never for an offline bundle).
pub fn provision(
    plan: &[PlannedKernel],
    source: &KernelSource,
    local: &dyn Fn() -> Result<Jit, ProvisionError>,
) -> Result<Provisioned, ProvisionError> {
    let t0 = Instant::now();
    let mut out = Provisioned::default();
    let local_jit: std::cell::OnceCell<Jit> = std::cell::OnceCell::new();
    let jit = || -> Result<&Jit, ProvisionError> {
        if local_jit.get().is_none() {
            let _ = local_jit.set(local()?);
        }
        Ok(local_jit.get().expect("set above"))
    };
    if let KernelSource::Blessed { bundle, catalog, offline: true } = source {
        let missing = bundle.missing(catalog, plan)?;
        if !missing.is_empty() {
            return Err(ProvisionError::MissingFromBundle(missing.into_iter().map(PlannedKernel::label).collect()));
        }
    }
    // The local JIT serves every kernel in one parallel batch (misses compile concurrently).
    let mut batch: BTreeMap<usize, Result<Fetched, JitError>> = BTreeMap::new();
    if let KernelSource::Jit(jit) = source {
        let idx: Vec<usize> = (0..plan.len()).filter(|&i| plan[i].unavailable.is_none()).collect();
        let reqs: Vec<_> = idx.iter().map(|&i| plan[i].request.clone()).collect();
        batch = idx.into_iter().zip(jit.get_many(&reqs)).collect();
    }
    for (i, p) in plan.iter().enumerate() {
        let fallback = |reason, detail: String| Fallback { family: p.family, m: p.m, reason, detail };
        // A shape the template cannot take (a violated constraint) has no kernel: the engine
        // runs its reference path for that family, and the fallback is counted.
        if let Some(why) = &p.unavailable {
            out.fallbacks.push(fallback(FallbackReason::KernelUnavailable, why.clone()));
            continue;
        }
        if p.rule == LookupRule::Default {
            out.fallbacks.push(fallback(FallbackReason::NoTunedKernel, "template defaults".into()));
        }
        let (entry, how) = match source {
            KernelSource::Jit(jit) => {
                let f = match batch.remove(&i) {
                    Some(f) => f?,
                    None => jit.get(&p.request)?,
                };
                let how = if f.outcome == Outcome::Hit { Obtained::CacheHit } else { Obtained::Compiled };
                (f.entry, how)
            }
            KernelSource::Blessed { bundle, catalog, .. } => match bundle.entry_for(catalog, &p.request)? {
                Some(e) => (e, Obtained::Bundle),
                None => {
                    out.fallbacks.push(fallback(FallbackReason::NotInBundle, p.label()));
                    (jit()?.get(&p.request)?.entry, Obtained::Compiled)
                }
            },
            KernelSource::Service { client } => match client.fetch(&p.request) {
                Ok(e) => (e, Obtained::Service),
                // A bad request would fail the same way locally.
                Err(e @ (ClientError::Status { status: 400, .. } | ClientError::Local(_))) => return Err(e.into()),
                Err(e) => {
                    eprintln!("warning: {e}; compiling locally");
                    let reason = if matches!(e, ClientError::WrongEntry { .. }) { FallbackReason::ServiceWrongEntry } else { FallbackReason::ServiceDown };
                    out.fallbacks.push(fallback(reason, e.to_string()));
                    (jit()?.get(&p.request)?.entry, Obtained::Compiled)
                }
            },
        };
        *out.obtained.entry(format!("{how:?}")).or_default() += 1;
        out.entries.insert((p.family, p.m), entry);
    }
    out.ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(out)
}

/// How `serve` obtains its kernels before it answers (all of them, at start).
#[derive(Debug, Clone)]
pub struct KernelOptions {
    /// Target architecture of the kernels.
    pub arch: Arch,
    /// Largest batch: every M up to it is prepared.
    pub max_batch: i64,
    /// Take kernels from this blessed bundle (verified at start).
    pub blessed: Option<PathBuf>,
    /// With `blessed`: never load NVRTC; refuse to start if the bundle lacks a kernel.
    pub offline: bool,
    /// Ask this JIT service (`mangrove jitd`) for kernels; compile locally if it is down.
    pub jit_url: Option<String>,
    /// The JIT service's API key.
    pub jit_api_key: Option<String>,
    /// Make any fallback an error at start instead of a counted slower path.
    pub strict: bool,
    /// With `blessed`: the bundle must be signed by one of these public keys.
    pub trusted_keys: Vec<PathBuf>,
}

/// What a start's provisioning tells `/health`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelReport {
    pub source: SourceKind,
    #[serde(serialize_with = "display")]
    pub arch: Arch,
    pub planned: usize,
    pub obtained: BTreeMap<String, usize>,
    pub ready_ms: f64,
    pub nvrtc_loaded: bool,
    pub fallbacks: Vec<Fallback>,
}

fn display<S: serde::Serializer>(v: &impl std::fmt::Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// A provisioned start: the report and the kernels.
pub struct Prepared {
    pub report: KernelReport,
    pub entries: KernelEntries,
}

/// Plans and obtains every kernel the model in `model_dir` needs with `tuning_db` (none: template
/// defaults), from the bundle, the service or the local JIT over `cache_dir` (a private cache when
/// another process owns that one). `--strict` turns any fallback into an error.
pub fn prepare(catalog: &Catalog, model_dir: &Path, tuning_db: Option<&Path>, k: &KernelOptions, cache_dir: &Path) -> Result<Prepared, ProvisionError> {
    if !(1..=4096).contains(&k.max_batch) {
        return Err(ProvisionError::MaxBatch(k.max_batch));
    }
    let config = ModelConfig::from_model_dir(model_dir)?;
    let db = match tuning_db {
        Some(d) => TuningDb::load(d)?,
        None => TuningDb::default(),
    };
    let planned = plan(catalog, &config, &db, k.arch, k.max_batch);
    let source = match (&k.blessed, &k.jit_url) {
        (Some(b), _) => {
            let trusted = k.trusted_keys.iter().map(|p| crate::signing::load_verifying_key(p)).collect::<Result<Vec<_>, _>>()?;
            let bundle = Bundle::open_trusted(b, &trusted).map_err(|source| ProvisionError::OpenBundle { path: b.clone(), source })?;
            KernelSource::Blessed { bundle, catalog: catalog.clone(), offline: k.offline }
        }
        (None, Some(url)) => KernelSource::Service { client: JitClient::new(url, catalog.clone()).with_api_key(k.jit_api_key.clone()) },
        (None, None) => KernelSource::Jit(Jit::open(catalog.clone(), cache_dir, false)?),
    };
    // The local JIT for misses: the shared cache when this process owns it, else a private one.
    let local = || -> Result<Jit, ProvisionError> {
        let private = std::env::temp_dir().join(format!("mangrove-local-{}", std::process::id()));
        let jit = Jit::open(catalog.clone(), cache_dir, false).or_else(|_| Jit::open(catalog.clone(), &private, false))?;
        Ok(jit)
    };
    let got = provision(&planned, &source, &local)?;
    if k.strict && !got.fallbacks.is_empty() {
        return Err(ProvisionError::Strict(got.fallbacks));
    }
    let report = KernelReport {
        source: source.kind(),
        arch: k.arch,
        planned: planned.len(),
        obtained: got.obtained,
        ready_ms: got.ms,
        nvrtc_loaded: mangrove_core::compile::nvrtc_loaded(),
        fallbacks: got.fallbacks,
    };
    eprintln!(
        "mangrove: {} kernels for {} ready from {} in {:.1} ms ({:?}; {} fallbacks)",
        report.planned,
        k.arch,
        report.source.as_str(),
        report.ready_ms,
        report.obtained,
        report.fallbacks.len()
    );
    Ok(Prepared { report, entries: got.entries })
}

