//! Model configuration: the on-disk `config.json` of a Hugging Face BitNet (or Qwen3-MoE
//! style ternary) checkpoint, parsed once into the runtime [`ModelConfig`] — the one reader the
//! kernel plan, the tuner and the engine share. Takes the JSON text (or a checkpoint folder);
//! gives a validated config or a [`ConfigError`] naming the bad key. [`Preset`]s are the shapes
//! `gen-model` writes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors of reading and checking `config.json`; each names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("config.json is not valid JSON for a BitNet config: {0}")]
    Json(#[from] serde_json::Error),
    #[error("config.json: `{key}` {problem}")]
    Invalid { key: &'static str, problem: String },
}

/// `quantization_config` as BitNet checkpoints store it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QuantizationConfigFile {
    pub quant_method: String,
    #[serde(default = "default_linear_class")]
    pub linear_class: String,
    #[serde(default = "default_quant_mode")]
    pub quantization_mode: String,
    /// Activation quantization granularity, e.g. `"per-token"` (the only one supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_quant: Option<String>,
    /// Activation bits, 8 when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_bits: Option<u32>,
}

fn default_linear_class() -> String {
    "autobitlinear".into()
}
fn default_quant_mode() -> String {
    "offline".into()
}

/// `config.json` exactly as `BitNetForCausalLM` (plus the Qwen3-MoE expert keys) stores it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigFile {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Absent: `num_attention_heads` (no GQA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Absent: `hidden_size / num_attention_heads`. Written by `gen-model`: transformers reads
    /// `head_dim` as given and fails on null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    /// Absent: 2048, transformers' `BitNetConfig` default.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Absent: 1e-5, transformers' `BitNetConfig` default.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<QuantizationConfigFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts_per_tok: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe_intermediate_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_topk_prob: Option<bool>,
    /// Must be absent or `{"rope_type": "default"}`: scaled RoPE (llama3, yarn, linear…) is not
    /// implemented, and running it as plain RoPE would be silently wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
}

/// The `architectures` the engine runs: BitNet's layout (sub-norms before `o_proj` and
/// `down_proj`), dense or with Qwen3-MoE experts. Empty means unstated, taken as BitNet.
pub const ARCHITECTURES: [&str; 2] = ["BitNetForCausalLM", "BitNetMoeForCausalLM"];

/// A token id field that HF configs write as one id or a list (`eos_token_id`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// All ids.
    pub fn ids(&self) -> Vec<u32> {
        match self {
            TokenIds::One(t) => vec![*t],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

fn default_max_positions() -> usize {
    2048
}
fn default_rms_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10000.0
}
fn default_act() -> String {
    "relu2".into()
}

/// Activation of the dense MLP (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `relu(x)^2`, BitNet b1.58.
    Relu2,
    /// `x * sigmoid(x)`.
    Silu,
}

/// How `weight_scale` enters a ternary linear layer (`quantization_config.linear_class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleConvention {
    /// transformers `AutoBitLinear` (offline): `y = (x_q W^T) / s_x * weight_scale`.
    Multiply,
    /// transformers `BitLinear`: `y = (x_q W^T) / (s_x * weight_scale)`.
    Divide,
}

/// Mixture-of-experts shape (Qwen3-MoE key names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeConfig {
    /// `num_experts`.
    pub experts: usize,
    /// `num_experts_per_tok`.
    pub topk: usize,
    /// `moe_intermediate_size`: rows of each expert's gate and up.
    pub inter: usize,
    /// Renormalize the top-k router weights to sum 1.
    pub norm_topk_prob: bool,
}

