//! The kernels of one decode step, loaded from the provisioned plan entries (family, M):
//! fused ternary linears per row-chunk size, the row-wise ops, and the LM head per sequence
//! count. A linear over R rows runs as launches of the largest provisioned M that fits, so an
//! M the plan left out (probe-mgt1 did not pass it) is never launched.

use std::collections::BTreeMap;

use crate::cache::CacheEntry;
use crate::gpu::{Attention, DeviceBuffer, Gpu, GpuError, LmHead, MoeCombine, RmsNormQuant, RopeKv, TernaryGemv};

/// Errors of assembling the step's kernels.
#[derive(Debug, thiserror::Error)]
pub enum KernelSetError {
    #[error("the kernel plan has no {family} kernel at M=1; provision the plan of this model first")]
    Missing { family: String },
    #[error("loading {family} M={m}: {source}")]
    Load { family: String, m: i64, source: GpuError },
}

/// A linear family: one loaded GEMV per provisioned M (index M-1).
pub struct Linear {
    by_m: Vec<Option<TernaryGemv>>,
}

impl Linear {
    /// Launches W2A8 on rows `0..rows` of `q` / `x_scale` into `y`, in chunks.
    pub fn launch(
        &mut self,
        gpu: &Gpu,
        w: &DeviceBuffer<u8>,
        rows: usize,
        q: &DeviceBuffer<i8>,
        x_scale: &DeviceBuffer<f32>,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<(), GpuError> {
        let mut row0 = 0;
        while row0 < rows {
            let left = rows - row0;
            let g = self
                .by_m
                .iter_mut()
                .take(left)
                .rev()
                .find_map(|g| g.as_mut())
                .expect("M=1 is always loaded (checked in StepKernels::load)");
            g.launch_w2a8_rows(gpu, w, q, x_scale, (row0, row0), y, 1.0)?;
            row0 += g.m;
        }
        Ok(())
    }
}

/// A dense GEMV over gathered rows (`lm_head` template) per provisioned M (index M-1).
pub struct Gathered {
    by_m: Vec<Option<LmHead>>,
}

impl Gathered {
    /// `y[i] = W x[rows[i]]` for the first `count` indices of `rows`, in launches of the largest
    /// provisioned M that fits; y is [count, N].
    pub fn launch(
        &self,
        gpu: &Gpu,
        w: &DeviceBuffer<u16>,
        x: &DeviceBuffer<f32>,
        rows: &DeviceBuffer<i32>,
        count: usize,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<(), GpuError> {
        let mut b0 = 0;
        while b0 < count {
            let g = self.by_m.iter().take(count - b0).rev().find_map(|h| h.as_ref()).expect("M=1 is always loaded");
            let (m, n) = (g.m, g.n);
            g.launch(gpu, w, x, rows.slice(b0..b0 + m), y.slice_mut(b0 * n..(b0 + m) * n))?;
            b0 += m;
        }
        Ok(())
    }
}

/// The dense MLP's kernels.
pub struct DenseMlp {
    pub gate_up: Linear,
    pub down: Linear,
    pub sub_norm: RmsNormQuant,
}

/// The MoE block's kernels: router, each pair's expert GEMVs (M=1), GLU quantization, combine.
pub struct MoeKernels {
    pub router: Gathered,
    pub gate_up: TernaryGemv,
    pub down: TernaryGemv,
    pub glu: RmsNormQuant,
    pub combine: MoeCombine,
}

/// Every kernel of a step.
pub struct StepKernels {
    pub qkv: Linear,
    pub o: Linear,
    pub norm: RmsNormQuant,
    pub attn_sub_norm: RmsNormQuant,
    pub rope: RopeKv,
    pub attention: Attention,
    /// Dense models.
    pub mlp: Option<DenseMlp>,
    /// MoE models.
    pub moe: Option<MoeKernels>,
    pub lm_head: Gathered,
}

impl StepKernels {
    /// Loads the plan's entries onto `gpu`.
    pub fn load(gpu: &Gpu, entries: &BTreeMap<(String, i64), CacheEntry>) -> Result<Self, KernelSetError> {
        let one = |family: &str| -> Result<&CacheEntry, KernelSetError> {
            entries.get(&(family.to_string(), 1)).ok_or_else(|| KernelSetError::Missing { family: family.into() })
        };
        let load_err = |family: &str, m: i64| {
            let family = family.to_string();
            move |source| KernelSetError::Load { family, m, source }
        };
        let per_m = |family: &str| -> Result<Vec<Option<&CacheEntry>>, KernelSetError> {
            one(family)?;
            Ok((1..=crate::tune::probe::MAX_GEMV_M as i64).map(|m| entries.get(&(family.to_string(), m))).collect())
        };
        let linear = |family: &str| -> Result<Linear, KernelSetError> {
            let by_m = per_m(family)?
                .into_iter()
                .enumerate()
                .map(|(i, e)| e.map(|e| TernaryGemv::new(gpu, e).map_err(load_err(family, i as i64 + 1))).transpose())
                .collect::<Result<_, _>>()?;
            Ok(Linear { by_m })
        };
        let norm = |family: &str| RmsNormQuant::new(gpu, one(family)?).map_err(load_err(family, 1));
        let gathered = |family: &str| -> Result<Gathered, KernelSetError> {
            let by_m = per_m(family)?
                .into_iter()
                .enumerate()
                .map(|(i, e)| e.map(|e| LmHead::new(gpu, e).map_err(load_err(family, i as i64 + 1))).transpose())
                .collect::<Result<_, _>>()?;
            Ok(Gathered { by_m })
        };
        let gemv = |family: &str| TernaryGemv::new(gpu, one(family)?).map_err(load_err(family, 1));
        let is_moe = entries.contains_key(&("moe_gate_up".to_string(), 1));
        Ok(Self {
            qkv: linear("attn_qkv")?,
            o: linear("attn_o")?,
            norm: norm("rmsnorm")?,
            attn_sub_norm: norm("attn_sub_norm")?,
            rope: RopeKv::new(gpu, one("rope")?).map_err(load_err("rope", 1))?,
            attention: Attention::new(gpu, one("attention")?).map_err(load_err("attention", 1))?,
            mlp: (!is_moe)
                .then(|| Ok::<_, KernelSetError>(DenseMlp { gate_up: linear("mlp_gate_up")?, down: linear("mlp_down")?, sub_norm: norm("mlp_sub_norm")? }))
                .transpose()?,
            moe: is_moe
                .then(|| {
                    Ok::<_, KernelSetError>(MoeKernels {
                        router: gathered("moe_router")?,
                        gate_up: gemv("moe_gate_up")?,
                        down: gemv("moe_down")?,
                        glu: norm("moe_glu")?,
                        combine: MoeCombine::new(gpu, one("moe_combine")?).map_err(load_err("moe_combine", 1))?,
                    })
                })
                .transpose()?,
            lm_head: gathered("lm_head")?,
        })
    }
}
