//! What a PEFT LoRA adapter asks of a merge: which base tensors get
//! `W += s·B·A`, which are replaced by a saved copy (modules_to_save, a reward
//! head), and the scale — with a clear refusal for features a plain
//! `W + s·B·A` merge would get wrong.

use crate::model::pretrained::PEFT_PREFIX;
use crate::model::weights::TensorFiles;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The PEFT task types we merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskType {
    /// `CAUSAL_LM` (or no task_type): the result is a causal LM.
    CausalLm,
    /// `SEQ_CLS` (MedicalGPT's reward model): the result is a
    /// `*ForSequenceClassification` model with the adapter's `score` head.
    SeqCls,
}

/// One LoRA-adapted linear: the adapter keys of its A and B matrices.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    /// `[r, in]`
    pub a_key: String,
    /// `[out, r]`
    pub b_key: String,
}

/// A PEFT adapter dir, read and checked on its own (not yet against a base).
pub struct Adapter {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub weights_path: PathBuf,
    pub task_type: TaskType,
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    /// base tensor name (`model.layers.0.self_attn.q_proj.weight`) → its A/B keys.
    pub lora: BTreeMap<String, LoraPair>,
    /// base tensor name (`lm_head.weight`, `score.weight`) → the adapter key of
    /// the full tensor that replaces it.
    pub replace: BTreeMap<String, String>,
    pub files: TensorFiles,
}

impl Adapter {
    /// PEFT's scale of the low-rank update: alpha/r, or alpha/√r with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn open(dir: &Path) -> Result<Adapter> {
        if !dir.is_dir() {
            bail!(
                "--peft_path {}: not a directory (expected a PEFT adapter dir with adapter_config.json and adapter_model.safetensors)",
                dir.display()
            );
        }
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path).with_context(|| {
            format!(
                "reading {} (is --peft_path a PEFT adapter dir?)",
                config_path.display()
            )
        })?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing {} as JSON", config_path.display()))?;
        let at = |what: String| format!("{}: {what}", config_path.display());
        let settings = read_settings(&v).map_err(|e| anyhow::anyhow!(at(format!("{e:#}"))))?;

        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.exists() {
            if dir.join("adapter_model.bin").exists() {
                bail!(
                    "{}: missing; {} holds a pickled (.bin) adapter, which is not supported: re-save it with safe_serialization=True",
                    weights_path.display(),
                    dir.join("adapter_model.bin").display()
                );
            }
            bail!(
                "{}: missing (the adapter's weights)",
                weights_path.display()
            );
        }
        let files = TensorFiles::open_files(std::slice::from_ref(&weights_path))?;
        let (lora, replace) = classify_keys(&files, &weights_path)?;
        if lora.is_empty() && replace.is_empty() {
            bail!(
                "{}: holds no LoRA or saved-module tensors",
                weights_path.display()
            );
        }
        // The rank in the config must be the rank of the saved matrices.
        for pair in lora.values() {
            let a = files.shape(&pair.a_key).unwrap_or_default();
            let b = files.shape(&pair.b_key).unwrap_or_default();
            if a.len() != 2 || b.len() != 2 || a[0] != settings.r || b[1] != settings.r {
                bail!(
                    "r mismatch: {} says r = {}, but {} has {} {:?} and {} {:?} (expected [{r}, in] and [out, {r}])",
                    config_path.display(),
                    settings.r,
                    weights_path.display(),
                    pair.a_key,
                    a,
                    pair.b_key,
                    b,
                    r = settings.r
                );
            }
        }
        Ok(Adapter {
            dir: dir.to_path_buf(),
            config_path,
            weights_path,
            task_type: settings.task_type,
            r: settings.r,
            alpha: settings.alpha,
            use_rslora: settings.use_rslora,
            lora,
            replace,
            files,
        })
    }
}

struct Settings {
    task_type: TaskType,
    r: usize,
    alpha: f64,
    use_rslora: bool,
}

