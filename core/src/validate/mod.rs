//! Runs a kernel on fresh random inputs and holds it to the CPU reference: the one
//! correctness check shared by the GPU tests, `mangrove warm` and the tuner's gate.
//! One problem generator and check per template family ([`decode_ops`]: the row-wise decode
//! ops); [`check_entry`] picks by template.

pub mod decode_ops;
pub mod sample;

use rand::{Rng, SeedableRng};

use crate::cache::CacheEntry;
use crate::check::{Deltas, POISON_BF16, POISON_F32};
use crate::gpu::{ActMode, Activations, DeviceBuffer, DeviceRouting, ExpertWeights, Gpu, GpuError, MoeGateUp, TernaryGemv};
use crate::reference::moe::{moe_gateup, MoeShape, TernaryExperts};
use crate::reference::{pack_ternary, quantize_per_token, ternary_linear, ternary_linear_w2a8};
use crate::routing::align_block_size;

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

/// Random inputs of one MoE gate_up problem with ternary experts.
pub struct MoeProblem {
    pub shape: MoeShape,
    /// bf16 activations [tokens, hidden] as bits.
    pub x_bits: Vec<u16>,
    /// Packed gate / up weights [E, inter/4, hidden].
    pub w_gate: Vec<u8>,
    pub w_up: Vec<u8>,
    pub s_gate: Vec<f32>,
    pub s_up: Vec<f32>,
    /// Expert of every (token, slot) pair, [tokens, topk]; distinct within a token.
    pub topk_ids: Vec<i32>,
}

impl MoeProblem {
    /// Uniform ternary weights, activations in [-2, 2) rounded to bf16, scales in
    /// [0.5, 1.5) / sqrt(hidden) (so gate and up stay O(1)), `topk` distinct experts per token.
    pub fn random(shape: MoeShape, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let x_bits = (0..shape.tokens * shape.hidden)
            .map(|_| half::bf16::from_f32(rng.random_range(-2.0f32..2.0)).to_bits())
            .collect();
        // A uniform byte of 4 uniform codes in {0, 1, 2}: the packed form of uniform ternary rows.
        let packed = |rng: &mut rand::rngs::StdRng| -> Vec<u8> {
            (0..shape.experts * shape.expert_bytes())
                .map(|_| {
                    let v: u8 = rng.random_range(0..81);
                    (v % 3) | ((v / 3 % 3) << 2) | ((v / 9 % 3) << 4) | ((v / 27) << 6)
                })
                .collect()
        };
        let (w_gate, w_up) = (packed(&mut rng), packed(&mut rng));
        let inv = 1.0 / (shape.hidden as f32).sqrt();
        let scales = |rng: &mut rand::rngs::StdRng| -> Vec<f32> {
            (0..shape.experts).map(|_| rng.random_range(0.5f32..1.5) * inv).collect()
        };
        let (s_gate, s_up) = (scales(&mut rng), scales(&mut rng));
        let topk_ids = (0..shape.tokens)
            .flat_map(|_| rand::seq::index::sample(&mut rng, shape.experts, shape.topk).into_iter().map(|e| e as i32).collect::<Vec<_>>())
            .collect();
        Self { shape, x_bits, w_gate, w_up, s_gate, s_up, topk_ids }
    }

    /// The f64 reference output act [tokens*topk, inter].
    pub fn reference(&self) -> Vec<f64> {
        let x: Vec<f64> = self.x_bits.iter().map(|&b| half::bf16::from_bits(b).to_f64()).collect();
        let gate = TernaryExperts { packed: &self.w_gate, scales: &self.s_gate };
        let up = TernaryExperts { packed: &self.w_up, scales: &self.s_up };
        moe_gateup(&self.shape, &x, gate, up, &self.topk_ids)
    }
}

/// A random MoE problem resident on the GPU with its f64 reference; routings are built per
/// BLOCK_M on first use, so one case checks every tile config of a shape.
pub struct MoeCase {
    pub problem: MoeProblem,
    pub reference: Vec<f64>,
    pub x: DeviceBuffer<u16>,
    pub w_gate: DeviceBuffer<u8>,
    pub w_up: DeviceBuffer<u8>,
    pub s_gate: DeviceBuffer<f32>,
    pub s_up: DeviceBuffer<f32>,
    act: DeviceBuffer<u16>,
    routings: std::collections::BTreeMap<usize, DeviceRouting>,
}

impl MoeCase {
    /// Draws a fresh problem of `shape` from `seed`, computes its reference and uploads it.
    pub fn new(gpu: &Gpu, shape: MoeShape, seed: u64) -> Result<Self, GpuError> {
        let problem = MoeProblem::random(shape, seed);
        let reference = problem.reference();
        Ok(Self {
            x: gpu.upload(&problem.x_bits)?,
            w_gate: gpu.upload(&problem.w_gate)?,
            w_up: gpu.upload(&problem.w_up)?,
            s_gate: gpu.upload(&problem.s_gate)?,
            s_up: gpu.upload(&problem.s_up)?,
            act: gpu.upload(&vec![POISON_BF16; shape.pairs() * shape.inter])?,
            routings: Default::default(),
            problem,
            reference,
        })
    }

