//! The training loop shared by the stages: deterministic epoch order,
//! gradient accumulation normalised over the whole optimizer step, clipping,
//! AdamW, schedules, logging, evaluation, checkpoints, resume. What is
//! minimised is an [`Objective`]: the causal-LM loss over token samples
//! ([`CausalLm`]), or another (the reward model's pairwise loss).

use super::checkpoint::{self, TrainerState};
use super::loss_scale::LossScaler;
use super::metrics::{Metrics, Progress};
use super::optim::{OptimConfig, Optimizer};
use super::schedule::{Schedule, ScheduleKind};
use crate::collective::{Collective, Single};
use crate::model::{Batch, Llama};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rlhf_kernels::{Backend, Precision};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One training example: token ids and their labels (-100 = not predicted).
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
}

impl Sample {
    /// Tokens this sample predicts (labels after the first that are not -100).
    pub fn predicted_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != -100).count()
    }

    /// A language-modelling sample: every token is a label.
    pub fn causal(ids: Vec<u32>) -> Self {
        let labels = ids.iter().map(|&x| x as i32).collect();
        Sample {
            input_ids: ids,
            labels,
        }
    }
}

/// Right-pad samples into one batch (pad = `pad_id`, label -100, mask 0);
/// rows keyed 0..b for dropout.
pub fn collate(samples: &[&Sample], pad_id: u32) -> Batch {
    let keys: Vec<u64> = (0..samples.len() as u64).collect();
    collate_keyed(samples, &keys, pad_id)
}

/// [`collate`] with each row's dropout key given (its sample's dataset index).
pub fn collate_keyed(samples: &[&Sample], keys: &[u64], pad_id: u32) -> Batch {
    let t = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
    let b = samples.len();
    let mut input_ids = vec![pad_id; b * t];
    let mut labels = vec![-100; b * t];
    let mut mask = vec![0u8; b * t];
    for (i, s) in samples.iter().enumerate() {
        let n = s.input_ids.len();
        input_ids[i * t..i * t + n].copy_from_slice(&s.input_ids);
        labels[i * t..i * t + n].copy_from_slice(&s.labels);
        mask[i * t..i * t + n].fill(1);
    }
    let padded = mask.contains(&0);
    Batch {
        b,
        t,
        input_ids,
        attention_mask: padded.then_some(mask),
        labels,
        sample_keys: keys.to_vec(),
    }
}

/// transformers' TrainingArguments that the trainer honours (same names, same defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainArgs {
    pub output_dir: PathBuf,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub num_train_epochs: f64,
    /// > 0 overrides num_train_epochs.
    pub max_steps: i64,
    pub lr_scheduler_type: ScheduleKind,
    pub warmup_ratio: f64,
    pub warmup_steps: u64,
    pub logging_steps: u64,
    /// Evaluate every N steps (None: only at the end).
    pub eval_steps: Option<u64>,
    pub save_steps: u64,
    pub save_total_limit: Option<usize>,
    pub seed: u64,
    pub resume_from_checkpoint: Option<String>,
    /// Stop after this many optimizer steps of this process (for tests of
    /// interruption); None runs to the end.
    pub stop_after_steps: Option<u64>,
    pub show_progress: bool,
}

impl Default for TrainArgs {
    fn default() -> Self {
        TrainArgs {
            output_dir: PathBuf::from("outputs"),
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 5e-5,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            num_train_epochs: 3.0,
            max_steps: -1,
            lr_scheduler_type: ScheduleKind::Linear,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            logging_steps: 500,
            eval_steps: None,
            save_steps: 500,
            save_total_limit: None,
            seed: 42,
            resume_from_checkpoint: None,
            stop_after_steps: None,
            show_progress: true,
        }
    }
}

/// What a finished run reports.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSummary<E = EvalResult> {
    pub global_step: u64,
    /// false when stopped early by `stop_after_steps`.
    pub finished: bool,
    pub train_loss: f64,
    pub eval: Option<E>,
    pub tokens_per_sec: f64,
}

