//! `rlhf rm`: reward modelling (MedicalGPT `reward_modeling.py`): preference
//! pairs → text of each side → tokens → a scalar `score` head (transformers'
//! `*ForSequenceClassification`, num_labels 1) trained with the pairwise loss
//! −log σ(r_chosen − r_rejected), averaged over the pairs of each step.
//!
//! Differences from MedicalGPT, on purpose: the chosen and rejected rows of a
//! micro-batch run in one forward, padded to the longest row of the batch
//! (MedicalGPT pads every batch to max_source_length + max_target_length);
//! the model config's pad_token_id is set to the tokenizer's pad (the score
//! is read at the last token that is not the pad, and transformers needs the
//! id for batches > 1); evaluation reports pairwise accuracy and the mean
//! margin beside the loss.

use super::args::{parse_bool, ModelArgs, TrainingArgs};
use crate::collective::Collective;
use crate::data::chat::{Message, Role};
use crate::data::pretrain::split_train_validation;
use crate::data::reward::{pair_texts, read_pair_dir, PreferencePair, ReadPairs};
use crate::data::template::ChatFormat;
use crate::fsutil::write_json_atomic;
use crate::model::params::Head;
use crate::model::weights::SaveDtype;
use crate::model::{Batch, Llama};
use crate::tokenizer::Tokenizer;
use crate::train::trainer::{sum_over_ranks, train_objective, EvalReport, MicroStats, Objective};
use crate::train::{Dist, TrainHooks, TrainSummary};
use anyhow::{bail, Context, Result};
use clap::Args;
use rlhf_kernels::Backend;
use serde_json::json;
use std::path::PathBuf;

/// MedicalGPT RM `DataArguments` (+ `template_name` of its `ScriptArguments`);
/// DPO's ScriptArguments have the same data flags.
#[derive(Args, Clone, Debug)]
pub struct RmDataFlags {
    /// Folder of .jsonl (or JSON-lines .json) files of preference pairs.
    #[arg(long = "train_file_dir")]
    pub train_file_dir: PathBuf,
    /// Folder of validation pairs; without it, validation_split_percentage of the training pairs.
    #[arg(long = "validation_file_dir")]
    pub validation_file_dir: Option<PathBuf>,
    /// With max_target_length: the length limit of a pair, their sum (rm: a side
    /// longer in tokens is left out; dpo: see `rlhf dpo`).
    #[arg(long = "max_source_length", default_value_t = 2048)]
    pub max_source_length: usize,
    #[arg(long = "max_target_length", default_value_t = 512)]
    pub max_target_length: usize,
    #[arg(long = "validation_split_percentage", default_value_t = 1)]
    pub validation_split_percentage: u32,
    #[arg(long = "max_train_samples")]
    pub max_train_samples: Option<usize>,
    #[arg(long = "max_eval_samples")]
    pub max_eval_samples: Option<usize>,
    /// Chat template of the text (a MedicalGPT template name). Default: the
    /// tokenizer's chat_template; without one, MedicalGPT 2023's
    /// "Question: ...\n\nAnswer: ..." (see `PairFormat`).
    #[arg(long = "template_name")]
    pub template_name: Option<String>,
    /// Skip invalid records (counted and reported) instead of stopping at the first.
    #[arg(long = "skip_invalid", default_value = "false", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub skip_invalid: bool,
    /// Not a MedicalGPT argument. `head`: a scalar score head on the last
    /// token (transformers' *ForSequenceClassification). `likelihood`: the
    /// score is the mean log p of the answer tokens given the conversation
    /// under the model (a generative reward model; the output is a causal-LM
    /// adapter or model plus reward_config.json). The same pairwise loss trains both.
    #[arg(long = "score_type", default_value = "head")]
    pub score_type: ScoreType,
}

/// How a reward model turns a text into its score.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreType {
    /// A linear head on the last non-padding token.
    Head,
    /// The mean log p of the answer's tokens under the language model.
    Likelihood,
}

impl std::str::FromStr for ScoreType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "head" => Ok(ScoreType::Head),
            "likelihood" => Ok(ScoreType::Likelihood),
            _ => Err(format!(
                "unknown score_type {s:?} (expected head or likelihood)"
            )),
        }
    }
}

