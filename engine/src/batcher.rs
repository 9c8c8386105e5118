//! Continuous batching: one background task owns the running batch. Admission is bounded: a
//! request waits in a queue of at most `max_queue` (a full queue refuses it at once,
//! [`SubmitError::QueueFull`]) until one of `max_seqs` sequence slots is free; a free slot goes
//! to the shortest waiting prompt, unless the oldest has been passed over `max_seqs` times
//! already (so it cannot starve). Each step feeds at
//! most `step_tokens` tokens: every decoding sequence's one token first, then prompt chunks (at
//! most `prefill_chunk` per sequence; the oldest prompt, then the shortest), so one long prompt
//! cannot starve the others. The step runs on the blocking pool; a token is sampled per sequence, text deltas are
//! streamed back and finished sequences retire (max_tokens, EOS, stop string, context full, or
//! the client went away).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::backend::{KvCache, SeqInput};
use crate::logits::LogitsProcessing;
use crate::logprobs::{token_logprob, TokenLogprob};
use super::metrics::Metrics;
use super::sampling::{self, Draw, Sampler, SamplingParams};
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
    /// Logit changes, logprobs and end tokens beyond the defaults.
    pub options: GenOptions,
}

/// What a request asks beyond plain sampling; the default asks nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct GenOptions {
    /// Penalties, `logit_bias`, `min_tokens`.
    pub processing: LogitsProcessing,
    /// Log-probabilities of each generated token with this many alternatives ([`GenEvent::Tokens`]).
    pub logprobs: Option<usize>,
    /// Log-probabilities of the prompt tokens too ([`GenEvent::Prompt`]; top alternatives as `logprobs`).
    pub prompt_logprobs: bool,
    /// Tokens that end the sequence besides EOS (`stop_token_ids`).
    pub stop_ids: Vec<u32>,
    /// EOS does not end the sequence (`ignore_eos`).
    pub ignore_eos: bool,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions { processing: LogitsProcessing::none(), logprobs: None, prompt_logprobs: false, stop_ids: Vec::new(), ignore_eos: false }
    }
}

impl GenRequest {
    /// Whether its tokens must be picked from logits on the host: logprobs are wanted or the
    /// logits change before the pick. The one place that decides between `Backend::forward`
    /// and the device's own sampler (`Backend::forward_sample`).
    pub fn needs_host_logits(&self) -> bool {
        self.options.logprobs.is_some() || self.options.prompt_logprobs || !self.options.processing.is_identity()
    }
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

/// What a request's receiver gets: the prompt's logprobs (if asked), text deltas each after the
/// logprobs of the tokens it holds (if asked), then one `Done`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// Per prompt position its token's logprob (`None` at the first, which nothing predicts).
    Prompt(Vec<Option<TokenLogprob>>),
    /// Logprobs of the tokens whose text the next `Delta` (or the `Done`) carries.
    Tokens(Vec<TokenLogprob>),
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
    /// Every sequence slot is busy and `limit` requests already wait.
    #[error("the server is at capacity: {limit} requests are already waiting for a sequence slot")]
    QueueFull { limit: usize },
}

/// Submits requests to the engine task.
#[derive(Debug, Clone)]
pub struct BatcherHandle {
    tx: mpsc::UnboundedSender<Queued>,
    /// One permit per free place in the queue; a waiting request holds one until admitted.
    places: Arc<Semaphore>,
    max_queue: usize,
}

/// A request waiting for a sequence slot, holding its place in the queue.
#[derive(Debug)]
struct Queued {
    req: GenRequest,
    _place: OwnedSemaphorePermit,
    /// When it was submitted (queue time, TTFT and end-to-end latency count from here).
    arrived: Instant,
}