/// An evaluation's result, as the trainer logs it.
pub trait EvalReport: Clone + std::fmt::Debug {
    /// The loss (for logs and the coordinator).
    fn loss(&self) -> f64;
    /// Its metrics.jsonl fields (an object; "step" is added).
    fn fields(&self) -> serde_json::Value;
}

impl EvalReport for EvalResult {
    fn loss(&self) -> f64 {
        self.loss
    }
    fn fields(&self) -> serde_json::Value {
        json!({"eval_loss": self.loss, "perplexity": self.perplexity, "eval_tokens": self.tokens})
    }
}

/// One micro-batch's forward/backward, as an [`Objective`] reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MicroStats {
    /// The un-normalised loss: summed over the micro-batch's units.
    pub loss_sum: f64,
    /// Token positions computed (rows × padded length), for throughput.
    pub tokens: usize,
}

/// What the trainer minimises over items of some kind. The loss of an
/// optimizer step is Σ loss / Σ weight over the step's items (on all ranks),
/// so accumulation and data parallelism give the mean over the whole step.
pub trait Objective<B: Backend> {
    type Item;
    type Eval: EvalReport;
    /// The item's share of the step's loss normaliser (predicted tokens for
    /// the causal LM, 1 per preference pair for the reward model).
    fn weight(&self, item: &Self::Item) -> usize;
    /// Forward + backward of one micro-batch: gradients of `grad_scale` ×
    /// the summed loss are ADDED into the model's gradients. `keys` are the
    /// items' dataset indices (LoRA dropout masks depend on them only).
    fn forward_backward(
        &self,
        model: &mut Llama<B>,
        items: &[&Self::Item],
        keys: &[u64],
        grad_scale: f32,
        dropout_seed: u64,
    ) -> Result<MicroStats>;
    /// Evaluate `items` across the ranks (rank r takes every world-th batch).
    fn evaluate(
        &self,
        model: &mut Llama<B>,
        items: &[Self::Item],
        batch_size: usize,
        collective: &mut dyn Collective<B>,
    ) -> Result<Self::Eval>;
    /// Training metrics beside the loss (DPO's rewards/chosen, ...): this
    /// rank's sums over its units since the last call, which resets them.
    /// The trainer sums them over ranks and logs each divided by the units
    /// (weights) of the logging window.
    fn take_train_sums(&self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }
}

/// Causal language modelling on token samples: the mean cross-entropy over
/// predicted tokens, rows right-padded with `pad_id`.
pub struct CausalLm {
    pub pad_id: u32,
}

impl<B: Backend> Objective<B> for CausalLm {
    type Item = Sample;
    type Eval = EvalResult;

    fn weight(&self, item: &Sample) -> usize {
        item.predicted_tokens()
    }

    fn forward_backward(
        &self,
        model: &mut Llama<B>,
        items: &[&Sample],
        keys: &[u64],
        grad_scale: f32,
        dropout_seed: u64,
    ) -> Result<MicroStats> {
        let batch = collate_keyed(items, keys, self.pad_id);
        let stats = model.forward_backward(&batch, grad_scale, Some(dropout_seed))?;
        Ok(MicroStats {
            loss_sum: stats.loss_sum,
            tokens: batch.b * batch.t,
        })
    }

