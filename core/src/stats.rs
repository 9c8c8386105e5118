//! Sample statistics shared by every timing report (the tuner, the CPU sweep, `bench serve`).

/// The nearest-rank quantile `q` (0..=1) of `sorted` (ascending, not empty).
pub fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[cfg(test)]
mod tests {
    #[test]
    fn nearest_rank_picks_the_rounded_rank() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!((super::nearest_rank(&s, 0.0), super::nearest_rank(&s, 0.5), super::nearest_rank(&s, 0.99), super::nearest_rank(&s, 1.0)), (1.0, 51.0, 99.0, 100.0));
    }
}
