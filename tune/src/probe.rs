//! `mangrove-tune probe-mgt1`: the M>1 ternary linear gate. For each (M, N, K) it runs the
//! path the engine would use for M tokens (the tuned GEMV, in row chunks of at most 8),
//! compares it with a reference (the f64 dense product, or the M=1 kernel applied row by row),
//! times it, and records pass/fail in the tuning DB so the engine only uses M>1 kernels that passed.

use mangrove_core::arch::Arch;
use mangrove_core::check::{Deltas, Gate, POISON_BF16};
use mangrove_core::gpu::{ActMode, Activations, DeviceBuffer, Gpu, GpuError, TernaryGemv, TimingPlan};
use mangrove_core::jit::Jit;
use mangrove_core::step::{gemv_request, MAX_GEMV_M};
use mangrove_core::template::Params;
use mangrove_core::tuning_db::{GateRecord, LookupRule, Provenance, TuningDb};
use mangrove_core::validate::TernaryProblem;

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
    /// How the GEMV config was chosen for each chunk size.
    pub rule: LookupRule,
}

/// The M-row linear as launches of at most [`MAX_GEMV_M`] rows each.
struct ChunkedLinear {
    chunks: Vec<(TernaryGemv, DeviceBuffer<u16>, DeviceBuffer<u16>)>,
}

impl ChunkedLinear {
    fn new(
        gpu: &Gpu,
        jit: &Jit,
        db: &TuningDb,
        arch: Arch,
        x_bits: &[u16],
        (m, n, k): (usize, i64, i64),
    ) -> Result<(Self, LookupRule, Params), TuneError> {
        let mut chunks = Vec::new();
        let mut rule = LookupRule::Default;
        let mut params = Params::new();
        for start in (0..m).step_by(MAX_GEMV_M) {
            let rows = (m - start).min(MAX_GEMV_M);
            let (req, r) = gemv_request(db, arch, ActMode::Bf16, rows, n, k);
            if start == 0 {
                rule = r;
                params = req.params.clone();
            }
            let entry = jit.get(&req)?.entry;
            let op = TernaryGemv::new(gpu, &entry)?;
            let x = gpu.upload(&x_bits[start * k as usize..(start + rows) * k as usize])?;
            let y = gpu.upload(&vec![POISON_BF16; rows * n as usize])?;
            chunks.push((op, x, y));
        }
        Ok((Self { chunks }, rule, params))
    }

    fn launch(&mut self, gpu: &Gpu, w: &DeviceBuffer<u8>, scale: f32) -> Result<(), GpuError> {
        for (op, x, y) in &mut self.chunks {
            op.launch(gpu, w, Activations::Bf16(x), y, scale)?;
        }
        Ok(())
    }

    fn output(&self, gpu: &Gpu) -> Result<Vec<u16>, GpuError> {
        let mut out = Vec::new();
        for (_, _, y) in &self.chunks {
            out.extend(gpu.download(y)?);
        }
        Ok(out)
    }
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
        let prob = TernaryProblem::random(m, n as usize, k as usize, seed);
        let (mut lin, r, params) = ChunkedLinear::new(gpu, jit, db, arch, &prob.x_bits, (m, n, k))?;
        rule = r;
        record.params = params;
        let ring: Vec<DeviceBuffer<u8>> = (0..rotation_count(prob.packed.len(), gpu.info().l2_bytes as usize))
            .map(|_| gpu.upload(&prob.packed))
            .collect::<Result<_, _>>()?;
        lin.launch(gpu, &ring[0], prob.scale)?;
        gpu.sync()?;
        let out = lin.output(gpu)?;
        let expect: Vec<f64> = match reference {
            ProbeReference::Dense => prob.reference(),
            ProbeReference::M1Kernel => {
                let mut rows = Vec::with_capacity(m * n as usize);
                for r in 0..m {
                    let xr = &prob.x_bits[r * k as usize..(r + 1) * k as usize];
                    let (mut one, _, _) = ChunkedLinear::new(gpu, jit, db, arch, xr, (1, n, k))?;
                    one.launch(gpu, &ring[0], prob.scale)?;
                    rows.extend(one.output(gpu)?.into_iter().map(|b| half::bf16::from_bits(b).to_f64()));
                }
                rows
            }
        };
        let d = Deltas::of_bf16(&out, &expect, gate.rel_floor);
        record.deltas = Some(d);
        record.passed = d.passes(gate);
        record.status = if record.passed { "pass".into() } else { format!("fail: {d}") };
        let copies = ring.len();
        let stats = gpu.time_launches(plan, |i| lin.launch(gpu, &ring[i % copies], prob.scale))?;
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
