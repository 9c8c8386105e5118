//! The search space of one template for one problem: every combination of its tunable
//! values, minus what violates a constraint (before compiling) or the device's limits (after,
//! from the cubin's resource report) — each pruned config with its reason. Also a sub-space
//! restriction (`--space`) and sharding.

use std::collections::BTreeMap;
use std::str::FromStr;

use mangrove_core::arch::Arch;
use mangrove_core::cache::CacheEntry;
use mangrove_core::template::{format_params, ParamRole, ParamSpec, Params, Template};

/// Why a config was not timed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum PruneReason {
    Constraint(String),
    Spills { stores: u32, loads: u32 },
    Registers { per_block: u64, limit: u64 },
    SharedMemory { bytes: u64, limit: u64 },
    ThreadsPerBlock { threads: u64, limit: u64 },
    CompileFailed(String),
}

impl PruneReason {
    /// The reason's kind, for summaries.
    pub fn kind(&self) -> &'static str {
        match self {
            PruneReason::Constraint(_) => "constraint",
            PruneReason::Spills { .. } => "spills",
            PruneReason::Registers { .. } => "registers",
            PruneReason::SharedMemory { .. } => "shared memory",
            PruneReason::ThreadsPerBlock { .. } => "threads per block",
            PruneReason::CompileFailed(_) => "compile failed",
        }
    }
}

impl std::fmt::Display for PruneReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PruneReason::Constraint(c) => write!(f, "constraint: {c}"),
            PruneReason::Spills { stores, loads } => write!(f, "spills {stores}/{loads} bytes"),
            PruneReason::Registers { per_block, limit } => write!(f, "{per_block} registers per block > {limit}"),
            PruneReason::SharedMemory { bytes, limit } => write!(f, "{bytes} B shared memory > {limit}"),
            PruneReason::ThreadsPerBlock { threads, limit } => write!(f, "{threads} threads per block > {limit}"),
            PruneReason::CompileFailed(e) => write!(f, "compile failed: {e}"),
        }
    }
}

/// Per-block limits of a device (read from the GPU, or the arch's known values).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct DeviceLimits {
    pub threads_per_block: u64,
    pub registers_per_block: u64,
    pub shared_per_block: u64,
}

impl DeviceLimits {
    /// Documented limits of an arch, for compile-only sweeps without that GPU.
    pub fn for_arch(arch: Arch) -> Self {
        let shared = match arch.cc {
            80 | 87 => 163 * 1024,
            86 | 89 | 120 | 121 => 99 * 1024,
            _ => 227 * 1024,
        };
        Self { threads_per_block: 1024, registers_per_block: 65536, shared_per_block: shared }
    }

    /// The reason `entry` cannot run well (or at all) on this device, if any.
    pub fn check(&self, entry: &CacheEntry) -> Option<PruneReason> {
        let r = &entry.resources;
        let threads: u64 = entry.launch.block.iter().map(|&b| b as u64).product();
        let smem = r.shared_bytes as u64 + entry.launch.shared_bytes as u64;
        if threads > self.threads_per_block {
            Some(PruneReason::ThreadsPerBlock { threads, limit: self.threads_per_block })
        } else if r.spills() {
            Some(PruneReason::Spills { stores: r.spill_stores, loads: r.spill_loads })
        } else if r.registers as u64 * threads > self.registers_per_block {
            Some(PruneReason::Registers { per_block: r.registers as u64 * threads, limit: self.registers_per_block })
        } else if smem > self.shared_per_block {
            Some(PruneReason::SharedMemory { bytes: smem, limit: self.shared_per_block })
        } else {
            None
        }
    }
}

/// A restriction of a sweep to some values of some tunables (`--space BULK=1 --space
/// STAGES=0,2,4`): the other tunables keep their whole range, the default is still timed as
/// the baseline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubSpace {
    pub only: BTreeMap<String, Vec<i64>>,
}

impl SubSpace {
    /// Parses `NAME=V1,V2,…` items; a name given twice is an error.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, String> {
        let mut only = BTreeMap::new();
        for item in items {
            let item = item.as_ref();
            let bad = |why: &str| format!("bad --space '{item}': {why} (expected NAME=V1,V2,…, e.g. BULK=1)");
            let (name, values) = item.split_once('=').ok_or_else(|| bad("no '='"))?;
            let values = values.split(',').map(|v| v.trim().parse::<i64>()).collect::<Result<Vec<_>, _>>().map_err(|_| bad("a value is not an integer"))?;
            if only.insert(name.trim().to_string(), values).is_some() {
                return Err(bad("the name is given twice"));
            }
        }
        Ok(Self { only })
    }

    /// Checks that every restricted name is a tunable of `template` and every value one it allows.
    pub fn check(&self, template: &Template) -> Result<(), String> {
        for (name, values) in &self.only {
            let spec = template.param(name).filter(|p| p.role == ParamRole::Tunable).ok_or_else(|| {
                format!("--space {name}: not a tunable of {} (tunables: {})", template.name(), tunable_names(template))
            })?;
            if let Some(v) = values.iter().find(|&&v| !spec.allows(v)) {
                return Err(format!("--space {name}={v}: {} allows {}", template.name(), spec.allowed_text()));
            }
        }
        Ok(())
    }

    /// The values of `spec` this sub-space keeps.
    fn values(&self, spec: &ParamSpec) -> Vec<i64> {
        let all = spec.values.clone().unwrap_or_else(|| vec![spec.default]);
        match self.only.get(&spec.name) {
            Some(keep) => all.into_iter().filter(|v| keep.contains(v)).collect(),
            None => all,
        }
    }
}

