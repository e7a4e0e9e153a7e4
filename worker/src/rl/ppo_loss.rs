//! PPO's clipped surrogate and clipped value losses (Schulman et al. 2017, as
//! TRL's classic PPOTrainer), averaged over the tokens given, with their
//! gradients with respect to the new log-probabilities and values.

/// The policy loss and its statistics over `n` tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyLoss {
    /// mean_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε)), ρ = exp(logp − old_logp).
    pub loss: f64,
    /// d loss / d logp_t.
    pub grad: Vec<f32>,
    /// Fraction of tokens where the clipped term is the larger (no gradient).
    pub clip_frac: f64,
    /// ½ mean (logp − old_logp)²: TRL's approx_kl.
    pub approx_kl: f64,
}

pub fn policy_loss(logp: &[f32], old_logp: &[f32], adv: &[f32], cliprange: f32) -> PolicyLoss {
    assert!(logp.len() == old_logp.len() && logp.len() == adv.len());
    let n = logp.len().max(1) as f64;
    let (mut loss, mut clipped, mut kl) = (0f64, 0usize, 0f64);
    let mut grad = vec![0f32; logp.len()];
    for t in 0..logp.len() {
        let d = (logp[t] - old_logp[t]) as f64;
        let ratio = d.exp();
        let a = adv[t] as f64;
        let unclipped = -a * ratio;
        let clip = -a * ratio.clamp(1.0 - cliprange as f64, 1.0 + cliprange as f64);
        if clip > unclipped {
            // The clipped term is constant in logp: no gradient.
            loss += clip;
            clipped += 1;
        } else {
            loss += unclipped;
            grad[t] = (-a * ratio / n) as f32; // dρ/dlogp = ρ
        }
        kl += 0.5 * d * d;
    }
    PolicyLoss {
        loss: loss / n,
        grad,
        clip_frac: clipped as f64 / n,
        approx_kl: kl / n,
    }
}

/// The value loss and its statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueLoss {
    /// ½ mean max((v − R)², (clip(v, v_old ± ε) − R)²).
    pub loss: f64,
    /// d loss / d v_t.
    pub grad: Vec<f32>,
    /// Fraction of tokens where the clipped error is the larger.
    pub clip_frac: f64,
}

pub fn value_loss(
    values: &[f32],
    old_values: &[f32],
    returns: &[f32],
    cliprange_value: f32,
) -> ValueLoss {
    assert!(values.len() == old_values.len() && values.len() == returns.len());
    let n = values.len().max(1) as f64;
    let (mut loss, mut clipped) = (0f64, 0usize);
    let mut grad = vec![0f32; values.len()];
    for t in 0..values.len() {
        let (v, v0, r) = (values[t] as f64, old_values[t] as f64, returns[t] as f64);
        let e = cliprange_value as f64;
        let vc = v.clamp(v0 - e, v0 + e);
        let (l1, l2) = ((v - r).powi(2), (vc - r).powi(2));
        if l2 > l1 {
            loss += l2;
            clipped += 1;
            // d(vc − R)²/dv is 0 where the clip is active, which it is here
            // (an unclipped vc equals v and cannot give a larger error).
        } else {
            loss += l1;
            grad[t] = ((v - r) / n) as f32; // ½ · 2(v − R) / n
        }
    }
    ValueLoss {
        loss: 0.5 * loss / n,
        grad,
        clip_frac: clipped as f64 / n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_loss_by_hand() {
        // Token 0: ρ = e^0.5 ≈ 1.6487, A = 1, ε = 0.2: −1.6487 vs −1.2 → the
        // clipped −1.2 is larger (clipped, no gradient).
        // Token 1: ρ = 1, A = −2: both terms 2 → unclipped, grad −A·ρ/n = 2/3.
        // Token 2: ρ = e^−0.5 ≈ 0.6065, A = −1: 0.6065 vs 0.8 → clipped 0.8.
        let p = policy_loss(&[0.5, 0.0, -0.5], &[0.0, 0.0, 0.0], &[1.0, -2.0, -1.0], 0.2);
        let expect = (-1.2 + 2.0 + 0.8) / 3.0;
        assert!((p.loss - expect).abs() < 1e-6, "{p:?}");
        assert_eq!(p.grad, vec![0.0, 2.0 / 3.0, 0.0]);
        assert!((p.clip_frac - 2.0 / 3.0).abs() < 1e-12);
        assert!((p.approx_kl - 0.5 * (0.25 + 0.0 + 0.25) / 3.0).abs() < 1e-9);
        // Inside the clip range the loss is −mean(A·ρ) and its gradient −A·ρ/n.
        let p = policy_loss(&[0.1], &[0.0], &[3.0], 0.2);
        let r = 0.1f64.exp();
        assert!((p.loss + 3.0 * r).abs() < 1e-6);
        assert!((p.grad[0] as f64 + 3.0 * r).abs() < 1e-6);
        assert_eq!(p.clip_frac, 0.0);
    }

    #[test]
    fn policy_gradient_matches_finite_differences() {
        let (old, adv) = ([0.0f32, -0.4, 0.2, 0.0], [0.7f32, -1.3, 0.4, -0.2]);
        let logp = [0.1f32, -0.1, 0.5, -0.05];
        let p = policy_loss(&logp, &old, &adv, 0.2);
        for t in 0..4 {
            let h = 1e-3f32;
            let mut up = logp;
            up[t] += h;
            let mut dn = logp;
            dn[t] -= h;
            let fd = (policy_loss(&up, &old, &adv, 0.2).loss
                - policy_loss(&dn, &old, &adv, 0.2).loss)
                / (2.0 * h as f64);
            assert!(
                (fd - p.grad[t] as f64).abs() < 1e-3,
                "token {t}: {fd} vs {}",
                p.grad[t]
            );
        }
    }

    #[test]
    fn value_loss_by_hand() {
        // v = 1.5, v_old = 1, R = 0, ε = 0.2: (1.5)² = 2.25 vs clip 1.2² = 1.44
        // → unclipped 2.25, grad (1.5 − 0)/n.
        // v = 0.5, v_old = 1, R = 2: 2.25 vs clip 0.8 → (0.8 − 2)² = 1.44 → 2.25.
        // v = 1.5, v_old = 1, R = 3: 2.25 vs (1.2 − 3)² = 3.24 → clipped, no grad.
        let v = value_loss(&[1.5, 0.5, 1.5], &[1.0, 1.0, 1.0], &[0.0, 2.0, 3.0], 0.2);
        assert!(
            (v.loss - 0.5 * (2.25 + 2.25 + 3.24) / 3.0).abs() < 1e-6,
            "{v:?}"
        );
        assert_eq!(v.grad, vec![0.5, -0.5, 0.0]);
        assert!((v.clip_frac - 1.0 / 3.0).abs() < 1e-12);
    }
}