/// The validated runtime configuration the engine runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `hidden_size` (H).
    pub hidden: usize,
    /// `intermediate_size` (I) of the dense MLP.
    pub inter: usize,
    /// `num_hidden_layers`.
    pub layers: usize,
    /// `num_attention_heads`.
    pub heads: usize,
    /// `num_key_value_heads` (GQA).
    pub kv_heads: usize,
    /// `head_dim`, default H / heads.
    pub head_dim: usize,
    /// `vocab_size` (V).
    pub vocab: usize,
    /// `max_position_embeddings`: the context window.
    pub max_positions: usize,
    /// `rms_norm_eps`.
    pub rms_eps: f64,
    /// `rope_theta`.
    pub rope_theta: f64,
    /// `tie_word_embeddings`: the LM head is the embedding matrix.
    pub tied: bool,
    /// `hidden_act` of the dense MLP.
    pub act: Activation,
    /// How `weight_scale` applies (`quantization_config.linear_class`).
    pub scale: ScaleConvention,
    /// Expert shape when the MLPs are mixtures of experts.
    pub moe: Option<MoeConfig>,
    /// `eos_token_id` (one or several); empty when absent.
    pub eos_token_ids: Vec<u32>,
}

/// Largest hidden or intermediate width accepted.
pub const MAX_WIDTH: usize = 1 << 17;
/// Most layers accepted.
pub const MAX_LAYERS: usize = 1024;
/// Most attention heads accepted.
pub const MAX_HEADS: usize = 1024;
/// Largest vocabulary accepted.
pub const MAX_VOCAB: usize = 1 << 22;
/// Largest context window accepted.
pub const MAX_POSITIONS: usize = 1 << 21;
/// Most MoE experts accepted.
pub const MAX_EXPERTS: usize = 4096;

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, problem: problem.into() }
}

