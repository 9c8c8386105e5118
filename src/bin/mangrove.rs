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
use mangrove::engine::server::ServeOptions;
use mangrove::http::HttpLimits;
use mangrove::service::ServiceOptions;
use mangrove::engine::start::{self, KernelSetup};
use mangrove::gpu::Gpu;
use mangrove::jit::{Jit, KernelRequest};
use mangrove::model_config::Preset;
use mangrove::provision::KernelOptions;
use mangrove::template::{parse_params, Catalog, ParamRole};
use mangrove::tuning_db::folder::{self, Target};
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
        /// After each compile, evict least-recently-used kernels until the cache holds at most this.
        #[arg(long, value_name = "BYTES")]
        max_cache_bytes: Option<u64>,
        #[command(flatten)]
        http: HttpArgs,
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
    /// Benchmarks: `decode` (tokens/s of a backend), `serve` (load on an HTTP server),
    /// `kernels` (the lab), `startup` (time to ready) and `compare` (two saved results).
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
        /// Most requests waiting for a sequence slot (--max-batch of them run at once); a request
        /// beyond it is refused with 429 and Retry-After.
        #[arg(long, default_value_t = 64)]
        max_queue: usize,
        /// Most tokens one forward step feeds over all sequences (decode tokens first, then
        /// prompt chunks), so one long prompt cannot starve the others.
        #[arg(long, default_value_t = 2048)]
        step_tokens: usize,
        #[command(flatten)]
        kernels: KernelArgs,
        #[command(flatten)]
        http: HttpArgs,
    },
}

/// How a server (`serve`, `jitd`) meets its clients: timeouts, caps and an optional API key.
#[derive(clap::Args, Clone)]
struct HttpArgs {
    /// Time a client has to send a request's headers; also the idle keep-alive timeout.
    #[arg(long, default_value = "10s")]
    header_timeout: humantime::Duration,
    /// Longest wait for the next piece of a request body.
    #[arg(long, default_value = "10s")]
    body_timeout: humantime::Duration,
    /// Longest time from a request to its response head (408 beyond; streamed bodies are not cut).
    #[arg(long, default_value = "10m")]
    request_timeout: humantime::Duration,
    /// Most connections open at once (more wait in the listen backlog).
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 2 << 20)]
    max_body_bytes: usize,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "MANGROVE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

impl HttpArgs {
    fn limits(&self) -> Result<HttpLimits> {
        let limits = HttpLimits {
            header_timeout: *self.header_timeout,
            body_timeout: *self.body_timeout,
            request_timeout: *self.request_timeout,
            max_connections: self.max_connections,
            max_body_bytes: self.max_body_bytes,
            ..HttpLimits::default()
        };
        limits.validate()?;
        Ok(limits)
    }
}

