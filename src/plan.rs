//! The kernel plan of a model: every kernel the CUDA engine launches for a checkpoint, a tuning
//! DB and an arch — each fused ternary linear (W2A8) at every M the batcher can produce, with
//! the DB rule that chose its config, plus the decode ops (norms, RoPE + KV append, attention,
//! LM head). `serve` provisions exactly this list and `cache bless` freezes it.

use std::path::Path;

use crate::arch::Arch;
use crate::engine::genmodel::{preset_config, Preset};
use crate::gpu::ActMode;
use crate::jit::KernelRequest;
use crate::template::{Catalog, Params};
use crate::tune::probe::{gemv_request, MAX_GEMV_M};
use crate::tuning_db::{LookupRule, TuningDb};

/// Longest context the CUDA engine serves: the attention kernel keeps one score per position
/// in shared memory, and the KV cache holds this many positions per sequence.
pub const MAX_CUDA_CONTEXT: i64 = 4096;

/// The keys of a Hugging Face `config.json` that decide kernel shapes (on-disk format).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ShapeConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: Option<i64>,
    pub head_dim: Option<i64>,
    pub vocab_size: Option<i64>,
    pub max_position_embeddings: Option<i64>,
    pub hidden_act: Option<String>,
    pub num_experts: Option<i64>,
    pub num_experts_per_tok: Option<i64>,
    pub moe_intermediate_size: Option<i64>,
}

/// Errors reading a model's shapes.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("model config {path}: {reason}")]
    Config { path: String, reason: String },
}

impl ShapeConfig {
    /// Reads `DIR/config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self, PlanError> {
        let path = dir.join("config.json");
        let err = |reason: String| PlanError::Config { path: path.display().to_string(), reason };
        let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
        let c: ShapeConfig = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        if c.hidden_size <= 0 || c.num_attention_heads <= 0 || c.hidden_size % c.num_attention_heads != 0 {
            return Err(err(format!("hidden_size {} is not a positive multiple of num_attention_heads {}", c.hidden_size, c.num_attention_heads)));
        }
        Ok(c)
    }

    /// The shapes of a `gen-model` preset.
    pub fn of_preset(preset: Preset) -> Self {
        let file = serde_json::to_value(preset_config(preset)).expect("a preset config serializes");
        serde_json::from_value(file).expect("a preset config has the shape keys")
    }

    fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Positions per sequence the CUDA engine's KV cache holds.
    pub fn context(&self) -> i64 {
        self.max_position_embeddings.unwrap_or(MAX_CUDA_CONTEXT).min(MAX_CUDA_CONTEXT)
    }

    /// The ternary linears of a layer as the CUDA engine launches them, (family, N, K): q|k|v
    /// and gate|up fused along N (one launch each), o and down as stored; dense MLP only.
    pub fn linear_shapes(&self) -> Vec<(&'static str, i64, i64)> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim();
        let kv = self.kv_heads() * self.head_dim();
        let mut v = vec![("attn_qkv", q + 2 * kv, h), ("attn_o", h, q)];
        if self.num_experts.is_none() {
            let i = self.intermediate_size;
            v.extend([("mlp_gate_up", 2 * i, h), ("mlp_down", h, i)]);
        }
        v
    }

    /// The decode-step ops: (family, template, problem parameters). Each is launched over any
    /// number of rows. MoE models add the expert GLU quantization (no norm) and the combine.
    pub fn op_kernels(&self) -> Vec<(&'static str, &'static str, Params)> {
        let p = |kv: &[(&str, i64)]| -> Params { kv.iter().map(|(k, v)| (k.to_string(), *v)).collect() };
        let (h, hd) = (self.hidden_size, self.head_dim());
        let (qh, kvh) = (self.num_attention_heads, self.kv_heads());
        let attn = p(&[("QH", qh), ("KVH", kvh), ("HD", hd), ("MAX_POS", self.context())]);
        let act = i64::from(self.hidden_act.as_deref() == Some("silu"));
        let mut v = vec![
            ("rmsnorm", "rmsnorm_quant", p(&[("H", h), ("GLU", 0)])),
            ("attn_sub_norm", "rmsnorm_quant", p(&[("H", qh * hd), ("GLU", 0)])),
            ("rope", "rope_kv", attn.clone()),
            ("attention", "attention_decode", attn),
        ];
        match self.moe() {
            None => v.push(("mlp_sub_norm", "rmsnorm_quant", p(&[("H", self.intermediate_size), ("GLU", 1), ("ACT", act)]))),
            Some((_, topk, i)) => {
                // Qwen3-MoE experts: SiLU, no sub-norm.
                v.push(("moe_glu", "rmsnorm_quant", p(&[("H", i), ("GLU", 1), ("ACT", 1), ("NORM", 0)])));
                v.push(("moe_combine", "moe_combine", p(&[("TOPK", topk), ("H", h)])));
            }
        }
        v
    }

    /// (experts, top-k, expert intermediate size) of an MoE model.
    fn moe(&self) -> Option<(i64, i64, i64)> {
        Some((self.num_experts?, self.num_experts_per_tok?, self.moe_intermediate_size?))
    }
}

