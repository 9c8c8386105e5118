//! CPU references (f64) and the BitNet b1.58 packed layout: the one implementation that
//! tests, the tuner's correctness gate and the engine's CPU backend all compare against.
//! [`moe`] builds the MoE gate_up reference on [`ternary_linear`].

pub mod decode_ops;
pub mod moe;
pub mod sampling;

use rayon::prelude::*;

/// Packs ternary weights `w` (row-major [n, k], values in {-1, 0, 1}) into the HF BitNet
/// checkpoint layout: uint8 [n/4, k], byte (j, c) holds rows j + q*n/4 in bits 2q..2q+1 as w+1.
pub fn pack_ternary(w: &[i8], n: usize, k: usize) -> Vec<u8> {
    assert_eq!(w.len(), n * k, "weights must be n*k");
    assert_eq!(n % 4, 0, "n must be a multiple of 4");
    let n4 = n / 4;
    let mut out = vec![0u8; n4 * k];
    for (j, row) in out.chunks_mut(k).enumerate() {
        for (c, byte) in row.iter_mut().enumerate() {
            let mut b = 0u8;
            for q in 0..4 {
                let v = w[(j + q * n4) * k + c];
                debug_assert!((-1..=1).contains(&v));
                b |= ((v + 1) as u8 & 3) << (2 * q);
            }
            *byte = b;
        }
    }
    out
}

/// The ternary value of row `r`, column `c` of a packed [n/4, k] tensor.
#[inline]
pub fn ternary_at(packed: &[u8], n: usize, k: usize, r: usize, c: usize) -> i8 {
    let n4 = n / 4;
    let (q, j) = (r / n4, r % n4);
    ((packed[j * k + c] >> (2 * q)) & 3) as i8 - 1
}

/// Inverse of [`pack_ternary`].
pub fn unpack_ternary(packed: &[u8], n: usize, k: usize) -> Vec<i8> {
    (0..n * k).map(|i| ternary_at(packed, n, k, i / k, i % k)).collect()
}

/// y[m, r] = scale * sum_c W[r, c] * x[m, c] in f64, for packed W [n/4, k] and x [m, k].
pub fn ternary_linear(packed: &[u8], n: usize, k: usize, x: &[f64], m: usize, scale: f64) -> Vec<f64> {
    assert_eq!(packed.len(), n / 4 * k, "packed weights must be n/4*k bytes");
    assert_eq!(x.len(), m * k, "x must be m*k");
    let n4 = n / 4;
    let mut y = vec![0.0f64; m * n];
    // Walk the packed bytes once per (m, packed row) for speed; rows j + q*n4 share a byte.
    let rows: Vec<(usize, [f64; 4])> = (0..m * n4)
        .into_par_iter()
        .map(|idx| {
            let (mi, j) = (idx / n4, idx % n4);
            let xr = &x[mi * k..(mi + 1) * k];
            let mut acc = [0.0f64; 4];
            for (c, &b) in packed[j * k..(j + 1) * k].iter().enumerate() {
                for (q, a) in acc.iter_mut().enumerate() {
                    *a += (((b >> (2 * q)) & 3) as f64 - 1.0) * xr[c];
                }
            }
            (idx, acc)
        })
        .collect();
    for (idx, acc) in rows {
        let (mi, j) = (idx / n4, idx % n4);
        for (q, a) in acc.iter().enumerate() {
            y[mi * n + j + q * n4] = a * scale;
        }
    }
    y
}

/// BitNet's per-token activation quantization (transformers' offline AutoBitLinear): for each
/// row, s = 127 / max(|x|, 1e-5) and q = round_half_even(x * s) clamped to [-128, 127], in f32.
/// Returns (q [m, k], s [m]); the linear's output is then (q · W) / s * weight_scale.
pub fn quantize_per_token(x: &[f32], m: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    assert_eq!(x.len(), m * k, "x must be m*k");
    let mut q = Vec::with_capacity(m * k);
    let mut scales = Vec::with_capacity(m);
    for row in x.chunks(k.max(1)).take(m) {
        let max = row.iter().fold(0.0f32, |a, v| a.max(v.abs())).max(1e-5);
        let s = 127.0f32 / max;
        scales.push(s);
        q.extend(row.iter().map(|v| (v * s).round_ties_even().clamp(-128.0, 127.0) as i8));
    }
    (q, scales)
}

/// y[m, r] = weight_scale / s[m] * sum_c W[r, c] * q[m, c] in f64 (the W2A8 linear).
pub fn ternary_linear_w2a8(packed: &[u8], n: usize, k: usize, q: &[i8], s: &[f32], m: usize, weight_scale: f64) -> Vec<f64> {
    let qf: Vec<f64> = q.iter().map(|&v| v as f64).collect();
    let mut y = ternary_linear(packed, n, k, &qf, m, weight_scale);
    for (mi, row) in y.chunks_mut(n).enumerate() {
        row.iter_mut().for_each(|v| *v /= s[mi] as f64);
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_roundtrip_and_layout() {
        let (n, k) = (8, 3);
        let w: Vec<i8> = (0..n * k).map(|i| ((i * 7 + 3) % 3) as i8 - 1).collect();
        let p = pack_ternary(&w, n, k);
        assert_eq!(p.len(), 2 * 3);
        assert_eq!(unpack_ternary(&p, n, k), w);
        // Byte (0, 0) holds rows 0, 2, 4, 6 of column 0 at bits 0, 2, 4, 6.
        let expect = (0..4).fold(0u8, |b, q| b | (((w[q * 2 * k] + 1) as u8) << (2 * q)));
        assert_eq!(p[0], expect);
    }

    #[test]
    fn per_token_quantization_follows_bitnet() {
        let x = [0.5f32, -1.0, 0.25, 0.0, 2.0, -2.0, 1.0, 0.00390625];
        let (q, s) = quantize_per_token(&x, 2, 4);
        assert_eq!(s, vec![127.0, 63.5]);
        assert_eq!(q, vec![64, -127, 32, 0, 127, -127, 64, 0]); // 63.5 rounds to 64 (even), 0.248 to 0
        let (q0, s0) = quantize_per_token(&[0.0; 3], 1, 3);
        assert_eq!((q0, s0), (vec![0, 0, 0], vec![127.0 / 1e-5]));
    }

    #[test]
    fn linear_matches_dense() {
        let (n, k, m) = (8, 5, 2);
        let w: Vec<i8> = (0..n * k).map(|i| ((i * 5 + 1) % 3) as i8 - 1).collect();
        let x: Vec<f64> = (0..m * k).map(|i| i as f64 * 0.25 - 1.0).collect();
        let y = ternary_linear(&pack_ternary(&w, n, k), n, k, &x, m, 0.5);
        for mi in 0..m {
            for r in 0..n {
                let d: f64 = (0..k).map(|c| w[r * k + c] as f64 * x[mi * k + c]).sum::<f64>() * 0.5;
                assert!((y[mi * n + r] - d).abs() < 1e-12);
            }
        }
    }
}
