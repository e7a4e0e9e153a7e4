//! `rlhf ppo`: reinforcement learning from a reward model with PPO
//! (MedicalGPT's classic `ppo_training.py` arguments and defaults, TRL 0.7's
//! algorithm; see `rl::ppo`).
//!
//! One copy of the base weights serves all four roles: the policy is the base
//! plus a trainable LoRA adapter and a value head (the critic); the reference
//! is the same base with the adapter switched off; the reward model's LoRA
//! adapter and score head (the rm stage's output) are swapped in over the same
//! base when it was trained on it (else the reward model is loaded apart).
//!
//! Each iteration: sample `batch_size` responses per share (KV-cache
//! generation, seeded per rollout), score them, compute log-probabilities
//! (policy, reference) and values, then the PPO update, data-parallel with one
//! gradient all-reduce per optimizer step. A checkpoint holds the adapter, the
//! value head, the optimizer moments, the KL controller and score statistics,
//! and the iteration (which fixes the prompt position and every seed), so a
//! resumed run repeats exactly what an uninterrupted one does.
//!
//! Differences from MedicalGPT/TRL, on purpose: prompts keep the conversation
//! before their turn; prompts longer than max_source_length are left out
//! (counted), not cut; sampling uses top_k 0 (TRL's advice: the whole
//! distribution, so the log-probabilities are those of the sampling policy);
//! dropout is off in every PPO pass (TRL's PPOv2 too), so the first epoch's
//! ratio is exactly 1; the reward model reads the chat-formatted conversation
//! it was trained on (the classic script passed a text pair); early stopping
//! uses the epoch's mean policy KL (TRL the last mini-batch's).

