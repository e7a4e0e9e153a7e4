//! The reward model during RL. When its adapter was trained on the policy's
//! own base, it is kept as an inactive [`Adapter`] over the policy's weights:
//! one copy of the base serves policy, reference, critic and reward model.
//! Otherwise it is a model of its own (another base, or a full
//! `*ForSequenceClassification` dir).

use crate::model::params::{LoraConfig, TrainMode};
use crate::model::pretrained::{
    load_model_with_head, read_adapter_task_type, TASK_CAUSAL_LM, TASK_SEQ_CLS,
};
use crate::model::{Adapter, Batch, Llama, ModelConfig};
use crate::rl::prompts::TokenisedPrompt;
use crate::rl::rollout::Rollout;
use crate::stages::rm::{likelihood_row, read_score_type, PairFormat, ScoreType};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use rlhf_kernels::Backend;
use std::path::{Path, PathBuf};

/// Where the reward model's weights are.
#[allow(clippy::large_enum_variant)] // one per stage
pub enum RewardWeights<B: Backend> {
    /// Its LoRA adapter and score head over the policy's base.
    SharedBase(Adapter<B>),
    /// A model of its own.
    Separate(Llama<B>),
}

/// A reward model ready to score texts.
pub struct RewardModel<B: Backend> {
    pub weights: RewardWeights<B>,
    pub tokenizer: Tokenizer,
    /// How (prompt, response) becomes the text the RM was trained on.
    pub format: PairFormat,
    /// A score head, or the response's log-likelihood (`rlhf rm --score_type`).
    pub score_type: ScoreType,
    pub pad_id: u32,
    /// Rows per scoring forward.
    pub batch_size: usize,
    /// Texts longer than this many tokens are cut from the left (the end,
    /// where the score is read, is kept).
    pub max_length: usize,
}

/// A causal-LM-free inference mode: every base weight frozen, nothing adapted
/// (the score head alone is in the trainable buffer, as for any score model).
fn frozen_mode() -> TrainMode {
    TrainMode::Lora(LoraConfig {
        r: 1,
        alpha: 1.0,
        dropout: 0.0,
        target_modules: Vec::new(),
        modules_to_save: Vec::new(),
    })
}

fn canonical(p: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(p).ok()
}

/// The base model a PEFT adapter dir names (`base_model_name_or_path`).
fn adapter_base(dir: &Path) -> Result<Option<PathBuf>> {
    let path = dir.join("adapter_config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(v.get("base_model_name_or_path")
        .and_then(|b| b.as_str())
        .filter(|s| !s.is_empty())
        .map(PathBuf::from))
}

/// How the reward model was found: for logs and results.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RewardPlacement {
    SharedBase,
    SeparateAdapter { base: PathBuf },
    SeparateModel,
}

impl RewardPlacement {
    pub fn describe(&self) -> String {
        match self {
            RewardPlacement::SharedBase => "adapter on the policy's base (shared weights)".into(),
            RewardPlacement::SeparateAdapter { base } => {
                format!("adapter on its own copy of {}", base.display())
            }
            RewardPlacement::SeparateModel => "a separate sequence-classification model".into(),
        }
    }
}

impl<B: Backend> RewardModel<B> {
    /// Load the reward model in `path`: a SEQ_CLS PEFT adapter (the RM
    /// stage's LoRA output) or a `*ForSequenceClassification` model dir.
    /// An adapter whose base (`base_override`, else its config's
    /// `base_model_name_or_path`) is the policy's `policy_base` dir is put
    /// over the policy's weights instead of loading the base again.
    pub fn load(
        policy: &mut Llama<B>,
        policy_base: &Path,
        path: &Path,
        base_override: Option<&Path>,
        template_name: Option<&str>,
    ) -> Result<(Self, RewardPlacement)> {
        let is_adapter = path.join("adapter_config.json").exists();
        let score_type = read_score_type(path)?;
        let head = score_type.head();
        let (weights, placement, cfg_pad) = if is_adapter {
            let task = read_adapter_task_type(path)?;
            let want = match score_type {
                ScoreType::Head => TASK_SEQ_CLS,
                ScoreType::Likelihood => TASK_CAUSAL_LM,
            };
            if task.as_deref() != Some(want) {
                bail!(
                    "{}: the reward model adapter has task_type {:?}; a {} reward model's adapter is {want} (the rm stage's output)",
                    path.display(),
                    task.unwrap_or_default(),
                    score_type.name()
                );
            }
            let base = match base_override {
                Some(b) => b.to_path_buf(),
                None => adapter_base(path)?.with_context(|| {
                    format!(
                        "{}: the adapter names no base model; pass --reward_base_model_name_or_path",
                        path.display()
                    )
                })?,
            };
            let shared = match (canonical(&base), canonical(policy_base)) {
                (Some(a), Some(b)) => a == b,
                _ => false,
            };
            if shared {
                let theirs = ModelConfig::load(&base)?;
                let dims = |c: &ModelConfig| (c.hidden_size, c.num_hidden_layers, c.vocab_size);
                if dims(&theirs) != dims(&policy.cfg) {
                    bail!(
                        "{}: its config differs from the policy model's",
                        base.display()
                    );
                }
                let adapter = policy
                    .load_adapter_over(path, head)
                    .with_context(|| format!("reward adapter {}", path.display()))?;
                (
                    RewardWeights::SharedBase(adapter),
                    RewardPlacement::SharedBase,
                    policy.cfg.pad_token_id,
                )
            } else {
                if canonical(&base).is_none() {
                    bail!(
                        "{}: its base model {} does not exist here; pass --reward_base_model_name_or_path",
                        path.display(),
                        base.display()
                    );
                }
                let config = crate::model::pretrained::read_adapter_config(path)?;
                let mut m = load_model_with_head(
                    policy.be.clone(),
                    &base,
                    TrainMode::Lora(config),
                    head,
                    0,
                )?;
                m.load_adapter(path)?;
                let pad = m.cfg.pad_token_id;
                (
                    RewardWeights::Separate(m),
                    RewardPlacement::SeparateAdapter { base },
                    pad,
                )
            }
        } else {
            let m = load_model_with_head(policy.be.clone(), path, frozen_mode(), head, 0)?;
            let pad = m.cfg.pad_token_id;
            (
                RewardWeights::Separate(m),
                RewardPlacement::SeparateModel,
                pad,
            )
        };
        // The RM stage copies its tokenizer beside the adapter; a model dir has its own.
        let tokenizer = Tokenizer::load(path).or_else(|e| match &placement {
            RewardPlacement::SharedBase => Tokenizer::load(policy_base),
            RewardPlacement::SeparateAdapter { base } => Tokenizer::load(base),
            RewardPlacement::SeparateModel => Err(e),
        })?;
        let pad_id = tokenizer
            .pad_id()
            .or_else(|| tokenizer.token_to_id("<unk>"))
            .or(tokenizer.eos_id())
            .or(cfg_pad)
            .context("the reward model's tokenizer has no pad, unk or eos token")?;
        let format = PairFormat::resolve(template_name, &tokenizer)?;
        Ok((
            RewardModel {
                weights,
                tokenizer,
                format,
                score_type,
                pad_id,
                batch_size: 8,
                max_length: usize::MAX,
            },
            placement,
        ))
    }
}

