//! mangrove-core: the kernel pipeline every other mangrove crate stands on.
//!
//! The stages, one module each (the folders read in this order):
//! 1. [`template`] — Tera CUDA templates with a declared parameter schema → rendered source.
//! 2. [`key`] — blake3 content address of everything that changes the binary.
//! 3. [`compile`] — NVRTC (through cudarc) → SASS cubin + ptxas resource report.
//! 4. [`cache`] — sled store of compiled kernels, hash-checked on every read.
//! 5. [`gpu`] — load cubins, launch and time them on a real device (no GPU is a normal state).
//! 6. [`reference`], [`check`], [`validate`] — the f64 CPU references, the correctness gate and
//!    the runs of a kernel against them that every kernel must pass.
//! 7. [`tuning_db`] — per-GPU records of the tuner's winners, lookup by nearest M bucket, merge.
//!
//! Around them: [`arch`] names the targets; [`jit`] runs stages 1–4 for a request;
//! [`routing`] groups MoE (token, expert) pairs for the grouped kernels; [`model_config`] reads a
//! checkpoint's `config.json`; [`step`] names the decode step's kernel families and limits;
//! [`warm`] compiles and checks the whole catalog; [`progress`] is the tools' progress bar.

pub mod arch;
pub mod cache;
pub mod check;
pub mod compile;
pub mod gpu;
pub mod jit;
pub mod key;
pub mod model_config;
pub mod progress;
pub mod reference;
pub mod routing;
pub mod stats;
pub mod step;
pub mod template;
pub mod tuning_db;
pub mod validate;
pub mod warm;

/// An error and its causes in one line (`outer: cause: root cause`), for the places an error
/// becomes text: an HTTP body, a log line, a per-sequence failure.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