use super::args::{parse_bool, Device, ModelArgs, RunFlags};
use super::qa_eval::{greedy_config, QaAccuracy};
use crate::collective::Collective;
use crate::data::pretrain::split_train_validation;
use crate::data::template::ChatFormat;
use crate::fsutil::write_json_atomic;
use crate::model::generate::GenerationConfig;
use crate::model::params::Head;
use crate::model::pretrained::VALUE_HEAD_FILE;
use crate::model::{Llama, TrainMode};
use crate::rl::exchange::{Role, RolloutExchange, RolloutTask, SampledRollout};
use crate::rl::kl::KlController;
use crate::rl::ppo::{
    compute_advantages, shape_scores, update, KlPenalty, PpoConfig, PpoState, RunningMoments,
    ScoreShaping, UpdateStats,
};
use crate::rl::prompts::{prompt_at, read_prompt_dir, tokenise_prompts, TokenisedPrompt};
use crate::rl::reward::RewardModel;
use crate::rl::rollout::{response_outputs, sample_responses, Rollout};
use crate::tokenizer::Tokenizer;
use crate::train::checkpoint::{self, TrainerState};
use crate::train::metrics::{Metrics, Progress};
use crate::train::optim::{OptimConfig, Optimizer};
use crate::train::{LogRecord, TrainHooks};
use anyhow::{bail, Context, Result};
use clap::Args;
use rlhf_kernels::Backend;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// MedicalGPT's classic PPO `ScriptArguments` (+ the TRL 0.7 `PPOConfig`
/// fields it leaves at their defaults), same names and defaults.
#[derive(Args, Clone, Debug)]
pub struct PpoFlags {
    /// The reward model: the rm stage's output (a SEQ_CLS LoRA adapter with its
    /// score head) or a `*ForSequenceClassification` model dir.
    #[arg(long = "reward_model_name_or_path", alias = "reward_model_path")]
    pub reward_model_name_or_path: PathBuf,
    /// The reward adapter's base model, when not its config's base_model_name_or_path.
    #[arg(long = "reward_base_model_name_or_path")]
    pub reward_base_model_name_or_path: Option<PathBuf>,
    /// Chat template of prompts and reward texts (a MedicalGPT template
    /// name); default: the tokenizer's chat_template (MedicalGPT classic: vicuna).
    #[arg(long = "template_name")]
    pub template_name: Option<String>,
    /// Folder of SFT-format files (ShareGPT/Alpaca): every human turn is a prompt.
    #[arg(long = "train_file_dir")]
    pub train_file_dir: PathBuf,
    /// Held-out prompts, evaluated before and after training.
    #[arg(long = "validation_file_dir")]
    pub validation_file_dir: Option<PathBuf>,
    #[arg(long = "validation_split_percentage", default_value_t = 1)]
    pub validation_split_percentage: u32,
    #[arg(long = "max_train_samples")]
    pub max_train_samples: Option<usize>,
    #[arg(long = "max_eval_samples")]
    pub max_eval_samples: Option<usize>,
    /// Prompts longer than this many tokens are left out (counted).
    #[arg(long = "max_source_length", default_value_t = 2048)]
    pub max_source_length: usize,
    /// max_new_tokens of every response.
    #[arg(long = "max_target_length", default_value_t = 512)]
    pub max_target_length: usize,
    /// Rollouts per worker per iteration.
    #[arg(long = "batch_size", default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long = "mini_batch_size", default_value_t = 1)]
    pub mini_batch_size: usize,
    #[arg(long = "gradient_accumulation_steps", default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    #[arg(long = "ppo_epochs", default_value_t = 4)]
    pub ppo_epochs: usize,
    #[arg(long = "learning_rate", default_value_t = 1.5e-5)]
    pub learning_rate: f64,
    /// Clip the gradient norm (TRL: None).
    #[arg(long = "max_grad_norm")]
    pub max_grad_norm: Option<f64>,
    #[arg(long = "init_kl_coef", default_value_t = 0.2)]
    pub init_kl_coef: f64,
    #[arg(long = "adap_kl_ctrl", default_value = "true", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub adap_kl_ctrl: bool,
    /// The adaptive KL controller's target KL.
    #[arg(long = "target", default_value_t = 6.0)]
    pub target: f64,
    #[arg(long = "horizon", default_value_t = 10000.0)]
    pub horizon: f64,
    #[arg(long = "gamma", default_value_t = 1.0)]
    pub gamma: f32,
    #[arg(long = "lam", default_value_t = 0.95)]
    pub lam: f32,
    #[arg(long = "cliprange", default_value_t = 0.2)]
    pub cliprange: f32,
    #[arg(long = "cliprange_value", default_value_t = 0.2)]
    pub cliprange_value: f32,
    #[arg(long = "vf_coef", default_value_t = 0.1)]
    pub vf_coef: f32,
    /// kl, abs or mse.
    #[arg(long = "kl_penalty", default_value = "kl")]
    pub kl_penalty: KlPenalty,
    /// Stop an iteration's epochs once the policy KL passes 1.5 × target_kl.
    #[arg(long = "early_stopping", default_value = "false", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub early_stopping: bool,
    #[arg(long = "target_kl", default_value_t = 0.1)]
    pub target_kl: f64,
    #[arg(long = "ratio_threshold", default_value_t = 10.0)]
    pub ratio_threshold: f64,
    /// Subtracted from every score.
    #[arg(
        long = "reward_baseline",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub reward_baseline: f32,
    #[arg(long = "use_score_scaling", default_value = "false", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub use_score_scaling: bool,
    #[arg(long = "use_score_norm", default_value = "false", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub use_score_norm: bool,
    #[arg(long = "score_clip")]
    pub score_clip: Option<f32>,
    #[arg(long = "whiten_rewards", default_value = "false", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub whiten_rewards: bool,
    #[arg(long = "temperature", default_value_t = 1.0)]
    pub temperature: f32,
    /// 0: no top-k cut (sample from the whole distribution).
    #[arg(long = "top_k", default_value_t = 0)]
    pub top_k: usize,
    #[arg(long = "top_p", default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long = "repetition_penalty", default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Rollouts per forward when computing log-probabilities, values and scores.
    #[arg(long = "forward_batch_size", default_value_t = 8)]
    pub forward_batch_size: usize,
    /// Under a coordinator: this many of the stage's workers (the last
    /// ranks) only sample and score rollouts, with the policy the trainers
    /// ship them after each update (the adapter and value head, not the
    /// base); the others train. 0: every worker does both.
    #[arg(long = "rollout_workers", default_value_t = 0)]
    pub rollout_workers: usize,
    /// Total rollouts per worker; iterations = ceil(max_steps / batch_size) (TRL's `steps`).
    #[arg(long = "max_steps", default_value_t = 200)]
    pub max_steps: u64,
    /// Save a checkpoint every N iterations (and at the end).
    #[arg(long = "save_steps", default_value_t = 50)]
    pub save_steps: u64,
    #[arg(long = "save_total_limit")]
    pub save_total_limit: Option<usize>,
    #[arg(long = "logging_steps", default_value_t = 1)]
    pub logging_steps: u64,
    #[arg(long = "output_dir", default_value = "outputs-rl")]
    pub output_dir: PathBuf,
    #[arg(long = "seed", default_value_t = 0)]
    pub seed: u64,
    /// Held-out questions with short answers (JSON lines {"question", "short"}):
    /// exact-answer accuracy of greedy replies before and after training.
    #[arg(long = "eval_qa_file")]
    pub eval_qa_file: Option<PathBuf>,
    #[arg(long = "skip_invalid", default_value = "false", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub skip_invalid: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long = "device", default_value = "cpu")]
    pub device: Device,
    #[arg(long = "bf16", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub bf16: Option<bool>,
    #[arg(long = "fp16", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub fp16: Option<bool>,
    /// A checkpoint dir, or true for the latest checkpoint-* in output_dir.
    #[arg(long = "resume_from_checkpoint")]
    pub resume_from_checkpoint: Option<String>,
    /// Stop after this many iterations (a resumable interruption; for tests).
    #[arg(long = "stop_after_steps", hide = true)]
    pub stop_after_steps: Option<u64>,
    /// Accepted for compatibility with MedicalGPT's scripts (no effect).
    #[arg(long = "model_type", hide = true)]
    pub model_type: Option<String>,
    #[arg(long = "report_to", hide = true)]
    pub report_to: Option<String>,
    #[arg(long = "do_train", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub do_train: Option<bool>,
}

#[derive(Args, Clone, Debug)]
pub struct PpoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub ppo: PpoFlags,
}

impl PpoArgs {
    pub fn run_flags(&self) -> RunFlags<'_> {
        RunFlags {
            device: self.ppo.device,
            bf16: self.ppo.bf16,
            fp16: self.ppo.fp16,
            output_dir: &self.ppo.output_dir,
            resume_from_checkpoint: self.ppo.resume_from_checkpoint.as_deref(),
        }
    }

    fn config(&self) -> PpoConfig {
        let p = &self.ppo;
        PpoConfig {
            batch_size: p.batch_size,
            mini_batch_size: p.mini_batch_size,
            gradient_accumulation_steps: p.gradient_accumulation_steps,
            ppo_epochs: p.ppo_epochs,
            learning_rate: p.learning_rate,
            gamma: p.gamma,
            lam: p.lam,
            cliprange: p.cliprange,
            cliprange_value: p.cliprange_value,
            vf_coef: p.vf_coef,
            kl_penalty: p.kl_penalty,
            early_stopping: p.early_stopping,
            target_kl: p.target_kl,
            ratio_threshold: p.ratio_threshold,
            whiten_rewards: p.whiten_rewards,
            seed: p.seed,
        }
    }
}