impl ModelConfig {
    /// Reads and validates `DIR/config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io { path, source })?;
        Self::from_json(&text)
    }

    /// The shapes of a `gen-model` preset.
    pub fn of_preset(preset: Preset) -> Self {
        Self::from_file(&preset.config()).expect("a preset config is valid")
    }

    /// Parses and validates `config.json` text.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        Self::from_file(&serde_json::from_str(text)?)
    }

    /// Validates an on-disk config.
    pub fn from_file(f: &ConfigFile) -> Result<Self, ConfigError> {
        if let Some(a) = f.architectures.iter().find(|a| !ARCHITECTURES.contains(&a.as_str())) {
            return Err(invalid("architectures", format!("'{a}' is not supported (supported: {})", ARCHITECTURES.join(", "))));
        }
        if let Some(r) = f.rope_scaling.as_ref().filter(|r| !r.is_null()) {
            let kind = r.get("rope_type").or_else(|| r.get("type")).and_then(|t| t.as_str()).unwrap_or("(none)");
            if kind != "default" {
                return Err(invalid("rope_scaling", format!("type '{kind}' is not supported (plain RoPE only)")));
            }
        }
        let positive = |key, v: usize| if v == 0 { Err(invalid(key, "must be positive")) } else { Ok(v) };
        let hidden = positive("hidden_size", f.hidden_size)?;
        let heads = positive("num_attention_heads", f.num_attention_heads)?;
        let kv_heads = positive("num_key_value_heads", f.num_key_value_heads.unwrap_or(heads))?;
        if heads % kv_heads != 0 {
            return Err(invalid("num_key_value_heads", format!("{kv_heads} does not divide {heads} heads")));
        }
        let head_dim = f.head_dim.unwrap_or(hidden / heads);
        if f.head_dim.is_none() && hidden % heads != 0 {
            return Err(invalid("num_attention_heads", format!("{heads} does not divide hidden_size {hidden}")));
        }
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(invalid("head_dim", format!("{head_dim} must be positive and even (RoPE)")));
        }
        let act = match f.hidden_act.as_str() {
            "relu2" => Activation::Relu2,
            "silu" => Activation::Silu,
            other => return Err(invalid("hidden_act", format!("'{other}' is not supported (relu2, silu)"))),
        };
        let scale = match &f.quantization_config {
            None => ScaleConvention::Multiply,
            Some(q) => {
                if q.quant_method != "bitnet" {
                    return Err(invalid("quantization_config.quant_method", format!("'{}' is not 'bitnet'", q.quant_method)));
                }
                if q.quantization_mode != "offline" {
                    return Err(invalid("quantization_config.quantization_mode", format!("'{}' is not 'offline'", q.quantization_mode)));
                }
                if let Some(a) = &q.activation_quant {
                    if a != "per-token" {
                        return Err(invalid("quantization_config.activation_quant", format!("'{a}' is not 'per-token'")));
                    }
                }
                if let Some(b) = q.activation_bits {
                    if b != 8 {
                        return Err(invalid("quantization_config.activation_bits", format!("{b} is not 8")));
                    }
                }
                match q.linear_class.as_str() {
                    "autobitlinear" => ScaleConvention::Multiply,
                    "bitlinear" => ScaleConvention::Divide,
                    other => return Err(invalid("quantization_config.linear_class", format!("'{other}' is not supported"))),
                }
            }
        };
        let moe = match f.num_experts {
            None | Some(0) => None,
            Some(experts) => {
                let topk = f.num_experts_per_tok.ok_or_else(|| invalid("num_experts_per_tok", "is required with num_experts"))?;
                if topk == 0 || topk > experts {
                    return Err(invalid("num_experts_per_tok", format!("{topk} must be in 1..={experts}")));
                }
                let inter = positive("moe_intermediate_size", f.moe_intermediate_size.unwrap_or(f.intermediate_size))?;
                Some(MoeConfig { experts, topk, inter, norm_topk_prob: f.norm_topk_prob.unwrap_or(true) })
            }
        };
        let cfg = ModelConfig {
            hidden,
            inter: positive("intermediate_size", f.intermediate_size)?,
            layers: positive("num_hidden_layers", f.num_hidden_layers)?,
            heads,
            kv_heads,
            head_dim,
            vocab: positive("vocab_size", f.vocab_size)?,
            max_positions: positive("max_position_embeddings", f.max_position_embeddings)?,
            rms_eps: f.rms_norm_eps,
            rope_theta: f.rope_theta,
            tied: f.tie_word_embeddings,
            act,
            scale,
            moe,
            eos_token_ids: f.eos_token_id.as_ref().map_or_else(Vec::new, TokenIds::ids),
        };
        // Bounds: far beyond any real checkpoint, small enough that a hostile config.json cannot
        // make a loader allocate without limit.
        for (key, n, max) in [
            ("hidden_size", cfg.hidden, MAX_WIDTH),
            ("intermediate_size", cfg.inter, MAX_WIDTH),
            ("num_hidden_layers", cfg.layers, MAX_LAYERS),
            ("num_attention_heads", cfg.heads, MAX_HEADS),
            ("vocab_size", cfg.vocab, MAX_VOCAB),
            ("max_position_embeddings", cfg.max_positions, MAX_POSITIONS),
            ("num_experts", cfg.moe.map_or(1, |m| m.experts), MAX_EXPERTS),
            ("moe_intermediate_size", cfg.moe.map_or(4, |m| m.inter), MAX_WIDTH),
        ] {
            if n > max {
                return Err(invalid(key, format!("{n} exceeds the supported maximum {max}")));
            }
        }
        if !(cfg.rms_eps.is_finite() && cfg.rms_eps > 0.0 && cfg.rms_eps < 1.0) {
            return Err(invalid("rms_norm_eps", format!("{} must be in (0, 1)", cfg.rms_eps)));
        }
        if !(cfg.rope_theta.is_finite() && cfg.rope_theta > 0.0) {
            return Err(invalid("rope_theta", format!("{} must be positive and finite", cfg.rope_theta)));
        }
        // Packed ternary rows come four to a byte: every output dimension must divide by 4.
        for (key, n) in [
            ("hidden_size", cfg.hidden),
            ("intermediate_size", cfg.inter),
            ("num_attention_heads", cfg.heads * cfg.head_dim),
            ("num_key_value_heads", cfg.kv_heads * cfg.head_dim),
            ("moe_intermediate_size", cfg.moe.map_or(4, |m| m.inter)),
        ] {
            if n % 4 != 0 {
                return Err(invalid(key, format!("gives a projection of {n} rows, not a multiple of 4")));
            }
        }
        Ok(cfg)
    }

    /// Query projection rows: `heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Key (and value) projection rows: `kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Model sizes `gen-model` can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// H 64, I 128, 2 layers, 4 heads, 2 kv heads, vocab 300.
    Tiny,
    /// `tiny` with 4 experts of 64, top-2, per layer.
    TinyMoe,
    /// bitnet-b1.58-2B-4T shapes: H 2560, I 6912, 30 layers, 20/5 heads, vocab 128256 (~1.2 GB).
    Bitnet2b,
    /// Qwen3-30B-A3B shapes with ternary experts: H 2048, 48 layers, 32/4 heads of 128, vocab
    /// 151936, 128 experts of I 768 per layer, top-8 renormalized (~7.7 GB; `--layers 2` keeps
    /// the kernel shapes at ~0.9 GB).
    Qwen3Moe,
}

