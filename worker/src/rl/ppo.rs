//! One PPO iteration on a batch of scored rollouts, as TRL's classic
//! `PPOTrainer.step` (0.7.x, the one MedicalGPT's PPO arguments belong to):
//! per-token rewards −β·KL with the score added at the last token, GAE,
//! whitened advantages, `ppo_epochs` passes of clipped policy and value
//! losses over shuffled mini-batches, early stop on the policy KL, and the
//! adaptive KL coefficient.
//!
//! Data parallelism: a step's rollouts come in *shares* of `batch_size`
//! (one per planned worker); a rank holds some shares. Each share is shuffled
//! and cut into mini-batches by itself, and optimizer step k takes mini-batches
//! k·GA..(k+1)·GA of every share, so the update does not depend on how many
//! ranks hold the shares. Whitening and statistics are over all shares.

use super::advantages::gae;
use super::kl::KlController;
use super::ppo_loss::{policy_loss, value_loss};
use super::rollout::{response_slice, sequence_batch, Rollout};
use crate::collective::Collective;
use crate::model::Llama;
use crate::train::optim::Optimizer;
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rlhf_kernels::Backend;
use serde::{Deserialize, Serialize};

/// TRL's `kl_penalty`: how the per-token KL in the reward is estimated from
/// the sampled token's log-probabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KlPenalty {
    /// logπ − logπ_ref ("kl", the default)
    Kl,
    /// |logπ − logπ_ref| ("abs")
    Abs,
    /// ½(logπ − logπ_ref)² ("mse")
    Mse,
}

impl std::str::FromStr for KlPenalty {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kl" => Ok(KlPenalty::Kl),
            "abs" => Ok(KlPenalty::Abs),
            "mse" => Ok(KlPenalty::Mse),
            "full" => Err("kl_penalty \"full\" (the KL of the whole distributions) is not supported; use kl, abs or mse".into()),
            _ => Err(format!("unknown kl_penalty {s:?} (expected kl, abs or mse)")),
        }
    }
}

impl KlPenalty {
    pub fn per_token(self, logp: f32, ref_logp: f32) -> f32 {
        let d = logp - ref_logp;
        match self {
            KlPenalty::Kl => d,
            KlPenalty::Abs => d.abs(),
            KlPenalty::Mse => 0.5 * d * d,
        }
    }
}

/// The hyper-parameters of an iteration (TRL 0.7 `PPOConfig` names).
#[derive(Clone, Debug, PartialEq)]
pub struct PpoConfig {
    /// Rollouts per share.
    pub batch_size: usize,
    pub mini_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub ppo_epochs: usize,
    pub learning_rate: f64,
    pub gamma: f32,
    pub lam: f32,
    pub cliprange: f32,
    pub cliprange_value: f32,
    pub vf_coef: f32,
    pub kl_penalty: KlPenalty,
    pub early_stopping: bool,
    pub target_kl: f64,
    /// A mini-batch whose mean ratio exceeds this is skipped (its loss is zeroed).
    pub ratio_threshold: f64,
    pub whiten_rewards: bool,
    pub seed: u64,
}

/// Running mean and variance of the scores over all steps (TRL's
/// `RunningMoments`, for `use_score_scaling`/`use_score_norm`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunningMoments {
    pub mean: f64,
    pub var: f64,
    pub count: f64,
}

impl Default for RunningMoments {
    fn default() -> Self {
        RunningMoments {
            mean: 0.0,
            var: 1.0,
            count: 1e-24,
        }
    }
}

impl RunningMoments {
    /// Fold in a batch with this mean, (population) variance and count.
    pub fn update(&mut self, mean: f64, var: f64, n: f64) {
        let delta = mean - self.mean;
        let total = self.count + n;
        let m2 = self.var * self.count + var * n + delta * delta * self.count * n / total;
        self.mean += delta * n / total;
        self.var = m2 / total;
        self.count = total;
    }

    /// The running standard deviation, unbiased.
    pub fn std(&self) -> f64 {
        (self.var * self.count / (self.count - 1.0).max(1e-12)).sqrt()
    }
}

/// How raw scores become rewards (TRL: `reward_baseline` in MedicalGPT's
/// script, then `use_score_scaling`, `use_score_norm`, `score_clip`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScoreShaping {
    pub baseline: f32,
    pub scaling: bool,
    pub norm: bool,
    pub clip: Option<f32>,
}

