//! `mangrove-tune`: sweep kernel configs on the GPU, gate them for correctness, and write the
//! winners into a per-GPU tuning DB (`tuning_db/<gpu>/`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use mangrove::model_config::Preset;
use mangrove::tune::command::{self, parse_shape, Common, GemvJobs, RefArg};
use mangrove::tune::gateup::{DEFAULT_MOE, GATEUP_BUCKETS};
use mangrove::tune::workload::MoeStage;

#[derive(Parser)]
#[command(
    name = "mangrove-tune",
    version,
    about = "Autotune mangrove kernels on this GPU and record the winners in a tuning DB",
    long_about = "Each sweep enumerates a template's tunable space for a problem, prunes configs that violate \
a constraint or the device's limits (threads, registers, shared memory, spills: the reason is recorded), \
compiles the rest in parallel, rejects any config whose output misses the CPU reference (--max-abs/--max-rel), \
times the survivors with CUDA events over inputs rotated beyond L2, and writes the winner, runner-ups and \
provenance to tuning_db/<gpu>/<template>.json. Without a GPU every sweep is compile-only."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// A grouped MoE stage on the command line.
#[derive(Clone, Copy, clap::ValueEnum)]
enum MoeStageArg {
    #[value(name = "gateup")]
    GateUp,
    Down,
}

