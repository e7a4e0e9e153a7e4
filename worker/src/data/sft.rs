//! SFT samples: conversations → `input_ids` / `labels` exactly as MedicalGPT's
//! `supervised_finetuning.py` `preprocess_function` builds them.
//!
//! Per turn k of the template's dialog: `src = encode(src_k,
//! add_special_tokens = k == 0)` (BOS only on the first turn), `tgt =
//! encode(tgt_k, add_special_tokens = false)`; proportional truncation to
//! `model_max_length` L (`src[:int(L*|src|/total)]`, `tgt[:int(L*|tgt|/total)-1]`
//! with Python slice semantics, so a limit of 0 drops one token from the
//! target rather than all); a leading EOS of src and a trailing EOS of tgt are
//! stripped; the conversation stops at the first turn that no longer fits
//! (`len + |src| + |tgt| + 1 > L`); each answer is followed by EOS, which is
//! trained. Prompt labels are the ignore index unless `train_on_inputs`.
//! Rows whose labels are all ignored are dropped — and counted.

use crate::data::chat::Conversation;
use crate::data::template::ChatFormat;
use crate::tokenizer::Tokenizer;
use crate::train::Sample;
use anyhow::{anyhow, bail, Context, Result};

/// `LabelSmoother.ignore_index`.
pub const IGNORE_INDEX: i32 = -100;

/// The preprocessing options of MedicalGPT's SFT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SftTokenizeArgs {
    pub model_max_length: usize,
    pub train_on_inputs: bool,
    /// Label of prompt tokens: -100, or the pad id with
    /// `--ignore_pad_token_for_loss False` (MedicalGPT's `IGNORE_INDEX`).
    pub ignore_index: i32,
}

/// Tokenised conversations and what was lost on the way.
#[derive(Clone, Debug, Default)]
pub struct SftSamples {
    pub samples: Vec<Sample>,
    /// Rows dropped because every label was the ignore index (e.g. the first
    /// turn did not fit in model_max_length).
    pub all_labels_ignored: usize,
    /// Turns dropped because they no longer fit (summed over conversations).
    pub turns_dropped: usize,
}

/// `seq[:end]` with Python slice semantics (negative `end` counts from the end).
fn py_truncate(seq: &mut Vec<u32>, end: i64) {
    let n = seq.len() as i64;
    let keep = if end < 0 {
        (n + end).max(0)
    } else {
        end.min(n)
    };
    seq.truncate(keep as usize);
}

/// One conversation's dialog [(src, tgt), ...] → a sample (possibly empty).
/// Returns the sample and the number of turns that did not fit.
pub fn preprocess_dialog(
    dialog: &[(String, String)],
    tokenizer: &Tokenizer,
    args: &SftTokenizeArgs,
) -> Result<(Sample, usize)> {
    let eos = tokenizer.eos_id().ok_or_else(|| {
        anyhow!("the tokenizer has no EOS token; SFT appends one after each answer")
    })?;
    let max_length = args.model_max_length;
    let mut input_ids: Vec<u32> = Vec::new();
    let mut labels: Vec<i32> = Vec::new();
    for (k, (src_text, tgt_text)) in dialog.iter().enumerate() {
        let mut src = tokenizer.encode(src_text, k == 0)?;
        let mut tgt = tokenizer.encode(tgt_text, false)?;
        let total = src.len() + tgt.len();
        if total == 0 {
            bail!("turn {k} has an empty prompt and answer after templating; nothing to train on");
        }
        // int(max_length * (len / total)), in floating point as Python does.
        let max_src = (max_length as f64 * (src.len() as f64 / total as f64)) as i64;
        let max_tgt = (max_length as f64 * (tgt.len() as f64 / total as f64)) as i64;
        if src.len() as i64 > max_src {
            py_truncate(&mut src, max_src);
        }
        if tgt.len() as i64 > max_tgt - 1 {
            py_truncate(&mut tgt, max_tgt - 1);
        }
        if src.first() == Some(&eos) {
            src.remove(0);
        }
        if tgt.last() == Some(&eos) {
            tgt.pop();
        }
        if input_ids.len() + src.len() + tgt.len() + 1 > max_length {
            return Ok((Sample { input_ids, labels }, dialog.len() - k));
        }
        let to_i32 = |ids: &[u32]| ids.iter().map(|&x| x as i32).collect::<Vec<_>>();
        if args.train_on_inputs {
            labels.extend(to_i32(&src));
        } else {
            labels.extend(std::iter::repeat_n(args.ignore_index, src.len()));
        }
        labels.extend(to_i32(&tgt));
        labels.push(eos as i32);
        input_ids.extend(src);
        input_ids.extend(tgt);
        input_ids.push(eos);
    }
    Ok((Sample { input_ids, labels }, 0))
}

