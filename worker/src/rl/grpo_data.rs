//! GRPO prompts: MedicalGPT's `{"question": ..., "answer": ...}` records
//! (JSON lines or a JSON array; the answer is what the accuracy reward
//! checks), or SFT-format files (ShareGPT/Alpaca: every human turn is a
//! prompt and the gpt answer its reference, see [`super::prompts`]).
//!
//! MedicalGPT puts its R1 system prompt before every question; here the
//! system prompt is `--system_prompt` (none by default), and an SFT
//! conversation's own system turn wins over it.

use super::prompts::{read_prompt_dir, Prompt};
use crate::data::pretrain::list_json_files;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The JSON records of a file with the line each starts on.
fn records(path: &Path) -> Result<Vec<(usize, Result<Value, String>)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let is_array = text.trim_start().starts_with('[');
    if is_array {
        let values: Vec<Value> = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}: invalid JSON (expected an array of objects): {e}",
                path.display(),
                e.line()
            )
        })?;
        // Elements of an array are named by their index (1-based) instead of a line.
        return Ok(values
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i + 1, Ok(v)))
            .collect());
    }
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, serde_json::from_str(l).map_err(|e| e.to_string())))
        .collect())
}

/// Whether a file holds question/answer records (its first record has "question").
fn is_qa_file(path: &Path) -> Result<bool> {
    Ok(match records(path)?.first() {
        Some((_, Ok(v))) => v.get("question").is_some(),
        _ => false,
    })
}

/// One `{"question", "answer"}` record as a prompt.
fn qa_prompt(v: &Value, system: Option<&str>) -> Result<Prompt, String> {
    let obj = v.as_object().ok_or("expected a JSON object")?;
    let question = match obj.get("question") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        _ => return Err("field \"question\" must be a non-empty string".into()),
    };
    let answer = match obj.get("answer") {
        Some(Value::String(s)) => s.clone(),
        // GSM8K-like data sometimes stores a bare number.
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err("field \"answer\" must be a string (the reference answer)".into()),
    };
    Ok(Prompt {
        system: system.map(str::to_string),
        history: Vec::new(),
        question,
        reference: Some(answer),
    })
}

/// Prompts and how many invalid records were skipped (only with `skip_invalid`).
pub struct GrpoPrompts {
    pub prompts: Vec<Prompt>,
    pub skipped_invalid: usize,
    pub files: Vec<PathBuf>,
}

/// Read every prompt under `dir` (a folder or one file): question/answer
/// files or SFT files, not both in one folder.
pub fn read_grpo_prompts(
    dir: &Path,
    system_prompt: Option<&str>,
    skip_invalid: bool,
) -> Result<GrpoPrompts> {
    let files: Vec<PathBuf> =
        list_json_files(dir).with_context(|| format!("GRPO data {}", dir.display()))?;
    if files.is_empty() {
        bail!(
            "no .json/.jsonl files in {} (GRPO data is {{\"question\", \"answer\"}} records or SFT conversations)",
            dir.display()
        );
    }
    let kinds = files
        .iter()
        .map(|f| is_qa_file(f))
        .collect::<Result<Vec<bool>>>()?;
    if kinds.iter().all(|&q| !q) {
        // SFT conversations: their own system turn, else --system_prompt.
        let mut prompts = read_prompt_dir(dir, skip_invalid)?;
        for p in &mut prompts {
            if p.system.is_none() {
                p.system = system_prompt.map(str::to_string);
            }
        }
        return Ok(GrpoPrompts {
            prompts,
            skipped_invalid: 0,
            files,
        });
    }
    if let Some(i) = kinds.iter().position(|&q| !q) {
        let qa = kinds.iter().position(|&q| q).unwrap_or(0);
        bail!(
            "{} holds SFT conversations but {} holds question/answer records; put one kind per folder",
            files[i].display(),
            files[qa].display()
        );
    }
    let mut prompts = Vec::new();
    let mut skipped = 0;
    for f in &files {
        for (line, rec) in records(f)? {
            match rec.and_then(|v| qa_prompt(&v, system_prompt)) {
                Ok(p) => prompts.push(p),
                Err(e) if skip_invalid => {
                    tracing::debug!(file = %f.display(), line, "skipping invalid GRPO record: {e}");
                    skipped += 1;
                }
                Err(e) => bail!(
                    "{}:{line}: invalid GRPO record: {e} (pass --skip_invalid True to skip and count such records)",
                    f.display()
                ),
            }
        }
    }
    if skipped > 0 {
        tracing::warn!(dir = %dir.display(), skipped, "--skip_invalid: skipped invalid GRPO records");
    }
    if prompts.is_empty() {
        bail!("no prompts in {}", dir.display());
    }
    Ok(GrpoPrompts {
        prompts,
        skipped_invalid: skipped,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_answer_records_become_prompts_with_the_system_prompt() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.jsonl"),
            "{\"question\": \"1+2=?\", \"answer\": \"3\"}\n\n{\"question\": \"q\", \"answer\": \"x #### 7\"}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b.json"),
            r#"[{"question": "n?", "answer": 5}]"#,
        )
        .unwrap();
        let p = read_grpo_prompts(dir.path(), Some("S"), false).unwrap();
        assert_eq!(p.prompts.len(), 3);
        assert_eq!(p.prompts[0].question, "1+2=?");
        assert_eq!(p.prompts[0].reference.as_deref(), Some("3"));
        assert_eq!(p.prompts[0].system.as_deref(), Some("S"));
        assert_eq!(p.prompts[2].reference.as_deref(), Some("5"));
    }

    #[test]
    fn bad_records_name_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.jsonl"),
            "{\"question\": \"ok\", \"answer\": \"1\"}\n{\"question\": \"no answer\"}\n",
        )
        .unwrap();
        let e = read_grpo_prompts(dir.path(), None, false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("a.jsonl:2") && e.contains("\"answer\""), "{e}");
        let p = read_grpo_prompts(dir.path(), None, true).unwrap();
        assert_eq!((p.prompts.len(), p.skipped_invalid), (1, 1));
    }

    #[test]
    fn sft_files_give_their_answers_as_references() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.jsonl"),
            r#"{"conversations":[{"from":"human","value":"q1"},{"from":"gpt","value":"a1"}]}"#,
        )
        .unwrap();
        let p = read_grpo_prompts(dir.path(), Some("S"), false).unwrap();
        assert_eq!(p.prompts.len(), 1);
        assert_eq!(p.prompts[0].reference.as_deref(), Some("a1"));
        assert_eq!(p.prompts[0].system.as_deref(), Some("S"));
        std::fs::write(
            dir.path().join("b.jsonl"),
            "{\"question\": \"q\", \"answer\": \"a\"}\n",
        )
        .unwrap();
        let e = read_grpo_prompts(dir.path(), None, false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("one kind per folder"), "{e}");
    }
}
