//! Compiling the kernel sources with NVRTC, for the GPU present, cached on
//! disk by (source hash, architecture, NVRTC version).
//!
//! All `.cu` files are concatenated after `common.cuh` into one program: one
//! compile, one module, one cache entry. Adding a kernel file means adding it
//! to [`SOURCES`].

use super::loader;
use crate::KernelError;
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};
use std::path::{Path, PathBuf};

/// (file name, text) of every kernel source, in compile order.
pub const SOURCES: &[(&str, &str)] = &[
    ("common.cuh", include_str!("common.cuh")),
    ("memory.cu", include_str!("memory.cu")),
    ("elementwise.cu", include_str!("elementwise.cu")),
    ("bias.cu", include_str!("bias.cu")),
    ("embedding.cu", include_str!("embedding.cu")),
    ("rmsnorm.cu", include_str!("rmsnorm.cu")),
    ("rope.cu", include_str!("rope.cu")),
    ("attention.cu", include_str!("attention.cu")),
    ("attention_kv.cu", include_str!("attention_kv.cu")),
    ("swiglu.cu", include_str!("swiglu.cu")),
    ("dropout.cu", include_str!("dropout.cu")),
    ("cross_entropy.cu", include_str!("cross_entropy.cu")),
    ("softmax_entropy.cu", include_str!("softmax_entropy.cu")),
    ("adamw.cu", include_str!("adamw.cu")),
    ("lora.cu", include_str!("lora.cu")),
];

/// The whole program NVRTC compiles, with `#line` markers so errors name the
/// file and line they come from.
pub fn program_source() -> String {
    let mut src = String::new();
    for (name, text) in SOURCES {
        src.push_str(&format!("#line 1 \"{name}\"\n"));
        src.push_str(text);
        src.push('\n');
    }
    src
}

/// NVRTC's `--gpu-architecture` name for a compute capability. The kernels
/// use bf16 and tensor-core instructions, so sm_80 (Ampere) is the minimum.
pub fn arch_name(major: i32, minor: i32) -> Result<&'static str, KernelError> {
    Ok(match (major, minor) {
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 7) => "sm_87",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        _ if major < 8 => {
            return Err(KernelError::Unavailable(format!(
                "GPU compute capability {major}.{minor} is below 8.0; the kernels need bf16 \
                 tensor cores (A100, H100, H200, RTX 30xx or newer)"
            )))
        }
        _ => {
            return Err(KernelError::Unavailable(format!(
                "GPU compute capability {major}.{minor} is not in the kernel compiler's table"
            )))
        }
    })
}

/// Compile the program for `arch` (no GPU needed: NVRTC only). Errors carry
/// NVRTC's log.
pub fn compile(arch: &'static str) -> Result<Ptx, KernelError> {
    compile_source(&program_source(), arch)
}

/// Compile `src` with the kernels' options (headers on the include path).
pub fn compile_source(src: &str, arch: &'static str) -> Result<Ptx, KernelError> {
    loader::require(loader::NVRTC)?;
    let include = loader::include_dir()?;
    let opts = CompileOptions {
        arch: Some(arch),
        include_paths: vec![include.display().to_string()],
        options: vec!["--std=c++17".into(), "-default-device".into()],
        name: Some("rlhf_kernels.cu".into()),
        ..Default::default()
    };
    compile_ptx_with_opts(src, opts).map_err(|e| {
        KernelError::Unavailable(match e {
            CompileError::CompileError { log, .. } => {
                format!("NVRTC failed for {arch}:\n{}", log.to_string_lossy())
            }
            e => format!("NVRTC failed for {arch}: {e:?}"),
        })
    })
}

/// The PTX for `arch`, from the disk cache when this exact source was
/// compiled before, else compiled and stored (written to a temporary file,
/// then renamed, so a crash never leaves a torn entry).
pub fn compile_cached(arch: &'static str) -> Result<Ptx, KernelError> {
    loader::require(loader::NVRTC)?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (checked above); nvrtcVersion writes two ints.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    // A newer NVRTC may emit PTX an older driver cannot load: keyed by version too.
    let key = format!(
        "{:016x}-{arch}-nvrtc{major}.{minor}",
        fnv1a(program_source().as_bytes())
    );
    let dir = cache_dir();
    let path = dir.join(format!("{key}.ptx"));
    if let Ok(text) = std::fs::read_to_string(&path) {
        tracing::debug!(path = %path.display(), "kernels: cached PTX");
        return Ok(Ptx::from_src(text));
    }
    let started = std::time::Instant::now();
    let ptx = compile(arch)?;
    tracing::info!(
        arch,
        secs = started.elapsed().as_secs_f32(),
        "kernels: compiled with NVRTC"
    );
    if let Err(e) = store(&dir, &path, &ptx.to_src()) {
        tracing::warn!(path = %path.display(), "kernels: PTX not cached: {e}");
    }
    Ok(ptx)
}

fn store(dir: &Path, path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// `$RLHF_CACHE_DIR/kernels`, else `$XDG_CACHE_HOME/rlhf/kernels`, else
/// `~/.cache/rlhf/kernels`.
pub fn cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("RLHF_CACHE_DIR") {
        return Path::new(&d).join("kernels");
    }
    if let Ok(d) = std::env::var("XDG_CACHE_HOME") {
        return Path::new(&d).join("rlhf/kernels");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    Path::new(&home).join(".cache/rlhf/kernels")
}

/// FNV-1a, 64 bit: a hash that is the same in every build (the cache key).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
