//! f64 reference of the GPU sampler (`sample_tokens.cu.tera`): the same rules — greedy at
//! temperature 0 or top_k 1; otherwise weights w = exp((l - max) / t), min_p keeps w ≥ min_p,
//! top_k keeps logits at or above the k-th largest kept one, top_p keeps logits at or above the
//! largest threshold whose kept mass reaches top_p (ties at a threshold kept together), and the
//! pick is the token where the running mass, in token order, passes u · (kept mass) — in f64 on
//! exact weights, where the kernel sums 40-bit fixed-point masses of f32 weights.

/// Smallest weight (relative to the largest) the kernel gives a nonzero mass (2^-40).
pub const MIN_WEIGHT: f64 = 1.0 / 1_099_511_627_776.0;

/// One sequence's sampling settings as the kernel reads them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawRule {
    /// 0 (or less) is greedy.
    pub temperature: f32,
    /// 1 keeps everything.
    pub top_p: f32,
    /// 0 keeps everything.
    pub min_p: f32,
    /// 0 (or ≥ the vocabulary) keeps everything; 1 is greedy.
    pub top_k: u32,
}

impl DrawRule {
    /// Greedy decoding.
    pub const GREEDY: DrawRule = DrawRule { temperature: 0.0, top_p: 1.0, min_p: 0.0, top_k: 0 };

    /// The kernel's per-sequence parameter row: (temperature, top_p, min_p, top_k).
    pub fn as_row(&self) -> [f32; 4] {
        [self.temperature, self.top_p, self.min_p, self.top_k as f32]
    }

    /// Greedy when the temperature is not above zero (NaN included) or only one token is kept.
    fn greedy(&self) -> bool {
        self.temperature.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) || self.top_k == 1
    }
}

/// The reference's pick, with where it sits in the kept distribution: the running mass before
/// the token, the token's own, and the kept total (for a tolerance at CDF boundaries).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    pub token: u32,
    pub before: f64,
    pub mass: f64,
    pub total: f64,
}

/// The lowest index of the largest logit (NaNs skipped; none left: 0).
pub fn argmax_f32(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

/// The token `rule` draws from `logits` with uniform `u` ∈ [0, 1).
pub fn pick(logits: &[f32], rule: &DrawRule, u: f64) -> Pick {
    let best = argmax_f32(logits);
    let max = logits.get(best as usize).copied().unwrap_or(0.0);
    if rule.greedy() || logits.is_empty() || max.is_infinite() {
        return Pick { token: best, before: 0.0, mass: 1.0, total: 1.0 };
    }
    let t = rule.temperature as f64;
    let w: Vec<f64> = logits.iter().map(|&l| if l.is_nan() { 0.0 } else { ((l as f64 - max as f64) / t).exp() }).collect();
    let min_w = (rule.min_p.max(0.0) as f64).max(MIN_WEIGHT);
    let mut kept: Vec<bool> = w.iter().map(|&w| w >= min_w).collect();
    // Kept logits, largest first.
    let ordered = |kept: &[bool]| {
        let mut v: Vec<f32> = logits.iter().zip(kept).filter(|(_, &k)| k).map(|(&l, _)| l).collect();
        v.sort_by(|a, b| b.total_cmp(a));
        v
    };
    let k = rule.top_k as usize;
    if k >= 1 && k < logits.len() {
        let sorted = ordered(&kept);
        if let Some(&kth) = sorted.get(k - 1) {
            kept.iter_mut().zip(logits).for_each(|(keep, &l)| *keep &= l >= kth);
        }
    }
    if rule.top_p < 1.0 {
        let total: f64 = w.iter().zip(&kept).filter(|(_, &k)| k).map(|(w, _)| w).sum();
        let target = (rule.top_p.max(0.0) as f64 * total).max(f64::MIN_POSITIVE);
        let sorted = ordered(&kept);
        let mut acc = 0.0;
        let mut threshold = sorted.last().copied().unwrap_or(max);
        let mut i = 0;
        while i < sorted.len() {
            let v = sorted[i];
            // A group of equal logits counts whole.
            while i < sorted.len() && sorted[i] == v {
                acc += ((v as f64 - max as f64) / t).exp();
                i += 1;
            }
            if acc >= target {
                threshold = v;
                break;
            }
        }
        kept.iter_mut().zip(logits).for_each(|(keep, &l)| *keep &= l >= threshold);
    }
    let total: f64 = w.iter().zip(&kept).filter(|(_, &k)| k).map(|(w, _)| w).sum();
    let r = u * total;
    let mut acc = 0.0;
    let mut last = Pick { token: best, before: 0.0, mass: 1.0, total: 1.0 };
    for (i, (&wi, &k)) in w.iter().zip(&kept).enumerate() {
        if !k {
            continue;
        }
        last = Pick { token: i as u32, before: acc, mass: wi, total };
        if r < acc + wi {
            return last;
        }
        acc += wi;
    }
    last
}

/// How far (in u) a CDF boundary of the kernel's f32 weights may sit from the reference's.
pub const U_TOLERANCE: f64 = 1e-5;

/// Whether `token` is what `rule` picks from `logits` with a uniform within [`U_TOLERANCE`] of `u`.
pub fn agrees(logits: &[f32], rule: &DrawRule, u: f64, token: u32) -> bool {
    [u, u - U_TOLERANCE, u + U_TOLERANCE].iter().any(|&u| pick(logits, rule, u.clamp(0.0, 1.0 - f64::EPSILON)).token == token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(temperature: f32, top_p: f32, min_p: f32, top_k: u32) -> DrawRule {
        DrawRule { temperature, top_p, min_p, top_k }
    }

    #[test]
    fn greedy_and_top_k_1_are_the_first_argmax() {
        let l = [0.5f32, 2.0, f32::NAN, 2.0, -1.0];
        assert_eq!(pick(&l, &DrawRule::GREEDY, 0.9).token, 1);
        assert_eq!(pick(&l, &rule(1.0, 1.0, 0.0, 1), 0.9).token, 1);
    }

    #[test]
    fn draws_walk_the_cdf_in_token_order() {
        // Weights exp(l - max) of [ln 1, ln 3] are 1/3 and 1: u below 0.25 picks token 0.
        let l = [0.0f32, 3f32.ln()];
        let w0 = (0.0 - 3f64.ln() as f32 as f64).exp();
        assert_eq!(pick(&l, &rule(1.0, 1.0, 0.0, 0), 0.2).token, 0);
        assert_eq!(pick(&l, &rule(1.0, 1.0, 0.0, 0), w0 / (1.0 + w0) + 1e-6).token, 1);
        assert_eq!(pick(&l, &rule(1.0, 1.0, 0.0, 0), 0.999_999).token, 1);
    }

    #[test]
    fn filters_keep_what_they_promise() {
        let l: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let order = {
            let mut o: Vec<usize> = (0..100).collect();
            o.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
            o
        };
        for u in [0.0, 0.3, 0.7, 0.999] {
            let top3 = pick(&l, &rule(1.0, 1.0, 0.0, 3), u).token as usize;
            assert!(order[..3].contains(&top3), "top_k 3 picked {top3}");
            // A tiny top_p keeps only the largest logit.
            assert_eq!(pick(&l, &rule(1.0, 1e-6, 0.0, 0), u).token as usize, order[0]);
            // min_p 1 keeps only the largest too.
            assert_eq!(pick(&l, &rule(1.0, 1.0, 1.0, 0), u).token as usize, order[0]);
        }
    }
}