/// trainer_state.json of a PPO checkpoint: the trainer's fields plus the
/// PPO state and where the prompts are.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PpoTrainerState {
    #[serde(flatten)]
    pub trainer: TrainerState,
    pub ppo: PpoState,
    /// Rollouts taken from the prompt order so far (all workers).
    pub prompt_position: u64,
    /// Rollouts per iteration over all workers.
    pub rollouts_per_step: u64,
    /// AdamW steps taken (iterations differ when an epoch stops early).
    pub optimizer_steps: u64,
}

/// Evaluation of the policy on held-out prompts.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PolicyEval {
    /// Mean reward-model score of greedy responses.
    pub reward_greedy: f64,
    /// Mean score of sampled responses (the rollout settings).
    pub reward_sampled: f64,
    /// Mean over sampled responses of Σ_t (logπ − logπ_ref).
    pub kl_sampled: f64,
    /// Mean length of greedy responses, in tokens.
    pub response_length: f64,
    pub prompts: usize,
    /// The first few (question, greedy response, score), for a human to look at.
    pub samples: Vec<(String, String, f32)>,
    /// Exact-answer accuracy (with --eval_qa_file), greedy.
    pub qa: Option<QaAccuracy>,
    /// The same with the rollouts' sampling (seeded).
    pub qa_sampled: Option<QaAccuracy>,
}

/// What `rlhf ppo` reports (also written to output_dir/all_results.json).
#[derive(Clone, Debug)]
pub struct PpoResult {
    pub steps: u64,
    pub finished: bool,
    pub initial_eval: Option<PolicyEval>,
    pub eval: Option<PolicyEval>,
    /// all_results.json as written (rank 0; Null on other ranks).
    pub results: serde_json::Value,
}

/// The PPO stage's summary, for the DistStage plumbing.
pub struct PpoSummary {
    pub finished: bool,
}

/// Everything the iterations share.
struct Ctx<'a> {
    prompts: &'a [TokenisedPrompt],
    tokenizer: &'a Tokenizer,
    gen: GenerationConfig,
    pad_id: u32,
    forward_batch: usize,
    batch_size: usize,
    rollouts_per_step: u64,
    seed: u64,
}

/// Sample, score and evaluate the rollouts of one share.
fn rollouts_of_share<B: Backend>(
    model: &mut Llama<B>,
    reward: &mut RewardModel<B>,
    ctx: &Ctx<'_>,
    step: u64,
    share: usize,
) -> Result<Vec<Rollout>> {
    let mut rollouts = sample_share(model, reward, ctx, step, share)?;
    annotate(model, ctx, &mut rollouts)?;
    Ok(rollouts)
}

/// The rollout keys of share `share` of iteration `step` (each key picks a
/// prompt and seeds its sampling).
fn share_keys(ctx: &Ctx<'_>, step: u64, share: usize) -> std::ops::Range<u64> {
    let first = step * ctx.rollouts_per_step + (share * ctx.batch_size) as u64;
    first..first + ctx.batch_size as u64
}

/// The responses of one share, sampled and scored (what a rollout worker does).
fn sample_share<B: Backend>(
    model: &mut Llama<B>,
    reward: &mut RewardModel<B>,
    ctx: &Ctx<'_>,
    step: u64,
    share: usize,
) -> Result<Vec<Rollout>> {
    let keys: Vec<u64> = share_keys(ctx, step, share).collect();
    let queries: Vec<(usize, &[u32])> = keys
        .iter()
        .map(|&k| {
            let p = prompt_at(ctx.prompts.len(), ctx.seed, k);
            (p, ctx.prompts[p].ids.as_slice())
        })
        .collect();
    let mut rollouts = sample_responses(model, ctx.tokenizer, &queries, &keys, &ctx.gen, ctx.seed)?;
    score(model, reward, ctx.prompts, &mut rollouts)?;
    Ok(rollouts)
}

/// Log-probabilities, values and entropies of the policy, and the
/// reference's log-probabilities (adapter off), of sampled rollouts.
fn annotate<B: Backend>(
    model: &mut Llama<B>,
    ctx: &Ctx<'_>,
    rollouts: &mut [Rollout],
) -> Result<()> {
    let refs: Vec<&Rollout> = rollouts.iter().collect();
    let pol = response_outputs(model, &refs, ctx.pad_id, ctx.forward_batch, true)?;
    model.set_adapter_enabled(false);
    let reference = response_outputs(model, &refs, ctx.pad_id, ctx.forward_batch, false);
    model.set_adapter_enabled(true);
    let reference = reference?;
    let values = pol.values.context("the policy has no value head")?;
    let entropy = pol.entropy.context("entropy")?;
    for (i, r) in rollouts.iter_mut().enumerate() {
        r.logp = pol.logp[i].clone();
        r.values = values[i].clone();
        r.entropy = entropy[i].clone();
        r.ref_logp = reference.logp[i].clone();
    }
    Ok(())
}

