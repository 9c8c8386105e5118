//! Starting the engine as `mangrove serve` and `mangrove bench decode` do: [`open`] loads a
//! checkpoint on the CPU reference or on the CUDA backend with every kernel of its plan
//! provisioned first (`mangrove_deploy::provision::prepare`); [`serve`] runs the HTTP server
//! until SIGINT/SIGTERM and returns the serving counters.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mangrove_core::gpu::{Gpu, GpuError};
use mangrove_core::template::Catalog;
use mangrove_deploy::http::shutdown_signal;
use mangrove_deploy::provision::{prepare, KernelOptions, KernelReport, ProvisionError};

use crate::batcher::BatcherConfig;
use crate::metrics::Metrics;
use crate::server::{AppState, ServeOptions};
use crate::{Engine, EngineError};

/// Errors of starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("loading {}", .path.display())]
    Engine { path: PathBuf, source: EngineError },
    #[error("cuda backend")]
    NoGpu(#[source] GpuError),
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    #[error("binding {addr}")]
    Bind { addr: String, source: std::io::Error },
    #[error("serving")]
    Io(#[from] std::io::Error),
    #[error("reading the tuning DB")]
    Db(#[from] mangrove_core::tuning_db::DbError),
}

/// Where an engine's kernels come from and which catalog and cache they use.
pub struct KernelSetup<'a> {
    pub catalog: &'a Catalog,
    pub cache_dir: &'a Path,
    pub tuning_db: Option<&'a Path>,
    pub options: &'a KernelOptions,
}

/// Loads `model` on `backend` (`cpu`, `cpu-ref` or `cuda`). The CUDA backend provisions every
/// kernel of the plan first; `cpu` with a tuning DB holding `mangrove-tune cpu` records runs
/// with those tunables; otherwise a CPU backend provisions only when a tuning DB, bundle or
/// service is named (the report then shows in `/health`). Returns the engine and the provisioning report, if any.
pub fn open(model: &Path, backend: &str, name: Option<String>, k: &KernelSetup) -> Result<(Engine, Option<KernelReport>), StartError> {
    let loading = |source| StartError::Engine { path: model.to_path_buf(), source };
    let o = k.options;
    if backend == "cuda" {
        // Say "no GPU" before preparing any kernel.
        Gpu::open(0).map_err(StartError::NoGpu)?;
        let p = prepare(k.catalog, model, k.tuning_db, o, k.cache_dir)?;
        let engine = Engine::open_cuda(model, name, &p.entries, o.max_batch as usize).map_err(loading)?;
        return Ok((engine, Some(p.report)));
    }
    // The SIMD CPU backend takes its tunables from a DB that holds `mangrove-tune cpu` records
    // (tuning_db/<cpu>/); no GPU kernel is provisioned for it.
    if let (true, Some(dir)) = (backend == "cpu", k.tuning_db) {
        let db = mangrove_core::tuning_db::TuningDb::load(dir)?;
        if db.templates.contains_key(crate::cpu_simd::sweep::TEMPLATE) {
            return Ok((Engine::open_cpu_tuned(model, name, &db).map_err(loading)?, None));
        }
    }
    let report = if k.tuning_db.is_some() || o.blessed.is_some() || o.jit_url.is_some() {
        Some(prepare(k.catalog, model, k.tuning_db, o, k.cache_dir)?.report)
    } else {
        None
    };
    Ok((Engine::open(model, backend, name).map_err(loading)?, report))
}

/// Serves `engine` on `host:port` with `batcher`'s admission limits and `options`' connection
/// limits and API key until SIGINT or SIGTERM; returns the serving counters as JSON.
pub fn serve(
    engine: Engine,
    (host, port): (&str, u16),
    tuning_db: Option<PathBuf>,
    batcher: BatcherConfig,
    options: &ServeOptions,
    kernels: Option<KernelReport>,
) -> Result<serde_json::Value, StartError> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let metrics = Arc::new(Metrics::default());
        let shutdown = shutdown_signal()?;
        let addr = format!("{host}:{port}");
        let listener = tokio::net::TcpListener::bind((host, port)).await.map_err(|source| StartError::Bind { addr, source })?;
        let backend = engine.backend.name();
        eprintln!("mangrove: serving {} on http://{} (backend {backend})", engine.name, listener.local_addr()?);
        if let Some(report) = &kernels {
            for f in &report.fallbacks {
                metrics.fallback(f.family, f.reason);
            }
        }
        let state = AppState::with_config(engine, metrics.clone(), tuning_db, batcher);
        if let Some(report) = kernels {
            state.set_kernels(report);
        }
        crate::server::serve_with(listener, state, options, shutdown).await?;
        Ok(metrics.json())
    })
}
