//! `bench freeze OUT`: a reproducible baseline bundle. Takes the `mangrove` binary and an output
//! folder; writes the environment (provenance: GPU, driver, NVRTC, clocks and power where
//! `nvidia-smi` answers, commit and dirty flag, host, relevant env vars), then runs each bench
//! as its own `mangrove` process — decode at batch 1 and 16, the kernel lab on a GPU, a serve
//! sweep against a server it launches (its counters: paths taken, fallbacks) — logging every
//! command line with its exit status and time to `commands.log`, and a `summary.json` /
//! `summary.md` of what ran. `--quick` shortens every run; `--dry-run` writes the plan only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mangrove_core::arch::Arch;
use mangrove_core::compile::Compiler;
use mangrove_core::gpu::Gpu;
use mangrove_core::tuning_db::folder::{self, Target};
use mangrove_core::tuning_db::Provenance;
use serde::Serialize;

use crate::launch::{LaunchError, Server};

/// Errors of a freeze (a bench that fails is not one: it is recorded as failed).
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("writing {}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{} exists and is not empty; freeze into a new folder", .0.display())]
    NotEmpty(PathBuf),
}

/// What to freeze.
#[derive(Debug, Clone)]
pub struct FreezeOptions {
    pub out: PathBuf,
    /// The `mangrove` binary every step runs.
    pub exe: PathBuf,
    /// Checkpoint to bench (default: a generated one: bitnet-2b shapes on a GPU, tiny on a CPU).
    pub model: Option<PathBuf>,
    pub quick: bool,
    pub dry_run: bool,
    /// The command line, for the provenance.
    pub command: String,
}

/// How a step of the plan runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// A command run to completion.
    Run,
    /// The server: started, left up for the step against it, then stopped (its stdout saved).
    Server,
    /// A command run against the server (`{ADDR}`, `{PID}` in its arguments); it stops the server.
    AgainstServer,
}

/// One command of the plan.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: String,
    pub args: Vec<String>,
    /// File its stdout is saved to (under OUT).
    pub stdout: Option<String>,
    pub kind: StepKind,
}

/// How a step went.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum StepStatus {
    Ok { seconds: f64 },
    Failed { seconds: f64, reason: String },
    Skipped { reason: String },
    Planned,
}

/// The environment a baseline was taken in.
#[derive(Debug, Clone, Serialize)]
pub struct Environment {
    pub provenance: Provenance,
    pub git_commit: Option<String>,
    /// Whether the work tree had uncommitted changes.
    pub git_dirty: Option<bool>,
    pub host: BTreeMap<String, String>,
    /// `nvidia-smi`'s clocks, power and persistence state, when it answers.
    pub gpu_state: Option<String>,
    /// MANGROVE_*, CUDA_*, NVIDIA_*, RAYON_*, OMP_* and RUST_LOG.
    pub env: BTreeMap<String, String>,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub out: PathBuf,
    pub quick: bool,
    pub dry_run: bool,
    pub backend: String,
    pub environment: Environment,
    pub steps: Vec<(Step, StepStatus)>,
}

const ENV_PREFIXES: [&str; 5] = ["MANGROVE_", "CUDA_", "NVIDIA_", "RAYON_", "OMP_"];

