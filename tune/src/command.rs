//! The `mangrove-tune` commands: each takes its parsed arguments, runs the sweep, the probe,
//! the tuner benchmark or the merge, writes the tuning DB and prints the report. The binary
//! only parses and routes.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use indicatif::ProgressBar;
use mangrove_core::arch::Arch;
use mangrove_core::check::Gate;
use mangrove_core::gpu::{ActMode, GpuError, TimingPlan, GEMM_TEMPLATE};
use mangrove_core::jit::{Jit, JitError};
use mangrove_core::model_config::{ConfigError, ModelConfig, Preset};
use mangrove_core::template::{format_params, Catalog, Params};
use mangrove_core::tuning_db::folder::{self, Target};
use mangrove_core::tuning_db::{Conflict, DbError, Kept, NoiseMargin, TuningDb};

use crate::context::{Journal, TuneContext};
use crate::decode_ops::{tune_decode_ops, OpOutcome};
use crate::gateup::tune_gateup;
use crate::workload::MoeStage;
use crate::gemv::{tune_gemv, BITNET_2B_SHAPES};
use crate::probe::{probe_case, ProbeReference};
use crate::space::{Shard, SubSpace};
use crate::strategy::Strategy;
use crate::sweep::{SweepOutcome, SweepSettings, TuneError};

/// Errors of a tuner command.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    Input(String),
    #[error("writing {}", .path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Tune(#[from] TuneError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Jit(#[from] JitError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Template(#[from] mangrove_core::template::TemplateError),
}

fn input<T>(message: impl Into<String>) -> Result<T, CommandError> {
    Err(CommandError::Input(message.into()))
}

fn write(path: &Path, text: &str) -> Result<(), CommandError> {
    std::fs::write(path, text).map_err(|source| CommandError::Write { path: path.to_path_buf(), source })
}

/// The GEMV jobs of a sweep: shapes × token counts, in one activation mode.
#[derive(Args, Clone)]
pub struct GemvJobs {
    /// Shapes as NxK (output features × input features). Default: bitnet-b1.58-2B decode shapes.
    #[arg(long, value_delimiter = ',', value_parser = parse_shape)]
    pub shapes: Vec<(i64, i64)>,
    /// Token counts to tune.
    #[arg(long, value_delimiter = ',', default_values_t = [1i64, 2, 4, 8])]
    pub m: Vec<i64>,
    /// Kernel: bf16 (ternary_gemv), int8 per-token W2A8 (ternary_gemv_w2a8, dp4a, M 1..8) or
    /// w2a8-gemm (ternary_gemm_w2a8, tensor cores, M buckets up to 256).
    #[arg(long, value_enum, default_value = "bf16")]
    pub act: ActArg,
}

impl GemvJobs {
    fn shapes(&self) -> Vec<(i64, i64)> {
        if self.shapes.is_empty() { BITNET_2B_SHAPES.to_vec() } else { self.shapes.clone() }
    }
}

/// `--act`.
#[derive(Clone, Copy, ValueEnum)]
pub enum ActArg {
    Bf16,
    W2a8,
    W2a8Gemm,
}

impl ActArg {
    /// The template tuned.
    pub fn template(self) -> &'static str {
        match self {
            ActArg::Bf16 => ActMode::Bf16.template(),
            ActArg::W2a8 => ActMode::W2A8.template(),
            ActArg::W2a8Gemm => GEMM_TEMPLATE,
        }
    }
}

/// `--ref` of probe-mgt1.
#[derive(Clone, Copy, ValueEnum)]
pub enum RefArg {
    #[value(name = "m1_kernel")]
    M1Kernel,
    Dense,
}

/// `--strategy`.
#[derive(Clone, Copy, ValueEnum)]
pub enum StrategyArg {
    Exhaustive,
    Budgeted,
}

