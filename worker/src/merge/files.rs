//! The non-weight files of a merged model dir: config.json (dtype, and the
//! sequence-classification head for a reward adapter), generation_config.json,
//! the tokenizer, and the base's custom-code `*.py` files (MedicalGPT #68/#92:
//! a merge without them cannot be loaded with trust_remote_code).

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Tokenizer files transformers may need (MedicalGPT's merge copies the same set).
pub const TOKENIZER_FILES: [&str; 12] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "qwen.tiktoken",
    "spiece.model",
];

fn tokenizer_files_in(dir: &Path) -> Vec<&'static str> {
    TOKENIZER_FILES
        .into_iter()
        .filter(|f| dir.join(f).is_file())
        .collect()
}

/// Where the tokenizer comes from: --tokenizer_path, else the adapter dir
/// (training saves the tokenizer beside the adapter, possibly with added
/// tokens), else the base. None when no candidate has tokenizer files.
pub fn tokenizer_source(
    explicit: Option<&Path>,
    adapter: &Path,
    base: &Path,
) -> Result<Option<PathBuf>> {
    if let Some(dir) = explicit {
        if tokenizer_files_in(dir).is_empty() {
            bail!(
                "--tokenizer_path {}: no tokenizer files there (looked for {})",
                dir.display(),
                TOKENIZER_FILES.join(", ")
            );
        }
        return Ok(Some(dir.to_path_buf()));
    }
    Ok([adapter, base]
        .into_iter()
        .find(|d| !tokenizer_files_in(d).is_empty())
        .map(Path::to_path_buf))
}

/// Copy `name` from `src` into `dst` (same name). Returns the name.
fn copy_into(src: &Path, dst: &Path, name: &str) -> Result<String> {
    let from = src.join(name);
    std::fs::copy(&from, dst.join(name))
        .with_context(|| format!("copying {} into {}", from.display(), dst.display()))?;
    Ok(name.to_string())
}

/// Copy the tokenizer files of `tok_dir`, the base's generation_config.json and
/// every top-level `*.py` of the base (and of the tokenizer dir). Returns the
/// names copied.
pub fn copy_side_files(base: &Path, tok_dir: Option<&Path>, out: &Path) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    if let Some(t) = tok_dir {
        for f in tokenizer_files_in(t) {
            copied.push(copy_into(t, out, f)?);
        }
    }
    if base.join("generation_config.json").is_file() {
        copied.push(copy_into(base, out, "generation_config.json")?);
    }
    let mut code_dirs = vec![base];
    code_dirs.extend(tok_dir.filter(|t| *t != base));
    for dir in code_dirs {
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
        let mut py: Vec<String> = Vec::new();
        for e in entries {
            let e = e.with_context(|| format!("listing {}", dir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".py") && e.path().is_file() {
                py.push(name);
            }
        }
        py.sort();
        for f in py {
            if !copied.contains(&f) {
                copied.push(copy_into(dir, out, &f)?);
            }
        }
    }
    Ok(copied)
}

/// The base config.json, changed for the merged model: the dtype key(s) when
/// the dtype changes, and for a reward (SEQ_CLS) merge the
/// `*ForSequenceClassification` architecture with `num_labels` labels, as
/// transformers writes it (`id2label`/`label2id`).
pub fn merged_config(
    base_config: &Value,
    path: &Path,
    new_dtype: Option<&str>,
    seq_cls_labels: Option<usize>,
    vocab_size: Option<usize>,
) -> Result<Value> {
    let mut cfg = base_config.clone();
    let Some(obj) = cfg.as_object_mut() else {
        bail!("{}: expected a JSON object", path.display());
    };
    if let Some(v) = vocab_size {
        obj.insert("vocab_size".into(), json!(v));
    }
    if let Some(dt) = new_dtype {
        let mut set = false;
        for key in ["dtype", "torch_dtype"] {
            if obj.contains_key(key) {
                obj.insert(key.into(), json!(dt));
                set = true;
            }
        }
        if !set {
            // Read by transformers 4.x and 5.x alike.
            obj.insert("torch_dtype".into(), json!(dt));
        }
    }
    if let Some(n) = seq_cls_labels {
        let archs: Vec<Value> = match obj.get("architectures") {
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|x| {
                    let s = x.as_str().unwrap_or_default();
                    json!(s.strip_suffix("ForCausalLM").map_or_else(
                        || s.to_string(),
                        |stem| format!("{stem}ForSequenceClassification")
                    ))
                })
                .collect(),
            _ => {
                let mt = obj
                    .get("model_type")
                    .and_then(Value::as_str)
                    .with_context(|| {
                        format!(
                            "{}: no \"architectures\" and no \"model_type\"",
                            path.display()
                        )
                    })?;
                let stem = match mt {
                    "llama" => "Llama",
                    "mistral" => "Mistral",
                    "qwen2" => "Qwen2",
                    other => bail!(
                        "{}: no \"architectures\" to derive the sequence-classification class from (model_type {other:?})",
                        path.display()
                    ),
                };
                vec![json!(format!("{stem}ForSequenceClassification"))]
            }
        };
        obj.insert("architectures".into(), Value::Array(archs));
        let id2label: serde_json::Map<String, Value> = (0..n)
            .map(|i| (i.to_string(), json!(format!("LABEL_{i}"))))
            .collect();
        let label2id: serde_json::Map<String, Value> =
            (0..n).map(|i| (format!("LABEL_{i}"), json!(i))).collect();
        obj.insert("id2label".into(), Value::Object(id2label));
        obj.insert("label2id".into(), Value::Object(label2id));
        obj.remove("num_labels");
    }
    Ok(cfg)
}
