//! GPU side of the lab: takes cases, a GPU, the JIT and a tuning DB and gives a [`Report`].
//! mangrove's kernels run on the tuner's own workloads ([`GemvWorkload`], [`MoeWorkload`]:
//! checked against the f64 reference, timed over weight copies beyond L2); cuBLAS runs the
//! same problem with dense bf16 weights ([`DenseCase`]), checked and rotated the same way.

use mangrove_core::arch::Arch;
use mangrove_core::cache::CacheEntry;
use mangrove_core::check::{Deltas, Gate, POISON_BF16};
use mangrove_core::gpu::{ActMode, Blas, DenseGroup, DeviceBuffer, Gpu, GpuError, TernaryGemv, TimingPlan, TimingStats, GEMM_TEMPLATE};
use mangrove_core::jit::{Jit, KernelRequest};
use mangrove_core::reference::moe::MoeShape;
use mangrove_core::reference::{ternary_linear, unpack_ternary};
use mangrove_core::template::Params;
use crate::context::COPY_BW_BYTES;
use crate::gateup::{gateup_problem, gateup_request};
use mangrove_core::step::{linear_request, GEMM_BUCKETS, MAX_GEMV_M};
use crate::sweep::tunables_of;
use crate::workload::{rotation_count, GemvWorkload, MoeStage, MoeWorkload, Workload};
use mangrove_core::tuning_db::{LookupRule, Provenance, TuningDb};
use mangrove_core::validate::{MoeProblem, TernaryProblem};

use super::{BlasStatus, Case, CaseResult, LabError, Outcome, Problem, Report, Source, VariantResult, LAB_SCHEMA_VERSION};

/// How a lab run measures.
#[derive(Debug, Clone)]
pub struct LabSettings {
    pub arch: Arch,
    pub plan: TimingPlan,
    pub gate: Gate,
    pub seed: u64,
    pub cases: Vec<Case>,
    /// Where the tuning DB came from (for the report).
    pub tuning_db: String,
    pub command: String,
}

/// Runs every case on `gpu`; `progress` hears the label of each case as it starts. A variant
/// that fails its check or errors is reported as failed; only set-up errors abort the run.
pub fn run(
    gpu: &Gpu,
    jit: &Jit,
    db: &TuningDb,
    s: &LabSettings,
    progress: &dyn Fn(&str),
) -> Result<Report, LabError> {
    let device = gpu.info().clone();
    if device.arch.cc != s.arch.cc {
        return Err(LabError::ArchMismatch { device: device.arch.to_string(), asked: s.arch.to_string() });
    }
    progress("copy bandwidth");
    let copy_bw_gbs = gpu.copy_bandwidth_gbs(COPY_BW_BYTES)?;
    let (blas, cublas) = match Blas::open(gpu) {
        Ok(b) => {
            let version = b.version();
            (Some(b), BlasStatus::Loaded { version })
        }
        Err(GpuError::NoBlas(reason)) => (None, BlasStatus::Unavailable { reason }),
        Err(e) => return Err(e.into()),
    };
    let mut cases = Vec::new();
    for case in &s.cases {
        progress(&case.label());
        let mut result = match &case.problem {
            Problem::Gemv { n, k, .. } => gemv_case(gpu, jit, db, blas.as_ref(), s, case, (case.m, *n, *k))?,
            Problem::Gateup { experts, topk, hidden, inter } => {
                let shape = MoeShape { tokens: case.m, hidden: *hidden, inter: *inter, experts: *experts, topk: *topk };
                gateup_case(gpu, jit, db, blas.as_ref(), s, case, shape)?
            }
        };
        result.derive(copy_bw_gbs);
        cases.push(result);
    }
    Ok(Report {
        schema_version: LAB_SCHEMA_VERSION,
        provenance: Provenance::collect(Some(gpu), jit.compiler.version(), s.command.clone()),
        device,
        cublas,
        tuning_db: s.tuning_db.clone(),
        arch: s.arch.to_string(),
        copy_bw_gbs,
        gate: s.gate,
        plan: s.plan,
        cases,
    })
}

