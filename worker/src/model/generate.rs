//! Text generation with a key/value cache: a batch of prompts, LEFT-padded as
//! transformers pads decoder-only prompts, goes through the model once
//! (prefill), then one token per row per step. Rows finish independently (EOS,
//! a stop string, or max_new_tokens); a finished row is fed padding until the
//! batch is done and never grows.
//!
//! Positions follow transformers' generate: `cumsum(attention_mask) − 1`, so a
//! padded row's first real token is at position 0.

mod kv;
pub mod sampling;
mod stream;

pub use kv::KvCache;
pub use stream::{Step, TextStream};

use super::Llama;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlhf_kernels::Backend;
use sampling::Processors;
use serde::Serialize;
use std::path::Path;

/// Settings of one generation (transformers' names and defaults, except
/// max_new_tokens, whose default is the CLI's 512).
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub do_sample: bool,
    pub temperature: f32,
    /// 0 = no top-k filtering.
    pub top_k: usize,
    pub top_p: f32,
    pub repetition_penalty: f32,
    /// A row ends when it produces any of these.
    pub eos_token_ids: Vec<u32>,
    /// A row ends when its decoded text contains one; the text is cut before it.
    pub stop_strings: Vec<String>,
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 512,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            eos_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            seed: 42,
        }
    }
}

impl GenerationConfig {
    /// Defaults, overridden by `dir/generation_config.json` when it exists
    /// (do_sample, temperature, top_k, top_p, repetition_penalty,
    /// max_new_tokens, eos_token_id as one id or a list).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let mut cfg = GenerationConfig::default();
        let path = dir.join("generation_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(cfg),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing {} as JSON", path.display()))?;
        let field_err = |k: &str, want: &str| {
            anyhow::anyhow!(
                "{}: field \"{k}\" must be {want}, got {}",
                path.display(),
                v[k]
            )
        };
        let f32_of = |k: &str| -> Result<Option<f32>> {
            match v.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(|x| Some(x as f32))
                    .ok_or_else(|| field_err(k, "a number")),
            }
        };
        let usize_of = |k: &str| -> Result<Option<usize>> {
            match v.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|x| Some(x as usize))
                    .ok_or_else(|| field_err(k, "a non-negative integer")),
            }
        };
        if let Some(x) = v.get("do_sample").filter(|x| !x.is_null()) {
            cfg.do_sample = x
                .as_bool()
                .ok_or_else(|| field_err("do_sample", "true or false"))?;
        }
        if let Some(x) = f32_of("temperature")? {
            cfg.temperature = x;
        }
        if let Some(x) = usize_of("top_k")? {
            cfg.top_k = x;
        }
        if let Some(x) = f32_of("top_p")? {
            cfg.top_p = x;
        }
        if let Some(x) = f32_of("repetition_penalty")? {
            cfg.repetition_penalty = x;
        }
        if let Some(x) = usize_of("max_new_tokens")? {
            cfg.max_new_tokens = x;
        }
        match v.get("eos_token_id") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Array(ids)) => {
                cfg.eos_token_ids = ids
                    .iter()
                    .map(|x| x.as_u64().map(|x| x as u32))
                    .collect::<Option<_>>()
                    .ok_or_else(|| field_err("eos_token_id", "a token id or a list of them"))?;
            }
            Some(x) => {
                let id = x
                    .as_u64()
                    .ok_or_else(|| field_err("eos_token_id", "a token id or a list of them"))?;
                cfg.eos_token_ids = vec![id as u32];
            }
        }
        Ok(cfg)
    }

    /// Values transformers would reject, as errors naming the setting.
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 {
            bail!("max_new_tokens must be at least 1");
        }
        if self.do_sample && !(self.temperature > 0.0 && self.temperature.is_finite()) {
            bail!(
                "temperature must be a positive number when sampling, got {}",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p must be in (0, 1], got {}", self.top_p);
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            bail!(
                "repetition_penalty must be a positive number, got {}",
                self.repetition_penalty
            );
        }
        Ok(())
    }

    fn processors(&self) -> Processors {
        Processors {
            do_sample: self.do_sample,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
        }
    }
}

/// A word-level tokenizer for a model that has none (benchmarks, tests on
/// the tokenizer-less fixture models): token i is the word "t{i}", and
/// decoding joins words with spaces.
pub fn numbered_word_tokenizer(vocab: usize) -> Result<Tokenizer> {
    use std::str::FromStr;
    let words: Vec<String> = (0..vocab).map(|i| format!("\"t{i}\":{i}")).collect();
    let json = format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
        "normalizer":null,"pre_tokenizer":{{"type":"WhitespaceSplit"}},"post_processor":null,
        "decoder":null,"model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"t0"}}}}"#,
        words.join(",")
    );
    let inner = tokenizers::Tokenizer::from_str(&json)
        .map_err(|e| anyhow::anyhow!("building a word-level tokenizer: {e}"))?;
    Tokenizer::from_parts(inner, None, None, None)
}

