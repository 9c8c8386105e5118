//! One sweep: a template on one problem. Enumerate and shard the space, compile every
//! candidate in parallel, prune by device limits, then (on a GPU) gate and time candidates in
//! the order the strategy asks, and build the tuning-DB record of the winner.

use std::collections::BTreeMap;

use indicatif::ProgressBar;

use super::space::{enumerate, DeviceLimits, PruneReason, Shard, SubSpace};
use super::strategy::{search, Evaluator, Strategy};
use super::workload::Workload;
use mangrove_core::arch::Arch;
use mangrove_core::cache::CacheEntry;
use mangrove_core::check::{Deltas, Gate};
use mangrove_core::gpu::{Gpu, GpuError, TimingPlan, TimingStats};
use mangrove_core::jit::{Jit, JitError, KernelRequest};
use mangrove_core::template::{ParamRole, Params, TemplateError};
use mangrove_core::tuning_db::{NoiseMargin, Provenance, Record, Timed};

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
    /// The part of each template's space swept (all of it by default).
    pub space: SubSpace,
    pub gate: Gate,
    pub plan: TimingPlan,
    pub runner_ups: usize,
    /// Compile and resource-check only; time nothing.
    pub compile_only: bool,
    /// Gain a config needs over the template's default to be the winner.
    pub noise_margin: NoiseMargin,
}

/// What happened to every candidate of one sweep.
#[derive(Debug, Default)]
pub struct SweepOutcome {
    pub candidates: usize,
    /// Valid configs of this shard (what the sweep compiled or searched).
    pub shard_configs: usize,
    pub pruned: Vec<(Params, PruneReason)>,
    pub rejected: Vec<(Params, Deltas)>,
    pub timed: Vec<(Params, TimingStats, Deltas)>,
    /// The baseline config on the same workload, when it was timed.
    pub default_us: Option<f64>,
    /// Why the baseline is not the template default (its defaults violate a constraint of
    /// this problem), when it is not.
    pub baseline_note: Option<String>,
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

/// Compiles on demand (in parallel batches when the strategy prefetches), prunes by device
/// limits, gates and times: the cost function of one sweep.
struct SweepEval<'a> {
    jit: &'a Jit,
    gpu: &'a Gpu,
    limits: &'a DeviceLimits,
    settings: &'a SweepSettings,
    template: &'a str,
    work: &'a mut dyn Workload,
    progress: &'a ProgressBar,
    entries: BTreeMap<Params, CacheEntry>,
    pruned: Vec<(Params, PruneReason)>,
    rejected: Vec<(Params, Deltas)>,
    measured: BTreeMap<Params, (TimingStats, Deltas)>,
    failure: Option<TuneError>,
}

impl SweepEval<'_> {
    fn compile(&mut self, batch: &[Params]) {
        let todo: Vec<&Params> = batch
            .iter()
            .filter(|p| !self.entries.contains_key(*p) && !self.pruned.iter().any(|(q, _)| q == *p))
            .collect();
        let reqs: Vec<KernelRequest> = todo
            .iter()
            .map(|p| KernelRequest { template: self.template.into(), params: (*p).clone(), arch: self.settings.arch })
            .collect();
        for (p, f) in todo.into_iter().zip(self.jit.get_many(&reqs)) {
            match f.map(|f| (self.limits.check(&f.entry), f)) {
                Ok((None, f)) => {
                    self.entries.insert(p.clone(), f.entry);
                }
                Ok((Some(reason), _)) => self.pruned.push((p.clone(), reason)),
                Err(e) => self.pruned.push((p.clone(), PruneReason::CompileFailed(e.to_string()))),
            }
        }
    }

    fn gate_and_time(&mut self, p: &Params) -> Result<Option<f64>, TuneError> {
        let Some(entry) = self.entries.get(p) else { return Ok(None) };
        let d = self.work.check(self.gpu, entry, self.settings.gate.rel_floor)?;
        if !d.passes(&self.settings.gate) {
            self.rejected.push((p.clone(), d));
            return Ok(None);
        }
        let stats = self.work.time(self.gpu, entry, self.settings.plan)?;
        self.measured.insert(p.clone(), (stats, d));
        Ok(Some(stats.median_us))
    }
}