/// How `serve` obtains its kernels before it answers (all of them, at start).
#[derive(clap::Args, Clone)]
struct KernelArgs {
    /// Target architecture of the kernels.
    #[arg(long, default_value = "sm90")]
    arch: Arch,
    /// Largest batch: every M up to it is prepared; `serve` runs at most this many sequences at once on every backend.
    #[arg(long, default_value_t = 16)]
    max_batch: i64,
    /// Take kernels from this blessed bundle (verified at start).
    #[arg(long)]
    blessed: Option<PathBuf>,
    /// With --blessed: never load NVRTC; refuse to start if the bundle lacks a kernel.
    #[arg(long, requires = "blessed")]
    offline: bool,
    /// With --blessed: the bundle must be signed by one of these ed25519 public keys.
    #[arg(long = "trusted-key", value_name = "PUB", requires = "blessed")]
    trusted_keys: Vec<PathBuf>,
    /// Ask this JIT service (mangrove jitd) for kernels; compile locally if it is down.
    #[arg(long, conflicts_with = "blessed")]
    jit_url: Option<String>,
    /// API key of the JIT service (its --api-key).
    #[arg(long, env = "MANGROVE_JITD_API_KEY", hide_env_values = true, requires = "jit_url")]
    jit_api_key: Option<String>,
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
    /// Load generator against an OpenAI-compatible server: streamed completions at each
    /// concurrency level (TTFT / TPOT / ITL / e2e percentiles, tokens/s, failures), an optional
    /// TTFT-target search and stress verdict; JSON + CSV + SVG with --json.
    Serve(Box<mangrove::bench::serve::command::ServeArgs>),
    /// Compare two saved results of a bench (serve, decode, kernels JSON): a table of every
    /// tracked metric; exit status 1 when one regressed beyond the thresholds.
    Compare {
        base: PathBuf,
        new: PathBuf,
        /// Percent slower (latency up, throughput down) that counts as a regression.
        #[arg(long, default_value_t = 3.0)]
        max_slower_pct: f64,
        /// GB more memory that counts as a regression.
        #[arg(long, default_value_t = 1.0)]
        max_memory_gb: f64,
        /// Also write the comparison here as JSON.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// A baseline bundle in OUT: environment and provenance, decode at batch 1 and 16, the kernel
    /// lab (GPU), a serve sweep with the server's path/fallback counters, commands.log and a
    /// summary; each bench runs as its own mangrove process. Exit status 1 when a step failed.
    Freeze {
        out: PathBuf,
        /// Checkpoint to bench (default: one generated into OUT/model, bitnet-2b on a GPU, tiny on a CPU).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Shorter runs (fewer steps, levels and prompts).
        #[arg(long)]
        quick: bool,
        /// Write the environment and the planned commands only.
        #[arg(long)]
        dry_run: bool,
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
        /// The bundle must be signed by one of these ed25519 public keys (`cache keygen`'s .pub).
        #[arg(long = "trusted-key", value_name = "PUB", requires = "bundle")]
        trusted_keys: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Write a new ed25519 signing key to OUT (mode 0600) and its public key to OUT.pub.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Freeze the kernels `mangrove serve` needs for a model, tuning DB and arch into a bundle.
    Bless {
        /// Tuning DB folder (default: tuning_db/<gpu> of the GPU present when it is of --arch,
        /// else tuning_db/<arch>).
        #[arg(long, env = "MANGROVE_TUNING_DB")]
        tuning_db: Option<PathBuf>,
        /// Refuse a tuning DB whose records were tuned on another GPU or arch.
        #[arg(long)]
        strict: bool,
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
        /// Sign the manifest with this ed25519 key (`cache keygen`).
        #[arg(long, value_name = "KEY")]
        sign_key: Option<PathBuf>,
        /// Take the shapes from config.json alone (a bundle prepared before the weights exist);
        /// by default the whole checkpoint is read and checked as `serve` does first.
        #[arg(long)]
        shapes_only: bool,
    },
    /// Write every cache entry (optionally of one arch) into a bundle.
    Export {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        arch: Option<Arch>,
        /// Sign the manifest with this ed25519 key (`cache keygen`).
        #[arg(long, value_name = "KEY")]
        sign_key: Option<PathBuf>,
    },
    /// Insert every kernel of a verified bundle into the cache (each re-derived from its template).
    Import {
        bundle: PathBuf,
        /// The bundle must be signed by one of these ed25519 public keys.
        #[arg(long = "trusted-key", value_name = "PUB")]
        trusted_keys: Vec<PathBuf>,
    },
    /// Evict least-recently-used entries until the cache holds at most --max-bytes.
    Gc {
        #[arg(long)]
        max_bytes: u64,
    },
}

impl KernelArgs {
    /// The cuda backend's tuning DB: the flag or the folder of the GPU present, checked against
    /// that GPU (a warning, or with --strict an error, when tuned elsewhere). Other backends
    /// take the flag as given.
    fn tuning_db(&self, flag: Option<PathBuf>, backend: &str) -> Result<Option<PathBuf>> {
        if backend != "cuda" {
            return Ok(flag);
        }
        tuning_db_for(flag, &Target::present(self.arch), self.strict)
    }

    fn options(&self) -> KernelOptions {
        KernelOptions {
            arch: self.arch,
            max_batch: self.max_batch,
            blessed: self.blessed.clone(),
            offline: self.offline,
            jit_url: self.jit_url.clone(),
            jit_api_key: self.jit_api_key.clone(),
            strict: self.strict,
            trusted_keys: self.trusted_keys.clone(),
        }
    }
}

fn main() {
    let cli = Cli::parse();
    // Structured logs on stderr (the servers' access log among them); MANGROVE_LOG filters
    // (e.g. `warn`, `mangrove::access=off`), default info.
    let filter = tracing_subscriber::EnvFilter::try_from_env("MANGROVE_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A closed stderr (a parent that stopped reading) must not fail the server: no internal-error prints.
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).log_internal_errors(false).init();
    if matches!(cli.cmd, Cmd::Templates { .. } | Cmd::Cache { cmd: CacheCmd::Ls { .. } | CacheCmd::Stats { .. } }) {
        end_quietly_on_closed_pipe();
    }
    if let Err(e) = run(cli) {
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
            let progress = bar(json, "kernels");
            let report = mangrove::warm::warm(&Jit::open(catalog, &cache_dir, false)?, &arch, recompile, &progress)?;
            progress.finish_and_clear();
            print_report(&report, json)?;
            if report.failed() > 0 {
                bail!("{} kernels failed the correctness check", report.failed());
            }
            Ok(())
        }
        Cmd::Jitd { listen, tuning_db, max_cache_bytes, http } => {
            let options = ServiceOptions { limits: http.limits()?, api_key: http.api_key.clone() };
            let db = match &tuning_db {
                Some(d) => TuningDb::load(d)?,
                None => TuningDb::default(),
            };
            let state = mangrove::service::ServiceState::with_cache_cap(Jit::open(catalog, &cache_dir, false)?, db, max_cache_bytes);
            Ok(mangrove::service::run(&listen, state, &cache_dir, &options)?)
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
        Cmd::Bench { cmd: BenchCmd::Serve(args) } => {
            let report = mangrove::bench::serve::command::run(&args, command())?;
            if report.stress_failed() {
                bail!("stress run failed: every request must succeed");
            }
            Ok(())
        }
        Cmd::Bench { cmd: BenchCmd::Compare { base, new, max_slower_pct, max_memory_gb, json } } => {
            let thresholds = mangrove::bench::compare::Thresholds { slower_pct: max_slower_pct, memory_bytes: max_memory_gb * 1e9 };
            let c = mangrove::bench::compare::compare_files(&base, &new, thresholds)?;
            print!("{c}");
            if let Some(path) = &json {
                std::fs::write(path, serde_json::to_vec_pretty(&c)?).map_err(|e| anyhow::anyhow!(e).context(format!("writing {}", path.display())))?;
            }
            match c.regressions().count() {
                0 => Ok(()),
                n => bail!("{n} metric(s) regressed beyond the thresholds"),
            }
        }
        Cmd::Bench { cmd: BenchCmd::Freeze { out, model, quick, dry_run } } => {
            let options = mangrove::bench::freeze::FreezeOptions { out, exe: std::env::current_exe()?, model, quick, dry_run, command: command() };
            let summary = mangrove::bench::freeze::freeze(&options)?;
            print!("{}", summary.markdown());
            if !summary.ok() {
                bail!("a step of the freeze failed (see {}/commands.log)", options.out.display());
            }
            Ok(())
        }
        Cmd::Bench { cmd: BenchCmd::Kernels(mut args) } => {
            args.db = tuning_db_for(args.db.take(), &Target::present(args.arch), false)?;
            mangrove::lab::command::bench_kernels(&args, catalog, &cache_dir).map(drop).map_err(Into::into)
        }
        Cmd::Bench { cmd: BenchCmd::Decode { model, backend, batch, prompt_tokens, steps, tuning_db, mut kernels, json } } => {
            kernels.max_batch = batch.iter().copied().max().unwrap_or(1) as i64;
            let tuning_db = kernels.tuning_db(tuning_db, &backend)?;
            let setup = KernelSetup { catalog: &catalog, cache_dir: &cache_dir, tuning_db: tuning_db.as_deref(), options: &kernels.options() };
            let engine = start::open(&model, &backend, None, &setup)?.0;
            let report = mangrove::engine::bench::decode_report(engine.backend.as_ref(), &model.display().to_string(), &batch, prompt_tokens, steps, command())?;
            print_report(&report, json)
        }
        Cmd::Serve { model, host, port, backend, tuning_db, model_name, prefill_chunk, max_queue, step_tokens, kernels, http } => {
            let options = ServeOptions { limits: http.limits()?, api_key: http.api_key.clone() };
            // Every backend runs at most --max-batch sequences (the cuda backend's KV slots).
            let batcher = BatcherConfig { prefill_chunk, max_seqs: usize::try_from(kernels.max_batch).unwrap_or(0), max_queue, step_tokens };
            batcher.validate()?;
            let tuning_db = kernels.tuning_db(tuning_db, &backend)?;
            let setup = KernelSetup { catalog: &catalog, cache_dir: &cache_dir, tuning_db: tuning_db.as_deref(), options: &kernels.options() };
            let (engine, report) = start::open(&model, &backend, model_name, &setup)?;
            let metrics = start::serve(engine, (&host, port), tuning_db, batcher, &options, report)?;
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

/// For the listing commands: a reader that stops early (`mangrove templates | head`) ends the
/// process the Unix way (SIGPIPE), instead of `println!` panicking on the closed pipe. Only for
/// commands that open no socket: servers keep Rust's ignored SIGPIPE.
fn end_quietly_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: called at the start of main, before any thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE and no handler code runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// A progress bar on stderr with total and ETA counting `unit` (hidden when the output is JSON).
fn bar(hidden: bool, unit: &str) -> indicatif::ProgressBar {
    if hidden {
        return indicatif::ProgressBar::hidden();
    }
    mangrove::progress::bar(unit)
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

/// The tuning DB folder for `target`: `flag`, else the target's folder under tuning_db/ (None
/// when there is none), with a note saying which was chosen and a warning (or, `strict`, an
/// error) when its records were tuned on another GPU or arch.
fn tuning_db_for(flag: Option<PathBuf>, target: &Target, strict: bool) -> Result<Option<PathBuf>> {
    let Some(r) = folder::resolve(flag.as_deref(), Path::new(folder::ROOT), target, strict)? else {
        return Ok(None);
    };
    if let Some(chosen) = r.chosen {
        eprintln!("note: tuning DB {}: {chosen} ({target})", r.dir.display());
    }
    if let Some(f) = &r.foreign {
        eprintln!("warning: {f}");
    }
    Ok(Some(r.dir))
}

/// Reads the trusted public keys named on the command line.
fn trusted(paths: &[PathBuf]) -> Result<Vec<mangrove::signing::VerifyingKey>> {
    Ok(paths.iter().map(|p| mangrove::signing::load_verifying_key(p)).collect::<Result<_, _>>()?)
}

fn cache_cmd(catalog: &Catalog, dir: &Path, cmd: CacheCmd) -> Result<()> {
    match cmd {
        CacheCmd::Verify { bundle: Some(b), trusted_keys, json } => {
            let trusted = trusted(&trusted_keys)?;
            let m = mangrove::bundle::verify_trusted(&b, &trusted)?;
            let signed = if trusted.is_empty() { "" } else { ", signed by a trusted key" };
            if json {
                println!("{}", serde_json::json!({"bundle": b, "kernels": m.kernels.len(), "arch": m.arch.to_string(), "signed": !trusted.is_empty(), "ok": true}));
            } else {
                println!("bundle {} OK: {} kernels for {}, manifest digest and every cubin hash match{signed}", b.display(), m.kernels.len(), m.arch);
            }
        }
        CacheCmd::Keygen { out } => {
            let public = mangrove::signing::generate(&out)?;
            println!("wrote signing key {} and public key {}", out.display(), public.display());
        }
        CacheCmd::Bless { tuning_db, strict, model, arch, out, max_batch, verify_on_gpu, sign_key, shapes_only } => {
            let key = sign_key.as_deref().map(mangrove::signing::load_signing_key).transpose()?;
            // The GPU present decides the folder only when the bundle is for its arch.
            let target = match Target::present(arch) {
                Target::Gpu { arch: here, .. } if here.cc != arch.cc => Target::Arch(arch),
                t => t,
            };
            let Some(tuning_db) = tuning_db_for(tuning_db, &target, strict)? else {
                bail!("no tuning DB folder for {target} under {}/; pass --tuning-db", folder::ROOT);
            };
            if !shapes_only {
                // Refuse what serve would refuse, before anything is written.
                mangrove::engine::Engine::check_checkpoint(&model).map_err(|e| {
                    anyhow::anyhow!("cache bless: {} would not serve: {e} (--shapes-only blesses from config.json alone)", model.display())
                })?;
            }
            let req = BlessRequest { tuning_db: &tuning_db, model: &model, arch, out: &out, max_batch, verify_on_gpu, sign: key.as_ref() };
            let r = bless::bless(catalog, dir, &req)?;
            for u in &r.unavailable {
                eprintln!("note: no kernel for {u}");
            }
            let n = r.manifest.kernels.len();
            eprintln!("blessed {n} kernels for {arch} into {} ({} from tuned records, {} on template defaults)", out.display(), r.tuned, r.defaults);
        }
        CacheCmd::Export { out, arch, sign_key } => {
            let key = sign_key.as_deref().map(mangrove::signing::load_signing_key).transpose()?;
            let (n, arch) = bless::export(&Cache::open(dir)?, dir, &out, arch, key.as_ref())?;
            println!("exported {n} kernels for {arch} to {}", out.display());
        }
        CacheCmd::Import { bundle, trusted_keys } => {
            // Verify before opening the cache: a refused bundle touches nothing.
            let trusted = trusted(&trusted_keys)?;
            mangrove::bundle::verify_trusted(&bundle, &trusted)?;
            let n = bless::import(&Cache::open(dir)?, &bundle, catalog, &trusted)?;
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
        CacheCmd::Verify { bundle: None, json, .. } => {
            let r = Cache::open(dir)?.verify()?;
            print_report(&r, json)?;
            if let Some(q) = &r.quarantined {
                bail!("the cache's sled files were damaged and moved to {}; the cache was reset", q.moved_to.display());
            }
            if let Some(l) = &r.lost {
                bail!("{} cache entries were lost to damaged sled files (they recompile on demand)", l.expected - l.found);
            }
            if !r.evicted.is_empty() {
                bail!("{} corrupt entries were evicted", r.evicted.len());
            }
        }
        CacheCmd::Gc { max_bytes } => print!("{}", Cache::open(dir)?.gc(max_bytes)?),
    }
    Ok(())
}
