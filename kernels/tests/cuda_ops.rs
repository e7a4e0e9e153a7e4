//! Each CUDA op of elementwise, bias, embedding, rmsnorm, rope, swiglu,
//! dropout, cross_entropy and adamw against the CPU op (the reference), on
//! fresh random inputs of realistic shapes, for every compute dtype. Outputs
//! start as NaN (an element left unwritten fails), gradients start random (to
//! check the +=), and the CPU sees the inputs rounded to what the device
//! buffers hold. Without a GPU every test prints SKIPPED and passes.

mod common;

use common::{assert_rel, backends, download, poisoned, random, rng, rounded, upload};
use rand::Rng;
use rlhf_kernels::backend::dropout_keep;
use rlhf_kernels::cuda::{Cuda, CudaBuf, CudaView, CudaViewMut};
use rlhf_kernels::{AdamW, Backend, Cpu, KernelError, Precision};

const F32: Precision = Precision::F32;
const COMPUTE: Precision = Precision::Compute;

/// Rows: a batch of 2 sequences of 77 tokens.
const N: usize = 2 * 77;

fn all<'a>(cu: &Cuda, b: &'a CudaBuf) -> CudaView<'a> {
    cu.view(b, 0..cu.len(b))
}

fn all_mut<'a>(cu: &Cuda, b: &'a mut CudaBuf) -> CudaViewMut<'a> {
    let n = cu.len(b);
    cu.view_mut(b, 0..n)
}

/// Random values bounded away from zero (|v| ≥ 0.25), so a zero output can
/// only come from a dropped element.
fn nonzero(r: &mut impl Rng, n: usize) -> Vec<f32> {
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

fn is_shape_err<T: std::fmt::Debug>(r: Result<T, KernelError>) -> bool {
    matches!(r, Err(KernelError::Shape { .. }))
}

// ---- elementwise --------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn axpy_and_scale_match_cpu() {
    for (cu, tol) in backends("axpy_and_scale_match_cpu") {
        let mut r = rng(1);
        let n = N * 512 + 13;
        // axpy: an f32 accumulator and a compute-dtype x.
        let x = random(&mut r, n, 1.0);
        let y0 = random(&mut r, n, 1.0);
        let xb = upload(&cu, &x, COMPUTE);
        let mut yb = upload(&cu, &y0, F32);
        cu.axpy(all_mut(&cu, &mut yb), -0.75, all(&cu, &xb))
            .unwrap();
        let mut want = y0.clone();
        Cpu.axpy(&mut want, -0.75, &rounded(&cu, COMPUTE, &x))
            .unwrap();
        assert_rel("axpy", &cu, &download(&cu, &yb), &want, tol);

        // axpy into a compute-dtype y.
        let mut yc = upload(&cu, &y0, COMPUTE);
        cu.axpy(all_mut(&cu, &mut yc), 0.5, all(&cu, &xb)).unwrap();
        let mut want = rounded(&cu, COMPUTE, &y0);
        Cpu.axpy(&mut want, 0.5, &rounded(&cu, COMPUTE, &x))
            .unwrap();
        assert_rel("axpy (compute y)", &cu, &download(&cu, &yc), &want, tol);

        // scale, both storage types.
        for p in [F32, COMPUTE] {
            let mut b = upload(&cu, &x, p);
            cu.scale(all_mut(&cu, &mut b), -1.5).unwrap();
            let mut want = rounded(&cu, p, &x);
            Cpu.scale(&mut want, -1.5).unwrap();
            assert_rel("scale", &cu, &download(&cu, &b), &want, tol);
        }

        // Length mismatch.
        assert!(is_shape_err(cu.axpy(
            cu.view_mut(&mut yb, 0..n - 1),
            1.0,
            all(&cu, &xb)
        )));
    }
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn sum_squares_matches_cpu_and_propagates_non_finite() {
    for (cu, _tol) in backends("sum_squares_matches_cpu_and_propagates_non_finite") {
        let mut r = rng(2);
        // Small, one block; mid-sized; large enough that the grid is capped.
        for n in [1000, N * 896, 5_000_011] {
            let x = random(&mut r, n, 2.0);
            for p in [F32, COMPUTE] {
                let b = upload(&cu, &x, p);
                let got = cu.sum_squares(all(&cu, &b)).unwrap();
                let want = Cpu.sum_squares(&rounded(&cu, p, &x)).unwrap();
                eprintln!("sum_squares n={n} [{}]: {got} vs {want}", cu.dtype().name());
                assert!(
                    (got - want).abs() <= 1e-9 * want,
                    "sum_squares n={n}: {got} vs {want}"
                );
                let again = cu.sum_squares(all(&cu, &b)).unwrap();
                assert_eq!(
                    got.to_bits(),
                    again.to_bits(),
                    "sum_squares is not deterministic"
                );
            }
        }
        // One inf or NaN anywhere makes the result non-finite (fp16 overflow detection).
        let n = 3_000_001;
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            let mut x = random(&mut r, n, 1.0);
            x[n / 2 + 7] = bad;
            for p in [F32, COMPUTE] {
                let b = upload(&cu, &x, p);
                let got = cu.sum_squares(all(&cu, &b)).unwrap();
                assert!(!got.is_finite(), "sum_squares with {bad}: {got}");
            }
        }
        let empty = upload(&cu, &[], F32);
        assert_eq!(cu.sum_squares(all(&cu, &empty)).unwrap(), 0.0);
    }
}

