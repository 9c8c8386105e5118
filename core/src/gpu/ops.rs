//! Host side of the decode-step op templates (`rmsnorm_quant`, `rope_kv`, `attention_decode`,
//! `lm_head`): typed argument lists, buffer checks and launches. The row-wise ops run one block
//! row per token: the host puts the launch's row count on grid.y.

use cudarc::driver::{CudaView, CudaViewMut};

use super::shapes::{entry_param, AttnShape, KvDtype, NormShape};
use super::{check_at_least as need, Args, DeviceBuffer, Gpu, GpuError, LoadedKernel, Null};
use crate::cache::CacheEntry;

fn shape_err(kernel: &str, what: String) -> GpuError {
    GpuError::Shape { kernel: kernel.into(), what }
}

pub(crate) fn load_checked(gpu: &Gpu, entry: &CacheEntry, template: &str) -> Result<LoadedKernel, GpuError> {
    if entry.inputs.template != template {
        return Err(shape_err(&entry.inputs.template, format!("not a {template} kernel")));
    }
    gpu.load(entry)
}

/// Where the rows an [`RmsNormQuant`] normalizes come from; `x` is the f32 residual stream or
/// input rows [rows, H].
pub enum NormSource<'a> {
    /// `x[r] = embed[tokens[r]]` (bf16 table [vocab, H]), written to the residual stream.
    Embed { x: &'a mut DeviceBuffer<f32>, tokens: &'a DeviceBuffer<i32>, table: &'a DeviceBuffer<u16> },
    /// The rows of `x` as they are.
    Rows { x: &'a DeviceBuffer<f32> },
    /// `x[r] += factor * delta[r]` (f32 [rows, H]), written back: the residual add.
    Residual { x: &'a mut DeviceBuffer<f32>, delta: &'a DeviceBuffer<f32>, factor: f32 },
    /// `act(gate * g) * (up * u)` from a fused gate_up output (f32 [rows, 2H]).
    /// `row_factors` [rows, 2], when given, replace (gate, up) per row.
    Glu { gate_up: &'a DeviceBuffer<f32>, gate: f32, up: f32, row_factors: Option<&'a DeviceBuffer<f32>> },
}

/// Where an [`RmsNormQuant`] writes.
pub enum NormOut<'a> {
    /// int8 rows [rows, H] and their scales [rows]: the next ternary linear's activations.
    Quant { q: &'a mut DeviceBuffer<i8>, scale: &'a mut DeviceBuffer<f32> },
    /// f32 normalized rows [rows, H].
    F32(&'a mut DeviceBuffer<f32>),
    /// Both: the int8 rows with their scales and the f32 rows (MoE: experts and router).
    QuantF32 { q: &'a mut DeviceBuffer<i8>, scale: &'a mut DeviceBuffer<f32>, xn: &'a mut DeviceBuffer<f32> },
    /// bf16 normalized rows [rows, H] (bits; round to nearest even): the cuBLAS LM head's input.
    Bf16(&'a mut DeviceBuffer<u16>),
}

/// A loaded `rmsnorm_quant` kernel.
pub struct RmsNormQuant {
    kernel: LoadedKernel,
    pub h: usize,
    pub glu: bool,
    /// False: rows are only quantized (no normalization; the weight is not read).
    pub norm: bool,
    /// The GLU activation is SiLU (else squared ReLU).
    pub silu: bool,
}

impl RmsNormQuant {
    pub fn new(gpu: &Gpu, entry: &CacheEntry) -> Result<Self, GpuError> {
        let kernel = load_checked(gpu, entry, "rmsnorm_quant")?;
        let NormShape { h, glu, silu, norm } = NormShape::from_params(&entry.inputs.params)?;
        Ok(Self { h, glu, norm, silu, kernel })
    }

    /// Normalizes `rows` rows of `source` with `weight` [H] (None for a kernel built without
    /// the norm: NORM=0 only quantizes).
    pub fn launch(
        &self,
        gpu: &Gpu,
        rows: usize,
        source: NormSource,
        weight: Option<&DeviceBuffer<f32>>,
        eps: f32,
        out: NormOut,
    ) -> Result<(), GpuError> {
        let (name, h) = (self.kernel.name.as_str(), self.h);
        match weight {
            Some(w) => need(name, "weight", w.len(), h)?,
            None if self.norm => return Err(shape_err(name, "a NORM=1 kernel needs the norm weight".into())),
            None => {}
        }
        if self.glu != matches!(source, NormSource::Glu { .. }) {
            return Err(shape_err(name, format!("GLU={} kernel given the wrong row source", self.glu as u8)));
        }
        let null = Null;
        let (zero, one) = (0f32, 1f32);
        let cfg = self.kernel.config_rows(rows)?;
        let mut b = Args::new(gpu);
        match source {
            NormSource::Embed { x, tokens, table } => {
                need(name, "x", x.len(), rows * h)?;
                need(name, "tokens", tokens.len(), rows)?;
                b.arg(x).arg(tokens).arg(table).arg(&null).arg(&zero).arg(&null).arg(&one).arg(&one).arg(&null);
            }
            NormSource::Rows { x } => {
                need(name, "x", x.len(), rows * h)?;
                b.arg(x).arg(&null).arg(&null).arg(&null).arg(&zero).arg(&null).arg(&one).arg(&one).arg(&null);
            }
            NormSource::Residual { x, delta, factor } => {
                need(name, "x", x.len(), rows * h)?;
                need(name, "delta", delta.len(), rows * h)?;
                b.arg(x).arg(&null).arg(&null).arg(delta).arg(&factor).arg(&null).arg(&one).arg(&one).arg(&null);
            }
            NormSource::Glu { gate_up, gate, up, row_factors } => {
                need(name, "gate_up", gate_up.len(), rows * 2 * h)?;
                b.arg(&null).arg(&null).arg(&null).arg(&null).arg(&zero).arg(gate_up).arg(&gate).arg(&up);
                match row_factors {
                    Some(f) => {
                        need(name, "row_factors", f.len(), rows * 2)?;
                        b.arg(f);
                    }
                    None => {
                        b.arg(&null);
                    }
                }
            }
        }
        match weight {
            Some(w) => b.arg(w),
            None => b.arg(&null),
        };
        b.arg(&eps);
        match out {
            NormOut::Quant { q, scale } => {
                need(name, "q", q.len(), rows * h)?;
                need(name, "x_scale", scale.len(), rows)?;
                b.arg(q).arg(scale).arg(&null).arg(&null);
            }
            NormOut::F32(xn) => {
                need(name, "xn", xn.len(), rows * h)?;
                b.arg(&null).arg(&null).arg(xn).arg(&null);
            }
            NormOut::QuantF32 { q, scale, xn } => {
                need(name, "q", q.len(), rows * h)?;
                need(name, "x_scale", scale.len(), rows)?;
                need(name, "xn", xn.len(), rows * h)?;
                b.arg(q).arg(scale).arg(xn).arg(&null);
            }
            NormOut::Bf16(xb) => {
                need(name, "xb", xb.len(), rows * h)?;
                b.arg(&null).arg(&null).arg(&null).arg(xb);
            }
        }
        // SAFETY: the arguments follow rmsnorm_quant.cu.tera's signature (x, tokens, embed, delta,
        // delta_factor, gu, gate_factor, up_factor, row_factors, weight, eps, q, x_scale, xn, xb); absent pointers
        // are null, which the kernel tests before use (x is not read with GLU=1, nor the weight
        // with NORM=0); every present buffer holds the rows × H
        // elements the launch touches (checked above), and embedding ids were range-checked by the caller.
        unsafe { self.kernel.launch(cfg, &mut b) }?;
        Ok(())
    }
}

/// Per-row metadata of a step on the device: position and KV slot of each token row.
pub struct RowMeta<'a> {
    pub pos: &'a DeviceBuffer<i32>,
    pub slot: &'a DeviceBuffer<i32>,
}

/// The KV cache's device memory, by element type.
enum KvStore {
    F32(DeviceBuffer<f32>),
    Bf16(DeviceBuffer<u16>),
}

/// The KV cache arena: [slots][layers][2][max_pos][kv_dim] elements of [`KvDtype`].
pub struct KvArena {
    store: KvStore,
    pub slots: usize,
    pub layers: usize,
    pub max_pos: usize,
    pub kv_dim: usize,
}

impl KvArena {
    /// Allocates `slots` sequences of `max_pos` positions of `dtype` (zeroed).
    pub fn new(gpu: &Gpu, dtype: KvDtype, slots: usize, layers: usize, max_pos: usize, kv_dim: usize) -> Result<Self, GpuError> {
        let n = slots * layers * 2 * max_pos * kv_dim;
        let store = match dtype {
            KvDtype::F32 => KvStore::F32(gpu.zeros(n)?),
            KvDtype::Bf16 => KvStore::Bf16(gpu.zeros(n)?),
        };
        Ok(Self { store, slots, layers, max_pos, kv_dim })
    }

    /// The element type.
    pub fn dtype(&self) -> KvDtype {
        match self.store {
            KvStore::F32(_) => KvDtype::F32,
            KvStore::Bf16(_) => KvDtype::Bf16,
        }
    }

    /// Elements in the arena.
    pub fn len(&self) -> usize {
        self.slots * self.layers * 2 * self.max_pos * self.kv_dim
    }

    /// Whether the arena holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Device bytes of the arena.
    pub fn bytes(&self) -> usize {
        self.len() * self.dtype().bytes()
    }

    /// Overwrites the whole arena with `values` (in layout order), rounded to its element type;
    /// returns the values as stored, for references.
    pub fn write(&mut self, gpu: &Gpu, values: &[f32]) -> Result<Vec<f32>, GpuError> {
        if values.len() != self.len() {
            return Err(shape_err("kv arena", format!("{} values for {} elements", values.len(), self.len())));
        }
        match &mut self.store {
            KvStore::F32(b) => {
                gpu.write(values, b)?;
                Ok(values.to_vec())
            }
            KvStore::Bf16(b) => {
                let bits: Vec<u16> = values.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
                gpu.write(&bits, b)?;
                Ok(bits.iter().map(|&u| half::bf16::from_bits(u).to_f32()).collect())
            }
        }
    }

    /// Appends the arena's device address to a launch's arguments (callers that write to it
    /// hold it mutably).
    pub(crate) fn arg(&self, b: &mut Args) {
        match &self.store {
            KvStore::F32(d) => b.arg(d),
            KvStore::Bf16(d) => b.arg(d),
        };
    }
}

/// Fails unless `kv` has the positions, width and element type kernel `name` was built for.
pub(crate) fn check_arena(name: &str, kv: &KvArena, shape: &AttnShape) -> Result<(), GpuError> {
    let (max_pos, kv_dim) = (shape.max_pos, shape.kv_dim());
    if kv.max_pos != max_pos || kv.kv_dim != kv_dim || kv.dtype() != shape.kv {
        return Err(shape_err(
            name,
            format!(
                "KV arena has {} positions × {} features of {}, the kernel was built for {max_pos} × {kv_dim} of {}",
                kv.max_pos,
                kv.kv_dim,
                kv.dtype().as_str(),
                shape.kv.as_str()
            ),
        ));
    }
    Ok(())
}

/// A loaded `rope_kv` kernel.
pub struct RopeKv {
    kernel: LoadedKernel,
    pub shape: AttnShape,
}

impl RopeKv {
    pub fn new(gpu: &Gpu, entry: &CacheEntry) -> Result<Self, GpuError> {
        let kernel = load_checked(gpu, entry, "rope_kv")?;
        let shape = AttnShape::from_params("rope_kv", &entry.inputs.params)?;
        Ok(Self { shape, kernel })
    }

    /// Scales and rotates `rows` rows of the fused `qkv` output into `q`; appends K, V to `kv`.
    #[allow(clippy::too_many_arguments)] // the kernel's argument list, named
    pub fn launch(
        &self,
        gpu: &Gpu,
        rows: usize,
        qkv: &DeviceBuffer<f32>,
        factors: [f32; 3],
        meta: &RowMeta,
        kv: &mut KvArena,
        layer: usize,
        theta: f32,
        q: &mut DeviceBuffer<f32>,
    ) -> Result<(), GpuError> {
        let name = self.kernel.name.as_str();
        let (qd, kvd) = (self.shape.q_dim(), self.shape.kv_dim());
        check_arena(name, kv, &self.shape)?;
        need(name, "qkv", qkv.len(), rows * (qd + 2 * kvd))?;
        need(name, "q", q.len(), rows * qd)?;
        need(name, "pos", meta.pos.len(), rows)?;
        need(name, "slot", meta.slot.len(), rows)?;
        let (layers, layer) = (kv.layers as i32, layer as i32);
        let cfg = self.kernel.config_rows(rows)?;
        let mut b = Args::new(gpu);
        b.arg(qkv).arg(&factors[0]).arg(&factors[1]).arg(&factors[2]).arg(meta.pos).arg(meta.slot);
        kv.arg(&mut b);
        b.arg(&layers).arg(&layer).arg(&theta).arg(q);
        // SAFETY: arguments follow rope_kv.cu.tera (qkv, fq, fk, fv, pos, slot, kv, layers, layer,
        // theta, qout); buffer sizes are checked above and the arena's shape matches the kernel's;
        // the caller guarantees pos < max_pos and slot < slots for every row (RowMeta contract).
        unsafe { self.kernel.launch(cfg, &mut b) }?;
        Ok(())
    }
}

/// A loaded `attention_decode` kernel.
pub struct Attention {
    kernel: LoadedKernel,
    pub shape: AttnShape,
    /// Blocks per (row, head) over the positions.
    pub splits: usize,
}

/// Split-K workspace of [`Attention`]: per (row, head, split) the max, sum and value sum;
/// per (row, head) a counter (zero between launches).
pub struct AttnScratch {
    pub partial: DeviceBuffer<f32>,
    pub counters: DeviceBuffer<u32>,
}

impl Attention {
    pub fn new(gpu: &Gpu, entry: &CacheEntry) -> Result<Self, GpuError> {
        let kernel = load_checked(gpu, entry, "attention_decode")?;
        let p = &entry.inputs.params;
        Ok(Self { shape: AttnShape::from_params("attention_decode", p)?, splits: entry_param(entry, "SPLITS")?, kernel })
    }

    /// A zeroed split-K workspace for launches of up to `rows` rows.
    pub fn scratch(&self, gpu: &Gpu, rows: usize) -> Result<AttnScratch, GpuError> {
        let rh = rows.max(1) * self.shape.heads;
        Ok(AttnScratch { partial: gpu.zeros(rh * self.splits * (self.shape.head_dim + 2))?, counters: gpu.zeros(rh)? })
    }

    /// Attention of `rows` query rows `q` [rows, QD] over their sequences → `out` [rows, QD].
    #[allow(clippy::too_many_arguments)] // the kernel's argument list, named
    pub fn launch(
        &self,
        gpu: &Gpu,
        rows: usize,
        q: &DeviceBuffer<f32>,
        meta: &RowMeta,
        kv: &KvArena,
        layer: usize,
        out: &mut DeviceBuffer<f32>,
        scratch: &mut AttnScratch,
    ) -> Result<(), GpuError> {
        let name = self.kernel.name.as_str();
        let AttnShape { heads, head_dim, .. } = self.shape;
        let qd = self.shape.q_dim();
        check_arena(name, kv, &self.shape)?;
        need(name, "q", q.len(), rows * qd)?;
        need(name, "out", out.len(), rows * qd)?;
        need(name, "partial", scratch.partial.len(), rows * heads * self.splits * (head_dim + 2))?;
        need(name, "counters", scratch.counters.len(), rows * heads)?;
        need(name, "pos", meta.pos.len(), rows)?;
        need(name, "slot", meta.slot.len(), rows)?;
        let (layers, layer) = (kv.layers as i32, layer as i32);
        let cfg = self.kernel.config_rows(rows)?;
        let mut b = Args::new(gpu);
        b.arg(q).arg(meta.pos).arg(meta.slot);
        kv.arg(&mut b);
        b.arg(&layers).arg(&layer).arg(out);
        b.arg(&mut scratch.partial).arg(&mut scratch.counters);
        // SAFETY: arguments follow attention_decode.cu.tera (q, pos, slot, kv, layers, layer, out,
        // partial, counters); sizes checked above; pos < max_pos and slot < slots per the RowMeta
        // contract; counters are zero between launches (the last split resets them); the dynamic
        // shared memory was opted in at load when above 48 KB.
        unsafe { self.kernel.launch(cfg, &mut b) }?;
        Ok(())
    }
}

/// A loaded `lm_head` kernel for M gathered rows.
pub struct LmHead {
    kernel: LoadedKernel,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

impl LmHead {
    pub fn new(gpu: &Gpu, entry: &CacheEntry) -> Result<Self, GpuError> {
        let kernel = load_checked(gpu, entry, "lm_head")?;
        Ok(Self { m: entry_param(entry, "M")?, n: entry_param(entry, "N")?, k: entry_param(entry, "K")?, kernel })
    }

    /// `y[i] = W x[rows[i]]` for the M row indices `rows` (into `x` [*, K] f32) → `y` [M, N].
    pub fn launch(
        &self,
        gpu: &Gpu,
        w: &DeviceBuffer<u16>,
        x: &DeviceBuffer<f32>,
        rows: CudaView<i32>,
        mut y: CudaViewMut<f32>,
    ) -> Result<(), GpuError> {
        let name = self.kernel.name.as_str();
        need(name, "w", w.len(), self.n * self.k)?;
        need(name, "rows", rows.len(), self.m)?;
        need(name, "y", y.len(), self.m * self.n)?;
        need(name, "x", x.len(), self.k)?;
        let cfg = self.kernel.config();
        let mut b = Args::new(gpu);
        b.arg(w).arg(x).arg(&rows).arg(&mut y);
        // SAFETY: arguments follow lm_head.cu.tera (w, x, rows, y); sizes checked above; every
        // row index points inside x (the caller gathers rows of the step it just computed).
        unsafe { self.kernel.launch(cfg, &mut b) }?;
        Ok(())
    }
}

