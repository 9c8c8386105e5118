//! Log-probabilities of tokens: the log-softmax of one position's logits (after the request's
//! logit changes and temperature — the distribution the sampler draws from, as vLLM reports
//! it), the chosen token's value and the `top` likeliest. Takes logits; gives [`TokenLogprob`].

use rayon::prelude::*;

use crate::sampling::BLOCK;

/// The value a token the distribution excludes (logit -inf) reports, as OpenAI does: JSON has
/// no infinity.
pub const EXCLUDED: f64 = -9999.0;

/// One position's log-probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token at this position (sampled, or the prompt's).
    pub id: u32,
    /// Its log-probability.
    pub logprob: f64,
    /// The likeliest tokens with theirs, most likely first (ties: lower id first).
    pub top: Vec<(u32, f64)>,
}

/// The log-softmax of `logits / temperature` (temperature 0, greedy, reads as 1) at `id`, with
/// the `top` likeliest tokens.
pub fn token_logprob(logits: &[f64], temperature: f64, id: u32, top: usize) -> TokenLogprob {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let max = logits.par_chunks(BLOCK).map(|c| c.iter().cloned().fold(f64::NEG_INFINITY, f64::max)).reduce(|| f64::NEG_INFINITY, f64::max);
    // Block sums in block order: the same value on any thread count.
    let sums: Vec<f64> = logits.par_chunks(BLOCK).map(|c| c.iter().map(|&l| ((l - max) / t).exp()).sum()).collect();
    let lse = max / t + sums.iter().sum::<f64>().ln();
    let lp = |l: f64| match l / t - lse {
        v if v.is_finite() => v,
        _ => EXCLUDED,
    };
    let chosen = logits.get(id as usize).map_or(EXCLUDED, |&l| lp(l));
    let mut best: Vec<(u32, f64)> = Vec::new();
    if top > 0 && !logits.is_empty() {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let order = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        let k = top.min(idx.len());
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, order);
        }
        idx.truncate(k);
        idx.sort_unstable_by(order);
        best = idx.into_iter().map(|i| (i, lp(logits[i as usize]))).collect();
    }
    TokenLogprob { id, logprob: chosen, top: best }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_top_and_temperature() {
        let logits = [0.0, 2f64.ln(), 4f64.ln(), f64::NEG_INFINITY];
        let t = token_logprob(&logits, 1.0, 1, 2);
        assert!((t.logprob - (2.0f64 / 7.0).ln()).abs() < 1e-12);
        assert_eq!(t.top.iter().map(|p| p.0).collect::<Vec<_>>(), vec![2, 1]);
        assert!((t.top[0].1 - (4.0f64 / 7.0).ln()).abs() < 1e-12);
        assert_eq!(token_logprob(&logits, 1.0, 3, 0).logprob, EXCLUDED);
        // Temperature 0.5 squares the odds: 1, 4, 16.
        let t = token_logprob(&logits, 0.5, 2, 10);
        assert!((t.logprob - (16.0f64 / 21.0).ln()).abs() < 1e-12);
        assert_eq!(t.top.len(), 4);
        // Greedy reads as temperature 1.
        assert_eq!(token_logprob(&logits, 0.0, 1, 0).logprob, token_logprob(&logits, 1.0, 1, 0).logprob);
    }
}
