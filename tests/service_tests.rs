//! The JIT service over a real bound socket: N parallel clients asking for one new key cause
//! one compile; fetch by key; tuning lookups; bad requests are JSON 4xx; a client whose
//! service is down compiles locally and says so.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use mangrove::arch::Arch;
use mangrove::service::client::{JitClient, Source};
use mangrove::service::{app, ServiceState};
use mangrove::template::Catalog;
use mangrove::tuning_db::TuningDb;

/// Starts the service on 127.0.0.1:0 in a background runtime; returns its URL and state.
fn start(dir: &std::path::Path) -> (String, Arc<ServiceState>) {
    let db = TuningDb::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tuning_db/h100"))).unwrap();
    let state = ServiceState::new(common::jit_in(dir), db);
    let (tx, rx) = std::sync::mpsc::channel();
    let s = state.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app(s)).await.unwrap();
        });
    });
    (format!("http://{}", rx.recv().unwrap()), state)
}

#[test]
fn parallel_clients_for_one_new_key_compile_once() {
    let dir = tempfile::tempdir().unwrap();
    let (url, state) = start(dir.path());
    let req = common::gemv(Arch::SM90, &["M=3", "N=768", "K=1024", "SPLIT_K=2"]);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (url, req) = (url.clone(), req.clone());
            std::thread::spawn(move || JitClient::new(&url, Catalog::embedded()).fetch(&req).unwrap())
        })
        .collect();
    let entries: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(state.compiles.load(Ordering::Relaxed), 1, "single flight: one compile for 8 clients");
    assert!(entries.iter().all(|e| e.cubin == entries[0].cubin && e.blob_intact()));
    // A later request is a hit, also by key.
    JitClient::new(&url, Catalog::embedded()).fetch(&req).unwrap();
    assert_eq!(state.compiles.load(Ordering::Relaxed), 1);
    let key = entries[0].inputs.key().to_hex();
    let resp = ureq::get(&format!("{url}/v1/kernels/{key}")).call().unwrap();
    assert_eq!(resp.headers().get("x-mangrove-outcome").unwrap(), "hit");
}

#[test]
fn bad_requests_are_json_4xx_and_lookups_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _state) = start(dir.path());
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let post = |body: &str| {
        let mut r = agent.post(&format!("{url}/v1/kernels")).header("content-type", "application/json").send(body).unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    };
    let (code, body) = post("{not json");
    assert_eq!(code, 400);
    assert!(body.contains("\"error\"") && body.contains("bad request body"), "{body}");
    let (code, body) = post(r#"{"template": "nope", "params": {}, "arch": {"cc": 90, "specific": false}}"#);
    assert_eq!(code, 400);
    assert!(body.contains("unknown template 'nope'"), "{body}");
    let mut r = agent.get(&format!("{url}/v1/kernels/xyz")).call().unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.body_mut().read_to_string().unwrap().contains("64-digit hex"));
    let mut r = agent.get(&format!("{url}/v1/kernels/{}", "0".repeat(64))).call().unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let _ = r.body_mut().read_to_string();
    let mut r = agent.get(&format!("{url}/v1/tuning/ternary_gemv?N=2560&K=2560&m=3")).call().unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(v["rule"]["NearestBucket"]["tuned_m"], 4, "{v}");
    let mut r = agent.get(&format!("{url}/metrics")).call().unwrap();
    assert!(r.body_mut().read_to_string().unwrap().contains("mangrove_jitd_compiles_total"));
}

#[test]
fn client_falls_back_to_a_local_compile_when_the_service_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let local = common::jit_in(dir.path());
    // A port nothing listens on: bind, read the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let client = JitClient::new(&format!("http://127.0.0.1:{port}"), Catalog::embedded());
    let (entry, source) = client.fetch_or_compile(&common::gemv(Arch::SM90, &["N=256", "K=256"]), &local).unwrap();
    assert!(matches!(source, Source::LocalFallback(ref r) if r.contains("jit service")), "{source:?}");
    assert_eq!(&entry.cubin[..4], b"\x7fELF");
}
