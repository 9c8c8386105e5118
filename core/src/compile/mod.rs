//! Stage 3 — compile. Takes a [`RenderedKernel`] and an [`Arch`] and gives a
//! [`CompiledKernel`]: a SASS cubin from NVRTC (through cudarc), optionally its PTX, and the
//! ptxas resource report. This module and `gpu` are the only places that touch cudarc.

mod locate;
mod resources;

use std::ffi::{c_char, CString};
use std::path::PathBuf;
use std::time::Instant;

use cudarc::nvrtc::{result as nv, sys};
use rayon::prelude::*;

use crate::arch::Arch;
use crate::template::RenderedKernel;
pub use locate::{is_loaded as nvrtc_loaded, INSTALL_HINT};
pub use resources::ResourceReport;

/// Errors of the compile stage; a failed compile keeps NVRTC's log, options and the source lines.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("NVRTC not found (tried: {tried}; last error: {reason}); {hint}", tried = if .tried.is_empty() { "no candidate file exists".to_string() } else { .tried.join(", ") }, hint = INSTALL_HINT)]
    NvrtcNotFound { tried: Vec<String>, reason: String },
    #[error("NVRTC {version:?} cannot target {arch} (it supports: {supported})")]
    UnsupportedArch { arch: Arch, version: (i32, i32), supported: String },
    #[error("compiling '{template}' for {arch} failed (options: {options}):\n{log}\n{excerpt}", options = .options.join(" "))]
    Failed { template: String, arch: Arch, options: Vec<String>, log: String, excerpt: String },
    #[error("NVRTC call {call} failed for '{template}': {reason}")]
    Nvrtc { template: String, call: &'static str, reason: String },
}

/// What NVRTC produced for one kernel.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CompiledKernel {
    pub cubin: Vec<u8>,
    pub ptx: Option<String>,
    pub resources: ResourceReport,
    pub compile_ms: f64,
    pub log: String,
}

/// A handle on a loaded NVRTC.
#[derive(Debug, Clone)]
pub struct Compiler {
    version: (i32, i32),
    library: PathBuf,
    supported: Vec<i32>,
}

impl Compiler {
    /// Locates and loads NVRTC; a missing library is a normal error with install instructions.
    pub fn open() -> Result<Self, CompileError> {
        let lib = locate::load().map_err(|(tried, reason)| CompileError::NvrtcNotFound { tried, reason })?;
        let nv_err = |call, e: nv::NvrtcError| CompileError::Nvrtc { template: String::new(), call, reason: format!("{e:?}") };
        let version = nvrtc_version().map_err(|e| nv_err("nvrtcVersion", e))?;
        let supported = supported_archs().map_err(|e| nv_err("nvrtcGetSupportedArchs", e))?;
        Ok(Self { version, library: lib.path.clone(), supported })
    }

    /// NVRTC (major, minor); part of every key.
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    /// The library file in use.
    pub fn library(&self) -> &std::path::Path {
        &self.library
    }

    /// The options mangrove compiles with for `arch`, in order (they are part of the key).
    pub fn options(arch: Arch) -> Vec<String> {
        vec![
            format!("--gpu-architecture={}", arch.nvrtc_name()),
            "-std=c++17".into(),
            "-lineinfo".into(),
            "--ptxas-options=--verbose".into(),
        ]
    }

