//! EVERY op of the REAL CUDA backend (`rlhf_kernels::cuda::Cuda`: cudarc,
//! every launcher of kernels/src/cuda/*.rs, memory.rs, gemm.rs) against the
//! CPU backend, for f32, bf16 and fp16 compute. One suite, two devices:
//! - in plain `cargo test` (no GPU), the CPU emulator of the kernels through
//!   fake `libcuda.so.1` / `libcublas.so.13` (kernels/emu/fake/,
//!   `rlhf_kernels::emu`). NVRTC is real (`eval "$(scripts/fetch-nvrtc.sh)"`);
//!   without it, or without a C++ compiler, every test prints SKIPPED and
//!   passes (with RLHF_REQUIRE_NVRTC set, a missing NVRTC fails);
//! - with RLHF_REQUIRE_GPU=1 (scripts/gpu-check.sh), the real GPU 0 and real
//!   cuBLAS; an unusable GPU is then a failure.
//!
//! `every_kernel_is_launched` checks (on the emulator) that the suite launches
//! every kernel of the program. The emulator's own tests are in emu_kernels.rs.
//!
//! The CPU sees inputs rounded to the storage type; outputs start as NaN (an
//! element left unwritten fails), gradients start random (checks the +=).
//! Relative L2 error ≤ 1e-5 (f32), 1e-2 (bf16), 5e-3 (fp16); dropout masks
//! must match exactly. Ops with block- or warp-level cooperation are run a
//! second time and must give the same bits (on the emulator every launch gets
//! another block order and thread schedule). Shapes are small: the emulator
//! runs one fiber per CUDA thread. Its own test binary: the CUDA libraries are
//! opened once per process. RLHF_EMU_SEED and RLHF_EMU_PATCH work as described
//! in kernels/emu/harness.rs.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rlhf_kernels::backend::dropout_keep;
use rlhf_kernels::backend::KvAttnShape;
use rlhf_kernels::cuda::{Cuda, CudaBuf, CudaView, CudaViewMut, Dtype};
use rlhf_kernels::{AdamW, AttnShape, Backend, Cpu, Gemm, LoraDropout, LoraShape, Precision};
use std::path::Path;
use std::sync::OnceLock;

const CASES: [(Dtype, f64); 3] = [(Dtype::F32, 1e-5), (Dtype::Bf16, 1e-2), (Dtype::F16, 5e-3)];
const C: Precision = Precision::Compute;
const F: Precision = Precision::F32;
const F32: Dtype = Dtype::F32;

/// Whether this run is on a real GPU (RLHF_REQUIRE_GPU set) rather than the emulator.
fn on_gpu() -> bool {
    std::env::var_os("RLHF_REQUIRE_GPU").is_some()
}

/// One backend per compute dtype — on the real GPU or the emulated device —
/// or none (SKIPPED).
fn backends(test: &str) -> Vec<(Cuda, f64)> {
    static ALL: OnceLock<Vec<(Cuda, f64)>> = OnceLock::new();
    if !on_gpu() && !rlhf_kernels::emu::use_fake_cuda(test, Path::new(env!("CARGO_TARGET_TMPDIR")))
    {
        return Vec::new();
    }
    ALL.get_or_init(|| {
        CASES
            .iter()
            .map(|&(dt, tol)| {
                let cu = Cuda::new(0, dt).unwrap_or_else(|e| panic!("Cuda::new({dt:?}): {e}"));
                (cu, tol)
            })
            .collect()
    })
    .clone()
}

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn random(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    let scale = if scale > 0.0 { scale } else { 1.0 };
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

/// |v| ≥ 0.25: a zero output can only come from a dropped element.
fn nonzero(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v: f32 = r.random_range(-1.0..1.0);
            if v < 0.0 {
                v - 0.25
            } else {
                v + 0.25
            }
        })
        .collect()
}

fn rms(x: &[f32]) -> f32 {
    (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len().max(1) as f64).sqrt() as f32
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn dtype_of(cu: &Cuda, p: Precision) -> Dtype {
    match p {
        Precision::F32 => Dtype::F32,
        Precision::Compute => cu.dtype(),
    }
}

/// `x` as a buffer of storage type `dt` holds it.
fn round(dt: Dtype, x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| match dt {
            Dtype::F32 => v,
            Dtype::Bf16 => half::bf16::from_f32(v).to_f32(),
            Dtype::F16 => half::f16::from_f32(v).to_f32(),
        })
        .collect()
}

/// `x` as a buffer of `p` on `cu` holds it.
fn rounded(cu: &Cuda, p: Precision, x: &[f32]) -> Vec<f32> {
    round(dtype_of(cu, p), x)
}

fn up<B: Backend>(be: &B, x: &[f32], p: Precision) -> B::Buf {
    be.upload(x, p).expect("upload")
}

fn nan<B: Backend>(be: &B, n: usize, p: Precision) -> B::Buf {
    up(be, &vec![f32::NAN; n], p)
}

fn down<B: Backend>(be: &B, b: &B::Buf) -> Vec<f32> {
    be.download(be.view(b, 0..be.len(b))).expect("download")
}

/// A device tensor of any storage type: `n` elements `off` elements into
/// its buffer (the elements before it are NaN).
struct Dev<'c> {
    cu: &'c Cuda,
    buf: CudaBuf,
    off: usize,
    n: usize,
}

impl<'c> Dev<'c> {
    fn at(cu: &'c Cuda, x: &[f32], dt: Dtype, off: usize) -> Self {
        let n = x.len();
        let mut buf = cu.alloc(off + n, dt).expect("alloc");
        let mut host = vec![f32::NAN; off];
        host.extend_from_slice(x);
        cu.write(cu.view_mut(&mut buf, 0..off + n), &host)
            .expect("write");
        Dev { cu, buf, off, n }
    }
    fn new(cu: &'c Cuda, x: &[f32], dt: Dtype) -> Self {
        Self::at(cu, x, dt, 0)
    }
    /// NaN everywhere: an element left unwritten fails.
    fn poisoned_at(cu: &'c Cuda, n: usize, dt: Dtype, off: usize) -> Self {
        Self::at(cu, &vec![f32::NAN; n], dt, off)
    }
    fn poisoned(cu: &'c Cuda, n: usize, dt: Dtype) -> Self {
        Self::poisoned_at(cu, n, dt, 0)
    }
    fn v(&self) -> CudaView<'_> {
        self.cu.view(&self.buf, self.off..self.off + self.n)
    }
    fn m(&mut self) -> CudaViewMut<'_> {
        self.cu.view_mut(&mut self.buf, self.off..self.off + self.n)
    }
    fn get(&self) -> Vec<f32> {
        self.cu.download(self.v()).expect("download")
    }
}

#[track_caller]
fn assert_rel(what: &str, cu: &Cuda, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite(),
            "{what} [{}] [{i}] = {g} (want {w})",
            cu.dtype().name()
        );
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    let e = num.sqrt() / den.sqrt().max(1e-30);
    // scripts/gpu-check.sh collects these lines into its report.
    eprintln!(
        "{what} [{}]: rel err {e:.2e} (tol {tol:.0e})",
        cu.dtype().name()
    );
    assert!(
        e <= tol,
        "{what} [{}]: rel err {e:.3e} > {tol:.0e}",
        cu.dtype().name()
    );
}

/// Runs `f` twice — on the emulator every launch gets another block order
/// and thread schedule — and requires the same bits.
#[track_caller]
fn deterministic(what: &str, f: impl Fn() -> Vec<Vec<f32>>) -> Vec<Vec<f32>> {
    let a = f();
    let b = f();
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            bits(x) == bits(y),
            "{what}: output {i} differs under another block order / thread schedule"
        );
    }
    a
}

// ---- the device itself --------------------------------------------------------

#[test]
fn device_opens_and_round_trips() {
    for (cu, _) in backends("device_opens_and_round_trips") {
        if !on_gpu() {
            assert_eq!(cu.device_name(), "emulated");
            assert_eq!(cu.arch(), "sm_90");
        }
        let (free, total) = cu.mem_info().unwrap();
        assert!(free <= total && total > 0);
        let x: Vec<f32> = (0..37).map(|i| i as f32 * 0.25 - 3.0).collect();
        for p in [C, F] {
            let mut b = up(&cu, &x, p);
            assert_eq!(down(&cu, &b), x, "{p:?}"); // exact in every type
            cu.fill(cu.view_mut(&mut b, 3..9), 1.5).unwrap();
            let mut want = x.clone();
            want[3..9].fill(1.5);
            assert_eq!(down(&cu, &b), want);
            // copy across storage types and within one
            let mut o = nan(&cu, 37, if p == C { F } else { C });
            cu.copy(cu.view_mut(&mut o, 0..37), cu.view(&b, 0..37))
                .unwrap();
            assert_eq!(down(&cu, &o), want);
            let mut o2 = nan(&cu, 10, p);
            cu.copy(cu.view_mut(&mut o2, 0..10), cu.view(&b, 20..30))
                .unwrap();
            assert_eq!(down(&cu, &o2), want[20..30]);
        }
        cu.synchronize().unwrap();
    }
}

