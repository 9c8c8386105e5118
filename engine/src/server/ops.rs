//! Operational endpoints: `/v1/models`, `/v1/models/{id}`, `/health` (model, backend, tuning DB, load) and
//! `/metrics` (Prometheus text).

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use super::AppState;
use mangrove_deploy::http::ApiError;

/// Routes of this area behind the API key (when there is one).
pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/models", get(models)).route("/v1/models/{id}", get(model)).route("/metrics", get(metrics))
}

/// `/health`, always open (load balancers and probes carry no key).
pub fn health_routes() -> Router<AppState> {
    Router::new().route("/health", get(health))
}

/// The served model as `/v1/models` lists it.
fn model_card(st: &AppState) -> serde_json::Value {
    serde_json::json!({"id": st.engine().name, "object": "model", "created": 0, "owned_by": "mangrove",
        "max_model_len": st.engine().config().max_positions})
}

async fn models(State(st): State<AppState>) -> impl IntoResponse {
    Json(serde_json::json!({"object": "list", "data": [model_card(&st)]}))
}

async fn model(State(st): State<AppState>, Path(id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    match id == st.engine().name {
        true => Ok(Json(model_card(&st))),
        false => Err(ApiError::unknown_model(&id)),
    }
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
