//! The f64 reference CPU backend (`--backend cpu-ref`): the oracle the SIMD backend
//! ([`crate::cpu_simd`], `--backend cpu`) is tested against. Takes a [`Model`] and a
//! batch of sequences, each with its own [`KvCache`] and new tokens (a prompt chunk or one
//! decoded token); gives the next-token logits of every sequence. f64 activations, exact
//! integer ternary products through [`mangrove_core::reference::ternary_linear`], rayon inside.
//!
//! Ternary linear layers follow transformers' offline `AutoBitLinear`: per-token int8
//! activations `x_q = round_half_even(x * s).clamp(-128, 127)` with `s = 127 / max(max|x|, 1e-5)`,
//! then `y = (x_q W^T) / s * weight_scale` (or `/ (s * weight_scale)` for `linear_class: bitlinear`).

use std::sync::Arc;

use rayon::prelude::*;

use mangrove_core::model_config::{Activation, ModelConfig, ScaleConvention};
use mangrove_core::reference::decode_ops::{attend_head, relu2, rmsnorm, rope};
use mangrove_core::reference::moe::{route, silu};
use mangrove_core::reference::ternary_linear;
use mangrove_core::step::Family;

use crate::backend::{check_batch, Backend, ForwardError, KvCache, SeqInput, StepReport};
use crate::model::{Ffn, Model, TernaryLinear};

/// The CPU backend over a loaded model.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    model: Arc<Model>,
}

impl CpuBackend {
    /// Wraps a model.
    pub fn new(model: Arc<Model>) -> Self {
        CpuBackend { model }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu-ref"
    }

    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn forward(&self, batch: &mut [SeqInput]) -> Result<(Vec<Vec<f64>>, StepReport), ForwardError> {
        let logits = forward(&self.model, batch)?;
        Ok((logits, StepReport { paths: paths(&self.model.config), fallbacks: Vec::new() }))
    }
}

/// The (layer family, kernel variant) pairs one forward of this backend runs.
pub fn paths(cfg: &ModelConfig) -> Vec<(Family, &'static str)> {
    families(cfg).into_iter().map(|f| (f, VARIANT)).collect()
}

/// The layer families one forward of a CPU backend runs, in order.
pub fn families(cfg: &ModelConfig) -> Vec<Family> {
    use Family::*;
    let mut fams = vec![Embedding, Rmsnorm, AttnQkv, Rope, Attention, AttnO];
    match cfg.moe {
        None => fams.extend([MlpGateUp, MlpDown]),
        Some(_) => fams.extend([MoeRouter, MoeGateUp, MoeDown]),
    }
    fams.push(LmHead);
    fams
}

/// The kernel variant name this backend reports for every family.
pub const VARIANT: &str = "cpu_reference";

/// Per-token int8 activation quantization: `(x_q, s)` with `x ≈ x_q / s`.
pub fn act_quant(x: &[f64]) -> (Vec<f64>, f64) {
    let max = x.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-5);
    let s = 127.0 / max;
    (x.iter().map(|v| (v * s).round_ties_even().clamp(-128.0, 127.0)).collect(), s)
}

/// A ternary linear layer over `m` rows of `x` [m, k] → [m, n].
pub fn bitlinear(lin: &TernaryLinear, conv: ScaleConvention, x: &[f64], m: usize) -> Vec<f64> {
    let k = lin.k;
    let mut xq = Vec::with_capacity(m * k);
    let mut factor = Vec::with_capacity(m);
    for row in x.chunks_exact(k) {
        let (q, s) = act_quant(row);
        xq.extend(q);
        factor.push(match conv {
            ScaleConvention::Multiply => lin.scale / s,
            ScaleConvention::Divide => 1.0 / (s * lin.scale),
        });
    }
    // Integer activations times ternary weights: the f64 sums are exact.
    let mut y = ternary_linear(&lin.packed, lin.n, k, &xq, m, 1.0);
    for (row, f) in y.chunks_exact_mut(lin.n).zip(factor) {
        row.iter_mut().for_each(|v| *v *= f);
    }
    y
}

