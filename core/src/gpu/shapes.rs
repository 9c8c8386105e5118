//! The problems of the row-wise decode ops as types, read from a kernel's template parameters
//! in one place: the loaders ([`super::RmsNormQuant`], [`super::RopeKv`], [`super::Attention`])
//! size their launches and workspaces from them, and the validators and tuner workloads build
//! their inputs from the same values.

use crate::template::Params;

use super::GpuError;

/// Reads integer parameter `name` of `template`'s `params`; `default` when absent (None: required).
fn param(template: &str, params: &Params, name: &str, default: Option<usize>) -> Result<usize, GpuError> {
    match params.get(name) {
        Some(&v) => usize::try_from(v).map_err(|_| GpuError::Shape { kernel: template.into(), what: format!("parameter {name}={v} is negative") }),
        None => default.ok_or_else(|| GpuError::Shape { kernel: template.into(), what: format!("entry has no parameter {name}") }),
    }
}

/// The problem of an `rmsnorm_quant` kernel: width, gated input, SiLU (else ReLU²), norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormShape {
    pub h: usize,
    pub glu: bool,
    pub silu: bool,
    pub norm: bool,
}

impl NormShape {
    /// From template parameters H, GLU, and ACT and NORM (0 and 1 when absent).
    pub fn from_params(p: &Params) -> Result<Self, GpuError> {
        let get = |name, default| param("rmsnorm_quant", p, name, default);
        Ok(Self { h: get("H", None)?, glu: get("GLU", None)? == 1, silu: get("ACT", Some(0))? == 1, norm: get("NORM", Some(1))? == 1 })
    }
}

/// The element type of the KV cache: the `KV_BF16` parameter of `rope_kv`, `attention_decode`
/// and `decode_layer`, and of the [`super::KvArena`] they share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvDtype {
    /// f32: exact, twice the bytes.
    F32,
    /// bf16, rounded to nearest even as stored (vLLM's default for bf16 models).
    #[default]
    Bf16,
}

impl KvDtype {
    /// The template parameter that selects it.
    pub const PARAM: &'static str = "KV_BF16";

    /// Its value of [`Self::PARAM`].
    pub fn param(self) -> i64 {
        i64::from(self == KvDtype::Bf16)
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
        }
    }

    /// The name users type and logs print: `f32` or `bf16`.
    pub fn as_str(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::Bf16 => "bf16",
        }
    }

    /// The value a store then a load gives back (f64 references of a bf16 cache use it).
    pub fn round(self, v: f32) -> f32 {
        match self {
            KvDtype::F32 => v,
            KvDtype::Bf16 => half::bf16::from_f32(v).to_f32(),
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;

    /// `bf16` (also `bfloat16`, `auto`) or `f32` (also `float32`, `float`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" | "auto" => Ok(KvDtype::Bf16),
            "f32" | "float32" | "float" => Ok(KvDtype::F32),
            other => Err(format!("unknown KV-cache dtype {other:?}: expected bf16 (auto) or f32")),
        }
    }
}

/// The problem of the attention-side ops (`rope_kv`, `attention_decode`): GQA heads, head size,
/// the positions a KV-cache slot holds and the cache's element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub max_pos: usize,
    pub kv: KvDtype,
}

impl AttnShape {
    /// From template parameters QH, KVH, HD, MAX_POS and KV_BF16 (1 when absent, the templates'
    /// default) of `template`.
    pub fn from_params(template: &str, p: &Params) -> Result<Self, GpuError> {
        let get = |name, default| param(template, p, name, default);
        let kv = match get(KvDtype::PARAM, Some(1))? {
            0 => KvDtype::F32,
            1 => KvDtype::Bf16,
            v => return Err(GpuError::Shape { kernel: template.into(), what: format!("parameter {}={v} is not 0 or 1", KvDtype::PARAM) }),
        };
        Ok(Self { heads: get("QH", None)?, kv_heads: get("KVH", None)?, head_dim: get("HD", None)?, max_pos: get("MAX_POS", None)?, kv })
    }

    /// Query row width: heads × head_dim.
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Key (and value) row width: kv_heads × head_dim.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// The problem and split of a ternary GEMV kernel (`ternary_gemv`, `ternary_gemv_w2a8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemvShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// K-splits whose partials the workspace holds.
    pub split_k: usize,
    /// W2A8 only: f32 outputs instead of bf16.
    pub out_f32: bool,
}

impl GemvShape {
    /// From template parameters M, N, K, SPLIT_K and OUT_F32 (0 when absent).
    pub fn from_params(template: &str, p: &Params) -> Result<Self, GpuError> {
        let get = |name, default| param(template, p, name, default);
        Ok(Self { m: get("M", None)?, n: get("N", None)?, k: get("K", None)?, split_k: get("SPLIT_K", None)?, out_f32: get("OUT_F32", Some(0))? == 1 })
    }
}

/// Another parameter of a cache entry the host needs (attention's SPLITS sizes its workspace,
/// the LM head's M/N/K its launches, the MoE kernels' sizes their routing buffers).
pub(crate) fn entry_param(entry: &crate::cache::CacheEntry, name: &str) -> Result<usize, GpuError> {
    param(&entry.inputs.template, &entry.inputs.params, name, None)
}

/// The problem of a `decode_layer` kernel: a dense decoder layer's widths and attention shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerShape {
    pub hidden: usize,
    pub inter: usize,
    pub attn: AttnShape,
    /// The MLP activation is SiLU (else ReLU²).
    pub silu: bool,
}

impl LayerShape {
    /// From template parameters H, I, QH, KVH, HD, MAX_POS, ACT.
    pub fn from_params(p: &Params) -> Result<Self, GpuError> {
        let get = |name| param("decode_layer", p, name, None);
        Ok(Self { hidden: get("H")?, inter: get("I")?, attn: AttnShape::from_params("decode_layer", p)?, silu: get("ACT")? == 1 })
    }
}
