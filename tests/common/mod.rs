//! Shared set-up for integration tests: a JIT over a fresh sled cache in a temp folder.
#![allow(dead_code)]

pub mod server;

use std::path::Path;

use mangrove::arch::Arch;
use mangrove::check::Gate;
use mangrove::gpu::Gpu;
use mangrove::jit::{Jit, KernelRequest};
use mangrove::template::{format_params, parse_params, Catalog};
use mangrove::validate::check_entry;

/// A JIT with the embedded catalog over a sled cache in `dir`. NVRTC must be installed
/// (scripts/test installs it); its absence fails the test with the install hint.
pub fn jit_in(dir: &Path) -> Jit {
    jit_with(Catalog::embedded(), dir)
}

pub fn jit_with(catalog: Catalog, dir: &Path) -> Jit {
    Jit::open(catalog, dir, false).unwrap_or_else(|e| panic!("{e}"))
}

/// A ternary_gemv request with `NAME=VALUE` overrides.
pub fn gemv(arch: Arch, params: &[&str]) -> KernelRequest {
    KernelRequest { template: "ternary_gemv".into(), params: parse_params(params).unwrap(), arch }
}

/// A `template` request with whitespace-separated `NAME=VALUE` parameters.
pub fn request(arch: Arch, template: &str, params: &str) -> KernelRequest {
    let p: Vec<&str> = params.split_whitespace().collect();
    KernelRequest { template: template.into(), params: parse_params(&p).unwrap(), arch }
}

/// Compiles `reqs` and checks each once against its f64 reference (`check_entry`, seed
/// `seed0 + i`), printing its deltas and resources; returns the configs that miss [`GPU_GATE`]
/// or `max_rel`.
pub fn failed_checks(gpu: &Gpu, reqs: &[KernelRequest], seed0: u64, max_rel: f64) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let jit = jit_in(dir.path());
    let mut failures = Vec::new();
    for (i, f) in jit.get_many(reqs).into_iter().enumerate() {
        let f = f.unwrap_or_else(|e| panic!("{e}"));
        let what = format!("{} {}", f.entry.inputs.template, format_params(&f.entry.inputs.params));
        let d = check_entry(gpu, &f.entry, seed0 + i as u64, GPU_GATE.rel_floor).unwrap_or_else(|e| panic!("{what}: {e}")).deltas;
        let r = &f.entry.resources;
        println!("{what}: {d} regs={} spills={} smem={}", r.registers, r.spill_stores, f.entry.launch.shared_bytes);
        if !d.passes(&GPU_GATE) || d.max_rel > max_rel {
            failures.push(format!("{what}: {d}"));
        }
    }
    failures
}

/// The gate GPU tests hold kernels to: bf16 output rounding (2^-8) with margin.
pub const GPU_GATE: Gate = mangrove::check::DEPLOY_GATE;

/// The GPU, or None with "skipped: no GPU" (a failure when MANGROVE_REQUIRE_GPU=1).
pub fn gpu_or_skip() -> Option<Gpu> {
    match Gpu::open_optional(0).unwrap_or_else(|e| panic!("{e}")) {
        Ok(g) => Some(g),
        Err(absent) => {
            if std::env::var("MANGROVE_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("MANGROVE_REQUIRE_GPU=1 but {absent}");
            }
            eprintln!("skipped: no GPU ({absent})");
            None
        }
    }
}

/// Re-blesses bundle `dir` into `root/partial` without its kernel number `index`: a complete,
/// valid bundle that lacks one planned kernel. Returns the new folder and the dropped kernel.
pub fn bundle_without(dir: &Path, root: &Path, index: usize) -> (std::path::PathBuf, mangrove::bundle::ManifestKernel) {
    use mangrove::bundle::{self, Bundle};
    let b = Bundle::open(dir).unwrap();
    let dropped = b.manifest.kernels[index].clone();
    let items = b
        .entries()
        .unwrap()
        .into_iter()
        .filter(|e| e.inputs.key().to_hex() != dropped.key)
        .map(|entry| bundle::BlessItem { entry, family: None, m: None, db_rule: None, gpu_check: None })
        .collect();
    let partial = root.join("partial");
    bundle::write(&partial, b.manifest.arch, Default::default(), items).unwrap();
    (partial, dropped)
}
