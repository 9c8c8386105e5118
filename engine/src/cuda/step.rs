//! One forward step on the device: the step's buffers ([`Workspace`], sized for a number of
//! token rows) and the launch sequence over them ([`enqueue`]). The sequence only reads
//! per-row metadata (tokens, positions, KV slots, last rows) from device buffers, so the same
//! launches, captured once as a CUDA graph, serve every step with the same row/sequence counts.

use mangrove_core::step::Family;
use mangrove_core::model_config::ModelConfig;
use mangrove_core::gpu::{AttnScratch, DeviceBuffer, Gpu, GpuError, KvArena, LayerScratch, LayerWeights, NormOut, NormSource, RowMeta, Spans};

use super::kernels::StepKernels;
use super::moe::{moe_ffn, MoeWork};
use super::weights::{DeviceFfn, DeviceMlp, DeviceWeights};

/// Device buffers of a step of up to `rows` token rows.
pub struct Workspace {
    pub rows: usize,
    /// f32 residual stream [rows, H].
    x: DeviceBuffer<f32>,
    /// int8 activations [rows, max(H, QD, I)] and their per-row scales.
    q: DeviceBuffer<i8>,
    x_scale: DeviceBuffer<f32>,
    /// f32 linear outputs (unscaled: consumers apply the weight factors).
    qkv: DeviceBuffer<f32>,
    o: DeviceBuffer<f32>,
    gate_up: DeviceBuffer<f32>,
    down: DeviceBuffer<f32>,
    /// f32 rotated queries and attention outputs [rows, QD].
    q_rot: DeviceBuffer<f32>,
    attn: DeviceBuffer<f32>,
    /// f32 final-norm rows [rows, H].
    xn: DeviceBuffer<f32>,
    /// bf16 final-norm rows [rows, H]: the cuBLAS LM head's input.
    xb: DeviceBuffer<u16>,
    /// Split-K workspace of the attention kernel.
    attn_scratch: AttnScratch,
    pub tokens: DeviceBuffer<i32>,
    pub pos: DeviceBuffer<i32>,
    pub slot: DeviceBuffer<i32>,
    /// Row index of each sequence's last token.
    pub last: DeviceBuffer<i32>,
    /// f32 logits [sequences ≤ rows, vocab].
    pub logits: DeviceBuffer<f32>,
    /// The GPU sampler's inputs (rule rows [rows, 4], uniforms [rows]) and picks [rows].
    pub rules: DeviceBuffer<f32>,
    pub u: DeviceBuffer<f64>,
    pub picked: DeviceBuffer<i32>,
    /// MoE models: the per-pair buffers.
    moe: Option<MoeWork>,
    /// The fused layer's cross-block buffers, when it is loaded.
    layer: Option<LayerScratch>,
}

impl Workspace {
    pub fn new(gpu: &Gpu, c: &ModelConfig, k: &StepKernels, rows: usize) -> Result<Self, GpuError> {
        let (h, qd, kvd) = (c.hidden, c.q_dim(), c.kv_dim());
        Ok(Self {
            rows,
            x: gpu.zeros(rows * h)?,
            q: gpu.zeros(rows * h.max(qd).max(c.inter))?,
            x_scale: gpu.zeros(rows)?,
            qkv: gpu.zeros(rows * (qd + 2 * kvd))?,
            o: gpu.zeros(rows * h)?,
            gate_up: gpu.zeros(rows * 2 * c.inter)?,
            down: gpu.zeros(rows * h)?,
            q_rot: gpu.zeros(rows * qd)?,
            attn: gpu.zeros(rows * qd)?,
            xn: gpu.zeros(rows * h)?,
            xb: gpu.zeros(rows * h)?,
            attn_scratch: k.attention.scratch(gpu, rows)?,
            tokens: gpu.zeros(rows)?,
            pos: gpu.zeros(rows)?,
            slot: gpu.zeros(rows)?,
            last: gpu.zeros(rows)?,
            logits: gpu.zeros(rows * c.vocab)?,
            rules: gpu.zeros(rows * 4)?,
            u: gpu.zeros(rows)?,
            picked: gpu.zeros(rows)?,
            moe: c.moe.map(|m| MoeWork::new(gpu, c, &m, rows.min(k.moe.as_ref().map_or(rows, |mk| mk.max_rows())))).transpose()?,
            layer: k.fused.as_ref().map(|f| f.scratch(gpu)).transpose()?,
        })
    }
}

