//! GPU tests (H100 via scripts/gpu-check): the decode step's row-wise op kernels that
//! `mangrove-tune decode-ops` sweeps, each config against the f64 reference on fresh random
//! inputs (`rmsnorm_quant`: residual add or gated activation, norm, int8 rows; attention: three
//! sequences up to the full context). Without a GPU they report "skipped: no GPU".

mod common;

/// f32 kernels against f64: an f32 simulation of the attention's accumulation order gives
/// max_rel ~2e-4 at 4096 positions; 1e-3 is ten times under the shared gate.
const MAX_REL: f64 = 1e-3;

#[test]
fn rmsnorm_quant_configs_match_f64_reference() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let arch = gpu.info().arch;
    let mut reqs = Vec::new();
    for threads in [128, 256, 512, 1024] {
        reqs.push(common::request(arch, "rmsnorm_quant", &format!("H=2560 GLU=0 THREADS={threads}")));
        reqs.push(common::request(arch, "rmsnorm_quant", &format!("H=6912 GLU=1 ACT=0 THREADS={threads}")));
    }
    reqs.push(common::request(arch, "rmsnorm_quant", "H=1408 GLU=1 ACT=1 NORM=0 THREADS=256"));
    reqs.push(common::request(arch, "rmsnorm_quant", "H=64 GLU=0 THREADS=128"));
    let failures = common::failed_checks(&gpu, &reqs, 2000, MAX_REL);
    assert!(failures.is_empty(), "{} of {} failed:\n{}", failures.len(), reqs.len(), failures.join("\n"));
}

#[test]
fn attention_configs_match_f64_reference() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let arch = gpu.info().arch;
    let mut reqs = Vec::new();
    let mut i = 0;
    for splits in [1, 2, 8, 32] {
        for min_chunk in [16, 128] {
            let threads = [64, 128, 256, 512][i % 4];
            reqs.push(common::request(arch, "attention_decode", &format!("QH=20 KVH=5 HD=128 MAX_POS=4096 SPLITS={splits} MIN_CHUNK={min_chunk} THREADS={threads}")));
            i += 1;
        }
    }
    reqs.push(common::request(arch, "attention_decode", "QH=4 KVH=2 HD=32 MAX_POS=256 SPLITS=4 MIN_CHUNK=16 THREADS=64"));
    let failures = common::failed_checks(&gpu, &reqs, 2000, MAX_REL);
    assert!(failures.is_empty(), "{} of {} failed:\n{}", failures.len(), reqs.len(), failures.join("\n"));
}
