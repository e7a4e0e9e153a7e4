//! Prompts for the RL stages. MedicalGPT reuses SFT data: every human turn of
//! a ShareGPT conversation is a prompt, and the gpt answers are not trained
//! on. Unlike MedicalGPT (whose later-turn prompts lose the history), a
//! prompt here keeps the turns before it, so the policy and the reward model
//! see the whole conversation.

use crate::data::chat::{read_sft_dir, Message, Role};
use crate::data::reward::PreferencePair;
use crate::data::template::ChatFormat;
use crate::stages::rm::PairFormat;
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result};
use std::path::Path;

/// One prompt: a conversation ending with a user turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt {
    pub system: Option<String>,
    /// Earlier (question, answer) turns, oldest first.
    pub history: Vec<(String, String)>,
    pub question: String,
    /// The data's own answer to `question` (not trained on; rule rewards and
    /// answer checks may use it).
    pub reference: Option<String>,
}

impl Prompt {
    /// The messages the policy is asked to continue.
    pub fn messages(&self) -> Vec<Message> {
        let mut out = Vec::new();
        if let Some(s) = &self.system {
            out.push(Message::system(s.as_str()));
        }
        for (q, a) in &self.history {
            out.push(Message::new(Role::User, q.as_str()));
            out.push(Message::new(Role::Assistant, a.as_str()));
        }
        out.push(Message::new(Role::User, self.question.as_str()));
        out
    }

    /// The policy's input text: the conversation with the generation prompt.
    pub fn render(&self, format: &ChatFormat) -> Result<String> {
        format.render(&self.messages(), true)
    }

    /// The reward model's text before the response (the conversation with
    /// the generation prompt, as the RM's format renders it).
    pub fn render_reward_prompt(&self, format: &PairFormat) -> Result<String> {
        format.render_prompt(&self.as_pair())
    }

    fn as_pair(&self) -> PreferencePair {
        PreferencePair {
            system: self.system.clone(),
            history: self.history.clone(),
            question: self.question.clone(),
            chosen: String::new(),
            rejected: String::new(),
        }
    }

    /// The reward model's input text for `response` (as the RM was trained:
    /// the conversation with the response as the last assistant turn).
    pub fn render_for_reward(&self, format: &PairFormat, response: &str) -> Result<String> {
        format.render(&self.as_pair(), response)
    }
}

/// Every human turn of every conversation under `dir` as a prompt, in file
/// order (bad records are errors unless `skip_invalid`, then counted in the log).
pub fn read_prompt_dir(dir: &Path, skip_invalid: bool) -> Result<Vec<Prompt>> {
    let records = read_sft_dir(dir, skip_invalid)?;
    let mut out = Vec::new();
    for conv in &records.conversations {
        let turns = conv.turns();
        for (i, (q, a)) in turns.iter().enumerate() {
            out.push(Prompt {
                system: conv.system().map(str::to_string),
                history: turns[..i]
                    .iter()
                    .map(|(q, a)| (q.to_string(), a.to_string()))
                    .collect(),
                question: q.to_string(),
                reference: Some(a.to_string()),
            });
        }
    }
    if out.is_empty() {
        anyhow::bail!("no prompts in {}", dir.display());
    }
    Ok(out)
}

/// A prompt with its tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenisedPrompt {
    pub prompt: Prompt,
    pub ids: Vec<u32>,
}

/// Tokenise prompts with the policy's chat format; prompts longer than
/// `max_source_length` tokens are left out (their count is returned), as
/// cutting one would cut off its generation prompt.
pub fn tokenise_prompts(
    prompts: Vec<Prompt>,
    tokenizer: &Tokenizer,
    format: &ChatFormat,
    max_source_length: usize,
) -> Result<(Vec<TokenisedPrompt>, usize)> {
    let mut out = Vec::with_capacity(prompts.len());
    let mut too_long = 0;
    for prompt in prompts {
        let text = prompt.render(format)?;
        let ids = tokenizer
            .encode(&text, true)
            .with_context(|| format!("tokenising the prompt {:?}", prompt.question))?;
        if ids.is_empty() || ids.len() > max_source_length {
            too_long += 1;
            continue;
        }
        out.push(TokenisedPrompt { prompt, ids });
    }
    Ok((out, too_long))
}

/// The prompt of global position `pos` in a run's stream of prompts (a
/// rollout's in PPO, a group's in GRPO): passes over the `n` prompts, each in
/// an order shuffled from (seed, pass).
pub fn prompt_at(n: usize, seed: u64, pos: u64) -> usize {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let pass = pos / n as u64;
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
        seed ^ (pass + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5050_5050,
    );
    order.shuffle(&mut rng);
    order[(pos % n as u64) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_human_turn_is_a_prompt_with_its_history() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.jsonl"),
            concat!(
                r#"{"conversations":[{"from":"system","value":"S"},{"from":"human","value":"q1"},{"from":"gpt","value":"a1"},{"from":"human","value":"q2"},{"from":"gpt","value":"a2"}]}"#,
                "\n",
                r#"{"conversations":[{"from":"human","value":"only"},{"from":"gpt","value":"ans"}]}"#,
                "\n"
            ),
        )
        .unwrap();
        let p = read_prompt_dir(dir.path(), false).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].question, "q1");
        assert!(p[0].history.is_empty());
        assert_eq!(p[1].system.as_deref(), Some("S"));
        assert_eq!(p[1].history, vec![("q1".to_string(), "a1".to_string())]);
        assert_eq!(p[1].question, "q2");
        assert_eq!(p[1].reference.as_deref(), Some("a2"));
        assert_eq!(p[2].system, None);
        let roles: Vec<Role> = p[1].messages().iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [Role::System, Role::User, Role::Assistant, Role::User]
        );
    }

    #[test]
    fn a_prompt_for_the_reward_model_is_rendered_as_its_pairs_were() {
        let p = Prompt {
            system: None,
            history: vec![],
            question: "q?".into(),
            reference: None,
        };
        assert_eq!(
            p.render_for_reward(&PairFormat::Question2023, "yes")
                .unwrap(),
            "Question: q?\n\nAnswer: yes"
        );
    }
}
