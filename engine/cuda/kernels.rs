//! The kernels of one decode step, loaded from the provisioned plan entries (family, M):
//! fused ternary linears per row-chunk size, the row-wise ops, and the LM head per sequence
//! count. A linear over R rows runs as launches of the largest provisioned M that fits, so an
//! M the plan left out (probe-mgt1 did not pass it) is never launched.

use std::collections::BTreeMap;

use crate::cache::CacheEntry;
use crate::gpu::{Attention, DeviceBuffer, Gpu, GpuError, LmHead, RmsNormQuant, RopeKv, TernaryGemv};

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
            g.launch_w2a8_rows(gpu, w, q, x_scale, y, row0, 1.0)?;
            row0 += g.m;
        }
        Ok(())
    }
}

/// Every kernel of a step.
pub struct StepKernels {
    pub qkv: Linear,
    pub o: Linear,
    pub gate_up: Linear,
    pub down: Linear,
    pub norm: RmsNormQuant,
    pub attn_sub_norm: RmsNormQuant,
    pub mlp_sub_norm: RmsNormQuant,
    pub rope: RopeKv,
    pub attention: Attention,
    /// Index M-1.
    pub lm_head: Vec<Option<LmHead>>,
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
        Ok(Self {
            qkv: linear("attn_qkv")?,
            o: linear("attn_o")?,
            gate_up: linear("mlp_gate_up")?,
            down: linear("mlp_down")?,
            norm: norm("rmsnorm")?,
            attn_sub_norm: norm("attn_sub_norm")?,
            mlp_sub_norm: norm("mlp_sub_norm")?,
            rope: RopeKv::new(gpu, one("rope")?).map_err(load_err("rope", 1))?,
            attention: Attention::new(gpu, one("attention")?).map_err(load_err("attention", 1))?,
            lm_head: per_m("lm_head")?
                .into_iter()
                .enumerate()
                .map(|(i, e)| e.map(|e| LmHead::new(gpu, e).map_err(load_err("lm_head", i as i64 + 1))).transpose())
                .collect::<Result<_, _>>()?,
        })
    }
}
