//! mangrove-bench: measurements taken from outside the engine.
//!
//! - [`serve`] — `bench serve`: a load generator against any OpenAI-compatible server
//!   (workload → streamed requests per concurrency level → percentiles → JSON / CSV / SVG,
//!   TTFT-target search, stress verdict);
//! - [`compare`] — `bench compare`: two saved results of a bench, metric by metric, with the
//!   regressions beyond a threshold;
//! - [`freeze`] — `bench freeze`: a baseline bundle (environment, every bench as its own
//!   process, commands.log, summary), with [`launch`] starting and ending the server it loads;
//! - [`stats`] — the latency percentiles those reports carry.

pub mod compare;
pub mod freeze;
pub mod launch;
pub mod serve;
pub mod stats;