/// What persists between iterations (and in checkpoints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PpoState {
    pub kl: KlController,
    pub score_moments: RunningMoments,
}

/// The rollouts of the shares this rank holds: (share id, its rollouts).
pub type Shares = [(usize, Vec<Rollout>)];

/// Mean and unbiased variance of `values(rollout)` over every share of every
/// rank (share-ordered sums, see `rl::shares`); also the count.
fn share_moments<B: Backend>(
    model: &Llama<B>,
    collective: &mut dyn Collective<B>,
    shares: &Shares,
    n_shares: usize,
    values: impl Fn(&Rollout) -> Vec<f32>,
) -> Result<(f64, f64, f64)> {
    let firsts: Vec<(usize, [f64; 2])> = shares
        .iter()
        .map(|(s, rs)| {
            let xs: Vec<f32> = rs.iter().flat_map(&values).collect();
            (*s, [xs.len() as f64, xs.iter().map(|&x| x as f64).sum()])
        })
        .collect();
    let [n, total] = super::shares::sum(model, collective, n_shares, &firsts)?;
    let mean = total / n.max(1.0);
    let seconds: Vec<(usize, [f64; 1])> = shares
        .iter()
        .map(|(s, rs)| {
            let ss = rs
                .iter()
                .flat_map(&values)
                .map(|x| (x as f64 - mean).powi(2))
                .sum();
            (*s, [ss])
        })
        .collect();
    let [ss] = super::shares::sum(model, collective, n_shares, &seconds)?;
    let var = if n > 1.0 { ss / (n - 1.0) } else { 0.0 };
    Ok((mean, var, n))
}

/// Apply the score shaping to every rollout's raw score (statistics over all
/// shares); sets `score`.
pub fn shape_scores<B: Backend>(
    model: &Llama<B>,
    collective: &mut dyn Collective<B>,
    shares: &mut Shares,
    n_shares: usize,
    shaping: &ScoreShaping,
    moments: &mut RunningMoments,
) -> Result<()> {
    for (_, rs) in shares.iter_mut() {
        for r in rs.iter_mut() {
            r.score = r.raw_score - shaping.baseline;
        }
    }
    if shaping.scaling {
        let (mean, var, n) = share_moments(model, collective, shares, n_shares, |r| vec![r.score])?;
        let pop_var = if n > 0.0 { var * (n - 1.0) / n } else { 0.0 };
        moments.update(mean, pop_var, n);
        let factor = moments.std() + f32::EPSILON as f64;
        for (_, rs) in shares.iter_mut() {
            for r in rs.iter_mut() {
                let s = r.score as f64;
                r.score = if shaping.norm {
                    ((s - moments.mean) / factor) as f32
                } else {
                    (s / factor) as f32
                };
            }
        }
    }
    if let Some(c) = shaping.clip {
        for (_, rs) in shares.iter_mut() {
            for r in rs.iter_mut() {
                r.score = r.score.clamp(-c, c);
            }
        }
    }
    Ok(())
}

/// TRL's `compute_rewards` for one rollout: −β·KL per token, plus the score
/// at the last response token.
pub fn token_rewards(
    logp: &[f32],
    ref_logp: &[f32],
    score: f32,
    kl_coef: f64,
    penalty: KlPenalty,
) -> Vec<f32> {
    let mut r: Vec<f32> = logp
        .iter()
        .zip(ref_logp)
        .map(|(&l, &rl)| (-kl_coef * penalty.per_token(l, rl) as f64) as f32)
        .collect();
    if let Some(last) = r.last_mut() {
        *last += score;
    }
    r
}

