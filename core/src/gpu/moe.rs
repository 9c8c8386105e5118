//! Host side of the `moe_gateup` template: uploads a routing, checks every buffer against the
//! entry's rendered shape and launches the kernel over the grid sized for the largest routing.

use super::{check_lengths, Args, DeviceBuffer, Gpu, GpuError, LoadedKernel};
use crate::cache::CacheEntry;
use crate::routing::{max_padded_len, Routing};

/// Device buffers of one MoE layer's ternary experts (see `kernel_templates/moe_gateup.toml`).
#[derive(Clone, Copy)]
pub struct ExpertWeights<'a> {
    /// Packed gate weights [E, I/4, H].
    pub w_gate: &'a DeviceBuffer<u8>,
    /// Packed up weights [E, I/4, H].
    pub w_up: &'a DeviceBuffer<u8>,
    pub s_gate: &'a DeviceBuffer<f32>,
    pub s_up: &'a DeviceBuffer<f32>,
}

/// A [`Routing`] on the device.
pub struct DeviceRouting {
    pub sorted_ids: DeviceBuffer<i32>,
    pub block_expert: DeviceBuffer<i32>,
    pub em: usize,
    pub block_m: usize,
}

impl DeviceRouting {
    /// Copies a host routing to the device.
    pub fn upload(gpu: &Gpu, r: &Routing) -> Result<Self, GpuError> {
        // Zero-length device buffers are not allocatable; an empty routing keeps one sentinel.
        let ids = if r.sorted_ids.is_empty() { vec![r.sentinel()] } else { r.sorted_ids.clone() };
        let blocks = if r.block_expert.is_empty() { vec![-1] } else { r.block_expert.clone() };
        Ok(Self { sorted_ids: gpu.upload(&ids)?, block_expert: gpu.upload(&blocks)?, em: r.em, block_m: r.block_m })
    }
}

/// A loaded `moe_gateup` kernel for one (M, E, TOPK, H, I, config).
pub struct MoeGateUp {
    kernel: LoadedKernel,
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

impl MoeGateUp {
    /// Loads a `moe_gateup` cache entry; its parameters give the shapes it accepts.
    pub fn new(gpu: &Gpu, entry: &CacheEntry) -> Result<Self, GpuError> {
        let get = |name: &str| super::shapes::entry_param(entry, name);
        let (tokens, experts, topk, hidden, inter) = (get("M")?, get("E")?, get("TOPK")?, get("H")?, get("I")?);
        let block_m = get("BLOCK_M")?;
        let kernel = gpu.load(entry)?;
        // The grid is (max padded length / BLOCK_M) row blocks x the weight tiles.
        let max_em = max_padded_len(tokens * topk, experts, block_m);
        if block_m == 0 || kernel.launch.grid[0] as usize % (max_em / block_m).max(1) != 0 {
            return Err(GpuError::Shape {
                kernel: entry.inputs.template.clone(),
                what: format!("grid {} does not cover {} row blocks of {block_m}", kernel.launch.grid[0], max_em / block_m.max(1)),
            });
        }
        Ok(Self { kernel, tokens, experts, topk, hidden, inter, block_m, max_em })
    }

    /// Bytes one call must move at least: the weights of the experts used, x in, act out.
    pub fn min_bytes(&self, experts_used: usize) -> usize {
        2 * experts_used * self.inter / 4 * self.hidden + 2 * self.tokens * self.hidden + 2 * self.tokens * self.topk * self.inter
    }

    /// act [M*TOPK, I] = silu(gate) * up of every routed pair, for bf16 `x` [M, H]; queued on
    /// the stream. Rows of `act` are written exactly for the pairs listed in `routing`.
    pub fn launch(
        &mut self,
        gpu: &Gpu,
        x: &DeviceBuffer<u16>,
        w: ExpertWeights,
        routing: &DeviceRouting,
        act: &mut DeviceBuffer<u16>,
    ) -> Result<(), GpuError> {
        let (m, e, k, h, n) = (self.tokens, self.experts, self.topk, self.hidden, self.inter);
        let shape = format!("M={m} E={e} TOPK={k} H={h} I={n} BLOCK_M={}", self.block_m);
        let exact = [
            ("x", x.len(), m * h),
            ("w_gate", w.w_gate.len(), e * n / 4 * h),
            ("w_up", w.w_up.len(), e * n / 4 * h),
            ("s_gate", w.s_gate.len(), e),
            ("s_up", w.s_up.len(), e),
            ("act", act.len(), m * k * n),
        ];
        check_lengths(&self.kernel.name, &shape, &exact)?;
        let em = routing.em;
        if routing.block_m != self.block_m || em % self.block_m != 0 || em > self.max_em {
            return Err(self.shape_err(format!(
                "routing of padded length {em} aligned to {} rows; {shape} takes multiples of {} up to {}",
                routing.block_m, self.block_m, self.max_em
            )));
        }
        if routing.sorted_ids.len() < em || routing.block_expert.len() < em / self.block_m {
            return Err(self.shape_err(format!(
                "routing buffers hold {} ids and {} blocks, padded length {em} needs {} and {}",
                routing.sorted_ids.len(),
                routing.block_expert.len(),
                em,
                em / self.block_m
            )));
        }
        let em = i32::try_from(em).map_err(|_| self.shape_err(format!("padded length {em} exceeds i32")))?;
        let cfg = self.kernel.config();
        let mut b = Args::new(gpu);
        b.arg(x).arg(w.w_gate).arg(w.w_up).arg(w.s_gate).arg(w.s_up);
        b.arg(&routing.sorted_ids).arg(&routing.block_expert).arg(&em).arg(act);
        // SAFETY: the argument list matches the kernel signature in moe_gateup.cu.tera
        // (x, w_gate, w_up, s_gate, s_up, sorted_ids, block_expert, em, act); every buffer
        // length was checked above against the parameters the kernel was rendered with, and
        // em <= max_em with the routing buffers holding at least em ids and em/BLOCK_M blocks,
        // so tiles past em exit before reading them; the kernel bounds-checks every id and
        // expert it reads, so the routing's contents cannot take it out of bounds.
        unsafe { self.kernel.launch(cfg, &mut b) }?;
        Ok(())
    }

    fn shape_err(&self, what: String) -> GpuError {
        GpuError::Shape { kernel: self.kernel.name.clone(), what }
    }
}
