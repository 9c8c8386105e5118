//! The x86-64 kernels. Ternary × int8 over the row-quad layout ([`super::super::repack`]): each
//! 32 (or 64) weight bytes give four rows' codes by shift + mask, each dotted with the same
//! activation bytes:
//! - AVX2: `vpmaddubsw` (u8 code × s8 activation, pairs summed into i16, never saturating:
//!   |2·2·128| = 512) accumulated in i16 over a K block of at most [`MAX_KBLOCK`] columns, then
//!   widened by `vpmaddwd` into int32;
//! - AVX-VNNI: VEX `vpdpbusd` (u8 × s8, four products summed straight into int32), issued
//!   through `asm!` so the crate keeps its 1.85 MSRV (the intrinsic is newer);
//! - AVX-512 VNNI: the same on 512-bit registers (only in builds by rustc ≥ 1.89, `mangrove_avx512`).
//!
//! All sums are exact integers, so every path equals the scalar one bit for bit. The bf16 LM
//! head runs on AVX2 + FMA (bf16 widened to f32 by a 16-bit shift, exact).
//!
//! Safety contract of every `unsafe fn` here: the caller has checked that the CPU has the
//! function's target features ([`super::Kernels`] does, once) and passes slices of the sizes
//! documented on the scalar twin in [`super::scalar`] (`kp % 64 == 0`).

use std::arch::asm;
use std::arch::x86_64::*;

/// Most columns the AVX2 kernel accumulates in i16 before widening (63 · 512 < 2^15; 32-column steps).
pub const MAX_KBLOCK: usize = 2016;

#[inline(always)]
unsafe fn codes256(w: *const u8) -> [__m256i; 4] {
    // SAFETY: the caller guarantees 32 readable bytes at `w` and AVX2.
    unsafe {
        let mask = _mm256_set1_epi8(3);
        let v = _mm256_loadu_si256(w as *const __m256i);
        [
            _mm256_and_si256(v, mask),
            _mm256_and_si256(_mm256_srli_epi16(v, 2), mask),
            _mm256_and_si256(_mm256_srli_epi16(v, 4), mask),
            _mm256_and_si256(_mm256_srli_epi16(v, 6), mask),
        ]
    }
}

/// The four int32 totals of four 8-lane accumulators, in order.
#[inline(always)]
unsafe fn hsum4(a: [__m256i; 4]) -> __m128i {
    // SAFETY: register-only AVX2 arithmetic; the caller has AVX2.
    unsafe {
        let h = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
        _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1))
    }
}

#[inline(always)]
unsafe fn row_avx2<const T: usize>(w: *const u8, kp: usize, x: *const i8, kblock: usize, out: *mut i32) {
    // SAFETY: `w` has kp bytes, `x` T rows of kp bytes, `out` 4·T int32 (the module contract).
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); 4]; T];
        let mut c = 0;
        while c < kp {
            let end = (c + kblock).min(kp);
            let mut a16 = [[_mm256_setzero_si256(); 4]; T];
            while c < end {
                let codes = codes256(w.add(c));
                for (t, a) in a16.iter_mut().enumerate() {
                    let xv = _mm256_loadu_si256(x.add(t * kp + c) as *const __m256i);
                    for q in 0..4 {
                        a[q] = _mm256_add_epi16(a[q], _mm256_maddubs_epi16(codes[q], xv));
                    }
                }
                c += 32;
            }
            for t in 0..T {
                for q in 0..4 {
                    acc[t][q] = _mm256_add_epi32(acc[t][q], _mm256_madd_epi16(a16[t][q], ones));
                }
            }
        }
        for (t, a) in acc.iter().enumerate() {
            _mm_storeu_si128(out.add(4 * t) as *mut __m128i, hsum4(*a));
        }
    }
}

/// AVX2 twin of [`super::scalar::ternary_block`]; `kblock` is a multiple of 32, at most [`MAX_KBLOCK`].
///
/// # Safety
/// The CPU has AVX2 + FMA; `kp % 64 == 0`, `w` holds `rows·kp` bytes, `x` `m·kp`, `acc` `rows·m·4`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn ternary_block_avx2(w: &[u8], kp: usize, rows: usize, x: &[i8], m: usize, kblock: usize, acc: &mut [i32]) {
    debug_assert!(kp % 64 == 0 && w.len() >= rows * kp && x.len() >= m * kp && acc.len() >= rows * m * 4);
    for r in 0..rows {
        // SAFETY: the bounds are the ones asserted above (module contract).
        unsafe {
            let wr = w.as_ptr().add(r * kp);
            let mut t = 0;
            while t < m {
                let out = acc.as_mut_ptr().add((r * m + t) * 4);
                if m - t >= 2 {
                    row_avx2::<2>(wr, kp, x.as_ptr().add(t * kp), kblock, out);
                    t += 2;
                } else {
                    row_avx2::<1>(wr, kp, x.as_ptr().add(t * kp), kblock, out);
                    t += 1;
                }
            }
        }
    }
}

