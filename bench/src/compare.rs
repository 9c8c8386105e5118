//! `bench compare BASE NEW`: takes two saved results of the same bench (`bench serve`,
//! `bench decode`, `bench kernels` JSON), pairs their tracked metrics by path, gives a
//! [`Comparison`] whose rows say which metrics regressed beyond the [`Thresholds`].
//!
//! A metric is tracked by its name ([`classify`]): `*_ms` / `*_us` (and their p50/p95/p99/mean)
//! are latencies, `*per_s` / `*gbs` / `gb_s` throughputs, `*_bytes` of RSS or memory are memory,
//! `failed` counts failures. Array elements are matched by their identity fields
//! ([`ID_KEYS`]), not their position, so a run that adds a level still lines up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

/// Errors of a comparison.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("reading {}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{} is not JSON", path.display())]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("{base} and {new} share no tracked metric (results of different benches?)")]
    NothingInCommon { base: String, new: String },
}

/// What a metric measures, which decides its better direction and its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Lower is better; a regression is more than `slower_pct` % higher.
    Latency,
    /// Higher is better; a regression is more than `slower_pct` % lower.
    Throughput,
    /// Lower is better; a regression is more than `memory_bytes` higher.
    Memory,
    /// Any increase is a regression.
    Failures,
}

/// When a change is a regression.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Thresholds {
    /// Percent slower (latency up or throughput down) that flags a metric.
    pub slower_pct: f64,
    /// Bytes more memory that flag a metric.
    pub memory_bytes: f64,
}

impl Default for Thresholds {
    /// 3 % slower or 1 GB more memory (seed 001, level 5).
    fn default() -> Self {
        Self { slower_pct: 3.0, memory_bytes: 1e9 }
    }
}

/// How one metric moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Within the thresholds.
    Same,
    Regressed,
    /// Better by more than the threshold.
    Improved,
    /// In BASE, not in NEW.
    Missing,
    /// In NEW, not in BASE.
    Added,
}

/// One tracked metric of either result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub path: String,
    pub class: Class,
    pub base: Option<f64>,
    pub new: Option<f64>,
    /// (new − base) / base in percent, when both exist and base is not 0.
    pub change_pct: Option<f64>,
    pub verdict: Verdict,
}

/// Every tracked metric of two results, in path order.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub base: String,
    pub new: String,
    pub thresholds: Thresholds,
    pub rows: Vec<Row>,
}

impl Comparison {
    /// The rows that regressed.
    pub fn regressions(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(|r| r.verdict == Verdict::Regressed)
    }
}

/// Fields that name an array element (in this order in its path segment).
pub const ID_KEYS: [&str; 6] = ["label", "variant", "backend", "concurrency", "batch", "prompt_tokens"];

/// Subtrees that describe a run rather than measure it.
const SKIP: [&str; 13] =
    ["provenance", "device", "gate", "plan", "workload", "health", "params", "case", "first_errors", "samples", "problem", "failures", "thresholds"];

/// Summary fields whose class is their parent's (`ttft_ms.p95` is a latency).
const SUMMARY: [&str; 4] = ["p50", "p95", "p99", "mean"];

/// The class of a metric named `key` under `parent`, or None when it is not tracked.
pub fn classify(parent: &str, key: &str) -> Option<Class> {
    if SUMMARY.contains(&key) {
        return classify("", parent);
    }
    if key.contains("bound") || key.contains("limit") {
        return None; // physical bounds and configured limits, not measurements
    }
    if key == "failed" {
        return Some(Class::Failures);
    }
    if key.ends_with("_ms") || key.ends_with("_us") {
        return Some(Class::Latency);
    }
    if key.ends_with("per_s") || key.ends_with("gbs") || key == "gb_s" {
        return Some(Class::Throughput);
    }
    let memory = |s: &str| s.contains("rss") || s.contains("memory") || s.contains("peak_mem");
    if key.ends_with("_bytes") && (memory(key) || memory(parent)) {
        return Some(Class::Memory);
    }
    None
}

/// The tracked metrics of a result, by path.
pub fn metrics(v: &Value) -> BTreeMap<String, (Class, f64)> {
    let mut out = BTreeMap::new();
    walk(v, "", "", &mut out);
    out
}