/// Rewards, advantages (GAE, then whitened over every share's tokens) and
/// returns of every rollout, whose logp, ref_logp, values and score are set.
pub fn compute_advantages<B: Backend>(
    model: &Llama<B>,
    collective: &mut dyn Collective<B>,
    shares: &mut Shares,
    n_shares: usize,
    cfg: &PpoConfig,
    kl_coef: f64,
) -> Result<()> {
    for (_, rs) in shares.iter_mut() {
        for r in rs.iter_mut() {
            r.rewards = token_rewards(&r.logp, &r.ref_logp, r.score, kl_coef, cfg.kl_penalty);
        }
    }
    if cfg.whiten_rewards {
        let (mean, var, _) =
            share_moments(model, collective, shares, n_shares, |r| r.rewards.clone())?;
        let inv = 1.0 / (var + 1e-8).sqrt();
        for (_, rs) in shares.iter_mut() {
            for r in rs.iter_mut() {
                // shift_mean = False: the mean is kept.
                for x in r.rewards.iter_mut() {
                    *x = ((*x as f64 - mean) * inv + mean) as f32;
                }
            }
        }
    }
    for (_, rs) in shares.iter_mut() {
        for r in rs.iter_mut() {
            let (adv, ret) = gae(&r.rewards, &r.values, cfg.gamma, cfg.lam);
            r.advantages = adv;
            r.returns = ret;
        }
    }
    let (mean, var, _) = share_moments(model, collective, shares, n_shares, |r| {
        r.advantages.clone()
    })?;
    let inv = 1.0 / (var + 1e-8).sqrt();
    for (_, rs) in shares.iter_mut() {
        for r in rs.iter_mut() {
            for a in r.advantages.iter_mut() {
                *a = ((*a as f64 - mean) * inv) as f32;
            }
        }
    }
    Ok(())
}

/// Sums of the update's per-mini-batch statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UpdateStats {
    pub policy_loss: f64,
    pub value_loss: f64,
    pub clip_frac: f64,
    pub value_clip_frac: f64,
    pub approx_kl: f64,
    /// mean(old logp − new logp)
    pub policy_kl: f64,
    pub ratio: f64,
    /// Mini-batches skipped for a mean ratio above ratio_threshold.
    pub skipped: f64,
    pub mini_batches: f64,
    /// Optimizer steps taken and PPO epochs run.
    pub optimizer_steps: u64,
    pub epochs: usize,
    pub early_stopped: bool,
}

impl UpdateStats {
    fn add(&mut self, o: &UpdateStats) {
        self.policy_loss += o.policy_loss;
        self.value_loss += o.value_loss;
        self.clip_frac += o.clip_frac;
        self.value_clip_frac += o.value_clip_frac;
        self.approx_kl += o.approx_kl;
        self.policy_kl += o.policy_kl;
        self.ratio += o.ratio;
        self.skipped += o.skipped;
        self.mini_batches += o.mini_batches;
    }

    fn as_array(&self) -> [f64; 9] {
        [
            self.policy_loss,
            self.value_loss,
            self.clip_frac,
            self.value_clip_frac,
            self.approx_kl,
            self.policy_kl,
            self.ratio,
            self.skipped,
            self.mini_batches,
        ]
    }

    fn from_array(a: [f64; 9]) -> Self {
        UpdateStats {
            policy_loss: a[0],
            value_loss: a[1],
            clip_frac: a[2],
            value_clip_frac: a[3],
            approx_kl: a[4],
            policy_kl: a[5],
            ratio: a[6],
            skipped: a[7],
            mini_batches: a[8],
            ..Default::default()
        }
    }

    /// Means per mini-batch.
    pub fn mean(&self) -> UpdateStats {
        let n = self.mini_batches.max(1.0);
        UpdateStats {
            policy_loss: self.policy_loss / n,
            value_loss: self.value_loss / n,
            clip_frac: self.clip_frac / n,
            value_clip_frac: self.value_clip_frac / n,
            approx_kl: self.approx_kl / n,
            policy_kl: self.policy_kl / n,
            ratio: self.ratio / n,
            ..*self
        }
    }
}

