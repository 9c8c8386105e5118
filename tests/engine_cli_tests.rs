//! `mangrove gen-model` and `mangrove serve` as a user runs them: a checkpoint on disk, a
//! server on a free port answering /health, and the metrics JSON printed at shutdown.

mod common;

use std::io::{Read, Write};
use std::process::Command;

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn gen_model_then_serve_then_shutdown_dumps_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny-moe");
    let st = Command::new(env!("CARGO_BIN_EXE_mangrove"))
        .args(["gen-model", "--preset", "tiny-moe", "--out", out.to_str().unwrap(), "--seed", "3"])
        .status()
        .unwrap();
    assert!(st.success());
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out.join(f).exists(), "{f}");
    }
    let server = common::server::serve(&out, &["--tuning-db", "tuning_db/h100"], dir.path());
    let addr = server.addr.clone();
    let health = http_get(&addr, "/health");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("\"tuning_db\":\"tuning_db/h100\""), "{health}");
    // SIGINT: the server shuts down and prints its counters.
    let stopped = server.stop(std::time::Duration::from_secs(10)).unwrap();
    assert!(stopped.status.success() && !stopped.killed, "{stopped:?}");
    let stdout = stopped.stdout;
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(j["requests"], 0);
    assert!(j["paths"].is_array() && j["fallbacks"].is_array(), "{j}");
}

#[test]
fn bench_decode_reports_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().to_str().unwrap();
    let gen = Command::new(env!("CARGO_BIN_EXE_mangrove")).args(["gen-model", "--preset", "tiny", "--out", m]).status().unwrap();
    assert!(gen.success());
    let out = Command::new(env!("CARGO_BIN_EXE_mangrove"))
        .args(["bench", "decode", "--model", m, "--batch", "3,1", "--prompt-tokens", "5", "--steps", "4", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = out["runs"].as_array().unwrap();
    let j = &runs[0];
    assert_eq!((j["backend"].as_str(), j["batch"].as_u64(), j["decode_steps"].as_u64()), (Some("cpu"), Some(3), Some(4)));
    assert_eq!(runs[1]["batch"].as_u64(), Some(1));
    assert!(j["tokens_per_s"].as_f64().unwrap() > 0.0 && j["tpot_p99_ms"].as_f64().unwrap() >= j["tpot_p50_ms"].as_f64().unwrap(), "{j}");
    // No GPU here: no copy bandwidth, so no bound; the weight bytes are still counted.
    assert!(j["weight_bytes"].as_u64().unwrap() > 0 && out["provenance"]["command"].as_str().unwrap().contains("bench decode"), "{out}");
}

#[test]
fn serve_reports_a_bad_checkpoint_clearly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mangrove")).args(["serve", "--model", dir.path().to_str().unwrap(), "--port", "0"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.json") && err.contains("hidden_size"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn cuda_backend_without_a_gpu_is_a_clear_error() {
    if mangrove::gpu::Gpu::open(0).is_ok() {
        eprintln!("skipped: this machine has a GPU (tests/gpu_engine_tests.rs covers it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    let gen = Command::new(env!("CARGO_BIN_EXE_mangrove")).args(["gen-model", "--preset", "tiny", "--out", m.to_str().unwrap()]).status().unwrap();
    assert!(gen.success());
    for args in [&["serve", "--port", "0"][..], &["bench", "decode"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_mangrove"))
            .args(["--cache-dir", dir.path().join("cache").to_str().unwrap()])
            .args(args)
            .args(["--backend", "cuda", "--model", m.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cuda backend") && err.contains("no GPU"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
