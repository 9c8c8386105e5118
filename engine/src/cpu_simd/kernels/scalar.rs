//! The portable kernels: plain Rust over the row-quad layout, any CPU. They are also what each
//! SIMD path is tested against (bit for bit: all paths sum integers exactly).

/// Raw sums of `rows` byte rows of `w` (`[rows][kp]`) with `m` token rows of `x` (`[m][kp]`):
/// `acc[(r·m + t)·4 + q] = Σ_c code_q(w[r][c]) · x[t][c]` (codes are `w + 1`).
pub fn ternary_block(w: &[u8], kp: usize, rows: usize, x: &[i8], m: usize, acc: &mut [i32]) {
    for r in 0..rows {
        let wr = &w[r * kp..][..kp];
        for t in 0..m {
            let xt = &x[t * kp..][..kp];
            let mut s = [0i32; 4];
            for (&b, &v) in wr.iter().zip(xt) {
                let v = v as i32;
                s[0] += (b & 3) as i32 * v;
                s[1] += ((b >> 2) & 3) as i32 * v;
                s[2] += ((b >> 4) & 3) as i32 * v;
                s[3] += (b >> 6) as i32 * v;
            }
            acc[(r * m + t) * 4..][..4].copy_from_slice(&s);
        }
    }
}

/// bf16 bits → f32 (exact).
#[inline(always)]
pub fn bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Dense rows of bf16 `w` (`[rows][h]`) times `m` f32 token rows `x` (`[m][h]`):
/// `out[r·m + t] = Σ_c w[r][c] · x[t][c]`, summed in 8 interleaved f32 lanes.
pub fn bf16_block(w: &[u16], h: usize, rows: usize, x: &[f32], m: usize, out: &mut [f32]) {
    for r in 0..rows {
        let wr = &w[r * h..][..h];
        for t in 0..m {
            let xt = &x[t * h..][..h];
            let mut lanes = [0f32; 8];
            let mut wc = wr.chunks_exact(8);
            let mut xc = xt.chunks_exact(8);
            for (a, b) in (&mut wc).zip(&mut xc) {
                for i in 0..8 {
                    lanes[i] += bf16(a[i]) * b[i];
                }
            }
            let tail: f32 = wc.remainder().iter().zip(xc.remainder()).map(|(&a, &b)| bf16(a) * b).sum();
            out[r * m + t] = lanes.iter().sum::<f32>() + tail;
        }
    }
}

/// Dense f32 rows (`[rows][h]`) times `m` token rows: as [`bf16_block`] for f32 weights.
pub fn f32_block(w: &[f32], h: usize, rows: usize, x: &[f32], m: usize, out: &mut [f32]) {
    for r in 0..rows {
        let wr = &w[r * h..][..h];
        for t in 0..m {
            out[r * m + t] = dot(wr, &x[t * h..][..h]);
        }
    }
}

/// f32 dot product in 8 interleaved lanes (vectorizes on any target).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut ac = a.chunks_exact(8);
    let mut bc = b.chunks_exact(8);
    for (x, y) in (&mut ac).zip(&mut bc) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}
