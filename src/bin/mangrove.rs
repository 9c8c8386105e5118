//! `mangrove`: templates, JIT compile, cache management and the catalog warm-up.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use mangrove::arch::Arch;
use mangrove::cache::{self, Cache, Storage};
use mangrove::check::Gate;
use mangrove::compile::Compiler;
use mangrove::gpu::{Gpu, GpuError};
use mangrove::jit::{Jit, KernelRequest, Outcome};
use mangrove::key::KeyInputs;
use mangrove::template::{format_params, parse_params, Catalog, ParamRole};
use mangrove::validate::{check_entry, has_validator};
use mangrove::bundle::{self, BlessItem, Bundle};
use mangrove::plan::{plan, ShapeConfig};
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
        #[arg(long, value_enum)]
        preset: mangrove::engine::genmodel::Preset,
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
        /// Compute backend (this build: cpu).
        #[arg(long, default_value = "cpu")]
        backend: String,
        /// Tuning DB folder for the GPU backend (reported in /health; unused by cpu).
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
        /// cpu or cuda (kernels from --tuning-db / --blessed / --jit-url, as for serve).
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

/// Loads the model, serves until Ctrl-C or SIGTERM, then prints the metrics as JSON.
fn serve(
    engine: mangrove::engine::Engine,
    host: &str,
    port: u16,
    backend: &str,
    tuning_db: Option<PathBuf>,
    batcher: mangrove::engine::batcher::BatcherConfig,
    kernels: Option<KernelReport>,
) -> Result<()> {
    use mangrove::engine::{metrics::Metrics, server};
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let metrics = std::sync::Arc::new(Metrics::default());
        let shutdown = shutdown_signal().context("installing signal handlers")?;
        let listener = tokio::net::TcpListener::bind((host, port)).await.with_context(|| format!("binding {host}:{port}"))?;
        eprintln!("mangrove: serving {} on http://{} (backend {backend})", engine.name, listener.local_addr()?);
        if let Some((_, fallbacks)) = &kernels {
            for (family, reason) in fallbacks {
                metrics.fallback(family, *reason);
            }
        }
        let state = server::AppState::with_config(engine, metrics.clone(), tuning_db, batcher);
        if let Some((report, _)) = kernels {
            state.set_kernels(report);
        }
        server::serve(listener, state, shutdown)
        .await?;
        println!("{}", serde_json::to_string_pretty(&metrics.json())?);
        Ok(())
    })
}

