//! The performance lab (`mangrove bench kernels`). Takes a GPU, the JIT and a tuning DB and
//! gives a [`Report`]: for each decode problem ([`Case`]), the device's copy-bandwidth limit and
//! every variant ([`Source`]: cuBLAS bf16, mangrove's tuned config from the DB, the template
//! default) checked once against the CPU reference, then timed with weights rotated beyond L2.
//! Rows carry µs, achieved GB/s, the fraction of copy bandwidth, the speedup over cuBLAS and
//! tuned over default; the report renders as a table, JSON (with provenance) and an SVG plot.
//! [`command`] is the CLI entry, [`measure`] does the GPU work, [`plot`] the SVG; everything
//! here is pure.

pub mod command;
pub mod measure;
pub mod plot;

use mangrove_core::check::{Deltas, Gate};
use mangrove_core::gpu::{DeviceInfo, GpuError, TimingPlan, TimingStats};
use mangrove_core::jit::JitError;
use mangrove_core::template::{format_params, Params, TemplateError};
use crate::gemv::BITNET_2B_SHAPES;
use mangrove_core::tuning_db::Provenance;

/// Bump when the report's JSON changes meaning (`benches/triton_peer.py` reads it).
pub const LAB_SCHEMA_VERSION: u32 = 1;

/// The correctness gate of every variant: the deployment gate (cuBLAS runs at scale 1, so
/// absolute errors are not comparable across variants).
pub const LAB_GATE: Gate = mangrove_core::check::DEPLOY_GATE;

/// Names of [`BITNET_2B_SHAPES`], in its order.
pub const BITNET_2B_NAMES: [&str; 4] = ["qkv", "o", "gate_up", "down"];

/// The HBM-limit cases (M = 1 only): linears of public ternary checkpoints with at least
/// 16 MB of packed weights per call, where launch latency no longer hides the bandwidth.
/// (name, N, K): Llama3-8B-1.58 gate|up (29.4 MB), Falcon3-10B-1.58 gate|up (35.4 MB) and down
/// (17.7 MB).
pub const LARGE_SHAPES: &[(&str, usize, usize)] =
    &[("l3-8b.gate_up", 28672, 4096), ("f3-10b.gate_up", 46080, 3072), ("f3-10b.down", 3072, 23040)];

/// Token counts of the linear cases: one decode sequence, a full dp4a GEMV (M = 8, also on the
/// tensor-core GEMM), and decode batches on the GEMM.
pub const GEMV_MS: &[usize] = &[1, 8, 16, 32, 64];

/// Token counts of the MoE gate_up cases.
pub const GATEUP_MS: &[usize] = &[1, 16, 128];

/// Errors of the lab, naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Jit(#[from] JitError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("the GPU is {device} but --arch is {asked}: kernels for {asked} cannot run here")]
    ArchMismatch { device: String, asked: String },
    #[error("no GPU ({0}): `mangrove bench kernels` needs an NVIDIA GPU")]
    NoGpu(String),
    #[error("bad lab input: {0}")]
    Input(String),
    #[error("variants failed their correctness check (reported, not timed):\n{0}")]
    Failed(String),
    #[error("writing {path}")]
    Write { path: String, source: std::io::Error },
    #[error("plotting {path}: {reason}")]
    Plot { path: String, reason: String },
}

/// What a case computes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    /// y [m, n] = x [m, k] · Wᵀ for ternary W (packed [n/4, k]).
    Gemv { name: String, n: usize, k: usize },
    /// MoE gate_up: act [m·topk, inter] = silu(gate)·up of every routed (token, expert) pair.
    Gateup { experts: usize, topk: usize, hidden: usize, inter: usize },
}

/// One problem at one token count.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Case {
    pub problem: Problem,
    pub m: usize,
}

impl Case {
    /// Short, unique label, e.g. `qkv 3840x2560 M=1` or `moe_gateup E64 top8 2048x1408 M=16`.
    pub fn label(&self) -> String {
        match &self.problem {
            Problem::Gemv { name, n, k } => format!("{name} {n}x{k} M={}", self.m),
            Problem::Gateup { experts, topk, hidden, inter } => {
                format!("moe_gateup E{experts} top{topk} {hidden}x{inter} M={}", self.m)
            }
        }
    }

