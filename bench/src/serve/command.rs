//! `mangrove bench serve`: its command-line arguments and what the command does with them
//! (run, print, write the three files, judge a stress run).

use std::path::PathBuf;
use std::time::Duration;

use super::report::{OutputPaths, ServeReport, ServerExit};
use crate::launch::Server;
use super::{LenRange, LoadError, PromptSource, ServeBench, TtftTarget, Workload};

/// Arguments of `bench serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Base URL of an OpenAI-compatible server (mangrove serve, vLLM, llama-server).
    #[arg(long, required_unless_present = "launch", conflicts_with = "launch")]
    pub url: Option<String>,
    /// Model to request (default: the first of the server's /v1/models).
    #[arg(long)]
    pub model: Option<String>,
    /// Bearer key for the server.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Concurrency levels, e.g. 1,2,4,8 (default 1; with --stress 8).
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Requests per level (default 32; with --stress 200).
    #[arg(long)]
    pub num_prompts: Option<usize>,
    /// max_tokens of each request: N, or MIN:MAX drawn uniformly.
    #[arg(long, default_value = "32")]
    pub max_tokens: LenRange,
    /// Words of each synthetic prompt: N, or MIN:MAX drawn uniformly.
    #[arg(long, default_value = "32", conflicts_with = "prompts")]
    pub prompt_words: LenRange,
    /// Take prompts from this JSONL file ({"prompt": ..., "max_tokens": ...} per line), cycled.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Seed of the drawn lengths and words.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// JSON object merged into every request body, e.g. '{"ignore_eos": true}'.
    #[arg(long, value_parser = parse_object)]
    pub extra_body: Option<serde_json::Map<String, serde_json::Value>>,
    /// Limit on one request.
    #[arg(long, default_value = "60s")]
    pub timeout: humantime::Duration,
    /// Limit on one level: no request starts after it.
    #[arg(long, default_value = "10m")]
    pub max_duration: humantime::Duration,
    /// Untimed requests sent before the first level.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Find the largest concurrency whose TTFT p95 is at most this many ms (with no failure).
    #[arg(long)]
    pub ttft_target_ms: Option<f64>,
    /// Largest concurrency the TTFT search tries.
    #[arg(long, default_value_t = 256, requires = "ttft_target_ms")]
    pub max_concurrency: usize,
    /// Stress test: every request must succeed (exit status 1 otherwise).
    #[arg(long)]
    pub stress: bool,
    /// Process id of a local server: its RSS is sampled during each level.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Write the report here as JSON, with FILE.csv and FILE.svg beside it.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Launch `mangrove serve ARGS --port 0` for the run (after `--`), in its own process group
    /// with its log beside the report: its RSS is sampled, it is stopped at the end, and its exit
    /// status (a crash included) is reported.
    #[arg(last = true, value_name = "SERVE_ARGS")]
    pub launch: Vec<String>,
}

fn parse_object(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err("--extra-body must be a JSON object".into()),
        Err(e) => Err(format!("--extra-body is not JSON: {e}")),
    }
}

impl ServeArgs {
    /// The run these arguments ask for against `url` (the launched server's, else --url);
    /// `command` is recorded in the report.
    pub fn bench(&self, url: String, server_pid: Option<u32>, command: String) -> Result<ServeBench, LoadError> {
        let prompts = match &self.prompts {
            Some(p) => PromptSource::from_jsonl(p)?,
            None => PromptSource::Synthetic { words: self.prompt_words },
        };
        let (default_n, default_c) = if self.stress { (200, 8) } else { (32, 1) };
        Ok(ServeBench {
            url,
            model: self.model.clone(),
            api_key: self.api_key.clone(),
            extra_body: self.extra_body.clone().unwrap_or_default(),
            workload: Workload { prompts, max_tokens: self.max_tokens, seed: self.seed },
            num_prompts: self.num_prompts.unwrap_or(default_n),
            concurrency: if self.concurrency.is_empty() { vec![default_c] } else { self.concurrency.clone() },
            timeout: Duration::from(self.timeout),
            max_duration: Duration::from(self.max_duration),
            warmup: self.warmup,
            ttft_target: self.ttft_target_ms.map(|target_ms| TtftTarget { target_ms, max_concurrency: self.max_concurrency }),
            stress: self.stress,
            server_pid: server_pid.or(self.server_pid),
            command,
        })
    }
}

/// Runs `bench serve`: prints the table and writes the files (the caller judges
/// [`ServeReport::stress_failed`]).
pub fn run(args: &ServeArgs, command: String) -> Result<ServeReport, LoadError> {
    let report = match &args.url {
        Some(url) => args.bench(url.clone(), None, command)?.run()?,
        None => run_launched(args, command)?,
    };
    print!("{report}");
    if let Some(json) = &args.json {
        let paths = OutputPaths::beside(json);
        report.write(&paths)?;
        eprintln!("wrote {}, {} and {}", paths.json.display(), paths.csv.display(), paths.svg.display());
    }
    Ok(report)
}

/// Runs against a `mangrove serve` this process launches, and stops it after.
fn run_launched(args: &ServeArgs, command: String) -> Result<ServeReport, LoadError> {
    let log = match &args.json {
        Some(j) => j.with_extension("server.log"),
        None => std::env::temp_dir().join(format!("mangrove-bench-serve-{}.log", std::process::id())),
    };
    let exe = std::env::current_exe().map_err(LoadError::Client)?;
    let mut serve_args = vec!["serve".to_string(), "--port".into(), "0".into()];
    serve_args.extend(args.launch.iter().cloned());
    let server = Server::start(&exe, &serve_args, &log, Duration::from_secs(600))?;
    let run = args.bench(format!("http://{}", server.addr), Some(server.pid()), command).and_then(|b| b.run());
    let stopped = server.stop(Duration::from_secs(30)).map_err(LoadError::Client)?;
    let mut report = run?;
    let clean = stopped.status.success() && !stopped.killed;
    if let Some(s) = report.stress.as_mut() {
        s.passed &= clean; // a server that crashed or hung at the end fails the stress run
    }
    report.server_exit = Some(ServerExit { status: stopped.status.to_string(), clean, killed: stopped.killed, log });
    Ok(report)
}
