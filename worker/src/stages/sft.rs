//! `rlhf sft`: supervised fine-tuning (MedicalGPT `supervised_finetuning.py`):
//! ShareGPT/Alpaca conversations → chat template → prompt-masked samples →
//! causal-LM training on the answers.
//!
//! Data order differs from MedicalGPT in one documented way: MedicalGPT
//! shuffles with HF `datasets` (seed 42) before splitting off validation and
//! selecting `max_train_samples`; here, as in `rlhf pt`, the first
//! `validation_split_percentage`% of the conversations (file order) are
//! validation and the first `max_*_samples` of each part are kept. The
//! trainer shuffles the training samples per epoch from `--seed`.

use super::args::{parse_bool, ModelArgs, TrainingArgs};
use super::qa_eval::QaAccuracy;
use crate::collective::Collective;
use crate::data::chat::{read_sft_dir, Conversation, SftRecords};
use crate::data::pretrain::split_train_validation;
use crate::data::sft::{fix_special_tokens, tokenize_conversations, SftTokenizeArgs, IGNORE_INDEX};
use crate::data::template::{named_template, ChatFormat};
use crate::fsutil::write_json_atomic;
use crate::model::params::Head;
use crate::model::weights::SaveDtype;
use crate::tokenizer::Tokenizer;
use crate::train::{train_dist, Dist, EvalResult, TrainHooks, TrainSummary};
use anyhow::{bail, Context, Result};
use clap::Args;
use rlhf_kernels::Backend;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// MedicalGPT refuses shorter `model_max_length`s ("You must specify a valid
/// model_max_length >= 60 to run training").
pub const MIN_MODEL_MAX_LENGTH: usize = 60;

/// `DataArguments` + the data part of `ScriptArguments` of MedicalGPT's SFT.
#[derive(Args, Clone, Debug)]
pub struct SftDataFlags {
    /// Folder of ShareGPT (.jsonl) or Alpaca (.json/.jsonl) files, read recursively.
    #[arg(long = "train_file_dir")]
    pub train_file_dir: PathBuf,
    /// Folder of validation files; without it, validation_split_percentage of the training conversations.
    #[arg(long = "validation_file_dir")]
    pub validation_file_dir: Option<PathBuf>,
    #[arg(long = "validation_split_percentage", default_value_t = 1)]
    pub validation_split_percentage: u32,
    /// Keep at most this many training conversations (before tokenising; 0: all).
    #[arg(long = "max_train_samples")]
    pub max_train_samples: Option<usize>,
    /// Keep at most this many validation conversations (before tokenising; 0: all).
    #[arg(long = "max_eval_samples")]
    pub max_eval_samples: Option<usize>,
    /// A MedicalGPT template (vicuna, qwen, llama3, ...); default: the tokenizer's chat_template.
    #[arg(long = "template_name")]
    pub template_name: Option<String>,
    /// Tokens per conversation (prompt + answers), at least 60.
    #[arg(long = "model_max_length", default_value_t = 512)]
    pub model_max_length: usize,
    /// Train on the prompts too (labels = input_ids).
    #[arg(long = "train_on_inputs", default_value = "false", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub train_on_inputs: bool,
    /// Prompt labels are -100 (true) or the pad id (false), as MedicalGPT's IGNORE_INDEX.
    #[arg(long = "ignore_pad_token_for_loss", default_value = "true", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub ignore_pad_token_for_loss: bool,
    /// Skip (and count) invalid records instead of stopping at the first.
    #[arg(long = "skip_invalid", default_value = "false", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub skip_invalid: bool,
    /// Not a MedicalGPT argument: held-out questions with known short answers
    /// (JSON lines `{"question", "short"}`, as the demo's heldout_qa.jsonl).
    /// Rank 0 answers them greedily through the chat template before and after
    /// training and reports the exact-answer accuracy (`qa_accuracy`).
    #[arg(long = "eval_qa_file")]
    pub eval_qa_file: Option<PathBuf>,
}

#[derive(Args, Clone, Debug)]
pub struct SftArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: SftDataFlags,
    #[command(flatten)]
    pub training: TrainingArgs,
}

