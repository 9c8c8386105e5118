//! GPU tests (H200 via scripts/gpu-check) of the MoE kernels against their f64 CPU references
//! on fresh random data: the grouped int8 `moe_gateup` and `moe_down` (every routed row
//! written, max_rel within the deploy gate) at several M and tile configs, including the
//! gpt-oss shape whose template defaults are invalid, and `moe_route` against the CPU
//! routing (`route` + `align_block_size`: ids, tie order, weights, padding). Without a GPU they
//! report "skipped: no GPU"; with MANGROVE_REQUIRE_GPU=1 a missing GPU fails.

mod common;

use mangrove::gpu::{DeviceRouting, DownWeights, ExpertWeights, MoeDown, MoeGateUp};
use mangrove::jit::KernelRequest;
use mangrove::reference::moe::MoeShape;
use mangrove::routing::align_block_size;
use mangrove::validate::moe::check_moe_route_rows;
use mangrove::validate::{check_moe_gateup, MoeCase};

/// (E, TOPK, H, I): the Qwen-MoE-like default, Qwen3-30B-A3B (the `qwen3-moe` preset) and a
/// small shape.
const SHAPES: [&str; 3] = ["E=64 TOPK=8 H=2048 I=1408", "E=128 TOPK=8 H=2048 I=768", "E=8 TOPK=2 H=512 I=256"];

/// gpt-oss-20b/120b's expert shape: H = I = 2880 admits only one warp and no unroll.
const GPT_OSS: &str = "E=128 TOPK=4 H=2880 I=2880";

/// gate_up tile configs: one to four token groups, one to four row tiles, 1 to 8 warps (shared
/// memory above 48 KB with 8 warps), every unroll.
const GATEUP_CONFIGS: [&str; 7] = [
    "BLOCK_M=8 ROW_TILES=1 WARPS=4 UNROLL=2",
    "BLOCK_M=8 ROW_TILES=4 WARPS=1 UNROLL=1",
    "BLOCK_M=16 ROW_TILES=2 WARPS=2 UNROLL=2",
    "BLOCK_M=16 ROW_TILES=1 WARPS=2 UNROLL=4",
    "BLOCK_M=32 ROW_TILES=1 WARPS=8 UNROLL=1",
    "BLOCK_M=32 ROW_TILES=1 WARPS=2 UNROLL=4",
    "BLOCK_M=8 ROW_TILES=2 WARPS=4 UNROLL=2",
];

/// down tile configs valid for every shape of [`SHAPES`] (I = 1408 = 22 x 64 allows two
/// warps or unroll 2 at most).
const DOWN_CONFIGS: [&str; 5] = [
    "BLOCK_M=8 ROW_TILES=2 WARPS=2 UNROLL=1",
    "BLOCK_M=8 ROW_TILES=4 WARPS=1 UNROLL=2",
    "BLOCK_M=16 ROW_TILES=4 WARPS=1 UNROLL=1",
    "BLOCK_M=32 ROW_TILES=2 WARPS=1 UNROLL=2",
    "BLOCK_M=32 ROW_TILES=1 WARPS=2 UNROLL=1",
];

fn requests(arch: mangrove::arch::Arch, template: &str, shapes: &[&str], configs: &[&str], extra: &str) -> Vec<KernelRequest> {
    [1, 16, 128]
        .into_iter()
        .flat_map(|m| shapes.iter().flat_map(move |s| configs.iter().map(move |c| format!("M={m} {s} {c} {extra}"))))
        .map(|p| common::request(arch, template, &p))
        .collect()
}

#[test]
fn moe_gateup_matches_f64_reference() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let arch = gpu.info().arch;
    let mut reqs = requests(arch, "moe_gateup", &SHAPES, &GATEUP_CONFIGS, "");
    reqs.extend(requests(arch, "moe_gateup", &SHAPES[2..], &GATEUP_CONFIGS[..2], "ACT=0")); // ReLU²
    reqs.extend(requests(arch, "moe_gateup", &[GPT_OSS], &["BLOCK_M=8 ROW_TILES=2 WARPS=1 UNROLL=1", "BLOCK_M=16 ROW_TILES=1 WARPS=1 UNROLL=1"], ""));
    let failures = common::failed_checks(&gpu, &reqs, 2000, f64::INFINITY);
    assert!(failures.is_empty(), "{} of {} configs failed:\n{}", failures.len(), reqs.len(), failures.join("\n"));
}

