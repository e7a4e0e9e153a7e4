//! Entropy of the softmax of each row of logits[N,V] — the entropy bonus and
//! the entropy statistic of PPO/GRPO. Read only: no [N,V] probability buffer.

use super::check::rows_of;
use super::par::rows_per_task;
use super::simd::{self, simd_fn};
use crate::backend::Result;
use rayon::prelude::*;

/// H[n] = logsumexp(x_n) − Σ_j softmax(x_n)_j·x_n,j for each row of
/// `logits` [N,V]; returns [N]. A −inf logit has probability 0 and adds
/// nothing; a NaN logit makes its row NaN, and so does a row with no finite
/// logit (its softmax is undefined).
pub fn softmax_entropy(logits: &[f32], v: usize) -> Result<Vec<f32>> {
    let n = rows_of("softmax_entropy", "logits", logits.len(), v)?;
    let mut out = vec![0.0f32; n]; // [N]
    logits
        .par_chunks(v)
        .zip(out.par_iter_mut())
        .with_min_len(rows_per_task(v))
        .for_each(|(row, h)| *h = row_entropy(row));
    Ok(out)
}

simd_fn! {
    /// One row. With m = max and z = x − m (≤ 0), S = Σ e^z and
    /// H = ln S − Σ e^z·z / S: the same value as the definition, without the
    /// cancellation of two terms ≈ m. e^z·z is taken as 0 where e^z = 0, so a
    /// −inf logit (z = −inf) adds 0 instead of 0·∞ = NaN. Sums in f64, in a
    /// fixed order (chunks of 256, 8 lanes each).
    fn row_entropy(row: &[f32]) -> f32 {
        let m = simd::max(row);
        let mut e = [0f32; 256]; // e^z of one chunk
        let mut ez = [0f32; 256]; // e^z·z of one chunk
        let (mut s, mut t) = (0f64, 0f64);
        for c in row.chunks(e.len()) {
            let (e, ez) = (&mut e[..c.len()], &mut ez[..c.len()]);
            for ((e, ez), &x) in e.iter_mut().zip(ez.iter_mut()).zip(c) {
                let z = x - m;
                let p = simd::exp(z);
                *e = p;
                *ez = if p > 0.0 { p * z } else { 0.0 };
            }
            s += simd::sum_f64(e);
            t += simd::sum_f64(ez);
        }
        (s.ln() - t / s) as f32
    }
}

/// Reference: the definition, in plain f64 loops.
pub mod naive {
    /// H[n] = lse(x_n) − Σ_j softmax(x_n)_j·x_n,j; a term with probability 0
    /// adds 0.
    pub fn softmax_entropy(logits: &[f64], v: usize) -> Vec<f64> {
        logits
            .chunks(v)
            .map(|row| {
                let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = max + row.iter().map(|&x| (x - max).exp()).sum::<f64>().ln();
                let mean_logit: f64 = row
                    .iter()
                    .map(|&x| {
                        let p = (x - lse).exp();
                        if p == 0.0 {
                            0.0
                        } else {
                            p * x
                        }
                    })
                    .sum();
                lse - mean_logit
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, rng, to64, uniform};
    use crate::KernelError;

    #[test]
    fn uniform_row_has_entropy_ln_v() {
        for v in [1, 2, 7, 1000, 5003] {
            for level in [0.0f32, -3.5, 60.0] {
                let h = softmax_entropy(&vec![level; v], v).unwrap();
                let want = (v as f64).ln();
                assert!(
                    (h[0] as f64 - want).abs() <= 1e-6 * (1.0 + want),
                    "V={v} level {level}: {} vs ln V = {want}",
                    h[0]
                );
            }
        }
    }

    #[test]
    fn a_dominant_logit_gives_about_zero() {
        // One logit 50 above the others: p ≈ 1 − (V−1)e^−50, H ≈ 50·(V−1)e^−50.
        let v = 4000;
        let mut row = vec![0.0f32; v];
        row[123] = 50.0;
        let h = softmax_entropy(&row, v).unwrap()[0];
        assert!((0.0..1e-15).contains(&h), "H = {h:e}");
        // 20 above: H ≈ (V−1)e^−20·21 ≈ 1.7e-4, small but well above f32
        // rounding of ln V: compared with the f64 definition, relatively.
        row[123] = 20.0;
        let h = softmax_entropy(&row, v).unwrap()[0];
        let want = naive::softmax_entropy(&to64(&row), v)[0];
        assert!(want > 1e-5 && want < 1e-3, "reference {want:e}");
        assert_close("H, logit 20 above", &[h], &[want], 1e-6);
        assert!(((h as f64 - want) / want).abs() < 1e-4, "{h:e} vs {want:e}");
    }

    #[test]
    fn random_rows_match_naive() {
        let mut r = rng(90);
        for (n, v) in [(1, 1), (3, 2), (17, 65), (9, 5000), (130, 31), (4, 70_000)] {
            for spread in [1.0f32, 20.0] {
                let logits: Vec<f32> = uniform(&mut r, n * v)
                    .iter()
                    .map(|x| spread * x + 7.0)
                    .collect();
                let got = softmax_entropy(&logits, v).unwrap();
                let want = naive::softmax_entropy(&to64(&logits), v);
                assert_close(&format!("H {n}x{v} ±{spread}"), &got, &want, 1e-6);
            }
        }
    }

    #[test]
    fn minus_infinity_contributes_nothing() {
        // A masked-out row: −inf entries are excluded from the softmax, so
        // the row is uniform over its 3 finite entries.
        let ninf = f32::NEG_INFINITY;
        let logits = [
            ninf, 1.5, ninf, 1.5, 1.5, ninf, /* row 2 */ 0.3, -2.0, ninf, 4.0, 1.0, ninf,
        ];
        let h = softmax_entropy(&logits, 6).unwrap();
        assert!((h[0] as f64 - 3f64.ln()).abs() < 1e-6, "{h:?}");
        let want = naive::softmax_entropy(&to64(&logits), 6);
        assert!(want.iter().all(|x| x.is_finite()), "{want:?}");
        assert_close("H with −inf", &h, &want, 1e-6);
        // A single finite entry: the distribution is one-hot.
        let h = softmax_entropy(&[ninf, 2.0, ninf], 3).unwrap();
        assert_eq!(h, [0.0]);
    }

    #[test]
    fn nan_propagates_to_its_row_only() {
        let mut logits = vec![0.25f32; 3 * 40];
        logits[40 + 17] = f32::NAN;
        let h = softmax_entropy(&logits, 40).unwrap();
        assert!(h[1].is_nan(), "{h:?}");
        for i in [0, 2] {
            assert!((h[i] as f64 - 40f64.ln()).abs() < 1e-6, "{h:?}");
        }
        // No finite logit: undefined, NaN.
        let h = softmax_entropy(&[f32::NEG_INFINITY; 4], 4).unwrap();
        assert!(h[0].is_nan(), "{h:?}");
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(matches!(
            softmax_entropy(&[0.0; 7], 3),
            Err(KernelError::Shape { .. })
        ));
        assert!(matches!(
            softmax_entropy(&[0.0; 6], 0),
            Err(KernelError::Shape { .. })
        ));
        assert_eq!(softmax_entropy(&[], 5).unwrap(), Vec::<f32>::new());
    }
}