fn walk(v: &Value, path: &str, parent: &str, out: &mut BTreeMap<String, (Class, f64)>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                if SKIP.contains(&k.as_str()) {
                    continue;
                }
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match child {
                    Value::Number(n) => {
                        if let (Some(class), Some(x)) = (classify(parent, k), n.as_f64()) {
                            out.insert(p, (class, x));
                        }
                    }
                    _ => walk(child, &p, k, out),
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if item.is_object() {
                    walk(item, &format!("{path}[{}]", identity(item).unwrap_or_else(|| i.to_string())), parent, out);
                }
            }
        }
        _ => {}
    }
}

/// `batch=4,prompt_tokens=32` from an element's identity fields.
fn identity(item: &Value) -> Option<String> {
    let parts: Vec<String> = ID_KEYS
        .iter()
        .filter_map(|k| match item.get(k)? {
            Value::String(s) => Some(format!("{k}={s}")),
            n @ Value::Number(_) => Some(format!("{k}={n}")),
            _ => None,
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(","))
}

/// The verdict on one metric moving from `base` to `new`.
pub fn judge(class: Class, base: f64, new: f64, t: &Thresholds) -> Verdict {
    let pct = t.slower_pct / 100.0;
    let (worse, better) = match class {
        Class::Latency => (new > base * (1.0 + pct), new < base * (1.0 - pct)),
        Class::Throughput => (new < base * (1.0 - pct), new > base * (1.0 + pct)),
        Class::Memory => (new - base > t.memory_bytes, base - new > t.memory_bytes),
        Class::Failures => (new > base, new < base),
    };
    match (worse, better) {
        (true, _) => Verdict::Regressed,
        (_, true) => Verdict::Improved,
        _ => Verdict::Same,
    }
}

/// Compares two parsed results named `base_name` and `new_name`.
pub fn compare(base_name: &str, base: &Value, new_name: &str, new: &Value, thresholds: Thresholds) -> Result<Comparison, CompareError> {
    let (b, n) = (metrics(base), metrics(new));
    if !b.keys().any(|k| n.contains_key(k)) {
        return Err(CompareError::NothingInCommon { base: base_name.into(), new: new_name.into() });
    }
    let mut paths: Vec<&String> = b.keys().chain(n.keys()).collect();
    paths.sort();
    paths.dedup();
    let rows = paths
        .into_iter()
        .map(|p| {
            let (bv, nv) = (b.get(p), n.get(p));
            let class = bv.or(nv).map(|(c, _)| *c).unwrap_or(Class::Latency);
            let (base, new) = (bv.map(|x| x.1), nv.map(|x| x.1));
            let (change_pct, verdict) = match (base, new) {
                (Some(x), Some(y)) => ((x != 0.0).then(|| (y - x) / x * 100.0), judge(class, x, y, &thresholds)),
                (Some(_), None) => (None, Verdict::Missing),
                _ => (None, Verdict::Added),
            };
            Row { path: p.clone(), class, base, new, change_pct, verdict }
        })
        .collect();
    Ok(Comparison { base: base_name.into(), new: new_name.into(), thresholds, rows })
}

/// Reads a result file.
pub fn load(path: &Path) -> Result<Value, CompareError> {
    let text = std::fs::read_to_string(path).map_err(|source| CompareError::Read { path: path.into(), source })?;
    serde_json::from_str(&text).map_err(|source| CompareError::Parse { path: path.into(), source })
}

/// Compares the results in two files.
pub fn compare_files(base: &Path, new: &Path, thresholds: Thresholds) -> Result<Comparison, CompareError> {
    compare(&base.display().to_string(), &load(base)?, &new.display().to_string(), &load(new)?, thresholds)
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = self.rows.iter().map(|r| r.path.len()).max().unwrap_or(6).max(6);
        let num = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
        writeln!(f, "base {}\nnew  {}", self.base, self.new)?;
        writeln!(f, "{:<w$}  {:<10} {:>14} {:>14} {:>8}  verdict", "metric", "class", "base", "new", "change")?;
        for r in &self.rows {
            let change = r.change_pct.map(|c| format!("{c:+.1}%")).unwrap_or_default();
            let verdict = match r.verdict {
                Verdict::Same => "",
                Verdict::Regressed => "REGRESSED",
                Verdict::Improved => "improved",
                Verdict::Missing => "missing in new",
                Verdict::Added => "new",
            };
            writeln!(f, "{:<w$}  {:<10} {:>14} {:>14} {:>8}  {verdict}", r.path, format!("{:?}", r.class).to_lowercase(), num(r.base), num(r.new), change)?;
        }
        let n = self.regressions().count();
        writeln!(
            f,
            "{n} regression(s) (thresholds: {}% slower, {:.2} GB more memory, any added failure)",
            self.thresholds.slower_pct,
            self.thresholds.memory_bytes / 1e9
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn classifies_by_name_and_parent() {
        assert_eq!(classify("", "tpot_p50_ms"), Some(Class::Latency));
        assert_eq!(classify("ttft_ms", "p95"), Some(Class::Latency));
        assert_eq!(classify("ttft_ms", "max"), None);
        assert_eq!(classify("derived", "gb_s"), Some(Class::Throughput));
        assert_eq!(classify("", "tokens_per_s"), Some(Class::Throughput));
        assert_eq!(classify("", "bound_tokens_per_s"), None);
        assert_eq!(classify("", "copy_limit_us"), None);
        assert_eq!(classify("server_memory", "peak_bytes"), Some(Class::Memory));
        assert_eq!(classify("", "weight_bytes"), None);
        assert_eq!(classify("", "failed"), Some(Class::Failures));
    }

    #[test]
    fn array_elements_pair_by_identity_not_position() {
        let base = json!({"runs": [{"backend": "cpu", "batch": 1, "tpot_p50_ms": 2.0}, {"backend": "cpu", "batch": 4, "tpot_p50_ms": 3.0}]});
        let new = json!({"runs": [{"backend": "cpu", "batch": 4, "tpot_p50_ms": 3.0}, {"backend": "cpu", "batch": 1, "tpot_p50_ms": 2.0}]});
        let c = compare("a", &base, "b", &new, Thresholds::default()).unwrap();
        assert_eq!(c.rows.len(), 2);
        assert!(c.rows.iter().all(|r| r.verdict == Verdict::Same), "{c}");
        assert_eq!(c.rows[0].path, "runs[backend=cpu,batch=1].tpot_p50_ms");
    }

    #[test]
    fn thresholds_decide_the_verdict() {
        let t = Thresholds::default();
        assert_eq!(judge(Class::Latency, 100.0, 104.0, &t), Verdict::Regressed);
        assert_eq!(judge(Class::Latency, 100.0, 102.0, &t), Verdict::Same);
        assert_eq!(judge(Class::Latency, 100.0, 90.0, &t), Verdict::Improved);
        assert_eq!(judge(Class::Throughput, 100.0, 96.0, &t), Verdict::Regressed);
        assert_eq!(judge(Class::Throughput, 100.0, 98.0, &t), Verdict::Same);
        assert_eq!(judge(Class::Memory, 1e9, 2.1e9, &t), Verdict::Regressed);
        assert_eq!(judge(Class::Memory, 1e9, 1.9e9, &t), Verdict::Same);
        assert_eq!(judge(Class::Failures, 0.0, 1.0, &t), Verdict::Regressed);
    }

    #[test]
    fn missing_and_added_metrics_are_reported_not_flagged() {
        let base = json!({"levels": [{"concurrency": 1, "tokens_per_s": 10.0}, {"concurrency": 2, "tokens_per_s": 18.0}]});
        let new = json!({"levels": [{"concurrency": 1, "tokens_per_s": 10.0}, {"concurrency": 4, "tokens_per_s": 30.0}]});
        let c = compare("a", &base, "b", &new, Thresholds::default()).unwrap();
        let v: Vec<Verdict> = c.rows.iter().map(|r| r.verdict).collect();
        assert_eq!(v, vec![Verdict::Same, Verdict::Missing, Verdict::Added]);
        assert_eq!(c.regressions().count(), 0);
        assert!(matches!(compare("a", &base, "b", &json!({"x": 1}), Thresholds::default()), Err(CompareError::NothingInCommon { .. })));
    }
}