// ---- bias ---------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn bias_matches_cpu() {
    for (cu, tol) in backends("bias_matches_cpu") {
        let mut r = rng(3);
        // (rows, C): the q projection's bias; many rows (several chunks) of k/v.
        for (n, c) in [(N, 512), (4099, 128)] {
            let x = random(&mut r, n * c, 1.0);
            for bp in [F32, COMPUTE] {
                let bias = random(&mut r, c, 1.0);
                let mut xb = upload(&cu, &x, COMPUTE);
                let bb = upload(&cu, &bias, bp);
                cu.add_bias(all_mut(&cu, &mut xb), all(&cu, &bb), c)
                    .unwrap();
                let mut want = rounded(&cu, COMPUTE, &x);
                Cpu.add_bias(&mut want, &rounded(&cu, bp, &bias), c)
                    .unwrap();
                assert_rel("add_bias", &cu, &download(&cu, &xb), &want, tol);
            }

            let dout = random(&mut r, n * c, 1.0);
            let db0 = random(&mut r, c, 1.0);
            let doutb = upload(&cu, &dout, COMPUTE);
            let mut dbb = upload(&cu, &db0, F32);
            cu.bias_backward(all_mut(&cu, &mut dbb), all(&cu, &doutb), c)
                .unwrap();
            let got = download(&cu, &dbb);
            let mut want = db0.clone();
            Cpu.bias_backward(&mut want, &rounded(&cu, COMPUTE, &dout), c)
                .unwrap();
            assert_rel("bias_backward", &cu, &got, &want, tol);
            // Deterministic: the same result again from the same start.
            let mut again = upload(&cu, &db0, F32);
            cu.bias_backward(all_mut(&cu, &mut again), all(&cu, &doutb), c)
                .unwrap();
            assert_eq!(
                got,
                download(&cu, &again),
                "bias_backward is not deterministic"
            );
        }
        let mut xb = upload(&cu, &[0.0; 6], COMPUTE);
        let bb = upload(&cu, &[0.0; 4], F32);
        assert!(is_shape_err(cu.add_bias(
            all_mut(&cu, &mut xb),
            all(&cu, &bb),
            4
        )));
    }
}