/// A future that resolves on SIGINT (Ctrl-C) or SIGTERM. The handlers are installed here,
/// before the server announces itself, so an early signal is never the default (fatal) one.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// A future that resolves on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
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
    match cli.cmd {
        Cmd::Templates { json } => templates(&catalog, json),
        Cmd::Compile { template, arch, params, ptx, cubin, json } => {
            let params = parse_params(&params)?;
            catalog.get(&template)?.resolve(&params)?; // bad input fails before anything opens
            let jit = open_jit(catalog, &cache_dir, ptx)?;
            let f = jit.get(&KernelRequest { template, params, arch })?;
            if let Some(path) = &cubin {
                std::fs::write(path, &f.entry.cubin).map_err(|e| std::io::Error::other(format!("writing {}: {e}", path.display())))?;
            }
            let r = &f.entry.resources;
            if json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({
                    "key": f.key.to_hex(), "outcome": f.outcome, "template": f.entry.inputs.template,
                    "params": f.entry.inputs.params, "arch": arch.to_string(), "cubin_bytes": f.entry.cubin.len(),
                    "ptx_bytes": f.entry.ptx.as_ref().map(|p| p.len()), "resources": r,
                    "compile_ms": f.entry.compile_ms, "request_ms": f.ms, "launch": f.entry.launch,
                    "nvrtc": f.entry.toolchain.nvrtc_version,
                }))?);
            } else {
                println!("key          {}", f.key);
                println!("outcome      {}", outcome_text(&f.outcome));
                println!("kernel       {} [{}] for {arch}", f.entry.inputs.template, format_params(&f.entry.inputs.params));
                println!("cubin        {} bytes", f.entry.cubin.len());
                println!("registers    {}  spills {}/{} B  stack {} B  smem {} B", r.registers, r.spill_stores, r.spill_loads, r.stack_frame, r.shared_bytes);
                println!("compile ms   {:.1} (this request {:.1} ms)", f.entry.compile_ms, f.ms);
            }
            Ok(())
        }
        Cmd::Cache { cmd } => cache_cmd(&cache_dir, cmd),
        Cmd::Warm { arch, recompile, json } => warm(catalog, &cache_dir, &arch, recompile, json),
        Cmd::Jitd { listen, tuning_db } => {
            let db = match &tuning_db {
                Some(d) => TuningDb::load(d)?,
                None => TuningDb::default(),
            };
            let state = mangrove::service::ServiceState::new(open_jit(catalog, &cache_dir, false)?, db);
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("binding {listen}"))?;
                eprintln!("jitd listening on http://{} (cache {})", listener.local_addr()?, cache_dir.display());
                axum::serve(listener, mangrove::service::app(state))
                    .with_graceful_shutdown(async { let _ = tokio::signal::ctrl_c().await; })
                    .await?;
                Ok::<_, anyhow::Error>(())
            })
        }
        Cmd::GenModel { preset, out, seed, layers } => {
            mangrove::engine::genmodel::generate_with(preset, &out, seed, layers)?;
            println!("wrote {preset:?} checkpoint to {}", out.display());
            Ok(())
        }
        Cmd::Bench { cmd: BenchCmd::Startup { model, tuning_db, arch, max_batch, json } } => {
            bench_startup(&model, &tuning_db, arch, max_batch, json)
        }
        Cmd::Bench { cmd: BenchCmd::Kernels(args) } => {
            mangrove::lab::command::bench_kernels(&args, catalog, &cache_dir).map(drop).map_err(Into::into)
        }
        Cmd::Bench { cmd: BenchCmd::Decode { model, backend, batch, prompt_tokens, steps, tuning_db, mut kernels, json } } => {
            if batch.is_empty() || batch.contains(&0) || prompt_tokens == 0 {
                bail!("--batch and --prompt-tokens must be positive");
            }
            kernels.max_batch = *batch.iter().max().expect("not empty") as i64;
            let engine = open_engine(&model, &backend, None, tuning_db.as_deref(), &kernels, &cache_dir)?.0;
            // The NVRTC version only where this run loaded it (an offline bundle never does).
            let nvrtc = if mangrove::compile::nvrtc_loaded() { Compiler::open().map(|c| c.version()).unwrap_or((0, 0)) } else { (0, 0) };
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let gpu = Gpu::open(0).ok();
            let copy_gbs = gpu.as_ref().map(|g| g.copy_bandwidth_gbs(1 << 30)).transpose()?;
            let meta = mangrove::tune::context::provenance(gpu.as_ref(), nvrtc, command);
            let mut runs = Vec::new();
            for &b in &batch {
                let r = mangrove::engine::bench::bench_decode(engine.backend.as_ref(), b, prompt_tokens, steps, copy_gbs)?;
                if !json {
                    println!(
                        "backend {}  batch {:>3}  prompt {} tokens  TTFT {:.1} ms  TPOT p50 {:.3} ms p99 {:.3} ms  {:.1} tokens/s{}",
                        r.backend, r.batch, r.prompt_tokens, r.ttft_ms, r.tpot_p50_ms, r.tpot_p99_ms, r.tokens_per_s,
                        match (r.bound_tokens_per_s, r.fraction_of_bound) {
                            (Some(b), Some(f)) => format!("  bound {b:.1} tokens/s ({:.1}%)", 100.0 * f),
                            _ => String::new(),
                        }
                    );
                    let total: f64 = r.step_profile.iter().map(|t| t.us).sum();
                    for t in &r.step_profile {
                        println!("    {:<20} {:>9.1} µs {:>5.1}%  {} launches", t.label, t.us, 100.0 * t.us / total, t.launches);
                    }
                }
                runs.push(r);
            }
            if json {
                let out = serde_json::json!({ "model": model.display().to_string(), "copy_gbs": copy_gbs, "provenance": meta, "runs": runs });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else if let Some(gbs) = copy_gbs {
                println!("weights {:.1} MB per step; copy bandwidth {gbs:.0} GB/s", runs[0].weight_bytes as f64 / 1e6);
            }
            Ok(())
        }
        Cmd::Serve { model, host, port, backend, tuning_db, model_name, prefill_chunk, kernels } => {
            if prefill_chunk == 0 {
                bail!("--prefill-chunk must be positive");
            }
            let (engine, report) = open_engine(&model, &backend, model_name, tuning_db.as_deref(), &kernels, &cache_dir)?;
            let max_seqs = if backend == "cuda" { kernels.max_batch as usize } else { usize::MAX };
            let batcher = mangrove::engine::batcher::BatcherConfig { prefill_chunk, max_seqs };
            serve(engine, &host, port, &backend, tuning_db, batcher, report)
        }
        Cmd::Gpu => {
            match Gpu::open(0) {
                Ok(g) => println!("{}", serde_json::to_string_pretty(g.info())?),
                Err(e @ (GpuError::NoDriver | GpuError::NoDevice(_))) => println!("no GPU: {e}"),
                Err(e) => return Err(e.into()),
            }
            Ok(())
        }
    }
}

