//! `rlhf eval`: loss and perplexity of a model (+ adapter) on a text file,
//! tokenized and packed exactly as `rlhf pt` does, as one JSON object.

use super::args::parse_bool;
use super::infer_args::{InferenceModelFlags, ModelFn};
use crate::data::pretrain::{build_pt_blocks, read_text_dir, PtDataArgs};
use crate::model::Llama;
use crate::train::{evaluate, EvalResult, Sample};
use anyhow::{Context, Result};
use clap::Args;
use rlhf_kernels::Backend;
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Args, Clone, Debug)]
pub struct EvalArgs {
    /// The model (+ `--peft_path` adapter) and the device.
    #[command(flatten)]
    pub model: InferenceModelFlags,
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
    let tokenizer = args.model.tokenizer()?;
    // read_text_dir takes a folder or a single file.
    let docs = read_text_dir(&args.validation_file, args.keep_linebreaks)?;
    // Tokenized and packed exactly as `rlhf pt` does, every document kept
    // (none split off for validation); max_eval_samples caps the blocks.
    let data_args = PtDataArgs {
        block_size: args.block_size,
        validation_split_percentage: 0,
        max_train_samples: args.max_eval_samples,
        max_eval_samples: None,
    };
    let packed = build_pt_blocks(&tokenizer, &docs, Some(&[]), &data_args)
        .with_context(|| format!("preparing {}", args.validation_file.display()))?;
    let (blocks, block_size) = (packed.train, packed.block_size);
    let samples: Vec<Sample> = blocks.into_iter().map(Sample::causal).collect();
    // The same padding id `rlhf pt` uses (only a short last block is ever padded).
    let pad = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0);
    let r = args.model.with_model(Evaluate {
        samples: &samples,
        batch_size: args.per_device_eval_batch_size,
        pad,
    })?;
    Ok(json!({
        "loss": r.loss,
        "perplexity": r.perplexity,
        "tokens": r.tokens,
        "blocks": samples.len(),
        "block_size": block_size,
        "documents": docs.len(),
    }))
}

/// The loss over the packed blocks, on whichever device the model was loaded.
struct Evaluate<'a> {
    samples: &'a [Sample],
    batch_size: usize,
    pad: u32,
}

impl ModelFn<EvalResult> for Evaluate<'_> {
    fn call<B: Backend>(self, mut model: Llama<B>) -> Result<EvalResult> {
        evaluate(&mut model, self.samples, self.batch_size, self.pad)
    }
}
