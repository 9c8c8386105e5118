//! `mangrove bench compare` on saved results: a real `bench decode` JSON against copies of it
//! with one latency scaled: +4 % is a regression (exit status 1), +2 % is not.

use std::path::Path;
use std::process::{Command, Output};

const BASE: &str = "notes/engine_h200/decode_h200db_p32_r1.json";

fn compare(base: &Path, new: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mangrove")).args(["bench", "compare"]).args([base, new]).output().unwrap()
}

/// BASE with its first run's `tpot_p50_ms` times `factor`, written into `dir`.
fn scaled(dir: &Path, factor: f64) -> std::path::PathBuf {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(BASE).unwrap()).unwrap();
    let t = &mut v["runs"][0]["tpot_p50_ms"];
    *t = (t.as_f64().unwrap() * factor).into();
    let p = dir.join(format!("new_{factor}.json"));
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    p
}

#[test]
fn four_percent_slower_fails_two_percent_passes() {
    let dir = tempfile::tempdir().unwrap();
    let base = Path::new(BASE);
    let same = compare(base, base);
    assert!(same.status.success(), "{}", String::from_utf8_lossy(&same.stderr));
    let out = String::from_utf8_lossy(&same.stdout).to_string();
    assert!(out.contains("tpot_p50_ms") && out.contains("0 regression(s)"), "{out}");

    let slower = compare(base, &scaled(dir.path(), 1.04));
    assert_eq!(slower.status.code(), Some(1));
    let out = String::from_utf8_lossy(&slower.stdout);
    let row = out.lines().find(|l| l.contains("REGRESSED")).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("tpot_p50_ms") && row.contains("+4.0%"), "{row}");
    assert!(String::from_utf8_lossy(&slower.stderr).contains("1 metric(s) regressed"));

    assert!(compare(base, &scaled(dir.path(), 1.02)).status.success());
}

#[test]
fn unrelated_results_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.json");
    std::fs::write(&other, "{\"name\": \"x\"}").unwrap();
    let o = compare(Path::new(BASE), &other);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("share no tracked metric"), "{}", String::from_utf8_lossy(&o.stderr));
}