/// Why a row stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// It produced an EOS id (kept as the last of `token_ids`).
    Eos,
    /// Its text reached a stop string (cut from `text`).
    Stop,
    /// max_new_tokens.
    Length,
}

/// One prompt's completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    /// The new tokens, EOS included when it ended the row.
    pub token_ids: Vec<u32>,
    /// Their text (special tokens skipped), cut before a stop string.
    pub text: String,
    pub finish_reason: FinishReason,
}

/// Time spent in the two phases of a generation (for tokens/s reports).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GenTimings {
    /// Prompt tokens (padding excluded) and seconds of the prefill.
    pub prefill_tokens: usize,
    pub prefill_s: f64,
    /// Tokens generated after the first, and seconds of the decode steps.
    pub decode_tokens: usize,
    pub decode_s: f64,
}

/// Generates a completion for every prompt (token ids, at least one each) in
/// one batch. `on_token(row, text)` receives each row's text as it becomes
/// final (whole UTF-8 characters, never a stop string).
pub fn generate<B: Backend>(
    model: &mut Llama<B>,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    on_token: &mut dyn FnMut(usize, &str),
) -> Result<Vec<Generated>> {
    generate_timed(model, tokenizer, prompts, cfg, on_token).map(|(g, _)| g)
}

/// [`generate`], also returning how long prefill and decode took.
pub fn generate_timed<B: Backend>(
    model: &mut Llama<B>,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    on_token: &mut dyn FnMut(usize, &str),
) -> Result<(Vec<Generated>, GenTimings)> {
    let seeds: Vec<u64> = (0..prompts.len() as u64)
        .map(|r| cfg.seed.wrapping_add(r))
        .collect();
    generate_seeded(model, tokenizer, prompts, cfg, &seeds, on_token)
}

