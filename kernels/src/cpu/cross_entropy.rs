//! Softmax cross-entropy over logits[N,V], fused with its gradient so the
//! [N,V] logits buffer is reused for dlogits (V is 150k for Qwen: a second
//! buffer would be the largest activation of the model).

use super::check::{expect_len, rows_of, shape_err};
use super::par::rows_per_task;
use super::simd::{self, simd_fn};
use crate::backend::Result;
use crate::KernelError;
use rayon::prelude::*;

/// The target that marks a row as ignored (PyTorch's `ignore_index`).
pub const IGNORE: i32 = -100;

/// Per-row loss −log softmax(logits)[target] (0 for ignored rows). With
/// `grad_scales` = Some(s) (s: [N]), row n of the logits becomes
/// s[n]·(softmax − onehot(target[n])) — the gradient of Σ_n s[n]·loss[n] —
/// and zero for ignored targets.
pub fn cross_entropy(
    logits: &mut [f32],
    targets: &[i32],
    v: usize,
    grad_scales: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let n = check_inputs(logits.len(), targets, v, grad_scales)?;
    let mut losses = vec![0.0f32; n]; // [N]
    let write_grad = grad_scales.is_some();
    // Without gradients every row's scale is unused: read 0.
    let no_scales = vec![0.0f32; if write_grad { 0 } else { n }];
    let scales = grad_scales.unwrap_or(&no_scales); // [N]
    logits
        .par_chunks_mut(v)
        .zip(targets.par_iter())
        .zip(scales.par_iter())
        .zip(losses.par_iter_mut())
        .with_min_len(rows_per_task(v))
        .for_each(|(((row, &t), &s), loss)| {
            if t == IGNORE {
                if write_grad {
                    row.fill(0.0);
                }
                return;
            }
            *loss = row_loss(row, t as usize, s, write_grad);
        });
    Ok(losses)
}

/// Checks the arguments of a cross-entropy over `logits_len` = N·V logits
/// (shared with the CUDA backend, which must reject the same inputs before
/// launching): V divides the logits, one target per row, each −100 or in
/// [0, V), and one gradient scale per row. Returns N.
pub(crate) fn check_inputs(
    logits_len: usize,
    targets: &[i32],
    v: usize,
    grad_scales: Option<&[f32]>,
) -> Result<usize> {
    const OP: &str = "cross_entropy";
    let n = rows_of(OP, "logits", logits_len, v)?;
    expect_len(OP, "targets", targets.len(), n)?;
    if let Some(s) = grad_scales {
        expect_len(OP, "grad_scales", s.len(), n)?;
    }
    for (row, &t) in targets.iter().enumerate() {
        if t == IGNORE {
            continue;
        }
        if t < 0 {
            return Err(shape_err(
                OP,
                format!("target {t} at row {row} is negative and not {IGNORE}"),
            ));
        }
        if t as usize >= v {
            return Err(KernelError::IndexOutOfRange {
                op: OP,
                id: t as u64,
                rows: v,
            });
        }
    }
    Ok(n)
}

simd_fn! {
    /// One row: the loss −log softmax(row)[t]; with `write_grad`, row becomes
    /// s·(softmax − onehot(t)). The max is subtracted so exp never overflows;
    /// Σexp is accumulated in f64 over the V terms.
    fn row_loss(row: &mut [f32], t: usize, s: f32, write_grad: bool) -> f32 {
        let max = simd::max(row);
        let target_logit = row[t];
        if !write_grad {
            let sum = simd::sum_exp_shift(row, max);
            return (max as f64 + sum.ln() - target_logit as f64) as f32;
        }
        // Keep exp(x − max) in the row: the gradient reuses it.
        let sum = simd::exp_shift_sum(row, max);
        let k = (s as f64 / sum) as f32; // s / Σexp
        for e in row.iter_mut() {
            *e *= k;
        }
        row[t] -= s;
        (max as f64 + sum.ln() - target_logit as f64) as f32
    }
}

/// Reference: plain loops in f64. Returns (loss[N], dlogits[N,V]) where row n
/// of dlogits is scales[n]·(softmax − onehot(target[n])), zero when ignored.
pub mod naive {
    use super::IGNORE;

