//! Tampered bundles are refused, naming the file, and nothing is written: launch geometry edited
//! (with the manifest digest recomputed, and with every hash recomputed), one kernel's cubin
//! swapped for another's, `..` and absolute paths, a symlink out of the bundle, a FIFO in place of
//! a cubin (no hang), extra files, and unsigned or wrongly signed bundles under a trusted key.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mangrove::arch::Arch;
use mangrove::bless;
use mangrove::bundle::{self, entry_digest, BundleError, Manifest};
use mangrove::cache::Cache;
use mangrove::signing;
use mangrove::template::Catalog;

struct Fixture {
    _root: tempfile::TempDir,
    root: PathBuf,
    bundle: PathBuf,
    key: PathBuf,
    public: PathBuf,
}

/// A signed bundle of two sm_90 kernels exported from a real cache.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let key = root.join("bless.key");
    let public = signing::generate(&key).unwrap();
    let cache_dir = root.join("cache");
    let jit = common::jit_in(&cache_dir);
    for p in [["N=256", "K=256"], ["N=512", "K=256"]] {
        jit.get(&common::gemv(Arch::SM90, &p)).unwrap();
    }
    let bundle = root.join("bundle");
    let sk = signing::load_signing_key(&key).unwrap();
    bless::export(&jit.cache, &cache_dir, &bundle, Some(Arch::SM90), Some(&sk)).unwrap();
    Fixture { _root: tmp, root, bundle, key, public }
}

fn copy_bundle(f: &Fixture, name: &str) -> PathBuf {
    let to = f.root.join(name);
    std::fs::create_dir_all(to.join("kernels")).unwrap();
    for rel in ["manifest.json", "manifest.blake3", "manifest.sig"] {
        std::fs::copy(f.bundle.join(rel), to.join(rel)).unwrap();
    }
    for e in std::fs::read_dir(f.bundle.join("kernels")).unwrap().flatten() {
        std::fs::copy(e.path(), to.join("kernels").join(e.file_name())).unwrap();
    }
    to
}

