//! What the tuner runs a candidate on: a [`Workload`] checks an entry against the CPU
//! reference and times it over rotating inputs that together exceed L2, so HBM is measured.

use mangrove_core::cache::CacheEntry;
use mangrove_core::check::Deltas;
use mangrove_core::gpu::{Attention, DeviceBuffer, DownWeights, ExpertWeights, Gpu, GpuError, KvArena, RmsNormQuant, RowMeta, TernaryGemv, TimingPlan, TimingStats};
use mangrove_core::gpu::{MoeDown, MoeGateUp};
use mangrove_core::reference::moe::MoeShape;
use mangrove_core::gpu::{AttnShape, NormShape};
use mangrove_core::validate::decode_ops::{AttentionCase, NormCase};
use mangrove_core::validate::{MoeCase, TernaryCase};

/// A problem instance the tuner can check and time kernels on.
pub trait Workload {
    /// Correctness of `entry` on the workload's random inputs (drawn fresh for each
    /// workload, never zeros) against the f64 reference, output poisoned first.
    fn check(&mut self, gpu: &Gpu, entry: &CacheEntry, rel_floor: f64) -> Result<Deltas, GpuError>;
    /// Per-launch timing of `entry`, inputs rotated across launches.
    fn time(&mut self, gpu: &Gpu, entry: &CacheEntry, plan: TimingPlan) -> Result<TimingStats, GpuError>;
    /// Fewest bytes one launch must move through HBM (for GB/s).
    fn min_bytes(&self) -> usize;
}

/// How many copies of a `bytes`-sized input make a rotation that exceeds twice the L2.
pub fn rotation_count(bytes: usize, l2_bytes: usize) -> usize {
    (2 * l2_bytes).div_ceil(bytes.max(1)).clamp(1, 4096)
}

/// The decode GEMV: one (M, N, K) with its checked case and a ring of weight copies.
pub struct GemvWorkload {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    case: TernaryCase,
    weights: Vec<DeviceBuffer<u8>>,
    y: DeviceBuffer<u16>,
}

impl GemvWorkload {
    /// Allocates the rotation ring (random ternary weights, never zeros) for (m, n, k).
    pub fn new(gpu: &Gpu, m: usize, n: usize, k: usize, seed: u64) -> Result<Self, GpuError> {
        let case = TernaryCase::new(gpu, m, n, k, seed)?;
        let packed = &case.problem.packed;
        let copies = rotation_count(packed.len(), gpu.info().l2_bytes as usize);
        let weights = (0..copies).map(|_| gpu.upload(packed)).collect::<Result<_, _>>()?;
        Ok(Self { m, n, k, weights, y: gpu.zeros(m * n)?, case })
    }

    /// Number of weight copies in the ring.
    pub fn copies(&self) -> usize {
        self.weights.len()
    }
}

impl Workload for GemvWorkload {
    fn check(&mut self, gpu: &Gpu, entry: &CacheEntry, rel_floor: f64) -> Result<Deltas, GpuError> {
        Ok(self.case.run(gpu, &mut TernaryGemv::new(gpu, entry)?, rel_floor)?.deltas)
    }

    fn time(&mut self, gpu: &Gpu, entry: &CacheEntry, plan: TimingPlan) -> Result<TimingStats, GpuError> {
        let mut op = TernaryGemv::new(gpu, entry)?;
        let (weights, y, scale) = (&self.weights, &mut self.y, self.case.problem.scale);
        let case = &self.case;
        let copies = weights.len();
        gpu.time_launches(plan, |i| op.launch(gpu, &weights[i % copies], case.activations(op.mode), y, scale))
    }

    fn min_bytes(&self) -> usize {
        // bf16 activations; a W2A8 kernel moves slightly less, so its GB/s is a lower bound.
        self.n / 4 * self.k + 2 * self.m * self.k + 2 * self.m * self.n
    }
}

/// Which grouped MoE GEMM a [`MoeWorkload`] checks and times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeStage {
    GateUp,
    Down,
}

impl MoeStage {
    /// The template of the stage.
    pub fn template(self) -> &'static str {
        match self {
            MoeStage::GateUp => "moe_gateup",
            MoeStage::Down => "moe_down",
        }
    }
}

/// A grouped MoE stage (`moe_gateup` or `moe_down`): one (M, E, TOPK, H, I) with its checked
/// case and a ring of expert weight copies (the routing is fixed per workload, as in one
/// decode step).
pub struct MoeWorkload {
    stage: MoeStage,
    case: MoeCase,
    /// Copies of the stage's weights: (gate, up) or (down, unused).
    ring: Vec<(DeviceBuffer<u8>, Option<DeviceBuffer<u8>>)>,
    bytes: usize,
}

