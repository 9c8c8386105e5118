//! The JIT path end to end: template name + params + arch → key → cache hit, or NVRTC
//! compile and insert. Every miss carries its reason. Batches compile in parallel (rayon).

use std::collections::HashMap;
use std::time::Instant;

use rayon::prelude::*;

use crate::arch::Arch;
use crate::cache::{Cache, CacheEntry, CacheError, Lookup, MissReason};
use crate::compile::{CompileError, Compiler};
use crate::key::{KernelKey, KeyInputs};
use crate::template::{Catalog, Params, RenderedKernel, TemplateError};

/// Errors anywhere on the JIT path.
#[derive(Debug, thiserror::Error)]
pub enum JitError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// How a request was served.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Outcome {
    Hit,
    /// Compiled because of the miss reason.
    Compiled(MissReason),
}

/// One kernel request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelRequest {
    pub template: String,
    pub params: Params,
    pub arch: Arch,
}

/// A served kernel.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub key: KernelKey,
    pub entry: CacheEntry,
    pub outcome: Outcome,
    /// Wall time of the whole request (render, key, lookup, compile if any).
    pub ms: f64,
}

/// Templates + compiler + cache.
pub struct Jit {
    pub catalog: Catalog,
    pub cache: Cache,
    pub compiler: Compiler,
    pub keep_ptx: bool,
}

impl Jit {
    /// The JIT over `catalog` with the sled cache in `cache_dir`; fails when NVRTC or the cache
    /// cannot be opened.
    pub fn open(catalog: Catalog, cache_dir: &std::path::Path, keep_ptx: bool) -> Result<Self, JitError> {
        Ok(Self { catalog, cache: Cache::open(cache_dir)?, compiler: Compiler::open()?, keep_ptx })
    }

    /// Renders and keys a request without touching the cache.
    pub fn key_of(&self, req: &KernelRequest) -> Result<(RenderedKernel, KeyInputs), JitError> {
        let kernel = self.catalog.get(&req.template)?.render(&req.params)?;
        let inputs = KeyInputs::new(&kernel, req.arch, self.compiler.version(), &Compiler::options(req.arch));
        Ok((kernel, inputs))
    }

    /// Serves one request from the cache, compiling on a miss.
    pub fn get(&self, req: &KernelRequest) -> Result<Fetched, JitError> {
        let t0 = Instant::now();
        let (kernel, inputs) = self.key_of(req)?;
        let key = inputs.key();
        let reason = match self.cache.get(&key)? {
            // The loader launches with the entry's symbol and geometry: they must be the template's.
            Lookup::Hit(entry) if entry.entry == kernel.entry && entry.launch == kernel.launch => {
                return Ok(Fetched { key, entry: *entry, outcome: Outcome::Hit, ms: ms_since(t0) });
            }
            Lookup::Hit(entry) => {
                self.cache.evict(&key)?;
                MissReason::Corrupt(format!(
                    "entry symbol / launch {} {:?} differ from the template's {} {:?}",
                    entry.entry, entry.launch, kernel.entry, kernel.launch
                ))
            }
            Lookup::Miss(reason) => reason,
        };
        let compiled = self.compiler.compile(&kernel, req.arch, &inputs.options, self.keep_ptx)?;
        let entry = CacheEntry::new(inputs, kernel.entry.clone(), kernel.launch, compiled);
        self.cache.put(&key, &entry)?;
        Ok(Fetched { key, entry, outcome: Outcome::Compiled(reason), ms: ms_since(t0) })
    }

    /// Serves many requests in parallel; requests with the same key are served once.
    pub fn get_many(&self, reqs: &[KernelRequest]) -> Vec<Result<Fetched, JitError>> {
        self.get_many_counted(reqs, &indicatif::ProgressBar::hidden())
    }

    /// [`Jit::get_many`], advancing `progress` by one as each request is served.
    pub fn get_many_counted(&self, reqs: &[KernelRequest], progress: &indicatif::ProgressBar) -> Vec<Result<Fetched, JitError>> {
        let keyed: Vec<Option<KernelKey>> = reqs.iter().map(|r| self.key_of(r).ok().map(|(_, i)| i.key())).collect();
        let mut first: HashMap<KernelKey, usize> = HashMap::new();
        for (i, k) in keyed.iter().enumerate() {
            if let Some(k) = k {
                first.entry(*k).or_insert(i);
            }
        }
        let unique: Vec<usize> = (0..reqs.len()).filter(|&i| keyed[i].is_none_or(|k| first[&k] == i)).collect();
        let mut served: HashMap<usize, Result<Fetched, JitError>> =
            unique.par_iter().map(|&i| (i, self.get(&reqs[i]))).inspect(|_| progress.inc(1)).collect();
        let mut out: Vec<Option<Result<Fetched, JitError>>> = (0..reqs.len()).map(|i| served.remove(&i)).collect();
        // A repeated key is a hit on its first request's result (or retried alone if that failed).
        for i in 0..reqs.len() {
            if let Some(j) = keyed[i].map(|k| first[&k]).filter(|&j| j != i) {
                out[i] = Some(match &out[j] {
                    Some(Ok(f)) => Ok(Fetched { outcome: Outcome::Hit, ms: 0.0, ..f.clone() }),
                    _ => self.get(&reqs[i]),
                });
                progress.inc(1);
            }
        }
        out.into_iter().map(|r| r.expect("every request is served or a repeat")).collect()
    }
}

/// The `mangrove compile` report of a served kernel.
impl serde::Serialize for Fetched {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = &self.entry;
        serde_json::json!({
            "key": self.key.to_hex(), "outcome": self.outcome, "template": e.inputs.template,
            "params": e.inputs.params, "arch": e.inputs.arch.to_string(), "cubin_bytes": e.cubin.len(),
            "ptx_bytes": e.ptx.as_ref().map(|p| p.len()), "resources": e.resources,
            "compile_ms": e.compile_ms, "request_ms": self.ms, "launch": e.launch,
            "nvrtc": e.toolchain.nvrtc_version,
        })
        .serialize(s)
    }
}

impl std::fmt::Display for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (e, r) = (&self.entry, &self.entry.resources);
        let outcome = match &self.outcome {
            Outcome::Hit => "hit".to_string(),
            Outcome::Compiled(reason) => format!("miss ({reason}), compiled"),
        };
        writeln!(f, "key          {}", self.key)?;
        writeln!(f, "outcome      {outcome}")?;
        writeln!(f, "kernel       {} [{}] for {}", e.inputs.template, crate::template::format_params(&e.inputs.params), e.inputs.arch)?;
        writeln!(f, "cubin        {} bytes", e.cubin.len())?;
        writeln!(f, "registers    {}  spills {}/{} B  stack {} B  smem {} B", r.registers, r.spill_stores, r.spill_loads, r.stack_frame, r.shared_bytes)?;
        writeln!(f, "compile ms   {:.1} (this request {:.1} ms)", e.compile_ms, self.ms)
    }
}

fn ms_since(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}
