//! The kernels of one decode step, loaded from the provisioned plan entries (family, M):
//! fused ternary linears (the M=1 GEMV and the tensor-core GEMM's M buckets, or GEMVs per
//! row-chunk size where the GEMM cannot take the shape), the row-wise ops, the LM head per
//! sequence count, and for MoE models the grouped expert kernels per token bucket. An M the
//! plan left out (probe-mgt1 did not pass it) is never launched.

use mangrove_core::cache::CacheEntry;
use mangrove_core::step::{Family, MAX_GEMV_M};
use mangrove_deploy::provision::KernelEntries;
use mangrove_core::gpu::{GEMM_TEMPLATE, Attention, Blas, DecodeLayer, DeviceBuffer, DeviceRouting, DeviceView, Gpu, GpuError, KvDtype, LmHead, MoeCombine, MoeDown, MoeGateUp, MoeRoute, RmsNormQuant, RopeKv, SampleTokens, TernaryGemv};

/// Errors of assembling the step's kernels.
#[derive(Debug, thiserror::Error)]
pub enum KernelSetError {
    #[error("the kernel plan has no {family} kernel at M=1; provision the plan of this model first")]
    Missing { family: Family },
    #[error("the kernel plan has a moe_gate_up kernel at M={m} but no {family} kernel there; provision the plan of this model first")]
    MissingAt { family: Family, m: i64 },
    #[error("loading {family} M={m}: {source}")]
    Load { family: Family, m: i64, source: GpuError },
    #[error("the plan's {family} kernel was built for a {found} KV cache, its attention kernel for {expected}; re-provision the plan")]
    KvDtype { family: Family, expected: &'static str, found: &'static str },
}

/// One loaded kernel per provisioned M (index M-1); M=1 is always there.
pub struct ByM<T> {
    by_m: Vec<Option<T>>,
}

impl<T> ByM<T> {
    /// The kernel of the largest provisioned M that is at most `left`.
    fn fit(&mut self, left: usize) -> &mut T {
        self.by_m.iter_mut().take(left).rev().find_map(|g| g.as_mut()).expect("M=1 is always loaded (checked in StepKernels::load)")
    }
}

/// A linear family: the W2A8 GEMVs by M, and the tensor-core GEMM's buckets by capacity.
pub struct Linear {
    gemv: ByM<TernaryGemv>,
    /// Ascending M; empty where the plan has no GEMM for this shape.
    gemm: Vec<TernaryGemv>,
}

/// A dense GEMV over gathered rows (`lm_head` template) by M.
pub type Gathered = ByM<LmHead>;

