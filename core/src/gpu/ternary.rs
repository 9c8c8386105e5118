//! Host side of the ternary linear templates (`ternary_gemv`: bf16 activations;
//! `ternary_gemv_w2a8`: int8 per-token activations, dp4a; `ternary_gemm_w2a8`: the same on
//! tensor cores for any row count up to its M): owns the split-K workspace and launches the
//! kernel with its argument list. Shapes come from the entry's rendered parameters.

use super::shapes::GemvShape;
use super::{check_at_least, check_lengths, Args, DeviceBuffer, Gpu, GpuError, LoadedKernel};
use crate::cache::CacheEntry;

/// How activations reach the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ActMode {
    /// bf16 activations, f32 accumulation (`ternary_gemv`).
    Bf16,
    /// int8 activations with a per-token scale, int32 accumulation (`ternary_gemv_w2a8`).
    W2A8,
}

impl ActMode {
    /// The template implementing this mode.
    pub fn template(self) -> &'static str {
        match self {
            ActMode::Bf16 => "ternary_gemv",
            ActMode::W2A8 => "ternary_gemv_w2a8",
        }
    }
}

/// Activations in the form the kernel's mode takes.
pub enum Activations<'a> {
    Bf16(&'a DeviceBuffer<u16>),
    /// int8 values [M, K] and per-token scales [M] (q = round(x * scale)).
    Int8 { q: &'a DeviceBuffer<i8>, scale: &'a DeviceBuffer<f32> },
}

/// The W2A8 GEMM on tensor cores (rows 1..M per launch).
pub const GEMM_TEMPLATE: &str = "ternary_gemm_w2a8";

/// A loaded ternary linear for one (M, N, K, config) with its workspace.
pub struct TernaryGemv {
    kernel: LoadedKernel,
    pub mode: ActMode,
    /// Rows of one launch: exactly M for the GEMVs, at most M for the tensor-core GEMM.
    pub m: usize,
    /// The tensor-core GEMM (`ternary_gemm_w2a8`): takes any row count up to `m`.
    pub any_rows: bool,
    pub n: usize,
    pub k: usize,
    /// W2A8 only: the output is f32 instead of bf16.
    pub out_f32: bool,
    /// Split-K partials: f32 for bf16 mode, i32 for W2A8 (same size, 4 bytes each).
    partial_f: DeviceBuffer<f32>,
    partial_i: DeviceBuffer<i32>,
    counters: DeviceBuffer<u32>,
}

impl TernaryGemv {
    /// Loads a ternary GEMV cache entry (either mode) and allocates its workspace.
    pub fn new(gpu: &Gpu, entry: &CacheEntry) -> Result<Self, GpuError> {
        let mode = match entry.inputs.template.as_str() {
            "ternary_gemv" => ActMode::Bf16,
            "ternary_gemv_w2a8" | GEMM_TEMPLATE => ActMode::W2A8,
            other => {
                return Err(GpuError::Shape { kernel: other.into(), what: "not a ternary GEMV kernel".into() });
            }
        };
        let GemvShape { m, n, k, split_k: split, out_f32 } = GemvShape::from_params(&entry.inputs.template, &entry.inputs.params)?;
        let kernel = gpu.load(entry)?;
        // Split-K counters: one per (row tile, token tile).
        let tiles = kernel.launch.grid[0] as usize * kernel.launch.grid[2].max(1) as usize;
        let work = if split > 1 { split * m * n } else { 1 };
        let (fw, iw) = if mode == ActMode::Bf16 { (work, 1) } else { (1, work) };
        Ok(Self {
            partial_f: gpu.zeros::<f32>(fw)?,
            partial_i: gpu.zeros::<i32>(iw)?,
            counters: gpu.zeros::<u32>(tiles.max(1))?,
            any_rows: entry.inputs.template == GEMM_TEMPLATE,
            kernel,
            mode,
            m,
            n,
            k,
            out_f32,
        })
    }

    /// Bytes one call must move at least: packed weights, activations in, outputs out.
    pub fn min_bytes(&self) -> usize {
        let act = match self.mode {
            ActMode::Bf16 => 2 * self.m * self.k,
            ActMode::W2A8 => self.m * self.k + 4 * self.m,
        };
        self.n / 4 * self.k + act + self.out_bytes() * self.m * self.n
    }

    /// Bytes of one output element.
    pub fn out_bytes(&self) -> usize {
        if self.out_f32 { 4 } else { 2 }
    }

