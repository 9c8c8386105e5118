//! `mangrove-tune gateup`: the grouped MoE stages of one MoE shape over token-count buckets:
//! gate_up (ternary experts, int8 activations, act(gate)·up fused) and down (per-pair int8 rows).

use indicatif::ProgressBar;

use super::context::TuneContext;
use super::sweep::{SweepOutcome, TuneError};
use super::workload::{MoeStage, MoeWorkload, Workload};
use mangrove_core::arch::Arch;
use mangrove_core::jit::KernelRequest;
use mangrove_core::reference::moe::MoeShape;
use mangrove_core::template::{Catalog, Params};
use mangrove_core::tuning_db::{LookupRule, TuningDb};

/// The default ternary MoE shape (Qwen-MoE-like): experts, top-k, hidden, expert intermediate.
pub const DEFAULT_MOE: (i64, i64, i64, i64) = (64, 8, 2048, 1408);

/// M buckets the grouped stages are tuned for by default: the engine's plan buckets.
pub const GATEUP_BUCKETS: &[i64] = &mangrove_core::step::MOE_BUCKETS;

/// Tunes `stage` at every M for one (E, TOPK, H, I); returns one outcome per M, in order.
pub fn tune_gateup(
    ctx: &TuneContext,
    stage: MoeStage,
    (e, topk, h, i): (i64, i64, i64, i64),
    ms: &[i64],
    progress: &ProgressBar,
) -> Result<Vec<(Params, SweepOutcome)>, TuneError> {
    let template = stage.template();
    if topk > e {
        return Err(TuneError::Input(format!("--topk {topk} exceeds --experts {e}")));
    }
    let problems: Vec<Params> = ms
        .iter()
        .map(|&m| {
            let mut problem = mangrove_core::step::grouped_problem(template, (e, topk, h, i));
            problem.insert("M".into(), m);
            problem
        })
        .collect();
    for p in &problems {
        // A bad shape (no valid config at all) fails before any work; a shape whose template
        // default is invalid is swept with the first valid config as its baseline.
        ctx.jit.catalog.get(template)?.baseline(p)?;
    }
    ctx.plan_progress(progress, problems.iter().map(|p| (template, p)))?;
    let mut out = Vec::new();
    for problem in problems {
        let m = problem["M"];
        progress.set_message(format!("{template} M={m}"));
        let shape = MoeShape { tokens: m as usize, hidden: h as usize, inter: i as usize, experts: e as usize, topk: topk as usize };
        let mut work = match &ctx.gpu {
            Some(g) if ctx.timing() => Some(MoeWorkload::new(g, stage, shape, 43)?),
            _ => None,
        };
        let o = ctx.sweep(template, &problem, None, work.as_mut().map(|w| w as &mut dyn Workload), progress)?;
        out.push((problem, o));
    }
    Ok(out)
}

/// The `moe_gateup` problem parameters (without M) of one (E, TOPK, H, I), as the plan requests them.
pub fn gateup_problem(shape: (i64, i64, i64, i64)) -> Params {
    mangrove_core::step::grouped_problem("moe_gateup", shape)
}

/// Chooses the tuned `moe_gateup` config for `m` tokens of `problem` from the DB (nearest
/// bucket), or the template's baseline ([`mangrove_core::step::grouped_request`]).
pub fn gateup_request(catalog: &Catalog, db: &TuningDb, arch: Arch, m: i64, problem: &Params) -> (KernelRequest, LookupRule) {
    mangrove_core::step::grouped_request(catalog, db, arch, "moe_gateup", m, problem)
}
