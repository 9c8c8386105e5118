//! Model weights: loads a Hugging Face BitNet checkpoint directory (`config.json` +
//! `model.safetensors`) into host memory, checking every tensor's name, dtype and shape.
//! Takes a directory; gives a [`Model`] or a [`LoadError`] naming the file, key or tensor.
//! Ternary projections stay in the packed uint8 layout of [`mangrove_core::reference::pack_ternary`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use mangrove_core::model_config::{ConfigError, ModelConfig};

/// Errors of loading a checkpoint; each names the path or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Config { path: PathBuf, source: ConfigError },
    #[error("{path} is not a valid safetensors index: {message}")]
    Index { path: PathBuf, message: String },
    #[error("{path} is not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("tensor `{name}` is missing from model.safetensors")]
    Missing { name: String },
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape { name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("tensor `{name}` has dtype {got}, expected {expected}")]
    Dtype { name: String, expected: &'static str, got: String },
    #[error("tensor `{name}` holds {value}, but {problem}")]
    Value { name: String, value: String, problem: &'static str },
}

/// One ternary projection: W [n, k] packed as uint8 [n/4, k], with its `weight_scale`.
#[derive(Debug, Clone)]
pub struct TernaryLinear {
    /// uint8 [n/4, k] in the [`mangrove_core::reference::pack_ternary`] layout.
    pub packed: Vec<u8>,
    /// Output rows.
    pub n: usize,
    /// Input columns.
    pub k: usize,
    /// `weight_scale`.
    pub scale: f64,
}

/// The dense or mixture-of-experts feed-forward block of a layer.
#[derive(Debug, Clone)]
pub enum Ffn {
    /// BitNet MLP: `down(ffn_sub_norm(act(gate(y)) * up(y)))`.
    Dense { gate: TernaryLinear, up: TernaryLinear, down: TernaryLinear, sub_norm: Vec<f64> },
    /// Qwen3-MoE style: softmax top-k router over experts of `silu(gate(y)) * up(y)` → down.
    Moe { router: Vec<f64>, experts: Vec<Expert> },
}

/// One expert of an MoE block.
#[derive(Debug, Clone)]
pub struct Expert {
    /// `gate_proj` [moe_inter, H].
    pub gate: TernaryLinear,
    /// `up_proj` [moe_inter, H].
    pub up: TernaryLinear,
    /// `down_proj` [H, moe_inter].
    pub down: TernaryLinear,
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Layer {
    pub input_norm: Vec<f64>,
    pub q: TernaryLinear,
    pub k: TernaryLinear,
    pub v: TernaryLinear,
    pub o: TernaryLinear,
    pub attn_sub_norm: Vec<f64>,
    pub post_attn_norm: Vec<f64>,
    pub ffn: Ffn,
}

/// A whole checkpoint in host memory.
#[derive(Debug, Clone)]
pub struct Model {
    pub config: ModelConfig,
    /// Token embeddings [vocab, hidden], row-major.
    pub embed: Vec<f32>,
    pub layers: Vec<Layer>,
    pub norm: Vec<f64>,
    /// `lm_head.weight` [vocab, hidden]; `None` when tied to the embeddings.
    pub lm_head: Option<Vec<f32>>,
}

impl Model {
    /// Loads `dir/config.json` and `dir/model.safetensors` (or the shards listed in
    /// `dir/model.safetensors.index.json` when there is no single file).
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        let cpath = dir.join("config.json");
        let text = std::fs::read_to_string(&cpath).map_err(|source| LoadError::Io { path: cpath.clone(), source })?;
        let config = ModelConfig::from_json(&text).map_err(|source| LoadError::Config { path: cpath, source })?;
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files = if !single.exists() && index.exists() { shard_files(&index)? } else { vec![single] };
        let bytes: Vec<Vec<u8>> = files
            .iter()
            .map(|p| std::fs::read(p).map_err(|source| LoadError::Io { path: p.clone(), source }))
            .collect::<Result<_, _>>()?;
        let shards: Vec<SafeTensors> = bytes
            .iter()
            .zip(&files)
            .map(|(b, p)| SafeTensors::deserialize(b).map_err(|e| LoadError::Safetensors { path: p.clone(), message: e.to_string() }))
            .collect::<Result<_, _>>()?;
        Self::from_shards(config, &shards)
    }

    /// Builds a model from parsed tensors, checking each against `config`.
    pub fn from_safetensors(config: ModelConfig, st: &SafeTensors) -> Result<Self, LoadError> {
        Self::from_shards(config, std::slice::from_ref(st))
    }

    /// Builds a model from tensors spread over shards (the first shard holding a name wins).
    pub fn from_shards(config: ModelConfig, shards: &[SafeTensors]) -> Result<Self, LoadError> {
        let mut names = HashMap::new();
        for (i, st) in shards.iter().enumerate() {
            for n in st.names() {
                names.entry(n.to_string()).or_insert(i);
            }
        }
        let r = Reader { shards, names };
        let c = &config;
        let (h, v) = (c.hidden, c.vocab);
        let embed = r.float("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let p = format!("model.layers.{i}");
            let ffn = match c.moe {
                None => Ffn::Dense {
                    gate: r.ternary(&format!("{p}.mlp.gate_proj"), c.inter, h)?,
                    up: r.ternary(&format!("{p}.mlp.up_proj"), c.inter, h)?,
                    down: r.ternary(&format!("{p}.mlp.down_proj"), h, c.inter)?,
                    sub_norm: r.vector(&format!("{p}.mlp.ffn_sub_norm.weight"), c.inter)?,
                },
                Some(m) => Ffn::Moe {
                    router: r.float(&format!("{p}.mlp.gate.weight"), &[m.experts, h])?.into_iter().map(f64::from).collect(),
                    experts: (0..m.experts)
                        .map(|e| {
                            let q = format!("{p}.mlp.experts.{e}");
                            Ok(Expert {
                                gate: r.ternary(&format!("{q}.gate_proj"), m.inter, h)?,
                                up: r.ternary(&format!("{q}.up_proj"), m.inter, h)?,
                                down: r.ternary(&format!("{q}.down_proj"), h, m.inter)?,
                            })
                        })
                        .collect::<Result<_, LoadError>>()?,
                },
            };
            layers.push(Layer {
                input_norm: r.vector(&format!("{p}.input_layernorm.weight"), h)?,
                q: r.ternary(&format!("{p}.self_attn.q_proj"), c.q_dim(), h)?,
                k: r.ternary(&format!("{p}.self_attn.k_proj"), c.kv_dim(), h)?,
                v: r.ternary(&format!("{p}.self_attn.v_proj"), c.kv_dim(), h)?,
                o: r.ternary(&format!("{p}.self_attn.o_proj"), h, c.q_dim())?,
                attn_sub_norm: r.vector(&format!("{p}.self_attn.attn_sub_norm.weight"), c.q_dim())?,
                post_attn_norm: r.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                ffn,
            });
        }
        let norm = r.vector("model.norm.weight", h)?;
        let lm_head = if c.tied { None } else { Some(r.float("lm_head.weight", &[v, h])?) };
        Ok(Model { config, embed, layers, norm, lm_head })
    }

    /// The output projection [vocab, hidden]: `lm_head.weight`, or the embeddings when tied.
    pub fn lm_head(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
    }
}

/// The shard files a `model.safetensors.index.json` lists (`weight_map` values), in order.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let bad = |message: String| LoadError::Index { path: index.to_path_buf(), message };
    let text = std::fs::read_to_string(index).map_err(|source| LoadError::Io { path: index.to_path_buf(), source })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut files: Vec<&str> = Vec::new();
    for (name, f) in map {
        let f = f.as_str().ok_or_else(|| bad(format!("`weight_map.{name}` is not a file name")))?;
        if f.contains('/') || f.contains('\\') || f == ".." {
            return Err(bad(format!("shard `{f}` is not a plain file name")));
        }
        if !files.contains(&f) {
            files.push(f);
        }
    }
    files.sort_unstable();
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

struct Reader<'a, 'b> {
    shards: &'a [SafeTensors<'b>],
    /// Tensor name → index of the shard holding it.
    names: HashMap<String, usize>,
}

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

