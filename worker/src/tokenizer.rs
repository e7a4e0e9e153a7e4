//! Tokenizer: a Hugging Face `tokenizer.json` plus the side files that
//! transformers reads next to it (`tokenizer_config.json`,
//! `special_tokens_map.json`, `chat_template.jinja`).
//!
//! Why a wrapper and not `tokenizers::Tokenizer` directly: the special tokens
//! (bos/eos/pad), the chat template and `model_max_length` live in the side
//! files, not in `tokenizer.json`, and the training stages need all of them.
//!
//! Encoding follows `transformers`' fast tokenizers: the `tokenizer.json`
//! post-processor alone decides whether BOS/EOS are added (Llama adds `<s>`,
//! Qwen adds nothing), and any truncation/padding stored in `tokenizer.json`
//! is switched off, as `PreTrainedTokenizerFast.__call__` does by default.

use crate::fsutil::{write_atomic, write_json_atomic};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::str::FromStr;
use tokenizers::Tokenizer as HfTokenizer;

/// End-of-text token of tokenizers trained here: EOS, PAD and document separator.
pub const ENDOFTEXT: &str = "<|endoftext|>";
/// ChatML turn delimiters, special tokens of tokenizers trained here.
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";

/// ChatML template (the Qwen2 one without tools) written into the
/// `tokenizer_config.json` of tokenizers trained here, so later SFT/RL stages
/// and `apply_chat_template` in Python render conversations identically.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// `model_max_length` values at or above this mean "no limit" (transformers
/// writes `int(1e30)` when a model declares none).
const UNLIMITED_MAX_LENGTH: f64 = 1e15;

/// A tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: HfTokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
    model_max_length: Option<usize>,
    chat_template: Option<String>,
    /// unk/sep/cls/mask tokens, when declared (chat templates may use them).
    other_special_tokens: Vec<(&'static str, String)>,
}

/// Named special tokens besides bos/eos/pad that transformers exposes in
/// `special_tokens_map` (and so to chat templates).
const OTHER_SPECIAL_TOKENS: [&str; 4] = ["unk_token", "sep_token", "cls_token", "mask_token"];

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &(&self.bos_token, self.bos_id))
            .field("eos", &(&self.eos_token, self.eos_id))
            .field("pad", &(&self.pad_token, self.pad_id))
            .field("model_max_length", &self.model_max_length)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// A special token as it appears in HF config files: `"<s>"`,
/// `{"content": "<s>", ...}` or `null`. `Ok(None)` when absent or null.
fn special_token_field(
    obj: &Map<String, Value>,
    field: &str,
    file: &Path,
) -> Result<Option<String>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => bail!(
                "{}: field \"{field}\" is an object without a string \"content\"; expected a string or {{\"content\": \"...\"}}",
                file.display()
            ),
        },
        Some(other) => bail!(
            "{}: field \"{field}\" is {}; expected a string, {{\"content\": \"...\"}} or null",
            file.display(),
            json_kind(other)
        ),
    }
}

/// Short name of a JSON value's type, for error messages.
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn bool_field(obj: &Map<String, Value>, field: &str, file: &Path) -> Result<Option<bool>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => bail!(
            "{}: field \"{field}\" is {}; expected true or false",
            file.display(),
            json_kind(other)
        ),
    }
}

/// `model_max_length`: a positive integer; huge values (HF's `int(1e30)`) mean no limit.
fn max_length_field(obj: &Map<String, Value>, file: &Path) -> Result<Option<usize>> {
    let v = match obj.get("model_max_length") {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v,
    };
    let bad = || {
        anyhow!(
            "{}: field \"model_max_length\" is {v}; expected a positive integer",
            file.display()
        )
    };
    let f = v.as_f64().ok_or_else(bad)?;
    if f < 1.0 || f.is_nan() || f.fract() != 0.0 {
        return Err(bad());
    }
    if f >= UNLIMITED_MAX_LENGTH {
        return Ok(None);
    }
    Ok(Some(v.as_u64().map(|n| n as usize).unwrap_or(f as usize)))
}

