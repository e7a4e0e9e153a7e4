//! `rlhf dpo`: Direct Preference Optimization (MedicalGPT `dpo_training.py`,
//! TRL `DPOTrainer` with `loss_type="sigmoid"`): the policy is trained on
//! preference pairs to raise β·(log π(chosen) − log π_ref(chosen)) above the
//! same for the rejected answer, with loss −log σ of their difference.
//!
//! - Prompt: the pair's conversation rendered with the generation prompt (the
//!   chat template or a named template), or MedicalGPT 2023's
//!   "Question: ...\n\nAnswer: "; tokenised with the tokenizer's special
//!   tokens (BOS as TRL ≤ 0.11 adds it). Chosen and rejected: the raw answer
//!   strings tokenised without special tokens, then EOS (as TRL).
//! - Labels on the answer tokens only; a side's log-probability is the sum
//!   over its answer tokens.
//! - Reference: the same weights with the LoRA adapter switched off (PEFT's
//!   `disable_adapter`), computed once for every pair before training (TRL's
//!   `precompute_ref_log_probs`). Full fine-tuning would need a frozen copy
//!   of the model and is refused.
//! - Length: as MedicalGPT, pairs with len(prompt + answer) above
//!   max_source_length + max_target_length **characters** on either side are
//!   left out; then, as TRL's `max_length` (keep_start), prompt + answer
//!   tokens are cut to that many tokens, and a side left with no answer token
//!   is left out too (counted).
//! - The chosen and rejected rows of a micro-batch run in one forward, padded
//!   to the longest row (TRL's `concatenated_forward`).

use super::args::{ModelArgs, RunFlags, TrainingArgs};
use super::rm::{pair_pad_id, read_split_pairs, PairFormat, RmDataFlags, SplitPairs};
use crate::collective::Collective;
use crate::data::reward::PreferencePair;
use crate::fsutil::write_json_atomic;
use crate::model::params::Head;
use crate::model::weights::SaveDtype;
use crate::model::{Batch, Llama, TrainMode};
use crate::rl::dpo::dpo_loss;
use crate::tokenizer::Tokenizer;
use crate::train::trainer::{sum_over_ranks, train_objective, EvalReport, MicroStats, Objective};
use crate::train::{Dist, TrainHooks, TrainSummary};
use anyhow::{bail, Context, Result};
use clap::Args;
use rlhf_kernels::{Backend, Precision};
use serde_json::json;
use std::cell::RefCell;

/// MedicalGPT dpo_training.py's `ScriptArguments` (+ the `DPOConfig` it
/// builds), with its defaults where they differ from transformers'.
#[derive(Args, Clone, Debug)]
#[command(
    mut_arg("output_dir", |a| a.required(false).default_value("outputs-dpo")),
    mut_arg("per_device_train_batch_size", |a| a.default_value("4")),
    mut_arg("per_device_eval_batch_size", |a| a.default_value("1")),
    mut_arg("gradient_accumulation_steps", |a| a.default_value("4")),
    mut_arg("learning_rate", |a| a.default_value("5e-4")),
    mut_arg("lr_scheduler_type", |a| a.default_value("cosine")),
    mut_arg("warmup_steps", |a| a.default_value("100")),
    mut_arg("max_steps", |a| a.default_value("200")),
    mut_arg("logging_steps", |a| a.default_value("1")),
    mut_arg("save_steps", |a| a.default_value("50")),
    mut_arg("eval_steps", |a| a.default_value("50")),
    mut_arg("gradient_checkpointing", |a| a.default_value("true")),
    mut_arg("lora_alpha", |a| a.default_value("16")),
    // MedicalGPT DPO: target_modules None, so PEFT's default for Llama/Qwen2.
    mut_arg("target_modules", |a| a.default_value("q_proj,v_proj")),
)]
pub struct DpoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: RmDataFlags,
    #[command(flatten)]
    pub training: TrainingArgs,
    /// DPO's β: the strength of the pull towards the reference (TRL default).
    #[arg(long = "beta", default_value_t = 0.1)]
    pub beta: f32,
}

