//! `mangrove-tune cpu`: sweeps the SIMD CPU backend's tunables ([`CpuTunables`]: instruction
//! set, threads, byte rows per task, the AVX2 K block) on the machine it runs on, for one
//! model's decode layer (its four ternary linears: q|k|v, o, gate|up, down) at each M bucket.
//! Every candidate is first checked against the f64 reference on the same int8 activations
//! (`mangrove_core::reference::ternary_linear_w2a8`) and rejected if it misses the gate; survivors are timed by wall clock over weights rotated through copies
//! larger than the last-level cache, the defaults always first. The winners go into the tuning
//! DB under this CPU's slug (`tuning_db/<vendor-model-isa>/cpu_ternary.json`), as GPU records do:
//! winner, runner-ups, counts, gate, the measured read bandwidth and provenance. The backend
//! reads them back through [`tunables_from_db`].

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use mangrove_core::check::{Deltas, Gate};
use mangrove_core::model_config::{ModelConfig, ScaleConvention};
use mangrove_core::reference::{pack_ternary, ternary_linear_w2a8};
use mangrove_core::template::Params;
use mangrove_core::tuning_db::{LookupRule, Provenance, Record, Timed, TuningDb};

use super::isa::Isa;
use super::kernels::{Kernels, MAX_KBLOCK};
use super::ops::quantize;
use super::pool::{read_bandwidth_gbs, ternary_linear, Pool, QuantRows, Split};
use super::repack::PackedTernary;
use super::tune::CpuTunables;
use crate::model::TernaryLinear;

/// The tuning DB "template" the CPU records are filed under.
pub const TEMPLATE: &str = "cpu_ternary";

/// The gate a candidate meets against the f64 reference before it is timed: both see the same
/// int8 activations, so only the f32 epilogue (`Σ / s · weight_scale`) may differ.
pub const CPU_GATE: Gate = Gate { max_abs: f64::MAX, max_rel: 1e-4, rel_floor: 1e-3 };

/// What to sweep.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// M buckets (token rows per step).
    pub m: Vec<i64>,
    /// Instruction sets (unsupported ones are pruned, with the reason counted).
    pub isas: Vec<Isa>,
    pub threads: Vec<usize>,
    pub rows_per_task: Vec<usize>,
    /// AVX2 K blocks (other paths have none and take one value).
    pub kblocks: Vec<usize>,
    /// Timed passes per candidate (the median is kept).
    pub iters: usize,
}

impl Default for SweepOptions {
    fn default() -> Self {
        SweepOptions {
            m: vec![1, 4, 8],
            isas: Isa::ALL.to_vec(),
            threads: {
                let c = super::pool::cores();
                if c > 1 { vec![c / 2, c] } else { vec![1] }
            },
            rows_per_task: vec![2, 4, 8, 16, 32, 64],
            kblocks: vec![256, 1024, 2016],
            iters: 9,
        }
    }
}

/// This CPU's slug for the tuning DB folder: vendor and model from `/proc/cpuinfo` and the
/// widest kernel path, lowercased, e.g. `amd-epyc-avx512-vnni`.
pub fn cpu_slug() -> String {
    let model = cpu_model();
    let mut s: String = model.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    s.push('-');
    s.push_str(Isa::best().name());
    let mut out = String::new();
    for c in s.chars() {
        if !(c == '-' && (out.is_empty() || out.ends_with('-'))) {
            out.push(c);
        }
    }
    out.trim_end_matches('-').to_string()
}

/// The CPU's model name (`/proc/cpuinfo`), or the architecture where there is none.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The problem key of a model's decode layer.
pub fn layer_problem(c: &ModelConfig) -> Params {
    [("HIDDEN", c.hidden), ("INTER", c.inter), ("Q_DIM", c.q_dim()), ("KV_DIM", c.kv_dim())]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v as i64))
        .collect()
}