impl BatcherHandle {
    /// Queues a request without waiting: it joins the running batch when a sequence slot is
    /// free; a full queue is refused at once.
    pub fn submit(&self, req: GenRequest) -> Result<(), SubmitError> {
        let place = self.places.clone().try_acquire_owned().map_err(|e| match e {
            TryAcquireError::NoPermits => SubmitError::QueueFull { limit: self.max_queue },
            TryAcquireError::Closed => SubmitError::Stopped,
        })?;
        self.tx.send(Queued { req, _place: place, arrived: Instant::now() }).map_err(|_| SubmitError::Stopped)
    }

    /// Requests waiting for a sequence slot.
    pub fn queued(&self) -> usize {
        self.max_queue - self.places.available_permits()
    }
}

/// Settings of the engine task (admission control and the per-step budget).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatcherConfig {
    /// Most prompt tokens one sequence feeds per step (chunked prefill), so a long prompt
    /// does not stall the decode steps of the others.
    pub prefill_chunk: usize,
    /// Most sequences in flight at once (`--max-batch`; a device backend's KV slots); later
    /// requests wait in the queue.
    pub max_seqs: usize,
    /// Most requests waiting for a sequence slot (`--max-queue`); beyond it a request is
    /// refused at once ([`SubmitError::QueueFull`], HTTP 429).
    pub max_queue: usize,
    /// Most tokens one forward step feeds over all sequences (`--step-tokens`): decode tokens
    /// first, prompt chunks from what is left.
    pub step_tokens: usize,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig { prefill_chunk: 512, max_seqs: 16, max_queue: 64, step_tokens: 2048 }
    }
}

/// Errors of a batcher configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{name} must be positive")]
    Zero { name: &'static str },
}

impl BatcherConfig {
    /// Checks every limit is positive.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fields = [("--prefill-chunk", self.prefill_chunk), ("--max-batch", self.max_seqs), ("--max-queue", self.max_queue), ("--step-tokens", self.step_tokens)];
        match fields.iter().find(|(_, v)| *v == 0) {
            Some((name, _)) => Err(ConfigError::Zero { name }),
            None => Ok(()),
        }
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
    /// Admission order (prompt chunks are scheduled oldest first).
    order: u64,
    /// Tokens of `pending` this step feeds (set by [`schedule`]; 0 = sits this step out).
    take: usize,
    /// Prompt logprobs so far (with `prompt_logprobs`; the prompt is then fed one token a step,
    /// each step's logits scoring the next prompt token).
    prompt_lps: Vec<Option<TokenLogprob>>,
    /// Logprobs of generated tokens whose text is not sent yet.
    unsent_lps: Vec<TokenLogprob>,
    /// When its request arrived, and when its last token was generated (latency metrics).
    arrived: Instant,
    last_token: Option<Instant>,
}

impl Seq {
    fn remaining(&self) -> usize {
        self.pending.len() - self.fed
    }

    /// Most prompt tokens one step may feed: one when each prompt position must be scored.
    fn chunk(&self, chunk: usize) -> usize {
        if self.req.options.prompt_logprobs {
            1
        } else {
            chunk
        }
    }

    /// Whether this step feeds the last pending token (its logits pick the next token).
    fn finishes_pending(&self) -> bool {
        self.fed + self.take >= self.pending.len()
    }

    /// How it ended, for its receiver.
    fn finish(&self, reason: FinishReason) -> Finish {
        Finish { reason, prompt_tokens: self.req.prompt.len(), completion_tokens: self.generated.len(), error: None }
    }

    /// Whether the prompt is still being fed (nothing generated yet).
    fn in_prompt(&self) -> bool {
        self.generated.is_empty()
    }
}