impl DpoArgs {
    /// As MedicalGPT (fp16 True by default): fp16 on CUDA unless --bf16 or
    /// --fp16 is given; on the CPU (f32 whatever is asked) nothing is added.
    pub fn run_flags(&self) -> RunFlags<'_> {
        let mut f = self.training.run_flags();
        if f.device != super::args::Device::Cpu && f.bf16.is_none() && f.fp16.is_none() {
            f.fp16 = Some(true);
        }
        f
    }
}

/// A tokenised pair and its reference log-probabilities.
#[derive(Clone, Debug, PartialEq)]
pub struct DpoPair {
    /// Prompt tokens (with the tokenizer's special tokens).
    pub prompt: Vec<u32>,
    /// Answer tokens, EOS last.
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    /// Σ log π_ref over the answer tokens (set by [`precompute_reference`]).
    pub ref_chosen: f32,
    pub ref_rejected: f32,
}

/// Rows [p0+c0, p0+r0, p1+c1, p1+r1, ...] right-padded with `pad_id`,
/// labels on the answer tokens only; row keys 2·key and 2·key+1 (LoRA dropout).
pub fn collate_dpo(pairs: &[&DpoPair], keys: &[u64], pad_id: u32) -> Batch {
    let rows: Vec<(&[u32], &[u32])> = pairs
        .iter()
        .flat_map(|p| {
            [
                (&p.prompt[..], &p.chosen[..]),
                (&p.prompt[..], &p.rejected[..]),
            ]
        })
        .collect();
    let t = rows
        .iter()
        .map(|(p, a)| p.len() + a.len())
        .max()
        .unwrap_or(0);
    let b = rows.len();
    let mut input_ids = vec![pad_id; b * t]; // [B,T]
    let mut labels = vec![-100i32; b * t]; // [B,T]
    let mut mask = vec![0u8; b * t]; // [B,T]
    for (i, (p, a)) in rows.iter().enumerate() {
        let row = i * t;
        input_ids[row..row + p.len()].copy_from_slice(p);
        input_ids[row + p.len()..row + p.len() + a.len()].copy_from_slice(a);
        for (l, &id) in labels[row + p.len()..].iter_mut().zip(a.iter()) {
            *l = id as i32;
        }
        mask[row..row + p.len() + a.len()].fill(1);
    }
    Batch {
        b,
        t,
        input_ids,
        attention_mask: mask.contains(&0).then_some(mask),
        labels,
        sample_keys: keys.iter().flat_map(|&k| [2 * k, 2 * k + 1]).collect(),
    }
}

/// Σ over each row of per-token log-probs [B,T] (0 where nothing is
/// predicted): the sequence log-probabilities, split into (chosen, rejected).
fn sequence_logps(logp: &[f32], t: usize) -> (Vec<f32>, Vec<f32>) {
    let sums: Vec<f32> = logp
        .chunks_exact(t.max(1))
        .map(|r| r.iter().map(|&x| x as f64).sum::<f64>() as f32)
        .collect();
    (
        sums.iter().step_by(2).copied().collect(),
        sums.iter().skip(1).step_by(2).copied().collect(),
    )
}

