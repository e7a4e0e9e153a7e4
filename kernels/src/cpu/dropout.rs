//! Inverted dropout with the counter-based mask of [`dropout_keep`]: element i
//! of the view is kept iff `dropout_keep(seed, i, p)`, so backward (and any
//! other backend) regenerates the identical mask without storing it.

use super::check::{expect_len, shape_err};
use super::par::CHUNK;
use super::simd::simd_fn;
use crate::backend::{dropout_bits, dropout_threshold, Result};
use rayon::prelude::*;

simd_fn! {
    /// out[j] = x[j]·keep(base + j)/(1−p) on one chunk (a select, so it vectorises).
    fn forward_chunk(out: &mut [f32], x: &[f32], seed: u64, base: u64, threshold: u64, inv_keep: f32) {
        for (j, (o, &x)) in out.iter_mut().zip(x).enumerate() {
            let keep = dropout_bits(seed, base + j as u64) as u64 >= threshold;
            *o = if keep { x * inv_keep } else { 0.0 };
        }
    }
}

simd_fn! {
    /// dx[j] += dout[j]·keep(base + j)/(1−p) on one chunk.
    fn backward_chunk(dx: &mut [f32], dout: &[f32], seed: u64, base: u64, threshold: u64, inv_keep: f32) {
        for (j, (d, &g)) in dx.iter_mut().zip(dout).enumerate() {
            let keep = dropout_bits(seed, base + j as u64) as u64 >= threshold;
            *d += if keep { g * inv_keep } else { 0.0 };
        }
    }
}

fn check_p(op: &'static str, p: f32) -> Result<f32> {
    if !(0.0..=1.0).contains(&p) {
        return Err(shape_err(
            op,
            format!("drop probability {p} is outside [0, 1]"),
        ));
    }
    Ok(1.0 / (1.0 - p))
}

/// out = x · keep / (1−p).
pub fn forward(out: &mut [f32], x: &[f32], p: f32, seed: u64) -> Result<()> {
    expect_len("dropout_forward", "x", x.len(), out.len())?;
    let inv_keep = check_p("dropout_forward", p)?;
    let threshold = dropout_threshold(p);
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(blk, (out, x))| {
            forward_chunk(out, x, seed, (blk * CHUNK) as u64, threshold, inv_keep)
        });
    Ok(())
}

/// dx += dout · keep / (1−p).
pub fn backward(dx: &mut [f32], dout: &[f32], p: f32, seed: u64) -> Result<()> {
    expect_len("dropout_backward", "dout", dout.len(), dx.len())?;
    let inv_keep = check_p("dropout_backward", p)?;
    let threshold = dropout_threshold(p);
    dx.par_chunks_mut(CHUNK)
        .zip(dout.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(blk, (dx, dout))| {
            backward_chunk(dx, dout, seed, (blk * CHUNK) as u64, threshold, inv_keep)
        });
    Ok(())
}

/// References: plain loops in f64.
pub mod naive {
    use crate::backend::dropout_keep;

    pub fn forward(x: &[f64], p: f32, seed: u64) -> Vec<f64> {
        let mut out = vec![0.0; x.len()];
        for i in 0..x.len() {
            if dropout_keep(seed, i as u64, p) {
                out[i] = x[i] / (1.0 - p as f64);
            }
        }
        out
    }

