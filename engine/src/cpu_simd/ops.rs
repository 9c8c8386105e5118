//! The f32 row ops of a decode step around the ternary linears: RMSNorm fused with BitNet's
//! per-token int8 quantization ([`norm_quant`]), the gated activation, RoPE from a per-row
//! cos/sin table, and causal GQA attention of one query head over the f32 KV cache. The hot
//! ones are compiled twice — portable and with AVX2 + FMA — from one body, picked at run time
//! like the kernels; each follows the f64 reference (`mangrove_core::reference::decode_ops`)
//! formula for formula, in f32.

use mangrove_core::model_config::Activation;

use super::kernels::scalar::dot;

/// Per-token int8 activations of one row, as BitNet defines them (and the reference backend
/// computes them): `s = 127 / max(max|x|, 1e-5)`, `q = round_half_even(x·s).clamp(-128, 127)`.
/// Writes `q` into `out[..x.len()]` (the rest of `out`, the K padding, is zeroed) and returns
/// `(1/s, Σq)`.
#[inline(always)]
fn quant_body(x: &[f32], out: &mut [i8]) -> (f32, i32) {
    let max = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-5);
    let s = 127.0 / max;
    let mut sum = 0i32;
    for (o, &v) in out.iter_mut().zip(x) {
        let q = (v * s).round_ties_even().clamp(-128.0, 127.0) as i8;
        *o = q;
        sum += q as i32;
    }
    out[x.len()..].iter_mut().for_each(|o| *o = 0);
    (max / 127.0, sum)
}

/// RMSNorm `x / sqrt(mean(x²) + eps) · w` into `tmp`, then [`quantize`]d into `out`.
#[inline(always)]
fn norm_quant_body(x: &[f32], w: &[f32], eps: f32, tmp: &mut [f32], out: &mut [i8]) -> (f32, i32) {
    let r = 1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt();
    tmp.iter_mut().zip(x).zip(w).for_each(|((t, &v), &g)| *t = v * r * g);
    quant_body(&tmp[..x.len()], out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(x: &[f32], out: &mut [i8]) -> (f32, i32) {
    quant_body(x, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn norm_quant_avx2(x: &[f32], w: &[f32], eps: f32, tmp: &mut [f32], out: &mut [i8]) -> (f32, i32) {
    norm_quant_body(x, w, eps, tmp, out)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Quantizes one row (see `quant_body`): returns `(1/s, Σq)`; `out` is `kp` long.
pub fn quantize(x: &[f32], out: &mut [i8]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 + FMA checked just above.
        return unsafe { quantize_avx2(x, out) };
    }
    quant_body(x, out)
}

/// RMSNorm of one row with weight `w` then [`quantize`]: returns `(1/s, Σq)`. `tmp` holds the
/// normed row (`x.len()` values).
pub fn norm_quant(x: &[f32], w: &[f32], eps: f32, tmp: &mut [f32], out: &mut [i8]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 + FMA checked just above.
        return unsafe { norm_quant_avx2(x, w, eps, tmp, out) };
    }
    norm_quant_body(x, w, eps, tmp, out)
}

/// RMSNorm of one row into `out` (the final norm before the LM head).
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let r = 1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt();
    out.iter_mut().zip(x).zip(w).for_each(|((o, &v), &g)| *o = v * r * g);
}

/// SiLU `z · sigmoid(z)`.
#[inline(always)]
pub fn silu(z: f32) -> f32 {
    z / (1.0 + (-z).exp())
}

/// `out = act(g) · u` elementwise.
pub fn gate(act: Activation, g: &[f32], u: &[f32], out: &mut [f32]) {
    match act {
        Activation::Relu2 => out.iter_mut().zip(g).zip(u).for_each(|((o, &g), &u)| *o = g.max(0.0) * g.max(0.0) * u),
        Activation::Silu => out.iter_mut().zip(g).zip(u).for_each(|((o, &g), &u)| *o = silu(g) * u),
    }
}

/// `inv_freq_i = θ^(-2i/d)` for i < d/2 (f64, as the reference).
pub fn inv_freq(theta: f64, head_dim: usize) -> Vec<f64> {
    (0..head_dim / 2).map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64)).collect()
}

/// The cos/sin table of position `pos`: `cs[2i] = cos(pos·inv_i)`, `cs[2i+1] = sin(pos·inv_i)`.
pub fn rope_table(pos: usize, inv: &[f64], cs: &mut [f32]) {
    for (i, &f) in inv.iter().enumerate() {
        let (s, c) = (pos as f64 * f).sin_cos();
        cs[2 * i] = c as f32;
        cs[2 * i + 1] = s as f32;
    }
}

/// Rotary embedding (rotate_half: pairs (i, i + d/2)) of one head vector with a [`rope_table`].
pub fn rope(x: &mut [f32], cs: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (c, s) = (cs[2 * i], cs[2 * i + 1]);
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}

/// Causal attention of one query head `q` over positions `0..n` of the f32 cache (`k`, `v`:
/// `[positions][kv_dim]`, the head's values at `off..off + head_dim`): `out` =
/// Σ_p softmax_p(q·k_p / √d) v_p. `scores` holds at least `n` values.
#[allow(clippy::too_many_arguments)]
pub fn attend(q: &[f32], n: usize, k: &[f32], v: &[f32], kv_dim: usize, off: usize, scores: &mut [f32], out: &mut [f32]) {
    let d = q.len();
    let scale = 1.0 / (d as f32).sqrt();
    let scores = &mut scores[..n];
    for (p, s) in scores.iter_mut().enumerate() {
        *s = dot(q, &k[p * kv_dim + off..][..d]) * scale;
    }
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o = 0.0);
    for (p, &w) in scores.iter().enumerate() {
        let w = w * inv;
        out.iter_mut().zip(&v[p * kv_dim + off..][..d]).for_each(|(o, &v)| *o += w * v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_is_bitnets_per_token_int8() {
        let mut q = [1i8; 8];
        let (inv_s, sum) = quantize(&[1.0, -0.5, 0.25, 0.0], &mut q);
        assert_eq!(q, [127, -64, 32, 0, 0, 0, 0, 0]); // -63.5 → -64 (half to even), padding zeroed
        assert_eq!((inv_s, sum), (1.0 / 127.0, 95));
        let (inv_s, _) = quantize(&[0.0; 4], &mut q);
        assert_eq!(inv_s, 1e-5 / 127.0);
    }

    #[test]
    fn rope_matches_the_reference() {
        let mut a: Vec<f64> = (0..8).map(|i| i as f64 * 0.3 - 1.0).collect();
        let mut b: Vec<f32> = a.iter().map(|&v| v as f32).collect();
        mangrove_core::reference::decode_ops::rope(&mut a, 7, 10000.0);
        let mut cs = [0f32; 8];
        rope_table(7, &inv_freq(10000.0, 8), &mut cs);
        rope(&mut b, &cs);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - *y as f64).abs() < 1e-6);
        }
    }
}
