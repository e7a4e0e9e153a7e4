//! Fake CUDA libraries on the CPU emulator (kernels/emu/), so the REAL CUDA
//! backend — `rlhf_kernels::cuda::Cuda`, cudarc, our launchers, memory.rs,
//! gemm.rs — runs without a GPU: `libcuda.so.1` (kernels/emu/fake/cuda.cpp:
//! the driver API over emu_alloc/emu_launch, with the kernel program compiled
//! in as host C++), `libcublas.so.13` (fake/cublas.cpp: cublasGemmEx on the
//! host), an empty `libcublasLt.so.13` (the loader requires it) and
//! `libnccl.so.2` (fake/nccl.cpp: an all-reduce between PROCESSES on one
//! machine, through files in a rendezvous folder named by the unique id). NVRTC
//! stays real: `Cuda::new` compiles the PTX as on a GPU, and the fake driver
//! ignores it.
//!
//! [`use_fake_cuda`] builds them (cached by content) with the system C++
//! compiler (`CXX`, default `c++`), opens them by absolute path — cudarc and
//! the loader then get them by SONAME — and puts their folder first in
//! `RLHF_CUDA_LIB_DIRS`. Libraries are opened once per process, so a test
//! binary that uses this must not use a real GPU too. `RLHF_EMU_SEED` and
//! `RLHF_EMU_PATCH` work as in the kernel tests (kernels/emu/harness.rs):
//! the block order and thread schedules, and edits of the emulated program
//! (the PTX NVRTC compiles is not patched, and is ignored anyway).
//! `RLHF_EMU_LAUNCH_LOG=<file>` makes the fake driver append the name of
//! every kernel it launches to that file, one a line (kernels/tests/
//! cuda_backend.rs checks with it that every kernel is launched).
//!
//! Test support only (hidden from the docs).

#[path = "../rewrite.rs"]
mod rewrite;
pub use rewrite::rewrite;

use crate::cuda::{compile, kernel_names, loader};
use libloading::Library;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// g++ flags of every emulator library (the kernel tests' and the fakes').
pub const FLAGS: &[&str] = &[
    "-std=c++17",
    "-O2",
    "-g0",
    "-shared",
    "-fPIC",
    "-pthread",
    "-fvisibility=hidden",
    "-fno-strict-aliasing",
    "-U_FORTIFY_SOURCE",
    "-Wno-unknown-pragmas",
];

fn emu_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("emu")
}

/// FNV-1a, 64 bit, continued from `h`: the build caches' content key.
pub fn fnv1a(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h ^= b as u64;
        *h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

/// The C++ compiler: `$CXX` (which may carry arguments, "ccache g++") or
/// `c++`, with its `--version` output (part of the cache keys).
pub struct Cxx {
    pub program: String,
    pub args: Vec<String>,
    pub version: Vec<u8>,
}

impl Cxx {
    /// None when no `c++` is installed and CXX is unset; a CXX that is set must work.
    pub fn find() -> Result<Option<Cxx>, String> {
        let cxx_env = std::env::var("CXX").ok().filter(|v| !v.trim().is_empty());
        let mut words: Vec<String> = cxx_env
            .as_deref()
            .unwrap_or("c++")
            .split_whitespace()
            .map(String::from)
            .collect();
        let program = words.remove(0);
        let mut cxx = Cxx {
            program,
            args: words,
            version: Vec::new(),
        };
        cxx.version = match cxx.command().arg("--version").output() {
            Ok(o) => o.stdout,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && cxx_env.is_none() => {
                return Ok(None)
            }
            Err(e) => return Err(format!("running {}: {e}", cxx.program)),
        };
        Ok(Some(cxx))
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args);
        c
    }
}

/// The kernel program NVRTC compiles, with the mutation checks' edits
/// applied: RLHF_EMU_PATCH="old=>new;;old2=>new2" (each `old` must occur; the
/// first occurrence is replaced), to see that the tests catch a given bug.
pub fn patched_program_source() -> Result<String, String> {
    let mut source = compile::program_source();
    if let Ok(patch) = std::env::var("RLHF_EMU_PATCH") {
        for edit in patch.split(";;").filter(|e| !e.is_empty()) {
            let (old, new) = edit
                .split_once("=>")
                .ok_or("RLHF_EMU_PATCH: expected old=>new")?;
            if !source.contains(old) {
                return Err(format!("RLHF_EMU_PATCH: `{old}` is not in the program"));
            }
            source = source.replacen(old, new, 1);
        }
    }
    Ok(source)
}

