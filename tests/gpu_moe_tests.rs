//! GPU tests (H100 via scripts/gpu-check) of the ternary MoE gate_up kernel against the f64
//! CPU reference on fresh random data and routings: every routed row written, max_rel within
//! bf16 rounding. Without a GPU they report "skipped: no GPU"; with MANGROVE_REQUIRE_GPU=1 a
//! missing GPU fails.

mod common;

use mangrove::gpu::{DeviceRouting, ExpertWeights, MoeGateUp};
use mangrove::jit::KernelRequest;
use mangrove::routing::align_block_size;
use mangrove::validate::check_moe_gateup;

/// (E, TOPK, H, I): the Qwen-MoE-like default and a small shape.
const SHAPES: [&str; 2] = ["E=64 TOPK=8 H=2048 I=1408", "E=8 TOPK=2 H=512 I=256"];

/// Tile configs: one to four token groups, one to four row tiles, 1 to 8 warps (shared memory
/// above 48 KB with 8 warps), every unroll.
const CONFIGS: [&str; 7] = [
    "BLOCK_M=8 ROW_TILES=1 WARPS=4 UNROLL=2",
    "BLOCK_M=8 ROW_TILES=4 WARPS=1 UNROLL=1",
    "BLOCK_M=16 ROW_TILES=2 WARPS=2 UNROLL=2",
    "BLOCK_M=16 ROW_TILES=1 WARPS=2 UNROLL=4",
    "BLOCK_M=32 ROW_TILES=1 WARPS=8 UNROLL=1",
    "BLOCK_M=32 ROW_TILES=1 WARPS=2 UNROLL=4",
    "BLOCK_M=8 ROW_TILES=2 WARPS=4 UNROLL=2",
];

#[test]
fn moe_gateup_matches_f64_reference() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let arch = gpu.info().arch;
    let reqs: Vec<KernelRequest> = [1, 16, 128]
        .into_iter()
        .flat_map(|m| SHAPES.iter().flat_map(move |s| CONFIGS.iter().map(move |c| format!("M={m} {s} {c}"))))
        .map(|p| common::request(arch, "moe_gateup", &p))
        .collect();
    let failures = common::failed_checks(&gpu, &reqs, 2000, f64::INFINITY);
    assert!(failures.is_empty(), "{} of {} configs failed:\n{}", failures.len(), reqs.len(), failures.join("\n"));
}

#[test]
fn repeated_runs_are_bit_identical() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let jit = common::jit_in(dir.path());
    for c in [CONFIGS[0], CONFIGS[4]] {
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
    let f = jit.get(&common::request(gpu.info().arch, "moe_gateup", &format!("M=2 {}", SHAPES[1]))).unwrap();
    let mut op = MoeGateUp::new(&gpu, &f.entry).unwrap();
    let (e, h, n) = (op.experts, op.hidden, op.inter);
    let w_gate = gpu.zeros::<u8>(e * n / 4 * h).unwrap();
    let w_up = gpu.zeros::<u8>(e * n / 4 * h).unwrap();
    let scales = gpu.zeros::<f32>(e).unwrap();
    let w = ExpertWeights { w_gate: &w_gate, w_up: &w_up, s_gate: &scales, s_up: &scales };
    let x = gpu.zeros::<u16>(h).unwrap(); // M=1 worth of activations, kernel wants M=2
    let mut act = gpu.zeros::<u16>(2 * op.topk * n).unwrap();
    let routing = DeviceRouting::upload(&gpu, &align_block_size(&[0, 1, 2, 3], e, op.block_m).unwrap()).unwrap();
    let err = op.launch(&gpu, &x, w, &routing, &mut act).unwrap_err();
    assert!(err.to_string().contains(&format!("x has {h} elements")), "{err}");
    let x = gpu.zeros::<u16>(2 * h).unwrap();
    let other = DeviceRouting::upload(&gpu, &align_block_size(&[0, 1, 2, 3], e, 2 * op.block_m).unwrap()).unwrap();
    let err = op.launch(&gpu, &x, w, &other, &mut act).unwrap_err();
    assert!(err.to_string().contains("routing of padded length"), "{err}");
    op.launch(&gpu, &x, w, &routing, &mut act).unwrap();
    gpu.sync().unwrap();
}