// ---- embedding ------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn embedding_matches_cpu() {
    for (cu, tol) in backends("embedding_matches_cpu") {
        let mut r = rng(4);
        // (V, C): few repeated ids; many (every id repeats).
        for (v, c) in [(1000, 512), (37, 896)] {
            let mut ids: Vec<u32> = (0..N).map(|_| r.random_range(0..v as u32)).collect();
            ids[N - 1] = ids[0]; // at least one repeat
            ids[1] = v as u32 - 1; // the last row
            for tp in [F32, COMPUTE] {
                let table = random(&mut r, v * c, 1.0);
                let tb = upload(&cu, &table, tp);
                let mut out = poisoned(&cu, N * c, COMPUTE);
                cu.embedding_forward(all_mut(&cu, &mut out), all(&cu, &tb), &ids, c)
                    .unwrap();
                let mut want = vec![0.0f32; N * c];
                Cpu.embedding_forward(&mut want, &rounded(&cu, tp, &table), &ids, c)
                    .unwrap();
                assert_rel("embedding_forward", &cu, &download(&cu, &out), &want, tol);
            }

            let dout = random(&mut r, N * c, 1.0);
            let dt0 = random(&mut r, v * c, 1.0);
            let doutb = upload(&cu, &dout, COMPUTE);
            let mut dtb = upload(&cu, &dt0, F32);
            cu.embedding_backward(all_mut(&cu, &mut dtb), all(&cu, &doutb), &ids, c)
                .unwrap();
            let got = download(&cu, &dtb);
            let mut want = dt0.clone();
            Cpu.embedding_backward(&mut want, &rounded(&cu, COMPUTE, &dout), &ids, c)
                .unwrap();
            assert_rel("embedding_backward", &cu, &got, &want, tol);
            let mut again = upload(&cu, &dt0, F32);
            cu.embedding_backward(all_mut(&cu, &mut again), all(&cu, &doutb), &ids, c)
                .unwrap();
            assert_eq!(
                got,
                download(&cu, &again),
                "embedding_backward is not deterministic"
            );

            // An id out of range is an error, before anything is written.
            let mut bad = ids.clone();
            bad[5] = v as u32;
            let err = cu
                .embedding_backward(all_mut(&cu, &mut dtb), all(&cu, &doutb), &bad, c)
                .unwrap_err();
            assert!(
                matches!(err, KernelError::IndexOutOfRange { id, rows, .. } if id == v as u64 && rows == v),
                "{err}"
            );
            assert_eq!(got, download(&cu, &dtb), "a failed op wrote");
        }
    }
}

