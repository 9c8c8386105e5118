//! The decode engine: the last stages of the pipeline. A Hugging Face BitNet checkpoint
//! ([`config`], [`model`], [`tokenizer`]) runs on a [`Backend`] ([`cpu`] is the reference and
//! embedded default); [`sampling`] picks tokens; [`batcher`] runs continuous batching on a
//! background task; [`server`] exposes it over an OpenAI-compatible HTTP API; [`metrics`]
//! counts requests, tokens and which kernel path each layer family ran. [`genmodel`] writes
//! random checkpoints in the same format; [`bench`] times decode steps. The format is documented in `engine/README.md`.

pub mod batcher;
pub mod bench;
pub mod config;
pub mod cpu;
pub mod genmodel;
pub mod metrics;
pub mod model;
pub mod sampling;
pub mod server;
pub mod tokenizer;

use std::path::Path;
use std::sync::Arc;

use config::ModelConfig;
use cpu::{ForwardError, SeqInput};
use metrics::FallbackReason;
use model::{LoadError, Model};
use tokenizer::{Tokenizer, TokenizerError};

/// Errors of opening an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("backend '{0}' is not available in this build (available: cpu)")]
    UnknownBackend(String),
}

/// What a backend reports about one forward step.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    /// (layer family, kernel variant) pairs that ran.
    pub paths: Vec<(&'static str, &'static str)>,
    /// (layer family, reason) pairs that fell back.
    pub fallbacks: Vec<(&'static str, FallbackReason)>,
}

/// A device that runs the model forward over a batch of sequences.
pub trait Backend: Send + Sync {
    /// Short name, e.g. `"cpu"`.
    fn name(&self) -> &'static str;
    /// The model config.
    fn config(&self) -> &ModelConfig;
    /// Appends each sequence's tokens to its cache and returns its last-position logits.
    fn forward(&self, batch: &mut [SeqInput]) -> Result<(Vec<Vec<f64>>, StepReport), ForwardError>;
}

/// The CPU backend over a loaded model.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    model: Arc<Model>,
}

impl CpuBackend {
    /// Wraps a model.
    pub fn new(model: Arc<Model>) -> Self {
        CpuBackend { model }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn forward(&self, batch: &mut [SeqInput]) -> Result<(Vec<Vec<f64>>, StepReport), ForwardError> {
        let logits = cpu::forward(&self.model, batch)?;
        Ok((logits, StepReport { paths: cpu::paths(&self.model.config), fallbacks: Vec::new() }))
    }
}

/// A model ready to serve: backend, tokenizer and identity.
pub struct Engine {
    /// Model name served in `/v1/models` and checked against requests' `model`.
    pub name: String,
    /// Where the forward runs.
    pub backend: Arc<dyn Backend>,
    /// The checkpoint's tokenizer.
    pub tokenizer: Tokenizer,
    /// Tokens that end a sequence: `config.json`'s `eos_token_id` plus the tokenizer's
    /// end-of-text / end-of-turn tokens.
    pub eos: Vec<u32>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("name", &self.name).field("backend", &self.backend.name()).field("eos", &self.eos).finish()
    }
}

impl Engine {
    /// Loads the checkpoint in `dir` onto `backend` (only `"cpu"` in this build).
    pub fn open(dir: &Path, backend: &str, name: Option<String>) -> Result<Self, EngineError> {
        if backend != "cpu" {
            return Err(EngineError::UnknownBackend(backend.into()));
        }
        let model = Model::load(dir)?;
        let tokenizer = Tokenizer::load(dir)?;
        let mut eos = model.config.eos_token_ids.clone();
        eos.extend(tokenizer.end_ids().into_iter().filter(|t| !model.config.eos_token_ids.contains(t)));
        let name = name.unwrap_or_else(|| {
            let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
            canonical.file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned())
        });
        Ok(Engine { name, backend: Arc::new(CpuBackend::new(Arc::new(model))), tokenizer, eos })
    }

    /// The model config.
    pub fn config(&self) -> &ModelConfig {
        self.backend.config()
    }
}
