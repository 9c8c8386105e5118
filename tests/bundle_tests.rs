//! Blessed bundles on CI (no GPU): bless for sm_90 and sm_120 from the shipped H100 tuning DB,
//! verify, detect any flipped byte naming the file, serve lookups offline without loading
//! NVRTC, name the kernels a bundle lacks, and round-trip through export/import.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use mangrove::arch::Arch;
use mangrove::bundle::{self, Bundle, BundleError};
use mangrove::model_config::ModelConfig;
use mangrove::plan::plan;
use mangrove::template::Catalog;
use mangrove::tuning_db::TuningDb;

fn mangrove(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mangrove")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn shipped_db() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning_db/h100")
}

/// A model folder whose config.json has the bitnet-b1.58-2B shapes (no weights: blessed with
/// `--shapes-only`).
fn model_dir(root: &Path) -> PathBuf {
    let dir = root.join("model");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"hidden_size": 2560, "intermediate_size": 6912, "num_attention_heads": 20, "num_key_value_heads": 5,
            "num_hidden_layers": 30, "vocab_size": 128256, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}"#,
    )
    .unwrap();
    dir
}

fn bless(root: &Path, arch: &str) -> PathBuf {
    let out = root.join(format!("bundle-{arch}"));
    let cache = root.join("cache");
    let (ok, stdout, err) = mangrove(&[
        "--cache-dir", cache.to_str().unwrap(), "cache", "bless", "--tuning-db", shipped_db().to_str().unwrap(),
        "--model", model_dir(root).to_str().unwrap(), "--arch", arch, "--out", out.to_str().unwrap(), "--max-batch", "8", "--shapes-only",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("blessed"), "{stdout}{err}");
    out
}

fn verify_problems(dir: &Path) -> Vec<String> {
    match bundle::verify(dir) {
        Ok(_) => vec![],
        Err(BundleError::Verify { problems, .. }) => problems,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn bless_verify_and_offline_lookup_for_sm90_and_sm120() {
    let root = tempfile::tempdir().unwrap();
    for arch in ["sm90", "sm120"] {
        let dir = bless(root.path(), arch);
        let (ok, out, err) = mangrove(&["cache", "verify", dir.to_str().unwrap()]);
        assert!(ok && out.contains("OK"), "{out}{err}");

        // Offline: every planned kernel is found by key, with no NVRTC in this process.
        let b = Bundle::open(&dir).unwrap();
        let config = ModelConfig::from_model_dir(&root.path().join("model")).unwrap();
        let planned = plan(&Catalog::embedded(), &config, &TuningDb::load(&shipped_db()).unwrap(), arch.parse::<Arch>().unwrap(), 8);
        // One cubin per distinct key (families with identical requests share one).
        let keys: std::collections::BTreeSet<String> = planned.iter().map(|p| b.key_for(&Catalog::embedded(), &p.request).unwrap().to_hex()).collect();
        assert_eq!(b.manifest.kernels.len(), keys.len());
        assert!(keys.len() < planned.len(), "rmsnorm and attn_sub_norm share a kernel when q_dim = hidden");
        assert!(b.missing(&Catalog::embedded(), &planned).unwrap().is_empty());
        for p in &planned {
            let e = b.get(&b.key_for(&Catalog::embedded(), &p.request).unwrap()).unwrap().unwrap();
            assert_eq!(&e.cubin[..4], b"\x7fELF");
        }
        assert!(!mangrove::compile::nvrtc_loaded(), "offline lookups must not load NVRTC");
    }
}

#[test]
fn moe_preset_bundle_holds_the_grouped_kernels_of_every_bucket() {
    // The qwen3-moe preset's shapes (Qwen3-30B-A3B: 128 experts of 768, top-8), blessed for sm90.
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("qwen3-moe");
    std::fs::create_dir_all(&model).unwrap();
    let config = serde_json::to_string(&mangrove::model_config::Preset::Qwen3Moe.config()).unwrap();
    std::fs::write(model.join("config.json"), config).unwrap();
    let out = root.path().join("bundle");
    let cache = root.path().join("cache");
    let (ok, stdout, err) = mangrove(&[
        "--cache-dir", cache.to_str().unwrap(), "cache", "bless", "--tuning-db", shipped_db().to_str().unwrap(),
        "--model", model.to_str().unwrap(), "--arch", "sm90", "--out", out.to_str().unwrap(), "--max-batch", "8", "--shapes-only",
    ]);
    assert!(ok, "{stdout}{err}");
    let b = Bundle::open(&out).unwrap();
    let config = ModelConfig::from_model_dir(&model).unwrap();
    let planned = plan(&Catalog::embedded(), &config, &TuningDb::load(&shipped_db()).unwrap(), Arch::SM90, 8);
    assert!(b.missing(&Catalog::embedded(), &planned).unwrap().is_empty());
    use mangrove::step::{Family, MOE_BUCKETS};
    for family in [Family::MoeRoute, Family::MoeRouteDown, Family::MoeGateUp, Family::MoeDown] {
        let ms: Vec<i64> = planned.iter().filter(|p| p.family == family).map(|p| p.m).collect();
        assert_eq!(ms, MOE_BUCKETS.to_vec(), "{family}");
        for p in planned.iter().filter(|p| p.family == family) {
            assert!(p.unavailable.is_none(), "{}", p.label());
            let e = b.get(&b.key_for(&Catalog::embedded(), &p.request).unwrap()).unwrap().unwrap();
            assert_eq!((e.inputs.template.as_str(), &e.cubin[..4]), (p.request.template.as_str(), &b"\x7fELF"[..]), "{}", p.label());
        }
    }
}

#[test]
fn any_flipped_byte_fails_verify_naming_the_file() {
    let root = tempfile::tempdir().unwrap();
    let dir = bless(root.path(), "sm90");
    let manifest = bundle::verify(&dir).unwrap();
    let flip = |path: &Path| {
        let mut b = std::fs::read(path).unwrap();
        let i = b.len() / 2;
        b[i] ^= 0x01;
        std::fs::write(path, b).unwrap();
    };
    let cubin = manifest.kernels[0].file.clone();
    flip(&dir.join(&cubin));
    let p = verify_problems(&dir);
    assert!(p.len() == 1 && p[0].starts_with(&cubin), "{p:?}");
    flip(&dir.join(&cubin)); // back
    assert!(verify_problems(&dir).is_empty());

    flip(&dir.join("manifest.json"));
    let p = verify_problems(&dir);
    assert!(p.iter().any(|l| l.starts_with("manifest.json")), "{p:?}");
    flip(&dir.join("manifest.json"));

    std::fs::write(dir.join("kernels/stray.cubin"), b"x").unwrap();
    let p = verify_problems(&dir);
    assert!(p.iter().any(|l| l.starts_with("kernels/stray.cubin") && l.contains("extra")), "{p:?}");
    std::fs::remove_file(dir.join("kernels/stray.cubin")).unwrap();

    let gone = manifest.kernels[1].file.clone();
    std::fs::remove_file(dir.join(&gone)).unwrap();
    let p = verify_problems(&dir);
    assert!(p.iter().any(|l| l.starts_with(&gone) && l.contains("missing")), "{p:?}");
    let (ok, _, err) = mangrove(&["cache", "verify", dir.to_str().unwrap()]);
    assert!(!ok && err.contains(&gone), "{err}");
}

#[test]
fn a_bundle_missing_a_kernel_names_it() {
    let root = tempfile::tempdir().unwrap();
    let dir = bless(root.path(), "sm90");
    let (partial, dropped) = common::bundle_without(&dir, root.path(), 0);
    let p = Bundle::open(&partial).unwrap();
    let config = ModelConfig::from_model_dir(&root.path().join("model")).unwrap();
    let planned = plan(&Catalog::embedded(), &config, &TuningDb::load(&shipped_db()).unwrap(), Arch::SM90, 8);
    let missing = p.missing(&Catalog::embedded(), &planned).unwrap();
    // One kernel can serve several plan entries (e.g. two norms of the same width).
    assert!(!missing.is_empty());
    for m in &missing {
        assert_eq!(p.key_for(&Catalog::embedded(), &m.request).unwrap().to_hex(), dropped.key);
    }
}

#[test]
fn export_then_import_round_trips_through_sled() {
    let root = tempfile::tempdir().unwrap();
    let dir = bless(root.path(), "sm90");
    let fresh = root.path().join("fresh-cache");
    let (ok, out, err) = mangrove(&["--cache-dir", fresh.to_str().unwrap(), "cache", "import", dir.to_str().unwrap()]);
    assert!(ok, "{err}");
    let n = Bundle::open(&dir).unwrap().manifest.kernels.len();
    assert!(out.contains(&format!("imported {n} kernels")), "{out}");
    let exported = root.path().join("exported");
    let (ok, _, err) = mangrove(&["--cache-dir", fresh.to_str().unwrap(), "cache", "export", "--out", exported.to_str().unwrap()]);
    assert!(ok, "{err}");
    let a: Vec<String> = Bundle::open(&dir).unwrap().manifest.kernels.iter().map(|k| k.cubin_blake3.clone()).collect();
    let b: Vec<String> = Bundle::open(&exported).unwrap().manifest.kernels.iter().map(|k| k.cubin_blake3.clone()).collect();
    assert_eq!(a, b);
}

#[test]
fn bless_bad_input_is_clear() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("b");
    let (ok, _, err) = mangrove(&[
        "cache", "bless", "--tuning-db", "/nonexistent", "--model", root.path().to_str().unwrap(), "--out", out.to_str().unwrap(), "--shapes-only",
    ]);
    assert!(!ok && err.contains("tuning DB folder /nonexistent does not exist"), "{err}");
    let (ok, _, err) = mangrove(&[
        "cache", "bless", "--tuning-db", shipped_db().to_str().unwrap(), "--model", root.path().to_str().unwrap(), "--out", out.to_str().unwrap(), "--shapes-only",
    ]);
    assert!(!ok && err.contains("config.json"), "{err}");
    assert!(!out.exists(), "nothing half-written");
}

/// Without --shapes-only, bless reads the checkpoint as serve does and refuses what serve would
/// refuse (no weights, truncated weights, no tokenizer), naming the problem, writing nothing.
#[test]
fn bless_refuses_a_checkpoint_serve_would_refuse() {
    let root = tempfile::tempdir().unwrap();
    let good = root.path().join("tiny");
    let (ok, _, err) = mangrove(&["gen-model", "--preset", "tiny", "--out", good.to_str().unwrap(), "--seed", "3"]);
    assert!(ok, "{err}");
    let copy = |name: &str| {
        let dir = root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in std::fs::read_dir(&good).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
        }
        dir
    };
    let config_only = model_dir(root.path());
    let truncated = copy("truncated");
    let st = truncated.join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&st).unwrap().set_len(len / 2).unwrap();
    let no_tokenizer = copy("no-tokenizer");
    std::fs::remove_file(no_tokenizer.join("tokenizer.json")).unwrap();
    let db = shipped_db();
    let cache = root.path().join("cache");
    let bless_of = |model: &Path, out: &Path| {
        mangrove(&[
            "--cache-dir", cache.to_str().unwrap(), "cache", "bless", "--tuning-db", db.to_str().unwrap(), "--model", model.to_str().unwrap(),
            "--arch", "sm90", "--out", out.to_str().unwrap(), "--max-batch", "2",
        ])
    };
    for (model, what) in [(&config_only, "safetensors"), (&truncated, "model.safetensors"), (&no_tokenizer, "tokenizer")] {
        let out = root.path().join(format!("bundle-{}", model.file_name().unwrap().to_string_lossy()));
        let (ok, _, err) = bless_of(model, &out);
        assert!(!ok, "{} was blessed", model.display());
        assert!(err.contains("would not serve") && err.contains(what), "{}: {err}", model.display());
        assert!(!out.exists(), "{}: nothing half-written", model.display());
    }
    let out = root.path().join("bundle-good");
    let (ok, _, err) = bless_of(&good, &out);
    assert!(ok && out.join("manifest.json").exists(), "{err}");
}

