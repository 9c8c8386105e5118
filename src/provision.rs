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
use crate::service::client::{ClientError, JitClient};
use crate::template::Catalog;
use crate::tuning_db::LookupRule;

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

pub use crate::engine::metrics::FallbackReason;

/// The kernels of a plan, ready to load.
#[derive(Debug, Default, serde::Serialize)]
pub struct Provisioned {
    /// (family, m) → entry.
    #[serde(skip)]
    pub entries: BTreeMap<(String, i64), CacheEntry>,
    pub obtained: BTreeMap<String, usize>,
    /// (family, m, reason, detail) of every kernel not obtained the preferred way.
    pub fallbacks: Vec<(String, i64, FallbackReason, String)>,
    pub ms: f64,
}

fn label(p: &PlannedKernel) -> String {
    format!("{} M={} ({} {})", p.family, p.m, p.request.template, crate::template::format_params(&p.request.params))
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
            return Err(ProvisionError::MissingFromBundle(missing.into_iter().map(label).collect()));
        }
    }
    // The local JIT serves every kernel in one parallel batch (misses compile concurrently).
    let mut batch: BTreeMap<usize, Result<crate::jit::Fetched, JitError>> = BTreeMap::new();
    if let KernelSource::Jit(jit) = source {
        let idx: Vec<usize> = (0..plan.len()).filter(|&i| plan[i].unavailable.is_none()).collect();
        let reqs: Vec<_> = idx.iter().map(|&i| plan[i].request.clone()).collect();
        batch = idx.into_iter().zip(jit.get_many(&reqs)).collect();
    }
    for (i, p) in plan.iter().enumerate() {
        // A shape the template cannot take (a violated constraint) has no kernel: the engine
        // runs its reference path for that family, and the fallback is counted.
        if let Some(why) = &p.unavailable {
            out.fallbacks.push((p.family.clone(), p.m, FallbackReason::KernelUnavailable, why.clone()));
            continue;
        }
        if p.rule == LookupRule::Default {
            out.fallbacks.push((p.family.clone(), p.m, FallbackReason::NoTunedKernel, "template defaults".into()));
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
            KernelSource::Blessed { bundle, catalog, .. } => match bundle.get(&bundle.key_for(catalog, &p.request)?)? {
                Some(e) => (e, Obtained::Bundle),
                None => {
                    out.fallbacks.push((p.family.clone(), p.m, FallbackReason::NotInBundle, label(p)));
                    (jit()?.get(&p.request)?.entry, Obtained::Compiled)
                }
            },
            KernelSource::Service { client } => match client.fetch(&p.request) {
                Ok(e) => (e, Obtained::Service),
                Err(ClientError::Service { reason, .. }) if reason.starts_with("400") => {
                    return Err(ClientError::Service { url: client.url.clone(), reason }.into());
                }
                Err(e) => {
                    eprintln!("warning: {e}; compiling locally");
                    out.fallbacks.push((p.family.clone(), p.m, FallbackReason::ServiceDown, e.to_string()));
                    (jit()?.get(&p.request)?.entry, Obtained::Compiled)
                }
            },
        };
        *out.obtained.entry(format!("{how:?}")).or_default() += 1;
        out.entries.insert((p.family.clone(), p.m), entry);
    }
    out.ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(out)
}
