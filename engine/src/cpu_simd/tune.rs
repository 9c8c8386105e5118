//! The CPU kernels' tunables ([`CpuTunables`]): instruction set, threads, byte rows per task of
//! a ternary linear, rows per task of the LM head, and the AVX2 kernel's K block. Defaults fit a
//! small x86 box; `mangrove-tune cpu` sweeps them on the machine it runs on.

use super::isa::Isa;
use super::kernels::{Kernels, MAX_KBLOCK};
use super::pool::{cores, Split};

/// Everything the SIMD CPU backend can be tuned by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTunables {
    /// Kernel instruction set.
    pub isa: Isa,
    /// Worker threads (0: one per core).
    pub threads: usize,
    /// Byte rows (four output rows each) per task of a ternary linear.
    pub rows_per_task: usize,
    /// Rows per task of the LM head.
    pub lm_rows_per_task: usize,
    /// Columns the AVX2 kernel sums in 16 bits before widening (multiple of 32, ≤ [`MAX_KBLOCK`]).
    pub kblock: usize,
}

impl CpuTunables {
    /// The defaults on `isa`.
    pub fn defaults(isa: Isa) -> Self {
        CpuTunables { isa, threads: 0, rows_per_task: 16, lm_rows_per_task: 256, kblock: 1024 }
    }

    /// The defaults on the best path of this CPU (or `MANGROVE_CPU_ISA`).
    pub fn detect() -> Result<Self, String> {
        Ok(Self::defaults(Isa::from_env()?))
    }

    /// The checked kernel handle, or why these tunables cannot run here.
    pub fn kernels(&self) -> Result<Kernels, String> {
        if self.rows_per_task == 0 || self.lm_rows_per_task == 0 {
            return Err("rows per task must be positive".into());
        }
        Kernels::new(self.isa, self.kblock).ok_or_else(|| {
            if self.isa.is_supported() {
                format!("K block {} is not a multiple of 32 in 32..={MAX_KBLOCK}", self.kblock)
            } else {
                format!("this CPU or build lacks {}", self.isa)
            }
        })
    }

    /// The work split the pool uses.
    pub fn split(&self) -> Split {
        Split { rows_per_task: self.rows_per_task, lm_rows_per_task: self.lm_rows_per_task }
    }

    /// Threads the pool will have.
    pub fn thread_count(&self) -> usize {
        if self.threads == 0 {
            cores()
        } else {
            self.threads
        }
    }
}