fn tunable_names(t: &Template) -> String {
    t.schema.params.iter().filter(|p| p.role == ParamRole::Tunable).map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
}

/// Every tunable combination for `problem` (problem params fixed) within `space`, in a
/// deterministic order: the valid ones, and the pruned ones with the violated constraint.
pub fn enumerate(template: &Template, problem: &Params, space: &SubSpace) -> (Vec<Params>, Vec<(Params, PruneReason)>) {
    let combos = template.tunable_combos(problem, |spec| space.values(spec));
    let mut valid = Vec::new();
    let mut pruned = Vec::new();
    for c in combos {
        match template.resolve(&c) {
            Ok(full) => valid.push(full),
            Err(e) => pruned.push((c, PruneReason::Constraint(e.to_string()))),
        }
    }
    (valid, pruned)
}

/// Shard `i` of `n` (0-based), for running one sweep on many GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

impl FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad shard '{s}': expected i/n with 0 <= i < n (e.g. 0/4)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

impl Shard {
    /// This shard's share of `items`: a deterministic partition by a stable hash of each
    /// config's canonical text, so every config lands in exactly one shard whatever the order.
    pub fn take(&self, items: Vec<Params>) -> Vec<Params> {
        items.into_iter().filter(|p| self.owns(p)).collect()
    }

    pub fn owns(&self, p: &Params) -> bool {
        let h = blake3::hash(format_params(p).as_bytes());
        let v = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
        (v % self.count as u64) as usize == self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mangrove_core::template::{parse_params, Catalog};

    fn gemv() -> Template {
        Catalog::embedded().get("ternary_gemv").unwrap().clone()
    }

    #[test]
    fn enumeration_prunes_by_constraint_with_reason() {
        let problem = parse_params(&["M=1", "N=3000", "K=1000"]).unwrap();
        let (valid, pruned) = enumerate(&gemv(), &problem, &SubSpace::default());
        assert_eq!(valid.len() + pruned.len(), 4 * 3 * 3 * 4 * 3);
        assert!(valid.iter().all(|p| p["VEC"] != 16 && p["N"] == 3000));
        assert!(!pruned.is_empty());
        assert!(pruned.iter().all(|(p, r)| p["VEC"] == 16 && matches!(r, PruneReason::Constraint(c) if c.contains("K % VEC"))));
    }

    #[test]
    fn a_sub_space_keeps_only_its_values() {
        let problem = parse_params(&["M=1", "N=3000", "K=1000"]).unwrap();
        let space = SubSpace::parse(&["THREADS=128,256", "UNROLL=1"]).unwrap();
        space.check(&gemv()).unwrap();
        let (valid, pruned) = enumerate(&gemv(), &problem, &space);
        let (all, all_pruned) = enumerate(&gemv(), &problem, &SubSpace::default());
        assert!(!valid.is_empty() && valid.len() < all.len() && pruned.len() < all_pruned.len());
        assert!(valid.iter().all(|p| [128, 256].contains(&p["THREADS"]) && p["UNROLL"] == 1));
        let kept: Vec<_> = all.into_iter().filter(|p| [128, 256].contains(&p["THREADS"]) && p["UNROLL"] == 1).collect();
        assert_eq!(valid, kept);
        assert!(SubSpace::parse(&["M=1"]).unwrap().check(&gemv()).unwrap_err().contains("not a tunable"));
        assert!(SubSpace::parse(&["THREADS=100"]).unwrap().check(&gemv()).unwrap_err().contains("allows"));
        assert!(SubSpace::parse(&["THREADS"]).unwrap_err().contains("no '='"));
        assert!(SubSpace::parse(&["THREADS=1", "THREADS=2"]).unwrap_err().contains("twice"));
    }

    #[test]
    fn shards_cover_every_config_exactly_once() {
        let (valid, _) = enumerate(&gemv(), &parse_params(&["N=2560", "K=2560"]).unwrap(), &SubSpace::default());
        for n in [1, 2, 3, 7] {
            let mut seen = std::collections::BTreeMap::new();
            for i in 0..n {
                for p in (Shard { index: i, count: n }).take(valid.clone()) {
                    *seen.entry(format_params(&p)).or_insert(0) += 1;
                }
            }
            assert_eq!(seen.len(), valid.len(), "n={n}");
            assert!(seen.values().all(|&c| c == 1), "n={n}");
        }
        let mut rev = valid.clone();
        rev.reverse();
        let s = Shard { index: 1, count: 3 };
        let mut a = s.take(valid);
        let mut b = s.take(rev);
        b.reverse();
        a.sort();
        b.sort();
        assert_eq!(a, b, "partition does not depend on order");
    }

    #[test]
    fn shard_parsing() {
        assert_eq!("2/4".parse::<Shard>().unwrap(), Shard { index: 2, count: 4 });
        for bad in ["4/4", "1", "a/b", "0/0", "-1/2"] {
            assert!(bad.parse::<Shard>().unwrap_err().contains("bad shard"), "{bad}");
        }
    }
}
