//! The results of `bench serve`: one [`Level`] per concurrency measured, the TTFT search and the
//! stress verdict in a [`ServeReport`]; written as JSON, as CSV (one row per level) and as an
//! SVG plot beside it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mangrove_core::tuning_db::Provenance;
use serde::{Deserialize, Serialize};

use super::memory::MemorySeries;
use super::workload::Workload;
use super::LoadError;
use crate::stats::Percentiles;

/// Version of the report's JSON layout; bump when a field changes meaning.
pub const SCHEMA_VERSION: u32 = 1;

/// One concurrency level: `requests` sent by `concurrency` closed-loop clients.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Level {
    pub concurrency: usize,
    pub requests: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Succeeded requests whose completion had no text (ended at once, e.g. on end-of-sequence).
    pub empty: usize,
    /// Failures by kind (`status`, `timeout`, `stream`, ...).
    pub failures: BTreeMap<String, usize>,
    /// The first few failure messages.
    pub first_errors: Vec<String>,
    /// Whether the level's time limit stopped it before all requests were sent.
    pub stopped_early: bool,
    pub duration_s: f64,
    /// Time to first token, time per output token, inter-token latency, request latency.
    pub ttft_ms: Percentiles,
    pub tpot_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub e2e_ms: Percentiles,
    /// Prompt tokens of the level as the server counted them (0 when it reports no usage).
    pub input_tokens: usize,
    pub output_tokens: usize,
    /// Output tokens per second over the level's wall time.
    pub tokens_per_s: f64,
    pub requests_per_s: f64,
    /// The server's resident memory over the level (with `--server-pid`).
    pub server_memory: Option<MemorySeries>,
}

/// Where a KV budget figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvSource {
    /// A shared pool of `kv_cache_tokens` divided among the users.
    SharedPool,
    /// Each sequence owns a slot of the model's full context (`max_position_embeddings`).
    PerSequenceSlot,
}

/// KV-cache tokens one user can hold at the found concurrency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvBudget {
    pub tokens_per_user: u64,
    pub source: KvSource,
}

/// The result of `--ttft-target-ms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TtftSearch {
    pub target_ms: f64,
    /// Largest concurrency whose TTFT p95 met the target with no failure.
    pub max_concurrency: Option<usize>,
    /// From the server's /health, when it says.
    pub kv_budget: Option<KvBudget>,
}

/// The verdict of `--stress`: every request must succeed (and a launched server end cleanly).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StressVerdict {
    pub requests: usize,
    pub concurrency: usize,
    pub failed: usize,
    pub passed: bool,
    /// Server RSS at the end minus at the start (with `--server-pid`).
    pub rss_growth_bytes: Option<i64>,
}

/// Everything `bench serve` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ServeReport {
    pub schema_version: u32,
    pub provenance: Provenance,
    pub url: String,
    pub model: String,
    pub workload: Workload,
    pub num_prompts: usize,
    pub timeout_s: f64,
    pub max_duration_s: f64,
    /// The server's /health answer before the run (when it has one).
    pub health: Option<serde_json::Value>,
    /// Levels in increasing concurrency.
    pub levels: Vec<Level>,
    pub ttft_target: Option<TtftSearch>,
    pub stress: Option<StressVerdict>,
    /// How the server this run launched (`-- SERVE_ARGS`) ended.
    pub server_exit: Option<ServerExit>,
}

/// How a launched server ended when the run stopped it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerExit {
    pub status: String,
    /// Exited successfully on SIGINT (no crash, no kill).
    pub clean: bool,
    /// It did not end within the grace period and was killed.
    pub killed: bool,
    /// Its stderr.
    pub log: PathBuf,
}

/// Columns of the CSV, in order.
pub const CSV_HEADER: &str = "concurrency,requests,succeeded,failed,duration_s,tokens_per_s,requests_per_s,\
ttft_p50_ms,ttft_p95_ms,ttft_p99_ms,tpot_p50_ms,tpot_p95_ms,tpot_p99_ms,itl_p50_ms,itl_p95_ms,itl_p99_ms,\
e2e_p50_ms,e2e_p95_ms,e2e_p99_ms,output_tokens,server_rss_peak_bytes";

impl Level {
    fn csv_row(&self) -> String {
        let p = |s: &Percentiles| format!("{:.3},{:.3},{:.3}", s.p50, s.p95, s.p99);
        format!(
            "{},{},{},{},{:.3},{:.3},{:.3},{},{},{},{},{},{}",
            self.concurrency,
            self.requests,
            self.succeeded,
            self.failed,
            self.duration_s,
            self.tokens_per_s,
            self.requests_per_s,
            p(&self.ttft_ms),
            p(&self.tpot_ms),
            p(&self.itl_ms),
            p(&self.e2e_ms),
            self.output_tokens,
            self.server_memory.as_ref().map(|m| m.peak_bytes.to_string()).unwrap_or_default()
        )
    }
}