#[test]
fn moe_down_matches_f64_reference() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let arch = gpu.info().arch;
    let mut reqs = requests(arch, "moe_down", &SHAPES, &DOWN_CONFIGS, "");
    reqs.extend(requests(arch, "moe_down", &[GPT_OSS], &["BLOCK_M=8 ROW_TILES=2 WARPS=1 UNROLL=1", "BLOCK_M=32 ROW_TILES=1 WARPS=1 UNROLL=1"], ""));
    let failures = common::failed_checks(&gpu, &reqs, 3000, f64::INFINITY);
    assert!(failures.is_empty(), "{} of {} configs failed:\n{}", failures.len(), reqs.len(), failures.join("\n"));
}

#[test]
fn moe_route_matches_cpu_routing() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let jit = common::jit_in(dir.path());
    let arch = gpu.info().arch;
    // (problem, rows routed): full buckets and partial ones (rows < M), with and without
    // renormalization, every BLOCK_M, 6 to 128 experts.
    let cases = [
        ("M=1 E=128 TOPK=8 BLOCK_M=8 NORM=1", 1),
        ("M=16 E=128 TOPK=8 BLOCK_M=16 NORM=1", 16),
        ("M=16 E=128 TOPK=8 BLOCK_M=16 NORM=1 THREADS=1024", 11),
        ("M=64 E=64 TOPK=6 BLOCK_M=32 NORM=0", 64),
        ("M=512 E=128 TOPK=4 BLOCK_M=8 NORM=1 THREADS=512", 512),
        ("M=4 E=6 TOPK=2 BLOCK_M=32 NORM=0 THREADS=128", 3),
    ];
    for (i, (p, rows)) in cases.into_iter().enumerate() {
        let f = jit.get(&common::request(arch, "moe_route", p)).unwrap();
        let run = check_moe_route_rows(&gpu, &f.entry, rows, 100 + i as u64, common::GPU_GATE.rel_floor).unwrap();
        println!("{p} rows={rows}: {}", run.deltas);
        assert_eq!(run.deltas.non_finite, 0, "{p} rows={rows}: ids or routing differ from the CPU's");
        assert!(run.deltas.max_rel < 1e-5, "{p} rows={rows}: weights {}", run.deltas);
    }
}

#[test]
fn repeated_runs_are_bit_identical() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let jit = common::jit_in(dir.path());
    for c in [GATEUP_CONFIGS[0], GATEUP_CONFIGS[4]] {
        let f = jit.get(&common::request(gpu.info().arch, "moe_gateup", &format!("M=16 {} {c}", SHAPES[0]))).unwrap();
        let first = check_moe_gateup(&gpu, &f.entry, 5, common::GPU_GATE.rel_floor).unwrap();
        for _ in 0..3 {
            let again = check_moe_gateup(&gpu, &f.entry, 5, common::GPU_GATE.rel_floor).unwrap();
            assert!(again.deltas.passes(&common::GPU_GATE), "{c}: {}", again.deltas);
            assert_eq!(again.output, first.output, "{c}: runs differ bitwise");
        }
    }
}

