//! The CUDA backend: the model's weights on the GPU, every kernel from the provisioned plan
//! (tuning DB → JIT cache / blessed bundle, see `mangrove_deploy::plan`), a KV cache of fixed sequence
//! slots, and each step's launches replayed as a CUDA graph (captured once per row/sequence
//! count up to [`GRAPH_MAX_ROWS`] rows), so the CPU issues one launch per step.
//!
//! Numerics follow the CPU reference (`crate::cpu`): per-token int8 activations with the
//! same rounding, exact integer ternary products (W2A8 GEMV), weight scales applied to each
//! linear's output; differences come from f32 (not f64) arithmetic and bf16 linear outputs.

pub mod kernels;
pub mod moe;
pub mod step;
pub mod weights;

use std::collections::HashMap;
use std::sync::Mutex;

use rayon::prelude::*;

use mangrove_core::model_config::ModelConfig;
use crate::model::Model;
use crate::slots::SlotPool;
use crate::backend::{check_batch, Backend, ForwardError, SeqInput, StepReport};
use mangrove_core::gpu::{Gpu, GpuError, Graph, KvArena, SpanTotal};
use mangrove_core::step::Family;
use mangrove_deploy::provision::{FallbackReason, KernelEntries};
use kernels::{KernelSetError, StepKernels};
use step::{StepShape, Workspace};
use weights::DeviceWeights;

/// Steps of at most this many token rows are captured as CUDA graphs (decode and short
/// prefill chunks); longer ones are launched directly.
pub const GRAPH_MAX_ROWS: usize = 64;

/// Errors of building the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaBackendError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Kernels(#[from] KernelSetError),
}

struct Inner {
    gpu: Gpu,
    kernels: StepKernels,
    weights: DeviceWeights,
    work: Workspace,
    kv: KvArena,
    /// Captured steps by shape.
    graphs: HashMap<StepShape, Graph>,
    /// With profiling on: the per-family GPU time of the last step.
    profile: Option<Vec<SpanTotal>>,
}

/// The CUDA backend over one GPU.
pub struct CudaBackend {
    /// The model config, `max_positions` clipped to the KV cache's context.
    config: ModelConfig,
    slots: SlotPool,
    inner: Mutex<Inner>,
    graphs_enabled: bool,
}

impl CudaBackend {
    /// Uploads `model` to `gpu`, loads the plan's kernel `entries` ((family, M) → cubin) and
    /// allocates a KV cache of `max_seqs` sequences × `context` positions.
    pub fn new(
        gpu: Gpu,
        model: &Model,
        entries: &KernelEntries,
        max_seqs: usize,
        context: usize,
    ) -> Result<Self, CudaBackendError> {
        let mut config = model.config.clone();
        config.max_positions = config.max_positions.min(context);
        let kernels = StepKernels::load(&gpu, entries)?;
        if let Some(why) = &kernels.fused_unavailable {
            eprintln!("mangrove: the fused decode layer cannot run here ({why}); batch-1 steps run the unfused kernels");
        }
        let weights = DeviceWeights::upload(&gpu, model)?;
        let kv = KvArena::new(&gpu, max_seqs.max(1), config.layers, config.max_positions, config.kv_dim())?;
        let work = Workspace::new(&gpu, &config, &kernels, max_seqs.max(1))?;
        gpu.sync()?;
        // MoE steps route on the host mid-step: they cannot be captured.
        let graphs_enabled = std::env::var_os("MANGROVE_NO_GRAPHS").is_none() && config.moe.is_none();
        Ok(Self {
            config,
            slots: SlotPool::new(max_seqs.max(1)),
            inner: Mutex::new(Inner { gpu, kernels, weights, work, kv, graphs: HashMap::new(), profile: None }),
            graphs_enabled,
        })
    }
}

impl CudaBackend {
    /// Turns CUDA-graph replay of steps on or off (on by default for dense models unless
    /// MANGROVE_NO_GRAPHS is set; MoE steps are never captured).
    pub fn with_graphs(mut self, on: bool) -> Self {
        self.graphs_enabled = on && self.config.moe.is_none();
        self
    }

    /// Turns the fused batch-1 layer off (it is on whenever the plan has it and this GPU holds
    /// its grid; `MANGROVE_UNFUSED=1` also turns it off): the A/B switch to the unfused step.
    pub fn without_fused_layer(self) -> Self {
        {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.kernels.fused = None;
            inner.graphs.clear();
        }
        self
    }

    /// Whether batch-1 decode steps run the fused layer.
    pub fn fused_layer(&self) -> bool {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).kernels.fused.is_some()
    }
}

/// Per-row metadata of one step, on the host.
struct Rows {
    tokens: Vec<i32>,
    pos: Vec<i32>,
    slot: Vec<i32>,
    last: Vec<i32>,
}