// ---- RMSNorm --------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn rmsnorm_matches_cpu() {
    for (cu, tol) in backends("rmsnorm_matches_cpu") {
        let mut r = rng(5);
        let eps = 1e-6f32;
        for c in [512, 896] {
            for wp in [F32, COMPUTE] {
                let x = random(&mut r, N * c, 2.0);
                let w: Vec<f32> = random(&mut r, c, 0.5).iter().map(|v| 1.0 + v).collect();
                let (xr, wr) = (rounded(&cu, COMPUTE, &x), rounded(&cu, wp, &w));
                let xb = upload(&cu, &x, COMPUTE);
                let wb = upload(&cu, &w, wp);
                let mut out = poisoned(&cu, N * c, COMPUTE);
                let mut rstd = poisoned(&cu, N, F32);
                cu.rmsnorm_forward(
                    all_mut(&cu, &mut out),
                    all_mut(&cu, &mut rstd),
                    all(&cu, &xb),
                    all(&cu, &wb),
                    c,
                    eps,
                )
                .unwrap();
                let (mut want_out, mut want_rstd) = (vec![0.0f32; N * c], vec![0.0f32; N]);
                Cpu.rmsnorm_forward(&mut want_out, &mut want_rstd, &xr, &wr, c, eps)
                    .unwrap();
                assert_rel("rmsnorm out", &cu, &download(&cu, &out), &want_out, tol);
                let got_rstd = download(&cu, &rstd);
                assert_rel("rmsnorm rstd", &cu, &got_rstd, &want_rstd, 1e-6);

                // Backward, from the device's rstd (the CPU gets the same values).
                let dout = random(&mut r, N * c, 1.0);
                let dx0 = random(&mut r, N * c, 1.0);
                let dw0 = random(&mut r, c, 1.0);
                let doutb = upload(&cu, &dout, COMPUTE);
                let mut dxb = upload(&cu, &dx0, COMPUTE);
                let mut dwb = upload(&cu, &dw0, F32);
                cu.rmsnorm_backward(
                    all_mut(&cu, &mut dxb),
                    Some(all_mut(&cu, &mut dwb)),
                    all(&cu, &doutb),
                    all(&cu, &xb),
                    all(&cu, &wb),
                    all(&cu, &rstd),
                    c,
                )
                .unwrap();
                let doutr = rounded(&cu, COMPUTE, &dout);
                let (mut want_dx, mut want_dw) = (rounded(&cu, COMPUTE, &dx0), dw0.clone());
                Cpu.rmsnorm_backward(
                    &mut want_dx,
                    Some(&mut want_dw),
                    &doutr,
                    &xr,
                    &wr,
                    &got_rstd,
                    c,
                )
                .unwrap();
                assert_rel("rmsnorm dx", &cu, &download(&cu, &dxb), &want_dx, tol);
                let got_dw = download(&cu, &dwb);
                assert_rel("rmsnorm dw", &cu, &got_dw, &want_dw, tol);

                // dw deterministic; and a frozen weight (dw None) gives the same dx.
                let mut dxb2 = upload(&cu, &dx0, COMPUTE);
                let mut dwb2 = upload(&cu, &dw0, F32);
                cu.rmsnorm_backward(
                    all_mut(&cu, &mut dxb2),
                    Some(all_mut(&cu, &mut dwb2)),
                    all(&cu, &doutb),
                    all(&cu, &xb),
                    all(&cu, &wb),
                    all(&cu, &rstd),
                    c,
                )
                .unwrap();
                assert_eq!(
                    got_dw,
                    download(&cu, &dwb2),
                    "rmsnorm dw is not deterministic"
                );
                let mut dxb3 = upload(&cu, &dx0, COMPUTE);
                cu.rmsnorm_backward(
                    all_mut(&cu, &mut dxb3),
                    None,
                    all(&cu, &doutb),
                    all(&cu, &xb),
                    all(&cu, &wb),
                    all(&cu, &rstd),
                    c,
                )
                .unwrap();
                assert_eq!(download(&cu, &dxb), download(&cu, &dxb3), "dx with dw None");
            }
        }
        // rstd must be f32.
        if cu.dtype() != rlhf_kernels::cuda::Dtype::F32 {
            let xb = upload(&cu, &[1.0; 8], COMPUTE);
            let wb = upload(&cu, &[1.0; 4], F32);
            let mut out = poisoned(&cu, 8, COMPUTE);
            let mut rstd = poisoned(&cu, 2, COMPUTE);
            assert!(is_shape_err(cu.rmsnorm_forward(
                all_mut(&cu, &mut out),
                all_mut(&cu, &mut rstd),
                all(&cu, &xb),
                all(&cu, &wb),
                4,
                eps
            )));
        }
    }
}

// ---- rotary embedding -----------------------------------------------------

