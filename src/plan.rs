//! The kernel plan of a model: every kernel `mangrove serve` will launch for a checkpoint, a
//! tuning DB and an arch — each linear shape at every M the batcher can produce, with the DB
//! rule that chose its config. `cache bless` freezes exactly this list.

use std::collections::BTreeSet;
use std::path::Path;

use crate::arch::Arch;
use crate::jit::KernelRequest;
use crate::template::{Catalog, Params};
use crate::tune::probe::{gemv_request, MAX_GEMV_M};
use crate::tuning_db::{LookupRule, TuningDb};

/// The keys of a Hugging Face `config.json` that decide kernel shapes (on-disk format).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ShapeConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: Option<i64>,
    pub head_dim: Option<i64>,
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

    /// The distinct ternary linear shapes (N, K) of a layer, with their family names, as the
    /// checkpoint stores them (q, k, v, o, gate, up, down projections; dense MLP only).
    pub fn linear_shapes(&self) -> Vec<(&'static str, i64, i64)> {
        let h = self.hidden_size;
        let hd = self.head_dim.unwrap_or(h / self.num_attention_heads);
        let kv = self.num_key_value_heads.unwrap_or(self.num_attention_heads) * hd;
        let q = self.num_attention_heads * hd;
        let mut v = vec![("q_proj", q, h), ("kv_proj", kv, h), ("o_proj", h, q)];
        if self.num_experts.is_none() {
            let i = self.intermediate_size;
            v.extend([("gate_up_proj", i, h), ("down_proj", h, i)]);
        }
        let mut seen = BTreeSet::new();
        v.retain(|(_, n, k)| seen.insert((*n, *k)));
        v
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

/// Every kernel serving `config` needs on `arch` with `db`, for batches of up to `max_batch`.
/// GEMV runs M > 1 in chunks of at most 8 rows, so M = 1..=min(max_batch, 8) are all hit,
/// except where probe-mgt1 did not pass a shape (then rows run one by one at M = 1).
/// The MoE gate_up stage is compiled per token count, so M = 1..=max_batch.
pub fn plan(config: &ShapeConfig, db: &TuningDb, arch: Arch, max_batch: i64) -> Vec<PlannedKernel> {
    let mut out = Vec::new();
    for (family, n, k) in config.linear_shapes() {
        for m in 1..=max_batch.min(MAX_GEMV_M as i64) {
            if !db.mgt1_allowed(m, n, k) {
                continue;
            }
            let (request, rule) = gemv_request(db, arch, m as usize, n, k);
            out.push(PlannedKernel::new(family, m, request, rule));
        }
    }
    if let (Some(e), Some(topk), Some(i)) = (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) {
        let problem: Params = [("E", e), ("TOPK", topk), ("H", config.hidden_size), ("I", i)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        for m in 1..=max_batch {
            let choice = db.lookup("moe_gateup", &problem, m);
            let mut params = choice.params;
            params.extend(problem.clone());
            params.insert("M".into(), m);
            let request = KernelRequest { template: "moe_gateup".into(), params, arch };
            out.push(PlannedKernel::new("moe_gate_up", m, request, choice.rule));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitnet_2b() -> ShapeConfig {
        serde_json::from_str(
            r#"{"hidden_size": 2560, "intermediate_size": 6912, "num_attention_heads": 20, "num_key_value_heads": 5}"#,
        )
        .unwrap()
    }

    #[test]
    fn bitnet_shapes_and_plan_size() {
        let c = bitnet_2b();
        let shapes: Vec<(i64, i64)> = c.linear_shapes().iter().map(|(_, n, k)| (*n, *k)).collect();
        assert_eq!(shapes, vec![(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912)]);
        let db = TuningDb::default();
        // Without probe results only M = 1 may run: one kernel per shape.
        let p = plan(&c, &db, Arch::SM90, 16);
        assert_eq!(p.len(), 4);
        assert!(p.iter().all(|k| k.m == 1 && k.rule == LookupRule::Default));
    }

    #[test]
    fn moe_plan_covers_every_batch_size() {
        let c: ShapeConfig = serde_json::from_str(
            r#"{"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16, "num_experts": 64,
                "num_experts_per_tok": 8, "moe_intermediate_size": 1408}"#,
        )
        .unwrap();
        let p = plan(&c, &TuningDb::default(), Arch::SM90, 4);
        let moe: Vec<i64> = p.iter().filter(|k| k.family == "moe_gate_up").map(|k| k.m).collect();
        assert_eq!(moe, vec![1, 2, 3, 4]);
        assert!(p.iter().all(|k| k.family != "gate_up_proj"), "MoE layers have no dense MLP");
    }
}
