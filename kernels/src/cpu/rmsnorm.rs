//! RMSNorm: out = x · rstd · w with rstd = 1/sqrt(mean(x²) + eps), per row.
//!
//! Backward, for one row with g = dout, r = rstd and C columns:
//!   ∂r/∂x_i = −r³ x_i / C, so
//!   dx_i = r·w_i·g_i − x_i · r³ · mean_j(x_j·w_j·g_j),
//!   dw_j = Σ_rows g_j · x_j · r.

use super::check::{expect_len, rows_of};
use super::par::rows_per_task;
use super::simd::{self, simd_fn};
use crate::backend::Result;
use rayon::prelude::*;

/// Columns per task for the dw reduction (see `bias::bias_backward`).
const COLS_PER_TASK: usize = 64;

simd_fn! {
    /// Rows of one task: out = x·rstd·w; the mean of squares in f64 (rows are thousands wide).
    fn forward_rows(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], c: usize, eps: f32) {
        for ((out, r), x) in out.chunks_exact_mut(c).zip(rstd).zip(x.chunks_exact(c)) {
            let ms = simd::sum_squares_f64(x) / c as f64;
            *r = (1.0 / (ms + eps as f64).sqrt()) as f32;
            for ((o, &xv), &wv) in out.iter_mut().zip(x).zip(w) {
                *o = xv * *r * wv;
            }
        }
    }
}

simd_fn! {
    /// Rows of one task: dx += r·w·g − x·r³·mean(x·w·g).
    fn backward_rows(dx: &mut [f32], g: &[f32], x: &[f32], rstd: &[f32], w: &[f32], c: usize) {
        for (((dx, g), x), &r) in dx.chunks_exact_mut(c).zip(g.chunks_exact(c)).zip(x.chunks_exact(c)).zip(rstd) {
            let mean_xwg = simd::dot3_f64(x, w, g) / c as f64;
            let k = ((r as f64).powi(3) * mean_xwg) as f32; // r³·mean(x·w·g)
            for (((d, &x), &w), &g) in dx.iter_mut().zip(x).zip(w).zip(g) {
                *d += r * w * g - x * k;
            }
        }
    }
}

simd_fn! {
    /// dw for the columns [c0, c0 + dw.len()): every row summed in order, in f64.
    fn dw_block(dw: &mut [f32], dout: &[f32], x: &[f32], rstd: &[f32], c: usize, c0: usize) {
        let mut acc = [0.0f64; COLS_PER_TASK]; // [cols of this block]
        for (row, &r) in rstd.iter().enumerate() {
            let span = row * c + c0..row * c + c0 + dw.len();
            for ((a, &g), &x) in acc.iter_mut().zip(&dout[span.clone()]).zip(&x[span]) {
                *a += (g * x * r) as f64;
            }
        }
        for (d, a) in dw.iter_mut().zip(acc) {
            *d += a as f32;
        }
    }
}

/// out[N,C], rstd[N]; x[N,C], w[C].
pub fn forward(
    out: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    w: &[f32],
    c: usize,
    eps: f32,
) -> Result<()> {
    const OP: &str = "rmsnorm_forward";
    let n = rows_of(OP, "x", x.len(), c)?;
    expect_len(OP, "out", out.len(), x.len())?;
    expect_len(OP, "rstd", rstd.len(), n)?;
    expect_len(OP, "w", w.len(), c)?;
    let per_task = rows_per_task(c);
    out.par_chunks_mut(per_task * c)
        .zip(rstd.par_chunks_mut(per_task))
        .zip(x.par_chunks(per_task * c))
        .for_each(|((out, rstd), x)| forward_rows(out, rstd, x, w, c, eps));
    Ok(())
}

/// dx[N,C] += ..., dw[C] += ... (see the module doc); rstd[N] from forward.
pub fn backward(
    dx: &mut [f32],
    dw: Option<&mut [f32]>,
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    c: usize,
) -> Result<()> {
    const OP: &str = "rmsnorm_backward";
    let n = rows_of(OP, "x", x.len(), c)?;
    expect_len(OP, "dx", dx.len(), x.len())?;
    expect_len(OP, "dout", dout.len(), x.len())?;
    expect_len(OP, "rstd", rstd.len(), n)?;
    expect_len(OP, "w", w.len(), c)?;
    if let Some(dw) = &dw {
        expect_len(OP, "dw", dw.len(), c)?;
    }

    let per_task = rows_per_task(c);
    dx.par_chunks_mut(per_task * c)
        .zip(dout.par_chunks(per_task * c))
        .zip(x.par_chunks(per_task * c))
        .zip(rstd.par_chunks(per_task))
        .for_each(|(((dx, g), x), rstd)| backward_rows(dx, g, x, rstd, w, c));

    // dw: each task owns a block of columns and sums every row in order.
    if let Some(dw) = dw {
        dw.par_chunks_mut(COLS_PER_TASK)
            .enumerate()
            .for_each(|(blk, dw)| dw_block(dw, dout, x, rstd, c, blk * COLS_PER_TASK));
    }
    Ok(())
}

