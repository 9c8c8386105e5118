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
pub mod cuda;
pub mod genmodel;
pub mod metrics;
pub mod model;
pub mod sampling;
pub mod server;
pub mod slots;
pub mod tokenizer;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::cache::CacheEntry;

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
    #[error("backend '{0}' is not known (available: cpu, cuda)")]
    UnknownBackend(String),
    #[error("the cuda backend needs its kernels provisioned first (Engine::open_cuda; `mangrove serve --backend cuda` does it)")]
    CudaNeedsKernels,
    #[error("cuda backend")]
    Cuda(#[from] cuda::CudaBackendError),
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
    /// Turns per-kernel timing of each step on or off (device backends; slower while on).
    fn set_profiling(&self, _on: bool) {}
    /// GPU time per kernel family of the last step run with profiling on (empty if none).
    fn last_profile(&self) -> Vec<crate::gpu::SpanTotal> {
        Vec::new()
    }
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
    /// Loads the checkpoint in `dir` onto the CPU backend (`backend` must be `"cpu"`; the CUDA
    /// backend needs its kernels: [`Engine::open_cuda`]).
    pub fn open(dir: &Path, backend: &str, name: Option<String>) -> Result<Self, EngineError> {
        match backend {
            "cpu" => Self::load(dir, name, |model| Ok(Arc::new(CpuBackend::new(Arc::new(model))))),
            "cuda" => Err(EngineError::CudaNeedsKernels),
            other => Err(EngineError::UnknownBackend(other.into())),
        }
    }

    /// Loads the checkpoint in `dir` onto GPU 0 with the provisioned plan kernels `entries`
    /// ((family, M) → cubin, see `src/plan.rs`) and KV-cache slots for `max_seqs` sequences.
    pub fn open_cuda(
        dir: &Path,
        name: Option<String>,
        entries: &BTreeMap<(String, i64), CacheEntry>,
        max_seqs: usize,
    ) -> Result<Self, EngineError> {
        Self::load(dir, name, |model| {
            let gpu = crate::gpu::Gpu::open(0).map_err(cuda::CudaBackendError::from)?;
            let context = model.config.max_positions.min(crate::plan::MAX_CUDA_CONTEXT as usize);
            Ok(Arc::new(cuda::CudaBackend::new(gpu, &model, entries, max_seqs, context)?))
        })
    }

    fn load(
        dir: &Path,
        name: Option<String>,
        backend: impl FnOnce(Model) -> Result<Arc<dyn Backend>, EngineError>,
    ) -> Result<Self, EngineError> {
        let model = Model::load(dir)?;
        let tokenizer = Tokenizer::load(dir)?;
        let mut eos = model.config.eos_token_ids.clone();
        eos.extend(tokenizer.end_ids().into_iter().filter(|t| !model.config.eos_token_ids.contains(t)));
        let name = name.unwrap_or_else(|| {
            let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
            canonical.file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned())
        });
        Ok(Engine { name, backend: backend(model)?, tokenizer, eos })
    }

    /// The model config.
    pub fn config(&self) -> &ModelConfig {
        self.backend.config()
    }
}
