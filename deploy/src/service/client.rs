//! The engine side of the JIT service: ask `jitd` for a kernel and trust nothing it answers
//! until it checks — the entry must be the one asked for (its key inputs re-derived here from
//! the request and the catalog, its entry symbol and launch geometry those of the rendered
//! template, its cubin re-hashed). When the service cannot be reached or answers a wrong entry,
//! compile locally and say so (a counted fallback, never a silent one).

use std::time::Duration;

use mangrove_core::cache::CacheEntry;
use mangrove_core::compile::Compiler;
use mangrove_core::jit::{Jit, JitError, KernelRequest};
use mangrove_core::key::KeyInputs;
use mangrove_core::template::Catalog;

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
    /// The service answered an entry that is not the kernel asked for, or does not check.
    #[error("jit service {url} answered a wrong entry for {template}: {reason}")]
    WrongEntry { url: String, template: String, reason: String },
    #[error(transparent)]
    Local(#[from] JitError),
}

/// A client of one service URL (e.g. `http://127.0.0.1:7070`).
pub struct JitClient {
    pub url: String,
    agent: ureq::Agent,
    /// The templates requests are rendered from, to re-derive what an answer must be.
    catalog: Catalog,
    api_key: Option<String>,
}

impl JitClient {
    /// A client of `url` checking answers against `catalog`.
    pub fn new(url: &str, catalog: Catalog) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(2)))
            .timeout_global(Some(Duration::from_secs(300)))
            .http_status_as_error(false)
            .build();
        Self { url: url.trim_end_matches('/').to_owned(), agent: config.into(), catalog, api_key: None }
    }

    /// Sends `Authorization: Bearer <key>` (the service's `--api-key`).
    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        self.api_key = key;
        self
    }

    /// Fetches from the service; the answer must carry the requested key inputs (the NVRTC
    /// version is the service's), the template's entry symbol and launch geometry, and a cubin
    /// matching its blake3.
    pub fn fetch(&self, req: &KernelRequest) -> Result<CacheEntry, ClientError> {
        let kernel = self.catalog.get(&req.template).and_then(|t| t.render(&req.params)).map_err(JitError::from)?;
        let err = |reason: String| ClientError::Service { url: self.url.clone(), reason };
        let body = serde_json::to_vec(req).map_err(|e| err(e.to_string()))?;
        let mut post = self.agent.post(&format!("{}/v1/kernels", self.url)).header("content-type", "application/json");
        if let Some(key) = &self.api_key {
            post = post.header("authorization", &format!("Bearer {key}"));
        }
        let mut resp = post.send(&body[..]).map_err(|e| err(e.to_string()))?;
        let status = resp.status();
        let header_key = resp.headers().get("x-mangrove-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let bytes = resp.body_mut().with_config().limit(1 << 30).read_to_vec().map_err(|e| err(e.to_string()))?;
        if !status.is_success() {
            let body = String::from_utf8_lossy(&bytes).into_owned();
            return Err(ClientError::Status { url: self.url.clone(), status: status.as_u16(), body });
        }
        let entry = super::decode_entry(&bytes).map_err(err)?;
        let wrong = |reason: String| ClientError::WrongEntry { url: self.url.clone(), template: req.template.clone(), reason };
        let expected = KeyInputs::new(&kernel, req.arch, entry.inputs.nvrtc_version, &Compiler::options(req.arch));
        if entry.inputs != expected {
            return Err(wrong(format!(
                "asked for key {} ({} {:?} {}), got key {} ({} {:?} {})",
                expected.key(),
                expected.template,
                expected.params,
                expected.arch,
                entry.inputs.key(),
                entry.inputs.template,
                entry.inputs.params,
                entry.inputs.arch
            )));
        }
        if header_key.as_deref() != Some(expected.key().to_hex().as_str()) {
            return Err(wrong(format!("x-mangrove-key {header_key:?} is not the key asked for, {}", expected.key())));
        }
        if entry.entry != kernel.entry || entry.launch != kernel.launch {
            return Err(wrong(format!(
                "entry symbol / launch {} {:?} differ from the template's {} {:?}",
                entry.entry, entry.launch, kernel.entry, kernel.launch
            )));
        }
        if !entry.blob_intact() {
            return Err(wrong("cubin failed its blake3 check after transfer".into()));
        }
        Ok(entry)
    }

    /// Fetches from the service, or compiles with `local` when the service is down or answers a
    /// wrong entry; a bad request (400) is not retried locally since it would fail the same way.
    pub fn fetch_or_compile(&self, req: &KernelRequest, local: &Jit) -> Result<(CacheEntry, Source), ClientError> {
        match self.fetch(req) {
            Ok(e) => Ok((e, Source::Service)),
            Err(e @ (ClientError::Status { status: 400, .. } | ClientError::Local(_))) => Err(e),
            Err(e) => {
                eprintln!("warning: {e}; compiling locally");
                Ok((local.get(req)?.entry, Source::LocalFallback(e.to_string())))
            }
        }
    }
}