/// A share as a rollout worker sent it, back to rollouts of this run's
/// prompts (checked against the keys the share must hold).
fn received_share(
    ctx: &Ctx<'_>,
    step: u64,
    share: usize,
    sampled: Vec<SampledRollout>,
) -> Result<Vec<Rollout>> {
    let keys: Vec<u64> = sampled.iter().map(|r| r.key).collect();
    let expected: Vec<u64> = share_keys(ctx, step, share).collect();
    if keys != expected {
        bail!("share {share} of iteration {step} came back with rollout keys {keys:?}, not {expected:?}");
    }
    Ok(sampled
        .into_iter()
        .map(|r| {
            let p = prompt_at(ctx.prompts.len(), ctx.seed, r.key);
            Rollout {
                key: r.key,
                prompt: p,
                query: ctx.prompts[p].ids.clone(),
                response: r.response,
                response_text: r.response_text,
                finished: r.finished,
                raw_score: r.raw_score,
                ..Default::default()
            }
        })
        .collect())
}

/// A rollout worker of a split stage: sample and score the shares the
/// coordinator hands out, each with the policy of its iteration, until the
/// trainers are done. Returns the iterations done when it last sampled.
fn serve_rollouts<B: Backend>(
    model: &mut Llama<B>,
    reward: &mut RewardModel<B>,
    ctx: &Ctx<'_>,
    exchange: &mut dyn RolloutExchange,
    hooks: &mut dyn TrainHooks,
    checkpoint_steps: impl Fn(u64) -> Vec<u64>,
) -> Result<u64> {
    let n = model.layout.train_len;
    let mut have = None;
    // Checkpoints are committed once every rank reports them: a trainer
    // writes the one of step i before it publishes iteration i's policy.
    let mut reported = 0;
    let mut report_upto = |upto: u64, hooks: &mut dyn TrainHooks| -> Result<()> {
        let due: Vec<u64> = checkpoint_steps(upto)
            .into_iter()
            .filter(|&s| s > reported)
            .collect();
        for s in due {
            hooks.on_checkpoint(s, None)?;
            reported = s;
        }
        Ok(())
    };
    while let Some(task) = exchange.next_task()? {
        hooks.check_continue()?;
        report_upto(task.iteration, hooks)?;
        if have != Some(task.iteration) {
            let values = exchange.fetch_policy(task.iteration)?;
            if values.len() != n {
                bail!(
                    "the policy of iteration {} has {} trainable values; this worker's has {n} (different LoRA settings?)",
                    task.iteration,
                    values.len()
                );
            }
            model
                .be
                .write(model.be.view_mut(&mut model.train, 0..n), &values)?;
            have = Some(task.iteration);
        }
        let t = Instant::now();
        let rollouts = sample_share(model, reward, ctx, task.iteration, task.share)?;
        let sampled: Vec<SampledRollout> = rollouts
            .into_iter()
            .map(|r| SampledRollout {
                key: r.key,
                response: r.response,
                response_text: r.response_text,
                finished: r.finished,
                raw_score: r.raw_score,
            })
            .collect();
        exchange.submit(task, &sampled, t.elapsed().as_secs_f64())?;
        tracing::debug!(
            iteration = task.iteration,
            share = task.share,
            "share sampled"
        );
    }
    report_upto(u64::MAX, hooks)?;
    Ok(have.map_or(0, |i| i + 1))
}

/// Set each rollout's raw score from the reward model.
fn score<B: Backend>(
    model: &mut Llama<B>,
    reward: &mut RewardModel<B>,
    prompts: &[TokenisedPrompt],
    rollouts: &mut [Rollout],
) -> Result<()> {
    let scores = reward.score_rollouts(model, prompts, rollouts)?;
    for (r, s) in rollouts.iter_mut().zip(scores) {
        r.raw_score = s;
    }
    Ok(())
}

