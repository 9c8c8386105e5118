//! `mangrove-tune` without a GPU: clear errors for bad flags, compile-only sweeps that write
//! nothing, and merge through the command line.

use std::process::Command;

use mangrove::check::{Deltas, Gate};
use mangrove::tuning_db::{NoiseMargin, Provenance, Record, Timed, TuningDb};

fn tune(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mangrove-tune")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn bad_flags_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("c");
    let c = c.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["gemv", "--cache-dir", c, "--shapes", "2560by2560"], "bad shape '2560by2560'"),
        (&["gemv", "--cache-dir", c, "--shard", "3/3"], "bad shard '3/3'"),
        (&["gemv", "--cache-dir", c, "--arch", "sm91"], "unknown arch 'sm91'"),
        (&["gemv", "--cache-dir", c, "--strategy", "budgeted", "--budget", "0"], "--budget must be at least 1"),
        (&["gemv", "--cache-dir", c, "--m", "9", "--shapes", "64x64", "--compile-only"], "M in 1..=8, got 9"),
        (&["merge", "/nonexistent/db", "-o", c], "is not a tuning DB folder"),
    ];
    for (args, needle) in cases {
        let (ok, _, err) = tune(args);
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn compile_only_sweep_prunes_with_reasons_and_writes_no_db() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let db = dir.path().join("db");
    let (ok, out, err) = tune(&[
        "gemv", "--cache-dir", cache.to_str().unwrap(), "--db", db.to_str().unwrap(), "--shapes", "64x1000",
        "--m", "8", "--shard", "0/8", "--compile-only", "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["compile_only"], true);
    assert_eq!(v["written"], false);
    let job = &v["jobs"][0];
    assert_eq!(job["candidates"], 432);
    let reasons: Vec<&str> = job["pruned"].as_array().unwrap().iter().map(|p| p["reason"].as_str().unwrap()).collect();
    assert!(reasons.iter().any(|r| r.contains("K % VEC == 0")), "VEC=16 cannot divide K=1000: {reasons:?}");
    assert!(!db.exists(), "compile-only must not create the DB");
}

#[test]
fn gateup_sweeps_the_gpt_oss_shape_whose_template_default_is_invalid() {
    // H = 2880 breaks the default's H % (64 * WARPS * UNROLL) == 0 (4 warps x 2), yet WARPS=1
    // UNROLL=1 (and others) divide it: the sweep runs with the first valid config as baseline.
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (ok, out, err) = tune(&[
        "gateup", "--experts", "128", "--topk", "4", "--hidden", "2880", "--inter", "2880", "--m", "1,16",
        "--cache-dir", cache.to_str().unwrap(), "--compile-only", "--json", "--no-write",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let jobs = v["jobs"].as_array().unwrap();
    let templates: Vec<&str> = jobs.iter().map(|j| j["template"].as_str().unwrap()).collect();
    assert_eq!(templates, ["moe_gateup", "moe_gateup", "moe_down", "moe_down"], "gate_up, then down, at each M");
    for job in jobs {
        assert!(job["shard_configs"].as_u64().unwrap() >= 1, "{job}");
        let note = job["baseline"].as_str().unwrap_or_default();
        // gate_up splits H across warps, down splits I: both are 2880 = 45 x 64.
        let violated = if job["template"] == "moe_gateup" { "H % (64 * WARPS * UNROLL)" } else { "I % (64 * WARPS * UNROLL)" };
        assert!(note.contains(violated), "the baseline names the violated constraint: {job}");
        let failed = job["pruned"].as_array().unwrap().iter().filter(|p| p["reason"].as_str().unwrap().contains("compile")).count();
        assert_eq!(failed, 0, "{job}");
    }
    // A shape with no valid config at all is still an error, before any work.
    let (ok, _, err) = tune(&["gateup", "--hidden", "2881", "--m", "1", "--cache-dir", cache.to_str().unwrap(), "--compile-only", "--no-write"]);
    assert!(!ok && err.contains("H % (64 * WARPS * UNROLL)"), "{err}");
}

#[test]
fn decode_ops_compile_only_covers_the_plans_norm_and_attention_problems() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let db = dir.path().join("db");
    let (ok, out, err) = tune(&[
        "decode-ops", "--preset", "tiny", "--cache-dir", cache.to_str().unwrap(), "--db", db.to_str().unwrap(), "--compile-only", "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let jobs = v["jobs"].as_array().unwrap();
    let names: Vec<String> = jobs.iter().map(|j| format!("{} {}", j["template"].as_str().unwrap(), j["problem"])).collect();
    // tiny: H 64 (input/post-attention norms and the attention sub-norm share it), the MLP's
    // GLU sub-norm at I 128, and attention; RoPE is not tuned.
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("rmsnorm_quant") && n.contains("\"GLU\":0") && n.contains("\"H\":64")), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("rmsnorm_quant") && n.contains("\"GLU\":1") && n.contains("\"H\":128")), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("attention_decode")), "{names:?}");
    let attention = jobs.iter().find(|j| j["template"] == "attention_decode").unwrap();
    assert!(attention["candidates"].as_u64().unwrap() > 1, "attention tunables are swept");
    assert_eq!(v["written"], false);
    assert!(!db.exists(), "compile-only must not create the DB");
    // An MoE model adds its experts' per-pair quantization (no norm); the combine is not tuned.
    let (ok, out, err) = tune(&["decode-ops", "--preset", "tiny-moe", "--cache-dir", cache.to_str().unwrap(), "--compile-only", "--json", "--no-write"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The experts' act(gate)·up is fused into moe_gateup: only the per-pair quantization is left.
    let moe_glu = v["jobs"].as_array().unwrap().iter().any(|j| j["problem"]["NORM"] == 0 && j["problem"]["GLU"] == 0);
    assert!(moe_glu, "{out}");
    assert!(v["jobs"].as_array().unwrap().iter().all(|j| j["template"] != "moe_combine" && j["template"] != "rope_kv"), "{out}");
    let (ok, _, err) = tune(&["decode-ops", "--model", dir.path().join("missing").to_str().unwrap(), "--compile-only"]);
    assert!(!ok && err.contains("config.json"), "{err}");
}

fn record(threads: i64, us: f64) -> Record {
    let timed = |t: i64, us: f64| Timed {
        params: [("THREADS".to_string(), t)].into(),
        median_us: us,
        p95_us: us,
        mean_us: us,
        gb_s: 1.0,
        frac_copy_bw: 0.1,
        deltas: Deltas::default(),
    };
    Record {
        problem: [("N".to_string(), 64), ("K".to_string(), 64)].into(),
        m: 1,
        winner: timed(threads, us),
        runner_ups: vec![],
        candidates: 1,
        pruned: 0,
        rejected: 0,
        timed: 1,
        strategy: "exhaustive".into(),
        gate: Gate { max_abs: 0.08, max_rel: 0.25, rel_floor: 0.05 },
        copy_bw_gbs: 3000.0,
        default_us: None,
        baseline: None,
        provenance: Provenance::default(),
        merged_from: Vec::new(),
    }
}

#[test]
fn merge_command_keeps_the_fastest_and_reports_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, out) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("out"));
    let mut da = TuningDb::default();
    da.upsert("ternary_gemv", record(64, 5.0), NoiseMargin::DEFAULT);
    da.save(&a).unwrap();
    let mut db = TuningDb::default();
    db.upsert("ternary_gemv", record(128, 4.0), NoiseMargin::DEFAULT);
    db.save(&b).unwrap();
    let (ok, stdout, err) = tune(&["merge", a.to_str().unwrap(), b.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(stdout.contains("conflict ternary_gemv") && stdout.contains("kept 4.00"), "{stdout}");
    let merged = TuningDb::load(&out).unwrap();
    assert_eq!(merged.templates["ternary_gemv"].records[0].winner.params["THREADS"], 128);
}

#[test]
fn merge_command_keeps_a_record_against_noise_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, out) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("out"));
    let save = |path: &std::path::Path, r: Record| {
        let mut d = TuningDb::default();
        d.upsert("ternary_gemv", r, NoiseMargin::DEFAULT);
        d.save(path).unwrap();
    };
    save(&a, record(64, 5.0));
    save(&b, record(128, 4.9)); // 2 % faster: noise at the default 5 % margin
    let merge_into = |out: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["merge", a.to_str().unwrap(), b.to_str().unwrap(), "-o", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (ok, stdout, err) = tune(&args);
        assert!(ok, "{err}");
        stdout
    };
    let merge = |extra: &[&str]| merge_into(&out, extra);
    let stdout = merge(&[]);
    assert!(stdout.contains("kept 5.00") && stdout.contains("within the 5% noise margin"), "{stdout}");
    let winner = || TuningDb::load(&out).unwrap().templates["ternary_gemv"].records[0].winner.params["THREADS"];
    assert_eq!(winner(), 64);
    let file = out.join("ternary_gemv.json");
    let first = std::fs::read_to_string(&file).unwrap();
    merge(&[]);
    merge(&[]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), first, "merging the same folders again changes nothing");
    // Without a margin (shards of one run) the faster record wins.
    let stdout = merge_into(&dir.path().join("out0"), &["--noise-margin", "0"]);
    assert!(stdout.contains("kept 4.90"), "{stdout}");
}

