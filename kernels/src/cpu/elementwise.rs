//! axpy, scale and sum of squares over flat buffers (gradient accumulation,
//! clipping and the global gradient norm).

use super::check::expect_len;
use super::par::CHUNK;
use super::simd::{self, simd_fn};
use crate::backend::Result;
use rayon::prelude::*;

/// y[i] += alpha * x[i].
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) -> Result<()> {
    expect_len("axpy", "x", x.len(), y.len())?;
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y += alpha * x;
            }
        });
    Ok(())
}

/// x[i] *= s.
pub fn scale(x: &mut [f32], s: f32) -> Result<()> {
    x.par_chunks_mut(CHUNK)
        .for_each(|x| x.iter_mut().for_each(|v| *v *= s));
    Ok(())
}

/// Σ x[i]², in f64. Each fixed `CHUNK` is summed sequentially, then the
/// per-chunk sums are added in chunk order: the grouping depends only on the
/// length, so the result is bitwise the same for any thread count.
pub fn sum_squares(x: &[f32]) -> Result<f64> {
    let partial: Vec<f64> = x.par_chunks(CHUNK).map(sum_squares_chunk).collect();
    Ok(partial.iter().sum())
}

simd_fn! {
    /// Σ v² over one chunk in f64, in a fixed order.
    fn sum_squares_chunk(c: &[f32]) -> f64 {
        simd::sum_squares_f64(c)
    }
}

/// References: plain loops in f64.
pub mod naive {
    pub fn axpy(y: &mut [f64], alpha: f64, x: &[f64]) {
        assert_eq!(y.len(), x.len());
        for i in 0..y.len() {
            y[i] += alpha * x[i];
        }
    }

    pub fn scale(x: &mut [f64], s: f64) {
        for v in x.iter_mut() {
            *v *= s;
        }
    }

    pub fn sum_squares(x: &[f64]) -> f64 {
        let mut acc = 0.0;
        for &v in x {
            acc += v * v;
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, rng, to64, uniform};
    use crate::KernelError;

    const SIZES: [usize; 6] = [0, 1, 3, 17, CHUNK + 5, 3 * CHUNK - 1];

    #[test]
    fn axpy_and_scale_match_naive() {
        let mut r = rng(2);
        for n in SIZES {
            let x = uniform(&mut r, n);
            let mut y = uniform(&mut r, n);
            let mut want = to64(&y);
            axpy(&mut y, -0.75, &x).unwrap();
            naive::axpy(&mut want, -0.75, &to64(&x));
            assert_close("axpy", &y, &want, 1e-6);

            scale(&mut y, 1.5).unwrap();
            naive::scale(&mut want, 1.5);
            assert_close("scale", &y, &want, 1e-6);
        }
    }

    #[test]
    fn sum_squares_matches_naive() {
        let mut r = rng(3);
        for n in SIZES {
            let x = uniform(&mut r, n);
            let got = sum_squares(&x).unwrap();
            let want = naive::sum_squares(&to64(&x));
            assert!(
                (got - want).abs() <= 1e-12 * (1.0 + want),
                "n={n}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn sum_squares_is_independent_of_thread_count() {
        let x = uniform(&mut rng(4), 5 * CHUNK + 123);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| sum_squares(&x).unwrap())
        };
        let one = run(1);
        assert_eq!(one.to_bits(), run(2).to_bits());
        assert_eq!(one.to_bits(), run(3).to_bits());
    }

    #[test]
    fn axpy_length_mismatch_is_an_error() {
        let mut y = vec![0.0f32; 3];
        assert!(matches!(
            axpy(&mut y, 1.0, &[1.0; 2]),
            Err(KernelError::Shape { op: "axpy", .. })
        ));
    }
}
