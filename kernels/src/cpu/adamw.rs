//! One AdamW step, torch.optim.AdamW semantics (decoupled weight decay):
//!   p *= 1 − lr·wd
//!   m = β1·m + (1−β1)·g;  v = β2·v + (1−β2)·g²
//!   p −= (lr / bc1) · m / (sqrt(v) / sqrt(bc2) + eps),  bc_i = 1 − β_i^step.
//! The bias corrections are computed once per step in f64: at large `step`
//! β^step underflows gracefully there, and at small `step` 1 − β2^step
//! (≈ 1e-3 for step 1) would lose digits in f32.

use super::check::{expect_len, shape_err};
use super::par::CHUNK;
use crate::backend::{AdamW, Result};
use rayon::prelude::*;

/// Updates params, m and v in place; all four buffers have equal length.
pub fn adamw(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    h: AdamW,
) -> Result<()> {
    const OP: &str = "adamw";
    let n = params.len();
    for (what, len) in [("grads", grads.len()), ("m", m.len()), ("v", v.len())] {
        expect_len(OP, what, len, n)?;
    }
    if h.step == 0 {
        return Err(shape_err(
            OP,
            "step counts from 1 (step 0 has no bias correction)",
        ));
    }
    let step = h.step.min(i32::MAX as u64) as i32; // β^step is 0 long before this cap
    let bc1 = 1.0 - (h.beta1 as f64).powi(step);
    let bc2 = 1.0 - (h.beta2 as f64).powi(step);
    let step_size = (h.lr as f64 / bc1) as f32;
    let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
    let decay = 1.0 - h.lr * h.weight_decay;
    let (b1, b2, eps) = (h.beta1, h.beta2, h.eps);

    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for ((p, &g), (m, v)) in p.iter_mut().zip(g).zip(m.iter_mut().zip(v.iter_mut())) {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *p *= decay;
                *p -= step_size * *m / (v.sqrt() * inv_sqrt_bc2 + eps);
            }
        });
    Ok(())
}

/// Reference: the same step as plain loops in f64.
pub mod naive {
    use crate::backend::AdamW;

    pub fn adamw(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], h: AdamW) {
        let (lr, b1, b2, eps, wd) = (
            h.lr as f64,
            h.beta1 as f64,
            h.beta2 as f64,
            h.eps as f64,
            h.weight_decay as f64,
        );
        let bc1 = 1.0 - b1.powf(h.step as f64);
        let bc2 = 1.0 - b2.powf(h.step as f64);
        for i in 0..p.len() {
            p[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            let m_hat = m[i] / bc1;
            let v_hat = v[i] / bc2;
            p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, rng, to64, uniform};
    use crate::KernelError;

    const H: AdamW = AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 1,
    };

    #[test]
    fn several_steps_match_naive() {
        let mut r = rng(90);
        for n in [1, 7, CHUNK + 11] {
            let mut p = uniform(&mut r, n);
            let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
            let (mut p64, mut m64, mut v64) = (to64(&p), vec![0.0; n], vec![0.0; n]);
            for step in 1..=5 {
                let g = uniform(&mut r, n);
                let h = AdamW { step, ..H };
                adamw(&mut p, &g, &mut m, &mut v, h).unwrap();
                naive::adamw(&mut p64, &to64(&g), &mut m64, &mut v64, h);
            }
            assert_close("params", &p, &p64, 1e-5);
            assert_close("m", &m, &m64, 1e-6);
            assert_close("v", &v, &v64, 1e-6);
        }
    }

    #[test]
    fn first_step_moves_by_lr_times_sign() {
        // At step 1 the bias-corrected m̂ = g and v̂ = g², so the update is
        // lr·g/(|g| + eps) ≈ lr·sign(g), after decay by (1 − lr·wd).
        let mut p = vec![1.0f32, 1.0];
        let (mut m, mut v) = (vec![0.0f32; 2], vec![0.0f32; 2]);
        adamw(&mut p, &[0.5, -3.0], &mut m, &mut v, H).unwrap();
        let decayed = 1.0 - 1e-2 * 0.1;
        assert!((p[0] - (decayed - 1e-2)).abs() < 1e-6, "{p:?}");
        assert!((p[1] - (decayed + 1e-2)).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (mut p, mut m, mut v) = (vec![0.0f32; 3], vec![0.0f32; 3], vec![0.0f32; 2]);
        assert!(matches!(
            adamw(&mut p, &[0.0; 3], &mut m, &mut v, H),
            Err(KernelError::Shape { .. })
        ));
        let mut v = vec![0.0f32; 3];
        assert!(matches!(
            adamw(&mut p, &[0.0; 3], &mut m, &mut v, AdamW { step: 0, ..H }),
            Err(KernelError::Shape { .. })
        ));
    }
}
