//! Shared set-up for integration tests: a JIT over a fresh sled cache in a temp folder.
#![allow(dead_code)]

use std::path::Path;

use mangrove::arch::Arch;
use mangrove::cache::Cache;
use mangrove::compile::Compiler;
use mangrove::jit::{Jit, KernelRequest};
use mangrove::template::{parse_params, Catalog};

/// A JIT with the embedded catalog over a sled cache in `dir`. NVRTC must be installed
/// (scripts/test installs it); its absence fails the test with the install hint.
pub fn jit_in(dir: &Path) -> Jit {
    jit_with(Catalog::embedded(), dir)
}

pub fn jit_with(catalog: Catalog, dir: &Path) -> Jit {
    let compiler = Compiler::open().unwrap_or_else(|e| panic!("{e}"));
    Jit { catalog, cache: Cache::open(dir).unwrap(), compiler, keep_ptx: false }
}

/// A ternary_gemv request with `NAME=VALUE` overrides.
pub fn gemv(arch: Arch, params: &[&str]) -> KernelRequest {
    KernelRequest { template: "ternary_gemv".into(), params: parse_params(params).unwrap(), arch }
}