#[test]
fn shipped_h100_db_loads_and_covers_the_default_shapes() {
    let db = TuningDb::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tuning_db/h100"))).unwrap();
    let gemv = &db.templates["ternary_gemv"];
    for (n, k) in mangrove::tune::gemv::BITNET_2B_SHAPES {
        for m in [1, 2, 4, 8] {
            let p = [("N".to_string(), *n), ("K".to_string(), *k)].into();
            assert_eq!(db.lookup("ternary_gemv", &p, m).rule, mangrove::tuning_db::LookupRule::Exact, "{n}x{k} M={m}");
        }
    }
    assert!(gemv.records.iter().all(|r| r.winner.deltas.non_finite == 0 && r.provenance.gpu_name.contains("H100")));
    assert_eq!(db.templates["moe_gateup"].records.len(), 10);
    assert!(db.gates.iter().all(|g| g.passed));
}

#[test]
fn compile_only_progress_has_a_total_and_reaches_it() {
    use mangrove::tune::space::Shard;
    use mangrove::tune::strategy::Strategy;
    use mangrove::tune::sweep::SweepSettings;
    let dir = tempfile::tempdir().unwrap();
    let jit = mangrove::jit::Jit::open(mangrove::template::Catalog::embedded(), dir.path(), false).unwrap_or_else(|e| panic!("{e}"));
    let settings = SweepSettings {
        arch: mangrove::arch::Arch::SM90,
        strategy: Strategy::Exhaustive,
        shard: "0/8".parse::<Shard>().unwrap(),
        space: Default::default(),
        gate: Gate { max_abs: 0.08, max_rel: 0.25, rel_floor: 0.05 },
        plan: Default::default(),
        runner_ups: 3,
        compile_only: true,
        noise_margin: NoiseMargin::DEFAULT,
    };
    let (ctx, _) = mangrove::tune::context::TuneContext::new(jit, settings, "test".into()).unwrap();
    let pb = indicatif::ProgressBar::hidden();
    let out = mangrove::tune::gemv::tune_gemv(&ctx, "ternary_gemv", &[(64, 1000)], &[8], &pb).unwrap();
    let total = pb.length().unwrap();
    assert!(total > 0, "the total is known before the sweep");
    assert_eq!(pb.position(), total, "every planned config was counted");
    // This shard's configs: the candidates minus the constraint-pruned, split eight ways.
    assert!(total < out[0].1.candidates as u64, "{total} of {}", out[0].1.candidates);
}
