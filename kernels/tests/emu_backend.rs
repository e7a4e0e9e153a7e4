//! The REAL CUDA backend (`rlhf_kernels::cuda::Cuda`: cudarc, every launcher,
//! memory.rs, gemm.rs) on the CPU emulator, through fake `libcuda.so.1` /
//! `libcublas.so.13` (kernels/emu/fake/, `rlhf_kernels::emu`), against the
//! CPU backend, for f32, bf16 and fp16 compute — in plain `cargo test`, no
//! GPU. NVRTC is real (`eval "$(scripts/fetch-nvrtc.sh)"`); without it, or
//! without a C++ compiler, every test prints SKIPPED and passes (with
//! RLHF_REQUIRE_NVRTC set, a missing NVRTC fails).
//!
//! The CPU sees inputs rounded to the storage type; outputs start as NaN (an
//! element left unwritten fails), gradients start random (checks the +=).
//! Relative L2 error ≤ 1e-5 (f32), 1e-2 (bf16), 5e-3 (fp16). Shapes are tiny:
//! the emulator runs one fiber per CUDA thread. Its own test binary: the fake
//! libraries are opened once per process.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rlhf_kernels::cuda::{Cuda, Dtype};
use rlhf_kernels::{AdamW, AttnShape, Backend, Cpu, Gemm, LoraDropout, LoraShape, Precision};
use std::path::Path;
use std::sync::OnceLock;

const CASES: [(Dtype, f64); 3] = [(Dtype::F32, 1e-5), (Dtype::Bf16, 1e-2), (Dtype::F16, 5e-3)];
const C: Precision = Precision::Compute;
const F: Precision = Precision::F32;

