//! The CPU emulator of kernels/emu/ itself, through its harness
//! (kernels/emu/harness.rs: the kernel program compiled into a host library,
//! kernels launched by name): the source rewrite, the emulator's self-test
//! kernels (kernels/emu/selftest.cu: warp primitives, the <mma.h> stand-in)
//! and its error reports (deadlocks, launches that do not match a kernel).
//! Only a C++ compiler is needed; without one every test prints SKIPPED and
//! passes.
//!
//! The kernels of the program are tested through the REAL CUDA backend on
//! the same emulator in cuda_backend.rs (fake libcuda/libcublas), which also
//! checks that every kernel is launched.

#[path = "../emu/harness.rs"]
mod emu;

use emu::{round, DevBuf, LaunchConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rlhf_kernels::cuda::Dtype;

const F32: Dtype = Dtype::F32;

// ---- helpers --------------------------------------------------------------------

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn random(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[track_caller]
fn assert_rel(what: &str, dt: Dtype, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what} [{}]: length", dt.name());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite(),
            "{what} [{}]: element {i} = {g} (want {w})",
            dt.name()
        );
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    let e = num.sqrt() / den.sqrt().max(1e-30);
    assert!(
        e <= tol,
        "{what} [{}]: rel err {e:.3e} > {tol:.0e}",
        dt.name()
    );
}

fn launch_cfg(grid: (u32, u32, u32), block: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: block,
        shared_mem_bytes: 0,
    }
}

// ---- the library ------------------------------------------------------------------------

/// The emulator library holds exactly the program's kernels (and the self-tests').
#[test]
fn emulator_library_holds_the_program() {
    let Some(e) = emu::emu("emulator_library_holds_the_program") else {
        return;
    };
    let names: Vec<String> = e
        .kernel_names()
        .into_iter()
        .filter(|n| !n.starts_with("emu_selftest_"))
        .collect();
    assert_eq!(
        names,
        rlhf_kernels::cuda::kernel_names(),
        "the library holds the program's kernels"
    );
}

// ---- the emulator itself (kernels/emu/selftest.cu) ---------------------------------------

/// The source rewrite: inline PTX, static and dynamic shared memory; comments
/// and strings untouched, line numbers kept.
#[test]
fn emulator_rewrite() {
    let src = r#"__shared__ float g[4];
extern __shared__ float gdyn[];
// asm("nop"); in a comment, "__shared__" in a string:
const char* s = "asm __shared__";
__device__ void f(unsigned* r, const void* p) {
    __shared__ __align__(16) unsigned char smem[64];
    extern __shared__ __align__(128) unsigned char dyn[];
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(f2(p, 1)) // the address
                 : "memory");
    asm("mov.u32 %0, " /* two literals, */
        "%%laneid;" : "=r"(r[4]));
}
"#;
    let out = emu::rewrite(src).unwrap();
    // Same lines (a #line directive follows a file-scope macro).
    let lines = out.lines().filter(|l| !l.starts_with("#line")).count();
    assert_eq!(lines, src.lines().count(), "{out}");
    for want in [
        "static float g[4]; static ::emu::FileShared emu_file_shared_g(&g, sizeof(g));",
        "#define gdyn (reinterpret_cast<float*>(::emu::g_dyn_base))\n#line 3\n// asm",
        "// asm(\"nop\"); in a comment, \"__shared__\" in a string:",
        "const char* s = \"asm __shared__\";",
        "static __align__(16) unsigned char smem[64]; ::emu::shared_here(&smem, sizeof(smem));",
        "unsigned char* dyn = reinterpret_cast<unsigned char*>(::emu::g_dyn_base);",
        "::emu::ptx(\"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\\n\", \
         {::emu::asm_out(r[0]), ::emu::asm_out(r[1]), ::emu::asm_out(r[2]), ::emu::asm_out(r[3]), \
         ::emu::asm_in(f2(p, 1))});",
    ] {
        assert!(out.contains(want), "missing `{want}` in:\n{out}");
    }
    assert!(
        out.contains("\"%%laneid;\", {::emu::asm_out(r[4])});"),
        "{out}"
    );
    assert!(emu::rewrite("void f() { asm goto(\"x\" :::: l); }").is_err());
}

