//! The decode step's kernel inventory: the layer families a step runs ([`Family`]), the limits
//! the CUDA engine is built to ([`MAX_GEMV_M`], [`MAX_CUDA_CONTEXT`]), each family's template
//! and problem for a model ([`linear_shapes`], [`op_kernels`]), and the request the tuning DB
//! picks for it ([`gemv_request`], [`op_request`]). The plan, the tuner and the engine all read
//! it, so a family or a limit is defined once.

use crate::arch::Arch;
use crate::gpu::{ActMode, KvDtype};
use crate::jit::KernelRequest;
use crate::model_config::ModelConfig;
use crate::template::{Catalog, Params};
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
    /// Softmax top-k routing and per-expert grouping on the GPU (`moe_route`), aligned to the
    /// gate_up kernel's BLOCK_M.
    MoeRoute,
    /// The same routing aligned to the down kernel's BLOCK_M (launched only where it differs).
    MoeRouteDown,
    /// The grouped gate|up of the routed experts, act(gate)·up fused (`moe_gateup`).
    MoeGateUp,
    /// Per-pair int8 quantization of the experts' act(gate)·up rows (no norm).
    MoeGlu,
    /// The grouped down projection of the routed experts (`moe_down`).
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
            Family::MoeRoute => "moe_route",
            Family::MoeRouteDown => "moe_route_down",
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
            // Qwen3-MoE experts: act(gate)·up is fused into moe_gateup; no sub-norm, only the
            // per-pair int8 quantization of its rows before moe_down.
            v.push((Family::MoeGlu, "rmsnorm_quant", params(&[("H", m.inter as i64), ("GLU", 0), ("NORM", 0)])));
            v.push((Family::MoeCombine, "moe_combine", params(&[("TOPK", m.topk as i64), ("H", h)])));
        }
    }
    v
}

/// Token-count buckets (M) the MoE kernels (`moe_route`, `moe_gateup`, `moe_down`) are planned
/// and tuned at: a step of R token rows runs on the smallest bucket that holds them, more than
/// the largest in chunks of the largest.
pub const MOE_BUCKETS: [i64; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512];

/// The bucket a step of `rows` MoE token rows runs on (the largest for chunks past it).
pub fn moe_bucket(rows: usize) -> i64 {
    let last = MOE_BUCKETS[MOE_BUCKETS.len() - 1];
    MOE_BUCKETS.into_iter().find(|&m| m >= rows as i64).unwrap_or(last)
}

/// The path variant the MoE stages of a step at bucket `m` report (`cuda_grouped_m<M>`).
pub fn moe_variant(m: i64) -> &'static str {
    const NAMES: [&str; 10] = [
        "cuda_grouped_m1", "cuda_grouped_m2", "cuda_grouped_m4", "cuda_grouped_m8", "cuda_grouped_m16",
        "cuda_grouped_m32", "cuda_grouped_m64", "cuda_grouped_m128", "cuda_grouped_m256", "cuda_grouped_m512",
    ];
    MOE_BUCKETS.iter().position(|&b| b == m).map_or("cuda_grouped", |i| NAMES[i])
}

/// The problems (without M) of an MoE model's grouped kernels: (`moe_gateup`, `moe_down`,
/// `moe_route` without its BLOCK_M, which follows the consumer's config). None for dense models.
pub fn moe_problems(c: &ModelConfig) -> Option<(Params, Params, Params)> {
    let m = c.moe?;
    let shape = (m.experts as i64, m.topk as i64, c.hidden as i64, m.inter as i64);
    let route = params(&[("E", shape.0), ("TOPK", shape.1), ("NORM", i64::from(m.norm_topk_prob))]);
    Some((grouped_problem("moe_gateup", shape), grouped_problem("moe_down", shape), route))
}

/// The problem (without M) of the grouped MoE kernel `template` (`moe_gateup` or `moe_down`)
/// for (experts, top-k, hidden, expert intermediate): what the plan requests and the tuner records.
pub fn grouped_problem(template: &str, (e, k, h, i): (i64, i64, i64, i64)) -> Params {
    let mut p = params(&[("E", e), ("TOPK", k), ("H", h), ("I", i)]);
    if template == "moe_gateup" {
        // Qwen3-MoE experts are SiLU whatever the dense activation (the CPU reference's too).
        p.insert("ACT".into(), 1);
    }
    p
}

/// The tuned config of a grouped MoE kernel (`template` at `problem` and `m`) from the DB
/// (nearest bucket); without a record, the template's baseline (its defaults, or the first
/// valid config where they violate a constraint of this problem) with rule `Default`.
pub fn grouped_request(catalog: &Catalog, db: &TuningDb, arch: Arch, template: &str, m: i64, problem: &Params) -> (KernelRequest, LookupRule) {
    let choice = db.lookup(template, problem, m);
    let mut params = choice.params;
    params.extend(problem.clone());
    params.insert("M".into(), m);
    if choice.rule == LookupRule::Default {
        if let Some((base, _)) = catalog.get(template).ok().and_then(|t| t.baseline(&params).ok()) {
            params = base;
        }
    }
    (KernelRequest { template: template.into(), params, arch }, choice.rule)
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
        for f in [Family::AttnQkv, Family::MlpSubNorm, Family::MoeRoute, Family::MoeCombine, Family::LmHead] {
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.as_str()));
            assert_eq!(serde_json::from_str::<Family>(&json).unwrap(), f);
        }
    }

    #[test]
    fn moe_buckets_hold_every_row_count() {
        assert_eq!((moe_bucket(1), moe_bucket(3), moe_bucket(16), moe_bucket(17), moe_bucket(4096)), (1, 4, 16, 32, 512));
        assert_eq!(moe_variant(64), "cuda_grouped_m64");
        assert!(MOE_BUCKETS.iter().all(|&m| moe_variant(m).ends_with(&format!("_m{m}"))));
    }

    #[test]
    fn grouped_request_falls_back_to_the_first_valid_config() {
        // gpt-oss: H = 2880 breaks moe_gateup's default (4 warps x unroll 2 do not divide it).
        let c = Catalog::embedded();
        let problem = params(&[("E", 128), ("TOPK", 4), ("H", 2880), ("I", 2880), ("ACT", 1)]);
        let (req, rule) = grouped_request(&c, &TuningDb::default(), Arch::SM90, "moe_gateup", 16, &problem);
        assert_eq!(rule, LookupRule::Default, "untuned stays a counted fallback");
        assert!(c.get("moe_gateup").unwrap().resolve(&req.params).is_ok(), "{:?}", req.params);
        assert_eq!((req.params["M"], req.params["H"]), (16, 2880));
    }
}