    /// Compiles one kernel to a cubin for `arch` with `options`.
    pub fn compile(
        &self,
        kernel: &RenderedKernel,
        arch: Arch,
        options: &[String],
        keep_ptx: bool,
    ) -> Result<CompiledKernel, CompileError> {
        if !self.supported.contains(&(arch.cc as i32)) {
            return Err(CompileError::UnsupportedArch {
                arch,
                version: self.version,
                supported: self.supported.iter().map(|c| format!("sm{c}")).collect::<Vec<_>>().join(", "),
            });
        }
        let nv_err = |call, e: nv::NvrtcError| CompileError::Nvrtc {
            template: kernel.template.clone(),
            call,
            reason: format!("{e:?}"),
        };
        let t0 = Instant::now();
        let src = CString::new(kernel.source.as_str()).map_err(|e| CompileError::Nvrtc {
            template: kernel.template.clone(),
            call: "source",
            reason: e.to_string(),
        })?;
        // An absolute, fixed program name: the line table then names this file and never the
        // process's working directory, so one key gives the same cubin bytes from any folder or
        // machine (and bundles leak no build paths).
        let file = format!("{PROGRAM_DIR}/{}.cu", kernel.template);
        let name = CString::new(file.as_str()).expect("template names have no NUL");
        let prog = nv::create_program(&src, Some(&name)).map_err(|e| nv_err("nvrtcCreateProgram", e))?;
        let program = Program(prog);
        // SAFETY: `program` holds a live program created above and destroyed only on drop.
        let compiled = unsafe { nv::compile_program(program.0, options) };
        // SAFETY: as above.
        let log = unsafe { nv::get_program_log(program.0) }.map(|l| c_chars_to_string(&l)).unwrap_or_default();
        if compiled.is_err() {
            return Err(CompileError::Failed {
                template: kernel.template.clone(),
                arch,
                options: options.to_vec(),
                excerpt: source_excerpt(&log, kernel.body(), &file),
                log,
            });
        }
        // SAFETY: the program compiled successfully and is still alive.
        let cubin = unsafe { get_cubin(program.0) }.map_err(|e| nv_err("nvrtcGetCUBIN", e))?;
        let ptx = if keep_ptx {
            // SAFETY: as above.
            unsafe { nv::get_ptx(program.0) }.ok().map(|p| c_chars_to_string(&p))
        } else {
            None
        };
        Ok(CompiledKernel {
            cubin,
            ptx,
            resources: ResourceReport::parse(&log).unwrap_or_default(),
            compile_ms: t0.elapsed().as_secs_f64() * 1e3,
            log,
        })
    }

    /// Compiles many kernels in parallel (rayon); results keep the input order.
    pub fn compile_many(
        &self,
        jobs: &[(RenderedKernel, Arch)],
        keep_ptx: bool,
    ) -> Vec<Result<CompiledKernel, CompileError>> {
        jobs.par_iter().map(|(k, a)| self.compile(k, *a, &Self::options(*a), keep_ptx)).collect()
    }
}

/// The folder every program is named in (it need not exist): see [`Compiler::compile`].
pub const PROGRAM_DIR: &str = "/mangrove/kernel_templates";

/// Destroys the NVRTC program on every exit path.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by nvrtcCreateProgram and is destroyed exactly once.
        let _ = unsafe { nv::destroy_program(self.0) };
    }
}

/// # Safety
/// `prog` must be a live, successfully compiled program for a real (sm_XX) architecture.
unsafe fn get_cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>, nv::NvrtcError> {
    let mut size = 0usize;
    // SAFETY: per this function's contract; `size` is a valid out pointer.
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result()?;
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` has exactly the size NVRTC reported.
    unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char) }.result()?;
    Ok(buf)
}

fn nvrtc_version() -> Result<(i32, i32), nv::NvrtcError> {
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: two valid out pointers.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result()?;
    Ok((major, minor))
}

fn supported_archs() -> Result<Vec<i32>, nv::NvrtcError> {
    let mut n = 0i32;
    // SAFETY: `n` is a valid out pointer.
    unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) }.result()?;
    let mut v = vec![0i32; n.max(0) as usize];
    // SAFETY: `v` holds exactly the number of entries NVRTC reported.
    unsafe { sys::nvrtcGetSupportedArchs(v.as_mut_ptr()) }.result()?;
    Ok(v)
}

fn c_chars_to_string(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// For every `file(LINE): error` in `log`, the rendered source lines around LINE.
fn source_excerpt(log: &str, source: &str, file: &str) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let mut out = String::new();
    let mut shown = std::collections::BTreeSet::new();
    for l in log.lines() {
        let Some(rest) = l.strip_prefix(file).and_then(|r| r.strip_prefix('(')) else { continue };
        let Some(num) = rest.split(')').next().and_then(|n| n.parse::<usize>().ok()) else { continue };
        if !shown.insert(num) || num == 0 {
            continue;
        }
        out.push_str(&format!("--- rendered source around {file}:{num} ---\n"));
        let first = num.saturating_sub(3);
        for (i, line) in lines.iter().enumerate().skip(first).take(num + 2 - first) {
            let mark = if i + 1 == num { ">>" } else { "  " };
            out.push_str(&format!("{mark} {:5} | {line}\n", i + 1));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_points_at_error_line() {
        let src = "a\nb\nc\nd bad\ne\nf";
        let log = "k.cu(4): error: identifier \"bad\" is undefined\n";
        let ex = source_excerpt(log, src, "k.cu");
        assert!(ex.contains(">>     4 | d bad"), "{ex}");
    }
}
