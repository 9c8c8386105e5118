//! The SIMD CPU backend (`--backend cpu`), one concept per module, in pipeline order:
//! [`isa`] (which instruction set, detected at run time) → [`repack`] (the HF ternary packing
//! turned once at load into row quads) → [`kernels`] (ternary × int8 and the bf16 LM head, per
//! instruction set: scalar, AVX2, AVX-VNNI, AVX-512 VNNI, NEON) → [`ops`] (f32 norms +
//! BitNet's per-token int8 quantization, RoPE, attention) → [`pool`] (the fixed thread pool and
//! the row split of every linear) → [`tune`] (the tunables) → [`sweep`] (`mangrove-tune cpu`:
//! the tunables swept on this machine into the tuning DB) → [`backend`] ([`SimdCpuBackend`]).
//! The f64 reference backend ([`crate::cpu`], `--backend cpu-ref`) stays the oracle the tests
//! hold this one to.

pub mod backend;
pub mod isa;
pub mod kernels;
pub mod ops;
pub mod pool;
pub mod repack;
pub mod sweep;
pub mod tune;

pub use backend::{SimdCpuBackend, SimdError};
pub use isa::Isa;
pub use tune::CpuTunables;