/// One emulated backend per compute dtype, or none (SKIPPED).
fn backends(test: &str) -> Vec<(Cuda, f64)> {
    static ALL: OnceLock<Vec<(Cuda, f64)>> = OnceLock::new();
    if !rlhf_kernels::emu::use_fake_cuda(test, Path::new(env!("CARGO_TARGET_TMPDIR"))) {
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
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

fn dtype_of(cu: &Cuda, p: Precision) -> Dtype {
    match p {
        Precision::F32 => Dtype::F32,
        Precision::Compute => cu.dtype(),
    }
}

/// `x` as a buffer of `p` on `cu` holds it.
fn rounded(cu: &Cuda, p: Precision, x: &[f32]) -> Vec<f32> {
    let dt = dtype_of(cu, p);
    x.iter()
        .map(|&v| match dt {
            Dtype::F32 => v,
            Dtype::Bf16 => half::bf16::from_f32(v).to_f32(),
            Dtype::F16 => half::f16::from_f32(v).to_f32(),
        })
        .collect()
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
    assert!(
        e <= tol,
        "{what} [{}]: rel err {e:.3e} > {tol:.0e}",
        cu.dtype().name()
    );
}

// ---- the device itself --------------------------------------------------------

#[test]
fn fake_device_opens_and_round_trips() {
    for (cu, _) in backends("fake_device_opens_and_round_trips") {
        assert_eq!(cu.device_name(), "emulated");
        assert_eq!(cu.arch(), "sm_90");
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

// ---- elementwise, bias, embedding, norm, rope, swiglu, dropout -------------------

#[test]
fn elementwise_ops_match_cpu() {
    for (cu, tol) in backends("elementwise_ops_match_cpu") {
        let mut r = rng(1);
        let n = 300;
        let (x, y) = (
            rounded(&cu, C, &random(&mut r, n, 1.0)),
            rounded(&cu, F, &random(&mut r, n, 1.0)),
        );
        // axpy into f32 from compute, scale, sum_squares
        let (mut want, xb) = (y.clone(), x.clone());
        Cpu.axpy(&mut want, 0.7, &xb).unwrap();
        Cpu.scale(&mut want, -1.25).unwrap();
        let (dx, mut dy) = (up(&cu, &x, C), up(&cu, &y, F));
        cu.axpy(cu.view_mut(&mut dy, 0..n), 0.7, cu.view(&dx, 0..n))
            .unwrap();
        cu.scale(cu.view_mut(&mut dy, 0..n), -1.25).unwrap();
        assert_rel("axpy+scale", &cu, &down(&cu, &dy), &want, tol);
        let ss = cu.sum_squares(cu.view(&dx, 0..n)).unwrap();
        let ws = Cpu.sum_squares(&x).unwrap();
        assert!((ss - ws).abs() <= 1e-5 * ws, "sum_squares {ss} vs {ws}");

        // bias forward/backward
        let (rows, c) = (7, 24);
        let xb = rounded(&cu, C, &random(&mut r, rows * c, 1.0));
        let bias = rounded(&cu, F, &random(&mut r, c, 1.0));
        let g0 = random(&mut r, c, 1.0);
        let mut want = xb.clone();
        Cpu.add_bias(&mut want, &bias, c).unwrap();
        let mut wg = g0.clone();
        Cpu.bias_backward(&mut wg, &xb, c).unwrap();
        let (mut dxb, dbias, mut dg) = (up(&cu, &xb, C), up(&cu, &bias, F), up(&cu, &g0, F));
        cu.bias_backward(cu.view_mut(&mut dg, 0..c), cu.view(&dxb, 0..rows * c), c)
            .unwrap();
        cu.add_bias(cu.view_mut(&mut dxb, 0..rows * c), cu.view(&dbias, 0..c), c)
            .unwrap();
        assert_rel("add_bias", &cu, &down(&cu, &dxb), &want, tol);
        assert_rel("bias_backward", &cu, &down(&cu, &dg), &wg, tol);

        // embedding
        let (v, c) = (11, 16);
        let table = rounded(&cu, F, &random(&mut r, v * c, 1.0));
        let ids: Vec<u32> = (0..9).map(|_| r.random_range(0..v as u32)).collect();
        let n = ids.len();
        let mut want = vec![0.0; n * c];
        Cpu.embedding_forward(&mut want, &table, &ids, c).unwrap();
        let dt = up(&cu, &table, F);
        let mut out = nan(&cu, n * c, C);
        cu.embedding_forward(
            cu.view_mut(&mut out, 0..n * c),
            cu.view(&dt, 0..v * c),
            &ids,
            c,
        )
        .unwrap();
        assert_rel(
            "embedding_forward",
            &cu,
            &down(&cu, &out),
            &rounded(&cu, C, &want),
            tol,
        );
        let dout = rounded(&cu, C, &random(&mut r, n * c, 1.0));
        let g0 = random(&mut r, v * c, 1.0);
        let mut wg = g0.clone();
        Cpu.embedding_backward(&mut wg, &dout, &ids, c).unwrap();
        let (ddo, mut dg) = (up(&cu, &dout, C), up(&cu, &g0, F));
        cu.embedding_backward(
            cu.view_mut(&mut dg, 0..v * c),
            cu.view(&ddo, 0..n * c),
            &ids,
            c,
        )
        .unwrap();
        assert_rel("embedding_backward", &cu, &down(&cu, &dg), &wg, tol);
    }
}

#[test]
fn norm_rope_swiglu_dropout_match_cpu() {
    for (cu, tol) in backends("norm_rope_swiglu_dropout_match_cpu") {
        let mut r = rng(2);
        // RMSNorm
        let (n, c) = (5, 40);
        let x = rounded(&cu, C, &random(&mut r, n * c, 1.0));
        let w = rounded(&cu, F, &random(&mut r, c, 1.0));
        let (mut wo, mut wr) = (vec![0.0; n * c], vec![0.0; n]);
        Cpu.rmsnorm_forward(&mut wo, &mut wr, &x, &w, c, 1e-5)
            .unwrap();
        let (dx_, dw_) = (up(&cu, &x, C), up(&cu, &w, F));
        let (mut o, mut rs) = (nan(&cu, n * c, C), nan(&cu, n, F));
        cu.rmsnorm_forward(
            cu.view_mut(&mut o, 0..n * c),
            cu.view_mut(&mut rs, 0..n),
            cu.view(&dx_, 0..n * c),
            cu.view(&dw_, 0..c),
            c,
            1e-5,
        )
        .unwrap();
        assert_rel("rmsnorm out", &cu, &down(&cu, &o), &wo, tol);
        assert_rel("rmsnorm rstd", &cu, &down(&cu, &rs), &wr, tol);
        let dout = rounded(&cu, C, &random(&mut r, n * c, 1.0));
        let (gx0, gw0) = (
            rounded(&cu, C, &random(&mut r, n * c, 1.0)),
            random(&mut r, c, 1.0),
        );
        let rstd = down(&cu, &rs);
        let (mut wgx, mut wgw) = (gx0.clone(), gw0.clone());
        Cpu.rmsnorm_backward(&mut wgx, Some(&mut wgw), &dout, &x, &w, &rstd, c)
            .unwrap();
        let ddo = up(&cu, &dout, C);
        let (mut gx, mut gw) = (up(&cu, &gx0, C), up(&cu, &gw0, F));
        cu.rmsnorm_backward(
            cu.view_mut(&mut gx, 0..n * c),
            Some(cu.view_mut(&mut gw, 0..c)),
            cu.view(&ddo, 0..n * c),
            cu.view(&dx_, 0..n * c),
            cu.view(&dw_, 0..c),
            cu.view(&rs, 0..n),
            c,
        )
        .unwrap();
        assert_rel("rmsnorm dx", &cu, &down(&cu, &gx), &wgx, tol);
        assert_rel("rmsnorm dw", &cu, &down(&cu, &gw), &wgw, tol);

        // RoPE forward and backward
        let (n, heads, hd, p) = (6, 3, 8, 10);
        let half = hd / 2;
        let cos: Vec<f32> = (0..p * half)
            .map(|i| ((i / half) as f32 * 0.3 / (1 + i % half) as f32).cos())
            .collect();
        let sin: Vec<f32> = (0..p * half)
            .map(|i| ((i / half) as f32 * 0.3 / (1 + i % half) as f32).sin())
            .collect();
        let pos: Vec<u32> = (0..n).map(|_| r.random_range(0..p as u32)).collect();
        let x = rounded(&cu, C, &random(&mut r, n * heads * hd, 1.0));
        let (dcos, dsin) = (up(&cu, &cos, F), up(&cu, &sin, F));
        for backward in [false, true] {
            let mut want = x.clone();
            let mut dx = up(&cu, &x, C);
            let len = x.len();
            if backward {
                Cpu.rope_backward(&mut want, &cos, &sin, &pos, heads, hd)
                    .unwrap();
                cu.rope_backward(
                    cu.view_mut(&mut dx, 0..len),
                    cu.view(&dcos, 0..p * half),
                    cu.view(&dsin, 0..p * half),
                    &pos,
                    heads,
                    hd,
                )
                .unwrap();
            } else {
                Cpu.rope_forward(&mut want, &cos, &sin, &pos, heads, hd)
                    .unwrap();
                cu.rope_forward(
                    cu.view_mut(&mut dx, 0..len),
                    cu.view(&dcos, 0..p * half),
                    cu.view(&dsin, 0..p * half),
                    &pos,
                    heads,
                    hd,
                )
                .unwrap();
            }
            assert_rel(
                &format!("rope backward={backward}"),
                &cu,
                &down(&cu, &dx),
                &want,
                tol,
            );
        }

        // SwiGLU
        let n = 123;
        let (g, u) = (
            rounded(&cu, C, &random(&mut r, n, 2.0)),
            rounded(&cu, C, &random(&mut r, n, 2.0)),
        );
        let mut want = vec![0.0; n];
        Cpu.swiglu_forward(&mut want, &g, &u).unwrap();
        let (dg_, du_) = (up(&cu, &g, C), up(&cu, &u, C));
        let mut o = nan(&cu, n, C);
        cu.swiglu_forward(
            cu.view_mut(&mut o, 0..n),
            cu.view(&dg_, 0..n),
            cu.view(&du_, 0..n),
        )
        .unwrap();
        assert_rel("swiglu forward", &cu, &down(&cu, &o), &want, tol);
        let dout = rounded(&cu, C, &random(&mut r, n, 1.0));
        let (g0, u0) = (
            rounded(&cu, C, &random(&mut r, n, 1.0)),
            rounded(&cu, C, &random(&mut r, n, 1.0)),
        );
        let (mut wg, mut wu) = (g0.clone(), u0.clone());
        Cpu.swiglu_backward(&mut wg, &mut wu, &dout, &g, &u)
            .unwrap();
        let ddo = up(&cu, &dout, C);
        let (mut gg, mut gu) = (up(&cu, &g0, C), up(&cu, &u0, C));
        cu.swiglu_backward(
            cu.view_mut(&mut gg, 0..n),
            cu.view_mut(&mut gu, 0..n),
            cu.view(&ddo, 0..n),
            cu.view(&dg_, 0..n),
            cu.view(&du_, 0..n),
        )
        .unwrap();
        assert_rel("swiglu dgate", &cu, &down(&cu, &gg), &wg, tol);
        assert_rel("swiglu dup", &cu, &down(&cu, &gu), &wu, tol);

        // Dropout: the same mask as the CPU (zeros in the same places).
        let n = 200;
        let x: Vec<f32> = (0..n).map(|i| 0.5 + (i % 7) as f32 * 0.125).collect();
        let mut want = vec![0.0; n];
        Cpu.dropout_forward(&mut want, &x, 0.3, 77).unwrap();
        let dx = up(&cu, &x, C);
        let mut o = nan(&cu, n, C);
        cu.dropout_forward(cu.view_mut(&mut o, 0..n), cu.view(&dx, 0..n), 0.3, 77)
            .unwrap();
        let got = down(&cu, &o);
        for i in 0..n {
            assert_eq!(got[i] == 0.0, want[i] == 0.0, "dropout mask [{i}]");
        }
        assert_rel("dropout forward", &cu, &got, &rounded(&cu, C, &want), tol);
        let g0 = rounded(&cu, C, &random(&mut r, n, 1.0));
        let mut wg = g0.clone();
        Cpu.dropout_backward(&mut wg, &x, 0.3, 77).unwrap();
        let mut gg = up(&cu, &g0, C);
        cu.dropout_backward(cu.view_mut(&mut gg, 0..n), cu.view(&dx, 0..n), 0.3, 77)
            .unwrap();
        assert_rel("dropout backward", &cu, &down(&cu, &gg), &wg, tol);
    }
}

// ---- GEMM (fake cuBLAS through gemm.rs) ----------------------------------------------

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

// ---- attention -----------------------------------------------------------------------

#[test]
fn attention_matches_cpu() {
    for (cu, tol) in backends("attention_matches_cpu") {
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

// ---- cross-entropy, AdamW ---------------------------------------------------------------

#[test]
fn cross_entropy_and_adamw_match_cpu() {
    for (cu, tol) in backends("cross_entropy_and_adamw_match_cpu") {
        let mut r = rng(5);
        let (n, v) = (6, 50);
        let logits = rounded(&cu, C, &random(&mut r, n * v, 3.0));
        let targets: Vec<i32> = (0..n)
            .map(|i| {
                if i == 2 {
                    -100
                } else {
                    r.random_range(0..v as i32)
                }
            })
            .collect();
        for grad_scale in [None, Some(0.25f32)] {
            let mut wl = logits.clone();
            let wloss = Cpu.cross_entropy(&mut wl, &targets, v, grad_scale).unwrap();
            let mut dl = up(&cu, &logits, C);
            let loss = cu
                .cross_entropy(cu.view_mut(&mut dl, 0..n * v), &targets, v, grad_scale)
                .unwrap();
            assert_rel(
                &format!("cross_entropy loss {grad_scale:?}"),
                &cu,
                &loss,
                &wloss,
                tol,
            );
            if grad_scale.is_some() {
                assert_rel("cross_entropy grad", &cu, &down(&cu, &dl), &wl, tol);
            }
        }

        let n = 333;
        let h = AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 3,
        };
        let p0 = random(&mut r, n, 1.0);
        let g = random(&mut r, n, 1.0);
        let m0 = random(&mut r, n, 0.1);
        let v0: Vec<f32> = random(&mut r, n, 0.1).iter().map(|x| x.abs()).collect();
        let (mut wp, mut wm, mut wv) = (p0.clone(), m0.clone(), v0.clone());
        Cpu.adamw(&mut wp, &g, &mut wm, &mut wv, h).unwrap();
        let (mut dp, dg, mut dm, mut dv) = (
            up(&cu, &p0, F),
            up(&cu, &g, F),
            up(&cu, &m0, F),
            up(&cu, &v0, F),
        );
        cu.adamw(
            cu.view_mut(&mut dp, 0..n),
            cu.view(&dg, 0..n),
            cu.view_mut(&mut dm, 0..n),
            cu.view_mut(&mut dv, 0..n),
            h,
        )
        .unwrap();
        // AdamW runs on f32 state whatever the compute type.
        assert_rel("adamw params", &cu, &down(&cu, &dp), &wp, 1e-5);
        assert_rel("adamw m", &cu, &down(&cu, &dm), &wm, 1e-5);
        assert_rel("adamw v", &cu, &down(&cu, &dv), &wv, 1e-5);
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

/// Row counts that split the column reductions (bias and RMSNorm weight
/// gradients) into several chunks; RMSNorm backward with a frozen weight.
#[test]
fn column_reductions_over_many_rows_match_cpu() {
    for (cu, tol) in backends("column_reductions_over_many_rows_match_cpu") {
        let mut r = rng(7);
        let (n, c) = (200, 6);
        let dout = rounded(&cu, C, &random(&mut r, n * c, 1.0));
        let g0 = random(&mut r, c, 1.0);
        let mut wg = g0.clone();
        Cpu.bias_backward(&mut wg, &dout, c).unwrap();
        let (ddo, mut dg) = (up(&cu, &dout, C), up(&cu, &g0, F));
        cu.bias_backward(cu.view_mut(&mut dg, 0..c), cu.view(&ddo, 0..n * c), c)
            .unwrap();
        assert_rel("bias_backward 200 rows", &cu, &down(&cu, &dg), &wg, tol);

        let x = rounded(&cu, C, &random(&mut r, n * c, 1.0));
        let w = rounded(&cu, F, &random(&mut r, c, 1.0));
        let (mut wo, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
        Cpu.rmsnorm_forward(&mut wo, &mut rstd, &x, &w, c, 1e-5)
            .unwrap();
        let (dx_, dw_, drs) = (up(&cu, &x, C), up(&cu, &w, F), up(&cu, &rstd, F));
        for with_dw in [true, false] {
            let gx0 = rounded(&cu, C, &random(&mut r, n * c, 1.0));
            let gw0 = random(&mut r, c, 1.0);
            let (mut wgx, mut wgw) = (gx0.clone(), gw0.clone());
            Cpu.rmsnorm_backward(
                &mut wgx,
                with_dw.then_some(&mut wgw),
                &dout,
                &x,
                &w,
                &rstd,
                c,
            )
            .unwrap();
            let (mut gx, mut gw) = (up(&cu, &gx0, C), up(&cu, &gw0, F));
            cu.rmsnorm_backward(
                cu.view_mut(&mut gx, 0..n * c),
                with_dw.then(|| cu.view_mut(&mut gw, 0..c)),
                cu.view(&ddo, 0..n * c),
                cu.view(&dx_, 0..n * c),
                cu.view(&dw_, 0..c),
                cu.view(&drs, 0..n),
                c,
            )
            .unwrap();
            let what = format!("rmsnorm 200 rows dw={with_dw}");
            assert_rel(&format!("{what} dx"), &cu, &down(&cu, &gx), &wgx, tol);
            assert_rel(&format!("{what} dw"), &cu, &down(&cu, &gw), &wgw, tol);
        }

        // sum of squares over several blocks
        let x = rounded(&cu, C, &random(&mut r, 5000, 1.0));
        let dx = up(&cu, &x, C);
        let got = cu.sum_squares(cu.view(&dx, 0..5000)).unwrap();
        let want = Cpu.sum_squares(&x).unwrap();
        assert!(
            (got - want).abs() <= 1e-6 * want,
            "sum_squares {got} vs {want}"
        );
    }
}
