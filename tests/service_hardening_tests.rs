//! The JIT service and its client under attack, over real sockets: a lying service (one
//! self-consistent entry for every request, or the right entry with another launch) is refused
//! and the client compiles locally; jitd with an API key answers 401 without it and `/health`
//! stays open; a slow-headers client is cut while `/health` answers.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::post;
use mangrove::arch::Arch;
use mangrove::cache::CacheEntry;
use mangrove::http::HttpLimits;
use mangrove::service::client::{ClientError, JitClient, Source};
use mangrove::service::{app_with, encode_entry, ServiceState};
use mangrove::template::Catalog;
use mangrove::tuning_db::TuningDb;

/// Serves `router` under `limits` on 127.0.0.1:0 in a background runtime; returns the address.
fn serve(router: axum::Router, limits: HttpLimits) -> std::net::SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            mangrove::http::serve(listener, router, limits, std::future::pending()).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

/// A fake service answering `entry` (claimed under its own key) to every kernel request.
fn liar(entry: CacheEntry) -> std::net::SocketAddr {
    let body = Arc::new(encode_entry(&entry));
    let key = entry.inputs.key().to_hex();
    let router = axum::Router::new().route(
        "/v1/kernels",
        post(move || {
            let (body, key) = (body.clone(), key.clone());
            async move {
                ([(header::CONTENT_TYPE, "application/octet-stream".to_string()), (header::HeaderName::from_static("x-mangrove-key"), key)], (*body).clone())
                    .into_response()
            }
        }),
    );
    serve(router, HttpLimits::default())
}

#[test]
fn a_lying_service_is_refused_and_the_client_compiles_locally() {
    let dir = tempfile::tempdir().unwrap();
    let local = common::jit_in(dir.path());
    let asked = common::gemv(Arch::SM90, &["N=256", "K=512"]);
    let other = local.get(&common::gemv(Arch::SM90, &["N=512", "K=256"])).unwrap().entry;
    let url = format!("http://{}", liar(other.clone()));
    let client = JitClient::new(&url, Catalog::embedded());
    match client.fetch(&asked) {
        Err(ClientError::WrongEntry { reason, .. }) => assert!(reason.contains("asked for key"), "{reason}"),
        other => panic!("a wrong entry was accepted: {other:?}"),
    }
    let (entry, source) = client.fetch_or_compile(&asked, &local).unwrap();
    assert!(matches!(source, Source::LocalFallback(ref r) if r.contains("wrong entry")), "{source:?}");
    assert_eq!(entry.inputs.key(), local.key_of(&asked).unwrap().1.key());
    // The entry asked for, but with its launch geometry edited: refused too.
    let mut tampered = local.get(&asked).unwrap().entry;
    tampered.launch.grid[0] += 1;
    let url = format!("http://{}", liar(tampered));
    match JitClient::new(&url, Catalog::embedded()).fetch(&asked) {
        Err(ClientError::WrongEntry { reason, .. }) => assert!(reason.contains("launch"), "{reason}"),
        other => panic!("a tampered launch was accepted: {other:?}"),
    }
    // The honest answer for the entry it serves is accepted.
    let url = format!("http://{}", liar(other.clone()));
    let ok = JitClient::new(&url, Catalog::embedded()).fetch(&common::gemv(Arch::SM90, &["N=512", "K=256"])).unwrap();
    assert_eq!(ok.cubin, other.cubin);
}

fn jitd(dir: &std::path::Path, api_key: Option<&str>, limits: HttpLimits) -> std::net::SocketAddr {
    let state = ServiceState::new(common::jit_in(dir), TuningDb::default());
    serve(app_with(state, api_key), limits)
}

