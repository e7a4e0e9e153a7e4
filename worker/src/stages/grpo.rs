//! `rlhf grpo`: Group Relative Policy Optimization (MedicalGPT's
//! `grpo_training.py` on TRL 0.29's `GRPOTrainer`, same argument names and
//! defaults; the math is in `rl::grpo`).
//!
//! Each step: the step's prompts (a seeded order over the training prompts)
//! each get `num_generations` sampled completions (KV-cache generation,
//! seeded per rollout key), scored by rule rewards (`accuracy`, `format`)
//! and/or a reward model; group-normalised advantages; an optional reference
//! (the base with the LoRA adapter off, only when beta > 0); then
//! `num_iterations` optimizer steps on the clipped surrogate + β·k3, with one
//! gradient all-reduce each.
//!
//! Batch sizes follow TRL: `per_device_train_batch_size` counts completions,
//! so a step has workers × per_device_train_batch_size ×
//! gradient_accumulation_steps completions (the coordinator's global batch)
//! and that / num_generations prompts. Ranks hold whole groups.
//!
//! A checkpoint holds the trainable weights, the AdamW moments and the step,
//! which fixes the prompt position and every seed: a resumed run repeats what
//! an uninterrupted one does.
//!
//! Differences from TRL, on purpose: prompts longer than max_prompt_length
//! tokens are left out (counted), not cut from the left (that would cut off
//! the system prompt); a step is one generation round, i.e. num_iterations
//! optimizer steps (with num_iterations > 1, max_steps counts optimizer steps
//! and is rounded up to whole rounds).

