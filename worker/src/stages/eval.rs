//! `rlhf eval`: loss and perplexity of a model (+ adapter) on a text file,
//! tokenized and packed exactly as `rlhf pt` does, as one JSON object.

use super::args::parse_bool;
use super::args::Device;
use crate::data::pretrain::{build_pt_blocks, read_text_dir, PtDataArgs};
use crate::model::pretrained::{load_model, read_adapter_config};
use crate::model::TrainMode;
use crate::tokenizer::Tokenizer;
use crate::train::EvalResult;
use crate::train::{evaluate, Sample};
use anyhow::{Context, Result};
use clap::Args;
use rlhf_kernels::cuda::{Cuda, Dtype};
use rlhf_kernels::{Backend, Cpu};
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
    /// cpu, cuda or cuda:N.
    #[arg(long = "device", default_value = "cpu")]
    pub device: Device,
    /// On CUDA: compute in bf16 (else f32).
    #[arg(long = "bf16", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub bf16: Option<bool>,
}

pub fn run(args: &EvalArgs) -> Result<Value> {
    let tok_dir = args
        .tokenizer_name_or_path
        .clone()
        .unwrap_or_else(|| args.model_name_or_path.clone());
    let tokenizer = Tokenizer::load(&tok_dir)?;
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
    let mode = match &args.peft_path {
        Some(p) => TrainMode::Lora(read_adapter_config(p)?),
        None => TrainMode::Full,
    };
    // The same padding id `rlhf pt` uses (only a short last block is ever padded).
    let pad = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0);
    let r = match args.device {
        Device::Cpu => eval_on(Cpu, args, mode, &samples, pad)?,
        Device::Cuda(n) => {
            let dtype = if args.bf16 == Some(true) {
                Dtype::Bf16
            } else {
                Dtype::F32
            };
            eval_on(Cuda::new(n, dtype)?, args, mode, &samples, pad)?
        }
    };
    Ok(json!({
        "loss": r.loss,
        "perplexity": r.perplexity,
        "tokens": r.tokens,
        "blocks": samples.len(),
        "block_size": block_size,
        "documents": docs.len(),
    }))
}

fn eval_on<B: Backend>(
    be: B,
    args: &EvalArgs,
    mode: TrainMode,
    samples: &[Sample],
    pad: u32,
) -> Result<EvalResult> {
    let mut model = load_model(be, &args.model_name_or_path, mode, 0)?;
    if let Some(p) = &args.peft_path {
        model.load_adapter(p)?;
    }
    evaluate(&mut model, samples, args.per_device_eval_batch_size, pad)
}
