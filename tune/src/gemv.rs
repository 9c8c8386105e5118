//! `mangrove-tune gemv`: the M = 1..8 ternary decode GEMV over a list of (N, K) shapes.

use indicatif::ProgressBar;

use super::context::TuneContext;
use super::sweep::{SweepOutcome, TuneError};
use super::workload::{GemvWorkload, Workload};
use mangrove_core::gpu::ActMode;
use mangrove_core::step::MAX_GEMV_M;
use mangrove_core::template::Params;

/// The bitnet-b1.58-2B decode shapes (N×K): fused QKV, O, fused gate/up, down.
pub const BITNET_2B_SHAPES: &[(i64, i64)] = &[(3840, 2560), (2560, 2560), (13824, 2560), (2560, 6912)];

/// Tunes every (shape, M) of the GEMV template of `mode`; returns one outcome per job, in order.
pub fn tune_gemv(
    ctx: &TuneContext,
    mode: ActMode,
    shapes: &[(i64, i64)],
    ms: &[i64],
    progress: &ProgressBar,
) -> Result<Vec<(Params, SweepOutcome)>, TuneError> {
    let mut out = Vec::new();
    for &(n, k) in shapes {
        for &m in ms {
            if !(1..=MAX_GEMV_M as i64).contains(&m) {
                return Err(TuneError::Input(format!("gemv supports M in 1..={MAX_GEMV_M}, got {m}")));
            }
            let problem: Params = [("M".to_string(), m), ("N".to_string(), n), ("K".to_string(), k)].into();
            progress.set_message(format!("gemv M={m} N={n} K={k}"));
            let mut work = match &ctx.gpu {
                Some(g) if ctx.timing() => Some(GemvWorkload::new(g, m as usize, n as usize, k as usize, 42)?),
                _ => None,
            };
            let o = ctx.sweep(mode.template(), &problem, work.as_mut().map(|w| w as &mut dyn Workload), progress)?;
            out.push((problem, o));
        }
    }
    Ok(out)
}
