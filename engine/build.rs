//! Build-time switch for the AVX-512 VNNI kernel: its intrinsics and `target_feature` names are
//! stable from rustc 1.89, while the crate's MSRV is 1.85. With an older compiler the path is
//! compiled out (`Isa::Avx512Vnni` then reports itself unsupported and AVX-VNNI / AVX2 run).

use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(mangrove_avx512)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=RUSTC");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let minor = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        // "rustc 1.95.0 (59807616e 2026-04-14)"
        .and_then(|v| v.split_whitespace().nth(1).and_then(|ver| ver.split('.').nth(1)).and_then(|m| m.parse::<u32>().ok()));
    if minor.is_some_and(|m| m >= 89) {
        println!("cargo::rustc-cfg=mangrove_avx512");
    }
}
