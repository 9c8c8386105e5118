//! GPU test (H100 via scripts/gpu-check) of the performance lab: on one bitnet GEMV and a small
//! MoE gate_up problem, every variant (cuBLAS where libcublas loads, tuned and default mangrove
//! kernels in both activation modes) passes its check and is timed, with figures that make
//! physical sense. Without a GPU it reports "skipped: no GPU".

mod common;

use mangrove::gpu::TimingPlan;
use mangrove::lab::measure::{run, LabSettings};
use mangrove::lab::{BlasStatus, Case, Outcome, Problem, Report, Source, LAB_GATE};
use mangrove::tuning_db::TuningDb;

#[test]
fn lab_checks_and_times_every_variant() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let jit = common::jit_in(dir.path());
    let db = TuningDb::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tuning_db/h100"))).unwrap();
    let cases = vec![
        Case { problem: Problem::Gemv { name: "o".into(), n: 2560, k: 2560 }, m: 1 },
        Case { problem: Problem::Gemv { name: "down".into(), n: 2560, k: 6912 }, m: 8 },
        Case { problem: Problem::Gateup { experts: 8, topk: 2, hidden: 512, inter: 256 }, m: 16 },
    ];
    let settings = LabSettings {
        arch: gpu.info().arch,
        plan: TimingPlan { warmup: 2, samples: 5, batch: 4 },
        gate: LAB_GATE,
        seed: 9,
        cases,
        tuning_db: "tuning_db/h100".into(),
        command: "gpu_lab_tests".into(),
    };
    let report = run(&gpu, &jit, &db, &settings, &|what| eprintln!("lab: {what}")).unwrap();
    println!("{}", report.table());
    assert!(report.failures().is_empty(), "{:?}", report.failures());
    assert!(report.copy_bw_gbs > 100.0, "copy bandwidth {}", report.copy_bw_gbs);
    let blas = matches!(report.cublas, BlasStatus::Loaded { .. });
    if !blas {
        eprintln!("note: cuBLAS unavailable here: {:?}", report.cublas);
    }
    for c in &report.cases {
        assert!(c.copy_limit_us > 0.0, "{}", c.label);
        // cuBLAS, then tuned and default of each mangrove kernel: the two dp4a GEMVs up to
        // MAX_GEMV_M rows, the tensor-core GEMM from two (measure.rs).
        let want = match c.case.problem {
            Problem::Gemv { .. } => 1 + 2 * (2 * usize::from(c.case.m <= mangrove::step::MAX_GEMV_M) + usize::from(c.case.m >= 2)),
            _ => 3,
        };
        assert_eq!(c.variants.len(), want, "{}", c.label);
        for v in &c.variants {
            if v.source == Source::Cublas && !blas {
                assert!(matches!(v.outcome, Outcome::Unavailable { .. }));
                continue;
            }
            let us = v.derived.median_us.unwrap_or_else(|| panic!("{} {}: {:?}", c.label, v.variant, v.outcome));
            let frac = v.derived.frac_copy_bw.unwrap();
            // Every derived figure exists and is a number (speed itself is the benchmark's to report).
            assert!(frac.is_finite() && frac > 0.0, "{} {}: {us} µs gives {frac} of copy bandwidth", c.label, v.variant);
            if v.source != Source::Cublas && blas {
                assert!(v.derived.speedup_vs_cublas.is_some(), "{} {}", c.label, v.variant);
            }
        }
        let tuned = c.variants.iter().find(|v| v.source == Source::Tuned).unwrap();
        assert!(tuned.derived.tuned_vs_default.is_some(), "{}", c.label);
    }
    let o = &report.cases[0].variants.iter().find(|v| v.variant == "tuned ternary_gemv").unwrap();
    assert_eq!(o.rule.as_deref(), Some("Exact"), "o 2560x2560 M=1 is in tuning_db/h100");
    let text = serde_json::to_string(&report).unwrap();
    assert_eq!(serde_json::from_str::<Report>(&text).unwrap(), report);
}