use super::args::{parse_bool, Device, ModelArgs, RunFlags};
use super::qa_eval::{greedy_config, QaAccuracy};
use crate::collective::Collective;
use crate::data::pretrain::split_train_validation;
use crate::data::template::ChatFormat;
use crate::fsutil::write_json_atomic;
use crate::model::generate::GenerationConfig;
use crate::model::params::Head;
use crate::model::{Llama, TrainMode};
use crate::rl::grpo::{
    advantages, frac_zero_std, optimizer_step, GrpoUpdate, LossType, ScaleRewards, Scored,
};
use crate::rl::grpo_data::read_grpo_prompts;
use crate::rl::prompts::{prompt_at, tokenise_prompts, TokenisedPrompt};
use crate::rl::reward::RewardModel;
use crate::rl::rollout::{response_outputs, sample_responses, Rollout};
use crate::rl::rule_rewards::RuleReward;
use crate::tokenizer::Tokenizer;
use crate::train::checkpoint::{self, TrainerState};
use crate::train::metrics::{Metrics, Progress};
use crate::train::optim::{OptimConfig, Optimizer};
use crate::train::schedule::{Schedule, ScheduleKind};
use crate::train::{LogRecord, TrainHooks};
use anyhow::{bail, Context, Result};
use clap::Args;
use rlhf_kernels::{Backend, Precision};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// MedicalGPT's GRPO `ScriptArguments` and TRL 0.29's `GRPOConfig`, same
/// names and defaults (LoRA flags: the shared ModelArgs, plus TRL's names).
#[derive(Args, Clone, Debug)]
pub struct GrpoFlags {
    /// Folder (or file) of {"question", "answer"} JSON lines, or SFT-format files.
    #[arg(long = "train_file_dir")]
    pub train_file_dir: PathBuf,
    /// Held-out prompts, evaluated before and after training.
    #[arg(long = "validation_file_dir")]
    pub validation_file_dir: Option<PathBuf>,
    /// Without validation_file_dir: the first N% of the prompts are held out
    /// (MedicalGPT: a 10% test split).
    #[arg(long = "validation_split_percentage", default_value_t = 10)]
    pub validation_split_percentage: u32,
    /// Use only the first N training prompts (MedicalGPT's train_samples; -1: all).
    #[arg(long = "train_samples", default_value_t = -1, allow_negative_numbers = true)]
    pub train_samples: i64,
    #[arg(long = "max_eval_samples")]
    pub max_eval_samples: Option<usize>,
    /// Put before every question (MedicalGPT: its R1 prompt asking for
    /// <think>…</think><answer>…</answer>); SFT data's own system turn wins.
    #[arg(long = "system_prompt")]
    pub system_prompt: Option<String>,
    /// Chat template (a MedicalGPT template name); default: the tokenizer's chat_template.
    #[arg(long = "template_name")]
    pub template_name: Option<String>,
    /// Prompts longer than this many tokens are left out (counted).
    #[arg(long = "max_prompt_length", default_value_t = 512)]
    pub max_prompt_length: usize,
    #[arg(long = "max_completion_length", default_value_t = 256)]
    pub max_completion_length: usize,
    /// G: completions per prompt.
    #[arg(long = "num_generations", default_value_t = 8)]
    pub num_generations: usize,
    /// Completions per device per micro-batch (TRL counts completions, not prompts).
    #[arg(long = "per_device_train_batch_size", default_value_t = 8)]
    pub per_device_train_batch_size: usize,
    #[arg(long = "gradient_accumulation_steps", default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    /// Optimizer steps per generated batch (μ).
    #[arg(long = "num_iterations", default_value_t = 1)]
    pub num_iterations: usize,
    /// KL coefficient (TRL 0.29: 0, no reference model).
    #[arg(long = "beta", default_value_t = 0.0)]
    pub beta: f32,
    #[arg(long = "epsilon", default_value_t = 0.2)]
    pub epsilon: f32,
    /// dapo, grpo or dr_grpo.
    #[arg(long = "loss_type", default_value = "dapo")]
    pub loss_type: LossType,
    /// group, batch or none.
    #[arg(long = "scale_rewards", default_value = "group")]
    pub scale_rewards: ScaleRewards,
    /// Rule rewards: accuracy (the reference's final answer in the completion), format (R1 tags).
    #[arg(long = "reward_funcs", num_args = 1.., value_delimiter = ',', default_values = ["accuracy", "format"])]
    pub reward_funcs: Vec<RuleReward>,
    /// A reward model as one more reward function: the rm stage's output or a
    /// `*ForSequenceClassification` dir.
    #[arg(long = "reward_model_name_or_path")]
    pub reward_model_name_or_path: Option<PathBuf>,
    #[arg(long = "reward_base_model_name_or_path")]
    pub reward_base_model_name_or_path: Option<PathBuf>,
    /// One weight per reward function (rules in order, then the reward model); default 1 each.
    #[arg(long = "reward_weights", num_args = 1.., value_delimiter = ',', allow_negative_numbers = true)]
    pub reward_weights: Option<Vec<f32>>,
    #[arg(long = "temperature", default_value_t = 1.0)]
    pub temperature: f32,
    /// 0: no top-k cut.
    #[arg(long = "top_k", default_value_t = 0)]
    pub top_k: usize,
    #[arg(long = "top_p", default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long = "repetition_penalty", default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long = "learning_rate", default_value_t = 1e-6)]
    pub learning_rate: f64,
    /// linear, cosine, constant, constant_with_warmup or polynomial.
    #[arg(long = "lr_scheduler_type", default_value = "linear")]
    pub lr_scheduler_type: ScheduleKind,
    #[arg(long = "warmup_ratio", default_value_t = 0.0)]
    pub warmup_ratio: f64,
    #[arg(long = "warmup_steps", default_value_t = 0)]
    pub warmup_steps: u64,
    #[arg(long = "weight_decay", default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long = "adam_beta1", default_value_t = 0.9)]
    pub adam_beta1: f64,
    #[arg(long = "adam_beta2", default_value_t = 0.999)]
    pub adam_beta2: f64,
    #[arg(long = "adam_epsilon", default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    #[arg(long = "max_grad_norm", default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long = "num_train_epochs", default_value_t = 3.0)]
    pub num_train_epochs: f64,
    /// > 0 overrides num_train_epochs.
    #[arg(long = "max_steps", default_value_t = -1, allow_negative_numbers = true)]
    pub max_steps: i64,
    #[arg(long = "logging_steps", default_value_t = 10)]
    pub logging_steps: u64,
    #[arg(long = "save_steps", default_value_t = 500)]
    pub save_steps: u64,
    #[arg(long = "save_total_limit")]
    pub save_total_limit: Option<usize>,
    #[arg(long = "output_dir", default_value = "outputs-grpo")]
    pub output_dir: PathBuf,
    #[arg(long = "seed", default_value_t = 42)]
    pub seed: u64,
    /// Held-out questions with short answers (JSON lines {"question", "short"}):
    /// exact-answer accuracy of greedy replies before and after training.
    #[arg(long = "eval_qa_file")]
    pub eval_qa_file: Option<PathBuf>,
    #[arg(long = "skip_invalid", default_value = "false", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub skip_invalid: bool,
    /// TRL ModelConfig's names for the LoRA rank and modules (override --lora_rank, --target_modules).
    #[arg(long = "lora_r")]
    pub lora_r: Option<usize>,
    #[arg(long = "lora_target_modules", num_args = 1.., value_delimiter = ',')]
    pub lora_target_modules: Option<Vec<String>>,
    #[arg(long = "gradient_checkpointing", default_value = "false", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub gradient_checkpointing: bool,
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
    /// Stop after this many steps (a resumable interruption; for tests).
    #[arg(long = "stop_after_steps", hide = true)]
    pub stop_after_steps: Option<u64>,
    /// Accepted for compatibility with MedicalGPT's run_grpo.sh (no effect).
    #[arg(long = "use_vllm", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub use_vllm: Option<bool>,
    #[arg(long = "report_to", hide = true)]
    pub report_to: Option<String>,
    #[arg(long = "do_train", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub do_train: Option<bool>,
}

