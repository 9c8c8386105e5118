//! The MoE kernels against their f64 references on fresh random problems: `moe_gateup` and
//! `moe_down` (every routed row, output poisoned first) and `moe_route` (expert ids, weights and
//! the aligned routing against [`route`] + [`align_block_size`]).

use rand::{Rng, SeedableRng};

use crate::cache::CacheEntry;
use crate::check::{Deltas, POISON_F32};
use crate::gpu::{DeviceBuffer, DeviceRouting, DownWeights, ExpertWeights, Gpu, GpuError, MoeDown, MoeGateUp, MoeRoute, RouteOut};
use crate::reference::moe::{moe_down, moe_gateup, route, MoeShape, TernaryExperts};
use crate::reference::quantize_per_token;
use crate::routing::{align_block_size, Routing};

use super::CheckedRun;

/// Random inputs of one MoE layer with ternary experts (never zeros): per-token int8
/// activations for gate_up, per-pair int8 activations for down, and a routing.
pub struct MoeProblem {
    pub shape: MoeShape,
    /// int8 activations [tokens, hidden] and their per-token scales (q = rint(x * scale)).
    pub q: Vec<i8>,
    pub x_scale: Vec<f32>,
    /// Packed gate / up weights [E, inter/4, hidden].
    pub w_gate: Vec<u8>,
    pub w_up: Vec<u8>,
    pub s_gate: Vec<f32>,
    pub s_up: Vec<f32>,
    /// Packed down weights [E, hidden/4, inter] and the down stage's own int8 input
    /// [pairs, inter] with per-pair scales.
    pub w_down: Vec<u8>,
    pub s_down: Vec<f32>,
    pub qa: Vec<i8>,
    pub qa_scale: Vec<f32>,
    /// Expert of every (token, slot) pair, [tokens, topk]; distinct within a token.
    pub topk_ids: Vec<i32>,
    /// SiLU (else ReLU²) as the gate activation.
    pub silu: bool,
}

/// Uniform packed ternary bytes: 4 uniform codes in {0, 1, 2} per byte.
fn packed(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            let v: u8 = rng.random_range(0..81);
            (v % 3) | ((v / 3 % 3) << 2) | ((v / 9 % 3) << 4) | ((v / 27) << 6)
        })
        .collect()
}

/// Rows of uniform values in [-2, 2), quantized per row to int8.
fn quantized_rows(rng: &mut rand::rngs::StdRng, rows: usize, width: usize) -> (Vec<i8>, Vec<f32>) {
    let x: Vec<f32> = (0..rows * width).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    quantize_per_token(&x, rows, width)
}

/// Dequantized rows q / scale, in f64.
fn dequantized(q: &[i8], scales: &[f32], width: usize) -> Vec<f64> {
    q.chunks(width).zip(scales).flat_map(|(row, &s)| row.iter().map(move |&v| v as f64 / s as f64)).collect()
}

impl MoeProblem {
    /// Uniform ternary weights, activations in [-2, 2) quantized per row, scales in
    /// [0.5, 1.5) / sqrt(fan-in) (so outputs stay O(1)), `topk` distinct experts per token.
    pub fn random(shape: MoeShape, seed: u64, silu: bool) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (h, n, e) = (shape.hidden, shape.inter, shape.experts);
        let (q, x_scale) = quantized_rows(&mut rng, shape.tokens, h);
        let (w_gate, w_up) = (packed(&mut rng, e * shape.expert_bytes()), packed(&mut rng, e * shape.expert_bytes()));
        let w_down = packed(&mut rng, e * h / 4 * n);
        let scales = |rng: &mut rand::rngs::StdRng, fan_in: usize| -> Vec<f32> {
            (0..e).map(|_| rng.random_range(0.5f32..1.5) / (fan_in as f32).sqrt()).collect()
        };
        let (s_gate, s_up, s_down) = (scales(&mut rng, h), scales(&mut rng, h), scales(&mut rng, n));
        let (qa, qa_scale) = quantized_rows(&mut rng, shape.pairs(), n);
        let topk_ids = (0..shape.tokens)
            .flat_map(|_| rand::seq::index::sample(&mut rng, e, shape.topk).into_iter().map(|e| e as i32).collect::<Vec<_>>())
            .collect();
        Self { shape, q, x_scale, w_gate, w_up, s_gate, s_up, w_down, s_down, qa, qa_scale, topk_ids, silu }
    }

    /// The f64 reference of gate_up, act [tokens*topk, inter].
    pub fn reference_gateup(&self) -> Vec<f64> {
        let x = dequantized(&self.q, &self.x_scale, self.shape.hidden);
        let gate = TernaryExperts { packed: &self.w_gate, scales: &self.s_gate };
        let up = TernaryExperts { packed: &self.w_up, scales: &self.s_up };
        moe_gateup(&self.shape, &x, gate, up, &self.topk_ids, self.silu)
    }

    /// The f64 reference of down, out [tokens*topk, hidden].
    pub fn reference_down(&self) -> Vec<f64> {
        let a = dequantized(&self.qa, &self.qa_scale, self.shape.inter);
        moe_down(&self.shape, &a, TernaryExperts { packed: &self.w_down, scales: &self.s_down }, &self.topk_ids)
    }

    /// Distinct experts the routing uses (for the bytes a launch must read).
    pub fn experts_used(&self) -> usize {
        self.topk_ids.iter().collect::<std::collections::BTreeSet<_>>().len()
    }
}

