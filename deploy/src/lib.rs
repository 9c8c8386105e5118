//! mangrove-deploy: getting a model's kernels to the place it is served. [`plan`] lists every
//! kernel the CUDA engine launches for a checkpoint, a tuning DB and an arch; [`bundle`] is the
//! blessed-bundle format offline deploys load, and [`bless`] writes one from a plan or a cache;
//! [`provision`] obtains the plan's kernels at server start (JIT, bundle or service) with a typed
//! report and counted fallbacks; [`service`] is `mangrove jitd`, one process sharing its cache
//! over HTTP, and its client; [`http`] holds what every mangrove server shares (the error type,
//! the shutdown signal, limits and guards); [`signing`] signs and checks bundles (ed25519) and
//! [`confine`] reads the files a bundle's manifest names without leaving the bundle.

pub mod bless;
pub mod bundle;
pub mod confine;
pub mod http;
pub mod plan;
pub mod provision;
pub mod service;
pub mod signing;
