//! Decode throughput of a backend: prefill a batch of synthetic prompts (TTFT), run one untimed
//! decode step (a device backend captures its step graph there), then time greedy
//! decode steps (TPOT p50/p99, tokens/s), against the weight-bandwidth bound: every decode step
//! reads all weights once, so at copy bandwidth B a step takes at least weight_bytes / B.
//! Takes a [`Backend`]; gives a [`DecodeBench`] (the `mangrove bench decode` numbers);
//! [`decode_report`] runs it over several batch sizes with the device's copy bandwidth and the
//! run's provenance, as `mangrove bench decode` prints it.
//! Wall-clock timing: each step returns its sampled tokens, so it has finished on the device.

use std::time::Instant;

use serde::Serialize;

use mangrove_core::compile::{nvrtc_loaded, Compiler};
use mangrove_core::gpu::{Gpu, GpuError};
use mangrove_core::model_config::ModelConfig;
use mangrove_core::tuning_db::Provenance;

use crate::backend::{Backend, ForwardError, KvCache, SeqInput};
use crate::sampling::Draw;

/// Result of one decode benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeBench {
    pub backend: &'static str,
    pub batch: usize,
    pub prompt_tokens: usize,
    pub decode_steps: usize,
    /// Time to first token: the prefill forward of the whole batch.
    pub ttft_ms: f64,
    /// Time per output token (one decode step of the batch): median, 99th percentile, mean.
    pub tpot_p50_ms: f64,
    pub tpot_p99_ms: f64,
    pub step_ms: f64,
    /// Generated tokens per second over the batch.
    pub tokens_per_s: f64,
    /// Bytes of weights one decode step reads (packed ternary linears + LM head).
    pub weight_bytes: u64,
    /// Tokens/s if a step took only `weight_bytes` at the measured copy bandwidth.
    pub bound_tokens_per_s: Option<f64>,
    /// tokens_per_s / bound_tokens_per_s.
    pub fraction_of_bound: Option<f64>,
    /// GPU time per kernel family of one extra decode step run with per-launch events
    /// (device backends; empty on the CPU).
    pub step_profile: Vec<mangrove_core::gpu::SpanTotal>,
}

/// Bytes of weights a decode step streams: 2-bit ternary linears (packed, 4 per byte) and the
/// bf16 LM head (KV-cache and activation traffic are not counted).
pub fn weight_bytes(c: &ModelConfig) -> u64 {
    let (h, i) = (c.hidden as u64, c.inter as u64);
    let (qd, kvd) = (c.q_dim() as u64, c.kv_dim() as u64);
    let per_layer = match c.moe {
        None => (qd + 2 * kvd) * h + h * qd + 2 * i * h + h * i,
        // Each token touches topk experts; count the experts one token reads.
        Some(m) => (qd + 2 * kvd) * h + h * qd + m.topk as u64 * 3 * m.inter as u64 * h,
    } / 4;
    per_layer * c.layers as u64 + 2 * c.vocab as u64 * h
}

