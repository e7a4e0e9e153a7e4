//! Matrix products through the `gemm` crate. Transposes are expressed as
//! strides, never materialised.
//!
//! Careful with the crate's naming: `gemm::gemm` computes
//! `dst = alpha·dst + beta·lhs·rhs`, and with `read_dst = false` dst is not read
//! at all (so stale NaNs in an output buffer cannot leak into it). Our
//! [`Gemm::alpha`] is therefore the crate's `beta`, and the crate's `alpha` is 1.

use super::check::{expect_len, product};
use crate::backend::{Gemm, Result};
use gemm::Parallelism;

/// A strided read-only matrix operand: element (i, j) lives at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// A strided output matrix, addressed like [`Mat`].
#[derive(Clone, Copy)]
pub(crate) struct MatMut {
    pub ptr: *mut f32,
    pub rs: isize,
    pub cs: isize,
}

impl Mat {
    /// The matrix stored row-major with row stride `ld`.
    pub fn rows(ptr: *const f32, ld: usize) -> Self {
        Mat {
            ptr,
            rs: ld as isize,
            cs: 1,
        }
    }
    /// The transpose of a matrix stored row-major with row stride `ld`.
    pub fn transposed(ptr: *const f32, ld: usize) -> Self {
        Mat {
            ptr,
            rs: 1,
            cs: ld as isize,
        }
    }
}

impl MatMut {
    /// The matrix stored row-major with row stride `ld`.
    pub fn rows(ptr: *mut f32, ld: usize) -> Self {
        MatMut {
            ptr,
            rs: ld as isize,
            cs: 1,
        }
    }
}

/// dst[m,n] = (accumulate ? dst : 0) + scale · lhs[m,k] · rhs[k,n].
///
/// # Safety
/// Every element (i, j) with i < m, j < n (resp. i < m, j < k; i < k, j < n)
/// addressed through `dst` (resp. `lhs`, `rhs`) must be in bounds of a live
/// allocation; `dst` must not overlap `lhs` or `rhs`, and nothing else may
/// access `dst`'s elements during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    par: Parallelism,
) {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        gemm::gemm(
            m, n, k, dst.ptr, dst.cs, dst.rs, accumulate, lhs.ptr, lhs.cs, lhs.rs, rhs.ptr, rhs.cs,
            rhs.rs, 1.0, scale, false, false, false, par,
        )
    }
}

/// out[m,n] (=|+=) alpha · op(a)[m,k] · op(b)[k,n], on the whole rayon pool.
pub fn gemm(out: &mut [f32], a: &[f32], b: &[f32], g: Gemm) -> Result<()> {
    const OP: &str = "gemm";
    let Gemm {
        m,
        n,
        k,
        trans_a,
        trans_b,
        alpha,
        accumulate,
    } = g;
    expect_len(OP, "out", out.len(), product(OP, &[m, n])?)?;
    expect_len(OP, "a", a.len(), product(OP, &[m, k])?)?;
    expect_len(OP, "b", b.len(), product(OP, &[k, n])?)?;
    // a is stored [m,k], or [k,m] when trans_a; b is [k,n], or [n,k] when trans_b.
    let lhs = if trans_a {
        Mat::transposed(a.as_ptr(), m)
    } else {
        Mat::rows(a.as_ptr(), k)
    };
    let rhs = if trans_b {
        Mat::transposed(b.as_ptr(), k)
    } else {
        Mat::rows(b.as_ptr(), n)
    };
    // SAFETY: the lengths were checked above, so with these strides every index
    // (i<m, j<k) of lhs, (i<k, j<n) of rhs and (i<m, j<n) of out is in bounds;
    // `out` is a unique borrow, so it overlaps neither input.
    unsafe {
        gemm_strided(
            m,
            n,
            k,
            MatMut::rows(out.as_mut_ptr(), n),
            accumulate,
            lhs,
            rhs,
            alpha,
            Parallelism::Rayon(0),
        );
    }
    Ok(())
}

/// Reference: the triple loop in f64.
pub mod naive {
    use crate::backend::Gemm;

