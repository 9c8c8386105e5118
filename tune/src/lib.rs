//! mangrove-tuner: the autotuner (`mangrove-tune`) and the performance lab (`mangrove bench
//! kernels`). Takes a template and problems and gives tuning-DB records: enumerate and prune
//! the space ([`space`]), compile every candidate in parallel, hold each to the correctness
//! gate, time survivors on the GPU ([`strategy`] picks which), keep the winner ([`sweep`] over a
//! [`context`] and [`workload`]s). The families: [`gemv`], [`gateup`], [`decode_ops`], and the
//! M>1 gate [`probe`]. [`lab`] holds the tuned kernels to cuBLAS and the copy-bandwidth limit.

pub mod space;
pub mod strategy;
pub mod sweep;
pub mod workload;
pub mod context;
pub mod gemv;
pub mod probe;
pub mod gateup;
pub mod decode_ops;
pub mod command;
pub mod lab;
