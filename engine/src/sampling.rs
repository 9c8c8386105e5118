//! Next-token choice from logits: greedy (temperature 0) or temperature sampling with min_p,
//! top_k and nucleus (top_p) filters from a per-request seeded RNG, so a fixed seed gives the
//! same tokens every run. A step's randomness is one uniform per sequence ([`Draw`]), drawn
//! here whichever device then picks the token (the host, [`pick`], or a GPU sampler).
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
    /// Keep the `top_k` most likely tokens (ties with the k-th kept too); 0 keeps all.
    pub top_k: u32,
    /// Keep tokens at least `min_p` times as likely as the most likely one; 0 keeps all.
    pub min_p: f64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 1.0, top_p: 1.0, seed: None, top_k: 0, min_p: 0.0 }
    }
}

impl SamplingParams {
    /// Whether the pick is the argmax (temperature 0, or top_k 1): no randomness is drawn.
    pub fn greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    /// The rule as the GPU sampler reads it.
    pub fn rule(&self) -> mangrove_core::reference::sampling::DrawRule {
        let (t, top_p) = if self.greedy() { (0.0, 1.0) } else { (self.temperature as f32, self.top_p as f32) };
        mangrove_core::reference::sampling::DrawRule { temperature: t, top_p, min_p: self.min_p as f32, top_k: self.top_k }
    }
}

/// One sequence's draw of one step: its settings and the uniform ∈ [0, 1) its seeded RNG gave
/// (0 when greedy: greedy steps consume nothing, so a seed's tokens do not depend on them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    pub params: SamplingParams,
    pub u: f64,
}

impl Draw {
    /// A greedy draw.
    pub const GREEDY: Draw = Draw { params: SamplingParams { temperature: 0.0, top_p: 1.0, seed: None, top_k: 0, min_p: 0.0 }, u: 0.0 };
}

/// The token `draw` picks from `logits` (on the host).
pub fn pick(logits: &[f64], draw: &Draw) -> u32 {
    pick_into(logits, draw, &mut Vec::new())
}

/// [`pick`] with a reusable weight buffer.
fn pick_into(logits: &[f64], draw: &Draw, weights: &mut Vec<f64>) -> u32 {
    let p = &draw.params;
    if p.greedy() || logits.len() < 2 {
        return argmax(logits);
    }
    let filtered;
    let logits = match p.top_k > 0 && (p.top_k as usize) < logits.len() || p.min_p > 0.0 {
        true => {
            filtered = filter(logits, p);
            &filtered[..]
        }
        false => logits,
    };
    let (t, max) = (p.temperature, max_of(logits));
    if p.top_p >= 1.0 {
        // The whole distribution, walked in token order: first to the block, then in it.
        return draw_in_order(logits, max, t, draw.u, weights);
    }
    let mut probs: Vec<(u32, f64)> = logits.par_iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) / t).exp())).collect();
    let sum = sum_of(&probs);
    probs.par_iter_mut().for_each(|p| p.1 /= sum);
    // The nucleus: the most probable tokens (ties: lower id first) until their mass reaches
    // top_p. Sorted lazily, a growing prefix at a time, as a full sort of the vocabulary
    // would cost ~5 ms per token at 128k entries.
    let keep = sorted_prefix_until(&mut probs, p.top_p);
    let kept = &probs[..keep];
    walk(kept.iter().copied(), draw.u * sum_of(kept)).0
}

