//! Finding the CUDA libraries before cudarc touches them.
//!
//! cudarc opens its libraries lazily and panics when one is missing, so every
//! entry point first calls [`require`], which returns a typed error naming the
//! library and the places searched. Libraries that are not on the dynamic
//! linker's path (a toolkit under /usr/local/cuda, PyTorch's pip wheels) are
//! opened here by absolute path first: glibc then hands cudarc the same
//! library when it asks for the SONAME (`libcublas.so.13`).

use crate::KernelError;
use libloading::Library;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// The CUDA major version the bindings are built for (cudarc's `cuda-13000`).
pub const CUDA_MAJOR: u32 = 13;

/// A library we need: its SONAME and what it is for (for the error message).
#[derive(Clone, Copy, Debug)]
pub struct Lib {
    pub soname: &'static str,
    pub what: &'static str,
    /// A library it opens by bare name at run time, which must therefore be
    /// opened first from the same folder (NVRTC's builtins).
    pub companion: Option<&'static str>,
}

pub const DRIVER: Lib = Lib {
    soname: "libcuda.so.1",
    what: "the NVIDIA driver",
    companion: None,
};
pub const NVRTC: Lib = Lib {
    soname: "libnvrtc.so.13",
    what: "NVRTC (CUDA 13 runtime compiler)",
    companion: Some("libnvrtc-builtins.so.13.0"),
};
pub const CUBLAS: Lib = Lib {
    soname: "libcublas.so.13",
    what: "cuBLAS 13",
    companion: None,
};
pub const CUBLASLT: Lib = Lib {
    soname: "libcublasLt.so.13",
    what: "cuBLASLt 13 (needed by cuBLAS)",
    companion: None,
};
pub const NCCL: Lib = Lib {
    soname: "libnccl.so.2",
    what: "NCCL 2",
    companion: None,
};

/// (SONAME, where it was found, the open library).
type Opened = Vec<(&'static str, PathBuf, Library)>;

/// Libraries opened here, kept open for the life of the process.
fn opened() -> &'static Mutex<Opened> {
    static OPENED: OnceLock<Mutex<Opened>> = OnceLock::new();
    OPENED.get_or_init(|| Mutex::new(Vec::new()))
}

/// Directories searched after the linker's own path, in order:
/// `$RLHF_CUDA_LIB_DIRS` (colon-separated), `$CUDA_HOME`/`$CUDA_PATH` lib64,
/// /usr/local/cuda, and the `nvidia/*/lib` folders of Python's site-packages
/// (where PyTorch's CUDA wheels put them).
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(list) = std::env::var("RLHF_CUDA_LIB_DIRS") {
        dirs.extend(list.split(':').filter(|d| !d.is_empty()).map(PathBuf::from));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(root) = std::env::var(var) {
            dirs.push(Path::new(&root).join("lib64"));
            dirs.push(Path::new(&root).join("lib"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    dirs.push("/usr/local/cuda/targets/x86_64-linux/lib".into());
    dirs.push("/usr/lib/x86_64-linux-gnu".into());
    for site in site_packages() {
        let nvidia = site.join("nvidia");
        let Ok(entries) = std::fs::read_dir(&nvidia) else {
            continue;
        };
        let mut subs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path().join("lib"))
            .filter(|p| p.is_dir())
            .collect();
        subs.sort();
        dirs.extend(subs);
    }
    dirs
}

/// Python site-packages folders that may hold NVIDIA's wheels.
fn site_packages() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = vec!["/usr/lib".into(), "/usr/local/lib".into()];
    if let Ok(home) = std::env::var("HOME") {
        roots.push(Path::new(&home).join(".local/lib"));
    }
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Ok(p) = std::env::var(var) {
            roots.push(Path::new(&p).join("lib"));
        }
    }
    let mut out = Vec::new();
    for root in roots {
        let Ok(entries) = std::fs::read_dir(&root) else {
            continue;
        };
        let mut pys: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("python3"))
            })
            .collect();
        pys.sort();
        for py in pys {
            out.push(py.join("site-packages"));
            out.push(py.join("dist-packages"));
        }
    }
    out
}

/// Open `lib` (first through the linker's path, then each search directory)
/// and keep it open. Returns where it came from.
pub fn require(lib: Lib) -> Result<PathBuf, KernelError> {
    let mut opened = opened().lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, path, _)) = opened.iter().find(|(s, _, _)| *s == lib.soname) {
        return Ok(path.clone());
    }
    // SAFETY: opening a shared library runs its initialisers; these are
    // NVIDIA's own libraries, the same ones cudarc would open.
    if let Ok(l) = unsafe { Library::new(lib.soname) } {
        let path = PathBuf::from(lib.soname);
        opened.push((lib.soname, path.clone(), l));
        return Ok(path);
    }
    let dirs = search_dirs();
    for dir in &dirs {
        let path = dir.join(lib.soname);
        if !path.exists() {
            continue;
        }
        if let Some(companion) = lib.companion {
            let cpath = dir.join(companion);
            // SAFETY: as above.
            match unsafe { Library::new(&cpath) } {
                Ok(l) => opened.push((companion, cpath, l)),
                Err(e) => {
                    return Err(KernelError::Unavailable(format!(
                        "{} needs {}: {e}",
                        path.display(),
                        cpath.display()
                    )))
                }
            }
        }
        // SAFETY: as above.
        if let Ok(l) = unsafe { Library::new(&path) } {
            opened.push((lib.soname, path.clone(), l));
            return Ok(path);
        }
    }
    Err(KernelError::Unavailable(format!(
        "{} ({}) was not found: not on the dynamic linker's path, nor in {}. \
         Install it, or name its folder in RLHF_CUDA_LIB_DIRS",
        lib.what,
        lib.soname,
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// A folder holding `cuda_fp16.h` and `cuda_bf16.h`, which NVRTC needs on its
/// include path: `$RLHF_CUDA_INCLUDE`, `$CUDA_HOME/include`, /usr/local/cuda,
/// or a pip `nvidia-cuda-runtime` wheel beside the libraries found above.
pub fn include_dir() -> Result<PathBuf, KernelError> {
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Ok(p) = std::env::var("RLHF_CUDA_INCLUDE") {
        cands.push(p.into());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(root) = std::env::var(var) {
            cands.push(Path::new(&root).join("include"));
        }
    }
    cands.push("/usr/local/cuda/include".into());
    cands.push("/usr/local/cuda/targets/x86_64-linux/include".into());
    for dir in search_dirs() {
        if let Some(parent) = dir.parent() {
            cands.push(parent.join("include"));
        }
    }
    cands
        .iter()
        .find(|d| {
            d.join("cuda_fp16.h").exists()
                && d.join("cuda_bf16.h").exists()
                && d.join("crt/mma.h").exists()
        })
        .cloned()
        .ok_or_else(|| {
            KernelError::Unavailable(format!(
                "CUDA headers (cuda_fp16.h, cuda_bf16.h, crt/mma.h) were not found in {}; \
                 set RLHF_CUDA_INCLUDE to a CUDA 13 include folder",
                cands
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}
