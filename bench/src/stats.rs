//! Latency percentiles: takes a set of samples (milliseconds), gives p50/p95/p99, mean and max
//! (nearest-rank on the sorted samples, as the tuner's timing statistics pick them).

use serde::{Deserialize, Serialize};

/// Summary of one latency's samples, in milliseconds. All zero when there were no samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub mean: f64,
    pub max: f64,
    /// Number of samples summarised.
    pub n: usize,
}

impl Percentiles {
    /// Summarises `samples` (any order).
    pub fn of(mut samples: Vec<f64>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_by(f64::total_cmp);
        let pick = |q: f64| mangrove_core::stats::nearest_rank(&samples, q);
        Self {
            p50: pick(0.5),
            p95: pick(0.95),
            p99: pick(0.99),
            mean: samples.iter().sum::<f64>() / samples.len() as f64,
            max: samples[samples.len() - 1],
            n: samples.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::of((1..=100).rev().map(f64::from).collect());
        assert_eq!((p.p50, p.p95, p.p99, p.max, p.n), (51.0, 95.0, 99.0, 100.0, 100));
        assert!((p.mean - 50.5).abs() < 1e-12);
        assert_eq!(Percentiles::of(vec![]), Percentiles::default());
        assert_eq!(Percentiles::of(vec![3.0]).p99, 3.0);
    }
}
