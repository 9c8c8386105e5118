//! Weight repacking, once at load: the Hugging Face packing (uint8 `[N/4, K]`, byte (j, c)
//! holding rows `j + q·N/4`) becomes **row quads**: byte (j, c) holds rows `4j + q` (q = 0..3)
//! of column c in bits `2q..2q+1`, still as `w + 1` (codes 0, 1, 2), and every byte row is
//! padded to `kp` (a multiple of [`K_ALIGN`]) with code 1 (w = 0). One byte row is then four
//! consecutive output rows over the whole K: a kernel loads it once, extracts each row's codes
//! with a shift and a mask, and dots all four with the same activations; linears that run on the
//! same input (q|k|v, gate|up) concatenate into one matrix in plain row order, so each is one
//! parallel dispatch. Takes the loaded [`TernaryLinear`]s; gives a [`PackedTernary`].

use mangrove_core::model_config::ScaleConvention;

use crate::model::TernaryLinear;

/// Byte rows are padded to a multiple of this many columns (the widest kernel step).
pub const K_ALIGN: usize = 64;

/// Code 1 (weight 0) in all four row slots: the padding byte.
const ZERO_QUAD: u8 = 0b0101_0101;

/// Ternary rows in the row-quad layout with each row's output factor.
#[derive(Debug, Clone)]
pub struct PackedTernary {
    /// `[n/4][kp]` bytes: byte (j, c) holds rows `4j..4j+3` of column c, code `w + 1` in bits `2q..2q+1`.
    pub data: Vec<u8>,
    /// Output rows (a multiple of 4).
    pub n: usize,
    /// Input columns.
    pub k: usize,
    /// Padded columns per byte row (`k` rounded up to [`K_ALIGN`]).
    pub kp: usize,
    /// Per output row: what the raw integer sum is multiplied by besides the activation's
    /// 1/s — the linear's `weight_scale`, or its inverse for `linear_class: bitlinear`.
    pub row_factor: Vec<f32>,
}

/// `k` rounded up to [`K_ALIGN`].
pub fn padded(k: usize) -> usize {
    k.div_ceil(K_ALIGN) * K_ALIGN
}

impl PackedTernary {
    /// Repacks one linear.
    pub fn from_linear(lin: &TernaryLinear, conv: ScaleConvention) -> Self {
        Self::concat(&[lin], conv)
    }

    /// Repacks linears that share their input (same K) into one matrix, rows in the given order.
    pub fn concat(parts: &[&TernaryLinear], conv: ScaleConvention) -> Self {
        let k = parts[0].k;
        assert!(parts.iter().all(|p| p.k == k && p.n % 4 == 0), "concatenated linears share K and have N % 4 == 0");
        let kp = padded(k);
        let n: usize = parts.iter().map(|p| p.n).sum();
        let mut data = vec![ZERO_QUAD; n / 4 * kp];
        let mut row_factor = Vec::with_capacity(n);
        let mut quad = 0;
        for p in parts {
            let n4 = p.n / 4;
            let f = match conv {
                ScaleConvention::Multiply => p.scale,
                ScaleConvention::Divide => 1.0 / p.scale,
            } as f32;
            row_factor.extend(std::iter::repeat_n(f, p.n));
            for j in 0..n4 {
                let dst = &mut data[(quad + j) * kp..][..k];
                dst.iter_mut().for_each(|b| *b = 0);
                for q in 0..4 {
                    // Row 4j + q of this linear sits in HF byte row (4j+q) % n4, slot (4j+q) / n4.
                    let r = 4 * j + q;
                    let src = &p.packed[(r % n4) * k..][..k];
                    let shift = 2 * (r / n4);
                    for (d, &s) in dst.iter_mut().zip(src) {
                        *d |= ((s >> shift) & 3) << (2 * q);
                    }
                }
            }
            quad += n4;
        }
        PackedTernary { data, n, k, kp, row_factor }
    }

    /// The ternary weight (-1, 0, 1) of row `r`, column `c`.
    pub fn weight(&self, r: usize, c: usize) -> i8 {
        ((self.data[(r / 4) * self.kp + c] >> (2 * (r % 4))) & 3) as i8 - 1
    }

    /// Bytes the kernels stream per pass over the matrix.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mangrove_core::reference::pack_ternary;

    #[test]
    fn row_quads_hold_the_same_weights_as_the_hf_layout() {
        let (n, k) = (12, 70);
        let w: Vec<i8> = (0..n * k).map(|i| ((i * 7 + i / 5) % 3) as i8 - 1).collect();
        let a = TernaryLinear { packed: pack_ternary(&w, n, k), n, k, scale: 0.5 };
        let w2: Vec<i8> = (0..8 * k).map(|i| ((i * 5 + 1) % 3) as i8 - 1).collect();
        let b = TernaryLinear { packed: pack_ternary(&w2, 8, k), n: 8, k, scale: 2.0 };
        let p = PackedTernary::concat(&[&a, &b], ScaleConvention::Multiply);
        assert_eq!((p.n, p.kp), (20, 128));
        for r in 0..n {
            for c in 0..k {
                assert_eq!(p.weight(r, c), w[r * k + c], "row {r} col {c}");
            }
        }
        for r in 0..8 {
            for c in 0..k {
                assert_eq!(p.weight(n + r, c), w2[r * k + c]);
            }
            for c in k..p.kp {
                assert_eq!(p.weight(n + r, c), 0, "padding is weight 0");
            }
        }
        assert_eq!((p.row_factor[0], p.row_factor[n]), (0.5, 2.0));
        let d = PackedTernary::from_linear(&b, ScaleConvention::Divide);
        assert_eq!(d.row_factor[0], 0.5);
    }
}
