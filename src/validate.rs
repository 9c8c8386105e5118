//! Runs a kernel on fresh random inputs and holds it to the CPU reference: the one
//! correctness check shared by the GPU tests, `mangrove warm` and the tuner's gate.

use rand::{Rng, SeedableRng};

use crate::cache::CacheEntry;
use crate::check::{Deltas, POISON_BF16};
use crate::gpu::{DeviceBuffer, Gpu, GpuError, TernaryGemv};
use crate::reference::{pack_ternary, ternary_linear};

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
    /// The raw bf16 output bits (for bit-exactness comparisons).
    pub output: Vec<u16>,
}

/// A random problem resident on the GPU with its f64 reference, reusable across kernels.
pub struct TernaryCase {
    pub problem: TernaryProblem,
    pub reference: Vec<f64>,
    w: DeviceBuffer<u8>,
    x: DeviceBuffer<u16>,
    y: DeviceBuffer<u16>,
}

impl TernaryCase {
    /// Draws a fresh problem from `seed`, computes its reference and uploads it.
    pub fn new(gpu: &Gpu, m: usize, n: usize, k: usize, seed: u64) -> Result<Self, GpuError> {
        let problem = TernaryProblem::random(m, n, k, seed);
        let reference = problem.reference();
        Ok(Self {
            w: gpu.upload(&problem.packed)?,
            x: gpu.upload(&problem.x_bits)?,
            y: gpu.upload(&vec![POISON_BF16; m * n])?,
            problem,
            reference,
        })
    }

    /// The activations on the device.
    pub fn x(&self) -> &DeviceBuffer<u16> {
        &self.x
    }

    /// Poisons the output, launches `entry` once and compares with the reference.
    pub fn run(&mut self, gpu: &Gpu, op: &mut TernaryGemv, rel_floor: f64) -> Result<CheckedRun, GpuError> {
        gpu.write(&vec![POISON_BF16; self.problem.m * self.problem.n], &mut self.y)?;
        op.launch(gpu, &self.w, &self.x, &mut self.y, self.problem.scale)?;
        gpu.sync()?;
        let output = gpu.download(&self.y)?;
        Ok(CheckedRun { deltas: Deltas::of_bf16(&output, &self.reference, rel_floor), output })
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
