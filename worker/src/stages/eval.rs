//! `rlhf eval`: loss and perplexity of a model (+ adapter) on a text file,
//! tokenized and packed exactly as `rlhf pt` does, as one JSON object.

use super::args::parse_bool;
use crate::data::pretrain::{pt_blocks_from_tokens, read_data_file, PtDataArgs};
use crate::model::pretrained::{load_model, read_adapter_config};
use crate::model::TrainMode;
use crate::tokenizer::Tokenizer;
use crate::train::{evaluate, Sample};
use anyhow::{Context, Result};
use clap::Args;
use rlhf_kernels::Cpu;
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Args, Clone, Debug)]
pub struct EvalArgs {
    #[arg(long = "model_name_or_path")]
    pub model_name_or_path: PathBuf,
    #[arg(long = "tokenizer_name_or_path")]
    pub tokenizer_name_or_path: Option<PathBuf>,
    /// A PEFT adapter dir to apply on the model.
    #[arg(long = "peft_path")]
    pub peft_path: Option<PathBuf>,
    /// A .txt, .json or .jsonl file (or a folder of them).
    #[arg(long = "validation_file")]
    pub validation_file: PathBuf,
    #[arg(long = "block_size", default_value_t = 1024)]
    pub block_size: usize,
    #[arg(long = "per_device_eval_batch_size", default_value_t = 8)]
    pub per_device_eval_batch_size: usize,
    #[arg(long = "max_eval_samples")]
    pub max_eval_samples: Option<usize>,
    #[arg(long = "keep_linebreaks", default_value = "true", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub keep_linebreaks: bool,
}

pub fn run(args: &EvalArgs) -> Result<Value> {
    let tok_dir = args
        .tokenizer_name_or_path
        .clone()
        .unwrap_or_else(|| args.model_name_or_path.clone());
    let tokenizer = Tokenizer::load(&tok_dir)?;
    let docs = if args.validation_file.is_dir() {
        crate::data::pretrain::read_text_dir(&args.validation_file, args.keep_linebreaks)?
    } else {
        read_data_file(&args.validation_file, args.keep_linebreaks)?
    };
    let texts: Vec<String> = docs.iter().map(|d| d.text.clone()).collect();
    let tokens = tokenizer
        .encode_batch(&texts, true)
        .with_context(|| format!("tokenizing {}", args.validation_file.display()))?;
    let eos = tokenizer
        .eos_id()
        .or(tokenizer.pad_id())
        .context("the tokenizer has neither eos_token nor pad_token")?;
    let mut block_size = args.block_size;
    if let Some(max) = tokenizer.model_max_length().filter(|&m| m < block_size) {
        block_size = max;
    }
    let data_args = PtDataArgs {
        block_size,
        validation_split_percentage: 0,
        max_train_samples: None,
        max_eval_samples: None,
    };
    // Everything is "train" here: all documents are packed, none split off.
    let mut blocks =
        pt_blocks_from_tokens(tokens, Some(Vec::new()), eos, block_size, &data_args)?.train;
    if let Some(n) = args.max_eval_samples.filter(|&n| n > 0) {
        blocks.truncate(n);
    }
    let samples: Vec<Sample> = blocks.into_iter().map(Sample::causal).collect();
    let mode = match &args.peft_path {
        Some(p) => TrainMode::Lora(read_adapter_config(p)?),
        None => TrainMode::Full,
    };
    let mut model = load_model(Cpu, &args.model_name_or_path, mode, 0)?;
    if let Some(p) = &args.peft_path {
        model.load_adapter(p)?;
    }
    let pad = tokenizer.pad_id().unwrap_or(eos);
    let r = evaluate(&mut model, &samples, args.per_device_eval_batch_size, pad)?;
    Ok(json!({
        "loss": r.loss,
        "perplexity": r.perplexity,
        "tokens": r.tokens,
        "blocks": samples.len(),
        "block_size": block_size,
        "documents": docs.len(),
    }))
}