    fn evaluate(
        &self,
        model: &mut Llama<B>,
        items: &[Sample],
        batch_size: usize,
        collective: &mut dyn Collective<B>,
    ) -> Result<EvalResult> {
        evaluate_sharded(model, items, batch_size, self.pad_id, collective)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalResult {
    pub loss: f64,
    pub perplexity: f64,
    /// Predicted tokens.
    pub tokens: usize,
}

/// Loss and perplexity over `samples` (token-weighted mean of the loss).
pub fn evaluate<B: Backend>(
    model: &mut Llama<B>,
    samples: &[Sample],
    batch_size: usize,
    pad_id: u32,
) -> Result<EvalResult> {
    evaluate_sharded(model, samples, batch_size, pad_id, &mut Single)
}

/// [`evaluate`] split across ranks: rank r takes every world-th batch, and the
/// loss sums and token counts are summed over ranks.
pub fn evaluate_sharded<B: Backend>(
    model: &mut Llama<B>,
    samples: &[Sample],
    batch_size: usize,
    pad_id: u32,
    collective: &mut dyn Collective<B>,
) -> Result<EvalResult> {
    let (rank, world) = (collective.rank(), collective.world_size());
    let mut loss_sum = 0.0;
    let mut tokens = 0;
    for chunk in samples.chunks(batch_size.max(1)).skip(rank).step_by(world) {
        let refs: Vec<&Sample> = chunk.iter().collect();
        let (stats, _) = model.forward(&collate(&refs, pad_id), false)?;
        loss_sum += stats.loss_sum;
        tokens += stats.tokens;
    }
    let [loss_sum, tokens] = sum_over_ranks(model, collective, [loss_sum, tokens as f64])?;
    let tokens = tokens as usize;
    if tokens == 0 {
        bail!("nothing to evaluate: no predicted tokens");
    }
    let loss = loss_sum / tokens as f64;
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens,
    })
}

/// Sum a few host scalars over ranks (f32 on the wire: for logging and counts
/// below 2^24 per rank).
pub fn sum_over_ranks<B: Backend, const N: usize>(
    model: &Llama<B>,
    collective: &mut dyn Collective<B>,
    values: [f64; N],
) -> Result<[f64; N]> {
    if collective.world_size() == 1 {
        return Ok(values);
    }
    let host: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    let mut buf = model.be.upload(&host, Precision::F32)?;
    collective.all_reduce_sum(&model.be, &mut buf, 0..N)?;
    let back = model.be.download(model.be.view(&buf, 0..N))?;
    let mut out = [0.0; N];
    for (o, b) in out.iter_mut().zip(back) {
        *o = b as f64;
    }
    Ok(out)
}

/// The micro-batches of one optimizer step that `rank` computes: positions
/// in the step's `n` samples, cut into `bs`-sized micro-batches, micro-batch j
/// going to rank j mod world (empty ones, at the end of an epoch, skipped).
fn rank_micro_batches(
    n: usize,
    bs: usize,
    micros_per_step: usize,
    rank: usize,
    world: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    (rank..micros_per_step)
        .step_by(world)
        .map(move |j| (j * bs).min(n)..((j + 1) * bs).min(n))
        .filter(|r| !r.is_empty())
}

/// The indices of each epoch's samples, shuffled from (seed, epoch).
fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng =
        rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    idx.shuffle(&mut rng);
    idx
}

/// What the data-parallel trainer needs besides the model and data: the
/// collective between ranks, the global batch, and hooks to the coordinator.
pub struct Dist<'a, B: Backend> {
    pub collective: &'a mut dyn Collective<B>,
    /// Samples per optimizer step across all ranks (None: world ×
    /// per-device batch × accumulation). The schedule and the result depend
    /// on it, not on the number of ranks.
    pub global_batch: Option<usize>,
    pub hooks: &'a mut dyn TrainHooks,
}

/// A logging step as the trainer reports it (rank 0).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogRecord {
    pub step: u64,
    pub total_steps: u64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens_per_sec: f64,
    pub eval_loss: Option<f64>,
}

/// Callbacks from the training loop (to the coordinator in a distributed run).
pub trait TrainHooks {
    /// Each logging step and evaluation (rank 0 only).
    fn on_log(&mut self, _record: &LogRecord) -> Result<()> {
        Ok(())
    }
    /// This rank reached a checkpoint step; `dir` is Some on the rank that wrote it.
    fn on_checkpoint(&mut self, _step: u64, _dir: Option<&Path>) -> Result<()> {
        Ok(())
    }
    /// A checkpoint that save_total_limit must not delete (the last committed one).
    fn protected_checkpoint(&self) -> Option<u64> {
        None
    }
    /// Checked before every step: Err stops the run (e.g. the stage was aborted).
    fn check_continue(&self) -> Result<()> {
        Ok(())
    }
    /// A PPO stage split into trainer and rollout workers: this rank's
    /// link to the others (taken once; None when every rank does both).
    fn take_rollout_exchange(&mut self) -> Option<Box<dyn crate::rl::exchange::RolloutExchange>> {
        None
    }
}

