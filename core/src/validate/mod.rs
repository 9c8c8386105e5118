//! Runs a kernel on fresh random inputs and holds it to the CPU reference: the one
//! correctness check shared by the GPU tests, `mangrove warm` and the tuner's gate.
//! One problem generator and check per template family ([`decode_ops`]: the row-wise decode
//! ops); [`check_entry`] picks by template.

pub mod decode_ops;
pub mod moe;
pub mod sample;

pub use moe::{check_moe_down, check_moe_gateup, check_moe_route, MoeCase, MoeProblem};

use rand::{Rng, SeedableRng};

use crate::cache::CacheEntry;
use crate::check::{Deltas, POISON_BF16, POISON_F32};
use crate::gpu::{ActMode, Activations, DeviceBuffer, Gpu, GpuError, TernaryGemv};
use crate::reference::{pack_ternary, quantize_per_token, ternary_linear, ternary_linear_w2a8};

/// Random inputs of one ternary linear problem (never zeros).
pub struct TernaryProblem {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub packed: Vec<u8>,
    /// bf16 activations as bits.
    pub x_bits: Vec<u16>,
    pub scale: f32,
}

impl TernaryProblem {
    /// Uniform ternary weights, activations in [-2, 2) rounded to bf16, and a scale in
    /// [0.5, 1.5)/sqrt(K), so outputs are O(1) like a normalized layer's and absolute gates
    /// (`--max-abs`) mean the same at every K.
    pub fn random(m: usize, n: usize, k: usize, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let w: Vec<i8> = (0..n * k).map(|_| rng.random_range(-1i8..=1)).collect();
        let x_bits = (0..m * k).map(|_| half::bf16::from_f32(rng.random_range(-2.0f32..2.0)).to_bits()).collect();
        let scale = rng.random_range(0.5f32..1.5) / (k as f32).sqrt();
        Self { m, n, k, packed: pack_ternary(&w, n, k), x_bits, scale }
    }

    /// The f64 reference output [m, n].
    pub fn reference(&self) -> Vec<f64> {
        let x: Vec<f64> = self.x_bits.iter().map(|&b| half::bf16::from_bits(b).to_f64()).collect();
        ternary_linear(&self.packed, self.n, self.k, &x, self.m, self.scale as f64)
    }
}

/// Output of one checked run.
pub struct CheckedRun {
    pub deltas: Deltas,
    /// The raw output bits, bf16 or f32 (for bit-exactness comparisons).
    pub output: Vec<u32>,
}

/// A random problem resident on the GPU with its f64 references (one per activation mode,
/// computed on first use), reusable across kernels of both GEMV templates.
pub struct TernaryCase {
    pub problem: TernaryProblem,
    /// Per-token int8 activations and scales (BitNet's quantization of `problem.x_bits`).
    pub q: Vec<i8>,
    pub q_scale: Vec<f32>,
    references: [std::sync::OnceLock<Vec<f64>>; 2],
    w: DeviceBuffer<u8>,
    x: DeviceBuffer<u16>,
    xq: DeviceBuffer<i8>,
    xs: DeviceBuffer<f32>,
    y: DeviceBuffer<u16>,
    y32: DeviceBuffer<f32>,
}

impl TernaryCase {
    /// Draws a fresh problem from `seed` and uploads it in both activation forms.
    pub fn new(gpu: &Gpu, m: usize, n: usize, k: usize, seed: u64) -> Result<Self, GpuError> {
        let problem = TernaryProblem::random(m, n, k, seed);
        let xf: Vec<f32> = problem.x_bits.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
        let (q, q_scale) = quantize_per_token(&xf, m, k);
        Ok(Self {
            w: gpu.upload(&problem.packed)?,
            x: gpu.upload(&problem.x_bits)?,
            xq: gpu.upload(&q)?,
            xs: gpu.upload(&q_scale)?,
            y: gpu.upload(&vec![POISON_BF16; m * n])?,
            y32: gpu.upload(&vec![f32::from_bits(POISON_F32); m * n])?,
            references: Default::default(),
            problem,
            q,
            q_scale,
        })
    }

    /// The f64 reference of `mode`: bf16 x exactly, or the quantized q / scale.
    pub fn reference(&self, mode: ActMode) -> &[f64] {
        let p = &self.problem;
        match mode {
            ActMode::Bf16 => self.references[0].get_or_init(|| p.reference()),
            ActMode::W2A8 => self.references[1]
                .get_or_init(|| ternary_linear_w2a8(&p.packed, p.n, p.k, &self.q, &self.q_scale, p.m, p.scale as f64)),
        }
    }

