//! Advantages: generalised advantage estimation (PPO), whitening, and
//! group-normalised rewards (GRPO).

/// GAE over one response (Schulman et al. 2016, as TRL's PPO computes it):
/// δ_t = r_t + γ·V_{t+1} − V_t (V after the last token is 0),
/// A_t = δ_t + γλ·A_{t+1}, and returns R_t = A_t + V_t.
/// `rewards`, `values`: [T] per response token. Returns (advantages, returns).
pub fn gae(rewards: &[f32], values: &[f32], gamma: f32, lam: f32) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(rewards.len(), values.len(), "one value per reward");
    let n = rewards.len();
    let mut adv = vec![0f32; n];
    let mut next_adv = 0f32;
    let mut next_value = 0f32;
    for t in (0..n).rev() {
        let delta = rewards[t] + gamma * next_value - values[t];
        next_adv = delta + gamma * lam * next_adv;
        adv[t] = next_adv;
        next_value = values[t];
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// Mean and variance with Bessel's correction (torch.var's default), in f64.
fn mean_var(xs: &[f32]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
    let ss = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>();
    (mean, if xs.len() > 1 { ss / (n - 1.0) } else { 0.0 })
}

/// TRL's `whiten`: (x − mean)/√(var + 1e-8), var unbiased; with
/// `shift_mean` false the mean is added back (used for returns).
pub fn whiten(xs: &[f32], shift_mean: bool) -> Vec<f32> {
    if xs.is_empty() {
        return Vec::new();
    }
    let (mean, var) = mean_var(xs);
    let inv = 1.0 / (var + 1e-8).sqrt();
    xs.iter()
        .map(|&x| {
            let w = (x as f64 - mean) * inv;
            (if shift_mean { w } else { w + mean }) as f32
        })
        .collect()
}

/// GRPO's advantages: each group of `group` consecutive rewards (the G
/// samples of one prompt) minus its mean, divided by its standard deviation
/// (unbiased, as torch.std) + 1e-4. A group whose rewards are all equal gets
/// advantages 0: it carries no signal.
#[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
pub fn group_advantages(rewards: &[f32], group: usize) -> Vec<f32> {
    assert!(
        group > 0 && rewards.len() % group == 0,
        "rewards must split into groups of {group}"
    );
    rewards
        .chunks(group)
        .flat_map(|g| {
            let (mean, var) = mean_var(g);
            let std = var.sqrt();
            g.iter()
                .map(move |&r| ((r as f64 - mean) / (std + 1e-4)) as f32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn gae_by_hand() {
        // r = [0, 0, 1], V = [0.5, 0.25, 0.5], γ = 1, λ = 0.5:
        // δ2 = 1 + 0 − 0.5 = 0.5           A2 = 0.5
        // δ1 = 0 + 0.5 − 0.25 = 0.25       A1 = 0.25 + 0.5·0.5 = 0.5
        // δ0 = 0 + 0.25 − 0.5 = −0.25      A0 = −0.25 + 0.5·0.5 = 0
        let (a, r) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.25, 0.5], 1.0, 0.5);
        close(&a, &[0.0, 0.5, 0.5], 1e-7);
        close(&r, &[0.5, 0.75, 1.0], 1e-7);
        // γ = 0.5, λ = 1: δ2 = 0.5, δ1 = 0 + 0.25 − 0.25 = 0, δ0 = 0 + 0.125 − 0.5 = −0.375
        // A2 = 0.5, A1 = 0 + 0.5·0.5 = 0.25, A0 = −0.375 + 0.5·0.25 = −0.25
        let (a, _) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.25, 0.5], 0.5, 1.0);
        close(&a, &[-0.25, 0.25, 0.5], 1e-7);
        // λ = 1, γ = 1: A_t = Σ_{k≥t} r_k − V_t (Monte Carlo return minus baseline).
        let (a, r) = gae(&[1.0, 2.0, 3.0], &[0.0, 1.0, 2.0], 1.0, 1.0);
        close(&a, &[6.0, 4.0, 1.0], 1e-6);
        close(&r, &[6.0, 5.0, 3.0], 1e-6);
    }

    #[test]
    fn whiten_by_hand() {
        // [1, 2, 3]: mean 2, unbiased var 1 → [−1, 0, 1] (up to the 1e-8).
        close(&whiten(&[1.0, 2.0, 3.0], true), &[-1.0, 0.0, 1.0], 1e-6);
        close(&whiten(&[1.0, 2.0, 3.0], false), &[1.0, 2.0, 3.0], 1e-6);
        // [0, 4]: mean 2, var (4 + 4)/1 = 8 → ±2/√8.
        let w = 2.0 / 8f32.sqrt();
        close(&whiten(&[0.0, 4.0], true), &[-w, w], 1e-6);
    }

    #[test]
    fn group_advantages_by_hand() {
        // Group [1, 0, 0, 1]: mean 0.5, unbiased std √(4·0.25/3) = √(1/3).
        let s = (1.0f64 / 3.0).sqrt();
        let a = (0.5 / (s + 1e-4)) as f32;
        // Group [1, 1, 1, 1]: no signal.
        close(
            &group_advantages(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], 4),
            &[a, -a, -a, a, 0.0, 0.0, 0.0, 0.0],
            1e-6,
        );
    }
}