fn gemv_case(
    gpu: &Gpu,
    jit: &Jit,
    db: &TuningDb,
    blas: Option<&Blas>,
    s: &LabSettings,
    case: &Case,
    (m, n, k): (usize, usize, usize),
) -> Result<CaseResult, LabError> {
    let max_m = *GEMM_BUCKETS.last().expect("buckets") as usize;
    if !(1..=max_m).contains(&m) || n % 4 != 0 {
        return Err(LabError::Input(format!("{}: the ternary linears take M in 1..={max_m} and N a multiple of 4", case.label())));
    }
    let mut work = GemvWorkload::new(gpu, m, n, k, s.seed)?;
    let mut variants = vec![cublas_variant(gpu, blas, s, None, || DenseCase::gemv(gpu, &TernaryProblem::random(m, n, k, s.seed)))];
    let problem: Params = [("M", m), ("N", n), ("K", k)].into_iter().map(|(p, v)| (p.to_string(), v as i64)).collect();
    // The dp4a GEMVs up to their M, the tensor-core GEMM (rows = M) from M = 2.
    let gemvs = [ActMode::Bf16, ActMode::W2A8].map(|mode| mode.template()).into_iter().filter(|_| m <= MAX_GEMV_M);
    for template in gemvs.chain((m >= 2).then_some(GEMM_TEMPLATE)) {
        let (tuned, rule) = linear_request(db, s.arch, template, m as i64, n as i64, k as i64);
        let default = KernelRequest { template: template.into(), params: problem.clone(), arch: s.arch };
        let bytes = |e: &CacheEntry| Ok(TernaryGemv::new(gpu, e)?.min_bytes());
        variants.push(mangrove_variant(gpu, jit, &mut work, s, Source::Tuned, tuned, Some(rule), &bytes));
        variants.push(mangrove_variant(gpu, jit, &mut work, s, Source::Default, default, None, &bytes));
    }
    Ok(CaseResult::new(case.clone(), work.min_bytes(), variants))
}

fn gateup_case(
    gpu: &Gpu,
    jit: &Jit,
    db: &TuningDb,
    blas: Option<&Blas>,
    s: &LabSettings,
    case: &Case,
    shape: MoeShape,
) -> Result<CaseResult, LabError> {
    let mut problem = gateup_problem((shape.experts as i64, shape.topk as i64, shape.hidden as i64, shape.inter as i64));
    let (tuned, rule) = gateup_request(&jit.catalog, db, s.arch, shape.tokens as i64, &problem);
    problem.insert("M".into(), shape.tokens as i64);
    // A bad shape fails before any GPU work; where the template default is invalid for it, the
    // first valid config stands in as the default variant.
    let (problem, _) = jit.catalog.get("moe_gateup")?.baseline(&problem)?;
    if shape.topk > shape.experts {
        return Err(LabError::Input(format!("{}: top-k exceeds the expert count", case.label())));
    }
    let default = KernelRequest { template: "moe_gateup".into(), params: problem, arch: s.arch };
    let mut work = MoeWorkload::new(gpu, MoeStage::GateUp, shape, s.seed)?;
    let bytes = work.min_bytes();
    let note = "per-expert TN GEMMs over pre-gathered token rows, gate|up as one [2I, H] matrix; no SiLU·up epilogue, gather not timed";
    let mut variants = vec![cublas_variant(gpu, blas, s, Some(note), || DenseCase::gateup(gpu, &MoeProblem::random(shape, s.seed, true)))];
    let bytes_of = |_: &CacheEntry| Ok(bytes);
    variants.push(mangrove_variant(gpu, jit, &mut work, s, Source::Tuned, tuned, Some(rule), &bytes_of));
    variants.push(mangrove_variant(gpu, jit, &mut work, s, Source::Default, default, None, &bytes_of));
    Ok(CaseResult::new(case.clone(), bytes, variants))
}

