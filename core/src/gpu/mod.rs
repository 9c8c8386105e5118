//! Stage 5 — loader and launcher. Takes cached cubins and gives loaded kernels on a real GPU.
//! A process without libcuda, or without a device, gets [`GpuError::NoDriver`] /
//! [`GpuError::NoDevice`] as a normal answer: the driver library is probed before cudarc
//! touches it (cudarc panics otherwise); so is libcublas ([`Blas`], the vendor baseline).
//! With `compile`, the only module that imports cudarc.

mod cublas;
mod graph;
mod launch;
mod layer;
mod moe;
mod ops;
mod sample;
mod shapes;
mod ternary;
mod timing;

use std::sync::Arc;

use cudarc::driver::{self as cu, CudaContext, CudaFunction, CudaModule, CudaStream};

use crate::arch::Arch;
use crate::cache::CacheEntry;
use crate::template::LaunchDims;
pub use cublas::{Blas, DenseGroup};
pub use graph::Graph;
pub(crate) use launch::{Args, Null};
pub use moe::{DeviceRouting, DownWeights, ExpertWeights, GroupedShape, MoeCombine, MoeDown, MoeGateUp, MoeRoute, RouteOut};
pub use layer::{DecodeLayer, LayerScratch, LayerWeights};
pub use sample::SampleTokens;
pub use shapes::{AttnShape, GemvShape, KvDtype, LayerShape, NormShape};
pub use ops::{AttnScratch, Attention, KvArena, LmHead, NormOut, NormSource, RmsNormQuant, RopeKv, RowMeta};
pub use ternary::{ActMode, Activations, TernaryGemv, GEMM_TEMPLATE};
pub use timing::{SpanTotal, Spans, TimingPlan, TimingStats};

/// A device allocation of `T` elements.
pub type DeviceBuffer<T> = cu::CudaSlice<T>;

/// A borrowed range of a [`DeviceBuffer`] (`buffer.slice(range)`).
pub type DeviceView<'a, T> = cu::CudaView<'a, T>;

/// A mutably borrowed range of a [`DeviceBuffer`] (`buffer.slice_mut(range)`).
pub type DeviceViewMut<'a, T> = cu::CudaViewMut<'a, T>;

/// Errors of the GPU stage.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no GPU driver: libcuda could not be loaded on this machine")]
    NoDriver,
    #[error("no GPU device: {0}")]
    NoDevice(String),
    #[error("CUDA driver error during {context}")]
    Driver { context: String, source: cu::DriverError },
    #[error("{context}: {reason}")]
    Cuda { context: String, reason: String },
    #[error("shape mismatch for {kernel}: {what}")]
    Shape { kernel: String, what: String },
    #[error("kernel '{kernel}' was compiled for {compiled} but this GPU is {device}")]
    ArchMismatch { kernel: String, compiled: Arch, device: Arch },
    #[error("kernel '{kernel}' needs its {blocks} blocks resident at once; this GPU holds {fit}")]
    NotCoResident { kernel: String, blocks: usize, fit: usize },
    #[error("cuBLAS unavailable: {0}")]
    NoBlas(String),
    #[error("kernel '{kernel}' needs {wanted} bytes of dynamic shared memory; this GPU allows {limit} per block")]
    SharedMemory { kernel: String, wanted: u32, limit: i32 },
}

/// Why a machine has no GPU (no driver or no device): a normal state, not a failure.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Absent(pub GpuError);

pub(crate) fn driver_err(context: impl Into<String>) -> impl FnOnce(cu::DriverError) -> GpuError {
    let context = context.into();
    move |source| GpuError::Driver { context, source }
}

/// Facts about the device, for reports and tuning-DB metadata.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceInfo {
    pub name: String,
    pub arch: Arch,
    pub sm_count: i32,
    pub driver_version: i32,
    pub total_mem_bytes: usize,
    pub l2_bytes: i32,
    pub max_shared_per_block_optin: i32,
    /// Peak clocks the driver reports (0 where it reports none).
    pub sm_clock_mhz: i32,
    pub mem_clock_mhz: i32,
}

/// One GPU with a context and a stream.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    /// Kernels that allow it are launched with programmatic dependent launch ([`launch`]).
    pdl: bool,
}

/// A cubin loaded as a module, with its entry function and launch geometry.
pub struct LoadedKernel {
    pub name: String,
    pub launch: LaunchDims,
    _module: Arc<CudaModule>,
    func: CudaFunction,
}