/// What `rlhf sft` reports at the end (also written to output_dir/all_results.json).
#[derive(Clone, Debug)]
pub struct SftResult {
    pub summary: TrainSummary,
    pub train_samples: usize,
    pub eval_samples: usize,
    pub initial_eval: Option<EvalResult>,
    /// Chat format used (template name, or "chat_template").
    pub template: String,
    /// Invalid records skipped by --skip_invalid, per reason.
    pub skipped_invalid: BTreeMap<String, usize>,
    /// Conversations dropped because no answer token fit in model_max_length.
    pub all_labels_ignored: usize,
    /// all_results.json as written (rank 0; Null on other ranks).
    pub results: serde_json::Value,
}

/// Conversations of the train and validation parts, after the split and the
/// `max_*_samples` caps.
fn select_conversations(
    d: &SftDataFlags,
    train: SftRecords,
    valid: Option<SftRecords>,
) -> Result<(Vec<Conversation>, Vec<Conversation>)> {
    let (mut train, mut eval) = match valid {
        Some(v) => (train.conversations, v.conversations),
        None => split_train_validation(train.conversations, d.validation_split_percentage)?,
    };
    let cap = |v: &mut Vec<Conversation>, n: Option<usize>| {
        if let Some(n) = n.filter(|&n| n > 0) {
            v.truncate(n);
        }
    };
    cap(&mut train, d.max_train_samples);
    cap(&mut eval, d.max_eval_samples);
    Ok((train, eval))
}