/// cos/sin tables [P, HD/2] for the usual inverse-frequency schedule.
fn rope_tables(p: usize, hd: usize) -> (Vec<f32>, Vec<f32>) {
    let half = hd / 2;
    let angle = |pos: usize, i: usize| pos as f32 / 1_000_000f32.powf(2.0 * i as f32 / hd as f32);
    let cos = (0..p * half)
        .map(|k| angle(k / half, k % half).cos())
        .collect();
    let sin = (0..p * half)
        .map(|k| angle(k / half, k % half).sin())
        .collect();
    (cos, sin)
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn rope_matches_cpu() {
    for (cu, tol) in backends("rope_matches_cpu") {
        let mut r = rng(6);
        let (nh, p) = (8, 512);
        // Positions: the first sequence 0..77, the second left-padded / shifted.
        let positions: Vec<u32> = (0..77u32).chain((0..77u32).map(|i| i + 300)).collect();
        for hd in [64, 128] {
            let (cos, sin) = rope_tables(p, hd);
            let (cb, sb) = (upload(&cu, &cos, F32), upload(&cu, &sin, F32));
            for backward in [false, true] {
                let x = random(&mut r, N * nh * hd, 1.0);
                let mut xb = upload(&cu, &x, COMPUTE);
                let mut want = rounded(&cu, COMPUTE, &x);
                if backward {
                    cu.rope_backward(
                        all_mut(&cu, &mut xb),
                        all(&cu, &cb),
                        all(&cu, &sb),
                        &positions,
                        nh,
                        hd,
                    )
                    .unwrap();
                    Cpu.rope_backward(&mut want, &cos, &sin, &positions, nh, hd)
                        .unwrap();
                } else {
                    cu.rope_forward(
                        all_mut(&cu, &mut xb),
                        all(&cu, &cb),
                        all(&cu, &sb),
                        &positions,
                        nh,
                        hd,
                    )
                    .unwrap();
                    Cpu.rope_forward(&mut want, &cos, &sin, &positions, nh, hd)
                        .unwrap();
                }
                let what = if backward {
                    "rope_backward"
                } else {
                    "rope_forward"
                };
                assert_rel(what, &cu, &download(&cu, &xb), &want, tol);
            }
            // A position past the table is an error.
            let mut bad = positions.clone();
            bad[3] = p as u32;
            let mut xb = upload(&cu, &vec![0.0; N * nh * hd], COMPUTE);
            let err = cu
                .rope_forward(
                    all_mut(&cu, &mut xb),
                    all(&cu, &cb),
                    all(&cu, &sb),
                    &bad,
                    nh,
                    hd,
                )
                .unwrap_err();
            assert!(matches!(err, KernelError::IndexOutOfRange { .. }), "{err}");
            assert!(is_shape_err(cu.rope_forward(
                all_mut(&cu, &mut xb),
                all(&cu, &cb),
                all(&cu, &sb),
                &positions[1..],
                nh,
                hd
            )));
        }
    }
}

// ---- SwiGLU ---------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn swiglu_matches_cpu() {
    for (cu, tol) in backends("swiglu_matches_cpu") {
        let mut r = rng(7);
        let n = N * 1376;
        // Gates over [−8, 8) to cover both tails of σ.
        let gate = random(&mut r, n, 8.0);
        let up = random(&mut r, n, 1.0);
        let (gr, ur) = (rounded(&cu, COMPUTE, &gate), rounded(&cu, COMPUTE, &up));
        let (gb, ub) = (upload(&cu, &gate, COMPUTE), upload(&cu, &up, COMPUTE));
        let mut out = poisoned(&cu, n, COMPUTE);
        cu.swiglu_forward(all_mut(&cu, &mut out), all(&cu, &gb), all(&cu, &ub))
            .unwrap();
        let mut want = vec![0.0f32; n];
        Cpu.swiglu_forward(&mut want, &gr, &ur).unwrap();
        assert_rel("swiglu_forward", &cu, &download(&cu, &out), &want, tol);

        let dout = random(&mut r, n, 1.0);
        let (dg0, du0) = (random(&mut r, n, 1.0), random(&mut r, n, 1.0));
        let doutb = upload(&cu, &dout, COMPUTE);
        let mut dgb = upload(&cu, &dg0, COMPUTE);
        let mut dub = upload(&cu, &du0, COMPUTE);
        cu.swiglu_backward(
            all_mut(&cu, &mut dgb),
            all_mut(&cu, &mut dub),
            all(&cu, &doutb),
            all(&cu, &gb),
            all(&cu, &ub),
        )
        .unwrap();
        let (mut want_g, mut want_u) = (rounded(&cu, COMPUTE, &dg0), rounded(&cu, COMPUTE, &du0));
        Cpu.swiglu_backward(
            &mut want_g,
            &mut want_u,
            &rounded(&cu, COMPUTE, &dout),
            &gr,
            &ur,
        )
        .unwrap();
        assert_rel("swiglu dgate", &cu, &download(&cu, &dgb), &want_g, tol);
        assert_rel("swiglu dup", &cu, &download(&cu, &dub), &want_u, tol);

        // Extreme gates stay finite.
        let gate = [-1e4f32, -100.0, 100.0, 1e4];
        let gb = upload(&cu, &gate, F32);
        let ub = upload(&cu, &[1.0; 4], F32);
        let mut out = poisoned(&cu, 4, F32);
        cu.swiglu_forward(all_mut(&cu, &mut out), all(&cu, &gb), all(&cu, &ub))
            .unwrap();
        assert!(download(&cu, &out).iter().all(|v| v.is_finite()));
    }
}

