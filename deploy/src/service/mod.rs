//! The JIT compile service (`mangrove jitd`): the one process that owns the sled cache serves
//! kernels over HTTP to every engine process on the node. Concurrent requests for the same key
//! compile once (single flight). NVRTC and sled run on the blocking pool, never on the runtime.
//!
//! Routes: `POST /v1/kernels` (body: a JSON [`KernelRequest`]) and `GET /v1/kernels/{key}`
//! answer a bincode [`CacheEntry`] (`application/octet-stream`; headers `x-mangrove-key`,
//! `x-mangrove-outcome`); `GET /v1/tuning/{template}?m=..&N=..&K=..` answers the DB's choice;
//! `GET /health` and `GET /metrics`.

pub mod client;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::future::{BoxFuture, FutureExt, Shared};

use mangrove_core::cache::{CacheEntry, Lookup};
use mangrove_core::jit::{Jit, JitError, KernelRequest, Outcome};
use mangrove_core::key::KernelKey;
use mangrove_core::template::Params;
use mangrove_core::tuning_db::TuningDb;

use crate::http::{guard, ApiError, HttpLimits};

/// One in-flight compile that every request for the same key awaits. It runs as a task of its
/// own, so a requester that goes away does not cancel it (and the next one does not compile again).
type Flight = Shared<BoxFuture<'static, Result<Arc<Served>, String>>>;

/// Shared state of the service.
pub struct ServiceState {
    pub jit: Jit,
    pub db: TuningDb,
    inflight: Mutex<HashMap<KernelKey, Flight>>,
    /// Lookups and compiles running at once (NVRTC's memory grows with each concurrent compile).
    slots: tokio::sync::Semaphore,
    /// After a compile, least-recently-used entries are evicted down to this many bytes.
    max_cache_bytes: Option<u64>,
    /// Kernels compiled (misses) since start.
    pub compiles: AtomicU64,
    pub requests: AtomicU64,
}

/// One served kernel, encoded once for every waiter.
pub struct Served {
    pub key: KernelKey,
    pub outcome: Outcome,
    pub body: Vec<u8>,
}

impl ServiceState {
    /// The service over `jit` and `db`, its cache unbounded.
    pub fn new(jit: Jit, db: TuningDb) -> Arc<Self> {
        Self::with_cache_cap(jit, db, None)
    }

    /// The service over `jit` and `db`; after each compile the cache is collected down to
    /// `max_cache_bytes` (least recently used first).
    pub fn with_cache_cap(jit: Jit, db: TuningDb, max_cache_bytes: Option<u64>) -> Arc<Self> {
        let parallel = std::thread::available_parallelism().map_or(4, usize::from);
        Arc::new(Self {
            jit,
            db,
            inflight: Mutex::new(HashMap::new()),
            slots: tokio::sync::Semaphore::new(parallel),
            max_cache_bytes,
            compiles: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        })
    }
}

impl From<JitError> for ApiError {
    fn from(e: JitError) -> Self {
        match e {
            JitError::Template(t) => ApiError::new(StatusCode::BAD_REQUEST, mangrove_core::error_chain(&t)),
            other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, mangrove_core::error_chain(&other)),
        }
    }
}

/// Encodes an entry for the wire (the client re-checks the cubin hash after decoding).
pub fn encode_entry(e: &CacheEntry) -> Vec<u8> {
    bincode::serde::encode_to_vec(e, bincode::config::standard()).expect("cache entries encode")
}

/// Decodes a wire entry.
pub fn decode_entry(bytes: &[u8]) -> Result<CacheEntry, String> {
    bincode::serde::decode_from_slice::<CacheEntry, _>(bytes, bincode::config::standard()).map(|(e, _)| e).map_err(|e| e.to_string())
}

/// The service's routes, open to anyone (JSON bodies only).
pub fn app(state: Arc<ServiceState>) -> Router {
    app_with(state, None)
}

/// The service's routes; with `api_key`, every route but `/health` needs
/// `Authorization: Bearer <key>`.
pub fn app_with(state: Arc<ServiceState>, api_key: Option<&str>) -> Router {
    let mut guarded = Router::new()
        .route("/v1/kernels", post(compile).route_layer(guard::json_body()))
        .route("/v1/kernels/{key}", get(by_key))
        .route("/v1/tuning/{template}", get(tuning))
        .route("/metrics", get(metrics));
    if let Some(key) = api_key {
        guarded = guarded.route_layer(guard::api_key(key));
    }
    Router::new()
        .merge(guarded)
        .route("/health", get(|| async { "ok" }))
        .fallback(|uri: axum::http::Uri| async move { ApiError::not_found(uri.path()) })
        .with_state(state)
}

