//! cuBLAS bf16 GEMM: the vendor baseline the performance lab (`mangrove bench kernels`) holds
//! mangrove's kernels to. libcublas is loaded at run time; a machine without it gets
//! [`GpuError::NoBlas`], never a panic: the library is probed before cudarc touches it (cudarc
//! panics on a missing library, as it does for libcuda).

use std::ffi::c_int;

use cudarc::cublas::{result, sys, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::{DeviceBuffer, Gpu, GpuError};

/// One GEMM of a grouped linear: rows `row .. row + rows` of x and y against matrix `matrix`
/// of the stacked weights (for MoE: the token rows routed to one expert).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenseGroup {
    pub matrix: usize,
    pub row: usize,
    pub rows: usize,
}

/// A cuBLAS handle bound to the [`Gpu`]'s stream (so it is timed by the same events).
pub struct Blas {
    inner: CudaBlas,
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
    version: i32,
}

impl Blas {
    /// True when libcublas (and what it links, libcublasLt) can be loaded; never panics.
    pub fn present() -> bool {
        // SAFETY: only tries dlopen on cuBLAS's library names; no cuBLAS call is made.
        unsafe { sys::is_culib_present() }
    }

    /// A handle on `gpu`'s stream, or [`GpuError::NoBlas`] saying why there is none.
    pub fn open(gpu: &Gpu) -> Result<Self, GpuError> {
        if !Self::present() {
            return Err(GpuError::NoBlas(
                "libcublas could not be loaded (is its folder on LD_LIBRARY_PATH?)".into(),
            ));
        }
        let inner = CudaBlas::new(gpu.stream().clone()).map_err(|e| GpuError::NoBlas(format!("cublasCreate: {e:?}")))?;
        let mut version: c_int = 0;
        // SAFETY: the handle was just created and is live; `version` is a valid out-parameter.
        let status = unsafe { sys::cublasGetVersion_v2(*inner.handle(), &mut version) };
        if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            version = 0;
        }
        Ok(Self { inner, stream: gpu.stream().clone(), version })
    }

    /// cuBLAS's version number (e.g. 130100 for 13.1.0), 0 where it reports none.
    pub fn version(&self) -> i32 {
        self.version
    }

    /// For each group g: `y[g.row .. g.row + g.rows, :] = x[same rows, :] · W_g.matrixᵀ`, where
    /// `w` stacks row-major bf16 matrices [count, n, k] (torch's Linear layout) and x / y are
    /// row-major [rows, k] / [rows, n]; bf16 in and out, f32 accumulation (cublasGemmEx).
    /// One GEMM is queued on the stream per group.
    pub fn grouped_linear(
        &self,
        w: &DeviceBuffer<half::bf16>,
        x: &DeviceBuffer<half::bf16>,
        y: &mut DeviceBuffer<half::bf16>,
        (n, k): (usize, usize),
        groups: &[DenseGroup],
    ) -> Result<(), GpuError> {
        let shape_err = |what: String| GpuError::Shape { kernel: "cublas_gemm".into(), what };
        let int = |v: usize, what: &str| c_int::try_from(v).map_err(|_| shape_err(format!("{what} = {v} exceeds a C int")));
        let (ni, ki) = (int(n, "n")?, int(k, "k")?);
        for g in groups.iter().filter(|g| g.rows > 0) {
            let w_end = (g.matrix + 1) * n * k;
            let (x_end, y_end) = ((g.row + g.rows) * k, (g.row + g.rows) * n);
            if w_end > w.len() || x_end > x.len() || y_end > y.len() {
                return Err(shape_err(format!(
                    "group {g:?} of n={n} k={k} needs w {w_end}, x {x_end}, y {y_end} elements; buffers hold {}, {}, {}",
                    w.len(),
                    x.len(),
                    y.len()
                )));
            }
            // Row-major Y[rows, n] = X[rows, k] · Wᵀ is, column-major, Yᵀ (n × rows) = op(W) · Xᵀ
            // with W seen as a k × n column-major matrix (ld k) transposed: the "TN" GEMM.
            let cfg = GemmConfig {
                transa: sys::cublasOperation_t::CUBLAS_OP_T,
                transb: sys::cublasOperation_t::CUBLAS_OP_N,
                m: ni,
                n: int(g.rows, "rows")?,
                k: ki,
                alpha: half::bf16::ONE,
                lda: ki,
                ldb: ki,
                beta: half::bf16::ZERO,
                ldc: ni,
            };
            let wv = w.slice(g.matrix * n * k..w_end);
            let xv = x.slice(g.row * k..x_end);
            let mut yv = y.slice_mut(g.row * n..y_end);
            // SAFETY: the views cover exactly the [n, k], [rows, k] and [rows, n] elements the
            // TN GEMM above reads and writes (lda = ldb = k, ldc = n, no padding), each checked
            // against its buffer's length; all three live on the handle's stream.
            unsafe { self.inner.gemm(cfg, &wv, &xv, &mut yv) }
                .map_err(|e| GpuError::Cuda { context: format!("cuBLAS GemmEx for group {g:?}"), reason: format!("{e:?}") })?;
        }
        Ok(())
    }

    /// `y[rows, n] = x[rows, k] · Wᵀ` with bf16 `w` [n, k] and `x` (bits, row-major), f32 `y`,
    /// f32 accumulation (cublasGemmEx, the TN GEMM of [`Blas::grouped_linear`]): the LM head of
    /// a decode batch, whose logits stay f32.
    pub fn linear_f32_out(
        &self,
        w: &DeviceBuffer<u16>,
        x: &DeviceBuffer<u16>,
        y: &mut DeviceBuffer<f32>,
        (n, k): (usize, usize),
        rows: usize,
    ) -> Result<(), GpuError> {
        let shape_err = |what: String| GpuError::Shape { kernel: "cublas_gemm_f32".into(), what };
        let int = |v: usize, what: &str| c_int::try_from(v).map_err(|_| shape_err(format!("{what} = {v} exceeds a C int")));
        let (ni, ki, ri) = (int(n, "n")?, int(k, "k")?, int(rows, "rows")?);
        if n * k > w.len() || rows * k > x.len() || rows * n > y.len() {
            return Err(shape_err(format!(
                "rows={rows} n={n} k={k} needs w {}, x {}, y {} elements; buffers hold {}, {}, {}",
                n * k,
                rows * k,
                rows * n,
                w.len(),
                x.len(),
                y.len()
            )));
        }
        if rows == 0 {
            return Ok(());
        }
        let stream = &self.stream;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (wp, _w) = w.device_ptr(stream);
        let (xp, _x) = x.device_ptr(stream);
        let (yp, _y) = y.device_ptr_mut(stream);
        // SAFETY: the pointers cover the [n, k], [rows, k] and [rows, n] elements of the TN GEMM
        // (lda = ldb = k, ldc = n; checked above) on the handle's stream; alpha and beta are f32,
        // as CUBLAS_COMPUTE_32F requires, and outlive the call (cuBLAS reads them at enqueue).
        unsafe {
            result::gemm_ex(
                *self.inner.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                ni,
                ri,
                ki,
                (&alpha) as *const f32 as *const _,
                wp as *const _,
                sys::cudaDataType_t::CUDA_R_16BF,
                ki,
                xp as *const _,
                sys::cudaDataType_t::CUDA_R_16BF,
                ki,
                (&beta) as *const f32 as *const _,
                yp as *mut _,
                sys::cudaDataType_t::CUDA_R_32F,
                ni,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| GpuError::Cuda { context: format!("cuBLAS GemmEx (bf16 -> f32) rows={rows} n={n} k={k}"), reason: format!("{e:?}") })
    }
}