impl Linear {
    /// Launches W2A8 on rows `0..rows` of `q` / `x_scale` into `y`: one row on the M=1 GEMV;
    /// more on the smallest GEMM bucket that holds them (the largest, repeatedly, past it), or
    /// where there is no GEMM, in GEMV launches of the largest provisioned M that fits.
    pub fn launch(
        &mut self,
        gpu: &Gpu,
        w: &DeviceBuffer<u8>,
        rows: usize,
        q: &DeviceBuffer<i8>,
        x_scale: &DeviceBuffer<f32>,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<(), GpuError> {
        let mut row0 = 0;
        while row0 < rows {
            let left = rows - row0;
            let n = if left >= 2 && !self.gemm.is_empty() {
                let g = match self.gemm.iter_mut().position(|g| g.m >= left) {
                    Some(i) => &mut self.gemm[i],
                    None => self.gemm.last_mut().expect("not empty"),
                };
                let n = left.min(g.m);
                g.launch_w2a8_rows(gpu, w, q, x_scale, (row0, row0), n, y, 1.0)?;
                n
            } else {
                let g = self.gemv.fit(left);
                g.launch_w2a8_rows(gpu, w, q, x_scale, (row0, row0), g.m, y, 1.0)?;
                g.m
            };
            row0 += n;
        }
        Ok(())
    }
}

impl Gathered {
    /// `y[i] = W x[rows[i]]` for the first `count` indices of `rows`, in launches of the largest
    /// provisioned M that fits; y is [count, N].
    pub fn launch(
        &mut self,
        gpu: &Gpu,
        w: &DeviceBuffer<u16>,
        x: &DeviceBuffer<f32>,
        rows: &DeviceBuffer<i32>,
        count: usize,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<(), GpuError> {
        self.launch_view(gpu, w, x, rows.slice(..), count, y)
    }

    /// [`Gathered::launch`] with the row indices from a view (a chunk of a larger index list).
    pub fn launch_view(
        &mut self,
        gpu: &Gpu,
        w: &DeviceBuffer<u16>,
        x: &DeviceBuffer<f32>,
        rows: DeviceView<i32>,
        count: usize,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<(), GpuError> {
        let mut b0 = 0;
        while b0 < count {
            let g = self.fit(count - b0);
            let (m, n) = (g.m, g.n);
            g.launch(gpu, w, x, rows.slice(b0..b0 + m), y.slice_mut(b0 * n..(b0 + m) * n))?;
            b0 += m;
        }
        Ok(())
    }
}

/// The dense MLP's kernels.
pub struct DenseMlp {
    pub gate_up: Linear,
    pub down: Linear,
    pub sub_norm: RmsNormQuant,
}

/// The grouped MoE kernels of one token bucket, with the routing buffers they share (sized
/// for the bucket's largest routing, so a step's launches never need its length on the host).
pub struct MoeBucket {
    pub m: usize,
    pub route: MoeRoute,
    /// The routing aligned to `down`'s BLOCK_M, where it differs from `gate_up`'s.
    pub route_down: Option<MoeRoute>,
    pub gate_up: MoeGateUp,
    pub down: MoeDown,
    pub routing: DeviceRouting,
    pub routing_down: Option<DeviceRouting>,
}

/// The MoE block's kernels: router, the grouped kernels per token bucket, the per-pair
/// quantization and the combine.
pub struct MoeKernels {
    pub router: Gathered,
    /// Ascending M; M=1 is always there.
    pub buckets: Vec<MoeBucket>,
    pub glu: RmsNormQuant,
    pub combine: MoeCombine,
}

impl MoeKernels {
    /// The smallest bucket that holds `rows`, else the largest.
    pub fn bucket(&mut self, rows: usize) -> &mut MoeBucket {
        let i = self.buckets.iter().position(|b| b.m >= rows).unwrap_or(self.buckets.len() - 1);
        &mut self.buckets[i]
    }

    /// The bucket M a step of `rows` token rows runs on (its first chunk's, past the largest).
    pub fn bucket_m(&self, rows: usize) -> usize {
        self.buckets.iter().find(|b| b.m >= rows).or(self.buckets.last()).map_or(1, |b| b.m)
    }

    /// The most token rows one pass of the block takes (the largest bucket).
    pub fn max_rows(&self) -> usize {
        self.buckets.last().map_or(1, |b| b.m)
    }

    fn load(gpu: &Gpu, entries: &KernelEntries, router: Gathered, glu: RmsNormQuant, combine: MoeCombine) -> Result<Self, KernelSetError> {
        let mut buckets = Vec::new();
        for (&(_, m), gu) in entries.range((Family::MoeGateUp, 1)..=(Family::MoeGateUp, i64::MAX)) {
            let at = |family: Family| entries.get(&(family, m)).ok_or(KernelSetError::MissingAt { family, m });
            let err = |family: Family| move |source| KernelSetError::Load { family, m, source };
            let gate_up = MoeGateUp::new(gpu, gu).map_err(err(Family::MoeGateUp))?;
            let down = MoeDown::new(gpu, at(Family::MoeDown)?).map_err(err(Family::MoeDown))?;
            let route = MoeRoute::new(gpu, at(Family::MoeRoute)?).map_err(err(Family::MoeRoute))?;
            let route_down = MoeRoute::new(gpu, at(Family::MoeRouteDown)?).map_err(err(Family::MoeRouteDown))?;
            let routing_of = |r: &MoeRoute| DeviceRouting::zeros(gpu, r.tokens * r.topk, r.experts, r.block_m);
            let routing = routing_of(&route).map_err(err(Family::MoeRoute))?;
            let route_down = (route_down.block_m != route.block_m).then_some(route_down);
            let routing_down = route_down.as_ref().map(routing_of).transpose().map_err(err(Family::MoeRouteDown))?;
            buckets.push(MoeBucket { m: m as usize, route, route_down, gate_up, down, routing, routing_down });
        }
        if buckets.first().is_none_or(|b| b.m != 1) {
            return Err(KernelSetError::Missing { family: Family::MoeGateUp });
        }
        Ok(Self { router, buckets, glu, combine })
    }
}

/// Every kernel of a step.
pub struct StepKernels {
    pub qkv: Linear,
    pub o: Linear,
    pub norm: RmsNormQuant,
    pub attn_sub_norm: RmsNormQuant,
    pub rope: RopeKv,
    pub attention: Attention,
    /// Dense models.
    pub mlp: Option<DenseMlp>,
    /// MoE models.
    pub moe: Option<MoeKernels>,
    pub lm_head: Gathered,
    /// Dense models: the fused layer of batch-1 decode steps, when the plan has it and this GPU
    /// holds its persistent grid (else those steps run the unfused launches).
    pub fused: Option<DecodeLayer>,
    /// Why the plan's fused layer cannot run on this GPU, when it cannot (a counted fallback).
    pub fused_unavailable: Option<String>,
    /// The LM head of steps whose rows are all last rows (decode batches of two or more
    /// sequences): one cuBLAS bf16 GEMM reads the head once, where `lm_head` reads it once per
    /// chunk of at most [`MAX_GEMV_M`] rows. None with MANGROVE_LM_HEAD_KERNEL set (the A/B
    /// switch) or where libcublas cannot be loaded.
    pub blas_head: Option<Blas>,
    /// Why cuBLAS could not be opened, when it could not (a counted fallback).
    pub blas_unavailable: Option<String>,
    /// The GPU sampler; None with MANGROVE_HOST_SAMPLING set (the A/B switch) or for a plan made
    /// before it (tokens are then picked on the host).
    pub sample: Option<SampleTokens>,
    /// The plan has no sampler (a counted fallback, unlike the switch).
    pub sample_unavailable: bool,
}

impl StepKernels {
    /// The KV-cache element type every attention-side kernel of the plan was built for.
    pub fn kv_dtype(&self) -> Result<KvDtype, KernelSetError> {
        let expected = self.attention.shape.kv;
        let others = [(Family::Rope, Some(self.rope.shape.kv)), (Family::DecodeLayer, self.fused.as_ref().map(|f| f.shape.attn.kv))];
        match others.into_iter().find(|(_, kv)| kv.is_some_and(|kv| kv != expected)) {
            Some((family, Some(found))) => Err(KernelSetError::KvDtype { family, expected: expected.as_str(), found: found.as_str() }),
            _ => Ok(expected),
        }
    }

    /// Loads the plan's entries onto `gpu`.
    pub fn load(gpu: &Gpu, entries: &KernelEntries) -> Result<Self, KernelSetError> {
        let one = |family: Family| -> Result<&CacheEntry, KernelSetError> {
            entries.get(&(family, 1)).ok_or(KernelSetError::Missing { family })
        };
        let load_err = |family: Family, m: i64| move |source| KernelSetError::Load { family, m, source };
        fn by_m<T>(entries: &KernelEntries, family: Family, load: impl Fn(&CacheEntry) -> Result<T, GpuError>) -> Result<ByM<T>, KernelSetError> {
            if !entries.contains_key(&(family, 1)) {
                return Err(KernelSetError::Missing { family });
            }
            let by_m = (1..=MAX_GEMV_M as i64)
                .map(|m| {
                    entries
                        .get(&(family, m))
                        .filter(|e| e.inputs.template != GEMM_TEMPLATE)
                        .map(|e| load(e).map_err(|source| KernelSetError::Load { family, m, source }))
                        .transpose()
                })
                .collect::<Result<_, _>>()?;
            Ok(ByM { by_m })
        }
        let linear = |family: Family| -> Result<Linear, KernelSetError> {
            let gemm = entries
                .range((family, 2)..=(family, i64::MAX))
                .filter(|(_, e)| e.inputs.template == GEMM_TEMPLATE)
                .map(|(&(_, m), e)| TernaryGemv::new(gpu, e).map_err(|source| KernelSetError::Load { family, m, source }))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Linear { gemv: by_m(entries, family, |e| TernaryGemv::new(gpu, e))?, gemm })
        };
        let gathered = |family| by_m(entries, family, |e| LmHead::new(gpu, e));
        let norm = |family| RmsNormQuant::new(gpu, one(family)?).map_err(load_err(family, 1));
        let is_moe = entries.contains_key(&(Family::MoeGateUp, 1));
        let disabled = std::env::var_os("MANGROVE_UNFUSED").is_some();
        let (fused, fused_unavailable) = match entries.get(&(Family::DecodeLayer, 1)) {
            Some(_) if disabled => (None, None), // the A/B switch: not a fallback
            Some(e) => match DecodeLayer::new(gpu, e) {
                Ok(k) => (Some(k), None),
                Err(e @ GpuError::NotCoResident { .. }) => (None, Some(e.to_string())),
                Err(source) => return Err(KernelSetError::Load { family: Family::DecodeLayer, m: 1, source }),
            },
            None => (None, None),
        };
        let (blas_head, blas_unavailable) = match std::env::var_os("MANGROVE_LM_HEAD_KERNEL") {
            Some(_) => (None, None), // the A/B switch: not a fallback
            None => match Blas::open(gpu) {
                Ok(b) => (Some(b), None),
                Err(e) => (None, Some(e.to_string())),
            },
        };
        Ok(Self {
            qkv: linear(Family::AttnQkv)?,
            o: linear(Family::AttnO)?,
            norm: norm(Family::Rmsnorm)?,
            attn_sub_norm: norm(Family::AttnSubNorm)?,
            rope: RopeKv::new(gpu, one(Family::Rope)?).map_err(load_err(Family::Rope, 1))?,
            attention: Attention::new(gpu, one(Family::Attention)?).map_err(load_err(Family::Attention, 1))?,
            mlp: (!is_moe)
                .then(|| {
                    Ok::<_, KernelSetError>(DenseMlp {
                        gate_up: linear(Family::MlpGateUp)?,
                        down: linear(Family::MlpDown)?,
                        sub_norm: norm(Family::MlpSubNorm)?,
                    })
                })
                .transpose()?,
            moe: is_moe
                .then(|| {
                    let combine = MoeCombine::new(gpu, one(Family::MoeCombine)?).map_err(load_err(Family::MoeCombine, 1))?;
                    MoeKernels::load(gpu, entries, gathered(Family::MoeRouter)?, norm(Family::MoeGlu)?, combine)
                })
                .transpose()?,
            lm_head: gathered(Family::LmHead)?,
            fused,
            fused_unavailable,
            blas_head,
            blas_unavailable,
            sample: match std::env::var_os("MANGROVE_HOST_SAMPLING") {
                Some(_) => None,
                None => entries.get(&(Family::Sample, 1)).map(|e| SampleTokens::new(gpu, e).map_err(load_err(Family::Sample, 1))).transpose()?,
            },
            sample_unavailable: !entries.contains_key(&(Family::Sample, 1)),
        })
    }
}