fn open_jit(catalog: Catalog, cache_dir: &std::path::Path, keep_ptx: bool) -> Result<Jit> {
    let compiler = Compiler::open()?;
    let cache = Cache::open(cache_dir)?;
    Ok(Jit { catalog, cache, compiler, keep_ptx })
}

fn outcome_text(o: &Outcome) -> String {
    match o {
        Outcome::Hit => "hit".into(),
        Outcome::Compiled(r) => format!("miss ({r}), compiled"),
    }
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

fn cache_cmd(dir: &std::path::Path, cmd: CacheCmd) -> Result<()> {
    if let CacheCmd::Verify { bundle: Some(b), json } = &cmd {
        let m = bundle::verify(b)?;
        if *json {
            println!("{}", serde_json::json!({"bundle": b, "kernels": m.kernels.len(), "arch": m.arch.to_string(), "ok": true}));
        } else {
            println!("bundle {} OK: {} kernels for {}, manifest digest and every cubin hash match", b.display(), m.kernels.len(), m.arch);
        }
        return Ok(());
    }
    if let CacheCmd::Bless { tuning_db, model, arch, out, max_batch, verify_on_gpu } = cmd {
        return bless(dir, &tuning_db, &model, arch, &out, max_batch, verify_on_gpu);
    }
    let cache = Cache::open(dir)?;
    match cmd {
        CacheCmd::Bless { .. } => unreachable!("handled above"),
        CacheCmd::Export { out, arch } => {
            let mut items = Vec::new();
            let mut archs = std::collections::BTreeSet::new();
            for s in cache.list()? {
                let key = mangrove::key::KernelKey::from_hex(&s.key).expect("listed keys are hex");
                if let mangrove::cache::Lookup::Hit(e) = cache.get(&key)? {
                    if arch.is_none_or(|a| a == e.inputs.arch) {
                        archs.insert(e.inputs.arch);
                        items.push(BlessItem { entry: *e, family: None, m: None, db_rule: None, gpu_check: None });
                    }
                }
            }
            let arch = match (arch, archs.len()) {
                (Some(a), _) => a,
                (None, 1) => *archs.iter().next().expect("one arch"),
                (None, 0) => bail!("the cache holds no kernels to export"),
                (None, _) => bail!("the cache holds kernels for {archs:?}: pass --arch (a bundle is for one arch)"),
            };
            let n = items.len();
            bundle::write(&out, arch, [("exported_from".to_string(), dir.display().to_string())].into(), items)?;
            println!("exported {n} kernels for {arch} to {}", out.display());
        }
        CacheCmd::Import { bundle: b } => {
            let bundle = Bundle::open(&b)?;
            let entries = bundle.entries()?;
            for e in &entries {
                cache.put(&e.inputs.key(), e)?;
            }
            println!("imported {} kernels from {} into {}", entries.len(), b.display(), dir.display());
        }
        CacheCmd::Stats { json } => {
            let list = cache.list()?;
            let bytes: u64 = list.iter().map(|e| e.bytes).sum();
            let c = cache.counters()?;
            if json {
                println!("{}", serde_json::json!({"dir": dir, "entries": list.len(), "bytes": bytes, "counters": c}));
            } else {
                println!("cache {}: {} entries, {} bytes", dir.display(), list.len(), bytes);
                println!("hits {}  misses {}  inserts {}  corrupt evicted {}", c.hits, c.misses, c.inserts, c.corrupt_evicted);
            }
        }
        CacheCmd::Ls { json } => {
            let list = cache.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for e in list {
                    println!("{}  {:<16} {:<6} {:>8} B  last used {}", e.key, e.template, e.arch, e.bytes, e.last_used_unix);
                }
            }
        }
        CacheCmd::Verify { json, .. } => {
            let r = cache.verify()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("checked {}  intact {}  evicted {}", r.checked, r.intact, r.evicted.len());
                for (k, why) in &r.evicted {
                    println!("  evicted {k}: {why}");
                }
            }
            if !r.evicted.is_empty() {
                bail!("{} corrupt entries were evicted", r.evicted.len());
            }
        }
        CacheCmd::Gc { max_bytes } => {
            let r = cache.gc(max_bytes)?;
            println!("removed {} entries: {} → {} bytes", r.removed, r.before_bytes, r.after_bytes);
        }
    }
    Ok(())
}

