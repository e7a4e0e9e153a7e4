//! The Rust side of the CUDA emulator (kernels/emu/emu.h): builds the kernel
//! program as a host shared library with the system C++ compiler, loads it,
//! and launches kernels by name. Included by kernels/tests/emu_kernels.rs
//! (`#[path]`: the emulator's own tests; the program's kernels are tested
//! through the real CUDA backend on the fake libcuda, kernels/emu/fake/).
//!
//! Build: `rlhf_kernels::cuda::compile::program_source()` (exactly what NVRTC
//! compiles) goes through [`rewrite`] — every `asm(...)` statement becomes a
//! call of the emulator's PTX interpreter and every `extern __shared__` array
//! a pointer to the launch's dynamic shared memory — and is compiled with
//! kernels/emu/driver.cpp, once per distinct source, into
//! `$CARGO_TARGET_TMPDIR/emu-<hash>/libemu.so` (reused while nothing changed).
//! `CXX` picks the compiler (default `c++`); without one the tests print
//! SKIPPED. `RLHF_EMU_SEED` changes every launch's block order and thread
//! schedule (the default is fixed, so runs repeat). `RLHF_EMU_PATCH=
//! "old=>new;;old2=>new2"` edits the program before the build (each `old` must
//! occur once or more; the first is replaced): a quick way to check that the
//! tests catch a bug you have in mind.
#![allow(dead_code)]

use libloading::Library;
use rlhf_kernels::cuda::Dtype;
use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

// ---- the source rewrite ------------------------------------------------------

/// The program with inline PTX and dynamic shared memory made emulable
/// (kernels/emu/rewrite.rs, shared with the fake CUDA libraries).
pub use rlhf_kernels::emu::rewrite;
use rlhf_kernels::emu::{fnv1a, patched_program_source, Cxx, FLAGS};

// ---- building and loading ---------------------------------------------------------

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    *const u32,
    *const u32,
    u32,
    u32,
    *const *mut c_void,
    *const usize,
    u64,
    *mut c_char,
    usize,
) -> c_int;

/// The loaded emulator library.
pub struct Emu {
    _lib: Library,
    launch: LaunchFn,
    alloc: unsafe extern "C" fn(usize) -> *mut c_void,
    free: unsafe extern "C" fn(*mut c_void) -> c_int,
    check_all: unsafe extern "C" fn() -> c_int,
    count: unsafe extern "C" fn() -> u32,
    name: unsafe extern "C" fn(u32) -> *const c_char,
}

// SAFETY: the library's entry points are thread-safe (launches are serialised
// by a mutex inside it, allocations by another).
unsafe impl Sync for Emu {}
unsafe impl Send for Emu {}

fn emu_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("emu")
}

