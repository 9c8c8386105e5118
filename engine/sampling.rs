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
        let sum: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= sum);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut keep = probs.len();
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p.1;
                if acc >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept = &probs[..keep];
        let total: f64 = kept.iter().map(|p| p.1).sum();
        let mut u = self.rng.random::<f64>() * total;
        for &(id, p) in kept {
            if u < p {
                return id;
            }
            u -= p;
        }
        kept[keep - 1].0
    }
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

    #[test]
    fn tiny_top_p_keeps_only_the_best() {
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 1e-9, seed: Some(1) });
        for _ in 0..10 {
            assert_eq!(s.sample(&[0.0, 1.0, 5.0, 2.0]), 2);
        }
    }
}