/// The options every sweep takes.
#[derive(Args, Clone)]
pub struct Common {
    /// Target architecture (sm80, sm90, sm120, …).
    #[arg(long, default_value = "sm90")]
    pub arch: Arch,
    /// Search strategy.
    #[arg(long, value_enum, default_value = "exhaustive")]
    pub strategy: StrategyArg,
    /// Configs to time per sweep with --strategy budgeted.
    #[arg(long, default_value_t = 32)]
    pub budget: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Run only shard i of n (0-based), e.g. for Slurm arrays: --shard $SLURM_ARRAY_TASK_ID/$N.
    #[arg(long, default_value = "0/1")]
    pub shard: Shard,
    /// Sweep only these values of a tunable (repeatable), e.g. --space BULK=1 --space STAGES=0,2,4;
    /// the template's default is still timed as the baseline.
    #[arg(long = "space", value_name = "NAME=V1,V2")]
    pub space: Vec<String>,
    /// Compile and resource-check every candidate; time nothing.
    #[arg(long)]
    pub compile_only: bool,
    /// Correctness gate: largest absolute error allowed.
    #[arg(long, default_value_t = 0.08)]
    pub max_abs: f64,
    /// Correctness gate: largest relative error allowed.
    #[arg(long, default_value_t = 0.25)]
    pub max_rel: f64,
    /// Relative errors are taken against max(|ref|, rel_floor × max|ref|).
    #[arg(long, default_value_t = 0.05)]
    pub rel_floor: f64,
    /// Timed batches per config.
    #[arg(long, default_value_t = 30)]
    pub samples: usize,
    /// Launches per timed batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Runner-ups kept per record.
    #[arg(long, default_value_t = 3)]
    pub runner_ups: usize,
    /// Gain (%) a tuned config needs over the template's default, and a new record over one
    /// already in the DB, to replace it; smaller gains are timing noise.
    #[arg(long, default_value = "5")]
    pub noise_margin: NoiseMargin,
    /// Tuning DB folder (default: the folder of this GPU, e.g. tuning_db/h200; see db_dir).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Do not write the tuning DB (otherwise each finished record is merged into it at once).
    #[arg(long)]
    pub no_write: bool,
    /// Skip problems the tuning DB already has a record for (continue an interrupted run).
    #[arg(long, conflicts_with = "no_write")]
    pub resume: bool,
    #[arg(long, env = "MANGROVE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Load templates from this folder instead of the ones built into the binary.
    #[arg(long, env = "MANGROVE_TEMPLATES_DIR")]
    pub templates_dir: Option<PathBuf>,
    /// Print the full outcome as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Parses `NxK`.
pub fn parse_shape(s: &str) -> Result<(i64, i64), String> {
    let (n, k) = s.split_once(['x', 'X']).ok_or_else(|| format!("bad shape '{s}': expected NxK, e.g. 2560x6912"))?;
    let n: i64 = n.trim().parse().map_err(|_| format!("bad shape '{s}': N is not an integer"))?;
    let k: i64 = k.trim().parse().map_err(|_| format!("bad shape '{s}': K is not an integer"))?;
    if n <= 0 || k <= 0 {
        return Err(format!("bad shape '{s}': N and K must be positive"));
    }
    Ok((n, k))
}

/// `gemv`: tune the ternary GEMV of `jobs.act` on the shapes × M.
pub fn gemv(common: Common, jobs: GemvJobs) -> Result<(), CommandError> {
    let (shapes, m, act) = (jobs.shapes(), jobs.m, jobs.act);
    let ctx = context(&common)?;
    if !common.json {
        println!("gemv: shapes {} × M {:?}, {}", shapes.iter().map(|(n, k)| format!("{n}x{k}")).collect::<Vec<_>>().join(","), m, ctx.settings.strategy);
    }
    let pb = progress(common.json);
    let outcomes = tune_gemv(&ctx, act.template(), &shapes, &m, &pb)?;
    pb.finish_and_clear();
    finish(&ctx, &common, of_template(act.template(), outcomes))
}

/// `gateup`: tune the grouped MoE stages (`moe_gateup`, then `moe_down`) of (experts, topk,
/// hidden, inter) at each M.
pub fn gateup(common: Common, (experts, topk, hidden, inter): (i64, i64, i64, i64), m: Vec<i64>, stages: &[MoeStage]) -> Result<(), CommandError> {
    let ctx = context(&common)?;
    if !common.json {
        let names: Vec<&str> = stages.iter().map(|s| s.template()).collect();
        println!("gateup: {} E={experts} TOPK={topk} H={hidden} I={inter} × M {m:?}, {}", names.join(" + "), ctx.settings.strategy);
    }
    let pb = progress(common.json);
    let mut outcomes = Vec::new();
    for &stage in stages {
        outcomes.extend(of_template(stage.template(), tune_gateup(&ctx, stage, (experts, topk, hidden, inter), &m, &pb)?));
    }
    pb.finish_and_clear();
    finish(&ctx, &common, outcomes)
}

/// `decode-ops`: tune the decode step's row-wise ops of a model (a folder, else a preset).
pub fn decode_ops(common: Common, preset: Preset, model: Option<PathBuf>) -> Result<(), CommandError> {
    let (config, what) = match &model {
        Some(dir) => (ModelConfig::from_model_dir(dir)?, dir.display().to_string()),
        None => (ModelConfig::of_preset(preset), format!("preset {preset}")),
    };
    let ctx = context(&common)?;
    if !common.json {
        println!("decode-ops: {what}, {}", ctx.settings.strategy);
    }
    let pb = progress(common.json);
    let outcomes = tune_decode_ops(&ctx, &config, &pb)?;
    pb.finish_and_clear();
    finish(&ctx, &common, outcomes)
}

/// `probe-mgt1`: gate the M>1 linear path per (M, N, K) and record the gates.
pub fn probe_mgt1(common: Common, m: Vec<i64>, shapes: Vec<(i64, i64)>, reference: RefArg, out_dir: PathBuf) -> Result<(), CommandError> {
    let shapes = if shapes.is_empty() { BITNET_2B_SHAPES.to_vec() } else { shapes };
    if let Some(bad) = m.iter().find(|&&m| !(1..=4096).contains(&m)) {
        return input(format!("--m {bad} is out of range 1..=4096"));
    }
    let ctx = context(&common)?;
    let Some(gpu) = &ctx.gpu else { return input(format!("probe-mgt1 runs kernels and needs a GPU of {}", ctx.arch())) };
    let reference = match reference {
        RefArg::M1Kernel => ProbeReference::M1Kernel,
        RefArg::Dense => ProbeReference::Dense,
    };
    let dir = db_dir(&ctx, &common.db);
    let mut db = TuningDb::load(&dir)?;
    let stamp = ctx.provenance.date.replace([':', '-'], "");
    let run_dir = out_dir.join(format!("mgt1_linear_probe_{stamp}"));
    std::fs::create_dir_all(&run_dir).map_err(|source| CommandError::Write { path: run_dir.clone(), source })?;
    let mut log = String::new();
    let mut cases = Vec::new();
    for &(n, k) in &shapes {
        for &mm in &m {
            let case = probe_case(gpu, &ctx.jit, &db, ctx.arch(), (mm as usize, n, k), reference, &ctx.settings.gate, ctx.settings.plan, 7 + mm as u64, &ctx.provenance);
            let r = &case.record;
            let line = format!(
                "{:<4} M={mm:<3} N={n:<6} K={k:<6} avg {:>8.2} µs p50 {:>8.2} p95 {:>8.2}  config {:?}  {}",
                if r.passed { "PASS" } else { "FAIL" }, r.avg_us, r.p50_us, r.p95_us, case.rule,
                match &r.deltas { Some(d) => d.to_string(), None => r.status.clone() }
            );
            if !common.json {
                println!("{line}");
            }
            log.push_str(&line);
            log.push('\n');
            cases.push(case);
        }
    }
    let report = serde_json::json!({
        "gate": ctx.settings.gate, "reference": format!("{reference:?}"), "provenance": ctx.provenance, "cases": cases,
    });
    write(&run_dir.join("probe.json"), &(serde_json::to_string_pretty(&report)? + "\n"))?;
    write(&run_dir.join("probe.log"), &log)?;
    for c in cases.iter().filter(|c| c.record.m > 1) {
        db.record_gate(c.record.clone());
    }
    if !common.no_write {
        db.save(&dir)?;
    }
    let failed = cases.iter().filter(|c| !c.record.passed).count();
    if common.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{} of {} cases passed; wrote {} and gates to {}", cases.len() - failed, cases.len(), run_dir.display(), dir.display());
    }
    Ok(())
}