/// Set every pair's reference log-probabilities: the model with its adapter
/// off, no dropout, batches of `batch_size` pairs shared across the ranks
/// (batch j on rank j mod world) and summed over them.
pub fn precompute_reference<B: Backend>(
    model: &mut Llama<B>,
    pairs: &mut [DpoPair],
    batch_size: usize,
    pad_id: u32,
    collective: &mut dyn Collective<B>,
) -> Result<()> {
    if pairs.is_empty() {
        return Ok(());
    }
    if !matches!(model.mode, TrainMode::Lora(_)) {
        bail!("the DPO reference is the model with its LoRA adapter off; this model has none");
    }
    let (rank, world) = (collective.rank(), collective.world_size());
    let bs = batch_size.max(1);
    let mut ref_logps = vec![0f32; 2 * pairs.len()]; // [pairs, 2]: chosen, rejected
    let was_enabled = model.adapter_enabled();
    model.set_adapter_enabled(false);
    let forwards = (|| -> Result<()> {
        for (j, chunk) in pairs.chunks(bs).enumerate().skip(rank).step_by(world) {
            let refs: Vec<&DpoPair> = chunk.iter().collect();
            let keys: Vec<u64> = (0..chunk.len() as u64).collect();
            let batch = collate_dpo(&refs, &keys, pad_id);
            let out = model.token_forward(&batch, None, false)?;
            let (c, r) = sequence_logps(&out.logp, batch.t);
            for (i, (c, r)) in c.into_iter().zip(r).enumerate() {
                ref_logps[2 * (j * bs + i)] = c;
                ref_logps[2 * (j * bs + i) + 1] = r;
            }
        }
        Ok(())
    })();
    model.set_adapter_enabled(was_enabled);
    forwards?;
    if world > 1 {
        // Each value is non-zero on one rank only: the sum is exact.
        let n = ref_logps.len();
        let mut buf = model.be.upload(&ref_logps, Precision::F32)?;
        collective.all_reduce_sum(&model.be, &mut buf, 0..n)?;
        ref_logps = model.be.download(model.be.view(&buf, 0..n))?;
    }
    for (p, r) in pairs.iter_mut().zip(ref_logps.chunks_exact(2)) {
        p.ref_chosen = r[0];
        p.ref_rejected = r[1];
    }
    Ok(())
}

/// DPO metrics over a set of pairs (TRL's names; means over the pairs).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DpoEval {
    pub loss: f64,
    /// β·(log π − log π_ref) of the chosen / rejected answers.
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    /// Fraction of pairs with the chosen reward above the rejected (a tie is not a win).
    pub accuracy: f64,
    /// Mean chosen − rejected reward.
    pub margin: f64,
    /// Σ log π over the answer tokens.
    pub logps_chosen: f64,
    pub logps_rejected: f64,
    pub pairs: usize,
}

impl EvalReport for DpoEval {
    fn loss(&self) -> f64 {
        self.loss
    }
    fn fields(&self) -> serde_json::Value {
        json!({
            "eval_loss": self.loss,
            "eval_rewards/chosen": self.rewards_chosen,
            "eval_rewards/rejected": self.rewards_rejected,
            "eval_rewards/accuracies": self.accuracy,
            "eval_rewards/margins": self.margin,
            "eval_logps/chosen": self.logps_chosen,
            "eval_logps/rejected": self.logps_rejected,
            "eval_pairs": self.pairs,
        })
    }
}

/// Sums of the per-pair DPO metrics, in [`TALLY_NAMES`] order, + the pair count.
#[derive(Clone, Copy, Debug, Default)]
struct Tally([f64; 7]);

/// TRL's training metric names, in [`Tally`] order.
const TALLY_NAMES: [&str; 6] = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
];

impl Tally {
    fn add(&mut self, pc: &[f32], pr: &[f32], beta: f32, rc: &[f32], rr: &[f32]) {
        let b = beta as f64;
        for i in 0..pc.len() {
            let chosen = b * (pc[i] as f64 - rc[i] as f64);
            let rejected = b * (pr[i] as f64 - rr[i] as f64);
            let z = chosen - rejected;
            self.0[0] += chosen;
            self.0[1] += rejected;
            self.0[2] += (chosen > rejected) as u8 as f64;
            self.0[3] += z;
            self.0[4] += pc[i] as f64;
            self.0[5] += pr[i] as f64;
            self.0[6] += 1.0;
        }
    }
}

/// DPO's objective over tokenised pairs: one unit of the step's normaliser per pair.
pub struct DpoPairs {
    pub pad_id: u32,
    pub beta: f32,
    /// This rank's training metrics since they were last taken (for the logs).
    tally: RefCell<Tally>,
}

impl DpoPairs {
    pub fn new(pad_id: u32, beta: f32) -> Self {
        DpoPairs {
            pad_id,
            beta,
            tally: RefCell::new(Tally::default()),
        }
    }
}

impl<B: Backend> Objective<B> for DpoPairs {
    type Item = DpoPair;
    type Eval = DpoEval;