// ---- GEMM (cuBLAS, or the fake one, through gemm.rs) ----------------------------------------------

#[test]
fn gemm_matches_cpu_for_every_layout_and_precision() {
    for (cu, tol) in backends("gemm_matches_cpu_for_every_layout_and_precision") {
        let mut r = rng(3);
        let (m, n, k) = (7, 12, 9);
        for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
            for accumulate in [false, true] {
                for (pa, pb, po) in [
                    (C, C, C),
                    (C, F, C),
                    (F, C, C),
                    (C, C, F),
                    (F, F, F),
                    (F, F, C),
                    (C, F, F),
                ] {
                    let g = Gemm {
                        m,
                        n,
                        k,
                        trans_a,
                        trans_b,
                        alpha: 0.75,
                        accumulate,
                    };
                    let a = rounded(&cu, pa, &random(&mut r, m * k, 1.0));
                    let b = rounded(&cu, pb, &random(&mut r, k * n, 1.0));
                    let init = rounded(&cu, po, &random(&mut r, m * n, 1.0));
                    let mut want = init.clone();
                    Cpu.gemm(&mut want, &a, &b, g).unwrap();
                    let (da, db) = (up(&cu, &a, pa), up(&cu, &b, pb));
                    let mut out = if accumulate {
                        up(&cu, &init, po)
                    } else {
                        nan(&cu, m * n, po)
                    };
                    cu.gemm(
                        cu.view_mut(&mut out, 0..m * n),
                        cu.view(&da, 0..m * k),
                        cu.view(&db, 0..k * n),
                        g,
                    )
                    .unwrap();
                    let what = format!("gemm tA={trans_a} tB={trans_b} acc={accumulate} a={pa:?} b={pb:?} out={po:?}");
                    assert_rel(&what, &cu, &down(&cu, &out), &want, tol);
                }
            }
        }
        // k = 0: an empty sum.
        let g = Gemm {
            m: 2,
            n: 3,
            k: 0,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            accumulate: false,
        };
        let (a, b) = (cu.zeros(0, C).unwrap(), cu.zeros(0, C).unwrap());
        let mut out = nan(&cu, 6, C);
        cu.gemm(
            cu.view_mut(&mut out, 0..6),
            cu.view(&a, 0..0),
            cu.view(&b, 0..0),
            g,
        )
        .unwrap();
        assert_eq!(down(&cu, &out), vec![0.0; 6]);
    }
}

// ---- memory ---------------------------------------------------------------------

#[test]
fn fill_and_convert_match_cpu() {
    // Every storage type is allocated on one device (`Cuda::alloc`).
    let Some((cu, _)) = backends("fill_and_convert_match_cpu").into_iter().next() else {
        return;
    };
    let cu = &cu;
    let mut r = rng(1);
    let n = 1000 + 3;
    for (dt, _) in CASES {
        let mut b = Dev::poisoned(cu, n, dt);
        cu.fill(b.m(), -0.3).unwrap();
        let mut want = vec![f32::NAN; n];
        Cpu.fill(&mut want, -0.3).unwrap();
        assert_eq!(
            bits(&b.get()),
            bits(&round(dt, &want)),
            "fill [{}]",
            dt.name()
        );
    }
    // Every pair of storage types, with values that round, overflow fp16,
    // are fp16-subnormal or underflow it, signed zeros and infinities.
    let mut x = random(&mut r, n, 3.0);
    let special = [
        7e4,
        -7e4,
        65504.0,
        6e-5,
        3e-6,
        -2e-8,
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e30,
        1.0 + 1.0 / 256.0, // ties: bf16 rounds to even (down, up), fp16 too
        1.0 + 3.0 / 256.0,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        65520.0,                         // fp16: a tie between 65504 and 2^16 (inf)
        1.5 * 2f32.powi(-24),            // fp16 subnormal tie
        2f32.powi(-25),                  // fp16: a tie between 0 and the least subnormal
        2f32.powi(-25) + 2f32.powi(-40), // just above it
        2f32.powi(-14) - 2f32.powi(-25), // the subnormal / normal boundary
    ];
    x[..special.len()].copy_from_slice(&special);
    for (src_dt, _) in CASES {
        let src = Dev::new(cu, &x, src_dt);
        for (dst_dt, _) in CASES {
            let mut dst = Dev::poisoned(cu, n, dst_dt);
            cu.copy(dst.m(), src.v()).unwrap();
            let want = round(dst_dt, &round(src_dt, &x));
            assert_eq!(
                bits(&dst.get()),
                bits(&want),
                "convert {} -> {} (round to nearest even, as the half crate)",
                src_dt.name(),
                dst_dt.name()
            );
        }
    }
    // NaN stays NaN.
    let src = Dev::new(cu, &[f32::NAN, 1.0], F32);
    for (dt, _) in CASES {
        let mut dst = Dev::poisoned(cu, 2, dt);
        cu.fill(dst.m(), 0.0).unwrap();
        cu.copy(dst.m(), src.v()).unwrap();
        let got = dst.get();
        assert!(
            got[0].is_nan() && got[1] == 1.0,
            "convert NaN [{}]: {got:?}",
            dt.name()
        );
    }
}

// ---- elementwise ------------------------------------------------------------------

#[test]
fn axpy_scale_sum_squares_match_cpu() {
    let all = backends("axpy_scale_sum_squares_match_cpu");
    let mut r = rng(2);
    for (cu, tol) in &all {
        let (cu, tol, dt) = (cu, *tol, cu.dtype());
        let n = 3000 + 13;
        let x = random(&mut r, n, 1.0);
        let y0 = random(&mut r, n, 1.0);
        let xb = Dev::new(cu, &x, dt);
        // An f32 accumulator and a compute-dtype y.
        for ydt in [F32, dt] {
            let mut yb = Dev::new(cu, &y0, ydt);
            cu.axpy(yb.m(), -0.75, xb.v()).unwrap();
            let mut want = round(ydt, &y0);
            Cpu.axpy(&mut want, -0.75, &round(dt, &x)).unwrap();
            assert_rel(
                &format!("axpy (y {})", ydt.name()),
                cu,
                &yb.get(),
                &want,
                tol,
            );
        }
        for p in [F32, dt] {
            let mut b = Dev::new(cu, &x, p);
            cu.scale(b.m(), -1.5).unwrap();
            let mut want = round(p, &x);
            Cpu.scale(&mut want, -1.5).unwrap();
            assert_rel("scale", cu, &b.get(), &want, tol);
        }
        // One block with idle threads; several blocks.
        for n in [100, 9000] {
            let x = random(&mut r, n, 2.0);
            let b = Dev::new(cu, &x, dt);
            let got = deterministic("sum_squares", || {
                vec![vec![cu.sum_squares(b.v()).unwrap() as f32]]
            });
            let got64 = cu.sum_squares(b.v()).unwrap();
            let want = Cpu.sum_squares(&round(dt, &x)).unwrap();
            assert!(
                (got64 - want).abs() <= 1e-12 * want,
                "sum_squares n={n} [{}]: {got64} vs {want}",
                dt.name()
            );
            assert_eq!(got[0][0], got64 as f32);
        }
        // inf and NaN propagate.
        let mut x = random(&mut r, 5000, 1.0);
        x[4321] = f32::INFINITY;
        assert_eq!(
            cu.sum_squares(Dev::new(cu, &x, dt).v()).unwrap(),
            f64::INFINITY
        );
        x[17] = f32::NAN;
        assert!(cu.sum_squares(Dev::new(cu, &x, dt).v()).unwrap().is_nan());
    }
    // Long enough that the grid is capped (1024 blocks, each thread strides).
    if let Some((cu, _)) = all.first() {
        let x = random(&mut r, 4_500_001, 1.0);
        let got = cu.sum_squares(Dev::new(cu, &x, F32).v()).unwrap();
        let want = Cpu.sum_squares(&x).unwrap();
        assert!(
            (got - want).abs() <= 1e-12 * want,
            "sum_squares (capped grid): {got} vs {want}"
        );
    }
}

// ---- bias ---------------------------------------------------------------------------

