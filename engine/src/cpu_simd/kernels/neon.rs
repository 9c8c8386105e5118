//! The aarch64 NEON kernels (compiled only there). Ternary × int8 over the row-quad layout:
//! 16 weight bytes give four rows' codes by shift + mask; `smull`/`smlal2` multiply code ×
//! activation into i16 (|2·2·128| fits), `sadalp` folds the pairs into int32 — exact, so equal
//! to [`super::scalar::ternary_block`] bit for bit. The bf16 LM head widens bf16 by a 16-bit
//! shift and sums with `fmla`.
//!
//! Safety contract of every `unsafe fn` here: the caller has checked NEON ([`super::Kernels`])
//! and passes slices of the sizes documented on the scalar twins (`kp % 64 == 0`).

use std::arch::aarch64::*;

#[inline(always)]
unsafe fn row<const T: usize>(w: *const u8, kp: usize, x: *const i8, out: *mut i32) {
    // SAFETY: `w` has kp bytes, `x` T rows of kp bytes, `out` 4·T int32 (module contract).
    unsafe {
        let mask = vdupq_n_u8(3);
        let mut acc = [[vdupq_n_s32(0); 4]; T];
        let mut c = 0;
        while c < kp {
            let v = vld1q_u8(w.add(c));
            let codes = [
                vreinterpretq_s8_u8(vandq_u8(v, mask)),
                vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8::<2>(v), mask)),
                vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8::<4>(v), mask)),
                vreinterpretq_s8_u8(vshrq_n_u8::<6>(v)),
            ];
            for (t, a) in acc.iter_mut().enumerate() {
                let xv = vld1q_s8(x.add(t * kp + c));
                for q in 0..4 {
                    let p = vmull_s8(vget_low_s8(codes[q]), vget_low_s8(xv));
                    let p = vmlal_high_s8(p, codes[q], xv);
                    a[q] = vpadalq_s16(a[q], p);
                }
            }
            c += 16;
        }
        for (t, a) in acc.iter().enumerate() {
            for q in 0..4 {
                *out.add(4 * t + q) = vaddvq_s32(a[q]);
            }
        }
    }
}

/// NEON twin of [`super::scalar::ternary_block`].
///
/// # Safety
/// The CPU has NEON; `kp % 64 == 0`, `w` holds `rows·kp` bytes, `x` `m·kp`, `acc` `rows·m·4`.
#[target_feature(enable = "neon")]
pub unsafe fn ternary_block_neon(w: &[u8], kp: usize, rows: usize, x: &[i8], m: usize, acc: &mut [i32]) {
    debug_assert!(kp % 64 == 0 && w.len() >= rows * kp && x.len() >= m * kp && acc.len() >= rows * m * 4);
    for r in 0..rows {
        // SAFETY: the bounds are the ones asserted above (module contract).
        unsafe {
            let wr = w.as_ptr().add(r * kp);
            let mut t = 0;
            while t < m {
                let out = acc.as_mut_ptr().add((r * m + t) * 4);
                if m - t >= 2 {
                    row::<2>(wr, kp, x.as_ptr().add(t * kp), out);
                    t += 2;
                } else {
                    row::<1>(wr, kp, x.as_ptr().add(t * kp), out);
                    t += 1;
                }
            }
        }
    }
}

/// NEON twin of [`super::scalar::bf16_block`].
///
/// # Safety
/// The CPU has NEON; `w` holds `rows·h` values, `x` `m·h`, `out` `rows·m`.
#[target_feature(enable = "neon")]
pub unsafe fn bf16_block_neon(w: &[u16], h: usize, rows: usize, x: &[f32], m: usize, out: &mut [f32]) {
    debug_assert!(w.len() >= rows * h && x.len() >= m * h && out.len() >= rows * m);
    let main = h / 8 * 8;
    for r in 0..rows {
        for t in 0..m {
            // SAFETY: the bounds are the ones asserted above (module contract).
            unsafe {
                let wr = w.as_ptr().add(r * h);
                let xt = x.as_ptr().add(t * h);
                let (mut a0, mut a1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
                let mut c = 0;
                while c < main {
                    let wv = vld1q_u16(wr.add(c));
                    let lo = vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(wv)));
                    let hi = vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_high_u16(wv)));
                    a0 = vfmaq_f32(a0, lo, vld1q_f32(xt.add(c)));
                    a1 = vfmaq_f32(a1, hi, vld1q_f32(xt.add(c + 4)));
                    c += 8;
                }
                let mut s = vaddvq_f32(vaddq_f32(a0, a1));
                for j in main..h {
                    s += super::scalar::bf16(*wr.add(j)) * *xt.add(j);
                }
                *out.add(r * m + t) = s;
            }
        }
    }
}