    pub fn gemm(out: &mut [f64], a: &[f64], b: &[f64], g: Gemm) {
        let Gemm {
            m,
            n,
            k,
            trans_a,
            trans_b,
            alpha,
            accumulate,
        } = g;
        let a_at = |i: usize, p: usize| if trans_a { a[p * m + i] } else { a[i * k + p] };
        let b_at = |p: usize, j: usize| if trans_b { b[j * k + p] } else { b[p * n + j] };
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0;
                for p in 0..k {
                    acc += a_at(i, p) * b_at(p, j);
                }
                let prev = if accumulate { out[i * n + j] } else { 0.0 };
                out[i * n + j] = prev + alpha as f64 * acc;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, rng, to64, uniform};
    use crate::KernelError;

    #[test]
    fn matches_naive_for_all_transposes() {
        let mut r = rng(10);
        let shapes = [
            (1, 1, 1),
            (3, 5, 7),
            (17, 33, 9),
            (64, 65, 66),
            (2, 130, 31),
            (5, 4, 0),
        ];
        for (m, n, k) in shapes {
            for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
                for (alpha, accumulate) in [(1.0, false), (0.5, true), (-2.0, false)] {
                    let g = Gemm {
                        m,
                        n,
                        k,
                        trans_a,
                        trans_b,
                        alpha,
                        accumulate,
                    };
                    let a = uniform(&mut r, m * k);
                    let b = uniform(&mut r, k * n);
                    let mut out = uniform(&mut r, m * n);
                    let mut want = to64(&out);
                    gemm(&mut out, &a, &b, g).unwrap();
                    naive::gemm(&mut want, &to64(&a), &to64(&b), g);
                    assert_close(&format!("{g:?}"), &out, &want, 1e-5);
                }
            }
        }
    }

    #[test]
    fn overwrite_does_not_read_stale_output() {
        let (m, n, k) = (4, 5, 3);
        let mut out = vec![f32::NAN; m * n];
        gemm(
            &mut out,
            &[1.0; 12],
            &[1.0; 15],
            Gemm {
                m,
                n,
                k,
                trans_a: false,
                trans_b: false,
                alpha: 1.0,
                accumulate: false,
            },
        )
        .unwrap();
        assert!(out.iter().all(|&v| v == 3.0));
    }

    #[test]
    fn linear_is_x_times_w_transposed() {
        // y[1,2] = x[1,3] · w[2,3]^T
        let mut y = vec![0.0; 2];
        gemm(
            &mut y,
            &[1.0, 2.0, 3.0],
            &[1.0, 0.0, 0.0, 0.0, 1.0, 1.0],
            Gemm::linear(1, 2, 3),
        )
        .unwrap();
        assert_eq!(y, vec![1.0, 5.0]);
    }

    #[test]
    fn result_does_not_depend_on_thread_count() {
        let mut r = rng(11);
        let (m, n, k) = (150, 170, 300);
        let (a, b) = (uniform(&mut r, m * k), uniform(&mut r, k * n));
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![0.0f32; m * n];
            pool.install(|| gemm(&mut out, &a, &b, Gemm::linear(m, n, k)).unwrap());
            out.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn bad_lengths_are_errors() {
        let g = Gemm::linear(2, 3, 4);
        let mut out = vec![0.0; 6];
        assert!(matches!(
            gemm(&mut out, &[0.0; 7], &[0.0; 12], g),
            Err(KernelError::Shape { op: "gemm", .. })
        ));
        assert!(matches!(
            gemm(&mut out, &[0.0; 8], &[0.0; 11], g),
            Err(KernelError::Shape { .. })
        ));
        assert!(matches!(
            gemm(&mut out[..5], &[0.0; 8], &[0.0; 12], g),
            Err(KernelError::Shape { .. })
        ));
        let huge = Gemm::linear(usize::MAX, 2, 1);
        assert!(matches!(
            gemm(&mut out, &[0.0; 8], &[0.0; 12], huge),
            Err(KernelError::Shape { .. })
        ));
    }
}