#[test]
fn bias_matches_cpu() {
    let all = backends("bias_matches_cpu");
    let mut r = rng(3);
    // 150 rows: three chunks of the column reduction; 70 columns: a partial
    // warp of columns; 300: two column blocks.
    let rows = 150;
    for (c, cu, tol) in all
        .iter()
        .flat_map(|(cu, tol)| [(70, cu, *tol), (300, cu, *tol)])
    {
        let dt = cu.dtype();
        for bdt in [F32, dt] {
            let x = random(&mut r, rows * c, 1.0);
            let bias = random(&mut r, c, 1.0);
            let mut xb = Dev::new(cu, &x, dt);
            let bb = Dev::new(cu, &bias, bdt);
            cu.add_bias(xb.m(), bb.v(), c).unwrap();
            let mut want = round(dt, &x);
            Cpu.add_bias(&mut want, &round(bdt, &bias), c).unwrap();
            assert_rel(
                &format!("add_bias (bias {})", bdt.name()),
                cu,
                &xb.get(),
                &want,
                tol,
            );
        }
        let dout = random(&mut r, rows * c, 1.0);
        let db0 = random(&mut r, c, 1.0);
        let doutb = Dev::new(cu, &dout, dt);
        let got = deterministic("bias_backward", || {
            let mut dbb = Dev::new(cu, &db0, F32);
            cu.bias_backward(dbb.m(), doutb.v(), c).unwrap();
            vec![dbb.get()]
        });
        let mut want = db0.clone();
        Cpu.bias_backward(&mut want, &round(dt, &dout), c).unwrap();
        assert_rel("bias_backward", cu, &got[0], &want, tol);
    }
}

// ---- embedding ----------------------------------------------------------------------

#[test]
fn embedding_matches_cpu() {
    let all = backends("embedding_matches_cpu");
    let mut r = rng(4);
    let n = 64;
    // C = 48: one column per thread; C = 300: threads stride over the columns.
    for (v, c, cu, tol) in all
        .iter()
        .flat_map(|(cu, tol)| [(37, 48, cu, *tol), (20, 300, cu, *tol)])
    {
        let dt = cu.dtype();
        let mut ids: Vec<u32> = (0..n).map(|_| r.random_range(0..v as u32)).collect();
        ids[n - 1] = ids[0];
        ids[1] = v as u32 - 1;
        for tp in [F32, dt] {
            let table = random(&mut r, v * c, 1.0);
            let tb = Dev::new(cu, &table, tp);
            let mut out = Dev::poisoned(cu, n * c, dt);
            cu.embedding_forward(out.m(), tb.v(), &ids, c).unwrap();
            let mut want = vec![0.0f32; n * c];
            Cpu.embedding_forward(&mut want, &round(tp, &table), &ids, c)
                .unwrap();
            assert_rel("embedding_forward", cu, &out.get(), &want, tol);
        }
        let dout = random(&mut r, n * c, 1.0);
        let dt0 = random(&mut r, v * c, 1.0);
        let doutb = Dev::new(cu, &dout, dt);
        let got = deterministic("embedding_backward", || {
            let mut dtb = Dev::new(cu, &dt0, F32);
            cu.embedding_backward(dtb.m(), doutb.v(), &ids, c).unwrap();
            vec![dtb.get()]
        });
        let mut want = dt0.clone();
        Cpu.embedding_backward(&mut want, &round(dt, &dout), &ids, c)
            .unwrap();
        assert_rel("embedding_backward", cu, &got[0], &want, tol);
    }
}

// ---- RMSNorm ---------------------------------------------------------------------------

#[test]
fn rmsnorm_matches_cpu() {
    let all = backends("rmsnorm_matches_cpu");
    let mut r = rng(5);
    let eps = 1e-6f32;
    // 70 rows: two chunks of the dw reduction; 200 columns: idle threads in a
    // row block; 600: threads stride over the row.
    let n = 70;
    for (c, cu, tol) in all
        .iter()
        .flat_map(|(cu, tol)| [(200, cu, *tol), (600, cu, *tol)])
    {
        let dt = cu.dtype();
        for wp in [F32, dt] {
            let x = random(&mut r, n * c, 2.0);
            let w: Vec<f32> = random(&mut r, c, 0.5).iter().map(|v| 1.0 + v).collect();
            let (xr, wr) = (round(dt, &x), round(wp, &w));
            let (xb, wb) = (Dev::new(cu, &x, dt), Dev::new(cu, &w, wp));
            let fwd = deterministic("rmsnorm_forward", || {
                let mut out = Dev::poisoned(cu, n * c, dt);
                let mut rstd = Dev::poisoned(cu, n, F32);
                cu.rmsnorm_forward(out.m(), rstd.m(), xb.v(), wb.v(), c, eps)
                    .unwrap();
                vec![out.get(), rstd.get()]
            });
            let mut want_out = vec![0.0; n * c];
            let mut want_rstd = vec![0.0; n];
            Cpu.rmsnorm_forward(&mut want_out, &mut want_rstd, &xr, &wr, c, eps)
                .unwrap();
            assert_rel("rmsnorm out", cu, &fwd[0], &want_out, tol);
            assert_rel("rmsnorm rstd", cu, &fwd[1], &want_rstd, 1e-6);

            let dout = random(&mut r, n * c, 1.0);
            let dx0 = random(&mut r, n * c, 1.0);
            let dw0 = random(&mut r, c, 1.0);
            let doutb = Dev::new(cu, &dout, dt);
            let rstdb = Dev::new(cu, &want_rstd, F32);
            for with_dw in [true, false] {
                let got = deterministic("rmsnorm_backward", || {
                    let mut dxb = Dev::new(cu, &dx0, dt);
                    let mut dwb = Dev::new(cu, &dw0, F32);
                    cu.rmsnorm_backward(
                        dxb.m(),
                        with_dw.then(|| dwb.m()),
                        doutb.v(),
                        xb.v(),
                        wb.v(),
                        rstdb.v(),
                        c,
                    )
                    .unwrap();
                    vec![dxb.get(), dwb.get()]
                });
                let mut want_dx = round(dt, &dx0);
                let mut want_dw = dw0.clone();
                Cpu.rmsnorm_backward(
                    &mut want_dx,
                    with_dw.then_some(&mut want_dw[..]),
                    &round(dt, &dout),
                    &xr,
                    &wr,
                    &want_rstd,
                    c,
                )
                .unwrap();
                assert_rel("rmsnorm dx", cu, &got[0], &want_dx, tol);
                if with_dw {
                    assert_rel("rmsnorm dw", cu, &got[1], &want_dw, tol);
                } else {
                    assert_eq!(bits(&got[1]), bits(&dw0), "rmsnorm without dw wrote dw");
                }
            }
        }
    }
}

// ---- rotary embedding ---------------------------------------------------------------------

#[test]
fn rope_matches_cpu() {
    let all = backends("rope_matches_cpu");
    let mut r = rng(6);
    let (n, heads, hd, p) = (12, 3, 16, 40);
    let half = hd / 2;
    let angle = |pos: usize, i: usize| pos as f32 / 10_000f32.powf(2.0 * i as f32 / hd as f32);
    let cos: Vec<f32> = (0..p * half)
        .map(|k| angle(k / half, k % half).cos())
        .collect();
    let sin: Vec<f32> = (0..p * half)
        .map(|k| angle(k / half, k % half).sin())
        .collect();
    let positions: Vec<u32> = (0..n).map(|_| r.random_range(0..p as u32)).collect();
    for (cu, tol) in &all {
        let (cu, tol, dt) = (cu, *tol, cu.dtype());
        let (cb, sb) = (Dev::new(cu, &cos, F32), Dev::new(cu, &sin, F32));
        for backward in [false, true] {
            let x = random(&mut r, n * heads * hd, 1.0);
            let mut xb = Dev::new(cu, &x, dt);
            let mut want = round(dt, &x);
            if backward {
                cu.rope_backward(xb.m(), cb.v(), sb.v(), &positions, heads, hd)
                    .unwrap();
                Cpu.rope_backward(&mut want, &cos, &sin, &positions, heads, hd)
                    .unwrap();
            } else {
                cu.rope_forward(xb.m(), cb.v(), sb.v(), &positions, heads, hd)
                    .unwrap();
                Cpu.rope_forward(&mut want, &cos, &sin, &positions, heads, hd)
                    .unwrap();
            }
            assert_rel(
                if backward {
                    "rope_backward"
                } else {
                    "rope_forward"
                },
                cu,
                &xb.get(),
                &want,
                tol,
            );
        }
    }
}

// ---- SwiGLU --------------------------------------------------------------------------------

#[test]
fn swiglu_matches_cpu() {
    let all = backends("swiglu_matches_cpu");
    let mut r = rng(7);
    let n = 2000 + 7;
    for (cu, tol) in &all {
        let (cu, tol, dt) = (cu, *tol, cu.dtype());
        let mut gate = random(&mut r, n, 4.0);
        gate[0] = 80.0; // saturated sigmoids stay finite
        gate[1] = -80.0;
        let up = random(&mut r, n, 2.0);
        let (gr, ur) = (round(dt, &gate), round(dt, &up));
        let (gb, ub) = (Dev::new(cu, &gate, dt), Dev::new(cu, &up, dt));
        let mut out = Dev::poisoned(cu, n, dt);
        cu.swiglu_forward(out.m(), gb.v(), ub.v()).unwrap();
        let mut want = vec![0.0; n];
        Cpu.swiglu_forward(&mut want, &gr, &ur).unwrap();
        assert_rel("swiglu_forward", cu, &out.get(), &want, tol);

        let dout = random(&mut r, n, 1.0);
        let (dg0, du0) = (random(&mut r, n, 1.0), random(&mut r, n, 1.0));
        let (mut dgb, mut dub) = (Dev::new(cu, &dg0, dt), Dev::new(cu, &du0, dt));
        cu.swiglu_backward(
            dgb.m(),
            dub.m(),
            Dev::new(cu, &dout, dt).v(),
            gb.v(),
            ub.v(),
        )
        .unwrap();
        let (mut wg, mut wu) = (round(dt, &dg0), round(dt, &du0));
        Cpu.swiglu_backward(&mut wg, &mut wu, &round(dt, &dout), &gr, &ur)
            .unwrap();
        assert_rel("swiglu dgate", cu, &dgb.get(), &wg, tol);
        assert_rel("swiglu dup", cu, &dub.get(), &wu, tol);
    }
}

