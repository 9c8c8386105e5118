//! GPU tests (H100 via scripts/gpu-check): the ternary kernel against the f64 CPU reference
//! on fresh random data, every output written, split-K bit-identical run to run. Without a
//! GPU they report "skipped: no GPU"; with MANGROVE_REQUIRE_GPU=1 a missing GPU fails.

mod common;

use mangrove::jit::KernelRequest;
use mangrove::template::format_params;
use mangrove::validate::check_ternary_gemv;

const SHAPES: [(i64, i64); 4] = [(2560, 2560), (6912, 2560), (2560, 6912), (3000, 1000)];

/// M × shape × split, cycling the other tunables so many configs are covered.
fn cases(arch: mangrove::arch::Arch) -> Vec<KernelRequest> {
    let mut out = Vec::new();
    let mut i = 0usize;
    for m in [1, 2, 4, 8] {
        for (n, k) in SHAPES {
            for split in [1, 2, 4, 8] {
                let vec = if k % 16 == 0 { [16, 8, 4][i % 3] } else { [8, 4][i % 2] };
                let threads = [64, 128, 256, 512][i % 4];
                let rpw = if m >= 8 { 1 } else { [1, 2, 4][i % 3] };
                let unroll = if m >= 4 { [1, 2][i % 2] } else { [1, 2, 4][i % 3] };
                let p = format!("M={m} N={n} K={k} SPLIT_K={split} VEC={vec} THREADS={threads} ROWS_PER_WARP={rpw} UNROLL={unroll}");
                out.push(common::request(arch, "ternary_gemv", &p));
                i += 1;
            }
        }
    }
    out
}

#[test]
fn ternary_gemv_matches_f64_reference() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let reqs = cases(gpu.info().arch);
    let failures = common::failed_checks(&gpu, &reqs, 1000, f64::INFINITY);
    assert!(failures.is_empty(), "{} of {} configs failed:\n{}", failures.len(), reqs.len(), failures.join("\n"));
}

#[test]
fn split_k_is_bit_identical_across_runs() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let jit = common::jit_in(dir.path());
    for split in [2, 4, 8] {
        for (n, k) in [(2560, 6912), (3000, 1000)] {
            let p = format!("M=4 N={n} K={k} SPLIT_K={split} VEC=8 THREADS=256");
            let req = common::gemv(gpu.info().arch, &p.split(' ').collect::<Vec<_>>());
            let f = jit.get(&req).unwrap();
            let runs = check_ternary_gemv(&gpu, &f.entry, 77, 10, common::GPU_GATE.rel_floor).unwrap();
            for (r, run) in runs.iter().enumerate() {
                assert!(run.deltas.passes(&common::GPU_GATE), "{p} run {r}: {}", run.deltas);
                assert_eq!(run.output, runs[0].output, "{p}: run {r} differs bitwise from run 0");
            }
        }
    }
}

#[test]
fn w2a8_gemv_matches_f64_reference_and_is_bit_identical() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let jit = common::jit_in(dir.path());
    let mut reqs = cases(gpu.info().arch);
    for (i, r) in reqs.iter_mut().enumerate() {
        r.template = "ternary_gemv_w2a8".into();
        // Every third case writes f32 (the engine's output type).
        r.params.insert("OUT_F32".into(), i64::from(i % 3 == 0));
    }
    let mut failures = Vec::new();
    for (i, f) in jit.get_many(&reqs).into_iter().enumerate() {
        let f = f.unwrap_or_else(|e| panic!("{e}"));
        let what = format_params(&f.entry.inputs.params);
        let runs = check_ternary_gemv(&gpu, &f.entry, 5000 + i as u64, 3, common::GPU_GATE.rel_floor).unwrap();
        println!("w2a8 {what}: {} regs={}", runs[0].deltas, f.entry.resources.registers);
        for r in &runs {
            if !r.deltas.passes(&common::GPU_GATE) || r.output != runs[0].output {
                failures.push(format!("{what}: {}", r.deltas));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} configs failed:\n{}", failures.len(), reqs.len(), failures.join("\n"));
}

#[test]
fn shape_mismatch_is_an_error_not_a_crash() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let jit = common::jit_in(dir.path());
    let f = jit.get(&common::gemv(gpu.info().arch, &["M=2", "N=256", "K=256"])).unwrap();
    let mut op = mangrove::gpu::TernaryGemv::new(&gpu, &f.entry).unwrap();
    let w = gpu.zeros::<u8>(64 * 256).unwrap();
    let x = gpu.zeros::<u16>(256).unwrap(); // M=1 worth of activations, kernel wants M=2
    let mut y = gpu.zeros::<u16>(2 * 256).unwrap();
    let err = op.launch(&gpu, &w, mangrove::gpu::Activations::Bf16(&x), &mut y, 1.0).unwrap_err();
    assert!(err.to_string().contains("x has 256 elements"), "{err}");
}