fn capture(program: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(program).args(args).output().ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// The environment now, with `gpu` (if any) in the provenance.
pub fn environment(gpu: Option<&Gpu>, command: String) -> Environment {
    // Opening NVRTC here reports the library the benches will load; (0, 0) where there is none.
    let nvrtc = Compiler::open().map(|c| c.version()).unwrap_or((0, 0));
    let mut host = BTreeMap::new();
    host.insert("cpus".into(), std::thread::available_parallelism().map(|n| n.to_string()).unwrap_or_default());
    if let Some(model) = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|t| t.lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))) {
        host.insert("cpu_model".into(), model);
    }
    if let Some(mem) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| t.lines().next().map(str::to_string)) {
        host.insert("memory".into(), mem);
    }
    if let Some(k) = capture("uname", &["-sr"]) {
        host.insert("kernel".into(), k);
    }
    let gpu_state = gpu.and_then(|_| {
        capture("nvidia-smi", &["--query-gpu=name,driver_version,pstate,clocks.sm,clocks.mem,clocks.max.sm,power.draw,power.limit,persistence_mode,temperature.gpu", "--format=csv"])
    });
    Environment {
        provenance: Provenance::collect(gpu, nvrtc, command),
        git_commit: capture("git", &["rev-parse", "HEAD"]),
        git_dirty: capture("git", &["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty()),
        host,
        gpu_state,
        env: std::env::vars().filter(|(k, _)| ENV_PREFIXES.iter().any(|p| k.starts_with(p)) || k == "RUST_LOG").collect(),
    }
}

/// The plan: the steps a freeze runs for `backend` (`cuda` with `gpu_arch`, else `cpu`).
pub fn plan(o: &FreezeOptions, model: &Path, generate: bool, gpu_arch: Option<Arch>, tuning_db: Option<&Path>) -> Vec<Step> {
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<String>>();
    let out = |f: &str| o.out.join(f).display().to_string();
    let m = model.display().to_string();
    let backend = if gpu_arch.is_some() { "cuda" } else { "cpu" };
    let mut db = Vec::new();
    if let (Some(d), Some(_)) = (tuning_db, gpu_arch) {
        db = s(&["--tuning-db", &d.display().to_string()]);
    }
    let mut steps = Vec::new();
    if generate {
        let preset = if gpu_arch.is_some() { "bitnet-2b" } else { "tiny" };
        steps.push(Step { name: "gen-model".into(), args: s(&["gen-model", "--preset", preset, "--out", &m]), stdout: None, kind: StepKind::Run });
    }
    let decode_steps = if o.quick { "16" } else { "128" };
    let mut decode = s(&["bench", "decode", "--model", &m, "--backend", backend, "--batch", "1,16", "--steps", decode_steps, "--json"]);
    decode.extend(db.iter().cloned());
    steps.push(Step { name: "decode".into(), args: decode, stdout: Some("decode.json".into()), kind: StepKind::Run });
    if let (Some(arch), Some(d)) = (gpu_arch, tuning_db) {
        let iters = if o.quick { "10" } else { "30" };
        let a = s(&["bench", "kernels", "--arch", &arch.to_string(), "--db", &d.display().to_string(), "--iters", iters, "--json", &out("kernels.json"), "--svg", &out("kernels.svg")]);
        steps.push(Step { name: "kernels".into(), args: a, stdout: Some("kernels.txt".into()), kind: StepKind::Run });
    }
    let mut serve = s(&["serve", "--model", &m, "--backend", backend, "--port", "0", "--max-batch", "16"]);
    serve.extend(db.iter().cloned());
    steps.push(Step { name: "server".into(), args: serve, stdout: Some("server_metrics.json".into()), kind: StepKind::Server });
    let (levels, n, tokens) = if o.quick { ("1,4", "8", "16") } else { ("1,2,4,8,16", "64", "64") };
    let sweep = s(&["bench", "serve", "--url", "http://{ADDR}", "--concurrency", levels, "--num-prompts", n, "--max-tokens", tokens, "--server-pid", "{PID}", "--json", &out("serve.json")]);
    steps.push(Step { name: "serve-sweep".into(), args: sweep, stdout: Some("serve.txt".into()), kind: StepKind::AgainstServer });
    steps
}

/// Runs the freeze: the environment, every step of the plan (or, dry, none), the summary.
pub fn freeze(o: &FreezeOptions) -> Result<Summary, FreezeError> {
    let w = |path: &Path, bytes: &[u8]| std::fs::write(path, bytes).map_err(|source| FreezeError::Write { path: path.into(), source });
    if o.out.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        return Err(FreezeError::NotEmpty(o.out.clone()));
    }
    std::fs::create_dir_all(&o.out).map_err(|source| FreezeError::Write { path: o.out.clone(), source })?;
    let gpu = Gpu::open_optional(0).ok().and_then(Result::ok);
    let environment = environment(gpu.as_ref(), o.command.clone());
    let gpu_arch = gpu.as_ref().map(|g| g.info().arch);
    let tuning_db = gpu.as_ref().and_then(|g| folder::default_folder(Path::new(folder::ROOT), &Target::Gpu { name: g.info().name.clone(), arch: g.info().arch })).map(|(d, _)| d);
    drop(gpu); // each step opens the GPU itself
    let (model, generate) = match &o.model {
        Some(m) => (m.clone(), false),
        None => (o.out.join("model"), true),
    };
    let steps = plan(o, &model, generate, gpu_arch, tuning_db.as_deref());
    w(&o.out.join("environment.json"), &serde_json::to_vec_pretty(&environment).expect("serializes"))?;
    let log_path = o.out.join("commands.log");
    let mut log = String::new();
    let mut done: Vec<(Step, StepStatus)> = Vec::new();
    let mut server: Option<Server> = None;
    for step in steps {
        let line = format!("{} {}", o.exe.display(), step.args.join(" "));
        if o.dry_run {
            log.push_str(&format!("planned  {line}\n"));
            done.push((step, StepStatus::Planned));
            continue;
        }
        let t = Instant::now();
        let status = if step.kind == StepKind::Server {
            match Server::start(&o.exe, &step.args, &o.out.join("server.log"), Duration::from_secs(600)) {
                Ok(s) => {
                    server = Some(s);
                    StepStatus::Ok { seconds: t.elapsed().as_secs_f64() }
                }
                Err(e) => StepStatus::Failed { seconds: t.elapsed().as_secs_f64(), reason: e.to_string() },
            }
        } else if step.kind == StepKind::AgainstServer && server.is_none() {
            StepStatus::Skipped { reason: "the server did not start".into() }
        } else {
            let args: Vec<String> = match &server {
                Some(s) => step.args.iter().map(|a| a.replace("{ADDR}", &s.addr).replace("{PID}", &s.pid().to_string())).collect(),
                None => step.args.clone(),
            };
            run_step(&o.exe, &args, step.stdout.as_ref().map(|f| o.out.join(f)), t)
        };
        log.push_str(&format!("{:<8} {:>8.1}s  {line}\n", status_word(&status), t.elapsed().as_secs_f64()));
        w(&log_path, log.as_bytes())?;
        done.push((step, status));
        if done.last().is_some_and(|(s, _)| s.kind == StepKind::AgainstServer) {
            if let Some(s) = server.take() {
                let ended = s.stop(Duration::from_secs(30));
                let (step, status) = done.iter_mut().find(|(s, _)| s.kind == StepKind::Server).expect("the server step ran");
                match ended {
                    Ok(stopped) => {
                        w(&o.out.join(step.stdout.as_deref().unwrap_or("server_metrics.json")), stopped.stdout.as_bytes())?;
                        if !stopped.status.success() || stopped.killed {
                            *status = StepStatus::Failed { seconds: 0.0, reason: format!("the server ended {} (killed: {})", stopped.status, stopped.killed) };
                        }
                    }
                    Err(e) => *status = StepStatus::Failed { seconds: 0.0, reason: format!("stopping the server: {e}") },
                }
            }
        }
    }
    w(&log_path, log.as_bytes())?;
    let summary = Summary { out: o.out.clone(), quick: o.quick, dry_run: o.dry_run, backend: if gpu_arch.is_some() { "cuda" } else { "cpu" }.into(), environment, steps: done };
    w(&o.out.join("summary.json"), &serde_json::to_vec_pretty(&summary).expect("serializes"))?;
    w(&o.out.join("summary.md"), summary.markdown().as_bytes())?;
    Ok(summary)
}

