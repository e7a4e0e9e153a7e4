//! Helpers shared by the op tests: seeded random inputs, tolerant comparison
//! against the f64 references, and central finite differences.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub(crate) fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform in [-1, 1).
pub(crate) fn uniform(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

pub(crate) fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Asserts `got ≈ want` elementwise: |got − want| ≤ tol · (1 + |want|).
/// The `1 +` keeps near-zero entries from demanding a relative precision
/// f32 cannot give.
#[track_caller]
pub(crate) fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g}, want {w} (err {err:.3e}, tol {tol:.1e})"
        );
    }
}

/// Same as [`assert_close`] for two f64 vectors.
#[track_caller]
pub(crate) fn assert_close64(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g}, want {w} (err {err:.3e}, tol {tol:.1e})"
        );
    }
}

/// Gradient of the scalar `loss` at `x` by central differences, in f64.
/// With h = 1e-5 on smooth f64 functions the error is ~1e-10, far below the
/// tolerances the tests use.
pub(crate) fn fd_grad(x: &[f64], mut loss: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    const H: f64 = 1e-5;
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            xp[i] = x[i] + H;
            let up = loss(&xp);
            xp[i] = x[i] - H;
            let down = loss(&xp);
            xp[i] = x[i];
            (up - down) / (2.0 * H)
        })
        .collect()
}

/// Σ r·y: the scalar whose gradient with respect to `y` is `r` — how a test
/// turns an op's output into a loss whose backward takes `dout = r`.
pub(crate) fn dot(r: &[f64], y: &[f64]) -> f64 {
    r.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// `base + delta`, elementwise: what a `+=` backward should leave in a gradient
/// buffer that held `base`.
pub(crate) fn plus(base: &[f32], delta: &[f64]) -> Vec<f64> {
    base.iter()
        .zip(delta)
        .map(|(&a, &b)| a as f64 + b)
        .collect()
}
