//! The CPU kernels, one module per instruction set ([`scalar`], `x86`, `neon`), behind one
//! checked handle: [`Kernels::new`] refuses a path the CPU lacks, so its methods can call the
//! `target_feature` functions without re-checking. Two kernels:
//! - [`Kernels::ternary_block`]: raw integer sums of row-quad ternary rows
//!   ([`super::repack::PackedTernary`]) with int8 token rows (codes are `w + 1`; the caller
//!   subtracts the token's Σx to get Σ w·x, still exact);
//! - [`Kernels::dense_block`]: the LM head's bf16 (or f32) rows times f32 token rows.

pub mod scalar;

#[cfg(target_arch = "aarch64")]
pub mod neon;
#[cfg(target_arch = "x86_64")]
pub mod x86;

use super::isa::Isa;

/// Most columns the AVX2 kernel may accumulate in 16 bits before widening.
#[cfg(target_arch = "x86_64")]
pub use x86::MAX_KBLOCK;
/// Most columns the AVX2 kernel may accumulate in 16 bits before widening.
#[cfg(not(target_arch = "x86_64"))]
pub const MAX_KBLOCK: usize = 2016;

/// Weights of a dense (LM head) matrix: bf16 bits when every value is a bf16 (a bf16
/// checkpoint), else f32.
#[derive(Debug, Clone)]
pub enum Dense {
    /// bf16 bits, `[rows][cols]`.
    Bf16(Vec<u16>),
    /// f32, `[rows][cols]`.
    F32(Vec<f32>),
}

impl Dense {
    /// Stores `w` in bf16 when that is exact, else in f32.
    pub fn new(w: &[f32]) -> Dense {
        let exact = w.iter().all(|v| half::bf16::from_f32(*v).to_f32().to_bits() == v.to_bits());
        if exact {
            Dense::Bf16(w.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect())
        } else {
            Dense::F32(w.to_vec())
        }
    }

    /// Row `r` (of `cols` values) widened to f32 into `out`.
    pub fn row_into(&self, r: usize, cols: usize, out: &mut [f32]) {
        match self {
            Dense::Bf16(w) => out.iter_mut().zip(&w[r * cols..][..cols]).for_each(|(o, &b)| *o = scalar::bf16(b)),
            Dense::F32(w) => out.copy_from_slice(&w[r * cols..][..cols]),
        }
    }

    /// Bytes per pass.
    pub fn bytes(&self) -> usize {
        match self {
            Dense::Bf16(w) => 2 * w.len(),
            Dense::F32(w) => 4 * w.len(),
        }
    }
}

/// A kernel path this CPU has, with its K block (AVX2 only; see [`MAX_KBLOCK`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    isa: Isa,
    kblock: usize,
}

impl Kernels {
    /// The kernels of `isa` with K block `kblock` (a multiple of 32, 32..=[`MAX_KBLOCK`]), or
    /// `None` where the CPU or this build lacks `isa` or the K block is out of range.
    pub fn new(isa: Isa, kblock: usize) -> Option<Kernels> {
        (isa.is_supported() && kblock % 32 == 0 && (32..=MAX_KBLOCK).contains(&kblock)).then_some(Kernels { isa, kblock })
    }

    /// The instruction set.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The K block.
    pub fn kblock(&self) -> usize {
        self.kblock
    }

    /// `acc[(r·m + t)·4 + q] = Σ_c code_q(w[r][c]) · x[t][c]` for `rows` byte rows of `w`
    /// (`[rows][kp]`, row quads) and `m` token rows of `x` (`[m][kp]`); `kp % 64 == 0`.
    pub fn ternary_block(&self, w: &[u8], kp: usize, rows: usize, x: &[i8], m: usize, acc: &mut [i32]) {
        assert!(kp % 64 == 0 && w.len() >= rows * kp && x.len() >= m * kp && acc.len() >= rows * m * 4);
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernels::new` checked AVX2 + FMA; the sizes are asserted above.
            Isa::Avx2 => unsafe { x86::ternary_block_avx2(w, kp, rows, x, m, self.kblock, acc) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernels::new` checked AVX-VNNI (and AVX2); the sizes are asserted above.
            Isa::AvxVnni => unsafe { x86::ternary_block_avx_vnni(w, kp, rows, x, m, acc) },
            #[cfg(all(target_arch = "x86_64", mangrove_avx512))]
            // SAFETY: `Kernels::new` checked AVX-512 F/BW/VNNI; the sizes are asserted above.
            Isa::Avx512Vnni => unsafe { x86::ternary_block_avx512_vnni(w, kp, rows, x, m, acc) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `Kernels::new` checked NEON; the sizes are asserted above.
            Isa::Neon => unsafe { neon::ternary_block_neon(w, kp, rows, x, m, acc) },
            _ => scalar::ternary_block(w, kp, rows, x, m, acc),
        }
    }

    /// `out[r·m + t] = Σ_c w[row0 + r][c] · x[t][c]` over `rows` rows of `w` (`cols` wide) from
    /// `row0`, `m` f32 token rows of `x` (`[m][cols]`).
    #[allow(clippy::too_many_arguments)]
    pub fn dense_block(&self, w: &Dense, cols: usize, row0: usize, rows: usize, x: &[f32], m: usize, out: &mut [f32]) {
        assert!(x.len() >= m * cols && out.len() >= rows * m);
        match w {
            Dense::Bf16(w) => {
                let w = &w[row0 * cols..][..rows * cols];
                match self.isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: every x86 SIMD path implies AVX2 + FMA (`Isa::is_supported`); sizes asserted.
                    Isa::Avx2 | Isa::AvxVnni | Isa::Avx512Vnni => unsafe { x86::bf16_block_avx2(w, cols, rows, x, m, out) },
                    #[cfg(target_arch = "aarch64")]
                    // SAFETY: `Kernels::new` checked NEON; sizes asserted above.
                    Isa::Neon => unsafe { neon::bf16_block_neon(w, cols, rows, x, m, out) },
                    _ => scalar::bf16_block(w, cols, rows, x, m, out),
                }
            }
            Dense::F32(w) => scalar::f32_block(&w[row0 * cols..][..rows * cols], cols, rows, x, m, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_paths_and_bad_k_blocks_are_refused() {
        assert!(Kernels::new(Isa::Scalar, 256).is_some());
        assert!(Kernels::new(Isa::Scalar, 100).is_none());
        assert!(Kernels::new(Isa::Scalar, MAX_KBLOCK + 32).is_none());
        for isa in Isa::ALL {
            assert_eq!(Kernels::new(isa, 256).is_some(), isa.is_supported(), "{isa}");
        }
    }

    #[test]
    fn dense_keeps_bf16_only_when_exact() {
        assert!(matches!(Dense::new(&[1.0, -0.5, 3.0]), Dense::Bf16(_)));
        assert!(matches!(Dense::new(&[1.0, 0.1]), Dense::F32(_)));
    }
}