impl Reader<'_, '_> {
    fn tensor(&self, name: &str) -> Result<safetensors::tensor::TensorView<'_>, LoadError> {
        let missing = || LoadError::Missing { name: name.into() };
        let &i = self.names.get(name).ok_or_else(missing)?;
        self.shards[i].tensor(name).map_err(|_| missing())
    }

    fn view(&self, name: &str, shape: &[usize]) -> Result<safetensors::tensor::TensorView<'_>, LoadError> {
        let t = self.tensor(name)?;
        if t.shape() != shape {
            return Err(LoadError::Shape { name: name.into(), expected: shape.to_vec(), got: t.shape().to_vec() });
        }
        Ok(t)
    }

    /// A bf16/f16/f32 tensor of the given shape, widened to f32; every value must be finite.
    fn float(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
        let t = self.view(name, shape)?;
        let d = t.data();
        let values: Vec<f32> = match t.dtype() {
            Dtype::BF16 => d.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F16 => d.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            other => return Err(LoadError::Dtype { name: name.into(), expected: "bf16, f16 or f32", got: dtype_name(other) }),
        };
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(LoadError::Value { name: name.into(), value: format!("{v} at element {i}"), problem: "weights must be finite" });
        }
        Ok(values)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f64>, LoadError> {
        Ok(self.float(name, &[len])?.into_iter().map(f64::from).collect())
    }

    /// `{prefix}.weight` (uint8 [n/4, k]) and `{prefix}.weight_scale` (one bf16/f32 value).
    fn ternary(&self, prefix: &str, n: usize, k: usize) -> Result<TernaryLinear, LoadError> {
        let name = format!("{prefix}.weight");
        let t = self.view(&name, &[n / 4, k])?;
        if t.dtype() != Dtype::U8 {
            return Err(LoadError::Dtype { name, expected: "u8 (packed ternary)", got: dtype_name(t.dtype()) });
        }
        let packed = t.data().to_vec();
        // Code 3 (bits 11) is not a ternary value: reject it rather than compute garbage.
        if let Some(b) = packed.iter().find(|&&b| (0..4).any(|q| (b >> (2 * q)) & 3 == 3)) {
            return Err(LoadError::Value { name, value: format!("byte {b:#04x}"), problem: "code 3 is not a packed ternary value" });
        }
        let sname = format!("{prefix}.weight_scale");
        let st = self.tensor(&sname)?;
        if st.shape().iter().product::<usize>() != 1 {
            return Err(LoadError::Shape { name: sname, expected: vec![1], got: st.shape().to_vec() });
        }
        let shape = st.shape().to_vec();
        let scale = self.float(&sname, &shape)?[0] as f64;
        if !scale.is_finite() || scale <= 0.0 {
            return Err(LoadError::Value { name: sname, value: scale.to_string(), problem: "a weight scale must be finite and positive" });
        }
        Ok(TernaryLinear { packed, n, k, scale })
    }
}