/// Greedy and sampled responses to every held-out prompt: mean scores, KL of
/// the sampled ones, and (with QA items) exact-answer accuracy.
#[allow(clippy::too_many_arguments)]
fn evaluate<B: Backend>(
    model: &mut Llama<B>,
    collective: &mut dyn Collective<B>,
    reward: &mut RewardModel<B>,
    ctx: &Ctx<'_>,
    eval: &[TokenisedPrompt],
    greedy: &GenerationConfig,
    qa: Option<(&[crate::demo::FactQuestion], &ChatFormat)>,
    label: &str,
) -> Result<Option<PolicyEval>> {
    let (rank, world) = (collective.rank(), collective.world_size());
    let mut out = PolicyEval {
        prompts: eval.len(),
        ..Default::default()
    };
    if !eval.is_empty() {
        // Chunk c on rank c mod world; sums per chunk, added in chunk order.
        const CHUNK: usize = 16;
        let mut local: Vec<(usize, [f64; 4])> = Vec::new();
        for (c, chunk) in eval.chunks(CHUNK).enumerate() {
            if c % world != rank {
                continue;
            }
            let base = (c * CHUNK) as u64;
            let queries: Vec<(usize, &[u32])> = chunk
                .iter()
                .enumerate()
                .map(|(i, p)| (i, p.ids.as_slice()))
                .collect();
            let keys: Vec<u64> = (base..base + chunk.len() as u64).collect();
            // Rollout prompts index `ctx.prompts`; here the chunk's own.
            let mut greedy_r = sample_responses(model, ctx.tokenizer, &queries, &keys, greedy, 0)?;
            let mut sampled = sample_responses(
                model,
                ctx.tokenizer,
                &queries,
                &keys,
                &ctx.gen,
                ctx.seed ^ 0xE7A1,
            )?;
            score(model, reward, chunk, &mut greedy_r)?;
            score(model, reward, chunk, &mut sampled)?;
            let refs: Vec<&Rollout> = sampled.iter().collect();
            let pol = response_outputs(model, &refs, ctx.pad_id, ctx.forward_batch, false)?;
            model.set_adapter_enabled(false);
            let reference = response_outputs(model, &refs, ctx.pad_id, ctx.forward_batch, false);
            model.set_adapter_enabled(true);
            let reference = reference?;
            let kl: f64 = (0..sampled.len())
                .map(|i| {
                    pol.logp[i]
                        .iter()
                        .zip(&reference.logp[i])
                        .map(|(&a, &b)| (a - b) as f64)
                        .sum::<f64>()
                })
                .sum();
            for r in greedy_r
                .iter()
                .take(3usize.saturating_sub(out.samples.len()))
            {
                let q = chunk[r.prompt].prompt.question.clone();
                out.samples.push((q, r.response_text.clone(), r.raw_score));
            }
            local.push((
                c,
                [
                    greedy_r.iter().map(|r| r.raw_score as f64).sum::<f64>(),
                    sampled.iter().map(|r| r.raw_score as f64).sum::<f64>(),
                    kl,
                    greedy_r
                        .iter()
                        .map(|r| r.response.len() as f64)
                        .sum::<f64>(),
                ],
            ));
        }
        let n_chunks = eval.len().div_ceil(CHUNK);
        let [rg, rs, kl, len] = crate::rl::shares::sum(model, collective, n_chunks, &local)?;
        let n = eval.len() as f64;
        out.reward_greedy = rg / n;
        out.reward_sampled = rs / n;
        out.kl_sampled = kl / n;
        out.response_length = len / n;
    }
    if let Some((items, format)) = qa {
        let greedy_qa = super::qa_eval::qa_greedy_config(ctx.tokenizer, format)?;
        out.qa = Some(super::qa_eval::answer_accuracy_dist(
            model,
            collective,
            ctx.tokenizer,
            format,
            items,
            &greedy_qa,
        )?);
        let mut sampled = ctx.gen.clone();
        sampled.seed = ctx.seed ^ 0x9A5A;
        out.qa_sampled = Some(super::qa_eval::answer_accuracy_dist(
            model,
            collective,
            ctx.tokenizer,
            format,
            items,
            &sampled,
        )?);
    }
    if rank != 0 {
        return Ok(None);
    }
    tracing::info!(reward = out.reward_greedy, kl = out.kl_sampled, accuracy = ?out.qa.as_ref().map(|q| q.accuracy), "{label}");
    Ok(Some(out))
}

/// One step's statistics, as logged (TRL's names).
fn step_record(
    step: u64,
    sums: &[f64; SUMS],
    upd: &UpdateStats,
    kl_coef: f64,
    vf_coef: f32,
    rollout_secs: f64,
    update_secs: f64,
) -> serde_json::Value {
    let [n, score, score_sq, kl_sum, ent_sum, tokens, raw, d, d2, r, r2] = *sums;
    let n1 = n.max(1.0);
    let var = |sum: f64, sq: f64, k: f64| {
        let m = sum / k.max(1.0);
        (sq / k.max(1.0) - m * m).max(0.0) * k / (k - 1.0).max(1.0)
    };
    let mean = score / n1;
    let std = var(score, score_sq, n).sqrt();
    let explained = 1.0 - var(d, d2, tokens) / var(r, r2, tokens).max(1e-12);
    let m = upd.mean();
    json!({
        "step": step,
        "env/reward_mean": mean,
        "env/reward_std": std,
        "env/raw_score_mean": raw / n1,
        "objective/kl": kl_sum / n1,
        "objective/kl_coef": kl_coef,
        "objective/entropy": ent_sum / tokens.max(1.0),
        "ppo/loss/policy": m.policy_loss,
        "ppo/loss/value": m.value_loss,
        "ppo/loss/total": m.policy_loss + vf_coef as f64 * m.value_loss,
        "ppo/policy/clipfrac": m.clip_frac,
        "ppo/policy/approxkl": m.approx_kl,
        "ppo/policy/policykl": m.policy_kl,
        "ppo/policy/ratio": m.ratio,
        "ppo/val/clipfrac": m.value_clip_frac,
        "ppo/val/var_explained": explained,
        "ppo/epochs": upd.epochs,
        "ppo/early_stopped": upd.early_stopped,
        "ppo/skipped_mini_batches": upd.skipped,
        "tokens/response_len_mean": tokens / n1,
        "time/rollout_tokens_per_sec": tokens / rollout_secs.max(1e-9),
        "time/rollout_s": rollout_secs,
        "time/update_s": update_secs,
    })
}

