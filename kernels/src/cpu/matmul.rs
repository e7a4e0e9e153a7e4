//! Matrix products through the `gemm` crate. Transposes are expressed as
//! strides, never materialised.
//!
//! Careful with the crate's naming: `gemm::gemm` computes
//! `dst = alpha·dst + beta·lhs·rhs`, and with `read_dst = false` dst is not read
//! at all (so stale NaNs in an output buffer cannot leak into it). Our
//! [`Gemm::alpha`] is therefore the crate's `beta`, and the crate's `alpha` is 1.

use super::check::{expect_len, product};
use super::par::SyncPtr;
use crate::backend::{Gemm, Result};
use gemm::Parallelism;
use rayon::prelude::*;

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

/// Products with a dimension this small (LoRA ranks) are split by hand.
const THIN: usize = 16;
/// ... when they are big enough that two threads pay off (multiply-adds).
const SPLIT_MIN_WORK: usize = 1 << 20;

/// A read-only pointer shared by rayon tasks that only read through it.
#[derive(Clone, Copy)]
struct SyncConst(*const f32);
impl SyncConst {
    /// A method, so closures capture the `Sync` wrapper, not the bare pointer.
    fn get(self) -> *const f32 {
        self.0
    }
}
// SAFETY: only ever read through, by tasks that the caller's borrow outlives.
unsafe impl Send for SyncConst {}
// SAFETY: as for Send.
unsafe impl Sync for SyncConst {}

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
    let dst = MatMut::rows(out.as_mut_ptr(), n);
    let threads = rayon::current_num_threads();
    if m.min(n).min(k) <= THIN && m * n * k >= SPLIT_MIN_WORK && threads > 1 {
        // A LoRA factor product (rank ≤ 16): gemm's own threading splits these
        // badly. Cut the long side of the output into one contiguous part per
        // thread and run each part single-threaded; every output element is
        // still computed by the same sequence of operations, so the result is
        // identical to the unsplit product.
        let split_rows = m >= n;
        let len = if split_rows { m } else { n };
        let part = len.div_ceil(threads);
        let (lp, rp, dp) = (
            SyncConst(lhs.ptr),
            SyncConst(rhs.ptr),
            SyncPtr::from_raw(dst.ptr),
        );
        // Strides only: the closure must not capture the raw pointers themselves.
        let ((lrs, lcs), (rrs, rcs), (drs, dcs)) =
            ((lhs.rs, lhs.cs), (rhs.rs, rhs.cs), (dst.rs, dst.cs));
        (0..len.div_ceil(part)).into_par_iter().for_each(|t| {
            let (s0, s1) = (t * part, ((t + 1) * part).min(len));
            // SAFETY: as below for the whole product; part t reads rows [s0,s1) of
            // op(a) (or columns of op(b)) and writes only rows (or columns) [s0,s1)
            // of out, disjoint from every other part's.
            unsafe {
                if split_rows {
                    gemm_strided(
                        s1 - s0,
                        n,
                        k,
                        MatMut {
                            ptr: dp.get().offset(s0 as isize * drs),
                            rs: drs,
                            cs: dcs,
                        },
                        accumulate,
                        Mat {
                            ptr: lp.get().offset(s0 as isize * lrs),
                            rs: lrs,
                            cs: lcs,
                        },
                        Mat {
                            ptr: rp.get(),
                            rs: rrs,
                            cs: rcs,
                        },
                        alpha,
                        Parallelism::None,
                    );
                } else {
                    gemm_strided(
                        m,
                        s1 - s0,
                        k,
                        MatMut {
                            ptr: dp.get().offset(s0 as isize * dcs),
                            rs: drs,
                            cs: dcs,
                        },
                        accumulate,
                        Mat {
                            ptr: lp.get(),
                            rs: lrs,
                            cs: lcs,
                        },
                        Mat {
                            ptr: rp.get().offset(s0 as isize * rcs),
                            rs: rrs,
                            cs: rcs,
                        },
                        alpha,
                        Parallelism::None,
                    );
                }
            }
        });
        return Ok(());
    }
    // SAFETY: the lengths were checked above, so with these strides every index
    // (i<m, j<k) of lhs, (i<k, j<n) of rhs and (i<m, j<n) of out is in bounds;
    // `out` is a unique borrow, so it overlaps neither input.
    unsafe {
        gemm_strided(
            m,
            n,
            k,
            dst,
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
    fn thin_products_split_across_threads_equal_the_unsplit_product_bitwise() {
        let mut r = rng(11);
        for (m, n, k) in [(1000, 8, 300), (8, 700, 1000), (513, 333, 8)] {
            for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
                let g = Gemm {
                    m,
                    n,
                    k,
                    trans_a,
                    trans_b,
                    alpha: 0.25,
                    accumulate: true,
                };
                let (a, b) = (uniform(&mut r, m * k), uniform(&mut r, k * n));
                let start = uniform(&mut r, m * n);
                let mut split = start.clone();
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(3)
                    .build()
                    .unwrap();
                pool.install(|| gemm(&mut split, &a, &b, g)).unwrap();
                let mut whole = start.clone();
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
                // SAFETY: lengths match the shape, as in `gemm`.
                unsafe {
                    gemm_strided(
                        m,
                        n,
                        k,
                        MatMut::rows(whole.as_mut_ptr(), n),
                        true,
                        lhs,
                        rhs,
                        0.25,
                        Parallelism::None,
                    );
                }
                assert_eq!(split, whole, "{m}x{n}x{k} {trans_a} {trans_b}");
            }
        }
    }

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
            // thin (LoRA-like) products, split by hand across threads
            (2000, 8, 70),
            (8, 1500, 300),
            (3000, 70, 8),
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
