//! The fused batch-1 decoder layer (`decode_layer`): one persistent launch per layer for a
//! decode step of one token row. Its grid barriers need every block resident at once, so
//! loading refuses a kernel whose BLOCKS this device cannot hold together (the engine then runs
//! the unfused step).

use super::launch::Args;
use super::ops::{check_arena, load_checked, KvArena, RowMeta};
use super::shapes::LayerShape;
use super::{check_at_least as need, DeviceBuffer, Gpu, GpuError, LoadedKernel};
use crate::cache::CacheEntry;

/// One layer's weights as the fused kernel reads them (the CUDA engine's device layout).
pub struct LayerWeights<'a> {
    /// Packed q|k|v [(QD + 2 KVD) / 4, H], o [H / 4, QD], gate|up [2 I / 4, H], down [H / 4, I].
    pub qkv: &'a DeviceBuffer<u8>,
    pub o: &'a DeviceBuffer<u8>,
    pub gate_up: &'a DeviceBuffer<u8>,
    pub down: &'a DeviceBuffer<u8>,
    /// f32 norm weights: input [H], attention sub-norm [QD], post-attention [H], MLP sub-norm [I].
    pub input_norm: &'a DeviceBuffer<f32>,
    pub attn_sub_norm: &'a DeviceBuffer<f32>,
    pub post_attn_norm: &'a DeviceBuffer<f32>,
    pub ffn_sub_norm: &'a DeviceBuffer<f32>,
    /// Output factors of q, k, v, o, gate, up, down.
    pub factors: [f32; 7],
}

/// The kernel's cross-block buffers: q|k|v outputs, attention partials, gate|up outputs and the
/// grid barrier's two counters (zero before the first launch; each launch leaves them reusable).
pub struct LayerScratch {
    qkv: DeviceBuffer<f32>,
    partial: DeviceBuffer<f32>,
    gate_up: DeviceBuffer<f32>,
    barrier: DeviceBuffer<u32>,
}

/// A loaded `decode_layer` kernel.
pub struct DecodeLayer {
    kernel: LoadedKernel,
    pub shape: LayerShape,
    /// Blocks of the persistent grid.
    pub blocks: usize,
}

impl DecodeLayer {
    /// Loads a `decode_layer` entry; fails when its BLOCKS blocks cannot all be resident on `gpu`.
    pub fn new(gpu: &Gpu, entry: &CacheEntry) -> Result<Self, GpuError> {
        let kernel = load_checked(gpu, entry, "decode_layer")?;
        let shape = LayerShape::from_params(&entry.inputs.params)?;
        let blocks = kernel.launch.grid[0] as usize;
        let per_sm = kernel
            .func
            .occupancy_max_active_blocks_per_multiprocessor(kernel.launch.block[0], kernel.launch.shared_bytes as usize, None)
            .map_err(super::driver_err("occupancy of decode_layer"))?;
        let fit = per_sm as usize * gpu.info().sm_count.max(0) as usize;
        if fit < blocks {
            return Err(GpuError::NotCoResident { kernel: kernel.name.clone(), blocks, fit });
        }
        Ok(Self { kernel, shape, blocks })
    }

    /// Zeroed cross-block buffers for this kernel.
    pub fn scratch(&self, gpu: &Gpu) -> Result<LayerScratch, GpuError> {
        let (s, a) = (&self.shape, &self.shape.attn);
        Ok(LayerScratch {
            qkv: gpu.zeros(a.q_dim() + 2 * a.kv_dim())?,
            partial: gpu.zeros(self.blocks * (a.head_dim + 2))?,
            gate_up: gpu.zeros(2 * s.inter)?,
            barrier: gpu.zeros(2)?,
        })
    }

    /// Runs layer `layer` for the one token row described by `meta` (row 0): reads and updates
    /// the residual row `x` [H], appends the row's k and v to the KV cache.
    #[allow(clippy::too_many_arguments)] // the layer's parts, named
    pub fn launch(
        &self,
        gpu: &Gpu,
        x: &mut DeviceBuffer<f32>,
        w: &LayerWeights,
        (eps, theta): (f32, f32),
        meta: &RowMeta,
        kv: &mut KvArena,
        layer: usize,
        scratch: &mut LayerScratch,
    ) -> Result<(), GpuError> {
        let (s, a) = (&self.shape, &self.shape.attn);
        let name = self.kernel.name.as_str();
        let (h, i, qd, kvd) = (s.hidden, s.inter, a.q_dim(), a.kv_dim());
        check_arena(name, kv, a)?;
        need(name, "x", x.len(), h)?;
        need(name, "qkv weight", w.qkv.len(), (qd + 2 * kvd) / 4 * h)?;
        need(name, "o weight", w.o.len(), h / 4 * qd)?;
        need(name, "gate_up weight", w.gate_up.len(), 2 * i / 4 * h)?;
        need(name, "down weight", w.down.len(), h / 4 * i)?;
        need(name, "input norm", w.input_norm.len(), h)?;
        need(name, "attention sub-norm", w.attn_sub_norm.len(), qd)?;
        need(name, "post-attention norm", w.post_attn_norm.len(), h)?;
        need(name, "MLP sub-norm", w.ffn_sub_norm.len(), i)?;
        need(name, "pos", meta.pos.len(), 1)?;
        need(name, "slot", meta.slot.len(), 1)?;
        let (layers, layer) = (kv.layers as i32, layer as i32);
        let [fq, fk, fv, fo, fg, fu, fd] = w.factors;
        let mut b = Args::new(gpu);
        b.arg(x).arg(w.qkv).arg(w.o).arg(w.gate_up).arg(w.down);
        b.arg(w.input_norm).arg(w.attn_sub_norm).arg(w.post_attn_norm).arg(w.ffn_sub_norm);
        b.arg(&fq).arg(&fk).arg(&fv).arg(&fo).arg(&fg).arg(&fu).arg(&fd).arg(&eps).arg(&theta);
        b.arg(meta.pos).arg(meta.slot);
        kv.arg(&mut b);
        b.arg(&layers).arg(&layer);
        b.arg(&mut scratch.qkv).arg(&mut scratch.partial).arg(&mut scratch.gate_up).arg(&mut scratch.barrier);
        // SAFETY: arguments follow decode_layer.cu.tera's signature; every buffer's length is
        // checked above against the shape the kernel was built for (scratch comes from
        // `scratch()` of this kernel); the arena's shape matches; the caller guarantees
        // pos < max_pos and slot < slots (RowMeta contract). All BLOCKS blocks fit at once
        // (checked in `new`), so the grid barriers complete.
        unsafe { self.kernel.launch(self.kernel.config(), &mut b) }
    }
}