// ---- dropout -------------------------------------------------------------------------------

#[test]
fn dropout_matches_cpu_mask_exactly() {
    let all = backends("dropout_matches_cpu_mask_exactly");
    let mut r = rng(8);
    let n = 3000 + 1;
    for (cu, tol) in &all {
        let (cu, tol, dt) = (cu, *tol, cu.dtype());
        for (p, seed) in [
            (0.3f32, 0x1234_5678_9abc_def0u64),
            (0.9, 7),
            (0.0, 1),
            (1.0, 2),
        ] {
            let x = nonzero(&mut r, n);
            let xb = Dev::new(cu, &x, dt);
            let mut out = Dev::poisoned(cu, n, dt);
            cu.dropout_forward(out.m(), xb.v(), p, seed).unwrap();
            let got = out.get();
            let mut want = vec![0.0; n];
            Cpu.dropout_forward(&mut want, &round(dt, &x), p, seed)
                .unwrap();
            for i in 0..n {
                let keep = dropout_keep(seed, i as u64, p);
                assert_eq!(
                    got[i] != 0.0,
                    keep,
                    "dropout_forward p={p} element {i} [{}]",
                    dt.name()
                );
                assert_eq!(want[i] != 0.0, keep, "cpu dropout p={p} element {i}");
            }
            assert_rel(&format!("dropout_forward p={p}"), cu, &got, &want, tol);

            let dout = nonzero(&mut r, n);
            let dx0 = random(&mut r, n, 1.0);
            let mut dxb = Dev::new(cu, &dx0, dt);
            cu.dropout_backward(dxb.m(), Dev::new(cu, &dout, dt).v(), p, seed)
                .unwrap();
            let mut want = round(dt, &dx0);
            Cpu.dropout_backward(&mut want, &round(dt, &dout), p, seed)
                .unwrap();
            let got = dxb.get();
            let dx0r = round(dt, &dx0);
            for i in 0..n {
                if !dropout_keep(seed, i as u64, p) {
                    assert_eq!(
                        got[i], dx0r[i],
                        "dropout_backward p={p}: dropped element {i} changed"
                    );
                }
            }
            assert_rel(&format!("dropout_backward p={p}"), cu, &got, &want, tol);
        }
    }
}

// ---- cross-entropy ----------------------------------------------------------------------------

#[test]
fn cross_entropy_matches_cpu() {
    let all = backends("cross_entropy_matches_cpu");
    let mut r = rng(9);
    // V = 300 < 512 threads (idle threads), V = 1100 (a thread reads several
    // logits); ignored rows; the first and last ids.
    for (v, cu, tol) in all
        .iter()
        .flat_map(|(cu, tol)| [(300, cu, *tol), (1100, cu, *tol)])
    {
        let dt = cu.dtype();
        let targets = [-100, 0, v as i32 - 1, 5, -100, 150, 42];
        let n = targets.len();
        let mut logits = random(&mut r, n * v, 4.0);
        logits[3 * v + 7] = 40.0; // a dominant logit
        logits[5 * v..6 * v].iter_mut().for_each(|x| *x -= 30.0); // a shifted row
        let lr = round(dt, &logits);
        // One scale per row: distinct, negative, an exact 0 (row 2) and one
        // on an ignored row (row 4, must still give a zero row).
        let scales: [f32; 7] = [0.5, 0.25, 0.0, -1.5, 3.0, 2.0, -0.125];
        for grad_scales in [None, Some(&scales[..])] {
            let got = deterministic("cross_entropy", || {
                let mut lb = Dev::new(cu, &logits, dt);
                let loss = cu.cross_entropy(lb.m(), &targets, v, grad_scales).unwrap();
                vec![loss, lb.get()]
            });
            let mut want_logits = lr.clone();
            let want = Cpu
                .cross_entropy(&mut want_logits, &targets, v, grad_scales)
                .unwrap();
            let with = if grad_scales.is_some() {
                "with grad"
            } else {
                "loss only"
            };
            assert_rel(
                &format!("cross_entropy loss ({with})"),
                cu,
                &got[0],
                &want,
                tol.max(1e-6),
            );
            for (row, &t) in targets.iter().enumerate() {
                if t == -100 {
                    assert_eq!(got[0][row], 0.0, "ignored row {row} has a loss");
                }
            }
            if grad_scales.is_some() {
                assert_rel("cross_entropy grad", cu, &got[1], &want_logits, tol);
                // Each row on its own (a row's error cannot hide in the
                // others'): zero rows exactly zero, the others to tolerance.
                for row in 0..n {
                    let (g, w) = (
                        &got[1][row * v..(row + 1) * v],
                        &want_logits[row * v..(row + 1) * v],
                    );
                    if targets[row] == -100 || scales[row] == 0.0 {
                        assert!(g.iter().all(|&x| x == 0.0), "row {row} must be zero");
                    } else {
                        assert_rel(&format!("cross_entropy grad row {row}"), cu, g, w, tol);
                    }
                }
            } else {
                assert_eq!(
                    bits(&got[1]),
                    bits(&lr),
                    "cross_entropy without grad_scales wrote the logits"
                );
            }
        }
    }
    // A NaN logit makes the row's loss NaN (the kernel's documented
    // behaviour), as on the CPU (simd::exp keeps NaN).
    for (cu, _) in &all {
        let mut logits = vec![0.5f32; 2 * 40];
        logits[7] = f32::NAN;
        let mut lb = Dev::new(cu, &logits, cu.dtype());
        let loss = cu
            .cross_entropy(lb.m(), &[3, 3], 40, Some(&[1.0, 1.0]))
            .unwrap();
        let cpu_loss = Cpu
            .cross_entropy(&mut logits.clone(), &[3, 3], 40, Some(&[1.0, 1.0]))
            .unwrap();
        for l in [&loss, &cpu_loss] {
            assert!(
                l[0].is_nan() && (l[1] - 40f32.ln()).abs() < 1e-6,
                "{l:?} [{}]",
                cu.dtype().name()
            );
        }
    }
    // Wrong number of scales: the CPU op's Shape error, nothing written.
    for (cu, _) in &all {
        let logits = vec![0.5f32; 2 * 40];
        let mut lb = Dev::new(cu, &logits, cu.dtype());
        let err = cu
            .cross_entropy(lb.m(), &[3, 3], 40, Some(&[1.0]))
            .unwrap_err();
        assert!(err.to_string().contains("grad_scales"), "{err}");
        assert_eq!(lb.get(), round(cu.dtype(), &logits));
    }
}

// ---- softmax entropy -----------------------------------------------------------------------

#[test]
fn softmax_entropy_matches_cpu() {
    let all = backends("softmax_entropy_matches_cpu");
    let mut r = rng(19);
    let ninf = f32::NEG_INFINITY;
    // V = 300 < 512 threads (idle threads), V = 1100 (a thread reads several
    // logits and rescales its running max).
    for (v, cu, tol) in all
        .iter()
        .flat_map(|(cu, tol)| [(300, cu, *tol), (1100, cu, *tol)])
    {
        let dt = cu.dtype();
        let n = 6;
        let mut logits = random(&mut r, n * v, 4.0);
        logits[v + 7] = 40.0; // row 1: one dominant logit (H ≈ 0)
        logits[2 * v..3 * v].iter_mut().for_each(|x| *x -= 30.0); // row 2: shifted
        logits[3 * v..4 * v].iter_mut().for_each(|x| *x = 2.5); // row 3: uniform (ln V)
        for j in (0..v).filter(|j| j % 3 != 1) {
            logits[4 * v + j] = ninf; // row 4: two thirds masked out
        }
        logits[5 * v..6 * v].iter_mut().for_each(|x| *x *= 5.0); // row 5: peaked
        let lr = round(dt, &logits);
        let got = deterministic("softmax_entropy", || {
            let lb = Dev::at(cu, &logits, dt, 3);
            let h = cu.softmax_entropy(lb.v(), v).unwrap();
            vec![h, lb.get()]
        });
        assert_eq!(bits(&got[1]), bits(&lr), "softmax_entropy wrote the logits");
        let want = Cpu.softmax_entropy(&lr, v).unwrap();
        assert_rel("softmax_entropy", cu, &got[0], &want, tol.max(1e-6));
        // Each row on its own (the small entropy of row 1 cannot hide in the
        // others'): against the CPU on the same rounded inputs.
        for row in 0..n {
            let (g, w) = (got[0][row] as f64, want[row] as f64);
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "softmax_entropy row {row} [{}]: {g} vs {w}",
                dt.name()
            );
        }
        assert!(
            (got[0][3] as f64 - (v as f64).ln()).abs() < 1e-5,
            "uniform row"
        );
    }
    // NaN propagates to its row only; a row without a finite logit is NaN.
    for (cu, _) in &all {
        let mut logits = vec![0.5f32; 3 * 40];
        logits[7] = f32::NAN;
        logits[80..120].iter_mut().for_each(|x| *x = ninf);
        let lb = Dev::new(cu, &logits, cu.dtype());
        let h = cu.softmax_entropy(lb.v(), 40).unwrap();
        assert!(
            h[0].is_nan() && (h[1] - 40f32.ln()).abs() < 1e-6 && h[2].is_nan(),
            "{h:?} [{}]",
            cu.dtype().name()
        );
        let err = cu.softmax_entropy(lb.v(), 7).unwrap_err();
        assert!(err.to_string().contains("softmax_entropy"), "{err}");
    }
}

