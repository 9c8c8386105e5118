//! `mangrove bench kernels`: its flags, and the run from flags to table, JSON and SVG. Bad
//! flags fail before anything opens; no GPU is a clear error (never a panic), checked before
//! NVRTC or the cache is touched.

use std::path::{Path, PathBuf};

use mangrove_core::arch::Arch;
use mangrove_core::gpu::{Gpu, TimingPlan};
use mangrove_core::jit::Jit;
use mangrove_core::template::Catalog;
use mangrove_core::tuning_db::TuningDb;

use super::measure::{run, LabSettings};
use super::{default_cases, plot, LabError, Report, LAB_GATE};

/// Flags of `mangrove bench kernels`.
#[derive(Debug, Clone, clap::Args)]
pub struct KernelsArgs {
    /// Target architecture; must be the GPU's.
    #[arg(long, default_value = "sm90")]
    pub arch: Arch,
    /// Tuning DB folder the tuned configs come from (default: the folder of the GPU present).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Write the report (with provenance) as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a bar plot of the fraction of copy bandwidth here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Timed batches per variant (the median is reported).
    #[arg(long, default_value_t = 30)]
    pub iters: usize,
    /// Launches per timed batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Seed of the random problems.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// Runs the lab: prints the table, writes `--json` / `--svg`, and fails (after writing) when
/// any variant failed its correctness check. The JIT (NVRTC, the cache in `cache_dir`) is
/// opened only once a GPU is found.
pub fn bench_kernels(args: &KernelsArgs, catalog: Catalog, cache_dir: &Path) -> Result<Report, LabError> {
    if args.iters == 0 || args.batch == 0 {
        return Err(LabError::Input("--iters and --batch must be at least 1".into()));
    }
    let Some(db_dir) = &args.db else {
        return Err(LabError::Input("no tuning DB folder for this GPU under tuning_db/; pass --db".into()));
    };
    if !db_dir.is_dir() {
        return Err(LabError::Input(format!("tuning DB folder {} does not exist", db_dir.display())));
    }
    let db = TuningDb::load(db_dir).map_err(|e| LabError::Input(e.to_string()))?;
    let gpu = Gpu::open_optional(0)?.map_err(|absent| LabError::NoGpu(absent.to_string()))?;
    let jit = Jit::open(catalog, cache_dir, false)?;
    let settings = LabSettings {
        arch: args.arch,
        plan: TimingPlan { warmup: 5, samples: args.iters, batch: args.batch },
        gate: LAB_GATE,
        seed: args.seed,
        cases: default_cases(),
        tuning_db: db_dir.display().to_string(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let report = run(&gpu, &jit, &db, &settings, &|what| eprintln!("bench kernels: {what}"))?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        write(path, &(serde_json::to_string_pretty(&report).map_err(|e| LabError::Input(e.to_string()))? + "\n"))?;
        eprintln!("bench kernels: wrote {}", path.display());
    }
    if let Some(path) = &args.svg {
        plot::write_svg(&report, path)?;
        eprintln!("bench kernels: wrote {}", path.display());
    }
    let failures = report.failures();
    if !failures.is_empty() {
        return Err(LabError::Failed(failures.join("\n")));
    }
    Ok(report)
}

fn write(path: &Path, text: &str) -> Result<(), LabError> {
    std::fs::write(path, text).map_err(|source| LabError::Write { path: path.display().to_string(), source })
}
