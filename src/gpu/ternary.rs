//! Host side of the `ternary_gemv` template: owns the split-K workspace and launches the
//! kernel with its argument list. Shapes come from the entry's rendered parameters.

use cudarc::driver::PushKernelArg;

use super::{check_lengths, driver_err, DeviceBuffer, Gpu, GpuError, LoadedKernel};
use crate::cache::CacheEntry;

/// A loaded ternary GEMV for one (M, N, K, config) with its workspace.
pub struct TernaryGemv {
    kernel: LoadedKernel,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    partial: DeviceBuffer<f32>,
    counters: DeviceBuffer<u32>,
}

impl TernaryGemv {
    /// Loads a `ternary_gemv` cache entry and allocates its workspace.
    pub fn new(gpu: &Gpu, entry: &CacheEntry) -> Result<Self, GpuError> {
        let p = &entry.inputs.params;
        let get = |name: &str| -> Result<usize, GpuError> {
            p.get(name).map(|&v| v as usize).ok_or_else(|| GpuError::Shape {
                kernel: entry.inputs.template.clone(),
                what: format!("entry has no parameter {name}; is it a ternary_gemv kernel?"),
            })
        };
        let (m, n, k, split) = (get("M")?, get("N")?, get("K")?, get("SPLIT_K")?);
        let kernel = gpu.load(entry)?;
        let tiles = kernel.launch.grid[0] as usize;
        let partial = gpu.zeros::<f32>(if split > 1 { split * m * n } else { 1 })?;
        let counters = gpu.zeros::<u32>(tiles.max(1))?;
        Ok(Self { kernel, m, n, k, partial, counters })
    }

    /// Bytes one call must move at least: packed weights, activations in, outputs out.
    pub fn min_bytes(&self) -> usize {
        self.n / 4 * self.k + 2 * self.m * self.k + 2 * self.m * self.n
    }

    /// y = scale * W x for packed `w` [N/4, K], bf16 `x` [M, K], bf16 `y` [M, N]; queued on the stream.
    pub fn launch(
        &mut self,
        gpu: &Gpu,
        w: &DeviceBuffer<u8>,
        x: &DeviceBuffer<u16>,
        y: &mut DeviceBuffer<u16>,
        scale: f32,
    ) -> Result<(), GpuError> {
        let shape = format!("M={} N={} K={}", self.m, self.n, self.k);
        let expect = [("w", w.len(), self.n / 4 * self.k), ("x", x.len(), self.m * self.k), ("y", y.len(), self.m * self.n)];
        check_lengths(&self.kernel.name, &shape, &expect)?;
        let cfg = self.kernel.config();
        let mut b = gpu.stream().launch_builder(&self.kernel.func);
        b.arg(w).arg(x).arg(y).arg(&scale).arg(&mut self.partial).arg(&mut self.counters);
        // SAFETY: the argument list matches the kernel signature in ternary_gemv.cu.tera
        // (w, x, y, scale, partial, counters); buffer sizes were checked above and the
        // workspace was sized from the same parameters the kernel was rendered with.
        unsafe { b.launch(cfg) }.map_err(driver_err(format!("launching {}", self.kernel.name)))?;
        Ok(())
    }
}
