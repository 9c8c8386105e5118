//! The MoE block of a step (Qwen3-MoE style, ternary experts), all on the device: the router
//! GEMV → `moe_route` (softmax top-k + per-expert grouping, the reference's [`route`] and
//! [`align_block_size`]) → the grouped int8 `moe_gateup` with act(gate)·up fused → per-pair
//! int8 quantization → the grouped `moe_down` → `moe_combine` (router weights, slot order).
//! Nothing comes back to the host and every grid is sized for its bucket's largest routing, so
//! MoE steps are captured as CUDA graphs like dense ones. Pairs are token-major
//! (pair = token · top-k + slot); steps of more rows than the largest bucket run in chunks.
//!
//! [`route`]: mangrove_core::reference::moe::route
//! [`align_block_size`]: mangrove_core::routing::align_block_size

use mangrove_core::gpu::{DeviceBuffer, DownWeights, ExpertWeights, Gpu, GpuError, NormOut, NormSource, RouteOut};
use mangrove_core::model_config::{ModelConfig, MoeConfig};
use mangrove_core::step::Family;

use super::kernels::MoeKernels;
use super::weights::DeviceMoe;

/// Per-pair device buffers of one pass of the MoE block over up to `rows` tokens.
pub struct MoeWork {
    pub rows: usize,
    /// 0..rows: the router reads every row.
    iota: DeviceBuffer<i32>,
    /// f32 router logits [rows, E].
    logits: DeviceBuffer<f32>,
    /// Expert and router weight of each pair [rows·top-k].
    topk_ids: DeviceBuffer<i32>,
    topk_w: DeviceBuffer<f32>,
    /// f32 act(gate)·up rows [pairs, I], their int8 rows and scales.
    act: DeviceBuffer<f32>,
    q: DeviceBuffer<i8>,
    q_scale: DeviceBuffer<f32>,
    /// f32 down rows of each pair [pairs, H] (down factor applied).
    down: DeviceBuffer<f32>,
}

impl MoeWork {
    /// Buffers for passes of up to `rows` tokens.
    pub fn new(gpu: &Gpu, c: &ModelConfig, m: &MoeConfig, rows: usize) -> Result<Self, GpuError> {
        let pairs = rows * m.topk;
        Ok(Self {
            rows,
            iota: gpu.upload(&(0..rows as i32).collect::<Vec<_>>())?,
            logits: gpu.zeros(rows * m.experts)?,
            topk_ids: gpu.zeros(pairs)?,
            topk_w: gpu.zeros(pairs)?,
            act: gpu.zeros(pairs * m.inter)?,
            q: gpu.zeros(pairs * m.inter)?,
            q_scale: gpu.zeros(pairs)?,
            down: gpu.zeros(pairs * c.hidden)?,
        })
    }
}

/// The block's input: the post-attention norm's rows, int8 with per-token scales (experts)
/// and f32 (router).
pub struct MoeInput<'a> {
    pub q: &'a DeviceBuffer<i8>,
    pub x_scale: &'a DeviceBuffer<f32>,
    pub xn: &'a DeviceBuffer<f32>,
}

/// Queues the MoE block over `rows` tokens; each token's combined output (router weights and
/// down factors applied) goes to `out` [rows, H].
#[allow(clippy::too_many_arguments)] // the block's parts, named
pub fn moe_ffn(
    gpu: &Gpu,
    k: &mut MoeKernels,
    w: &DeviceMoe,
    c: &ModelConfig,
    rows: usize,
    input: MoeInput,
    work: &mut MoeWork,
    out: &mut DeviceBuffer<f32>,
    mark: &mut dyn FnMut(&'static str) -> Result<(), GpuError>,
) -> Result<(), GpuError> {
    let m = c.moe.expect("an MoE layer has an MoE config");
    let (h, topk) = (c.hidden, m.topk);
    let chunk = k.max_rows().min(work.rows);
    let gate_up = ExpertWeights { w_gate: &w.w_gate, w_up: &w.w_up, s_gate: &w.s_gate, s_up: &w.s_up };
    let down = DownWeights { w_down: &w.w_down, s_down: &w.s_down };
    let mut r0 = 0;
    while r0 < rows {
        let n = chunk.min(rows - r0);
        let pairs = n * topk;
        k.router.launch_view(gpu, &w.router, input.xn, work.iota.slice(r0..r0 + n), n, &mut work.logits)?;
        mark(Family::MoeRouter.as_str())?;
        let b = k.bucket(n);
        b.route.launch(gpu, &work.logits, n, RouteOut { topk_ids: &mut work.topk_ids, topk_w: &mut work.topk_w, routing: &mut b.routing })?;
        if let (Some(route), Some(routing)) = (&b.route_down, b.routing_down.as_mut()) {
            route.launch(gpu, &work.logits, n, RouteOut { topk_ids: &mut work.topk_ids, topk_w: &mut work.topk_w, routing })?;
        }
        mark(Family::MoeRoute.as_str())?;
        let x = (input.q.slice(r0 * h..(r0 + n) * h), input.x_scale.slice(r0..r0 + n));
        b.gate_up.launch(gpu, x, gate_up, &b.routing, pairs, &mut work.act)?;
        mark(Family::MoeGateUp.as_str())?;
        let quant = NormOut::Quant { q: &mut work.q, scale: &mut work.q_scale };
        k.glu.launch(gpu, pairs, NormSource::Rows { x: &work.act }, None, 0.0, quant)?;
        mark(Family::MoeGlu.as_str())?;
        let b = k.bucket(n);
        let routing_down = b.routing_down.as_ref().unwrap_or(&b.routing);
        b.down.launch(gpu, (&work.q, &work.q_scale), down, routing_down, pairs, &mut work.down)?;
        mark(Family::MoeDown.as_str())?;
        k.combine.launch(gpu, n, &work.down, &work.topk_w, out.slice_mut(r0 * h..(r0 + n) * h))?;
        mark(Family::MoeCombine.as_str())?;
        r0 += n;
    }
    Ok(())
}