/// Sets each sequence's share of one step of at most `budget` tokens: one token for every
/// sequence with one left (decoding), then prompt chunks of at most `chunk` from what is left —
/// the oldest prompt first (so it cannot starve), then the shortest remaining prompts (so a short
/// request is not stuck behind long ones). Decoding sequences always run, and a batch of prompts
/// alone always feeds one, so every step makes progress.
fn schedule(active: &mut [Seq], budget: usize, chunk: usize) {
    active.sort_by_key(|s| s.order);
    let mut left = budget.max(1);
    for s in active.iter_mut() {
        s.take = usize::from(s.remaining() == 1);
        left = left.saturating_sub(s.take);
    }
    let mut prompts: Vec<usize> = (0..active.len()).filter(|&i| active[i].remaining() > 1).collect();
    if let Some((_, rest)) = prompts.split_first_mut() {
        rest.sort_by_key(|&i| (active[i].remaining(), active[i].order));
    }
    for i in prompts {
        let s = &mut active[i];
        s.take = s.remaining().min(s.chunk(chunk)).min(left);
        left -= s.take;
    }
    if active.iter().all(|s| s.take == 0) {
        if let Some(s) = active.first_mut() {
            s.take = s.remaining().min(s.chunk(chunk)).max(1);
        }
    }
}

/// A sequence after a step: the token its draw picked with its logprob (where asked), then that
/// token again once accepted (none while its prompt is still being fed).
type StepItem = (Seq, u32, Option<TokenLogprob>, Option<u32>);

/// Starts the engine task on the current tokio runtime with default settings.
pub fn spawn(engine: Arc<Engine>, metrics: Arc<Metrics>) -> (BatcherHandle, tokio::task::JoinHandle<()>) {
    spawn_with(engine, metrics, BatcherConfig::default())
}

/// Starts the engine task on the current tokio runtime.
pub fn spawn_with(engine: Arc<Engine>, metrics: Arc<Metrics>, cfg: BatcherConfig) -> (BatcherHandle, tokio::task::JoinHandle<()>) {
    let max_queue = cfg.max_queue.max(1);
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = BatcherHandle { tx, places: Arc::new(Semaphore::new(max_queue)), max_queue };
    (handle, tokio::spawn(run(engine, metrics, cfg, rx)))
}

fn admit(engine: &Engine, metrics: &Metrics, queued: Queued, order: u64) -> Seq {
    metrics.admitted(queued.arrived.elapsed());
    let mut s = Seq::new(queued.req, KvCache::new(engine.config()), order);
    s.arrived = queued.arrived;
    s
}

impl Seq {
    /// A sequence of `req` over `cache`, the `order`-th admitted, nothing fed yet.
    fn new(req: GenRequest, cache: KvCache, order: u64) -> Self {
        Seq {
            cache,
            pending: req.prompt.clone(),
            fed: 0,
            generated: Vec::new(),
            sampler: Sampler::new(req.sampling),
            stream: TextStream::default(),
            emitted: 0,
            order,
            take: 0,
            prompt_lps: Vec::new(),
            unsent_lps: Vec::new(),
            arrived: Instant::now(),
            last_token: None,
            req,
        }
    }
}

/// A queued request and how many later requests were admitted before it.
struct Waiting {
    queued: Queued,
    passed_over: usize,
}

/// Which waiting request gets the next free slot: the shortest prompt (the oldest among equals),
/// unless the oldest request has been passed over `limit` times already.
fn next_admission(waiting: &VecDeque<Waiting>, limit: usize) -> Option<usize> {
    let front = waiting.front()?;
    if front.passed_over >= limit {
        return Some(0);
    }
    waiting.iter().enumerate().min_by_key(|(i, w)| (w.queued.req.prompt.len(), *i)).map(|(i, _)| i)
}

