//! Rotary position embedding, HF "rotate_half" layout: dimension i < HD/2 is
//! paired with i + HD/2 (not with its neighbour), and both use angle i.
//! Backward is the transpose of the rotation: the same rotation by −angle.

use super::check::{expect_len, product, rows_of, shape_err};
use super::par::rows_per_task;
use crate::backend::Result;
use crate::KernelError;
use rayon::prelude::*;

/// Validates the shapes, and every position against the table length.
#[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
fn check(
    op: &'static str,
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    positions: &[u32],
    heads: usize,
    hd: usize,
) -> Result<()> {
    if hd == 0 || hd % 2 != 0 {
        return Err(shape_err(
            op,
            format!("head dim {hd} must be positive and even"),
        ));
    }
    let n = rows_of(op, "x", x.len(), product(op, &[heads, hd])?)?;
    expect_len(op, "positions", positions.len(), n)?;
    let p = rows_of(op, "cos", cos.len(), hd / 2)?;
    expect_len(op, "sin", sin.len(), cos.len())?;
    match positions.iter().find(|&&pos| pos as usize >= p) {
        Some(&pos) => Err(KernelError::IndexOutOfRange {
            op,
            id: pos as u64,
            rows: p,
        }),
        None => Ok(()),
    }
}

/// Rotates every head of x[N,H,HD] in place by the angles of its position;
/// `sign` = +1 for forward, −1 for backward (sin(−θ) = −sin θ).
fn rotate(
    x: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    positions: &[u32],
    heads: usize,
    hd: usize,
    sign: f32,
) {
    let half = hd / 2;
    let row = heads * hd; // one token: [H,HD]
    let per_task = rows_per_task(row);
    x.par_chunks_mut(per_task * row)
        .zip(positions.par_chunks(per_task))
        .for_each(|(x, positions)| {
            for (x, &pos) in x.chunks_exact_mut(row).zip(positions) {
                let p = pos as usize * half;
                let (cos, sin) = (&cos[p..p + half], &sin[p..p + half]); // [HD/2]
                for head in x.chunks_exact_mut(hd) {
                    let (x1, x2) = head.split_at_mut(half);
                    for i in 0..half {
                        let (c, s) = (cos[i], sign * sin[i]);
                        let (a, b) = (x1[i], x2[i]);
                        x1[i] = a * c - b * s;
                        x2[i] = b * c + a * s;
                    }
                }
            }
        });
}

/// In place on x[N,H,HD]; cos, sin: [P, HD/2]; positions: [N], each < P.
pub fn forward(
    x: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    positions: &[u32],
    heads: usize,
    hd: usize,
) -> Result<()> {
    check("rope_forward", x, cos, sin, positions, heads, hd)?;
    rotate(x, cos, sin, positions, heads, hd, 1.0);
    Ok(())
}

/// In place on dx[N,H,HD]: rotation by −angle (the transpose of forward).
pub fn backward(
    dx: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    positions: &[u32],
    heads: usize,
    hd: usize,
) -> Result<()> {
    check("rope_backward", dx, cos, sin, positions, heads, hd)?;
    rotate(dx, cos, sin, positions, heads, hd, -1.0);
    Ok(())
}

/// References: plain loops in f64, written straight from the HF formula
/// `x·cos + rotate_half(x)·sin` with full-width [HD] cos/sin (each half repeated).
pub mod naive {
    fn apply(
        x: &[f64],
        cos: &[f64],
        sin: &[f64],
        positions: &[u32],
        heads: usize,
        hd: usize,
        sign: f64,
    ) -> Vec<f64> {
        let half = hd / 2;
        let mut out = vec![0.0; x.len()];
        for (n, &pos) in positions.iter().enumerate() {
            for h in 0..heads {
                let base = (n * heads + h) * hd;
                for d in 0..hd {
                    let angle_idx = pos as usize * half + d % half;
                    // rotate_half(x) = cat(−x2, x1)
                    let rot = if d < half {
                        -x[base + d + half]
                    } else {
                        x[base + d - half]
                    };
                    out[base + d] = x[base + d] * cos[angle_idx] + rot * sign * sin[angle_idx];
                }
            }
        }
        out
    }

