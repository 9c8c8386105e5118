//! Continuous batching: one background task owns the running batch. Each decode step it pulls
//! every newly submitted request into the batch (its prompt is prefilled in that step), runs
//! one forward of the whole batch on the blocking pool, samples a token per sequence, streams
//! text deltas back and retires finished sequences (max_tokens, EOS, stop string, context
//! full, or the client went away).

use std::sync::Arc;

use rayon::prelude::*;
use tokio::sync::mpsc;

use crate::backend::{KvCache, SeqInput};
use super::metrics::Metrics;
use super::sampling::{Draw, Sampler, SamplingParams};
use super::tokenizer::TextStream;
use super::Engine;

/// One generation request.
#[derive(Debug)]
pub struct GenRequest {
    /// Prompt token ids (non-empty).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Temperature, top_p and seed.
    pub sampling: SamplingParams,
    /// Generation stops before the first occurrence of any of these.
    pub stop: Vec<String>,
    /// Where deltas and the final [`Finish`] go.
    pub events: mpsc::UnboundedSender<GenEvent>,
}

/// Why a sequence ended (OpenAI `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// max_tokens or the context window.
    Length,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The end of a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    /// Why it ended.
    pub reason: FinishReason,
    /// Prompt length in tokens (`usage.prompt_tokens`).
    pub prompt_tokens: usize,
    /// Tokens generated, EOS included (`usage.completion_tokens`).
    pub completion_tokens: usize,
    /// Set when the step failed; the text so far is still valid.
    pub error: Option<String>,
}

/// What a request's receiver gets: text deltas, then one `Done`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GenEvent {
    /// New text (possibly several tokens' worth, or none held back yet).
    Delta(String),
    /// The sequence ended; nothing follows.
    Done(Finish),
}

/// Errors of submitting a request.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the engine task has stopped")]
    Stopped,
}

/// Submits requests to the engine task.
#[derive(Debug, Clone)]
pub struct BatcherHandle {
    tx: mpsc::UnboundedSender<GenRequest>,
}

impl BatcherHandle {
    /// Queues a request; it joins the running batch at the next step.
    pub fn submit(&self, req: GenRequest) -> Result<(), SubmitError> {
        self.tx.send(req).map_err(|_| SubmitError::Stopped)
    }
}

/// Settings of the engine task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatcherConfig {
    /// Most prompt tokens one sequence feeds per step (chunked prefill), so a long prompt
    /// does not stall the decode steps of the others.
    pub prefill_chunk: usize,
    /// Most sequences in flight at once (a device backend's KV slots); later requests wait.
    pub max_seqs: usize,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig { prefill_chunk: 512, max_seqs: usize::MAX }
    }
}

struct Seq {
    req: GenRequest,
    cache: KvCache,
    /// Tokens to feed: the prompt, then the last sampled token.
    pending: Vec<u32>,
    /// How many of `pending` are already in the cache.
    fed: usize,
    generated: Vec<u32>,
    sampler: Sampler,
    /// The generated text, detokenized incrementally.
    stream: TextStream,
    /// Bytes of the decoded text already sent.
    emitted: usize,
}

/// A sequence after a step: the token its draw picked, then that token again once accepted (none
/// while its prompt is still being fed).
type StepItem = (Seq, u32, Option<u32>);

/// Starts the engine task on the current tokio runtime with default settings.
pub fn spawn(engine: Arc<Engine>, metrics: Arc<Metrics>) -> (BatcherHandle, tokio::task::JoinHandle<()>) {
    spawn_with(engine, metrics, BatcherConfig::default())
}

/// Starts the engine task on the current tokio runtime.
pub fn spawn_with(engine: Arc<Engine>, metrics: Arc<Metrics>, cfg: BatcherConfig) -> (BatcherHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (BatcherHandle { tx }, tokio::spawn(run(engine, metrics, cfg, rx)))
}

fn admit(engine: &Engine, req: GenRequest) -> Seq {
    Seq {
        cache: KvCache::new(engine.config()),
        pending: req.prompt.clone(),
        fed: 0,
        generated: Vec::new(),
        sampler: Sampler::new(req.sampling),
        stream: TextStream::default(),
        emitted: 0,
        req,
    }
}