/// References: plain loops in f64.
pub mod naive {
    /// (out[N,C], rstd[N]).
    pub fn forward(x: &[f64], w: &[f64], c: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
        let n = x.len() / c;
        let mut out = vec![0.0; x.len()];
        let mut rstd = vec![0.0; n];
        for i in 0..n {
            let mut ss = 0.0;
            for j in 0..c {
                ss += x[i * c + j] * x[i * c + j];
            }
            rstd[i] = 1.0 / (ss / c as f64 + eps).sqrt();
            for j in 0..c {
                out[i * c + j] = x[i * c + j] * rstd[i] * w[j];
            }
        }
        (out, rstd)
    }

    /// (dx[N,C], dw[C]), not accumulated.
    pub fn backward(
        dout: &[f64],
        x: &[f64],
        w: &[f64],
        c: usize,
        eps: f64,
    ) -> (Vec<f64>, Vec<f64>) {
        let (_, rstd) = forward(x, w, c, eps);
        let n = x.len() / c;
        let mut dx = vec![0.0; x.len()];
        let mut dw = vec![0.0; c];
        for i in 0..n {
            let r = rstd[i];
            let mut dot = 0.0;
            for j in 0..c {
                dot += x[i * c + j] * w[j] * dout[i * c + j];
            }
            for j in 0..c {
                let k = i * c + j;
                dx[k] = r * w[j] * dout[k] - x[k] * r * r * r * dot / c as f64;
                dw[j] += dout[k] * x[k] * r;
            }
        }
        (dx, dw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, dot, fd_grad, plus, rng, to64, uniform};
    use crate::KernelError;

    const SHAPES: [(usize, usize); 5] = [(1, 1), (3, 7), (17, 65), (300, 130), (2, 2000)];
    const EPS: f32 = 1e-6;

    #[test]
    fn forward_and_backward_match_naive() {
        let mut r = rng(40);
        for (n, c) in SHAPES {
            let x = uniform(&mut r, n * c);
            let w = uniform(&mut r, c);
            let mut out = vec![0.0f32; n * c];
            let mut rstd = vec![0.0f32; n];
            forward(&mut out, &mut rstd, &x, &w, c, EPS).unwrap();
            let (want_out, want_rstd) = naive::forward(&to64(&x), &to64(&w), c, EPS as f64);
            assert_close("out", &out, &want_out, 1e-5);
            assert_close("rstd", &rstd, &want_rstd, 1e-5);

            let dout = uniform(&mut r, n * c);
            let mut dx = uniform(&mut r, n * c);
            let mut dw = uniform(&mut r, c);
            let (gx, gw) = naive::backward(&to64(&dout), &to64(&x), &to64(&w), c, EPS as f64);
            let (want_dx, want_dw) = (plus(&dx, &gx), plus(&dw, &gw));
            backward(&mut dx, Some(&mut dw), &dout, &x, &w, &rstd, c).unwrap();
            assert_close("dx", &dx, &want_dx, 1e-4);
            assert_close("dw", &dw, &want_dw, 1e-4);

            // A frozen weight: dx only.
            let mut dx2 = vec![0.0f32; n * c];
            backward(&mut dx2, None, &dout, &x, &w, &rstd, c).unwrap();
            assert_close("dx (no dw)", &dx2, &gx, 1e-4);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut r = rng(41);
        let (n, c, eps) = (3, 5, 1e-5);
        let x = uniform(&mut r, n * c);
        let w = uniform(&mut r, c);
        let dout = uniform(&mut r, n * c);
        let (x64, w64, d64) = (to64(&x), to64(&w), to64(&dout));
        let fd_x = fd_grad(&x64, |x| dot(&d64, &naive::forward(x, &w64, c, eps).0));
        let fd_w = fd_grad(&w64, |w| dot(&d64, &naive::forward(&x64, w, c, eps).0));
        let (gx, gw) = naive::backward(&d64, &x64, &w64, c, eps);
        crate::cpu::testutil::assert_close64("naive dx vs fd", &gx, &fd_x, 1e-6);
        crate::cpu::testutil::assert_close64("naive dw vs fd", &gw, &fd_w, 1e-6);

        let mut out = vec![0.0f32; n * c];
        let mut rstd = vec![0.0f32; n];
        forward(&mut out, &mut rstd, &x, &w, c, eps as f32).unwrap();
        let mut dx = vec![0.0f32; n * c];
        let mut dw = vec![0.0f32; c];
        backward(&mut dx, Some(&mut dw), &dout, &x, &w, &rstd, c).unwrap();
        assert_close("dx vs fd", &dx, &fd_x, 1e-4);
        assert_close("dw vs fd", &dw, &fd_w, 1e-4);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = vec![1.0f32; 6];
        let mut out = vec![0.0f32; 6];
        let mut rstd = vec![0.0f32; 2];
        assert!(matches!(
            forward(&mut out, &mut rstd, &x, &[1.0; 2], 3, EPS),
            Err(KernelError::Shape { .. })
        ));
        assert!(matches!(
            forward(&mut out, &mut rstd[..1], &x, &[1.0; 3], 3, EPS),
            Err(KernelError::Shape { .. })
        ));
        let mut dx = vec![0.0f32; 6];
        let mut dw = vec![0.0f32; 2];
        let r = backward(&mut dx, Some(&mut dw), &x, &x, &[1.0; 3], &rstd, 3);
        assert!(matches!(
            r,
            Err(KernelError::Shape {
                op: "rmsnorm_backward",
                ..
            })
        ));
    }
}