impl MoeWorkload {
    pub fn new(gpu: &Gpu, stage: MoeStage, shape: MoeShape, seed: u64) -> Result<Self, GpuError> {
        let case = MoeCase::new(gpu, shape, seed, true)?;
        let p = &case.problem;
        let per_copy = match stage {
            MoeStage::GateUp => p.w_gate.len() + p.w_up.len(),
            MoeStage::Down => p.w_down.len(),
        };
        let copies = rotation_count(per_copy, gpu.info().l2_bytes as usize);
        let ring = (0..copies.saturating_sub(1))
            .map(|_| match stage {
                MoeStage::GateUp => Ok((gpu.upload(&p.w_gate)?, Some(gpu.upload(&p.w_up)?))),
                MoeStage::Down => Ok((gpu.upload(&p.w_down)?, None)),
            })
            .collect::<Result<_, GpuError>>()?;
        let (used, pairs) = (p.experts_used(), shape.pairs());
        let bytes = match stage {
            MoeStage::GateUp => 2 * used * shape.inter / 4 * shape.hidden + shape.tokens * shape.hidden + 4 * pairs * shape.inter,
            MoeStage::Down => used * shape.hidden / 4 * shape.inter + pairs * shape.inter + 4 * pairs * shape.hidden,
        };
        Ok(Self { stage, case, ring, bytes })
    }
}

impl Workload for MoeWorkload {
    fn check(&mut self, gpu: &Gpu, entry: &CacheEntry, rel_floor: f64) -> Result<Deltas, GpuError> {
        Ok(match self.stage {
            MoeStage::GateUp => self.case.run_gateup(gpu, &mut MoeGateUp::new(gpu, entry)?, rel_floor)?.deltas,
            MoeStage::Down => self.case.run_down(gpu, &mut MoeDown::new(gpu, entry)?, rel_floor)?.deltas,
        })
    }

    fn time(&mut self, gpu: &Gpu, entry: &CacheEntry, plan: TimingPlan) -> Result<TimingStats, GpuError> {
        let pairs = self.case.problem.shape.pairs();
        let n = self.ring.len() + 1;
        match self.stage {
            MoeStage::GateUp => {
                let mut op = MoeGateUp::new(gpu, entry)?;
                self.case.routing(gpu, op.shape.block_m)?;
                let MoeCase { w_gate, w_up, s_gate, s_up, q, x_scale, act, routings, .. } = &mut self.case;
                let routing = &routings[&op.shape.block_m];
                let ring = &self.ring;
                gpu.time_launches(plan, |i| {
                    let (wg, wu) = match i % n {
                        0 => (&*w_gate, &*w_up),
                        j => (&ring[j - 1].0, ring[j - 1].1.as_ref().expect("gate_up copies hold up")),
                    };
                    let w = ExpertWeights { w_gate: wg, w_up: wu, s_gate, s_up };
                    op.launch(gpu, (q.slice(..), x_scale.slice(..)), w, routing, pairs, act)
                })
            }
            MoeStage::Down => {
                let mut op = MoeDown::new(gpu, entry)?;
                self.case.routing(gpu, op.shape.block_m)?;
                let MoeCase { w_down, s_down, qa, qa_scale, out, routings, .. } = &mut self.case;
                let routing = &routings[&op.shape.block_m];
                let ring = &self.ring;
                gpu.time_launches(plan, |i| {
                    let wd = match i % n {
                        0 => &*w_down,
                        j => &ring[j - 1].0,
                    };
                    op.launch(gpu, (qa, qa_scale), DownWeights { w_down: wd, s_down }, routing, pairs, out)
                })
            }
        }
    }

    fn min_bytes(&self) -> usize {
        self.bytes
    }
}

/// A decode-step `rmsnorm_quant`: checked on 3 random rows, timed on one row (batch-1
/// decode) with its inputs hot in L2, as the previous kernel of the step leaves them.
pub struct NormWorkload {
    case: NormCase,
}

impl NormWorkload {
    pub fn new(gpu: &Gpu, shape: NormShape, seed: u64) -> Result<Self, GpuError> {
        Ok(Self { case: NormCase::new(gpu, shape, 3, seed)? })
    }
}

impl Workload for NormWorkload {
    fn check(&mut self, gpu: &Gpu, entry: &CacheEntry, rel_floor: f64) -> Result<Deltas, GpuError> {
        Ok(self.case.run(gpu, &RmsNormQuant::new(gpu, entry)?, rel_floor)?.deltas)
    }

    fn time(&mut self, gpu: &Gpu, entry: &CacheEntry, plan: TimingPlan) -> Result<TimingStats, GpuError> {
        let op = RmsNormQuant::new(gpu, entry)?;
        let case = &mut self.case;
        gpu.time_launches(plan, |_| case.launch_quant(gpu, &op, 1))
    }

