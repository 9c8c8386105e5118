//! The value stored under a kernel key: cubin, optional PTX, resources, provenance and the
//! blake3 of the cubin that every read re-checks.

use crate::compile::{CompiledKernel, ResourceReport};
use crate::key::KeyInputs;
use crate::template::LaunchDims;

/// Toolchain that produced an entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Toolchain {
    pub nvrtc_version: (i32, i32),
    pub mangrove_version: String,
}

/// One cached kernel.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CacheEntry {
    pub inputs: KeyInputs,
    pub entry: String,
    pub launch: LaunchDims,
    pub cubin: Vec<u8>,
    pub ptx: Option<String>,
    pub resources: ResourceReport,
    pub compile_ms: f64,
    pub toolchain: Toolchain,
    /// blake3 of `cubin`, written at insert and checked at every read.
    pub blob_blake3: [u8; 32],
    pub created_unix: u64,
}

impl CacheEntry {
    /// Builds an entry from a fresh compile.
    pub fn new(inputs: KeyInputs, entry: String, launch: LaunchDims, c: CompiledKernel) -> Self {
        Self {
            toolchain: Toolchain {
                nvrtc_version: inputs.nvrtc_version,
                mangrove_version: env!("CARGO_PKG_VERSION").into(),
            },
            inputs,
            entry,
            launch,
            blob_blake3: *blake3::hash(&c.cubin).as_bytes(),
            cubin: c.cubin,
            ptx: c.ptx,
            resources: c.resources,
            compile_ms: c.compile_ms,
            created_unix: now_unix(),
        }
    }

    /// True when the cubin still hashes to the recorded digest.
    pub fn blob_intact(&self) -> bool {
        *blake3::hash(&self.cubin).as_bytes() == self.blob_blake3
    }
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
