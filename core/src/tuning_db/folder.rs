//! Which tuning DB folder belongs to a GPU: takes the GPU present (its name) or the target
//! arch, gives a stable folder slug (`h200`, `h100-sxm`, `h100-pcie`, `rtx-4090`), the default
//! folder under `tuning_db/`, and the records of a loaded DB that were tuned on another GPU
//! or arch ([`foreign_records`]), which the callers warn about or, when strict, refuse.

use std::path::{Path, PathBuf};

use super::TuningDb;
use crate::arch::Arch;

/// What the kernels are for: the GPU present, or (none present) a target arch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A GPU of this marketing name (`NVIDIA H200`), of this arch.
    Gpu { name: String, arch: Arch },
    /// No GPU here: kernels for this arch (`cache bless --arch sm121`).
    Arch(Arch),
}

impl Target {
    /// The GPU's slug, or the arch's name (`sm121`).
    pub fn slug(&self) -> String {
        match self {
            Target::Gpu { name, .. } => gpu_slug(name),
            Target::Arch(a) => a.to_string(),
        }
    }

    fn arch(&self) -> Arch {
        match self {
            Target::Gpu { arch, .. } | Target::Arch(arch) => *arch,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Gpu { name, arch } => write!(f, "{name} ({arch})"),
            Target::Arch(a) => write!(f, "{a} (no GPU present)"),
        }
    }
}

/// Words of a GPU name that say nothing about which chip it is.
const NOISE: [&str; 5] = ["nvidia", "geforce", "tesla", "generation", "graphics"];

/// A folder name for a GPU: lowercase, no spaces, one chip and form factor per slug.
/// `NVIDIA H100 80GB HBM3` → `h100-sxm` (HBM3 H100s are SXM), `NVIDIA H100 PCIe` → `h100-pcie`,
/// `NVIDIA H100 NVL` → `h100-nvl`, `NVIDIA H200` → `h200`, `NVIDIA GeForce RTX 4090` →
/// `rtx-4090`, `NVIDIA A100-SXM4-80GB` → `a100-sxm`; memory sizes are dropped.
pub fn gpu_slug(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    let mut words: Vec<&str> = Vec::new();
    let mut form: Option<&str> = None;
    let mut hbm3 = false;
    for w in lower.split(|c: char| c.is_whitespace() || c == '-' || c == '_').filter(|w| !w.is_empty()) {
        let memory_size = w.ends_with("gb") && w[..w.len() - 2].chars().all(|c| c.is_ascii_digit());
        match w {
            _ if NOISE.contains(&w) || memory_size => {}
            "pcie" | "nvl" => form = Some(w),
            _ if w.starts_with("sxm") => form = Some("sxm"),
            _ if w.starts_with("hbm") => hbm3 |= w.starts_with("hbm3"),
            _ => words.push(w),
        }
    }
    // An H100 named only by its memory ("NVIDIA H100 80GB HBM3") is the SXM part.
    if form.is_none() && hbm3 && words.first() == Some(&"h100") {
        form = Some("sxm");
    }
    words.extend(form);
    let slug: String = words.join("-").chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    if slug.is_empty() { "unknown-gpu".into() } else { slug }
}

/// The arch of a GPU known by its slug's chip (`h100-sxm` → sm90), when mangrove knows it.
pub fn arch_of_gpu(name: &str) -> Option<Arch> {
    let slug = gpu_slug(name);
    let chip = slug.split('-').take(2).collect::<Vec<_>>();
    let cc = match chip.as_slice() {
        [c, ..] if c.starts_with("h100") || c.starts_with("h200") || c.starts_with("gh200") || c.starts_with("h800") => 90,
        [c, ..] if c.starts_with("a100") || c.starts_with("a800") || c.starts_with("a30") => 80,
        [c, ..] if c.starts_with("b200") || c.starts_with("gb200") || c.starts_with("b100") => 100,
        [c, ..] if c.starts_with("b300") || c.starts_with("gb300") => 103,
        [c, ..] if c.starts_with("l40") || c.starts_with("l4") => 89,
        [c, ..] if *c == "gb10" => 121,
        ["rtx", n] if n.starts_with("40") => 89,
        ["rtx", n] if n.starts_with("50") => 120,
        ["rtx", n] if n.starts_with("30") => 86,
        _ => return None,
    };
    Some(Arch { cc, specific: false })
}

