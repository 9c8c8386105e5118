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
use crate::backend::{check_batch, check_draws, Backend, ForwardError, SeqInput, StepReport};
use crate::sampling::Draw;
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
        if let Some(why) = &kernels.blas_unavailable {
            eprintln!("mangrove: cuBLAS is unavailable ({why}); the LM head of decode batches runs the lm_head kernel");
        }
        let weights = DeviceWeights::upload(&gpu, model)?;
        let kv = KvArena::new(&gpu, kernels.kv_dtype()?, max_seqs.max(1), config.layers, config.max_positions, config.kv_dim())?;
        let work = Workspace::new(&gpu, &config, &kernels, max_seqs.max(1))?;
        gpu.sync()?;
        // MoE steps route on the device (moe_route): they are captured like dense ones.
        let graphs_enabled = std::env::var_os("MANGROVE_NO_GRAPHS").is_none();
        Ok(Self {
            config,
            slots: SlotPool::new(max_seqs.max(1)),
            inner: Mutex::new(Inner { gpu, kernels, weights, work, kv, graphs: HashMap::new(), profile: None }),
            graphs_enabled,
        })
    }
}

impl CudaBackend {
    /// Turns CUDA-graph replay of steps on or off (on by default unless MANGROVE_NO_GRAPHS is set).
    pub fn with_graphs(mut self, on: bool) -> Self {
        self.graphs_enabled = on;
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

impl Rows {
    fn shape(&self, sample: bool) -> StepShape {
        StepShape { rows: self.tokens.len(), seqs: self.last.len(), sample }
    }
}

/// What a step brings back from the device.
enum StepOut {
    /// f32 logits [seqs, vocab].
    Logits(Vec<f32>),
    /// Each sequence's sampled token.
    Tokens(Vec<i32>),
}

/// Each sequence's draw as the GPU sampler reads it: rule rows [seqs, 4] and uniforms [seqs].
struct DrawRows {
    rules: Vec<f32>,
    u: Vec<f64>,
}

impl Inner {
    /// Runs one step; with `draws` (and a sampler loaded) samples on the device.
    fn run(&mut self, c: &ModelConfig, r: &Rows, use_graph: bool, draws: Option<&DrawRows>) -> Result<StepOut, GpuError> {
        let shape = r.shape(draws.is_some() && self.kernels.sample.is_some());
        let StepShape { rows, seqs, .. } = shape;
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
        if let (true, Some(d)) = (shape.sample, draws) {
            gpu.write(&d.rules, &mut work.rules)?;
            gpu.write(&d.u, &mut work.u)?;
        }
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
        match shape.sample {
            true => Ok(StepOut::Tokens(gpu.download_prefix(&work.picked, seqs)?)),
            false => Ok(StepOut::Logits(gpu.download_prefix(&work.logits, seqs * c.vocab)?)),
        }
    }
}

/// How a step ran, for its [`StepReport`].
struct Ran {
    /// MoE models: the token bucket of the step's grouped expert kernels.
    moe_m: Option<usize>,
    fused: bool,
    fused_unavailable: bool,
    blas_head: bool,
    no_blas: bool,
    sampled: bool,
    no_sampler: bool,
}

impl CudaBackend {
    /// Checks the batch, leases KV slots to new sequences and lays out the step's rows.
    fn rows(&self, batch: &mut [SeqInput]) -> Result<Rows, ForwardError> {
        check_batch(&self.config, batch)?;
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
        Ok(r)
    }

    /// Runs the step of `batch` and advances its caches.
    fn step(&self, batch: &mut [SeqInput], draws: Option<&DrawRows>) -> Result<(StepOut, Ran), ForwardError> {
        let r = self.rows(batch)?;
        let shape = r.shape(false);
        let batch1 = shape.rows == 1;
        let (out, ran) = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let out = inner.run(&self.config, &r, self.graphs_enabled, draws).map_err(|e| ForwardError::Device(mangrove_core::error_chain(&e)))?;
            let k = &inner.kernels;
            let decode_batch = shape.seqs >= 2 && shape.rows == shape.seqs;
            let ran = Ran {
                moe_m: k.moe.as_ref().map(|mk| mk.bucket_m(shape.rows)),
                fused: batch1 && k.fused.is_some(),
                fused_unavailable: batch1 && k.fused_unavailable.is_some(),
                blas_head: !(batch1 && k.fused.is_some()) && shape.blas_head(k),
                no_blas: decode_batch && k.blas_unavailable.is_some(),
                sampled: matches!(out, StepOut::Tokens(_)),
                no_sampler: k.sample_unavailable,
            };
            (out, ran)
        };
        for seq in batch.iter_mut() {
            seq.cache.len += seq.tokens.len();
        }
        Ok((out, ran))
    }
}

impl Ran {
    fn report(&self, c: &ModelConfig, wanted_sample: bool) -> StepReport {
        let mut paths = if self.fused { fused_paths() } else { paths(c, self.blas_head, self.moe_m) };
        if self.sampled {
            paths.push((Family::Sample, "cuda_op"));
        }
        let mut fallbacks = Vec::new();
        if self.fused_unavailable {
            fallbacks.push((Family::DecodeLayer, FallbackReason::KernelUnavailable));
        }
        if self.no_blas {
            fallbacks.push((Family::LmHead, FallbackReason::KernelUnavailable));
        }
        if wanted_sample && self.no_sampler {
            fallbacks.push((Family::Sample, FallbackReason::KernelUnavailable));
        }
        StepReport { paths, fallbacks }
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
        let (out, ran) = self.step(batch, None)?;
        let StepOut::Logits(logits) = out else { unreachable!("a step without draws returns logits") };
        // Widening 16 × 128k logits to f64 costs milliseconds on one core: one row per thread.
        let out = logits.par_chunks_exact(self.config.vocab).map(|l| l.iter().map(|&v| v as f64).collect()).collect();
        Ok((out, ran.report(&self.config, false)))
    }

