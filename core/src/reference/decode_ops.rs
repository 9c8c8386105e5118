//! f64 references of the decode step's row-wise ops: RMSNorm, RoPE, squared ReLU (SiLU is in
//! [`super::moe`]), softmax, and causal attention of one query head. The CPU engine runs on them and the `rmsnorm_quant` /
//! `attention_decode` checks ([`crate::validate::decode_ops`]) compare against them.

/// RMSNorm of every row of `x` (rows of `w.len()` values).
pub fn rmsnorm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(w.len()) {
        let r = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / w.len() as f64 + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(v, g)| v * r * g));
    }
    out
}

/// max(z, 0)² (BitNet's squared ReLU).
pub fn relu2(z: f64) -> f64 {
    z.max(0.0) * z.max(0.0)
}

/// Rotary embedding (rotate_half convention) of one head vector at `pos`.
pub fn rope(x: &mut [f64], pos: usize, theta: f64) {
    let half = x.len() / 2;
    for i in 0..half {
        let inv = theta.powf(-((2 * i) as f64) / x.len() as f64);
        let (sin, cos) = (pos as f64 * inv).sin_cos();
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos - b * sin;
        x[i + half] = b * cos + a * sin;
    }
}

/// Softmax of `v` in place.
pub fn softmax_in_place(v: &mut [f64]) {
    let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    v.iter_mut().for_each(|x| *x /= sum);
}

/// Causal attention of one query head `q` (head_dim values) over positions `0..n`: `out` =
/// Σ_p softmax_p(q·k_p / √head_dim) v_p, with `k(p)` / `v(p)` the head's key / value at p.
pub fn attend_head<'a, T: Copy + Into<f64> + 'a>(
    q: &[f64],
    n: usize,
    k: impl Fn(usize) -> &'a [T],
    v: impl Fn(usize) -> &'a [T],
    out: &mut [f64],
) {
    let scale = 1.0 / (q.len() as f64).sqrt();
    let mut w: Vec<f64> = (0..n).map(|p| q.iter().zip(k(p)).map(|(a, &b)| a * b.into()).sum::<f64>() * scale).collect();
    softmax_in_place(&mut w);
    out.iter_mut().for_each(|o| *o = 0.0);
    for (p, wp) in w.iter().enumerate() {
        out.iter_mut().zip(v(p)).for_each(|(o, &v)| *o += wp * v.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rmsnorm_rows_have_unit_rms_times_weight() {
        let x = [3.0, -4.0, 1.0, 1.0];
        let y = rmsnorm(&x, &[1.0, 2.0], 0.0);
        let r = (12.5f64).sqrt();
        assert!((y[0] - 3.0 / r).abs() < 1e-12 && (y[1] + 8.0 / r).abs() < 1e-12);
        assert!((y[2] - 1.0).abs() < 1e-12 && (y[3] - 2.0).abs() < 1e-12);
    }

    #[test]
    fn attention_weights_follow_the_scores() {
        // Two positions; q·k = 2 and 0 after scaling by 1/√2 → weights e²/(e²+1), 1/(e²+1).
        let q = [2f64.sqrt(), 2f64.sqrt()];
        let keys = [[1.0f32, 1.0], [0.0, 0.0]];
        let values = [[1.0f32, 0.0], [0.0, 1.0]];
        let mut out = [0.0; 2];
        attend_head(&q, 2, |p| &keys[p][..], |p| &values[p][..], &mut out);
        let e2 = 2f64.exp();
        assert!((out[0] - e2 / (e2 + 1.0)).abs() < 1e-12 && (out[1] - 1.0 / (e2 + 1.0)).abs() < 1e-12, "{out:?}");
        // One position: the value itself.
        attend_head(&q, 1, |p| &keys[p][..], |p| &values[p][..], &mut out);
        assert_eq!(out, [1.0, 0.0]);
    }
}
