//! The cache through real NVRTC and real sled: round trip across reopen, corruption
//! detection, bad input writing nothing, the NVRTC log on compile errors, the process lock.

mod common;

use mangrove::arch::Arch;
use mangrove::cache::{Cache, CacheError, Lookup, MissReason};
use mangrove::compile::CompileError;
use mangrove::jit::{JitError, Outcome};
use mangrove::template::{Catalog, TemplateError};

#[test]
fn round_trip_through_reopened_sled() {
    let dir = tempfile::tempdir().unwrap();
    let req = common::gemv(Arch::SM90, &["M=2", "N=512", "K=256"]);
    let (key, cubin) = {
        let jit = common::jit_in(dir.path());
        let f = jit.get(&req).unwrap();
        assert_eq!(f.outcome, Outcome::Compiled(MissReason::Absent));
        assert_eq!(&f.entry.cubin[..4], b"\x7fELF");
        assert!(f.entry.resources.registers > 0, "ptxas report parsed: {:?}", f.entry.resources);
        (f.key, f.entry.cubin)
    }; // sled closed here
    let jit = common::jit_in(dir.path());
    let f = jit.get(&req).unwrap();
    assert_eq!(f.outcome, Outcome::Hit);
    assert_eq!(f.key, key);
    assert_eq!(f.entry.cubin, cubin);
    let c = jit.cache.counters().unwrap();
    assert_eq!((c.hits, c.inserts), (1, 1));
}

#[test]
fn corrupted_blob_is_detected_evicted_and_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let jit = common::jit_in(dir.path());
    let req = common::gemv(Arch::SM90, &["N=256", "K=512"]);
    let key = jit.get(&req).unwrap().key;
    let store = jit.cache.storage();
    let mut raw = store.get_raw(&key).unwrap().unwrap();
    let mid = raw.len() / 2; // inside the cubin, by far the largest field
    raw[mid] ^= 0x5a;
    store.put_raw(&key, &raw).unwrap();
    let f = jit.get(&req).unwrap();
    assert!(matches!(f.outcome, Outcome::Compiled(MissReason::Corrupt(ref d)) if d.contains("blake3")), "{:?}", f.outcome);
    assert_eq!(jit.get(&req).unwrap().outcome, Outcome::Hit);
    // A truncated value is undecodable: also a counted eviction, never a load.
    let raw = store.get_raw(&key).unwrap().unwrap();
    store.put_raw(&key, &raw[..raw.len() / 3]).unwrap();
    assert!(matches!(jit.cache.get(&key).unwrap(), Lookup::Miss(MissReason::Corrupt(_))));
    assert_eq!(jit.cache.counters().unwrap().corrupt_evicted, 2);
    assert!(store.get_raw(&key).unwrap().is_none(), "corrupt entry was evicted");
}

#[test]
fn verify_and_gc() {
    let dir = tempfile::tempdir().unwrap();
    let jit = common::jit_in(dir.path());
    let a = jit.get(&common::gemv(Arch::SM90, &["N=256", "K=256"])).unwrap().key;
    let b = jit.get(&common::gemv(Arch::SM80, &["N=256", "K=256"])).unwrap().key;
    let mut raw = jit.cache.storage().get_raw(&b).unwrap().unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 1;
    jit.cache.storage().put_raw(&b, &raw).unwrap();
    let r = jit.cache.verify().unwrap();
    assert_eq!((r.checked, r.intact, r.evicted.len()), (2, 1, 1));
    assert_eq!(r.evicted[0].0, b.to_hex());
    let size = jit.cache.list().unwrap()[0].bytes;
    assert_eq!(jit.cache.gc(size).unwrap().removed, 0);
    let g = jit.cache.gc(size - 1).unwrap();
    assert_eq!((g.removed, g.after_bytes), (1, 0));
    assert!(matches!(jit.cache.get(&a).unwrap(), Lookup::Miss(MissReason::Absent)));
}

