//! The one launch path of every loaded kernel: an argument list ([`Args`]) and
//! [`LoadedKernel::launch`], which goes through `cuLaunchKernelEx` so that kernels whose template
//! declares `pdl` (they run `griddepcontrol.wait` before touching memory another kernel writes)
//! are launched with programmatic dependent launch on Hopper and later: the next kernel of the
//! stream is scheduled while this one drains, instead of after it, which hides part of the
//! launch gap between the short kernels of a decode step (bitnet-2b batch 1 on the H100:
//! 1.08–1.15× per token). `MANGROVE_NO_PDL=1` turns it off.

use std::ffi::c_void;

use cudarc::driver::sys;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, LaunchConfig};

use super::{Gpu, GpuError, LoadedKernel};

/// One kernel argument by value, as the driver reads it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Value {
    Ptr(sys::CUdeviceptr),
    F32(f32),
    I32(i32),
}

/// A kernel's argument list, in signature order.
pub(crate) struct Args<'g> {
    gpu: &'g Gpu,
    values: Vec<Value>,
}

/// What may be passed as a kernel argument: device buffers and views (their device address)
/// and f32 / i32 scalars (by value).
pub(crate) trait KernelArg {
    #[doc(hidden)]
    fn value(&self, gpu: &Gpu) -> Value;
}

macro_rules! buffer_arg {
    ($($ty:ty),*) => {$(
        impl<T> KernelArg for &$ty {
            fn value(&self, gpu: &Gpu) -> Value {
                // Event tracking is off (Gpu::new), so the returned guard does nothing.
                Value::Ptr(DevicePtr::device_ptr(*self, gpu.stream()).0)
            }
        }
        impl<T> KernelArg for &mut $ty {
            fn value(&self, gpu: &Gpu) -> Value {
                Value::Ptr(DevicePtr::device_ptr(&**self, gpu.stream()).0)
            }
        }
    )*};
}
buffer_arg!(CudaSlice<T>, CudaView<'_, T>, CudaViewMut<'_, T>);

macro_rules! scalar_arg {
    ($($ty:ty => $variant:ident),*) => {$(
        impl KernelArg for &$ty {
            fn value(&self, _: &Gpu) -> Value {
                Value::$variant(**self)
            }
        }
    )*};
}
scalar_arg!(f32 => F32, i32 => I32);

/// A null device pointer argument (an optional input the kernel does not read).
pub(crate) struct Null;

impl KernelArg for &Null {
    fn value(&self, _: &Gpu) -> Value {
        Value::Ptr(0)
    }
}

impl<'g> Args<'g> {
    pub(crate) fn new(gpu: &'g Gpu) -> Self {
        Self { gpu, values: Vec::with_capacity(12) }
    }

    /// Appends one argument.
    pub(crate) fn arg(&mut self, a: impl KernelArg) -> &mut Self {
        self.values.push(a.value(self.gpu));
        self
    }
}

/// Whether launches may use programmatic dependent launch: Hopper (sm_90) or later, and not
/// turned off with `MANGROVE_NO_PDL`.
pub(crate) fn pdl_allowed(cc_major: u32) -> bool {
    cc_major >= 9 && std::env::var_os("MANGROVE_NO_PDL").is_none_or(|v| v.is_empty() || v == "0")
}

impl LoadedKernel {
    /// Queues the kernel on the GPU's stream with `cfg` and `args`.
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list in number, order and type, and every
    /// buffer must be large enough for what the kernel reads and writes under `cfg`.
    pub(crate) unsafe fn launch(&self, cfg: LaunchConfig, args: &mut Args) -> Result<(), GpuError> {
        let gpu = args.gpu;
        let mut slots: Vec<*mut c_void> = args
            .values
            .iter_mut()
            .map(|v| match v {
                Value::Ptr(p) => p as *mut u64 as *mut c_void,
                Value::F32(f) => f as *mut f32 as *mut c_void,
                Value::I32(i) => i as *mut i32 as *mut c_void,
            })
            .collect();
        // SAFETY: a plain C struct (id + union of plain values) for which all-zero is valid.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let pdl = self.launch.pdl && gpu.pdl;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: gpu.stream().cu_stream(),
            attrs: if pdl { &mut attr } else { std::ptr::null_mut() },
            numAttrs: u32::from(pdl),
        };
        gpu.bind()?;
        // SAFETY: the caller vouches for the argument list; `slots` points into `args.values`,
        // which outlives the call; the function belongs to this GPU's context.
        unsafe { sys::cuLaunchKernelEx(&config, self.func.cu_function(), slots.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(|source| GpuError::Driver { context: format!("launching {}", self.name), source })
    }
}
