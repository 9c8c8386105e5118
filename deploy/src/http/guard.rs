//! Request guards every mangrove server shares, as tower-http `ValidateRequestHeaderLayer`s
//! answering the one [`ApiError`] JSON: [`api_key`] (a Bearer token on every route it wraps;
//! `/health` is left outside it) and [`json_body`] (a POST body must be `application/json`, so a
//! web page cannot drive a local server with a "simple" `text/plain` request).

use axum::body::Body;
use axum::http::{header, Method, Request, Response};
use axum::response::IntoResponse;
use tower_http::validate_request::ValidateRequestHeaderLayer;

use super::ApiError;

/// A request check for tower-http's `ValidateRequestHeaderLayer::custom`.
pub trait Check: FnMut(&mut Request<Body>) -> Result<(), Response<Body>> + Clone + Send + Sync + 'static {}
impl<F: FnMut(&mut Request<Body>) -> Result<(), Response<Body>> + Clone + Send + Sync + 'static> Check for F {}

/// A layer answering an [`ApiError`] when `f` refuses a request.
// tower-http's `ValidateRequest` returns the refusal as a `Response`; its size is not ours to choose.
#[allow(clippy::result_large_err)]
fn guard(f: impl Fn(&Request<Body>) -> Result<(), ApiError> + Clone + Send + Sync + 'static) -> ValidateRequestHeaderLayer<impl Check> {
    ValidateRequestHeaderLayer::custom(move |req: &mut Request<Body>| f(req).map_err(IntoResponse::into_response))
}

/// Requires `Authorization: Bearer <key>` (401 otherwise), compared in constant time (`subtle`).
pub fn api_key(key: &str) -> ValidateRequestHeaderLayer<impl Check> {
    let want = format!("Bearer {key}").into_bytes();
    guard(move |req| {
        let got = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
        if bool::from(subtle::ConstantTimeEq::ct_eq(got, want.as_slice())) {
            Ok(())
        } else {
            Err(ApiError::unauthorized())
        }
    })
}

/// Requires `content-type: application/json` (any parameters, e.g. `; charset=utf-8`) on POST
/// requests (415 otherwise).
pub fn json_body() -> ValidateRequestHeaderLayer<impl Check> {
    guard(|req| {
        if req.method() != Method::POST {
            return Ok(());
        }
        let ct = req.headers().get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("<not text>"));
        let essence = ct.map(|c| c.split(';').next().unwrap_or_default().trim().to_ascii_lowercase());
        if essence.as_deref() == Some("application/json") {
            Ok(())
        } else {
            Err(ApiError::not_json(ct))
        }
    })
}