#[derive(Subcommand)]
enum Cmd {
    /// The M = 1..8 ternary decode GEMV (BitNet packed weights), K-split 1/2/4/8 included.
    Gemv {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        jobs: GemvJobs,
    },
    /// The grouped MoE stages: gate_up (grouped int8 GEMM over experts on tokens sorted by
    /// expert and padded to BLOCK_M, ternary expert weights, act(gate)·up fused) and down
    /// (per-pair int8 rows), for the same shape and M buckets.
    Gateup {
        #[command(flatten)]
        common: Common,
        /// Experts.
        #[arg(long, default_value_t = DEFAULT_MOE.0)]
        experts: i64,
        /// Experts per token.
        #[arg(long, default_value_t = DEFAULT_MOE.1)]
        topk: i64,
        /// Hidden size.
        #[arg(long, default_value_t = DEFAULT_MOE.2)]
        hidden: i64,
        /// Expert intermediate size.
        #[arg(long, default_value_t = DEFAULT_MOE.3)]
        inter: i64,
        /// Token counts (M buckets).
        #[arg(long, value_delimiter = ',', default_values_t = GATEUP_BUCKETS.to_vec())]
        m: Vec<i64>,
        /// Only gate_up (`moe_gateup`) or only down (`moe_down`); both by default.
        #[arg(long, value_enum)]
        only: Option<MoeStageArg>,
    },
    /// The decode step's row-wise ops of one model at one token row: its RMSNorm + int8
    /// quantization kernels (threads per row) and attention (splits over positions, fewest
    /// positions per split, threads), timed on a mix of contexts; `serve` picks the winners.
    #[command(name = "decode-ops")]
    DecodeOps {
        #[command(flatten)]
        common: Common,
        /// Shapes of a gen-model preset.
        #[arg(long, default_value = "bitnet-2b", conflicts_with = "model")]
        preset: Preset,
        /// A model folder whose config.json gives the shapes (instead of --preset).
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// The M>1 ternary linear gate: run the engine's path for M tokens (the tuned tensor-core
    /// GEMM at bucket M) against a reference, time it, and record pass/fail in the tuning DB.
    #[command(name = "probe-mgt1")]
    ProbeMgt1 {
        #[command(flatten)]
        common: Common,
        /// Token counts to gate (default: every GEMM bucket; with --quick 2,4,8).
        #[arg(long, value_delimiter = ',')]
        m: Vec<i64>,
        /// Shapes as NxK. Default: bitnet-b1.58-2B decode shapes.
        #[arg(long, value_delimiter = ',', value_parser = parse_shape)]
        shapes: Vec<(i64, i64)>,
        /// Reference: the M=1 kernel row by row (what the engine would run otherwise), or the
        /// f64 dense product.
        #[arg(long = "ref", value_enum, default_value = "m1_kernel")]
        reference: RefArg,
        /// Gate only M 2, 4 and 8 (unless --m is given): a smoke run of the gate.
        #[arg(long)]
        quick: bool,
        /// Folder in which mgt1_linear_probe_<timestamp>/ is written.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
    /// Benchmark the tuner itself on gemv: exhaustive vs budgeted on the same jobs (the
    /// exhaustive winners are written to the DB), each against the template's default config.
    Bench {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        jobs: GemvJobs,
        /// Write the full report here as JSON.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// The SIMD CPU backend on this machine: instruction set, threads, rows per task and the
    /// AVX2 K block for one model's decode layer (q|k|v, o, gate|up, down) at each M, every
    /// candidate checked against the f64 reference first, timed over weights rotated beyond the
    /// last-level cache; winners go to tuning_db/<cpu>/cpu_ternary.json (`--backend cpu
    /// --tuning-db` reads them).
    Cpu {
        /// Shapes of a gen-model preset.
        #[arg(long, default_value = "bitnet-2b", conflicts_with = "model")]
        preset: Preset,
        /// A model folder whose config.json gives the shapes (instead of --preset).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Token rows per step (M buckets).
        #[arg(long, value_delimiter = ',', default_values_t = vec![1i64, 4, 8])]
        m: Vec<i64>,
        /// Thread counts (default: half the cores and all of them).
        #[arg(long, value_delimiter = ',')]
        threads: Vec<usize>,
        /// Byte rows (4 output rows each) per task.
        #[arg(long, value_delimiter = ',', default_values_t = vec![2usize, 4, 8, 16, 32, 64])]
        rows_per_task: Vec<usize>,
        /// Timed passes per candidate.
        #[arg(long, default_value_t = 9)]
        iters: usize,
        /// Tuning DB folder (default: tuning_db/<cpu slug>, e.g. tuning_db/amd-epyc-avx512-vnni).
        #[arg(long)]
        db: Option<PathBuf>,
        /// Do not write the tuning DB.
        #[arg(long)]
        dry_run: bool,
    },
    /// Merge tuning DB folders into OUT: per key a record already there stays unless the next
    /// one is faster by the noise margin; conflicts are listed. Merging twice changes nothing.
    Merge {
        /// DB folders to merge, in order.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        #[arg(short, long)]
        out: PathBuf,
        /// Gain (%) a record needs to replace one already there; 0 for shards of one run.
        #[arg(long, default_value = "5")]
        noise_margin: mangrove::tuning_db::NoiseMargin,
    },
}

fn main() {
    let cli = Cli::parse();
    let done = match cli.cmd {
        Cmd::Gemv { common, jobs } => command::gemv(common, jobs),
        Cmd::Gateup { common, experts, topk, hidden, inter, m, only } => {
            let stages = match only {
                None => vec![MoeStage::GateUp, MoeStage::Down],
                Some(MoeStageArg::GateUp) => vec![MoeStage::GateUp],
                Some(MoeStageArg::Down) => vec![MoeStage::Down],
            };
            command::gateup(common, (experts, topk, hidden, inter), m, &stages)
        }
        Cmd::DecodeOps { common, preset, model } => command::decode_ops(common, preset, model),
        Cmd::ProbeMgt1 { common, m, shapes, reference, quick, out_dir } => {
            let m = match (m.is_empty(), quick) {
                (false, _) => m,
                (true, true) => vec![2, 4, 8],
                (true, false) => mangrove::step::GEMM_BUCKETS.to_vec(),
            };
            command::probe_mgt1(common, m, shapes, reference, out_dir)
        }
        Cmd::Bench { common, jobs, report } => command::bench(common, jobs, report),
        Cmd::Merge { inputs, out, noise_margin } => command::merge(inputs, out, noise_margin),
        Cmd::Cpu { preset, model, m, threads, rows_per_task, iters, db, dry_run } => {
            if let Err(e) = cpu(preset, model, m, threads, rows_per_task, iters, db, dry_run) {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
    };
    if let Err(e) = done {
        eprintln!("error: {:#}", anyhow::Error::from(e));
        std::process::exit(1);
    }
}

/// `mangrove-tune cpu`: sweep, print, and record the winners under this CPU's slug.
#[allow(clippy::too_many_arguments)]
fn cpu(
    preset: Preset,
    model: Option<PathBuf>,
    m: Vec<i64>,
    threads: Vec<usize>,
    rows_per_task: Vec<usize>,
    iters: usize,
    db: Option<PathBuf>,
    dry_run: bool,
) -> anyhow::Result<()> {
    use mangrove::engine::cpu_simd::sweep;
    let cfg = match model {
        Some(dir) => mangrove::model_config::ModelConfig::from_model_dir(&dir)?,
        None => mangrove::model_config::ModelConfig::of_preset(preset),
    };
    let mut opts = sweep::SweepOptions { m, rows_per_task, iters, ..Default::default() };
    if !threads.is_empty() {
        opts.threads = threads;
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let records = sweep::sweep(&cfg, &opts, command, &mut |line| eprintln!("{line}")).map_err(anyhow::Error::msg)?;
    for r in &records {
        let w = &r.winner;
        let default = r.default_us.map_or("-".to_string(), |d| format!("{d:.0} µs, tuned {:.2}x", d / w.median_us));
        println!(
            "m {:>2}: {:?} {:.0} µs per layer ({:.1} GB/s, {:.0}% of {:.1} GB/s read); default {default}; {} candidates, {} pruned, {} rejected",
            r.m, w.params, w.median_us, w.gb_s, 100.0 * w.frac_copy_bw, r.copy_bw_gbs, r.candidates, r.pruned, r.rejected
        );
    }
    if dry_run {
        return Ok(());
    }
    let dir = db.unwrap_or_else(|| PathBuf::from("tuning_db").join(sweep::cpu_slug()));
    let mut tdb = mangrove::tuning_db::TuningDb::load(&dir)?;
    for r in records {
        tdb.upsert(sweep::TEMPLATE, r, mangrove::tuning_db::NoiseMargin::DEFAULT);
    }
    tdb.save(&dir)?;
    println!("wrote {}", dir.join(format!("{}.json", sweep::TEMPLATE)).display());
    Ok(())
}
