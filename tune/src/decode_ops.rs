//! `mangrove-tune decode-ops`: the decode step's row-wise ops of one model — its RMSNorms
//! (residual add or gated activation, norm, int8 quantization) at one token row, and attention
//! over a decode batch (the launches it serves: batch-1 decode runs the fused layer) — tuned on
//! exactly the problems the kernel plan asks for, so `serve` picks the winners.
//! RoPE + KV append, the LM head and the MoE combine keep their defaults (no standalone check).

use std::collections::BTreeSet;

use indicatif::ProgressBar;

use super::context::TuneContext;
use super::sweep::{SweepOutcome, TuneError};
use super::workload::{AttentionWorkload, NormWorkload, Workload};
use mangrove_core::model_config::ModelConfig;
use mangrove_core::step::{op_kernels, op_tuning_m};
use mangrove_core::template::{format_params, Params};
use mangrove_core::gpu::{AttnShape, NormShape};

/// Templates of the decode ops this command tunes.
pub const TUNED_OPS: &[&str] = &["rmsnorm_quant", "attention_decode"];

/// One tuned op: template, problem, outcome.
pub type OpOutcome = (String, Params, SweepOutcome);

/// Tunes every distinct (template, problem) of `config`'s decode ops in [`TUNED_OPS`].
pub fn tune_decode_ops(ctx: &TuneContext, config: &ModelConfig, progress: &ProgressBar) -> Result<Vec<OpOutcome>, TuneError> {
    let mut seen = BTreeSet::new();
    let jobs: Vec<_> = op_kernels(config).into_iter().filter(|(_, template, problem)| TUNED_OPS.contains(template) && seen.insert((*template, problem.clone()))).collect();
    for (_, template, problem) in &jobs {
        ctx.jit.catalog.get(template)?.resolve(problem)?; // a bad shape fails before any work
    }
    ctx.plan_progress(progress, jobs.iter().map(|(_, t, p)| (*t, p)))?;
    let mut out = Vec::new();
    for (family, template, problem) in jobs {
        progress.set_message(format!("{family}: {template} {}", format_params(&problem)));
        let mut work: Option<Box<dyn Workload>> = match &ctx.gpu {
            Some(g) if ctx.timing() => Some(match template {
                "rmsnorm_quant" => Box::new(NormWorkload::new(g, NormShape::from_params(&problem)?, 44)?),
                "attention_decode" => Box::new(AttentionWorkload::new(g, AttnShape::from_params(template, &problem)?, 45)?),
                other => return Err(TuneError::Input(format!("{other} is in TUNED_OPS but has no workload"))),
            }),
            _ => None,
        };
        // Recorded at the M it was timed at (a batch for attention), which the plan looks up.
        let o = ctx.sweep(template, &problem, Some(op_tuning_m(family)), work.as_mut().map(|w| w.as_mut() as &mut dyn Workload), progress)?;
        out.push((template.to_string(), problem, o));
    }
    Ok(out)
}
