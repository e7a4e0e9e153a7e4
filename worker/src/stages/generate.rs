//! `rlhf generate`: completions for a file of prompts with the KV-cache
//! generator, written as JSON lines {prompt, completion, tokens,
//! finish_reason} in prompt order (atomically, once all are done).
//!
//! Prompts are used as given (tokenized with the tokenizer's special tokens,
//! e.g. Llama's BOS). Chat templating (`--template_name`) is not applied
//! here yet: `prompt_text` below is where a template would wrap each prompt.

use super::args::{parse_bool, Device};
use crate::model::generate::{generate_timed, GenTimings, Generated, GenerationConfig};
use crate::model::pretrained::{load_model, read_adapter_config};
use crate::model::TrainMode;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rlhf_kernels::cuda::{Cuda, Dtype};
use rlhf_kernels::{Backend, Cpu};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(Args, Clone, Debug)]
pub struct GenerateArgs {
    #[arg(long = "model_name_or_path")]
    pub model_name_or_path: PathBuf,
    #[arg(long = "tokenizer_name_or_path")]
    pub tokenizer_name_or_path: Option<PathBuf>,
    /// A PEFT adapter dir, applied unmerged.
    #[arg(long = "peft_path")]
    pub peft_path: Option<PathBuf>,
    /// One prompt per line (.txt), or JSON lines with a "prompt" field (.jsonl / .json).
    #[arg(long = "prompts_file")]
    pub prompts_file: PathBuf,
    /// Where the JSON lines go.
    #[arg(long = "output_file")]
    pub output_file: PathBuf,
    #[arg(long = "max_new_tokens")]
    pub max_new_tokens: Option<usize>,
    /// Sample instead of greedy decoding (default: generation_config.json's, else false).
    #[arg(long = "do_sample", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub do_sample: Option<bool>,
    #[arg(long = "temperature")]
    pub temperature: Option<f32>,
    #[arg(long = "top_k")]
    pub top_k: Option<usize>,
    #[arg(long = "top_p")]
    pub top_p: Option<f32>,
    #[arg(long = "repetition_penalty")]
    pub repetition_penalty: Option<f32>,
    /// Extra stop strings (the text is cut before them).
    #[arg(long = "stop", num_args = 1..)]
    pub stop: Vec<String>,
    /// Prompts per batch (left-padded together).
    #[arg(long = "batch_size", default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long = "seed", default_value_t = 42)]
    pub seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long = "device", default_value = "cpu")]
    pub device: Device,
    /// On CUDA: compute in bf16 (else f32).
    #[arg(long = "bf16", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub bf16: Option<bool>,
}

/// What a run did, also printed as JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateSummary {
    pub prompts: usize,
    pub generated_tokens: usize,
    pub timings: GenTimings,
}

/// Reads the prompts: `.jsonl`/`.json` as JSON lines with a string "prompt",
/// anything else one prompt per line. An empty prompt (a blank line of a text
/// file, "" in JSON) is an error naming file:line.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading prompts file {}", path.display()))?;
    let json = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl" | "json")
    );
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = || format!("{}:{}", path.display(), i + 1);
        if json && line.trim().is_empty() {
            continue; // blank lines between JSON records carry no prompt
        }
        let prompt = if json {
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("{}: not a JSON object", at()))?;
            match v.get("prompt") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => bail!("{}: field \"prompt\" must be a string, got {other}", at()),
                None => bail!(
                    "{}: missing field \"prompt\" (expected {{\"prompt\": \"...\"}})",
                    at()
                ),
            }
        } else {
            line.to_string()
        };
        if prompt.trim().is_empty() {
            bail!("{}: the prompt is empty", at());
        }
        prompts.push(prompt);
    }
    if prompts.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(prompts)
}

/// The text the model sees for one prompt (a chat template goes here).
fn prompt_text(prompt: &str) -> String {
    prompt.to_string()
}

