//! Kernel provisioning at server start: obtain every kernel of the plan before the first
//! request, from the JIT (cache or compile), a blessed bundle, or the JIT service. Offline
//! (bundle only) never loads NVRTC and refuses to start, naming every kernel the bundle lacks.
//! Every kernel not served by the preferred source is a counted fallback with its reason.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::bundle::{Bundle, BundleError};
use crate::cache::CacheEntry;
use crate::jit::{Jit, JitError, Outcome};
use crate::plan::PlannedKernel;
use crate::service::client::{ClientError, JitClient, Source};
use crate::template::Catalog;
use crate::tuning_db::LookupRule;

/// Where kernels come from.
pub enum KernelSource {
    /// The local JIT: sled cache, NVRTC on a miss.
    Jit(Jit),
    /// A blessed bundle; `fallback` compiles what it lacks (None = offline: lacking is fatal).
    Blessed { bundle: Bundle, catalog: Catalog, fallback: Option<Jit> },
    /// The JIT service, with a local JIT when it is unreachable.
    Service { client: JitClient, local: Jit },
}

/// Errors of provisioning.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("offline: the bundle lacks {} kernel(s) this model needs:\n{}", .0.len(), .0.join("\n"))]
    MissingFromBundle(Vec<String>),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Jit(#[from] JitError),
    #[error(transparent)]
    Service(#[from] ClientError),
}

/// How one kernel was obtained.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Obtained {
    CacheHit,
    Compiled,
    Bundle,
    Service,
}

/// Why a kernel did not come the preferred way.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum FallbackReason {
    /// The tuning DB has no record for this shape: the template's defaults are used.
    NoTunedConfig,
    /// Not in the blessed bundle: compiled at start.
    NotInBundle,
    /// The JIT service was unreachable: compiled locally.
    ServiceDown(String),
}

/// The kernels of a plan, ready to load.
#[derive(Debug, Default, serde::Serialize)]
pub struct Provisioned {
    /// (family, m) → entry.
    #[serde(skip)]
    pub entries: BTreeMap<(String, i64), CacheEntry>,
    pub obtained: BTreeMap<String, usize>,
    pub fallbacks: Vec<(String, i64, FallbackReason)>,
    pub ms: f64,
}

fn label(p: &PlannedKernel) -> String {
    format!("{} M={} ({} {})", p.family, p.m, p.request.template, crate::template::format_params(&p.request.params))
}

/// Obtains every planned kernel from `source`.
pub fn provision(plan: &[PlannedKernel], source: &KernelSource) -> Result<Provisioned, ProvisionError> {
    let t0 = Instant::now();
    let mut out = Provisioned::default();
    if let KernelSource::Blessed { bundle, catalog, fallback: None } = source {
        let missing = bundle.missing(catalog, plan)?;
        if !missing.is_empty() {
            return Err(ProvisionError::MissingFromBundle(missing.into_iter().map(label).collect()));
        }
    }
    for p in plan {
        if p.rule == LookupRule::Default {
            out.fallbacks.push((p.family.clone(), p.m, FallbackReason::NoTunedConfig));
        }
        let (entry, how) = match source {
            KernelSource::Jit(jit) => {
                let f = jit.get(&p.request)?;
                let how = if f.outcome == Outcome::Hit { Obtained::CacheHit } else { Obtained::Compiled };
                (f.entry, how)
            }
            KernelSource::Blessed { bundle, catalog, fallback } => match bundle.get(&bundle.key_for(catalog, &p.request)?)? {
                Some(e) => (e, Obtained::Bundle),
                None => {
                    let jit = fallback.as_ref().expect("offline misses were rejected above");
                    out.fallbacks.push((p.family.clone(), p.m, FallbackReason::NotInBundle));
                    (jit.get(&p.request)?.entry, Obtained::Compiled)
                }
            },
            KernelSource::Service { client, local } => match client.fetch_or_compile(&p.request, local)? {
                (e, Source::Service) => (e, Obtained::Service),
                (e, Source::LocalFallback(why)) => {
                    out.fallbacks.push((p.family.clone(), p.m, FallbackReason::ServiceDown(why)));
                    (e, Obtained::Compiled)
                }
            },
        };
        *out.obtained.entry(format!("{how:?}")).or_default() += 1;
        out.entries.insert((p.family.clone(), p.m), entry);
    }
    out.ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(out)
}
