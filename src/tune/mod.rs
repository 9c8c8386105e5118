//! Stage 6 — the autotuner. Takes a template and problems and gives tuning-DB records:
//! enumerate and prune the space ([`space`]), compile every candidate in parallel, hold each
//! to the correctness gate, time survivors on the GPU ([`strategy`] picks which), keep the winner.

pub mod space;
pub mod strategy;
pub mod sweep;
pub mod workload;
pub mod context;
pub mod gemv;
pub mod probe;
pub mod gateup;
pub mod decode_ops;