pub fn run(args: &GenerateArgs) -> Result<GenerateSummary> {
    if args.batch_size == 0 {
        bail!("--batch_size must be at least 1");
    }
    let tok_dir = args
        .tokenizer_name_or_path
        .clone()
        .unwrap_or_else(|| args.model_name_or_path.clone());
    let tokenizer = Tokenizer::load(&tok_dir)?;
    let prompts = read_prompts(&args.prompts_file)?;
    let mut cfg = GenerationConfig::from_model_dir(&args.model_name_or_path)?;
    if cfg.eos_token_ids.is_empty() {
        cfg.eos_token_ids.extend(tokenizer.eos_id());
    }
    cfg.max_new_tokens = args.max_new_tokens.unwrap_or(cfg.max_new_tokens);
    cfg.do_sample = args.do_sample.unwrap_or(cfg.do_sample);
    cfg.temperature = args.temperature.unwrap_or(cfg.temperature);
    cfg.top_k = args.top_k.unwrap_or(cfg.top_k);
    cfg.top_p = args.top_p.unwrap_or(cfg.top_p);
    cfg.repetition_penalty = args.repetition_penalty.unwrap_or(cfg.repetition_penalty);
    cfg.stop_strings.extend(args.stop.iter().cloned());
    cfg.seed = args.seed;
    cfg.validate()?;
    let ids = prompts
        .iter()
        .map(|p| tokenizer.encode(&prompt_text(p), true))
        .collect::<Result<Vec<_>>>()?;
    let mode = match &args.peft_path {
        Some(p) => TrainMode::Lora(read_adapter_config(p)?),
        None => TrainMode::Full,
    };
    let (outs, timings) = match args.device {
        Device::Cpu => generate_on(Cpu, args, mode, &tokenizer, &ids, &cfg)?,
        Device::Cuda(n) => {
            let dtype = if args.bf16 == Some(true) {
                Dtype::Bf16
            } else {
                Dtype::F32
            };
            generate_on(Cuda::new(n, dtype)?, args, mode, &tokenizer, &ids, &cfg)?
        }
    };
    let mut lines = String::new();
    for (prompt, g) in prompts.iter().zip(&outs) {
        let line = json!({
            "prompt": prompt,
            "completion": g.text,
            "tokens": g.token_ids.len(),
            "finish_reason": g.finish_reason,
        });
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    crate::fsutil::write_atomic(&args.output_file, lines.as_bytes())?;
    let summary = GenerateSummary {
        prompts: prompts.len(),
        generated_tokens: outs.iter().map(|g| g.token_ids.len()).sum(),
        timings,
    };
    tracing::info!(
        "{} completions, {} tokens: prefill {:.1} tokens/s, decode {:.1} tokens/s",
        summary.prompts,
        summary.generated_tokens,
        per_s(timings.prefill_tokens, timings.prefill_s),
        per_s(timings.decode_tokens, timings.decode_s),
    );
    Ok(summary)
}

pub fn per_s(tokens: usize, s: f64) -> f64 {
    if s > 0.0 {
        tokens as f64 / s
    } else {
        0.0
    }
}

fn generate_on<B: Backend>(
    be: B,
    args: &GenerateArgs,
    mode: TrainMode,
    tokenizer: &Tokenizer,
    ids: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<(Vec<Generated>, GenTimings)> {
    let mut model = load_model(be, &args.model_name_or_path, mode, 0)?;
    if let Some(p) = &args.peft_path {
        model.load_adapter(p)?;
    }
    let bar = ProgressBar::with_draw_target(
        Some(ids.len() as u64),
        if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} prompts  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut all = Vec::with_capacity(ids.len());
    let mut total = GenTimings::default();
    for (bi, chunk) in ids.chunks(args.batch_size).enumerate() {
        // Each batch draws from its own seeds, so a prompt's sample does not
        // depend on how many batches came before it.
        let batch_cfg = GenerationConfig {
            seed: cfg.seed.wrapping_add((bi * args.batch_size) as u64),
            ..cfg.clone()
        };
        let (outs, t) = generate_timed(&mut model, tokenizer, chunk, &batch_cfg, &mut |_, _| {})
            .with_context(|| {
                format!(
                    "generating for prompts {}..{}",
                    bi * args.batch_size + 1,
                    bi * args.batch_size + chunk.len()
                )
            })?;
        total.prefill_tokens += t.prefill_tokens;
        total.prefill_s += t.prefill_s;
        total.decode_tokens += t.decode_tokens;
        total.decode_s += t.decode_s;
        all.extend(outs);
        bar.inc(chunk.len() as u64);
        bar.set_message(format!(
            "{:.1} tokens/s",
            per_s(total.decode_tokens, total.decode_s)
        ));
    }
    bar.finish_and_clear();
    Ok((all, total))
}
