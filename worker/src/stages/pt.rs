//! `rlhf pt`: continued pre-training (MedicalGPT `pretraining.py`): text files
//! → tokens → EOS-joined blocks of block_size → causal-LM training.

use super::args::{parse_bool, ModelArgs, TrainingArgs};
use crate::collective::Collective;
use crate::data::pretrain::{build_pt_blocks, read_text_dir, PtDataArgs};
use crate::fsutil::write_json_atomic;
use crate::model::params::Head;
use crate::model::weights::SaveDtype;
use crate::tokenizer::Tokenizer;
use crate::train::{train_dist, Dist, EvalResult, Sample, TrainHooks, TrainSummary};
use anyhow::{Context, Result};
use clap::Args;
use rlhf_kernels::Backend;
use serde_json::json;
use std::path::PathBuf;

/// `DataArguments` of MedicalGPT's PT stage.
#[derive(Args, Clone, Debug)]
pub struct PtDataFlags {
    /// Folder of .txt / .json / .jsonl files ({"text": ...} per record).
    #[arg(long = "train_file_dir")]
    pub train_file_dir: PathBuf,
    /// Folder of validation files; without it, validation_split_percentage of the training documents.
    #[arg(long = "validation_file_dir")]
    pub validation_file_dir: Option<PathBuf>,
    #[arg(long = "block_size", default_value_t = 1024)]
    pub block_size: usize,
    #[arg(long = "validation_split_percentage", default_value_t = 1)]
    pub validation_split_percentage: u32,
    #[arg(long = "max_train_samples")]
    pub max_train_samples: Option<usize>,
    #[arg(long = "max_eval_samples")]
    pub max_eval_samples: Option<usize>,
    #[arg(long = "keep_linebreaks", default_value = "true", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub keep_linebreaks: bool,
}

#[derive(Args, Clone, Debug)]
pub struct PtArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: PtDataFlags,
    #[command(flatten)]
    pub training: TrainingArgs,
}

/// What `rlhf pt` reports at the end (also written to output_dir/all_results.json).
#[derive(Clone, Debug)]
pub struct PtResult {
    pub summary: TrainSummary,
    pub train_blocks: usize,
    pub eval_blocks: usize,
    pub initial_eval: Option<EvalResult>,
    /// all_results.json as written (rank 0; Null on other ranks).
    pub results: serde_json::Value,
}

/// One rank of a data-parallel PT stage. `global_batch` defaults to
/// world × per-device batch × accumulation. Every rank reads the whole data
/// set (the split between ranks is by sample index); rank 0 writes the outputs.
pub fn run_dist<B: Backend>(
    be: B,
    args: &PtArgs,
    collective: &mut dyn Collective<B>,
    global_batch: Option<usize>,
    hooks: &mut dyn TrainHooks,
) -> Result<PtResult> {
    let is_main = collective.rank() == 0;
    let mut targs = args.training.to_train_args()?;
    SaveDtype::from_torch_dtype(args.model.torch_dtype.as_deref())?;
    let tokenizer_dir = args.model.tokenizer_dir();
    let tokenizer = Tokenizer::load(&tokenizer_dir)?;
    let train_docs = read_text_dir(&args.data.train_file_dir, args.data.keep_linebreaks)?;
    let valid_docs = args
        .data
        .validation_file_dir
        .as_ref()
        .map(|d| read_text_dir(d, args.data.keep_linebreaks))
        .transpose()?;
    let data_args = PtDataArgs {
        block_size: args.data.block_size,
        validation_split_percentage: args.data.validation_split_percentage,
        max_train_samples: args.data.max_train_samples,
        max_eval_samples: args.data.max_eval_samples,
    };
    let blocks = build_pt_blocks(&tokenizer, &train_docs, valid_docs.as_deref(), &data_args)?;
    tracing::info!(
        train_docs = blocks.train_docs,
        eval_docs = blocks.eval_docs,
        train_blocks = blocks.train.len(),
        eval_blocks = blocks.eval.len(),
        block_size = blocks.block_size,
        "PT data ready"
    );
    let pad_id = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0);
    let train_samples: Vec<Sample> = blocks.train.into_iter().map(Sample::causal).collect();
    let eval_samples: Vec<Sample> = blocks.eval.into_iter().map(Sample::causal).collect();

    let mut model = super::load_stage_model(
        be,
        &args.model,
        &args.training,
        Head::CausalLm,
        &tokenizer,
        targs.seed,
    )?;
    let initial_eval = if eval_samples.is_empty() || targs.resume_from_checkpoint.is_some() {
        None
    } else {
        Some(crate::train::evaluate_sharded(
            &mut model,
            &eval_samples,
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
        &train_samples,
        &eval_samples,
        pad_id,
        &targs,
        &save,
        &mut dist,
    )?;
    let result = PtResult {
        train_blocks: train_samples.len(),
        eval_blocks: eval_samples.len(),
        summary,
        initial_eval,
        results: serde_json::Value::Null,
    };
    if !is_main {
        return Ok(result);
    }
    let PtResult {
        summary,
        initial_eval,
        ..
    } = result;
    if summary.finished {
        super::save_weights(&model, &targs.output_dir, &base, &tokenizer_dir)?;
    }
    let mut results = json!({
        "train_loss": summary.train_loss,
        "global_step": summary.global_step,
        "train_tokens_per_second": summary.tokens_per_sec,
        "train_samples": train_samples.len(),
        "eval_samples": eval_samples.len(),
    });
    if let Some(e) = &summary.eval {
        results["eval_loss"] = json!(e.loss);
        results["perplexity"] = json!(e.perplexity);
        results["eval_tokens"] = json!(e.tokens);
    }
    if let Some(e) = &initial_eval {
        results["initial_eval_loss"] = json!(e.loss);
        results["initial_perplexity"] = json!(e.perplexity);
    }
    write_json_atomic(&targs.output_dir.join("all_results.json"), &results)
        .with_context(|| format!("writing results to {}", targs.output_dir.display()))?;
    Ok(PtResult {
        train_blocks: train_samples.len(),
        eval_blocks: eval_samples.len(),
        summary,
        initial_eval,
        results,
    })
}
