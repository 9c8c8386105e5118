//! The HTTP server (tokio + axum): an OpenAI-compatible API over the engine's batcher.
//! [`app`] builds the router from an [`AppState`] (testable without a socket); the areas are
//! [`completions`] (`/v1/completions`, `/v1/chat/completions`, SSE streaming; bodies checked by
//! [`validation`], shaped by [`response`]) and [`ops`] (`/v1/models`, `/v1/models/{id}`,
//! `/tokenize`, `/detokenize`, `/health`, `/metrics`); every failure is a
//! `mangrove_deploy::http::ApiError`.
//! [`app_with`] adds the guards of [`ServeOptions`]: JSON bodies only, and with an API key a
//! Bearer check on every route but `/health`; [`serve_with`] applies its [`HttpLimits`].

pub mod completions;
pub mod ops;
pub mod response;
pub mod tokenize;
pub mod validation;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::Router;

use crate::batcher::{self, BatcherConfig, BatcherHandle};
use crate::metrics::Metrics;
use crate::Engine;
use mangrove_deploy::http::{guard, ApiError, HttpLimits};
use mangrove_deploy::provision::KernelReport;

/// How the server meets its clients: connection and time limits, and an optional API key.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Timeouts, connection cap and body limit.
    pub limits: HttpLimits,
    /// When set, every route but `/health` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
}

/// Shared state of all handlers.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Arc<Engine>,
    batcher: BatcherHandle,
    metrics: Arc<Metrics>,
    tuning_db: Option<PathBuf>,
    /// The kernel provisioning report of this start (source, counts, fallbacks), for /health.
    kernels: std::sync::OnceLock<KernelReport>,
    /// Response ids are this launch's random prefix and a counter, so they never repeat across restarts.
    id_base: u64,
    next_id: AtomicU64,
}

impl AppState {
    /// Starts the engine task for `engine` on the current runtime, default batcher settings.
    pub fn new(engine: Engine, metrics: Arc<Metrics>, tuning_db: Option<PathBuf>) -> Self {
        Self::with_config(engine, metrics, tuning_db, BatcherConfig::default())
    }

    /// Starts the engine task for `engine` on the current runtime.
    pub fn with_config(engine: Engine, metrics: Arc<Metrics>, tuning_db: Option<PathBuf>, cfg: BatcherConfig) -> Self {
        let engine = Arc::new(engine);
        let (batcher, _task) = batcher::spawn_with(engine.clone(), metrics.clone(), cfg);
        AppState {
            inner: Arc::new(Inner { engine, batcher, metrics, tuning_db, kernels: Default::default(), id_base: rand::random(), next_id: AtomicU64::new(0) }),
        }
    }

    /// Records how this start obtained its kernels (shown in /health); set once.
    pub fn set_kernels(&self, report: KernelReport) {
        let _ = self.inner.kernels.set(report);
    }

    /// The served engine.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The serving counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    fn next_id(&self, prefix: &str) -> String {
        format!("{prefix}-{:016x}{:08x}", self.inner.id_base, self.inner.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

/// The whole API, open to anyone (JSON bodies only).
pub fn app(state: AppState) -> Router {
    app_with(state, None)
}

/// The whole API; with `api_key`, every route but `/health` needs `Authorization: Bearer <key>`.
pub fn app_with(state: AppState, api_key: Option<&str>) -> Router {
    let mut guarded = Router::new()
        .merge(completions::routes().route_layer(guard::json_body()))
        .merge(tokenize::routes().route_layer(guard::json_body()))
        .merge(ops::routes());
    if let Some(key) = api_key {
        guarded = guarded.route_layer(guard::api_key(key));
    }
    Router::new()
        .merge(guarded)
        .merge(ops::health_routes())
        .layer(axum::middleware::from_fn(access_log))
        .fallback(|uri: axum::http::Uri| async move { ApiError::not_found(uri.path()) })
        .method_not_allowed_fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            ApiError::new(axum::http::StatusCode::METHOD_NOT_ALLOWED, format!("Method {method} is not allowed on {}", uri.path()))
        })
        .with_state(state)
}

/// The header carrying a completion's response id (logged by [`access_log`]).
pub const REQUEST_ID: &str = "x-request-id";

/// One access-log line per request: method, route, status, latency and the response id; a
/// completion logs its token counts when it ends (`mangrove::access` target).
async fn access_log(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let t = std::time::Instant::now();
    let r = next.run(req).await;
    let id = r.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
    tracing::info!(target: "mangrove::access", %method, path, status = r.status().as_u16(), latency_ms = format!("{:.1}", t.elapsed().as_secs_f64() * 1e3), id, "request");
    r
}

/// Serves `state` on `listener` with the default limits and no API key until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, &ServeOptions::default(), shutdown).await
}

/// Serves `state` on `listener` under `options` until `shutdown` resolves.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: AppState,
    options: &ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    mangrove_deploy::http::serve(listener, app_with(state, options.api_key.as_deref()), options.limits, shutdown).await
}