/// Tokens of the byte-level tokenizer `gen-model` writes: 256 bytes, merges, 3 specials.
pub const TINY_VOCAB: usize = 300;

impl Preset {
    /// Every preset, in the order `--help` lists them.
    pub const ALL: [Preset; 4] = [Preset::Tiny, Preset::TinyMoe, Preset::Bitnet2b, Preset::Qwen3Moe];

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::TinyMoe => "tiny-moe",
            Preset::Bitnet2b => "bitnet-2b",
            Preset::Qwen3Moe => "qwen3-moe",
        }
    }

    /// The config a preset writes.
    pub fn config(self) -> ConfigFile {
        let (h, i, l, heads, kv, v, maxp, tied) = match self {
            Preset::Tiny | Preset::TinyMoe => (64, 128, 2, 4, 2, TINY_VOCAB, 512, true),
            Preset::Bitnet2b => (2560, 6912, 30, 20, 5, 128256, 4096, true),
            Preset::Qwen3Moe => (2048, 6144, 48, 32, 4, 151936, 4096, false),
        };
        // (experts, top-k, expert intermediate) of the MoE presets.
        let moe = match self {
            Preset::TinyMoe => Some((4, 2, 64)),
            Preset::Qwen3Moe => Some((128, 8, 768)),
            Preset::Tiny | Preset::Bitnet2b => None,
        };
        let big = self == Preset::Bitnet2b;
        let qwen = self == Preset::Qwen3Moe;
        ConfigFile {
            architectures: vec![if moe.is_some() { "BitNetMoeForCausalLM" } else { "BitNetForCausalLM" }.into()],
            model_type: Some("bitnet".into()),
            hidden_size: h,
            intermediate_size: i,
            num_hidden_layers: l,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv),
            head_dim: Some(if qwen { 128 } else { h / heads }),
            vocab_size: v,
            max_position_embeddings: maxp,
            rms_norm_eps: 1e-5,
            rope_theta: if qwen { 1_000_000.0 } else if big { 500000.0 } else { 10000.0 },
            tie_word_embeddings: tied,
            hidden_act: "relu2".into(),
            bos_token_id: Some(TokenIds::One(if big { 128000 } else if qwen { 151643 } else { 297 })),
            eos_token_id: Some(TokenIds::One(if big { 128001 } else if qwen { 151645 } else { 298 })),
            quantization_config: Some(QuantizationConfigFile {
                quant_method: "bitnet".into(),
                linear_class: "autobitlinear".into(),
                quantization_mode: "offline".into(),
                activation_quant: Some("per-token".into()),
                activation_bits: Some(8),
            }),
            num_experts: moe.map(|m| m.0),
            num_experts_per_tok: moe.map(|m| m.1),
            moe_intermediate_size: moe.map(|m| m.2),
            norm_topk_prob: moe.map(|_| true),
            rope_scaling: None,
        }
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Preset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Preset::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            format!("unknown preset '{s}' (known: {})", Preset::ALL.map(Preset::name).join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": true, "hidden_act": "relu2",
            "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}
        })
    }

    /// What `gen-model` writes has no nulls (transformers chokes on `"head_dim": null`) and
    /// reads back the same; the keys transformers defaults may be left out.
    #[test]
    fn preset_configs_have_no_nulls_and_absent_keys_take_defaults() {
        fn nulls(v: &serde_json::Value) -> bool {
            match v {
                serde_json::Value::Null => true,
                serde_json::Value::Array(a) => a.iter().any(nulls),
                serde_json::Value::Object(o) => o.values().any(nulls),
                _ => false,
            }
        }
        for p in Preset::ALL {
            let v = serde_json::to_value(p.config()).unwrap();
            assert!(!nulls(&v), "{p}: {v}");
            let head_dim = if matches!(p, Preset::Bitnet2b | Preset::Qwen3Moe) { 128 } else { 16 };
            assert_eq!(v["head_dim"], head_dim, "{p}");
            assert_eq!(ModelConfig::from_json(&v.to_string()).unwrap(), ModelConfig::of_preset(p));
        }
        let mut c = base();
        let o = c.as_object_mut().unwrap();
        for k in ["max_position_embeddings", "rms_norm_eps", "rope_theta", "num_key_value_heads", "hidden_act", "tie_word_embeddings"] {
            o.remove(k);
        }
        o.insert("head_dim".into(), serde_json::Value::Null);
        let m = ModelConfig::from_json(&c.to_string()).unwrap();
        assert_eq!((m.max_positions, m.rms_eps, m.kv_heads, m.head_dim), (2048, 1e-5, 4, 16));
    }

    /// A Llama-layout 1.58-bit checkpoint (no sub-norms) or scaled RoPE is refused by key, not
    /// run wrong or failed later on a missing tensor.
    #[test]
    fn other_architectures_and_rope_scaling_are_refused_by_name() {
        let mut c = base();
        c["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        let e = ModelConfig::from_json(&c.to_string()).unwrap_err().to_string();
        assert!(e.contains("`architectures`") && e.contains("LlamaForCausalLM"), "{e}");
        let mut c = base();
        c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
        let e = ModelConfig::from_json(&c.to_string()).unwrap_err().to_string();
        assert!(e.contains("`rope_scaling`") && e.contains("llama3"), "{e}");
        for ok in [serde_json::Value::Null, serde_json::json!({"rope_type": "default"})] {
            let mut c = base();
            c["rope_scaling"] = ok;
            c["architectures"] = serde_json::json!(["BitNetForCausalLM"]);
            ModelConfig::from_json(&c.to_string()).unwrap();
        }
    }

    #[test]
    fn parses_bitnet_config() {
        let c = ModelConfig::from_json(&base().to_string()).unwrap();
        assert_eq!((c.head_dim, c.kv_dim(), c.scale, c.moe), (16, 32, ScaleConvention::Multiply, None));
    }

    #[test]
    fn out_of_bounds_values_are_refused_by_name() {
        for (key, v) in [
            ("num_hidden_layers", serde_json::json!(1_000_000_000u64)),
            ("vocab_size", serde_json::json!(1u64 << 40)),
            ("rms_norm_eps", serde_json::json!(-1.0)),
            ("rope_theta", serde_json::json!(0.0)),
            ("rope_theta", serde_json::json!(-5.0)),
        ] {
            let mut c = base();
            c[key] = v.clone();
            let e = ModelConfig::from_json(&c.to_string()).unwrap_err().to_string();
            assert!(e.contains(key), "{key}={v}: {e}");
        }
    }

    #[test]
    fn bad_keys_are_named() {
        let mut v = base();
        v["num_key_value_heads"] = 3.into();
        assert!(ModelConfig::from_json(&v.to_string()).unwrap_err().to_string().contains("num_key_value_heads"));
        let mut v = base();
        v["hidden_act"] = "gelu".into();
        assert!(ModelConfig::from_json(&v.to_string()).unwrap_err().to_string().contains("hidden_act"));
        let mut v = base();
        v.as_object_mut().unwrap().remove("vocab_size");
        assert!(ModelConfig::from_json(&v.to_string()).unwrap_err().to_string().contains("vocab_size"));
        let mut v = base();
        v["quantization_config"]["linear_class"] = "bitlinear".into();
        assert_eq!(ModelConfig::from_json(&v.to_string()).unwrap().scale, ScaleConvention::Divide);
        let mut v = base();
        v["eos_token_id"] = serde_json::json!([128001, 128009]);
        assert_eq!(ModelConfig::from_json(&v.to_string()).unwrap().eos_token_ids, vec![128001, 128009]);
    }
}
