//! Stage 7 — the tuning DB. Takes tuner results and gives the engine its kernel configs:
//! `tuning_db/<gpu>/<template>.json`, human-readable, deterministic order, schema-versioned;
//! one record per (template, problem shape, M bucket) with the winner, its timings, the
//! runner-ups, rejection counts and reproducibility metadata. Also merge and lookup.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::check::{Deltas, Gate};
use crate::template::Params;

pub mod folder;

/// Bump when the record format changes meaning.
pub const DB_SCHEMA_VERSION: u32 = 1;

/// M buckets the tuners use by default.
pub const M_BUCKETS: &[i64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512];

/// Errors reading or writing a tuning DB, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("tuning DB {path}")]
    Io { path: String, source: std::io::Error },
    #[error("tuning DB {path} is not valid")]
    Parse { path: String, source: serde_json::Error },
    #[error("tuning DB {path} has schema version {found}, this mangrove reads {DB_SCHEMA_VERSION}")]
    Version { path: String, found: u32 },
}

/// Where a number came from: enough to reproduce or distrust it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Provenance {
    pub gpu_name: String,
    pub sm_count: i32,
    /// The CUDA version the driver supports (cuDriverGetVersion, e.g. 13000 for 13.0).
    pub driver_version: i32,
    /// The kernel driver's release (e.g. "580.65.06", from /proc/driver/nvidia/version); empty
    /// where it cannot be read, and in records made before mangrove wrote this field.
    #[serde(default)]
    pub driver_release: String,
    pub nvrtc_version: (i32, i32),
    pub mangrove_version: String,
    pub git_sha: String,
    pub sm_clock_mhz: i32,
    pub mem_clock_mhz: i32,
    pub date: String,
    pub command: String,
    /// How kernels were timed, e.g. "cuda-graph replays, programmatic dependent launch"
    /// (empty: not recorded, in records made before mangrove wrote this field).
    #[serde(default)]
    pub timing: String,
}

/// A timed config.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Timed {
    pub params: Params,
    pub median_us: f64,
    pub p95_us: f64,
    pub mean_us: f64,
    pub gb_s: f64,
    /// Achieved bytes/s over the device's measured copy bandwidth.
    pub frac_copy_bw: f64,
    pub deltas: Deltas,
}

/// One tuned (template, problem, M bucket).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// Problem parameters other than M (e.g. N, K).
    pub problem: Params,
    pub m: i64,
    pub winner: Timed,
    /// Next best configs, fastest first.
    pub runner_ups: Vec<Timed>,
    pub candidates: usize,
    pub pruned: usize,
    pub rejected: usize,
    pub timed: usize,
    pub strategy: String,
    pub gate: Gate,
    pub copy_bw_gbs: f64,
    /// The template's default config timed on the same workload (the "untuned" baseline).
    pub default_us: Option<f64>,
    /// Why the baseline of `default_us` is not the template default (its defaults violate a
    /// constraint of this problem, so the first valid config stood in), when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    pub provenance: Provenance,
    /// Fingerprints of the tuner records merged into this one (empty: it is one tuner record,
    /// its own fingerprint). A merge that brings no new fingerprint changes nothing, so merging
    /// the same folders again never double-counts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<String>,
}

impl Record {
    /// The fingerprints this record stands for: its sources, or its own content hash.
    pub fn fingerprints(&self) -> Vec<String> {
        if !self.merged_from.is_empty() {
            return self.merged_from.clone();
        }
        // Records hold only numbers, strings and ordered maps: their JSON is canonical.
        let json = serde_json::to_vec(self).expect("a record serializes");
        vec![blake3::hash(&json).to_hex()[..16].to_string()]
    }
}

/// Outcome of the M>1 linear probe for one (M, N, K).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GateRecord {
    /// The template of the M>1 path probed (records written before the tensor-core GEMM probed
    /// the chunked GEMVs).
    #[serde(default = "gemv_gate_template")]
    pub template: String,
    pub m: i64,
    pub n: i64,
    pub k: i64,
    pub passed: bool,
    pub status: String,
    pub reference: String,
    pub deltas: Option<Deltas>,
    pub params: Params,
    pub avg_us: f64,
    pub p50_us: f64,
    pub p95_us: f64,
    pub provenance: Provenance,
}

fn gemv_gate_template() -> String {
    "ternary_gemv".into()
}