// ---- dropout --------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn dropout_matches_cpu_mask_exactly() {
    for (cu, tol) in backends("dropout_matches_cpu_mask_exactly") {
        let mut r = rng(8);
        let n = N * 512 + 5;
        for (p, seed) in [
            (0.1f32, 0xD6E8_FEB8_6659_FD93u64),
            (0.5, (7 << 32) | 3),
            (0.0, 1),
            (1.0, 2),
        ] {
            let x = nonzero(&mut r, n);
            let xb = upload(&cu, &x, COMPUTE);
            let mut out = poisoned(&cu, n, COMPUTE);
            cu.dropout_forward(all_mut(&cu, &mut out), all(&cu, &xb), p, seed)
                .unwrap();
            let got = download(&cu, &out);
            let mut want = vec![0.0f32; n];
            Cpu.dropout_forward(&mut want, &rounded(&cu, COMPUTE, &x), p, seed)
                .unwrap();
            for i in 0..n {
                let keep = dropout_keep(seed, i as u64, p);
                assert_eq!(
                    got[i] != 0.0,
                    keep,
                    "dropout_forward p={p} element {i}: {}",
                    got[i]
                );
                assert_eq!(want[i] != 0.0, keep, "cpu dropout p={p} element {i}");
            }
            assert_rel("dropout_forward", &cu, &got, &want, tol);

            // Backward into an f32 gradient: exactly the kept elements change.
            let dout = nonzero(&mut r, n);
            let dx0 = random(&mut r, n, 1.0);
            let doutb = upload(&cu, &dout, COMPUTE);
            let mut dxb = upload(&cu, &dx0, F32);
            cu.dropout_backward(all_mut(&cu, &mut dxb), all(&cu, &doutb), p, seed)
                .unwrap();
            let got = download(&cu, &dxb);
            let mut want = dx0.clone();
            Cpu.dropout_backward(&mut want, &rounded(&cu, COMPUTE, &dout), p, seed)
                .unwrap();
            for i in 0..n {
                let keep = dropout_keep(seed, i as u64, p);
                assert_eq!(got[i] != dx0[i], keep, "dropout_backward p={p} element {i}");
            }
            assert_rel("dropout_backward", &cu, &got, &want, tol);
        }
        let xb = upload(&cu, &[1.0; 4], COMPUTE);
        let mut out = poisoned(&cu, 4, COMPUTE);
        assert!(is_shape_err(cu.dropout_forward(
            all_mut(&cu, &mut out),
            all(&cu, &xb),
            1.5,
            0
        )));
        assert!(is_shape_err(cu.dropout_forward(
            all_mut(&cu, &mut out),
            all(&cu, &xb),
            f32::NAN,
            0
        )));
    }
}