/// `logits` with the tokens min_p and top_k drop set to -inf (top_k keeps ties with the k-th).
fn filter(logits: &[f64], p: &SamplingParams) -> Vec<f64> {
    let max = max_of(logits);
    // p_i / p_max = exp((l_i - max) / t) >= min_p.
    let floor = if p.min_p > 0.0 { max + p.temperature * p.min_p.ln() } else { f64::NEG_INFINITY };
    let kth = match p.top_k as usize {
        k if k > 0 && k < logits.len() => {
            let mut v: Vec<f64> = logits.iter().copied().filter(|&l| l >= floor).collect();
            match v.len() > k {
                true => *v.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1,
                false => f64::NEG_INFINITY,
            }
        }
        _ => f64::NEG_INFINITY,
    };
    let cut = floor.max(kth);
    logits.par_iter().map(|&l| if l >= cut { l } else { f64::NEG_INFINITY }).collect()
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

    /// This step's draw: one uniform from the RNG unless greedy.
    pub fn next_draw(&mut self) -> Draw {
        let u = if self.params.greedy() { 0.0 } else { self.rng.random::<f64>() };
        Draw { params: self.params, u }
    }

    /// Picks the next token on the host.
    pub fn sample(&mut self, logits: &[f64]) -> u32 {
        let draw = self.next_draw();
        pick_into(logits, &draw, &mut self.weights)
    }
}

/// A draw from the softmax of `logits / t` over the whole vocabulary: the weights and each
/// block's sum in parallel, then the block where the running mass passes u · total, then the
/// token in it.
fn draw_in_order(logits: &[f64], max: f64, t: f64, u: f64, weights: &mut Vec<f64>) -> u32 {
    weights.resize(logits.len(), 0.0);
    let sums: Vec<f64> = weights
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
    let (b, u) = walk(sums.iter().enumerate().map(|(b, &s)| (b as u32, s)), u * total);
    let start = b as usize * BLOCK;
    walk(weights[start..].iter().take(BLOCK).enumerate().map(|(i, &w)| ((start + i) as u32, w)), u).0
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
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, ..SamplingParams::default() });
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn seeded_sampling_repeats() {
        let logits: Vec<f64> = (0..50).map(|i| (i as f64 * 0.37).sin()).collect();
        let p = SamplingParams { temperature: 0.8, top_p: 0.9, seed: Some(7), ..SamplingParams::default() };
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
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 1.0, seed: Some(11), ..SamplingParams::default() });
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
                let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 1.0, seed: Some(5), ..SamplingParams::default() });
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
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 1e-9, seed: Some(1), ..SamplingParams::default() });
        for _ in 0..10 {
            assert_eq!(s.sample(&[0.0, 1.0, 5.0, 2.0]), 2);
        }
    }

    #[test]
    fn top_k_and_min_p_keep_only_the_likeliest() {
        let logits = [0.0, 3.0, 1.0, 2.9, -2.0];
        let mut k2 = Sampler::new(SamplingParams { top_k: 2, seed: Some(3), ..SamplingParams::default() });
        let mut mp = Sampler::new(SamplingParams { min_p: 0.5, seed: Some(3), ..SamplingParams::default() });
        for _ in 0..200 {
            assert!([1, 3].contains(&k2.sample(&logits)));
            // exp(2.9 - 3) = 0.90 >= 0.5, exp(1 - 3) = 0.14 < 0.5.
            assert!([1, 3].contains(&mp.sample(&logits)));
        }
        let mut k1 = Sampler::new(SamplingParams { top_k: 1, seed: Some(3), ..SamplingParams::default() });
        assert_eq!(k1.next_draw().u, 0.0, "top_k 1 is greedy: no randomness drawn");
        assert_eq!(k1.sample(&logits), 1);
    }

    /// A draw's uniform decides the pick: the same u gives the same token through `pick`.
    #[test]
    fn pick_repeats_the_samplers_draw() {
        let logits: Vec<f64> = (0..300).map(|i| (i as f64 * 0.11).cos() * 2.0).collect();
        let p = SamplingParams { temperature: 0.9, top_p: 0.8, seed: Some(9), ..SamplingParams::default() };
        let (mut a, mut b) = (Sampler::new(p), Sampler::new(p));
        for _ in 0..50 {
            let d = b.next_draw();
            assert_eq!(a.sample(&logits), pick(&logits, &d));
        }
    }
}
