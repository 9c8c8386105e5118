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

/// Checks each of `reqs` three times on a fresh problem (seed `seed0 + i`) against the f64
/// reference; returns the configs that miss the gate or differ bitwise between runs.
fn repeated_check_failures(gpu: &mangrove::gpu::Gpu, jit: &mangrove::jit::Jit, reqs: &[KernelRequest], seed0: u64, label: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for (i, f) in jit.get_many(reqs).into_iter().enumerate() {
        let f = f.unwrap_or_else(|e| panic!("{e}"));
        let what = format_params(&f.entry.inputs.params);
        let runs = check_ternary_gemv(gpu, &f.entry, seed0 + i as u64, 3, common::GPU_GATE.rel_floor).unwrap();
        let r = &f.entry.resources;
        println!("{label} {what}: {} regs={} spills={}", runs[0].deltas, r.registers, r.spill_stores);
        for run in &runs {
            if !run.deltas.passes(&common::GPU_GATE) || run.output != runs[0].output {
                failures.push(format!("{what}: {}", run.deltas));
            }
        }
    }
    failures
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
    let failures = repeated_check_failures(&gpu, &jit, &reqs, 5000, "w2a8");
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

/// Whether a GEMM request is valid for its schema and its shared memory fits `limit` bytes.
fn bulk_fits(req: &KernelRequest, limit: i64) -> bool {
    let t = mangrove::template::Catalog::embedded();
    let t = t.get("ternary_gemm_w2a8").unwrap();
    let Ok(params) = t.resolve(&req.params) else { return false };
    t.eval_int(&t.schema.launch.shared_bytes, &params).is_ok_and(|b| b <= limit)
}

/// Tensor-core GEMM configs: buckets × shapes, cycling the tunables (every value of each; a
/// cp.async ring too deep for the config's warps falls back to a shallower one), every other
/// one also with the bulk tile (BULK = 1, cycling its pieces) where it fits `shared_limit`.
fn gemm_cases(arch: mangrove::arch::Arch, shared_limit: i64) -> Vec<KernelRequest> {
    let mut out = Vec::new();
    let mut i = 0usize;
    for m in [2, 8, 16, 33, 64, 256] {
        for (n, k) in [(2560, 2560), (3840, 2560), (2560, 6912), (3000, 1024)] {
            for split in [1, 2, 4, 8] {
                let block_t = [8, 16, 32, 64][i % 4];
                let row_tiles = if block_t == 64 { 1 } else { [1, 2, 4][i % 3] };
                let (row_warps, k_warps) = [(4, 1), (1, 4), (2, 2), (8, 1), (4, 2)][i % 5];
                let k_warps = if block_t * row_tiles * row_warps * (k_warps - 1) * 128 > 40960 { 1 } else { k_warps };
                let unroll = [1, 2, 4][i % 3];
                // The cp.async ring's depth, or the next shallower one whose ring fits.
                let stages = [0, 2, 3, 4, 6][(i / 3) % 5];
                let p = |stages: i32| {
                    format!(
                        "M={m} N={n} K={k} OUT_F32={} BLOCK_T={block_t} ROW_TILES={row_tiles} ROW_WARPS={row_warps} K_WARPS={k_warps} SPLIT_K={split} UNROLL={unroll} PREFETCH={} STAGES={stages}",
                        i % 2,
                        (i / 2) % 2
                    )
                };
                // The cycle may combine values the schema rules out (too many accumulators or
                // splits for K): those are the constraint's business, not this test's.
                let valid = [stages, 2, 0].into_iter().filter(|&s| s <= stages).map(|s| common::request(arch, "ternary_gemm_w2a8", &p(s))).find(|req| {
                    mangrove::template::Catalog::embedded().get("ternary_gemm_w2a8").unwrap().resolve(&req.params).is_ok()
                });
                out.extend(valid);
                // Every other case again with the bulk (TMA) tile, where it fits shared memory.
                if i % 2 == 0 {
                    let bulk = format!(
                        "M={m} N={n} K={k} OUT_F32={} BLOCK_T={block_t} ROW_TILES={row_tiles} ROW_WARPS={row_warps} K_WARPS={k_warps} SPLIT_K={split} UNROLL=1 PREFETCH=0 STAGES={} BULK=1",
                        (i / 2) % 2,
                        [0, 2, 3, 4, 6][(i / 2) % 5]
                    );
                    out.extend(Some(common::request(arch, "ternary_gemm_w2a8", &bulk)).filter(|req| bulk_fits(req, shared_limit)));
                }
                i += 1;
            }
        }
    }
    out
}

#[test]
fn w2a8_gemm_matches_f64_reference_and_is_bit_identical() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let jit = common::jit_in(dir.path());
    let reqs = gemm_cases(gpu.info().arch, i64::from(gpu.info().max_shared_per_block_optin));
    assert!(reqs.len() >= 60, "only {} valid configs generated", reqs.len());
    let failures = repeated_check_failures(&gpu, &jit, &reqs, 9000, "gemm");
    assert!(failures.is_empty(), "{} of {} configs failed:\n{}", failures.len(), reqs.len(), failures.join("\n"));
}

