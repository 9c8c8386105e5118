//! Time to ready of `mangrove serve` (`mangrove bench startup`): the same model and tuning DB
//! started three times as a child process — on an empty cache (every kernel compiled), on the
//! now warm cache, and offline from a blessed bundle — each timed until `/health` answers 200.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mangrove_core::arch::Arch;
use mangrove_core::template::Catalog;
use mangrove_deploy::bless::{bless, BlessError, BlessRequest};

/// Errors of the startup benchmark.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("starting {}", .exe.display())]
    Spawn { exe: PathBuf, source: std::io::Error },
    #[error("serve exited before it was ready (args {0:?})")]
    Exited(Vec<String>),
    #[error("serve did not answer /health within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Bless(#[from] BlessError),
}

/// The three start-up times, in ms, with each start's "kernels ready" log line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StartupReport {
    pub model: PathBuf,
    pub arch: String,
    pub max_batch: i64,
    pub cold_ms: f64,
    pub warm_ms: f64,
    pub blessed_ms: f64,
    pub cold_over_warm: f64,
    pub cold_over_blessed: f64,
    pub kernels: StartupLines,
}

/// Each start's "kernels ready" line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StartupLines {
    pub cold: String,
    pub warm: String,
    pub blessed: String,
}

/// How long a start may take before the benchmark gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(600);

/// Spawns `exe --cache-dir DIR serve --port 0 ARGS` and returns (ms until `/health` answers 200,
/// the server's "kernels ready" log line), then stops it.
fn time_to_ready(exe: &Path, cache_dir: &Path, args: &[String]) -> Result<(f64, String), StartupError> {
    let t0 = Instant::now();
    let mut child = Command::new(exe)
        .arg("--cache-dir")
        .arg(cache_dir)
        .args(["serve", "--port", "0"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| StartupError::Spawn { exe: exe.to_path_buf(), source })?;
    let result = (|| {
        let mut lines = BufReader::new(child.stderr.take().expect("stderr is piped"));
        let mut kernels = String::new();
        let addr = loop {
            let mut line = String::new();
            if lines.read_line(&mut line).unwrap_or(0) == 0 {
                return Err(StartupError::Exited(args.to_vec()));
            }
            if line.contains("kernels for") {
                kernels = line.trim().to_string();
            }
            if let Some(rest) = line.split("http://").nth(1) {
                break rest.split_whitespace().next().unwrap_or_default().to_string();
            }
        };
        let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).http_status_as_error(false).build().into();
        loop {
            if agent.get(&format!("http://{addr}/health")).call().is_ok_and(|r| r.status() == 200) {
                return Ok((t0.elapsed().as_secs_f64() * 1e3, kernels));
            }
            if t0.elapsed() > READY_TIMEOUT {
                return Err(StartupError::Timeout(READY_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Times the three starts of `exe serve` for `model` with `tuning_db`; the bundle is blessed from
/// `catalog` in between (into a temporary folder, removed afterwards).
pub fn bench_startup(exe: &Path, catalog: &Catalog, model: &Path, tuning_db: &Path, arch: Arch, max_batch: i64) -> Result<StartupReport, StartupError> {
    let tmp = std::env::temp_dir().join(format!("mangrove-startup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let (cache, bundle_dir) = (tmp.join("cache"), tmp.join("bundle"));
    let s = |p: &Path| p.display().to_string();
    let common: Vec<String> =
        ["--model", &s(model), "--tuning-db", &s(tuning_db), "--arch", &arch.to_string(), "--max-batch", &max_batch.to_string()].map(String::from).to_vec();
    let run = || -> Result<StartupReport, StartupError> {
        let (cold, cold_k) = time_to_ready(exe, &cache, &common)?;
        let (warm, warm_k) = time_to_ready(exe, &cache, &common)?;
        let req = BlessRequest { tuning_db, model, arch, out: &bundle_dir, max_batch, verify_on_gpu: false, sign: None };
        bless(catalog, &cache, &req)?;
        let mut blessed_args = common.clone();
        blessed_args.extend(["--blessed".to_string(), s(&bundle_dir), "--offline".to_string()]);
        let (blessed, blessed_k) = time_to_ready(exe, &tmp.join("unused-cache"), &blessed_args)?;
        Ok(StartupReport {
            model: model.to_path_buf(),
            arch: arch.to_string(),
            max_batch,
            cold_ms: cold,
            warm_ms: warm,
            blessed_ms: blessed,
            cold_over_warm: cold / warm,
            cold_over_blessed: cold / blessed,
            kernels: StartupLines { cold: cold_k, warm: warm_k, blessed: blessed_k },
        })
    };
    let report = run();
    let _ = std::fs::remove_dir_all(&tmp);
    report
}

impl std::fmt::Display for StartupReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "time to ready of `mangrove serve` ({}; {}, max batch {}):", self.model.display(), self.arch, self.max_batch)?;
        writeln!(f, "  cold cache     {:>9.0} ms   {}", self.cold_ms, self.kernels.cold)?;
        writeln!(f, "  warm cache     {:>9.0} ms   {}", self.warm_ms, self.kernels.warm)?;
        writeln!(f, "  blessed bundle {:>9.0} ms   {}", self.blessed_ms, self.kernels.blessed)?;
        writeln!(f, "  cold/warm {:.2}×   cold/blessed {:.2}×", self.cold_over_warm, self.cold_over_blessed)
    }
}