/// One template's file.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TemplateDb {
    pub schema_version: u32,
    pub template: String,
    pub records: Vec<Record>,
}

/// The probe-mgt1 file.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GateDb {
    pub schema_version: u32,
    pub records: Vec<GateRecord>,
}

/// How a lookup found its config.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum LookupRule {
    /// A record for exactly this M.
    Exact,
    /// The smallest tuned M above, else the largest below.
    NearestBucket { tuned_m: i64 },
    /// Nothing tuned for this problem: the template's defaults.
    Default,
    /// An op no tuner run covers (norms, RoPE, attention, LM head): its template defaults by
    /// design, not a fallback.
    Fixed,
}

/// A config chosen for a problem.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Choice {
    /// Tunable params of the chosen record (empty for Default).
    pub params: Params,
    pub rule: LookupRule,
}

/// A merge conflict: two sources tuned the same key to different winners.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Conflict {
    pub template: String,
    pub problem: Params,
    pub m: i64,
    pub kept_us: f64,
    pub dropped_us: f64,
    /// How much faster the challenger (the record merged in) was than the incumbent, in % of
    /// the incumbent (negative: slower).
    pub gain_pct: f64,
    /// The challenger's measured spread, (p95 − median) / median in %: its run-to-run noise.
    pub spread_pct: f64,
    /// Which record stayed, and why.
    pub kept: Kept,
}

/// Which of two records for one key a merge keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kept {
    /// The record already there: the challenger was slower.
    Incumbent,
    /// The record already there: the challenger was faster, but by less than the noise margin.
    IncumbentWithinMargin,
    /// The challenger: faster by more than the noise margin.
    Challenger,
}

/// How much faster a challenger must be to replace an incumbent: a record already in the DB (a
/// shipped one, another run's) or a template's default config. Medians of one config move by a
/// few percent between runs, so a smaller gain is noise and would only churn the DB.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NoiseMargin {
    /// The gain needed, as a fraction of the incumbent's time (0.05: 5 % faster).
    pub fraction: f64,
}

impl NoiseMargin {
    /// 5 %: a default flips only on a ≥ 5 % gain (seed 002).
    pub const DEFAULT: NoiseMargin = NoiseMargin { fraction: 0.05 };
    /// Any faster time wins (the pieces of one run: shards of one sweep).
    pub const NONE: NoiseMargin = NoiseMargin { fraction: 0.0 };

    /// Whether `challenger_us` is faster than `incumbent_us` by more than the margin.
    pub fn beats(self, challenger_us: f64, incumbent_us: f64) -> bool {
        challenger_us < incumbent_us * (1.0 - self.fraction)
    }
}

impl Default for NoiseMargin {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl std::str::FromStr for NoiseMargin {
    type Err = String;

    /// A percentage: `5`, `5%`, `0.5`.
    fn from_str(s: &str) -> Result<Self, String> {
        let pct: f64 = s.trim().trim_end_matches('%').parse().map_err(|e| format!("noise margin `{s}` is not a percentage: {e}"))?;
        if !(0.0..100.0).contains(&pct) {
            return Err(format!("noise margin `{s}` must be in [0, 100) %"));
        }
        Ok(Self { fraction: pct / 100.0 })
    }
}

impl std::fmt::Display for NoiseMargin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}%", self.fraction * 100.0)
    }
}

/// All files of one GPU's DB folder.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TuningDb {
    pub templates: BTreeMap<String, TemplateDb>,
    pub gates: Vec<GateRecord>,
}

const GATE_FILE: &str = "probe_mgt1.json";