/// No coordinator: nothing to report.
pub struct NoHooks;
impl TrainHooks for NoHooks {}

/// Train `model` on `train`, evaluating on `eval`, in one process.
/// `save_weights(model, dir)` writes the stage's weights (adapter or model)
/// into a checkpoint dir.
pub fn train<B: Backend>(
    model: &mut Llama<B>,
    train: &[Sample],
    eval: &[Sample],
    pad_id: u32,
    args: &TrainArgs,
    save_weights: &dyn Fn(&Llama<B>, &Path) -> Result<()>,
) -> Result<TrainSummary> {
    let mut dist = Dist {
        collective: &mut Single,
        global_batch: None,
        hooks: &mut NoHooks,
    };
    train_dist(model, train, eval, pad_id, args, save_weights, &mut dist)
}

/// Data-parallel training. Every rank holds all samples; optimizer step s of
/// an epoch uses `global_batch` consecutive samples of the epoch's order, cut
/// into micro-batches of per_device_train_batch_size, micro-batch j going to
/// rank j mod world. Gradients are summed over ranks and normalised by the
/// tokens of the whole step, so 2 ranks × batch 2 compute what 1 rank × batch
/// 4 computes (up to the order of float additions). Rank 0 writes metrics,
/// checkpoints and outputs.
pub fn train_dist<B: Backend>(
    model: &mut Llama<B>,
    train: &[Sample],
    eval: &[Sample],
    pad_id: u32,
    args: &TrainArgs,
    save_weights: &dyn Fn(&Llama<B>, &Path) -> Result<()>,
    dist: &mut Dist<'_, B>,
) -> Result<TrainSummary> {
    train_objective(
        model,
        &CausalLm { pad_id },
        train,
        eval,
        args,
        save_weights,
        dist,
    )
}