// ---- cross-entropy --------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn cross_entropy_matches_cpu() {
    for (cu, tol) in backends("cross_entropy_matches_cpu") {
        let mut r = rng(9);
        // (rows, V): Llama's vocabulary; a few rows of Qwen's.
        for (n, v) in [(N, 32_000), (6, 151_936)] {
            let logits = random(&mut r, n * v, 8.0);
            let lr = rounded(&cu, COMPUTE, &logits);
            let targets: Vec<i32> = (0..n)
                .map(|i| {
                    if i % 10 == 3 {
                        -100
                    } else {
                        r.random_range(0..v as i32)
                    }
                })
                .collect();
            let valid = targets.iter().filter(|&&t| t != -100).count();
            let s = 1.0 / valid as f32;

            // Loss only: the logits stay as they are.
            let mut lb = upload(&cu, &logits, COMPUTE);
            let loss = cu
                .cross_entropy(all_mut(&cu, &mut lb), &targets, v, None)
                .unwrap();
            let mut want_l = lr.clone();
            let want_loss = Cpu.cross_entropy(&mut want_l, &targets, v, None).unwrap();
            assert_rel("cross_entropy loss (no grad)", &cu, &loss, &want_loss, tol);
            assert_eq!(download(&cu, &lb), lr, "logits changed without grad_scale");

            // Loss and gradient in place.
            let loss = cu
                .cross_entropy(all_mut(&cu, &mut lb), &targets, v, Some(s))
                .unwrap();
            let want_loss = Cpu
                .cross_entropy(&mut want_l, &targets, v, Some(s))
                .unwrap();
            assert_rel("cross_entropy loss", &cu, &loss, &want_loss, tol);
            let got = download(&cu, &lb);
            assert_rel("cross_entropy dlogits", &cu, &got, &want_l, tol);
            for (row, &t) in targets.iter().enumerate() {
                if t == -100 {
                    assert_eq!(loss[row], 0.0);
                    assert!(
                        got[row * v..(row + 1) * v].iter().all(|&g| g == 0.0),
                        "row {row}"
                    );
                }
            }

            // Bad targets are errors, checked before anything is written.
            let mut lb = upload(&cu, &logits, COMPUTE);
            let mut bad = targets.clone();
            bad[n - 1] = v as i32;
            let err = cu
                .cross_entropy(all_mut(&cu, &mut lb), &bad, v, Some(s))
                .unwrap_err();
            assert!(
                matches!(err, KernelError::IndexOutOfRange { id, rows, .. } if id == v as u64 && rows == v),
                "{err}"
            );
            bad[n - 1] = -5;
            assert!(is_shape_err(cu.cross_entropy(
                all_mut(&cu, &mut lb),
                &bad,
                v,
                Some(s)
            )));
            assert!(is_shape_err(cu.cross_entropy(
                all_mut(&cu, &mut lb),
                &targets[1..],
                v,
                None
            )));
            assert_eq!(download(&cu, &lb), lr, "a failed cross_entropy wrote");
        }
    }
}

// ---- AdamW ----------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn adamw_matches_cpu() {
    for (cu, _tol) in backends("adamw_matches_cpu") {
        let mut r = rng(10);
        let n = 100_003;
        let h = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 1,
        };
        let p0 = random(&mut r, n, 1.0);
        let mut pb = upload(&cu, &p0, F32);
        let mut mb = upload(&cu, &vec![0.0; n], F32);
        let mut vb = upload(&cu, &vec![0.0; n], F32);
        let (mut p, mut m, mut v) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
        for step in 1..=4 {
            let g = random(&mut r, n, 0.1);
            let gb = upload(&cu, &g, F32);
            let h = AdamW { step, ..h };
            cu.adamw(
                all_mut(&cu, &mut pb),
                all(&cu, &gb),
                all_mut(&cu, &mut mb),
                all_mut(&cu, &mut vb),
                h,
            )
            .unwrap();
            Cpu.adamw(&mut p, &g, &mut m, &mut v, h).unwrap();
        }
        // Everything is f32 on both sides: f32 tolerance whatever the compute dtype.
        assert_rel("adamw params", &cu, &download(&cu, &pb), &p, 1e-6);
        assert_rel("adamw m", &cu, &download(&cu, &mb), &m, 1e-6);
        assert_rel("adamw v", &cu, &download(&cu, &vb), &v, 1e-6);

        let gb = upload(&cu, &vec![0.0; n], F32);
        assert!(is_shape_err(cu.adamw(
            all_mut(&cu, &mut pb),
            all(&cu, &gb),
            all_mut(&cu, &mut mb),
            all_mut(&cu, &mut vb),
            AdamW { step: 0, ..h }
        )));
        if cu.dtype() != rlhf_kernels::cuda::Dtype::F32 {
            let mut pc = upload(&cu, &p0, COMPUTE);
            assert!(is_shape_err(cu.adamw(
                all_mut(&cu, &mut pc),
                all(&cu, &gb),
                all_mut(&cu, &mut mb),
                all_mut(&cu, &mut vb),
                h
            )));
        }
    }
}
