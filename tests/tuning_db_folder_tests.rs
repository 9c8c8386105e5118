//! The tuning DB follows the target: `cache bless` defaults to the folder of the GPU present
//! (or of `--arch`), says which it took, and warns about (or with `--strict` refuses) a DB tuned
//! on another GPU or arch: the shipped H100 DB is not silently taken for sm121.

use std::path::Path;
use std::process::{Command, Output};

const H100: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning_db/h100");

/// `mangrove cache bless ARGS` run in `cwd` (no GPU here: the target is `--arch`).
fn bless(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mangrove"))
        .current_dir(cwd)
        .env_remove("MANGROVE_TUNING_DB")
        .args(["--cache-dir", cwd.join("cache").to_str().unwrap(), "cache", "bless", "--model", cwd.join("no-model").to_str().unwrap(), "--out", cwd.join("out").to_str().unwrap()])
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn copy_db(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(H100).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn an_h100_db_for_sm121_warns_and_with_strict_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let o = bless(dir.path(), &["--arch", "sm121", "--tuning-db", H100, "--strict"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("was tuned on NVIDIA H100 80GB HBM3 (") && e.contains("not on sm121 (no GPU present)") && e.contains("--tuning-db"), "{e}");
    // Without --strict: a warning, then the command goes on (and fails later on the missing model).
    let o = bless(dir.path(), &["--arch", "sm121", "--tuning-db", H100]);
    let e = stderr(&o);
    assert!(e.contains("warning: tuning DB") && e.contains("--strict refuses it"), "{e}");
    // The same DB for its own arch: no word.
    let o = bless(dir.path(), &["--arch", "sm90", "--tuning-db", H100, "--strict"]);
    assert!(!stderr(&o).contains("tuned on"), "{}", stderr(&o));
}

#[test]
fn bless_defaults_to_the_folder_of_the_arch_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let o = bless(dir.path(), &["--arch", "sm121"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no tuning DB folder for sm121 (no GPU present) under tuning_db/; pass --tuning-db"), "{}", stderr(&o));
    // An sm121 folder that holds H100 records: chosen by default, with a warning; refused
    // under --strict.
    copy_db(&dir.path().join("tuning_db/sm121"));
    let e = stderr(&bless(dir.path(), &["--arch", "sm121"]));
    assert!(e.contains("note: tuning DB tuning_db/sm121: the folder of the target arch (sm121 (no GPU present))"), "{e}");
    assert!(e.contains("warning: tuning DB tuning_db/sm121 was tuned on NVIDIA H100"), "{e}");
    let e = stderr(&bless(dir.path(), &["--arch", "sm121", "--strict"]));
    assert!(e.contains("error: tuning DB tuning_db/sm121 was tuned on NVIDIA H100") && e.contains("not on sm121"), "{e}");
}