    fn weight(&self, _: &DpoPair) -> usize {
        1
    }

    fn forward_backward(
        &self,
        model: &mut Llama<B>,
        items: &[&DpoPair],
        keys: &[u64],
        grad_scale: f32,
        dropout_seed: u64,
    ) -> Result<MicroStats> {
        let batch = collate_dpo(items, keys, self.pad_id);
        let out = model.token_forward(&batch, Some(dropout_seed), false)?;
        let (pc, pr) = sequence_logps(&out.logp, batch.t);
        let rc: Vec<f32> = items.iter().map(|p| p.ref_chosen).collect();
        let rr: Vec<f32> = items.iter().map(|p| p.ref_rejected).collect();
        let d = dpo_loss(&pc, &pr, &rc, &rr, self.beta);
        // dpo_loss's gradients are of the mean over these pairs; the trainer
        // wants grad_scale × the gradient of their sum.
        let n = items.len() as f32;
        let mut dlogp = vec![0f32; batch.b * batch.t]; // [B,T]
        for (i, row) in dlogp.chunks_exact_mut(batch.t).enumerate() {
            let g = if i % 2 == 0 {
                d.grad_chosen[i / 2]
            } else {
                d.grad_rejected[i / 2]
            };
            row.fill(g * n * grad_scale);
        }
        model.token_backward(&batch, &dlogp, None, Some(dropout_seed))?;
        self.tally.borrow_mut().add(&pc, &pr, self.beta, &rc, &rr);
        Ok(MicroStats {
            loss_sum: d.loss * items.len() as f64,
            tokens: batch.b * batch.t,
        })
    }

    fn evaluate(
        &self,
        model: &mut Llama<B>,
        items: &[DpoPair],
        batch_size: usize,
        collective: &mut dyn Collective<B>,
    ) -> Result<DpoEval> {
        evaluate_dpo(model, items, batch_size, self.pad_id, self.beta, collective)
    }

    fn take_train_sums(&self) -> Vec<(&'static str, f64)> {
        let t = std::mem::take(&mut *self.tally.borrow_mut());
        TALLY_NAMES.iter().copied().zip(t.0).collect()
    }
}

/// DPO loss and TRL's metrics of the policy on `pairs` (reference
/// log-probabilities already set), no dropout, split across the ranks.
pub fn evaluate_dpo<B: Backend>(
    model: &mut Llama<B>,
    pairs: &[DpoPair],
    batch_size: usize,
    pad_id: u32,
    beta: f32,
    collective: &mut dyn Collective<B>,
) -> Result<DpoEval> {
    let (rank, world) = (collective.rank(), collective.world_size());
    let mut tally = Tally::default();
    let mut loss_sum = 0.0;
    for chunk in pairs.chunks(batch_size.max(1)).skip(rank).step_by(world) {
        let refs: Vec<&DpoPair> = chunk.iter().collect();
        let keys: Vec<u64> = (0..chunk.len() as u64).collect();
        let batch = collate_dpo(&refs, &keys, pad_id);
        let out = model.token_forward(&batch, None, false)?;
        let (pc, pr) = sequence_logps(&out.logp, batch.t);
        let rc: Vec<f32> = chunk.iter().map(|p| p.ref_chosen).collect();
        let rr: Vec<f32> = chunk.iter().map(|p| p.ref_rejected).collect();
        loss_sum += dpo_loss(&pc, &pr, &rc, &rr, beta).loss * chunk.len() as f64;
        tally.add(&pc, &pr, beta, &rc, &rr);
    }
    let t = tally.0;
    let [loss_sum, c, r, acc, m, lc, lr, n] = sum_over_ranks(
        model,
        collective,
        [loss_sum, t[0], t[1], t[2], t[3], t[4], t[5], t[6]],
    )?;
    if n == 0.0 {
        bail!("nothing to evaluate: no validation pairs");
    }
    Ok(DpoEval {
        loss: loss_sum / n,
        rewards_chosen: c / n,
        rewards_rejected: r / n,
        accuracy: acc / n,
        margin: m / n,
        logps_chosen: lc / n,
        logps_rejected: lr / n,
        pairs: n as usize,
    })
}

