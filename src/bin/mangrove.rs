//! `mangrove`: templates, JIT compile, cache management, the catalog warm-up, the JIT service,
//! the decode server and the benchmarks. Parses arguments and calls one library function per
//! command; the work lives in the workspace's crates.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use mangrove::arch::Arch;
use mangrove::bless::{self, BlessRequest};
use mangrove::cache::{self, Cache};
use mangrove::engine::batcher::BatcherConfig;
use mangrove::engine::start::{self, KernelSetup};
use mangrove::gpu::Gpu;
use mangrove::jit::{Jit, KernelRequest};
use mangrove::model_config::Preset;
use mangrove::provision::KernelOptions;
use mangrove::template::{parse_params, Catalog, ParamRole};
use mangrove::tuning_db::TuningDb;

#[derive(Parser)]
#[command(name = "mangrove", version, about = "Kernel JIT compiler, cache and decode service for NVIDIA GPUs")]
struct Cli {
    /// Kernel cache folder (sled). One process owns it at a time.
    #[arg(long, global = true, env = "MANGROVE_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Load templates from this folder instead of the ones built into the binary.
    #[arg(long, global = true, env = "MANGROVE_TEMPLATES_DIR")]
    templates_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List templates, their parameters, allowed values and defaults.
    Templates {
        #[arg(long)]
        json: bool,
    },
    /// Render, key and compile one kernel (or take it from the cache).
    Compile {
        #[arg(long)]
        template: String,
        /// Target: sm80, sm86, sm89, sm90, sm90a, sm100, sm120, sm121.
        #[arg(long, default_value = "sm90")]
        arch: Arch,
        /// Parameter override NAME=VALUE (repeatable).
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
        /// Keep the PTX in the cache entry.
        #[arg(long)]
        ptx: bool,
        /// Also write the cubin here (for `cuobjdump -sass FILE`).
        #[arg(long, value_name = "FILE")]
        cubin: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Inspect and maintain the kernel cache.
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
    },
    /// Compile and cache every template sample for the given archs; on a GPU, check each
    /// kernel of the device's arch against the CPU reference.
    Warm {
        /// Comma-separated targets.
        #[arg(long, default_value = "sm90", value_delimiter = ',')]
        arch: Vec<Arch>,
        /// Evict the catalog's entries first, so the first pass measures cold compiles.
        #[arg(long)]
        recompile: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show the GPU this process sees, or why there is none.
    Gpu,
    /// Serve the JIT cache over HTTP so many engine processes share one sled cache
    /// (single-flight compiles, tuning-DB lookups).
    Jitd {
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: String,
        /// Tuning DB answered on /v1/tuning/{template}.
        #[arg(long)]
        tuning_db: Option<PathBuf>,
    },
    /// Write a random-weight checkpoint (config.json, model.safetensors, tokenizer.json).
    GenModel {
        /// tiny, tiny-moe or bitnet-2b.
        #[arg(long)]
        preset: Preset,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Override the preset's number of layers (same widths).
        #[arg(long)]
        layers: Option<usize>,
    },
    /// Benchmarks: `decode` (tokens/s of a backend) and `startup` (time to ready: cold cache,
    /// warm cache, blessed bundle).
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
    /// Serve a checkpoint over the OpenAI-compatible HTTP API.
    Serve {
        /// Checkpoint folder (config.json, model.safetensors, tokenizer.json).
        #[arg(long, env = "MANGROVE_MODEL")]
        model: PathBuf,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Compute backend: cpu (SIMD ternary kernels; MANGROVE_CPU_ISA forces a path), cpu-ref (the
        /// f64 reference) or cuda (the tuned kernels of the plan).
        #[arg(long, default_value = "cpu")]
        backend: String,
        /// Tuning DB folder the cuda backend picks its kernels from (reported in /health).
        #[arg(long, env = "MANGROVE_TUNING_DB")]
        tuning_db: Option<PathBuf>,
        /// Name served in /v1/models (default: the checkpoint folder's name).
        #[arg(long)]
        model_name: Option<String>,
        /// Most prompt tokens a sequence prefills per step (chunked prefill).
        #[arg(long, default_value_t = 512)]
        prefill_chunk: usize,
        #[command(flatten)]
        kernels: KernelArgs,
    },
}

/// How `serve` obtains its kernels before it answers (all of them, at start).
#[derive(clap::Args, Clone)]
struct KernelArgs {
    /// Target architecture of the kernels.
    #[arg(long, default_value = "sm90")]
    arch: Arch,
    /// Largest batch: every M up to it is prepared.
    #[arg(long, default_value_t = 16)]
    max_batch: i64,
    /// Take kernels from this blessed bundle (verified at start).
    #[arg(long)]
    blessed: Option<PathBuf>,
    /// With --blessed: never load NVRTC; refuse to start if the bundle lacks a kernel.
    #[arg(long, requires = "blessed")]
    offline: bool,
    /// Ask this JIT service (mangrove jitd) for kernels; compile locally if it is down.
    #[arg(long, conflicts_with = "blessed")]
    jit_url: Option<String>,
    /// Make any fallback (untuned shape, kernel not in the bundle, service down, no kernel for a
    /// shape) an error at start instead of a counted slower path.
    #[arg(long)]
    strict: bool,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Time decode on a backend: prefill a batch of synthetic prompts (TTFT), then greedy steps
    /// (TPOT p50/p99, tokens/s), with the weight-bandwidth bound on a GPU.
    Decode {
        #[arg(long)]
        model: PathBuf,
        /// cpu, cpu-ref or cuda (kernels from --tuning-db / --blessed / --jit-url, as for serve).
        #[arg(long, default_value = "cpu")]
        backend: String,
        /// Batch sizes to run, e.g. 1,4,16.
        #[arg(long, default_value = "1", value_delimiter = ',')]
        batch: Vec<usize>,
        #[arg(long, default_value_t = 16)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 8)]
        steps: usize,
        /// Tuning DB folder the cuda backend picks its kernels from.
        #[arg(long, env = "MANGROVE_TUNING_DB")]
        tuning_db: Option<PathBuf>,
        #[command(flatten)]
        kernels: KernelArgs,
        #[arg(long)]
        json: bool,
    },
    /// Kernel lab: copy bandwidth, cuBLAS bf16, and mangrove's tuned and default kernels on the
    /// bitnet-2B decode GEMVs and the MoE gate_up problem, each checked, then timed beyond L2.
    Kernels(mangrove::lab::command::KernelsArgs),
    /// Time to ready of `mangrove serve` for a model: cold (empty cache: every kernel
    /// compiled), warm (same cache again), and from a blessed bundle offline.
    Startup {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        tuning_db: PathBuf,
        #[arg(long, default_value = "sm90")]
        arch: Arch,
        #[arg(long, default_value_t = 16)]
        max_batch: i64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CacheCmd {
    /// Entry count, bytes and hit/miss counters.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// One line per entry.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every entry and evict corrupt ones; or, given a bundle folder, verify the bundle
    /// (every hash, the manifest digest, no missing or extra file) without opening the cache.
    Verify {
        bundle: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Freeze the kernels `mangrove serve` needs for a model, tuning DB and arch into a bundle.
    Bless {
        #[arg(long)]
        tuning_db: PathBuf,
        /// Model folder (its config.json decides the shapes).
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "sm90")]
        arch: Arch,
        #[arg(long)]
        out: PathBuf,
        /// Largest batch the server will run (every M up to it is blessed).
        #[arg(long, default_value_t = 16)]
        max_batch: i64,
        /// Run each kernel once against the CPU reference on this GPU before blessing it.
        #[arg(long)]
        verify_on_gpu: bool,
    },
    /// Write every cache entry (optionally of one arch) into a bundle.
    Export {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        arch: Option<Arch>,
    },
    /// Insert every kernel of a verified bundle into the cache.
    Import { bundle: PathBuf },
    /// Evict least-recently-used entries until the cache holds at most --max-bytes.
    Gc {
        #[arg(long)]
        max_bytes: u64,
    },
}

impl KernelArgs {
    fn options(&self) -> KernelOptions {
        KernelOptions {
            arch: self.arch,
            max_batch: self.max_batch,
            blessed: self.blessed.clone(),
            offline: self.offline,
            jit_url: self.jit_url.clone(),
            strict: self.strict,
        }
    }
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let catalog = match &cli.templates_dir {
        Some(d) => Catalog::from_dir(d)?,
        None => Catalog::embedded(),
    };
    let cache_dir = cache::resolve_dir(cli.cache_dir.as_deref());
    let command = || std::env::args().collect::<Vec<_>>().join(" ");
    match cli.cmd {
        Cmd::Templates { json } => templates(&catalog, json),
        Cmd::Compile { template, arch, params, ptx, cubin, json } => {
            let params = parse_params(&params)?;
            catalog.get(&template)?.resolve(&params)?; // bad input fails before anything opens
            let f = Jit::open(catalog, &cache_dir, ptx)?.get(&KernelRequest { template, params, arch })?;
            if let Some(path) = &cubin {
                std::fs::write(path, &f.entry.cubin).map_err(|e| anyhow::anyhow!(e).context(format!("writing {}", path.display())))?;
            }
            print_report(&f, json)
        }
        Cmd::Cache { cmd } => cache_cmd(&catalog, &cache_dir, cmd),
        Cmd::Warm { arch, recompile, json } => {
            let report = mangrove::warm::warm(&Jit::open(catalog, &cache_dir, false)?, &arch, recompile)?;
            print_report(&report, json)?;
            if report.failed() > 0 {
                bail!("{} kernels failed the correctness check", report.failed());
            }
            Ok(())
        }
        Cmd::Jitd { listen, tuning_db } => {
            let db = match &tuning_db {
                Some(d) => TuningDb::load(d)?,
                None => TuningDb::default(),
            };
            let state = mangrove::service::ServiceState::new(Jit::open(catalog, &cache_dir, false)?, db);
            Ok(mangrove::service::run(&listen, state, &cache_dir)?)
        }
        Cmd::GenModel { preset, out, seed, layers } => {
            mangrove::engine::genmodel::generate_with(preset, &out, seed, layers)?;
            println!("wrote {preset} checkpoint to {}", out.display());
            Ok(())
        }
        Cmd::Bench { cmd: BenchCmd::Startup { model, tuning_db, arch, max_batch, json } } => {
            let r = mangrove::engine::startup::bench_startup(&std::env::current_exe()?, &catalog, &model, &tuning_db, arch, max_batch)?;
            print_report(&r, json)
        }
        Cmd::Bench { cmd: BenchCmd::Kernels(args) } => {
            mangrove::lab::command::bench_kernels(&args, catalog, &cache_dir).map(drop).map_err(Into::into)
        }
        Cmd::Bench { cmd: BenchCmd::Decode { model, backend, batch, prompt_tokens, steps, tuning_db, mut kernels, json } } => {
            kernels.max_batch = batch.iter().copied().max().unwrap_or(1) as i64;
            let setup = KernelSetup { catalog: &catalog, cache_dir: &cache_dir, tuning_db: tuning_db.as_deref(), options: &kernels.options() };
            let engine = start::open(&model, &backend, None, &setup)?.0;
            let report = mangrove::engine::bench::decode_report(engine.backend.as_ref(), &model.display().to_string(), &batch, prompt_tokens, steps, command())?;
            print_report(&report, json)
        }
        Cmd::Serve { model, host, port, backend, tuning_db, model_name, prefill_chunk, kernels } => {
            if prefill_chunk == 0 {
                bail!("--prefill-chunk must be positive");
            }
            let setup = KernelSetup { catalog: &catalog, cache_dir: &cache_dir, tuning_db: tuning_db.as_deref(), options: &kernels.options() };
            let (engine, report) = start::open(&model, &backend, model_name, &setup)?;
            let max_seqs = if backend == "cuda" { kernels.max_batch as usize } else { usize::MAX };
            let metrics = start::serve(engine, (&host, port), tuning_db, BatcherConfig { prefill_chunk, max_seqs }, report)?;
            println!("{}", serde_json::to_string_pretty(&metrics)?);
            Ok(())
        }
        Cmd::Gpu => {
            match Gpu::open_optional(0)? {
                Ok(g) => println!("{}", serde_json::to_string_pretty(g.info())?),
                Err(absent) => println!("no GPU: {absent}"),
            }
            Ok(())
        }
    }
}

/// Prints a report as pretty JSON or as its text.
fn print_report(r: &(impl serde::Serialize + std::fmt::Display), json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        print!("{r}");
    }
    Ok(())
}

fn templates(catalog: &Catalog, json: bool) -> Result<()> {
    if json {
        let all: Vec<_> = catalog.iter().map(|t| &t.schema).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    for t in catalog.iter() {
        println!("{} — {}", t.name(), t.schema.description);
        for p in &t.schema.params {
            let role = if p.role == ParamRole::Problem { "problem" } else { "tunable" };
            println!("  {:<14} {:<8} default {:<6} {:<28} {}", p.name, role, p.default, p.allowed_text(), p.doc);
        }
        for (name, expr) in &t.schema.constraints {
            println!("  constraint: {name}: {expr}");
        }
        println!("  samples: {}", t.schema.samples.len());
    }
    Ok(())
}

fn cache_cmd(catalog: &Catalog, dir: &Path, cmd: CacheCmd) -> Result<()> {
    match cmd {
        CacheCmd::Verify { bundle: Some(b), json } => {
            let m = mangrove::bundle::verify(&b)?;
            if json {
                println!("{}", serde_json::json!({"bundle": b, "kernels": m.kernels.len(), "arch": m.arch.to_string(), "ok": true}));
            } else {
                println!("bundle {} OK: {} kernels for {}, manifest digest and every cubin hash match", b.display(), m.kernels.len(), m.arch);
            }
        }
        CacheCmd::Bless { tuning_db, model, arch, out, max_batch, verify_on_gpu } => {
            let r = bless::bless(catalog, dir, &BlessRequest { tuning_db: &tuning_db, model: &model, arch, out: &out, max_batch, verify_on_gpu })?;
            for u in &r.unavailable {
                eprintln!("note: no kernel for {u}");
            }
            let n = r.manifest.kernels.len();
            eprintln!("blessed {n} kernels for {arch} into {} ({} from tuned records, {} on template defaults)", out.display(), r.tuned, r.defaults);
        }
        CacheCmd::Export { out, arch } => {
            let (n, arch) = bless::export(&Cache::open(dir)?, dir, &out, arch)?;
            println!("exported {n} kernels for {arch} to {}", out.display());
        }
        CacheCmd::Import { bundle } => {
            let n = bless::import(&Cache::open(dir)?, &bundle)?;
            println!("imported {n} kernels from {} into {}", bundle.display(), dir.display());
        }
        CacheCmd::Stats { json } => {
            let stats = Cache::open(dir)?.stats(dir)?;
            if json {
                println!("{}", serde_json::to_string(&stats)?);
            } else {
                print!("{stats}");
            }
        }
        CacheCmd::Ls { json } => {
            let list = Cache::open(dir)?.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                list.iter().for_each(|e| println!("{e}"));
            }
        }
        CacheCmd::Verify { bundle: None, json } => {
            let r = Cache::open(dir)?.verify()?;
            print_report(&r, json)?;
            if !r.evicted.is_empty() {
                bail!("{} corrupt entries were evicted", r.evicted.len());
            }
        }
        CacheCmd::Gc { max_bytes } => print!("{}", Cache::open(dir)?.gc(max_bytes)?),
    }
    Ok(())
}