/// Forward and backward of one mini-batch; gradients of `scale` × (policy
/// loss + vf_coef · value loss) are added into the model's gradients.
fn mini_batch<B: Backend>(
    model: &mut Llama<B>,
    batch_rollouts: &[&Rollout],
    pad_id: u32,
    cfg: &PpoConfig,
    scale: f32,
) -> Result<UpdateStats> {
    let batch = sequence_batch(batch_rollouts, pad_id);
    let out = model.token_forward(&batch, None, false)?;
    let values = out
        .values
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("PPO needs the model's value head"))?;
    let (mut lp, mut old, mut adv, mut vp, mut old_v, mut ret) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for (i, r) in batch_rollouts.iter().enumerate() {
        lp.extend_from_slice(response_slice(&out.logp, &batch, i, r));
        vp.extend_from_slice(response_slice(values, &batch, i, r));
        old.extend_from_slice(&r.logp);
        adv.extend_from_slice(&r.advantages);
        old_v.extend_from_slice(&r.values);
        ret.extend_from_slice(&r.returns);
    }
    let pl = policy_loss(&lp, &old, &adv, cfg.cliprange);
    let vl = value_loss(&vp, &old_v, &ret, cfg.cliprange_value);
    let n = lp.len().max(1) as f64;
    let ratio = lp
        .iter()
        .zip(&old)
        .map(|(&l, &o)| ((l - o) as f64).exp())
        .sum::<f64>()
        / n;
    let policy_kl = old
        .iter()
        .zip(&lp)
        .map(|(&o, &l)| (o - l) as f64)
        .sum::<f64>()
        / n;
    let skip = ratio > cfg.ratio_threshold;
    if skip {
        tracing::warn!(
            ratio,
            threshold = cfg.ratio_threshold,
            "mini-batch skipped: its mean probability ratio is above ratio_threshold"
        );
    } else {
        // Scatter the per-token gradients back to their [B,T] rows.
        let nt = batch.b * batch.t;
        let (mut dlogp, mut dvalues) = (vec![0f32; nt], vec![0f32; nt]);
        let mut k = 0;
        for (i, r) in batch_rollouts.iter().enumerate() {
            let from = i * batch.t + r.start();
            for j in 0..r.response.len() {
                dlogp[from + j] = pl.grad[k] * scale;
                dvalues[from + j] = vl.grad[k] * cfg.vf_coef * scale;
                k += 1;
            }
        }
        model.token_backward(&batch, &dlogp, Some(&dvalues), None)?;
    }
    Ok(UpdateStats {
        policy_loss: pl.loss,
        value_loss: vl.loss,
        clip_frac: pl.clip_frac,
        value_clip_frac: vl.clip_frac,
        approx_kl: pl.approx_kl,
        policy_kl,
        ratio,
        skipped: skip as u8 as f64,
        mini_batches: 1.0,
        ..Default::default()
    })
}