// ---- AdamW -------------------------------------------------------------------------------

#[test]
fn adamw_matches_cpu() {
    let all = backends("adamw_matches_cpu");
    let mut r = rng(10);
    let n = 1000 + 5; // params, grads and moments are f32 whatever the compute type
    for (cu, step) in all.iter().flat_map(|(cu, _)| [(cu, 1u64), (cu, 10)]) {
        let h = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            step,
        };
        let p0 = random(&mut r, n, 1.0);
        let g = random(&mut r, n, 1e-2);
        let m0 = random(&mut r, n, 1e-3);
        let v0: Vec<f32> = random(&mut r, n, 1e-4).iter().map(|x| x.abs()).collect();
        let (mut pb, gb, mut mb, mut vb) = (
            Dev::new(cu, &p0, F32),
            Dev::new(cu, &g, F32),
            Dev::new(cu, &m0, F32),
            Dev::new(cu, &v0, F32),
        );
        cu.adamw(pb.m(), gb.v(), mb.m(), vb.m(), h).unwrap();
        let (mut wp, mut wm, mut wv) = (p0.clone(), m0.clone(), v0.clone());
        Cpu.adamw(&mut wp, &g, &mut wm, &mut wv, h).unwrap();
        assert_rel("adamw params", cu, &pb.get(), &wp, 1e-6);
        assert_rel("adamw m", cu, &mb.get(), &wm, 1e-6);
        assert_rel("adamw v", cu, &vb.get(), &wv, 1e-6);
    }
}

// ---- attention ----------------------------------------------------------------------------------------

/// Sample 0 left-padded (its first rows see no key), the last one
/// right-padded, holes in between.
fn padding_mask(s: AttnShape) -> Vec<u8> {
    let t = s.t;
    let mut m = vec![1u8; s.b * t];
    m[..t / 3].fill(0);
    let last = (s.b - 1) * t;
    m[last + t - t / 4..last + t].fill(0);
    for bi in 0..s.b {
        for j in (bi + 5..t).step_by(11) {
            m[bi * t + j] = 0;
        }
    }
    m
}

/// The key mask of a case.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Keys {
    All,
    /// padding_mask
    Padded,
    /// padding_mask, and the last sample all padding
    EmptySample,
}

fn attention_case(cases: &[(Cuda, f64)], seed: u64, s: AttnShape, keys: Keys, rerun: bool) {
    attention_case_at(cases, seed, s, keys, rerun, 0)
}