/// A bucket serves any row count up to its M: the first rows match the M=1 GEMV row by row bit
/// for bit (both sums are exact integers), and the rows past the count keep their poison.
#[test]
fn w2a8_gemm_takes_fewer_rows_and_equals_the_m1_gemv() {
    use mangrove::validate::TernaryCase;
    let Some(gpu) = common::gpu_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let jit = common::jit_in(dir.path());
    let arch = gpu.info().arch;
    for (n, k, out_f32) in [(3840, 2560, 1), (2560, 6912, 0)] {
        let one = jit.get(&common::request(arch, "ternary_gemv_w2a8", &format!("M=1 N={n} K={k} OUT_F32={out_f32}"))).unwrap();
        let mut one = mangrove::gpu::TernaryGemv::new(&gpu, &one.entry).unwrap();
        for (m, rows, path) in [(16, 1, "STAGES=0"), (16, 9, "STAGES=3"), (64, 37, "STAGES=0"), (64, 37, "STAGES=2"), (256, 200, "STAGES=4"), (16, 9, "BULK=1 PREFETCH=0"), (64, 37, "BULK=1 PREFETCH=0 STAGES=3")] {
            let p = format!("M={m} N={n} K={k} OUT_F32={out_f32} BLOCK_T=16 ROW_TILES=2 ROW_WARPS=2 K_WARPS=2 UNROLL=1 SPLIT_K=4 {path}");
            let f = jit.get(&common::request(arch, "ternary_gemm_w2a8", &p)).unwrap();
            let mut op = mangrove::gpu::TernaryGemv::new(&gpu, &f.entry).unwrap();
            let mut case = TernaryCase::new(&gpu, m, n as usize, k as usize, 31 + m as u64).unwrap();
            let run = case.run_rows(&gpu, &mut op, rows, common::GPU_GATE.rel_floor).unwrap();
            assert!(run.deltas.passes(&common::GPU_GATE), "{p} rows={rows}: {}", run.deltas);
            let used = rows * n as usize;
            let poison = if out_f32 == 1 { mangrove::check::POISON_F32 } else { u32::from(mangrove::check::POISON_BF16) };
            let touched = run.output[used..].iter().filter(|&&b| b != poison).count();
            assert_eq!(touched, 0, "{p} rows={rows}: {touched} outputs past the row count were written");
            let by_row = case.rows_one_by_one(&gpu, &mut one).unwrap();
            let got: Vec<f64> = run.output[..used]
                .iter()
                .map(|&b| if out_f32 == 1 { f64::from(f32::from_bits(b)) } else { half::bf16::from_bits(b as u16).to_f64() })
                .collect();
            assert!(got == by_row[..used], "{p} rows={rows}: the GEMM differs from the M=1 GEMV row by row");
        }
    }
    let f = jit.get(&common::request(arch, "ternary_gemm_w2a8", "M=16 N=256 K=256 SPLIT_K=1 K_WARPS=1")).unwrap();
    let mut op = mangrove::gpu::TernaryGemv::new(&gpu, &f.entry).unwrap();
    let (w, q, s) = (gpu.zeros::<u8>(64 * 256).unwrap(), gpu.zeros::<i8>(17 * 256).unwrap(), gpu.zeros::<f32>(17).unwrap());
    let mut y = gpu.zeros::<u16>(17 * 256).unwrap();
    let err = op.launch_w2a8_rows(&gpu, &w, &q, &s, (0, 0), 17, &mut y, 1.0).unwrap_err();
    assert!(err.to_string().contains("17 rows given; this kernel takes 1..=16"), "{err}");
}
