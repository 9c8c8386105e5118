//! The model on the device: packed ternary weights with q|k|v and gate|up concatenated along
//! the packed rows (so each pair/triple is one GEMV launch; the consumers read the parts back
//! with the packed layout's column map), MoE experts stacked per projection along an expert
//! axis (the grouped kernels' layout), bf16 embeddings / LM head, f32 norm weights, and the
//! factor each linear's output is multiplied by (its `weight_scale`, or the inverse for
//! `linear_class: bitlinear`).

use half::bf16;

use mangrove_core::model_config::ScaleConvention;
use crate::model::{Ffn, Model, TernaryLinear};
use mangrove_core::gpu::{DeviceBuffer, Gpu, GpuError};

/// One decoder layer on the device.
pub struct DeviceLayer {
    pub input_norm: DeviceBuffer<f32>,
    /// Packed [(QD + 2 KVD) / 4, H]: q rows, then k, then v.
    pub qkv: DeviceBuffer<u8>,
    /// Output factors of q, k, v.
    pub qkv_factors: [f32; 3],
    pub attn_sub_norm: DeviceBuffer<f32>,
    pub o: DeviceBuffer<u8>,
    pub o_factor: f32,
    pub post_attn_norm: DeviceBuffer<f32>,
    pub ffn: DeviceFfn,
}

/// The feed-forward block of a layer on the device.
pub enum DeviceFfn {
    /// One gated MLP with a sub-norm before its down projection.
    Dense { mlp: DeviceMlp, sub_norm: DeviceBuffer<f32> },
    Moe(Box<DeviceMoe>),
}

/// An MoE block's weights on the device: the router and every expert's projections stacked
/// along a leading expert axis, as the grouped kernels read them, with per-expert factors.
pub struct DeviceMoe {
    /// bf16 router [experts, H].
    pub router: DeviceBuffer<u16>,
    /// Packed [E, I/4, H] each (the checkpoint's bytes per expert, back to back).
    pub w_gate: DeviceBuffer<u8>,
    pub w_up: DeviceBuffer<u8>,
    /// Packed [E, H/4, I].
    pub w_down: DeviceBuffer<u8>,
    /// Each expert's output factor per projection [E].
    pub s_gate: DeviceBuffer<f32>,
    pub s_up: DeviceBuffer<f32>,
    pub s_down: DeviceBuffer<f32>,
}

/// A dense gated MLP's ternary weights on the device.
pub struct DeviceMlp {
    /// Packed [2 I / 4, H]: gate rows, then up.
    pub gate_up: DeviceBuffer<u8>,
    pub gate_up_factors: [f32; 2],
    pub down: DeviceBuffer<u8>,
    pub down_factor: f32,
}

/// The whole model on the device.
pub struct DeviceWeights {
    /// bf16 [vocab, H].
    pub embed: DeviceBuffer<u16>,
    /// bf16 [vocab, H]; `None` when tied to `embed`.
    pub lm_head: Option<DeviceBuffer<u16>>,
    pub layers: Vec<DeviceLayer>,
    pub norm: DeviceBuffer<f32>,
}

impl DeviceWeights {
    /// Uploads a model (dense or MoE layers).
    pub fn upload(gpu: &Gpu, model: &Model) -> Result<Self, GpuError> {
        let conv = model.config.scale;
        let f32s = |v: &[f64]| -> Result<DeviceBuffer<f32>, GpuError> { gpu.upload(&v.iter().map(|&x| x as f32).collect::<Vec<_>>()) };
        let bf16s = |v: &[f32]| -> Result<DeviceBuffer<u16>, GpuError> { gpu.upload(&v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect::<Vec<_>>()) };
        let concat = |parts: &[&TernaryLinear]| -> Result<DeviceBuffer<u8>, GpuError> {
            gpu.upload(&parts.iter().flat_map(|l| l.packed.iter().copied()).collect::<Vec<u8>>())
        };
        let factor = |l: &TernaryLinear| -> f32 {
            (match conv {
                ScaleConvention::Multiply => l.scale,
                ScaleConvention::Divide => 1.0 / l.scale,
            }) as f32
        };
        let mlp = |gate: &TernaryLinear, up: &TernaryLinear, down: &TernaryLinear| -> Result<DeviceMlp, GpuError> {
            Ok(DeviceMlp {
                gate_up: concat(&[gate, up])?,
                gate_up_factors: [factor(gate), factor(up)],
                down: gpu.upload(&down.packed)?,
                down_factor: factor(down),
            })
        };
        let mut layers = Vec::with_capacity(model.layers.len());
        for layer in &model.layers {
            let ffn = match &layer.ffn {
                Ffn::Dense { gate, up, down, sub_norm } => DeviceFfn::Dense { mlp: mlp(gate, up, down)?, sub_norm: f32s(sub_norm)? },
                Ffn::Moe { router, experts } => {
                    let stacked = |part: fn(&crate::model::Expert) -> &TernaryLinear| -> Result<(DeviceBuffer<u8>, DeviceBuffer<f32>), GpuError> {
                        let parts: Vec<&TernaryLinear> = experts.iter().map(part).collect();
                        Ok((concat(&parts)?, gpu.upload(&parts.iter().map(|l| factor(l)).collect::<Vec<f32>>())?))
                    };
                    let ((w_gate, s_gate), (w_up, s_up), (w_down, s_down)) = (stacked(|e| &e.gate)?, stacked(|e| &e.up)?, stacked(|e| &e.down)?);
                    DeviceFfn::Moe(Box::new(DeviceMoe {
                        router: gpu.upload(&router.iter().map(|&x| bf16::from_f64(x).to_bits()).collect::<Vec<_>>())?,
                        w_gate,
                        w_up,
                        w_down,
                        s_gate,
                        s_up,
                        s_down,
                    }))
                }
            };
            layers.push(DeviceLayer {
                input_norm: f32s(&layer.input_norm)?,
                qkv: concat(&[&layer.q, &layer.k, &layer.v])?,
                qkv_factors: [factor(&layer.q), factor(&layer.k), factor(&layer.v)],
                attn_sub_norm: f32s(&layer.attn_sub_norm)?,
                o: gpu.upload(&layer.o.packed)?,
                o_factor: factor(&layer.o),
                post_attn_norm: f32s(&layer.post_attn_norm)?,
                ffn,
            });
        }
        Ok(Self {
            embed: bf16s(&model.embed)?,
            lm_head: model.lm_head.as_deref().map(bf16s).transpose()?,
            layers,
            norm: f32s(&model.norm)?,
        })
    }

    /// The LM head weights (the embeddings when tied).
    pub fn head(&self) -> &DeviceBuffer<u16> {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}
