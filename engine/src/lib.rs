//! mangrove-engine: the decode engine, the last stages of the pipeline. A Hugging Face BitNet
//! checkpoint ([`model`], [`tokenizer`]; its `config.json` through
//! [`mangrove_core::model_config`]) runs on a [`Backend`] ([`backend`] is the contract,
//! [`cpu_simd`] the SIMD CPU backend and default, [`cpu`] the f64 reference it is tested
//! against, [`cuda`] the tuned kernels of a provisioned plan);
//! [`sampling`] picks tokens; [`batcher`] runs continuous batching on a background task;
//! [`server`] exposes it over an OpenAI-compatible HTTP API; [`metrics`] counts requests, tokens
//! and which kernel path each layer family ran; [`slots`] hands out KV-cache slots; [`start`]
//! opens an engine with its kernels provisioned and runs the server; [`startup`] times how long
//! `mangrove serve` takes to be ready.
//! [`chat_template`] renders chat messages, [`generation_config`] gives sampling defaults; [`logits`] applies a request's penalties and
//! biases and [`logprobs`] reports the distribution a token was drawn from.
//! [`genmodel`] writes random checkpoints in the same format; [`bench`] times decode steps.
//! The format is documented in `engine/README.md`.

pub mod backend;
pub mod batcher;
pub mod bench;
pub mod chat_template;
pub mod cpu;
pub mod cpu_simd;
pub mod cuda;
pub mod generation_config;
pub mod genmodel;
pub mod logits;
pub mod logprobs;
pub mod metrics;
pub mod model;
pub mod sampling;
pub mod server;
pub mod slots;
pub mod start;
pub mod startup;
pub mod tokenizer;

use std::path::Path;
use std::sync::Arc;

use mangrove_core::model_config::ModelConfig;
use mangrove_deploy::provision::KernelEntries;

pub use backend::{Backend, StepReport};
use chat_template::{ChatTemplate, ChatTemplateError};
use cpu::CpuBackend;
use generation_config::{GenerationConfigError, GenerationDefaults};
use model::{LoadError, Model};
use tokenizer::{Tokenizer, TokenizerError};