/// `acc += Σ₄ u8(a) · s8(b)` per int32 lane (VEX-encoded AVX-VNNI `vpdpbusd`).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dpbusd256(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    let mut acc = acc;
    // SAFETY: a register-only instruction; the caller has checked AVX-VNNI.
    unsafe {
        asm!("{{vex}} vpdpbusd {acc}, {a}, {b}", acc = inout(ymm_reg) acc, a = in(ymm_reg) a, b = in(ymm_reg) b,
             options(pure, nomem, nostack, preserves_flags));
    }
    acc
}

#[inline(always)]
unsafe fn row_vnni<const T: usize>(w: *const u8, kp: usize, x: *const i8, out: *mut i32) {
    // SAFETY: as `row_avx2`.
    unsafe {
        let mut acc = [[_mm256_setzero_si256(); 4]; T];
        let mut c = 0;
        while c < kp {
            let codes = codes256(w.add(c));
            for (t, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_si256(x.add(t * kp + c) as *const __m256i);
                for q in 0..4 {
                    a[q] = dpbusd256(a[q], codes[q], xv);
                }
            }
            c += 32;
        }
        for (t, a) in acc.iter().enumerate() {
            _mm_storeu_si128(out.add(4 * t) as *mut __m128i, hsum4(*a));
        }
    }
}

/// AVX-VNNI twin of [`super::scalar::ternary_block`].
///
/// # Safety
/// The CPU has AVX-VNNI and AVX2; `kp % 64 == 0`, `w` holds `rows·kp` bytes, `x` `m·kp`, `acc` `rows·m·4`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn ternary_block_avx_vnni(w: &[u8], kp: usize, rows: usize, x: &[i8], m: usize, acc: &mut [i32]) {
    debug_assert!(kp % 64 == 0 && w.len() >= rows * kp && x.len() >= m * kp && acc.len() >= rows * m * 4);
    for r in 0..rows {
        // SAFETY: the bounds are the ones asserted above (module contract).
        unsafe {
            let wr = w.as_ptr().add(r * kp);
            let mut t = 0;
            while t < m {
                let out = acc.as_mut_ptr().add((r * m + t) * 4);
                if m - t >= 2 {
                    row_vnni::<2>(wr, kp, x.as_ptr().add(t * kp), out);
                    t += 2;
                } else {
                    row_vnni::<1>(wr, kp, x.as_ptr().add(t * kp), out);
                    t += 1;
                }
            }
        }
    }
}

#[cfg(mangrove_avx512)]
#[allow(clippy::incompatible_msrv)] // compiled only by rustc >= 1.89 (engine/build.rs)
#[inline(always)]
unsafe fn row_avx512<const T: usize>(w: *const u8, kp: usize, x: *const i8, out: *mut i32) {
    // SAFETY: as `row_avx2`, with AVX-512 F/BW/VNNI checked by the caller.
    unsafe {
        let mask = _mm512_set1_epi8(3);
        let mut acc = [[_mm512_setzero_si512(); 4]; T];
        let mut c = 0;
        while c < kp {
            let v = _mm512_loadu_si512(w.add(c) as *const _);
            let codes = [
                _mm512_and_si512(v, mask),
                _mm512_and_si512(_mm512_srli_epi16(v, 2), mask),
                _mm512_and_si512(_mm512_srli_epi16(v, 4), mask),
                _mm512_and_si512(_mm512_srli_epi16(v, 6), mask),
            ];
            for (t, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_si512(x.add(t * kp + c) as *const _);
                for q in 0..4 {
                    a[q] = _mm512_dpbusd_epi32(a[q], codes[q], xv);
                }
            }
            c += 64;
        }
        for (t, a) in acc.iter().enumerate() {
            let half = |v: __m512i| _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
            _mm_storeu_si128(out.add(4 * t) as *mut __m128i, hsum4([half(a[0]), half(a[1]), half(a[2]), half(a[3])]));
        }
    }
}