/// One text to score: the conversation up to the response, and with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RewardText {
    pub prompt: String,
    /// The response alone (what a likelihood RM scores, after `prompt`).
    pub response: String,
    pub full: String,
}

impl<B: Backend> RewardModel<B> {
    /// Scores of `texts` (rendered in the RM's format): the score head's, or
    /// the mean log p of the response's tokens (after the prompt's) for a likelihood RM.
    pub fn score(&mut self, policy: &mut Llama<B>, texts: &[RewardText]) -> Result<Vec<f32>> {
        let mut rows = Vec::with_capacity(texts.len());
        for t in texts {
            let (mut ids, mut start) = match self.score_type {
                ScoreType::Head => (self.tokenizer.encode(&t.full, true)?, 0),
                ScoreType::Likelihood => likelihood_row(&self.tokenizer, &t.prompt, &t.response)?,
            };
            if ids.is_empty() {
                bail!("a reward-model text tokenises to nothing: {:?}", t.full);
            }
            if ids.len() > self.max_length {
                let cut = ids.len() - self.max_length;
                ids.drain(..cut);
                start = start.saturating_sub(cut);
            }
            rows.push((ids, start));
        }
        let mut out = Vec::with_capacity(texts.len());
        let pad = self.pad_id;
        let bs = self.batch_size.max(1);
        let score_type = self.score_type;
        for chunk in rows.chunks(bs) {
            let refs: Vec<&[u32]> = chunk.iter().map(|r| r.0.as_slice()).collect();
            let mut batch = Batch::right_padded(&refs, pad);
            for (i, (ids, start)) in chunk.iter().enumerate() {
                for (j, &id) in ids.iter().enumerate().skip(*start) {
                    batch.labels[i * batch.t + j] = id as i32;
                }
            }
            let run = |m: &mut Llama<B>| match score_type {
                ScoreType::Head => m.score_forward(&batch, None),
                ScoreType::Likelihood => m.mean_logp(&batch, None),
            };
            let scores = match &mut self.weights {
                RewardWeights::SharedBase(adapter) => policy.with_adapter(adapter, |m| {
                    let saved = m.cfg.pad_token_id.replace(pad);
                    let s = run(m);
                    m.cfg.pad_token_id = saved;
                    s
                })?,
                RewardWeights::Separate(m) => {
                    m.cfg.pad_token_id = Some(pad);
                    run(m)?
                }
            };
            out.extend(scores);
        }
        Ok(out)
    }

    /// Scores of sampled responses: each rollout's conversation (its prompt
    /// in `prompts`) with the response as the last assistant turn, rendered
    /// as the RM was trained.
    pub fn score_rollouts(
        &mut self,
        policy: &mut Llama<B>,
        prompts: &[TokenisedPrompt],
        rollouts: &[Rollout],
    ) -> Result<Vec<f32>> {
        let texts = rollouts
            .iter()
            .map(|r| {
                let p = &prompts[r.prompt].prompt;
                Ok(RewardText {
                    prompt: p.render_reward_prompt(&self.format)?,
                    response: r.response_text.trim().to_string(),
                    full: p.render_for_reward(&self.format, r.response_text.trim())?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.score(policy, &texts)
    }
}