impl Evaluator for SweepEval<'_> {
    fn prefetch(&mut self, batch: &[Params]) {
        self.compile(batch);
    }

    fn cost(&mut self, p: &Params) -> Option<f64> {
        self.progress.inc(1);
        if self.failure.is_some() {
            return None;
        }
        self.compile(std::slice::from_ref(p));
        self.gate_and_time(p).unwrap_or_else(|e| {
            self.failure = Some(e);
            None
        })
    }
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
    settings.space.check(t).map_err(TuneError::Input)?;
    let (valid, constraint_pruned) = enumerate(t, problem, &settings.space);
    let candidates = valid.len() + constraint_pruned.len();
    let mine = settings.shard.take(valid);
    let (Some(gpu), Some(work), false) = (gpu, workload, settings.compile_only) else {
        // Compile-only: every candidate of this shard is compiled and resource-checked.
        let baseline_note = t.baseline(problem).ok().and_then(|(_, b)| b.reason());
        let mut out = SweepOutcome { candidates, shard_configs: mine.len(), pruned: constraint_pruned, baseline_note, ..Default::default() };
        let reqs: Vec<KernelRequest> =
            mine.iter().map(|p| KernelRequest { template: template.into(), params: p.clone(), arch: settings.arch }).collect();
        for (p, f) in mine.iter().zip(jit.get_many_counted(&reqs, progress)) {
            match f {
                Ok(f) => out.pruned.extend(limits.check(&f.entry).map(|r| (p.clone(), r))),
                Err(e) => out.pruned.push((p.clone(), PruneReason::CompileFailed(e.to_string()))),
            }
        }
        return Ok(out);
    };

    let tunable_values: BTreeMap<String, Vec<i64>> = t
        .schema
        .params
        .iter()
        .filter(|p| p.role == ParamRole::Tunable)
        .map(|p| (p.name.clone(), p.values.clone().unwrap_or_else(|| vec![p.default])))
        .collect();
    let mut eval = SweepEval {
        jit,
        gpu,
        limits,
        settings,
        template,
        work,
        progress,
        entries: BTreeMap::new(),
        pruned: constraint_pruned,
        rejected: Vec::new(),
        measured: BTreeMap::new(),
        failure: None,
    };
    // The baseline is always measured first: the reference of "tuned vs default", and a floor
    // no winner can fall below. It is the template default, or where that violates a
    // constraint of this problem, the first valid config (logged and recorded).
    let (default, baseline_note) = match t.baseline(problem) {
        Ok((p, b)) => (Some(p), b.reason()),
        Err(_) => (None, None),
    };
    if let Some(note) = &baseline_note {
        progress.println(format!("{template}: {note}"));
    }
    let found = search(settings.strategy, &mine, &tunable_values, default.as_slice(), &mut eval);
    if let Some(e) = eval.failure.take() {
        return Err(e);
    }
    // The fixed default config, timed on the same workload, is the baseline for "tuned vs default".
    let mut default_us = None;
    if let Some(d) = &default {
        eval.compile(std::slice::from_ref(d));
        default_us = match eval.measured.get(d) {
            Some((s, _)) => Some(s.median_us),
            None => match eval.entries.get(d) {
                Some(e) => Some(eval.work.time(gpu, e, settings.plan)?.median_us),
                None => None,
            },
        };
    }
    let bytes = eval.work.min_bytes() as f64;
    let measured = &eval.measured;
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
    let mut ranked = found.ranked();
    keep_default_within_margin(&mut ranked, default.as_ref(), settings.noise_margin);
    let mut out = SweepOutcome {
        candidates,
        shard_configs: mine.len(),
        timed: ranked.iter().map(|(p, _)| (p.clone(), measured[p].0, measured[p].1)).collect(),
        default_us,
        baseline_note: baseline_note.clone(),
        ..Default::default()
    };
    if let Some((best, _)) = ranked.first() {
        let runner_ups = ranked.iter().skip(1).take(settings.runner_ups).map(|(p, _)| timed(p)).collect::<Result<_, _>>()?;
        out.record = Some(Record {
            problem: problem.iter().filter(|(k, _)| k.as_str() != "M").map(|(k, v)| (k.clone(), *v)).collect(),
            m: problem.get("M").copied().unwrap_or(1),
            winner: timed(best)?,
            runner_ups,
            candidates,
            pruned: eval.pruned.len(),
            rejected: eval.rejected.len(),
            timed: measured.len(),
            strategy: settings.strategy.to_string(),
            gate: settings.gate,
            copy_bw_gbs,
            default_us,
            baseline: baseline_note,
            provenance: provenance.clone(),
            merged_from: Vec::new(),
        });
    }
    out.pruned = eval.pruned;
    out.rejected = eval.rejected;
    Ok(out)
}
/// Moves the template's default config to the front of `ranked` (configs and their times,
/// fastest first) unless the fastest beats it by `margin`: a default flips only on a real gain.
pub fn keep_default_within_margin(ranked: &mut Vec<(Params, f64)>, default: Option<&Params>, margin: NoiseMargin) {
    let Some(i) = default.and_then(|d| ranked.iter().position(|(p, _)| p == d)) else { return };
    if i > 0 && !margin.beats(ranked[0].1, ranked[i].1) {
        let d = ranked.remove(i);
        ranked.insert(0, d);
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(threads: i64) -> Params {
        [("THREADS".to_string(), threads)].into()
    }

    #[test]
    fn the_default_stays_the_winner_within_the_noise_margin() {
        let ranked = || vec![(cfg(128), 97.0), (cfg(256), 99.0), (cfg(64), 100.0)];
        let mut r = ranked();
        keep_default_within_margin(&mut r, Some(&cfg(64)), NoiseMargin::DEFAULT);
        assert_eq!(r.iter().map(|(p, _)| p["THREADS"]).collect::<Vec<_>>(), vec![64, 128, 256], "3 % is noise");
        let mut r = ranked();
        keep_default_within_margin(&mut r, Some(&cfg(64)), "2".parse().unwrap());
        assert_eq!(r, ranked(), "beyond a 2 % margin the tuned config wins");
        let mut r = ranked();
        keep_default_within_margin(&mut r, None, NoiseMargin::DEFAULT);
        assert_eq!(r, ranked(), "no default measured: nothing moves");
    }
}