/// What kernel preparation tells the server: the /health report and the fallbacks to count.
type KernelReport = (serde_json::Value, Vec<(String, mangrove::provision::FallbackReason)>);

/// Loads the checkpoint on `backend`: the CPU reference, or the CUDA backend with every kernel
/// of the plan provisioned first (see [`prepare_kernels`]).
fn open_engine(
    model: &std::path::Path,
    backend: &str,
    name: Option<String>,
    tuning_db: Option<&std::path::Path>,
    k: &KernelArgs,
    cache_dir: &std::path::Path,
) -> Result<(mangrove::engine::Engine, Option<KernelReport>)> {
    use mangrove::engine::Engine;
    let loading = || format!("loading {}", model.display());
    match backend {
        "cuda" => {
            if !(1..=4096).contains(&k.max_batch) {
                bail!("--max-batch must be in 1..=4096 for the cuda backend, got {}", k.max_batch);
            }
            // Say "no GPU" before preparing any kernel.
            Gpu::open(0).map_err(|e| anyhow::anyhow!("cuda backend: {e}"))?;
            let (report, entries) = prepare_kernels(model, tuning_db, k, cache_dir, true)?.expect("forced");
            let engine = Engine::open_cuda(model, name, &entries, k.max_batch as usize).with_context(loading)?;
            Ok((engine, Some(report)))
        }
        _ => {
            let report = prepare_kernels(model, tuning_db, k, cache_dir, false)?.map(|(r, _)| r);
            Ok((Engine::open(model, backend, name).with_context(loading)?, report))
        }
    }
}