    pub fn forward(
        x: &[f64],
        cos: &[f64],
        sin: &[f64],
        positions: &[u32],
        heads: usize,
        hd: usize,
    ) -> Vec<f64> {
        apply(x, cos, sin, positions, heads, hd, 1.0)
    }

    /// The gradient with respect to x given dout (the transposed rotation).
    pub fn backward(
        dout: &[f64],
        cos: &[f64],
        sin: &[f64],
        positions: &[u32],
        heads: usize,
        hd: usize,
    ) -> Vec<f64> {
        apply(dout, cos, sin, positions, heads, hd, -1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, dot, fd_grad, rng, to64, uniform};
    use rand::Rng;

    /// cos/sin tables [P, HD/2] for the usual inverse-frequency schedule.
    fn tables(p: usize, hd: usize) -> (Vec<f32>, Vec<f32>) {
        let half = hd / 2;
        let angle = |pos: usize, i: usize| pos as f32 / 10000f32.powf(2.0 * i as f32 / hd as f32);
        let cos = (0..p * half)
            .map(|k| angle(k / half, k % half).cos())
            .collect();
        let sin = (0..p * half)
            .map(|k| angle(k / half, k % half).sin())
            .collect();
        (cos, sin)
    }

    /// (N, H, HD, P)
    const SHAPES: [(usize, usize, usize, usize); 4] = [
        (1, 1, 2, 1),
        (5, 3, 6, 9),
        (33, 2, 64, 40),
        (7, 14, 128, 100),
    ];

    #[test]
    fn forward_and_backward_match_naive() {
        let mut r = rng(50);
        for (n, h, hd, p) in SHAPES {
            let (cos, sin) = tables(p, hd);
            let pos: Vec<u32> = (0..n).map(|_| r.random_range(0..p as u32)).collect();
            let x = uniform(&mut r, n * h * hd);
            let mut y = x.clone();
            forward(&mut y, &cos, &sin, &pos, h, hd).unwrap();
            let want = naive::forward(&to64(&x), &to64(&cos), &to64(&sin), &pos, h, hd);
            assert_close("rope_forward", &y, &want, 1e-6);

            let mut dx = x.clone();
            backward(&mut dx, &cos, &sin, &pos, h, hd).unwrap();
            let want = naive::backward(&to64(&x), &to64(&cos), &to64(&sin), &pos, h, hd);
            assert_close("rope_backward", &dx, &want, 1e-6);

            // Backward undoes forward (rotations are orthogonal).
            backward(&mut y, &cos, &sin, &pos, h, hd).unwrap();
            assert_close("roundtrip", &y, &to64(&x), 1e-5);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut r = rng(51);
        let (n, h, hd, p) = (3, 2, 6, 5);
        let (cos, sin) = tables(p, hd);
        let (cos64, sin64) = (to64(&cos), to64(&sin));
        let pos = [4u32, 0, 2];
        let dout = uniform(&mut r, n * h * hd);
        let fd = fd_grad(&to64(&uniform(&mut r, n * h * hd)), |x| {
            dot(
                &to64(&dout),
                &naive::forward(x, &cos64, &sin64, &pos, h, hd),
            )
        });
        let mut dx = dout.clone();
        backward(&mut dx, &cos, &sin, &pos, h, hd).unwrap();
        assert_close("rope dx vs fd", &dx, &fd, 1e-5);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (cos, sin) = tables(4, 4);
        let mut x = vec![0.0f32; 16]; // [2 tokens, 2 heads, 4]
        assert!(matches!(
            forward(&mut x, &cos, &sin, &[0, 4], 2, 4),
            Err(KernelError::IndexOutOfRange { id: 4, .. })
        ));
        assert!(matches!(
            forward(&mut x, &cos, &sin, &[0], 2, 4),
            Err(KernelError::Shape { .. })
        ));
        assert!(matches!(
            forward(&mut x, &cos, &sin, &[0, 0, 0, 0], 1, 3),
            Err(KernelError::Shape { .. })
        ));
        assert!(matches!(
            backward(&mut x, &cos, &sin[..7], &[0, 0], 2, 4),
            Err(KernelError::Shape { .. })
        ));
    }
}