/// Compiles (or fetches) `req`, checks it on `work` and times it if it passes.
#[allow(clippy::too_many_arguments)] // one call site per case kind, each passing its own workload
fn mangrove_variant(
    gpu: &Gpu,
    jit: &Jit,
    work: &mut dyn Workload,
    s: &LabSettings,
    source: Source,
    req: KernelRequest,
    rule: Option<LookupRule>,
    min_bytes: &dyn Fn(&CacheEntry) -> Result<usize, GpuError>,
) -> VariantResult {
    let mut v = VariantResult::new(source, Some(&req.template), 0, Outcome::Unavailable { reason: "not run".into() });
    v.rule = rule.map(|r| format!("{r:?}"));
    let outcome = (|| -> Result<Outcome, LabError> {
        let entry = jit.get(&req)?.entry;
        v.params = tunables_of(jit, &req.template, &entry.inputs.params)?;
        v.min_bytes = min_bytes(&entry)?;
        let deltas = work.check(gpu, &entry, s.gate.rel_floor)?;
        checked_then_timed(deltas, &s.gate, || work.time(gpu, &entry, s.plan))
    })();
    v.outcome = outcome.unwrap_or_else(|e| Outcome::Failed { reason: e.to_string(), deltas: None });
    v
}

/// The cuBLAS variant: unavailable without libcublas, else checked and timed like the others.
fn cublas_variant(
    gpu: &Gpu,
    blas: Option<&Blas>,
    s: &LabSettings,
    note: Option<&str>,
    build: impl FnOnce() -> Result<DenseCase, GpuError>,
) -> VariantResult {
    let mut v = VariantResult::new(Source::Cublas, None, 0, Outcome::Unavailable { reason: "not run".into() });
    v.note = note.map(str::to_owned);
    let Some(blas) = blas else {
        v.outcome = Outcome::Unavailable { reason: "libcublas could not be loaded".into() };
        return v;
    };
    let outcome = (|| -> Result<Outcome, LabError> {
        let mut dense = build()?;
        v.min_bytes = dense.min_bytes;
        let deltas = dense.check(gpu, blas, s.gate.rel_floor)?;
        checked_then_timed(deltas, &s.gate, || dense.time(gpu, blas, s.plan))
    })();
    v.outcome = outcome.unwrap_or_else(|e| Outcome::Failed { reason: e.to_string(), deltas: None });
    v
}

/// A variant that fails the gate is reported with its deltas and not timed.
fn checked_then_timed(
    deltas: Deltas,
    gate: &Gate,
    time: impl FnOnce() -> Result<TimingStats, GpuError>,
) -> Result<Outcome, LabError> {
    if !deltas.passes(gate) {
        return Ok(Outcome::Failed { reason: format!("correctness: {deltas}"), deltas: Some(deltas) });
    }
    Ok(Outcome::Timed { timing: time()?, deltas })
}

type Bf16 = half::bf16;

/// A dense bf16 problem for cuBLAS: stacked weights [count, n, k] (copies rotated beyond L2),
/// activation rows, output rows, one GEMM per group, and the f64 reference (scale 1).
struct DenseCase {
    ring: Vec<DeviceBuffer<Bf16>>,
    x: DeviceBuffer<Bf16>,
    y: DeviceBuffer<Bf16>,
    n: usize,
    k: usize,
    groups: Vec<DenseGroup>,
    reference: Vec<f64>,
    min_bytes: usize,
}

impl DenseCase {
    /// The ternary GEMV with its weights as dense bf16 (-1, 0, 1 are exact): y = x · Wᵀ.
    fn gemv(gpu: &Gpu, p: &TernaryProblem) -> Result<Self, GpuError> {
        let w: Vec<Bf16> = unpack_ternary(&p.packed, p.n, p.k).into_iter().map(|v| Bf16::from_f32(v as f32)).collect();
        let x: Vec<f64> = p.x_bits.iter().map(|&b| Bf16::from_bits(b).to_f64()).collect();
        let reference = ternary_linear(&p.packed, p.n, p.k, &x, p.m, 1.0);
        let rows = [DenseGroup { matrix: 0, row: 0, rows: p.m }];
        let min_bytes = 2 * (p.n * p.k + p.m * p.k + p.m * p.n);
        Self::upload(gpu, &w, &p.x_bits, (p.n, p.k), rows.to_vec(), reference, min_bytes)
    }