    fn min_bytes(&self) -> usize {
        // f32 row(s) in (x and delta, or gate and up), x back (residual add), int8 row out.
        let h = self.case.shape.h;
        if self.case.shape.glu { 8 * h + h } else { 12 * h + h }
    }
}

/// Contexts (positions attended) of the attention workload's timing mix, at most MAX_POS.
pub const ATTENTION_CONTEXTS: &[usize] = &[64, 256, 1024, 3072];

/// Sequences per timed attention launch ([`mangrove_core::step::ATTENTION_BATCH`]): one query
/// row per sequence, the contexts cycling through [`ATTENTION_CONTEXTS`].
pub const ATTENTION_BATCH: usize = mangrove_core::step::ATTENTION_BATCH as usize;

/// Layers of the attention workload's KV arena: launches rotate over them, so a launch does not
/// find the previous launch's keys and values in L2.
const ATTENTION_LAYERS: usize = 2;

/// A decode-step `attention_decode`: checked on [`AttentionCase`]'s three sequences, timed on
/// [`ATTENTION_BATCH`] query rows per launch (one per sequence, contexts from
/// [`ATTENTION_CONTEXTS`]) with the KV cache rotated over layers.
pub struct AttentionWorkload {
    case: AttentionCase,
    shape: AttnShape,
    arena: KvArena,
    /// The batch's query rows, positions and slots.
    q: DeviceBuffer<f32>,
    pos: DeviceBuffer<i32>,
    slot: DeviceBuffer<i32>,
    out: DeviceBuffer<f32>,
}

impl AttentionWorkload {
    pub fn new(gpu: &Gpu, shape: AttnShape, seed: u64) -> Result<Self, GpuError> {
        let contexts = Self::contexts(shape);
        let mut arena = KvArena::new(gpu, shape.kv, ATTENTION_BATCH, ATTENTION_LAYERS, shape.max_pos, shape.kv_dim())?;
        // Any finite values time the same; a cheap pattern in [-1, 1) fills the arena and queries.
        let pattern = |n: usize| -> Vec<f32> { (0..n).map(|i| ((i.wrapping_mul(2654435761) >> 7) % 2048) as f32 / 1024.0 - 1.0).collect() };
        arena.write(gpu, &pattern(arena.len()))?;
        let pos: Vec<i32> = contexts.iter().map(|&n| n as i32 - 1).collect();
        let slot: Vec<i32> = (0..ATTENTION_BATCH as i32).collect();
        Ok(Self {
            case: AttentionCase::new(gpu, shape, seed)?,
            shape,
            arena,
            q: gpu.upload(&pattern(ATTENTION_BATCH * shape.q_dim()))?,
            pos: gpu.upload(&pos)?,
            slot: gpu.upload(&slot)?,
            out: gpu.zeros(ATTENTION_BATCH * shape.q_dim())?,
        })
    }

    /// Each sequence's context: [`ATTENTION_CONTEXTS`] in turn, at most MAX_POS.
    fn contexts(shape: AttnShape) -> Vec<usize> {
        (0..ATTENTION_BATCH).map(|r| ATTENTION_CONTEXTS[r % ATTENTION_CONTEXTS.len()].min(shape.max_pos)).collect()
    }
}

impl Workload for AttentionWorkload {
    fn check(&mut self, gpu: &Gpu, entry: &CacheEntry, rel_floor: f64) -> Result<Deltas, GpuError> {
        Ok(self.case.run(gpu, &Attention::new(gpu, entry)?, rel_floor)?.deltas)
    }

    fn time(&mut self, gpu: &Gpu, entry: &CacheEntry, plan: TimingPlan) -> Result<TimingStats, GpuError> {
        let op = Attention::new(gpu, entry)?;
        let mut scratch = op.scratch(gpu, ATTENTION_BATCH)?;
        let (arena, out, meta) = (&self.arena, &mut self.out, RowMeta { pos: &self.pos, slot: &self.slot });
        gpu.time_launches(plan, |i| op.launch(gpu, ATTENTION_BATCH, &self.q, &meta, arena, i % arena.layers, out, &mut scratch))
    }

    fn min_bytes(&self) -> usize {
        // Keys and values of every attended position of the batch, plus q in and out.
        let kv: usize = Self::contexts(self.shape).iter().map(|&n| 2 * n * self.shape.kv_dim() * 4).sum();
        kv + 8 * ATTENTION_BATCH * self.shape.q_dim()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_exceeds_twice_l2() {
        let l2 = 50 << 20;
        assert_eq!(rotation_count(1 << 10, l2), 4096, "tiny inputs are capped");
        for bytes in [1 << 16, 1_638_400, 4_423_680, 82 << 20] {
            let n = rotation_count(bytes, l2);
            assert!(n * bytes >= 2 * l2, "{bytes}: {n}");
            assert!((n - 1) * bytes < 2 * l2 || n == 1);
        }
    }
}
