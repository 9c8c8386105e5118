//! The decode step's kernel inventory: the layer families a step runs ([`Family`]), the limits
//! the CUDA engine is built to ([`MAX_GEMV_M`], [`MAX_CUDA_CONTEXT`]), each family's template
//! and problem for a model ([`linear_shapes`], [`op_kernels`]), and the request the tuning DB
//! picks for it ([`gemv_request`], [`op_request`]). The plan, the tuner and the engine all read
//! it, so a family or a limit is defined once.

use crate::arch::Arch;
use crate::gpu::{ActMode, KvDtype};
use crate::jit::KernelRequest;
use crate::model_config::ModelConfig;
use crate::template::Params;
use crate::tuning_db::{LookupRule, TuningDb};

/// Largest M one ternary GEMV launch handles; larger batches run in chunks of at most this.
pub const MAX_GEMV_M: usize = 8;

/// Row capacities (M buckets) of the tensor-core GEMM (`ternary_gemm_w2a8`) kernels the engine
/// plans per linear: R >= 2 rows run on the smallest bucket that holds them, more than the
/// largest in launches of the largest.
pub const GEMM_BUCKETS: [i64; 6] = [8, 16, 32, 64, 128, 256];

/// Sequences `attention_decode` is tuned over (one query row each) and looked up at: the engine
/// runs it for decode batches of two or more and for prefill chunks (batch-1 decode runs the
/// fused layer), so a batch, not one row, is the workload that picks its config.
pub const ATTENTION_BATCH: i64 = 16;

/// The M a decode op's config is tuned and looked up at ([`ATTENTION_BATCH`] for attention,
/// else one row); the engine still loads one kernel per op for any row count.
pub fn op_tuning_m(family: Family) -> i64 {
    match family {
        Family::Attention => ATTENTION_BATCH,
        _ => 1,
    }
}

/// Longest context the CUDA engine serves: the attention kernel keeps one score per position
/// in shared memory, and the KV cache holds this many positions per sequence.
pub const MAX_CUDA_CONTEXT: usize = 4096;

/// The CUDA engine's KV-cache element type: bf16 reads half the bytes of f32 in attention and
/// holds twice the positions per byte (the f32 kernels remain for exactness checks).
pub const KV_DTYPE: KvDtype = KvDtype::Bf16;

/// Positions per sequence the CUDA engine's KV cache holds for `c`.
pub fn cuda_context(c: &ModelConfig) -> usize {
    c.max_positions.min(MAX_CUDA_CONTEXT)
}

/// A layer family of the decode step: what a planned kernel serves, what a path counter and a
/// fallback name. Serialized (bundles, `/health`, metrics labels) as its snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// The token embedding gather (fused into the first norm on the GPU).
    Embedding,
    /// Residual add + RMSNorm + int8 quantization before attention and the MLP.
    Rmsnorm,
    /// The fused q|k|v projection.
    AttnQkv,
    /// RoPE and the KV-cache append.
    Rope,
    /// Causal GQA attention over the KV cache.
    Attention,
    /// RMSNorm + quantization of the attention output (BitNet's sub-norm).
    AttnSubNorm,
    /// The output projection.
    AttnO,
    /// The fused gate|up projection of a dense MLP.
    MlpGateUp,
    /// The gated activation + sub-norm + quantization before the down projection.
    MlpSubNorm,
    /// The down projection of a dense MLP.
    MlpDown,
    /// The MoE router (a dense GEMV over the hidden rows).
    MoeRouter,
    /// One expert's fused gate|up.
    MoeGateUp,
    /// SiLU(gate)·up + quantization of an expert's output (no norm).
    MoeGlu,
    /// One expert's down projection.
    MoeDown,
    /// The weighted sum of the top-k experts' outputs.
    MoeCombine,
    /// The bf16 LM head over each sequence's last row.
    LmHead,
    /// A whole dense layer for one token row in one persistent kernel (batch-1 decode).
    DecodeLayer,
    /// The next token of each sequence, drawn on the GPU from its logits.
    Sample,
}