    pub fn cross_entropy(
        logits: &[f64],
        targets: &[i32],
        v: usize,
        scales: &[f64],
    ) -> (Vec<f64>, Vec<f64>) {
        let n = targets.len();
        let mut loss = vec![0.0; n];
        let mut grad = vec![0.0; n * v];
        for i in 0..n {
            if targets[i] == IGNORE {
                continue;
            }
            let row = &logits[i * v..(i + 1) * v];
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for &x in row {
                sum += (x - max).exp();
            }
            let lse = max + sum.ln();
            let t = targets[i] as usize;
            loss[i] = lse - row[t];
            for j in 0..v {
                let onehot = if j == t { 1.0 } else { 0.0 };
                grad[i * v + j] = scales[i] * ((row[j] - lse).exp() - onehot);
            }
        }
        (loss, grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, fd_grad, rng, to64, uniform};
    use rand::Rng;

    fn targets(r: &mut impl Rng, n: usize, v: usize) -> Vec<i32> {
        (0..n)
            .map(|i| {
                if i % 4 == 3 {
                    IGNORE
                } else {
                    r.random_range(0..v as i32)
                }
            })
            .collect()
    }

    /// Distinct per-row scales in [−2, 2), with an exact 0 every fifth row.
    fn scales(r: &mut impl Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                if i % 5 == 2 {
                    0.0
                } else {
                    r.random_range(-2.0f32..2.0)
                }
            })
            .collect()
    }

    #[test]
    fn matches_naive() {
        let mut r = rng(80);
        for (n, v) in [(1, 1), (4, 3), (17, 65), (9, 5000), (130, 31)] {
            // Logits spread over ±20 so the max-subtraction matters.
            let logits: Vec<f32> = uniform(&mut r, n * v).iter().map(|x| 20.0 * x).collect();
            let t = targets(&mut r, n, v);
            let s = scales(&mut r, n);
            let (want_loss, want_grad) = naive::cross_entropy(&to64(&logits), &t, v, &to64(&s));

            let mut l = logits.clone();
            let loss = cross_entropy(&mut l, &t, v, None).unwrap();
            assert_close("loss (no grad)", &loss, &want_loss, 1e-5);
            assert_eq!(l, logits, "logits must be untouched without grad_scales");

            let loss = cross_entropy(&mut l, &t, v, Some(&s)).unwrap();
            assert_close("loss", &loss, &want_loss, 1e-5);
            assert_close("dlogits", &l, &want_grad, 1e-5);
            for (row, (&si, &ti)) in s.iter().zip(&t).enumerate() {
                if si == 0.0 || ti == IGNORE {
                    let g = &l[row * v..(row + 1) * v];
                    assert!(g.iter().all(|&x| x == 0.0), "row {row} must be zero");
                }
            }
        }
    }

    #[test]
    fn one_scale_for_every_row_is_a_uniform_scale() {
        // The old single-scale op: s·(softmax − onehot) on every row.
        let mut r = rng(82);
        let (n, v) = (12, 40);
        let logits: Vec<f32> = uniform(&mut r, n * v).iter().map(|x| 5.0 * x).collect();
        let t = targets(&mut r, n, v);
        let (_, want) = naive::cross_entropy(&to64(&logits), &t, v, &vec![0.25; n]);
        let mut l = logits.clone();
        cross_entropy(&mut l, &t, v, Some(&vec![0.25; n])).unwrap();
        assert_close("dlogits", &l, &want, 1e-5);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        // The gradient of Σ_n s[n]·loss[n], with mixed-sign scales and an
        // ignored row (row 3).
        let mut r = rng(81);
        let (n, v) = (5, 6);
        let logits = uniform(&mut r, n * v);
        let t = targets(&mut r, n, v);
        let s = [0.5f32, -1.5, 0.0, 2.0, 0.75];
        let s64 = to64(&s);
        let fd = fd_grad(&to64(&logits), |x| {
            let loss = naive::cross_entropy(x, &t, v, &s64).0;
            loss.iter().zip(&s64).map(|(l, s)| l * s).sum::<f64>()
        });
        let mut g = logits.clone();
        cross_entropy(&mut g, &t, v, Some(&s)).unwrap();
        assert_close("dlogits vs fd", &g, &fd, 1e-5);
    }

    #[test]
    fn huge_logits_stay_finite() {
        let mut l = vec![1e30f32, -1e30, 0.0, 88.0, 89.0, 1000.0];
        let loss = cross_entropy(&mut l, &[1, 2], 3, Some(&[1.0, -1.0])).unwrap();
        assert!(
            loss.iter().chain(&l).all(|x| x.is_finite()),
            "{loss:?} {l:?}"
        );
        assert!((loss[1] - 0.0).abs() < 1e-6);
    }

    #[test]
    fn bad_targets_are_errors_not_panics() {
        let mut l = vec![0.0f32; 6];
        assert!(matches!(
            cross_entropy(&mut l, &[0, 3], 3, None),
            Err(KernelError::IndexOutOfRange { id: 3, rows: 3, .. })
        ));
        assert!(matches!(
            cross_entropy(&mut l, &[-1, 0], 3, None),
            Err(KernelError::Shape { .. })
        ));
        assert!(matches!(
            cross_entropy(&mut l, &[0], 3, None),
            Err(KernelError::Shape { .. })
        ));
        assert!(matches!(
            cross_entropy(&mut l, &[0, 0], 4, None),
            Err(KernelError::Shape { .. })
        ));
        assert!(cross_entropy(&mut l, &[0, IGNORE], 3, Some(&[1.0, 1.0])).is_ok());
    }

    #[test]
    fn wrong_number_of_grad_scales_is_a_shape_error() {
        let logits = vec![0.5f32; 6];
        for s in [&[1.0f32][..], &[1.0, 1.0, 1.0], &[]] {
            let mut l = logits.clone();
            let err = cross_entropy(&mut l, &[0, 1], 3, Some(s)).unwrap_err();
            assert!(
                matches!(&err, KernelError::Shape { msg, .. } if msg.contains("grad_scales")),
                "{err}"
            );
            assert_eq!(l, logits, "a rejected call must not write");
        }
    }
}