/// How the default folder was chosen.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Chosen {
    /// `tuning_db/<gpu slug>`.
    Gpu,
    /// `tuning_db/<chip>`, the folder of the GPU's chip whatever its form factor (the shipped
    /// `tuning_db/h100` serves `h100-sxm`).
    Chip,
    /// `tuning_db/<arch>` (no GPU present, or no folder for it).
    Arch,
}

impl std::fmt::Display for Chosen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Chosen::Gpu => "the folder of this GPU",
            Chosen::Chip => "the folder of this GPU's chip",
            Chosen::Arch => "the folder of the target arch",
        })
    }
}

/// The folder under `root` the target's kernels default to, and how it was chosen; None when
/// no such folder exists.
pub fn default_folder(root: &Path, target: &Target) -> Option<(PathBuf, Chosen)> {
    let mut candidates = Vec::new();
    if let Target::Gpu { name, .. } = target {
        let slug = gpu_slug(name);
        let chip = slug.split('-').next().unwrap_or(&slug).to_string();
        candidates.push((root.join(&slug), Chosen::Gpu));
        if chip != slug {
            candidates.push((root.join(chip), Chosen::Chip));
        }
    }
    candidates.push((root.join(target.arch().to_string()), Chosen::Arch));
    candidates.into_iter().find(|(dir, _)| dir.is_dir())
}

/// Records of a DB tuned on one GPU that is not the target.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Foreign {
    /// The GPU the records name in their provenance.
    pub tuned_on: String,
    /// Number of records (over all templates and the probe) it tuned.
    pub records: usize,
}

/// The records of `db` tuned on a GPU other than `target` (for an arch target: on a GPU of
/// another arch, where mangrove knows that GPU's arch), grouped by GPU. Records without a GPU
/// (CPU sweeps, unknown provenance) are not counted.
pub fn foreign_records(db: &TuningDb, target: &Target) -> Vec<Foreign> {
    let names = db.templates.values().flat_map(|t| t.records.iter().map(|r| &r.provenance.gpu_name)).chain(db.gates.iter().map(|g| &g.provenance.gpu_name));
    let mut out: Vec<Foreign> = Vec::new();
    for name in names.filter(|n| !n.is_empty() && n.as_str() != "none") {
        let foreign = match target {
            Target::Gpu { name: here, .. } => gpu_slug(name) != gpu_slug(here),
            Target::Arch(a) => arch_of_gpu(name).is_some_and(|b| b.cc != a.cc),
        };
        if !foreign {
            continue;
        }
        match out.iter_mut().find(|f| &f.tuned_on == name) {
            Some(f) => f.records += 1,
            None => out.push(Foreign { tuned_on: name.clone(), records: 1 }),
        }
    }
    out
}

/// A DB folder whose records were tuned on another GPU or arch: a warning, or under
/// `--strict` the reason to refuse it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("tuning DB {} was tuned on {}, not on {target}; {}", dir.display(), list(foreign), if *strict { "pass a folder tuned for it with --tuning-db, or drop --strict to run with it" } else { "its kernels may be slower here (--strict refuses it)" })]
pub struct ForeignDb {
    pub dir: PathBuf,
    pub target: String,
    pub foreign: Vec<Foreign>,
    /// Whether this refuses the folder (`--strict`) rather than warns.
    pub strict: bool,
}

fn list(foreign: &[Foreign]) -> String {
    foreign.iter().map(|f| format!("{} ({} records)", f.tuned_on, f.records)).collect::<Vec<_>>().join(", ")
}

/// Checks the DB in `dir` against `target`: Ok(None) when every record matches, Ok(warning)
/// when some came from another GPU or arch, Err when they did and `strict`.
pub fn check(db: &TuningDb, dir: &Path, target: &Target, strict: bool) -> Result<Option<ForeignDb>, ForeignDb> {
    let foreign = foreign_records(db, target);
    if foreign.is_empty() {
        return Ok(None);
    }
    let e = ForeignDb { dir: dir.to_path_buf(), target: target.to_string(), foreign, strict };
    if strict {
        Err(e)
    } else {
        Ok(Some(e))
    }
}