impl Inner {
    /// Runs one step and returns the logits [seqs, vocab].
    fn run(&mut self, c: &ModelConfig, r: &Rows, use_graph: bool) -> Result<Vec<f32>, GpuError> {
        let (rows, seqs) = (r.tokens.len(), r.last.len());
        if rows > self.work.rows {
            // Grow to the new largest step; captured graphs point at the old buffers.
            self.graphs.clear();
            self.work = Workspace::new(&self.gpu, c, &self.kernels, rows.next_power_of_two())?;
        }
        let Inner { gpu, kernels, weights, work, kv, graphs, profile } = self;
        gpu.write(&r.tokens, &mut work.tokens)?;
        gpu.write(&r.pos, &mut work.pos)?;
        gpu.write(&r.slot, &mut work.slot)?;
        gpu.write(&r.last, &mut work.last)?;
        let shape = StepShape { rows, seqs };
        if let Some(last) = profile {
            // Profiling: direct launches, an event after each.
            let mut spans = gpu.spans()?;
            step::enqueue(gpu, kernels, weights, work, kv, c, shape, Some(&mut spans))?;
            *last = spans.totals()?;
        } else if use_graph && rows <= GRAPH_MAX_ROWS {
            if let std::collections::hash_map::Entry::Vacant(e) = graphs.entry(shape) {
                e.insert(gpu.capture(|| step::enqueue(gpu, kernels, weights, work, kv, c, shape, None))?);
            }
            graphs[&shape].launch()?;
        } else {
            step::enqueue(gpu, kernels, weights, work, kv, c, shape, None)?;
        }
        gpu.download_prefix(&work.logits, seqs * c.vocab)
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn set_profiling(&self, on: bool) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).profile = on.then(Vec::new);
    }

    fn last_profile(&self) -> Vec<SpanTotal> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).profile.clone().unwrap_or_default()
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn forward(&self, batch: &mut [SeqInput]) -> Result<(Vec<Vec<f64>>, StepReport), ForwardError> {
        let c = &self.config;
        check_batch(c, batch)?;
        for (s, seq) in batch.iter().enumerate() {
            if seq.cache.slot.as_ref().is_some_and(|l| !self.slots.owns(l)) {
                return Err(ForwardError::Device(format!("sequence {s}: its KV cache belongs to another backend")));
            }
        }
        for (s, seq) in batch.iter_mut().enumerate() {
            if seq.cache.slot.is_none() {
                seq.cache.slot = Some(self.slots.lease().ok_or(ForwardError::NoKvSlot { seq: s, slots: self.slots.total() })?);
            }
        }
        let mut r = Rows { tokens: Vec::new(), pos: Vec::new(), slot: Vec::new(), last: Vec::new() };
        for seq in batch.iter() {
            let slot = seq.cache.slot.as_ref().map_or(0, |l| l.id()) as i32;
            for (i, &t) in seq.tokens.iter().enumerate() {
                r.tokens.push(t as i32);
                r.pos.push((seq.cache.len + i) as i32);
                r.slot.push(slot);
            }
            r.last.push(r.tokens.len() as i32 - 1);
        }
        let batch1 = r.tokens.len() == 1;
        let (logits, fused, unavailable) = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let logits = inner.run(c, &r, self.graphs_enabled).map_err(|e| ForwardError::Device(mangrove_core::error_chain(&e)))?;
            (logits, batch1 && inner.kernels.fused.is_some(), batch1 && inner.kernels.fused_unavailable.is_some())
        };
        for seq in batch.iter_mut() {
            seq.cache.len += seq.tokens.len();
        }
        // Widening 16 × 128k logits to f64 costs milliseconds on one core: one row per thread.
        let out = logits.par_chunks_exact(c.vocab).map(|l| l.iter().map(|&v| v as f64).collect()).collect();
        let paths = if fused { fused_paths() } else { paths(c) };
        let fallbacks = if unavailable { vec![(Family::DecodeLayer, FallbackReason::KernelUnavailable)] } else { Vec::new() };
        Ok((out, StepReport { paths, fallbacks }))
    }
}

/// The (layer family, kernel variant) pairs of a batch-1 decode step with the fused layer.
pub fn fused_paths() -> Vec<(Family, &'static str)> {
    vec![(Family::Embedding, "cuda_op"), (Family::DecodeLayer, "cuda_fused"), (Family::LmHead, "cuda_op")]
}

/// The (layer family, kernel variant) pairs one forward of this backend runs (unfused).
pub fn paths(c: &ModelConfig) -> Vec<(Family, &'static str)> {
    use Family::*;
    let mut linear = vec![AttnQkv, AttnO];
    let mut ops = vec![Embedding, Rmsnorm, Rope, Attention, LmHead];
    match c.moe {
        None => linear.extend([MlpGateUp, MlpDown]),
        Some(_) => {
            linear.extend([MoeGateUp, MoeDown]);
            ops.extend([MoeRouter, MoeCombine]);
        }
    }
    linear.into_iter().map(|f| (f, "cuda_w2a8")).chain(ops.into_iter().map(|f| (f, "cuda_op"))).collect()
}