async fn run(engine: Arc<Engine>, metrics: Arc<Metrics>, cfg: BatcherConfig, mut rx: mpsc::UnboundedReceiver<GenRequest>) {
    let chunk = cfg.prefill_chunk.max(1);
    let mut active: Vec<Seq> = Vec::new();
    let mut waiting: std::collections::VecDeque<GenRequest> = std::collections::VecDeque::new();
    loop {
        if active.is_empty() && waiting.is_empty() {
            match rx.recv().await {
                Some(r) => waiting.push_back(r),
                None => return,
            }
        }
        while let Ok(r) = rx.try_recv() {
            waiting.push_back(r);
        }
        while active.len() < cfg.max_seqs.max(1) {
            match waiting.pop_front() {
                Some(r) => active.push(admit(&engine, r)),
                None => break,
            }
        }
        // Drop sequences whose client went away before spending a step on them.
        active.retain(|s| !s.req.events.is_closed());
        metrics.set_active(active.len());
        if active.is_empty() {
            continue;
        }
        let backend = engine.backend.clone();
        let mut seqs = std::mem::take(&mut active);
        let step = tokio::task::spawn_blocking(move || {
            // Sequences that finish their prompt this step draw their next token (greedy draws
            // elsewhere: mid-prefill picks are dropped and consume no randomness).
            let draws: Vec<Draw> = seqs
                .iter_mut()
                .map(|s| if s.fed + chunk >= s.pending.len() { s.sampler.next_draw() } else { Draw::GREEDY })
                .collect();
            let mut inputs: Vec<SeqInput> = seqs
                .iter_mut()
                .map(|s| SeqInput { tokens: &s.pending[s.fed..(s.fed + chunk).min(s.pending.len())], cache: &mut s.cache })
                .collect();
            let fed: usize = inputs.iter().map(|i| i.tokens.len()).sum();
            let t = std::time::Instant::now();
            let out = backend.forward_sample(&mut inputs, &draws);
            let timing = (fed, t.elapsed());
            drop(inputs);
            if out.is_ok() {
                seqs.iter_mut().for_each(|s| s.fed = (s.fed + chunk).min(s.pending.len()));
            }
            (seqs, out, timing)
        })
        .await;
        let (seqs, out) = match step {
            Ok((seqs, out, (fed, elapsed))) => {
                metrics.step(fed, elapsed);
                (seqs, out)
            }
            Err(e) => {
                // The forward panicked; its sequences are lost, their receivers see a closed channel.
                eprintln!("mangrove engine: forward step failed: {e}");
                metrics.set_active(0);
                continue;
            }
        };
        let (tokens, report) = match out {
            Ok(v) => v,
            Err(e) => {
                for s in seqs {
                    let f = Finish { reason: FinishReason::Stop, prompt_tokens: s.req.prompt.len(), completion_tokens: s.generated.len(), error: Some(e.to_string()) };
                    let _ = s.req.events.send(GenEvent::Done(f));
                }
                metrics.set_active(0);
                continue;
            }
        };
        metrics.paths_ran(&report.paths);
        for (family, reason) in &report.fallbacks {
            metrics.fallback(*family, *reason);
        }
        // Detokenize every sequence that finished its prompt, in parallel (the step's sequences
        // are independent).
        let mut items: Vec<StepItem> = seqs.into_iter().zip(tokens).map(|(s, t)| (s, t, None)).collect();
        items.par_iter_mut().filter(|(s, _, _)| s.fed >= s.pending.len()).for_each(|(s, tok, picked)| {
            s.generated.push(*tok);
            // A tokenizer error leaves the text as it was; the token still counts.
            let _ = engine.tokenizer.step(&mut s.stream, *tok);
            *picked = Some(*tok);
        });
        for (mut s, _, picked) in items {
            let Some(tok) = picked else {
                // Mid-prefill: these logits are not the last prompt position's.
                active.push(s);
                continue;
            };
            metrics.generated(1);
            if let Some(reason) = advance(&engine, &mut s, tok) {
                let f = Finish { reason, prompt_tokens: s.req.prompt.len(), completion_tokens: s.generated.len(), error: None };
                let _ = s.req.events.send(GenEvent::Done(f));
            } else {
                s.pending = vec![tok];
                s.fed = 0;
                active.push(s);
            }
        }
        metrics.set_active(active.len());
    }
}

/// Length of the longest suffix of `text` that starts some stop string.
fn partial_stop(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|st| (1..st.len()).filter(|&n| st.is_char_boundary(n) && text.ends_with(&st[..n])))
        .max()
        .unwrap_or(0)
}

/// After `tok` (already in `s.generated` and `s.stream`): sends the new text and says whether the
/// sequence is done. A stop string can only start in the unsent text (a possible stop prefix is
/// held back), so only that part is searched.
fn advance(engine: &Engine, s: &mut Seq, tok: u32) -> Option<FinishReason> {
    let text = s.stream.text.as_str();
    let eos = engine.eos.contains(&tok);
    let unsent = text.get(s.emitted..).unwrap_or_default();
    let stop_at = s.req.stop.iter().filter(|st| !st.is_empty()).filter_map(|st| unsent.find(st.as_str())).min().map(|i| s.emitted + i);
    let length = s.generated.len() >= s.req.max_tokens || s.cache.len() + 1 >= engine.config().max_positions;
    let (end, reason) = match (stop_at, eos, length) {
        (Some(i), _, _) => (i, Some(FinishReason::Stop)),
        (None, true, _) => (text.len(), Some(FinishReason::Stop)),
        (None, false, true) => (text.len(), Some(FinishReason::Length)),
        // Hold back an unfinished UTF-8 character and a possible stop-string prefix.
        (None, false, false) => (text.trim_end_matches('\u{FFFD}').len().saturating_sub(partial_stop(text, &s.req.stop)), None),
    };
    if end > s.emitted && text.is_char_boundary(s.emitted) && text.is_char_boundary(end) {
        let _ = s.req.events.send(GenEvent::Delta(text[s.emitted..end].to_string()));
        s.emitted = end;
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_stop_finds_prefix() {
        let stops = vec!["END".to_string(), "xy".to_string()];
        assert_eq!(partial_stop("abcEN", &stops), 2);
        assert_eq!(partial_stop("abx", &stops), 1);
        assert_eq!(partial_stop("abc", &stops), 0);
    }
}