/// Builds the four libraries under `root` (in a folder named by the hash of
/// everything that goes into them; reused while nothing changed) and returns
/// that folder; None when no C++ compiler is installed (and `CXX` is unset).
pub fn build_fake_libraries(root: &Path) -> Result<Option<PathBuf>, String> {
    // One build at a time in this process: tests running in parallel threads
    // would otherwise compile into the same temporary files (named by pid).
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let Some(cxx) = Cxx::find()? else {
        return Ok(None);
    };
    let version = cxx.version.clone();
    let source = patched_program_source()?;
    let program = rewrite(&source)?;
    let table: String = kernel_names()
        .into_iter()
        .map(|n| format!("EMU_KERNEL({n})\n"))
        .collect();
    let dir = emu_dir();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [
        program.as_bytes(),
        table.as_bytes(),
        &version,
        FLAGS.join(" ").as_bytes(),
    ] {
        fnv1a(&mut h, part);
    }
    for f in [
        "emu.h",
        "driver.cpp",
        "include/cuda_fp16.h",
        "include/cuda_bf16.h",
        "include/vector_types.h",
        "include/mma.h",
        "fake/cuda.cpp",
        "fake/cublas.cpp",
        "fake/nccl.cpp",
    ] {
        fnv1a(&mut h, f.as_bytes());
        fnv1a(
            &mut h,
            &std::fs::read(dir.join(f)).map_err(|e| format!("reading kernels/emu/{f}: {e}"))?,
        );
    }
    let out = root.join(format!("fake-cuda-{h:016x}"));
    let libs = [
        (loader::DRIVER.soname, Some("fake/cuda.cpp")),
        (loader::CUBLAS.soname, Some("fake/cublas.cpp")),
        (loader::CUBLASLT.soname, None),
        (loader::NCCL.soname, Some("fake/nccl.cpp")),
    ];
    if libs.iter().all(|(so, _)| out.join(so).exists()) {
        return Ok(Some(out));
    }
    std::fs::create_dir_all(&out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    std::fs::write(out.join("emu_program.cu"), &program).map_err(|e| e.to_string())?;
    std::fs::write(out.join("emu_kernels.inc"), &table).map_err(|e| e.to_string())?;
    std::fs::write(out.join("empty.cpp"), "// libcublasLt.so.13: nothing\n")
        .map_err(|e| e.to_string())?;
    let started = std::time::Instant::now();
    for (soname, src) in libs {
        let lib = out.join(soname);
        if lib.exists() {
            continue;
        }
        let tmp = out.join(format!("{soname}.tmp{}", std::process::id()));
        let src = src.map_or(out.join("empty.cpp"), |s| dir.join(s));
        let o = cxx
            .command()
            .args(FLAGS)
            .arg(format!("-Wl,-soname,{soname}"))
            .arg(format!("-I{}", out.display()))
            .arg(format!("-I{}", dir.display()))
            .arg(format!("-I{}", dir.join("include").display()))
            .arg(&src)
            .arg("-o")
            .arg(&tmp)
            .output()
            .map_err(|e| format!("running {}: {e}", cxx.program))?;
        if !o.status.success() {
            return Err(format!(
                "{} failed to build the fake {soname} from {} (generated sources in {}):\n{}",
                cxx.program,
                src.display(),
                out.display(),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        std::fs::rename(&tmp, &lib).map_err(|e| e.to_string())?;
    }
    // Builds of other sources an hour old are of no further use.
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|d| d.as_secs() > 3600));
            if name.to_string_lossy().starts_with("fake-cuda-") && entry.path() != out && old {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    eprintln!(
        "fake CUDA libraries built in {:.1} s: {}",
        started.elapsed().as_secs_f32(),
        out.display()
    );
    Ok(Some(out))
}

/// Makes this process's CUDA backend the emulated one (once; later calls
/// return the first answer). True when it is ready; false after printing
/// `SKIPPED <test>: why` when NVRTC or a C++ compiler is missing. Panics when
/// the build fails, and when NVRTC is missing while `RLHF_REQUIRE_NVRTC` is
/// set. `root` holds the builds (tests pass `env!("CARGO_TARGET_TMPDIR")`).
/// Call it before anything touches CUDA.
pub fn use_fake_cuda(test: &str, root: &Path) -> bool {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let r = READY.get_or_init(|| {
        if !cfg!(all(
            target_os = "linux",
            any(target_arch = "x86_64", target_arch = "aarch64")
        )) {
            return Err("not Linux on x86-64/aarch64".into());
        }
        if let Err(e) = loader::require(loader::NVRTC) {
            if std::env::var_os("RLHF_REQUIRE_NVRTC").is_some() {
                panic!("RLHF_REQUIRE_NVRTC is set but NVRTC is unusable: {e}");
            }
            return Err(format!(
                "{e} (run `eval \"$(scripts/fetch-nvrtc.sh)\"` first)"
            ));
        }
        let dir = match build_fake_libraries(root) {
            Ok(Some(d)) => d,
            Ok(None) => return Err("no C++ compiler".into()),
            Err(e) => panic!("{e}"),
        };
        // Opened by absolute path before anyone asks for the SONAME, so a real
        // driver on the linker's path is never picked instead.
        for so in [
            loader::CUBLASLT.soname,
            loader::DRIVER.soname,
            loader::CUBLAS.soname,
            loader::NCCL.soname,
        ] {
            let path = dir.join(so);
            // SAFETY: our own libraries; their initialisers only set up globals.
            let lib = unsafe { Library::new(&path) }
                .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
            std::mem::forget(lib); // open for the life of the process
        }
        let mut dirs = dir.display().to_string();
        if let Ok(old) = std::env::var("RLHF_CUDA_LIB_DIRS") {
            dirs = format!("{dirs}:{old}");
        }
        std::env::set_var("RLHF_CUDA_LIB_DIRS", dirs);
        for lib in [
            loader::DRIVER,
            loader::CUBLASLT,
            loader::CUBLAS,
            loader::NCCL,
        ] {
            let got = loader::require(lib).map_err(|e| e.to_string()).unwrap();
            tracing::debug!(soname = lib.soname, path = %got.display(), "fake CUDA library");
        }
        Ok(())
    });
    match r {
        Ok(()) => true,
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}