#[test]
fn bad_input_is_named_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let jit = common::jit_in(dir.path());
    let bad = [
        (common::gemv(Arch::SM90, &["TILE=4"]), "TILE"),
        (common::gemv(Arch::SM90, &["THREADS=100"]), "THREADS=100"),
        (common::gemv(Arch::SM90, &["K=1000", "VEC=16"]), "K % VEC == 0"),
        (common::gemv(Arch::SM90, &["K=16", "VEC=16", "SPLIT_K=2"]), "at least one chunk"),
    ];
    for (req, needle) in bad {
        let err = jit.get(&req).unwrap_err();
        assert!(matches!(err, JitError::Template(_)), "{err}");
        assert!(err.to_string().contains(needle), "{err} should name {needle}");
    }
    let mut unknown = common::gemv(Arch::SM90, &[]);
    unknown.template = "gemm_fp9".into();
    assert!(matches!(jit.get(&unknown).unwrap_err(), JitError::Template(TemplateError::UnknownTemplate { .. })));
    assert!(jit.cache.list().unwrap().is_empty());
    assert_eq!(jit.cache.counters().unwrap().inserts, 0);
}

#[test]
fn compile_error_surfaces_nvrtc_log_and_source() {
    let tdir = tempfile::tempdir().unwrap();
    std::fs::write(
        tdir.path().join("broken.toml"),
        "name = \"broken\"\nentry = \"broken\"\ndescription = \"d\"\n[[params]]\nname = \"X\"\nrole = \"tunable\"\nvalues = [1]\ndefault = 1\n\
         [launch]\ngrid = [\"1\", \"1\", \"1\"]\nblock = [\"32\", \"1\", \"1\"]\nshared_bytes = \"0\"\n",
    )
    .unwrap();
    std::fs::write(
        tdir.path().join("broken.cu.tera"),
        "extern \"C\" __global__ void broken(float* y) {\n  y[0] = {{ X }};\n  y[1] = undefined_symbol;\n}\n",
    )
    .unwrap();
    let cdir = tempfile::tempdir().unwrap();
    let jit = common::jit_with(Catalog::from_dir(tdir.path()).unwrap(), cdir.path());
    let req = mangrove::jit::KernelRequest { template: "broken".into(), params: Default::default(), arch: Arch::SM90 };
    let err = jit.get(&req).unwrap_err();
    let JitError::Compile(CompileError::Failed { log, excerpt, options, .. }) = &err else { panic!("{err}") };
    assert!(log.contains("undefined_symbol"), "{log}");
    assert!(excerpt.contains(">>     3 |   y[1] = undefined_symbol;"), "{excerpt}");
    assert!(options.iter().any(|o| o.contains("sm_90")));
    assert!(err.to_string().contains("undefined_symbol"));
    assert!(jit.cache.list().unwrap().is_empty());
}

#[test]
fn second_process_gets_a_clear_lock_error() {
    let dir = tempfile::tempdir().unwrap();
    let _held = Cache::open(dir.path()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mangrove"))
        .args(["--cache-dir", dir.path().to_str().unwrap(), "cache", "stats"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("in use by pid {}", std::process::id())), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn unreadable_cache_dir_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let err = Cache::open(&file).err().expect("a file is not a cache folder");
    assert!(matches!(err, CacheError::Io { .. } | CacheError::Sled { .. }), "{err}");
    assert!(err.to_string().contains("not-a-dir"), "{err}");
}

#[test]
fn get_many_serves_repeated_keys_once_in_request_order() {
    let dir = tempfile::tempdir().unwrap();
    let jit = common::jit_in(dir.path());
    let a = common::gemv(Arch::SM90, &["M=1", "N=256", "K=128"]);
    let b = common::gemv(Arch::SM90, &["M=2", "N=256", "K=128"]);
    // a repeated after b, and a bad request in between: each answer stays at its index.
    let mut bad = a.clone();
    bad.params.insert("THREADS".into(), 3);
    let got = jit.get_many(&[a.clone(), b.clone(), bad, a.clone(), a]);
    assert_eq!(got.len(), 5);
    let ok: Vec<&mangrove::jit::Fetched> = got.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(ok.len(), 4);
    assert!(matches!(got[2], Err(JitError::Template(_))), "{:?}", got[2].as_ref().err());
    let (first, repeat) = (got[0].as_ref().unwrap(), got[3].as_ref().unwrap());
    assert_eq!((first.key, &first.entry.cubin), (repeat.key, &repeat.entry.cubin));
    assert_eq!(repeat.outcome, Outcome::Hit);
    assert_ne!(got[1].as_ref().unwrap().key, first.key);
    assert_eq!(jit.cache.counters().unwrap().inserts, 2, "each distinct key compiled once");
}