/// Where the shipped per-GPU folders live, relative to the working directory.
pub const ROOT: &str = "tuning_db";

impl Target {
    /// The GPU present (device 0), else `arch` alone. A GPU that fails to open (rather than
    /// being absent) counts as absent here: the backend that needs it reports the error.
    pub fn present(arch: Arch) -> Target {
        match crate::gpu::Gpu::open_optional(0) {
            Ok(Ok(g)) => Target::Gpu { name: g.info().name.clone(), arch: g.info().arch },
            _ => Target::Arch(arch),
        }
    }
}

/// The DB folder a command uses and what was found out choosing it.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub dir: PathBuf,
    /// How it was chosen when no folder was named (None: named on the command line).
    pub chosen: Option<Chosen>,
    /// Records tuned on another GPU or arch (a warning; `strict` makes it an error).
    pub foreign: Option<ForeignDb>,
}

/// Errors choosing a DB folder.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Foreign(#[from] ForeignDb),
    #[error(transparent)]
    Db(#[from] super::DbError),
}

/// The folder named (`flag`), else the target's default under `root`; None when neither
/// exists. Its records are checked against `target` ([`check`]).
pub fn resolve(flag: Option<&Path>, root: &Path, target: &Target, strict: bool) -> Result<Option<Resolved>, ResolveError> {
    let (dir, chosen) = match flag {
        Some(d) => (d.to_path_buf(), None),
        None => match default_folder(root, target) {
            Some((d, c)) => (d, Some(c)),
            None => return Ok(None),
        },
    };
    let foreign = check(&TuningDb::load(&dir)?, &dir, target, strict)?;
    Ok(Some(Resolved { dir, chosen, foreign }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{Deltas, Gate};
    use crate::tuning_db::{Provenance, Record, Timed};

    #[test]
    fn slugs_are_stable_lowercase_and_tell_form_factors_apart() {
        for (name, slug) in [
            ("NVIDIA H200", "h200"),
            ("NVIDIA H100 80GB HBM3", "h100-sxm"),
            ("NVIDIA H100 PCIe", "h100-pcie"),
            ("NVIDIA H100 NVL", "h100-nvl"),
            ("NVIDIA GeForce RTX 4090", "rtx-4090"),
            ("NVIDIA A100-SXM4-80GB", "a100-sxm"),
            ("NVIDIA A100 80GB PCIe", "a100-pcie"),
            ("NVIDIA RTX 6000 Ada Generation", "rtx-6000-ada"),
            ("NVIDIA L40S", "l40s"),
            ("NVIDIA GB10", "gb10"),
        ] {
            assert_eq!(gpu_slug(name), slug, "{name}");
        }
        assert_eq!(gpu_slug(""), "unknown-gpu");
        assert_eq!(arch_of_gpu("NVIDIA H100 80GB HBM3"), Some(Arch::SM90));
        assert_eq!(arch_of_gpu("NVIDIA GeForce RTX 4090").map(|a| a.cc), Some(89));
        assert_eq!(arch_of_gpu("NVIDIA GB10").map(|a| a.cc), Some(121));
        assert_eq!(arch_of_gpu("Some Card"), None);
    }

    fn gpu(name: &str) -> Target {
        Target::Gpu { name: name.into(), arch: Arch::SM90 }
    }

    #[test]
    fn the_default_folder_follows_the_gpu_then_its_chip_then_the_arch() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for d in ["h200", "h100", "sm121"] {
            std::fs::create_dir(r.join(d)).unwrap();
        }
        assert_eq!(default_folder(r, &gpu("NVIDIA H200")), Some((r.join("h200"), Chosen::Gpu)));
        // The shipped tuning_db/h100 still serves the SXM and PCIe parts.
        assert_eq!(default_folder(r, &gpu("NVIDIA H100 80GB HBM3")), Some((r.join("h100"), Chosen::Chip)));
        assert_eq!(default_folder(r, &gpu("NVIDIA H100 PCIe")), Some((r.join("h100"), Chosen::Chip)));
        std::fs::create_dir(r.join("h100-pcie")).unwrap();
        assert_eq!(default_folder(r, &gpu("NVIDIA H100 PCIe")), Some((r.join("h100-pcie"), Chosen::Gpu)));
        assert_eq!(default_folder(r, &Target::Arch("sm121".parse().unwrap())), Some((r.join("sm121"), Chosen::Arch)));
        assert_eq!(default_folder(r, &Target::Arch(Arch::SM80)), None);
        assert_eq!(default_folder(r, &gpu("NVIDIA GeForce RTX 4090")), None, "no folder of its own and none for sm90");
    }

    fn db_tuned_on(names: &[&str]) -> TuningDb {
        let mut db = TuningDb::default();
        for (i, n) in names.iter().enumerate() {
            let winner = Timed { params: [("THREADS".to_string(), 64)].into(), median_us: 1.0, p95_us: 1.0, mean_us: 1.0, gb_s: 1.0, frac_copy_bw: 0.1, deltas: Deltas::default() };
            let mut r = Record {
                problem: [("N".to_string(), 64 + i as i64), ("K".to_string(), 64)].into(),
                m: 1,
                winner,
                runner_ups: vec![],
                candidates: 1,
                pruned: 0,
                rejected: 0,
                timed: 1,
                strategy: "exhaustive".into(),
                gate: Gate { max_abs: 0.08, max_rel: 0.25, rel_floor: 0.05 },
                copy_bw_gbs: 1.0,
                default_us: None,
                baseline: None,
                provenance: Provenance::default(),
                merged_from: Vec::new(),
            };
            r.provenance.gpu_name = n.to_string();
            db.upsert("t", r, super::super::NoiseMargin::DEFAULT);
        }
        db
    }

    #[test]
    fn resolve_takes_the_flag_else_the_default_and_checks_it() {
        let root = tempfile::tempdir().unwrap();
        let h100 = root.path().join("h100");
        db_tuned_on(&["NVIDIA H100 80GB HBM3"]).save(&h100).unwrap();
        let sxm = gpu("NVIDIA H100 80GB HBM3");
        let r = resolve(None, root.path(), &sxm, true).unwrap().unwrap();
        assert_eq!((r.dir, r.chosen, r.foreign.is_none()), (h100.clone(), Some(Chosen::Chip), true));
        let r = resolve(Some(&h100), root.path(), &gpu("NVIDIA H200"), false).unwrap().unwrap();
        assert_eq!(r.chosen, None);
        assert!(r.foreign.is_some_and(|f| !f.strict));
        assert!(matches!(resolve(Some(&h100), root.path(), &gpu("NVIDIA H200"), true), Err(ResolveError::Foreign(_))));
        assert!(resolve(None, root.path(), &gpu("NVIDIA H200"), true).unwrap().is_none());
    }

    #[test]
    fn records_of_another_gpu_warn_or_with_strict_refuse() {
        let h100 = db_tuned_on(&["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3", "none"]);
        let dir = Path::new("tuning_db/h100");
        assert!(check(&h100, dir, &gpu("NVIDIA H100 80GB HBM3"), true).unwrap().is_none());
        let warn = check(&h100, dir, &gpu("NVIDIA H200"), false).unwrap().unwrap().to_string();
        assert!(warn.contains("tuned on NVIDIA H100 80GB HBM3 (2 records), not on NVIDIA H200 (sm90)") && warn.contains("--strict refuses"), "{warn}");
        let refused = check(&h100, dir, &gpu("NVIDIA H200"), true).unwrap_err();
        assert_eq!(refused.foreign, vec![Foreign { tuned_on: "NVIDIA H100 80GB HBM3".into(), records: 2 }]);
        assert!(refused.to_string().contains("--tuning-db"), "{refused}");
        // No GPU: an H100 DB is foreign to sm121, not to sm90.
        assert!(check(&h100, dir, &Target::Arch("sm121".parse().unwrap()), true).is_err());
        assert!(check(&h100, dir, &Target::Arch(Arch::SM90), true).unwrap().is_none());
    }
}