/// One rank of the PPO stage.
pub fn run_dist<B: Backend>(
    be: B,
    args: &PpoArgs,
    collective: &mut dyn Collective<B>,
    global_batch: Option<usize>,
    hooks: &mut dyn TrainHooks,
) -> Result<PpoResult> {
    let p = &args.ppo;
    let cfg = args.config();
    // Split stage: rollout workers only sample; the collective is the trainers'.
    let mut exchange = hooks.take_rollout_exchange();
    let rollout_only = exchange.as_ref().is_some_and(|x| x.role() == Role::Rollout);
    if p.rollout_workers > 0 && exchange.is_none() {
        bail!("--rollout_workers {} needs a coordinator (a ppo stage of a pipeline) to hand rollouts between workers", p.rollout_workers);
    }
    let (rank, world) = (collective.rank(), collective.world_size());
    let is_main = rank == 0 && !rollout_only;
    if p.batch_size == 0 || p.forward_batch_size == 0 || p.max_target_length == 0 {
        bail!("batch_size, forward_batch_size and max_target_length must be > 0");
    }
    if be.needs_loss_scaling() {
        bail!("PPO in fp16 is not supported (no loss scaling here); use --bf16");
    }
    let rollouts_per_step = global_batch.unwrap_or(world * p.batch_size);
    #[allow(clippy::manual_is_multiple_of)]
    if rollouts_per_step % p.batch_size != 0 {
        bail!(
            "{rollouts_per_step} rollouts per iteration do not split into shares of batch_size {}",
            p.batch_size
        );
    }
    let n_shares = rollouts_per_step / p.batch_size;
    let my_shares: Vec<usize> = (rank..n_shares).step_by(world).collect();
    let total_steps = p.max_steps.div_ceil(p.batch_size as u64).max(1);

    // Policy tokenizer and chat format; MedicalGPT's pad rule.
    let tokenizer_dir = args.model.tokenizer_dir();
    let tokenizer = Tokenizer::load(&tokenizer_dir)?;
    let format = ChatFormat::resolve(p.template_name.as_deref(), &tokenizer)?;
    let pad_id = tokenizer
        .pad_id()
        .or_else(|| tokenizer.token_to_id("<unk>"))
        .or(tokenizer.eos_id())
        .context("the tokenizer has no pad, unk or eos token to pad with")?;

    // Prompts.
    let train_all = read_prompt_dir(&p.train_file_dir, p.skip_invalid)?;
    let (train_p, valid_p) = match &p.validation_file_dir {
        Some(d) => (train_all, read_prompt_dir(d, p.skip_invalid)?),
        None => split_train_validation(train_all, p.validation_split_percentage)?,
    };
    let cut = |mut v: Vec<_>, max: Option<usize>| {
        if let Some(m) = max.filter(|&m| m > 0) {
            v.truncate(m);
        }
        v
    };
    let (train, too_long_train) = tokenise_prompts(
        cut(train_p, p.max_train_samples),
        &tokenizer,
        &format,
        p.max_source_length,
    )?;
    let (valid, too_long_valid) = tokenise_prompts(
        cut(valid_p, p.max_eval_samples),
        &tokenizer,
        &format,
        p.max_source_length,
    )?;
    if too_long_train + too_long_valid > 0 {
        tracing::warn!(
            train = too_long_train,
            eval = too_long_valid,
            max_source_length = p.max_source_length,
            "prompts left out: longer than max_source_length tokens"
        );
    }
    if train.is_empty() {
        bail!("no training prompts left");
    }

    // Policy (+ value head) over the SFT model; reference = adapter off.
    let TrainMode::Lora(lora) = args.model.train_mode()? else {
        bail!("PPO here trains a LoRA adapter (--use_peft true): the reference policy is the base with the adapter off, so no second copy is needed");
    };
    if !lora.modules_to_save.is_empty() {
        bail!("PPO with --modules_to_save is not supported: the reference (adapter off) would lose those modules");
    }
    let mut model = crate::model::pretrained::load_model_with_head(
        be,
        &args.model.model_name_or_path,
        TrainMode::Lora(lora),
        Head::CausalLmWithValue,
        p.seed,
    )?;
    if let Some(dir) = &args.model.peft_path {
        model.load_adapter(dir)?;
        if dir.join(VALUE_HEAD_FILE).exists() {
            model.load_value_head(dir)?;
        }
        tracing::info!(adapter = %dir.display(), "continuing from adapter");
    }
    let (mut reward, placement) = RewardModel::load(
        &mut model,
        &args.model.model_name_or_path,
        &p.reward_model_name_or_path,
        p.reward_base_model_name_or_path.as_deref(),
        p.template_name.as_deref(),
    )?;
    reward.batch_size = p.forward_batch_size;
    tracing::info!(reward_model = %placement.describe(), "reward model ready");

    let mut gen = greedy_config(&tokenizer, &format, p.max_target_length)?;
    gen.do_sample = true;
    gen.temperature = p.temperature;
    gen.top_k = p.top_k;
    gen.top_p = p.top_p;
    gen.repetition_penalty = p.repetition_penalty;
    let greedy = greedy_config(&tokenizer, &format, p.max_target_length)?;
    let ctx = Ctx {
        prompts: &train,
        tokenizer: &tokenizer,
        gen,
        pad_id,
        forward_batch: p.forward_batch_size,
        batch_size: p.batch_size,
        rollouts_per_step: rollouts_per_step as u64,
        seed: p.seed,
    };
    let qa_items = p
        .eval_qa_file
        .as_deref()
        .map(super::qa_eval::read_qa_file)
        .transpose()?;
    let qa = qa_items.as_deref().map(|q| (q, &format));

    let mut state = PpoState {
        kl: KlController {
            value: p.init_kl_coef,
            adaptive: p.adap_kl_ctrl.then_some((p.target, p.horizon)),
        },
        score_moments: RunningMoments::default(),
    };
    let shaping = ScoreShaping {
        baseline: p.reward_baseline,
        scaling: p.use_score_scaling,
        norm: p.use_score_norm,
        clip: p.score_clip,
    };
    let out_dir = &p.output_dir;
    let resume_dir = p
        .resume_from_checkpoint
        .as_ref()
        .map(|a| checkpoint::resolve(a, out_dir))
        .transpose()?;
    if let (true, Some(x)) = (rollout_only, exchange.as_mut()) {
        let resumed_at = match &resume_dir {
            Some(d) => checkpoint::load_state(d)?.global_step,
            None => 0,
        };
        let save_steps = p.save_steps;
        let checkpoint_steps = |upto: u64| -> Vec<u64> {
            (resumed_at + 1..=upto.min(total_steps))
                .filter(|&s| save_steps > 0 && (s % save_steps == 0 || s == total_steps))
                .collect()
        };
        let steps = serve_rollouts(
            &mut model,
            &mut reward,
            &ctx,
            x.as_mut(),
            hooks,
            checkpoint_steps,
        )?;
        return Ok(PpoResult {
            steps,
            finished: true,
            initial_eval: None,
            eval: None,
            results: serde_json::Value::Null,
        });
    }
    // Trainers only: a rollout worker keeps no optimizer state.
    let mut opt = Optimizer::new(
        &model,
        OptimConfig {
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: p.max_grad_norm.unwrap_or(0.0) as f32,
        },
    )?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut metrics = if is_main {
        Some(Metrics::open(&out_dir.join("metrics.jsonl"))?)
    } else {
        None
    };
    let mut start_step = 0;
    if let Some(dir) = &resume_dir {
        let saved: PpoTrainerState = checkpoint::load_state_as(dir)?;
        let (t, m, v) = checkpoint::load(dir)?;
        if t.train_len != model.layout.train_len
            || t.seed != p.seed
            || saved.rollouts_per_step != rollouts_per_step as u64
        {
            bail!(
                "{}: the checkpoint was made with {} trainable values, seed {} and {} rollouts per iteration; this run has {}, {} and {}",
                dir.display(),
                t.train_len,
                t.seed,
                saved.rollouts_per_step,
                model.layout.train_len,
                p.seed,
                rollouts_per_step
            );
        }
        super::load_checkpoint_weights(&mut model, dir)?;
        model.load_value_head(dir)?;
        opt.restore(&model, &m, &v, saved.optimizer_steps)?;
        state = saved.ppo.clone();
        start_step = t.global_step;
        if let Some(m) = metrics.as_mut() {
            m.truncate_after(start_step)?;
        }
        tracing::info!(checkpoint = %dir.display(), step = start_step, "resumed");
    }

    // Every trainer evaluates its part of the held-out prompts.
    let initial_eval = if resume_dir.is_none() && (!valid.is_empty() || qa.is_some()) {
        evaluate(
            &mut model,
            collective,
            &mut reward,
            &ctx,
            &valid,
            &greedy,
            qa,
            "before PPO",
        )?
    } else {
        None
    };

    let progress = Progress::new(total_steps, start_step, is_main);
    let mut step = start_step;
    while step < total_steps {
        hooks.check_continue()?;
        let t_roll = Instant::now();
        let mut shares = Vec::with_capacity(my_shares.len());
        let mut policy_bytes = 0;
        match exchange.as_mut() {
            None => {
                for &s in &my_shares {
                    shares.push((
                        s,
                        rollouts_of_share(&mut model, &mut reward, &ctx, step, s)?,
                    ));
                }
            }
            Some(x) => {
                // Ship the policy (trainable values only), then take this
                // trainer's shares back from the rollout workers.
                if is_main {
                    let n = model.layout.train_len;
                    let values = model.be.download(model.be.view(&model.train, 0..n))?;
                    policy_bytes = x.publish_policy(step, n_shares, &values)?;
                }
                for &s in &my_shares {
                    let (sampled, _) = x.fetch(RolloutTask {
                        iteration: step,
                        share: s,
                    })?;
                    let mut rs = received_share(&ctx, step, s, sampled)?;
                    annotate(&mut model, &ctx, &mut rs)?;
                    shares.push((s, rs));
                }
            }
        }
        let rollout_secs = t_roll.elapsed().as_secs_f64();
        // Score shaping and advantages over all shares of all ranks.
        shape_scores(
            &model,
            collective,
            &mut shares,
            n_shares,
            &shaping,
            &mut state.score_moments,
        )?;
        compute_advantages(
            &model,
            collective,
            &mut shares,
            n_shares,
            &cfg,
            state.kl.value,
        )?;
        let local: Vec<(usize, [f64; SUMS])> =
            shares.iter().map(|(s, r)| (*s, rollout_sums(r))).collect();
        let sums = crate::rl::shares::sum(&model, collective, n_shares, &local)?;
        let t_upd = Instant::now();
        let upd = update(
            &mut model, &mut opt, collective, &cfg, &shares, n_shares, pad_id, step,
        )?;
        let update_secs = t_upd.elapsed().as_secs_f64();
        // The controller sees the mean sequence KL of the batch (TRL: batch_size × processes).
        let mean_kl = sums[3] / sums[0].max(1.0);
        let kl_coef = state.kl.value;
        state.kl.update(mean_kl, rollouts_per_step);
        step += 1;
        let record = step_record(
            step,
            &sums,
            &upd,
            kl_coef,
            p.vf_coef,
            rollout_secs,
            update_secs,
        );
        let mut record = record;
        if exchange.is_some() {
            record["sync/policy_bytes"] = json!(policy_bytes);
        }
        let reward_mean = record["env/reward_mean"].as_f64().unwrap_or(f64::NAN);
        let tps = record["time/rollout_tokens_per_sec"]
            .as_f64()
            .unwrap_or(0.0);
        progress.update(step, upd.mean().policy_loss, p.learning_rate, tps);
        if is_main && p.logging_steps > 0 && step % p.logging_steps == 0 {
            if let Some(m) = metrics.as_mut() {
                m.write(&record)?;
            }
            tracing::info!(
                step,
                reward = reward_mean,
                kl = mean_kl,
                kl_coef,
                policy_loss = upd.mean().policy_loss,
                value_loss = upd.mean().value_loss,
                "ppo"
            );
            hooks.on_log(&LogRecord {
                step,
                total_steps,
                loss: upd.mean().policy_loss + p.vf_coef as f64 * upd.mean().value_loss,
                learning_rate: p.learning_rate,
                grad_norm: f64::NAN,
                tokens_per_sec: tps,
                eval_loss: None,
            })?;
        }
        if p.save_steps > 0 && (step % p.save_steps == 0 || step == total_steps) {
            if is_main {
                let st = PpoTrainerState {
                    trainer: TrainerState {
                        global_step: step,
                        total_steps,
                        steps_per_epoch: total_steps,
                        seed: p.seed,
                        train_len: model.layout.train_len,
                        loss_scaler: None,
                    },
                    ppo: state.clone(),
                    prompt_position: step * rollouts_per_step as u64,
                    rollouts_per_step: rollouts_per_step as u64,
                    optimizer_steps: opt.step,
                };
                let (m, v) = opt.moments(&model)?;
                let model_ref = &model;
                let dir = checkpoint::save(out_dir, step, &st, m, v, |d| {
                    save_policy(model_ref, d, &args.model.model_name_or_path, &tokenizer_dir)
                })?;
                hooks.on_checkpoint(step, Some(&dir))?;
                if let Some(limit) = p.save_total_limit {
                    checkpoint::prune(out_dir, limit, hooks.protected_checkpoint())?;
                }
            } else {
                hooks.on_checkpoint(step, None)?;
            }
        }
        if p.stop_after_steps.is_some_and(|n| step - start_step >= n) && step < total_steps {
            progress.finish();
            tracing::warn!(step, "stopping early as asked (stop_after_steps)");
            if let (true, Some(x)) = (is_main, exchange.as_mut()) {
                x.finish()?;
            }
            return Ok(PpoResult {
                steps: step,
                finished: false,
                initial_eval,
                eval: None,
                results: serde_json::Value::Null,
            });
        }
    }
    progress.finish();
    if let (true, Some(x)) = (is_main, exchange.as_mut()) {
        x.finish()?;
    }
    let eval = if !valid.is_empty() || qa.is_some() {
        evaluate(
            &mut model,
            collective,
            &mut reward,
            &ctx,
            &valid,
            &greedy,
            qa,
            "after PPO",
        )?
    } else {
        None
    };
    let mut result = PpoResult {
        steps: step,
        finished: true,
        initial_eval,
        eval,
        results: serde_json::Value::Null,
    };
    if !is_main {
        return Ok(result);
    }
    save_policy(
        &model,
        out_dir,
        &args.model.model_name_or_path,
        &tokenizer_dir,
    )?;
    let results = json!({
        "global_step": step,
        "train_prompts": train.len(),
        "eval_prompts": valid.len(),
        "filtered_too_long": too_long_train + too_long_valid,
        "rollouts_per_step": rollouts_per_step,
        "reward_model": placement.describe(),
        "kl_coef": state.kl.value,
        "template": format.name(),
        "split": exchange.is_some().then(|| json!({
            "trainers": world,
            "rollout_workers": p.rollout_workers,
            "policy_bytes_per_sync": model.layout.train_len * 4,
            "base_values_not_shipped": model.layout.frozen_len,
        })),
        "initial_eval": result.initial_eval,
        "eval": result.eval,
    });
    write_json_atomic(&out_dir.join("all_results.json"), &results)?;
    result.results = results;
    Ok(result)
}

