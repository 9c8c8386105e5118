//! The engine's backend contract: a device that runs the model forward over a batch of
//! sequences ([`Backend`]), the batch it takes ([`SeqInput`] over each sequence's [`KvCache`]),
//! what it reports ([`StepReport`]) and how a step fails ([`ForwardError`]). The CPU and CUDA
//! backends each implement it; neither imports the other.

use mangrove_core::model_config::ModelConfig;
use mangrove_core::step::Family;
use mangrove_deploy::provision::FallbackReason;
use rayon::prelude::*;

use crate::sampling::{self, Draw};

/// Errors of one forward step; each names the sequence at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForwardError {
    #[error("sequence {seq}: token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { seq: usize, token: u32, vocab: usize },
    #[error("sequence {seq}: {len} positions exceed max_position_embeddings {max}")]
    ContextFull { seq: usize, len: usize, max: usize },
    #[error("sequence {seq} has no new tokens")]
    Empty { seq: usize },
    #[error("sequence {seq}: all {slots} KV-cache slots of the device are in use")]
    NoKvSlot { seq: usize, slots: usize },
    #[error("{draws} draws given for a batch of {seqs} sequences")]
    DrawCount { draws: usize, seqs: usize },
    #[error("device error: {0}")]
    Device(String),
}

/// Keys and values of one sequence: per layer, [positions, kv_heads * head_dim] on the host
/// (f64 for the reference CPU backend, f32 for the SIMD one), or a slot of a device backend's
/// KV cache.
#[derive(Debug, Default)]
pub struct KvCache {
    pub(crate) k: Vec<Vec<f64>>,
    pub(crate) v: Vec<Vec<f64>>,
    /// f32 keys per layer (SIMD CPU backend; reserved in blocks, see `cpu_simd::backend::KV_BLOCK`).
    pub(crate) k32: Vec<Vec<f32>>,
    /// f32 values per layer (SIMD CPU backend).
    pub(crate) v32: Vec<Vec<f32>>,
    pub(crate) len: usize,
    /// The device slot holding this sequence (device backends only).
    pub(crate) slot: Option<crate::slots::SlotLease>,
}

impl KvCache {
    /// An empty cache for `cfg`.
    pub fn new(cfg: &ModelConfig) -> Self {
        KvCache { k: vec![Vec::new(); cfg.layers], v: vec![Vec::new(); cfg.layers], k32: Vec::new(), v32: Vec::new(), len: 0, slot: None }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One sequence of a batch: the tokens to append and the cache they extend.
pub struct SeqInput<'a> {
    /// New tokens, appended after the cached positions.
    pub tokens: &'a [u32],
    /// The sequence's cache; grows by `tokens.len()`.
    pub cache: &'a mut KvCache,
}

/// What a backend reports about one forward step.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    /// (layer family, kernel variant) pairs that ran.
    pub paths: Vec<(Family, &'static str)>,
    /// (layer family, reason) pairs that fell back.
    pub fallbacks: Vec<(Family, FallbackReason)>,
}

/// A device that runs the model forward over a batch of sequences.
pub trait Backend: Send + Sync {
    /// Short name, e.g. `"cpu"`.
    fn name(&self) -> &'static str;
    /// The model config.
    fn config(&self) -> &ModelConfig;
    /// Appends each sequence's tokens to its cache and returns its last-position logits.
    fn forward(&self, batch: &mut [SeqInput]) -> Result<(Vec<Vec<f64>>, StepReport), ForwardError>;
    /// [`Backend::forward`], then the token each sequence's `draws` entry picks from its logits.
    /// The default picks on the host; a device backend may sample where the logits are.
    fn forward_sample(&self, batch: &mut [SeqInput], draws: &[Draw]) -> Result<(Vec<u32>, StepReport), ForwardError> {
        check_draws(batch, draws)?;
        let (logits, report) = self.forward(batch)?;
        Ok((logits.par_iter().zip(draws).map(|(l, d)| sampling::pick(l, d)).collect(), report))
    }
    /// Turns per-kernel timing of each step on or off (device backends; slower while on).
    fn set_profiling(&self, _on: bool) {}
    /// GPU time per kernel family of the last step run with profiling on (empty if none).
    fn last_profile(&self) -> Vec<mangrove_core::gpu::SpanTotal> {
        Vec::new()
    }
}

/// Checks that a batch has one draw per sequence.
pub fn check_draws(batch: &[SeqInput], draws: &[Draw]) -> Result<(), ForwardError> {
    match draws.len() == batch.len() {
        true => Ok(()),
        false => Err(ForwardError::DrawCount { draws: draws.len(), seqs: batch.len() }),
    }
}

/// Checks a batch before any backend touches a cache: every sequence has new tokens, fits the
/// context of `cfg` (`max_positions`) and uses only vocabulary ids.
pub fn check_batch(cfg: &ModelConfig, batch: &[SeqInput]) -> Result<(), ForwardError> {
    for (s, seq) in batch.iter().enumerate() {
        if seq.tokens.is_empty() {
            return Err(ForwardError::Empty { seq: s });
        }
        let len = seq.cache.len + seq.tokens.len();
        if len > cfg.max_positions {
            return Err(ForwardError::ContextFull { seq: s, len, max: cfg.max_positions });
        }
        if let Some(&t) = seq.tokens.iter().find(|&&t| t as usize >= cfg.vocab) {
            return Err(ForwardError::TokenOutOfRange { seq: s, token: t, vocab: cfg.vocab });
        }
    }
    Ok(())
}