/// One kernel of the plan.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlannedKernel {
    pub family: String,
    pub m: i64,
    pub request: KernelRequest,
    pub rule: LookupRule,
    /// Why no kernel exists for this shape (a template constraint it violates): the engine runs
    /// its reference path for it, a counted fallback. Such kernels are neither compiled nor blessed.
    pub unavailable: Option<String>,
}

impl PlannedKernel {
    fn new(family: &str, m: i64, request: KernelRequest, rule: LookupRule) -> Self {
        let unavailable = Catalog::embedded().get(&request.template).and_then(|t| t.resolve(&request.params)).err().map(|e| e.to_string());
        Self { family: family.into(), m, request, rule, unavailable }
    }
}

/// The config of a decode op (`template` at `problem` and `m`): a tuned record if the DB has one,
/// else the template defaults with rule `Fixed` (no tuner run covers these ops: not a fallback).
fn choose_op(db: &TuningDb, template: &str, problem: &Params, m: i64, arch: Arch) -> (KernelRequest, LookupRule) {
    let choice = db.lookup(template, problem, m);
    let rule = match choice.rule {
        LookupRule::Default => LookupRule::Fixed,
        r => r,
    };
    let mut params = choice.params;
    params.extend(problem.clone());
    (KernelRequest { template: template.into(), params, arch }, rule)
}

