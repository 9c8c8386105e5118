//! Every template × representative config in the catalog compiles to a cubin, for real, with
//! NVRTC, for sm_80, sm_90 and sm_120 — the check CI runs without a GPU.

mod common;

use mangrove::arch::Arch;
use mangrove::compile::Compiler;
use mangrove::template::{format_params, Catalog};

#[test]
fn every_sample_compiles_for_sm80_sm90_sm120() {
    let compiler = Compiler::open().unwrap_or_else(|e| panic!("{e}"));
    let samples = Catalog::embedded().samples().unwrap();
    assert!(samples.len() >= 4);
    let jobs: Vec<_> = [Arch::SM80, Arch::SM90, Arch::SM120]
        .into_iter()
        .flat_map(|a| samples.iter().map(move |k| (k.clone(), a)))
        .collect();
    let results = compiler.compile_many(&jobs, false);
    for ((k, arch), r) in jobs.iter().zip(results) {
        let what = format!("{} [{}] for {arch}", k.template, format_params(&k.params));
        let c = r.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(&c.cubin[..4], b"\x7fELF", "{what}");
        assert!(c.resources.registers > 0, "{what}: no ptxas report in log: {}", c.log);
        assert!(!c.resources.spills(), "{what}: spills {:?}", c.resources);
    }
}

#[test]
fn unsupported_target_of_this_nvrtc_is_a_clear_error() {
    let compiler = Compiler::open().unwrap();
    let k = Catalog::embedded().get("ternary_gemv").unwrap().render(&Default::default()).unwrap();
    // sm_87 (Orin) is accepted by mangrove's parser; whether this NVRTC can target it decides.
    let arch: Arch = "sm87".parse().unwrap();
    match compiler.compile(&k, arch, &Compiler::options(arch), false) {
        Ok(c) => assert_eq!(&c.cubin[..4], b"\x7fELF"),
        Err(e) => assert!(e.to_string().contains("cannot target sm87"), "{e}"),
    }
}

/// A shipped tuning-DB record whose config no longer fits its template (a tunable renamed or
/// dropped) would fail at serve time; every winner and runner-up must still render.
#[test]
fn every_shipped_tuning_record_renders() {
    let catalog = Catalog::embedded();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning_db");
    for gpu in std::fs::read_dir(&dir).unwrap() {
        let path = gpu.unwrap().path();
        if !path.is_dir() {
            continue;
        }
        let db = mangrove::tuning_db::TuningDb::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for (name, t) in &db.templates {
            if name == mangrove::engine::cpu_simd::sweep::TEMPLATE {
                // `mangrove-tune cpu` records hold the SIMD CPU backend's tunables, not a template's.
                for timed in t.records.iter().flat_map(|r| std::iter::once(&r.winner).chain(&r.runner_ups)) {
                    assert!(mangrove::engine::cpu_simd::sweep::params_valid(&timed.params), "{}: {name} [{}]", path.display(), format_params(&timed.params));
                }
                continue;
            }
            let template = catalog.get(name).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            for r in &t.records {
                for timed in std::iter::once(&r.winner).chain(&r.runner_ups) {
                    let mut params = r.problem.clone();
                    // Records of templates with an M parameter are per M bucket; the decode ops
                    // (one row per launch, any number of rows) take none.
                    if template.schema.params.iter().any(|p| p.name == "M") {
                        params.insert("M".into(), r.m);
                    }
                    params.extend(timed.params.clone());
                    template.render(&params).unwrap_or_else(|e| {
                        panic!("{}: {name} M={} [{}]: {e}", path.display(), r.m, format_params(&timed.params))
                    });
                }
            }
        }
    }
}

/// A template that allows programmatic dependent launch must wait for the previous kernel in
/// its own body (prelude.cuh's GRID_DEP_WAIT); otherwise a PDL launch would race it.
#[test]
fn pdl_templates_wait_for_the_previous_kernel() {
    for k in Catalog::embedded().samples().unwrap() {
        let body = k.body();
        assert!(k.source.starts_with(mangrove::template::PRELUDE) && body.len() < k.source.len(), "{}: prelude missing", k.template);
        if k.launch.pdl {
            assert!(body.contains("GRID_DEP_WAIT();"), "{} has pdl = true but never calls GRID_DEP_WAIT()", k.template);
        }
    }
}

#[test]
fn moe_kernels_compile_at_the_preset_and_gpt_oss_shapes() {
    // The plan's MoE kernels (route, grouped gate_up and down) of Qwen3-30B-A3B (the qwen3-moe
    // preset) and gpt-oss (H = I = 2880, whose template defaults are invalid: the plan takes
    // the first valid config) at small and large buckets, for sm_80 and sm_90.
    use mangrove::model_config::{ModelConfig, MoeConfig, Preset};
    use mangrove::step::Family;
    let qwen = ModelConfig::from_file(&Preset::Qwen3Moe.config()).unwrap();
    let mut gpt_oss = qwen.clone();
    gpt_oss.hidden = 2880;
    gpt_oss.moe = Some(MoeConfig { experts: 128, topk: 4, inter: 2880, norm_topk_prob: true });
    let compiler = Compiler::open().unwrap_or_else(|e| panic!("{e}"));
    let catalog = Catalog::embedded();
    let moe = [Family::MoeRoute, Family::MoeRouteDown, Family::MoeGateUp, Family::MoeDown];
    let mut jobs = Vec::new();
    for (c, arch) in [(&qwen, Arch::SM90), (&gpt_oss, Arch::SM90), (&qwen, Arch::SM80)] {
        let planned = mangrove::plan::plan(&catalog, c, &mangrove::tuning_db::TuningDb::default(), arch, 8);
        for p in planned.iter().filter(|p| moe.contains(&p.family) && [1, 16, 512].contains(&p.m)) {
            assert!(p.unavailable.is_none(), "{}", p.label());
            let k = catalog.get(&p.request.template).unwrap().render(&p.request.params).unwrap();
            jobs.push((k, arch));
        }
    }
    assert_eq!(jobs.len(), 3 * 4 * 3);
    for ((k, arch), r) in jobs.iter().zip(compiler.compile_many(&jobs, false)) {
        let what = format!("{} [{}] for {arch}", k.template, format_params(&k.params));
        let c = r.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(&c.cubin[..4], b"\x7fELF", "{what}");
        assert!(!c.resources.spills(), "{what}: spills {:?}", c.resources);
    }
}