fn manifest(dir: &Path) -> Manifest {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Writes `m` and a matching digest, as an attacker who knows the format would.
fn rewrite(dir: &Path, m: &Manifest) {
    let text = serde_json::to_string_pretty(m).unwrap() + "\n";
    std::fs::write(dir.join("manifest.json"), &text).unwrap();
    std::fs::write(dir.join("manifest.blake3"), blake3::hash(text.as_bytes()).to_hex().to_string() + "\n").unwrap();
}

fn problems(r: Result<Manifest, BundleError>) -> String {
    match r {
        Ok(_) => panic!("a tampered bundle verified"),
        Err(BundleError::Verify { problems, .. }) => problems.join("\n"),
        Err(e) => panic!("{e}"),
    }
}

fn trusted(f: &Fixture) -> Vec<signing::VerifyingKey> {
    vec![signing::load_verifying_key(&f.public).unwrap()]
}

/// Imports `dir` into a fresh cache; returns the error text and asserts nothing was written.
fn import_refused(f: &Fixture, dir: &Path, keys: &[signing::VerifyingKey]) -> String {
    let cache_dir = f.root.join(format!("import-{}", dir.file_name().unwrap().to_string_lossy()));
    let cache = Cache::open(&cache_dir).unwrap();
    let err = bless::import(&cache, dir, &Catalog::embedded(), keys).expect_err("a tampered bundle was imported");
    assert!(cache.list().unwrap().is_empty(), "a refused import wrote entries");
    mangrove::error_chain(&err)
}

#[test]
fn the_untouched_signed_bundle_verifies_and_imports() {
    let f = fixture();
    bundle::verify_trusted(&f.bundle, &trusted(&f)).unwrap();
    let cache = Cache::open(&f.root.join("import-ok")).unwrap();
    assert_eq!(bless::import(&cache, &f.bundle, &Catalog::embedded(), &trusted(&f)).unwrap(), 2);
    // Through the CLI too, with the key files.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mangrove"))
        .args(["cache", "verify", f.bundle.to_str().unwrap(), "--trusted-key", f.public.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("signed by a trusted key"));
    let _ = &f.key;
}

#[test]
fn edited_launch_geometry_is_refused_with_the_digest_or_every_hash_recomputed() {
    let f = fixture();
    for field in ["grid", "block", "shared", "entry"] {
        // Digest recomputed: the per-entry hash no longer matches.
        let dir = copy_bundle(&f, &format!("launch-{field}"));
        let mut m = manifest(&dir);
        let k = &mut m.kernels[0];
        match field {
            "grid" => k.launch.grid[0] *= 2,
            "block" => k.launch.block[0] /= 2,
            "shared" => k.launch.shared_bytes += 4096,
            _ => k.entry = "evil_entry".into(),
        }
        let file = k.file.clone();
        rewrite(&dir, &m);
        let p = problems(bundle::verify(&dir));
        assert!(p.contains(&file) && p.contains("entry_blake3"), "{field}: {p}");
        // Every hash recomputed: integrity holds, but import re-derives the launch from the
        // template, serving refuses it, and the signature no longer matches.
        m.kernels[0].entry_blake3 = entry_digest(&m.kernels[0]);
        rewrite(&dir, &m);
        bundle::verify(&dir).unwrap();
        let e = import_refused(&f, &dir, &[]);
        assert!(e.contains(&file) && e.contains("differ from the template"), "{field}: {e}");
        let b = bundle::Bundle::open(&dir).unwrap();
        let req = mangrove::jit::KernelRequest { template: m.kernels[0].inputs.template.clone(), params: m.kernels[0].inputs.params.clone(), arch: Arch::SM90 };
        let e = b.entry_for(&Catalog::embedded(), &req).expect_err("a tampered launch was served");
        assert!(e.to_string().contains("failed verification") || format!("{e:?}").contains("differ"), "{e:?}");
        let p = problems(bundle::verify_trusted(&dir, &trusted(&f)));
        assert!(p.contains("manifest.sig") && p.contains("does not verify"), "{field}: {p}");
    }
}

#[test]
fn a_swapped_cubin_is_refused() {
    let f = fixture();
    let dir = copy_bundle(&f, "swap");
    let m = manifest(&dir);
    let (a, b) = (&m.kernels[0], &m.kernels[1]);
    std::fs::copy(dir.join(&b.file), dir.join(&a.file)).unwrap();
    let p = problems(bundle::verify(&dir));
    assert!(p.contains(&a.file) && p.contains("blake3"), "{p}");
    import_refused(&f, &dir, &[]);
    // With the cubin hash and every digest recomputed, only the signature can tell.
    let mut m2 = m.clone();
    m2.kernels[0].cubin_blake3 = m.kernels[1].cubin_blake3.clone();
    m2.kernels[0].entry_blake3 = entry_digest(&m2.kernels[0]);
    rewrite(&dir, &m2);
    let p = problems(bundle::verify_trusted(&dir, &trusted(&f)));
    assert!(p.contains("manifest.sig"), "{p}");
    import_refused(&f, &dir, &trusted(&f));
}

#[test]
fn paths_outside_the_bundle_are_refused_and_nothing_is_read_or_written() {
    let f = fixture();
    let outside = f.root.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("evil.cubin"), b"\x7fELF evil").unwrap();
    for (name, file) in [("dotdot", "../outside/evil.cubin".to_string()), ("absolute", "/etc/passwd".to_string()), ("dotdot-inner", "kernels/../../outside/evil.cubin".to_string())] {
        let dir = copy_bundle(&f, name);
        let mut m = manifest(&dir);
        let bytes = std::fs::read(if file.starts_with('/') { PathBuf::from(&file) } else { dir.join(&file) }).unwrap();
        m.kernels[0].file = file.clone();
        m.kernels[0].cubin_blake3 = blake3::hash(&bytes).to_hex().to_string();
        m.kernels[0].entry_blake3 = entry_digest(&m.kernels[0]);
        rewrite(&dir, &m);
        let p = problems(bundle::verify(&dir));
        assert!(p.contains(&file) && p.contains("refused"), "{name}: {p}");
        let e = import_refused(&f, &dir, &[]);
        assert!(e.contains(&file), "{name}: {e}");
    }
}

#[test]
fn symlinks_fifos_and_extra_files_are_refused() {
    let f = fixture();
    let m = manifest(&f.bundle);
    let file = m.kernels[0].file.clone();
    // A symlink to a copy of the right bytes outside the bundle.
    let dir = copy_bundle(&f, "symlink");
    let outside = f.root.join("outside.cubin");
    std::fs::rename(dir.join(&file), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join(&file)).unwrap();
    let p = problems(bundle::verify(&dir));
    assert!(p.contains(&file) && p.contains("symlink"), "{p}");
    import_refused(&f, &dir, &[]);
    // The kernels folder itself a symlink out of the bundle.
    let dir = copy_bundle(&f, "symlinked-folder");
    let real = f.root.join("real-kernels");
    std::fs::rename(dir.join("kernels"), &real).unwrap();
    std::os::unix::fs::symlink(&real, dir.join("kernels")).unwrap();
    let p = problems(bundle::verify(&dir));
    assert!(p.contains("symlink"), "{p}");
    // A FIFO in place of a cubin: refused at once, no hang.
    let dir = copy_bundle(&f, "fifo");
    std::fs::remove_file(dir.join(&file)).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(dir.join(&file)).status().unwrap().success());
    let t0 = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let d = dir.clone();
    std::thread::spawn(move || tx.send(problems(bundle::verify(&d))).unwrap());
    let p = rx.recv_timeout(Duration::from_secs(10)).expect("verify hung on a FIFO");
    assert!(p.contains(&file) && p.contains("FIFO"), "{p}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    // Extra files anywhere are reported.
    let dir = copy_bundle(&f, "extra");
    std::fs::write(dir.join("kernels/extra.cubin"), b"x").unwrap();
    std::fs::write(dir.join("README"), b"x").unwrap();
    let p = problems(bundle::verify(&dir));
    assert!(p.contains("kernels/extra.cubin: extra file") && p.contains("README: extra file"), "{p}");
}

#[test]
fn unsigned_and_wrongly_signed_bundles_are_refused_under_a_trusted_key() {
    let f = fixture();
    let unsigned = copy_bundle(&f, "unsigned");
    std::fs::remove_file(unsigned.join("manifest.sig")).unwrap();
    bundle::verify(&unsigned).unwrap();
    let p = problems(bundle::verify_trusted(&unsigned, &trusted(&f)));
    assert!(p.contains("manifest.sig") && p.contains("unsigned"), "{p}");
    import_refused(&f, &unsigned, &trusted(&f));
    let other = f.root.join("other.key");
    let other_pub = signing::generate(&other).unwrap();
    let p = problems(bundle::verify_trusted(&f.bundle, &[signing::load_verifying_key(&other_pub).unwrap()]));
    assert!(p.contains("does not verify"), "{p}");
    // The CLI refuses too, naming the file, and import writes nothing.
    let cache = f.root.join("cli-cache");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mangrove"))
        .args(["--cache-dir", cache.to_str().unwrap(), "cache", "import", unsigned.to_str().unwrap(), "--trusted-key", f.public.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("manifest.sig"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!cache.exists(), "a refused import created the cache");
}