    /// Axis label for the plot (the shape is in the title).
    pub fn short_label(&self) -> String {
        match &self.problem {
            Problem::Gemv { name, .. } => format!("{name} M{}", self.m),
            Problem::Gateup { .. } => format!("moe M{}", self.m),
        }
    }
}

/// The default cases: the bitnet-2B decode GEMVs at M ∈ [`GEMV_MS`], the [`LARGE_SHAPES`] at
/// M = 1 and the default MoE gate_up problem at M ∈ [`GATEUP_MS`].
pub fn default_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (name, &(n, k)) in BITNET_2B_NAMES.iter().zip(BITNET_2B_SHAPES) {
        for &m in GEMV_MS {
            cases.push(Case { problem: Problem::Gemv { name: (*name).into(), n: n as usize, k: k as usize }, m });
        }
    }
    for &(name, n, k) in LARGE_SHAPES {
        cases.push(Case { problem: Problem::Gemv { name: name.into(), n, k }, m: 1 });
    }
    let (e, topk, h, i) = crate::gateup::DEFAULT_MOE;
    for &m in GATEUP_MS {
        let problem = Problem::Gateup { experts: e as usize, topk: topk as usize, hidden: h as usize, inter: i as usize };
        cases.push(Case { problem, m });
    }
    cases
}

/// Where a variant's kernel comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// cuBLAS bf16 GEMM on the same problem with dense bf16 weights.
    Cublas,
    /// mangrove's config from the tuning DB (nearest M bucket).
    Tuned,
    /// The template's default config.
    Default,
}

/// What happened to a variant.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Passed the correctness check, then timed.
    Timed { timing: TimingStats, deltas: Deltas },
    /// Failed the correctness check (or errored): not timed.
    Failed { reason: String, deltas: Option<Deltas> },
    /// Could not run here (e.g. no libcublas), with why.
    Unavailable { reason: String },
}

impl Outcome {
    /// Median µs per launch, when timed.
    pub fn median_us(&self) -> Option<f64> {
        match self {
            Outcome::Timed { timing, .. } if timing.median_us > 0.0 => Some(timing.median_us),
            _ => None,
        }
    }
}

/// Figures derived from the timings of a case (filled by [`CaseResult::derive`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Derived {
    pub median_us: Option<f64>,
    /// `min_bytes` over the median time.
    pub gb_s: Option<f64>,
    /// `gb_s` over the device's copy bandwidth.
    pub frac_copy_bw: Option<f64>,
    /// cuBLAS µs over this variant's µs (above 1: faster than cuBLAS).
    pub speedup_vs_cublas: Option<f64>,
    /// For a tuned variant: the same template's default µs over the tuned µs.
    pub tuned_vs_default: Option<f64>,
}

/// One variant of one case.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VariantResult {
    /// Display name, e.g. `cublas bf16`, `tuned ternary_gemv_w2a8`.
    pub variant: String,
    pub source: Source,
    /// The mangrove template (none for cuBLAS).
    pub template: Option<String>,
    /// The config's tunable parameters (empty for cuBLAS).
    pub params: Params,
    /// How the tuning DB chose the config (`Exact`, `NearestBucket { .. }`, `Default`).
    pub rule: Option<String>,
    /// Fewest bytes one launch of this variant must move (its own weight format).
    pub min_bytes: usize,
    /// What it computes, where it differs from mangrove's kernel (e.g. cuBLAS without the epilogue).
    pub note: Option<String>,
    pub outcome: Outcome,
    pub derived: Derived,
}

impl VariantResult {
    /// A variant with nothing derived yet.
    pub fn new(source: Source, template: Option<&str>, min_bytes: usize, outcome: Outcome) -> Self {
        Self {
            variant: variant_name(source, template),
            source,
            template: template.map(str::to_owned),
            params: Params::new(),
            rule: None,
            min_bytes,
            note: None,
            outcome,
            derived: Derived::default(),
        }
    }
}

/// `cublas bf16`, `tuned <template>` or `default <template>`.
pub fn variant_name(source: Source, template: Option<&str>) -> String {
    let t = template.unwrap_or("?");
    match source {
        Source::Cublas => "cublas bf16".into(),
        Source::Tuned => format!("tuned {t}"),
        Source::Default => format!("default {t}"),
    }
}