/// Prefills `batch` prompts of `prompt_tokens` tokens, then runs `steps` greedy decode steps.
/// `copy_gbs` (the device's measured copy bandwidth) gives the bound.
pub fn bench_decode(
    backend: &dyn Backend,
    batch: usize,
    prompt_tokens: usize,
    steps: usize,
    copy_gbs: Option<f64>,
) -> Result<DecodeBench, ForwardError> {
    let cfg = backend.config();
    let mut caches: Vec<KvCache> = (0..batch).map(|_| KvCache::new(cfg)).collect();
    // Distinct deterministic prompts so sequences do not share work by accident.
    let prompts: Vec<Vec<u32>> =
        (0..batch).map(|b| (0..prompt_tokens).map(|i| ((b * 131 + i * 17 + 1) % cfg.vocab) as u32).collect()).collect();
    let t = Instant::now();
    let mut inputs: Vec<SeqInput> = prompts.iter().zip(caches.iter_mut()).map(|(p, c)| SeqInput { tokens: p, cache: c }).collect();
    // Greedy draws, picked where the backend samples (on the GPU for CUDA, as the server does).
    let draws = vec![Draw::GREEDY; batch];
    let (mut next, _) = backend.forward_sample(&mut inputs, &draws)?;
    let ttft_ms = t.elapsed().as_secs_f64() * 1e3;
    // One decode step: each sequence's last pick is its next token.
    let mut decode = |next: &[u32]| -> Result<Vec<u32>, ForwardError> {
        let feed: Vec<[u32; 1]> = next.iter().map(|&n| [n]).collect();
        let mut inputs: Vec<SeqInput> = feed.iter().zip(caches.iter_mut()).map(|(n, c)| SeqInput { tokens: n, cache: c }).collect();
        Ok(backend.forward_sample(&mut inputs, &draws)?.0)
    };
    // One untimed decode step: a device backend captures its step graph for this shape here,
    // which is set-up, not a decode step's cost.
    next = decode(&next)?;
    let mut step_ms = Vec::with_capacity(steps);
    let t_all = Instant::now();
    for _ in 0..steps {
        let t = Instant::now();
        next = decode(&next)?;
        step_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let secs = t_all.elapsed().as_secs_f64();
    // One more step with per-launch events: where the step's GPU time goes.
    backend.set_profiling(true);
    let profiled = decode(&next).map(|_| backend.last_profile());
    backend.set_profiling(false);
    let step_profile = profiled?;
    let tokens_per_s = if secs > 0.0 { (batch * steps) as f64 / secs } else { 0.0 };
    let weight_bytes = weight_bytes(cfg);
    let bound = copy_gbs.map(|gbs| batch as f64 / (weight_bytes as f64 / (gbs * 1e9)));
    let mut sorted = step_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let pick = |q: f64| sorted.get(((sorted.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(0.0);
    Ok(DecodeBench {
        backend: backend.name(),
        batch,
        prompt_tokens,
        decode_steps: steps,
        ttft_ms,
        tpot_p50_ms: pick(0.5),
        tpot_p99_ms: pick(0.99),
        step_ms: secs * 1e3 / steps.max(1) as f64,
        tokens_per_s,
        weight_bytes,
        bound_tokens_per_s: bound,
        fraction_of_bound: bound.map(|b| tokens_per_s / b),
        step_profile,
    })
}

/// Errors of a decode benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("--batch and --prompt-tokens must be positive")]
    Input,
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("measuring the copy bandwidth")]
    Gpu(#[from] GpuError),
}

/// `bench decode` over several batch sizes: the runs, the copy bandwidth they are bounded by
/// and where they ran.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeReport {
    pub model: String,
    pub copy_gbs: Option<f64>,
    pub provenance: Provenance,
    pub runs: Vec<DecodeBench>,
}

/// Runs [`bench_decode`] at each of `batches` on `backend` (the GPU's copy bandwidth, or on a
/// CPU backend the host's streaming-read bandwidth, gives the bound); `command` is recorded in the provenance.
pub fn decode_report(backend: &dyn Backend, model: &str, batches: &[usize], prompt_tokens: usize, steps: usize, command: String) -> Result<DecodeReport, BenchError> {
    if batches.is_empty() || batches.contains(&0) || prompt_tokens == 0 {
        return Err(BenchError::Input);
    }
    // The NVRTC version only where this run loaded it (an offline bundle never does).
    let nvrtc = if nvrtc_loaded() { Compiler::open().map(|c| c.version()).unwrap_or((0, 0)) } else { (0, 0) };
    // A CPU backend is bounded by this machine's memory: a streaming read of 1 GiB on all cores.
    let cpu = backend.name().starts_with("cpu");
    let gpu = if cpu { None } else { Gpu::open(0).ok() };
    let copy_gbs = match &gpu {
        Some(g) => Some(g.copy_bandwidth_gbs(1 << 30)?),
        None if cpu => crate::cpu_simd::pool::Pool::new(0).ok().map(|p| crate::cpu_simd::pool::read_bandwidth_gbs(&p, 1 << 30)),
        None => None,
    };
    let provenance = Provenance::collect(gpu.as_ref(), nvrtc, command);
    let runs = batches.iter().map(|&b| bench_decode(backend, b, prompt_tokens, steps, copy_gbs)).collect::<Result<_, _>>()?;
    Ok(DecodeReport { model: model.to_string(), copy_gbs, provenance, runs })
}

impl std::fmt::Display for DecodeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for r in &self.runs {
            write!(
                f,
                "backend {}  batch {:>3}  prompt {} tokens  TTFT {:.1} ms  TPOT p50 {:.3} ms p99 {:.3} ms  {:.1} tokens/s",
                r.backend, r.batch, r.prompt_tokens, r.ttft_ms, r.tpot_p50_ms, r.tpot_p99_ms, r.tokens_per_s
            )?;
            if let (Some(b), Some(fr)) = (r.bound_tokens_per_s, r.fraction_of_bound) {
                write!(f, "  bound {b:.1} tokens/s ({:.1}%)", 100.0 * fr)?;
            }
            writeln!(f)?;
            let total: f64 = r.step_profile.iter().map(|t| t.us).sum();
            for t in &r.step_profile {
                writeln!(f, "    {:<20} {:>9.1} µs {:>5.1}%  {} launches", t.label, t.us, 100.0 * t.us / total, t.launches)?;
            }
        }
        if let (Some(gbs), Some(r)) = (self.copy_gbs, self.runs.first()) {
            let what = if r.backend.starts_with("cpu") { "memory read bandwidth" } else { "copy bandwidth" };
            writeln!(f, "weights {:.1} MB per step; {what} {gbs:.1} GB/s", r.weight_bytes as f64 / 1e6)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitnet_2b_weight_bytes() {
        let c = ModelConfig::from_json(
            r#"{"hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 30, "num_attention_heads": 20,
                "num_key_value_heads": 5, "vocab_size": 128256, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0, "tie_word_embeddings": true, "hidden_act": "relu2"}"#,
        )
        .unwrap();
        // 30 × 2560 × (3840 + 2560 + 13824 + 6912) / 4 ternary bytes + 128256 × 2560 × 2 bf16 bytes.
        assert_eq!(weight_bytes(&c), 30 * 2560 * 27136 / 4 + 128256 * 2560 * 2);
    }
}