#[derive(Args, Clone, Debug)]
pub struct GrpoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub grpo: GrpoFlags,
}

impl GrpoArgs {
    pub fn run_flags(&self) -> RunFlags<'_> {
        RunFlags {
            device: self.grpo.device,
            bf16: self.grpo.bf16,
            fp16: self.grpo.fp16,
            output_dir: &self.grpo.output_dir,
            resume_from_checkpoint: self.grpo.resume_from_checkpoint.as_deref(),
        }
    }

    /// The model flags with TRL's LoRA names applied.
    fn model_args(&self) -> ModelArgs {
        let mut m = self.model.clone();
        if let Some(r) = self.grpo.lora_r {
            m.lora_rank = r;
        }
        if let Some(t) = &self.grpo.lora_target_modules {
            m.target_modules = t.join(",");
        }
        m
    }
}

/// trainer_state.json of a GRPO checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GrpoTrainerState {
    #[serde(flatten)]
    pub trainer: TrainerState,
    /// Completions per step over all workers.
    pub rollouts_per_step: u64,
    pub num_generations: u64,
    /// AdamW steps taken (num_iterations per step).
    pub optimizer_steps: u64,
}

/// Greedy completions of held-out prompts, scored by the reward functions.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GrpoEval {
    /// Mean weighted total reward.
    pub reward: f64,
    /// Mean reward per function.
    pub rewards: BTreeMap<String, f64>,
    /// Mean completion length, in tokens.
    pub completion_length: f64,
    pub prompts: usize,
    /// Exact-answer accuracy (with --eval_qa_file).
    pub qa: Option<QaAccuracy>,
}

/// What `rlhf grpo` reports (also written to output_dir/all_results.json).
#[derive(Clone, Debug)]
pub struct GrpoResult {
    pub steps: u64,
    pub finished: bool,
    pub initial_eval: Option<GrpoEval>,
    pub eval: Option<GrpoEval>,
    /// all_results.json as written (rank 0; Null on other ranks).
    pub results: serde_json::Value,
}

/// The reward functions: rules, then the reward model, each with a weight.
struct Rewarder<B: Backend> {
    rules: Vec<RuleReward>,
    model: Option<RewardModel<B>>,
    weights: Vec<f32>,
}

impl<B: Backend> Rewarder<B> {
    fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.rules.iter().map(|r| r.name().to_string()).collect();
        if self.model.is_some() {
            n.push("reward_model".into());
        }
        n
    }

    /// Rewards per function: [F][rollouts].
    fn score(
        &mut self,
        policy: &mut Llama<B>,
        prompts: &[TokenisedPrompt],
        rollouts: &[Rollout],
    ) -> Result<Vec<Vec<f32>>> {
        let mut out: Vec<Vec<f32>> = self
            .rules
            .iter()
            .map(|rule| {
                rollouts
                    .iter()
                    .map(|r| {
                        let reference = prompts[r.prompt].prompt.reference.as_deref();
                        rule.reward(&r.response_text, reference)
                    })
                    .collect()
            })
            .collect();
        if let Some(rm) = self.model.as_mut() {
            out.push(rm.score_rollouts(policy, prompts, rollouts)?);
        }
        Ok(out)
    }

    /// Σ_f w_f · r_f per rollout.
    fn total(&self, per_func: &[Vec<f32>], n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                per_func
                    .iter()
                    .zip(&self.weights)
                    .map(|(r, w)| w * r[i])
                    .sum()
            })
            .collect()
    }
}

/// Sum a vector over ranks (each rank fills its own slots, zeros elsewhere).
fn gather_by_sum<B: Backend>(
    model: &Llama<B>,
    collective: &mut dyn Collective<B>,
    values: Vec<f32>,
) -> Result<Vec<f32>> {
    if collective.world_size() == 1 || values.is_empty() {
        return Ok(values);
    }
    let n = values.len();
    let mut buf = model.be.upload(&values, Precision::F32)?;
    collective.all_reduce_sum(&model.be, &mut buf, 0..n)?;
    Ok(model.be.download(model.be.view(&buf, 0..n))?)
}

fn mean(xs: &[f32]) -> f64 {
    xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len().max(1) as f64
}

/// Unbiased standard deviation (torch.std).
fn std(xs: &[f32]) -> f64 {
    let m = mean(xs);
    let ss: f64 = xs.iter().map(|&x| (x as f64 - m).powi(2)).sum();
    if xs.len() > 1 {
        (ss / (xs.len() - 1) as f64).sqrt()
    } else {
        0.0
    }
}