impl ScoreType {
    pub fn name(self) -> &'static str {
        match self {
            ScoreType::Head => "head",
            ScoreType::Likelihood => "likelihood",
        }
    }

    /// The model head this score needs.
    pub fn head(self) -> Head {
        match self {
            ScoreType::Head => Head::Score,
            ScoreType::Likelihood => Head::CausalLm,
        }
    }
}

/// The file beside a likelihood reward model's weights that says so.
pub const REWARD_CONFIG_FILE: &str = "reward_config.json";

/// Write `reward_config.json` (`{"score_type": ...}`) into `dir`.
pub fn write_reward_config(dir: &std::path::Path, score_type: ScoreType) -> Result<()> {
    write_json_atomic(
        &dir.join(REWARD_CONFIG_FILE),
        &json!({ "score_type": score_type.name() }),
    )
}

/// The score type of a reward model dir: its reward_config.json, else a head.
pub fn read_score_type(dir: &std::path::Path) -> Result<ScoreType> {
    let path = dir.join(REWARD_CONFIG_FILE);
    if !path.exists() {
        return Ok(ScoreType::Head);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    v.get("score_type")
        .and_then(|t| t.as_str())
        .with_context(|| format!("{}: no string \"score_type\"", path.display()))?
        .parse()
        .map_err(|e: String| anyhow::anyhow!("{}: {e}", path.display()))
}

#[derive(Args, Clone, Debug)]
pub struct RmArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: RmDataFlags,
    #[command(flatten)]
    pub training: TrainingArgs,
}

/// How each side of a pair becomes text.
pub enum PairFormat {
    /// MedicalGPT HEAD: the conversation (system, history, question) plus the
    /// answer as an assistant turn, rendered by the chat template with no
    /// generation prompt (`get_prompt` / `apply_chat_template`).
    Chat(ChatFormat),
    /// MedicalGPT 2023 (no template): `"Question: " + q + "\n\nAnswer: " + a`.
    /// Earlier turns come first in the same form, each followed by "\n\n",
    /// and a system prompt first of all, followed by "\n\n".
    Question2023,
}

impl PairFormat {
    /// `--template_name` if given; else the tokenizer's own chat template (as
    /// HEAD); else, for a tokenizer without one, the 2023 text.
    pub fn resolve(template_name: Option<&str>, tokenizer: &Tokenizer) -> Result<PairFormat> {
        if template_name.is_none() && tokenizer.chat_template().is_none() {
            tracing::info!("the tokenizer has no chat template and no --template_name was given: pairs are rendered as \"Question: ...\\n\\nAnswer: ...\" (MedicalGPT 2023)");
            return Ok(PairFormat::Question2023);
        }
        Ok(PairFormat::Chat(ChatFormat::resolve(
            template_name,
            tokenizer,
        )?))
    }

    pub fn name(&self) -> String {
        match self {
            PairFormat::Chat(f) => f.name(),
            PairFormat::Question2023 => "question_answer_2023".into(),
        }
    }

    /// The text of the pair's conversation ending with `answer`.
    pub fn render(&self, pair: &PreferencePair, answer: &str) -> Result<String> {
        match self {
            PairFormat::Chat(f) => {
                let mut msgs = prompt_messages(pair);
                msgs.push(Message {
                    role: Role::Assistant,
                    content: answer.to_string(),
                });
                f.render(&msgs, false)
            }
            PairFormat::Question2023 => {
                let mut text = String::new();
                if let Some(s) = &pair.system {
                    text.push_str(s);
                    text.push_str("\n\n");
                }
                for (q, a) in &pair.history {
                    text.push_str(&format!("Question: {q}\n\nAnswer: {a}\n\n"));
                }
                text.push_str(&format!("Question: {}\n\nAnswer: {answer}", pair.question));
                Ok(text)
            }
        }
    }

    /// The pair's conversation up to the question, ready for an answer (DPO's
    /// prompt): the chat template with the generation prompt, or 2023's text
    /// ending with "Answer: ".
    pub fn render_prompt(&self, pair: &PreferencePair) -> Result<String> {
        match self {
            PairFormat::Chat(f) => f.render(&prompt_messages(pair), true),
            PairFormat::Question2023 => self.render(pair, ""),
        }
    }
}