async fn run(engine: Arc<Engine>, metrics: Arc<Metrics>, cfg: BatcherConfig, mut rx: mpsc::UnboundedReceiver<Queued>) {
    let chunk = cfg.prefill_chunk.max(1);
    let max_seqs = cfg.max_seqs.max(1);
    let mut active: Vec<Seq> = Vec::new();
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut admitted = 0u64;
    loop {
        if active.is_empty() && waiting.is_empty() {
            match rx.recv().await {
                Some(queued) => waiting.push_back(Waiting { queued, passed_over: 0 }),
                None => return,
            }
        }
        while let Ok(queued) = rx.try_recv() {
            waiting.push_back(Waiting { queued, passed_over: 0 });
        }
        // Drop requests and sequences whose client went away before spending a step on them.
        waiting.retain(|w| !w.queued.req.events.is_closed());
        active.retain(|s| !s.req.events.is_closed());
        while active.len() < max_seqs {
            let Some(i) = next_admission(&waiting, max_seqs) else { break };
            waiting.iter_mut().take(i).for_each(|w| w.passed_over += 1);
            let w = waiting.remove(i).expect("next_admission picks an index in range");
            // Admitted: its place in the queue is given back here.
            active.push(admit(&engine, &metrics, w.queued, admitted));
            admitted += 1;
        }
        gauges(&engine, &metrics, &active, waiting.len(), max_seqs);
        if active.is_empty() {
            continue;
        }
        schedule(&mut active, cfg.step_tokens, chunk);
        let backend = engine.backend.clone();
        let (mut seqs, resting): (Vec<Seq>, Vec<Seq>) = std::mem::take(&mut active).into_iter().partition(|s| s.take > 0);
        active = resting;
        // The one decision of where tokens are picked: from logits on the host when any
        // sequence of the step needs them (logprobs, logit changes), else by the device.
        let host = seqs.iter().any(|s| s.req.needs_host_logits());
        let step = tokio::task::spawn_blocking(move || {
            // Sequences that finish their prompt this step draw their next token (greedy draws
            // elsewhere: mid-prefill picks are dropped and consume no randomness).
            let draws: Vec<Draw> = seqs.iter_mut().map(|s| if s.finishes_pending() { s.sampler.next_draw() } else { Draw::GREEDY }).collect();
            let mut inputs: Vec<SeqInput> = seqs
                .iter_mut()
                .map(|s| SeqInput { tokens: &s.pending[s.fed..s.fed + s.take], cache: &mut s.cache })
                .collect();
            let fed: usize = inputs.iter().map(|i| i.tokens.len()).sum();
            let t = std::time::Instant::now();
            let out = match host {
                true => backend.forward(&mut inputs).map(|(logits, r)| (Picked::Logits(logits), r)),
                false => backend.forward_sample(&mut inputs, &draws).map(|(tokens, r)| (Picked::Tokens(tokens), r)),
            };
            drop(inputs);
            let out = out.map(|(picked, r)| (pick_on_host(&mut seqs, picked, &draws), r));
            let timing = (fed, t.elapsed());
            if out.is_ok() {
                seqs.iter_mut().for_each(|s| s.fed += s.take);
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
                tracing::error!("forward step failed: {e}");
                metrics.set_active(active.len());
                continue;
            }
        };
        let (tokens, report) = match out {
            Ok(v) => v,
            Err(e) => {
                for s in seqs {
                    retire(&metrics, &s, Finish { error: Some(e.to_string()), ..s.finish(FinishReason::Stop) });
                }
                metrics.set_active(active.len());
                continue;
            }
        };
        metrics.paths_ran(&report.paths);
        for (family, reason) in &report.fallbacks {
            metrics.fallback(*family, *reason);
        }
        // Detokenize every sequence that finished its prompt, in parallel (the step's sequences
        // are independent). A prompt scored for `max_tokens: 0` ends without a token.
        let mut items: Vec<StepItem> = seqs.into_iter().zip(tokens).map(|(s, (t, lp))| (s, t, lp, None)).collect();
        items.par_iter_mut().filter(|(s, _, _, _)| s.fed >= s.pending.len() && s.req.max_tokens > 0).for_each(|(s, tok, lp, picked)| {
            if s.in_prompt() && s.req.options.prompt_logprobs {
                let _ = s.req.events.send(GenEvent::Prompt(std::mem::take(&mut s.prompt_lps)));
            }
            s.generated.push(*tok);
            s.unsent_lps.extend(lp.take());
            // A tokenizer error leaves the text as it was; the token still counts.
            let _ = engine.tokenizer.step(&mut s.stream, *tok);
            *picked = Some(*tok);
        });
        for (mut s, _, _, picked) in items {
            let Some(tok) = picked else {
                if s.fed >= s.pending.len() {
                    // Scored, nothing to generate (max_tokens 0).
                    if s.req.options.prompt_logprobs {
                        let _ = s.req.events.send(GenEvent::Prompt(std::mem::take(&mut s.prompt_lps)));
                    }
                    retire(&metrics, &s, s.finish(FinishReason::Length));
                    continue;
                }
                // Mid-prefill: these logits are not the last prompt position's.
                active.push(s);
                continue;
            };
            metrics.generated(1);
            let now = Instant::now();
            metrics.token_latency(s.last_token.is_none(), now - s.last_token.unwrap_or(s.arrived));
            s.last_token = Some(now);
            if let Some(reason) = advance(&engine, &mut s, tok) {
                if !s.unsent_lps.is_empty() {
                    let _ = s.req.events.send(GenEvent::Tokens(std::mem::take(&mut s.unsent_lps)));
                }
                retire(&metrics, &s, s.finish(reason));
            } else {
                s.pending = vec![tok];
                s.fed = 0;
                active.push(s);
            }
        }
        gauges(&engine, &metrics, &active, waiting.len(), max_seqs);
    }
}

/// Sends a sequence's end to its receiver and records its latency and lengths.
fn retire(metrics: &Metrics, s: &Seq, f: Finish) {
    metrics.finished(s.arrived.elapsed(), f.prompt_tokens, f.completion_tokens);
    let _ = s.req.events.send(GenEvent::Done(f));
}

/// Running, waiting and KV-cache gauges.
fn gauges(engine: &Engine, metrics: &Metrics, active: &[Seq], waiting: usize, max_seqs: usize) {
    metrics.set_active(active.len());
    metrics.set_waiting(waiting);
    let positions: usize = active.iter().map(|s| s.cache.len()).sum();
    metrics.set_kv(active.len(), max_seqs, positions, max_seqs * engine.config().max_positions);
}

/// What a step's forward gave: the device's picks, or every sequence's logits.
enum Picked {
    Tokens(Vec<u32>),
    Logits(Vec<Vec<f64>>),
}

/// Each sequence's token of this step with its logprob where asked. From logits (on the host):
/// the request's logit changes, then the draw's pick; a prompt being scored records the
/// logprob of its next prompt token instead.
fn pick_on_host(seqs: &mut [Seq], picked: Picked, draws: &[Draw]) -> Vec<(u32, Option<TokenLogprob>)> {
    let logits = match picked {
        Picked::Tokens(t) => return t.into_iter().map(|t| (t, None)).collect(),
        Picked::Logits(l) => l,
    };
    seqs.par_iter_mut()
        .zip(logits)
        .zip(draws)
        .map(|((s, mut row), draw)| {
            let o = &s.req.options;
            let top = o.logprobs.unwrap_or(0);
            if !s.finishes_pending() {
                if o.prompt_logprobs {
                    let next = s.pending[s.fed + s.take];
                    if s.prompt_lps.is_empty() {
                        s.prompt_lps.push(None);
                    }
                    s.prompt_lps.push(Some(token_logprob(&row, 1.0, next, top)));
                }
                return (0, None);
            }
            if s.in_prompt() && o.prompt_logprobs && s.prompt_lps.is_empty() {
                // A one-token prompt: nothing to score but its first position.
                s.prompt_lps.push(None);
            }
            o.processing.apply(&mut row, &s.req.prompt, &s.generated);
            let tok = sampling::pick(&row, draw);
            (tok, o.logprobs.map(|n| token_logprob(&row, s.req.sampling.temperature, tok, n)))
        })
        .collect()
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
    let o = &s.req.options;
    let eos = (engine.eos.contains(&tok) && !o.ignore_eos) || o.stop_ids.contains(&tok);
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
        if !s.unsent_lps.is_empty() {
            let _ = s.req.events.send(GenEvent::Tokens(std::mem::take(&mut s.unsent_lps)));
        }
        let _ = s.req.events.send(GenEvent::Delta(text[s.emitted..end].to_string()));
        s.emitted = end;
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sequence with `remaining` tokens to feed, admitted `order`-th.
    fn seq(order: u64, remaining: usize) -> Seq {
        let (events, _) = mpsc::unbounded_channel();
        let req = GenRequest { prompt: vec![1; remaining], max_tokens: 1, sampling: SamplingParams::default(), stop: Vec::new(), events, options: GenOptions::default() };
        Seq::new(req, KvCache::default(), order)
    }

    #[test]
    fn decodes_first_then_the_oldest_prompt_then_the_shortest_within_the_budget() {
        // Two long prompts, two decoding sequences, one short prompt admitted last.
        let mut a = vec![seq(3, 1), seq(0, 900), seq(1, 700), seq(4, 5), seq(2, 1)];
        schedule(&mut a, 600, 512);
        let takes: Vec<(u64, usize)> = a.iter().map(|s| (s.order, s.take)).collect();
        assert_eq!(takes, vec![(0, 512), (1, 81), (2, 1), (3, 1), (4, 5)]);
        assert!(a.iter().map(|s| s.take).sum::<usize>() <= 600);
        // A budget smaller than the decoders still runs every decoder.
        let mut b = vec![seq(0, 1), seq(1, 1), seq(2, 40)];
        schedule(&mut b, 1, 512);
        assert_eq!(b.iter().map(|s| s.take).collect::<Vec<_>>(), vec![1, 1, 0]);
        // A lone prompt always makes progress.
        let mut c = vec![seq(0, 40)];
        schedule(&mut c, 1, 512);
        assert_eq!(c[0].take, 1);
    }

    #[test]
    fn a_scored_prompt_feeds_one_token_a_step_and_needs_host_logits() {
        let mut scored = seq(0, 40);
        scored.req.options.prompt_logprobs = true;
        assert!(scored.req.needs_host_logits());
        assert!(!seq(1, 40).req.needs_host_logits(), "plain sampling stays on the device");
        let mut biased = seq(2, 3);
        biased.req.options.processing.bias = vec![(1, 2.0)];
        assert!(biased.req.needs_host_logits());
        let mut a = vec![scored, seq(1, 40)];
        schedule(&mut a, 600, 512);
        assert_eq!(a.iter().map(|s| s.take).collect::<Vec<_>>(), vec![1, 40]);
    }

    #[test]
    fn a_free_slot_goes_to_the_shortest_prompt_until_the_oldest_has_waited_its_turn() {
        let place = || Arc::new(Semaphore::new(8)).try_acquire_owned().unwrap();
        let w = |len: usize, passed_over: usize| {
            let (events, _) = mpsc::unbounded_channel();
            let req = GenRequest { prompt: vec![1; len], max_tokens: 1, sampling: SamplingParams::default(), stop: Vec::new(), events, options: GenOptions::default() };
            Waiting { queued: Queued { req, _place: place(), arrived: Instant::now() }, passed_over }
        };
        let mut q: VecDeque<Waiting> = [w(400, 0), w(500, 0), w(3, 0), w(3, 0)].into();
        assert_eq!(next_admission(&q, 2), Some(2), "the shortest, the oldest of equals");
        q[0].passed_over = 2;
        assert_eq!(next_admission(&q, 2), Some(0), "the oldest, passed over twice, goes now");
        assert_eq!(next_admission(&VecDeque::new(), 2), None);
    }

    #[test]
    fn zero_limits_are_refused_by_name() {
        assert_eq!(BatcherConfig { max_queue: 0, ..Default::default() }.validate(), Err(ConfigError::Zero { name: "--max-queue" }));
        assert!(BatcherConfig::default().validate().is_ok());
    }

    #[test]
    fn partial_stop_finds_prefix() {
        let stops = vec!["END".to_string(), "xy".to_string()];
        assert_eq!(partial_stop("abcEN", &stops), 2);
        assert_eq!(partial_stop("abx", &stops), 1);
        assert_eq!(partial_stop("abc", &stops), 0);
    }
}
