//! Everything a tuning run shares: the JIT, the GPU (if any), device limits, sweep settings,
//! the measured copy bandwidth, the provenance stamped on every record and the DB folder each
//! finished record is written through to ([`Journal`]).

use std::path::PathBuf;

use mangrove_core::arch::Arch;
use mangrove_core::gpu::{Gpu, GpuError};
use mangrove_core::jit::Jit;
use mangrove_core::template::format_params;
use mangrove_core::tuning_db::{Provenance, TuningDb};

use super::space::{enumerate, DeviceLimits};
use super::strategy::Strategy;
use super::sweep::{sweep, SweepOutcome, SweepSettings, TuneError};
use super::workload::Workload;
use mangrove_core::template::Params;
use indicatif::ProgressBar;

/// Bytes per copy when measuring the copy bandwidth (1 GiB: far beyond L2).
pub const COPY_BW_BYTES: usize = 1 << 30;

/// A tuning run's shared state.
pub struct TuneContext {
    pub jit: Jit,
    pub gpu: Option<Gpu>,
    pub limits: DeviceLimits,
    pub settings: SweepSettings,
    pub copy_bw_gbs: f64,
    pub provenance: Provenance,
    /// Where each finished record is merged as it completes (durable against a crash or a
    /// kill); None with --no-write.
    pub journal: Option<Journal>,
}

/// The tuning DB folder a run writes through: every record is merged into it
/// ([`TuningDb::save_merged`], under the folder's lock) the moment its sweep ends.
pub struct Journal {
    pub dir: PathBuf,
    /// The records on disk when the run started (the run's conflicts are reported against it).
    pub before: TuningDb,
    /// `--resume`: a problem `before` already has is skipped.
    pub resume: bool,
}

impl TuneContext {
    /// Opens the GPU when there is one of `settings.arch`'s family and measures its copy
    /// bandwidth; without one, the run is compile-only and says so.
    pub fn new(jit: Jit, mut settings: SweepSettings, command: String) -> Result<(Self, Option<String>), GpuError> {
        let (gpu, note) = match Gpu::open_optional(0)? {
            Ok(g) if g.info().arch.cc == settings.arch.cc => (Some(g), None),
            Ok(g) => {
                let note = format!("GPU is {} but tuning for {}: compile-only", g.info().arch, settings.arch);
                (None, Some(note))
            }
            Err(absent) => (None, Some(format!("{absent}: compile-only"))),
        };
        if gpu.is_none() {
            settings.compile_only = true;
        }
        let limits = match &gpu {
            Some(g) => DeviceLimits {
                threads_per_block: 1024,
                registers_per_block: 65536,
                shared_per_block: g.info().max_shared_per_block_optin as u64,
            },
            None => DeviceLimits::for_arch(settings.arch),
        };
        let copy_bw_gbs = match (&gpu, settings.compile_only) {
            (Some(g), false) => g.copy_bandwidth_gbs(COPY_BW_BYTES)?,
            _ => 0.0,
        };
        let provenance = Provenance::collect(gpu.as_ref(), jit.compiler.version(), command);
        Ok((Self { jit, gpu, limits, settings, copy_bw_gbs, provenance, journal: None }, note))
    }

    pub fn arch(&self) -> Arch {
        self.settings.arch
    }

    /// True when this run times kernels (a GPU of the arch, not --compile-only).
    pub fn timing(&self) -> bool {
        self.gpu.is_some() && !self.settings.compile_only
    }

    /// Configs a sweep of `template` on `problem` evaluates: this shard's valid configs (at most
    /// the budget when timing with a budgeted search). The unit of the progress bar's total.
    pub fn planned(&self, template: &str, problem: &Params) -> Result<u64, TuneError> {
        let n = self.settings.shard.take(enumerate(self.jit.catalog.get(template)?, problem, &self.settings.space).0).len();
        Ok(match self.settings.strategy {
            Strategy::Budgeted { budget, .. } if self.timing() => n.min(budget),
            _ => n,
        } as u64)
    }

    /// Adds the configs of all `jobs` ((template, problem) pairs) to `progress`'s total.
    pub fn plan_progress<'a>(&self, progress: &ProgressBar, jobs: impl IntoIterator<Item = (&'a str, &'a Params)>) -> Result<(), TuneError> {
        let mut total = 0;
        for (t, p) in jobs {
            total += self.planned(t, p)?;
        }
        // A hidden bar starts without a length: the first plan gives it one.
        progress.set_length(progress.length().unwrap_or(0) + total);
        Ok(())
    }

    /// One sweep of `template` on `problem` with this run's settings and `workload`; its record
    /// is keyed at `m` (default: the problem's M, else 1) and merged into the journal at once.
    /// With `--resume`, a problem the DB already had is skipped (an outcome without a record).
    pub fn sweep(
        &self,
        template: &str,
        problem: &Params,
        m: Option<i64>,
        workload: Option<&mut dyn Workload>,
        progress: &ProgressBar,
    ) -> Result<SweepOutcome, TuneError> {
        let m = m.unwrap_or_else(|| problem.get("M").copied().unwrap_or(1));
        let key: Params = problem.iter().filter(|(k, _)| k.as_str() != "M").map(|(k, v)| (k.clone(), *v)).collect();
        if let Some(db) = self.journal.as_ref().filter(|j| j.resume).map(|j| &j.before) {
            if db.templates.get(template).is_some_and(|t| t.records.iter().any(|r| r.problem == key && r.m == m)) {
                progress.println(format!("--resume: {template} {} M={m} is in the DB; skipped", format_params(&key)));
                progress.inc(self.planned(template, problem)?);
                return Ok(SweepOutcome::default());
            }
        }
        let mut o = sweep(&self.jit, self.gpu.as_ref(), &self.limits, template, problem, workload, &self.settings, self.copy_bw_gbs, &self.provenance, progress)?;
        if let Some(r) = o.record.as_mut() {
            r.m = m;
            if let Some(j) = &self.journal {
                let mut one = TuningDb::default();
                one.upsert(template, r.clone(), self.settings.noise_margin);
                one.save_merged(&j.dir, self.settings.noise_margin).map_err(|e| TuneError::Input(format!("saving the record of {template} {} M={m}: {e}", format_params(&key))))?;
            }
        }
        Ok(o)
    }
}