/// Runs one step for every sequence of `batch` and returns each one's last-position logits.
/// The caches grow by the new tokens; on error no cache is changed.
pub fn forward(model: &Model, batch: &mut [SeqInput]) -> Result<Vec<Vec<f64>>, ForwardError> {
    let c = &model.config;
    let (h, hd) = (c.hidden, c.head_dim);
    check_batch(c, batch)?;
    // Rows: every new token of every sequence, with its sequence and position.
    let mut rows: Vec<(usize, usize)> = Vec::new();
    let mut x: Vec<f64> = Vec::new();
    for (s, seq) in batch.iter().enumerate() {
        for (i, &t) in seq.tokens.iter().enumerate() {
            rows.push((s, seq.cache.len + i));
            x.extend(model.embed[t as usize * h..][..h].iter().map(|&v| v as f64));
        }
    }
    let m = rows.len();
    let conv = c.scale;
    let group = c.heads / c.kv_heads;
    for (li, layer) in model.layers.iter().enumerate() {
        let xn = rmsnorm(&x, &layer.input_norm, c.rms_eps);
        let mut q = bitlinear(&layer.q, conv, &xn, m);
        let mut k = bitlinear(&layer.k, conv, &xn, m);
        let v = bitlinear(&layer.v, conv, &xn, m);
        for (r, &(_, pos)) in rows.iter().enumerate() {
            q[r * c.q_dim()..][..c.q_dim()].chunks_exact_mut(hd).for_each(|hv| rope(hv, pos, c.rope_theta));
            k[r * c.kv_dim()..][..c.kv_dim()].chunks_exact_mut(hd).for_each(|hv| rope(hv, pos, c.rope_theta));
        }
        for (r, &(s, _)) in rows.iter().enumerate() {
            batch[s].cache.k[li].extend_from_slice(&k[r * c.kv_dim()..][..c.kv_dim()]);
            batch[s].cache.v[li].extend_from_slice(&v[r * c.kv_dim()..][..c.kv_dim()]);
        }
        let caches: Vec<&KvCache> = batch.iter().map(|s| &*s.cache).collect();
        let attn: Vec<f64> = rows
            .par_iter()
            .enumerate()
            .flat_map_iter(|(r, &(s, pos))| {
                let (kc, vc) = (&caches[s].k[li], &caches[s].v[li]);
                let mut out = vec![0.0; c.q_dim()];
                for head in 0..c.heads {
                    let kvh = head / group;
                    let qh = &q[r * c.q_dim() + head * hd..][..hd];
                    let k = |p: usize| &kc[p * c.kv_dim() + kvh * hd..][..hd];
                    let v = |p: usize| &vc[p * c.kv_dim() + kvh * hd..][..hd];
                    attend_head(qh, pos + 1, k, v, &mut out[head * hd..][..hd]);
                }
                out
            })
            .collect();
        let a = rmsnorm(&attn, &layer.attn_sub_norm, c.rms_eps);
        let o = bitlinear(&layer.o, conv, &a, m);
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        let y = rmsnorm(&x, &layer.post_attn_norm, c.rms_eps);
        let f = match &layer.ffn {
            Ffn::Dense { gate, up, down, sub_norm } => {
                let g = bitlinear(gate, conv, &y, m);
                let u = bitlinear(up, conv, &y, m);
                let act: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| activate(c.act, g) * u).collect();
                bitlinear(down, conv, &rmsnorm(&act, sub_norm, c.rms_eps), m)
            }
            Ffn::Moe { router, experts } => moe(c, router, experts, &y, m),
        };
        x.iter_mut().zip(&f).for_each(|(x, f)| *x += f);
    }
    for seq in batch.iter_mut() {
        seq.cache.len += seq.tokens.len();
    }
    // Logits of each sequence's last row only.
    let mut last = vec![0usize; batch.len()];
    rows.iter().enumerate().for_each(|(r, &(s, _))| last[s] = r);
    let head = model.lm_head();
    Ok(last
        .iter()
        .map(|&r| {
            let xn = rmsnorm(&x[r * h..][..h], &model.norm, c.rms_eps);
            head.par_chunks_exact(h).map(|w| w.iter().zip(&xn).map(|(&w, x)| w as f64 * x).sum()).collect()
        })
        .collect())
}

fn activate(act: Activation, z: f64) -> f64 {
    match act {
        Activation::Relu2 => relu2(z),
        Activation::Silu => silu(z),
    }
}