/// AVX-512 VNNI twin of [`super::scalar::ternary_block`].
///
/// # Safety
/// The CPU has AVX-512 F/BW/VNNI; `kp % 64 == 0`, `w` holds `rows·kp` bytes, `x` `m·kp`, `acc` `rows·m·4`.
#[cfg(mangrove_avx512)]
#[allow(clippy::incompatible_msrv)] // compiled only by rustc >= 1.89 (engine/build.rs)
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni")]
pub unsafe fn ternary_block_avx512_vnni(w: &[u8], kp: usize, rows: usize, x: &[i8], m: usize, acc: &mut [i32]) {
    debug_assert!(kp % 64 == 0 && w.len() >= rows * kp && x.len() >= m * kp && acc.len() >= rows * m * 4);
    for r in 0..rows {
        // SAFETY: the bounds are the ones asserted above (module contract).
        unsafe {
            let wr = w.as_ptr().add(r * kp);
            let mut t = 0;
            while t < m {
                let out = acc.as_mut_ptr().add((r * m + t) * 4);
                match m - t {
                    1 => row_avx512::<1>(wr, kp, x.as_ptr().add(t * kp), out),
                    2 => row_avx512::<2>(wr, kp, x.as_ptr().add(t * kp), out),
                    3 => row_avx512::<3>(wr, kp, x.as_ptr().add(t * kp), out),
                    _ => row_avx512::<4>(wr, kp, x.as_ptr().add(t * kp), out),
                }
                t += (m - t).min(4);
            }
        }
    }
}

#[inline(always)]
unsafe fn bf16x8(w: *const u16) -> __m256 {
    // SAFETY: 16 readable bytes at `w`; AVX2 checked by the caller.
    unsafe { _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(w as *const __m128i)), 16)) }
}

#[inline(always)]
unsafe fn hsum_ps(v: __m256) -> f32 {
    // SAFETY: register-only arithmetic; AVX checked by the caller.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
}

#[inline(always)]
unsafe fn bf16_row<const T: usize>(w: *const u16, h: usize, x: *const f32, out: *mut f32) {
    // SAFETY: `w` has h values, `x` T rows of h, `out` T (module contract).
    unsafe {
        let mut a = [[_mm256_setzero_ps(); 2]; T];
        let main = h / 16 * 16;
        let mut c = 0;
        while c < main {
            let (w0, w1) = (bf16x8(w.add(c)), bf16x8(w.add(c + 8)));
            for (t, a) in a.iter_mut().enumerate() {
                a[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.add(t * h + c)), a[0]);
                a[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(t * h + c + 8)), a[1]);
            }
            c += 16;
        }
        for (t, a) in a.iter().enumerate() {
            let mut s = hsum_ps(_mm256_add_ps(a[0], a[1]));
            for j in main..h {
                s += super::scalar::bf16(*w.add(j)) * *x.add(t * h + j);
            }
            *out.add(t) = s;
        }
    }
}

/// Five to eight tokens in one pass over the row (one accumulator each), so every weight byte
/// is loaded once for a whole decode batch of 8.
#[inline(always)]
unsafe fn bf16_row_wide<const T: usize>(w: *const u16, h: usize, x: *const f32, out: *mut f32) {
    // SAFETY: `w` has h values, `x` T rows of h, `out` T (module contract).
    unsafe {
        let mut a = [_mm256_setzero_ps(); T];
        let main = h / 8 * 8;
        let mut c = 0;
        while c < main {
            let wv = bf16x8(w.add(c));
            for (t, a) in a.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(t * h + c)), *a);
            }
            c += 8;
        }
        for (t, a) in a.iter().enumerate() {
            let mut s = hsum_ps(*a);
            for j in main..h {
                s += super::scalar::bf16(*w.add(j)) * *x.add(t * h + j);
            }
            *out.add(t) = s;
        }
    }
}

/// AVX2 + FMA twin of [`super::scalar::bf16_block`].
///
/// # Safety
/// The CPU has AVX2 + FMA; `w` holds `rows·h` values, `x` `m·h`, `out` `rows·m`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn bf16_block_avx2(w: &[u16], h: usize, rows: usize, x: &[f32], m: usize, out: &mut [f32]) {
    debug_assert!(w.len() >= rows * h && x.len() >= m * h && out.len() >= rows * m);
    for r in 0..rows {
        // SAFETY: the bounds are the ones asserted above (module contract).
        unsafe {
            let wr = w.as_ptr().add(r * h);
            let mut t = 0;
            while t < m {
                let o = out.as_mut_ptr().add(r * m + t);
                let xt = x.as_ptr().add(t * h);
                match m - t {
                    1 => bf16_row::<1>(wr, h, xt, o),
                    2 => bf16_row::<2>(wr, h, xt, o),
                    3 => bf16_row::<3>(wr, h, xt, o),
                    4 => bf16_row::<4>(wr, h, xt, o),
                    5 => bf16_row_wide::<5>(wr, h, xt, o),
                    6 => bf16_row_wide::<6>(wr, h, xt, o),
                    7 => bf16_row_wide::<7>(wr, h, xt, o),
                    _ => bf16_row_wide::<8>(wr, h, xt, o),
                }
                t += (m - t).min(8);
            }
        }
    }
}