impl Gpu {
    /// True when libcuda can be loaded (no device query; never panics).
    pub fn driver_present() -> bool {
        // SAFETY: only tries dlopen on the driver's library names; no CUDA call is made.
        unsafe { cu::sys::is_culib_present() }
    }

    /// Opens device `ordinal` where a machine may have none: no driver or no device (a normal
    /// state on build and CI machines) is `Ok(Err(absent))`; any other failure is an error.
    pub fn open_optional(ordinal: usize) -> Result<Result<Self, Absent>, GpuError> {
        match Self::open(ordinal) {
            Ok(g) => Ok(Ok(g)),
            Err(e @ (GpuError::NoDriver | GpuError::NoDevice(_))) => Ok(Err(Absent(e))),
            Err(e) => Err(e),
        }
    }

    /// Opens device `ordinal`, or says why there is no GPU.
    pub fn open(ordinal: usize) -> Result<Self, GpuError> {
        if !Self::driver_present() {
            return Err(GpuError::NoDriver);
        }
        let count = CudaContext::device_count().map_err(|e| GpuError::NoDevice(format!("{e:?}")))?;
        if count as usize <= ordinal {
            return Err(GpuError::NoDevice(format!("{count} device(s), asked for ordinal {ordinal}")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| GpuError::NoDevice(format!("{e:?}")))?;
        // SAFETY: mangrove queues all work of a Gpu on its one stream, so buffers need no
        // cross-stream events; tracking them would add CPU work to every launch (measured:
        // it made launches, not HBM, the floor of small GEMVs).
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().map_err(driver_err("compute capability"))?;
        let attr = |a| ctx.attribute(a).map_err(driver_err("device attribute"));
        use cu::sys::CUdevice_attribute as A;
        let mut driver_version = 0;
        // SAFETY: plain out-parameter query on an initialised driver.
        unsafe { cu::sys::cuDriverGetVersion(&mut driver_version) };
        let info = DeviceInfo {
            name: ctx.name().map_err(driver_err("device name"))?,
            arch: Arch::from_compute_capability(major, minor)
                .map_err(|e| GpuError::NoDevice(format!("unsupported device: {e}")))?,
            sm_count: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            driver_version,
            total_mem_bytes: ctx.total_mem().map_err(driver_err("total memory"))?,
            l2_bytes: attr(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?,
            max_shared_per_block_optin: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
            sm_clock_mhz: attr(A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE).unwrap_or(0) / 1000,
            mem_clock_mhz: attr(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE).unwrap_or(0) / 1000,
        };
        let stream = ctx.new_stream().map_err(driver_err("stream"))?;
        let pdl = launch::pdl_allowed(info.arch.cc / 10);
        Ok(Self { ctx, stream, info, pdl })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Loads a cached cubin; refuses entries compiled for another architecture.
    pub fn load(&self, entry: &CacheEntry) -> Result<LoadedKernel, GpuError> {
        let compiled = entry.inputs.arch;
        if compiled.cc != self.info.arch.cc {
            return Err(GpuError::ArchMismatch { kernel: entry.entry.clone(), compiled, device: self.info.arch });
        }
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(entry.cubin.clone()))
            .map_err(driver_err(format!("loading cubin of {}", entry.inputs.template)))?;
        let func = module.load_function(&entry.entry).map_err(driver_err(format!("finding {}", entry.entry)))?;
        let kernel = LoadedKernel { name: entry.inputs.template.clone(), launch: entry.launch, _module: module, func };
        if kernel.launch.shared_bytes > DEFAULT_DYNAMIC_SHARED {
            kernel.allow_dynamic_shared(self.info.max_shared_per_block_optin)?;
        }
        Ok(kernel)
    }

    /// Copies a host slice to a new device buffer.
    pub fn upload<T: cu::DeviceRepr>(&self, host: &[T]) -> Result<DeviceBuffer<T>, GpuError> {
        self.stream.clone_htod(host).map_err(driver_err("upload"))
    }

    /// A zeroed device buffer of `len` elements.
    pub fn zeros<T: cu::DeviceRepr + cu::ValidAsZeroBits>(&self, len: usize) -> Result<DeviceBuffer<T>, GpuError> {
        self.stream.alloc_zeros(len).map_err(driver_err("alloc"))
    }

    /// Copies a device buffer back to the host (synchronizes the stream).
    pub fn download<T: cu::DeviceRepr + Default + Clone>(&self, dev: &DeviceBuffer<T>) -> Result<Vec<T>, GpuError> {
        self.stream.clone_dtoh(dev).map_err(driver_err("download"))
    }

    /// Copies the first `len` elements of a device buffer back to the host (synchronizes).
    pub fn download_prefix<T: cu::DeviceRepr + Default + Clone>(&self, dev: &DeviceBuffer<T>, len: usize) -> Result<Vec<T>, GpuError> {
        if len > dev.len() {
            return Err(GpuError::Shape { kernel: "download".into(), what: format!("{len} elements asked of a buffer of {}", dev.len()) });
        }
        self.stream.clone_dtoh(&dev.slice(..len)).map_err(driver_err("download"))
    }

    /// Overwrites the start of a device buffer with host data.
    pub fn write<T: cu::DeviceRepr>(&self, host: &[T], dev: &mut DeviceBuffer<T>) -> Result<(), GpuError> {
        if host.len() > dev.len() {
            return Err(GpuError::Shape { kernel: "write".into(), what: format!("{} elements written to a buffer of {}", host.len(), dev.len()) });
        }
        self.stream.memcpy_htod(host, dev).map_err(driver_err("write"))
    }

    /// Waits for all queued work and surfaces any asynchronous launch error.
    pub fn sync(&self) -> Result<(), GpuError> {
        self.stream.synchronize().map_err(driver_err("synchronize"))
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Whether kernels that allow it go out with programmatic dependent launch.
    pub fn pdl(&self) -> bool {
        self.pdl
    }

    /// Makes this GPU's context current on the calling thread (before a raw driver call).
    pub(crate) fn bind(&self) -> Result<(), GpuError> {
        self.ctx.bind_to_thread().map_err(driver_err("binding the CUDA context"))
    }
}


/// Dynamic shared memory a kernel may use without opting in (48 KB on every arch).
const DEFAULT_DYNAMIC_SHARED: u32 = 48 * 1024;

/// Checks `(buffer, elements, expected)` triples; the first mismatch is a [`GpuError::Shape`]
/// naming the buffer and the shape (`what_shape`) that fixed the expectation.
pub(crate) fn check_lengths(kernel: &str, what_shape: &str, buffers: &[(&str, usize, usize)]) -> Result<(), GpuError> {
    match buffers.iter().find(|(_, got, want)| got != want) {
        Some((what, got, want)) => Err(GpuError::Shape {
            kernel: kernel.to_owned(),
            what: format!("{what} has {got} elements, {what_shape} needs {want}"),
        }),
        None => Ok(()),
    }
}

/// Checks that buffer `what` holds at least `want` elements (a launch over part of a larger
/// buffer); otherwise a [`GpuError::Shape`] naming it.
pub(crate) fn check_at_least(kernel: &str, what: &str, got: usize, want: usize) -> Result<(), GpuError> {
    if got < want {
        return Err(GpuError::Shape { kernel: kernel.to_owned(), what: format!("{what} has {got} elements, the launch needs at least {want}") });
    }
    Ok(())
}

impl LoadedKernel {
    /// Opts the kernel in to its `launch.shared_bytes` of dynamic shared memory, which the
    /// driver requires above 48 KB; more than the device's per-block limit is an error.
    pub(crate) fn allow_dynamic_shared(&self, optin_limit: i32) -> Result<(), GpuError> {
        let wanted = self.launch.shared_bytes;
        if i64::from(wanted) > i64::from(optin_limit) {
            return Err(GpuError::SharedMemory { kernel: self.name.clone(), wanted, limit: optin_limit });
        }
        use cu::sys::CUfunction_attribute as F;
        self.func
            .set_attribute(F::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, wanted as i32)
            .map_err(driver_err(format!("allowing {wanted} bytes of shared memory for {}", self.name)))
    }

    /// The launch of a row-wise op over `rows` token rows: the template's grid with grid.y = rows.
    pub(crate) fn config_rows(&self, rows: usize) -> Result<cu::LaunchConfig, GpuError> {
        let mut cfg = self.config();
        cfg.grid_dim.1 = u32::try_from(rows).ok().filter(|&r| (1..=65535).contains(&r)).ok_or_else(|| GpuError::Shape {
            kernel: self.name.clone(),
            what: format!("{rows} rows do not fit grid.y (1..=65535)"),
        })?;
        Ok(cfg)
    }

    pub(crate) fn config(&self) -> cu::LaunchConfig {
        cu::LaunchConfig {
            grid_dim: (self.launch.grid[0], self.launch.grid[1], self.launch.grid[2]),
            block_dim: (self.launch.block[0], self.launch.block[1], self.launch.block[2]),
            shared_mem_bytes: self.launch.shared_bytes,
        }
    }
}