/// Errors of opening an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    ChatTemplate(#[from] ChatTemplateError),
    #[error(transparent)]
    GenerationConfig(#[from] GenerationConfigError),
    #[error("backend '{0}' is not known (available: cpu, cpu-ref, cuda)")]
    UnknownBackend(String),
    #[error(transparent)]
    Cpu(#[from] cpu_simd::SimdError),
    #[error("the cuda backend needs its kernels provisioned first (Engine::open_cuda; `mangrove serve --backend cuda` does it)")]
    CudaNeedsKernels,
    #[error("cuda backend")]
    Cuda(#[from] cuda::CudaBackendError),
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
    /// How chat messages become a prompt: the checkpoint's template or a built-in format.
    pub chat: ChatTemplate,
    /// Sampling defaults of the checkpoint's `generation_config.json`.
    pub defaults: GenerationDefaults,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("name", &self.name).field("backend", &self.backend.name()).field("eos", &self.eos).finish()
    }
}

impl Engine {
    /// Loads the checkpoint in `dir` onto a CPU backend: `"cpu"` (SIMD, default tunables for
    /// this CPU) or `"cpu-ref"` (the f64 reference). The CUDA backend needs its kernels:
    /// [`Engine::open_cuda`].
    pub fn open(dir: &Path, backend: &str, name: Option<String>) -> Result<Self, EngineError> {
        match backend {
            "cpu" => {
                let tunables = cpu_simd::CpuTunables::detect().map_err(cpu_simd::SimdError::Tunables)?;
                Self::open_cpu(dir, name, tunables)
            }
            "cpu-ref" => Self::load(dir, name, |model| Ok(Arc::new(CpuBackend::new(Arc::new(model))))),
            "cuda" => Err(EngineError::CudaNeedsKernels),
            other => Err(EngineError::UnknownBackend(other.into())),
        }
    }

    /// Loads the checkpoint in `dir` onto the SIMD CPU backend with `tunables` (the model is
    /// repacked, then its loaded form dropped).
    pub fn open_cpu(dir: &Path, name: Option<String>, tunables: cpu_simd::CpuTunables) -> Result<Self, EngineError> {
        Self::load(dir, name, |model| Ok(Arc::new(cpu_simd::SimdCpuBackend::new(&model, tunables)?)))
    }

    /// Loads the checkpoint in `dir` onto the SIMD CPU backend tuned by the `mangrove-tune cpu`
    /// records of `db` (the defaults where it has none for this model).
    pub fn open_cpu_tuned(dir: &Path, name: Option<String>, db: &mangrove_core::tuning_db::TuningDb) -> Result<Self, EngineError> {
        let base = cpu_simd::CpuTunables::detect().map_err(cpu_simd::SimdError::Tunables)?;
        Self::load(dir, name, |model| {
            let (t, per_m) = cpu_simd::sweep::tunables_from_db(db, &model.config, base);
            let per_m: Vec<cpu_simd::CpuTunables> = per_m.into_iter().map(|(t, _)| t).collect();
            Ok(Arc::new(cpu_simd::SimdCpuBackend::with_splits(&model, t, &per_m)?))
        })
    }

    /// Loads the checkpoint in `dir` onto GPU 0 with the provisioned plan kernels `entries`
    /// ((family, M) → cubin, see `mangrove_deploy::plan`) and KV-cache slots for `max_seqs` sequences.
    pub fn open_cuda(
        dir: &Path,
        name: Option<String>,
        entries: &KernelEntries,
        max_seqs: usize,
    ) -> Result<Self, EngineError> {
        Self::load(dir, name, |model| {
            let gpu = mangrove_core::gpu::Gpu::open(0).map_err(cuda::CudaBackendError::from)?;
            let context = mangrove_core::step::cuda_context(&model.config);
            Ok(Arc::new(cuda::CudaBackend::new(gpu, &model, entries, max_seqs, context)?))
        })
    }

    /// Reads and checks the checkpoint in `dir` as serving does (weights against config.json,
    /// tokenizer, chat template, generation defaults) without a backend, and returns its
    /// config: `cache bless` refuses what `serve` would refuse.
    pub fn check_checkpoint(dir: &Path) -> Result<ModelConfig, EngineError> {
        Ok(Checkpoint::read(dir)?.model.config)
    }

    fn load(
        dir: &Path,
        name: Option<String>,
        backend: impl FnOnce(Model) -> Result<Arc<dyn Backend>, EngineError>,
    ) -> Result<Self, EngineError> {
        let Checkpoint { model, tokenizer, eos, chat, defaults } = Checkpoint::read(dir)?;
        let name = name.unwrap_or_else(|| {
            let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
            canonical.file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned())
        });
        Ok(Engine { name, backend: backend(model)?, tokenizer, eos, chat, defaults })
    }

    /// The model config.
    pub fn config(&self) -> &ModelConfig {
        self.backend.config()
    }
}

/// Everything an engine reads from a checkpoint folder.
struct Checkpoint {
    model: Model,
    tokenizer: Tokenizer,
    /// End-of-sequence ids: config.json's, the tokenizer's, generation_config.json's.
    eos: Vec<u32>,
    chat: ChatTemplate,
    defaults: GenerationDefaults,
}

impl Checkpoint {
    fn read(dir: &Path) -> Result<Self, EngineError> {
        let model = Model::load(dir)?;
        let tokenizer = Tokenizer::load(dir)?;
        let mut eos = model.config.eos_token_ids.clone();
        eos.extend(tokenizer.end_ids().into_iter().filter(|t| !model.config.eos_token_ids.contains(t)));
        let chat = ChatTemplate::load(dir, tokenizer.fallback_chat())?;
        let defaults = GenerationDefaults::load(dir)?;
        for t in defaults.eos_token_id.as_ref().map_or_else(Vec::new, |e| e.ids()) {
            if !eos.contains(&t) {
                eos.push(t);
            }
        }
        Ok(Self { model, tokenizer, eos, chat, defaults })
    }
}
