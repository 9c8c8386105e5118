//! `mangrove-tune probe-mgt1`: the M>1 ternary linear gate. For each (M, N, K) it runs the
//! path the engine uses for a batch of M rows (the tuned tensor-core GEMM `ternary_gemm_w2a8`
//! at bucket M, f32 out as the engine renders it), compares it with a reference (the M=1 W2A8
//! GEMV applied row by row, which must agree bit for bit since both sums are exact integers, or
//! the f64 product), times it, and records pass/fail in the tuning DB so the engine plans only
//! buckets that passed.

use mangrove_core::arch::Arch;
use mangrove_core::check::{Deltas, Gate};
use mangrove_core::gpu::{ActMode, DeviceBuffer, Gpu, TernaryGemv, TimingPlan, GEMM_TEMPLATE};
use mangrove_core::jit::{Jit, KernelRequest};
use mangrove_core::step::linear_request;
use mangrove_core::template::Params;
use mangrove_core::tuning_db::{GateRecord, LookupRule, Provenance, TuningDb};
use mangrove_core::validate::TernaryCase;

use super::sweep::TuneError;
use super::workload::rotation_count;

/// What the M>1 path is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ProbeReference {
    /// The M=1 kernel applied to each row on the GPU.
    M1Kernel,
    /// The f64 CPU product.
    Dense,
}

/// One probed case.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeCase {
    pub record: GateRecord,
    /// How the GEMM config was chosen.
    pub rule: LookupRule,
}

/// The engine's request for `template` at (m, n, k): the DB's config, f32 outputs.
fn engine_request(db: &TuningDb, arch: Arch, template: &str, (m, n, k): (i64, i64, i64)) -> (KernelRequest, LookupRule) {
    let (mut req, rule) = linear_request(db, arch, template, m, n, k);
    req.params.insert("OUT_F32".into(), 1);
    (req, rule)
}

/// Probes one (m, n, k). Errors inside the case become a failed record, not an abort.
#[allow(clippy::too_many_arguments)]
pub fn probe_case(
    gpu: &Gpu,
    jit: &Jit,
    db: &TuningDb,
    arch: Arch,
    (m, n, k): (usize, i64, i64),
    reference: ProbeReference,
    gate: &Gate,
    plan: TimingPlan,
    seed: u64,
    provenance: &Provenance,
) -> ProbeCase {
    let mut record = GateRecord {
        template: GEMM_TEMPLATE.into(),
        m: m as i64,
        n,
        k,
        passed: false,
        status: String::new(),
        reference: format!("{reference:?}"),
        deltas: None,
        params: Params::new(),
        avg_us: 0.0,
        p50_us: 0.0,
        p95_us: 0.0,
        provenance: provenance.clone(),
    };
    let mut rule = LookupRule::Default;
    let result = (|| -> Result<(), TuneError> {
        let (req, r) = engine_request(db, arch, GEMM_TEMPLATE, (m as i64, n, k));
        rule = r;
        record.params = req.params.clone();
        let mut op = TernaryGemv::new(gpu, &jit.get(&req)?.entry)?;
        let mut case = TernaryCase::new(gpu, m, n as usize, k as usize, seed)?;
        let run = case.run(gpu, &mut op, gate.rel_floor)?;
        let d = match reference {
            ProbeReference::Dense => run.deltas,
            ProbeReference::M1Kernel => {
                let (one_req, _) = engine_request(db, arch, ActMode::W2A8.template(), (1, n, k));
                let mut one = TernaryGemv::new(gpu, &jit.get(&one_req)?.entry)?;
                let expect = case.rows_one_by_one(gpu, &mut one)?;
                let out: Vec<f32> = run.output.iter().map(|&b| f32::from_bits(b)).collect();
                Deltas::of_f32(&out, &expect, gate.rel_floor)
            }
        };
        record.deltas = Some(d);
        record.passed = d.passes(gate);
        record.status = if record.passed { "pass".into() } else { format!("fail: {d}") };
        let packed = &case.problem.packed;
        let ring: Vec<DeviceBuffer<u8>> =
            (0..rotation_count(packed.len(), gpu.info().l2_bytes as usize)).map(|_| gpu.upload(packed)).collect::<Result<_, _>>()?;
        let mut y = gpu.zeros::<f32>(m * n as usize)?;
        let (q, xs) = case.device_int8();
        let (copies, scale) = (ring.len(), case.problem.scale);
        let stats = gpu.time_launches(plan, |i| op.launch_w2a8_rows(gpu, &ring[i % copies], q, xs, (0, 0), m, &mut y, scale))?;
        record.avg_us = stats.mean_us;
        record.p50_us = stats.median_us;
        record.p95_us = stats.p95_us;
        Ok(())
    })();
    if let Err(e) = result {
        record.passed = false;
        record.status = format!("error: {e}");
    }
    ProbeCase { record, rule }
}
