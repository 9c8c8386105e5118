//! Runs a kernel on fresh random inputs and holds it to the CPU reference: the one
//! correctness check shared by the GPU tests, `mangrove warm` and the tuner's gate.
//! One problem generator and check per template family; [`check_entry`] picks by template.

use rand::{Rng, SeedableRng};

use crate::cache::CacheEntry;
use crate::check::{Deltas, POISON_BF16};
use crate::gpu::{DeviceRouting, ExpertWeights, Gpu, GpuError, MoeGateUp, TernaryGemv};
use crate::reference::moe::{moe_gateup, MoeShape, TernaryExperts};
use crate::reference::{pack_ternary, ternary_linear};
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
    /// Uniform ternary weights, activations in [-2, 2) rounded to bf16, a scale in [0.5, 1.5).
    pub fn random(m: usize, n: usize, k: usize, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let w: Vec<i8> = (0..n * k).map(|_| rng.random_range(-1i8..=1)).collect();
        let x_bits = (0..m * k).map(|_| half::bf16::from_f32(rng.random_range(-2.0f32..2.0)).to_bits()).collect();
        let scale = rng.random_range(0.5f32..1.5);
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

/// Launches a `ternary_gemv` entry `runs` times on one random problem (output poisoned before
/// each run) and returns the deltas of every run against the f64 reference.
pub fn check_ternary_gemv(
    gpu: &Gpu,
    entry: &CacheEntry,
    seed: u64,
    runs: usize,
    rel_floor: f64,
) -> Result<Vec<CheckedRun>, GpuError> {
    let mut op = TernaryGemv::new(gpu, entry)?;
    let prob = TernaryProblem::random(op.m, op.n, op.k, seed);
    let reference = prob.reference();
    let w = gpu.upload(&prob.packed)?;
    let x = gpu.upload(&prob.x_bits)?;
    let poison = vec![POISON_BF16; op.m * op.n];
    let mut y = gpu.upload(&poison)?;
    let mut out = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        gpu.write(&poison, &mut y)?;
        op.launch(gpu, &w, &x, &mut y, prob.scale)?;
        gpu.sync()?;
        let output = gpu.download(&y)?;
        out.push(CheckedRun { deltas: Deltas::of_bf16(&output, &reference, rel_floor), output });
    }
    Ok(out)
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

/// Launches a `moe_gateup` entry once on a random problem with a fresh routing (act poisoned
/// first) and returns the deltas of every routed row against the f64 reference.
pub fn check_moe_gateup(gpu: &Gpu, entry: &CacheEntry, seed: u64, rel_floor: f64) -> Result<CheckedRun, GpuError> {
    let mut op = MoeGateUp::new(gpu, entry)?;
    let shape = MoeShape { tokens: op.tokens, hidden: op.hidden, inter: op.inter, experts: op.experts, topk: op.topk };
    let prob = MoeProblem::random(shape, seed);
    let routing = align_block_size(&prob.topk_ids, shape.experts, op.block_m)
        .map_err(|e| GpuError::Shape { kernel: entry.inputs.template.clone(), what: e.to_string() })?;
    let reference = prob.reference();
    let x = gpu.upload(&prob.x_bits)?;
    let (w_gate, w_up) = (gpu.upload(&prob.w_gate)?, gpu.upload(&prob.w_up)?);
    let (s_gate, s_up) = (gpu.upload(&prob.s_gate)?, gpu.upload(&prob.s_up)?);
    let weights = ExpertWeights { w_gate: &w_gate, w_up: &w_up, s_gate: &s_gate, s_up: &s_up };
    let routing = DeviceRouting::upload(gpu, &routing)?;
    // Every act row is a routed pair; sentinel slots of the routing have no row.
    let mut act = gpu.upload(&vec![POISON_BF16; shape.pairs() * shape.inter])?;
    op.launch(gpu, &x, weights, &routing, &mut act)?;
    gpu.sync()?;
    let output = gpu.download(&act)?;
    Ok(CheckedRun { deltas: Deltas::of_bf16(&output, &reference, rel_floor), output })
}

/// Checks any cache entry against its reference on random data, by its template.
pub fn check_entry(gpu: &Gpu, entry: &CacheEntry, seed: u64, rel_floor: f64) -> Result<CheckedRun, GpuError> {
    match entry.inputs.template.as_str() {
        "moe_gateup" => check_moe_gateup(gpu, entry, seed, rel_floor),
        "ternary_gemv" => Ok(check_ternary_gemv(gpu, entry, seed, 1, rel_floor)?.remove(0)),
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