/// A candidate's parameters in a record (ISA as its index in [`Isa::ALL`]).
pub fn params_of(t: &CpuTunables) -> Params {
    let isa = Isa::ALL.iter().position(|&i| i == t.isa).unwrap_or(0) as i64;
    [("ISA", isa), ("THREADS", t.thread_count() as i64), ("ROWS_PER_TASK", t.rows_per_task as i64), ("KBLOCK", t.kblock as i64)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// Whether a record's parameters are exactly the tunables [`params_of`] writes, each in range
/// (the instruction set may still be one this CPU lacks).
pub fn params_valid(p: &Params) -> bool {
    let keys = ["ISA", "KBLOCK", "ROWS_PER_TASK", "THREADS"];
    p.len() == keys.len()
        && keys.iter().all(|k| p.contains_key(*k))
        && (0..Isa::ALL.len() as i64).contains(&p["ISA"])
        && p["THREADS"] >= 1
        && p["ROWS_PER_TASK"] >= 1
        && p["KBLOCK"] % 32 == 0
        && (32..=MAX_KBLOCK as i64).contains(&p["KBLOCK"])
}

/// The tunables a record's parameters describe (missing ones from `base`).
pub fn tunables_of(p: &Params, base: CpuTunables) -> CpuTunables {
    let get = |k: &str| p.get(k).map(|&v| v as usize);
    CpuTunables {
        isa: get("ISA").and_then(|i| Isa::ALL.get(i).copied()).unwrap_or(base.isa),
        threads: get("THREADS").unwrap_or(base.threads),
        rows_per_task: get("ROWS_PER_TASK").unwrap_or(base.rows_per_task),
        kblock: get("KBLOCK").unwrap_or(base.kblock),
        lm_rows_per_task: base.lm_rows_per_task,
    }
}

/// The tunables for `cfg` from `db`: the batch-1 record's (its threads size the fixed pool),
/// and per M = 1..=[`MAX_TUNED_M`] the looked-up record's instruction set, rows per task and K
/// block (exact, else the nearest bucket: the DB's lookup rule). A record whose instruction set
/// this CPU lacks is ignored. Returns the base tunables and, per M, the tunables with the rule
/// that found them.
pub fn tunables_from_db(db: &TuningDb, cfg: &ModelConfig, base: CpuTunables) -> (CpuTunables, Vec<(CpuTunables, LookupRule)>) {
    let problem = layer_problem(cfg);
    let one = db.lookup(TEMPLATE, &problem, 1);
    let mut t = base;
    if one.rule != LookupRule::Default {
        let cand = tunables_of(&one.params, base);
        if cand.kernels().is_ok() {
            t = cand;
        }
    }
    let per_m = (1..=MAX_TUNED_M as i64)
        .map(|m| {
            let c = db.lookup(TEMPLATE, &problem, m);
            let mut s = tunables_of(&c.params, t);
            // The pool is fixed: its threads are the batch-1 record's.
            s.threads = t.threads;
            if s.kernels().is_err() {
                s = t;
            }
            (s, c.rule)
        })
        .collect();
    (t, per_m)
}

/// Rows per step up to which a per-M split is kept (larger steps use the last).
pub const MAX_TUNED_M: usize = 64;

struct Layer {
    /// The four linears, in `copies` copies each (rotated so every pass streams from memory).
    mats: Vec<[PackedTernary; 4]>,
    /// One copy in the HF layout, for the reference.
    hf: [TernaryLinear; 4],
}

fn random_linear(rng: &mut StdRng, n: usize, k: usize) -> TernaryLinear {
    let w: Vec<i8> = (0..n * k).map(|_| rng.random_range(-1i8..=1)).collect();
    TernaryLinear { packed: pack_ternary(&w, n, k), n, k, scale: rng.random_range(0.5..2.0) }
}

fn layer(c: &ModelConfig, llc_bytes: usize) -> Layer {
    let mut rng = StdRng::seed_from_u64(1);
    let h = c.hidden;
    let hf = [
        random_linear(&mut rng, c.q_dim() + 2 * c.kv_dim(), h),
        random_linear(&mut rng, h, c.q_dim()),
        random_linear(&mut rng, 2 * c.inter, h),
        random_linear(&mut rng, h, c.inter),
    ];
    let one: [PackedTernary; 4] = std::array::from_fn(|i| PackedTernary::from_linear(&hf[i], ScaleConvention::Multiply));
    let bytes: usize = one.iter().map(|p| p.bytes()).sum();
    let copies = (2 * llc_bytes).div_ceil(bytes.max(1)).max(1);
    Layer { mats: vec![one; copies], hf }
}

struct Inputs {
    /// `[m][kp]`, as the kernels read them.
    q: Vec<i8>,
    inv_s: Vec<f32>,
    sum: Vec<i32>,
    /// The same `[m][k]`, unpadded, and each row's s, for the reference.
    q_ref: Vec<i8>,
    s: Vec<f32>,
}

fn inputs(l: &Layer, m: usize, rng: &mut StdRng) -> Vec<Inputs> {
    // One input per distinct K (the linear's own K), never zeros.
    l.mats[0]
        .iter()
        .map(|p| {
            let x: Vec<f32> = (0..m * p.k).map(|_| rng.random_range(-4f32..4.0) + 1e-3).collect();
            let mut q = vec![0i8; m * p.kp];
            let (mut inv_s, mut sum) = (vec![0f32; m], vec![0i32; m]);
            for t in 0..m {
                (inv_s[t], sum[t]) = quantize(&x[t * p.k..][..p.k], &mut q[t * p.kp..][..p.kp]);
            }
            let q_ref = (0..m).flat_map(|t| q[t * p.kp..][..p.k].to_vec()).collect();
            let s = inv_s.iter().map(|&v| 1.0 / v).collect();
            Inputs { q, inv_s, sum, q_ref, s }
        })
        .collect()
}

/// Deltas of one candidate on every linear of the layer against the f64 reference.
fn check(k: &Kernels, split: &Split, pool: &Pool, l: &Layer, ins: &[Inputs], m: usize) -> Deltas {
    let mut worst = Deltas::default();
    for (i, p) in l.mats[0].iter().enumerate() {
        let hf = &l.hf[i];
        let want = ternary_linear_w2a8(&hf.packed, hf.n, hf.k, &ins[i].q_ref, &ins[i].s, m, hf.scale);
        let mut y = vec![f32::NAN; m * p.n];
        let x = QuantRows { q: &ins[i].q, inv_s: &ins[i].inv_s, sum: &ins[i].sum };
        pool.install(|| ternary_linear(k, split, p, x, m, &mut y));
        let scale = want.iter().fold(0f64, |a, v| a.max(v.abs()));
        let floor = CPU_GATE.rel_floor * scale;
        let mut d = Deltas { count: y.len(), ..Deltas::default() };
        for (g, w) in y.iter().zip(&want) {
            let g = *g as f64;
            if !g.is_finite() {
                d.non_finite += 1;
                continue;
            }
            d.max_abs = d.max_abs.max((g - w).abs());
            d.max_rel = d.max_rel.max((g - w).abs() / w.abs().max(floor));
        }
        worst.max_abs = worst.max_abs.max(d.max_abs);
        worst.max_rel = worst.max_rel.max(d.max_rel);
        worst.non_finite += d.non_finite;
        worst.count += d.count;
    }
    worst
}

/// Wall-clock µs of one pass over the layer's four linears (median, p95, mean of `iters`), each
/// pass on the next copy of the weights.
fn time(k: &Kernels, split: &Split, pool: &Pool, l: &Layer, ins: &[Inputs], m: usize, iters: usize) -> (f64, f64, f64) {
    let mut ys: Vec<Vec<f32>> = l.mats[0].iter().map(|p| vec![0f32; m * p.n]).collect();
    let mut us = Vec::with_capacity(iters);
    for (it, mats) in (0..iters + 1).zip(l.mats.iter().cycle()) {
        let t = Instant::now();
        pool.install(|| {
            for (i, p) in mats.iter().enumerate() {
                let x = QuantRows { q: &ins[i].q, inv_s: &ins[i].inv_s, sum: &ins[i].sum };
                ternary_linear(k, split, p, x, m, &mut ys[i]);
            }
        });
        if it > 0 {
            us.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let mean = us.iter().sum::<f64>() / us.len() as f64;
    us.sort_by(f64::total_cmp);
    let pick = |q: f64| mangrove_core::stats::nearest_rank(&us, q);
    (pick(0.5), pick(0.95), mean)
}

/// One line per candidate while sweeping.
pub type Progress<'a> = &'a mut dyn FnMut(&str);

/// Sweeps `opts` for the decode layer of `cfg`; returns one record per M bucket.
pub fn sweep(cfg: &ModelConfig, opts: &SweepOptions, command: String, progress: Progress) -> Result<Vec<Record>, String> {
    let llc = 32 << 20;
    let l = layer(cfg, llc);
    let bytes: f64 = l.mats[0].iter().map(|p| p.bytes() as f64).sum();
    let pools: Vec<Pool> = opts.threads.iter().map(|&t| Pool::new(t).map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
    let bw = read_bandwidth_gbs(pools.iter().max_by_key(|p| p.threads()).ok_or("no thread count")?, 1 << 30);
    progress(&format!("{} copies of a {:.1} MB layer; read bandwidth {bw:.1} GB/s", l.mats.len(), bytes / 1e6));
    // Candidates: the defaults first, then the grid.
    let default = CpuTunables::defaults(Isa::best());
    let mut cands: Vec<CpuTunables> = vec![default];
    let mut pruned = 0;
    for &isa in &opts.isas {
        for &threads in &opts.threads {
            for &rpt in &opts.rows_per_task {
                let kbs: &[usize] = if isa == Isa::Avx2 { &opts.kblocks } else { &[1024] };
                for &kblock in kbs {
                    let t = CpuTunables { isa, threads, rows_per_task: rpt, kblock, ..default };
                    if t.kernels().is_err() {
                        pruned += 1;
                    } else if !cands.contains(&t) {
                        cands.push(t);
                    }
                }
            }
        }
    }
    let provenance = Provenance {
        gpu_name: format!("{} ({})", cpu_model(), Isa::best()),
        sm_count: super::pool::cores() as i32,
        timing: format!("wall clock, median of {} passes over the layer's four linears, weights rotated over {} copies", opts.iters, l.mats.len()),
        ..Provenance::collect(None, (0, 0), command)
    };
    let mut rng = StdRng::seed_from_u64(2);
    let mut records = Vec::new();
    for &m in &opts.m {
        let mu = m.max(1) as usize;
        let ins = inputs(&l, mu, &mut rng);
        let mut timed: Vec<Timed> = Vec::new();
        let mut rejected = 0;
        let mut default_us = None;
        for t in &cands {
            let pool = pools.iter().find(|p| p.threads() == t.thread_count()).unwrap_or(&pools[0]);
            let k = t.kernels()?;
            let split = t.split();
            let d = check(&k, &split, pool, &l, &ins, mu);
            if d.non_finite > 0 || d.max_rel > CPU_GATE.max_rel {
                rejected += 1;
                progress(&format!("m {m} {t:?}: rejected (max_rel {:.2e})", d.max_rel));
                continue;
            }
            let (p50, p95, mean) = time(&k, &split, pool, &l, &ins, mu, opts.iters.max(1));
            if default_us.is_none() && *t == default {
                default_us = Some(p50);
            }
            let gb_s = bytes / (p50 * 1e-6) / 1e9;
            progress(&format!("m {m} {} threads {} rows/task {} kblock {}: {p50:.0} µs ({gb_s:.1} GB/s)", t.isa, t.thread_count(), t.rows_per_task, t.kblock));
            timed.push(Timed { params: params_of(t), median_us: p50, p95_us: p95, mean_us: mean, gb_s, frac_copy_bw: gb_s / bw, deltas: d });
        }
        timed.sort_by(|a, b| a.median_us.total_cmp(&b.median_us));
        if timed.is_empty() {
            return Err(format!("m {m}: every candidate missed the reference"));
        }
        let winner = timed.remove(0);
        records.push(Record {
            problem: layer_problem(cfg),
            m,
            winner,
            runner_ups: timed.iter().take(4).cloned().collect(),
            candidates: cands.len() + pruned,
            pruned,
            rejected,
            timed: timed.len() + 1,
            strategy: "exhaustive".into(),
            gate: CPU_GATE,
            copy_bw_gbs: bw,
            default_us,
            baseline: None,
            provenance: provenance.clone(),
            merged_from: Vec::new(),
        });
    }
    Ok(records)
}