    /// The activations on the device in the form `mode` takes.
    pub fn activations(&self, mode: ActMode) -> Activations<'_> {
        activations(&self.x, &self.xq, &self.xs, mode)
    }

    /// Poisons the output, launches `op` once over all its M rows and compares with the
    /// reference of its mode.
    pub fn run(&mut self, gpu: &Gpu, op: &mut TernaryGemv, rel_floor: f64) -> Result<CheckedRun, GpuError> {
        self.run_rows(gpu, op, op.m, rel_floor)
    }

    /// The int8 activations and their scales on the device (to time launches outside `run`).
    pub fn device_int8(&self) -> (&DeviceBuffer<i8>, &DeviceBuffer<f32>) {
        (&self.xq, &self.xs)
    }

    /// The output of an M=1 W2A8 kernel (f32 or bf16 out) launched on each row in turn, widened
    /// to f64: probe-mgt1's `m1_kernel` reference for a batched path.
    pub fn rows_one_by_one(&mut self, gpu: &Gpu, one: &mut TernaryGemv) -> Result<Vec<f64>, GpuError> {
        let (m, n, scale) = (self.problem.m, self.problem.n, self.problem.scale);
        if one.out_f32 {
            for r in 0..m {
                one.launch_w2a8_rows(gpu, &self.w, &self.xq, &self.xs, (r, r), 1, &mut self.y32, scale)?;
            }
            gpu.sync()?;
            return Ok(gpu.download(&self.y32)?.into_iter().map(f64::from).collect());
        }
        for r in 0..m {
            one.launch_w2a8_rows(gpu, &self.w, &self.xq, &self.xs, (r, r), 1, &mut self.y, scale)?;
        }
        gpu.sync()?;
        Ok(gpu.download(&self.y)?.into_iter().take(m * n).map(|b| half::bf16::from_bits(b).to_f64()).collect())
    }

    /// As [`TernaryCase::run`] over the first `rows` rows only (the tensor-core GEMM takes any
    /// count up to its M): the deltas cover those rows, `output` holds all M rows, so a caller
    /// can check that the rows past `rows` kept their poison.
    pub fn run_rows(&mut self, gpu: &Gpu, op: &mut TernaryGemv, rows: usize, rel_floor: f64) -> Result<CheckedRun, GpuError> {
        let (len, used) = (self.problem.m * self.problem.n, rows * self.problem.n);
        let used = used.min(len);
        if op.out_f32 {
            gpu.write(&vec![f32::from_bits(POISON_F32); len], &mut self.y32)?;
            op.launch_w2a8_rows(gpu, &self.w, &self.xq, &self.xs, (0, 0), rows, &mut self.y32, self.problem.scale)?;
            gpu.sync()?;
            let out = gpu.download(&self.y32)?;
            let deltas = Deltas::of_f32(&out[..used], &self.reference(op.mode)[..used], rel_floor);
            return Ok(CheckedRun { deltas, output: out.iter().map(|v| v.to_bits()).collect() });
        }
        gpu.write(&vec![POISON_BF16; len], &mut self.y)?;
        if rows == op.m {
            let x = activations(&self.x, &self.xq, &self.xs, op.mode);
            op.launch(gpu, &self.w, x, &mut self.y, self.problem.scale)?;
        } else {
            op.launch_w2a8_rows(gpu, &self.w, &self.xq, &self.xs, (0, 0), rows, &mut self.y, self.problem.scale)?;
        }
        gpu.sync()?;
        let output = gpu.download(&self.y)?;
        Ok(CheckedRun { deltas: Deltas::of_bf16(&output[..used], &self.reference(op.mode)[..used], rel_floor), output: output.into_iter().map(u32::from).collect() })
    }
}

/// The device activations in the form `mode` takes (a free function so a caller can hold the
/// output buffer mutably at the same time).
fn activations<'a>(x: &'a DeviceBuffer<u16>, q: &'a DeviceBuffer<i8>, s: &'a DeviceBuffer<f32>, mode: ActMode) -> Activations<'a> {
    match mode {
        ActMode::Bf16 => Activations::Bf16(x),
        ActMode::W2A8 => Activations::Int8 { q, scale: s },
    }
}

/// Launches a `ternary_gemv` entry `runs` times on one fresh random problem (output poisoned
/// before each run) and returns the deltas of every run against the f64 reference.
pub fn check_ternary_gemv(
    gpu: &Gpu,
    entry: &CacheEntry,
    seed: u64,
    runs: usize,
    rel_floor: f64,
) -> Result<Vec<CheckedRun>, GpuError> {
    let mut op = TernaryGemv::new(gpu, entry)?;
    let mut case = TernaryCase::new(gpu, op.m, op.n, op.k, seed)?;
    (0..runs.max(1)).map(|_| case.run(gpu, &mut op, rel_floor)).collect()
}

/// Whether [`check_entry`] can validate kernels of `template` on their own (the other decode-step
/// ops, RoPE + KV append, the LM head and the MoE combine, are validated end to end, through the
/// engine's logits).
pub fn has_validator(template: &str) -> bool {
    matches!(
        template,
        "moe_gateup" | "moe_down" | "moe_route" | "ternary_gemv" | "ternary_gemv_w2a8" | "ternary_gemm_w2a8" | "rmsnorm_quant" | "attention_decode" | "sample_tokens"
    )
}

/// Checks any cache entry against its reference on random data, by its template.
pub fn check_entry(gpu: &Gpu, entry: &CacheEntry, seed: u64, rel_floor: f64) -> Result<CheckedRun, GpuError> {
    match entry.inputs.template.as_str() {
        "moe_gateup" => check_moe_gateup(gpu, entry, seed, rel_floor),
        "moe_down" => check_moe_down(gpu, entry, seed, rel_floor),
        "moe_route" => check_moe_route(gpu, entry, seed, rel_floor),
        "ternary_gemv" | "ternary_gemv_w2a8" | "ternary_gemm_w2a8" => Ok(check_ternary_gemv(gpu, entry, seed, 1, rel_floor)?.remove(0)),
        "rmsnorm_quant" => decode_ops::check_rmsnorm_quant(gpu, entry, seed, rel_floor),
        "attention_decode" => decode_ops::check_attention(gpu, entry, seed, rel_floor),
        "sample_tokens" => sample::check_sample_tokens(gpu, entry, seed, rel_floor),
        other => Err(GpuError::Shape { kernel: other.into(), what: "no validator for this template".into() }),
    }
}
