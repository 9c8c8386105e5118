//! Everything a tuning run shares: the JIT, the GPU (if any), device limits, sweep settings,
//! the measured copy bandwidth and the provenance stamped on every record.

use crate::arch::Arch;
use crate::gpu::{Gpu, GpuError};
use crate::jit::Jit;
use crate::tuning_db::Provenance;

use super::space::DeviceLimits;
use super::sweep::{sweep, SweepOutcome, SweepSettings, TuneError};
use super::workload::Workload;
use crate::template::Params;
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
        let (gpu, note) = match Gpu::open(0) {
            Ok(g) if g.info().arch.cc == settings.arch.cc => (Some(g), None),
            Ok(g) => {
                let note = format!("GPU is {} but tuning for {}: compile-only", g.info().arch, settings.arch);
                (None, Some(note))
            }
            Err(e @ (GpuError::NoDriver | GpuError::NoDevice(_))) => (None, Some(format!("{e}: compile-only"))),
            Err(e) => return Err(e),
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
        let provenance = provenance(gpu.as_ref(), jit.compiler.version(), command);
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

/// The timing method records carry: graph replays (`Gpu::time_launches`), with or without PDL.
fn timing_method(gpu: &Gpu) -> String {
    let pdl = if gpu.pdl() { ", programmatic dependent launch" } else { "" };
    format!("cuda-graph replays{pdl}")
}

/// Reproducibility metadata for records made now.
pub fn provenance(gpu: Option<&Gpu>, nvrtc_version: (i32, i32), command: String) -> Provenance {
    let info = gpu.map(|g| g.info().clone());
    Provenance {
        gpu_name: info.as_ref().map(|i| i.name.clone()).unwrap_or_else(|| "none".into()),
        sm_count: info.as_ref().map(|i| i.sm_count).unwrap_or(0),
        driver_version: info.as_ref().map(|i| i.driver_version).unwrap_or(0),
        nvrtc_version,
        mangrove_version: env!("CARGO_PKG_VERSION").into(),
        git_sha: env!("MANGROVE_GIT_SHA").into(),
        sm_clock_mhz: info.as_ref().map(|i| i.sm_clock_mhz).unwrap_or(0),
        mem_clock_mhz: info.as_ref().map(|i| i.mem_clock_mhz).unwrap_or(0),
        date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        command,
        timing: gpu.map(timing_method).unwrap_or_default(),
    }
}
