//! CPU-side costs of the JIT path that every kernel request pays: render, key, cache hit
//! (sled read + blake3 re-check), and the f64 reference GEMV the correctness gate runs.
//! GPU numbers come from `mangrove-tune bench` and `mangrove warm` on the device.

use criterion::{criterion_group, criterion_main, Criterion};
use mangrove::arch::Arch;
use mangrove::cache::Cache;
use mangrove::compile::Compiler;
use mangrove::jit::{Jit, KernelRequest};
use mangrove::key::KeyInputs;
use mangrove::template::{Catalog, Params};
use mangrove::validate::TernaryProblem;

fn jit_path(c: &mut Criterion) {
    let catalog = Catalog::embedded();
    let t = catalog.get("ternary_gemv").unwrap();
    let params: Params = [("M".to_string(), 4), ("N".to_string(), 2560), ("K".to_string(), 2560)].into();
    c.bench_function("render ternary_gemv", |b| b.iter(|| t.render(&params).unwrap()));
    let kernel = t.render(&params).unwrap();
    let opts = Compiler::options(Arch::SM90);
    c.bench_function("key of a rendered kernel", |b| b.iter(|| KeyInputs::new(&kernel, Arch::SM90, (13, 0), &opts).key()));

    if let Ok(compiler) = Compiler::open() {
        let dir = tempfile::tempdir().unwrap();
        let jit = Jit { catalog: catalog.clone(), cache: Cache::open(dir.path()).unwrap(), compiler, keep_ptx: false };
        let req = KernelRequest { template: "ternary_gemv".into(), params: params.clone(), arch: Arch::SM90 };
        jit.get(&req).unwrap(); // compile once
        c.bench_function("cache hit (render + key + sled read + blake3)", |b| b.iter(|| jit.get(&req).unwrap()));
    } else {
        eprintln!("NVRTC not found: skipping the cache-hit bench (scripts/install-nvrtc installs it)");
    }

    let prob = TernaryProblem::random(1, 2560, 2560, 1);
    c.bench_function("f64 reference GEMV 2560x2560 M=1", |b| b.iter(|| prob.reference()));
}

criterion_group!(benches, jit_path);
criterion_main!(benches);
