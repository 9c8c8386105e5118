//! `bench serve`, a load generator for any OpenAI-compatible server: takes an endpoint, a
//! [`Workload`] and concurrency levels; runs `num_prompts` streamed completions per level from
//! that many closed-loop clients (bounded by a per-request timeout and a per-level time limit);
//! gives a [`ServeReport`] (TTFT / TPOT / ITL / e2e percentiles, tokens/s, failures, the server's
//! RSS when it is local), optionally the largest concurrency meeting a TTFT target and a stress
//! verdict.

pub mod client;
pub mod command;
pub mod memory;
pub mod plot;
pub mod report;
pub mod search;
pub mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mangrove_core::tuning_db::Provenance;
use serde::Deserialize;

use crate::stats::Percentiles;
use client::{Endpoint, RequestError, Timing};
use report::{KvBudget, KvSource, Level, ServeReport, StressVerdict, TtftSearch};
pub use workload::{LenRange, PromptSource, Workload};

/// Errors of a load run (a failed request is not one: it is counted in its [`Level`]).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("`{0}` is not an http:// URL (this build has no TLS; put a local proxy in front of https endpoints)")]
    Url(String),
    #[error("prompts file {}{}: {reason}", path.display(), if *line > 0 { format!(" line {line}") } else { String::new() })]
    Prompts { path: PathBuf, line: usize, reason: String },
    #[error("--concurrency and --num-prompts must be positive")]
    Input,
    #[error("asking {url} for its model (pass --model): {reason}")]
    Model { url: String, reason: String },
    #[error("starting the HTTP client or runtime")]
    Client(#[source] std::io::Error),
    #[error("reading the server's memory (--server-pid {pid})")]
    Memory { pid: u32, source: std::io::Error },
    #[error("writing {}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("plotting {}: {reason}", path.display())]
    Plot { path: PathBuf, reason: String },
    #[error("launching the server")]
    Launch(#[from] crate::launch::LaunchError),
}

/// The target of `--ttft-target-ms`.
#[derive(Debug, Clone, Copy)]
pub struct TtftTarget {
    pub target_ms: f64,
    /// Largest concurrency the search tries.
    pub max_concurrency: usize,
}

/// A whole `bench serve` run.
#[derive(Debug, Clone)]
pub struct ServeBench {
    /// Base URL of the server (`http://host:port`; a trailing `/v1` is dropped).
    pub url: String,
    /// Model name to request; None: the first of the server's `/v1/models`.
    pub model: Option<String>,
    pub api_key: Option<String>,
    pub extra_body: serde_json::Map<String, serde_json::Value>,
    pub workload: Workload,
    pub num_prompts: usize,
    /// Levels to sweep, each run in full.
    pub concurrency: Vec<usize>,
    /// Limit on one request.
    pub timeout: Duration,
    /// Limit on one level: no request starts after it.
    pub max_duration: Duration,
    /// Untimed requests sent once before the first level.
    pub warmup: usize,
    pub ttft_target: Option<TtftTarget>,
    /// Judge the run as a stress test: every request of every level must succeed.
    pub stress: bool,
    /// Sample this local process's RSS during each level.
    pub server_pid: Option<u32>,
    /// The command line, for the provenance.
    pub command: String,
}

/// The fields of a server's /health that size its KV cache (each optional).
#[derive(Debug, Default, Deserialize)]
struct HealthKv {
    kv_cache_tokens: Option<u64>,
    max_position_embeddings: Option<u64>,
}

/// KV tokens per user at `users` concurrent users, from a /health answer.
pub fn kv_budget(health: &serde_json::Value, users: usize) -> Option<KvBudget> {
    let kv: HealthKv = serde_json::from_value(health.clone()).ok()?;
    match (kv.kv_cache_tokens, kv.max_position_embeddings) {
        (Some(total), _) => Some(KvBudget { tokens_per_user: total / users.max(1) as u64, source: KvSource::SharedPool }),
        (None, Some(per_seq)) => Some(KvBudget { tokens_per_user: per_seq, source: KvSource::PerSequenceSlot }),
        (None, None) => None,
    }
}

/// Base URL without a trailing `/` or `/v1`; only http.
fn base_url(url: &str) -> Result<String, LoadError> {
    if !url.starts_with("http://") {
        return Err(LoadError::Url(url.into()));
    }
    let u = url.trim_end_matches('/');
    Ok(u.strip_suffix("/v1").unwrap_or(u).to_string())
}

#[derive(Debug, Deserialize)]
struct Models {
    data: Vec<ModelEntry>,
}

#[derive(Debug, Deserialize)]
struct ModelEntry {
    id: String,
}

impl ServeBench {
    /// Runs the sweep, the TTFT search and the stress verdict.
    pub fn run(&self) -> Result<ServeReport, LoadError> {
        if self.concurrency.is_empty() || self.concurrency.contains(&0) || self.num_prompts == 0 {
            return Err(LoadError::Input);
        }
        let base = base_url(&self.url)?;
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(LoadError::Client)?;
        let http = reqwest::Client::builder().build().map_err(|e| LoadError::Client(std::io::Error::other(e)))?;
        rt.block_on(async {
            let model = match &self.model {
                Some(m) => m.clone(),
                None => self.first_model(&http, &base).await?,
            };
            let health = get_json(&http, &format!("{base}/health"), self.api_key.as_deref()).await.ok();
            let endpoint = Endpoint { base: base.clone(), model: model.clone(), api_key: self.api_key.clone(), extra_body: self.extra_body.clone(), timeout: self.timeout };
            for i in 0..self.warmup {
                // Warm-up failures show again in the timed levels; only their timing is dropped.
                let _ = endpoint.complete(&http, &self.workload.request(usize::MAX - i)).await;
            }
            let mut measured = BTreeMap::new();
            for &c in &self.concurrency {
                if let std::collections::btree_map::Entry::Vacant(e) = measured.entry(c) {
                    e.insert(self.level(&http, &endpoint, c).await?);
                }
            }
            let ttft_target = match self.ttft_target {
                None => None,
                Some(t) => {
                    let found = search_async(t, &mut measured, |c| self.level(&http, &endpoint, c)).await?;
                    let kv_budget = found.and_then(|c| health.as_ref().and_then(|h| kv_budget(h, c)));
                    Some(TtftSearch { target_ms: t.target_ms, max_concurrency: found, kv_budget })
                }
            };
            let levels: Vec<Level> = measured.into_values().collect();
            let stress = self.stress.then(|| {
                let failed = levels.iter().map(|l| l.failed).sum();
                let growth = levels.iter().filter_map(|l| l.server_memory.as_ref()).fold(None, |acc: Option<(u64, u64)>, m| {
                    Some(acc.map_or((m.start_bytes, m.end_bytes), |(s, _)| (s, m.end_bytes)))
                });
                StressVerdict {
                    requests: levels.iter().map(|l| l.requests).sum(),
                    concurrency: levels.iter().map(|l| l.concurrency).max().unwrap_or(0),
                    failed,
                    passed: failed == 0 && levels.iter().all(|l| !l.stopped_early),
                    rss_growth_bytes: growth.map(|(s, e)| e as i64 - s as i64),
                }
            });
            Ok(ServeReport {
                schema_version: report::SCHEMA_VERSION,
                provenance: Provenance::collect(None, (0, 0), self.command.clone()),
                url: base,
                model,
                workload: self.workload.clone(),
                num_prompts: self.num_prompts,
                timeout_s: self.timeout.as_secs_f64(),
                max_duration_s: self.max_duration.as_secs_f64(),
                health,
                levels,
                ttft_target,
                stress,
                server_exit: None,
            })
        })
    }

    async fn first_model(&self, http: &reqwest::Client, base: &str) -> Result<String, LoadError> {
        let url = format!("{base}/v1/models");
        let err = |reason: String| LoadError::Model { url: url.clone(), reason };
        let v = get_json(http, &url, self.api_key.as_deref()).await.map_err(err)?;
        let models: Models = serde_json::from_value(v).map_err(|e| err(e.to_string()))?;
        models.data.into_iter().next().map(|m| m.id).ok_or_else(|| err("the list is empty".into()))
    }

    /// `num_prompts` requests from `concurrency` clients, each starting its next request when
    /// its last one ends, until all are sent or the level's time limit passes.
    async fn level(&self, http: &reqwest::Client, endpoint: &Endpoint, concurrency: usize) -> Result<Level, LoadError> {
        let start = Instant::now();
        let deadline = start + self.max_duration;
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let sampler = self.server_pid.map(|pid| tokio::spawn(async move { (pid, memory::sample_until(pid, async { drop(done_rx.await) }).await) }));
        let results: Vec<Result<Timing, RequestError>> = futures::stream::iter((0..self.num_prompts).take_while(|_| Instant::now() < deadline))
            .map(|i| {
                let req = self.workload.request(i);
                async move { endpoint.complete(http, &req).await }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let wall = start.elapsed();
        let _ = done_tx.send(());
        let server_memory = match sampler {
            None => None,
            Some(h) => match h.await {
                Ok((_, Ok(series))) => Some(series),
                Ok((pid, Err(source))) => return Err(LoadError::Memory { pid, source }),
                Err(join) => return Err(LoadError::Client(std::io::Error::other(join))),
            },
        };
        Ok(summarise(concurrency, self.num_prompts, results, wall, server_memory))
    }
}

/// Folds the outcomes of a level that planned `planned` requests into its [`Level`].
fn summarise(concurrency: usize, planned: usize, results: Vec<Result<Timing, RequestError>>, wall: Duration, server_memory: Option<memory::MemorySeries>) -> Level {
    let ms = |d: &Duration| d.as_secs_f64() * 1e3;
    let mut level = Level { concurrency, requests: results.len(), stopped_early: results.len() < planned, duration_s: wall.as_secs_f64(), server_memory, ..Level::default() };
    let (mut ttft, mut tpot, mut itl, mut e2e) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in results {
        match r {
            Ok(t) => {
                level.succeeded += 1;
                level.empty += usize::from(t.text_chunks == 0);
                ttft.push(ms(&t.ttft));
                e2e.push(ms(&t.e2e));
                tpot.extend(t.tpot().as_ref().map(ms));
                itl.extend(t.gaps.iter().map(ms));
                level.output_tokens += t.output_tokens;
                level.input_tokens += t.prompt_tokens.unwrap_or(0);
            }
            Err(e) => {
                level.failed += 1;
                *level.failures.entry(e.kind().to_string()).or_default() += 1;
                if level.first_errors.len() < 5 {
                    level.first_errors.push(e.to_string());
                }
            }
        }
    }
    (level.ttft_ms, level.tpot_ms, level.itl_ms, level.e2e_ms) = (Percentiles::of(ttft), Percentiles::of(tpot), Percentiles::of(itl), Percentiles::of(e2e));
    let secs = wall.as_secs_f64().max(1e-9);
    level.tokens_per_s = level.output_tokens as f64 / secs;
    level.requests_per_s = level.succeeded as f64 / secs;
    level
}

/// [`search::max_concurrency`] over async measurements: the search is pure and sequential, so
/// each level it asks for is measured in turn and the search replayed with it.
async fn search_async<F, Fut>(t: TtftTarget, measured: &mut BTreeMap<usize, Level>, mut measure: F) -> Result<Option<usize>, LoadError>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Level, LoadError>>,
{
    /// The search stopped to ask for this level.
    struct Need(usize);
    loop {
        match search::max_concurrency(t.target_ms, t.max_concurrency, measured, |c| Err(Need(c))) {
            Ok(found) => return Ok(found),
            Err(Need(c)) => {
                let level = measure(c).await?;
                measured.insert(c, level);
            }
        }
    }
}

async fn get_json(http: &reqwest::Client, url: &str, api_key: Option<&str>) -> Result<serde_json::Value, String> {
    let mut get = http.get(url).timeout(Duration::from_secs(10));
    if let Some(k) = api_key {
        get = get.bearer_auth(k);
    }
    let resp = get.send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status().as_u16()));
    }
    resp.json().await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_v1_and_must_be_http() {
        assert_eq!(base_url("http://h:1/v1/").unwrap(), "http://h:1");
        assert_eq!(base_url("http://h:1").unwrap(), "http://h:1");
        assert!(matches!(base_url("https://h"), Err(LoadError::Url(_))));
    }

    #[test]
    fn kv_budget_prefers_a_shared_pool() {
        let pool = serde_json::json!({"kv_cache_tokens": 8192, "max_position_embeddings": 512});
        assert_eq!(kv_budget(&pool, 4), Some(KvBudget { tokens_per_user: 2048, source: KvSource::SharedPool }));
        let slots = serde_json::json!({"status": "ok", "max_position_embeddings": 512});
        assert_eq!(kv_budget(&slots, 4), Some(KvBudget { tokens_per_user: 512, source: KvSource::PerSequenceSlot }));
        assert_eq!(kv_budget(&serde_json::json!({"status": "ok"}), 4), None);
    }
}
