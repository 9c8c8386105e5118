//! The thread pool and how a linear's rows are split over it. One fixed rayon pool, sized to
//! the cores (or the tuned thread count), runs every step; a linear's byte rows (row quads) are
//! cut into tasks of `rows_per_task`, taken by whichever worker is free, so every core streams
//! weights until the matrix is done. Inside a task the rows go in sub-blocks small enough for
//! L1 and the tokens in chunks, so each weight byte comes from memory once per step whatever
//! the batch. The epilogue turns each exact integer sum into f32: `(Σ code·x − Σx) / s ·
//! row_factor`. Takes [`Kernels`], [`Split`] and a matrix; gives f32 rows.

use rayon::prelude::*;

use super::kernels::{Dense, Kernels};
use super::repack::PackedTernary;

/// Byte rows per kernel call inside a task (8 rows of 2560 bytes stay in L1).
const SUB_ROWS: usize = 8;
/// Token rows per kernel call.
const TOKEN_CHUNK: usize = 8;
/// LM-head rows per kernel call inside a task.
const DENSE_SUB: usize = 16;

/// How work is cut: the CPU tunables of [`super::tune`] that the pool uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    /// Byte rows (4 output rows each) per task of a ternary linear.
    pub rows_per_task: usize,
    /// Rows per task of the LM head.
    pub lm_rows_per_task: usize,
}

/// The fixed worker pool.
pub struct Pool {
    pool: rayon::ThreadPool,
    threads: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("threads", &self.threads).finish()
    }
}

impl Pool {
    /// A pool of `threads` workers (0: one per core).
    pub fn new(threads: usize) -> Result<Pool, rayon::ThreadPoolBuildError> {
        let threads = if threads == 0 { cores() } else { threads };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).thread_name(|i| format!("mangrove-cpu-{i}")).build()?;
        Ok(Pool { pool, threads })
    }

    /// Worker count.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` inside the pool (its parallel iterators use these workers).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }
}

/// The cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A pointer to the output that tasks write at disjoint indices.
#[derive(Clone, Copy)]
struct Out(*mut f32);

impl Out {
    /// The pointer (a method, so closures capture the whole `Out`, which is `Sync`).
    fn ptr(&self) -> *mut f32 {
        self.0
    }
}
// SAFETY: each task writes only the output rows of its own byte rows (disjoint), and the
// buffer outlives the parallel loop that uses it.
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

/// int8 token rows of one linear's input: `q` is `[m][kp]`, `inv_s` each row's 1/s and `sum`
/// its Σq.
#[derive(Debug, Clone, Copy)]
pub struct QuantRows<'a> {
    pub q: &'a [i8],
    pub inv_s: &'a [f32],
    pub sum: &'a [i32],
}

/// `y[t][r] = (W x_t)[r] / s_t · row_factor[r]` for the `m` rows of `x`; `y` is `[m][w.n]`.
/// Must run inside the pool ([`Pool::install`]).
pub fn ternary_linear(k: &Kernels, split: &Split, w: &PackedTernary, x: QuantRows, m: usize, y: &mut [f32]) {
    let (n, kp) = (w.n, w.kp);
    assert!(x.q.len() >= m * kp && x.inv_s.len() >= m && x.sum.len() >= m && y.len() >= m * n);
    let rpt = split.rows_per_task.max(1);
    let out = Out(y.as_mut_ptr());
    let quads = n / 4;
    (0..quads.div_ceil(rpt)).into_par_iter().for_each(|task| {
        let mut acc = [0i32; SUB_ROWS * TOKEN_CHUNK * 4];
        let end = ((task + 1) * rpt).min(quads);
        let mut r0 = task * rpt;
        while r0 < end {
            let rows = (end - r0).min(SUB_ROWS);
            let wb = &w.data[r0 * kp..][..rows * kp];
            let mut t0 = 0;
            while t0 < m {
                let mt = (m - t0).min(TOKEN_CHUNK);
                k.ternary_block(wb, kp, rows, &x.q[t0 * kp..][..mt * kp], mt, &mut acc);
                for r in 0..rows {
                    for t in 0..mt {
                        let (inv_s, sum) = (x.inv_s[t0 + t], x.sum[t0 + t]);
                        for q in 0..4 {
                            let row = 4 * (r0 + r) + q;
                            let v = (acc[(r * mt + t) * 4 + q] - sum) as f32 * inv_s * w.row_factor[row];
                            // SAFETY: row < n and t0 + t < m, so the index is inside `y`; only this
                            // task writes rows 4·r0.. of its own byte rows.
                            unsafe { *out.ptr().add((t0 + t) * n + row) = v };
                        }
                    }
                }
                t0 += mt;
            }
            r0 += rows;
        }
    });
}

/// `y[t][r] = Σ_c w[r][c] · x[t][c]` over all `rows` rows of a dense matrix (`cols` wide) for
/// the `m` f32 rows of `x`; `y` is `[m][rows]`. Must run inside the pool.
#[allow(clippy::too_many_arguments)]
pub fn dense_linear(k: &Kernels, split: &Split, w: &Dense, rows: usize, cols: usize, x: &[f32], m: usize, y: &mut [f32]) {
    assert!(x.len() >= m * cols && y.len() >= m * rows);
    let rpt = split.lm_rows_per_task.max(1);
    let out = Out(y.as_mut_ptr());
    (0..rows.div_ceil(rpt)).into_par_iter().for_each(|task| {
        let mut buf = [0f32; DENSE_SUB * TOKEN_CHUNK];
        let end = ((task + 1) * rpt).min(rows);
        let mut r0 = task * rpt;
        while r0 < end {
            let nr = (end - r0).min(DENSE_SUB);
            let mut t0 = 0;
            while t0 < m {
                let mt = (m - t0).min(TOKEN_CHUNK);
                k.dense_block(w, cols, r0, nr, &x[t0 * cols..][..mt * cols], mt, &mut buf);
                for r in 0..nr {
                    for t in 0..mt {
                        // SAFETY: r0 + r < rows and t0 + t < m: inside `y`; rows are this task's own.
                        unsafe { *out.ptr().add((t0 + t) * rows + r0 + r) = buf[r * mt + t] };
                    }
                }
                t0 += mt;
            }
            r0 += nr;
        }
    });
}

/// This machine's streaming-read bandwidth in GB/s: every worker of `pool` sums its share of a
/// `bytes`-long buffer (touched first, so the pages exist), best of three passes — the memory
/// bound a decode step that reads every weight once cannot beat.
pub fn read_bandwidth_gbs(pool: &Pool, bytes: usize) -> f64 {
    let words = (bytes / 8).max(1 << 16);
    let buf: Vec<u64> = pool.install(|| (0..words as u64).into_par_iter().map(|i| i.wrapping_mul(0x9E37_79B9)).collect());
    let chunk = words.div_ceil(pool.threads() * 4);
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let s: u64 = pool.install(|| buf.par_chunks(chunk).map(|c| c.iter().fold(0u64, |a, &b| a ^ b.rotate_left(1))).reduce(|| 0, |a, b| a ^ b));
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (words * 8) as f64 / best / 1e9
}
