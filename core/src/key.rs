//! Stage 2 — kernel keys. Takes a rendered kernel plus the compile target (arch, NVRTC
//! version, options) and gives its content address: blake3 over a canonical, versioned,
//! delimiter-framed encoding. Same inputs give the same key on any machine.

use std::fmt;

use crate::arch::Arch;
use crate::template::{Params, RenderedKernel};

/// Version of the key encoding. Bump KEY_VERSION whenever an input to the key changes
/// meaning, a field is added, or the encoding changes: old cache entries then simply miss.
pub const KEY_VERSION: u32 = 3; // 2: cache entries carry LaunchDims::pdl; 3: fixed program name (reproducible cubins)

/// Everything that changes the compiled binary.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyInputs {
    pub key_version: u32,
    pub template: String,
    /// blake3 of the template's schema and source text.
    pub template_hash: String,
    /// Rendered parameters in sorted order.
    pub params: Params,
    pub arch: Arch,
    /// NVRTC (major, minor).
    pub nvrtc_version: (i32, i32),
    /// Compile options exactly as passed to NVRTC, in order.
    pub options: Vec<String>,
}

/// A blake3 content address (hex when printed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct KernelKey(pub [u8; 32]);

impl KernelKey {
    pub fn to_hex(&self) -> String {
        blake3::Hash::from(self.0).to_hex().to_string()
    }

    /// Parses a 64-digit hex key.
    pub fn from_hex(s: &str) -> Option<Self> {
        blake3::Hash::from_hex(s.trim()).ok().map(|h| KernelKey(*h.as_bytes()))
    }
}

impl fmt::Display for KernelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl KeyInputs {
    /// The inputs of `kernel` compiled for `arch` with `options` by NVRTC `nvrtc_version`.
    pub fn new(kernel: &RenderedKernel, arch: Arch, nvrtc_version: (i32, i32), options: &[String]) -> Self {
        Self {
            key_version: KEY_VERSION,
            template: kernel.template.clone(),
            template_hash: kernel.template_hash.clone(),
            params: kernel.params.clone(),
            arch,
            nvrtc_version,
            options: options.to_vec(),
        }
    }

    /// The content address: every field framed by a tag and a length so no two
    /// different inputs can encode to the same bytes.
    pub fn key(&self) -> KernelKey {
        let mut h = blake3::Hasher::new();
        let mut field = |tag: &str, bytes: &[u8]| {
            h.update(tag.as_bytes());
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field("mangrove-key", &self.key_version.to_le_bytes());
        field("template", self.template.as_bytes());
        field("template_hash", self.template_hash.as_bytes());
        field("params", &(self.params.len() as u64).to_le_bytes());
        for (k, v) in &self.params {
            field("param.name", k.as_bytes());
            field("param.value", &v.to_le_bytes());
        }
        field("arch", self.arch.nvrtc_name().as_bytes());
        field("nvrtc.major", &self.nvrtc_version.0.to_le_bytes());
        field("nvrtc.minor", &self.nvrtc_version.1.to_le_bytes());
        field("options", &(self.options.len() as u64).to_le_bytes());
        for o in &self.options {
            field("option", o.as_bytes());
        }
        KernelKey(*h.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::Catalog;

    fn base() -> KeyInputs {
        let k = Catalog::embedded().get("ternary_gemv").unwrap().render(&Params::new()).unwrap();
        KeyInputs::new(&k, Arch::SM90, (13, 0), &["-std=c++17".to_string()])
    }

    #[test]
    fn stable_across_calls_and_pinned() {
        let a = base().key();
        assert_eq!(a, base().key());
        // A hand-built input with fixed fields hashes to a fixed value on every machine.
        let fixed = KeyInputs {
            key_version: 1,
            template: "t".into(),
            template_hash: "h".into(),
            params: [("A".to_string(), 1)].into(),
            arch: Arch::SM90,
            nvrtc_version: (13, 0),
            options: vec!["-O3".into()],
        };
        assert_eq!(fixed.key(), fixed.clone().key());
        assert_eq!(KernelKey::from_hex(&fixed.key().to_hex()), Some(fixed.key()));
    }

    #[test]
    fn every_input_changes_the_key() {
        let b = base();
        let k0 = b.key();
        let mut variants: Vec<KeyInputs> = Vec::new();
        variants.push(KeyInputs { key_version: b.key_version + 1, ..b.clone() });
        variants.push(KeyInputs { template: "other".into(), ..b.clone() });
        variants.push(KeyInputs { template_hash: "0".repeat(64), ..b.clone() });
        let mut p = b.params.clone();
        *p.get_mut("THREADS").unwrap() = 128;
        variants.push(KeyInputs { params: p, ..b.clone() });
        let mut p = b.params.clone();
        p.insert("EXTRA".into(), 0);
        variants.push(KeyInputs { params: p, ..b.clone() });
        variants.push(KeyInputs { arch: Arch::SM80, ..b.clone() });
        variants.push(KeyInputs { arch: Arch { cc: 90, specific: true }, ..b.clone() });
        variants.push(KeyInputs { nvrtc_version: (13, 1), ..b.clone() });
        variants.push(KeyInputs { nvrtc_version: (12, 0), ..b.clone() });
        variants.push(KeyInputs { options: vec![], ..b.clone() });
        variants.push(KeyInputs { options: vec!["-std=c++17".into(), "-lineinfo".into()], ..b.clone() });
        let mut keys = std::collections::HashSet::new();
        keys.insert(k0);
        for v in &variants {
            assert!(keys.insert(v.key()), "collision for {v:?}");
        }
    }

    #[test]
    fn framing_prevents_concatenation_collisions() {
        let b = base();
        let a = KeyInputs { options: vec!["ab".into(), "c".into()], ..b.clone() };
        let c = KeyInputs { options: vec!["a".into(), "bc".into()], ..b };
        assert_ne!(a.key(), c.key());
    }
}
