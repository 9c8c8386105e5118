//! The sharded-tuning recipe (scripts/tune-sharded): shards run as separate `mangrove-tune`
//! processes (compile-only, so no GPU is needed) and are merged; together they cover exactly the
//! configs of a single run: every valid config in one shard, the same pruned set.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const SWEEP: [&str; 6] = ["gemv", "--shapes", "64x1000", "--m", "8", "--compile-only"];

fn report(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// The pruned configs of a report's only job, as canonical text.
fn pruned(r: &serde_json::Value) -> BTreeSet<String> {
    r["jobs"][0]["pruned"].as_array().unwrap().iter().map(|p| p["params"].to_string()).collect()
}

#[test]
fn shards_as_separate_processes_cover_the_single_run() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let out = dir.path().join("shards");
    let sharded = Command::new("scripts/tune-sharded")
        .args(["local", "3", out.to_str().unwrap(), "--"])
        .args(SWEEP)
        .env("MANGROVE_TUNE", env!("CARGO_BIN_EXE_mangrove-tune"))
        .output()
        .unwrap();
    assert!(sharded.status.success(), "{}{}", String::from_utf8_lossy(&sharded.stdout), String::from_utf8_lossy(&sharded.stderr));
    assert!(String::from_utf8_lossy(&sharded.stdout).contains("nothing to merge"), "compile-only shards write no records");
    let single = Command::new(env!("CARGO_BIN_EXE_mangrove-tune")).args(SWEEP).args(["--cache-dir", cache.to_str().unwrap(), "--json"]).output().unwrap();
    assert!(single.status.success(), "{}", String::from_utf8_lossy(&single.stderr));
    let single: serde_json::Value = serde_json::from_slice(&single.stdout).unwrap();

    let shards: Vec<serde_json::Value> = (0..3).map(|i| report(&out.join(format!("shard-{i}.json")))).collect();
    let count = |r: &serde_json::Value| r["jobs"][0]["shard_configs"].as_u64().unwrap();
    assert!(shards.iter().all(|s| count(s) > 0), "every shard has work");
    assert_eq!(shards.iter().map(count).sum::<u64>(), count(&single), "each valid config is in exactly one shard");
    let union: BTreeSet<String> = shards.iter().flat_map(pruned).collect();
    assert_eq!(union, pruned(&single), "the shards prune what the single run prunes");
    for s in &shards {
        assert_eq!(s["jobs"][0]["candidates"], single["jobs"][0]["candidates"]);
    }

    // A merge before every shard has run is refused, naming the missing shard.
    let early = Command::new("scripts/tune-sharded").args(["merge", "4", out.to_str().unwrap()]).output().unwrap();
    assert!(!early.status.success() && String::from_utf8_lossy(&early.stderr).contains("shard 3/4 has no report"));
}
