//! `rlhf generate`: completions for a file of prompts with the KV-cache
//! generator, written as JSON lines {prompt, completion, tokens,
//! finish_reason} in prompt order (atomically, once all are done).
//!
//! Prompts are used as given (tokenized with the tokenizer's special tokens,
//! e.g. Llama's BOS), or with `--template_name` as the user turn of a chat.

use super::infer_args::{InferenceModelFlags, ModelFn, SamplingFlags};
use crate::data::chat::{Message, Role};
use crate::data::template::ChatFormat;
use crate::model::generate::{generate_timed, GenTimings, Generated, GenerationConfig};
use crate::model::Llama;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rlhf_kernels::Backend;
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(Args, Clone, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: InferenceModelFlags,
    /// One prompt per line (.txt), or JSON lines with a "prompt" field (.jsonl / .json).
    #[arg(long = "prompts_file")]
    pub prompts_file: PathBuf,
    /// Where the JSON lines go.
    #[arg(long = "output_file")]
    pub output_file: PathBuf,
    #[command(flatten)]
    pub sampling: SamplingFlags,
    /// Prompts per batch (left-padded together).
    #[arg(long = "batch_size", default_value_t = 8)]
    pub batch_size: usize,
    /// Treat each prompt as a user turn of a chat, rendered with this MedicalGPT
    /// template (vicuna, qwen, llama3, ...) or, with `chat_template`, the
    /// tokenizer's own; generation then also stops at the end of the turn.
    /// Without it prompts are used as given.
    #[arg(long = "template_name")]
    pub template_name: Option<String>,
    /// A system turn before each prompt (needs --template_name).
    #[arg(long = "system_prompt")]
    pub system_prompt: Option<String>,
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

/// The text the model sees for one prompt: as given, or as the user turn of
/// a chat (after an optional system turn) ready for the assistant's reply.
pub fn prompt_text(
    prompt: &str,
    format: Option<&ChatFormat>,
    system: Option<&str>,
) -> Result<String> {
    let Some(format) = format else {
        return Ok(prompt.to_string());
    };
    let mut msgs = Vec::new();
    if let Some(s) = system {
        msgs.push(Message {
            role: Role::System,
            content: s.to_string(),
        });
    }
    msgs.push(Message {
        role: Role::User,
        content: prompt.to_string(),
    });
    format.render(&msgs, true)
}

pub fn run(args: &GenerateArgs) -> Result<GenerateSummary> {
    if args.batch_size == 0 {
        bail!("--batch_size must be at least 1");
    }
    let tokenizer = args.model.tokenizer()?;
    let prompts = read_prompts(&args.prompts_file)?;
    let format = match args.template_name.as_deref() {
        None if args.system_prompt.is_some() => {
            bail!("--system_prompt needs --template_name (a chat template to put it in)")
        }
        None => None,
        Some("chat_template") => Some(ChatFormat::resolve(None, &tokenizer)?),
        Some(name) => Some(ChatFormat::resolve(Some(name), &tokenizer)?),
    };
    let cfg = args
        .sampling
        .config(&args.model, &tokenizer, format.as_ref())?;
    let ids = prompts
        .iter()
        .map(|p| {
            let text = prompt_text(p, format.as_ref(), args.system_prompt.as_deref())?;
            tokenizer.encode(&text, true)
        })
        .collect::<Result<Vec<_>>>()?;
    let (outs, timings) = args.model.with_model(Batches {
        args,
        tokenizer: &tokenizer,
        ids: &ids,
        cfg: &cfg,
    })?;
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

/// Every prompt in batches of --batch_size, with a progress bar.
struct Batches<'a> {
    args: &'a GenerateArgs,
    tokenizer: &'a Tokenizer,
    ids: &'a [Vec<u32>],
    cfg: &'a GenerationConfig,
}

impl ModelFn<(Vec<Generated>, GenTimings)> for Batches<'_> {
    fn call<B: Backend>(self, mut model: Llama<B>) -> Result<(Vec<Generated>, GenTimings)> {
        let Batches {
            args,
            tokenizer,
            ids,
            cfg,
        } = self;
        let model = &mut model;
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
            let (outs, t) = generate_timed(model, tokenizer, chunk, &batch_cfg, &mut |_, _| {})
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
}
