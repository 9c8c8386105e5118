//! `mangrove-tune gemv`: the ternary decode linears over a list of (N, K) shapes: the GEMVs at
//! M = 1..8, the tensor-core GEMM at its M buckets.

use indicatif::ProgressBar;

use super::context::TuneContext;
use super::sweep::{SweepOutcome, TuneError};
use super::workload::{GemvWorkload, Workload};
use mangrove_core::gpu::GEMM_TEMPLATE;
use mangrove_core::step::{GEMM_BUCKETS, MAX_GEMV_M};
use mangrove_core::template::Params;

/// The bitnet-b1.58-2B decode shapes (N×K): fused QKV, O, fused gate/up, down.
pub const BITNET_2B_SHAPES: &[(i64, i64)] = &[(3840, 2560), (2560, 2560), (13824, 2560), (2560, 6912)];

/// Tunes every (shape, M) of the linear `template`; returns one outcome per job, in order.
pub fn tune_gemv(
    ctx: &TuneContext,
    template: &str,
    shapes: &[(i64, i64)],
    ms: &[i64],
    progress: &ProgressBar,
) -> Result<Vec<(Params, SweepOutcome)>, TuneError> {
    let max_m = if template == GEMM_TEMPLATE { *GEMM_BUCKETS.last().expect("buckets") } else { MAX_GEMV_M as i64 };
    if let Some(m) = ms.iter().find(|m| !(1..=max_m).contains(*m)) {
        return Err(TuneError::Input(format!("{template} supports M in 1..={max_m}, got {m}")));
    }
    let problems: Vec<Params> = shapes.iter().flat_map(|&(n, k)| ms.iter().map(move |&m| [("M".to_string(), m), ("N".to_string(), n), ("K".to_string(), k)].into())).collect();
    ctx.plan_progress(progress, problems.iter().map(|p| (template, p)))?;
    let mut out = Vec::new();
    for problem in problems {
        let (m, n, k) = (problem["M"], problem["N"], problem["K"]);
        progress.set_message(format!("gemv M={m} N={n} K={k}"));
        let mut work = match &ctx.gpu {
            Some(g) if ctx.timing() => Some(GemvWorkload::new(g, m as usize, n as usize, k as usize, 42)?),
            _ => None,
        };
        let o = ctx.sweep(template, &problem, None, work.as_mut().map(|w| w as &mut dyn Workload), progress)?;
        out.push((problem, o));
    }
    Ok(out)
}