#[test]
fn shape_mismatch_is_an_error_not_a_crash() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let jit = common::jit_in(dir.path());
    let f = jit.get(&common::request(gpu.info().arch, "moe_gateup", &format!("M=2 {}", SHAPES[2]))).unwrap();
    let mut op = MoeGateUp::new(&gpu, &f.entry).unwrap();
    let s = op.shape;
    let (e, h, n) = (s.experts, s.hidden, s.inter);
    let w_gate = gpu.zeros::<u8>(e * n / 4 * h).unwrap();
    let w_up = gpu.zeros::<u8>(e * n / 4 * h).unwrap();
    let scales = gpu.zeros::<f32>(e).unwrap();
    let w = ExpertWeights { w_gate: &w_gate, w_up: &w_up, s_gate: &scales, s_up: &scales };
    let x = gpu.zeros::<i8>(h).unwrap(); // 1 token of activations, the pairs name 2
    let x_scale = gpu.zeros::<f32>(2).unwrap();
    let mut act = gpu.zeros::<f32>(2 * s.topk * n).unwrap();
    let routing = DeviceRouting::upload(&gpu, &align_block_size(&[0, 1, 2, 3], e, s.block_m).unwrap(), e).unwrap();
    let err = op.launch(&gpu, (x.slice(..), x_scale.slice(..)), w, &routing, 4, &mut act).unwrap_err();
    assert!(err.to_string().contains(&format!("x has {h} elements")), "{err}");
    let x = gpu.zeros::<i8>(2 * h).unwrap();
    let other = DeviceRouting::upload(&gpu, &align_block_size(&[0, 1, 2, 3], e, 2 * s.block_m).unwrap(), e).unwrap();
    let err = op.launch(&gpu, (x.slice(..), x_scale.slice(..)), w, &other, 4, &mut act).unwrap_err();
    assert!(err.to_string().contains("routing of padded length"), "{err}");
    let err = op.launch(&gpu, (x.slice(..), x_scale.slice(..)), w, &routing, 5, &mut act).unwrap_err();
    assert!(err.to_string().contains("pairs exceed"), "{err}");
    op.launch(&gpu, (x.slice(..), x_scale.slice(..)), w, &routing, 4, &mut act).unwrap();
    // moe_down checks its own buffers the same way.
    let f = jit.get(&common::request(gpu.info().arch, "moe_down", &format!("M=2 {}", SHAPES[2]))).unwrap();
    let mut down = MoeDown::new(&gpu, &f.entry).unwrap();
    let w_down = gpu.zeros::<u8>(e * h / 4 * n).unwrap();
    let (q, q_scale) = (gpu.zeros::<i8>(4 * n).unwrap(), gpu.zeros::<f32>(4).unwrap());
    let mut out = gpu.zeros::<f32>(4 * h - 1).unwrap();
    let routing = DeviceRouting::upload(&gpu, &align_block_size(&[0, 1, 2, 3], e, down.shape.block_m).unwrap(), e).unwrap();
    let err = down.launch(&gpu, (&q, &q_scale), DownWeights { w_down: &w_down, s_down: &scales }, &routing, 4, &mut out).unwrap_err();
    assert!(err.to_string().contains("out has"), "{err}");
    gpu.sync().unwrap();
}

#[test]
fn gateup_then_down_of_one_case_share_the_routing() {
    // The tuner's workload path: one case, both stages, each against its own reference.
    let Some(gpu) = common::gpu_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let jit = common::jit_in(dir.path());
    let shape = MoeShape { tokens: 8, hidden: 2048, inter: 768, experts: 128, topk: 8 };
    let mut case = MoeCase::new(&gpu, shape, 9, true).unwrap();
    let p = format!("M=8 {}", SHAPES[1]);
    let gu = jit.get(&common::request(gpu.info().arch, "moe_gateup", &p)).unwrap();
    let dn = jit.get(&common::request(gpu.info().arch, "moe_down", &p)).unwrap();
    let a = case.run_gateup(&gpu, &mut MoeGateUp::new(&gpu, &gu.entry).unwrap(), common::GPU_GATE.rel_floor).unwrap();
    let d = case.run_down(&gpu, &mut MoeDown::new(&gpu, &dn.entry).unwrap(), common::GPU_GATE.rel_floor).unwrap();
    assert!(a.deltas.passes(&common::GPU_GATE) && a.deltas.unwritten == 0, "{}", a.deltas);
    assert!(d.deltas.passes(&common::GPU_GATE) && d.deltas.unwritten == 0, "{}", d.deltas);
}