/// Tokenised pairs of one split, and how many were left out as too long.
#[derive(Clone, Debug, Default)]
pub struct TokenisedDpoPairs {
    pub pairs: Vec<DpoPair>,
    pub too_long: usize,
}

/// Prompt and answers of every pair as tokens (reference log-probs unset),
/// with MedicalGPT's character filter and TRL's keep_start truncation to
/// `max_len` tokens (module docs).
pub fn tokenise_dpo_pairs(
    tokenizer: &Tokenizer,
    format: &PairFormat,
    pairs: &[PreferencePair],
    max_len: usize,
) -> Result<TokenisedDpoPairs> {
    let eos = tokenizer
        .eos_id()
        .context("DPO ends every answer with EOS (as TRL), but the tokenizer has no eos token")?;
    let mut out = TokenisedDpoPairs::default();
    for pair in pairs {
        let prompt_text = format.render_prompt(pair)?;
        let chars = prompt_text.chars().count();
        if chars + pair.chosen.chars().count() > max_len
            || chars + pair.rejected.chars().count() > max_len
        {
            out.too_long += 1;
            continue;
        }
        let prompt = tokenizer.encode(&prompt_text, true)?;
        let answer = |text: &str| -> Result<Vec<u32>> {
            let mut ids = tokenizer.encode(text, false)?;
            ids.push(eos);
            ids.truncate(max_len.saturating_sub(prompt.len()));
            Ok(ids)
        };
        let (chosen, rejected) = (answer(&pair.chosen)?, answer(&pair.rejected)?);
        if chosen.is_empty() || rejected.is_empty() {
            out.too_long += 1;
            continue;
        }
        out.pairs.push(DpoPair {
            prompt,
            chosen,
            rejected,
            ref_chosen: 0.0,
            ref_rejected: 0.0,
        });
    }
    Ok(out)
}

/// What `rlhf dpo` reports (also written to output_dir/all_results.json).
#[derive(Clone, Debug)]
pub struct DpoResult {
    pub summary: TrainSummary<DpoEval>,
    pub initial_eval: Option<DpoEval>,
    pub train_pairs: usize,
    pub eval_pairs: usize,
    /// Invalid records skipped (--skip_invalid).
    pub skipped_invalid: usize,
    /// Pairs left out as too long (module docs).
    pub too_long: usize,
    /// all_results.json as written (rank 0; Null on other ranks).
    pub results: serde_json::Value,
}