/// `chat_template`: a string, or a list of `{name, template}` (the one named
/// "default" is used, else the first, as `apply_chat_template` without a name).
fn chat_template_field(obj: &Map<String, Value>, file: &Path) -> Result<Option<String>> {
    match obj.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(items)) => {
            let mut first = None;
            for (i, item) in items.iter().enumerate() {
                let name = item.get("name").and_then(Value::as_str);
                let template = item.get("template").and_then(Value::as_str).ok_or_else(|| {
                    anyhow!(
                        "{}: chat_template[{i}] has no string \"template\"; expected {{\"name\": ..., \"template\": ...}}",
                        file.display()
                    )
                })?;
                if name == Some("default") {
                    return Ok(Some(template.to_string()));
                }
                first.get_or_insert_with(|| template.to_string());
            }
            Ok(first)
        }
        Some(other) => bail!(
            "{}: field \"chat_template\" is {}; expected a string or a list of {{\"name\", \"template\"}}",
            file.display(),
            json_kind(other)
        ),
    }
}

/// Read a JSON object file; `Ok(None)` if the file does not exist.
fn read_json_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {} as JSON", path.display()))?;
    match v {
        Value::Object(m) => Ok(Some(m)),
        other => bail!(
            "{}: expected a JSON object at the top level, found {}",
            path.display(),
            json_kind(&other)
        ),
    }
}

