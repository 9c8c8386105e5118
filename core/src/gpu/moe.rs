//! Host side of the MoE templates: `moe_route` (routing on the GPU), the grouped ternary
//! GEMMs `moe_gateup` and `moe_down` (int8 activations, experts picked per row block from a
//! routing in device memory) and `moe_combine`. Each checks every buffer against the entry's
//! rendered shape; grids are sized for the largest routing, so no launch needs the routing's
//! padded length on the host and a whole MoE block can be captured in a CUDA graph.

use cudarc::driver::{CudaView, CudaViewMut};

use super::ops::load_checked;
use super::shapes::entry_param;
use super::{check_at_least as need, Args, DeviceBuffer, Gpu, GpuError, LoadedKernel};
use crate::cache::CacheEntry;
use crate::routing::{max_padded_len, Routing};

/// Device buffers of one MoE layer's ternary gate and up experts (see `kernel_templates/moe_gateup.toml`).
#[derive(Clone, Copy)]
pub struct ExpertWeights<'a> {
    /// Packed gate weights [E, I/4, H].
    pub w_gate: &'a DeviceBuffer<u8>,
    /// Packed up weights [E, I/4, H].
    pub w_up: &'a DeviceBuffer<u8>,
    pub s_gate: &'a DeviceBuffer<f32>,
    pub s_up: &'a DeviceBuffer<f32>,
}

/// Device buffers of one MoE layer's ternary down experts (see `kernel_templates/moe_down.toml`).
#[derive(Clone, Copy)]
pub struct DownWeights<'a> {
    /// Packed down weights [E, H/4, I].
    pub w_down: &'a DeviceBuffer<u8>,
    pub s_down: &'a DeviceBuffer<f32>,
}

/// A routing on the device (`crate::routing`'s layout); its padded length lives in device
/// memory (`em`, one i32), written by `moe_route` or uploaded with a host routing.
pub struct DeviceRouting {
    /// At least the largest padded length of the routings it can hold.
    pub sorted_ids: DeviceBuffer<i32>,
    pub block_expert: DeviceBuffer<i32>,
    pub em: DeviceBuffer<i32>,
    pub block_m: usize,
}

impl DeviceRouting {
    /// Copies a host routing of `experts` experts to the device, padded to the largest padded
    /// length of its pair count (sentinel ids, blocks of expert -1), so any kernel of its
    /// `block_m` sized for that pair count takes it.
    pub fn upload(gpu: &Gpu, r: &Routing, experts: usize) -> Result<Self, GpuError> {
        let max = max_padded_len(r.pairs, experts, r.block_m).max(r.block_m);
        let mut ids = r.sorted_ids.clone();
        ids.resize(max, r.sentinel());
        let mut blocks = r.block_expert.clone();
        blocks.resize(max / r.block_m, -1);
        let em = i32::try_from(r.em).map_err(|_| GpuError::Shape { kernel: "moe routing".into(), what: format!("padded length {} exceeds i32", r.em) })?;
        Ok(Self { sorted_ids: gpu.upload(&ids)?, block_expert: gpu.upload(&blocks)?, em: gpu.upload(&[em])?, block_m: r.block_m })
    }

    /// Zeroed buffers for a routing of up to `pairs` pairs over `experts`, aligned to
    /// `block_m` (what [`MoeRoute::launch`] fills).
    pub fn zeros(gpu: &Gpu, pairs: usize, experts: usize, block_m: usize) -> Result<Self, GpuError> {
        let max = max_padded_len(pairs, experts, block_m).max(block_m);
        Ok(Self { sorted_ids: gpu.zeros(max)?, block_expert: gpu.zeros(max / block_m)?, em: gpu.zeros(1)?, block_m })
    }

    /// Copies the routing back (padded length read from the device), for tests.
    pub fn download(&self, gpu: &Gpu, pairs: usize) -> Result<Routing, GpuError> {
        let em = gpu.download(&self.em)?[0] as usize;
        let sorted_ids = gpu.download_prefix(&self.sorted_ids, em.min(self.sorted_ids.len()))?;
        let block_expert = gpu.download_prefix(&self.block_expert, (em / self.block_m).min(self.block_expert.len()))?;
        Ok(Routing { sorted_ids, block_expert, em, block_m: self.block_m, pairs })
    }
}

