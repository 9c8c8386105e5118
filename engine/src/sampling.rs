//! Next-token choice from logits: greedy (temperature 0) or temperature + nucleus (top_p)
//! sampling from a per-request seeded RNG, so a fixed seed gives the same tokens every run.
//! The passes over the vocabulary (max, exponentials and their sums) run in parallel over fixed
//! blocks of [`BLOCK`] tokens, summed in block order, so the result does not depend on the
//! number of threads: at batch 1 one sequence's 128k-entry draw no longer runs on one core.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

/// Tokens per block of the parallel passes (fixed: sums and draws are thread-count independent).
pub const BLOCK: usize = 8192;

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
    /// Unnormalized weights of the last draw (kept to reuse the allocation).
    weights: Vec<f64>,
}

/// Index of the largest logit (the lowest index among ties).
pub fn argmax(logits: &[f64]) -> u32 {
    let block_best = |(b, chunk): (usize, &[f64])| {
        let mut best = 0;
        for (i, &v) in chunk.iter().enumerate() {
            if v > chunk[best] {
                best = i;
            }
        }
        (b * BLOCK + best, chunk[best])
    };
    let pick = |a: (usize, f64), b: (usize, f64)| if b.1 > a.1 || (b.1 == a.1 && b.0 < a.0) || a.1.is_nan() { b } else { a };
    match logits.is_empty() {
        true => 0,
        false => logits.par_chunks(BLOCK).enumerate().map(block_best).reduce_with(pick).map_or(0, |(i, _)| i as u32),
    }
}

/// Largest logit (NaNs ignored).
fn max_of(logits: &[f64]) -> f64 {
    logits.par_chunks(BLOCK).map(|c| c.iter().cloned().fold(f64::NEG_INFINITY, f64::max)).reduce(|| f64::NEG_INFINITY, f64::max)
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Sampler { params, rng: StdRng::seed_from_u64(seed), weights: Vec::new() }
    }

    /// Picks the next token.
    pub fn sample(&mut self, logits: &[f64]) -> u32 {
        let t = self.params.temperature;
        if t <= 0.0 || logits.len() < 2 {
            return argmax(logits);
        }
        let max = max_of(logits);
        if self.params.top_p >= 1.0 {
            // The whole distribution, walked in token order: first to the block, then in it.
            return self.draw_in_order(logits, max, t);
        }
        let mut probs: Vec<(u32, f64)> = logits.par_iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) / t).exp())).collect();
        let sum = sum_of(&probs);
        probs.par_iter_mut().for_each(|p| p.1 /= sum);
        // The nucleus: the most probable tokens (ties: lower id first) until their mass reaches
        // top_p. Sorted lazily, a growing prefix at a time, as a full sort of the vocabulary
        // would cost ~5 ms per token at 128k entries.
        let keep = sorted_prefix_until(&mut probs, self.params.top_p);
        let kept = &probs[..keep];
        walk(kept.iter().copied(), self.rng.random::<f64>() * sum_of(kept)).0
    }

    /// A draw from the softmax of `logits / t` over the whole vocabulary: the weights and each
    /// block's sum in parallel, then the block where the running mass passes u · total, then the
    /// token in it.
    fn draw_in_order(&mut self, logits: &[f64], max: f64, t: f64) -> u32 {
        self.weights.resize(logits.len(), 0.0);
        let sums: Vec<f64> = self
            .weights
            .par_chunks_mut(BLOCK)
            .zip(logits.par_chunks(BLOCK))
            .map(|(w, l)| {
                let mut s = 0.0;
                for (w, &l) in w.iter_mut().zip(l) {
                    *w = ((l - max) / t).exp();
                    s += *w;
                }
                s
            })
            .collect();
        let total: f64 = sums.iter().sum();
        let (b, u) = walk(sums.iter().enumerate().map(|(b, &s)| (b as u32, s)), self.rng.random::<f64>() * total);
        let start = b as usize * BLOCK;
        walk(self.weights[start..].iter().take(BLOCK).enumerate().map(|(i, &w)| ((start + i) as u32, w)), u).0
    }
}

/// Sum of the probabilities, in slice order.
fn sum_of(probs: &[(u32, f64)]) -> f64 {
    probs.iter().map(|p| p.1).sum()
}

/// Walks (id, weight) pairs in order: the id where the running mass passes `u`, with the mass
/// still left at it (rounding that runs past the end gives the last id).
fn walk(weights: impl IntoIterator<Item = (u32, f64)>, mut u: f64) -> (u32, f64) {
    let mut last = (0, u);
    for (id, w) in weights {
        if u < w {
            return (id, u);
        }
        u -= w;
        last = (id, u);
    }
    last
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
        probs[start..end].par_sort_unstable_by(order); // a total order: one result however sorted
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

    /// Over several blocks: the frequencies follow the softmax, and a seed draws the same
    /// tokens on one thread as on four.
    #[test]
    fn draws_across_blocks_follow_the_softmax_on_any_thread_count() {
        let n = 3 * BLOCK + 5;
        // Four strong tokens, one per block (the last in the partial block), over a weak tail.
        let strong = [(17usize, 3f64.ln() + 10.0), (BLOCK + 1, 2f64.ln() + 10.0), (2 * BLOCK + BLOCK - 1, 10.0), (3 * BLOCK + 4, 4f64.ln() + 10.0)];
        let mut logits = vec![-30.0; n];
        strong.iter().for_each(|&(i, l)| logits[i] = l);
        let draws = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 1.0, seed: Some(5) });
                (0..6_000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
            })
        };
        let one = draws(1);
        assert_eq!(one, draws(4), "thread count changed the draws");
        for (&(id, _), want) in strong.iter().zip([3.0 / 10.0, 2.0 / 10.0, 1.0 / 10.0, 4.0 / 10.0]) {
            let got = one.iter().filter(|&&t| t as usize == id).count() as f64 / one.len() as f64;
            assert!((got - want).abs() < 0.025, "token {id}: {got} vs {want}");
        }
        assert_eq!(argmax(&logits), (3 * BLOCK + 4) as u32);
        let mut ties = vec![0.0; n];
        ties[BLOCK + 3] = 1.0;
        ties[2 * BLOCK] = 1.0;
        assert_eq!(argmax(&ties), (BLOCK + 3) as u32, "ties go to the lowest index across blocks");
    }

    #[test]
    fn tiny_top_p_keeps_only_the_best() {
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 1e-9, seed: Some(1) });
        for _ in 0..10 {
            assert_eq!(s.sample(&[0.0, 1.0, 5.0, 2.0]), 2);
        }
    }
}