impl Tokenizer {
    /// Load `dir/tokenizer.json` and the side files next to it.
    ///
    /// Special tokens come from `tokenizer_config.json`, falling back to
    /// `special_tokens_map.json`; the chat template from `chat_template.jinja`
    /// (transformers 5 layout) if present, else `tokenizer_config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&tok_path).with_context(|| {
            format!(
                "reading {} (expected a Hugging Face fast tokenizer file)",
                tok_path.display()
            )
        })?;
        let inner = HfTokenizer::from_str(&text)
            .map_err(|e| anyhow!("parsing {}: {e}", tok_path.display()))?;

        let cfg_path = dir.join("tokenizer_config.json");
        let map_path = dir.join("special_tokens_map.json");
        let cfg = read_json_object(&cfg_path)?.unwrap_or_default();
        let map = read_json_object(&map_path)?.unwrap_or_default();

        let token = |field: &str| -> Result<Option<String>> {
            match special_token_field(&cfg, field, &cfg_path)? {
                Some(t) => Ok(Some(t)),
                None => special_token_field(&map, field, &map_path),
            }
        };
        let bos_token = token("bos_token")?;
        let eos_token = token("eos_token")?;
        let pad_token = token("pad_token")?;
        let mut other_special_tokens = Vec::new();
        for field in OTHER_SPECIAL_TOKENS {
            if let Some(t) = token(field)? {
                other_special_tokens.push((field, t));
            }
        }

        let jinja_path = dir.join("chat_template.jinja");
        let chat_template = match std::fs::read_to_string(&jinja_path) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                chat_template_field(&cfg, &cfg_path)?
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", jinja_path.display())),
        };

        let mut tok = Tokenizer {
            inner,
            bos_token: None,
            eos_token: None,
            pad_token: None,
            bos_id: None,
            eos_id: None,
            pad_id: None,
            add_bos_token: bool_field(&cfg, "add_bos_token", &cfg_path)?,
            add_eos_token: bool_field(&cfg, "add_eos_token", &cfg_path)?,
            model_max_length: max_length_field(&cfg, &cfg_path)?,
            chat_template,
            other_special_tokens,
        };
        tok.set_special_tokens(bos_token, eos_token, pad_token)
            .with_context(|| format!("special tokens of {}", dir.display()))?;
        tok.disable_truncation_and_padding();
        Ok(tok)
    }

    /// Wrap an in-memory `tokenizers::Tokenizer` with the given special tokens.
    pub fn from_parts(
        inner: HfTokenizer,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
        pad_token: Option<&str>,
    ) -> Result<Self> {
        let mut tok = Tokenizer {
            inner,
            bos_token: None,
            eos_token: None,
            pad_token: None,
            bos_id: None,
            eos_id: None,
            pad_id: None,
            add_bos_token: None,
            add_eos_token: None,
            model_max_length: None,
            chat_template: None,
            other_special_tokens: Vec::new(),
        };
        tok.set_special_tokens(
            bos_token.map(str::to_string),
            eos_token.map(str::to_string),
            pad_token.map(str::to_string),
        )?;
        tok.disable_truncation_and_padding();
        Ok(tok)
    }

    fn set_special_tokens(
        &mut self,
        bos: Option<String>,
        eos: Option<String>,
        pad: Option<String>,
    ) -> Result<()> {
        let id = |inner: &HfTokenizer, field: &str, t: &Option<String>| -> Result<Option<u32>> {
            match t {
                None => Ok(None),
                Some(s) => inner.token_to_id(s).map(Some).ok_or_else(|| {
                    anyhow!("{field} {s:?} is not in the vocabulary of tokenizer.json")
                }),
            }
        };
        self.bos_id = id(&self.inner, "bos_token", &bos)?;
        self.eos_id = id(&self.inner, "eos_token", &eos)?;
        self.pad_id = id(&self.inner, "pad_token", &pad)?;
        self.bos_token = bos;
        self.eos_token = eos;
        self.pad_token = pad;
        Ok(())
    }

    /// transformers turns off any truncation/padding stored in tokenizer.json
    /// when called without `truncation=`/`padding=`; do the same.
    fn disable_truncation_and_padding(&mut self) {
        // with_truncation(None) cannot fail: only a stride check on Some(..) can.
        let _ = self.inner.with_truncation(None);
        self.inner.with_padding(None);
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }
    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }
    /// `add_bos_token` from tokenizer_config.json, informational: the
    /// tokenizer.json post-processor is what actually adds BOS.
    pub fn add_bos_token(&self) -> Option<bool> {
        self.add_bos_token
    }
    /// `add_eos_token` from tokenizer_config.json, informational (see `add_bos_token`).
    pub fn add_eos_token(&self) -> Option<bool> {
        self.add_eos_token
    }
    /// `None` means no declared limit.
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }
    pub fn set_model_max_length(&mut self, n: Option<usize>) {
        self.model_max_length = n;
    }
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
    pub fn set_chat_template(&mut self, t: Option<String>) {
        self.chat_template = t;
    }
    /// Number of distinct tokens including added tokens (HF `len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    /// `unk_token`, if the tokenizer declares one.
    pub fn unk_token(&self) -> Option<&str> {
        self.other_special_tokens
            .iter()
            .find(|(k, _)| *k == "unk_token")
            .map(|(_, v)| v.as_str())
    }
    /// Id of `unk_token`, if declared and in the vocabulary.
    pub fn unk_id(&self) -> Option<u32> {
        self.unk_token().and_then(|t| self.inner.token_to_id(t))
    }
    /// transformers' `special_tokens_map`: (attribute, token) of bos, eos,
    /// unk, sep, pad, cls, mask that are set, in that order.
    pub fn special_tokens_map(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let other = |name: &str| {
            self.other_special_tokens
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(k, v)| (*k, v.clone()))
        };
        out.extend(self.bos_token.clone().map(|t| ("bos_token", t)));
        out.extend(self.eos_token.clone().map(|t| ("eos_token", t)));
        out.extend(other("unk_token"));
        out.extend(other("sep_token"));
        out.extend(self.pad_token.clone().map(|t| ("pad_token", t)));
        out.extend(other("cls_token"));
        out.extend(other("mask_token"));
        out
    }
    /// Make `token` (which must be in the vocabulary) the BOS token.
    pub fn set_bos_token(&mut self, token: &str) -> Result<()> {
        let (eos, pad) = (self.eos_token.clone(), self.pad_token.clone());
        self.set_special_tokens(Some(token.to_string()), eos, pad)
    }
    /// Make `token` (which must be in the vocabulary) the EOS token.
    pub fn set_eos_token(&mut self, token: &str) -> Result<()> {
        let (bos, pad) = (self.bos_token.clone(), self.pad_token.clone());
        self.set_special_tokens(bos, Some(token.to_string()), pad)
    }
    /// Make `token` (which must be in the vocabulary) the PAD token.
    pub fn set_pad_token(&mut self, token: &str) -> Result<()> {
        let (bos, eos) = (self.bos_token.clone(), self.eos_token.clone());
        self.set_special_tokens(bos, eos, Some(token.to_string()))
    }
    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &HfTokenizer {
        &self.inner
    }
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Token ids of `text`; with `add_special_tokens` the post-processor adds
    /// whatever the model expects (e.g. BOS for Llama), like HF `tokenizer(text)`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| {
                let preview: String = text.chars().take(40).collect();
                anyhow!("tokenizing {preview:?}...: {e}")
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// `encode` of many texts, in parallel (rayon), order preserved.
    pub fn encode_batch<S: AsRef<str>>(
        &self,
        texts: &[S],
        add_special_tokens: bool,
    ) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let encs = self
            .inner
            .encode_batch_fast(inputs, add_special_tokens)
            .map_err(|e| anyhow!("tokenizing a batch of {} texts: {e}", texts.len()))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Text of `ids`. Like HF, ids the tokenizer does not know are skipped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("decoding {} token ids: {e}", ids.len()))
    }

    /// Write `tokenizer.json` and `tokenizer_config.json` (atomically) so that
    /// both this loader and `transformers.AutoTokenizer.from_pretrained(dir)`
    /// read the same tokenizer back.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating directory {}", dir.display()))?;
        let tok_path = dir.join("tokenizer.json");
        let text = self
            .inner
            .to_string(false)
            .map_err(|e| anyhow!("serializing {}: {e}", tok_path.display()))?;
        write_atomic(&tok_path, text.as_bytes())?;
        write_json_atomic(&dir.join("tokenizer_config.json"), &self.config_json())
    }

    /// The `tokenizer_config.json` contents. `added_tokens_decoder` mirrors
    /// tokenizer.json so transformers marks the same tokens special.
    fn config_json(&self) -> Value {
        let mut added = Map::new();
        let mut decoder: Vec<_> = self.inner.get_added_tokens_decoder().into_iter().collect();
        decoder.sort_by_key(|(id, _)| *id);
        for (id, t) in decoder {
            added.insert(
                id.to_string(),
                json!({
                    "content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                    "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special,
                }),
            );
        }
        let mut cfg = Map::new();
        cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        cfg.insert("added_tokens_decoder".into(), Value::Object(added));
        cfg.insert("bos_token".into(), json!(self.bos_token));
        cfg.insert("eos_token".into(), json!(self.eos_token));
        cfg.insert("pad_token".into(), json!(self.pad_token));
        cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
        if let Some(n) = self.model_max_length {
            cfg.insert("model_max_length".into(), json!(n));
        }
        if let Some(t) = &self.chat_template {
            cfg.insert("chat_template".into(), json!(t));
        }
        Value::Object(cfg)
    }
}