/// The <mma.h> shim (no kernel of the program uses wmma yet): d = 2·(a·b + c).
#[test]
fn emulator_wmma() {
    let Some(e) = emu::emu("emulator_wmma") else {
        return;
    };
    let mut r = rng(90);
    for dt in [Dtype::Bf16, Dtype::F16] {
        let (a, b, c) = (
            round(dt, &random(&mut r, 256, 1.0)),
            round(dt, &random(&mut r, 256, 1.0)),
            random(&mut r, 256, 1.0),
        );
        let (ab, bb, cb) = (
            DevBuf::upload(e, &a, dt),
            DevBuf::upload(e, &b, dt),
            DevBuf::upload(e, &c, F32),
        );
        let bf = (dt == Dtype::Bf16) as i32;
        let (pa, pb, pc) = (ab.all().ptr, bb.all().ptr, cb.all().ptr);
        let mut l = e.launch_builder("emu_selftest_wmma");
        l.arg(&pa).arg(&pb).arg(&pc).arg(&bf);
        l.launch(launch_cfg((1, 1, 1), (32, 1, 1)));
        let want: Vec<f32> = (0..256)
            .map(|i| {
                let (m, n) = (i / 16, i % 16);
                let dot: f64 = (0..16)
                    .map(|k| a[m * 16 + k] as f64 * b[n * 16 + k] as f64)
                    .sum();
                (2.0 * (dot + c[i] as f64)) as f32
            })
            .collect();
        assert_rel("wmma", dt, &cb.download(), &want, 1e-6);
    }
}

/// Shuffles, votes and __syncthreads against their definitions.
#[test]
fn emulator_warp_primitives() {
    let Some(e) = emu::emu("emulator_warp_primitives") else {
        return;
    };
    let mut r = rng(91);
    let n = 64;
    let mut v = random(&mut r, n, 1.0);
    v[32..].iter_mut().for_each(|x| *x = x.abs() + 0.5); // warp 1: all positive
    let vb = DevBuf::upload(e, &v, F32);
    let out = DevBuf::poisoned(e, 7 * n, F32);
    let (pv, po) = (vb.all().ptr, out.all().ptr);
    let mut l = e.launch_builder("emu_selftest_warp");
    l.arg(&pv).arg(&po);
    l.launch(launch_cfg((1, 1, 1), (n as u32, 1, 1)));
    let got = out.download();
    let total = v.iter().fold(0.0f32, |a, &x| a + x);
    for t in 0..n {
        let (w, l) = (t / 32 * 32, t % 32);
        let lane = |i: usize| v[w + i];
        let ballot = (0..32).fold(0u32, |b, i| b | ((lane(i) > 0.0) as u32) << i);
        let any = (0..32).any(|i| lane(i) > 0.0) as i32;
        let all = (0..32).all(|i| lane(i) > 0.0) as i32;
        let want = [
            lane(l ^ 5),
            lane(31 - l),
            if l + 3 < 32 { lane(l + 3) } else { v[t] },
            if l >= 3 { lane(l - 3) } else { v[t] },
            f32::from_bits(ballot),
            (any + 2 * all) as f32,
            total,
        ];
        assert_eq!(bits(&got[7 * t..7 * t + 7]), bits(&want), "thread {t}");
    }
}

/// A barrier some threads never reach, and a launch that does not match the
/// kernel's parameters, are reported (and the emulator keeps working).
#[test]
fn emulator_reports_errors() {
    let Some(e) = emu::emu("emulator_reports_errors") else {
        return;
    };
    let live = 40i32;
    let cfg = |threads| launch_cfg((1, 1, 1), (threads, 1, 1));
    let msg = e
        .launch_builder("emu_selftest_deadlock")
        .arg(&live)
        .try_launch(cfg(64))
        .unwrap_err();
    assert!(
        msg.contains("deadlock: 40 of 64 threads wait at __syncthreads, 24 have exited"),
        "{msg}"
    );
    let b = DevBuf::poisoned(e, 10, F32);
    let ptr = b.all().ptr;
    let (dt, n32, n64, v) = (0i32, 10i32, 10i64, 1.0f32);
    let msg = e
        .launch_builder("fill")
        .arg(&ptr)
        .arg(&dt)
        .arg(&n32)
        .arg(&v)
        .try_launch(cfg(32))
        .unwrap_err();
    assert!(
        msg.contains("argument 2 is 8 bytes, the launch passed 4"),
        "{msg}"
    ); // n is i64
    let msg = e
        .launch_builder("fill")
        .arg(&ptr)
        .arg(&dt)
        .arg(&n64)
        .try_launch(cfg(32))
        .unwrap_err();
    assert!(
        msg.contains("fill takes 4 arguments, the launch passed 3"),
        "{msg}"
    );
    let msg = e
        .launch_builder("fill")
        .arg(&ptr)
        .arg(&dt)
        .arg(&n64)
        .arg(&v)
        .try_launch(cfg(2048))
        .unwrap_err();
    assert!(msg.contains("invalid launch"), "{msg}");
    let msg = e
        .launch_builder("no_such_kernel")
        .try_launch(cfg(32))
        .unwrap_err();
    assert!(msg.contains("no kernel named no_such_kernel"), "{msg}");
    let two = 2.0f32;
    e.launch_builder("fill")
        .arg(&ptr)
        .arg(&dt)
        .arg(&n64)
        .arg(&two)
        .launch(cfg(32));
    assert_eq!(b.download(), vec![2.0; 10]);
}
