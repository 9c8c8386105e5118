//! The correctness gate: compares a kernel's output with a CPU reference and reports
//! max_abs, max_rel (with a relative floor), non-finite and unwritten counts.

/// bf16 bit pattern written into outputs before a run; a NaN, so an unwritten element is caught.
pub const POISON_BF16: u16 = 0x7FC1;

/// The f32 twin of [`POISON_BF16`].
pub const POISON_F32: u32 = 0x7FC0_0001;

/// Deltas of one output against its reference.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Deltas {
    pub max_abs: f64,
    /// max |out - ref| / max(|ref|, rel_floor * max|ref|).
    pub max_rel: f64,
    pub non_finite: usize,
    /// Elements still holding the poison pattern.
    pub unwritten: usize,
    pub count: usize,
}

/// The gate every kernel meets before it is deployed, blessed or reported by the lab: relative
/// only (outputs at different scales are not comparable in absolute terms), bf16 output rounding
/// (2^-8) with margin. `max_abs` is `f64::MAX`, not infinity, so a report's JSON round-trips.
pub const DEPLOY_GATE: Gate = Gate { max_abs: f64::MAX, max_rel: 1e-2, rel_floor: 1e-3 };

/// Thresholds a variant must meet.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Gate {
    pub max_abs: f64,
    pub max_rel: f64,
    pub rel_floor: f64,
}

impl Deltas {
    /// Compares bf16 bits `out` with `reference`; poison bits count as unwritten.
    pub fn of_bf16(out: &[u16], reference: &[f64], rel_floor: f64) -> Self {
        let values: Vec<f64> = out.iter().map(|&b| half::bf16::from_bits(b).to_f64()).collect();
        let unwritten = out.iter().filter(|&&b| b == POISON_BF16).count();
        Deltas { unwritten, ..Self::of_f64(&values, reference, rel_floor) }
    }

    /// Compares f32 `out` with `reference`; poison bits count as unwritten.
    pub fn of_f32(out: &[f32], reference: &[f64], rel_floor: f64) -> Self {
        let values: Vec<f64> = out.iter().map(|&v| v as f64).collect();
        let unwritten = out.iter().filter(|v| v.to_bits() == POISON_F32).count();
        Deltas { unwritten, ..Self::of_f64(&values, reference, rel_floor) }
    }

    /// Compares `out` with `reference`.
    pub fn of_f64(out: &[f64], reference: &[f64], rel_floor: f64) -> Self {
        assert_eq!(out.len(), reference.len(), "output and reference lengths differ");
        let scale = reference.iter().fold(0.0f64, |a, r| a.max(r.abs()));
        let floor = (rel_floor * scale).max(f64::MIN_POSITIVE);
        let mut d = Deltas { count: out.len(), ..Default::default() };
        for (&v, &r) in out.iter().zip(reference) {
            if !v.is_finite() {
                d.non_finite += 1;
                continue;
            }
            let abs = (v - r).abs();
            d.max_abs = d.max_abs.max(abs);
            d.max_rel = d.max_rel.max(abs / r.abs().max(floor));
        }
        d
    }

    /// The worst of two deltas (counts added).
    pub fn worst(self, o: Deltas) -> Deltas {
        Deltas {
            max_abs: self.max_abs.max(o.max_abs),
            max_rel: self.max_rel.max(o.max_rel),
            non_finite: self.non_finite + o.non_finite,
            unwritten: self.unwritten + o.unwritten,
            count: self.count + o.count,
        }
    }

    /// True when everything was written, finite, and within both bounds.
    pub fn passes(&self, gate: &Gate) -> bool {
        self.unwritten == 0 && self.non_finite == 0 && self.max_abs <= gate.max_abs && self.max_rel <= gate.max_rel
    }
}

impl std::fmt::Display for Deltas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "max_abs={:.3e} max_rel={:.3e} non_finite={} unwritten={} of {}",
            self.max_abs, self.max_rel, self.non_finite, self.unwritten, self.count
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_poison_and_error() {
        let r = [1.0, 2.0, -4.0];
        let good: Vec<u16> = r.iter().map(|&v| half::bf16::from_f64(v).to_bits()).collect();
        let d = Deltas::of_bf16(&good, &r, 1e-3);
        assert_eq!((d.max_abs, d.non_finite, d.unwritten), (0.0, 0, 0));
        let mut bad = good.clone();
        bad[1] = POISON_BF16;
        bad[2] = half::bf16::from_f64(-4.5).to_bits();
        let d = Deltas::of_bf16(&bad, &r, 1e-3);
        assert_eq!((d.non_finite, d.unwritten), (1, 1));
        assert!((d.max_rel - 0.125).abs() < 1e-9);
        assert!(!d.passes(&Gate { max_abs: 1.0, max_rel: 1.0, rel_floor: 1e-3 }));
    }

    #[test]
    fn f32_poison_counts_as_unwritten_and_worst_keeps_the_max() {
        let r = [1.0, 2.0, -4.0];
        let out = [1.0f32, f32::from_bits(POISON_F32), -4.5];
        let d = Deltas::of_f32(&out, &r, 1e-3);
        assert_eq!((d.non_finite, d.unwritten, d.count), (1, 1, 3));
        assert!((d.max_rel - 0.125).abs() < 1e-9);
        let w = d.worst(Deltas::of_f32(&[1.5, 2.0, -4.0], &r, 1e-3));
        assert_eq!((w.max_abs, w.unwritten, w.count), (0.5, 1, 6));
    }
}
