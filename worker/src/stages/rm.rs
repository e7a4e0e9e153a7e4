//! `rlhf rm`: reward modelling (MedicalGPT `reward_modeling.py`): preference
//! pairs → a scalar `score` head trained with the pairwise loss
//! −log σ(r_chosen − r_rejected).

/// The pairwise loss of InstructGPT / MedicalGPT's RewardTrainer over rows
/// interleaved as [chosen0, rejected0, chosen1, rejected1, ...]: returns
/// Σ −log σ(r_c − r_r) over the pairs and its gradient with respect to each
/// row's score, times `grad_scale` (1/pairs of the step gives the mean).
pub fn pairwise_loss(scores: &[f32], grad_scale: f32) -> (f64, Vec<f32>) {
    let mut loss_sum = 0.0;
    let mut dscores = vec![0f32; scores.len()];
    for (i, pair) in scores.chunks_exact(2).enumerate() {
        let margin = pair[0] as f64 - pair[1] as f64;
        // −log σ(m) = softplus(−m), computed without overflow.
        loss_sum += (-margin).max(0.0) + (-margin.abs()).exp().ln_1p();
        // d/dm −log σ(m) = −σ(−m)
        let d = -1.0 / (1.0 + margin.exp());
        dscores[2 * i] = (d * grad_scale as f64) as f32;
        dscores[2 * i + 1] = (-d * grad_scale as f64) as f32;
    }
    (loss_sum, dscores)
}
