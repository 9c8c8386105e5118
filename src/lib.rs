//! mangrove: a kernel autotuner and JIT compiler service for LLM decode on NVIDIA GPUs.
//!
//! The pipeline, one module per stage (the folders read in this order):
//! 1. [`template`] — Tera CUDA templates with a declared parameter schema → rendered source.
//! 2. [`key`] — blake3 content address of everything that changes the binary.
//! 3. [`compile`] — NVRTC (through cudarc) → SASS cubin + ptxas resource report.
//! 4. [`cache`] — sled store of compiled kernels, hash-checked on every read.
//! 5. [`gpu`] — load cubins, launch and time them on a real device (no GPU is a normal state).
//! 6. [`tune`] — search spaces, strategies, workloads and sweeps (`mangrove-tune`).
//! 7. [`tuning_db`] — per-GPU records of the winners, lookup by nearest M bucket, merge.
//! 8. [`engine`] — decode engine: HF BitNet checkpoints on a backend (CPU reference today),
//!    continuous batching and the OpenAI-compatible server (`mangrove serve`).
//!
//! Around them: [`jit`] runs stages 1–4 for a request; [`reference`] and [`check`] are the CPU
//! reference and the correctness gate every kernel is held to; [`validate`] runs a kernel against
//! them; [`routing`] groups MoE (token, expert) pairs for the grouped kernels; [`plan`] lists the
//! kernels a model needs; [`bundle`] freezes them for offline deploys; [`provision`] obtains them
//! at server start; [`service`] shares one cache between processes (`mangrove jitd`); [`lab`]
//! holds the tuned kernels to cuBLAS and the copy-bandwidth limit (`mangrove bench kernels`).

pub mod arch;
pub mod bundle;
pub mod cache;
pub mod check;
pub mod compile;
#[path = "../engine/mod.rs"]
pub mod engine;
pub mod gpu;
pub mod jit;
pub mod lab;
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