    /// Samples on the GPU (`sample_tokens`, in the step's graph): only token ids come back.
    /// Without the kernel (a plan from before it), the logits come back and are picked on the host.
    fn forward_sample(&self, batch: &mut [SeqInput], draws: &[Draw]) -> Result<(Vec<u32>, StepReport), ForwardError> {
        check_draws(batch, draws)?;
        let rows = DrawRows { rules: draws.iter().flat_map(|d| d.params.rule().as_row()).collect(), u: draws.iter().map(|d| d.u).collect() };
        let (out, ran) = self.step(batch, Some(&rows))?;
        let tokens = match out {
            StepOut::Tokens(t) => t.into_iter().map(|t| t as u32).collect(),
            StepOut::Logits(logits) => logits
                .par_chunks_exact(self.config.vocab)
                .zip(draws)
                .map(|(l, d)| crate::sampling::pick(&l.iter().map(|&v| v as f64).collect::<Vec<_>>(), d))
                .collect(),
        };
        Ok((tokens, ran.report(&self.config, true)))
    }
}

/// The (layer family, kernel variant) pairs of a batch-1 decode step with the fused layer.
pub fn fused_paths() -> Vec<(Family, &'static str)> {
    vec![(Family::Embedding, "cuda_op"), (Family::DecodeLayer, "cuda_fused"), (Family::LmHead, "cuda_op")]
}

/// The (layer family, kernel variant) pairs one forward of this backend runs (unfused), the LM
/// head on cuBLAS with `blas_head`; MoE models report their grouped kernels' token bucket
/// `moe_m` in the variant (`cuda_grouped_m<M>`).
pub fn paths(c: &ModelConfig, blas_head: bool, moe_m: Option<usize>) -> Vec<(Family, &'static str)> {
    use Family::*;
    let mut linear = vec![AttnQkv, AttnO];
    let mut ops = vec![Embedding, Rmsnorm, Rope, Attention];
    if !blas_head {
        ops.push(LmHead);
    }
    let mut grouped = Vec::new();
    match c.moe {
        None => linear.extend([MlpGateUp, MlpDown]),
        Some(_) => {
            let v = mangrove_core::step::moe_variant(moe_m.unwrap_or(1) as i64);
            grouped.extend([(MoeRoute, v), (MoeGateUp, v), (MoeDown, v)]);
            ops.extend([MoeRouter, MoeGlu, MoeCombine]);
        }
    }
    let head = blas_head.then_some((LmHead, "cublas_bf16"));
    linear.into_iter().map(|f| (f, "cuda_w2a8")).chain(grouped).chain(ops.into_iter().map(|f| (f, "cuda_op"))).chain(head).collect()
}