/// `off`: every tensor is a view that many elements into its buffer.
fn attention_case_at(
    cases: &[(Cuda, f64)],
    seed: u64,
    s: AttnShape,
    keys: Keys,
    rerun: bool,
    off: usize,
) {
    let masked = keys != Keys::All;
    let mask_v = masked.then(|| {
        let mut m = padding_mask(s);
        if keys == Keys::EmptySample {
            m[(s.b - 1) * s.t..].fill(0);
        }
        m
    });
    let mask = mask_v.as_deref();
    let (nq, nk, nl) = (
        s.b * s.t * s.nh * s.hd,
        s.b * s.t * s.nkv * s.hd,
        s.b * s.nh * s.t,
    );
    let mut r = rng(seed);
    let (q, k, v, dout) = (
        random(&mut r, nq, 1.0),
        random(&mut r, nk, 1.0),
        random(&mut r, nk, 1.0),
        random(&mut r, nq, 1.0),
    );
    for (cu, tol) in cases {
        let (cu, tol, dt) = (cu, *tol, cu.dtype());
        let what = |name: &str| format!("attention {name} {s:?} {keys:?}");
        let (qr, kr, vr, dr) = (
            round(dt, &q),
            round(dt, &k),
            round(dt, &v),
            round(dt, &dout),
        );
        let (qb, kb, vb, db) = (
            Dev::at(cu, &q, dt, off),
            Dev::at(cu, &k, dt, off),
            Dev::at(cu, &v, dt, off),
            Dev::at(cu, &dout, dt, off),
        );

        // ---- forward ----
        let mut out_cpu = vec![0.0; nq];
        let mut lse_cpu = vec![0.0; nl];
        Cpu.attention_forward(&mut out_cpu, &mut lse_cpu, &qr, &kr, &vr, mask, s)
            .unwrap();
        let run_fwd = || {
            let mut out = Dev::poisoned_at(cu, nq, dt, off);
            let mut lse = Dev::poisoned_at(cu, nl, F32, off);
            cu.attention_forward(out.m(), lse.m(), qb.v(), kb.v(), vb.v(), mask, s)
                .unwrap();
            vec![out.get(), lse.get()]
        };
        let fwd = if rerun {
            deterministic(&what("forward"), run_fwd)
        } else {
            run_fwd()
        };
        let (out, lse) = (&fwd[0], &fwd[1]);
        assert_rel(&what("out"), cu, out, &out_cpu, tol);
        let (mut got, mut want, mut hidden) = (Vec::new(), Vec::new(), 0);
        for (row, (&g, &w)) in lse.iter().zip(&lse_cpu).enumerate() {
            if w == f32::NEG_INFINITY {
                hidden += 1;
                assert_eq!(g, f32::NEG_INFINITY, "{}: lse[{row}]", what("lse"));
                let (bh, i) = (row / s.t, row % s.t);
                let (bi, h) = (bh / s.nh, bh % s.nh);
                let o = ((bi * s.t + i) * s.nh + h) * s.hd;
                assert!(
                    out[o..o + s.hd].iter().all(|&x| x == 0.0),
                    "{}: hidden row {row} not 0",
                    what("out")
                );
            } else {
                got.push(g);
                want.push(w);
            }
        }
        assert_eq!(
            hidden > 0,
            masked,
            "the mask must hide whole rows (and only then)"
        );
        assert_rel(&what("lse"), cu, &got, &want, tol.min(1e-4));

        // ---- backward: the CPU's out (rounded) and lse, random initial gradients ----
        let out_r = round(dt, &out_cpu);
        let (mut gq, mut gk, mut gv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
        Cpu.attention_backward(
            &mut gq, &mut gk, &mut gv, &dr, &qr, &kr, &vr, &out_r, &lse_cpu, mask, s,
        )
        .unwrap();
        // Initial gradients about as large as the gradients (both a missing +=
        // and an overwrite show), not below 1e-3 (T = 1: dq is rounding noise).
        let dq0 = round(dt, &random(&mut r, nq, rms(&gq).max(1e-3)));
        let dk0 = round(dt, &random(&mut r, nk, rms(&gk).max(1e-3)));
        let dv0 = round(dt, &random(&mut r, nk, rms(&gv).max(1e-3)));
        let (mut wq, mut wk, mut wv) = (dq0.clone(), dk0.clone(), dv0.clone());
        Cpu.attention_backward(
            &mut wq, &mut wk, &mut wv, &dr, &qr, &kr, &vr, &out_r, &lse_cpu, mask, s,
        )
        .unwrap();
        let (outb, lseb) = (
            Dev::at(cu, &out_r, dt, off),
            Dev::at(cu, &lse_cpu, F32, off),
        );
        let run_bwd = || {
            let (mut dqb, mut dkb, mut dvb) = (
                Dev::at(cu, &dq0, dt, off),
                Dev::at(cu, &dk0, dt, off),
                Dev::at(cu, &dv0, dt, off),
            );
            cu.attention_backward(
                dqb.m(),
                dkb.m(),
                dvb.m(),
                db.v(),
                qb.v(),
                kb.v(),
                vb.v(),
                outb.v(),
                lseb.v(),
                mask,
                s,
            )
            .unwrap();
            vec![dqb.get(), dkb.get(), dvb.get()]
        };
        let bwd = if rerun {
            deterministic(&what("backward"), run_bwd)
        } else {
            run_bwd()
        };
        assert_rel(&what("dq"), cu, &bwd[0], &wq, tol);
        assert_rel(&what("dk"), cu, &bwd[1], &wk, tol);
        assert_rel(&what("dv"), cu, &bwd[2], &wv, tol);
    }
}

fn shape(b: usize, t: usize, nh: usize, nkv: usize, hd: usize) -> AttnShape {
    AttnShape { b, t, nh, nkv, hd }
}

#[test]
fn attention_hd32_matches_cpu() {
    let e = &backends("attention_hd32_matches_cpu");
    attention_case(e, 100, shape(2, 40, 4, 2, 32), Keys::All, true);
    attention_case(e, 101, shape(2, 40, 4, 2, 32), Keys::Padded, false);
}

#[test]
fn attention_hd64_matches_cpu() {
    let e = &backends("attention_hd64_matches_cpu");
    attention_case(e, 102, shape(2, 40, 4, 2, 64), Keys::All, false);
    attention_case(e, 103, shape(2, 40, 4, 2, 64), Keys::Padded, true);
}

/// The largest head dim, T not a multiple of any tile (the GPU test's main case).
#[test]
fn attention_hd128_matches_cpu() {
    let e = &backends("attention_hd128_matches_cpu");
    attention_case(e, 106, shape(2, 77, 4, 2, 128), Keys::Padded, false);
}

/// Head dims that are not a multiple of 16 (zero-padded tiles): 40 (16-byte
/// loads for every type), 33 (element loads for every type); 3 query heads
/// per kv head.
#[test]
fn attention_odd_head_dims_match_cpu() {
    let e = &backends("attention_odd_head_dims_match_cpu");
    attention_case(e, 104, shape(1, 21, 3, 1, 40), Keys::Padded, false);
    attention_case(e, 105, shape(1, 18, 2, 1, 33), Keys::All, false);
}

/// No grouping (NH = NKV) with T below one tile, a group of 8 query heads,
/// T = 2, a head dim of 1, and a sample whose keys are all padding.
#[test]
fn attention_edge_cases_match_cpu() {
    let e = &backends("attention_edge_cases_match_cpu");
    attention_case(e, 107, shape(3, 9, 2, 2, 16), Keys::Padded, true);
    attention_case(e, 108, shape(2, 33, 8, 1, 64), Keys::Padded, false);
    attention_case(e, 109, shape(1, 2, 1, 1, 8), Keys::All, false);
    attention_case(e, 110, shape(1, 17, 2, 2, 1), Keys::All, false);
    attention_case(e, 111, shape(2, 37, 4, 2, 64), Keys::EmptySample, false);
    // Views one element into their buffers: the launcher turns 16-byte loads off.
    attention_case_at(e, 112, shape(2, 40, 4, 2, 64), Keys::Padded, false, 1);
}

/// Attention over a key/value cache: a prefill (TQ > 1, start 0) and decode
/// steps (TQ = 1) deep into a cache with spare capacity, row 0 left-padded
/// (its first queries see no key: out = 0), a hole in row 1, GQA groups of
/// 2 and 3, head dims below, at and above one warp's 32 lanes. Views start
/// one element into their buffers.
#[test]
fn attention_kv_matches_cpu() {
    for (cu, tol) in backends("attention_kv_matches_cpu") {
        let dt = cu.dtype();
        for (seed, s) in [
            (120, (2, 9, 12, 0, 4, 2, 16)),
            (121, (2, 1, 40, 30, 6, 2, 64)),
            (122, (3, 1, 8, 7, 2, 1, 33)),
            (123, (1, 3, 70, 60, 4, 4, 128)),
        ] {
            let (b, tq, cap, start, nh, nkv, hd) = s;
            let s = KvAttnShape {
                b,
                tq,
                cap,
                start,
                nh,
                nkv,
                hd,
            };
            let len = s.keys();
            let mut mask = vec![1u8; b * len];
            mask[..len / 2].fill(0);
            if b > 1 {
                mask[len + 2] = 0;
            }
            let mut r = rng(seed);
            let nq = b * tq * nh * hd;
            let nk = b * cap * nkv * hd;
            let (q, k, v) = (
                random(&mut r, nq, 1.0),
                random(&mut r, nk, 1.0),
                random(&mut r, nk, 1.0),
            );
            let mut want = vec![0.0; nq];
            Cpu.attention_kv_forward(
                &mut want,
                &round(dt, &q),
                &round(dt, &k),
                &round(dt, &v),
                &mask,
                s,
            )
            .unwrap();
            let (qb, kb, vb) = (
                Dev::at(&cu, &q, dt, 1),
                Dev::at(&cu, &k, dt, 1),
                Dev::at(&cu, &v, dt, 1),
            );
            let run = || {
                let mut out = Dev::poisoned_at(&cu, nq, dt, 1);
                cu.attention_kv_forward(out.m(), qb.v(), kb.v(), vb.v(), &mask, s)
                    .unwrap();
                vec![out.get()]
            };
            let got = deterministic(&format!("attention_kv {s:?}"), run);
            assert_rel(&format!("attention_kv {s:?}"), &cu, &got[0], &want, tol);
            // Row 0's first query (when it is in the padding) must be exactly 0.
            if start < len / 2 {
                assert!(got[0][..hd].iter().all(|&x| x == 0.0), "hidden row not 0");
            }
        }
    }
}

/// Backward from the device's own forward output and lse (what training
/// does), with the second sequence padded after five keys.
#[test]
fn attention_backward_of_device_forward_matches_cpu() {
    for (cu, tol) in backends("attention_backward_of_device_forward_matches_cpu") {
        let mut r = rng(4);
        let s = AttnShape {
            b: 2,
            t: 7,
            nh: 4,
            nkv: 2,
            hd: 16,
        };
        let (nq, nk, nl) = (
            s.b * s.t * s.nh * s.hd,
            s.b * s.t * s.nkv * s.hd,
            s.b * s.nh * s.t,
        );
        let mut mask = vec![1u8; s.b * s.t];
        mask[s.t + 5..].fill(0); // the second sequence is padded
        for key_mask in [None, Some(&mask[..])] {
            let q = rounded(&cu, C, &random(&mut r, nq, 1.0));
            let k = rounded(&cu, C, &random(&mut r, nk, 1.0));
            let v = rounded(&cu, C, &random(&mut r, nk, 1.0));
            let (mut wo, mut wl) = (vec![0.0; nq], vec![0.0; nl]);
            Cpu.attention_forward(&mut wo, &mut wl, &q, &k, &v, key_mask, s)
                .unwrap();
            let (dq_, dk_, dv_) = (up(&cu, &q, C), up(&cu, &k, C), up(&cu, &v, C));
            let (mut o, mut l) = (nan(&cu, nq, C), nan(&cu, nl, F));
            cu.attention_forward(
                cu.view_mut(&mut o, 0..nq),
                cu.view_mut(&mut l, 0..nl),
                cu.view(&dq_, 0..nq),
                cu.view(&dk_, 0..nk),
                cu.view(&dv_, 0..nk),
                key_mask,
                s,
            )
            .unwrap();
            let m = key_mask.is_some();
            assert_rel(
                &format!("attention out mask={m}"),
                &cu,
                &down(&cu, &o),
                &wo,
                tol,
            );
            // lse of fully padded rows may differ by convention; compare the finite ones.
            let gl = down(&cu, &l);
            let idx: Vec<usize> = (0..nl)
                .filter(|&i| wl[i].is_finite() && gl[i].is_finite())
                .collect();
            let pick = |x: &[f32]| idx.iter().map(|&i| x[i]).collect::<Vec<f32>>();
            assert_rel(
                &format!("attention lse mask={m}"),
                &cu,
                &pick(&gl),
                &pick(&wl),
                tol,
            );

            // backward from the GPU's own out/lse (what training does)
            let out = down(&cu, &o);
            let dout = rounded(&cu, C, &random(&mut r, nq, 1.0));
            let (q0, k0, v0) = (
                rounded(&cu, C, &random(&mut r, nq, 1.0)),
                rounded(&cu, C, &random(&mut r, nk, 1.0)),
                rounded(&cu, C, &random(&mut r, nk, 1.0)),
            );
            let (mut wq, mut wk, mut wv) = (q0.clone(), k0.clone(), v0.clone());
            Cpu.attention_backward(
                &mut wq, &mut wk, &mut wv, &dout, &q, &k, &v, &out, &gl, key_mask, s,
            )
            .unwrap();
            let ddo = up(&cu, &dout, C);
            let (mut gq, mut gk, mut gv) = (up(&cu, &q0, C), up(&cu, &k0, C), up(&cu, &v0, C));
            cu.attention_backward(
                cu.view_mut(&mut gq, 0..nq),
                cu.view_mut(&mut gk, 0..nk),
                cu.view_mut(&mut gv, 0..nk),
                cu.view(&ddo, 0..nq),
                cu.view(&dq_, 0..nq),
                cu.view(&dk_, 0..nk),
                cu.view(&dv_, 0..nk),
                cu.view(&o, 0..nq),
                cu.view(&l, 0..nl),
                key_mask,
                s,
            )
            .unwrap();
            assert_rel(
                &format!("attention dq mask={m}"),
                &cu,
                &down(&cu, &gq),
                &wq,
                tol,
            );
            assert_rel(
                &format!("attention dk mask={m}"),
                &cu,
                &down(&cu, &gk),
                &wk,
                tol,
            );
            assert_rel(
                &format!("attention dv mask={m}"),
                &cu,
                &down(&cu, &gv),
                &wv,
                tol,
            );
        }
    }
}

// ---- LoRA ----------------------------------------------------------------------------------------------

struct LoraCase {
    s: LoraShape,
    accumulate: bool,
    /// (p, seeds, rows per sample)
    dropout: Option<(f32, Vec<u64>, usize)>,
    /// A and B stored in the compute type instead of f32 (the launcher converts them).
    weights_compute: bool,
    /// Every tensor is a view this many elements into its buffer (misaligned
    /// for vector loads and paired stores unless a multiple of 16 bytes).
    offset: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    y0: Vec<f32>,
    dy: Vec<f32>,
    xa: Vec<f32>,
    dx0: Vec<f32>,
    da0: Vec<f32>,
    db0: Vec<f32>,
}

impl LoraCase {
    fn new(
        seed: u64,
        (n, n_in, n_out, r): (usize, usize, usize, usize),
        accumulate: bool,
        dropout: Option<(f32, usize)>,
    ) -> Self {
        let mut g = rng(seed);
        let dropout = dropout.map(|(p, samples)| {
            assert_eq!(n % samples, 0);
            let seeds = (0..samples as u64)
                .map(|i| 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(seed + 7 * i + 1))
                .collect();
            (p, seeds, n / samples)
        });
        LoraCase {
            s: LoraShape {
                n,
                n_in,
                n_out,
                r,
                scaling: 2.0,
            },
            accumulate,
            dropout,
            weights_compute: false,
            offset: 0,
            x: random(&mut g, n * n_in, 1.0),
            w: random(&mut g, n_out * n_in, 0.05),
            a: random(&mut g, r * n_in, 0.1),
            b: random(&mut g, n_out * r, 0.1),
            y0: random(&mut g, n * n_out, 0.5),
            dy: random(&mut g, n * n_out, 1.0),
            xa: random(&mut g, n * r, 1.0),
            dx0: random(&mut g, n * n_in, 0.5),
            da0: random(&mut g, r * n_in, 1.0),
            db0: random(&mut g, n_out * r, 1.0),
        }
    }

    fn drop(&self) -> Option<LoraDropout<'_>> {
        self.dropout.as_ref().map(|(p, seeds, rps)| LoraDropout {
            p: *p,
            seeds,
            rows_per_sample: *rps,
        })
    }

    fn label(&self) -> String {
        let s = self.s;
        format!(
            "lora n={} in={} out={} r={} accumulate={} dropout={:?} weights_compute={} offset={}",
            s.n,
            s.n_in,
            s.n_out,
            s.r,
            self.accumulate,
            self.dropout.as_ref().map(|d| d.0),
            self.weights_compute,
            self.offset
        )
    }

    fn check(&self, cu: &Cuda, tol: f64, frozen: (bool, bool), rerun: bool) {
        let dt = cu.dtype();
        let s = self.s;
        let (n, ni, no, r) = (s.n, s.n_in, s.n_out, s.r);
        let label = self.label();
        let up = |h: &[f32], dt| Dev::at(cu, h, dt, self.offset);
        let nan = |n, dt| Dev::poisoned_at(cu, n, dt, self.offset);
        let wdt = if self.weights_compute { dt } else { F32 };
        let c = |v: &[f32]| round(dt, v);
        let (x, w, a, b) = (
            c(&self.x),
            c(&self.w),
            round(wdt, &self.a),
            round(wdt, &self.b),
        );
        let (xb, wb, ab, bb) = (up(&x, dt), up(&w, dt), up(&a, wdt), up(&b, wdt));

        // ---- forward ----
        let run_fwd = || {
            let mut y = if self.accumulate {
                up(&self.y0, dt)
            } else {
                nan(n * no, dt)
            };
            let mut xa = nan(n * r, dt);
            let mut scratch = nan(n * ni, dt);
            cu.lora_linear_forward(
                y.m(),
                xa.m(),
                scratch.m(),
                xb.v(),
                wb.v(),
                ab.v(),
                bb.v(),
                self.drop(),
                s,
                self.accumulate,
            )
            .unwrap();
            vec![y.get(), xa.get()]
        };
        let fwd = if rerun {
            deterministic(&format!("{label} forward"), run_fwd)
        } else {
            run_fwd()
        };
        let mut y_ref = if self.accumulate {
            c(&self.y0)
        } else {
            vec![f32::NAN; n * no]
        };
        let mut xa_ref = vec![f32::NAN; n * r];
        let mut scratch = vec![f32::NAN; n * ni];
        Cpu.lora_linear_forward(
            &mut y_ref,
            &mut xa_ref,
            &mut scratch,
            &x,
            &w,
            &a,
            &b,
            self.drop(),
            s,
            self.accumulate,
        )
        .unwrap();
        assert_rel(&format!("y {label}"), cu, &fwd[0], &y_ref, tol);
        assert_rel(&format!("xa {label}"), cu, &fwd[1], &xa_ref, tol);

        // ---- backward ----
        let (dy, xa) = (c(&self.dy), c(&self.xa));
        let (dyb, xab) = (up(&dy, dt), up(&xa, dt));
        let run_bwd = || {
            let mut dx = up(&self.dx0, dt);
            let mut da = up(&self.da0, F32);
            let mut db = up(&self.db0, F32);
            let mut scratch = nan(n * ni, dt);
            let mut dxa = nan(n * r, dt);
            cu.lora_linear_backward(
                dx.m(),
                (!frozen.0).then(|| da.m()),
                (!frozen.1).then(|| db.m()),
                scratch.m(),
                dxa.m(),
                dyb.v(),
                xb.v(),
                xab.v(),
                wb.v(),
                ab.v(),
                bb.v(),
                self.drop(),
                s,
            )
            .unwrap();
            vec![dx.get(), da.get(), db.get()]
        };
        let bwd = if rerun {
            deterministic(&format!("{label} backward"), run_bwd)
        } else {
            run_bwd()
        };
        let mut dx_ref = c(&self.dx0);
        let (mut da_ref, mut db_ref) = (self.da0.clone(), self.db0.clone());
        let mut scratch_dxa = vec![f32::NAN; n * r];
        Cpu.lora_linear_backward(
            &mut dx_ref,
            (!frozen.0).then_some(&mut da_ref[..]),
            (!frozen.1).then_some(&mut db_ref[..]),
            &mut scratch,
            &mut scratch_dxa,
            &dy,
            &x,
            &xa,
            &w,
            &a,
            &b,
            self.drop(),
            s,
        )
        .unwrap();
        assert_rel(&format!("dx {label}"), cu, &bwd[0], &dx_ref, tol);
        if frozen.0 {
            assert_eq!(
                bits(&bwd[1]),
                bits(&self.da0),
                "{label}: frozen dA was written"
            );
        } else {
            assert_rel(&format!("dA {label}"), cu, &bwd[1], &da_ref, tol);
        }
        if frozen.1 {
            assert_eq!(
                bits(&bwd[2]),
                bits(&self.db0),
                "{label}: frozen dB was written"
            );
        } else {
            assert_rel(&format!("dB {label}"), cu, &bwd[2], &db_ref, tol);
        }
    }
}

