//! The kernel plan of a model: every kernel the CUDA engine launches for a checkpoint, a tuning
//! DB and an arch — each fused ternary linear (W2A8) at every M the batcher can produce, with
//! the DB rule that chose its config, plus the decode ops (norms, RoPE + KV append, attention,
//! LM head). `serve` provisions exactly this list and `cache bless` freezes it.

use mangrove_core::arch::Arch;
use mangrove_core::gpu::{ActMode, GEMM_TEMPLATE};
use mangrove_core::jit::KernelRequest;
use mangrove_core::model_config::ModelConfig;
use mangrove_core::step::{
    decode_layer_problem, grouped_request, linear_request, linear_shapes, moe_problems, op_kernels, op_request, op_tuning_m, Family, GEMM_BUCKETS,
    MAX_GEMV_M, MOE_BUCKETS,
};
use mangrove_core::template::{Catalog, Params};
use mangrove_core::tuning_db::{LookupRule, TuningDb};

/// One kernel of the plan.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlannedKernel {
    pub family: Family,
    pub m: i64,
    pub request: KernelRequest,
    pub rule: LookupRule,
    /// Why no kernel exists for this shape (a template constraint it violates): the engine runs
    /// its reference path for it, a counted fallback. Such kernels are neither compiled nor blessed.
    pub unavailable: Option<String>,
}

impl PlannedKernel {
    fn new(catalog: &Catalog, family: Family, m: i64, request: KernelRequest, rule: LookupRule) -> Self {
        let unavailable = catalog.get(&request.template).and_then(|t| t.resolve(&request.params)).err().map(|e| e.to_string());
        Self { family, m, request, rule, unavailable }
    }

    /// `family M=m (template params)`, for logs and errors.
    pub fn label(&self) -> String {
        format!("{} M={} ({} {})", self.family, self.m, self.request.template, mangrove_core::template::format_params(&self.request.params))
    }
}