/// `bench`: exhaustive vs budgeted vs default on the gemv jobs (the exhaustive winners are written).
pub fn bench(common: Common, jobs: GemvJobs, report: Option<PathBuf>) -> Result<(), CommandError> {
    let (shapes, m, act) = (jobs.shapes(), jobs.m, jobs.act);
    let mut ctx = context(&common)?;
    if ctx.settings.compile_only {
        return input(format!("bench times kernels and needs a GPU of {}", ctx.arch()));
    }
    let budget = common.budget;
    ctx.settings.strategy = Strategy::Exhaustive;
    let pb = progress(common.json);
    let exhaustive = tune_gemv(&ctx, act.template(), &shapes, &m, &pb)?;
    ctx.settings.strategy = Strategy::Budgeted { budget, seed: common.seed };
    let budgeted = tune_gemv(&ctx, act.template(), &shapes, &m, &pb)?;
    pb.finish_and_clear();
    let mut rows = Vec::new();
    println!("copy bandwidth {:.0} GB/s; budgeted = {} configs timed per job", ctx.copy_bw_gbs, budget);
    println!("{:<24} {:>9} {:>9} {:>8} {:>6} {:>9} {:>9} {:>7}", "problem", "default", "tuned", "speedup", "%copy", "budgeted", "b/exh", "%meas");
    for ((p, e), (_, b)) in exhaustive.iter().zip(&budgeted) {
        let (Some(er), Some(br)) = (&e.record, &b.record) else { continue };
        let def = e.default_us.unwrap_or(f64::NAN);
        let row = serde_json::json!({
            "problem": p, "default_us": def, "tuned_us": er.winner.median_us, "speedup_vs_default": def / er.winner.median_us,
            "frac_copy_bw": er.winner.frac_copy_bw, "gb_s": er.winner.gb_s, "budgeted_us": br.winner.median_us,
            "budgeted_over_exhaustive": br.winner.median_us / er.winner.median_us,
            "measurements_exhaustive": er.timed + er.rejected, "measurements_budgeted": br.timed + br.rejected,
            "tuned_params": er.winner.params, "budgeted_params": br.winner.params,
        });
        println!(
            "{:<24} {:>7.2}µs {:>7.2}µs {:>7.2}× {:>5.1}% {:>7.2}µs {:>8.3} {:>6.1}%",
            format_params(p), def, er.winner.median_us, def / er.winner.median_us, 100.0 * er.winner.frac_copy_bw,
            br.winner.median_us, br.winner.median_us / er.winner.median_us,
            100.0 * (br.timed + br.rejected) as f64 / (er.timed + er.rejected).max(1) as f64
        );
        rows.push(row);
    }
    let geo = |key: &str| (rows.iter().map(|r| r[key].as_f64().unwrap_or(f64::NAN).ln()).sum::<f64>() / rows.len().max(1) as f64).exp();
    let summary = serde_json::json!({
        "geomean_speedup_vs_default": geo("speedup_vs_default"),
        "geomean_budgeted_over_exhaustive": geo("budgeted_over_exhaustive"),
        "worst_budgeted_over_exhaustive": rows.iter().map(|r| r["budgeted_over_exhaustive"].as_f64().unwrap_or(0.0)).fold(0.0, f64::max),
        "measurement_fraction": rows.iter().map(|r| r["measurements_budgeted"].as_f64().unwrap_or(0.0)).sum::<f64>()
            / rows.iter().map(|r| r["measurements_exhaustive"].as_f64().unwrap_or(0.0)).sum::<f64>().max(1.0),
        "best_frac_copy_bw": rows.iter().map(|r| r["frac_copy_bw"].as_f64().unwrap_or(0.0)).fold(0.0, f64::max),
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if let Some(path) = report {
        let full = serde_json::json!({"copy_bw_gbs": ctx.copy_bw_gbs, "budget": budget, "provenance": ctx.provenance, "rows": rows, "summary": summary});
        write(&path, &(serde_json::to_string_pretty(&full)? + "\n"))?;
    }
    if !common.no_write {
        finish(&ctx, &Common { json: false, ..common }, of_template(act.template(), exhaustive))?;
    }
    Ok(())
}

/// `merge`: merge DB folders into `out` (per key, a record already there stays unless the next
/// beats it by `margin`).
pub fn merge(inputs: Vec<PathBuf>, out: PathBuf, margin: NoiseMargin) -> Result<(), CommandError> {
    let mut db = TuningDb::load(&out)?;
    let mut conflicts = Vec::new();
    for i in &inputs {
        if !i.is_dir() {
            return input(format!("{} is not a tuning DB folder", i.display()));
        }
        conflicts.extend(db.merge(TuningDb::load(i)?, margin));
    }
    db.save(&out)?;
    let n: usize = db.templates.values().map(|t| t.records.len()).sum();
    println!("merged {} folders into {}: {n} records, {} gates", inputs.len(), out.display(), db.gates.len());
    for c in &conflicts {
        println!("conflict {} {} M={}: {}", c.template, format_params(&c.problem), c.m, conflict_text(c, margin));
    }
    Ok(())
}

/// "kept 4.00 µs, dropped 5.00 µs (20.0 % faster, spread 3.1 %)", saying when the margin decided.
fn conflict_text(c: &Conflict, margin: NoiseMargin) -> String {
    let why = match c.kept {
        Kept::Challenger => format!("{:.1} % faster than the record there", c.gain_pct),
        Kept::Incumbent => format!("the new record was {:.1} % slower", -c.gain_pct),
        Kept::IncumbentWithinMargin => format!("the new record was only {:.1} % faster, within the {margin} noise margin", c.gain_pct),
    };
    format!("kept {:.2} µs, dropped {:.2} µs ({why}; its spread p95/median {:.1} %)", c.kept_us, c.dropped_us, c.spread_pct)
}

fn catalog(c: &Common) -> Result<Catalog, CommandError> {
    Ok(match &c.templates_dir {
        Some(d) => Catalog::from_dir(d)?,
        None => Catalog::embedded(),
    })
}

fn context(c: &Common) -> Result<TuneContext, CommandError> {
    let jit = Jit::open(catalog(c)?, &mangrove_core::cache::resolve_dir(c.cache_dir.as_deref()), false)?;
    let strategy = match c.strategy {
        StrategyArg::Exhaustive => Strategy::Exhaustive,
        StrategyArg::Budgeted if c.budget == 0 => return input("--budget must be at least 1"),
        StrategyArg::Budgeted => Strategy::Budgeted { budget: c.budget, seed: c.seed },
    };
    if c.samples == 0 || c.batch == 0 {
        return input("--samples and --batch must be at least 1");
    }
    let settings = SweepSettings {
        arch: c.arch,
        strategy,
        shard: c.shard,
        space: SubSpace::parse(&c.space).map_err(CommandError::Input)?,
        gate: Gate { max_abs: c.max_abs, max_rel: c.max_rel, rel_floor: c.rel_floor },
        plan: TimingPlan { warmup: 3, samples: c.samples, batch: c.batch },
        runner_ups: c.runner_ups,
        compile_only: c.compile_only,
        noise_margin: c.noise_margin,
    };
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let (mut ctx, note) = TuneContext::new(jit, settings, command)?;
    if !c.no_write && ctx.timing() {
        let dir = db_dir(&ctx, &c.db);
        ctx.journal = Some(Journal { before: TuningDb::load(&dir)?, dir, resume: c.resume });
    }
    if let Some(note) = note {
        eprintln!("note: {note}");
    } else if c.compile_only {
        eprintln!("note: --compile-only: compiling and resource-checking, timing nothing");
    }
    Ok(ctx)
}

fn progress(hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    mangrove_core::progress::bar("configs")
}

/// The DB folder: the flag, else the GPU's (or, none present, the arch's) default folder when
/// its records were all tuned on this GPU (the shipped tuning_db/h100 for an H100 SXM), else a
/// folder of its own, tuning_db/<gpu slug> (tuning_db/h100-pcie) or tuning_db/<arch>.
fn db_dir(ctx: &TuneContext, flag: &Option<PathBuf>) -> PathBuf {
    if let Some(d) = flag {
        return d.clone();
    }
    let target = match &ctx.gpu {
        Some(g) => Target::Gpu { name: g.info().name.clone(), arch: g.info().arch },
        None => Target::Arch(ctx.arch()),
    };
    let root = Path::new(folder::ROOT);
    match folder::default_folder(root, &target) {
        Some((d, _)) if TuningDb::load(&d).is_ok_and(|db| folder::foreign_records(&db, &target).is_empty()) => d,
        _ => root.join(target.slug()),
    }
}

/// The outcomes of one template's sweeps, each tagged with the template.
fn of_template(template: &str, outcomes: Vec<(Params, SweepOutcome)>) -> Vec<OpOutcome> {
    outcomes.into_iter().map(|(p, o)| (template.to_string(), p, o)).collect()
}

fn finish(ctx: &TuneContext, c: &Common, outcomes: Vec<OpOutcome>) -> Result<(), CommandError> {
    let dir = db_dir(ctx, &c.db);
    // Each record was merged into the folder as its sweep finished (the journal); the conflicts
    // are those with the DB as the run found it.
    let mut db = match &ctx.journal {
        Some(j) => j.before.clone(),
        None => TuningDb::load(&dir)?,
    };
    let mut conflicts = Vec::new();
    for (template, _, o) in &outcomes {
        if let Some(r) = &o.record {
            conflicts.extend(db.upsert(template, r.clone(), c.noise_margin));
        }
    }
    let wrote = ctx.journal.is_some() && outcomes.iter().any(|(_, _, o)| o.record.is_some());
    let mut templates: Vec<&str> = outcomes.iter().map(|(t, _, _)| t.as_str()).collect();
    templates.dedup();
    if c.json {
        let jobs: Vec<_> = outcomes
            .iter()
            .map(|(t, p, o)| {
                serde_json::json!({
                    "template": t, "problem": p, "candidates": o.candidates, "shard_configs": o.shard_configs,
                    "pruned": o.pruned.iter().map(|(p, r)| serde_json::json!({"params": p, "reason": r.to_string()})).collect::<Vec<_>>(),
                    "rejected": o.rejected.iter().map(|(p, d)| serde_json::json!({"params": p, "deltas": d})).collect::<Vec<_>>(),
                    "timed": o.timed.len(), "default_us": o.default_us, "baseline": o.baseline_note, "record": o.record,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({
            "templates": templates, "arch": ctx.arch().to_string(), "compile_only": ctx.settings.compile_only,
            "copy_bw_gbs": ctx.copy_bw_gbs, "db": dir, "written": wrote, "jobs": jobs,
        }))?);
        return Ok(());
    }
    if ctx.copy_bw_gbs > 0.0 {
        println!("copy bandwidth: {:.0} GB/s", ctx.copy_bw_gbs);
    }
    println!("{:<24} {:>5} {:>6} {:>6} {:>6} {:>9} {:>8} {:>6} {:>9} {:>7}  winner", "problem", "cands", "pruned", "reject", "timed", "median", "GB/s", "%copy", "default", "speedup");
    for (t, p, o) in &outcomes {
        let prob = if templates.len() > 1 { format!("{t} {}", format_params(p)) } else { format_params(p) };
        match &o.record {
            Some(r) => {
                let w = &r.winner;
                let (def, sp) = match o.default_us {
                    Some(d) => (format!("{d:.2}"), format!("{:.2}×", d / w.median_us)),
                    None => ("-".into(), "-".into()),
                };
                println!(
                    "{prob:<24} {:>5} {:>6} {:>6} {:>6} {:>7.2}µs {:>8.0} {:>5.1}% {:>9} {:>7}  {}",
                    o.candidates, o.pruned.len(), o.rejected.len(), o.timed.len(), w.median_us, w.gb_s, 100.0 * w.frac_copy_bw, def, sp, format_params(&w.params)
                );
            }
            None => println!("{prob:<24} {:>5} {:>6} {:>6} {:>6}  (not timed)", o.candidates, o.pruned.len(), o.rejected.len(), o.timed.len()),
        }
    }
    let pruned: usize = outcomes.iter().map(|(_, _, o)| o.pruned.len()).sum();
    if pruned > 0 {
        let mut reasons = std::collections::BTreeMap::<String, usize>::new();
        for (_, _, o) in &outcomes {
            for (_, r) in &o.pruned {
                *reasons.entry(r.kind().to_string()).or_default() += 1;
            }
        }
        println!("pruned: {}", reasons.iter().map(|(k, v)| format!("{v} × {k}")).collect::<Vec<_>>().join(", "));
    }
    for cf in &conflicts {
        println!("conflict {} M={}: {}", format_params(&cf.problem), cf.m, conflict_text(cf, c.noise_margin));
    }
    if wrote {
        println!("wrote {}", dir.display());
    } else if ctx.settings.compile_only {
        println!("compile-only: nothing timed, tuning DB unchanged");
    }
    Ok(())
}
