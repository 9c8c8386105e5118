//! `mangrove serve --blessed BUNDLE --offline` as a deploy runs it: from a copy of the binary
//! on a machine view without NVRTC, it starts, answers a completion, and reports it never
//! loaded NVRTC; with a bundle that lacks a kernel it refuses to start and names the kernel.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

mod common;

use mangrove::bundle::Bundle;

fn http(addr: &str, method: &str, path: &str, body: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Runs `f` (a spawn of the detached binary), retrying while the kernel says the file is busy:
/// where it had to be copied, a test thread that forked while the copy was open for writing
/// holds that descriptor until its child execs (ETXTBSY).
fn retry_busy<T>(mut f: impl FnMut() -> std::io::Result<T>) -> T {
    for _ in 0..100 {
        match f() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => std::thread::sleep(std::time::Duration::from_millis(20)),
            r => return r.unwrap(),
        }
    }
    panic!("the detached binary stayed busy for 2 s")
}

/// The mangrove binary under a directory outside the repository (whose .nvrtc/ it would
/// find), made once per test process: a hard link where the filesystem allows (no second
/// 260 MB copy on a CI disk, and no copy open for writing while a test thread forks, which
/// makes exec fail with ETXTBSY), a copy otherwise.
fn detached_binary() -> &'static Path {
    static BIN: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, bin) = BIN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("mangrove");
        if std::fs::hard_link(env!("CARGO_BIN_EXE_mangrove"), &bin).is_err() {
            let tmp = dir.path().join("mangrove.part");
            std::fs::copy(env!("CARGO_BIN_EXE_mangrove"), &tmp).unwrap();
            std::fs::rename(&tmp, &bin).unwrap();
        }
        (dir, bin)
    });
    bin
}

/// A tiny checkpoint and a bundle blessed for it from the shipped H100 DB.
fn setup(root: &Path) -> (PathBuf, PathBuf) {
    let model = root.join("tiny");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mangrove")).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["gen-model", "--preset", "tiny", "--out", model.to_str().unwrap(), "--seed", "1"]);
    let b = root.join("bundle");
    let db = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning_db/h100");
    let cache = root.join("cache");
    run(&[
        "--cache-dir", cache.to_str().unwrap(), "cache", "bless", "--tuning-db", db, "--model", model.to_str().unwrap(),
        "--arch", "sm90", "--out", b.to_str().unwrap(), "--max-batch", "4",
    ]);
    (model, b)
}

/// The detached binary run from `root` with every NVRTC location pointed at nothing.
fn offline_command(root: &Path) -> Command {
    let mut c = Command::new(detached_binary());
    c.current_dir(root).env("MANGROVE_NVRTC_LIB", "/nonexistent/libnvrtc.so").env_remove("CUDA_HOME").env_remove("CUDA_PATH");
    c
}

#[test]
fn offline_blessed_serve_starts_without_nvrtc_and_answers() {
    let root = tempfile::tempdir().unwrap();
    let (model, b) = setup(root.path());
    // In this environment NVRTC is really absent (unless the machine has a system CUDA install).
    let probe = retry_busy(|| offline_command(root.path()).args(["--cache-dir", "c2", "compile", "--template", "ternary_gemv"]).output());
    let system_cuda = probe.status.success();
    if !system_cuda {
        assert!(String::from_utf8_lossy(&probe.stderr).contains("NVRTC not found"));
    }
    let mut child = retry_busy(|| {
        offline_command(root.path())
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0", "--blessed", b.to_str().unwrap(), "--offline", "--max-batch", "4"])
            .args(["--tuning-db", concat!(env!("CARGO_MANIFEST_DIR"), "/tuning_db/h100")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
    });
    let mut r = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let addr = loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            panic!("server exited before serving:\n{log}");
        }
        log.push_str(&line);
        if let Some(rest) = line.split("http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let health = http(&addr, "GET", "/health", "");
    let completion = http(&addr, "POST", "/v1/completions", r#"{"prompt": "hello", "max_tokens": 4, "temperature": 0}"#);
    let _ = child.kill();
    let _ = child.wait();
    assert!(health.contains("\"source\":\"blessed\""), "{health}");
    assert!(health.contains("\"nvrtc_loaded\":false"), "{health}");
    assert!(health.contains("\"Bundle\""), "{health}");
    assert!(completion.starts_with("HTTP/1.1 200"), "{completion}");
    assert!(completion.contains("\"completion_tokens\":4"), "{completion}");
}

#[test]
fn offline_serve_with_an_incomplete_bundle_refuses_to_start_naming_the_kernel() {
    let root = tempfile::tempdir().unwrap();
    let (model, b) = setup(root.path());
    let last = Bundle::open(&b).unwrap().manifest.kernels.len() - 1;
    let (partial, dropped) = common::bundle_without(&b, root.path(), last);
    let out = retry_busy(|| {
        offline_command(root.path())
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0", "--blessed", partial.to_str().unwrap(), "--offline", "--max-batch", "4"])
            .args(["--tuning-db", concat!(env!("CARGO_MANIFEST_DIR"), "/tuning_db/h100")])
            .output()
    });
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!("{} M={}", dropped.family.unwrap(), dropped.m.unwrap());
    // One kernel can serve several plan entries, so the count may exceed 1; the kernel is named.
    assert!(err.contains("lacks ") && err.contains(&want), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn strict_serve_refuses_fallbacks_and_lists_them() {
    let root = tempfile::tempdir().unwrap();
    let (model, b) = setup(root.path());
    // The tiny model's shapes are not in the H100 DB: every kernel runs on template defaults.
    let out = retry_busy(|| {
        offline_command(root.path())
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0", "--blessed", b.to_str().unwrap(), "--offline", "--strict"])
            .args(["--max-batch", "4", "--tuning-db", concat!(env!("CARGO_MANIFEST_DIR"), "/tuning_db/h100")])
            .output()
    });
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--strict") && err.contains("no_tuned_kernel") && err.contains("attn_qkv M=1"), "{err}");
}

#[test]
fn serve_with_a_trusted_key_refuses_an_unsigned_bundle_and_starts_from_a_signed_one() {
    let root = tempfile::tempdir().unwrap();
    let (model, b) = setup(root.path());
    let key = root.path().join("bless.key");
    let keygen = Command::new(env!("CARGO_BIN_EXE_mangrove")).args(["cache", "keygen", "--out", key.to_str().unwrap()]).output().unwrap();
    assert!(keygen.status.success(), "{}", String::from_utf8_lossy(&keygen.stderr));
    let public = root.path().join("bless.key.pub");
    let serve = |bundle: &Path| {
        retry_busy(|| {
            offline_command(root.path())
                .args(["serve", "--model", model.to_str().unwrap(), "--port", "0", "--blessed", bundle.to_str().unwrap(), "--offline"])
                .args(["--trusted-key", public.to_str().unwrap(), "--max-batch", "4", "--host", "256.0.0.1"])
                .output()
        })
    };
    // Unsigned: refused before anything is prepared, naming the signature file.
    let out = serve(&b);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("manifest.sig") && err.contains("unsigned"), "{err}");
    // Signed by the trusted key (re-exported from the cache the bless filled): the bundle is
    // accepted; the server then fails only on the unusable --host.
    let signed = root.path().join("signed");
    let cache = root.path().join("cache");
    let export = Command::new(env!("CARGO_BIN_EXE_mangrove"))
        .args(["--cache-dir", cache.to_str().unwrap(), "cache", "export", "--out", signed.to_str().unwrap(), "--arch", "sm90", "--sign-key", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let out = serve(&signed);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("manifest.sig") && err.contains("256.0.0.1"), "{err}");
}