fn moe(c: &ModelConfig, router: &[f64], experts: &[crate::model::Expert], y: &[f64], m: usize) -> Vec<f64> {
    let (h, mc) = (c.hidden, c.moe.expect("MoE layer in an MoE config"));
    let routes: Vec<Vec<(usize, f64)>> = y
        .chunks_exact(h)
        .map(|row| {
            let logits: Vec<f64> = router.chunks_exact(h).map(|w| w.iter().zip(row).map(|(a, b)| a * b).sum()).collect();
            route(&logits, mc.topk, mc.norm_topk_prob)
        })
        .collect();
    let mut out = vec![0.0; m * h];
    for (e, ex) in experts.iter().enumerate() {
        let picks: Vec<(usize, f64)> =
            routes.iter().enumerate().flat_map(|(t, r)| r.iter().filter(|(re, _)| *re == e).map(move |&(_, w)| (t, w))).collect();
        if picks.is_empty() {
            continue;
        }
        let xe: Vec<f64> = picks.iter().flat_map(|&(t, _)| &y[t * h..][..h]).copied().collect();
        let g = bitlinear(&ex.gate, c.scale, &xe, picks.len());
        let u = bitlinear(&ex.up, c.scale, &xe, picks.len());
        let act: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| silu(g) * u).collect();
        let d = bitlinear(&ex.down, c.scale, &act, picks.len());
        for (i, &(t, w)) in picks.iter().enumerate() {
            out[t * h..][..h].iter_mut().zip(&d[i * h..][..h]).for_each(|(o, d)| *o += w * d);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn act_quant_rounds_half_to_even_and_clamps_scale() {
        let (q, s) = act_quant(&[1.0, -0.5, 0.25]);
        assert_eq!(s, 127.0);
        assert_eq!(q, vec![127.0, -64.0, 32.0]); // -63.5 → -64, 31.75 → 32
        let (q, s) = act_quant(&[0.0, 0.0]);
        assert_eq!((q, s), (vec![0.0, 0.0], 127.0 / 1e-5));
    }

    #[test]
    fn bitlinear_scale_multiplies_activation_scale_divides() {
        use mangrove_core::reference::pack_ternary;
        // W = [[1, 0, -1, 1], [0, 1, 1, 0], ...]; x = [2, -1, 0.5, 1]: s = 63.5.
        let w: Vec<i8> = vec![1, 0, -1, 1, 0, 1, 1, 0, -1, -1, 0, 0, 1, 1, 1, 1];
        let lin = TernaryLinear { packed: pack_ternary(&w, 4, 4), n: 4, k: 4, scale: 0.5 };
        let x = [2.0, -1.0, 0.5, 1.0];
        let (xq, s) = act_quant(&x);
        assert_eq!(xq, vec![127.0, -64.0, 32.0, 64.0]); // -63.5 → -64 (even), 31.75 → 32, 63.5 → 64
        let y = bitlinear(&lin, ScaleConvention::Multiply, &x, 1);
        let yd = bitlinear(&lin, ScaleConvention::Divide, &x, 1);
        for r in 0..4 {
            let dot: f64 = (0..4).map(|c| w[r * 4 + c] as f64 * xq[c]).sum();
            assert!((y[r] - dot / s * 0.5).abs() < 1e-12);
            assert!((yd[r] - dot / (s * 0.5)).abs() < 1e-12);
        }
        // Close to the unquantized product.
        assert!((y[0] - 0.5 * (2.0 - 0.5 + 1.0)).abs() < 0.02);
    }

    #[test]
    fn route_renormalizes_top_k() {
        let r = route(&[0.0, 2.0, 1.0, 2.0], 2, true);
        assert_eq!((r[0].0, r[1].0), (1, 3));
        assert!((r[0].1 - 0.5).abs() < 1e-12 && (r[1].1 - 0.5).abs() < 1e-12);
        let r = route(&[0.0, 0.0], 1, false);
        assert_eq!(r, vec![(0, 0.5)]);
    }

    #[test]
    fn rope_rotates_pairs() {
        let mut v = [1.0, 0.0, 0.0, 1.0];
        rope(&mut v, 0, 10000.0);
        assert_eq!(v, [1.0, 0.0, 0.0, 1.0]);
        rope(&mut v, 1, 10000.0);
        // Pair (0, 2) rotates by 1 rad; pair (1, 3) by 1e-2 rad.
        assert!((v[0] - 1f64.cos()).abs() < 1e-12 && (v[2] - 1f64.sin()).abs() < 1e-12);
        assert!((v[1] + 0.01f64.sin()).abs() < 1e-12);
    }
}
