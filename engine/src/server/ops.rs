//! Operational endpoints: `/v1/models`, `/health` (model, backend, tuning DB, load) and
//! `/metrics` (Prometheus text).

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use super::AppState;

/// Routes of this area behind the API key (when there is one).
pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/models", get(models)).route("/metrics", get(metrics))
}

/// `/health`, always open (load balancers and probes carry no key).
pub fn health_routes() -> Router<AppState> {
    Router::new().route("/health", get(health))
}

async fn models(State(st): State<AppState>) -> impl IntoResponse {
    Json(serde_json::json!({"object": "list", "data": [
        {"id": st.engine().name, "object": "model", "created": 0, "owned_by": "mangrove"}
    ]}))
}

async fn health(State(st): State<AppState>) -> impl IntoResponse {
    let c = st.engine().config();
    Json(serde_json::json!({
        "status": "ok",
        "model": st.engine().name,
        "backend": st.engine().backend.name(),
        "tuning_db": st.inner.tuning_db.as_ref().map(|p| p.display().to_string()),
        "kernels": st.inner.kernels.get(),
        "max_position_embeddings": c.max_positions,
        "active_sequences": st.metrics().active(),
        "queued_requests": st.inner.batcher.queued(),
        "rejected_requests": st.metrics().rejected_total(),
    }))
}

async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.metrics().prometheus())
}