/// The problem a grouped MoE kernel (`moe_gateup`, `moe_down`) was rendered for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupedShape {
    pub tokens: usize,
    pub experts: usize,
    pub topk: usize,
    pub hidden: usize,
    pub inter: usize,
    /// Rows per tile: routings must be aligned to it.
    pub block_m: usize,
    /// The largest padded routing length the grid covers.
    pub max_em: usize,
}

impl GroupedShape {
    fn of(entry: &CacheEntry, kernel: &LoadedKernel) -> Result<Self, GpuError> {
        let get = |name: &str| entry_param(entry, name);
        let (tokens, experts, topk, hidden, inter, block_m) = (get("M")?, get("E")?, get("TOPK")?, get("H")?, get("I")?, get("BLOCK_M")?);
        let max_em = max_padded_len(tokens * topk, experts, block_m);
        // The grid is (max padded length / BLOCK_M) row blocks x the weight tiles.
        if block_m == 0 || kernel.launch.grid[0] as usize % (max_em / block_m).max(1) != 0 {
            return Err(GpuError::Shape {
                kernel: entry.inputs.template.clone(),
                what: format!("grid {} does not cover {} row blocks of {block_m}", kernel.launch.grid[0], max_em / block_m.max(1)),
            });
        }
        Ok(Self { tokens, experts, topk, hidden, inter, block_m, max_em })
    }

    fn label(&self) -> String {
        let GroupedShape { tokens: m, experts: e, topk: k, hidden: h, inter: i, block_m, .. } = *self;
        format!("M={m} E={e} TOPK={k} H={h} I={i} BLOCK_M={block_m}")
    }

    /// Checks a routing and the launch's pair count; returns the pair count as the kernel's i32.
    fn check_routing(&self, kernel: &str, routing: &DeviceRouting, pairs: usize) -> Result<i32, GpuError> {
        let err = |what: String| GpuError::Shape { kernel: kernel.into(), what };
        if routing.block_m != self.block_m {
            return Err(err(format!("routing of padded length aligned to {} rows; {} takes multiples of {}", routing.block_m, self.label(), self.block_m)));
        }
        need(kernel, "sorted_ids", routing.sorted_ids.len(), self.max_em)?;
        need(kernel, "block_expert", routing.block_expert.len(), self.max_em / self.block_m)?;
        need(kernel, "em", routing.em.len(), 1)?;
        if pairs > self.tokens * self.topk {
            return Err(err(format!("{pairs} pairs exceed the {} of {}", self.tokens * self.topk, self.label())));
        }
        Ok(pairs as i32)
    }
}

/// A loaded `moe_gateup` kernel for one (M, E, TOPK, H, I, config).
pub struct MoeGateUp {
    kernel: LoadedKernel,
    pub shape: GroupedShape,
}

impl MoeGateUp {
    /// Loads a `moe_gateup` cache entry; its parameters give the shapes it accepts.
    pub fn new(gpu: &Gpu, entry: &CacheEntry) -> Result<Self, GpuError> {
        let kernel = load_checked(gpu, entry, "moe_gateup")?;
        Ok(Self { shape: GroupedShape::of(entry, &kernel)?, kernel })
    }

    /// Bytes one call must move at least: the weights of the experts used, q in, act out.
    pub fn min_bytes(&self, experts_used: usize) -> usize {
        let s = self.shape;
        2 * experts_used * s.inter / 4 * s.hidden + s.tokens * s.hidden + 4 * s.tokens * s.topk * s.inter
    }

