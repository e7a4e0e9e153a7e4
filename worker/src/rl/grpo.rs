//! Group Relative Policy Optimization (Shao et al. 2024, as TRL 0.29's
//! `GRPOTrainer` computes it): G completions per prompt, advantages from the
//! rewards of the prompt's group (no value model), and per token
//! −min(ρA, clip(ρ, 1 ± ε)·A) + β·k3(π‖π_ref), normalised over the batch by
//! `loss_type`.
//!
//! The update is data-parallel: every rank holds whole groups and computes its
//! share of the global loss's gradient — per-token weights come from global
//! counts — so one gradient all-reduce (a sum) gives exactly the gradient of
//! the loss of the whole batch, however many ranks hold the groups.

use super::advantages::group_advantages;
use super::kl::KlEstimator;
use super::ppo_loss::policy_loss;
use super::rollout::{response_slice, sequence_batch, Rollout};
use crate::collective::Collective;
use crate::model::Llama;
use crate::train::optim::Optimizer;
use crate::train::trainer::sum_over_ranks;
use anyhow::{bail, Result};
use rlhf_kernels::Backend;

/// TRL's `scale_rewards`: what the group-centred rewards are divided by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleRewards {
    /// The group's standard deviation (+ 1e-4): "group" (TRL's default; also `true`).
    Group,
    /// The standard deviation of every reward of the batch (+ 1e-4): "batch".
    Batch,
    /// Nothing (Dr. GRPO): "none" (also `false`).
    None,
}

impl std::str::FromStr for ScaleRewards {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "group" | "true" | "True" => Ok(ScaleRewards::Group),
            "batch" => Ok(ScaleRewards::Batch),
            "none" | "false" | "False" => Ok(ScaleRewards::None),
            _ => Err(format!(
                "unknown scale_rewards {s:?} (expected group, batch or none)"
            )),
        }
    }
}

/// TRL's `loss_type`: how per-token losses are averaged over the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossType {
    /// Each completion's mean over its tokens, then the mean over completions.
    Grpo,
    /// The sum over every completion token of the batch / their number (TRL's default).
    Dapo,
    /// The sum over every token / (completions × max_completion_length).
    DrGrpo,
}

impl std::str::FromStr for LossType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grpo" => Ok(LossType::Grpo),
            "dapo" => Ok(LossType::Dapo),
            "dr_grpo" => Ok(LossType::DrGrpo),
            "bnpo" => Err("loss_type \"bnpo\" (normalised per micro-batch) is not supported; use dapo, the same normalised over the whole batch".into()),
            _ => Err(format!(
                "unknown loss_type {s:?} (expected dapo, grpo or dr_grpo)"
            )),
        }
    }
}

impl LossType {
    pub fn name(self) -> &'static str {
        match self {
            LossType::Grpo => "grpo",
            LossType::Dapo => "dapo",
            LossType::DrGrpo => "dr_grpo",
        }
    }

    /// The weight of each token of a `len`-token completion in the batch's
    /// loss: the batch has `completions` completions with `tokens` tokens in all.
    pub fn token_weight(
        self,
        len: usize,
        completions: usize,
        tokens: usize,
        max_completion_length: usize,
    ) -> f64 {
        match self {
            LossType::Grpo => 1.0 / (len.max(1) * completions.max(1)) as f64,
            LossType::Dapo => 1.0 / tokens.max(1) as f64,
            LossType::DrGrpo => 1.0 / (completions.max(1) * max_completion_length.max(1)) as f64,
        }
    }
}

fn mean_std(xs: &[f32]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n.max(1.0);
    let ss: f64 = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum();
    // Unbiased, as torch.std.
    (
        mean,
        if xs.len() > 1 {
            (ss / (n - 1.0)).sqrt()
        } else {
            0.0
        },
    )
}

/// Advantages of a batch of rewards in groups of `group` (the G completions
/// of one prompt, consecutive): reward − the group's mean, scaled per
/// `scale` (std unbiased, + 1e-4 as TRL).
#[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
pub fn advantages(rewards: &[f32], group: usize, scale: ScaleRewards) -> Vec<f32> {
    assert!(
        group > 0 && rewards.len() % group == 0,
        "rewards must split into groups of {group}"
    );
    match scale {
        ScaleRewards::Group => group_advantages(rewards, group),
        ScaleRewards::Batch | ScaleRewards::None => {
            let div = match scale {
                ScaleRewards::Batch => mean_std(rewards).1 + 1e-4,
                _ => 1.0,
            };
            rewards
                .chunks(group)
                .flat_map(|g| {
                    let mean = mean_std(g).0;
                    g.iter().map(move |&r| ((r as f64 - mean) / div) as f32)
                })
                .collect()
        }
    }
}

