//! Row-broadcast bias (Qwen2's q/k/v projections) and its gradient.

use super::check::{expect_len, rows_of};
use super::par::rows_per_task;
use crate::backend::Result;
use rayon::prelude::*;

/// Columns per task in `bias_backward`: each task owns this many bias entries
/// and walks all rows, so no two tasks touch the same accumulator.
const COLS_PER_TASK: usize = 64;

/// x[N,C] += bias[C].
pub fn add_bias(x: &mut [f32], bias: &[f32], c: usize) -> Result<()> {
    rows_of("add_bias", "x", x.len(), c)?;
    expect_len("add_bias", "bias", bias.len(), c)?;
    x.par_chunks_mut(rows_per_task(c) * c).for_each(|rows| {
        for row in rows.chunks_exact_mut(c) {
            for (v, &b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    });
    Ok(())
}

/// dbias[C] += Σ_n dout[n, :]. Parallel over column blocks, each summing all
/// rows in order in f64, so the result does not depend on the thread count.
pub fn bias_backward(dbias: &mut [f32], dout: &[f32], c: usize) -> Result<()> {
    let n = rows_of("bias_backward", "dout", dout.len(), c)?;
    expect_len("bias_backward", "dbias", dbias.len(), c)?;
    dbias
        .par_chunks_mut(COLS_PER_TASK)
        .enumerate()
        .for_each(|(blk, db)| {
            let c0 = blk * COLS_PER_TASK;
            let mut acc = [0.0f64; COLS_PER_TASK]; // [cols of this block]
            for row in 0..n {
                let src = &dout[row * c + c0..row * c + c0 + db.len()];
                for (a, &g) in acc.iter_mut().zip(src) {
                    *a += g as f64;
                }
            }
            for (d, a) in db.iter_mut().zip(acc) {
                *d += a as f32;
            }
        });
    Ok(())
}

/// References: plain loops in f64.
pub mod naive {
    pub fn add_bias(x: &mut [f64], bias: &[f64], c: usize) {
        for (i, v) in x.iter_mut().enumerate() {
            *v += bias[i % c];
        }
    }

    /// The gradient Σ_n dout[n, :] (not accumulated).
    pub fn bias_backward(dout: &[f64], c: usize) -> Vec<f64> {
        let mut db = vec![0.0; c];
        for (i, &g) in dout.iter().enumerate() {
            db[i % c] += g;
        }
        db
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, dot, fd_grad, plus, rng, to64, uniform};
    use crate::KernelError;

    const SHAPES: [(usize, usize); 5] = [(1, 1), (3, 7), (33, 65), (200, 130), (5, 1000)];

    #[test]
    fn add_bias_matches_naive() {
        let mut r = rng(20);
        for (n, c) in SHAPES {
            let mut x = uniform(&mut r, n * c);
            let bias = uniform(&mut r, c);
            let mut want = to64(&x);
            add_bias(&mut x, &bias, c).unwrap();
            naive::add_bias(&mut want, &to64(&bias), c);
            assert_close("add_bias", &x, &want, 1e-6);
        }
    }

    #[test]
    fn bias_backward_matches_naive() {
        let mut r = rng(21);
        for (n, c) in SHAPES {
            let dout = uniform(&mut r, n * c);
            let mut db = uniform(&mut r, c);
            let want = plus(&db, &naive::bias_backward(&to64(&dout), c));
            bias_backward(&mut db, &dout, c).unwrap();
            assert_close("bias_backward", &db, &want, 1e-5);
        }
    }

    #[test]
    fn bias_backward_matches_finite_differences() {
        let mut r = rng(22);
        let (n, c) = (4, 6);
        let x = to64(&uniform(&mut r, n * c));
        let dout = uniform(&mut r, n * c);
        let fd = fd_grad(&to64(&uniform(&mut r, c)), |b| {
            let mut y = x.clone();
            naive::add_bias(&mut y, b, c);
            dot(&to64(&dout), &y)
        });
        let mut db = vec![0.0f32; c];
        bias_backward(&mut db, &dout, c).unwrap();
        assert_close("dbias vs fd", &db, &fd, 1e-5);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut x = vec![0.0f32; 6];
        assert!(matches!(
            add_bias(&mut x, &[0.0; 4], 4),
            Err(KernelError::Shape { .. })
        ));
        assert!(matches!(
            add_bias(&mut x, &[0.0; 2], 3),
            Err(KernelError::Shape { .. })
        ));
        assert!(matches!(
            add_bias(&mut x, &[], 0),
            Err(KernelError::Shape { .. })
        ));
        let mut db = vec![0.0f32; 2];
        assert!(matches!(
            bias_backward(&mut db, &x, 3),
            Err(KernelError::Shape { .. })
        ));
    }
}
