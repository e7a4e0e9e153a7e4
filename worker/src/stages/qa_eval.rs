//! Exact-answer accuracy on held-out questions: what SFT is for, measured the
//! way a user would check it — ask the question through the chat template,
//! decode greedily, and look for the known short answer in the reply.
//!
//! File format (`--eval_qa_file`, JSON lines; the demo writes
//! `data/heldout_qa.jsonl`): `{"question": "...", "short": "..."}` per line,
//! where `short` is the fact a correct reply must contain (whole words, case
//! insensitive). Other fields are ignored.

use crate::collective::Collective;
use crate::data::chat::{Message, Role};
use crate::data::template::ChatFormat;
use crate::demo::FactQuestion;
use crate::model::generate::{generate, GenerationConfig};
use crate::model::Llama;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use rlhf_kernels::Backend;
use serde::Serialize;
use std::path::Path;

/// Questions generated per batch (left-padded, KV cache).
const BATCH: usize = 16;
/// The demo's answers are a few words; a reply longer than this is wrong anyway.
const MAX_NEW_TOKENS: usize = 32;

/// Accuracy and a few sample replies (for the log and all_results.json).
#[derive(Clone, Debug, Serialize)]
pub struct QaAccuracy {
    pub accuracy: f64,
    pub correct: usize,
    pub total: usize,
    /// The first few (question, reply, correct) for a human to look at.
    pub samples: Vec<(String, String, bool)>,
}

/// Read a held-out QA file (see the module doc).
pub fn read_qa_file(path: &Path) -> Result<Vec<FactQuestion>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let field = |k: &str| -> Result<String> {
            match v.get(k).and_then(|x| x.as_str()) {
                Some(s) if !s.trim().is_empty() => Ok(s.to_string()),
                _ => bail!("{}: field \"{k}\" must be a non-empty string", at()),
            }
        };
        out.push(FactQuestion {
            question: field("question")?,
            short: field("short")?,
            answer: String::new(),
            wrong: String::new(),
        });
    }
    if out.is_empty() {
        bail!("{}: no questions", path.display());
    }
    Ok(out)
}

/// Greedy replies to `items` through `format`, scored by whole-word match.
pub fn answer_accuracy<B: Backend>(
    model: &mut Llama<B>,
    tokenizer: &Tokenizer,
    format: &ChatFormat,
    items: &[FactQuestion],
) -> Result<QaAccuracy> {
    let cfg = qa_greedy_config(tokenizer, format)?;
    answer_accuracy_with(model, tokenizer, format, items, &cfg)
}

/// The greedy decoding [`answer_accuracy`] uses.
pub fn qa_greedy_config(tokenizer: &Tokenizer, format: &ChatFormat) -> Result<GenerationConfig> {
    greedy_config(tokenizer, format, MAX_NEW_TOKENS)
}

/// [`answer_accuracy_with`] over the ranks of a stage: batch c of the
/// questions is asked by rank c mod world and the counts are summed, so no
/// rank waits in a collective while another evaluates (a long wait would
/// look like a dead peer). The samples are rank 0's: the first questions.
pub fn answer_accuracy_dist<B: Backend>(
    model: &mut Llama<B>,
    collective: &mut dyn Collective<B>,
    tokenizer: &Tokenizer,
    format: &ChatFormat,
    items: &[FactQuestion],
    cfg: &GenerationConfig,
) -> Result<QaAccuracy> {
    let (rank, world) = (collective.rank(), collective.world_size());
    let mine: Vec<FactQuestion> = items
        .chunks(BATCH)
        .enumerate()
        .filter(|(c, _)| c % world == rank)
        .flat_map(|(_, c)| c.iter().cloned())
        .collect();
    let local = answer_accuracy_with(model, tokenizer, format, &mine, cfg)?;
    let [correct] =
        crate::rl::shares::sum(model, collective, world, &[(rank, [local.correct as f64])])?;
    Ok(QaAccuracy {
        accuracy: correct / items.len().max(1) as f64,
        correct: correct as usize,
        total: items.len(),
        samples: local.samples,
    })
}

/// [`answer_accuracy`] with the given decoding (e.g. sampling, as RL rollouts do).
pub fn answer_accuracy_with<B: Backend>(
    model: &mut Llama<B>,
    tokenizer: &Tokenizer,
    format: &ChatFormat,
    items: &[FactQuestion],
    cfg: &GenerationConfig,
) -> Result<QaAccuracy> {
    let mut correct = 0;
    let mut samples = Vec::new();
    for chunk in items.chunks(BATCH) {
        let prompts = chunk
            .iter()
            .map(|f| {
                let msgs = [Message {
                    role: Role::User,
                    content: f.question.clone(),
                }];
                tokenizer.encode(&format.render(&msgs, true)?, true)
            })
            .collect::<Result<Vec<_>>>()?;
        let replies = generate(model, tokenizer, &prompts, cfg, &mut |_, _| {})?;
        for (f, g) in chunk.iter().zip(replies) {
            let ok = f.is_answered_by(&g.text);
            correct += ok as usize;
            if samples.len() < 3 {
                samples.push((f.question.clone(), g.text.trim().to_string(), ok));
            }
        }
    }
    Ok(QaAccuracy {
        accuracy: correct as f64 / items.len().max(1) as f64,
        correct,
        total: items.len(),
        samples,
    })
}

/// Greedy decoding that stops where the chat format ends a turn: the
/// tokenizer's EOS, and each stop string — as a token id when it is a single
/// special token (decoded text skips special tokens, so it would never be
/// seen as text), else as text.
pub fn greedy_config(
    tokenizer: &Tokenizer,
    format: &ChatFormat,
    max_new_tokens: usize,
) -> Result<GenerationConfig> {
    let mut cfg = GenerationConfig {
        max_new_tokens,
        do_sample: false,
        ..GenerationConfig::default()
    };
    cfg.eos_token_ids.extend(tokenizer.eos_id());
    for s in format.stop_strings() {
        match tokenizer.encode(&s, false)?.as_slice() {
            [id] if tokenizer.decode(&[*id], true)?.is_empty() => {
                if !cfg.eos_token_ids.contains(id) {
                    cfg.eos_token_ids.push(*id);
                }
            }
            _ => cfg.stop_strings.push(s),
        }
    }
    Ok(cfg)
}
