//! DPO's sigmoid loss (Rafailov et al. 2023, TRL's `loss_type="sigmoid"`)
//! from the summed log-probabilities of the chosen and rejected answers
//! under the policy and the reference (the adapter switched off).

#[derive(Clone, Debug, PartialEq)]
pub struct DpoLoss {
    /// mean −log σ(β·((π_c − ref_c) − (π_r − ref_r))).
    pub loss: f64,
    /// d loss / d π_c and d loss / d π_r, per pair.
    pub grad_chosen: Vec<f32>,
    pub grad_rejected: Vec<f32>,
    /// β·(π − ref) per pair: TRL's rewards/chosen and rewards/rejected.
    pub chosen_rewards: Vec<f32>,
    pub rejected_rewards: Vec<f32>,
    /// Fraction of pairs whose chosen reward is the larger.
    pub accuracy: f64,
}

pub fn dpo_loss(
    policy_chosen: &[f32],
    policy_rejected: &[f32],
    ref_chosen: &[f32],
    ref_rejected: &[f32],
    beta: f32,
) -> DpoLoss {
    let n = policy_chosen.len();
    assert!(policy_rejected.len() == n && ref_chosen.len() == n && ref_rejected.len() == n);
    let b = beta as f64;
    let inv_n = 1.0 / n.max(1) as f64;
    let mut out = DpoLoss {
        loss: 0.0,
        grad_chosen: vec![0.0; n],
        grad_rejected: vec![0.0; n],
        chosen_rewards: vec![0.0; n],
        rejected_rewards: vec![0.0; n],
        accuracy: 0.0,
    };
    for i in 0..n {
        let rc = b * (policy_chosen[i] as f64 - ref_chosen[i] as f64);
        let rr = b * (policy_rejected[i] as f64 - ref_rejected[i] as f64);
        let z = rc - rr;
        // −log σ(z) = softplus(−z), computed stably.
        out.loss += (-z).max(0.0) + (-z.abs()).exp().ln_1p();
        let s = 1.0 / (1.0 + z.exp()); // σ(−z)
        out.grad_chosen[i] = (-b * s * inv_n) as f32;
        out.grad_rejected[i] = (b * s * inv_n) as f32;
        out.chosen_rewards[i] = rc as f32;
        out.rejected_rewards[i] = rr as f32;
        out.accuracy += (rc > rr) as u8 as f64;
    }
    out.loss *= inv_n;
    out.accuracy *= inv_n;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpo_by_hand() {
        // Pair 0: policy = reference → z = 0, loss ln 2, grads ∓β/2/n.
        // Pair 1: π_c − ref_c = 1, π_r − ref_r = −1, β = 0.5 → z = 1,
        //         loss ln(1 + e^−1), σ(−1) = 1/(1 + e).
        let d = dpo_loss(
            &[-3.0, -2.0],
            &[-4.0, -6.0],
            &[-3.0, -3.0],
            &[-4.0, -5.0],
            0.5,
        );
        let l1 = (1.0 + (-1f64).exp()).ln();
        assert!((d.loss - (2f64.ln() + l1) / 2.0).abs() < 1e-9, "{d:?}");
        let s1 = 1.0 / (1.0 + 1f64.exp());
        assert!((d.grad_chosen[0] as f64 + 0.5 * 0.5 / 2.0).abs() < 1e-7);
        assert!((d.grad_rejected[0] as f64 - 0.5 * 0.5 / 2.0).abs() < 1e-7);
        assert!((d.grad_chosen[1] as f64 + 0.5 * s1 / 2.0).abs() < 1e-7);
        assert_eq!(d.chosen_rewards, vec![0.0, 0.5]);
        assert_eq!(d.rejected_rewards, vec![0.0, -0.5]);
        assert_eq!(d.accuracy, 0.5); // a tie is not a win
                                     // Large margins stay finite (softplus, not log(sigmoid)).
        let far = dpo_loss(&[0.0], &[-2000.0], &[0.0], &[0.0], 1.0);
        assert!(far.loss.is_finite() && far.loss < 1e-12, "{far:?}");
        let wrong = dpo_loss(&[-2000.0], &[0.0], &[0.0], &[0.0], 1.0);
        assert!((wrong.loss - 2000.0).abs() < 1e-9);
    }
}