/// Train a byte-level BPE (GPT-2/Qwen style) on `texts`.
///
/// Special tokens, in id order: `<|endoftext|>` (0: EOS, PAD and the packing
/// separator), `<|im_start|>` (1), `<|im_end|>` (2). There is no BOS: like
/// Qwen, nothing is prepended, so `encode(text, true)` equals
/// `encode(text, false)` and documents are delimited by EOS alone; the chat
/// template is ChatML, which needs no BOS either. Pairs seen fewer than twice
/// are not merged, so a small corpus can yield fewer than `vocab_size` tokens.
pub fn train_byte_level_bpe(texts: &[String], vocab_size: usize) -> Result<Tokenizer> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{
        AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    };
    use tokenizers::{TokenizerBuilder, TokenizerImpl};

    let specials = [ENDOFTEXT, IM_START, IM_END];
    let min_vocab = 256 + specials.len();
    if vocab_size < min_vocab {
        bail!("vocab_size {vocab_size} is too small: a byte-level BPE needs at least {min_vocab} (256 bytes + {} special tokens)", specials.len());
    }
    if texts.iter().all(|t| t.is_empty()) {
        bail!("cannot train a tokenizer: the training corpus has no text");
    }
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(
            specials
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .build();
    let mut tok: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).into()))
        .with_post_processor(Some(ByteLevel::default().trim_offsets(false).into()))
        .with_decoder(Some(ByteLevelDecoder::default().into()))
        .build()
        .map_err(|e| anyhow!("building the BPE tokenizer: {e}"))?;
    tok.train(&mut trainer, texts.iter())
        .map_err(|e| anyhow!("training the BPE tokenizer: {e}"))?;
    let json = tok
        .to_string(false)
        .map_err(|e| anyhow!("serializing the trained tokenizer: {e}"))?;
    let inner = HfTokenizer::from_str(&json)
        .map_err(|e| anyhow!("reloading the trained tokenizer: {e}"))?;
    let mut out = Tokenizer::from_parts(inner, None, Some(ENDOFTEXT), Some(ENDOFTEXT))?;
    out.set_chat_template(Some(CHATML_TEMPLATE.to_string()));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        let base = [
            "The quick brown fox jumps over the lazy dog.",
            "Varnex fever is treated with zorvatin, 250 mg twice a day.",
            "传染病是指由病原微生物引起的疾病。",
            "Patients with Quillan syndrome present with cough and fatigue.",
        ];
        (0..50)
            .map(|i| format!("{} {}", base[i % base.len()], i))
            .collect()
    }

    #[test]
    fn train_save_load_round_trip() {
        let tok = train_byte_level_bpe(&corpus(), 400).unwrap();
        assert!(
            tok.vocab_size() <= 400 && tok.vocab_size() > 259,
            "{}",
            tok.vocab_size()
        );
        assert_eq!(tok.eos_id(), Some(0));
        assert_eq!(tok.pad_id(), Some(0));
        assert_eq!(tok.bos_id(), None);

        let dir = tempfile::tempdir().unwrap();
        let mut tok = tok;
        tok.set_model_max_length(Some(128));
        tok.save(dir.path()).unwrap();
        let back = Tokenizer::load(dir.path()).unwrap();
        assert_eq!(back.vocab_size(), tok.vocab_size());
        assert_eq!(back.eos_id(), Some(0));
        assert_eq!(back.model_max_length(), Some(128));
        assert_eq!(back.chat_template(), Some(CHATML_TEMPLATE));

        for text in [
            "Zorvatin 250 mg, twice a day!",
            "病原微生物 and   spaces\n\tnewline",
            "",
        ] {
            let ids = back.encode(text, true).unwrap();
            assert_eq!(ids, back.encode(text, false).unwrap(), "no BOS/EOS added");
            assert_eq!(back.decode(&ids, false).unwrap(), text);
        }
        // Special tokens are atomic and skippable.
        let ids = back
            .encode("<|im_start|>user\nhi<|im_end|><|endoftext|>", false)
            .unwrap();
        assert_eq!(ids[0], back.token_to_id(IM_START).unwrap());
        assert_eq!(*ids.last().unwrap(), 0);
        assert_eq!(back.decode(&ids, true).unwrap(), "user\nhi");
    }

    #[test]
    fn training_is_deterministic() {
        let a = train_byte_level_bpe(&corpus(), 350).unwrap();
        let b = train_byte_level_bpe(&corpus(), 350).unwrap();
        assert_eq!(
            a.inner().to_string(false).unwrap(),
            b.inner().to_string(false).unwrap()
        );
    }

    #[test]
    fn train_rejects_bad_input() {
        let e = train_byte_level_bpe(&corpus(), 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("too small"), "{e}");
        let e = train_byte_level_bpe(&[String::new()], 400)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no text"), "{e}");
    }

    #[test]
    fn object_form_tokens_list_template_and_special_tokens_map() {
        let dir = tempfile::tempdir().unwrap();
        train_byte_level_bpe(&corpus(), 300)
            .unwrap()
            .save(dir.path())
            .unwrap();
        let cfg = json!({
            "eos_token": {"content": "<|im_end|>", "lstrip": false, "special": true},
            "bos_token": null,
            "add_bos_token": false,
            "model_max_length": 1000000000000000019884624838656.0,
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
        });
        write_json_atomic(&dir.path().join("tokenizer_config.json"), &cfg).unwrap();
        write_json_atomic(
            &dir.path().join("special_tokens_map.json"),
            &json!({"pad_token": {"content": "<|endoftext|>"}, "eos_token": "<|endoftext|>"}),
        )
        .unwrap();
        let tok = Tokenizer::load(dir.path()).unwrap();
        assert_eq!(
            tok.eos_token(),
            Some(IM_END),
            "tokenizer_config wins over special_tokens_map"
        );
        assert_eq!(tok.eos_id(), Some(2));
        assert_eq!(tok.pad_id(), Some(0), "fallback to special_tokens_map");
        assert_eq!(tok.bos_id(), None);
        assert_eq!(tok.add_bos_token(), Some(false));
        assert_eq!(tok.model_max_length(), None, "1e30 means unlimited");
        assert_eq!(tok.chat_template(), Some("D"));

        // transformers 5 layout: chat_template.jinja takes precedence.
        write_atomic(&dir.path().join("chat_template.jinja"), b"J").unwrap();
        assert_eq!(
            Tokenizer::load(dir.path()).unwrap().chat_template(),
            Some("J")
        );
    }

    #[test]
    fn special_tokens_map_order_and_setters() {
        let dir = tempfile::tempdir().unwrap();
        train_byte_level_bpe(&corpus(), 300)
            .unwrap()
            .save(dir.path())
            .unwrap();
        write_json_atomic(
            &dir.path().join("tokenizer_config.json"),
            &json!({"pad_token": "<|endoftext|>", "mask_token": "<|im_start|>", "unk_token": "<|im_end|>", "eos_token": "<|im_end|>"}),
        )
        .unwrap();
        let mut tok = Tokenizer::load(dir.path()).unwrap();
        let names: Vec<&str> = tok.special_tokens_map().iter().map(|(k, _)| *k).collect();
        // transformers' SPECIAL_TOKENS_ATTRIBUTES order, only the ones that are set.
        assert_eq!(names, ["eos_token", "unk_token", "pad_token", "mask_token"]);
        assert_eq!(tok.unk_token(), Some(IM_END));
        assert_eq!(tok.unk_id(), Some(2));

        tok.set_bos_token(IM_START).unwrap();
        assert_eq!((tok.bos_token(), tok.bos_id()), (Some(IM_START), Some(1)));
        tok.set_eos_token(ENDOFTEXT).unwrap();
        assert_eq!(tok.eos_id(), Some(0));
        assert_eq!(tok.bos_id(), Some(1), "other tokens are kept");
        let e = tok.set_pad_token("<pad>").unwrap_err().to_string();
        assert!(
            e.contains("<pad>") && e.contains("not in the vocabulary"),
            "{e}"
        );
    }

    #[test]
    fn bad_files_are_named_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = format!("{:#}", Tokenizer::load(dir.path()).unwrap_err());
        assert!(
            e.contains(&dir.path().join("tokenizer.json").display().to_string()),
            "{e}"
        );

        write_atomic(
            &dir.path().join("tokenizer.json"),
            b"{\"version\": \"1.0\", oops",
        )
        .unwrap();
        let e = format!("{:#}", Tokenizer::load(dir.path()).unwrap_err());
        assert!(e.contains("tokenizer.json"), "{e}");

        train_byte_level_bpe(&corpus(), 300)
            .unwrap()
            .save(dir.path())
            .unwrap();
        write_atomic(
            &dir.path().join("tokenizer_config.json"),
            b"{\"eos_token\": 3}",
        )
        .unwrap();
        let e = format!("{:#}", Tokenizer::load(dir.path()).unwrap_err());
        assert!(
            e.contains("tokenizer_config.json") && e.contains("eos_token"),
            "{e}"
        );

        write_atomic(
            &dir.path().join("tokenizer_config.json"),
            b"{\"eos_token\": \"<nope>\"}",
        )
        .unwrap();
        let e = format!("{:#}", Tokenizer::load(dir.path()).unwrap_err());
        assert!(
            e.contains("<nope>") && e.contains("not in the vocabulary"),
            "{e}"
        );

        write_atomic(&dir.path().join("tokenizer_config.json"), b"[1,").unwrap();
        let e = format!("{:#}", Tokenizer::load(dir.path()).unwrap_err());
        assert!(e.contains("tokenizer_config.json"), "{e}");
    }
}
