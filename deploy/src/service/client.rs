//! The engine side of the JIT service: ask `jitd` for a kernel; when it cannot be reached,
//! compile locally and say so (a counted fallback, never a silent one).

use std::time::Duration;

use mangrove_core::cache::CacheEntry;
use mangrove_core::jit::{Jit, JitError, KernelRequest};

/// Where a kernel came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Service,
    /// The service was unreachable (or answered an error); compiled locally, with the reason.
    LocalFallback(String),
}

/// Errors of a client fetch.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The service could not be reached or its answer could not be read.
    #[error("jit service {url}: {reason}")]
    Service { url: String, reason: String },
    /// The service answered an HTTP error.
    #[error("jit service {url}: {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error(transparent)]
    Local(#[from] JitError),
}

/// A client of one service URL (e.g. `http://127.0.0.1:7070`).
pub struct JitClient {
    pub url: String,
    agent: ureq::Agent,
}

impl JitClient {
    pub fn new(url: &str) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(2)))
            .timeout_global(Some(Duration::from_secs(300)))
            .http_status_as_error(false)
            .build();
        Self { url: url.trim_end_matches('/').to_owned(), agent: config.into() }
    }

    /// Fetches from the service; the cubin hash is checked after transfer.
    pub fn fetch(&self, req: &KernelRequest) -> Result<CacheEntry, ClientError> {
        let err = |reason: String| ClientError::Service { url: self.url.clone(), reason };
        let body = serde_json::to_vec(req).map_err(|e| err(e.to_string()))?;
        let mut resp = self
            .agent
            .post(&format!("{}/v1/kernels", self.url))
            .header("content-type", "application/json")
            .send(&body[..])
            .map_err(|e| err(e.to_string()))?;
        let status = resp.status();
        let bytes = resp.body_mut().with_config().limit(1 << 30).read_to_vec().map_err(|e| err(e.to_string()))?;
        if !status.is_success() {
            let body = String::from_utf8_lossy(&bytes).into_owned();
            return Err(ClientError::Status { url: self.url.clone(), status: status.as_u16(), body });
        }
        let entry = super::decode_entry(&bytes).map_err(err)?;
        if !entry.blob_intact() {
            return Err(err("cubin failed its blake3 check after transfer".into()));
        }
        Ok(entry)
    }

    /// Fetches from the service, or compiles with `local` when the service is down; a bad
    /// request (400) is not retried locally since it would fail the same way.
    pub fn fetch_or_compile(&self, req: &KernelRequest, local: &Jit) -> Result<(CacheEntry, Source), ClientError> {
        match self.fetch(req) {
            Ok(e) => Ok((e, Source::Service)),
            Err(e @ ClientError::Status { status: 400, .. }) => Err(e),
            Err(e) => {
                eprintln!("warning: {e}; compiling locally");
                Ok((local.get(req)?.entry, Source::LocalFallback(e.to_string())))
            }
        }
    }
}