/// System, history and question of a pair as chat messages.
fn prompt_messages(pair: &PreferencePair) -> Vec<Message> {
    let msg = |role, content: &str| Message {
        role,
        content: content.to_string(),
    };
    let mut msgs = Vec::new();
    if let Some(s) = &pair.system {
        msgs.push(msg(Role::System, s));
    }
    for (q, a) in &pair.history {
        msgs.push(msg(Role::User, q));
        msgs.push(msg(Role::Assistant, a));
    }
    msgs.push(msg(Role::User, &pair.question));
    msgs
}

/// A tokenised pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairTokens {
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    /// Index of each side's first answer token (after the shared prompt).
    pub chosen_start: usize,
    pub rejected_start: usize,
}

/// A likelihood reward model's row: the prompt's tokens, the answer's, then
/// the tokenizer's EOS — the sequence SFT trains (MedicalGPT appends EOS
/// after each answer instead of the template's end-of-turn text, which the
/// model never learned to predict after an answer) — and the index of the
/// first answer token.
pub fn likelihood_row(
    tokenizer: &Tokenizer,
    prompt: &str,
    answer: &str,
) -> Result<(Vec<u32>, usize)> {
    let eos = tokenizer.eos_id().context(
        "a likelihood reward model scores the answer up to EOS, and the tokenizer has no eos_token",
    )?;
    let mut ids = tokenizer.encode(prompt, true)?;
    let start = ids.len();
    ids.extend(tokenizer.encode(answer, false)?);
    ids.push(eos);
    Ok((ids, start))
}

/// Where the answer begins in `full`: after the longest common prefix with
/// the prompt's tokens (a merge across the boundary puts that token in the answer).
pub fn answer_start(prompt: &[u32], full: &[u32]) -> usize {
    prompt
        .iter()
        .zip(full)
        .take_while(|(a, b)| a == b)
        .count()
        .min(full.len().saturating_sub(1))
}

/// The pairwise loss of InstructGPT / MedicalGPT's RewardTrainer over rows
/// interleaved as [chosen0, rejected0, chosen1, rejected1, ...]: returns
/// Σ −log σ(r_c − r_r) over the pairs and its gradient with respect to each
/// row's score, times `grad_scale` (1/pairs of the step gives the mean).
pub fn pairwise_loss(scores: &[f32], grad_scale: f32) -> (f64, Vec<f32>) {
    let mut loss_sum = 0.0;
    let mut dscores = vec![0f32; scores.len()];
    for (i, pair) in scores.chunks_exact(2).enumerate() {
        let margin = pair[0] as f64 - pair[1] as f64;
        // −log σ(m) = softplus(−m), computed without overflow.
        loss_sum += (-margin).max(0.0) + (-margin.abs()).exp().ln_1p();
        // d/dm −log σ(m) = −σ(−m)
        let d = -1.0 / (1.0 + margin.exp());
        dscores[2 * i] = (d * grad_scale as f64) as f32;
        dscores[2 * i + 1] = (-d * grad_scale as f64) as f32;
    }
    (loss_sum, dscores)
}

/// Rows [c0, r0, c1, r1, ...] right-padded with `pad_id` to the longest row;
/// row keys 2·key (chosen) and 2·key+1 (rejected) for LoRA dropout.
/// Labels are each side's answer tokens (for the likelihood score).
pub fn collate_pairs(pairs: &[&PairTokens], keys: &[u64], pad_id: u32) -> Batch {
    let rows: Vec<(&[u32], usize)> = pairs
        .iter()
        .flat_map(|p| {
            [
                (p.chosen.as_slice(), p.chosen_start),
                (p.rejected.as_slice(), p.rejected_start),
            ]
        })
        .collect();
    let ids: Vec<&[u32]> = rows.iter().map(|r| r.0).collect();
    let mut batch = Batch {
        sample_keys: keys.iter().flat_map(|&k| [2 * k, 2 * k + 1]).collect(),
        ..Batch::right_padded(&ids, pad_id)
    };
    for (i, (row, start)) in rows.iter().enumerate() {
        for (j, &id) in row.iter().enumerate().skip(*start) {
            batch.labels[i * batch.t + j] = id as i32;
        }
    }
    batch
}