/// One rank of a data-parallel SFT stage. `global_batch` defaults to
/// world × per-device batch × accumulation. Every rank reads and tokenises the
/// whole data set (the split between ranks is by sample index); rank 0 writes
/// the outputs.
pub fn run_dist<B: Backend>(
    be: B,
    args: &SftArgs,
    collective: &mut dyn Collective<B>,
    global_batch: Option<usize>,
    hooks: &mut dyn TrainHooks,
) -> Result<SftResult> {
    let is_main = collective.rank() == 0;
    let d = &args.data;
    if d.model_max_length < MIN_MODEL_MAX_LENGTH {
        bail!(
            "--model_max_length is {}; expected at least {MIN_MODEL_MAX_LENGTH} (as MedicalGPT requires)",
            d.model_max_length
        );
    }
    let mut targs = args.training.to_train_args()?;
    SaveDtype::from_torch_dtype(args.model.torch_dtype.as_deref())?;
    let tokenizer_dir = args.model.tokenizer_dir();
    let mut tokenizer = Tokenizer::load(&tokenizer_dir)?;
    // Named template first: its stop_str is MedicalGPT's EOS when the tokenizer has none.
    let named = d.template_name.as_deref().map(named_template).transpose()?;
    fix_special_tokens(&mut tokenizer, named.map(|t| t.stop_str))?;
    let format = ChatFormat::resolve(d.template_name.as_deref(), &tokenizer)?;

    let train_records = read_sft_dir(&d.train_file_dir, d.skip_invalid)?;
    let valid_records = d
        .validation_file_dir
        .as_ref()
        .map(|dir| read_sft_dir(dir, d.skip_invalid))
        .transpose()?;
    let mut skipped_invalid = train_records.skipped_invalid.clone();
    let mut dropped_trailing_user = train_records.dropped_trailing_user;
    if let Some(v) = &valid_records {
        for (k, n) in &v.skipped_invalid {
            *skipped_invalid.entry(k.clone()).or_default() += n;
        }
        dropped_trailing_user += v.dropped_trailing_user;
    }
    let (train_convs, eval_convs) = select_conversations(d, train_records, valid_records)?;

    let pad_id = tokenizer
        .pad_id()
        .or(tokenizer.eos_id())
        .context("the tokenizer has neither a PAD nor an EOS token")?;
    let tok_args = SftTokenizeArgs {
        model_max_length: d.model_max_length,
        train_on_inputs: d.train_on_inputs,
        ignore_index: if d.ignore_pad_token_for_loss {
            IGNORE_INDEX
        } else {
            pad_id as i32
        },
    };
    let train = tokenize_conversations(&train_convs, &format, &tokenizer, &tok_args)?;
    let eval = tokenize_conversations(&eval_convs, &format, &tokenizer, &tok_args)?;
    if train.samples.is_empty() {
        bail!(
            "no training samples: {} conversations read from {}, {} had no answer token within model_max_length {}",
            train_convs.len(),
            d.train_file_dir.display(),
            train.all_labels_ignored,
            d.model_max_length
        );
    }
    tracing::info!(
        template = %format.name(),
        train_conversations = train_convs.len(),
        eval_conversations = eval_convs.len(),
        train_samples = train.samples.len(),
        eval_samples = eval.samples.len(),
        turns_dropped = train.turns_dropped + eval.turns_dropped,
        "SFT data ready"
    );

    let mut model = super::load_stage_model(
        be,
        &args.model,
        &args.training,
        Head::CausalLm,
        &tokenizer,
        targs.seed,
    )?;
    let initial_eval = if eval.samples.is_empty() || targs.resume_from_checkpoint.is_some() {
        None
    } else {
        Some(crate::train::evaluate_sharded(
            &mut model,
            &eval.samples,
            targs.per_device_eval_batch_size,
            pad_id,
            collective,
        )?)
    };
    if let (true, Some(e)) = (is_main, &initial_eval) {
        tracing::info!(
            eval_loss = e.loss,
            perplexity = e.perplexity,
            "before training"
        );
    }
    let qa_items = d
        .eval_qa_file
        .as_deref()
        .map(super::qa_eval::read_qa_file)
        .transpose()?;
    let qa = |model: &mut crate::model::Llama<B>, when: &str| -> Result<Option<QaAccuracy>> {
        let Some(items) = qa_items.as_deref().filter(|_| is_main) else {
            return Ok(None);
        };
        let r = super::qa_eval::answer_accuracy(model, &tokenizer, &format, items)?;
        tracing::info!(
            accuracy = r.accuracy,
            correct = r.correct,
            total = r.total,
            samples = ?r.samples,
            "held-out answer accuracy {when} training"
        );
        Ok(Some(r))
    };
    let initial_qa = if targs.resume_from_checkpoint.is_some() {
        None
    } else {
        qa(&mut model, "before")?
    };
    let base = args.model.model_name_or_path.clone();
    let save = |m: &crate::model::Llama<B>, dir: &std::path::Path| {
        super::save_weights(m, dir, &base, &tokenizer_dir)
    };
    targs.show_progress = true;
    let mut dist = Dist {
        collective,
        global_batch,
        hooks,
    };
    let summary = train_dist(
        &mut model,
        &train.samples,
        &eval.samples,
        pad_id,
        &targs,
        &save,
        &mut dist,
    )?;
    let all_labels_ignored = train.all_labels_ignored + eval.all_labels_ignored;
    let mut result = SftResult {
        summary,
        train_samples: train.samples.len(),
        eval_samples: eval.samples.len(),
        initial_eval,
        template: format.name(),
        skipped_invalid,
        all_labels_ignored,
        results: serde_json::Value::Null,
    };
    if !is_main {
        return Ok(result);
    }
    let mut final_qa = None;
    if result.summary.finished {
        super::save_weights(&model, &targs.output_dir, &base, &tokenizer_dir)?;
        final_qa = qa(&mut model, "after")?;
    }
    let mut results = json!({
        "train_loss": result.summary.train_loss,
        "global_step": result.summary.global_step,
        "train_tokens_per_second": result.summary.tokens_per_sec,
        "train_samples": result.train_samples,
        "eval_samples": result.eval_samples,
        "train_conversations": train_convs.len(),
        "eval_conversations": eval_convs.len(),
        "template": result.template,
        "model_max_length": d.model_max_length,
        "skipped_invalid": result.skipped_invalid,
        "dropped_trailing_user_turns": dropped_trailing_user,
        "dropped_all_labels_ignored": all_labels_ignored,
        "dropped_turns_too_long": train.turns_dropped + eval.turns_dropped,
    });
    if let Some(e) = &result.summary.eval {
        results["eval_loss"] = json!(e.loss);
        results["perplexity"] = json!(e.perplexity);
        results["eval_tokens"] = json!(e.tokens);
    }
    if let Some(e) = &result.initial_eval {
        results["initial_eval_loss"] = json!(e.loss);
        results["initial_perplexity"] = json!(e.perplexity);
    }
    if let Some(q) = &initial_qa {
        results["initial_qa_accuracy"] = json!(q.accuracy);
    }
    if let Some(q) = &final_qa {
        results["qa_accuracy"] = json!(q.accuracy);
        results["qa_correct"] = json!(q.correct);
        results["qa_total"] = json!(q.total);
        results["qa_samples"] = json!(q.samples);
    }
    write_json_atomic(&targs.output_dir.join("all_results.json"), &results)
        .with_context(|| format!("writing results to {}", targs.output_dir.display()))?;
    result.results = results;
    Ok(result)
}