    /// y = W x (scaled) for packed `w` [N/4, K] and bf16 `y` [M, N]; queued on the stream.
    pub fn launch(
        &mut self,
        gpu: &Gpu,
        w: &DeviceBuffer<u8>,
        x: Activations,
        y: &mut DeviceBuffer<u16>,
        scale: f32,
    ) -> Result<(), GpuError> {
        if self.out_f32 {
            return Err(GpuError::Shape { kernel: self.kernel.name.clone(), what: "f32-output kernel given a bf16 output".into() });
        }
        let shape = format!("M={} N={} K={}", self.m, self.n, self.k);
        let mut lens = vec![("w", w.len(), self.n / 4 * self.k), ("y", y.len(), self.m * self.n)];
        match (&x, self.mode) {
            (Activations::Bf16(x), ActMode::Bf16) => lens.push(("x", x.len(), self.m * self.k)),
            (Activations::Int8 { q, scale }, ActMode::W2A8) => {
                lens.push(("q", q.len(), self.m * self.k));
                lens.push(("x_scale", scale.len(), self.m));
            }
            _ => {
                return Err(GpuError::Shape {
                    kernel: self.kernel.name.clone(),
                    what: format!("activations do not match the kernel's {:?} mode", self.mode),
                })
            }
        }
        check_lengths(&self.kernel.name, &shape, &lens)?;
        let cfg = self.kernel.config();
        let mut b = Args::new(gpu);
        b.arg(w);
        match x {
            Activations::Bf16(x) => {
                b.arg(x).arg(y).arg(&scale).arg(&mut self.partial_f);
            }
            Activations::Int8 { q, scale: xs } => {
                b.arg(q).arg(xs).arg(y).arg(&scale).arg(&mut self.partial_i);
            }
        }
        b.arg(&mut self.counters);
        let rows = self.m as i32;
        if self.any_rows {
            b.arg(&rows);
        }
        // SAFETY: the argument lists match the kernel signatures in ternary_gemv.cu.tera
        // (w, x, y, scale, partial, counters), ternary_gemv_w2a8.cu.tera (w, q, x_scale, y,
        // scale, partial, counters) and ternary_gemm_w2a8.cu.tera (the same, then rows), the mode was checked against the activations, every
        // buffer length above, and the workspace was sized from the rendered parameters.
        unsafe { self.kernel.launch(cfg, &mut b) }?;
        Ok(())
    }

    /// W2A8 on `rows` rows of larger buffers: rows `q_row..q_row + rows` of `q` [*, K] and
    /// `x_scale` [*] into rows `y_row..y_row + rows` of `y` [*, N] (bf16 bits `u16` or f32, as
    /// the kernel was rendered): the engine's step buffers, cut into launches. `rows` is M for
    /// the GEMVs and 1..=M for the tensor-core GEMM.
    #[allow(clippy::too_many_arguments)] // the kernel's argument list, named
    pub fn launch_w2a8_rows<T: cudarc::driver::DeviceRepr>(
        &mut self,
        gpu: &Gpu,
        w: &DeviceBuffer<u8>,
        q: &DeviceBuffer<i8>,
        x_scale: &DeviceBuffer<f32>,
        (q_row, y_row): (usize, usize),
        rows: usize,
        y: &mut DeviceBuffer<T>,
        scale: f32,
    ) -> Result<(), GpuError> {
        let (n, k) = (self.n, self.k);
        let m = rows;
        let shape = format!("rows {q_row}..{} → {y_row}.. of M={} N={n} K={k}", q_row + m, self.m);
        let fits = if self.any_rows { (1..=self.m).contains(&rows) } else { rows == self.m };
        if !fits {
            let what = format!("{rows} rows given; this kernel takes {}{}", if self.any_rows { "1..=" } else { "exactly " }, self.m);
            return Err(GpuError::Shape { kernel: self.kernel.name.clone(), what });
        }
        if self.mode != ActMode::W2A8 {
            return Err(GpuError::Shape { kernel: self.kernel.name.clone(), what: "not a W2A8 kernel".into() });
        }
        if std::mem::size_of::<T>() != self.out_bytes() {
            let what = format!("output elements of {} bytes given, the kernel writes {}", std::mem::size_of::<T>(), self.out_bytes());
            return Err(GpuError::Shape { kernel: self.kernel.name.clone(), what });
        }
        let (q_end, y_end) = (q_row + m, y_row + m);
        let name = self.kernel.name.as_str();
        check_lengths(name, &shape, &[("w", w.len(), n / 4 * k)])?;
        check_at_least(name, "q", q.len(), q_end * k)?;
        check_at_least(name, "x_scale", x_scale.len(), q_end)?;
        check_at_least(name, "y", y.len(), y_end * n)?;
        let qv = q.slice(q_row * k..q_end * k);
        let sv = x_scale.slice(q_row..q_end);
        let mut yv = y.slice_mut(y_row * n..y_end * n);
        let cfg = self.kernel.config();
        let mut b = Args::new(gpu);
        b.arg(w).arg(&qv).arg(&sv).arg(&mut yv).arg(&scale).arg(&mut self.partial_i).arg(&mut self.counters);
        let rows = rows as i32;
        if self.any_rows {
            b.arg(&rows);
        }
        // SAFETY: the argument list matches ternary_gemv_w2a8.cu.tera (w, q, x_scale, y, scale,
        // partial, counters) or ternary_gemm_w2a8.cu.tera (the same, then rows); the views cover
        // exactly the rows the kernel reads and writes (the GEMM writes only its first `rows`
        // rows), and the split-K workspace was sized from the rendered parameters.
        unsafe { self.kernel.launch(cfg, &mut b) }?;
        Ok(())
    }
}