/// The scores of a pair batch's rows, as the reward model reads them.
pub fn score_rows<B: Backend>(
    model: &mut Llama<B>,
    batch: &Batch,
    score_type: ScoreType,
    dropout_seed: Option<u64>,
) -> Result<Vec<f32>> {
    match score_type {
        ScoreType::Head => model.score_forward(batch, dropout_seed),
        ScoreType::Likelihood => model.mean_logp(batch, dropout_seed),
    }
}

fn score_rows_backward<B: Backend>(
    model: &mut Llama<B>,
    batch: &Batch,
    dscores: &[f32],
    score_type: ScoreType,
    dropout_seed: Option<u64>,
) -> Result<()> {
    match score_type {
        ScoreType::Head => model.score_backward(batch, dscores, dropout_seed),
        ScoreType::Likelihood => model.mean_logp_backward(batch, dscores, dropout_seed),
    }
}

/// Evaluation of a reward model on held-out pairs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RewardEval {
    /// Mean −log σ(r_chosen − r_rejected).
    pub loss: f64,
    /// Fraction of pairs with r_chosen > r_rejected.
    pub accuracy: f64,
    /// Mean r_chosen − r_rejected.
    pub mean_margin: f64,
    pub pairs: usize,
}

impl EvalReport for RewardEval {
    fn loss(&self) -> f64 {
        self.loss
    }
    fn fields(&self) -> serde_json::Value {
        json!({
            "eval_loss": self.loss,
            "eval_accuracy": self.accuracy,
            "eval_mean_margin": self.mean_margin,
            "eval_pairs": self.pairs,
        })
    }
}

/// The reward model's objective: one unit of the step's normaliser per pair.
pub struct PairwiseReward {
    pub pad_id: u32,
    pub score_type: ScoreType,
}

impl<B: Backend> Objective<B> for PairwiseReward {
    type Item = PairTokens;
    type Eval = RewardEval;

    fn weight(&self, _: &PairTokens) -> usize {
        1
    }

    fn forward_backward(
        &self,
        model: &mut Llama<B>,
        items: &[&PairTokens],
        keys: &[u64],
        grad_scale: f32,
        dropout_seed: u64,
    ) -> Result<MicroStats> {
        let batch = collate_pairs(items, keys, self.pad_id);
        let scores = score_rows(model, &batch, self.score_type, Some(dropout_seed))?;
        let (loss_sum, dscores) = pairwise_loss(&scores, grad_scale);
        score_rows_backward(model, &batch, &dscores, self.score_type, Some(dropout_seed))?;
        Ok(MicroStats {
            loss_sum,
            tokens: batch.b * batch.t,
        })
    }

    fn evaluate(
        &self,
        model: &mut Llama<B>,
        items: &[PairTokens],
        batch_size: usize,
        collective: &mut dyn Collective<B>,
    ) -> Result<RewardEval> {
        evaluate_pairs(
            model,
            items,
            batch_size,
            self.pad_id,
            self.score_type,
            collective,
        )
    }
}

/// Loss, accuracy and mean margin over `pairs`, split across the ranks.
pub fn evaluate_pairs<B: Backend>(
    model: &mut Llama<B>,
    pairs: &[PairTokens],
    batch_size: usize,
    pad_id: u32,
    score_type: ScoreType,
    collective: &mut dyn Collective<B>,
) -> Result<RewardEval> {
    let (rank, world) = (collective.rank(), collective.world_size());
    let (mut loss_sum, mut correct, mut margin_sum, mut n) = (0.0, 0.0, 0.0, 0.0);
    for (j, chunk) in pairs
        .chunks(batch_size.max(1))
        .enumerate()
        .skip(rank)
        .step_by(world)
    {
        let refs: Vec<&PairTokens> = chunk.iter().collect();
        let keys: Vec<u64> = (0..chunk.len() as u64)
            .map(|i| (j * batch_size) as u64 + i)
            .collect();
        let batch = collate_pairs(&refs, &keys, pad_id);
        let scores = score_rows(model, &batch, score_type, None)?;
        loss_sum += pairwise_loss(&scores, 0.0).0;
        for p in scores.chunks_exact(2) {
            let margin = (p[0] - p[1]) as f64;
            margin_sum += margin;
            if margin > 0.0 {
                correct += 1.0;
            }
            n += 1.0;
        }
    }
    let [loss_sum, correct, margin_sum, n] =
        sum_over_ranks(model, collective, [loss_sum, correct, margin_sum, n])?;
    if n == 0.0 {
        bail!("nothing to evaluate: no validation pairs");
    }
    Ok(RewardEval {
        loss: loss_sum / n,
        accuracy: correct / n,
        mean_margin: margin_sum / n,
        pairs: n as usize,
    })
}