impl Family {
    /// The snake_case name used in metrics labels, bundles and `/health`.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Embedding => "embedding",
            Family::Rmsnorm => "rmsnorm",
            Family::AttnQkv => "attn_qkv",
            Family::Rope => "rope",
            Family::Attention => "attention",
            Family::AttnSubNorm => "attn_sub_norm",
            Family::AttnO => "attn_o",
            Family::MlpGateUp => "mlp_gate_up",
            Family::MlpSubNorm => "mlp_sub_norm",
            Family::MlpDown => "mlp_down",
            Family::MoeRouter => "moe_router",
            Family::MoeGateUp => "moe_gate_up",
            Family::MoeGlu => "moe_glu",
            Family::MoeDown => "moe_down",
            Family::MoeCombine => "moe_combine",
            Family::LmHead => "lm_head",
            Family::DecodeLayer => "decode_layer",
            Family::Sample => "sample",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn params(kv: &[(&str, i64)]) -> Params {
    kv.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// The ternary linears of a layer as the CUDA engine launches them, (family, N, K): q|k|v and
/// gate|up fused along N (one launch each), o and down as stored; dense MLP only.
pub fn linear_shapes(c: &ModelConfig) -> Vec<(Family, i64, i64)> {
    let (h, q, kv) = (c.hidden as i64, c.q_dim() as i64, c.kv_dim() as i64);
    let mut v = vec![(Family::AttnQkv, q + 2 * kv, h), (Family::AttnO, h, q)];
    if c.moe.is_none() {
        let i = c.inter as i64;
        v.extend([(Family::MlpGateUp, 2 * i, h), (Family::MlpDown, h, i)]);
    }
    v
}

/// The decode-step ops: (family, template, problem parameters). Each is launched over any
/// number of rows (sequences, for the sampler). MoE models add the expert GLU quantization (no
/// norm) and the combine.
pub fn op_kernels(c: &ModelConfig) -> Vec<(Family, &'static str, Params)> {
    let (h, hd, qh, kvh) = (c.hidden as i64, c.head_dim as i64, c.heads as i64, c.kv_heads as i64);
    let attn = params(&[("QH", qh), ("KVH", kvh), ("HD", hd), ("MAX_POS", cuda_context(c) as i64), (KvDtype::PARAM, KV_DTYPE.param())]);
    let act = i64::from(c.act == crate::model_config::Activation::Silu);
    let mut v = vec![
        (Family::Rmsnorm, "rmsnorm_quant", params(&[("H", h), ("GLU", 0)])),
        (Family::AttnSubNorm, "rmsnorm_quant", params(&[("H", qh * hd), ("GLU", 0)])),
        (Family::Rope, "rope_kv", attn.clone()),
        (Family::Attention, "attention_decode", attn),
        (Family::Sample, "sample_tokens", params(&[("V", c.vocab as i64)])),
    ];
    match c.moe {
        None => v.push((Family::MlpSubNorm, "rmsnorm_quant", params(&[("H", c.inter as i64), ("GLU", 1), ("ACT", act)]))),
        Some(m) => {
            // Qwen3-MoE experts: SiLU, no sub-norm.
            v.push((Family::MoeGlu, "rmsnorm_quant", params(&[("H", m.inter as i64), ("GLU", 1), ("ACT", 1), ("NORM", 0)])));
            v.push((Family::MoeCombine, "moe_combine", params(&[("TOPK", m.topk as i64), ("H", h)])));
        }
    }
    v
}

/// The problem of the fused batch-1 layer (`decode_layer`) of a dense model; None for MoE models.
pub fn decode_layer_problem(c: &ModelConfig) -> Option<Params> {
    if c.moe.is_some() {
        return None;
    }
    let act = i64::from(c.act == crate::model_config::Activation::Silu);
    let (h, i, qh, kvh, hd) = (c.hidden as i64, c.inter as i64, c.heads as i64, c.kv_heads as i64, c.head_dim as i64);
    Some(params(&[("H", h), ("I", i), ("QH", qh), ("KVH", kvh), ("HD", hd), ("MAX_POS", cuda_context(c) as i64), ("ACT", act), (KvDtype::PARAM, KV_DTYPE.param())]))
}

/// The tuned ternary GEMV config of `mode` for (m, n, k) from the DB (nearest bucket), or the
/// template defaults, as a request with the problem filled in.
pub fn gemv_request(db: &TuningDb, arch: Arch, mode: ActMode, m: usize, n: i64, k: i64) -> (KernelRequest, LookupRule) {
    linear_request(db, arch, mode.template(), m as i64, n, k)
}

/// The tuned config of the ternary linear `template` (a GEMV, or the GEMM at bucket `m`) for
/// (m, n, k) from the DB (nearest bucket), or the template defaults.
pub fn linear_request(db: &TuningDb, arch: Arch, template: &str, m: i64, n: i64, k: i64) -> (KernelRequest, LookupRule) {
    let problem: Params = [("N".to_string(), n), ("K".to_string(), k)].into();
    let choice = db.lookup(template, &problem, m);
    let mut params = choice.params;
    params.extend(problem);
    params.insert("M".into(), m);
    (KernelRequest { template: template.into(), params, arch }, choice.rule)
}

/// The config of a decode op (`template` at `problem` and `m`): a tuned record if the DB has one,
/// else the template defaults with rule `Fixed` (the ops need no tuner run: not a fallback).
pub fn op_request(db: &TuningDb, template: &str, problem: &Params, m: i64, arch: Arch) -> (KernelRequest, LookupRule) {
    let choice = db.lookup(template, problem, m);
    let rule = match choice.rule {
        LookupRule::Default => LookupRule::Fixed,
        r => r,
    };
    let mut params = choice.params;
    params.extend(problem.clone());
    (KernelRequest { template: template.into(), params, arch }, rule)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_names_round_trip_through_serde() {
        for f in [Family::AttnQkv, Family::MlpSubNorm, Family::MoeCombine, Family::LmHead] {
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.as_str()));
            assert_eq!(serde_json::from_str::<Family>(&json).unwrap(), f);
        }
    }
}