/// Fraction of groups whose rewards are all equal (no learning signal):
/// TRL's `frac_reward_zero_std`.
pub fn frac_zero_std(rewards: &[f32], group: usize) -> f64 {
    let groups = rewards.len() / group.max(1);
    let zero = rewards
        .chunks(group.max(1))
        .filter(|g| mean_std(g).1 <= 1e-8)
        .count();
    zero as f64 / groups.max(1) as f64
}

/// One completion's share of the batch loss and its gradient.
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionLoss {
    /// weight · Σ_t (−min(ρ_t A, clip(ρ_t, 1 ± ε) A) + β·k3_t)
    pub loss: f64,
    /// d loss / d logp_t
    pub grad: Vec<f32>,
    /// Tokens whose clipped term is the smaller (no policy gradient).
    pub clipped: usize,
    /// Σ_t k3_t (when a reference is given).
    pub kl_sum: f64,
}

/// The loss terms of one completion: `logp`, `old_logp`, `ref_logp` per
/// token ([R]), the completion's advantage, each token weighted by
/// `weight` (see [`LossType::token_weight`]). `ref_logp` None: no KL term (β = 0).
pub fn completion_loss(
    logp: &[f32],
    old_logp: &[f32],
    ref_logp: Option<&[f32]>,
    advantage: f32,
    epsilon: f32,
    beta: f32,
    weight: f64,
) -> CompletionLoss {
    let n = logp.len();
    // The clipped surrogate is PPO's; policy_loss averages over its n tokens.
    let pl = policy_loss(logp, old_logp, &vec![advantage; n], epsilon);
    let scale = n as f64 * weight;
    let mut out = CompletionLoss {
        loss: pl.loss * scale,
        grad: pl.grad.iter().map(|&g| (g as f64 * scale) as f32).collect(),
        clipped: (pl.clip_frac * n as f64).round() as usize,
        kl_sum: 0.0,
    };
    if let Some(r) = ref_logp {
        assert_eq!(r.len(), n, "one reference log-prob per token");
        let k3 = KlEstimator::K3;
        for t in 0..n {
            let kl = k3.per_token(logp[t], r[t]) as f64;
            out.kl_sum += kl;
            out.loss += weight * beta as f64 * kl;
            out.grad[t] += (weight * beta as f64 * k3.grad(logp[t], r[t]) as f64) as f32;
        }
    }
    out
}

/// A rollout ready for the update: its advantage, reference and old
/// log-probabilities (`Rollout::ref_logp`, `Rollout::logp`; empty when not needed).
pub struct Scored<'a> {
    pub rollout: &'a Rollout,
    pub advantage: f32,
}

/// The update's hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct GrpoUpdate {
    pub loss_type: LossType,
    pub epsilon: f32,
    pub beta: f32,
    pub max_completion_length: usize,
    /// Rollouts per forward/backward.
    pub micro_batch: usize,
}

/// Sums over the whole batch (all ranks) of one optimizer step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UpdateStats {
    pub loss: f64,
    /// Fraction of completion tokens whose ratio was clipped.
    pub clip_ratio: f64,
    /// Mean k3 per completion token (0 without a reference).
    pub kl: f64,
    /// Gradient norm before clipping (None: not finite).
    pub grad_norm: Option<f64>,
}

