//! What every mangrove HTTP server (`mangrove serve`, `mangrove jitd`) shares: the one error
//! type — every failure a handler can meet becomes an OpenAI-style JSON body
//! `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status, internal details
//! staying in the server log — the shutdown signal, [`listen`] (the socket loop with its
//! timeouts and connection cap) and [`guard`] (API key, JSON content type).

pub mod guard;
pub mod listen;

pub use listen::{serve, HttpLimits, LimitsError};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An API error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (the `Retry-After` header), for 429/503.
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// An error of `status` with `message` (`invalid_request_error` for 4xx, else `server_error`).
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        let kind = if status.is_client_error() { "invalid_request_error" } else { "server_error" };
        ApiError { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }

    /// 400 `invalid_request_error` about `param`.
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param, code: None, retry_after: None }
    }

    /// 404 for a model name this server does not serve.
    pub fn unknown_model(name: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model '{name}' does not exist"),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
            retry_after: None,
        }
    }

    /// 404 for an unknown route.
    pub fn not_found(path: &str) -> Self {
        ApiError { status: StatusCode::NOT_FOUND, message: format!("Unknown route {path}"), kind: "invalid_request_error", param: None, code: Some("not_found"), retry_after: None }
    }

    /// 500 with a generic message; `detail` goes to the log only.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        eprintln!("mangrove server: internal error: {detail}");
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: "The server had an error while processing the request".into(), kind: "server_error", param: None, code: None, retry_after: None }
    }

    /// 503 when the engine task is gone.
    pub fn unavailable() -> Self {
        ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message: "The engine is shutting down".into(), kind: "server_error", param: None, code: None, retry_after: None }
    }

    /// 429 when the server is at capacity: retry after `retry_after` seconds.
    pub fn overloaded(message: impl Into<String>, retry_after: u32) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            kind: "server_overloaded",
            param: None,
            code: Some("queue_full"),
            retry_after: Some(retry_after),
        }
    }

    /// 401 for a missing or wrong API key.
    pub fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "Missing or invalid API key: send 'Authorization: Bearer <key>'".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
            retry_after: None,
        }
    }

    /// 415 for a body that is not `application/json`.
    pub fn not_json(content_type: Option<&str>) -> Self {
        let got = content_type.map_or("no content-type".to_string(), |c| format!("content-type '{c}'"));
        ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: format!("Expected a JSON body with content-type 'application/json', got {got}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("unsupported_media_type"),
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        let mut r = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(secs));
        }
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body was never read: the connection cannot carry another request,
            // so say so rather than let a client reuse it and see it drop.
            r.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
        }
        r
    }
}

/// A future that resolves on SIGINT (Ctrl-C) or SIGTERM. The handlers are installed when this
/// is called, before a server announces itself, so an early signal is never the default (fatal) one.
#[cfg(unix)]
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// A future that resolves on Ctrl-C.
#[cfg(not(unix))]
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