/// Obtains every kernel `serve` needs before it answers: from a blessed bundle (offline: never
/// loading NVRTC, refusing to start on any missing kernel), the JIT service, or the local JIT.
/// Nothing to prepare without a tuning DB, bundle or service. Returns the report for /health
/// and the fallbacks to count.
fn prepare_kernels(
    model: &std::path::Path,
    tuning_db: Option<&std::path::Path>,
    k: &KernelArgs,
    cache_dir: &std::path::Path,
    always: bool,
) -> Result<Option<(KernelReport, KernelEntries)>> {
    use mangrove::provision::{provision, KernelSource, ProvisionError};
    if !always && tuning_db.is_none() && k.blessed.is_none() && k.jit_url.is_none() {
        return Ok(None);
    }
    let config = ShapeConfig::from_model_dir(model)?;
    let db = match tuning_db {
        Some(d) => TuningDb::load(d)?,
        None => TuningDb::default(),
    };
    let planned = plan(&config, &db, k.arch, k.max_batch);
    let (source, name) = match (&k.blessed, &k.jit_url) {
        (Some(b), _) => {
            let bundle = Bundle::open(b).with_context(|| format!("opening blessed bundle {}", b.display()))?;
            (KernelSource::Blessed { bundle, catalog: Catalog::embedded(), offline: k.offline }, "blessed")
        }
        (None, Some(url)) => (KernelSource::Service { client: mangrove::service::client::JitClient::new(url) }, "service"),
        (None, None) => (KernelSource::Jit(open_jit(Catalog::embedded(), cache_dir, false)?), "jit"),
    };
    // The local JIT for misses: the shared cache when this process owns it, else a private one.
    let local = || -> Result<Jit, ProvisionError> {
        let compiler = Compiler::open().map_err(|e| ProvisionError::Jit(e.into()))?;
        let cache = Cache::open(cache_dir)
            .or_else(|_| Cache::open(&std::env::temp_dir().join(format!("mangrove-local-{}", std::process::id()))))
            .map_err(|e| ProvisionError::Jit(e.into()))?;
        Ok(Jit { catalog: Catalog::embedded(), cache, compiler, keep_ptx: false })
    };
    let got = provision(&planned, &source, &local)?;
    if k.strict && !got.fallbacks.is_empty() {
        let list: Vec<String> = got.fallbacks.iter().map(|(f, m, r, d)| format!("  {f} M={m}: {} ({d})", r.as_str())).collect();
        bail!("--strict: {} kernel fallback(s):\n{}", list.len(), list.join("\n"));
    }
    eprintln!(
        "mangrove: {} kernels for {} ready from {name} in {:.1} ms ({:?}; {} fallbacks)",
        planned.len(),
        k.arch,
        got.ms,
        got.obtained,
        got.fallbacks.len()
    );
    let report = serde_json::json!({
        "source": name, "arch": k.arch.to_string(), "planned": planned.len(), "obtained": got.obtained,
        "ready_ms": got.ms, "nvrtc_loaded": mangrove::compile::nvrtc_loaded(),
        "fallbacks": got.fallbacks.iter().map(|(f, m, r, d)| serde_json::json!({"family": f, "m": m, "reason": r.as_str(), "detail": d})).collect::<Vec<_>>(),
    });
    let fallbacks = got.fallbacks.into_iter().map(|(f, _, r, _)| (f, r)).collect();
    Ok(Some(((report, fallbacks), got.entries)))
}

/// Provisioned kernels by (family, M).
type KernelEntries = std::collections::BTreeMap<(String, i64), mangrove::cache::CacheEntry>;