/// Tokenised pairs of one split, and how many were left out as too long.
#[derive(Clone, Debug, Default)]
pub struct TokenisedPairs {
    pub pairs: Vec<PairTokens>,
    pub too_long: usize,
}

/// Render and tokenise (with the tokenizer's default special tokens) every
/// pair — the whole rendered conversation for a score head, a
/// [`likelihood_row`] for a likelihood RM; as MedicalGPT, pairs with a side
/// of 0 or more than `max_len` tokens are left out (counted).
pub fn tokenise_pairs(
    tokenizer: &Tokenizer,
    format: &PairFormat,
    pairs: &[PreferencePair],
    max_len: usize,
    score_type: ScoreType,
) -> Result<TokenisedPairs> {
    let mut out = TokenisedPairs::default();
    for pair in pairs {
        let ((chosen, chosen_start), (rejected, rejected_start)) = match score_type {
            ScoreType::Head => {
                let (c, r) = pair_texts(pair, &|p, a| format.render(p, a))?;
                let chosen = tokenizer.encode(&c, true)?;
                let rejected = tokenizer.encode(&r, true)?;
                let prompt = tokenizer.encode(&format.render_prompt(pair)?, true)?;
                let (cs, rs) = (
                    answer_start(&prompt, &chosen),
                    answer_start(&prompt, &rejected),
                );
                ((chosen, cs), (rejected, rs))
            }
            ScoreType::Likelihood => {
                let prompt = format.render_prompt(pair)?;
                (
                    likelihood_row(tokenizer, &prompt, &pair.chosen)?,
                    likelihood_row(tokenizer, &prompt, &pair.rejected)?,
                )
            }
        };
        let fits = |ids: &[u32]| !ids.is_empty() && ids.len() <= max_len;
        if fits(&chosen) && fits(&rejected) {
            out.pairs.push(PairTokens {
                chosen_start,
                rejected_start,
                chosen,
                rejected,
            });
        } else {
            out.too_long += 1;
        }
    }
    Ok(out)
}

/// What `rlhf rm` reports (also written to output_dir/all_results.json).
#[derive(Clone, Debug)]
pub struct RmResult {
    pub summary: TrainSummary<RewardEval>,
    pub initial_eval: Option<RewardEval>,
    pub train_pairs: usize,
    pub eval_pairs: usize,
    /// Invalid records skipped (--skip_invalid).
    pub skipped_invalid: usize,
    /// Pairs left out for a side longer than max_source_length + max_target_length.
    pub too_long: usize,
    /// all_results.json as written (rank 0; Null on other ranks).
    pub results: serde_json::Value,
}

/// Cut a list to its first `max` entries (MedicalGPT's `select(range(max))`).
fn take_first<T>(mut v: Vec<T>, max: Option<usize>) -> Vec<T> {
    if let Some(m) = max.filter(|&m| m > 0) {
        v.truncate(m);
    }
    v
}

/// The pad of pair batches, as MedicalGPT: the tokenizer's pad, else its
/// unk, else its eos.
pub fn pair_pad_id(tokenizer: &Tokenizer) -> Result<u32> {
    tokenizer
        .pad_id()
        .or_else(|| tokenizer.token_to_id("<unk>"))
        .or(tokenizer.eos_id())
        .context("the tokenizer has no pad, unk or eos token to pad with")
}

/// The training and validation pairs of a pair stage (rm, dpo), and the
/// invalid records skipped (--skip_invalid), one message each.
pub struct SplitPairs {
    pub train: Vec<PreferencePair>,
    pub valid: Vec<PreferencePair>,
    pub skipped: Vec<String>,
}