    /// The device routing aligned to `block_m` (built once).
    pub fn routing(&mut self, gpu: &Gpu, block_m: usize) -> Result<&DeviceRouting, GpuError> {
        if !self.routings.contains_key(&block_m) {
            let shape = self.problem.shape;
            let r = align_block_size(&self.problem.topk_ids, shape.experts, block_m)
                .map_err(|e| GpuError::Shape { kernel: "moe_gateup".into(), what: e.to_string() })?;
            self.routings.insert(block_m, DeviceRouting::upload(gpu, &r)?);
        }
        Ok(&self.routings[&block_m])
    }

    /// The routing for `block_m`, if [`MoeCase::routing`] built it.
    pub fn routing_for(&self, block_m: usize) -> Option<&DeviceRouting> {
        self.routings.get(&block_m)
    }

    /// Distinct experts the routing uses (for the bytes a launch must read).
    pub fn experts_used(&self) -> usize {
        self.problem.topk_ids.iter().collect::<std::collections::BTreeSet<_>>().len()
    }

    /// Poisons act, launches `op` once and compares every routed row with the reference.
    pub fn run(&mut self, gpu: &Gpu, op: &mut MoeGateUp, rel_floor: f64) -> Result<CheckedRun, GpuError> {
        gpu.write(&vec![POISON_BF16; self.act.len()], &mut self.act)?;
        self.routing(gpu, op.block_m)?;
        let routing = &self.routings[&op.block_m];
        let weights = ExpertWeights { w_gate: &self.w_gate, w_up: &self.w_up, s_gate: &self.s_gate, s_up: &self.s_up };
        // Every act row is a routed pair; sentinel slots of the routing have no row.
        op.launch(gpu, &self.x, weights, routing, &mut self.act)?;
        gpu.sync()?;
        let output = gpu.download(&self.act)?;
        Ok(CheckedRun { deltas: Deltas::of_bf16(&output, &self.reference, rel_floor), output: output.into_iter().map(u32::from).collect() })
    }
}

/// Launches a `moe_gateup` entry once on a random problem with a fresh routing (act poisoned
/// first) and returns the deltas of every routed row against the f64 reference.
pub fn check_moe_gateup(gpu: &Gpu, entry: &CacheEntry, seed: u64, rel_floor: f64) -> Result<CheckedRun, GpuError> {
    let mut op = MoeGateUp::new(gpu, entry)?;
    let shape = MoeShape { tokens: op.tokens, hidden: op.hidden, inter: op.inter, experts: op.experts, topk: op.topk };
    MoeCase::new(gpu, shape, seed)?.run(gpu, &mut op, rel_floor)
}

/// Whether [`check_entry`] can validate kernels of `template` on their own (the other decode-step
/// ops, RoPE + KV append, the LM head and the MoE combine, are validated end to end, through the
/// engine's logits).
pub fn has_validator(template: &str) -> bool {
    matches!(
        template,
        "moe_gateup" | "ternary_gemv" | "ternary_gemv_w2a8" | "ternary_gemm_w2a8" | "rmsnorm_quant" | "attention_decode" | "sample_tokens"
    )
}

/// Checks any cache entry against its reference on random data, by its template.
pub fn check_entry(gpu: &Gpu, entry: &CacheEntry, seed: u64, rel_floor: f64) -> Result<CheckedRun, GpuError> {
    match entry.inputs.template.as_str() {
        "moe_gateup" => check_moe_gateup(gpu, entry, seed, rel_floor),
        "ternary_gemv" | "ternary_gemv_w2a8" | "ternary_gemm_w2a8" => Ok(check_ternary_gemv(gpu, entry, seed, 1, rel_floor)?.remove(0)),
        "rmsnorm_quant" => decode_ops::check_rmsnorm_quant(gpu, entry, seed, rel_floor),
        "attention_decode" => decode_ops::check_attention(gpu, entry, seed, rel_floor),
        "sample_tokens" => sample::check_sample_tokens(gpu, entry, seed, rel_floor),
        other => Err(GpuError::Shape { kernel: other.into(), what: "no validator for this template".into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moe_problem_is_well_formed() {
        let shape = MoeShape { tokens: 5, hidden: 64, inter: 16, experts: 6, topk: 3 };
        let p = MoeProblem::random(shape, 7);
        for w in [&p.w_gate, &p.w_up] {
            assert_eq!(w.len(), 6 * 4 * 64);
            assert!(w.iter().all(|b| (0..4).all(|q| (b >> (2 * q)) & 3 != 3)), "code 3 is not ternary");
        }
        for token in p.topk_ids.chunks(3) {
            let mut t = token.to_vec();
            t.sort();
            t.dedup();
            assert_eq!(t.len(), 3, "experts of a token must be distinct: {token:?}");
            assert!(t.iter().all(|&e| (0..6).contains(&e)));
        }
        let r = p.reference();
        assert_eq!(r.len(), 15 * 16);
        assert!(r.iter().all(|v| v.is_finite() && v.abs() < 50.0), "scales keep act O(1)");
        assert_eq!(MoeProblem::random(shape, 7).w_up, p.w_up, "seeded");
    }
}
