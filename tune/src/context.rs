//! Everything a tuning run shares: the JIT, the GPU (if any), device limits, sweep settings,
//! the measured copy bandwidth and the provenance stamped on every record.

use mangrove_core::arch::Arch;
use mangrove_core::gpu::{Gpu, GpuError};
use mangrove_core::jit::Jit;
use mangrove_core::tuning_db::Provenance;

use super::space::DeviceLimits;
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
        Ok((Self { jit, gpu, limits, settings, copy_bw_gbs, provenance }, note))
    }

    pub fn arch(&self) -> Arch {
        self.settings.arch
    }

    /// True when this run times kernels (a GPU of the arch, not --compile-only).
    pub fn timing(&self) -> bool {
        self.gpu.is_some() && !self.settings.compile_only
    }

    /// One sweep of `template` on `problem` with this run's settings and `workload`.
    pub fn sweep(
        &self,
        template: &str,
        problem: &Params,
        workload: Option<&mut dyn Workload>,
        progress: &ProgressBar,
    ) -> Result<SweepOutcome, TuneError> {
        sweep(&self.jit, self.gpu.as_ref(), &self.limits, template, problem, workload, &self.settings, self.copy_bw_gbs, &self.provenance, progress)
    }
}
