//! The `mangrove` binary's user-facing behaviour: clear errors for bad flags, nothing written.

use std::process::Command;

fn mangrove(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mangrove")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn bad_flags_are_clear_errors_and_create_no_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("c");
    let c = cache.to_str().unwrap();
    let cases: [(&[&str], &str); 8] = [
        (&["--cache-dir", c, "serve", "--model", "m", "--max-queue", "0"], "--max-queue must be positive"),
        (&["--cache-dir", c, "serve", "--model", "m", "--step-tokens", "0"], "--step-tokens must be positive"),
        (&["--cache-dir", c, "serve", "--model", "m", "--header-timeout", "0s"], "--header-timeout must be positive"),
        (&["--cache-dir", c, "jitd", "--max-connections", "0"], "--max-connections must be positive"),
        (&["--cache-dir", c, "compile", "--template", "ternary_gemv", "--arch", "sm91"], "unknown arch 'sm91'"),
        (&["--cache-dir", c, "compile", "--template", "nope"], "unknown template 'nope'"),
        (&["--cache-dir", c, "compile", "--template", "ternary_gemv", "--param", "VEC"], "expected NAME=INTEGER"),
        (&["--cache-dir", c, "compile", "--template", "ternary_gemv", "--param", "SPLIT_K=3"], "SPLIT_K=3"),
    ];
    for (args, needle) in cases {
        let (ok, _, err) = mangrove(args);
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!cache.exists(), "bad input must not create the cache");
}

#[test]
fn compile_then_hit_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().to_str().unwrap();
    let args = ["--cache-dir", c, "compile", "--template", "ternary_gemv", "--param", "N=128", "--param", "K=128", "--json"];
    let (ok, out, err) = mangrove(&args);
    assert!(ok, "{err}");
    let first: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(first["outcome"]["Compiled"].is_string(), "{first}");
    assert!(first["cubin_bytes"].as_u64().unwrap() > 0);
    let (ok, out, _) = mangrove(&args);
    assert!(ok);
    let second: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(second["outcome"], "Hit");
    assert_eq!(first["key"], second["key"]);
    let (ok, out, _) = mangrove(&["--cache-dir", c, "cache", "verify"]);
    assert!(ok && out.contains("intact 1"), "{out}");
}

#[test]
fn gpu_command_reports_absence_normally() {
    let (ok, out, err) = mangrove(&["gpu"]);
    assert!(ok, "{err}");
    assert!(out.contains("no GPU") || out.contains("\"sm_count\""), "{out}");
}

#[test]
fn bench_kernels_without_gpu_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning_db/h100");
    let json = dir.path().join("k.json");
    let cache = dir.path().join("cache");
    let (c, j) = (cache.to_str().unwrap(), json.to_str().unwrap());
    let bad: [(&[&str], &str); 3] = [
        (&["--cache-dir", c, "bench", "kernels", "--db", db, "--iters", "0"], "--iters and --batch must be at least 1"),
        (&["--cache-dir", c, "bench", "kernels", "--db", "/nonexistent/db"], "tuning DB folder /nonexistent/db does not exist"),
        (&["--cache-dir", c, "bench", "kernels", "--arch", "sm91"], "unknown arch 'sm91'"),
    ];
    for (args, needle) in bad {
        let (ok, _, err) = mangrove(args);
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    if mangrove::gpu::Gpu::open(0).is_ok() {
        eprintln!("skipped the no-GPU half: this machine has a GPU");
        return;
    }
    let (ok, out, err) = mangrove(&["--cache-dir", c, "bench", "kernels", "--arch", "sm90", "--db", db, "--json", j]);
    assert!(!ok, "no GPU must be a non-zero exit: {out}");
    assert!(err.contains("no GPU") && err.contains("needs an NVIDIA GPU"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!json.exists(), "nothing is written without a GPU");
    assert!(!cache.exists(), "the cache is not opened without a GPU");
}

#[test]
fn listing_into_a_closed_pipe_ends_quietly() {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_mangrove")).arg("templates").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take()); // the reader goes away before the first line
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
}

#[test]
fn one_key_compiles_to_the_same_bytes_from_any_folder() {
    let root = tempfile::tempdir().unwrap();
    let mut cubins = Vec::new();
    for sub in ["a", "deeper/and/longer/folder"] {
        let cwd = root.path().join(sub);
        std::fs::create_dir_all(&cwd).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mangrove"));
        // The project-local NVRTC is found relative to the working directory: name it.
        let local = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".nvrtc/nvidia/cu13/lib/libnvrtc.so.13");
        if std::env::var_os("MANGROVE_NVRTC_LIB").is_none() && local.exists() {
            cmd.env("MANGROVE_NVRTC_LIB", &local);
        }
        let out = cmd
            .current_dir(&cwd)
            .args(["--cache-dir", "cache", "compile", "--template", "ternary_gemv", "--arch", "sm90", "--param", "N=256", "--param", "K=256", "--cubin", "k.cubin"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let bytes = std::fs::read(cwd.join("k.cubin")).unwrap();
        let cwd_text = cwd.to_string_lossy().into_owned();
        assert!(!bytes.windows(cwd_text.len()).any(|w| w == cwd_text.as_bytes()), "the cubin names the working directory {cwd_text}");
        cubins.push(bytes);
    }
    assert!(cubins[0] == cubins[1], "the same key gave different cubins in two folders");
}