/// The order of a share's rollouts in one PPO epoch.
fn share_order(n: usize, seed: u64, step: u64, epoch: usize, share: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let key = seed
        ^ (step + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (epoch as u64 + 1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ (share as u64 + 1).wrapping_mul(0x1656_67B1_9E37_79F9);
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(key));
    idx
}

/// The PPO epochs over this rank's shares (`shares[i]` = share id and its
/// `batch_size` rollouts), `n_shares` shares over all ranks.
#[allow(clippy::too_many_arguments)]
#[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
pub fn update<B: Backend>(
    model: &mut Llama<B>,
    opt: &mut Optimizer<B>,
    collective: &mut dyn Collective<B>,
    cfg: &PpoConfig,
    shares: &Shares,
    n_shares: usize,
    pad_id: u32,
    step: u64,
) -> Result<UpdateStats> {
    let per_opt_step = cfg.mini_batch_size * cfg.gradient_accumulation_steps;
    if cfg.mini_batch_size == 0 || per_opt_step == 0 || cfg.batch_size % per_opt_step != 0 {
        bail!(
            "batch_size ({}) must be a multiple of mini_batch_size × gradient_accumulation_steps ({} × {})",
            cfg.batch_size,
            cfg.mini_batch_size,
            cfg.gradient_accumulation_steps
        );
    }
    if let Some((s, r)) = shares.iter().find(|(_, r)| r.len() != cfg.batch_size) {
        bail!(
            "share {s} has {} rollouts, not batch_size {}",
            r.len(),
            cfg.batch_size
        );
    }
    let opt_steps = cfg.batch_size / per_opt_step;
    // Each mini-batch's losses are means over its tokens; an optimizer step
    // averages its mini-batches (TRL: accumulation and DDP average).
    let scale = 1.0 / (cfg.gradient_accumulation_steps * n_shares) as f32;
    let mut total = UpdateStats::default();
    for epoch in 0..cfg.ppo_epochs {
        let orders: Vec<Vec<usize>> = shares
            .iter()
            .map(|(s, _)| share_order(cfg.batch_size, cfg.seed, step, epoch, *s))
            .collect();
        // Statistics per share, summed in share order over all ranks.
        let mut epoch_stats = vec![UpdateStats::default(); shares.len()];
        for k in 0..opt_steps {
            model.zero_grads()?;
            for (((_, rollouts), order), stats) in
                shares.iter().zip(&orders).zip(epoch_stats.iter_mut())
            {
                for g in 0..cfg.gradient_accumulation_steps {
                    let from = (k * cfg.gradient_accumulation_steps + g) * cfg.mini_batch_size;
                    let mb: Vec<&Rollout> = order[from..from + cfg.mini_batch_size]
                        .iter()
                        .map(|&i| &rollouts[i])
                        .collect();
                    let s = mini_batch(model, &mb, pad_id, cfg, scale)?;
                    stats.add(&s);
                }
            }
            if collective.world_size() > 1 {
                let n = model.layout.train_len;
                collective.all_reduce_sum(&model.be, &mut model.grads, 0..n)?;
            }
            if opt.step(model, cfg.learning_rate, 1.0)?.is_none() {
                bail!(
                    "the PPO gradients became non-finite at step {}; lower the learning rate",
                    step + 1
                );
            }
            total.optimizer_steps += 1;
        }
        let local: Vec<(usize, [f64; 9])> = shares
            .iter()
            .zip(&epoch_stats)
            .map(|((s, _), st)| (*s, st.as_array()))
            .collect();
        let epoch_sum =
            UpdateStats::from_array(super::shares::sum(model, collective, n_shares, &local)?);
        total.add(&epoch_sum);
        total.epochs = epoch + 1;
        // TRL stops when the policy KL passes 1.5 × target_kl (it reads the
        // epoch's last mini-batch; the epoch's mean here).
        if cfg.early_stopping && epoch_sum.mean().policy_kl > 1.5 * cfg.target_kl {
            tracing::info!(
                step = step + 1,
                epoch,
                policy_kl = epoch_sum.mean().policy_kl,
                "early stop: policy KL above 1.5 × target_kl"
            );
            total.early_stopped = true;
            break;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewards_are_minus_beta_kl_with_the_score_at_the_end() {
        let r = token_rewards(
            &[-1.0, -2.0, -0.5],
            &[-1.5, -2.0, -1.0],
            3.0,
            0.2,
            KlPenalty::Kl,
        );
        assert_eq!(r.len(), 3);
        assert!((r[0] - (-0.2 * 0.5)).abs() < 1e-7);
        assert_eq!(r[1], 0.0);
        assert!((r[2] - (-0.2 * 0.5 + 3.0)).abs() < 1e-6);
        let r = token_rewards(&[-2.0], &[-1.0], 1.0, 0.5, KlPenalty::Abs);
        assert!((r[0] - (1.0 - 0.5)).abs() < 1e-7);
        let r = token_rewards(&[-2.0], &[-1.0], 0.0, 1.0, KlPenalty::Mse);
        assert!((r[0] + 0.5).abs() < 1e-7);
    }

    #[test]
    fn running_moments_match_the_moments_of_everything_seen() {
        // Two batches folded in = the population moments of their union.
        let a = [1.0f64, 2.0, 4.0];
        let b = [0.5f64, 7.0];
        let pop = |xs: &[f64]| {
            let m = xs.iter().sum::<f64>() / xs.len() as f64;
            (
                m,
                xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64,
            )
        };
        let mut rm = RunningMoments::default();
        let (ma, va) = pop(&a);
        rm.update(ma, va, 3.0);
        let (mb, vb) = pop(&b);
        rm.update(mb, vb, 2.0);
        let all = [1.0, 2.0, 4.0, 0.5, 7.0];
        let (m, v) = pop(&all);
        assert!((rm.mean - m).abs() < 1e-9, "{rm:?}");
        assert!((rm.var - v).abs() < 1e-9, "{rm:?}");
        assert!((rm.std() - (v * 5.0 / 4.0).sqrt()).abs() < 1e-9);
    }

    #[test]
    fn kl_penalty_names_are_trl_s() {
        assert_eq!("kl".parse::<KlPenalty>().unwrap(), KlPenalty::Kl);
        assert_eq!("mse".parse::<KlPenalty>().unwrap(), KlPenalty::Mse);
        assert!("full"
            .parse::<KlPenalty>()
            .unwrap_err()
            .contains("not supported"));
    }

    #[test]
    fn share_orders_are_permutations_that_differ_by_epoch_and_share() {
        let a = share_order(8, 1, 0, 0, 0);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..8).collect::<Vec<_>>());
        assert_ne!(a, share_order(8, 1, 0, 1, 0));
        assert_ne!(a, share_order(8, 1, 0, 0, 1));
        assert_eq!(a, share_order(8, 1, 0, 0, 0));
    }
}
