//! The MoE block of a step (Qwen3-MoE style, ternary experts): router logits on the GPU, top-k
//! routing on the host (the reference's [`route`], so ties and renormalization match), then per
//! (token, expert) pair its expert's fused gate|up GEMV, SiLU·up quantized per pair, its down
//! GEMV, and the weighted combine per token. Pairs are token-major (pair = token · top-k + slot).
//! The host round trip makes MoE steps synchronous (no CUDA graph).

use mangrove_core::step::Family;
use mangrove_core::model_config::{ModelConfig, MoeConfig};
use mangrove_core::reference::moe::route;
use mangrove_core::gpu::{DeviceBuffer, Gpu, GpuError, NormOut, NormSource};

use super::kernels::MoeKernels;
use super::weights::DeviceMlp;

/// Per-pair device buffers of an MoE step of up to `rows` tokens.
pub struct MoeWork {
    /// 0..rows: the router reads every row.
    iota: DeviceBuffer<i32>,
    logits: DeviceBuffer<f32>,
    /// (gate, up) factor of each pair's expert, [pairs, 2].
    factors: DeviceBuffer<f32>,
    /// Router weight × the expert's down factor, [pairs].
    weights: DeviceBuffer<f32>,
    gate_up: DeviceBuffer<f32>,
    q: DeviceBuffer<i8>,
    q_scale: DeviceBuffer<f32>,
    down: DeviceBuffer<f32>,
}

impl MoeWork {
    pub fn new(gpu: &Gpu, c: &ModelConfig, m: &MoeConfig, rows: usize) -> Result<Self, GpuError> {
        let pairs = rows * m.topk;
        Ok(Self {
            iota: gpu.upload(&(0..rows as i32).collect::<Vec<_>>())?,
            logits: gpu.zeros(rows * m.experts)?,
            factors: gpu.zeros(pairs * 2)?,
            weights: gpu.zeros(pairs)?,
            gate_up: gpu.zeros(pairs * 2 * m.inter)?,
            q: gpu.zeros(pairs * m.inter)?,
            q_scale: gpu.zeros(pairs)?,
            down: gpu.zeros(pairs * c.hidden)?,
        })
    }
}

/// The block's input: the post-attention norm's rows, int8 (experts) and f32 (router).
pub struct MoeInput<'a> {
    pub q: &'a DeviceBuffer<i8>,
    pub x_scale: &'a DeviceBuffer<f32>,
    pub xn: &'a DeviceBuffer<f32>,
}

/// Runs the MoE block over `rows` tokens and writes each token's combined output to `out`
/// [rows, H] (router weights and down scales applied).
#[allow(clippy::too_many_arguments)] // the block's parts, named
pub fn moe_ffn(
    gpu: &Gpu,
    k: &mut MoeKernels,
    router: &DeviceBuffer<u16>,
    experts: &[DeviceMlp],
    c: &ModelConfig,
    rows: usize,
    input: MoeInput,
    work: &mut MoeWork,
    out: &mut DeviceBuffer<f32>,
    mark: &mut dyn FnMut(&'static str) -> Result<(), GpuError>,
) -> Result<(), GpuError> {
    let m = c.moe.expect("an MoE layer has an MoE config");
    k.router.launch(gpu, router, input.xn, &work.iota, rows, &mut work.logits)?;
    mark(Family::MoeRouter.as_str())?;
    let logits = gpu.download_prefix(&work.logits, rows * m.experts)?;
    let mut pair_expert = Vec::with_capacity(rows * m.topk);
    let mut factors = Vec::with_capacity(rows * m.topk * 2);
    let mut weights = Vec::with_capacity(rows * m.topk);
    for row in logits.chunks_exact(m.experts) {
        let row: Vec<f64> = row.iter().map(|&v| v as f64).collect();
        for (e, w) in route(&row, m.topk, m.norm_topk_prob) {
            let ex = &experts[e];
            pair_expert.push(e);
            factors.extend(ex.gate_up_factors);
            weights.push((w * ex.down_factor as f64) as f32);
        }
    }
    gpu.write(&factors, &mut work.factors)?;
    gpu.write(&weights, &mut work.weights)?;
    for (p, &e) in pair_expert.iter().enumerate() {
        k.gate_up.launch_w2a8_rows(gpu, &experts[e].gate_up, input.q, input.x_scale, (p / m.topk, p), 1, &mut work.gate_up, 1.0)?;
    }
    mark(Family::MoeGateUp.as_str())?;
    let pairs = pair_expert.len();
    let glu = NormSource::Glu { gate_up: &work.gate_up, gate: 1.0, up: 1.0, row_factors: Some(&work.factors) };
    let quant = NormOut::Quant { q: &mut work.q, scale: &mut work.q_scale };
    k.glu.launch(gpu, pairs, glu, None, 0.0, quant)?;
    mark(Family::MoeGlu.as_str())?;
    for (p, &e) in pair_expert.iter().enumerate() {
        k.down.launch_w2a8_rows(gpu, &experts[e].down, &work.q, &work.q_scale, (p, p), 1, &mut work.down, 1.0)?;
    }
    mark(Family::MoeDown.as_str())?;
    k.combine.launch(gpu, rows, &work.down, &work.weights, out)?;
    mark(Family::MoeCombine.as_str())
}