impl TuningDb {
    /// Reads every `<template>.json` and `probe_mgt1.json` in `dir`; a missing folder is empty.
    pub fn load(dir: &Path) -> Result<Self, DbError> {
        let mut db = TuningDb::default();
        if !dir.exists() {
            return Ok(db);
        }
        let io = |p: &Path, source: std::io::Error| DbError::Io { path: p.display().to_string(), source };
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(dir).map_err(|e| io(dir, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for path in files.into_iter().filter(|p| p.extension().is_some_and(|e| e == "json")) {
            let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
            let parse = |source: serde_json::Error| DbError::Parse { path: path.display().to_string(), source };
            let version: serde_json::Value = serde_json::from_str(&text).map_err(parse)?;
            let found = version.get("schema_version").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
            if found != DB_SCHEMA_VERSION {
                return Err(DbError::Version { path: path.display().to_string(), found });
            }
            if path.file_name().is_some_and(|n| n == GATE_FILE) {
                let g: GateDb = serde_json::from_str(&text).map_err(parse)?;
                db.gates = g.records;
            } else {
                let t: TemplateDb = serde_json::from_str(&text).map_err(parse)?;
                db.templates.insert(t.template.clone(), t);
            }
        }
        db.normalize();
        Ok(db)
    }

    /// Writes every file atomically (temp file + rename), in deterministic order.
    pub fn save(&self, dir: &Path) -> Result<(), DbError> {
        let io = |p: &Path, source: std::io::Error| DbError::Io { path: p.display().to_string(), source };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let mut db = self.clone();
        db.normalize();
        for (name, t) in &db.templates {
            write_json(&dir.join(format!("{name}.json")), t).map_err(|e| io(dir, e))?;
        }
        if !db.gates.is_empty() {
            let g = GateDb { schema_version: DB_SCHEMA_VERSION, records: db.gates.clone() };
            write_json(&dir.join(GATE_FILE), &g).map_err(|e| io(dir, e))?;
        }
        Ok(())
    }

    /// Merges this DB into the one on disk in `dir` and saves the result, holding an exclusive
    /// lock on the folder (`.mangrove-tune.lock`) throughout: two tuners writing one folder keep
    /// each other's records (per key, a record on disk stays unless this one beats it by
    /// `margin`). Called after each finished problem, it makes every record durable as it
    /// completes. Returns the conflicts.
    pub fn save_merged(&self, dir: &Path, margin: NoiseMargin) -> Result<Vec<Conflict>, DbError> {
        use fs2::FileExt;
        let io = |p: &Path, source: std::io::Error| DbError::Io { path: p.display().to_string(), source };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(|e| io(&lock_path, e))?;
        lock.lock_exclusive().map_err(|e| io(&lock_path, e))?;
        let mut on_disk = TuningDb::load(dir)?;
        let conflicts = on_disk.merge(self.clone(), margin);
        on_disk.save(dir)?;
        // Closing the file releases the lock.
        drop(lock);
        Ok(conflicts)
    }

    /// Sorts records by (problem, m) and gates by (m, n, k): the serialized order.
    pub fn normalize(&mut self) {
        for t in self.templates.values_mut() {
            t.records.sort_by(|a, b| (&a.problem, a.m).cmp(&(&b.problem, b.m)));
        }
        self.gates.sort_by_key(|g| (g.n, g.k, g.m));
    }

    /// Inserts a record; an existing one for the same key (the incumbent) stays unless `rec`
    /// beats it by `margin`. Either way the two runs' runner-ups and counts are pooled.
    /// Returns the conflict when both exist with different winners.
    pub fn upsert(&mut self, template: &str, rec: Record, margin: NoiseMargin) -> Option<Conflict> {
        let t = self.templates.entry(template.to_owned()).or_insert_with(|| TemplateDb {
            schema_version: DB_SCHEMA_VERSION,
            template: template.to_owned(),
            records: Vec::new(),
        });
        let Some(old) = t.records.iter_mut().find(|r| r.problem == rec.problem && r.m == rec.m) else {
            t.records.push(rec);
            return None;
        };
        let (old_fp, new_fp) = (old.fingerprints(), rec.fingerprints());
        if new_fp.iter().all(|f| old_fp.contains(f)) {
            // Records already merged in (`merge A A`, the same folders again, a journal
            // replayed): nothing new was timed.
            return None;
        }
        let (new_us, old_us) = (rec.winner.median_us, old.winner.median_us);
        let replace = margin.beats(new_us, old_us);
        let conflict = (old.winner.params != rec.winner.params).then(|| {
            let (kept_us, dropped_us) = if replace { (new_us, old_us) } else { (old_us, new_us) };
            Conflict {
                template: template.to_owned(),
                problem: rec.problem.clone(),
                m: rec.m,
                kept_us,
                dropped_us,
                gain_pct: (old_us - new_us) / old_us * 100.0,
                spread_pct: (rec.winner.p95_us - new_us) / new_us * 100.0,
                kept: match (replace, new_us < old_us) {
                    (true, _) => Kept::Challenger,
                    (false, true) => Kept::IncumbentWithinMargin,
                    (false, false) => Kept::Incumbent,
                },
            }
        });
        let (mut best, other) = if replace { (rec, old.clone()) } else { (old.clone(), rec) };
        // Runner-ups: the union of both lists plus the losing winner, fastest first, no duplicates.
        let mut pool = best.runner_ups.clone();
        pool.extend(other.runner_ups.iter().cloned());
        pool.push(other.winner.clone());
        pool.retain(|t| t.params != best.winner.params);
        pool.sort_by(|a, b| a.median_us.total_cmp(&b.median_us));
        pool.dedup_by(|a, b| a.params == b.params);
        pool.truncate(best.runner_ups.len().max(other.runner_ups.len()).max(1));
        best.runner_ups = pool;
        best.candidates = best.candidates.max(other.candidates);
        best.pruned += other.pruned;
        best.rejected += other.rejected;
        best.timed += other.timed;
        best.merged_from = old_fp.into_iter().chain(new_fp).collect();
        best.merged_from.sort();
        best.merged_from.dedup();
        *old = best;
        conflict
    }

    /// Merges `other` into `self` by [`TuningDb::upsert`]'s rule: per key, a record of `self`
    /// stays unless `other`'s beats it by `margin`; conflicts are returned. Merging a DB into
    /// itself changes nothing.
    pub fn merge(&mut self, other: TuningDb, margin: NoiseMargin) -> Vec<Conflict> {
        let mut conflicts = Vec::new();
        for (name, t) in other.templates {
            for r in t.records {
                conflicts.extend(self.upsert(&name, r, margin));
            }
        }
        for g in other.gates {
            self.record_gate(g);
        }
        self.normalize();
        conflicts
    }

    /// Records a probe result, replacing an older one for the same (template, m, n, k).
    pub fn record_gate(&mut self, g: GateRecord) {
        self.gates.retain(|o| (&o.template, o.m, o.n, o.k) != (&g.template, g.m, g.n, g.k));
        self.gates.push(g);
    }

    /// True when the M>1 probe of `template` passed for this (m, n, k); M=1 needs no gate.
    pub fn mgt1_allowed(&self, template: &str, m: i64, n: i64, k: i64) -> bool {
        m <= 1 || self.gates.iter().any(|g| g.template == template && g.m == m && g.n == n && g.k == k && g.passed)
    }

    /// The config for `template` on `problem` (without M) at `m`: exact, nearest bucket, or default.
    pub fn lookup(&self, template: &str, problem: &Params, m: i64) -> Choice {
        let Some(t) = self.templates.get(template) else {
            return Choice { params: Params::new(), rule: LookupRule::Default };
        };
        let recs: Vec<&Record> = t.records.iter().filter(|r| &r.problem == problem).collect();
        if let Some(r) = recs.iter().find(|r| r.m == m) {
            return Choice { params: r.winner.params.clone(), rule: LookupRule::Exact };
        }
        let above = recs.iter().filter(|r| r.m > m).min_by_key(|r| r.m);
        let below = recs.iter().filter(|r| r.m < m).max_by_key(|r| r.m);
        match above.or(below) {
            Some(r) => Choice { params: r.winner.params.clone(), rule: LookupRule::NearestBucket { tuned_m: r.m } },
            None => Choice { params: Params::new(), rule: LookupRule::Default },
        }
    }
}

/// Writes `value` to `path` atomically and durably: a uniquely named temporary file in the same
/// folder (two writers never share one), synced, renamed over `path`, then the folder synced, so
/// a crash leaves the old file or the new one, never a torn or lost one.
/// The lock file [`TuningDb::save_merged`] holds while it merges into a folder.
const LOCK_FILE: &str = ".mangrove-tune.lock";

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    use std::io::Write;
    let mut text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    text.push('\n');
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".tuning-").suffix(".json.tmp").tempfile_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// The timing method records carry: graph replays (`Gpu::time_launches`), with or without PDL.
fn timing_method(gpu: &crate::gpu::Gpu) -> String {
    let pdl = if gpu.pdl() { ", programmatic dependent launch" } else { "" };
    format!("cuda-graph replays{pdl}")
}

/// The release in the first line of /proc/driver/nvidia/version ("NVRM version: NVIDIA UNIX
/// x86_64 Kernel Module  580.65.06  Sun Jul 27 …"): the first dotted number after "Module".
pub fn driver_release(text: &str) -> Option<String> {
    let line = text.lines().next()?;
    let after = &line[line.find("Module")? + "Module".len()..];
    after.split_whitespace().find(|w| w.contains('.') && w.chars().all(|c| c.is_ascii_digit() || c == '.')).map(str::to_string)
}

impl Provenance {
    /// Reproducibility metadata for records made now on `gpu` (none: compile-only).
    pub fn collect(gpu: Option<&crate::gpu::Gpu>, nvrtc_version: (i32, i32), command: String) -> Provenance {
        let info = gpu.map(|g| g.info().clone());
        Provenance {
            gpu_name: info.as_ref().map(|i| i.name.clone()).unwrap_or_else(|| "none".into()),
            sm_count: info.as_ref().map(|i| i.sm_count).unwrap_or(0),
            driver_version: info.as_ref().map(|i| i.driver_version).unwrap_or(0),
            driver_release: match gpu {
                Some(_) => std::fs::read_to_string("/proc/driver/nvidia/version").ok().and_then(|t| driver_release(&t)).unwrap_or_default(),
                None => String::new(),
            },
            nvrtc_version,
            mangrove_version: env!("CARGO_PKG_VERSION").into(),
            git_sha: env!("MANGROVE_GIT_SHA").into(),
            sm_clock_mhz: info.as_ref().map(|i| i.sm_clock_mhz).unwrap_or(0),
            mem_clock_mhz: info.as_ref().map(|i| i.mem_clock_mhz).unwrap_or(0),
            date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            command,
            timing: gpu.map(timing_method).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: NoiseMargin = NoiseMargin::DEFAULT;

    fn timed(threads: i64, us: f64) -> Timed {
        Timed {
            params: [("THREADS".to_string(), threads)].into(),
            median_us: us,
            p95_us: us * 1.1,
            mean_us: us,
            gb_s: 1.0,
            frac_copy_bw: 0.5,
            deltas: Deltas::default(),
        }
    }

    fn rec(n: i64, m: i64, threads: i64, us: f64) -> Record {
        Record {
            problem: [("N".to_string(), n), ("K".to_string(), 256)].into(),
            m,
            winner: timed(threads, us),
            runner_ups: vec![timed(threads * 2, us * 2.0)],
            candidates: 10,
            pruned: 1,
            rejected: 0,
            timed: 9,
            strategy: "exhaustive".into(),
            gate: Gate { max_abs: 0.08, max_rel: 0.25, rel_floor: 0.05 },
            copy_bw_gbs: 3000.0,
            default_us: Some(us * 1.5),
            baseline: None,
            provenance: Provenance::default(),
            merged_from: Vec::new(),
        }
    }

    #[test]
    fn round_trip_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = TuningDb::default();
        db.upsert("t", rec(512, 4, 128, 3.0), M);
        db.upsert("t", rec(256, 1, 64, 2.0), M);
        db.upsert("t", rec(256, 8, 256, 5.0), M);
        db.save(dir.path()).unwrap();
        let first = std::fs::read(dir.path().join("t.json")).unwrap();
        let back = TuningDb::load(dir.path()).unwrap();
        assert_eq!(back, { let mut d = db.clone(); d.normalize(); d });
        back.save(dir.path()).unwrap();
        assert_eq!(std::fs::read(dir.path().join("t.json")).unwrap(), first, "byte-identical re-save");
        let ms: Vec<i64> = back.templates["t"].records.iter().map(|r| r.m).collect();
        assert_eq!(ms, vec![1, 8, 4], "sorted by problem (K, N) then m");
    }

    #[test]
    fn concurrent_merged_saves_keep_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let dir = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    for i in 0..10 {
                        let mut db = TuningDb::default();
                        db.upsert("t", rec(256 + 4 * (w * 10 + i), 1, 64, 1.0), M);
                        db.save_merged(&dir, M).unwrap();
                    }
                })
            })
            .collect();
        writers.into_iter().for_each(|h| h.join().unwrap());
        let back = TuningDb::load(dir.path()).unwrap();
        assert_eq!(back.templates["t"].records.len(), 40, "a concurrent save lost records");
        let stray: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).filter(|n| n.to_string_lossy().ends_with(".tmp")).collect();
        assert!(stray.is_empty(), "{stray:?}");
    }

    #[test]
    fn nearest_bucket_lookup() {
        let mut db = TuningDb::default();
        for (m, th) in [(1, 64), (4, 128), (16, 256)] {
            db.upsert("t", rec(256, m, th, 1.0), M);
        }
        let p: Params = [("N".to_string(), 256), ("K".to_string(), 256)].into();
        assert_eq!(db.lookup("t", &p, 4).rule, LookupRule::Exact);
        let c = db.lookup("t", &p, 3);
        assert_eq!((c.rule, c.params["THREADS"]), (LookupRule::NearestBucket { tuned_m: 4 }, 128));
        assert_eq!(db.lookup("t", &p, 5).rule, LookupRule::NearestBucket { tuned_m: 16 });
        assert_eq!(db.lookup("t", &p, 64).rule, LookupRule::NearestBucket { tuned_m: 16 });
        let other: Params = [("N".to_string(), 8), ("K".to_string(), 8)].into();
        assert_eq!(db.lookup("t", &other, 1).rule, LookupRule::Default);
        assert_eq!(db.lookup("nope", &p, 1).rule, LookupRule::Default);
    }

    #[test]
    fn driver_release_is_read_from_the_nvrm_line() {
        let text = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 07:09:18 UTC 2025\nGCC version:  gcc 12\n";
        assert_eq!(driver_release(text).as_deref(), Some("580.65.06"));
        let open = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.14  Release Build\n";
        assert_eq!(driver_release(open).as_deref(), Some("550.54.14"));
        assert_eq!(driver_release("garbage"), None);
    }

    #[test]
    fn merging_a_db_into_itself_changes_nothing() {
        let mut a = TuningDb::default();
        a.upsert("t", rec(256, 1, 64, 3.0), M);
        a.upsert("t", rec(512, 2, 128, 2.0), M);
        let before = a.clone();
        assert!(a.merge(before.clone(), M).is_empty());
        assert_eq!(a, before, "counts must not double");
    }

    #[test]
    fn a_challenger_replaces_the_incumbent_only_beyond_the_noise_margin() {
        assert_eq!("5".parse::<NoiseMargin>().unwrap(), NoiseMargin::DEFAULT);
        assert_eq!("2.5%".parse::<NoiseMargin>().unwrap().fraction, 0.025);
        assert!("100".parse::<NoiseMargin>().is_err() && "-1".parse::<NoiseMargin>().is_err() && "x".parse::<NoiseMargin>().is_err());
        let shipped = || {
            let mut db = TuningDb::default();
            db.upsert("t", rec(256, 1, 64, 100.0), M);
            db
        };
        // 3 % faster: noise; the shipped record stays, and the conflict says why.
        let mut db = shipped();
        let c = db.upsert("t", rec(256, 1, 128, 97.0), M).unwrap();
        assert_eq!((c.kept, c.kept_us, c.dropped_us), (Kept::IncumbentWithinMargin, 100.0, 97.0));
        assert!((c.gain_pct - 3.0).abs() < 1e-9 && (c.spread_pct - 10.0).abs() < 1e-9, "{c:?}");
        assert_eq!(db.templates["t"].records[0].winner.params["THREADS"], 64);
        // 6 % faster: a real gain; the challenger wins.
        let mut db = shipped();
        assert_eq!(db.upsert("t", rec(256, 1, 128, 94.0), M).unwrap().kept, Kept::Challenger);
        assert_eq!(db.templates["t"].records[0].winner.params["THREADS"], 128);
        // Slower: the incumbent stays.
        assert_eq!(shipped().upsert("t", rec(256, 1, 128, 120.0), M).unwrap().kept, Kept::Incumbent);
        // Without a margin (shards of one run) any gain wins.
        let mut db = shipped();
        assert_eq!(db.upsert("t", rec(256, 1, 128, 99.0), NoiseMargin::NONE).unwrap().kept, Kept::Challenger);
    }

    #[test]
    fn merge_uses_the_margin_and_is_idempotent() {
        let mut a = TuningDb::default();
        a.upsert("t", rec(256, 1, 64, 100.0), M);
        let mut b = TuningDb::default();
        b.upsert("t", rec(256, 1, 128, 98.0), M);
        b.upsert("t", rec(512, 1, 64, 1.0), M);
        let conflicts = a.merge(b.clone(), M);
        assert_eq!(conflicts.iter().map(|c| c.kept).collect::<Vec<_>>(), vec![Kept::IncumbentWithinMargin]);
        let once = a.clone();
        assert!(a.merge(once.clone(), M).is_empty(), "merging the result into itself");
        assert_eq!(a, once);
        let winners = |db: &TuningDb| db.templates["t"].records.iter().map(|r| (r.problem.clone(), r.m, r.winner.clone())).collect::<Vec<_>>();
        a.merge(b, M);
        assert_eq!(winners(&a), winners(&once), "merging the same input again keeps every winner");
    }

    #[test]
    fn shards_merged_without_a_margin_give_the_single_runs_record() {
        // One run timed THREADS 64, 128, 256, 512; two shards timed half each.
        let run = |configs: &[(i64, f64)]| {
            let mut sorted = configs.to_vec();
            sorted.sort_by(|a, b| a.1.total_cmp(&b.1));
            let mut r = rec(256, 1, sorted[0].0, sorted[0].1);
            r.runner_ups = sorted[1..].iter().map(|&(t, us)| timed(t, us)).collect();
            (r.pruned, r.timed) = (1, configs.len());
            r
        };
        let all = [(64, 3.0), (128, 2.9), (256, 5.0), (512, 4.0)];
        let single = run(&all);
        let mut merged = TuningDb::default();
        for shard in [&all[..2], &all[2..]] {
            let mut one = TuningDb::default();
            one.upsert("t", run(shard), M);
            merged.merge(one, NoiseMargin::NONE);
        }
        let m = &merged.templates["t"].records[0];
        assert_eq!(m.winner, single.winner, "128 at 2.9 µs wins although only 3 % faster than 64");
        assert_eq!((m.timed, m.pruned, m.candidates), (single.timed, 2 * single.pruned, single.candidates));
        assert_eq!(m.runner_ups[0], single.runner_ups[0]);
    }

    #[test]
    fn merge_keeps_best_and_reports_conflicts() {
        let mut a = TuningDb::default();
        a.upsert("t", rec(256, 1, 64, 3.0), M);
        a.upsert("t", rec(256, 2, 64, 3.0), M);
        let mut b = TuningDb::default();
        b.upsert("t", rec(256, 1, 128, 2.0), M); // faster, different winner → conflict, b wins
        b.upsert("t", rec(256, 2, 64, 4.0), M); // same winner, slower → no conflict, a's timing kept
        b.upsert("t", rec(512, 1, 64, 1.0), M); // new key
        let conflicts = a.merge(b, M);
        assert_eq!(conflicts.len(), 1);
        assert_eq!((conflicts[0].kept_us, conflicts[0].dropped_us), (2.0, 3.0));
        let recs = &a.templates["t"].records;
        assert_eq!(recs.len(), 3);
        let r1 = recs.iter().find(|r| r.m == 1 && r.problem["N"] == 256).unwrap();
        assert_eq!(r1.winner.params["THREADS"], 128);
        assert_eq!(r1.runner_ups[0].params["THREADS"], 64, "the dropped winner becomes a runner-up");
        assert_eq!(r1.timed, 18);
        let r2 = recs.iter().find(|r| r.m == 2).unwrap();
        assert_eq!(r2.winner.median_us, 3.0);
    }

    #[test]
    fn gates_and_bad_files() {
        let mut db = TuningDb::default();
        const T: &str = "ternary_gemm_w2a8";
        assert!(db.mgt1_allowed(T, 1, 256, 256));
        assert!(!db.mgt1_allowed(T, 4, 256, 256));
        let g = GateRecord {
            template: T.into(),
            m: 4, n: 256, k: 256, passed: true, status: "pass".into(), reference: "dense".into(), deltas: None,
            params: Params::new(), avg_us: 1.0, p50_us: 1.0, p95_us: 1.0, provenance: Provenance::default(),
        };
        db.record_gate(g.clone());
        assert!(db.mgt1_allowed(T, 4, 256, 256));
        assert!(!db.mgt1_allowed("ternary_gemv", 4, 256, 256), "a gate holds for the template it probed");
        db.record_gate(GateRecord { passed: false, ..g });
        assert_eq!(db.gates.len(), 1);
        assert!(!db.mgt1_allowed(T, 4, 256, 256), "the newer failing probe replaces the pass");

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.json"), "{ not json").unwrap();
        assert!(matches!(TuningDb::load(dir.path()), Err(DbError::Parse { .. })));
        std::fs::write(dir.path().join("x.json"), r#"{"schema_version": 99}"#).unwrap();
        let e = TuningDb::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("schema version 99"), "{e}");
    }
}