/// n = 96 rows (two reduction chunks), rank 8 (one 16-column group).
#[test]
fn lora_matches_cpu() {
    for (cu, tol) in &backends("lora_matches_cpu") {
        let tol = *tol;
        LoraCase::new(20, (96, 80, 72, 8), false, None).check(cu, tol, (false, false), true);
        LoraCase::new(21, (96, 80, 72, 8), true, Some((0.25, 2))).check(
            cu,
            tol,
            (false, true),
            false,
        );
    }
}

/// Several tiles in every direction: rank 64 (a full column tile), IN = 260
/// and OUT = 200 (three and two 128-column tiles), 154 rows.
#[test]
fn lora_large_matches_cpu() {
    for (cu, tol) in &backends("lora_large_matches_cpu") {
        let tol = *tol;
        LoraCase::new(23, (154, 260, 200, 64), true, Some((0.2, 2))).check(
            cu,
            tol,
            (false, false),
            false,
        );
    }
}

/// Rank 20 (two 16-column groups, padded), IN = 136 (two k-chunks of the
/// skinny product, two column tiles elsewhere), rows not a multiple of any
/// tile, dropout over 5 samples, weights stored in the compute type.
#[test]
fn lora_wide_matches_cpu() {
    for (cu, tol) in &backends("lora_wide_matches_cpu") {
        let (tol, dt) = (*tol, cu.dtype());
        let mut c = LoraCase::new(22, (70, 136, 40, 20), true, Some((0.1, 5)));
        c.check(cu, tol, (false, false), dt != F32);
        c.weights_compute = dt != F32;
        c.accumulate = false;
        c.check(cu, tol, (true, false), false);
    }
}