/// [`generate_timed`] with each row's sampling seed given (`cfg.seed` is not
/// used): a row's sample then depends on its seed alone, not on its place in
/// the batch (the RL stages seed each rollout by its index).
pub fn generate_seeded<B: Backend>(
    model: &mut Llama<B>,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    row_seeds: &[u64],
    on_token: &mut dyn FnMut(usize, &str),
) -> Result<(Vec<Generated>, GenTimings)> {
    cfg.validate()?;
    if row_seeds.len() != prompts.len() {
        bail!("{} seeds for {} prompts", row_seeds.len(), prompts.len());
    }
    if prompts.is_empty() {
        return Ok((Vec::new(), GenTimings::default()));
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        bail!("prompt {i} has no tokens");
    }
    let b = prompts.len();
    let t0 = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let cap = t0 + cfg.max_new_tokens;
    let max_pos = model.cfg.max_position_embeddings;
    if cap > max_pos && max_pos > 0 {
        tracing::warn!(
            "prompt ({t0} tokens) + max_new_tokens ({}) exceeds the model's max_position_embeddings {max_pos}",
            cfg.max_new_tokens
        );
    }
    // Padding and finished rows are fed this id; their keys are masked or
    // their outputs ignored, so any valid id does.
    let pad = model
        .cfg
        .pad_token_id
        .or(cfg.eos_token_ids.first().copied())
        .unwrap_or(0)
        .min(model.cfg.vocab_size.saturating_sub(1) as u32);
    // Left padding: [B, T0] ids and mask; positions cumsum(mask) − 1 (0 at pads, as transformers).
    let mut ids = vec![pad; b * t0];
    let mut mask = vec![0u8; b * t0];
    let mut positions = vec![0u32; b * t0];
    for (r, p) in prompts.iter().enumerate() {
        let off = r * t0 + t0 - p.len();
        ids[off..off + p.len()].copy_from_slice(p);
        mask[off..off + p.len()].fill(1);
        for (j, pos) in positions[off..off + p.len()].iter_mut().enumerate() {
            *pos = j as u32;
        }
    }
    let mut cache = model.new_kv_cache(b, cap)?;
    let procs = cfg.processors();
    let mut rngs: Vec<ChaCha8Rng> = row_seeds
        .iter()
        .map(|&s| ChaCha8Rng::seed_from_u64(s))
        .collect();
    let mut seen: Vec<Vec<u32>> = prompts.to_vec(); // prompt + generated, per row
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    let mut streams: Vec<TextStream> = (0..b).map(|_| TextStream::default()).collect();
    let mut out: Vec<Option<Generated>> = vec![None; b];
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut timings = GenTimings {
        prefill_tokens: prompts.iter().map(Vec::len).sum(),
        ..Default::default()
    };

    let clock = std::time::Instant::now();
    let mut logits = model.forward_cached(&mut cache, &ids, &mask, &positions)?;
    timings.prefill_s = clock.elapsed().as_secs_f64();
    let v = model.cfg.vocab_size;
    let clock = std::time::Instant::now();
    for step in 0..cfg.max_new_tokens {
        let mut step_ids = vec![pad; b];
        for r in 0..b {
            if out[r].is_some() {
                continue;
            }
            let row = &mut logits[r * v..(r + 1) * v];
            let id = procs.next_token(row, &seen[r], &mut rngs[r]);
            step_ids[r] = id;
            seen[r].push(id);
            generated[r].push(id);
            let finish = if cfg.eos_token_ids.contains(&id) {
                Some(FinishReason::Eos)
            } else {
                None
            };
            let text_step = streams[r].push(tokenizer, id, &cfg.stop_strings)?;
            let finish = match text_step {
                Step::Stopped(rest) => {
                    if !rest.is_empty() {
                        on_token(r, &rest);
                    }
                    Some(FinishReason::Stop)
                }
                Step::Text(new) => {
                    if !new.is_empty() {
                        on_token(r, &new);
                    }
                    finish.or((step + 1 == cfg.max_new_tokens).then_some(FinishReason::Length))
                }
            };
            if let Some(reason) = finish {
                if reason != FinishReason::Stop {
                    let rest = streams[r].finish();
                    if !rest.is_empty() {
                        on_token(r, &rest);
                    }
                }
                out[r] = Some(Generated {
                    token_ids: std::mem::take(&mut generated[r]),
                    text: streams[r].text().to_string(),
                    finish_reason: reason,
                });
            }
        }
        if out.iter().all(Option::is_some) {
            break;
        }
        // Every row (finished ones too, as transformers does) takes one more token.
        let step_mask = vec![1u8; b];
        let step_pos = next_pos.clone();
        next_pos.iter_mut().for_each(|p| *p += 1);
        logits = model.forward_cached(&mut cache, &step_ids, &step_mask, &step_pos)?;
        timings.decode_tokens += out.iter().filter(|o| o.is_none()).count();
    }
    timings.decode_s = clock.elapsed().as_secs_f64();
    let done = out
        .into_iter()
        .enumerate()
        .map(|(r, g)| g.with_context(|| format!("row {r} did not finish")))
        .collect::<Result<Vec<_>>>()?;
    Ok((done, timings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_config_json_sets_defaults_and_bad_fields_are_named() {
        let dir = tempfile::tempdir().unwrap();
        // No file: transformers' defaults (and our max_new_tokens of 512).
        assert_eq!(
            GenerationConfig::from_model_dir(dir.path()).unwrap(),
            GenerationConfig::default()
        );
        let path = dir.path().join("generation_config.json");
        std::fs::write(
            &path,
            r#"{"do_sample": true, "temperature": 0.6, "top_k": 20, "top_p": 0.8,
                "repetition_penalty": 1.05, "eos_token_id": [151645, 151643],
                "max_new_tokens": 64, "bos_token_id": 1}"#,
        )
        .unwrap();
        let c = GenerationConfig::from_model_dir(dir.path()).unwrap();
        assert!(c.do_sample);
        assert_eq!((c.temperature, c.top_k, c.top_p), (0.6, 20, 0.8));
        assert_eq!(c.repetition_penalty, 1.05);
        assert_eq!(c.eos_token_ids, vec![151645, 151643]);
        assert_eq!(c.max_new_tokens, 64);
        std::fs::write(&path, r#"{"eos_token_id": 2}"#).unwrap();
        let c = GenerationConfig::from_model_dir(dir.path()).unwrap();
        assert_eq!(c.eos_token_ids, vec![2]);
        std::fs::write(&path, r#"{"top_k": "many"}"#).unwrap();
        let e = GenerationConfig::from_model_dir(dir.path()).unwrap_err();
        assert!(
            e.to_string().contains("generation_config.json") && e.to_string().contains("\"top_k\""),
            "{e}"
        );
    }

    #[test]
    fn invalid_settings_are_errors() {
        let bad = [
            GenerationConfig {
                max_new_tokens: 0,
                ..Default::default()
            },
            GenerationConfig {
                do_sample: true,
                temperature: 0.0,
                ..Default::default()
            },
            GenerationConfig {
                top_p: 0.0,
                ..Default::default()
            },
            GenerationConfig {
                repetition_penalty: -1.0,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
        assert!(GenerationConfig::default().validate().is_ok());
    }
}