/// A random MoE problem resident on the GPU with its f64 references; routings are built per
/// BLOCK_M on first use, so one case checks every tile config of a shape.
pub struct MoeCase {
    pub problem: MoeProblem,
    pub q: DeviceBuffer<i8>,
    pub x_scale: DeviceBuffer<f32>,
    pub w_gate: DeviceBuffer<u8>,
    pub w_up: DeviceBuffer<u8>,
    pub s_gate: DeviceBuffer<f32>,
    pub s_up: DeviceBuffer<f32>,
    pub w_down: DeviceBuffer<u8>,
    pub s_down: DeviceBuffer<f32>,
    pub qa: DeviceBuffer<i8>,
    pub qa_scale: DeviceBuffer<f32>,
    /// gate_up output [pairs, inter] and down output [pairs, hidden].
    pub act: DeviceBuffer<f32>,
    pub out: DeviceBuffer<f32>,
    reference_gateup: Option<Vec<f64>>,
    reference_down: Option<Vec<f64>>,
    /// Device routings by BLOCK_M ([`MoeCase::routing`] builds them).
    pub routings: std::collections::BTreeMap<usize, DeviceRouting>,
}

impl MoeCase {
    /// Draws a fresh problem of `shape` from `seed` and uploads it (references computed on first use).
    pub fn new(gpu: &Gpu, shape: MoeShape, seed: u64, silu: bool) -> Result<Self, GpuError> {
        let p = MoeProblem::random(shape, seed, silu);
        Ok(Self {
            q: gpu.upload(&p.q)?,
            x_scale: gpu.upload(&p.x_scale)?,
            w_gate: gpu.upload(&p.w_gate)?,
            w_up: gpu.upload(&p.w_up)?,
            s_gate: gpu.upload(&p.s_gate)?,
            s_up: gpu.upload(&p.s_up)?,
            w_down: gpu.upload(&p.w_down)?,
            s_down: gpu.upload(&p.s_down)?,
            qa: gpu.upload(&p.qa)?,
            qa_scale: gpu.upload(&p.qa_scale)?,
            act: gpu.zeros(shape.pairs() * shape.inter)?,
            out: gpu.zeros(shape.pairs() * shape.hidden)?,
            reference_gateup: None,
            reference_down: None,
            routings: Default::default(),
            problem: p,
        })
    }

    /// The device routing aligned to `block_m` (built once).
    pub fn routing(&mut self, gpu: &Gpu, block_m: usize) -> Result<&DeviceRouting, GpuError> {
        if !self.routings.contains_key(&block_m) {
            let shape = self.problem.shape;
            let r = align_block_size(&self.problem.topk_ids, shape.experts, block_m)
                .map_err(|e| GpuError::Shape { kernel: "moe routing".into(), what: e.to_string() })?;
            self.routings.insert(block_m, DeviceRouting::upload(gpu, &r, shape.experts)?);
        }
        Ok(&self.routings[&block_m])
    }

    /// The routing for `block_m`, if [`MoeCase::routing`] built it.
    pub fn routing_for(&self, block_m: usize) -> Option<&DeviceRouting> {
        self.routings.get(&block_m)
    }