fn status_word(s: &StepStatus) -> &'static str {
    match s {
        StepStatus::Ok { .. } => "ok",
        StepStatus::Failed { .. } => "FAILED",
        StepStatus::Skipped { .. } => "skipped",
        StepStatus::Planned => "planned",
    }
}

/// Runs one step to completion, its stdout saved to `stdout`, its stderr kept for a failure.
fn run_step(exe: &Path, args: &[String], stdout: Option<PathBuf>, t: Instant) -> StepStatus {
    let out = match Command::new(exe).args(args).output() {
        Ok(o) => o,
        Err(e) => return StepStatus::Failed { seconds: t.elapsed().as_secs_f64(), reason: LaunchError::Spawn { program: exe.display().to_string(), source: e }.to_string() },
    };
    let seconds = t.elapsed().as_secs_f64();
    if let Some(path) = stdout {
        if let Err(e) = std::fs::write(&path, &out.stdout) {
            return StepStatus::Failed { seconds, reason: format!("writing {}: {e}", path.display()) };
        }
    }
    if out.status.success() {
        StepStatus::Ok { seconds }
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        StepStatus::Failed { seconds, reason: format!("{}: {}", out.status, tail.into_iter().rev().collect::<Vec<_>>().join(" | ")) }
    }
}

impl Summary {
    /// Whether every step that ran succeeded.
    pub fn ok(&self) -> bool {
        self.steps.iter().all(|(_, s)| !matches!(s, StepStatus::Failed { .. }))
    }

    /// `summary.md`.
    pub fn markdown(&self) -> String {
        let e = &self.environment;
        let p = &e.provenance;
        let mut md = format!(
            "# mangrove baseline{}\n\n- commit {} ({}) · binary built from {}{}\n- GPU {} · driver {} · NVRTC {} · backend {}\n- {}\n\n| step | status | time | command |\n|---|---|---|---|\n",
            if self.quick { " (quick)" } else { "" },
            e.git_commit.as_deref().unwrap_or("unknown"),
            match e.git_dirty {
                Some(true) => "dirty",
                Some(false) => "clean",
                None => "unknown",
            },
            p.git_sha,
            // A binary carried to another machine may come from another commit than the folder it runs in.
            match &e.git_commit {
                Some(c) if !p.git_sha.is_empty() && !c.starts_with(&p.git_sha) => " (not the checkout's commit)",
                _ => "",
            },
            p.gpu_name,
            if p.driver_release.is_empty() { "-" } else { &p.driver_release },
            match p.nvrtc_version {
                (0, 0) => "absent".to_string(),
                (a, b) => format!("{a}.{b}"),
            },
            self.backend,
            p.date
        );
        for (step, status) in &self.steps {
            let (word, secs, note) = match status {
                StepStatus::Ok { seconds } => ("ok", format!("{seconds:.1}s"), String::new()),
                StepStatus::Failed { seconds, reason } => ("FAILED", format!("{seconds:.1}s"), format!(" — {reason}")),
                StepStatus::Skipped { reason } => ("skipped", String::new(), format!(" — {reason}")),
                StepStatus::Planned => ("planned", String::new(), String::new()),
            };
            md.push_str(&format!("| {} | {word}{note} | {secs} | `mangrove {}` |\n", step.name, step.args.join(" ")));
        }
        md
    }
}