    /// act [pairs, I] = act(gate) * up of every routed pair of the first `pairs / TOPK` tokens,
    /// for int8 `x` [tokens, H] with per-token `x_scale`; queued on the stream. Rows of `act`
    /// are written exactly for the pairs below `pairs` that `routing` lists.
    pub fn launch(
        &mut self,
        gpu: &Gpu,
        (x, x_scale): (CudaView<i8>, CudaView<f32>),
        w: ExpertWeights,
        routing: &DeviceRouting,
        pairs: usize,
        act: &mut DeviceBuffer<f32>,
    ) -> Result<(), GpuError> {
        let GroupedShape { experts: e, topk: k, hidden: h, inter: n, .. } = self.shape;
        let name = self.kernel.name.as_str();
        let tokens = pairs.div_ceil(k);
        need(name, "x", x.len(), tokens * h)?;
        need(name, "x_scale", x_scale.len(), tokens)?;
        need(name, "w_gate", w.w_gate.len(), e * n / 4 * h)?;
        need(name, "w_up", w.w_up.len(), e * n / 4 * h)?;
        need(name, "s_gate", w.s_gate.len(), e)?;
        need(name, "s_up", w.s_up.len(), e)?;
        need(name, "act", act.len(), pairs * n)?;
        let pairs = self.shape.check_routing(name, routing, pairs)?;
        let cfg = self.kernel.config();
        let mut b = Args::new(gpu);
        b.arg(&x).arg(&x_scale).arg(w.w_gate).arg(w.w_up).arg(w.s_gate).arg(w.s_up);
        b.arg(&routing.sorted_ids).arg(&routing.block_expert).arg(&routing.em).arg(&pairs).arg(act);
        // SAFETY: the argument list matches moe_gateup.cu.tera (x, x_scale, w_gate, w_up, s_gate,
        // s_up, sorted_ids, block_expert, em, pairs, act). The kernel reads at most MAX_PID_M
        // row blocks (the grid's, clamped in the kernel whatever em holds), which the routing
        // buffers hold (checked); it treats only ids in 0..pairs as pairs, whose tokens' x rows,
        // scales and act rows the buffers hold (checked), and bounds-checks every expert it reads.
        unsafe { self.kernel.launch(cfg, &mut b) }?;
        Ok(())
    }
}

/// A loaded `moe_down` kernel for one (M, E, TOPK, H, I, config).
pub struct MoeDown {
    kernel: LoadedKernel,
    pub shape: GroupedShape,
}

impl MoeDown {
    /// Loads a `moe_down` cache entry; its parameters give the shapes it accepts.
    pub fn new(gpu: &Gpu, entry: &CacheEntry) -> Result<Self, GpuError> {
        let kernel = load_checked(gpu, entry, "moe_down")?;
        Ok(Self { shape: GroupedShape::of(entry, &kernel)?, kernel })
    }

    /// Bytes one call must move at least: the weights of the experts used, q in, out.
    pub fn min_bytes(&self, experts_used: usize) -> usize {
        let s = self.shape;
        let pairs = s.tokens * s.topk;
        experts_used * s.hidden / 4 * s.inter + pairs * s.inter + 4 * pairs * s.hidden
    }

    /// out [pairs, H] = s_down[e] / q_scale[p] · W_e q_p for every routed pair p below `pairs`
    /// that `routing` lists (int8 `q` [pairs, I]); queued on the stream.
    pub fn launch(
        &mut self,
        gpu: &Gpu,
        (q, q_scale): (&DeviceBuffer<i8>, &DeviceBuffer<f32>),
        w: DownWeights,
        routing: &DeviceRouting,
        pairs: usize,
        out: &mut DeviceBuffer<f32>,
    ) -> Result<(), GpuError> {
        let GroupedShape { experts: e, hidden: h, inter: n, .. } = self.shape;
        let name = self.kernel.name.as_str();
        need(name, "q", q.len(), pairs * n)?;
        need(name, "q_scale", q_scale.len(), pairs)?;
        need(name, "w_down", w.w_down.len(), e * h / 4 * n)?;
        need(name, "s_down", w.s_down.len(), e)?;
        need(name, "out", out.len(), pairs * h)?;
        let pairs = self.shape.check_routing(name, routing, pairs)?;
        let cfg = self.kernel.config();
        let mut b = Args::new(gpu);
        b.arg(q).arg(q_scale).arg(w.w_down).arg(w.s_down);
        b.arg(&routing.sorted_ids).arg(&routing.block_expert).arg(&routing.em).arg(&pairs).arg(out);
        // SAFETY: the argument list matches moe_down.cu.tera (q, q_scale, w_down, s_down,
        // sorted_ids, block_expert, em, pairs, out); as for moe_gateup, row blocks are clamped to
        // what the routing buffers hold and only ids in 0..pairs are read or written, within
        // the buffers checked above; experts are bounds-checked in the kernel.
        unsafe { self.kernel.launch(cfg, &mut b) }?;
        Ok(())
    }
}