/// Template and tokenise every conversation; rows with no trained label are
/// dropped and counted.
pub fn tokenize_conversations(
    conversations: &[Conversation],
    format: &ChatFormat,
    tokenizer: &Tokenizer,
    args: &SftTokenizeArgs,
) -> Result<SftSamples> {
    let mut out = SftSamples::default();
    for conv in conversations {
        let at = || format!("{}:{}", conv.source.display(), conv.line);
        let dialog = format
            .dialog(&conv.messages)
            .with_context(|| format!("{}: applying template {}", at(), format.name()))?;
        let (sample, dropped) = preprocess_dialog(&dialog, tokenizer, args)
            .with_context(|| format!("{}: tokenizing", at()))?;
        out.turns_dropped += dropped;
        if sample.labels.iter().all(|&l| l == args.ignore_index) {
            out.all_labels_ignored += 1;
            continue;
        }
        out.samples.push(sample);
    }
    if out.all_labels_ignored > 0 {
        tracing::warn!(
            rows = out.all_labels_ignored,
            model_max_length = args.model_max_length,
            "dropped conversations with no trained token (the first turn does not fit in model_max_length)"
        );
    }
    Ok(out)
}

/// MedicalGPT's tokenizer fixes before SFT: no EOS → the named template's
/// `stop_str` (else `"</s>"`); no BOS → BOS = EOS; no PAD → UNK, else EOS.
/// MedicalGPT may add a new token to the vocabulary here; we do not resize
/// the model, so the token must already exist. Returns what was changed.
pub fn fix_special_tokens(
    tokenizer: &mut Tokenizer,
    stop_str: Option<&str>,
) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    if tokenizer.eos_id().is_none() {
        let eos = stop_str.unwrap_or("</s>");
        tokenizer
            .set_eos_token(eos)
            .with_context(|| format!("the tokenizer has no eos_token and {eos:?} (MedicalGPT's choice) is not in its vocabulary; set eos_token in tokenizer_config.json"))?;
        notes.push(format!("eos_token set to {eos:?}"));
    }
    let eos = tokenizer.eos_token().unwrap_or_default().to_string();
    if tokenizer.bos_id().is_none() {
        tokenizer.set_bos_token(&eos)?;
        notes.push(format!("bos_token set to the eos_token {eos:?}"));
    }
    if tokenizer.pad_id().is_none() {
        let pad = match (tokenizer.unk_token(), tokenizer.unk_id()) {
            (Some(unk), Some(_)) => unk.to_string(),
            _ => eos.clone(),
        };
        tokenizer.set_pad_token(&pad)?;
        notes.push(format!("pad_token set to {pad:?}"));
    }
    for n in &notes {
        tracing::info!("tokenizer: {n}");
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::tokenizer::{train_byte_level_bpe, ENDOFTEXT, IM_END};

    fn bare_tokenizer() -> Tokenizer {
        let texts: Vec<String> = (0..40).map(|i| format!("fever and cough {i}")).collect();
        let trained = train_byte_level_bpe(&texts, 300).unwrap();
        Tokenizer::from_parts(trained.inner().clone(), None, None, None).unwrap()
    }

    #[test]
    fn tokenizer_fixes_follow_medicalgpt() {
        // No EOS: the named template's stop_str; BOS = EOS; no UNK so PAD = EOS.
        let mut tok = bare_tokenizer();
        let notes = fix_special_tokens(&mut tok, Some(IM_END)).unwrap();
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert_eq!(tok.eos_token(), Some(IM_END));
        assert_eq!(tok.bos_token(), Some(IM_END));
        assert_eq!(tok.pad_token(), Some(IM_END));
        // Nothing to fix on a complete tokenizer.
        assert!(fix_special_tokens(&mut tok, None).unwrap().is_empty());
        // "</s>" (no template) is not in this vocabulary: an error, not a silently added token.
        let e = format!(
            "{:#}",
            fix_special_tokens(&mut bare_tokenizer(), None).unwrap_err()
        );
        assert!(e.contains("</s>") && e.contains("eos_token"), "{e}");
        let mut tok = bare_tokenizer();
        fix_special_tokens(&mut tok, Some(ENDOFTEXT)).unwrap();
        assert_eq!(tok.eos_id(), Some(0));
    }

    #[test]
    fn python_slices() {
        let mut v = vec![1, 2, 3];
        py_truncate(&mut v, -1);
        assert_eq!(v, [1, 2]);
        let mut v = vec![1, 2, 3];
        py_truncate(&mut v, -5);
        assert!(v.is_empty());
        let mut v = vec![1, 2, 3];
        py_truncate(&mut v, 2);
        assert_eq!(v, [1, 2]);
    }
}