/// Paths of the three files one report is written to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputPaths {
    pub json: PathBuf,
    pub csv: PathBuf,
    pub svg: PathBuf,
}

impl OutputPaths {
    /// `FILE.json` plus `FILE.csv` and `FILE.svg` beside it.
    pub fn beside(json: &Path) -> Self {
        Self { json: json.into(), csv: json.with_extension("csv"), svg: json.with_extension("svg") }
    }
}

impl ServeReport {
    /// Whether this was a stress run with a failure.
    pub fn stress_failed(&self) -> bool {
        self.stress.as_ref().is_some_and(|s| !s.passed)
    }

    /// The CSV: a header and one row per level.
    pub fn csv(&self) -> String {
        let mut out = format!("{CSV_HEADER}\n");
        for l in &self.levels {
            out.push_str(&l.csv_row());
            out.push('\n');
        }
        out
    }

    /// Writes the JSON, CSV and SVG.
    pub fn write(&self, paths: &OutputPaths) -> Result<(), LoadError> {
        let write = |p: &Path, bytes: &[u8]| std::fs::write(p, bytes).map_err(|source| LoadError::Write { path: p.into(), source });
        let json = serde_json::to_vec_pretty(self).map_err(|e| LoadError::Write { path: paths.json.clone(), source: e.into() })?;
        write(&paths.json, &json)?;
        write(&paths.csv, self.csv().as_bytes())?;
        super::plot::write_svg(self, &paths.svg)
    }
}

impl std::fmt::Display for ServeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} model {} ({} prompts a level, max_tokens {})", self.url, self.model, self.num_prompts, self.workload.max_tokens)?;
        writeln!(f, "{:>5} {:>5} {:>5} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}", "conc", "ok", "fail", "tok/s", "TTFT p50", "TTFT p95", "TPOT p50", "TPOT p95", "ITL p99", "e2e p99")?;
        for l in &self.levels {
            writeln!(
                f,
                "{:>5} {:>5} {:>5} {:>9.1} {:>8.1}ms {:>8.1}ms {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>8.1}ms{}",
                l.concurrency,
                l.succeeded,
                l.failed,
                l.tokens_per_s,
                l.ttft_ms.p50,
                l.ttft_ms.p95,
                l.tpot_ms.p50,
                l.tpot_ms.p95,
                l.itl_ms.p99,
                l.e2e_ms.p99,
                if l.stopped_early { "  (time limit)" } else { "" }
            )?;
            for e in &l.first_errors {
                writeln!(f, "      error: {e}")?;
            }
            if let Some(m) = &l.server_memory {
                write!(f, "      server RSS {:.1} MB -> {:.1} MB (peak {:.1} MB)", m.start_bytes as f64 / 1e6, m.end_bytes as f64 / 1e6, m.peak_bytes as f64 / 1e6)?;
                match (m.gpu_start_bytes, m.gpu_end_bytes) {
                    (Some(a), Some(b)) => writeln!(f, ", GPU memory {:.1} MB -> {:.1} MB", a as f64 / 1e6, b as f64 / 1e6)?,
                    _ => writeln!(f)?,
                }
            }
        }
        if let Some(t) = &self.ttft_target {
            match t.max_concurrency {
                Some(c) => write!(f, "max concurrency with TTFT p95 <= {} ms: {c}", t.target_ms)?,
                None => write!(f, "no concurrency meets TTFT p95 <= {} ms", t.target_ms)?,
            }
            match t.kv_budget {
                Some(b) => writeln!(f, "; KV budget {} tokens per user ({:?})", b.tokens_per_user, b.source)?,
                None => writeln!(f)?,
            }
        }
        if let Some(e) = &self.server_exit {
            let how = if e.clean { "cleanly" } else if e.killed { "killed after the grace period" } else { "with a failure" };
            writeln!(f, "launched server ended {how} ({}); log {}", e.status, e.log.display())?;
        }
        if let Some(s) = &self.stress {
            let verdict = if s.passed { "PASS" } else { "FAIL" };
            write!(f, "stress {verdict}: {} requests at concurrency {}, {} failed", s.requests, s.concurrency, s.failed)?;
            match s.rss_growth_bytes {
                Some(g) => writeln!(f, ", server RSS grew {:.1} MB", g as f64 / 1e6)?,
                None => writeln!(f)?,
            }
        }
        Ok(())
    }
}