/// The outputs of [`MoeRoute::launch`]: per pair its expert and router weight, and the routing.
pub struct RouteOut<'a> {
    pub topk_ids: &'a mut DeviceBuffer<i32>,
    pub topk_w: &'a mut DeviceBuffer<f32>,
    pub routing: &'a mut DeviceRouting,
}

/// A loaded `moe_route` kernel for one (M, E, TOPK, BLOCK_M, NORM).
pub struct MoeRoute {
    kernel: LoadedKernel,
    pub tokens: usize,
    pub experts: usize,
    pub topk: usize,
    pub block_m: usize,
}

impl MoeRoute {
    pub fn new(gpu: &Gpu, entry: &CacheEntry) -> Result<Self, GpuError> {
        let kernel = load_checked(gpu, entry, "moe_route")?;
        let get = |name: &str| entry_param(entry, name);
        Ok(Self { tokens: get("M")?, experts: get("E")?, topk: get("TOPK")?, block_m: get("BLOCK_M")?, kernel })
    }

    /// Routes `rows` tokens (at most M) from their f32 `logits` [rows, E]; queued on the stream.
    pub fn launch(&self, gpu: &Gpu, logits: &DeviceBuffer<f32>, rows: usize, out: RouteOut) -> Result<(), GpuError> {
        let name = self.kernel.name.as_str();
        let (e, k, bm) = (self.experts, self.topk, self.block_m);
        if rows > self.tokens || out.routing.block_m != bm {
            return Err(GpuError::Shape {
                kernel: name.into(),
                what: format!("{rows} rows and a routing aligned to {}; the kernel routes up to {} rows aligned to {bm}", out.routing.block_m, self.tokens),
            });
        }
        let max_em = max_padded_len(self.tokens * k, e, bm);
        need(name, "logits", logits.len(), rows * e)?;
        need(name, "topk_ids", out.topk_ids.len(), rows * k)?;
        need(name, "topk_w", out.topk_w.len(), rows * k)?;
        need(name, "sorted_ids", out.routing.sorted_ids.len(), max_em)?;
        need(name, "block_expert", out.routing.block_expert.len(), max_em / bm)?;
        need(name, "em", out.routing.em.len(), 1)?;
        let rows = rows as i32;
        let mut b = Args::new(gpu);
        b.arg(logits).arg(&rows).arg(&*out.topk_ids).arg(&*out.topk_w);
        b.arg(&out.routing.sorted_ids).arg(&out.routing.block_expert).arg(&out.routing.em);
        // SAFETY: the argument list matches moe_route.cu.tera (logits, rows, topk_ids, topk_w,
        // sorted_ids, block_expert, em); rows <= M, and the kernel writes rows*TOPK pairs and at
        // most the largest padded length of M*TOPK pairs, all within the buffers checked above.
        unsafe { self.kernel.launch(self.kernel.config(), &mut b) }?;
        Ok(())
    }
}

/// A loaded `moe_combine` kernel.
pub struct MoeCombine {
    kernel: LoadedKernel,
    topk: usize,
    h: usize,
}

impl MoeCombine {
    pub fn new(gpu: &Gpu, entry: &CacheEntry) -> Result<Self, GpuError> {
        let kernel = load_checked(gpu, entry, "moe_combine")?;
        Ok(Self { topk: entry_param(entry, "TOPK")?, h: entry_param(entry, "H")?, kernel })
    }

    /// `out[t] = sum_j w[t·TOPK + j] · d[t·TOPK + j]` for `rows` tokens: d [rows·TOPK, H] f32,
    /// w [rows·TOPK], out [rows, H].
    pub fn launch(&self, gpu: &Gpu, rows: usize, d: &DeviceBuffer<f32>, w: &DeviceBuffer<f32>, mut out: CudaViewMut<f32>) -> Result<(), GpuError> {
        let name = self.kernel.name.as_str();
        need(name, "d", d.len(), rows * self.topk * self.h)?;
        need(name, "w", w.len(), rows * self.topk)?;
        need(name, "out", out.len(), rows * self.h)?;
        let cfg = self.kernel.config_rows(rows)?;
        let mut b = Args::new(gpu);
        b.arg(d).arg(w).arg(&mut out);
        // SAFETY: arguments follow moe_combine.cu.tera (d, w, out); sizes checked above.
        unsafe { self.kernel.launch(cfg, &mut b) }?;
        Ok(())
    }
}
