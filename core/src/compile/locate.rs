//! Finding and loading libnvrtc before cudarc touches it (cudarc panics when the library is
//! missing). Order: `MANGROVE_NVRTC_LIB`, `CUDA_HOME`/`CUDA_PATH`, the usual CUDA install
//! folders, then the project-local pip install under `.nvrtc/`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// How to get NVRTC when it is missing; shown in the error.
pub const INSTALL_HINT: &str = "install it with `pip install --target .nvrtc \"nvidia-cuda-nvrtc==13.0.*\"` in the \
     repository (scripts/install-nvrtc does this), or point MANGROVE_NVRTC_LIB at libnvrtc.so";

const LIB_NAMES: &[&str] = &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];

/// Where NVRTC was loaded from.
#[derive(Debug)]
pub struct LoadedNvrtc {
    pub path: PathBuf,
    _libs: Vec<libloading::Library>,
}

static LOADED: OnceLock<Result<LoadedNvrtc, (Vec<String>, String)>> = OnceLock::new();

/// Candidate library files in search order.
pub fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("MANGROVE_NVRTC_LIB") {
        out.push(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            let root = PathBuf::from(root);
            dirs.push(root.join("lib64"));
            dirs.push(root.join("targets/x86_64-linux/lib"));
        }
    }
    for root in ["/usr/local/cuda", "/usr/local/cuda-13.0", "/usr/local/cuda-13", "/usr/local/cuda-12"] {
        dirs.push(Path::new(root).join("targets/x86_64-linux/lib"));
        dirs.push(Path::new(root).join("lib64"));
    }
    dirs.push(PathBuf::from("/usr/lib/x86_64-linux-gnu"));
    for base in project_roots() {
        for cu in ["cu13", "cu12", "cuda_nvrtc"] {
            dirs.push(base.join(".nvrtc/nvidia").join(cu).join("lib"));
        }
    }
    for d in dirs {
        for n in LIB_NAMES {
            out.push(d.join(n));
        }
    }
    out
}

/// The folders that may hold a project-local `.nvrtc/`: the current directory, the
/// executable's folder, and their ancestors.
fn project_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    let starts = [std::env::current_dir().ok(), std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf))];
    for start in starts.into_iter().flatten() {
        for a in start.ancestors() {
            if !roots.iter().any(|r: &PathBuf| r == a) {
                roots.push(a.to_path_buf());
            }
        }
    }
    roots
}

/// Loads libnvrtc (once per process) from the first candidate that opens, together with
/// its builtins library from the same folder, so cudarc's later load by name resolves to it.
pub fn load() -> Result<&'static LoadedNvrtc, (Vec<String>, String)> {
    LOADED
        .get_or_init(|| {
            let mut tried = Vec::new();
            let mut last_err = String::from("no candidate file exists");
            for path in candidates() {
                if !path.exists() {
                    continue;
                }
                tried.push(path.display().to_string());
                let mut libs = Vec::new();
                if let Some(dir) = path.parent() {
                    if let Some(b) = builtins_in(dir) {
                        // SAFETY: loading NVIDIA's NVRTC builtins runs no initialisers with
                        // preconditions; the handle is kept for the life of the process.
                        if let Ok(l) = unsafe { libloading::Library::new(&b) } {
                            libs.push(l);
                        }
                    }
                }
                // SAFETY: as above; libnvrtc's initialisers are plain C setup.
                match unsafe { libloading::Library::new(&path) } {
                    Ok(l) => {
                        libs.push(l);
                        // SAFETY: the library is now loaded under its soname, so cudarc's
                        // probe by name finds it and does not panic.
                        if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                            return Ok(LoadedNvrtc { path, _libs: libs });
                        }
                        last_err = "loaded, but not found again by soname".into();
                    }
                    Err(e) => last_err = e.to_string(),
                }
            }
            Err((tried, last_err))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// True once this process has loaded NVRTC (offline serving must never do so).
pub fn is_loaded() -> bool {
    LOADED.get().is_some_and(|r| r.is_ok())
}

fn builtins_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnvrtc-builtins.so") && !n.contains("alt"))
        })
        .collect();
    found.sort();
    found.pop()
}