/// Sums over this rank's rollouts: [n, Σ score, Σ score², Σ sequence KL,
/// Σ entropy, response tokens, Σ raw score, Σ (R − V), Σ (R − V)², Σ R, Σ R²]
/// (R, V: returns and values per token, for the explained variance).
const SUMS: usize = 11;
fn rollout_sums(rollouts: &[Rollout]) -> [f64; SUMS] {
    let mut s = [0f64; SUMS];
    for r in rollouts {
        s[0] += 1.0;
        s[1] += r.score as f64;
        s[2] += (r.score as f64).powi(2);
        s[3] += r
            .logp
            .iter()
            .zip(&r.ref_logp)
            .map(|(&a, &b)| (a - b) as f64)
            .sum::<f64>();
        s[4] += r.entropy.iter().map(|&e| e as f64).sum::<f64>();
        s[5] += r.response.len() as f64;
        s[6] += r.raw_score as f64;
        for (&ret, &v) in r.returns.iter().zip(&r.values) {
            let d = (ret - v) as f64;
            s[7] += d;
            s[8] += d * d;
            s[9] += ret as f64;
            s[10] += (ret as f64).powi(2);
        }
    }
    s
}

/// The policy's outputs: the PEFT adapter, the value head, the tokenizer.
fn save_policy<B: Backend>(
    model: &Llama<B>,
    dir: &Path,
    base: &Path,
    tokenizer_dir: &Path,
) -> Result<()> {
    super::save_weights(model, dir, base, tokenizer_dir)?;
    model.save_value_head(dir)
}