    /// MoE gate_up as cuBLAS would run it: for each expert the routing uses, one GEMM of its
    /// routed token rows (gathered on the host, expert by expert) against [Wg; Wu] as one
    /// dense [2I, H] matrix. Output rows are the pre-activations [gate | up] (no epilogue).
    fn gateup(gpu: &Gpu, p: &MoeProblem) -> Result<Self, GpuError> {
        let MoeShape { hidden: h, inter: i, experts, topk, .. } = p.shape;
        let bytes = p.shape.expert_bytes();
        // cuBLAS takes bf16 activations: the problem's int8 rows, dequantized and rounded.
        let x_bits: Vec<u16> =
            p.q.chunks(h).zip(&p.x_scale).flat_map(|(row, &s)| row.iter().map(move |&v| Bf16::from_f32(v as f32 / s).to_bits())).collect();
        let x: Vec<f64> = x_bits.iter().map(|&b| Bf16::from_bits(b).to_f64()).collect();
        let (mut w, mut xg, mut groups, mut reference) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for e in 0..experts {
            let pairs: Vec<usize> = (0..p.topk_ids.len()).filter(|&q| p.topk_ids[q] == e as i32).collect();
            if pairs.is_empty() {
                continue;
            }
            let (wg, wu) = (&p.w_gate[e * bytes..][..bytes], &p.w_up[e * bytes..][..bytes]);
            for packed in [wg, wu] {
                w.extend(unpack_ternary(packed, i, h).into_iter().map(|v| Bf16::from_f32(v as f32)));
            }
            let xe: Vec<f64> = pairs.iter().flat_map(|&q| &x[q / topk * h..][..h]).copied().collect();
            let (g, u) = (ternary_linear(wg, i, h, &xe, pairs.len(), 1.0), ternary_linear(wu, i, h, &xe, pairs.len(), 1.0));
            for r in 0..pairs.len() {
                reference.extend_from_slice(&g[r * i..][..i]);
                reference.extend_from_slice(&u[r * i..][..i]);
            }
            groups.push(DenseGroup { matrix: groups.len(), row: xg.len() / h, rows: pairs.len() });
            xg.extend(pairs.iter().flat_map(|&q| &x_bits[q / topk * h..][..h]).copied());
        }
        let rows = p.shape.pairs();
        let min_bytes = 2 * (groups.len() * 2 * i * h + rows * h + rows * 2 * i);
        Self::upload(gpu, &w, &xg, (2 * i, h), groups, reference, min_bytes)
    }

    fn upload(
        gpu: &Gpu,
        w: &[Bf16],
        x_bits: &[u16],
        (n, k): (usize, usize),
        groups: Vec<DenseGroup>,
        reference: Vec<f64>,
        min_bytes: usize,
    ) -> Result<Self, GpuError> {
        let copies = rotation_count(2 * w.len(), gpu.info().l2_bytes as usize);
        let ring = (0..copies).map(|_| gpu.upload(w)).collect::<Result<_, _>>()?;
        let x: Vec<Bf16> = x_bits.iter().map(|&b| Bf16::from_bits(b)).collect();
        let y = gpu.zeros(reference.len())?;
        Ok(Self { ring, x: gpu.upload(&x)?, y, n, k, groups, reference, min_bytes })
    }

    /// Poisons y, runs once on the first weight copy and compares with the reference.
    fn check(&mut self, gpu: &Gpu, blas: &Blas, rel_floor: f64) -> Result<Deltas, GpuError> {
        gpu.write(&vec![Bf16::from_bits(POISON_BF16); self.y.len()], &mut self.y)?;
        blas.grouped_linear(&self.ring[0], &self.x, &mut self.y, (self.n, self.k), &self.groups)?;
        gpu.sync()?;
        let out: Vec<u16> = gpu.download(&self.y)?.into_iter().map(Bf16::to_bits).collect();
        Ok(Deltas::of_bf16(&out, &self.reference, rel_floor))
    }

    fn time(&mut self, gpu: &Gpu, blas: &Blas, plan: TimingPlan) -> Result<TimingStats, GpuError> {
        let (ring, x, y, shape, groups) = (&self.ring, &self.x, &mut self.y, (self.n, self.k), &self.groups);
        gpu.time_launches(plan, |i| blas.grouped_linear(&ring[i % ring.len()], x, y, shape, groups))
    }
}