/// How many token rows a step runs, how many sequences they belong to (one logits row each),
/// and whether it ends with the GPU sampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StepShape {
    pub rows: usize,
    pub seqs: usize,
    pub sample: bool,
}

impl StepShape {
    /// Whether the LM head runs on cuBLAS: two or more sequences of one row each (every row is a
    /// last row, in order, so no gather), and `k` has a handle.
    pub fn blas_head(self, k: &StepKernels) -> bool {
        k.blas_head.is_some() && self.seqs >= 2 && self.rows == self.seqs
    }
}

/// Queues the whole forward of a step's token rows on the GPU's stream:
/// embedding + norm, per layer QKV → RoPE/KV append → attention → sub-norm → O → residual +
/// norm → gate_up → GLU + sub-norm → down (or the MoE block, [`moe_ffn`]) → residual + next
/// norm, then the LM head over each sequence's last row. Row metadata must already be in `ws`.
/// With `spans`, every launch is followed by a labelled event (a profile; not while capturing a
/// graph). MoE layers route on the device too, so MoE steps are captured like dense ones.
#[allow(clippy::too_many_arguments)] // the step's parts, named
pub fn enqueue(
    gpu: &Gpu,
    k: &mut StepKernels,
    w: &DeviceWeights,
    ws: &mut Workspace,
    kv: &mut KvArena,
    c: &ModelConfig,
    shape: StepShape,
    mut spans: Option<&mut Spans>,
) -> Result<(), GpuError> {
    let mut mark = |label: &'static str| -> Result<(), GpuError> {
        match spans.as_deref_mut() {
            Some(s) => s.mark(gpu, label),
            None => Ok(()),
        }
    };
    let eps = c.rms_eps as f32;
    let theta = c.rope_theta as f32;
    let StepShape { rows, seqs, .. } = shape;
    let blas_head = shape.blas_head(k);
    let first = w.layers.first().map_or(&w.norm, |l| &l.input_norm);
    k.norm.launch(gpu, rows, NormSource::Embed { x: &mut ws.x, tokens: &ws.tokens, table: &w.embed }, Some(first), eps, NormOut::Quant { q: &mut ws.q, scale: &mut ws.x_scale })?;
    mark("embedding+rmsnorm")?;
    if let (Some(fused), Some(scratch), (1, 1)) = (&k.fused, ws.layer.as_mut(), (rows, seqs)) {
        // Batch-1 decode: each layer is one persistent kernel; the residual row stays in ws.x.
        for (li, l) in w.layers.iter().enumerate() {
            let DeviceFfn::Dense { mlp: DeviceMlp { gate_up, gate_up_factors: [fg, fu], down, down_factor }, sub_norm } = &l.ffn else {
                return Err(GpuError::Shape { kernel: "decode_layer".into(), what: "an MoE layer has no fused kernel".into() });
            };
            let [fq, fk, fv] = l.qkv_factors;
            let lw = LayerWeights {
                qkv: &l.qkv,
                o: &l.o,
                gate_up,
                down,
                input_norm: &l.input_norm,
                attn_sub_norm: &l.attn_sub_norm,
                post_attn_norm: &l.post_attn_norm,
                ffn_sub_norm: sub_norm,
                factors: [fq, fk, fv, l.o_factor, *fg, *fu, *down_factor],
            };
            fused.launch(gpu, &mut ws.x, &lw, (eps, theta), &RowMeta { pos: &ws.pos, slot: &ws.slot }, kv, li, scratch)?;
            mark(Family::DecodeLayer.as_str())?;
        }
        k.norm.launch(gpu, 1, NormSource::Rows { x: &ws.x }, Some(&w.norm), eps, NormOut::F32(&mut ws.xn))?;
        mark("final rmsnorm")?;
        k.lm_head.launch(gpu, w.head(), &ws.xn, &ws.last, 1, &mut ws.logits)?;
        mark(Family::LmHead.as_str())?;
        return sample(gpu, k, ws, shape, &mut mark);
    }
    for (li, l) in w.layers.iter().enumerate() {
        let meta = RowMeta { pos: &ws.pos, slot: &ws.slot };
        k.qkv.launch(gpu, &l.qkv, rows, &ws.q, &ws.x_scale, &mut ws.qkv)?;
        mark(Family::AttnQkv.as_str())?;
        k.rope.launch(gpu, rows, &ws.qkv, l.qkv_factors, &meta, kv, li, theta, &mut ws.q_rot)?;
        mark(Family::Rope.as_str())?;
        k.attention.launch(gpu, rows, &ws.q_rot, &meta, kv, li, &mut ws.attn, &mut ws.attn_scratch)?;
        mark(Family::Attention.as_str())?;
        k.attn_sub_norm.launch(gpu, rows, NormSource::Rows { x: &ws.attn }, Some(&l.attn_sub_norm), eps, NormOut::Quant { q: &mut ws.q, scale: &mut ws.x_scale })?;
        mark(Family::AttnSubNorm.as_str())?;
        k.o.launch(gpu, &l.o, rows, &ws.q, &ws.x_scale, &mut ws.o)?;
        mark(Family::AttnO.as_str())?;
        let residual = NormSource::Residual { x: &mut ws.x, delta: &ws.o, factor: l.o_factor };
        let down_factor = match &l.ffn {
            DeviceFfn::Dense { mlp: DeviceMlp { gate_up, gate_up_factors: [gate, up], down, down_factor }, sub_norm } => {
                let mlp = k.mlp.as_mut().expect("dense kernels are loaded for a dense model");
                k.norm.launch(gpu, rows, residual, Some(&l.post_attn_norm), eps, NormOut::Quant { q: &mut ws.q, scale: &mut ws.x_scale })?;
                mark("residual+rmsnorm")?;
                mlp.gate_up.launch(gpu, gate_up, rows, &ws.q, &ws.x_scale, &mut ws.gate_up)?;
                mark(Family::MlpGateUp.as_str())?;
                let glu = NormSource::Glu { gate_up: &ws.gate_up, gate: *gate, up: *up, row_factors: None };
                mlp.sub_norm.launch(gpu, rows, glu, Some(sub_norm), eps, NormOut::Quant { q: &mut ws.q, scale: &mut ws.x_scale })?;
                mark("mlp_glu+sub_norm")?;
                mlp.down.launch(gpu, down, rows, &ws.q, &ws.x_scale, &mut ws.down)?;
                mark(Family::MlpDown.as_str())?;
                *down_factor
            }
            DeviceFfn::Moe(moe) => {
                let out = NormOut::QuantF32 { q: &mut ws.q, scale: &mut ws.x_scale, xn: &mut ws.xn };
                k.norm.launch(gpu, rows, residual, Some(&l.post_attn_norm), eps, out)?;
                mark("residual+rmsnorm")?;
                let kernels = k.moe.as_mut().expect("MoE kernels are loaded for an MoE model");
                let work = ws.moe.as_mut().expect("MoE buffers exist for an MoE model");
                let input = super::moe::MoeInput { q: &ws.q, x_scale: &ws.x_scale, xn: &ws.xn };
                moe_ffn(gpu, kernels, moe, c, rows, input, work, &mut ws.down, &mut mark)?;
                // The combine already applied each expert's down factor and router weight.
                1.0
            }
        };
        let residual = NormSource::Residual { x: &mut ws.x, delta: &ws.down, factor: down_factor };
        match w.layers.get(li + 1) {
            Some(next) => k.norm.launch(gpu, rows, residual, Some(&next.input_norm), eps, NormOut::Quant { q: &mut ws.q, scale: &mut ws.x_scale })?,
            None if blas_head => k.norm.launch(gpu, rows, residual, Some(&w.norm), eps, NormOut::Bf16(&mut ws.xb))?,
            None => k.norm.launch(gpu, rows, residual, Some(&w.norm), eps, NormOut::F32(&mut ws.xn))?,
        }
        mark("residual+rmsnorm")?;
    }
    match k.blas_head.as_ref().filter(|_| blas_head) {
        Some(blas) => blas.linear_f32_out(w.head(), &ws.xb, &mut ws.logits, (c.vocab, c.hidden), seqs)?,
        None => k.lm_head.launch(gpu, w.head(), &ws.xn, &ws.last, seqs, &mut ws.logits)?,
    }
    mark(Family::LmHead.as_str())?;
    sample(gpu, k, ws, shape, &mut mark)
}

/// The GPU sampler over the step's logits, when the step samples.
fn sample(gpu: &Gpu, k: &StepKernels, ws: &mut Workspace, shape: StepShape, mark: &mut impl FnMut(&'static str) -> Result<(), GpuError>) -> Result<(), GpuError> {
    match (shape.sample, &k.sample) {
        (true, Some(sampler)) => {
            sampler.launch(gpu, shape.seqs, &ws.logits, &ws.rules, &ws.u, &mut ws.picked)?;
            mark(Family::Sample.as_str())
        }
        _ => Ok(()),
    }
}