/// Every kernel serving `config` needs on `arch` with `db`, for batches of up to `max_batch`.
/// GEMV runs M > 1 in chunks of at most 8 rows, so M = 1..=min(max_batch, 8) are all hit,
/// except where probe-mgt1 did not pass a shape (then rows run one by one at M = 1).
/// The LM head and the MoE router take up to 8 rows per launch, so they are planned at the same M.
pub fn plan(config: &ShapeConfig, db: &TuningDb, arch: Arch, max_batch: i64) -> Vec<PlannedKernel> {
    let mut out = Vec::new();
    let chunk_ms = 1..=max_batch.min(MAX_GEMV_M as i64);
    let w2a8 = |out: &mut Vec<PlannedKernel>, family: &str, m: i64, n: i64, k: i64| {
        let (mut request, rule) = gemv_request(db, arch, ActMode::W2A8, m as usize, n, k);
        // The engine keeps linear outputs in f32 (its residual stream's precision).
        request.params.insert("OUT_F32".into(), 1);
        out.push(PlannedKernel::new(family, m, request, rule));
    };
    // A dense bf16 GEMV over gathered rows (`lm_head` template) at every chunk size.
    let gathered = |out: &mut Vec<PlannedKernel>, family: &str, n: i64| {
        for m in chunk_ms.clone() {
            let problem: Params = [("M", m), ("N", n), ("K", config.hidden_size)].into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            let (request, rule) = choose_op(db, "lm_head", &problem, m, arch);
            out.push(PlannedKernel::new(family, m, request, rule));
        }
    };
    for (family, n, k) in config.linear_shapes() {
        for m in chunk_ms.clone().filter(|&m| db.mgt1_allowed(m, n, k)) {
            w2a8(&mut out, family, m, n, k);
        }
    }
    if let Some((e, _, i)) = config.moe() {
        // Each (token, expert) pair runs its expert's gate|up and down as an M=1 GEMV.
        w2a8(&mut out, "moe_gate_up", 1, 2 * i, config.hidden_size);
        w2a8(&mut out, "moe_down", 1, config.hidden_size, i);
        gathered(&mut out, "moe_router", e);
    }
    for (family, template, problem) in config.op_kernels() {
        let (request, rule) = choose_op(db, template, &problem, 1, arch);
        out.push(PlannedKernel::new(family, 1, request, rule));
    }
    if let Some(vocab) = config.vocab_size {
        gathered(&mut out, "lm_head", vocab);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitnet_2b() -> ShapeConfig {
        serde_json::from_str(
            r#"{"hidden_size": 2560, "intermediate_size": 6912, "num_attention_heads": 20, "num_key_value_heads": 5,
                "vocab_size": 128256, "max_position_embeddings": 4096, "hidden_act": "relu2"}"#,
        )
        .unwrap()
    }

    #[test]
    fn bitnet_shapes_and_plan_size() {
        let c = bitnet_2b();
        let shapes: Vec<(i64, i64)> = c.linear_shapes().iter().map(|(_, n, k)| (*n, *k)).collect();
        assert_eq!(shapes, vec![(3840, 2560), (2560, 2560), (13824, 2560), (2560, 6912)]);
        let db = TuningDb::default();
        // Without probe results only M = 1 may run: one kernel per linear, W2A8.
        let p = plan(&c, &db, Arch::SM90, 16);
        let linear: Vec<_> = p.iter().filter(|k| k.request.template == "ternary_gemv_w2a8").collect();
        assert_eq!(linear.len(), 4);
        assert!(linear.iter().all(|k| k.m == 1 && k.rule == LookupRule::Default));
        // Five decode ops at template defaults (not fallbacks), and the LM head for M = 1..8.
        let ops: Vec<_> = p.iter().filter(|k| k.rule == LookupRule::Fixed).map(|k| k.family.as_str()).collect();
        assert_eq!(&ops[..5], ["rmsnorm", "attn_sub_norm", "rope", "attention", "mlp_sub_norm"]);
        assert_eq!(ops.iter().filter(|f| **f == "lm_head").count(), 8);
        assert!(p.iter().all(|k| k.unavailable.is_none()), "{p:#?}");
        let rope = p.iter().find(|k| k.family == "rope").unwrap();
        assert_eq!((rope.request.params["MAX_POS"], rope.request.params["HD"]), (4096, 128));
    }

    #[test]
    fn moe_plan_has_expert_router_and_combine_kernels() {
        let c: ShapeConfig = serde_json::from_str(
            r#"{"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16, "num_experts": 64,
                "num_experts_per_tok": 8, "moe_intermediate_size": 1408, "vocab_size": 1000}"#,
        )
        .unwrap();
        let p = plan(&c, &TuningDb::default(), Arch::SM90, 4);
        let fam = |f: &str| p.iter().filter(|k| k.family == f).map(|k| k.m).collect::<Vec<_>>();
        assert_eq!(fam("moe_router"), vec![1, 2, 3, 4]);
        assert_eq!((fam("moe_gate_up"), fam("moe_down"), fam("moe_glu"), fam("moe_combine")), (vec![1], vec![1], vec![1], vec![1]));
        let gu = p.iter().find(|k| k.family == "moe_gate_up").unwrap();
        assert_eq!((gu.request.params["N"], gu.request.params["K"], gu.request.params["OUT_F32"]), (2816, 2048, 1));
        assert!(p.iter().all(|k| k.family != "mlp_gate_up" && k.family != "mlp_sub_norm"), "MoE layers have no dense MLP");
        assert!(p.iter().all(|k| k.unavailable.is_none()), "{p:#?}");
    }
}