/// Greedy completions of every held-out prompt, scored: chunk c of the
/// prompts on rank c mod world, the sums added over the ranks in chunk order.
#[allow(clippy::too_many_arguments)]
fn evaluate<B: Backend>(
    model: &mut Llama<B>,
    collective: &mut dyn Collective<B>,
    rewarder: &mut Rewarder<B>,
    tokenizer: &Tokenizer,
    eval: &[TokenisedPrompt],
    greedy: &GenerationConfig,
    qa: Option<(&[crate::demo::FactQuestion], &ChatFormat)>,
    label: &str,
) -> Result<Option<GrpoEval>> {
    // [total reward, completion tokens, one sum per reward function].
    const SUMS: usize = 8;
    let (rank, world) = (collective.rank(), collective.world_size());
    let mut out = GrpoEval {
        prompts: eval.len(),
        ..Default::default()
    };
    let names = rewarder.names();
    if names.len() > SUMS - 2 {
        bail!("at most {} reward functions", SUMS - 2);
    }
    if !eval.is_empty() {
        const CHUNK: usize = 16;
        let mut local: Vec<(usize, [f64; SUMS])> = Vec::new();
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
            // Rollout prompts index the chunk.
            let done = sample_responses(model, tokenizer, &queries, &keys, greedy, 0)?;
            let scores = rewarder.score(model, chunk, &done)?;
            let mut sums = [0f64; SUMS];
            sums[0] = rewarder
                .total(&scores, done.len())
                .iter()
                .map(|&x| x as f64)
                .sum::<f64>();
            sums[1] = done.iter().map(|r| r.response.len() as f64).sum::<f64>();
            for (acc, s) in sums[2..].iter_mut().zip(&scores) {
                *acc = s.iter().map(|&x| x as f64).sum::<f64>();
            }
            local.push((c, sums));
        }
        let sums = crate::rl::shares::sum(model, collective, eval.len().div_ceil(CHUNK), &local)?;
        let n = eval.len() as f64;
        out.reward = sums[0] / n;
        out.completion_length = sums[1] / n;
        out.rewards = names
            .into_iter()
            .zip(sums[2..].iter().map(|s| s / n))
            .collect();
    }
    if let Some((items, format)) = qa {
        let cfg = super::qa_eval::qa_greedy_config(tokenizer, format)?;
        out.qa = Some(super::qa_eval::answer_accuracy_dist(
            model, collective, tokenizer, format, items, &cfg,
        )?);
    }
    if rank != 0 {
        return Ok(None);
    }
    tracing::info!(reward = out.reward, accuracy = ?out.qa.as_ref().map(|q| q.accuracy), "{label}");
    Ok(Some(out))
}

/// One step's statistics as logged (TRL's names).
struct StepLog {
    reward: f64,
    record: serde_json::Value,
}

/// Metrics of a step from the batch's (global) rewards and lengths.
#[allow(clippy::too_many_arguments)]
fn step_log(
    step: u64,
    names: &[String],
    per_func: &[Vec<f32>],
    total: &[f32],
    lengths: &[f32],
    truncated: &[f32],
    group: usize,
    upd: &[crate::rl::grpo::UpdateStats],
    beta: f32,
    lr: f64,
    rollout_secs: f64,
    update_secs: f64,
) -> StepLog {
    let reward = mean(total);
    let group_std = total.chunks(group).map(std).sum::<f64>() / (total.len() / group).max(1) as f64;
    let last = upd.last().copied().unwrap_or_default();
    let n_upd = upd.len().max(1) as f64;
    let tokens: f64 = lengths.iter().map(|&x| x as f64).sum();
    let mut record = json!({
        "step": step,
        "loss": upd.iter().map(|u| u.loss).sum::<f64>() / n_upd,
        "grad_norm": last.grad_norm.unwrap_or(f64::NAN),
        "learning_rate": lr,
        "reward": reward,
        "reward_std": group_std,
        "frac_reward_zero_std": frac_zero_std(total, group),
        "clip_ratio/region_mean": upd.iter().map(|u| u.clip_ratio).sum::<f64>() / n_upd,
        "completions/mean_length": mean(lengths),
        "completions/min_length": lengths.iter().copied().fold(f32::INFINITY, f32::min),
        "completions/max_length": lengths.iter().copied().fold(0f32, f32::max),
        "completions/clipped_ratio": mean(truncated),
        "time/rollout_s": rollout_secs,
        "time/update_s": update_secs,
        "time/rollout_tokens_per_sec": tokens / rollout_secs.max(1e-9),
    });
    for (name, r) in names.iter().zip(per_func) {
        record[format!("rewards/{name}/mean")] = mean(r).into();
        record[format!("rewards/{name}/std")] = std(r).into();
    }
    if beta != 0.0 {
        record["kl"] = (upd.iter().map(|u| u.kl).sum::<f64>() / n_upd).into();
    }
    StepLog { reward, record }
}

