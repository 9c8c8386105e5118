//! A damaged sled cache repairs itself instead of failing for good: bytes flipped or cut in the
//! real sled files (every file, several offsets) leave a cache that opens, serves the right
//! kernels (hits or recompiles) and verifies; a folder sled cannot read is moved aside with a
//! message naming both paths, entries sled drops silently are reported, and `cache verify`
//! reports either and what it checked.

mod common;

use std::path::{Path, PathBuf};

use mangrove::arch::Arch;
use mangrove::cache::{Cache, Storage};
use mangrove::jit::KernelRequest;

/// A named change to a file's bytes.
type Edit = (String, Box<dyn Fn(&mut Vec<u8>)>);

fn requests() -> Vec<KernelRequest> {
    vec![common::gemv(Arch::SM90, &["N=256", "K=256"]), common::gemv(Arch::SM90, &["N=256", "K=512"]), common::gemv(Arch::SM80, &["N=512", "K=256"])]
}

/// Every regular file under `dir` (sled's `conf`, `db`, `snap.*`, `blobs/*`).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else if p.file_name().is_some_and(|n| n != "mangrove.pid" && n != "mangrove.entries") {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let t = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}

#[test]
fn flipped_or_cut_bytes_in_the_sled_files_never_leave_the_cache_unusable() {
    let root = tempfile::tempdir().unwrap();
    let pristine = root.path().join("pristine");
    let cubins: Vec<Vec<u8>> = {
        let jit = common::jit_in(&pristine);
        let c = requests().iter().map(|r| jit.get(r).unwrap().entry.cubin).collect();
        jit.cache.storage().flush().unwrap();
        c
    }; // sled closed here
    let names = files(&pristine);
    assert!(!names.is_empty());
    let mut cases = 0;
    let mut quarantined = 0;
    let mut lost_cases = 0;
    for f in &names {
        let rel = f.strip_prefix(&pristine).unwrap().to_path_buf();
        let len = std::fs::metadata(f).unwrap().len() as usize;
        let mut edits: Vec<Edit> = Vec::new();
        for at in [0, 1, 8, 17, len / 4, len / 2, 3 * len / 4, len.saturating_sub(9), len.saturating_sub(1)] {
            if at < len {
                edits.push((format!("flip byte {at}"), Box::new(move |b: &mut Vec<u8>| b[at] ^= 0xA5)));
            }
        }
        edits.push(("truncate to half".into(), Box::new(|b: &mut Vec<u8>| b.truncate(b.len() / 2))));
        edits.push(("zero the file".into(), Box::new(|b: &mut Vec<u8>| b.iter_mut().for_each(|x| *x = 0))));
        for (what, edit) in edits {
            cases += 1;
            let case = root.path().join(format!("case-{cases}"));
            copy_dir(&pristine, &case);
            let target = case.join(&rel);
            let mut bytes = std::fs::read(&target).unwrap();
            edit(&mut bytes);
            std::fs::write(&target, &bytes).unwrap();
            let label = format!("{} {what}", rel.display());
            // The cache opens, serves every kernel correctly (hit or recompile) and verifies.
            let jit = mangrove::jit::Jit::open(mangrove::template::Catalog::embedded(), &case, false).unwrap_or_else(|e| panic!("{label}: {e}"));
            if let Some(q) = jit.cache.storage().quarantined() {
                quarantined += 1;
                assert!(q.moved_to.exists(), "{label}: {q:?}");
            } else {
                // Entries sled dropped silently are reported, never "checked 0" and nothing more.
                let found = jit.cache.list().unwrap().len() as u64;
                let lost = jit.cache.storage().lost();
                if found < requests().len() as u64 {
                    lost_cases += 1;
                    assert_eq!(lost.map(|l| (l.expected, l.found)), Some((requests().len() as u64, found)), "{label}");
                } else {
                    assert_eq!(lost, None, "{label}");
                }
            }
            for (r, cubin) in requests().iter().zip(&cubins) {
                let got = jit.get(r).unwrap_or_else(|e| panic!("{label}: {e}"));
                assert!(got.entry.blob_intact(), "{label}");
                assert_eq!(got.entry.inputs.key(), got.key, "{label}");
                assert_eq!(&got.entry.cubin, cubin, "{label}: a different cubin was served");
            }
            let report = jit.cache.verify().unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_eq!(report.checked, requests().len(), "{label}: {report}");
            assert_eq!(report.intact, requests().len(), "{label}: {report}");
            drop(jit);
            // And the next process finds a healthy cache: all hits.
            let jit = common::jit_in(&case);
            assert!(jit.cache.storage().quarantined().is_none(), "{label}: damaged again after repair");
            for r in requests() {
                assert_eq!(jit.get(&r).unwrap().outcome, mangrove::jit::Outcome::Hit, "{label}");
            }
        }
    }
    println!("{cases} corruption cases over {} files; {quarantined} quarantined, {lost_cases} with entries silently dropped by sled (reported)", names.len());
    assert!(cases >= 20, "{cases}");
}

#[test]
fn an_unreadable_cache_is_quarantined_and_verify_reports_it() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cache");
    {
        let jit = common::jit_in(&dir);
        jit.get(&requests()[0]).unwrap();
        jit.cache.storage().flush().unwrap();
    }
    // Garbage over every sled file: sled cannot make sense of any of it.
    for f in files(&dir) {
        let len = std::fs::metadata(&f).unwrap().len() as usize;
        std::fs::write(&f, (0..len.max(64)).map(|i| (i * 31 % 251) as u8).collect::<Vec<_>>()).unwrap();
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mangrove"))
        .args(["--cache-dir", dir.to_str().unwrap(), "cache", "verify"])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!stderr.contains("panicked at"), "{stderr}");
    let moved: Vec<PathBuf> = std::fs::read_dir(root.path()).unwrap().flatten().map(|e| e.path()).filter(|p| p.to_string_lossy().contains("cache.corrupt-")).collect();
    if moved.is_empty() {
        // sled shrugged the garbage off as an unfinished log: the cache must still be usable.
        assert!(out.status.success() || stdout.contains("evicted") || stdout.contains("are gone"), "{stdout}{stderr}");
    } else {
        assert!(!out.status.success(), "damage found must fail verify: {stdout}");
        assert!(stderr.contains("damaged") && stderr.contains(&moved[0].display().to_string()), "{stderr}");
        assert!(stdout.contains("checked 0"), "{stdout}");
    }
    // Either way the next run compiles and serves.
    let jit = common::jit_in(&dir);
    assert!(jit.get(&requests()[0]).unwrap().entry.blob_intact());
    assert_eq!(Cache::open(root.path().join("fresh").as_path()).unwrap().list().unwrap().len(), 0);
}