#[test]
fn jitd_with_an_api_key_refuses_anonymous_requests_and_keeps_health_open() {
    let dir = tempfile::tempdir().unwrap();
    let addr = jitd(dir.path(), Some("k3y"), HttpLimits::default());
    let url = format!("http://{addr}");
    let req = common::gemv(Arch::SM90, &["N=256", "K=256"]);
    match JitClient::new(&url, Catalog::embedded()).fetch(&req) {
        Err(ClientError::Status { status: 401, body, .. }) => assert!(body.contains("invalid_api_key"), "{body}"),
        other => panic!("an anonymous request was served: {other:?}"),
    }
    match JitClient::new(&url, Catalog::embedded()).with_api_key(Some("nope".into())).fetch(&req) {
        Err(ClientError::Status { status: 401, .. }) => {}
        other => panic!("a wrong key was served: {other:?}"),
    }
    let e = JitClient::new(&url, Catalog::embedded()).with_api_key(Some("k3y".into())).fetch(&req).unwrap();
    assert!(e.blob_intact());
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    assert_eq!(agent.get(&format!("{url}/health")).call().unwrap().status().as_u16(), 200);
    assert_eq!(agent.get(&format!("{url}/metrics")).call().unwrap().status().as_u16(), 401);
    // A text/plain body is refused before any compile.
    let r = agent.post(&format!("{url}/v1/kernels")).header("authorization", "Bearer k3y").header("content-type", "text/plain").send(&serde_json::to_vec(&req).unwrap()[..]).unwrap();
    assert_eq!(r.status().as_u16(), 415);
}

#[test]
fn jitd_cuts_slow_headers_while_health_answers() {
    let dir = tempfile::tempdir().unwrap();
    let limits = HttpLimits { header_timeout: Duration::from_millis(500), ..HttpLimits::default() };
    let addr = jitd(dir.path(), None, limits);
    let mut loris: Vec<std::net::TcpStream> = (0..8)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.write_all(b"POST /v1/kernels HTTP/1.1\r\nHost: x\r\n").unwrap();
            c
        })
        .collect();
    let r = ureq::get(&format!("http://{addr}/health")).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    for c in &mut loris {
        let t0 = Instant::now();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        let _ = c.read_to_end(&mut buf);
        assert!(t0.elapsed() < Duration::from_secs(3), "a slow client was held {:?}", t0.elapsed());
    }
}

#[test]
fn jitd_keeps_its_cache_under_the_size_cap() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 40_000;
    let state = ServiceState::with_cache_cap(common::jit_in(dir.path()), TuningDb::default(), Some(cap));
    let addr = serve(app_with(state.clone(), None), HttpLimits::default());
    let client = JitClient::new(&format!("http://{addr}"), Catalog::embedded());
    for (n, k) in [(256, 256), (512, 256), (256, 512), (512, 512), (768, 256), (256, 768)] {
        let e = client.fetch(&common::gemv(Arch::SM90, &[&format!("N={n}"), &format!("K={k}")])).unwrap();
        assert!(e.blob_intact());
    }
    assert_eq!(state.compiles.load(std::sync::atomic::Ordering::Relaxed), 6);
    let bytes: u64 = state.jit.cache.list().unwrap().iter().map(|e| e.bytes).sum();
    assert!(bytes <= cap, "the cache holds {bytes} bytes, over its cap of {cap}");
}

#[test]
fn a_requester_that_disconnects_does_not_make_the_next_one_compile_again() {
    let dir = tempfile::tempdir().unwrap();
    let state = ServiceState::new(common::jit_in(dir.path()), TuningDb::default());
    let addr = serve(app_with(state.clone(), None), HttpLimits::default());
    let req = common::gemv(Arch::SM90, &["M=2", "N=768", "K=512", "SPLIT_K=2"]);
    let body = serde_json::to_string(&req).unwrap();
    // The first requester sends its request and hangs up at once, mid-compile.
    let mut a = std::net::TcpStream::connect(addr).unwrap();
    write!(a, "POST /v1/kernels HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    drop(a);
    let e = JitClient::new(&format!("http://{addr}"), Catalog::embedded()).fetch(&req).unwrap();
    assert!(e.blob_intact());
    assert_eq!(state.compiles.load(std::sync::atomic::Ordering::Relaxed), 1, "the key was compiled twice");
}