/// One rank of the GRPO stage.
pub fn run_dist<B: Backend>(
    be: B,
    args: &GrpoArgs,
    collective: &mut dyn Collective<B>,
    global_batch: Option<usize>,
    hooks: &mut dyn TrainHooks,
) -> Result<GrpoResult> {
    let started = Instant::now();
    let p = &args.grpo;
    let model_args = args.model_args();
    let (rank, world) = (collective.rank(), collective.world_size());
    let is_main = rank == 0;
    let g = p.num_generations;
    if g < 2 {
        bail!("num_generations must be at least 2 (advantages compare the completions of a prompt), got {g}");
    }
    if p.per_device_train_batch_size == 0
        || p.gradient_accumulation_steps == 0
        || p.max_completion_length == 0
        || p.num_iterations == 0
    {
        bail!("per_device_train_batch_size, gradient_accumulation_steps, max_completion_length and num_iterations must be > 0");
    }
    if be.needs_loss_scaling() {
        bail!("GRPO in fp16 is not supported (no loss scaling here); use --bf16");
    }
    let rollouts_per_step = global_batch
        .unwrap_or(world * p.per_device_train_batch_size * p.gradient_accumulation_steps);
    #[allow(clippy::manual_is_multiple_of)]
    if rollouts_per_step % g != 0 {
        bail!(
            "the global batch of {rollouts_per_step} completions (workers × per_device_train_batch_size × gradient_accumulation_steps) is not a multiple of num_generations {g}"
        );
    }
    let prompts_per_step = rollouts_per_step / g;
    let my_groups: Vec<usize> = (rank..prompts_per_step).step_by(world).collect();

    // Tokenizer, chat format, pad (MedicalGPT: the EOS when there is no pad).
    let tokenizer_dir = model_args.tokenizer_dir();
    let tokenizer = Tokenizer::load(&tokenizer_dir)?;
    let format = ChatFormat::resolve(p.template_name.as_deref(), &tokenizer)?;
    let pad_id = tokenizer
        .pad_id()
        .or(tokenizer.eos_id())
        .or_else(|| tokenizer.token_to_id("<unk>"))
        .context("the tokenizer has no pad, eos or unk token to pad with")?;

    // Prompts.
    let system = p.system_prompt.as_deref();
    let train_read = read_grpo_prompts(&p.train_file_dir, system, p.skip_invalid)?;
    let mut skipped_invalid = train_read.skipped_invalid;
    let (mut train_p, mut valid_p) = match &p.validation_file_dir {
        Some(d) => {
            let v = read_grpo_prompts(d, system, p.skip_invalid)?;
            skipped_invalid += v.skipped_invalid;
            (train_read.prompts, v.prompts)
        }
        None => split_train_validation(train_read.prompts, p.validation_split_percentage)?,
    };
    if p.train_samples > 0 {
        train_p.truncate(p.train_samples as usize);
    }
    if let Some(m) = p.max_eval_samples.filter(|&m| m > 0) {
        valid_p.truncate(m);
    }
    let (train, too_long_train) =
        tokenise_prompts(train_p, &tokenizer, &format, p.max_prompt_length)?;
    let (valid, too_long_valid) =
        tokenise_prompts(valid_p, &tokenizer, &format, p.max_prompt_length)?;
    if too_long_train + too_long_valid > 0 {
        tracing::warn!(
            train = too_long_train,
            eval = too_long_valid,
            max_prompt_length = p.max_prompt_length,
            "prompts left out: longer than max_prompt_length tokens"
        );
    }
    if train.is_empty() {
        bail!("no training prompts left");
    }
    let total_steps = if p.max_steps > 0 {
        (p.max_steps as u64).div_ceil(p.num_iterations as u64)
    } else {
        (p.num_train_epochs * train.len() as f64 / prompts_per_step as f64).ceil() as u64
    }
    .max(1);

    // The policy; the reference is the base with the adapter off (only for beta > 0).
    let mode = model_args.train_mode()?;
    if p.beta != 0.0 {
        match &mode {
            TrainMode::Lora(l) if l.modules_to_save.is_empty() => {}
            TrainMode::Lora(_) => bail!("GRPO with beta > 0 and --modules_to_save is not supported: the reference (adapter off) would lose those modules"),
            TrainMode::Full => bail!("GRPO with beta > 0 needs LoRA (--use_peft true): the reference is the base with the adapter off; full fine-tuning runs with beta 0"),
        }
    }
    let mut model = crate::model::pretrained::load_model_with_head(
        be,
        &model_args.model_name_or_path,
        mode,
        Head::CausalLm,
        p.seed,
    )?;
    model.gradient_checkpointing = p.gradient_checkpointing;
    if let Some(dir) = &model_args.peft_path {
        model.load_adapter(dir)?;
        tracing::info!(adapter = %dir.display(), "continuing from adapter");
    }
    let reward_model = match &p.reward_model_name_or_path {
        Some(path) => {
            let (mut rm, placement) = RewardModel::load(
                &mut model,
                &model_args.model_name_or_path,
                path,
                p.reward_base_model_name_or_path.as_deref(),
                p.template_name.as_deref(),
            )?;
            rm.batch_size = p.per_device_train_batch_size;
            tracing::info!(reward_model = %placement.describe(), "reward model ready");
            Some((rm, placement))
        }
        None => None,
    };
    let placement = reward_model.as_ref().map(|(_, pl)| pl.describe());
    let n_funcs = p.reward_funcs.len() + reward_model.is_some() as usize;
    if n_funcs == 0 {
        bail!("no reward: give --reward_funcs and/or --reward_model_name_or_path");
    }
    let weights = match &p.reward_weights {
        Some(w) if w.len() != n_funcs => bail!(
            "--reward_weights has {} values for {n_funcs} reward functions ({:?}{})",
            w.len(),
            p.reward_funcs,
            if reward_model.is_some() {
                " + the reward model"
            } else {
                ""
            }
        ),
        Some(w) => w.clone(),
        None => vec![1.0; n_funcs],
    };
    let mut rewarder = Rewarder {
        rules: p.reward_funcs.clone(),
        model: reward_model.map(|(rm, _)| rm),
        weights,
    };
    let names = rewarder.names();

    let mut gen = greedy_config(&tokenizer, &format, p.max_completion_length)?;
    gen.do_sample = true;
    gen.temperature = p.temperature;
    gen.top_k = p.top_k;
    gen.top_p = p.top_p;
    gen.repetition_penalty = p.repetition_penalty;
    let greedy = greedy_config(&tokenizer, &format, p.max_completion_length)?;
    let qa_items = p
        .eval_qa_file
        .as_deref()
        .map(super::qa_eval::read_qa_file)
        .transpose()?;
    let qa = qa_items.as_deref().map(|q| (q, &format));

    let mut opt = Optimizer::new(
        &model,
        OptimConfig {
            weight_decay: p.weight_decay as f32,
            beta1: p.adam_beta1 as f32,
            beta2: p.adam_beta2 as f32,
            eps: p.adam_epsilon as f32,
            max_grad_norm: p.max_grad_norm as f32,
        },
    )?;
    let schedule = Schedule::new(
        p.lr_scheduler_type,
        p.learning_rate,
        total_steps * p.num_iterations as u64,
        p.warmup_steps,
        p.warmup_ratio,
    );
    let upd_cfg = GrpoUpdate {
        loss_type: p.loss_type,
        epsilon: p.epsilon,
        beta: p.beta,
        max_completion_length: p.max_completion_length,
        micro_batch: p.per_device_train_batch_size,
    };

    let out_dir = &p.output_dir;
    let resume_dir = p
        .resume_from_checkpoint
        .as_ref()
        .map(|a| checkpoint::resolve(a, out_dir))
        .transpose()?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut metrics = if is_main {
        Some(Metrics::open(&out_dir.join("metrics.jsonl"))?)
    } else {
        None
    };
    let mut start_step = 0;
    if let Some(dir) = &resume_dir {
        let saved: GrpoTrainerState = checkpoint::load_state_as(dir)?;
        let (t, m, v) = checkpoint::load(dir)?;
        let this = (
            model.layout.train_len,
            p.seed,
            rollouts_per_step as u64,
            g as u64,
        );
        let then = (
            t.train_len,
            t.seed,
            saved.rollouts_per_step,
            saved.num_generations,
        );
        if this != then {
            bail!(
                "{}: the checkpoint was made with (trainable values, seed, completions per step, num_generations) = {then:?}; this run has {this:?}",
                dir.display()
            );
        }
        super::load_checkpoint_weights(&mut model, dir)?;
        opt.restore(&model, &m, &v, saved.optimizer_steps)?;
        start_step = t.global_step;
        if let Some(m) = metrics.as_mut() {
            m.truncate_after(start_step)?;
        }
        tracing::info!(checkpoint = %dir.display(), step = start_step, "resumed");
    }

    let has_eval = !valid.is_empty() || qa.is_some();
    let initial_eval = if resume_dir.is_none() && has_eval {
        evaluate(
            &mut model,
            collective,
            &mut rewarder,
            &tokenizer,
            &valid,
            &greedy,
            qa,
            "before GRPO",
        )?
    } else {
        None
    };

    let progress = Progress::new(total_steps, start_step, is_main);
    let mut step = start_step;
    while step < total_steps {
        hooks.check_continue()?;
        let t_roll = Instant::now();
        // This rank's groups: G completions of one prompt each, keyed by
        // their position in the step.
        let first_key = step * rollouts_per_step as u64;
        let mut queries = Vec::new();
        let mut keys = Vec::new();
        for &grp in &my_groups {
            let prompt = prompt_at(
                train.len(),
                p.seed,
                step * prompts_per_step as u64 + grp as u64,
            );
            for j in 0..g {
                queries.push((prompt, train[prompt].ids.as_slice()));
                keys.push(first_key + (grp * g + j) as u64);
            }
        }
        let mut mine: Vec<Rollout> = Vec::with_capacity(keys.len());
        let chunk = (p.per_device_train_batch_size * p.gradient_accumulation_steps).max(g);
        for (q, k) in queries.chunks(chunk).zip(keys.chunks(chunk)) {
            mine.extend(sample_responses(
                &mut model, &tokenizer, q, k, &gen, p.seed,
            )?);
        }
        let scores = rewarder.score(&mut model, &train, &mine)?;
        // The whole batch's rewards, lengths and truncation flags on every
        // rank: [F + 2][rollouts_per_step], each rank filling its slots.
        let n = rollouts_per_step;
        let mut table = vec![0f32; (n_funcs + 2) * n];
        for (i, r) in mine.iter().enumerate() {
            let slot = (r.key - first_key) as usize;
            for (f, s) in scores.iter().enumerate() {
                table[f * n + slot] = s[i];
            }
            table[n_funcs * n + slot] = r.response.len() as f32;
            table[(n_funcs + 1) * n + slot] = (!r.finished) as u8 as f32;
        }
        let table = gather_by_sum(&model, collective, table)?;
        let per_func: Vec<Vec<f32>> = table.chunks(n).take(n_funcs).map(<[f32]>::to_vec).collect();
        let lengths = &table[n_funcs * n..(n_funcs + 1) * n];
        let truncated = &table[(n_funcs + 1) * n..];
        let total = rewarder.total(&per_func, n);
        let adv = advantages(&total, g, p.scale_rewards);
        let batch_tokens = lengths.iter().map(|&x| x as usize).sum::<usize>();
        if p.beta != 0.0 {
            let refs: Vec<&Rollout> = mine.iter().collect();
            model.set_adapter_enabled(false);
            let reference = response_outputs(
                &mut model,
                &refs,
                pad_id,
                p.per_device_train_batch_size,
                false,
            );
            model.set_adapter_enabled(true);
            for (r, lp) in mine.iter_mut().zip(reference?.logp) {
                r.ref_logp = lp;
            }
        }
        if p.num_iterations > 1 {
            // The sampling policy's log-probabilities, for the ratio of later iterations.
            let refs: Vec<&Rollout> = mine.iter().collect();
            let old = response_outputs(
                &mut model,
                &refs,
                pad_id,
                p.per_device_train_batch_size,
                false,
            )?;
            for (r, lp) in mine.iter_mut().zip(old.logp) {
                r.logp = lp;
            }
        }
        let rollout_secs = t_roll.elapsed().as_secs_f64();

        let t_upd = Instant::now();
        let scored: Vec<Scored<'_>> = mine
            .iter()
            .map(|r| Scored {
                rollout: r,
                advantage: adv[(r.key - first_key) as usize],
            })
            .collect();
        let mut upd = Vec::with_capacity(p.num_iterations);
        let mut lr = 0.0;
        for _ in 0..p.num_iterations {
            lr = schedule.lr(opt.step);
            let dropout_seed = p.seed ^ (opt.step + 1).wrapping_mul(0xA24B_AED4_963E_E407);
            let u = optimizer_step(
                &mut model,
                &mut opt,
                collective,
                &upd_cfg,
                &scored,
                n,
                batch_tokens,
                pad_id,
                lr,
                Some(dropout_seed),
            )?;
            if u.grad_norm.is_none() {
                bail!(
                    "the GRPO gradients became non-finite at step {}; lower the learning rate",
                    step + 1
                );
            }
            upd.push(u);
        }
        drop(scored);
        let update_secs = t_upd.elapsed().as_secs_f64();
        step += 1;
        let log = step_log(
            step,
            &names,
            &per_func,
            &total,
            lengths,
            truncated,
            g,
            &upd,
            p.beta,
            lr,
            rollout_secs,
            update_secs,
        );
        let loss = log.record["loss"].as_f64().unwrap_or(f64::NAN);
        let tps = log.record["time/rollout_tokens_per_sec"]
            .as_f64()
            .unwrap_or(0.0);
        progress.update(step, loss, lr, tps);
        if is_main && p.logging_steps > 0 && (step % p.logging_steps == 0 || step == total_steps) {
            if let Some(m) = metrics.as_mut() {
                m.write(&log.record)?;
            }
            tracing::info!(
                step,
                reward = log.reward,
                loss,
                zero_std = log.record["frac_reward_zero_std"].as_f64(),
                length = log.record["completions/mean_length"].as_f64(),
                "grpo"
            );
            hooks.on_log(&LogRecord {
                step,
                total_steps,
                loss,
                learning_rate: lr,
                grad_norm: upd.last().and_then(|u| u.grad_norm).unwrap_or(f64::NAN),
                tokens_per_sec: tps,
                eval_loss: None,
            })?;
        }
        if p.save_steps > 0 && (step % p.save_steps == 0 || step == total_steps) {
            if is_main {
                let st = GrpoTrainerState {
                    trainer: TrainerState {
                        global_step: step,
                        total_steps,
                        steps_per_epoch: (train.len() as u64).div_ceil(prompts_per_step as u64),
                        seed: p.seed,
                        train_len: model.layout.train_len,
                        loss_scaler: None,
                    },
                    rollouts_per_step: rollouts_per_step as u64,
                    num_generations: g as u64,
                    optimizer_steps: opt.step,
                };
                let (m, v) = opt.moments(&model)?;
                let model_ref = &model;
                let dir = checkpoint::save(out_dir, step, &st, m, v, |d| {
                    super::save_weights(
                        model_ref,
                        d,
                        &model_args.model_name_or_path,
                        &tokenizer_dir,
                    )
                })?;
                hooks.on_checkpoint(step, Some(&dir))?;
                if let Some(limit) = p.save_total_limit {
                    checkpoint::prune(out_dir, limit, hooks.protected_checkpoint())?;
                }
            } else {
                hooks.on_checkpoint(step, None)?;
            }
        }
        if p.stop_after_steps.is_some_and(|k| step - start_step >= k) && step < total_steps {
            progress.finish();
            tracing::warn!(step, "stopping early as asked (stop_after_steps)");
            return Ok(GrpoResult {
                steps: step,
                finished: false,
                initial_eval,
                eval: None,
                results: serde_json::Value::Null,
            });
        }
    }
    progress.finish();
    let eval = if has_eval {
        evaluate(
            &mut model,
            collective,
            &mut rewarder,
            &tokenizer,
            &valid,
            &greedy,
            qa,
            "after GRPO",
        )?
    } else {
        None
    };
    let mut result = GrpoResult {
        steps: step,
        finished: true,
        initial_eval,
        eval,
        results: serde_json::Value::Null,
    };
    if !is_main {
        return Ok(result);
    }
    super::save_weights(
        &model,
        out_dir,
        &model_args.model_name_or_path,
        &tokenizer_dir,
    )?;
    let results = json!({
        "global_step": step,
        "optimizer_steps": opt.step,
        "train_prompts": train.len(),
        "eval_prompts": valid.len(),
        "filtered_too_long": too_long_train + too_long_valid,
        "skipped_invalid": skipped_invalid,
        "completions_per_step": rollouts_per_step,
        "prompts_per_step": prompts_per_step,
        "num_generations": g,
        "reward_funcs": names,
        "reward_model": placement,
        "loss_type": p.loss_type.name(),
        "beta": p.beta,
        "template": format.name(),
        "train_runtime_s": started.elapsed().as_secs_f64(),
        "initial_eval": result.initial_eval,
        "eval": result.eval,
    });
    write_json_atomic(&out_dir.join("all_results.json"), &results)?;
    result.results = results;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: GrpoArgs,
    }

    #[test]
    fn defaults_are_trl_0_29_s_and_run_grpo_sh_parses() {
        let c = Cli::try_parse_from(["grpo", "--model_name_or_path", "m", "--train_file_dir", "d"])
            .unwrap();
        let p = &c.a.grpo;
        assert_eq!(
            (
                p.num_generations,
                p.max_completion_length,
                p.beta,
                p.epsilon
            ),
            (8, 256, 0.0, 0.2)
        );
        assert_eq!(p.loss_type, LossType::Dapo);
        assert_eq!(p.scale_rewards, ScaleRewards::Group);
        assert_eq!(p.num_iterations, 1);
        assert_eq!(p.reward_funcs, [RuleReward::Accuracy, RuleReward::Format]);
        // MedicalGPT's run_grpo.sh flags.
        let c = Cli::try_parse_from([
            "grpo",
            "--model_name_or_path",
            "m",
            "--train_file_dir",
            "d",
            "--beta",
            "0.001",
            "--learning_rate",
            "5.0e-7",
            "--lr_scheduler_type",
            "cosine",
            "--warmup_ratio",
            "0.03",
            "--num_generations",
            "4",
            "--max_completion_length",
            "512",
            "--per_device_train_batch_size",
            "4",
            "--lora_r",
            "16",
            "--lora_alpha",
            "32",
            "--lora_dropout",
            "0.1",
            "--lora_target_modules",
            "q_proj",
            "k_proj",
            "v_proj",
            "--use_vllm",
            "False",
        ])
        .unwrap();
        let m = c.a.model_args();
        assert_eq!(
            (m.lora_rank, m.target_modules.as_str()),
            (16, "q_proj,k_proj,v_proj")
        );
        assert_eq!(c.a.grpo.lr_scheduler_type, ScheduleKind::Cosine);
        assert_eq!(c.a.grpo.beta, 0.001);
    }
}
