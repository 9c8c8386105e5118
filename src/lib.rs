//! mangrove: a kernel autotuner, JIT compiler service and ternary-LLM decode engine for NVIDIA
//! GPUs. This package holds the two command-line tools (`mangrove`, `mangrove-tune`); the work
//! lives in the workspace's layers, re-exported here under one name for the tools, the
//! integration tests and the benches:
//!
//! - [`mangrove_core`] — templates → key → compile → cache → GPU, the CPU references, the
//!   correctness gate and the per-GPU tuning DB (re-exported at the top level);
//! - [`mangrove_deploy`] — the kernel plan of a model, blessed bundles, provisioning, `jitd`;
//! - [`mangrove_tuner`] — the autotuner ([`tune`]) and the performance lab ([`lab`]);
//! - [`mangrove_engine`] — the decode engine and its OpenAI-compatible server ([`engine`]);
//! - [`mangrove_bench`] — measurements from outside the engine: the HTTP load generator and
//!   result comparison ([`bench`]).

pub use mangrove_core::*;
pub use mangrove_deploy::{bless, bundle, confine, http, plan, provision, service, signing};
pub use mangrove_bench as bench;
pub use mangrove_engine as engine;
pub use mangrove_tuner as tune;
pub use mangrove_tuner::lab;