#[test]
fn offline_provisioning_takes_everything_from_the_bundle_or_refuses_naming_kernels() {
    use mangrove::provision::{provision, FallbackReason, KernelSource, ProvisionError};
    let root = tempfile::tempdir().unwrap();
    let dir = bless(root.path(), "sm90");
    let config = ModelConfig::from_model_dir(&root.path().join("model")).unwrap();
    let planned = plan(&Catalog::embedded(), &config, &TuningDb::load(&shipped_db()).unwrap(), Arch::SM90, 8);
    let no_local = || -> Result<mangrove::jit::Jit, ProvisionError> { panic!("offline must not open a local JIT") };
    let source = KernelSource::Blessed { bundle: Bundle::open(&dir).unwrap(), catalog: Catalog::embedded(), offline: true };
    let got = provision(&planned, &source, &no_local).unwrap();
    assert_eq!(got.obtained.get("Bundle"), Some(&planned.len()));
    assert_eq!(got.entries.len(), planned.len());
    assert!(got.fallbacks.iter().all(|f| f.reason == FallbackReason::NoTunedKernel));
    assert!(!mangrove::compile::nvrtc_loaded(), "offline provisioning must not load NVRTC");

    // The same bundle without one kernel: refused at start, the kernel named.
    let (partial, dropped) = common::bundle_without(&dir, root.path(), 0);
    let label = format!("{} M={}", dropped.family.unwrap(), dropped.m.unwrap());
    let source = KernelSource::Blessed { bundle: Bundle::open(&partial).unwrap(), catalog: Catalog::embedded(), offline: true };
    let err = provision(&planned, &source, &no_local).unwrap_err();
    assert!(matches!(err, ProvisionError::MissingFromBundle(ref l) if !l.is_empty()), "{err}");
    assert!(err.to_string().contains(&label), "{err} should name {label}");
}