    /// The gate and up experts on the device.
    pub fn expert_weights(&self) -> ExpertWeights<'_> {
        ExpertWeights { w_gate: &self.w_gate, w_up: &self.w_up, s_gate: &self.s_gate, s_up: &self.s_up }
    }

    /// The down experts on the device.
    pub fn down_weights(&self) -> DownWeights<'_> {
        DownWeights { w_down: &self.w_down, s_down: &self.s_down }
    }

    /// Poisons act, launches `op` once and compares every routed row with the reference.
    pub fn run_gateup(&mut self, gpu: &Gpu, op: &mut MoeGateUp, rel_floor: f64) -> Result<CheckedRun, GpuError> {
        gpu.write(&vec![f32::from_bits(POISON_F32); self.act.len()], &mut self.act)?;
        self.routing(gpu, op.shape.block_m)?;
        let routing = &self.routings[&op.shape.block_m];
        let pairs = self.problem.shape.pairs();
        let w = ExpertWeights { w_gate: &self.w_gate, w_up: &self.w_up, s_gate: &self.s_gate, s_up: &self.s_up };
        op.launch(gpu, (self.q.slice(..), self.x_scale.slice(..)), w, routing, pairs, &mut self.act)?;
        gpu.sync()?;
        let output = gpu.download(&self.act)?;
        let reference = self.reference_gateup.get_or_insert_with(|| self.problem.reference_gateup());
        Ok(CheckedRun { deltas: Deltas::of_f32(&output, reference, rel_floor), output: output.into_iter().map(f32::to_bits).collect() })
    }

    /// Poisons out, launches `op` once and compares every routed row with the reference.
    pub fn run_down(&mut self, gpu: &Gpu, op: &mut MoeDown, rel_floor: f64) -> Result<CheckedRun, GpuError> {
        gpu.write(&vec![f32::from_bits(POISON_F32); self.out.len()], &mut self.out)?;
        self.routing(gpu, op.shape.block_m)?;
        let routing = &self.routings[&op.shape.block_m];
        let pairs = self.problem.shape.pairs();
        let w = DownWeights { w_down: &self.w_down, s_down: &self.s_down };
        op.launch(gpu, (&self.qa, &self.qa_scale), w, routing, pairs, &mut self.out)?;
        gpu.sync()?;
        let output = gpu.download(&self.out)?;
        let reference = self.reference_down.get_or_insert_with(|| self.problem.reference_down());
        Ok(CheckedRun { deltas: Deltas::of_f32(&output, reference, rel_floor), output: output.into_iter().map(f32::to_bits).collect() })
    }
}

fn shape_of(s: crate::gpu::GroupedShape) -> MoeShape {
    MoeShape { tokens: s.tokens, hidden: s.hidden, inter: s.inter, experts: s.experts, topk: s.topk }
}

/// Whether a `moe_gateup` entry was rendered with SiLU (ACT = 1; the default).
fn entry_silu(entry: &CacheEntry) -> bool {
    entry.inputs.params.get("ACT").is_none_or(|&a| a == 1)
}

/// Launches a `moe_gateup` entry once on a random problem with a fresh routing (act poisoned
/// first) and returns the deltas of every routed row against the f64 reference.
pub fn check_moe_gateup(gpu: &Gpu, entry: &CacheEntry, seed: u64, rel_floor: f64) -> Result<CheckedRun, GpuError> {
    let mut op = MoeGateUp::new(gpu, entry)?;
    MoeCase::new(gpu, shape_of(op.shape), seed, entry_silu(entry))?.run_gateup(gpu, &mut op, rel_floor)
}

/// Launches a `moe_down` entry once on a random problem with a fresh routing (out poisoned
/// first) and returns the deltas of every routed row against the f64 reference.
pub fn check_moe_down(gpu: &Gpu, entry: &CacheEntry, seed: u64, rel_floor: f64) -> Result<CheckedRun, GpuError> {
    let mut op = MoeDown::new(gpu, entry)?;
    MoeCase::new(gpu, shape_of(op.shape), seed, true)?.run_down(gpu, &mut op, rel_floor)
}

/// Random router logits [rows, experts] in [-4, 4), with ties: every fifth token repeats one
/// logit at a higher expert id, so the tie order (lower id first) is exercised.
pub fn random_logits(rows: usize, experts: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut l: Vec<f32> = (0..rows * experts).map(|_| rng.random_range(-4.0f32..4.0)).collect();
    for t in (0..rows).step_by(5).filter(|_| experts >= 2) {
        let row = &mut l[t * experts..][..experts];
        let best = (0..experts).max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a))).expect("experts >= 2");
        let twin = (best + 1 + rng.random_range(0..experts - 1)) % experts;
        row[twin] = row[best];
    }
    l
}

/// The CPU routing of `logits` [rows, experts]: per pair its expert and weight (f64), and the
/// aligned routing.
pub fn reference_route(logits: &[f32], experts: usize, topk: usize, renormalize: bool, block_m: usize) -> (Vec<i32>, Vec<f64>, Routing) {
    let (mut ids, mut w) = (Vec::new(), Vec::new());
    for row in logits.chunks_exact(experts) {
        let row: Vec<f64> = row.iter().map(|&v| v as f64).collect();
        for (e, p) in route(&row, topk, renormalize) {
            ids.push(e as i32);
            w.push(p);
        }
    }
    let r = align_block_size(&ids, experts, block_m).expect("route picks experts in range");
    (ids, w, r)
}

