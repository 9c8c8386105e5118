//! mangrove: a kernel autotuner and JIT compiler service for LLM decode on NVIDIA GPUs.
//!
//! The pipeline, one module per stage:
//! 1. [`template`] — Tera CUDA templates with a declared parameter schema → rendered source.
//! 2. [`key`] — blake3 content address of everything that changes the binary.
//! 3. [`compile`] — NVRTC (through cudarc) → SASS cubin + ptxas resource report.
//! 4. [`cache`] — sled store of compiled kernels, hash-checked on every read.
//! 5. [`gpu`] — load cubins and launch them on a real device (absent GPU is a normal state).
//!
//! [`jit`] runs stages 1–4 for a request; [`reference`] and [`check`] are the CPU reference
//! and the correctness gate every kernel is held to; [`validate`] runs a kernel against them.
//! [`routing`] groups MoE (token, expert) pairs into the row blocks the grouped kernels take.
//! 6. [`engine`] — decode engine: HF BitNet checkpoints on a backend (CPU reference today),
//!    continuous batching and the OpenAI-compatible server (`mangrove serve`).

pub mod arch;
pub mod bundle;
pub mod cache;
pub mod check;
pub mod compile;
#[path = "../engine/mod.rs"]
pub mod engine;
pub mod gpu;
pub mod jit;
pub mod key;
pub mod plan;
pub mod provision;
pub mod reference;
pub mod routing;
pub mod service;
pub mod template;
pub mod tune;
pub mod tuning_db;
pub mod validate;
