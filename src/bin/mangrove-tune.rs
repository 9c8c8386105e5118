//! `mangrove-tune`: sweep kernel configs on the GPU, gate them for correctness, and write the
//! winners into a per-GPU tuning DB (`tuning_db/<gpu>/`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use mangrove::model_config::Preset;
use mangrove::tune::command::{self, parse_shape, Common, GemvJobs, RefArg};
use mangrove::tune::gateup::{DEFAULT_MOE, GATEUP_BUCKETS};

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

#[derive(Subcommand)]
enum Cmd {
    /// The M = 1..8 ternary decode GEMV (BitNet packed weights), K-split 1/2/4/8 included.
    Gemv {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        jobs: GemvJobs,
    },
    /// The MoE gate_up stage: grouped GEMM over experts on tokens sorted by expert and padded
    /// to BLOCK_M, ternary expert weights, SiLU(gate)·up fused in the epilogue.
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
        #[arg(long, value_delimiter = ',', default_values_t = mangrove::step::GEMM_BUCKETS.to_vec())]
        m: Vec<i64>,
        /// Shapes as NxK. Default: bitnet-b1.58-2B decode shapes.
        #[arg(long, value_delimiter = ',', value_parser = parse_shape)]
        shapes: Vec<(i64, i64)>,
        /// Reference: the M=1 kernel row by row, or the f64 dense product.
        #[arg(long = "ref", value_enum, default_value = "dense")]
        reference: RefArg,
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
    /// Merge tuning DB folders: per key the fastest winner wins; conflicts are listed.
    Merge {
        /// DB folders to merge, in order.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        #[arg(short, long)]
        out: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    let done = match cli.cmd {
        Cmd::Gemv { common, jobs } => command::gemv(common, jobs),
        Cmd::Gateup { common, experts, topk, hidden, inter, m } => command::gateup(common, (experts, topk, hidden, inter), m),
        Cmd::DecodeOps { common, preset, model } => command::decode_ops(common, preset, model),
        Cmd::ProbeMgt1 { common, m, shapes, reference, out_dir } => command::probe_mgt1(common, m, shapes, reference, out_dir),
        Cmd::Bench { common, jobs, report } => command::bench(common, jobs, report),
        Cmd::Merge { inputs, out } => command::merge(inputs, out),
    };
    if let Err(e) = done {
        eprintln!("error: {:#}", anyhow::Error::from(e));
        std::process::exit(1);
    }
}
