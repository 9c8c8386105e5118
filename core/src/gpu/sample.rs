//! Host side of `sample_tokens`: each sequence's next token drawn on the GPU from its logits row
//! (rules: [`crate::reference::sampling`]), so a decode step downloads token ids, not logits.

use super::ops::load_checked;
use super::shapes::entry_param;
use super::{check_at_least as need, Args, DeviceBuffer, Gpu, GpuError, LoadedKernel};
use crate::cache::CacheEntry;

/// A loaded `sample_tokens` kernel for a vocabulary of `v`.
pub struct SampleTokens {
    kernel: LoadedKernel,
    pub v: usize,
}

impl SampleTokens {
    pub fn new(gpu: &Gpu, entry: &CacheEntry) -> Result<Self, GpuError> {
        let kernel = load_checked(gpu, entry, "sample_tokens")?;
        Ok(Self { v: entry_param(entry, "V")?, kernel })
    }

    /// `out[s]` = the token drawn for sequence s < `seqs` from `logits` [seqs, V] with its
    /// `rules` row [4 f32: temperature, top_p, min_p, top_k] and uniform `u[s]` ∈ [0, 1).
    pub fn launch(
        &self,
        gpu: &Gpu,
        seqs: usize,
        logits: &DeviceBuffer<f32>,
        rules: &DeviceBuffer<f32>,
        u: &DeviceBuffer<f64>,
        out: &mut DeviceBuffer<i32>,
    ) -> Result<(), GpuError> {
        let name = self.kernel.name.as_str();
        need(name, "logits", logits.len(), seqs * self.v)?;
        need(name, "rules", rules.len(), seqs * 4)?;
        need(name, "u", u.len(), seqs)?;
        need(name, "out", out.len(), seqs)?;
        let cfg = self.kernel.config_rows(seqs)?;
        let mut b = Args::new(gpu);
        b.arg(logits).arg(rules).arg(u).arg(out);
        // SAFETY: arguments follow sample_tokens.cu.tera (logits, params, u, out); every buffer
        // holds the seqs rows the launch (grid.y = seqs) reads or writes, checked above.
        unsafe { self.kernel.launch(cfg, &mut b) }?;
        Ok(())
    }
}
