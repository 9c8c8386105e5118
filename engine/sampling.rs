//! Next-token choice from logits: greedy (temperature 0) or temperature + nucleus (top_p)
//! sampling from a per-request seeded RNG, so a fixed seed gives the same tokens every run.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 keeps all).
    pub top_p: f64,
    /// RNG seed; `None` draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 1.0, top_p: 1.0, seed: None }
    }
}

/// The sampler of one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// Index of the largest logit (the lowest index among ties).
pub fn argmax(logits: &[f64]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Sampler { params, rng: StdRng::seed_from_u64(seed) }
    }

    /// Picks the next token.
    pub fn sample(&mut self, logits: &[f64]) -> u32 {
        let t = self.params.temperature;
        if t <= 0.0 || logits.len() < 2 {
            return argmax(logits);
        }
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mut probs: Vec<(u32, f64)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) / t).exp())).collect();
        let sum = sum_of(&probs);
        if self.params.top_p >= 1.0 {
            // The whole distribution: one pass in token order over the unnormalized weights.
            return walk(&probs, sum, self.rng.random::<f64>());
        }
        probs.iter_mut().for_each(|p| p.1 /= sum);
        // The nucleus: the most probable tokens (ties: lower id first) until their mass reaches
        // top_p. Sorted lazily, a growing prefix at a time, as a full sort of the vocabulary
        // would cost ~5 ms per token at 128k entries.
        let keep = sorted_prefix_until(&mut probs, self.params.top_p);
        let kept = &probs[..keep];
        walk(kept, sum_of(kept), self.rng.random::<f64>())
    }
}

/// Sum of the probabilities, in slice order.
fn sum_of(probs: &[(u32, f64)]) -> f64 {
    probs.iter().map(|p| p.1).sum()
}

/// The token where the running mass passes `unit · total` (walking `probs` in order).
fn walk(probs: &[(u32, f64)], total: f64, unit: f64) -> u32 {
    let mut u = unit * total;
    for &(id, p) in probs {
        if u < p {
            return id;
        }
        u -= p;
    }
    probs[probs.len() - 1].0
}

/// Orders `probs` by probability (descending, ties by id) far enough that its first `keep`
/// entries are the smallest set whose mass reaches `top_p` (or all), and returns `keep`.
fn sorted_prefix_until(probs: &mut [(u32, f64)], top_p: f64) -> usize {
    let order = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let (n, mut start, mut chunk, mut acc) = (probs.len(), 0, 256, 0.0);
    while start < n {
        let end = (start + chunk).min(n);
        if end < n {
            probs[start..].select_nth_unstable_by(end - start - 1, order);
        }
        probs[start..end].sort_by(order);
        for (i, p) in probs[start..end].iter().enumerate() {
            acc += p.1;
            if acc >= top_p {
                return start + i + 1;
            }
        }
        (start, chunk) = (end, chunk * 4);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, top_p: 1.0, seed: None });
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn seeded_sampling_repeats() {
        let logits: Vec<f64> = (0..50).map(|i| (i as f64 * 0.37).sin()).collect();
        let p = SamplingParams { temperature: 0.8, top_p: 0.9, seed: Some(7) };
        let run = || {
            let mut s = Sampler::new(p);
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    /// The nucleus found by the lazy partial sort is the one a full sort gives, in the same
    /// order, so a seed picks the same token either way.
    #[test]
    fn lazy_nucleus_matches_a_full_sort() {
        for (n, top_p) in [(7, 0.5), (300, 0.9), (5000, 0.95), (5000, 0.999), (100_000, 0.9)] {
            let logits: Vec<f64> = (0..n).map(|i| ((i as f64 * 0.618).sin() * 4.0).round() / 2.0).collect(); // many ties
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let mut probs: Vec<(u32, f64)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, (l - max).exp())).collect();
            let sum: f64 = probs.iter().map(|p| p.1).sum();
            probs.iter_mut().for_each(|p| p.1 /= sum);
            let mut full = probs.clone();
            full.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut acc = 0.0;
            let want = full.iter().position(|p| {
                acc += p.1;
                acc >= top_p
            });
            let want = want.map_or(n, |i| i + 1);
            let keep = sorted_prefix_until(&mut probs, top_p);
            assert_eq!(keep, want, "n={n} top_p={top_p}");
            assert_eq!(&probs[..keep], &full[..keep], "n={n} top_p={top_p}");
        }
    }

    /// Without top_p every token is drawn with its softmax probability.
    #[test]
    fn full_distribution_frequencies() {
        let logits = [0.0, 2f64.ln(), 4f64.ln()]; // p = 1/7, 2/7, 4/7
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 1.0, seed: Some(11) });
        let mut counts = [0usize; 3];
        let draws = 70_000;
        for _ in 0..draws {
            counts[s.sample(&logits) as usize] += 1;
        }
        for (c, want) in counts.iter().zip([1.0 / 7.0, 2.0 / 7.0, 4.0 / 7.0]) {
            let got = *c as f64 / draws as f64;
            assert!((got - want).abs() < 0.01, "{counts:?}");
        }
    }

    #[test]
    fn tiny_top_p_keeps_only_the_best() {
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 1e-9, seed: Some(1) });
        for _ in 0..10 {
            assert_eq!(s.sample(&[0.0, 1.0, 5.0, 2.0]), 2);
        }
    }
}
