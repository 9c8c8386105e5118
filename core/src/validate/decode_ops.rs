//! Checks of the decode step's row-wise ops on fresh random inputs against the f64 references
//! of [`crate::reference::decode_ops`]: `rmsnorm_quant` (residual add or gated activation, norm,
//! per-token int8 quantization) and `attention_decode` (causal GQA over a random KV cache).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::CheckedRun;
use crate::check::{Deltas, POISON_BF16, POISON_F32};
use crate::gpu::{AttnShape, Attention, DeviceBuffer, NormShape, Gpu, GpuError, KvArena, NormOut, NormSource, RmsNormQuant, RowMeta};
use crate::reference::decode_ops::{attend_head, relu2, rmsnorm};
use crate::reference::moe::silu;

/// int8 poison of quantized outputs: a correct kernel clamps to ±127 (|q| ≤ 127 since the scale
/// maps max|x| to 127), so -128 marks an element it never wrote.
const POISON_I8: i8 = i8::MIN;



fn poison_f32(n: usize) -> Vec<f32> {
    vec![f32::from_bits(POISON_F32); n]
}

fn uniform(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// The problem `op` was built for.
pub fn norm_shape(op: &RmsNormQuant) -> NormShape {
    NormShape { h: op.h, glu: op.glu, silu: op.silu, norm: op.norm }
}

/// Random rows for one `rmsnorm_quant` kernel (its H, GLU, ACT, NORM), resident on the GPU, with
/// the f64 reference of the normalized rows and their scales.
pub struct NormCase {
    pub rows: usize,
    pub shape: NormShape,
    x0: Vec<f32>,
    /// GLU = 0: the residual add's delta and factor; GLU = 1: the fused gate|up rows and factors.
    factors: (f32, f32),
    weight: DeviceBuffer<f32>,
    eps: f32,
    x: DeviceBuffer<f32>,
    input: DeviceBuffer<f32>,
    q: DeviceBuffer<i8>,
    scale: DeviceBuffer<f32>,
    xn: DeviceBuffer<f32>,
    xb: DeviceBuffer<u16>,
    /// The row before the norm (the residual stream after the add, GLU = 0), the normalized
    /// row, and the per-row quantization scale.
    pre: Vec<f64>,
    normed: Vec<f64>,
    scales: Vec<f64>,
}

impl NormCase {
    /// Draws `rows` rows for `op`: x, delta ∈ [-2, 2) (GLU = 0) or gate|up ∈ [-3, 3) (GLU = 1),
    /// norm weights ∈ [0.5, 1.5), and computes the reference.
    pub fn new(gpu: &Gpu, shape: NormShape, rows: usize, seed: u64) -> Result<Self, GpuError> {
        let (h, glu) = (shape.h, shape.glu);
        let mut rng = StdRng::seed_from_u64(seed);
        let x0 = uniform(&mut rng, rows * h, -2.0, 2.0);
        let input = if glu { uniform(&mut rng, rows * 2 * h, -3.0, 3.0) } else { uniform(&mut rng, rows * h, -2.0, 2.0) };
        let weight = uniform(&mut rng, h, 0.5, 1.5);
        let factors = if glu { (0.9f32, 1.1f32) } else { (0.7f32, 0.0) };
        let eps = 1e-5f32;
        let act = |z: f64| if shape.silu { silu(z) } else { relu2(z) };
        let n4 = h / 4;
        let pre: Vec<f64> = (0..rows * h)
            .map(|j| {
                let (row, i) = (j / h, j % h);
                if glu {
                    // The fused gate_up GEMV's column of feature i (rmsnorm_quant.cu.tera).
                    let col = row * 2 * h + i % n4 + (i / n4) * (h / 2);
                    act(factors.0 as f64 * input[col] as f64) * (factors.1 as f64 * input[col + n4] as f64)
                } else {
                    x0[j] as f64 + factors.0 as f64 * input[j] as f64
                }
            })
            .collect();
        let normed = if shape.norm { rmsnorm(&pre, &weight.iter().map(|&w| w as f64).collect::<Vec<_>>(), eps as f64) } else { pre.clone() };
        let scales = normed.chunks_exact(h).map(|r| 127.0 / r.iter().fold(0.0f64, |a, v| a.max(v.abs())).max(1e-5)).collect();
        Ok(Self {
            rows,
            shape,
            x: gpu.upload(&x0)?,
            input: gpu.upload(&input)?,
            weight: gpu.upload(&weight)?,
            q: gpu.zeros(rows * h)?,
            scale: gpu.zeros(rows)?,
            xn: gpu.zeros(rows * h)?,
            xb: gpu.zeros(rows * h)?,
            x0,
            factors,
            eps,
            pre,
            normed,
            scales,
        })
    }

    /// Launches `op` over the first `rows` rows writing int8 rows and scales, as the decode
    /// step does (the residual add accumulates into x on every launch: for timing only).
    pub fn launch_quant(&mut self, gpu: &Gpu, op: &RmsNormQuant, rows: usize) -> Result<(), GpuError> {
        let source = norm_source(self.shape.glu, &mut self.x, &self.input, self.factors);
        op.launch(gpu, rows, source, Some(&self.weight), self.eps, NormOut::Quant { q: &mut self.q, scale: &mut self.scale })
    }

    /// Restores x, poisons every output, launches `op` once over all rows (int8 rows, scales
    /// and f32 rows) and compares: the written-back residual and the normalized rows with the
    /// reference, the scales with the reference's, and each int8 value with the rounding of the
    /// kernel's own f32 row times its scale (exact: one rounding of the same f32 product).
    pub fn run(&mut self, gpu: &Gpu, op: &RmsNormQuant, rel_floor: f64) -> Result<CheckedRun, GpuError> {
        let (rows, h) = (self.rows, self.shape.h);
        gpu.write(&self.x0, &mut self.x)?;
        gpu.write(&vec![POISON_I8; rows * h], &mut self.q)?;
        gpu.write(&poison_f32(rows), &mut self.scale)?;
        gpu.write(&poison_f32(rows * h), &mut self.xn)?;
        let source = norm_source(self.shape.glu, &mut self.x, &self.input, self.factors);
        let out = NormOut::QuantF32 { q: &mut self.q, scale: &mut self.scale, xn: &mut self.xn };
        op.launch(gpu, rows, source, Some(&self.weight), self.eps, out)?;
        gpu.sync()?;
        let (xn, scale, q) = (gpu.download(&self.xn)?, gpu.download(&self.scale)?, gpu.download(&self.q)?);
        let mut deltas = Deltas::of_f32(&xn, &self.normed, rel_floor).worst(Deltas::of_f32(&scale, &self.scales, rel_floor));
        if !self.shape.glu {
            deltas = deltas.worst(Deltas::of_f32(&gpu.download(&self.x)?, &self.pre, rel_floor));
        }
        let rounded: Vec<f64> = xn.iter().enumerate().map(|(j, &v)| (v * scale[j / h]).round_ties_even().clamp(-128.0, 127.0) as f64).collect();
        let q_deltas = Deltas::of_f64(&q.iter().map(|&v| v as f64).collect::<Vec<_>>(), &rounded, rel_floor);
        let unwritten = q.iter().filter(|&&v| v == POISON_I8).count();
        deltas = deltas.worst(Deltas { unwritten, ..q_deltas });
        // The bf16 rows (the cuBLAS LM head's input), from a second launch over the same rows:
        // the kernel's own f32 rows rounded to nearest even, so any difference is a bug.
        gpu.write(&self.x0, &mut self.x)?;
        gpu.write(&vec![POISON_BF16; rows * h], &mut self.xb)?;
        let source = norm_source(self.shape.glu, &mut self.x, &self.input, self.factors);
        op.launch(gpu, rows, source, Some(&self.weight), self.eps, NormOut::Bf16(&mut self.xb))?;
        gpu.sync()?;
        let rounded: Vec<f64> = xn.iter().map(|&v| half::bf16::from_f32(v).to_f64()).collect();
        deltas = deltas.worst(Deltas::of_bf16(&gpu.download(&self.xb)?, &rounded, rel_floor));
        Ok(CheckedRun { deltas, output: xn.iter().map(|v| v.to_bits()).collect() })
    }
}

/// The row source of a [`NormCase`]: the residual add into `x` (GLU = 0) or fused gate|up rows.
fn norm_source<'a>(glu: bool, x: &'a mut DeviceBuffer<f32>, input: &'a DeviceBuffer<f32>, (a, b): (f32, f32)) -> NormSource<'a> {
    match glu {
        true => NormSource::Glu { gate_up: input, gate: a, up: b, row_factors: None },
        false => NormSource::Residual { x, delta: input, factor: a },
    }
}

/// One attention problem resident on the GPU: a KV arena of random keys and values, query rows
/// each with its own sequence (slot) and position, and the f64 reference output.
pub struct AttentionCase {
    /// (slot, position) of every query row.
    pub rows: Vec<(usize, usize)>,
    pub arena: KvArena,
    pub q: DeviceBuffer<f32>,
    pub pos: DeviceBuffer<i32>,
    pub slot: DeviceBuffer<i32>,
    out: DeviceBuffer<f32>,
    reference: Vec<f64>,
}

impl AttentionCase {
    /// Draws queries in [-1, 1), keys in [-6, 6) (scores q·k/√HD then have a standard deviation
    /// of about 2 at any HD, so the softmax is far from uniform) and values in [-1, 1), one
    /// sequence per row: the longest context, a long one over several splits and a short one.
    /// The reference reads the keys and values as the arena stores them (rounded to bf16 for a
    /// bf16 cache), so it checks the kernel's arithmetic, not the cache's rounding.
    pub fn new(gpu: &Gpu, shape: AttnShape, seed: u64) -> Result<Self, GpuError> {
        let (qd, kvd, hd, max_pos) = (shape.q_dim(), shape.kv_dim(), shape.head_dim, shape.max_pos);
        let rows: Vec<(usize, usize)> = vec![(0, max_pos - 1), (1, (max_pos - 1).min(777)), (2, (max_pos - 1).min(3))];
        let mut rng = StdRng::seed_from_u64(seed);
        let q = uniform(&mut rng, rows.len() * qd, -1.0, 1.0);
        let key_range = 6.0f32;
        let per_slot = 2 * max_pos * kvd;
        let mut drawn = Vec::with_capacity(rows.len() * per_slot);
        for _ in &rows {
            drawn.extend(uniform(&mut rng, max_pos * kvd, -key_range, key_range));
            drawn.extend(uniform(&mut rng, max_pos * kvd, -1.0, 1.0));
        }
        let mut arena = KvArena::new(gpu, shape.kv, rows.len(), 1, max_pos, kvd)?;
        let kv = arena.write(gpu, &drawn)?;
        let group = shape.heads / shape.kv_heads;
        let mut reference = vec![0.0; rows.len() * qd];
        for (r, &(slot, pos)) in rows.iter().enumerate() {
            let keys = &kv[slot * per_slot..][..max_pos * kvd];
            let values = &kv[slot * per_slot + max_pos * kvd..][..max_pos * kvd];
            for head in 0..shape.heads {
                let kvh = head / group;
                let qh: Vec<f64> = q[r * qd + head * hd..][..hd].iter().map(|&v| v as f64).collect();
                let k = |p: usize| &keys[p * kvd + kvh * hd..][..hd];
                let v = |p: usize| &values[p * kvd + kvh * hd..][..hd];
                attend_head(&qh, pos + 1, k, v, &mut reference[r * qd + head * hd..][..hd]);
            }
        }
        Ok(Self {
            pos: gpu.upload(&rows.iter().map(|&(_, p)| p as i32).collect::<Vec<_>>())?,
            slot: gpu.upload(&rows.iter().map(|&(s, _)| s as i32).collect::<Vec<_>>())?,
            q: gpu.upload(&q)?,
            out: gpu.upload(&poison_f32(rows.len() * qd))?,
            rows,
            arena,
            reference,
        })
    }

    /// Poisons the output, launches `op` over every row (with a fresh split-K workspace) and
    /// compares with the reference.
    pub fn run(&mut self, gpu: &Gpu, op: &Attention, rel_floor: f64) -> Result<CheckedRun, GpuError> {
        let mut scratch = op.scratch(gpu, self.rows.len())?;
        gpu.write(&poison_f32(self.out.len()), &mut self.out)?;
        let meta = RowMeta { pos: &self.pos, slot: &self.slot };
        op.launch(gpu, self.rows.len(), &self.q, &meta, &self.arena, 0, &mut self.out, &mut scratch)?;
        gpu.sync()?;
        let out = gpu.download(&self.out)?;
        Ok(CheckedRun { deltas: Deltas::of_f32(&out, &self.reference, rel_floor), output: out.iter().map(|v| v.to_bits()).collect() })
    }
}

/// Checks an `rmsnorm_quant` entry over 3 random rows.
pub fn check_rmsnorm_quant(gpu: &Gpu, entry: &crate::cache::CacheEntry, seed: u64, rel_floor: f64) -> Result<CheckedRun, GpuError> {
    let op = RmsNormQuant::new(gpu, entry)?;
    NormCase::new(gpu, norm_shape(&op), 3, seed)?.run(gpu, &op, rel_floor)
}

/// Checks an `attention_decode` entry on three sequences (full, long and short context).
pub fn check_attention(gpu: &Gpu, entry: &crate::cache::CacheEntry, seed: u64, rel_floor: f64) -> Result<CheckedRun, GpuError> {
    let op = Attention::new(gpu, entry)?;
    AttentionCase::new(gpu, op.shape, seed)?.run(gpu, &op, rel_floor)
}