fn kernel_response(s: &Served) -> Response {
    let outcome = match &s.outcome {
        Outcome::Hit => "hit".to_string(),
        Outcome::Compiled(r) => format!("compiled ({r})"),
    };
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::HeaderName::from_static("x-mangrove-key"), s.key.to_hex()),
            (header::HeaderName::from_static("x-mangrove-outcome"), outcome),
        ],
        s.body.clone(),
    )
        .into_response()
}

async fn compile(State(st): State<Arc<ServiceState>>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    st.requests.fetch_add(1, Ordering::Relaxed);
    let req: KernelRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))?;
    let key = {
        let st = st.clone();
        let r = req.clone();
        tokio::task::spawn_blocking(move || st.jit.key_of(&r).map(|(_, i)| i.key()))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??
    };
    let flight = st
        .inflight
        .lock()
        .expect("inflight lock")
        .entry(key)
        .or_insert_with(|| {
            let st = st.clone();
            let task = tokio::spawn(async move {
                let served = {
                    let _slot = st.slots.acquire().await.expect("the compile semaphore is never closed");
                    let st = st.clone();
                    tokio::task::spawn_blocking(move || {
                        let f = st.jit.get(&req).map_err(|e| mangrove_core::error_chain(&e))?;
                        if matches!(f.outcome, Outcome::Compiled(_)) {
                            st.compiles.fetch_add(1, Ordering::Relaxed);
                            if let Some(cap) = st.max_cache_bytes {
                                match st.jit.cache.gc(cap) {
                                    Ok(r) if r.removed > 0 => eprintln!("jitd: cache over {cap} bytes: {r}"),
                                    Ok(_) => {}
                                    Err(e) => eprintln!("jitd: cache gc failed: {}", mangrove_core::error_chain(&e)),
                                }
                            }
                        }
                        Ok(Arc::new(Served { key: f.key, outcome: f.outcome, body: encode_entry(&f.entry) }))
                    })
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()))
                };
                st.inflight.lock().expect("inflight lock").remove(&key);
                served
            });
            async move { task.await.unwrap_or_else(|e| Err(e.to_string())) }.boxed().shared()
        })
        .clone();
    let served = flight.await;
    match served {
        Ok(s) => Ok(kernel_response(&s)),
        Err(msg) => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, msg)),
    }
}

async fn by_key(State(st): State<Arc<ServiceState>>, Path(key): Path<String>) -> Result<Response, ApiError> {
    st.requests.fetch_add(1, Ordering::Relaxed);
    let key = KernelKey::from_hex(&key).ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, format!("'{key}' is not a 64-digit hex key")))?;
    let st2 = st.clone();
    let found = tokio::task::spawn_blocking(move || st2.jit.cache.get(&key))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, mangrove_core::error_chain(&e)))?;
    match found {
        Lookup::Hit(e) => Ok(kernel_response(&Served { key, outcome: Outcome::Hit, body: encode_entry(&e) })),
        Lookup::Miss(r) => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no kernel {key} in the cache ({r})"))),
    }
}

async fn tuning(
    State(st): State<Arc<ServiceState>>,
    Path(template): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    let mut problem = Params::new();
    let mut m = 1;
    for (k, v) in q {
        let v: i64 = v.parse().map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, format!("{k}={v} is not an integer")))?;
        if k == "m" || k == "M" {
            m = v;
        } else {
            problem.insert(k, v);
        }
    }
    Ok(Json(st.db.lookup(&template, &problem, m)).into_response())
}

async fn metrics(State(st): State<Arc<ServiceState>>) -> String {
    format!(
        "# TYPE mangrove_jitd_requests_total counter\nmangrove_jitd_requests_total {}\n\
         # TYPE mangrove_jitd_compiles_total counter\nmangrove_jitd_compiles_total {}\n",
        st.requests.load(Ordering::Relaxed),
        st.compiles.load(Ordering::Relaxed)
    )
}

/// How `jitd` meets its clients: connection and time limits, and an optional API key.
#[derive(Debug, Clone, Default)]
pub struct ServiceOptions {
    /// Timeouts, connection cap and body limit.
    pub limits: HttpLimits,
    /// When set, every route but `/health` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
}

/// Serves `state` on `listen` under `options` until SIGINT or SIGTERM (`mangrove jitd`).
pub fn run(listen: &str, state: Arc<ServiceState>, cache_dir: &std::path::Path, options: &ServiceOptions) -> std::io::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let shutdown = crate::http::shutdown_signal()?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("binding {listen}: {e}")))?;
        eprintln!("jitd listening on http://{} (cache {})", listener.local_addr()?, cache_dir.display());
        crate::http::serve(listener, app_with(state, options.api_key.as_deref()), options.limits, shutdown).await
    })
}
