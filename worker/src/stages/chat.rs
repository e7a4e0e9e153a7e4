//! `rlhf chat`: talk to a model (+ adapter) in the terminal. Each line typed is
//! a user turn; the whole conversation so far is rendered with the chat format
//! (a MedicalGPT `--template_name`, else the tokenizer's chat_template) and
//! the reply streams out token by token as it is generated.
//!
//! Lines `clear` (forget the conversation) and `exit` / `quit` (or end of
//! input) are commands. `--transcript FILE` writes the conversation, when it
//! ends, as one ShareGPT JSON line (the SFT format), so a chat can become data.

use super::infer_args::{InferenceModelFlags, ModelFn, SamplingFlags};
use crate::data::chat::{Message, Role};
use crate::data::template::ChatFormat;
use crate::model::generate::{generate, GenerationConfig};
use crate::model::Llama;
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result};
use clap::Args;
use rlhf_kernels::Backend;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

#[derive(Args, Clone, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: InferenceModelFlags,
    #[command(flatten)]
    pub sampling: SamplingFlags,
    /// A MedicalGPT template name (vicuna, qwen, llama3, ...); default: the tokenizer's chat_template.
    #[arg(long = "template_name")]
    pub template_name: Option<String>,
    /// A system turn at the start of the conversation.
    #[arg(long = "system_prompt")]
    pub system_prompt: Option<String>,
    /// Write the conversation here (one ShareGPT JSON line) when the chat ends.
    #[arg(long = "transcript")]
    pub transcript: Option<PathBuf>,
}

pub fn run(args: &ChatArgs) -> Result<()> {
    let tokenizer = args.model.tokenizer()?;
    let format = ChatFormat::resolve(args.template_name.as_deref(), &tokenizer)?;
    let cfg = args
        .sampling
        .config(&args.model, &tokenizer, Some(&format))?;
    let history = args.model.with_model(Session {
        tokenizer: &tokenizer,
        format: &format,
        cfg: &cfg,
        system: args.system_prompt.as_deref(),
    })?;
    if let Some(path) = &args.transcript {
        write_transcript(path, &history)?;
    }
    Ok(())
}

struct Session<'a> {
    tokenizer: &'a Tokenizer,
    format: &'a ChatFormat,
    cfg: &'a GenerationConfig,
    system: Option<&'a str>,
}

impl ModelFn<Vec<Message>> for Session<'_> {
    fn call<B: Backend>(self, mut model: Llama<B>) -> Result<Vec<Message>> {
        let stdin = std::io::stdin();
        let interactive = stdin.is_terminal();
        if interactive {
            eprintln!(
                "chat format: {} (type `clear` to start over, `exit` to quit)",
                self.format.name()
            );
        }
        chat_session(
            &mut model,
            self.tokenizer,
            self.format,
            self.cfg,
            self.system,
            stdin.lock(),
            &mut std::io::stdout().lock(),
            interactive,
        )
    }
}

/// The chat loop over any input and output (tests drive it with strings):
/// one reply line per user line, streamed as generated. Returns the
/// conversation as it stands at the end.
#[allow(clippy::too_many_arguments)]
pub fn chat_session<B: Backend>(
    model: &mut Llama<B>,
    tokenizer: &Tokenizer,
    format: &ChatFormat,
    cfg: &GenerationConfig,
    system: Option<&str>,
    input: impl BufRead,
    out: &mut dyn Write,
    interactive: bool,
) -> Result<Vec<Message>> {
    let start = || -> Vec<Message> {
        system
            .map(|s| Message {
                role: Role::System,
                content: s.to_string(),
            })
            .into_iter()
            .collect()
    };
    let mut history = start();
    let mut lines = input.lines();
    for turn in 0u64.. {
        if interactive {
            eprint!(">>> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading the next chat line")?;
        match line.trim() {
            "" => continue,
            "exit" | "quit" => break,
            "clear" => {
                history = start();
                writeln!(out, "(conversation cleared)")?;
                continue;
            }
            _ => {}
        }
        history.push(Message {
            role: Role::User,
            content: line.trim_end().to_string(),
        });
        let prompt = tokenizer.encode(&format.render(&history, true)?, true)?;
        let turn_cfg = GenerationConfig {
            seed: cfg.seed.wrapping_add(turn),
            ..cfg.clone()
        };
        // Stream each piece as it is final; an error writing it ends the chat after this turn.
        let mut write_err = None;
        let reply = generate(model, tokenizer, &[prompt], &turn_cfg, &mut |_, piece| {
            if write_err.is_none() {
                if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                    write_err = Some(e);
                }
            }
        })?;
        if let Some(e) = write_err {
            return Err(e).context("writing the reply");
        }
        writeln!(out)?;
        let text = reply.into_iter().next().map(|g| g.text).unwrap_or_default();
        history.push(Message {
            role: Role::Assistant,
            content: text.trim().to_string(),
        });
    }
    Ok(history)
}

/// The conversation as one ShareGPT line: `{"conversations": [{"from", "value"}...]}`.
fn write_transcript(path: &std::path::Path, history: &[Message]) -> Result<()> {
    let turns: Vec<serde_json::Value> = history
        .iter()
        .map(|m| {
            let from = match m.role {
                Role::System => "system",
                Role::User => "human",
                Role::Assistant => "gpt",
            };
            serde_json::json!({"from": from, "value": m.content})
        })
        .collect();
    let line = serde_json::json!({ "conversations": turns }).to_string() + "\n";
    crate::fsutil::write_atomic(path, line.as_bytes())
}
