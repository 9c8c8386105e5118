//! Decode throughput of a backend: prefill a batch of synthetic prompts, then time greedy
//! decode steps. Takes a [`Backend`]; gives a [`DecodeBench`] (the `mangrove bench-decode`
//! numbers). Wall-clock timing: the CPU backend is synchronous.

use std::time::Instant;

use serde::Serialize;

use super::cpu::{ForwardError, KvCache, SeqInput};
use super::sampling::argmax;
use super::Backend;

/// Result of one decode benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeBench {
    pub backend: &'static str,
    pub batch: usize,
    pub prompt_tokens: usize,
    pub decode_steps: usize,
    pub prefill_ms: f64,
    /// Mean wall time of one decode step of the whole batch.
    pub step_ms: f64,
    /// Generated tokens per second over the batch.
    pub tokens_per_s: f64,
}

/// Prefills `batch` prompts of `prompt_tokens` tokens, then runs `steps` greedy decode steps.
pub fn bench_decode(backend: &dyn Backend, batch: usize, prompt_tokens: usize, steps: usize) -> Result<DecodeBench, ForwardError> {
    let cfg = backend.config();
    let mut caches: Vec<KvCache> = (0..batch).map(|_| KvCache::new(cfg)).collect();
    // Distinct deterministic prompts so sequences do not share work by accident.
    let prompts: Vec<Vec<u32>> =
        (0..batch).map(|b| (0..prompt_tokens).map(|i| ((b * 131 + i * 17 + 1) % cfg.vocab) as u32).collect()).collect();
    let t = Instant::now();
    let mut inputs: Vec<SeqInput> = prompts.iter().zip(caches.iter_mut()).map(|(p, c)| SeqInput { tokens: p, cache: c }).collect();
    let (mut logits, _) = backend.forward(&mut inputs)?;
    let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    for _ in 0..steps {
        let next: Vec<[u32; 1]> = logits.iter().map(|l| [argmax(l)]).collect();
        let mut inputs: Vec<SeqInput> = next.iter().zip(caches.iter_mut()).map(|(n, c)| SeqInput { tokens: n, cache: c }).collect();
        logits = backend.forward(&mut inputs)?.0;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(DecodeBench {
        backend: backend.name(),
        batch,
        prompt_tokens,
        decode_steps: steps,
        prefill_ms,
        step_ms: secs * 1e3 / steps.max(1) as f64,
        tokens_per_s: if secs > 0.0 { (batch * steps) as f64 / secs } else { 0.0 },
    })
}