/// Builds (or finds the cached build of) the emulator library; None when no
/// C++ compiler is installed.
fn build() -> Result<Option<PathBuf>, String> {
    let Some(cxx) = Cxx::find()? else {
        return Ok(None);
    };
    let version = cxx.version.clone();
    let mut source = patched_program_source()?;
    // The emulator's own test kernels (kernels/emu/selftest.cu) go after the program.
    let dir = emu_dir();
    let selftest = std::fs::read_to_string(dir.join("selftest.cu"))
        .map_err(|e| format!("reading selftest.cu: {e}"))?;
    source.push_str("#line 1 \"selftest.cu\"\n");
    source.push_str(&selftest);
    let program = rewrite(&source)?;
    let selftest_names = selftest
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("extern \"C\" __global__ void "))
        .filter_map(|r| r.find('(').map(|e| r[..e].trim().to_string()));
    let table: String = rlhf_kernels::cuda::kernel_names()
        .into_iter()
        .chain(selftest_names)
        .map(|n| format!("EMU_KERNEL({n})\n"))
        .collect();
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
        "selftest.cu",
        "include/cuda_fp16.h",
        "include/cuda_bf16.h",
        "include/vector_types.h",
        "include/mma.h",
    ] {
        fnv1a(&mut h, f.as_bytes());
        fnv1a(
            &mut h,
            &std::fs::read(dir.join(f)).map_err(|e| format!("reading kernels/emu/{f}: {e}"))?,
        );
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("emu-{h:016x}"));
    let lib = out.join("libemu.so");
    if lib.exists() {
        return Ok(Some(lib));
    }
    std::fs::create_dir_all(&out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    std::fs::write(out.join("emu_program.cu"), &program).map_err(|e| e.to_string())?;
    std::fs::write(out.join("emu_kernels.inc"), &table).map_err(|e| e.to_string())?;
    let tmp = out.join(format!("libemu.so.tmp{}", std::process::id()));
    let started = std::time::Instant::now();
    let o = cxx
        .command()
        .args(FLAGS)
        .arg(format!("-I{}", out.display()))
        .arg(format!("-I{}", dir.display()))
        .arg(format!("-I{}", dir.join("include").display()))
        .arg(dir.join("driver.cpp"))
        .arg("-o")
        .arg(&tmp)
        .output()
        .map_err(|e| format!("running {}: {e}", cxx.program))?;
    if !o.status.success() {
        return Err(format!(
            "{} failed to build the emulator (generated sources in {}); if the kernels use \
             a CUDA feature the emulator lacks, add it in kernels/emu/:\n{}",
            cxx.program,
            out.display(),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    std::fs::rename(&tmp, &lib).map_err(|e| e.to_string())?;
    // Builds of other sources an hour old are of no further use.
    if let Ok(entries) = std::fs::read_dir(env!("CARGO_TARGET_TMPDIR")) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|d| d.as_secs() > 3600));
            if name.starts_with("emu-") && entry.path() != out && old {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    eprintln!(
        "emulator built in {:.1} s: {}",
        started.elapsed().as_secs_f32(),
        lib.display()
    );
    Ok(Some(lib))
}

/// The emulator, or None (after printing SKIPPED) where it cannot run.
pub fn emu(test: &str) -> Option<&'static Emu> {
    static EMU: OnceLock<Result<Option<Emu>, String>> = OnceLock::new();
    let r = EMU.get_or_init(|| {
        if !cfg!(all(
            target_os = "linux",
            any(target_arch = "x86_64", target_arch = "aarch64")
        )) {
            return Ok(None);
        }
        let Some(path) = build()? else {
            return Ok(None);
        };
        // SAFETY: our own library; its initialisers only set up globals.
        let lib = unsafe { Library::new(&path) }
            .map_err(|e| format!("loading {}: {e}", path.display()))?;
        // SAFETY: the symbols are the C API of driver.cpp, with these signatures.
        unsafe {
            Ok(Some(Emu {
                launch: *lib
                    .get::<LaunchFn>(b"emu_launch")
                    .map_err(|e| e.to_string())?,
                alloc: *lib.get(b"emu_alloc").map_err(|e| e.to_string())?,
                free: *lib.get(b"emu_free").map_err(|e| e.to_string())?,
                check_all: *lib.get(b"emu_check_all").map_err(|e| e.to_string())?,
                count: *lib.get(b"emu_kernel_count").map_err(|e| e.to_string())?,
                name: *lib.get(b"emu_kernel_name").map_err(|e| e.to_string())?,
                _lib: lib,
            }))
        }
    });
    match r {
        Ok(Some(e)) => Some(e),
        Ok(None) => {
            eprintln!("SKIPPED {test}: no C++ compiler (or not Linux on x86-64/aarch64)");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

impl Emu {
    /// The kernels compiled into the library.
    pub fn kernel_names(&self) -> Vec<String> {
        // SAFETY: plain calls; names are static NUL-terminated strings.
        (0..unsafe { (self.count)() })
            .map(|i| {
                unsafe { CStr::from_ptr((self.name)(i)) }
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    /// A launch of kernel `name`; arguments are pushed as with cudarc.
    pub fn launch_builder(&'static self, name: &str) -> Launch<'static> {
        Launch {
            emu: self,
            name: name.to_string(),
            args: Vec::new(),
            sizes: Vec::new(),
            _args: std::marker::PhantomData,
        }
    }
}

// ---- launches ---------------------------------------------------------------------

/// cudarc's `LaunchConfig`, field for field.
#[derive(Clone, Copy, Debug)]
pub struct LaunchConfig {
    pub grid_dim: (u32, u32, u32),
    pub block_dim: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

/// A kernel argument: the scalar types and device pointers (u64) launchers push.
pub trait KernelArg {}
impl KernelArg for u64 {}
impl KernelArg for i64 {}
impl KernelArg for u32 {}
impl KernelArg for i32 {}
impl KernelArg for f32 {}

thread_local! {
    static LAUNCHES: Cell<u64> = const { Cell::new(0) };
    static SEED_OFFSET: Cell<u64> = const { Cell::new(0) };
}

/// Runs `f` with every launch's seed changed (another block order and thread
/// schedule), for determinism checks.
pub fn with_schedule<R>(offset: u64, f: impl FnOnce() -> R) -> R {
    let old = SEED_OFFSET.with(|s| s.replace(offset));
    let r = f();
    SEED_OFFSET.with(|s| s.set(old));
    r
}

pub struct Launch<'a> {
    emu: &'static Emu,
    name: String,
    args: Vec<*mut c_void>,
    sizes: Vec<usize>,
    _args: std::marker::PhantomData<&'a ()>,
}

impl<'a> Launch<'a> {
    pub fn arg<T: KernelArg>(&mut self, v: &'a T) -> &mut Self {
        self.args.push(v as *const T as *mut c_void);
        self.sizes.push(std::mem::size_of::<T>());
        self
    }

    /// Runs the kernel to completion; panics with the emulator's message on
    /// any error (bad arguments or launch shape, deadlock, trap, ...).
    #[track_caller]
    pub fn launch(&mut self, cfg: LaunchConfig) {
        if let Err(e) = self.try_launch(cfg) {
            panic!("{e}");
        }
    }

    /// [`Launch::launch`], with the error returned.
    pub fn try_launch(&mut self, cfg: LaunchConfig) -> Result<(), String> {
        let base: u64 = std::env::var("RLHF_EMU_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let n = LAUNCHES.with(|c| {
            c.set(c.get() + 1);
            c.get()
        });
        let mut seed = base
            ^ SEED_OFFSET
                .with(|s| s.get())
                .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        fnv1a(&mut seed, self.name.as_bytes());
        fnv1a(&mut seed, &n.to_le_bytes());
        let name = CString::new(self.name.clone()).unwrap();
        let grid = [cfg.grid_dim.0, cfg.grid_dim.1, cfg.grid_dim.2];
        let block = [cfg.block_dim.0, cfg.block_dim.1, cfg.block_dim.2];
        let mut err = vec![0u8; 2048];
        // SAFETY: the arguments point at live values borrowed for 'a (the
        // library checks their count and sizes against the kernel), the
        // device pointers among them come from DevBuf/DevInts and the kernel
        // runs to completion before this returns.
        let rc = unsafe {
            (self.emu.launch)(
                name.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                cfg.shared_mem_bytes,
                self.args.len() as u32,
                self.args.as_ptr(),
                self.sizes.as_ptr(),
                seed,
                err.as_mut_ptr() as *mut c_char,
                err.len(),
            )
        };
        if rc != 0 {
            let msg = CStr::from_bytes_until_nul(&err).unwrap().to_string_lossy();
            return Err(format!(
                "emulated launch of {} {cfg:?} failed (schedule seed {seed:#x}): {msg}",
                self.name
            ));
        }
        // SAFETY: a plain call.
        let bad = unsafe { (self.emu.check_all)() };
        if bad != 0 {
            return Err(format!(
                "{}: {bad} device buffer(s) written past their end",
                self.name
            ));
        }
        Ok(())
    }
}

// ---- device memory -------------------------------------------------------------------

/// A device allocation (host memory between guard pages).
struct Mem {
    emu: &'static Emu,
    ptr: *mut c_void,
    bytes: usize,
}

impl Mem {
    fn new(emu: &'static Emu, bytes: usize) -> Mem {
        // SAFETY: a plain call; the buffer is freed in Drop.
        let ptr = unsafe { (emu.alloc)(bytes) };
        assert!(!ptr.is_null(), "emu_alloc({bytes}) failed");
        Mem { emu, ptr, bytes }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `bytes` bytes are ours, and no kernel runs (launches block).
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u8, self.bytes) }
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.bytes) }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: allocated by emu_alloc and not freed before.
        let rc = unsafe { (self.emu.free)(self.ptr) };
        if rc != 0 && !std::thread::panicking() {
            panic!(
                "a device buffer of {} bytes was written past its end",
                self.bytes
            );
        }
    }
}

/// A buffer of `len` elements of `dtype` (cuda.rs's CudaBuf), optionally
/// `off` elements into its allocation (as a view into a larger buffer is:
/// misaligned for vector loads unless `off` is a multiple of 16 bytes).
pub struct DevBuf {
    mem: Mem,
    off: usize,
    pub len: usize,
    pub dtype: Dtype,
}

/// A range of a buffer, with the fields of cuda.rs's CudaView/CudaViewMut.
#[derive(Clone, Copy, Debug)]
pub struct View {
    pub ptr: u64,
    pub len: usize,
    pub dtype: Dtype,
    pub dt: i32,
}

/// `x` rounded to what `dtype` holds.
pub fn round(dtype: Dtype, x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| to_f32(dtype, &from_f32(dtype, v)))
        .collect()
}

fn from_f32(dtype: Dtype, v: f32) -> Vec<u8> {
    match dtype {
        Dtype::F32 => v.to_le_bytes().to_vec(),
        Dtype::Bf16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
        Dtype::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
    }
}

fn to_f32(dtype: Dtype, b: &[u8]) -> f32 {
    match dtype {
        Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        Dtype::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        Dtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
    }
}

impl DevBuf {
    /// Zeroed, like `Cuda::alloc` (at least one element, as there).
    pub fn zeros(emu: &'static Emu, len: usize, dtype: Dtype) -> DevBuf {
        DevBuf::zeros_at(emu, len, dtype, 0)
    }
    /// `off` elements into a zeroed allocation (the ones before are NaN).
    pub fn zeros_at(emu: &'static Emu, len: usize, dtype: Dtype, off: usize) -> DevBuf {
        let mut b = DevBuf {
            mem: Mem::new(emu, (off + len).max(1) * dtype.size()),
            off,
            len,
            dtype,
        };
        let s = dtype.size();
        for d in b.mem.bytes_mut()[..off * s].chunks_exact_mut(s) {
            d.copy_from_slice(&from_f32(dtype, f32::NAN));
        }
        b
    }
    pub fn upload(emu: &'static Emu, host: &[f32], dtype: Dtype) -> DevBuf {
        DevBuf::upload_at(emu, host, dtype, 0)
    }
    pub fn upload_at(emu: &'static Emu, host: &[f32], dtype: Dtype, off: usize) -> DevBuf {
        let mut b = DevBuf::zeros_at(emu, host.len(), dtype, off);
        b.write(host);
        b
    }
    /// NaN everywhere: an element a kernel leaves unwritten fails the comparison.
    pub fn poisoned(emu: &'static Emu, len: usize, dtype: Dtype) -> DevBuf {
        DevBuf::poisoned_at(emu, len, dtype, 0)
    }
    pub fn poisoned_at(emu: &'static Emu, len: usize, dtype: Dtype, off: usize) -> DevBuf {
        DevBuf::upload_at(emu, &vec![f32::NAN; len], dtype, off)
    }
    pub fn write(&mut self, host: &[f32]) {
        assert_eq!(host.len(), self.len);
        let s = self.dtype.size();
        let (dtype, off) = (self.dtype, self.off);
        for (d, &v) in self.mem.bytes_mut()[off * s..]
            .chunks_exact_mut(s)
            .zip(host)
        {
            d.copy_from_slice(&from_f32(dtype, v));
        }
    }
    pub fn download(&self) -> Vec<f32> {
        let s = self.dtype.size();
        self.mem.bytes()[self.off * s..(self.off + self.len) * s]
            .chunks_exact(s)
            .map(|b| to_f32(self.dtype, b))
            .collect()
    }
    pub fn view(&self, range: std::ops::Range<usize>) -> View {
        assert!(range.start <= range.end && range.end <= self.len);
        View {
            ptr: self.mem.ptr as u64 + ((self.off + range.start) * self.dtype.size()) as u64,
            len: range.len(),
            dtype: self.dtype,
            dt: self.dtype.code(),
        }
    }
    pub fn all(&self) -> View {
        self.view(0..self.len)
    }
}

/// Integer data on the device (`Cuda::upload_ints`).
pub struct DevInts {
    mem: Mem,
    pub ptr: u64,
}

impl DevInts {
    pub fn upload<T: Copy>(emu: &'static Emu, host: &[T]) -> DevInts {
        let bytes = std::mem::size_of_val(host);
        let mut mem = Mem::new(emu, bytes.max(1));
        // SAFETY: T is a plain integer type; `bytes` bytes are copied.
        let src = unsafe { std::slice::from_raw_parts(host.as_ptr() as *const u8, bytes) };
        mem.bytes_mut()[..bytes].copy_from_slice(src);
        let ptr = mem.ptr as u64;
        DevInts { mem, ptr }
    }
    /// The contents as T (e.g. f64 partial sums a kernel wrote).
    pub fn download<T: Copy + Default>(&self, n: usize) -> Vec<T> {
        let bytes = self.mem.bytes();
        assert!(n * std::mem::size_of::<T>() <= bytes.len());
        let mut out = vec![T::default(); n];
        // SAFETY: n·size_of::<T>() bytes are in bounds (asserted); T is plain data.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                out.as_mut_ptr() as *mut u8,
                n * std::mem::size_of::<T>(),
            )
        };
        out
    }
}

/// The f32 values of a view (device memory is host memory here).
pub fn read_view(v: View) -> Vec<f32> {
    let s = v.dtype.size();
    // SAFETY: a View is made from a live DevBuf by bounds-checked ranges; no
    // kernel runs while the host reads (launches block until done).
    let bytes = unsafe { std::slice::from_raw_parts(v.ptr as *const u8, v.len * s) };
    bytes.chunks_exact(s).map(|b| to_f32(v.dtype, b)).collect()
}

/// Overwrites a view with `host`, rounded to its storage type.
pub fn write_view(v: View, host: &[f32]) {
    assert_eq!(v.len, host.len());
    let s = v.dtype.size();
    // SAFETY: as in read_view; the caller owns the view mutably by convention.
    let bytes = unsafe { std::slice::from_raw_parts_mut(v.ptr as *mut u8, v.len * s) };
    for (d, &x) in bytes.chunks_exact_mut(s).zip(host) {
        d.copy_from_slice(&from_f32(v.dtype, x));
    }
}