/// Every kernel serving `config` needs on `arch` with `db`, for batches of up to `max_batch`;
/// `catalog` decides which shapes a template can take. One row of a linear runs on the M=1
/// GEMV; more (decode batches and prefill chunks) on the tensor-core GEMM at each of
/// [`GEMM_BUCKETS`] probe-mgt1 passed for the shape. Where it passed none (or the GEMM cannot
/// take the shape), GEMVs run M > 1 in chunks of at most [`MAX_GEMV_M`] rows where the older
/// GEMV probe passed, else rows run one by one. The LM head and the MoE router take as many rows
/// per launch, so they are planned at M = 1..=min(max_batch, MAX_GEMV_M).
pub fn plan(catalog: &Catalog, config: &ModelConfig, db: &TuningDb, arch: Arch, max_batch: i64) -> Vec<PlannedKernel> {
    let mut out = Vec::new();
    let chunk_ms = 1..=max_batch.min(MAX_GEMV_M as i64);
    let h = config.hidden as i64;
    let w2a8 = |out: &mut Vec<PlannedKernel>, template: &str, family: Family, m: i64, n: i64, k: i64| {
        let (mut request, rule) = linear_request(db, arch, template, m, n, k);
        // The engine keeps linear outputs in f32 (its residual stream's precision).
        request.params.insert("OUT_F32".into(), 1);
        out.push(PlannedKernel::new(catalog, family, m, request, rule));
    };
    let gemv = ActMode::W2A8.template();
    // A dense bf16 GEMV over gathered rows (`lm_head` template) at every chunk size.
    let gathered = |out: &mut Vec<PlannedKernel>, family: Family, n: i64| {
        for m in chunk_ms.clone() {
            let problem: Params = [("M", m), ("N", n), ("K", h)].into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            let (request, rule) = op_request(db, "lm_head", &problem, m, arch);
            out.push(PlannedKernel::new(catalog, family, m, request, rule));
        }
    };
    for (family, n, k) in linear_shapes(config) {
        w2a8(&mut out, gemv, family, 1, n, k);
        let before = out.len();
        for m in GEMM_BUCKETS.into_iter().filter(|&m| db.mgt1_allowed(GEMM_TEMPLATE, m, n, k)) {
            w2a8(&mut out, GEMM_TEMPLATE, family, m, n, k);
        }
        if out[before..].iter().any(|p| p.unavailable.is_some()) || out.len() == before {
            out.truncate(before);
            for m in (2..=MAX_GEMV_M as i64).filter(|&m| db.mgt1_allowed(ActMode::Bf16.template(), m, n, k)) {
                w2a8(&mut out, gemv, family, m, n, k);
            }
        }
    }
    if let (Some(moe), Some((gateup, down, route))) = (config.moe, moe_problems(config)) {
        // At every token bucket: the routing on the GPU, then the grouped int8 gate_up and
        // down over the routed pairs; the router is a dense GEMV over the rows.
        for m in MOE_BUCKETS {
            let (gu, gu_rule) = grouped_request(catalog, db, arch, "moe_gateup", m, &gateup);
            let (dn, dn_rule) = grouped_request(catalog, db, arch, "moe_down", m, &down);
            // The routing is aligned to each consumer's BLOCK_M (one launch when they agree).
            for (family, bm) in [(Family::MoeRoute, gu.params.get("BLOCK_M")), (Family::MoeRouteDown, dn.params.get("BLOCK_M"))] {
                let mut problem = route.clone();
                problem.insert("M".into(), m);
                problem.insert("BLOCK_M".into(), bm.copied().unwrap_or(8));
                let (request, rule) = op_request(db, "moe_route", &problem, m, arch);
                out.push(PlannedKernel::new(catalog, family, m, request, rule));
            }
            out.push(PlannedKernel::new(catalog, Family::MoeGateUp, m, gu, gu_rule));
            out.push(PlannedKernel::new(catalog, Family::MoeDown, m, dn, dn_rule));
        }
        gathered(&mut out, Family::MoeRouter, moe.experts as i64);
    }
    for (family, template, problem) in op_kernels(config) {
        let (request, rule) = op_request(db, template, &problem, op_tuning_m(family), arch);
        out.push(PlannedKernel::new(catalog, family, 1, request, rule));
    }
    // Batch-1 decode steps of dense models run each layer as one fused kernel.
    if let Some(problem) = decode_layer_problem(config) {
        let (request, rule) = op_request(db, "decode_layer", &problem, 1, arch);
        out.push(PlannedKernel::new(catalog, Family::DecodeLayer, 1, request, rule));
    }
    gathered(&mut out, Family::LmHead, config.vocab as i64);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitnet_2b() -> ModelConfig {
        ModelConfig::from_json(
            r#"{"hidden_size": 2560, "intermediate_size": 6912, "num_attention_heads": 20, "num_key_value_heads": 5,
                "vocab_size": 128256, "max_position_embeddings": 4096, "hidden_act": "relu2",
                "num_hidden_layers": 30, "rms_norm_eps": 1e-5}"#,
        )
        .unwrap()
    }

    #[test]
    fn bitnet_shapes_and_plan_size() {
        let c = bitnet_2b();
        let shapes: Vec<(i64, i64)> = linear_shapes(&c).iter().map(|(_, n, k)| (*n, *k)).collect();
        assert_eq!(shapes, vec![(3840, 2560), (2560, 2560), (13824, 2560), (2560, 6912)]);
        let db = TuningDb::default();
        // Without probe results only M = 1 may run: one kernel per linear, W2A8.
        let p = plan(&Catalog::embedded(), &c, &db, Arch::SM90, 16);
        let linear: Vec<_> = p.iter().filter(|k| k.request.template == "ternary_gemv_w2a8").collect();
        assert_eq!(linear.len(), 4);
        assert!(linear.iter().all(|k| k.m == 1 && k.rule == LookupRule::Default));
        // The decode ops at template defaults (not fallbacks), the sampler, and the LM head for M = 1..8.
        let ops: Vec<_> = p.iter().filter(|k| k.rule == LookupRule::Fixed).map(|k| k.family.as_str()).collect();
        assert_eq!(&ops[..4], ["rmsnorm", "attn_sub_norm", "rope", "attention"]);
        assert!(ops.contains(&"sample") && ops.contains(&"mlp_sub_norm"), "{ops:?}");
        assert_eq!(ops.iter().filter(|f| **f == "lm_head").count(), 8);
        assert!(p.iter().all(|k| k.unavailable.is_none()), "{p:#?}");
        let rope = p.iter().find(|k| k.family == Family::Rope).unwrap();
        assert_eq!((rope.request.params["MAX_POS"], rope.request.params["HD"]), (4096, 128));
    }

    #[test]
    fn probed_gemm_buckets_serve_more_than_one_row() {
        use mangrove_core::tuning_db::{GateRecord, Provenance};
        let c = bitnet_2b();
        let mut db = TuningDb::default();
        for m in [8, 16, 64] {
            db.record_gate(GateRecord {
                template: GEMM_TEMPLATE.into(), m, n: 13824, k: 2560, passed: m != 64, status: String::new(), reference: "M1Kernel".into(),
                deltas: None, params: Params::new(), avg_us: 1.0, p50_us: 1.0, p95_us: 1.0, provenance: Provenance::default(),
            });
        }
        let p = plan(&Catalog::embedded(), &c, &db, Arch::SM90, 16);
        let gate_up: Vec<_> = p.iter().filter(|k| k.family == Family::MlpGateUp).map(|k| (k.m, k.request.template.as_str())).collect();
        assert_eq!(gate_up, [(1, "ternary_gemv_w2a8"), (8, GEMM_TEMPLATE), (16, GEMM_TEMPLATE)], "only the buckets that passed");
        let down: Vec<_> = p.iter().filter(|k| k.family == Family::MlpDown).map(|k| k.m).collect();
        assert_eq!(down, [1], "no gate for this shape: rows run one by one");
        assert!(p.iter().all(|k| k.unavailable.is_none()), "{p:#?}");
    }

    #[test]
    fn moe_plan_has_expert_router_and_combine_kernels() {
        let c = ModelConfig::from_json(
            r#"{"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16, "num_experts": 64,
                "num_experts_per_tok": 8, "moe_intermediate_size": 1408, "vocab_size": 1000,
                "num_hidden_layers": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}"#,
        )
        .unwrap();
        let p = plan(&Catalog::embedded(), &c, &TuningDb::default(), Arch::SM90, 4);
        let fam = |f: &str| p.iter().filter(|k| k.family.as_str() == f).map(|k| k.m).collect::<Vec<_>>();
        assert_eq!(fam("moe_router"), vec![1, 2, 3, 4]);
        let buckets = MOE_BUCKETS.to_vec();
        for f in ["moe_route", "moe_route_down", "moe_gate_up", "moe_down"] {
            assert_eq!(fam(f), buckets, "{f} at every bucket");
        }
        assert_eq!((fam("moe_glu"), fam("moe_combine")), (vec![1], vec![1]));
        for k in p.iter().filter(|k| k.family == Family::MoeGateUp || k.family == Family::MoeDown) {
            assert_eq!((k.request.params["M"], k.request.params["E"], k.request.params["H"], k.request.params["I"]), (k.m, 64, 2048, 1408));
            assert_eq!(k.rule, LookupRule::Default, "no DB: untuned (a --strict failure)");
        }
        // Each routing is aligned to its consumer's BLOCK_M at the same bucket.
        for m in MOE_BUCKETS {
            let get = |f: Family| p.iter().find(|k| k.family == f && k.m == m).unwrap().request.params["BLOCK_M"];
            assert_eq!((get(Family::MoeRoute), get(Family::MoeRouteDown)), (get(Family::MoeGateUp), get(Family::MoeDown)));
        }
        assert!(p.iter().all(|k| k.family != Family::MlpGateUp && k.family != Family::MlpSubNorm), "MoE layers have no dense MLP");
        assert!(p.iter().all(|k| k.unavailable.is_none()), "{p:#?}");
    }
}
