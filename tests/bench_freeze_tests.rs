//! `mangrove bench freeze` on the CPU: `--dry-run` writes the environment and the plan only;
//! `--quick` runs every CPU step (tiny checkpoint, decode at batch 1 and 16, a served sweep
//! with the server's counters) and leaves no server behind.

use std::process::Command;

fn freeze(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mangrove")).args(["bench", "freeze"]).args(args).output().unwrap()
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

#[test]
fn dry_run_writes_the_environment_and_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("baseline");
    let o = freeze(&[out.to_str().unwrap(), "--quick", "--dry-run"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = std::fs::read_to_string(out.join("commands.log")).unwrap();
    for step in ["gen-model --preset tiny", "bench decode", "--batch 1,16", "serve --model", "bench serve --url"] {
        assert!(log.contains(step), "{step} in\n{log}");
    }
    assert!(log.lines().all(|l| l.starts_with("planned")), "{log}");
    let env = json(&out.join("environment.json"));
    assert!(env["git_commit"].is_string() && env["git_dirty"].is_boolean(), "{env}");
    assert_eq!(env["provenance"]["gpu_name"], "none");
    // The NVRTC the benches would load is named (not 0.0 because nothing had loaded it yet).
    let nvrtc = mangrove::compile::Compiler::open().map(|c| c.version()).unwrap_or((0, 0));
    assert_eq!(env["provenance"]["nvrtc_version"], serde_json::json!([nvrtc.0, nvrtc.1]), "{env}");
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(md.contains("binary built from"), "{md}");
    assert!(!out.join("decode.json").exists(), "a dry run runs nothing");
    // A used folder is refused.
    let again = freeze(&[out.to_str().unwrap(), "--dry-run"]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("not empty"));
}

#[test]
fn quick_freeze_runs_every_cpu_step() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("baseline");
    let o = freeze(&[out.to_str().unwrap(), "--quick"]);
    let md = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{md}{}", String::from_utf8_lossy(&o.stderr));
    let summary = json(&out.join("summary.json"));
    let steps: Vec<(String, String)> =
        summary["steps"].as_array().unwrap().iter().map(|s| (s[0]["name"].as_str().unwrap().to_string(), s[1]["status"].as_str().unwrap().to_string())).collect();
    let names: Vec<&str> = steps.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["gen-model", "decode", "server", "serve-sweep"], "no GPU: no kernel lab");
    assert!(steps.iter().all(|(_, s)| s == "ok"), "{steps:?}");
    let decode = json(&out.join("decode.json"));
    assert_eq!(decode["runs"].as_array().unwrap().iter().map(|r| r["batch"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 16]);
    let serve = json(&out.join("serve.json"));
    assert_eq!(serve["levels"].as_array().unwrap().len(), 2);
    let metrics = json(&out.join("server_metrics.json"));
    assert!(metrics["paths"].is_array() && metrics["fallbacks"].is_array(), "{metrics}");
    assert!(metrics["requests"].as_u64().unwrap() >= 16, "{metrics}");
    assert!(std::fs::read_to_string(out.join("server.log")).unwrap().contains("serving"));
    assert!(md.contains("| serve-sweep | ok |"), "{md}");
    assert!(serve["health"].is_object(), "the sweep read the server's /health");
    // The server it launched (its RSS was sampled) is gone, not left running.
    let pid = serve["levels"][0]["server_memory"]["pid"].as_u64().unwrap();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "server {pid} is still running");
}