/// Every variant of one case.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CaseResult {
    pub label: String,
    #[serde(flatten)]
    pub case: Case,
    /// Fewest bytes mangrove's ternary kernel must move (packed weights read once, bf16
    /// activations in and out; for MoE only the experts the routing uses).
    pub ternary_min_bytes: usize,
    /// `ternary_min_bytes` at the device's copy bandwidth: the physical floor in µs.
    pub copy_limit_us: f64,
    pub variants: Vec<VariantResult>,
}

impl CaseResult {
    pub fn new(case: Case, ternary_min_bytes: usize, variants: Vec<VariantResult>) -> Self {
        Self { label: case.label(), case, ternary_min_bytes, copy_limit_us: 0.0, variants }
    }

    /// Fills the copy limit and every variant's [`Derived`] from the timings and `copy_bw_gbs`
    /// (bytes read + written per second, as [`mangrove_core::gpu::Gpu::copy_bandwidth_gbs`] measures).
    pub fn derive(&mut self, copy_bw_gbs: f64) {
        let bw = (copy_bw_gbs > 0.0).then_some(copy_bw_gbs);
        // bytes / (GB/s · 1e9) s = bytes / GB/s / 1e3 µs.
        self.copy_limit_us = bw.map_or(0.0, |bw| self.ternary_min_bytes as f64 / bw / 1e3);
        let us_of = |source: Source, template: Option<&str>| {
            self.variants
                .iter()
                .find(|v| v.source == source && (source == Source::Cublas || v.template.as_deref() == template))
                .and_then(|v| v.outcome.median_us())
        };
        let cublas = us_of(Source::Cublas, None);
        let defaults: Vec<Option<f64>> =
            self.variants.iter().map(|v| us_of(Source::Default, v.template.as_deref())).collect();
        for (v, default_us) in self.variants.iter_mut().zip(defaults) {
            let us = v.outcome.median_us();
            let gb_s = us.map(|us| v.min_bytes as f64 / us / 1e3);
            v.derived = Derived {
                median_us: us,
                gb_s,
                frac_copy_bw: gb_s.zip(bw).map(|(g, bw)| g / bw),
                speedup_vs_cublas: match v.source {
                    Source::Cublas => None,
                    _ => cublas.zip(us).map(|(c, us)| c / us),
                },
                tuned_vs_default: match v.source {
                    Source::Tuned => default_us.zip(us).map(|(d, us)| d / us),
                    _ => None,
                },
            };
        }
    }
}

/// cuBLAS as found on this machine.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum BlasStatus {
    Loaded { version: i32 },
    Unavailable { reason: String },
}

/// The whole lab run: what was measured, where and how.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub schema_version: u32,
    /// GPU, driver, NVRTC, git sha, date and command line.
    pub provenance: Provenance,
    pub device: DeviceInfo,
    pub cublas: BlasStatus,
    pub tuning_db: String,
    pub arch: String,
    /// Device-to-device copy bandwidth (read + write), GB/s.
    pub copy_bw_gbs: f64,
    pub gate: Gate,
    pub plan: TimingPlan,
    pub cases: Vec<CaseResult>,
}

