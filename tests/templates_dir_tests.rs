//! `--templates-dir DIR` reaches the commands that plan kernels: `cache bless` and `serve` take
//! DIR's templates, not the ones built into the binary. DIR is the embedded catalog with one
//! template edited, so its kernels (and only those) get other keys.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use mangrove::bundle::Bundle;
use mangrove::step::Family;

/// Runs the binary; one that is still running after 120 s (a server that started when it
/// should have refused) is killed and fails the test.
fn mangrove(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mangrove")).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("{args:?} still running after 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn ok(args: &[&str]) {
    let out = mangrove(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Key of each (family, M) in the bundle at `dir`.
fn keys(dir: &Path) -> BTreeMap<(Family, i64), String> {
    Bundle::open(dir).unwrap().manifest.kernels.into_iter().map(|k| ((k.family.unwrap(), k.m.unwrap()), k.key)).collect()
}

#[test]
fn bless_and_serve_use_the_templates_dir() {
    let root = tempfile::tempdir().unwrap();
    let p = |name: &str| root.path().join(name).to_str().unwrap().to_string();
    ok(&["gen-model", "--preset", "tiny", "--out", &p("tiny"), "--seed", "1"]);
    // The catalog with rmsnorm_quant edited (a comment: same kernel, other source hash).
    let templates = root.path().join("templates");
    std::fs::create_dir_all(&templates).unwrap();
    for f in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/kernel_templates")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, templates.join(f.file_name().unwrap())).unwrap();
    }
    let edited = templates.join("rmsnorm_quant.cu.tera");
    let text = std::fs::read_to_string(&edited).unwrap() + "\n// a local edit\n";
    std::fs::write(&edited, text).unwrap();
    let db = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning_db/h100");
    let (cache, tiny) = (p("cache"), p("tiny"));
    let bless = |out: &str, extra: &[&str]| {
        let mut args = vec!["--cache-dir", &cache, "cache", "bless", "--tuning-db", db, "--model", &tiny];
        args.extend(["--arch", "sm90", "--out", out, "--max-batch", "2"]);
        args.extend(extra);
        ok(&args);
    };
    let dir = templates.to_str().unwrap();
    bless(&p("embedded"), &[]);
    bless(&p("local"), &["--templates-dir", dir]);
    let (embedded, local) = (keys(&root.path().join("embedded")), keys(&root.path().join("local")));
    assert_eq!(embedded.keys().collect::<Vec<_>>(), local.keys().collect::<Vec<_>>());
    for (fk, key) in &embedded {
        let norm = matches!(fk.0, Family::Rmsnorm | Family::AttnSubNorm | Family::MlpSubNorm);
        assert_eq!(key != &local[fk], norm, "{fk:?}: only the edited template's kernels change");
    }

    // serve with DIR finds the embedded bundle lacking DIR's norm kernels, and the other way round.
    let serve = |bundle: &str, extra: &[&str]| {
        let mut args = vec!["serve", "--model", &tiny, "--port", "0", "--tuning-db", db, "--max-batch", "2"];
        args.extend(["--blessed", bundle, "--offline"]);
        args.extend(extra);
        mangrove(&args)
    };
    for (bundle, extra) in [(p("embedded"), vec!["--templates-dir", dir]), (p("local"), vec![])] {
        let out = serve(&bundle, &extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("lacks ") && err.contains("rmsnorm M=1"), "{err}");
        assert!(!err.contains("attn_qkv M=1"), "only the edited template's kernels are missing: {err}");
    }
}