/// [`train_dist`] for any [`Objective`]: the same order, accumulation,
/// schedule, optimizer, checkpoints and resume, whatever the items are.
pub fn train_objective<B: Backend, O: Objective<B>>(
    model: &mut Llama<B>,
    objective: &O,
    train: &[O::Item],
    eval: &[O::Item],
    args: &TrainArgs,
    save_weights: &dyn Fn(&Llama<B>, &Path) -> Result<()>,
    dist: &mut Dist<'_, B>,
) -> Result<TrainSummary<O::Eval>> {
    if train.is_empty() {
        bail!("no training samples");
    }
    let bs = args.per_device_train_batch_size.max(1);
    let (rank, world) = (dist.collective.rank(), dist.collective.world_size());
    let is_main = rank == 0;
    let global_batch = dist
        .global_batch
        .unwrap_or(world * bs * args.gradient_accumulation_steps.max(1))
        .max(1);
    let micros_per_step = global_batch.div_ceil(bs);
    let steps_per_epoch = train.len().div_ceil(global_batch) as u64;
    let total_steps = if args.max_steps > 0 {
        args.max_steps as u64
    } else {
        (args.num_train_epochs * steps_per_epoch as f64)
            .ceil()
            .max(1.0) as u64
    };
    let schedule = Schedule::new(
        args.lr_scheduler_type,
        args.learning_rate,
        total_steps,
        args.warmup_steps,
        args.warmup_ratio,
    );
    let mut opt = Optimizer::new(
        model,
        OptimConfig {
            weight_decay: args.weight_decay as f32,
            beta1: args.adam_beta1 as f32,
            beta2: args.adam_beta2 as f32,
            eps: args.adam_epsilon as f32,
            max_grad_norm: args.max_grad_norm as f32,
        },
    )?;
    // Find the checkpoint before creating anything, so a bad resume leaves no trace.
    let resume_dir = args
        .resume_from_checkpoint
        .as_ref()
        .map(|arg| checkpoint::resolve(arg, &args.output_dir))
        .transpose()?;
    std::fs::create_dir_all(&args.output_dir)
        .with_context(|| format!("creating {}", args.output_dir.display()))?;
    let mut metrics = if is_main {
        Some(Metrics::open(&args.output_dir.join("metrics.jsonl"))?)
    } else {
        None
    };

    let mut scaler = LossScaler::new(model.be.needs_loss_scaling());
    let mut start_step = 0;
    if let Some(dir) = resume_dir {
        let (state, m, v) = checkpoint::load(&dir)?;
        if state.train_len != model.layout.train_len {
            bail!(
                "{}: checkpoint has {} trainable values, this model {}",
                dir.display(),
                state.train_len,
                model.layout.train_len
            );
        }
        if state.steps_per_epoch != steps_per_epoch || state.seed != args.seed {
            bail!(
                "{}: checkpoint was made with {} steps per epoch and seed {}, this run has {} and {}: the data or batch settings changed",
                dir.display(),
                state.steps_per_epoch,
                state.seed,
                steps_per_epoch,
                args.seed
            );
        }
        crate::stages::load_checkpoint_weights(model, &dir)?;
        opt.restore(model, &m, &v, state.global_step)?;
        start_step = state.global_step;
        if let (true, Some(saved)) = (scaler.enabled, state.loss_scaler) {
            scaler = saved;
        }
        if let Some(m) = metrics.as_mut() {
            m.truncate_after(start_step)?;
        }
        tracing::info!(checkpoint = %dir.display(), step = start_step, "resumed");
    }

    let progress = Progress::new(total_steps, start_step, args.show_progress && is_main);
    let t0 = Instant::now();
    let mut tokens_seen = 0usize;
    let mut window_loss = 0.0;
    let mut window_steps = 0u64;
    let mut window_weight = 0usize;
    let mut total_loss = 0.0;
    let mut total_loss_steps = 0u64;
    let mut last_eval = None;
    let mut order_epoch = u64::MAX;
    let mut order = Vec::new();
    let mut step = start_step;
    while step < total_steps {
        let epoch = step / steps_per_epoch;
        if epoch != order_epoch {
            order = epoch_order(train.len(), args.seed, epoch);
            order_epoch = epoch;
        }
        let in_epoch = (step % steps_per_epoch) as usize;
        let step_samples =
            &order[in_epoch * global_batch..((in_epoch + 1) * global_batch).min(train.len())];
        let step_weight: usize = step_samples
            .iter()
            .map(|&i| objective.weight(&train[i]))
            .sum();
        if step_weight == 0 {
            bail!("optimizer step {step} has no tokens to predict");
        }
        dist.hooks.check_continue()?;
        model.zero_grads()?;
        let mut loss_sum = 0.0;
        let mut local_tokens = 0usize;
        // Dropout masks depend on (seed, step) and each sample's index only.
        let dropout_seed = args.seed ^ (step + 1).wrapping_mul(0xA24B_AED4_963E_E407);
        for range in rank_micro_batches(step_samples.len(), bs, micros_per_step, rank, world) {
            let idx = &step_samples[range];
            let refs: Vec<&O::Item> = idx.iter().map(|&i| &train[i]).collect();
            let keys: Vec<u64> = idx.iter().map(|&i| i as u64).collect();
            let stats = objective.forward_backward(
                model,
                &refs,
                &keys,
                scaler.scale / step_weight as f32,
                dropout_seed,
            )?;
            loss_sum += stats.loss_sum;
            local_tokens += stats.tokens;
        }
        if world > 1 {
            let n = model.layout.train_len;
            dist.collective
                .all_reduce_sum(&model.be, &mut model.grads, 0..n)?;
        }
        let [loss_sum, step_seen] =
            sum_over_ranks(model, dist.collective, [loss_sum, local_tokens as f64])?;
        tokens_seen += step_seen as usize;
        let lr = schedule.lr(step);
        let grad_norm = opt.step(model, lr, 1.0 / scaler.scale)?;
        if !scaler.update(grad_norm.is_some()) {
            if !scaler.enabled {
                bail!("the gradients became non-finite at step {}; lower the learning rate or check the data", step + 1);
            }
            tracing::warn!(
                step = step + 1,
                scale = scaler.scale,
                "fp16 gradients overflowed: step skipped, loss scale halved"
            );
        }
        let grad_norm = grad_norm.unwrap_or(f64::NAN);
        step += 1;
        let loss = loss_sum / step_weight as f64;
        if !loss.is_finite() {
            bail!("loss became {loss} at step {step}; lower the learning rate or check the data");
        }
        window_loss += loss;
        window_steps += 1;
        total_loss += loss;
        total_loss_steps += 1;
        let tps = tokens_seen as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        window_weight += step_weight;
        progress.update(step, loss, lr, tps);
        let log_now = args.logging_steps > 0 && step % args.logging_steps == 0;
        // Every rank takes part in summing the objective's own metrics.
        let extra = if log_now {
            window_means(model, objective, dist.collective, window_weight)?
        } else {
            Vec::new()
        };
        if is_main && log_now {
            let mean = window_loss / window_steps as f64;
            if let Some(m) = metrics.as_mut() {
                let mut line = json!({
                    "step": step, "epoch": step as f64 / steps_per_epoch as f64, "loss": mean,
                    "learning_rate": lr, "grad_norm": grad_norm, "tokens_per_sec": tps,
                });
                for (name, v) in &extra {
                    line[*name] = json!(v);
                }
                m.write(&line)?;
            }
            tracing::info!(
                step,
                loss = mean,
                lr,
                grad_norm,
                tokens_per_sec = tps,
                "train"
            );
            dist.hooks.on_log(&LogRecord {
                step,
                total_steps,
                loss: mean,
                learning_rate: lr,
                grad_norm,
                tokens_per_sec: tps,
                eval_loss: None,
            })?;
            window_loss = 0.0;
            window_steps = 0;
        }
        if log_now {
            window_weight = 0;
        }
        if !eval.is_empty()
            && args.eval_steps.is_some_and(|e| e > 0 && step % e == 0)
            && step < total_steps
        {
            let r = eval_and_log(model, objective, eval, args, dist, metrics.as_mut(), step)?;
            if is_main {
                dist.hooks.on_log(&LogRecord {
                    step,
                    total_steps,
                    loss: f64::NAN,
                    learning_rate: lr,
                    grad_norm,
                    tokens_per_sec: tps,
                    eval_loss: Some(r.loss()),
                })?;
            }
            last_eval = Some(r);
        }
        // As transformers' Trainer: every save_steps, and at the last step.
        if args.save_steps > 0 && (step % args.save_steps == 0 || step == total_steps) {
            if is_main {
                let state = TrainerState {
                    global_step: step,
                    total_steps,
                    steps_per_epoch,
                    seed: args.seed,
                    train_len: model.layout.train_len,
                    loss_scaler: scaler.enabled.then_some(scaler),
                };
                let (m, v) = opt.moments(model)?;
                let dir = checkpoint::save(&args.output_dir, step, &state, m, v, |d| {
                    save_weights(model, d)
                })?;
                tracing::info!(checkpoint = %dir.display(), "saved");
                dist.hooks.on_checkpoint(step, Some(&dir))?;
                if let Some(limit) = args.save_total_limit {
                    checkpoint::prune(&args.output_dir, limit, dist.hooks.protected_checkpoint())?;
                }
            } else {
                dist.hooks.on_checkpoint(step, None)?;
            }
        }
        if args
            .stop_after_steps
            .is_some_and(|n| step - start_step >= n)
            && step < total_steps
        {
            progress.finish();
            tracing::warn!(step, "stopping early as asked (stop_after_steps)");
            return Ok(TrainSummary {
                global_step: step,
                finished: false,
                train_loss: total_loss / total_loss_steps.max(1) as f64,
                eval: last_eval,
                tokens_per_sec: tokens_seen as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            });
        }
    }
    progress.finish();
    let eval_result = if eval.is_empty() {
        None
    } else {
        Some(eval_and_log(
            model,
            objective,
            eval,
            args,
            dist,
            metrics.as_mut(),
            step,
        )?)
    };
    Ok(TrainSummary {
        global_step: step,
        finished: true,
        train_loss: total_loss / total_loss_steps.max(1) as f64,
        eval: eval_result,
        tokens_per_sec: tokens_seen as f64 / t0.elapsed().as_secs_f64().max(1e-9),
    })
}

