//! One sweep: a template on one problem. Enumerate and shard the space, compile every
//! candidate in parallel, prune by device limits, then (on a GPU) gate and time candidates in
//! the order the strategy asks, and build the tuning-DB record of the winner.

use std::collections::BTreeMap;

use indicatif::ProgressBar;

use super::space::{enumerate, DeviceLimits, PruneReason, Shard};
use super::strategy::{search, Strategy};
use super::workload::Workload;
use crate::arch::Arch;
use crate::cache::CacheEntry;
use crate::check::{Deltas, Gate};
use crate::gpu::{Gpu, GpuError, TimingPlan, TimingStats};
use crate::jit::{Jit, JitError, KernelRequest};
use crate::template::{ParamRole, Params, TemplateError};
use crate::tuning_db::{Provenance, Record, Timed};

/// Errors of a sweep.
#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error(transparent)]
    Jit(#[from] JitError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("{0}")]
    Input(String),
}

/// Settings shared by every sweep of a run.
#[derive(Debug, Clone)]
pub struct SweepSettings {
    pub arch: Arch,
    pub strategy: Strategy,
    pub shard: Shard,
    pub gate: Gate,
    pub plan: TimingPlan,
    pub runner_ups: usize,
    /// Compile and resource-check only; time nothing.
    pub compile_only: bool,
}

/// What happened to every candidate of one sweep.
#[derive(Debug, Default)]
pub struct SweepOutcome {
    pub candidates: usize,
    pub pruned: Vec<(Params, PruneReason)>,
    pub rejected: Vec<(Params, Deltas)>,
    pub timed: Vec<(Params, TimingStats, Deltas)>,
    /// The template's default config on the same workload, when it was valid and timed.
    pub default_us: Option<f64>,
    pub record: Option<Record>,
}

/// The tunable part of `params` for `template` (what a record stores).
pub fn tunables_of(jit: &Jit, template: &str, params: &Params) -> Result<Params, TemplateError> {
    let t = jit.catalog.get(template)?;
    Ok(params
        .iter()
        .filter(|(k, _)| t.param(k).is_some_and(|p| p.role == ParamRole::Tunable))
        .map(|(k, v)| (k.clone(), *v))
        .collect())
}

/// Runs one sweep of `template` over `problem` (all problem params, M included).
#[allow(clippy::too_many_arguments)]
pub fn sweep(
    jit: &Jit,
    gpu: Option<&Gpu>,
    limits: &DeviceLimits,
    template: &str,
    problem: &Params,
    workload: Option<&mut dyn Workload>,
    settings: &SweepSettings,
    copy_bw_gbs: f64,
    provenance: &Provenance,
    progress: &ProgressBar,
) -> Result<SweepOutcome, TuneError> {
    let t = jit.catalog.get(template)?;
    let (valid, mut pruned) = enumerate(t, problem);
    let mut out = SweepOutcome { candidates: valid.len() + pruned.len(), ..Default::default() };
    let mine = settings.shard.take(valid);
    let reqs: Vec<KernelRequest> =
        mine.iter().map(|p| KernelRequest { template: template.into(), params: p.clone(), arch: settings.arch }).collect();
    let mut entries: BTreeMap<Params, CacheEntry> = BTreeMap::new();
    for (p, f) in mine.iter().zip(jit.get_many(&reqs)) {
        match f {
            Ok(f) => match limits.check(&f.entry) {
                Some(reason) => pruned.push((p.clone(), reason)),
                None => {
                    entries.insert(p.clone(), f.entry);
                }
            },
            Err(e) => pruned.push((p.clone(), PruneReason::CompileFailed(e.to_string()))),
        }
    }
    out.pruned = pruned;
    let (Some(gpu), Some(work)) = (gpu, workload) else { return Ok(out) };
    if settings.compile_only {
        return Ok(out);
    }

    let survivors: Vec<Params> = entries.keys().cloned().collect();
    let tunable_values: BTreeMap<String, Vec<i64>> = t
        .schema
        .params
        .iter()
        .filter(|p| p.role == ParamRole::Tunable)
        .map(|p| (p.name.clone(), p.values.clone().unwrap_or_else(|| vec![p.default])))
        .collect();
    let mut measured: BTreeMap<Params, (TimingStats, Deltas)> = BTreeMap::new();
    let mut failure: Option<GpuError> = None;
    let found = search(settings.strategy, &survivors, &tunable_values, |p| {
        progress.inc(1);
        if failure.is_some() {
            return None;
        }
        let entry = &entries[p];
        let gated = work.check(gpu, entry, settings.gate.rel_floor).and_then(|d| {
            if !d.passes(&settings.gate) {
                return Ok(Err(d));
            }
            Ok(Ok((work.time(gpu, entry, settings.plan)?, d)))
        });
        match gated {
            Ok(Ok((stats, d))) => {
                measured.insert(p.clone(), (stats, d));
                Some(stats.median_us)
            }
            Ok(Err(d)) => {
                out.rejected.push((p.clone(), d));
                None
            }
            Err(e) => {
                failure = Some(e);
                None
            }
        }
    });
    if let Some(e) = failure {
        return Err(e.into());
    }
    // The fixed default config, timed on the same workload, is the baseline for "tuned vs default".
    let default = t.resolve(problem).ok();
    if let Some(d) = default.filter(|d| entries.contains_key(d)) {
        out.default_us = match measured.get(&d) {
            Some((s, _)) => Some(s.median_us),
            None => Some(work.time(gpu, &entries[&d], settings.plan)?.median_us),
        };
    }
    let bytes = work.min_bytes() as f64;
    let timed = |p: &Params| -> Result<Timed, TuneError> {
        let (s, d) = measured[p];
        let gb_s = bytes / (s.median_us * 1e-6) / 1e9;
        Ok(Timed {
            params: tunables_of(jit, template, p)?,
            median_us: s.median_us,
            p95_us: s.p95_us,
            mean_us: s.mean_us,
            gb_s,
            frac_copy_bw: if copy_bw_gbs > 0.0 { gb_s / copy_bw_gbs } else { 0.0 },
            deltas: d,
        })
    };
    let ranked = found.ranked();
    out.timed = ranked.iter().map(|(p, _)| (p.clone(), measured[p].0, measured[p].1)).collect();
    if let Some((best, _)) = ranked.first() {
        let runner_ups = ranked.iter().skip(1).take(settings.runner_ups).map(|(p, _)| timed(p)).collect::<Result<_, _>>()?;
        out.record = Some(Record {
            problem: problem.iter().filter(|(k, _)| k.as_str() != "M").map(|(k, v)| (k.clone(), *v)).collect(),
            m: problem.get("M").copied().unwrap_or(1),
            winner: timed(best)?,
            runner_ups,
            candidates: out.candidates,
            pruned: out.pruned.len(),
            rejected: out.rejected.len(),
            timed: measured.len(),
            strategy: settings.strategy.to_string(),
            gate: settings.gate,
            copy_bw_gbs,
            default_us: out.default_us,
            provenance: provenance.clone(),
        });
    }
    Ok(out)
}