/// Runs a `moe_route` entry on `rows` tokens of random logits and compares with the CPU
/// routing: the output is the router weights (f32 vs f64) followed by one 1.0 per discrete
/// output (expert id, sorted id, block expert, padded length) that matches exactly, NaN where
/// it does not, so a wrong id counts as non-finite.
pub fn check_moe_route_rows(gpu: &Gpu, entry: &CacheEntry, rows: usize, seed: u64, rel_floor: f64) -> Result<CheckedRun, GpuError> {
    let op = MoeRoute::new(gpu, entry)?;
    let (e, k, bm) = (op.experts, op.topk, op.block_m);
    let norm = entry.inputs.params.get("NORM").is_none_or(|&n| n == 1);
    let logits = random_logits(rows, e, seed);
    let (ids, w, r) = reference_route(&logits, e, k, norm, bm);
    let dev_logits = gpu.upload(&logits)?;
    let mut topk_ids = gpu.upload(&vec![-1i32; rows * k])?;
    let mut topk_w = gpu.upload(&vec![f32::from_bits(POISON_F32); rows * k])?;
    let mut routing = DeviceRouting::zeros(gpu, op.tokens * k, e, bm)?;
    op.launch(gpu, &dev_logits, rows, RouteOut { topk_ids: &mut topk_ids, topk_w: &mut topk_w, routing: &mut routing })?;
    gpu.sync()?;
    let got_w = gpu.download(&topk_w)?;
    let got_ids = gpu.download(&topk_ids)?;
    let got = routing.download(gpu, rows * k)?;
    // The GPU pads with M*TOPK (the kernel's sentinel), the CPU with rows*TOPK.
    let sentinel = (op.tokens * k) as i32;
    let want_sorted: Vec<i32> = r.sorted_ids.iter().map(|&p| if p == r.sentinel() { sentinel } else { p }).collect();
    let same = |a: &[i32], b: &[i32]| -> Vec<f64> {
        (0..a.len().max(b.len())).map(|i| if a.get(i) == b.get(i) { 1.0 } else { f64::NAN }).collect()
    };
    let mut output: Vec<f64> = got_w.iter().map(|&v| v as f64).collect();
    output.extend(same(&got_ids, &ids));
    output.extend(same(&got.sorted_ids, &want_sorted));
    output.extend(same(&got.block_expert, &r.block_expert));
    output.push(if got.em == r.em { 1.0 } else { f64::NAN });
    let mut reference = w;
    reference.resize(output.len(), 1.0);
    let deltas = Deltas::of_f64(&output, &reference, rel_floor);
    Ok(CheckedRun { deltas, output: output.iter().map(|&v| (v as f32).to_bits()).collect() })
}

/// [`check_moe_route_rows`] with every row of the kernel's M.
pub fn check_moe_route(gpu: &Gpu, entry: &CacheEntry, seed: u64, rel_floor: f64) -> Result<CheckedRun, GpuError> {
    let rows = MoeRoute::new(gpu, entry)?.tokens;
    check_moe_route_rows(gpu, entry, rows, seed, rel_floor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moe_problem_is_well_formed() {
        let shape = MoeShape { tokens: 5, hidden: 64, inter: 16, experts: 6, topk: 3 };
        let p = MoeProblem::random(shape, 7, true);
        for w in [&p.w_gate, &p.w_up, &p.w_down] {
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
        let r = p.reference_gateup();
        assert_eq!(r.len(), 15 * 16);
        assert!(r.iter().all(|v| v.is_finite() && v.abs() < 50.0), "scales keep act O(1)");
        assert!(r.iter().any(|&v| v != 0.0));
        let d = p.reference_down();
        assert_eq!(d.len(), 15 * 64);
        assert!(d.iter().all(|v| v.is_finite() && v.abs() < 50.0) && d.iter().any(|&v| v != 0.0));
        assert_eq!(MoeProblem::random(shape, 7, true).w_up, p.w_up, "seeded");
        assert!(p.q.iter().any(|&v| v != 0) && p.qa.iter().any(|&v| v != 0));
    }

    #[test]
    fn random_logits_have_ties_that_route_to_the_lower_id() {
        let (rows, e) = (10, 8);
        let l = random_logits(rows, e, 3);
        let (ids, w, r) = reference_route(&l, e, 2, true, 4);
        for t in (0..rows).step_by(5) {
            let row = &l[t * e..][..e];
            let (a, b) = (ids[2 * t] as usize, ids[2 * t + 1] as usize);
            assert_eq!(row[a], row[b], "token {t}: the top two are the tied pair");
            assert!(a < b, "ties go to the lower id first");
            assert!((w[2 * t] - 0.5).abs() < 1e-12);
        }
        assert_eq!(r.pairs, 2 * rows);
    }
}
