//! KL penalties between the policy and the reference model, per token, and
//! the adaptive coefficient of Ziegler et al. (2019) used by classic PPO.

/// Per-token estimators of KL(π‖π_ref) from the log-probabilities of the
/// sampled token (Schulman, "Approximating KL divergence"):
/// k1 = log π − log π_ref (unbiased, can be negative; TRL PPO's "kl"),
/// k2 = ½ (log π − log π_ref)², k3 = (r − 1) − log r with r = π_ref/π
/// (unbiased and ≥ 0; GRPO's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KlEstimator {
    K1,
    K2,
    K3,
}

impl KlEstimator {
    pub fn per_token(self, logp: f32, ref_logp: f32) -> f32 {
        let d = (logp - ref_logp) as f64;
        (match self {
            KlEstimator::K1 => d,
            KlEstimator::K2 => 0.5 * d * d,
            KlEstimator::K3 => (-d).exp() - 1.0 + d,
        }) as f32
    }

    /// d estimator / d logp (the policy's log-prob; the reference is fixed).
    pub fn grad(self, logp: f32, ref_logp: f32) -> f32 {
        let d = (logp - ref_logp) as f64;
        (match self {
            KlEstimator::K1 => 1.0,
            KlEstimator::K2 => d,
            KlEstimator::K3 => 1.0 - (-d).exp(),
        }) as f32
    }
}

/// The KL coefficient β: fixed, or adapted towards a target KL over a
/// horizon (MedicalGPT/TRL: init_kl_coef 0.2, adap_kl_ctrl, target 6,
/// horizon 10000).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KlController {
    pub value: f64,
    /// Some((target, horizon)) when adaptive.
    pub adaptive: Option<(f64, f64)>,
}

impl KlController {
    /// After a batch of `n_steps` samples whose mean KL was `current`:
    /// error = clip(current/target − 1, −0.2, 0.2), β ×= 1 + error·n_steps/horizon.
    pub fn update(&mut self, current: f64, n_steps: usize) {
        if let Some((target, horizon)) = self.adaptive {
            let error = (current / target - 1.0).clamp(-0.2, 0.2);
            self.value *= 1.0 + error * n_steps as f64 / horizon;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimators_by_hand() {
        // log π = ln 0.5, log π_ref = ln 0.25: d = ln 2.
        let (lp, lr) = (0.5f32.ln(), 0.25f32.ln());
        let d = 2f64.ln();
        let k1 = KlEstimator::K1.per_token(lp, lr) as f64;
        let k2 = KlEstimator::K2.per_token(lp, lr) as f64;
        let k3 = KlEstimator::K3.per_token(lp, lr) as f64;
        assert!((k1 - d).abs() < 1e-6);
        assert!((k2 - 0.5 * d * d).abs() < 1e-6);
        // r = π_ref/π = 0.5: (0.5 − 1) − ln 0.5 = ln 2 − 0.5.
        assert!((k3 - (d - 0.5)).abs() < 1e-6);
        // Same distribution: every estimator 0; k3 never negative.
        for k in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
            assert_eq!(k.per_token(-1.5, -1.5), 0.0);
        }
        assert!(KlEstimator::K3.per_token(lr, lp) >= 0.0);
        assert!(KlEstimator::K1.per_token(lr, lp) < 0.0);
    }

    #[test]
    fn estimator_gradients_match_finite_differences() {
        for k in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
            for (lp, lr) in [(-0.3f32, -1.1f32), (-2.0, -0.5)] {
                let h = 1e-3f32;
                let fd = (k.per_token(lp + h, lr) - k.per_token(lp - h, lr)) / (2.0 * h);
                assert!((fd - k.grad(lp, lr)).abs() < 1e-3, "{k:?} {lp} {lr}");
            }
        }
    }

    #[test]
    fn adaptive_controller_by_hand() {
        let mut c = KlController {
            value: 0.2,
            adaptive: Some((6.0, 10000.0)),
        };
        // KL 9 vs target 6: error 0.5 clipped to 0.2; 256 samples:
        // β = 0.2 · (1 + 0.2·256/10000) = 0.2 · 1.00512.
        c.update(9.0, 256);
        assert!((c.value - 0.201024).abs() < 1e-12);
        // KL 3: error −0.5 → −0.2: β ·= 1 − 0.00512.
        c.update(3.0, 256);
        assert!((c.value - 0.201024 * 0.99488).abs() < 1e-12);
        // KL 6.6: error 0.1 (inside the clip).
        let before = c.value;
        c.update(6.6, 1000);
        assert!((c.value - before * 1.01).abs() < 1e-12);
        let mut fixed = KlController {
            value: 0.05,
            adaptive: None,
        };
        fixed.update(100.0, 1000);
        assert_eq!(fixed.value, 0.05);
    }
}