impl Report {
    /// Variants that failed their correctness check or errored, as `case: variant: reason`.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for c in &self.cases {
            for v in &c.variants {
                if let Outcome::Failed { reason, .. } = &v.outcome {
                    out.push(format!("{}: {}: {reason}", c.label, v.variant));
                }
            }
        }
        out
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let p = &self.provenance;
        s += &format!(
            "{} ({} SMs, {}) · driver {} · NVRTC {}.{} · mangrove {} ({}) · {}\n",
            self.device.name, self.device.sm_count, self.arch, p.driver_version, p.nvrtc_version.0, p.nvrtc_version.1,
            p.mangrove_version, p.git_sha, p.date
        );
        let blas = match &self.cublas {
            BlasStatus::Loaded { version } => format!("cuBLAS {version}"),
            BlasStatus::Unavailable { reason } => format!("cuBLAS unavailable ({reason})"),
        };
        s += &format!(
            "copy bandwidth {:.0} GB/s · {blas} · tuning DB {} · {} batches of {} launches (median)\n\n",
            self.copy_bw_gbs, self.tuning_db, self.plan.samples, self.plan.batch
        );
        s += &format!(
            "{:<38} {:<26} {:>9} {:>8} {:>6} {:>9} {:>9}  {}\n",
            "case", "variant", "µs", "GB/s", "%copy", "vs cuBLAS", "tuned/def", "config"
        );
        let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or_else(|| "-".to_string(), f);
        for c in &self.cases {
            s += &format!("{:<38} {:<26} {:>9.2}\n", c.label, "copy-BW limit", c.copy_limit_us);
            for v in &c.variants {
                let d = &v.derived;
                let config = match (&v.outcome, v.params.is_empty()) {
                    (Outcome::Timed { .. }, true) => v.note.clone().unwrap_or_default(),
                    (Outcome::Timed { .. }, false) => {
                        format!("{} [{}]", format_params(&v.params), v.rule.as_deref().unwrap_or(""))
                    }
                    (Outcome::Failed { reason, .. }, _) => format!("FAILED: {reason}"),
                    (Outcome::Unavailable { reason }, _) => format!("unavailable: {reason}"),
                };
                s += &format!(
                    "{:<38} {:<26} {:>9} {:>8} {:>6} {:>9} {:>9}  {}\n",
                    "",
                    v.variant,
                    opt(d.median_us, &|u| format!("{u:.2}")),
                    opt(d.gb_s, &|g| format!("{g:.0}")),
                    opt(d.frac_copy_bw, &|f| format!("{:.0}%", f * 100.0)),
                    opt(d.speedup_vs_cublas, &|x| format!("{x:.2}×")),
                    opt(d.tuned_vs_default, &|x| format!("{x:.2}×")),
                    config
                );
            }
        }
        s
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn timed(us: f64) -> Outcome {
        Outcome::Timed {
            timing: TimingStats { median_us: us, p95_us: us, mean_us: us, min_us: us, samples: 3, batch: 2, graphed: true },
            deltas: Deltas::default(),
        }
    }

    pub(crate) fn gemv_case(m: usize) -> CaseResult {
        let case = Case { problem: Problem::Gemv { name: "o".into(), n: 2560, k: 2560 }, m };
        let v = |s, t: Option<&str>, bytes, o| VariantResult::new(s, t, bytes, o);
        CaseResult::new(
            case,
            1_000_000,
            vec![
                v(Source::Cublas, None, 8_000_000, timed(10.0)),
                v(Source::Tuned, Some("ternary_gemv"), 1_000_000, timed(2.0)),
                v(Source::Default, Some("ternary_gemv"), 1_000_000, timed(3.0)),
                v(Source::Tuned, Some("ternary_gemv_w2a8"), 900_000, timed(1.5)),
                v(Source::Default, Some("ternary_gemv_w2a8"), 900_000, Outcome::Failed { reason: "max_rel".into(), deltas: None }),
            ],
        )
    }

    #[test]
    fn default_cases_cover_the_brief() {
        let cases = default_cases();
        assert_eq!(BITNET_2B_NAMES.len(), BITNET_2B_SHAPES.len());
        assert_eq!(cases.len(), BITNET_2B_SHAPES.len() * GEMV_MS.len() + LARGE_SHAPES.len() + GATEUP_MS.len());
        assert!(LARGE_SHAPES.iter().all(|&(_, n, k)| n / 4 * k >= 16 << 20), "the HBM-limit cases move at least 16 MB");
        let labels: std::collections::BTreeSet<String> = cases.iter().map(Case::label).collect();
        assert_eq!(labels.len(), cases.len(), "labels are unique");
        assert!(labels.contains("gate_up 13824x2560 M=1"), "{labels:?}");
        assert!(labels.contains("moe_gateup E64 top8 2048x1408 M=128"), "{labels:?}");
    }

    #[test]
    fn row_math() {
        let mut c = gemv_case(1);
        c.derive(2000.0);
        assert!((c.copy_limit_us - 0.5).abs() < 1e-12, "1 MB at 2000 GB/s is 0.5 µs: {}", c.copy_limit_us);
        let d = |i: usize| c.variants[i].derived;
        // cuBLAS: 8 MB in 10 µs = 800 GB/s = 40% of 2000.
        assert!((d(0).gb_s.unwrap() - 800.0).abs() < 1e-9);
        assert!((d(0).frac_copy_bw.unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(d(0).speedup_vs_cublas, None, "cuBLAS is not compared with itself");
        // tuned bf16: 1 MB in 2 µs = 500 GB/s; 5× cuBLAS; 1.5× its default.
        assert!((d(1).gb_s.unwrap() - 500.0).abs() < 1e-9);
        assert!((d(1).speedup_vs_cublas.unwrap() - 5.0).abs() < 1e-12);
        assert!((d(1).tuned_vs_default.unwrap() - 1.5).abs() < 1e-12);
        assert_eq!(d(2).tuned_vs_default, None, "only tuned rows compare with default");
        // tuned W2A8: its default failed, so no tuned/default figure; still 10/1.5 vs cuBLAS.
        assert_eq!(d(3).tuned_vs_default, None);
        assert!((d(3).speedup_vs_cublas.unwrap() - 10.0 / 1.5).abs() < 1e-12);
        assert_eq!(d(4), Derived::default(), "a failed variant has no figures");
        // No copy bandwidth: no fraction, no limit; no cuBLAS: no speedup.
        let mut c = gemv_case(1);
        c.variants[0].outcome = Outcome::Unavailable { reason: "no libcublas".into() };
        c.derive(0.0);
        assert_eq!(c.copy_limit_us, 0.0);
        assert!(c.variants.iter().all(|v| v.derived.frac_copy_bw.is_none() && v.derived.speedup_vs_cublas.is_none()));
        assert!(c.variants[1].derived.tuned_vs_default.is_some());
    }

    pub(crate) fn report(cases: Vec<CaseResult>) -> Report {
        let device = DeviceInfo {
            name: "Test GPU".into(),
            arch: "sm90".parse().unwrap(),
            sm_count: 132,
            driver_version: 13000,
            total_mem_bytes: 80 << 30,
            l2_bytes: 50 << 20,
            max_shared_per_block_optin: 232448,
            sm_clock_mhz: 1980,
            mem_clock_mhz: 2619,
        };
        let mut r = Report {
            schema_version: LAB_SCHEMA_VERSION,
            provenance: Provenance { gpu_name: "Test GPU".into(), nvrtc_version: (13, 0), ..Default::default() },
            device,
            cublas: BlasStatus::Loaded { version: 130100 },
            tuning_db: "tuning_db/h100".into(),
            arch: "sm90".into(),
            copy_bw_gbs: 2000.0,
            gate: LAB_GATE,
            plan: TimingPlan::default(),
            cases,
        };
        for c in &mut r.cases {
            c.derive(r.copy_bw_gbs);
        }
        r
    }

    #[test]
    fn json_shape_round_trips() {
        let r = report(vec![gemv_case(1), gemv_case(8)]);
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["schema_version"], LAB_SCHEMA_VERSION);
        assert_eq!(v["device"]["sm_count"], 132);
        assert_eq!(v["provenance"]["nvrtc_version"], serde_json::json!([13, 0]));
        assert_eq!(v["cublas"]["status"], "loaded");
        let c = &v["cases"][1];
        // What benches/triton_peer.py reads.
        assert_eq!((c["problem"]["kind"].as_str(), c["problem"]["n"].as_u64(), c["m"].as_u64()), (Some("gemv"), Some(2560), Some(8)));
        assert_eq!(c["label"], "o 2560x2560 M=8");
        assert!(c["copy_limit_us"].as_f64().unwrap() > 0.0);
        let tuned = &c["variants"][1];
        assert_eq!((tuned["source"].as_str(), tuned["template"].as_str()), (Some("tuned"), Some("ternary_gemv")));
        assert_eq!(tuned["outcome"]["status"], "timed");
        assert_eq!(tuned["derived"]["median_us"], 2.0);
        assert_eq!(c["variants"][4]["outcome"]["status"], "failed");
        let back: Report = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn table_lists_every_variant_and_failure() {
        let r = report(vec![gemv_case(1)]);
        let t = r.table();
        for v in ["cublas bf16", "tuned ternary_gemv ", "default ternary_gemv_w2a8", "copy-BW limit", "FAILED: max_rel", "5.00×", "1.50×", "2000 GB/s"] {
            assert!(t.contains(v), "missing {v:?} in\n{t}");
        }
        assert_eq!(r.failures(), vec!["o 2560x2560 M=1: default ternary_gemv_w2a8: max_rel".to_string()]);
    }
}