/// The objective's own training metrics of the logging window: summed over
/// the ranks, divided by the window's units.
fn window_means<B: Backend, O: Objective<B>>(
    model: &Llama<B>,
    objective: &O,
    collective: &mut dyn Collective<B>,
    window_weight: usize,
) -> Result<Vec<(&'static str, f64)>> {
    let sums = objective.take_train_sums();
    if sums.is_empty() {
        return Ok(sums);
    }
    let mut values: Vec<f32> = sums.iter().map(|&(_, v)| v as f32).collect();
    if collective.world_size() > 1 {
        let n = values.len();
        let mut buf = model.be.upload(&values, Precision::F32)?;
        collective.all_reduce_sum(&model.be, &mut buf, 0..n)?;
        values = model.be.download(model.be.view(&buf, 0..n))?;
    }
    let w = window_weight.max(1) as f64;
    Ok(sums
        .iter()
        .zip(values)
        .map(|(&(name, local), summed)| {
            // One rank: keep the f64 sum; several: the f32 all-reduced one.
            let total = if collective.world_size() > 1 {
                summed as f64
            } else {
                local
            };
            (name, total / w)
        })
        .collect())
}

/// Evaluate across the ranks; rank 0 (the one with `metrics`) logs it.
fn eval_and_log<B: Backend, O: Objective<B>>(
    model: &mut Llama<B>,
    objective: &O,
    eval: &[O::Item],
    args: &TrainArgs,
    dist: &mut Dist<'_, B>,
    metrics: Option<&mut Metrics>,
    step: u64,
) -> Result<O::Eval> {
    let r = objective.evaluate(
        model,
        eval,
        args.per_device_eval_batch_size,
        dist.collective,
    )?;
    if let Some(m) = metrics {
        let mut line = json!({ "step": step });
        if let (Some(obj), serde_json::Value::Object(fields)) = (line.as_object_mut(), r.fields()) {
            obj.extend(fields);
        }
        tracing::info!(step, fields = %r.fields(), "eval");
        m.write(&line)?;
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the world size, the ranks together use each sample of an
    /// epoch exactly once, and the step boundaries depend on the global batch only.
    #[test]
    fn every_sample_is_used_once_per_epoch_across_ranks() {
        for n in [1usize, 7, 10, 33] {
            for (global, bs) in [(4usize, 2usize), (4, 4), (6, 2), (8, 3)] {
                let order = epoch_order(n, 7, 0);
                for world in 1..=4 {
                    let mut seen = vec![0u32; n];
                    let mut steps = Vec::new();
                    for step_start in (0..n).step_by(global) {
                        let step = &order[step_start..(step_start + global).min(n)];
                        let mut in_step = Vec::new();
                        for rank in 0..world {
                            for r in
                                rank_micro_batches(step.len(), bs, global.div_ceil(bs), rank, world)
                            {
                                assert!(r.len() <= bs);
                                in_step.extend_from_slice(&step[r]);
                            }
                        }
                        in_step.sort();
                        steps.push(in_step);
                    }
                    for s in &steps {
                        for &i in s {
                            seen[i] += 1;
                        }
                    }
                    assert!(
                        seen.iter().all(|&c| c == 1),
                        "n {n} global {global} bs {bs} world {world}: {seen:?}"
                    );
                    assert_eq!(steps.len(), n.div_ceil(global));
                    // The same samples in each step as with one rank.
                    let one: Vec<Vec<usize>> = (0..n)
                        .step_by(global)
                        .map(|s| {
                            let mut v = order[s..(s + global).min(n)].to_vec();
                            v.sort();
                            v
                        })
                        .collect();
                    assert_eq!(steps, one);
                }
            }
        }
    }
}