/// One row and rank 1; IN and OUT below one 16-wide step; p = 1 (everything
/// dropped: the launcher's inv_keep is 0); rank 100 (two column tiles of the
/// skinny product and of the row reductions); misaligned views.
#[test]
fn lora_edge_cases_match_cpu() {
    for (cu, tol) in &backends("lora_edge_cases_match_cpu") {
        let tol = *tol;
        LoraCase::new(30, (1, 16, 8, 1), false, None).check(cu, tol, (false, false), false);
        LoraCase::new(31, (64, 8, 8, 4), true, Some((0.5, 4))).check(
            cu,
            tol,
            (false, false),
            false,
        );
        LoraCase::new(32, (130, 64, 64, 16), false, Some((1.0, 2))).check(
            cu,
            tol,
            (false, false),
            false,
        );
        LoraCase::new(33, (40, 50, 30, 100), true, Some((0.3, 1))).check(
            cu,
            tol,
            (false, false),
            true,
        );
        // Every tensor 3 elements into its buffer: the kernels' element loads
        // and unpaired stores.
        let mut c = LoraCase::new(34, (96, 80, 72, 8), true, Some((0.25, 2)));
        c.offset = 3;
        c.check(cu, tol, (false, false), false);
        // Rank 0 (only the base GEMM); both adapters frozen (no reductions).
        LoraCase::new(35, (16, 24, 8, 0), true, None).check(cu, tol, (true, true), false);
        LoraCase::new(36, (16, 24, 8, 4), false, None).check(cu, tol, (true, true), false);
    }
}

// ---- LoRA linear (fused kernels + cuBLAS) ------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn lora_forward<B: Backend>(
    be: &B,
    s: LoraShape,
    x: &[f32],
    w: &[f32],
    a: &[f32],
    b: &[f32],
    y0: &[f32],
    dropout: Option<LoraDropout<'_>>,
    accumulate: bool,
    pw: Precision,
) -> (Vec<f32>, Vec<f32>) {
    let (n, ni, no, r) = (s.n, s.n_in, s.n_out, s.r);
    let (dx, dw, da, db) = (up(be, x, C), up(be, w, pw), up(be, a, F), up(be, b, F));
    let mut y = if accumulate {
        up(be, y0, C)
    } else {
        nan(be, n * no, C)
    };
    let (mut xa, mut sx) = (nan(be, n * r, C), nan(be, n * ni, C));
    be.lora_linear_forward(
        be.view_mut(&mut y, 0..n * no),
        be.view_mut(&mut xa, 0..n * r),
        be.view_mut(&mut sx, 0..n * ni),
        be.view(&dx, 0..n * ni),
        be.view(&dw, 0..no * ni),
        be.view(&da, 0..r * ni),
        be.view(&db, 0..no * r),
        dropout,
        s,
        accumulate,
    )
    .unwrap();
    (down(be, &y), down(be, &xa))
}

#[allow(clippy::too_many_arguments)]
fn lora_backward<B: Backend>(
    be: &B,
    s: LoraShape,
    x: &[f32],
    xa: &[f32],
    w: &[f32],
    a: &[f32],
    b: &[f32],
    dy: &[f32],
    g0: (&[f32], &[f32], &[f32]),
    dropout: Option<LoraDropout<'_>>,
    grads: bool,
    pw: Precision,
) -> Vec<Vec<f32>> {
    let (n, ni, no, r) = (s.n, s.n_in, s.n_out, s.r);
    let (dxx, dxa, dw, da_, db_, ddy) = (
        up(be, x, C),
        up(be, xa, C),
        up(be, w, pw),
        up(be, a, F),
        up(be, b, F),
        up(be, dy, C),
    );
    let (mut gx, mut ga, mut gb) = (up(be, g0.0, C), up(be, g0.1, F), up(be, g0.2, F));
    let (mut sx, mut sxa) = (nan(be, n * ni, C), nan(be, n * r, C));
    be.lora_linear_backward(
        be.view_mut(&mut gx, 0..n * ni),
        grads.then(|| be.view_mut(&mut ga, 0..r * ni)),
        grads.then(|| be.view_mut(&mut gb, 0..no * r)),
        be.view_mut(&mut sx, 0..n * ni),
        be.view_mut(&mut sxa, 0..n * r),
        be.view(&ddy, 0..n * no),
        be.view(&dxx, 0..n * ni),
        be.view(&dxa, 0..n * r),
        be.view(&dw, 0..no * ni),
        be.view(&da_, 0..r * ni),
        be.view(&db_, 0..no * r),
        dropout,
        s,
    )
    .unwrap();
    vec![down(be, &gx), down(be, &ga), down(be, &gb)]
}

/// The same code driving both backends (`Backend::lora_linear_*`), with the
/// frozen W stored in the compute type or in f32, odd shapes, and both
/// adapters with or without gradients.
#[test]
fn lora_linear_matches_cpu() {
    for (cu, tol) in backends("lora_linear_matches_cpu") {
        let mut rg = rng(6);
        for (case, (n, ni, no, r)) in [(8, 24, 20, 4), (5, 17, 9, 3)].into_iter().enumerate() {
            let s = LoraShape {
                n,
                n_in: ni,
                n_out: no,
                r,
                scaling: 2.0,
            };
            let seeds = [11u64, 12u64];
            let drops: Vec<Option<LoraDropout<'_>>> = if n % 2 == 0 {
                vec![
                    None,
                    Some(LoraDropout {
                        p: 0.25,
                        seeds: &seeds,
                        rows_per_sample: n / 2,
                    }),
                ]
            } else {
                vec![None]
            };
            for dropout in drops {
                // The model's frozen W is in the compute type; f32 works too.
                for (accumulate, pw) in [(false, C), (true, C), (false, F)] {
                    let x = rounded(&cu, C, &random(&mut rg, n * ni, 1.0));
                    let w = rounded(&cu, pw, &random(&mut rg, no * ni, 0.2));
                    let a = random(&mut rg, r * ni, 0.3);
                    let b = random(&mut rg, no * r, 0.3);
                    let y0 = rounded(&cu, C, &random(&mut rg, n * no, 0.5));
                    let what = format!(
                        "lora case {case} dropout={} acc={accumulate} w={pw:?}",
                        dropout.is_some()
                    );
                    let (wy, wxa) =
                        lora_forward(&Cpu, s, &x, &w, &a, &b, &y0, dropout, accumulate, pw);
                    let (gy, gxa) =
                        lora_forward(&cu, s, &x, &w, &a, &b, &y0, dropout, accumulate, pw);
                    assert_rel(&format!("{what} y"), &cu, &gy, &wy, tol);
                    assert_rel(&format!("{what} xa"), &cu, &gxa, &wxa, tol);
                    let xa = rounded(&cu, C, &gxa);
                    let dy = rounded(&cu, C, &random(&mut rg, n * no, 1.0));
                    let gx0 = rounded(&cu, C, &random(&mut rg, n * ni, 1.0));
                    let (ga0, gb0) = (random(&mut rg, r * ni, 1.0), random(&mut rg, no * r, 1.0));
                    for grads in [true, false] {
                        let g0 = (&gx0[..], &ga0[..], &gb0[..]);
                        let want = lora_backward(
                            &Cpu, s, &x, &xa, &w, &a, &b, &dy, g0, dropout, grads, pw,
                        );
                        let got =
                            lora_backward(&cu, s, &x, &xa, &w, &a, &b, &dy, g0, dropout, grads, pw);
                        for (name, (g, w)) in ["dx", "dA", "dB"].iter().zip(got.iter().zip(&want)) {
                            assert_rel(&format!("{what} grads={grads} {name}"), &cu, g, w, tol);
                        }
                    }
                }
            }
        }
    }
}

// ---- the program ----------------------------------------------------------------------

/// Every kernel of the program is launched by the tests of this file: runs
/// them again in a child process with the fake driver logging every launch
/// (RLHF_EMU_LAUNCH_LOG, kernels/emu/fake/cuda.cpp) and reads the log.
#[test]
fn every_kernel_is_launched() {
    const ME: &str = "every_kernel_is_launched";
    // The launch log is the fake driver's: this is a property of the suite,
    // checked on the emulator.
    if on_gpu() || backends(ME).is_empty() {
        return;
    }
    let log = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("emu-launches-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--skip", ME, "--quiet"])
        .env("RLHF_EMU_LAUNCH_LOG", &log)
        .output()
        .expect("running the other tests of this file");
    assert!(
        out.status.success(),
        "the other tests failed under RLHF_EMU_LAUNCH_LOG:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let launched = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let launched: std::collections::BTreeSet<&str> = launched.lines().collect();
    let missing: Vec<String> = rlhf_kernels::cuda::kernel_names()
        .into_iter()
        .filter(|n| !launched.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "kernels no test of cuda_backend.rs launches: {missing:?}"
    );
}