    /// The gradient with respect to x (not accumulated): the same linear map.
    pub fn backward(dout: &[f64], p: f32, seed: u64) -> Vec<f64> {
        forward(dout, p, seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_1_minus_p_and_are_independent_across_seeds() {
        use crate::backend::dropout_keep;
        let n = 200_000u64;
        let p = 0.3f32;
        // Seeds as the model derives them: neighbouring steps and modules.
        let seeds = [
            1u64,
            2,
            3,
            0xD6E8_FEB8_6659_FD93,
            0xD6E8_FEB8_6659_FD93 ^ 1,
            42 << 32,
            (42 << 32) + 1,
        ];
        for &s in &seeds {
            let kept = (0..n).filter(|&i| dropout_keep(s, i, p)).count() as f64 / n as f64;
            assert!((kept - 0.7).abs() < 0.005, "seed {s:#x}: kept {kept}");
        }
        // Two independent masks agree on p² + (1−p)² = 0.58 of the positions.
        for (a, &s1) in seeds.iter().enumerate() {
            for &s2 in &seeds[a + 1..] {
                let same = (0..n)
                    .filter(|&i| dropout_keep(s1, i, p) == dropout_keep(s2, i, p))
                    .count() as f64
                    / n as f64;
                assert!(
                    (same - 0.58).abs() < 0.006,
                    "seeds {s1:#x} {s2:#x}: agree on {same}"
                );
            }
        }
        // Neighbouring elements are not correlated either.
        let both = (0..n)
            .filter(|&i| dropout_keep(5, i, p) && dropout_keep(5, i + 1, p))
            .count() as f64
            / n as f64;
        assert!((both - 0.49).abs() < 0.006, "adjacent kept together {both}");
    }
    use crate::cpu::testutil::{assert_close, dot, fd_grad, plus, rng, to64, uniform};
    use crate::KernelError;

    #[test]
    fn forward_and_backward_match_naive() {
        let mut r = rng(70);
        for (n, p) in [
            (0, 0.1),
            (1, 0.5),
            (17, 0.3),
            (2 * CHUNK + 9, 0.1),
            (1000, 0.0),
        ] {
            let x = uniform(&mut r, n);
            let mut out = vec![0.0f32; n];
            forward(&mut out, &x, p, 1234).unwrap();
            assert_close(
                "dropout_forward",
                &out,
                &naive::forward(&to64(&x), p, 1234),
                1e-6,
            );

            let dout = uniform(&mut r, n);
            let mut dx = uniform(&mut r, n);
            let want = plus(&dx, &naive::backward(&to64(&dout), p, 1234));
            backward(&mut dx, &dout, p, 1234).unwrap();
            assert_close("dropout_backward", &dx, &want, 1e-6);
        }
    }

    #[test]
    fn drops_about_p_and_depends_on_seed() {
        let n = 100_000;
        let x = vec![1.0f32; n];
        let (mut a, mut b) = (vec![0.0f32; n], vec![0.0f32; n]);
        forward(&mut a, &x, 0.25, 7).unwrap();
        forward(&mut b, &x, 0.25, 8).unwrap();
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        assert!((dropped - 0.25).abs() < 0.01, "dropped fraction {dropped}");
        assert_ne!(a, b);
        // Kept values are scaled so the expectation is unchanged.
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    }

    #[test]
    fn p_one_drops_everything_without_nan() {
        let mut out = vec![1.0f32; 10];
        forward(&mut out, &[3.0; 10], 1.0, 0).unwrap();
        assert!(out.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut r = rng(71);
        let n = 12;
        let dout = uniform(&mut r, n);
        let fd = fd_grad(&to64(&uniform(&mut r, n)), |x| {
            dot(&to64(&dout), &naive::forward(x, 0.4, 99))
        });
        let mut dx = vec![0.0f32; n];
        backward(&mut dx, &dout, 0.4, 99).unwrap();
        assert_close("dropout dx vs fd", &dx, &fd, 1e-5);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mut out = vec![0.0f32; 3];
        assert!(matches!(
            forward(&mut out, &[0.0; 2], 0.1, 0),
            Err(KernelError::Shape { .. })
        ));
        assert!(matches!(
            forward(&mut out, &[0.0; 3], 1.5, 0),
            Err(KernelError::Shape { .. })
        ));
        assert!(matches!(
            backward(&mut out, &[0.0; 3], f32::NAN, 0),
            Err(KernelError::Shape { .. })
        ));
    }
}