fn read_settings(v: &Value) -> Result<Settings> {
    match v.get("peft_type").and_then(Value::as_str) {
        None | Some("LORA") => {}
        Some(t) => bail!("peft_type {t:?} cannot be merged (only \"LORA\")"),
    }
    let task_type = match v.get("task_type") {
        None | Some(Value::Null) => TaskType::CausalLm,
        Some(Value::String(s)) if s == "CAUSAL_LM" => TaskType::CausalLm,
        Some(Value::String(s)) if s == "SEQ_CLS" => TaskType::SeqCls,
        Some(other) => {
            bail!("task_type {other} is not supported (expected \"CAUSAL_LM\" or \"SEQ_CLS\")")
        }
    };
    // Features that change what the update is; merging them as s·B·A would be wrong.
    for (flag, why) in [
        (
            "use_dora",
            "DoRA rescales each weight column by a learned magnitude",
        ),
        (
            "fan_in_fan_out",
            "the base stores weights transposed (GPT-2 Conv1D)",
        ),
        ("lora_bias", "lora_B has a bias"),
        ("use_qalora", "QALoRA pools the input"),
    ] {
        if v.get(flag).and_then(Value::as_bool) == Some(true) {
            bail!("{flag} = true is not supported by merge ({why})");
        }
    }
    for pattern in ["rank_pattern", "alpha_pattern"] {
        if let Some(Value::Object(m)) = v.get(pattern) {
            if !m.is_empty() {
                bail!("{pattern} is not supported by merge (per-module ranks or alphas); found {} entries", m.len());
            }
        }
    }
    if !matches!(v.get("target_parameters"), None | Some(Value::Null)) {
        bail!("target_parameters (LoRA on raw parameters) is not supported by merge");
    }
    let r = v
        .get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .context("field \"r\": expected a positive integer")? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .context("field \"lora_alpha\": expected a number")?;
    let use_rslora = match v.get("use_rslora") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => bail!("field \"use_rslora\": expected true or false, found {other}"),
    };
    Ok(Settings {
        task_type,
        r,
        alpha,
        use_rslora,
    })
}

/// Sort the adapter's keys into LoRA pairs and replacement tensors.
type Classified = (BTreeMap<String, LoraPair>, BTreeMap<String, String>);

fn classify_keys(files: &TensorFiles, path: &Path) -> Result<Classified> {
    let mut a_keys = BTreeMap::new();
    let mut b_keys = BTreeMap::new();
    let mut replace = BTreeMap::new();
    for key in files.names() {
        let Some(name) = key.strip_prefix(PEFT_PREFIX) else {
            bail!(
                "{}: tensor {key:?} does not start with {PEFT_PREFIX:?} (not a PEFT adapter key)",
                path.display()
            );
        };
        if let Some(module) = name.strip_suffix(".lora_A.weight") {
            a_keys.insert(format!("{module}.weight"), key.to_string());
        } else if let Some(module) = name.strip_suffix(".lora_B.weight") {
            b_keys.insert(format!("{module}.weight"), key.to_string());
        } else if name.contains(".lora_") {
            bail!(
                "{}: tensor {key:?} is a LoRA kind merge does not support (only lora_A/lora_B of linear layers; not embedding LoRA, DoRA magnitudes or LoRA biases)",
                path.display()
            );
        } else {
            replace.insert(name.to_string(), key.to_string());
        }
    }
    let mut lora = BTreeMap::new();
    for (base, a_key) in a_keys {
        let Some(b_key) = b_keys.remove(&base) else {
            bail!(
                "{}: {a_key:?} has no matching lora_B tensor",
                path.display()
            );
        };
        if replace.contains_key(&base) {
            bail!(
                "{}: {base:?} is both LoRA-adapted and saved in full",
                path.display()
            );
        }
        lora.insert(base, LoraPair { a_key, b_key });
    }
    if let Some(b_key) = b_keys.into_values().next() {
        bail!(
            "{}: {b_key:?} has no matching lora_A tensor",
            path.display()
        );
    }
    Ok((lora, replace))
}
