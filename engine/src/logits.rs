//! What a request changes in the logits before its token is picked: repetition, presence and
//! frequency penalties, `logit_bias`, and the end tokens masked until `min_tokens` (vLLM's
//! definitions). Takes one sequence's last-position logits and its tokens so far; gives the
//! logits the sampler and the logprobs read. A request with none of these leaves the logits
//! untouched ([`LogitsProcessing::is_identity`]), and the device may then pick on its own.

/// A request's logit changes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogitsProcessing {
    /// vLLM `repetition_penalty` (1 = off): a logit of a token seen in the prompt or output is
    /// divided by it when positive, multiplied when negative.
    pub repetition: f64,
    /// OpenAI `presence_penalty`: subtracted once from a token that occurs in the output.
    pub presence: f64,
    /// OpenAI `frequency_penalty`: subtracted per occurrence in the output.
    pub frequency: f64,
    /// OpenAI `logit_bias`: (token id, bias) added to the logit.
    pub bias: Vec<(u32, f64)>,
    /// Until this many tokens are generated, the `end` tokens cannot be picked.
    pub min_tokens: usize,
    /// The tokens `min_tokens` holds back: EOS and the request's `stop_token_ids`.
    pub end: Vec<u32>,
}

impl LogitsProcessing {
    /// No changes at all.
    pub fn none() -> Self {
        LogitsProcessing { repetition: 1.0, ..Default::default() }
    }

    /// Whether this leaves every logit as it is.
    pub fn is_identity(&self) -> bool {
        self.repetition == 1.0 && self.presence == 0.0 && self.frequency == 0.0 && self.bias.is_empty() && (self.min_tokens == 0 || self.end.is_empty())
    }

    /// Applies the changes to `logits` of a sequence whose prompt is `prompt` and output so far `output`.
    pub fn apply(&self, logits: &mut [f64], prompt: &[u32], output: &[u32]) {
        if self.is_identity() {
            return;
        }
        let vocab = logits.len();
        if self.repetition != 1.0 {
            let mut seen = vec![false; vocab];
            prompt.iter().chain(output).filter(|&&t| (t as usize) < vocab).for_each(|&t| seen[t as usize] = true);
            for (l, _) in logits.iter_mut().zip(&seen).filter(|(_, &s)| s) {
                *l = if *l > 0.0 { *l / self.repetition } else { *l * self.repetition };
            }
        }
        if self.presence != 0.0 || self.frequency != 0.0 {
            let mut counts = std::collections::HashMap::<u32, usize>::new();
            output.iter().for_each(|&t| *counts.entry(t).or_default() += 1);
            for (t, n) in counts.into_iter().filter(|(t, _)| (*t as usize) < vocab) {
                logits[t as usize] -= self.presence + self.frequency * n as f64;
            }
        }
        for &(t, b) in self.bias.iter().filter(|(t, _)| (*t as usize) < vocab) {
            logits[t as usize] += b;
        }
        if output.len() < self.min_tokens {
            for &t in self.end.iter().filter(|&&t| (t as usize) < vocab) {
                logits[t as usize] = f64::NEG_INFINITY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_changes_nothing() {
        let p = LogitsProcessing::none();
        assert!(p.is_identity());
        let mut l = vec![1.0, -2.0];
        p.apply(&mut l, &[0, 1], &[1]);
        assert_eq!(l, vec![1.0, -2.0]);
    }

    #[test]
    fn penalties_bias_and_min_tokens_follow_vllm() {
        let p = LogitsProcessing { repetition: 2.0, presence: 0.5, frequency: 0.25, bias: vec![(3, 10.0)], min_tokens: 3, end: vec![4] };
        let mut l = vec![2.0, -2.0, 1.0, 0.0, 5.0];
        // Token 0 in the prompt, token 1 twice in the output.
        p.apply(&mut l, &[0], &[1, 1]);
        assert_eq!(l[0], 1.0, "positive logit divided by the repetition penalty");
        assert_eq!(l[1], -4.0 - 0.5 - 0.5, "negative logit multiplied, then presence and 2 x frequency");
        assert_eq!(l[2], 1.0, "unseen: untouched");
        assert_eq!(l[3], 10.0, "logit_bias added");
        assert_eq!(l[4], f64::NEG_INFINITY, "end token masked before min_tokens");
        let mut l = vec![0.0; 5];
        p.apply(&mut l, &[], &[2, 2, 2]);
        assert!(l[4].is_finite(), "min_tokens reached");
    }
}