/// Read `--train_file_dir` (and `--validation_file_dir`, else split off
/// validation_split_percentage), cut to max_train/eval_samples.
pub fn read_split_pairs(data: &RmDataFlags) -> Result<SplitPairs> {
    let skip = data.skip_invalid;
    let ReadPairs {
        pairs: train_read,
        mut skipped,
    } = read_pair_dir(&data.train_file_dir, skip)?;
    let (train_read, valid_read) = match &data.validation_file_dir {
        Some(d) => {
            let v = read_pair_dir(d, skip)?;
            skipped.extend(v.skipped);
            (train_read, v.pairs)
        }
        None => split_train_validation(train_read, data.validation_split_percentage)?,
    };
    let strip = |v: Vec<crate::data::reward::SourcedPair>| -> Vec<PreferencePair> {
        v.into_iter().map(|p| p.pair).collect()
    };
    Ok(SplitPairs {
        train: take_first(strip(train_read), data.max_train_samples),
        valid: take_first(strip(valid_read), data.max_eval_samples),
        skipped,
    })
}

/// One rank of a data-parallel RM stage (as `pt::run_dist`): every rank
/// reads all the data; rank 0 writes the outputs.
pub fn run_dist<B: Backend>(
    be: B,
    args: &RmArgs,
    collective: &mut dyn Collective<B>,
    global_batch: Option<usize>,
    hooks: &mut dyn TrainHooks,
) -> Result<RmResult> {
    let is_main = collective.rank() == 0;
    let mut targs = args.training.to_train_args()?;
    SaveDtype::from_torch_dtype(args.model.torch_dtype.as_deref())?;
    let tokenizer_dir = args.model.tokenizer_dir();
    let tokenizer = Tokenizer::load(&tokenizer_dir)?;
    let pad_id = pair_pad_id(&tokenizer)?;
    let SplitPairs {
        train: train_pairs,
        valid: valid_pairs,
        skipped,
    } = read_split_pairs(&args.data)?;
    let max_len = args.data.max_source_length + args.data.max_target_length;
    let format = PairFormat::resolve(args.data.template_name.as_deref(), &tokenizer)?;
    let score_type = args.data.score_type;
    let train = tokenise_pairs(&tokenizer, &format, &train_pairs, max_len, score_type)?;
    let eval = tokenise_pairs(&tokenizer, &format, &valid_pairs, max_len, score_type)?;
    if !skipped.is_empty() {
        tracing::warn!(
            skipped = skipped.len(),
            "invalid pairs skipped (--skip_invalid)"
        );
    }
    let too_long = train.too_long + eval.too_long;
    if too_long > 0 {
        tracing::warn!(
            train = train.too_long,
            eval = eval.too_long,
            max_len,
            "pairs left out: a side is longer than max_source_length + max_target_length tokens"
        );
    }
    if train.pairs.is_empty() {
        bail!(
            "no training pairs left ({} read, {} too long, {} invalid skipped)",
            train_pairs.len(),
            train.too_long,
            skipped.len()
        );
    }
    tracing::info!(
        train_pairs = train.pairs.len(),
        eval_pairs = eval.pairs.len(),
        pad_id,
        "RM data ready"
    );

    if let crate::model::TrainMode::Lora(l) = &args.model.train_mode()? {
        if l.modules_to_save.iter().any(|m| m == "lm_head") {
            bail!("modules_to_save lm_head: a reward model has no lm_head (its score head is always trained in full)");
        }
    }
    let mut model = super::load_stage_model(
        be,
        &args.model,
        &args.training,
        score_type.head(),
        &tokenizer,
        targs.seed,
    )?;
    if let Some(cfg_pad) = model.cfg.pad_token_id.filter(|&p| p != pad_id) {
        tracing::warn!(
            config = cfg_pad,
            tokenizer = pad_id,
            "the model config's pad_token_id differs from the tokenizer's pad; using the tokenizer's"
        );
    }
    model.cfg.pad_token_id = Some(pad_id);
    let objective = PairwiseReward { pad_id, score_type };
    let initial_eval = if eval.pairs.is_empty() || targs.resume_from_checkpoint.is_some() {
        None
    } else {
        Some(evaluate_pairs(
            &mut model,
            &eval.pairs,
            targs.per_device_eval_batch_size,
            pad_id,
            score_type,
            collective,
        )?)
    };
    if let (true, Some(e)) = (is_main, &initial_eval) {
        tracing::info!(
            eval_loss = e.loss,
            accuracy = e.accuracy,
            margin = e.mean_margin,
            "before training"
        );
    }
    let base = args.model.model_name_or_path.clone();
    let save = |m: &Llama<B>, dir: &std::path::Path| -> Result<()> {
        super::save_weights(m, dir, &base, &tokenizer_dir)?;
        if score_type == ScoreType::Likelihood {
            write_reward_config(dir, score_type)?;
        }
        Ok(())
    };
    targs.show_progress = true;
    let mut dist = Dist {
        collective,
        global_batch,
        hooks,
    };
    let summary = train_objective(
        &mut model,
        &objective,
        &train.pairs,
        &eval.pairs,
        &targs,
        &save,
        &mut dist,
    )?;
    let mut result = RmResult {
        summary,
        initial_eval,
        train_pairs: train.pairs.len(),
        eval_pairs: eval.pairs.len(),
        skipped_invalid: skipped.len(),
        too_long,
        results: serde_json::Value::Null,
    };
    if !is_main {
        return Ok(result);
    }
    if result.summary.finished {
        save(&model, &targs.output_dir)?;
    }
    let mut results = json!({
        "train_loss": result.summary.train_loss,
        "global_step": result.summary.global_step,
        "train_tokens_per_second": result.summary.tokens_per_sec,
        "train_samples": result.train_pairs,
        "eval_samples": result.eval_pairs,
        "skipped_invalid": result.skipped_invalid,
        "template": format.name(),
        "score_type": score_type.name(),
        "filtered_too_long": too_long,
        "filtered_too_long_train": train.too_long,
        "filtered_too_long_eval": eval.too_long,
    });
    if let (Some(obj), Some(e)) = (results.as_object_mut(), &result.summary.eval) {
        if let serde_json::Value::Object(f) = e.fields() {
            obj.extend(f);
        }
    }
    if let Some(e) = &result.initial_eval {
        results["initial_eval_loss"] = json!(e.loss);
        results["initial_eval_accuracy"] = json!(e.accuracy);
        results["initial_eval_mean_margin"] = json!(e.mean_margin);
    }
    write_json_atomic(&targs.output_dir.join("all_results.json"), &results)
        .with_context(|| format!("writing results to {}", targs.output_dir.display()))?;
    result.results = results;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_likelihood_row_scores_the_tokens_sft_trained_the_answer_with() {
        use crate::data::chat::{Message, Role};
        use crate::data::sft::{preprocess_dialog, SftTokenizeArgs};
        use crate::data::template::ChatFormat;
        let texts: Vec<String> = (0..40)
            .map(|i| {
                format!("What is the cause of Kypo {i}? The cause of Kypo {i} is the Sopin virus.")
            })
            .collect();
        let tok = crate::tokenizer::train_byte_level_bpe(&texts, 400).unwrap();
        let (q, a) = (
            "What is the cause of Kypo 3?",
            "The cause of Kypo 3 is the Sopin virus.",
        );
        let format = PairFormat::resolve(None, &tok).unwrap();
        let pair = PreferencePair {
            system: None,
            history: vec![],
            question: q.into(),
            chosen: a.into(),
            rejected: "I am not sure.".into(),
        };
        let (ids, start) = likelihood_row(&tok, &format.render_prompt(&pair).unwrap(), a).unwrap();
        // SFT's sample of the same conversation: src, then the answer and EOS
        // as labels. The row is that sample, and it scores exactly its labels.
        let chat = ChatFormat::resolve(None, &tok).unwrap();
        let dialog = chat
            .dialog(&[
                Message::new(Role::User, q),
                Message::new(Role::Assistant, a),
            ])
            .unwrap();
        let args = SftTokenizeArgs {
            model_max_length: 512,
            train_on_inputs: false,
            ignore_index: -100,
        };
        let (sample, dropped) = preprocess_dialog(&dialog, &tok, &args).unwrap();
        assert_eq!(dropped, 0);
        assert_eq!(ids, sample.input_ids);
        let trained: Vec<usize> = (0..ids.len())
            .filter(|&i| sample.labels[i] != -100)
            .collect();
        assert_eq!(trained, (start..ids.len()).collect::<Vec<_>>());
        assert_eq!(*ids.last().unwrap(), tok.eos_id().unwrap());
        // No end-of-turn text of the template after the answer.
        let im_end = tok.token_to_id("<|im_end|>").unwrap();
        assert!(!ids[start..].contains(&im_end));
        // Both sides of a likelihood pair are such rows, sharing the prompt.
        let pairs = tokenise_pairs(&tok, &format, &[pair], 512, ScoreType::Likelihood).unwrap();
        let p = &pairs.pairs[0];
        assert_eq!((&p.chosen, p.chosen_start), (&ids, start));
        assert_eq!(p.rejected_start, start);
        assert_eq!(p.rejected[..start], ids[..start]);
    }

    #[test]
    fn pairwise_loss_is_softplus_of_minus_the_margin_with_its_gradient() {
        let scores = [2.0f32, -1.0, 0.5, 0.5, -30.0, 30.0];
        let (sum, d) = pairwise_loss(&scores, 1.0);
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let want = -(sig(3.0).ln()) - sig(0.0).ln() + 60.0; // −log σ(−60) ≈ 60
        assert!((sum - want).abs() < 1e-9, "{sum} vs {want}");
        // Central differences of the loss.
        for i in 0..scores.len() {
            let h = 1e-3f32;
            let mut p = scores;
            p[i] += h;
            let mut m = scores;
            m[i] -= h;
            let fd = (pairwise_loss(&p, 1.0).0 - pairwise_loss(&m, 1.0).0) / (2.0 * h as f64);
            assert!((fd - d[i] as f64).abs() < 1e-3, "row {i}: {fd} vs {}", d[i]);
        }
        let (_, half) = pairwise_loss(&scores, 0.5);
        assert_eq!(half[0], d[0] * 0.5);
    }

    #[test]
    fn pairs_are_interleaved_and_padded_to_the_longest_row() {
        let a = PairTokens {
            chosen: vec![5, 6, 7],
            rejected: vec![8],
            chosen_start: 1,
            rejected_start: 0,
        };
        let b = PairTokens {
            chosen: vec![9, 10],
            rejected: vec![11, 12, 13, 14],
            chosen_start: 1,
            rejected_start: 2,
        };
        let batch = collate_pairs(&[&a, &b], &[3, 8], 0);
        assert_eq!((batch.b, batch.t), (4, 4));
        assert_eq!(
            batch.input_ids,
            [5, 6, 7, 0, 8, 0, 0, 0, 9, 10, 0, 0, 11, 12, 13, 14]
        );
        assert_eq!(batch.sample_keys, [6, 7, 16, 17]);
        // Labels: each side's answer tokens (from its start), for the likelihood score.
        assert_eq!(
            batch.labels,
            [-100, 6, 7, -100, 8, -100, -100, -100, -100, 10, -100, -100, -100, -100, 13, 14]
        );
        assert_eq!(answer_start(&[1, 2, 3], &[1, 2, 3, 4]), 3);
        assert_eq!(answer_start(&[1, 2, 9], &[1, 2, 3, 4]), 2);
        assert_eq!(answer_start(&[1, 2], &[1, 2]), 1);
        let mask = batch.attention_mask.unwrap();
        assert_eq!(&mask[..8], &[1, 1, 1, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn a_side_is_medicalgpt_2023_question_answer_text() {
        let mut p = PreferencePair {
            system: None,
            history: vec![],
            question: "q?".into(),
            chosen: "yes".into(),
            rejected: "no".into(),
        };
        let f = PairFormat::Question2023;
        assert_eq!(
            pair_texts(&p, &|p, a| f.render(p, a)).unwrap(),
            (
                "Question: q?\n\nAnswer: yes".to_string(),
                "Question: q?\n\nAnswer: no".to_string()
            )
        );
        p.system = Some("S".into());
        p.history = vec![("q0".into(), "a0".into())];
        assert_eq!(
            f.render(&p, "yes").unwrap(),
            "S\n\nQuestion: q0\n\nAnswer: a0\n\nQuestion: q?\n\nAnswer: yes"
        );
    }

    #[test]
    fn a_side_with_a_named_template_is_its_get_prompt() {
        // MedicalGPT: template.get_prompt(history + [[q, answer]], system); for
        // qwen the answer is appended raw (reference notes §5).
        let p = PreferencePair {
            system: None,
            history: vec![("Q1".into(), "A1".into())],
            question: "Q2".into(),
            chosen: "yes".into(),
            rejected: "no".into(),
        };
        let f = PairFormat::Chat(ChatFormat::Named(
            crate::data::template::named_template("qwen").unwrap(),
        ));
        assert_eq!(
            f.render(&p, "yes").unwrap(),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nyes"
        );
    }
}