/// Spawns `mangrove serve` with `args` and returns (ms until /health answers 200, the
/// server's "kernels ready" log line), then stops it.
fn time_to_ready(cache_dir: &std::path::Path, args: &[&str]) -> Result<(f64, String)> {
    use std::io::{BufRead, BufReader, Read, Write};
    let t0 = Instant::now();
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("--cache-dir")
        .arg(cache_dir)
        .args(["serve", "--port", "0"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stderr.take().expect("piped"));
    let mut kernels = String::new();
    let addr = loop {
        let mut line = String::new();
        if lines.read_line(&mut line)? == 0 {
            let _ = child.wait();
            bail!("serve exited before it was ready (args {args:?})");
        }
        if line.contains("kernels for") {
            kernels = line.trim().to_string();
        }
        if let Some(rest) = line.split("http://").nth(1) {
            break rest.split_whitespace().next().unwrap_or_default().to_string();
        }
    };
    let ready = loop {
        if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
            write!(s, "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            if out.starts_with("HTTP/1.1 200") {
                break t0.elapsed().as_secs_f64() * 1e3;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    let _ = child.kill();
    let _ = child.wait();
    Ok((ready, kernels))
}

fn bench_startup(model: &std::path::Path, tuning_db: &std::path::Path, arch: Arch, max_batch: i64, json: bool) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("mangrove-startup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let cache = tmp.join("cache");
    let bundle_dir = tmp.join("bundle");
    let (m, db, a, mb) = (model.to_str().unwrap_or_default(), tuning_db.to_str().unwrap_or_default(), arch.to_string(), max_batch.to_string());
    let common = ["--model", m, "--tuning-db", db, "--arch", a.as_str(), "--max-batch", mb.as_str()];
    let (cold, cold_k) = time_to_ready(&cache, &common)?;
    let (warm, warm_k) = time_to_ready(&cache, &common)?;
    bless(&cache, tuning_db, model, arch, &bundle_dir, max_batch, false)?;
    let mut blessed_args = common.to_vec();
    let b = bundle_dir.to_str().unwrap_or_default();
    blessed_args.extend(["--blessed", b, "--offline"]);
    let (blessed, blessed_k) = time_to_ready(&tmp.join("unused-cache"), &blessed_args)?;
    let _ = std::fs::remove_dir_all(&tmp);
    let r = serde_json::json!({
        "model": model, "arch": a, "max_batch": max_batch,
        "cold_ms": cold, "warm_ms": warm, "blessed_ms": blessed,
        "cold_over_warm": cold / warm, "cold_over_blessed": cold / blessed,
        "kernels": {"cold": cold_k, "warm": warm_k, "blessed": blessed_k},
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("time to ready of `mangrove serve` ({}; {arch}, max batch {max_batch}):", model.display());
        println!("  cold cache     {cold:>9.0} ms   {cold_k}");
        println!("  warm cache     {warm:>9.0} ms   {warm_k}");
        println!("  blessed bundle {blessed:>9.0} ms   {blessed_k}");
        println!("  cold/warm {:.2}×   cold/blessed {:.2}×", cold / warm, cold / blessed);
    }
    Ok(())
}

fn bless(
    cache_dir: &std::path::Path,
    tuning_db: &std::path::Path,
    model: &std::path::Path,
    arch: Arch,
    out: &std::path::Path,
    max_batch: i64,
    verify_on_gpu: bool,
) -> Result<()> {
    if !(1..=512).contains(&max_batch) {
        bail!("--max-batch must be in 1..=512, got {max_batch}");
    }
    if !tuning_db.is_dir() {
        bail!("tuning DB folder {} does not exist", tuning_db.display());
    }
    let config = ShapeConfig::from_model_dir(model)?;
    let db = TuningDb::load(tuning_db)?;
    let (planned, unavailable): (Vec<_>, Vec<_>) = plan(&config, &db, arch, max_batch).into_iter().partition(|p| p.unavailable.is_none());
    for u in &unavailable {
        eprintln!("note: no kernel for {} M={}: {}", u.family, u.m, u.unavailable.as_deref().unwrap_or_default());
    }
    let gpu = if verify_on_gpu {
        let g = Gpu::open(0).context("--verify-on-gpu")?;
        if g.info().arch.cc != arch.cc {
            bail!("--verify-on-gpu: this GPU is {}, the bundle is for {arch}", g.info().arch);
        }
        Some(g)
    } else {
        None
    };
    let jit = open_jit(Catalog::embedded(), cache_dir, false)?;
    let reqs: Vec<KernelRequest> = planned.iter().map(|p| p.request.clone()).collect();
    let mut items = Vec::new();
    let mut failed = Vec::new();
    for (p, f) in planned.iter().zip(jit.get_many(&reqs)) {
        let f = f.map_err(|e| anyhow::anyhow!("{e}")).with_context(|| format!("{} M={}", p.family, p.m))?;
        let gpu_check = match &gpu {
            Some(g) if has_validator(&p.request.template) => {
                let d = check_entry(g, &f.entry, 0xB1E55 ^ p.m as u64, 1e-3)?.deltas;
                if !d.passes(&Gate { max_abs: f64::INFINITY, max_rel: 1e-2, rel_floor: 1e-3 }) {
                    failed.push(format!("{} M={}: {d}", p.family, p.m));
                }
                Some(d)
            }
            _ => None,
        };
        items.push(BlessItem { entry: f.entry, family: Some(p.family.clone()), m: Some(p.m), db_rule: Some(format!("{:?}", p.rule)), gpu_check });
    }
    if !failed.is_empty() {
        bail!("refusing to bless: {} kernels failed the GPU check:\n{}", failed.len(), failed.join("\n"));
    }
    let source = [
        ("tuning_db".to_string(), tuning_db.display().to_string()),
        ("model".to_string(), model.display().to_string()),
        ("command".to_string(), std::env::args().collect::<Vec<_>>().join(" ")),
    ]
    .into();
    let m = bundle::write(out, arch, source, items)?;
    let defaults = planned.iter().filter(|p| p.rule == mangrove::tuning_db::LookupRule::Default).count();
    eprintln!("blessed {} kernels for {arch} into {} ({} from tuned records, {defaults} on template defaults)", m.kernels.len(), out.display(), planned.len() - defaults);
    Ok(())
}

fn warm(catalog: Catalog, dir: &std::path::Path, archs: &[Arch], recompile: bool, json: bool) -> Result<()> {
    let samples = catalog.samples()?;
    let jit = open_jit(catalog, dir, false)?;
    let reqs: Vec<KernelRequest> = archs
        .iter()
        .flat_map(|&arch| samples.iter().map(move |k| KernelRequest { template: k.template.clone(), params: k.params.clone(), arch }))
        .collect();
    if recompile {
        for r in &reqs {
            let (_, inputs): (_, KeyInputs) = jit.key_of(r)?;
            jit.cache.storage().remove(&inputs.key())?;
        }
    }
    let t0 = Instant::now();
    let first = jit.get_many(&reqs);
    let first_wall = t0.elapsed().as_secs_f64() * 1e3;
    let mut compiled_ms = 0.0;
    let mut compiled = 0;
    for (r, f) in reqs.iter().zip(&first) {
        let f = f.as_ref().map_err(|e| anyhow::anyhow!("{e}")).with_context(|| format!("{} {} for {}", r.template, format_params(&r.params), r.arch))?;
        if let Outcome::Compiled(_) = f.outcome {
            compiled += 1;
            compiled_ms += f.entry.compile_ms;
        }
    }
    let t1 = Instant::now();
    let second = jit.get_many(&reqs);
    let hit_wall = t1.elapsed().as_secs_f64() * 1e3;
    let hits = second.iter().filter(|f| matches!(f, Ok(f) if f.outcome == Outcome::Hit)).count();

    let gpu = match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e @ (GpuError::NoDriver | GpuError::NoDevice(_))) => {
            if !json {
                println!("no GPU ({e}): compiled and cached only");
            }
            None
        }
        Err(e) => return Err(e.into()),
    };
    let gate = Gate { max_abs: f64::INFINITY, max_rel: 1e-2, rel_floor: 1e-3 };
    let mut checks = Vec::new();
    let mut load_ms = 0.0;
    if let Some(gpu) = &gpu {
        for f in second.iter().flatten() {
            if f.entry.inputs.arch.cc != gpu.info().arch.cc {
                continue;
            }
            let t = Instant::now();
            let loaded = gpu.load(&f.entry)?;
            load_ms += t.elapsed().as_secs_f64() * 1e3;
            drop(loaded);
            // Ops without a standalone check (RoPE, LM head, MoE combine) are loaded only.
            if !has_validator(&f.entry.inputs.template) {
                continue;
            }
            let d = check_entry(gpu, &f.entry, 0x5eed ^ checks.len() as u64, gate.rel_floor)?.deltas;
            checks.push((format_params(&f.entry.inputs.params), d, d.passes(&gate)));
        }
    }
    let failed = checks.iter().filter(|c| !c.2).count();
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({
            "kernels": reqs.len(), "compiled": compiled, "compile_ms_sum": compiled_ms, "first_pass_wall_ms": first_wall,
            "hit_pass_wall_ms": hit_wall, "hits": hits, "cold_over_hit": first_wall / hit_wall.max(1e-9),
            "gpu_module_load_ms": load_ms,
            "checks": checks.iter().map(|(p, d, ok)| serde_json::json!({"params": p, "deltas": d, "pass": ok})).collect::<Vec<_>>(),
        }))?);
    } else {
        println!("catalog: {} kernels ({} samples × {} archs)", reqs.len(), samples.len(), archs.len());
        println!("first pass: {compiled} compiled, {first_wall:.1} ms wall (sum of compile times {compiled_ms:.1} ms)");
        println!("second pass: {hits}/{} hits, {hit_wall:.2} ms wall → {:.0}× faster", reqs.len(), first_wall / hit_wall.max(1e-9));
        if gpu.is_some() {
            println!("module load on GPU: {load_ms:.2} ms total");
            for (p, d, ok) in &checks {
                println!("  {} {p}: {d}", if *ok { "PASS" } else { "FAIL" });
            }
        }
    }
    if failed > 0 {
        bail!("{failed} kernels failed the correctness check");
    }
    Ok(())
}

