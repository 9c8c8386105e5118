//! Warming the cache with the whole catalog (`mangrove warm`): every template sample compiled
//! for each arch (cold pass, optionally after evicting the entries), served again from the
//! cache (hit pass), and on a GPU of one of the archs each kernel loaded and — where it has a
//! standalone check — held to the deployment gate against the CPU reference.

use std::time::Instant;

use crate::arch::Arch;
use crate::cache::Storage;
use crate::check::{Deltas, DEPLOY_GATE};
use crate::gpu::{Absent, Gpu, GpuError};
use crate::jit::{Jit, JitError, KernelRequest, Outcome};
use crate::template::format_params;
use crate::validate::{check_entry, has_validator};

/// Errors of a warm-up.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("{kernel}")]
    Kernel { kernel: String, source: Box<JitError> },
    #[error(transparent)]
    Jit(#[from] JitError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    #[error(transparent)]
    Template(#[from] crate::template::TemplateError),
}

/// One kernel's check on the GPU.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WarmCheck {
    pub params: String,
    pub deltas: Deltas,
    pub pass: bool,
}

/// What a warm-up did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WarmReport {
    pub kernels: usize,
    #[serde(skip)]
    pub samples: usize,
    #[serde(skip)]
    pub archs: usize,
    pub compiled: usize,
    pub compile_ms_sum: f64,
    pub first_pass_wall_ms: f64,
    pub hit_pass_wall_ms: f64,
    pub hits: usize,
    pub cold_over_hit: f64,
    pub gpu_module_load_ms: f64,
    pub checks: Vec<WarmCheck>,
    /// Why nothing ran on a GPU, when there is none.
    #[serde(skip)]
    pub no_gpu: Option<String>,
}

impl WarmReport {
    /// Kernels that failed their GPU check.
    pub fn failed(&self) -> usize {
        self.checks.iter().filter(|c| !c.pass).count()
    }
}

/// Compiles and caches every sample of `jit`'s catalog for `archs` (after evicting them when
/// `recompile`), serves them again from the cache, and checks them on this machine's GPU;
/// `progress` counts the kernels of each pass (its message names the pass, its length the total).
pub fn warm(jit: &Jit, archs: &[Arch], recompile: bool, progress: &indicatif::ProgressBar) -> Result<WarmReport, WarmError> {
    let samples = jit.catalog.samples()?;
    let reqs: Vec<KernelRequest> = archs
        .iter()
        .flat_map(|&arch| samples.iter().map(move |k| KernelRequest { template: k.template.clone(), params: k.params.clone(), arch }))
        .collect();
    if recompile {
        for r in &reqs {
            let (_, inputs) = jit.key_of(r)?;
            jit.cache.storage().remove(&inputs.key())?;
        }
    }
    let pass = |what: &str, total: usize| {
        progress.reset();
        progress.set_length(total as u64);
        progress.set_message(what.to_string());
    };
    pass("compiling (cold pass)", reqs.len());
    let t0 = Instant::now();
    let first = jit.get_many_counted(&reqs, progress);
    let first_wall = t0.elapsed().as_secs_f64() * 1e3;
    let (mut compiled, mut compiled_ms) = (0, 0.0);
    for (r, f) in reqs.iter().zip(first) {
        let f = f.map_err(|source| WarmError::Kernel { kernel: format!("{} {} for {}", r.template, format_params(&r.params), r.arch), source: Box::new(source) })?;
        if let Outcome::Compiled(_) = f.outcome {
            compiled += 1;
            compiled_ms += f.entry.compile_ms;
        }
    }
    pass("serving from the cache (hit pass)", reqs.len());
    let t1 = Instant::now();
    let second = jit.get_many_counted(&reqs, progress);
    let hit_wall = t1.elapsed().as_secs_f64() * 1e3;
    let hits = second.iter().filter(|f| matches!(f, Ok(f) if f.outcome == Outcome::Hit)).count();
    let (gpu, no_gpu) = match Gpu::open_optional(0)? {
        Ok(g) => (Some(g), None),
        Err(Absent(e)) => (None, Some(e.to_string())),
    };
    let mut checks = Vec::new();
    let mut load_ms = 0.0;
    if let Some(gpu) = &gpu {
        let mine: Vec<_> = second.iter().flatten().filter(|f| f.entry.inputs.arch.cc == gpu.info().arch.cc).collect();
        pass("loading and checking on the GPU", mine.len());
        for f in mine {
            progress.inc(1);
            let t = Instant::now();
            drop(gpu.load(&f.entry)?);
            load_ms += t.elapsed().as_secs_f64() * 1e3;
            // Ops without a standalone check (RoPE, LM head, MoE combine) are loaded only.
            if !has_validator(&f.entry.inputs.template) {
                continue;
            }
            let deltas = check_entry(gpu, &f.entry, 0x5eed ^ checks.len() as u64, DEPLOY_GATE.rel_floor)?.deltas;
            checks.push(WarmCheck { params: format_params(&f.entry.inputs.params), deltas, pass: deltas.passes(&DEPLOY_GATE) });
        }
    }
    Ok(WarmReport {
        kernels: reqs.len(),
        samples: samples.len(),
        archs: archs.len(),
        compiled,
        compile_ms_sum: compiled_ms,
        first_pass_wall_ms: first_wall,
        hit_pass_wall_ms: hit_wall,
        hits,
        cold_over_hit: first_wall / hit_wall.max(1e-9),
        gpu_module_load_ms: load_ms,
        checks,
        no_gpu,
    })
}

impl std::fmt::Display for WarmReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(why) = &self.no_gpu {
            writeln!(f, "no GPU ({why}): compiled and cached only")?;
        }
        writeln!(f, "catalog: {} kernels ({} samples × {} archs)", self.kernels, self.samples, self.archs)?;
        writeln!(f, "first pass: {} compiled, {:.1} ms wall (sum of compile times {:.1} ms)", self.compiled, self.first_pass_wall_ms, self.compile_ms_sum)?;
        writeln!(f, "second pass: {}/{} hits, {:.2} ms wall → {:.0}× faster", self.hits, self.kernels, self.hit_pass_wall_ms, self.cold_over_hit)?;
        if self.no_gpu.is_none() {
            writeln!(f, "module load on GPU: {:.2} ms total", self.gpu_module_load_ms)?;
            for c in &self.checks {
                writeln!(f, "  {} {}: {}", if c.pass { "PASS" } else { "FAIL" }, c.params, c.deltas)?;
            }
        }
        Ok(())
    }
}