/// One optimizer step on this rank's rollouts (`batch_completions` and
/// `batch_tokens`: counts over all ranks, for the normalisation). Old
/// log-probabilities: each rollout's `logp` when set (num_iterations > 1),
/// else the current ones (ρ = 1). Reference: `ref_logp` when β > 0.
#[allow(clippy::too_many_arguments)]
pub fn optimizer_step<B: Backend>(
    model: &mut Llama<B>,
    opt: &mut Optimizer<B>,
    collective: &mut dyn Collective<B>,
    cfg: &GrpoUpdate,
    mine: &[Scored<'_>],
    batch_completions: usize,
    batch_tokens: usize,
    pad_id: u32,
    learning_rate: f64,
    dropout_seed: Option<u64>,
) -> Result<UpdateStats> {
    model.zero_grads()?;
    let (mut loss, mut clipped, mut kl) = (0f64, 0f64, 0f64);
    for chunk in mine.chunks(cfg.micro_batch.max(1)) {
        let rows: Vec<&Rollout> = chunk.iter().map(|s| s.rollout).collect();
        let batch = sequence_batch(&rows, pad_id);
        let out = model.token_forward(&batch, dropout_seed, false)?;
        let mut dlogp = vec![0f32; batch.b * batch.t]; // [B,T]
        for (i, s) in chunk.iter().enumerate() {
            let r = s.rollout;
            let logp = response_slice(&out.logp, &batch, i, r);
            let old = if r.logp.is_empty() {
                logp
            } else {
                r.logp.as_slice()
            };
            let reference = (cfg.beta != 0.0).then_some(r.ref_logp.as_slice());
            if reference.is_some_and(|x| x.len() != logp.len()) {
                bail!("rollout {}: no reference log-probabilities", r.key);
            }
            let w = cfg.loss_type.token_weight(
                r.response.len(),
                batch_completions,
                batch_tokens,
                cfg.max_completion_length,
            );
            let c = completion_loss(logp, old, reference, s.advantage, cfg.epsilon, cfg.beta, w);
            loss += c.loss;
            clipped += c.clipped as f64;
            kl += c.kl_sum;
            let from = i * batch.t + r.start();
            dlogp[from..from + c.grad.len()].copy_from_slice(&c.grad);
        }
        model.token_backward(&batch, &dlogp, None, dropout_seed)?;
    }
    if collective.world_size() > 1 {
        let n = model.layout.train_len;
        collective.all_reduce_sum(&model.be, &mut model.grads, 0..n)?;
    }
    let [loss, clipped, kl] = sum_over_ranks(model, collective, [loss, clipped, kl])?;
    let grad_norm = opt.step(model, learning_rate, 1.0)?;
    let tokens = batch_tokens.max(1) as f64;
    Ok(UpdateStats {
        loss,
        clip_ratio: clipped / tokens,
        kl: kl / tokens,
        grad_norm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn advantages_by_hand() {
        // Groups of 2: [1, 3] (mean 2, unbiased std √2) and [5, 5] (std 0).
        let r = [1.0, 3.0, 5.0, 5.0];
        let s = 2f64.sqrt() + 1e-4;
        let g = (1.0 / s) as f32;
        close(
            &advantages(&r, 2, ScaleRewards::Group),
            &[-g, g, 0.0, 0.0],
            1e-6,
        );
        close(
            &advantages(&r, 2, ScaleRewards::None),
            &[-1.0, 1.0, 0.0, 0.0],
            0.0,
        );
        // Batch: mean 3.5, deviations −2.5, −0.5, 1.5, 1.5 → Σ² = 6.25 + 0.25 + 2.25 + 2.25 = 11,
        // unbiased var 11/3; the group means are still subtracted.
        let b = ((11.0f64 / 3.0).sqrt() + 1e-4) as f32;
        close(
            &advantages(&r, 2, ScaleRewards::Batch),
            &[-1.0 / b, 1.0 / b, 0.0, 0.0],
            1e-6,
        );
        assert_eq!(frac_zero_std(&r, 2), 0.5);
        assert_eq!(frac_zero_std(&[1.0, 1.0, 1.0, 1.0], 4), 1.0);
    }

    #[test]
    fn names_are_trl_s() {
        assert_eq!("dapo".parse::<LossType>().unwrap(), LossType::Dapo);
        assert_eq!("grpo".parse::<LossType>().unwrap(), LossType::Grpo);
        assert_eq!("dr_grpo".parse::<LossType>().unwrap(), LossType::DrGrpo);
        assert!("bnpo"
            .parse::<LossType>()
            .unwrap_err()
            .contains("not supported"));
        assert_eq!("True".parse::<ScaleRewards>().unwrap(), ScaleRewards::Group);
        assert_eq!("none".parse::<ScaleRewards>().unwrap(), ScaleRewards::None);
        assert!("std".parse::<ScaleRewards>().is_err());
    }

    /// The batch loss of completions (logp, advantage) with ρ = 1 and no KL,
    /// each normalised by `loss_type`.
    fn batch_loss(seqs: &[(&[f32], f32)], loss_type: LossType, max_len: usize) -> f64 {
        let tokens: usize = seqs.iter().map(|(l, _)| l.len()).sum();
        seqs.iter()
            .map(|(l, a)| {
                let w = loss_type.token_weight(l.len(), seqs.len(), tokens, max_len);
                completion_loss(l, l, None, *a, 0.2, 0.0, w).loss
            })
            .sum()
    }

    #[test]
    fn dapo_grpo_and_dr_grpo_normalise_differently() {
        // At ρ = 1 each token's loss is −A. Completion a: 1 token, A = 1;
        // completion b: 3 tokens, A = −1.
        let (a, b): (&[f32], &[f32]) = (&[-0.5], &[-1.0, -2.0, -0.1]);
        let seqs = [(a, 1.0f32), (b, -1.0f32)];
        // dapo: (−1 + 3·1)/4 tokens = 0.5.
        assert!((batch_loss(&seqs, LossType::Dapo, 8) - 0.5).abs() < 1e-9);
        // grpo: mean(−1/1, 3/3) = 0: each completion counts once, whatever its length.
        assert!(batch_loss(&seqs, LossType::Grpo, 8).abs() < 1e-9);
        // dr_grpo: (−1 + 3)/(2 completions × 8) = 0.125.
        assert!((batch_loss(&seqs, LossType::DrGrpo, 8) - 0.125).abs() < 1e-9);
        // Gradient per token at ρ = 1: −A·weight.
        let c = completion_loss(b, b, None, -1.0, 0.2, 0.0, 0.25);
        close(&c.grad, &[0.25, 0.25, 0.25], 1e-7);
        assert_eq!(c.clipped, 0);
    }

    #[test]
    fn clipping_by_hand() {
        // ρ = e^0.5 ≈ 1.65 with A = 1, ε = 0.2: min(1.65, 1.2) = 1.2 — clipped,
        // no gradient. ρ = e^−0.5 ≈ 0.61 with A = 1: min(0.61, 0.8) = 0.61 —
        // unclipped, gradient −ρA.
        let c = completion_loss(&[0.5, -0.5], &[0.0, 0.0], None, 1.0, 0.2, 0.0, 1.0);
        let r = (-0.5f64).exp();
        assert!((c.loss - (-1.2 - r)).abs() < 1e-6, "{c:?}");
        close(&c.grad, &[0.0, -r as f32], 1e-6);
        assert_eq!(c.clipped, 1);
    }

    #[test]
    fn the_kl_term_is_beta_k3_and_its_gradient_matches_finite_differences() {
        let old = [-1.0f32, -0.7, -2.2];
        let reference = [-1.3f32, -0.4, -2.0];
        let logp = [-1.1f32, -0.6, -2.3];
        let (adv, eps, beta, w) = (0.8f32, 0.2f32, 0.3f32, 0.125f64);
        let c = completion_loss(&logp, &old, Some(&reference), adv, eps, beta, w);
        // The KL part by hand: β·w·Σ (e^{ref−logp} − (ref − logp) − 1).
        let k3: f64 = logp
            .iter()
            .zip(&reference)
            .map(|(&l, &r)| {
                let d = (r - l) as f64;
                d.exp() - d - 1.0
            })
            .sum();
        let without = completion_loss(&logp, &old, None, adv, eps, beta, w);
        assert!((c.loss - without.loss - w * beta as f64 * k3).abs() < 1e-7);
        assert!((c.kl_sum - k3).abs() < 1e-6);
        for t in 0..3 {
            let h = 1e-3f32;
            let (mut up, mut dn) = (logp, logp);
            up[t] += h;
            dn[t] -= h;
            let f = |l: &[f32]| completion_loss(l, &old, Some(&reference), adv, eps, beta, w).loss;
            let fd = (f(&up) - f(&dn)) / (2.0 * h as f64);
            assert!(
                (fd - c.grad[t] as f64).abs() < 1e-4,
                "token {t}: {fd} vs {}",
                c.grad[t]
            );
        }
    }
}