/// One rank of a data-parallel DPO stage: every rank reads all the data;
/// the reference log-probabilities are shared out and summed; rank 0
/// writes the outputs.
pub fn run_dist<B: Backend>(
    be: B,
    args: &DpoArgs,
    collective: &mut dyn Collective<B>,
    global_batch: Option<usize>,
    hooks: &mut dyn TrainHooks,
) -> Result<DpoResult> {
    let is_main = collective.rank() == 0;
    let mut targs = args.training.to_train_args()?;
    SaveDtype::from_torch_dtype(args.model.torch_dtype.as_deref())?;
    if !(args.beta.is_finite() && args.beta > 0.0) {
        bail!("--beta must be a positive number, got {}", args.beta);
    }
    match args.model.train_mode()? {
        TrainMode::Full => bail!(
            "DPO with full fine-tuning (--use_peft false) needs a frozen copy of the model as its reference, which is not supported yet; use LoRA (--use_peft true), whose reference is the model with the adapter off"
        ),
        TrainMode::Lora(l) if !l.modules_to_save.is_empty() => bail!(
            "DPO with modules_to_save is not supported: the reference (adapter off) would lose those modules"
        ),
        TrainMode::Lora(_) => {}
    }
    let tokenizer_dir = args.model.tokenizer_dir();
    let tokenizer = Tokenizer::load(&tokenizer_dir)?;
    let pad_id = pair_pad_id(&tokenizer)?;
    let SplitPairs {
        train: train_read,
        valid: valid_read,
        skipped,
    } = read_split_pairs(&args.data)?;
    let max_len = args.data.max_source_length + args.data.max_target_length;
    let format = PairFormat::resolve(args.data.template_name.as_deref(), &tokenizer)?;
    let mut train = tokenise_dpo_pairs(&tokenizer, &format, &train_read, max_len)?;
    let mut eval = tokenise_dpo_pairs(&tokenizer, &format, &valid_read, max_len)?;
    if !skipped.is_empty() {
        tracing::warn!(
            skipped = skipped.len(),
            "invalid pairs skipped (--skip_invalid)"
        );
    }
    let too_long = train.too_long + eval.too_long;
    if too_long > 0 {
        tracing::warn!(
            train = train.too_long,
            eval = eval.too_long,
            max_len,
            "pairs left out: prompt + answer longer than max_source_length + max_target_length characters, or no answer token left within as many tokens"
        );
    }
    if train.pairs.is_empty() {
        bail!(
            "no training pairs left ({} read, {} too long, {} invalid skipped)",
            train_read.len(),
            train.too_long,
            skipped.len()
        );
    }
    tracing::info!(
        train_pairs = train.pairs.len(),
        eval_pairs = eval.pairs.len(),
        pad_id,
        beta = args.beta,
        "DPO data ready"
    );

    let mut model = super::load_stage_model(
        be,
        &args.model,
        &args.training,
        Head::CausalLm,
        &tokenizer,
        targs.seed,
    )?;
    let ref_bs = targs.per_device_eval_batch_size;
    precompute_reference(&mut model, &mut train.pairs, ref_bs, pad_id, collective)?;
    precompute_reference(&mut model, &mut eval.pairs, ref_bs, pad_id, collective)?;
    tracing::info!("reference log-probabilities computed (adapter off)");
    let objective = DpoPairs::new(pad_id, args.beta);
    let initial_eval = if eval.pairs.is_empty() || targs.resume_from_checkpoint.is_some() {
        None
    } else {
        Some(evaluate_dpo(
            &mut model,
            &eval.pairs,
            ref_bs,
            pad_id,
            args.beta,
            collective,
        )?)
    };
    if let (true, Some(e)) = (is_main, &initial_eval) {
        tracing::info!(
            eval_loss = e.loss,
            accuracy = e.accuracy,
            margin = e.margin,
            "before training"
        );
    }
    let base = args.model.model_name_or_path.clone();
    let save =
        |m: &Llama<B>, dir: &std::path::Path| super::save_weights(m, dir, &base, &tokenizer_dir);
    targs.show_progress = true;
    let mut dist = Dist {
        collective,
        global_batch,
        hooks,
    };
    let summary = train_objective(
        &mut model,
        &objective,
        &train.pairs,
        &eval.pairs,
        &targs,
        &save,
        &mut dist,
    )?;
    let mut result = DpoResult {
        summary,
        initial_eval,
        train_pairs: train.pairs.len(),
        eval_pairs: eval.pairs.len(),
        skipped_invalid: skipped.len(),
        too_long,
        results: serde_json::Value::Null,
    };
    if !is_main {
        return Ok(result);
    }
    if result.summary.finished {
        super::save_weights(&model, &targs.output_dir, &base, &tokenizer_dir)?;
    }
    let mut results = json!({
        "train_loss": result.summary.train_loss,
        "global_step": result.summary.global_step,
        "finished": result.summary.finished,
        "train_tokens_per_second": result.summary.tokens_per_sec,
        "train_samples": result.train_pairs,
        "eval_samples": result.eval_pairs,
        "skipped_invalid": result.skipped_invalid,
        "template": format.name(),
        "beta": args.beta,
        "filtered_too_long": too_long,
        "filtered_too_long_train": train.too_long,
        "filtered_too_long_eval": eval.too_long,
    });
    if let (Some(obj), Some(e)) = (results.as_object_mut(), &result.summary.eval) {
        if let serde_json::Value::Object(f) = e.fields() {
            obj.extend(f);
        }
    }
    if let (Some(obj), Some(e)) = (results.as_object_mut(), &result.initial_eval) {
        if let serde_json::Value::Object(f) = e.fields() {
            obj.extend(f.into_iter().map(|(k, v)| (format!("initial_{k}"), v)));
        }
    }
    write_json_atomic(&targs.output_dir.join("all_results.json"), &results)
        .with_context(|| format!("writing results to {}", targs.output_dir.display()))?;
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
        dpo: DpoArgs,
    }

    #[test]
    fn defaults_are_medicalgpt_dpo_training_py() {
        let a = Cli::parse_from(["dpo", "--model_name_or_path", "m", "--train_file_dir", "d"]).dpo;
        let t = &a.training;
        assert_eq!(t.output_dir, std::path::PathBuf::from("outputs-dpo"));
        assert_eq!(
            (t.per_device_train_batch_size, t.per_device_eval_batch_size),
            (4, 1)
        );
        assert_eq!(t.gradient_accumulation_steps, 4);
        assert_eq!(t.learning_rate, 5e-4);
        assert_eq!(t.lr_scheduler_type, "cosine");
        assert_eq!((t.warmup_steps, t.max_steps), (100, 200));
        assert_eq!(
            (t.logging_steps, t.save_steps, t.eval_steps),
            (1, 50, Some(50))
        );
        assert!(t.gradient_checkpointing);
        assert_eq!(a.model.lora_alpha, 16.0);
        assert_eq!(a.model.target_modules, "q_proj,v_proj");
        assert_eq!(
            (a.data.max_source_length, a.data.max_target_length),
            (2048, 512)
        );
        assert_eq!(a.beta, 0.1);
        // fp16 by default on CUDA only; --bf16 replaces it.
        assert_eq!(a.run_flags().fp16, None);
        let cuda = Cli::parse_from([
            "dpo",
            "--model_name_or_path",
            "m",
            "--train_file_dir",
            "d",
            "--device",
            "cuda",
        ])
        .dpo;
        assert_eq!(cuda.run_flags().fp16, Some(true));
        let bf = Cli::parse_from([
            "dpo",
            "--model_name_or_path",
            "m",
            "--train_file_dir",
            "d",
            "--device",
            "cuda",
            "--bf16",
            "true",
        ])
        .dpo;
        assert_eq!(
            (bf.run_flags().fp16, bf.run_flags().bf16),
            (None, Some(true))
        );
        // A flag given still wins over the DPO default.
        let lr = Cli::parse_from([
            "dpo",
            "--model_name_or_path",
            "m",
            "--train_file_dir",
            "d",
            "--learning_rate",
            "1e-3",
        ])
        .dpo;
        assert_eq!(lr.training.learning_rate, 1e-3);
    }

    #[test]
    fn rows_are_prompt_plus_answer_with_labels_on_the_answer() {
        let a = DpoPair {
            prompt: vec![1, 5],
            chosen: vec![6, 2],
            rejected: vec![7, 8, 2],
            ref_chosen: 0.0,
            ref_rejected: 0.0,
        };
        let b = collate_dpo(&[&a], &[4], 0);
        assert_eq!((b.b, b.t), (2, 5));
        assert_eq!(b.input_ids, [1, 5, 6, 2, 0, 1, 5, 7, 8, 2]);
        assert_eq!(b.labels, [-100, -100, 6, 2, -100, -100, -100, 7, 8, 2]);
        assert_eq!(
            b.attention_mask.as_deref(),
            Some(&[1u8, 1, 1, 1, 0, 1, 1, 1, 1, 1][..])
        );
        assert_eq!(b.sample_keys, [8, 9]);
        // Targets at t predict labels[t+1]: the prompt's last token predicts the first answer token.
        let targets = b.shifted_targets();
        assert_eq!(&targets[..5], &[-100, 6, 2, -100, -100]);
        let (c, r) = sequence_logps(&[0.0, -1.0, -2.0, 0.0, 0.0, 0.0, -1.0, -1.0, -0.5, 0.0], 5);
        assert_eq!((c, r), (vec![-3.0], vec![-2.5]));
    }
}
