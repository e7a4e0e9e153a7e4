//! Hugging Face model dirs and PEFT adapter dirs in and out of a [`Llama`].

use super::config::ModelConfig;
use super::llama::Llama;
use super::params::{Head, LoraConfig, TensorEntry, TensorKind, TrainMode, SCORE_WEIGHT};
use super::weights::{save_tensors, NamedTensor, SaveDtype, TensorFiles};
use crate::fsutil::write_json_atomic;
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rlhf_kernels::Backend;
use serde_json::{json, Value};
use std::path::Path;

/// The value head's file in a PPO output or checkpoint dir.
pub const VALUE_HEAD_FILE: &str = "value_head.safetensors";

/// PEFT's prefix for a causal-LM adapter's tensor names.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Load a Hugging Face model dir. LoRA A matrices get PEFT's default init
/// (kaiming-uniform, a=√5: U(−1/√in, 1/√in)) from `seed`; B starts at zero;
/// modules_to_save start as copies of the base weights.
pub fn load_model<B: Backend>(be: B, dir: &Path, mode: TrainMode, seed: u64) -> Result<Llama<B>> {
    load_model_with_head(be, dir, mode, Head::CausalLm, seed)
}

/// [`load_model`] with the given head. With [`Head::Score`] the dir may be a
/// causal LM (its lm_head is ignored and `score` is new, drawn as transformers
/// does: N(0, initializer_range²), from `seed`) or a `*ForSequenceClassification`
/// model with its `score.weight`.
pub fn load_model_with_head<B: Backend>(
    be: B,
    dir: &Path,
    mode: TrainMode,
    head: Head,
    seed: u64,
) -> Result<Llama<B>> {
    let cfg = ModelConfig::load(dir)?;
    let files = TensorFiles::open_model_dir(dir)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let cfg_hidden = cfg.hidden_size;
    let init_std = cfg
        .raw
        .get("initializer_range")
        .and_then(Value::as_f64)
        .filter(|s| *s > 0.0)
        .unwrap_or(0.02) as f32;
    Llama::from_tensors_with_head(be, cfg, mode, head, |e| match e.kind {
        TensorKind::Base if e.name == SCORE_WEIGHT && !files.contains(SCORE_WEIGHT) => {
            tracing::info!(
                std = init_std,
                "score head not in the model dir: initialised"
            );
            let normal = rand_distr::Normal::new(0.0f32, init_std)?;
            Ok((0..e.slot.len)
                .map(|_| rand_distr::Distribution::sample(&normal, &mut rng))
                .collect())
        }
        TensorKind::Base => files.read_f32(&e.name, &e.shape),
        TensorKind::LoraA => {
            let bound = 1.0 / (e.shape[1] as f32).sqrt();
            Ok((0..e.slot.len)
                .map(|_| rng.random_range(-bound..bound))
                .collect())
        }
        TensorKind::LoraB => Ok(vec![0.0; e.slot.len]),
        // nn.Linear(C, 1)'s default init: U(−1/√C, 1/√C) for weight and bias.
        TensorKind::ValueHead => {
            let bound = 1.0 / (cfg_hidden as f32).sqrt();
            Ok((0..e.slot.len)
                .map(|_| rng.random_range(-bound..bound))
                .collect())
        }
    })
    .with_context(|| format!("loading the model in {}", dir.display()))
}

/// PEFT's task type of a causal-LM adapter and of a reward-model (score head) adapter.
pub const TASK_CAUSAL_LM: &str = "CAUSAL_LM";
pub const TASK_SEQ_CLS: &str = "SEQ_CLS";

/// The modules PEFT adds to modules_to_save of every SEQ_CLS adapter
/// (`PeftModelForSequenceClassification`); of these our models have `score`.
const SEQ_CLS_MODULES: [&str; 2] = ["classifier", "score"];

/// The PEFT task type of the head.
pub fn peft_task_type(head: Head) -> &'static str {
    match head {
        Head::CausalLm => TASK_CAUSAL_LM,
        Head::Score => TASK_SEQ_CLS,
        // The adapter of a policy with a value head is a causal-LM adapter.
        Head::CausalLmWithValue => TASK_CAUSAL_LM,
    }
}

fn read_adapter_json(dir: &Path) -> Result<Value> {
    let path = dir.join("adapter_config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The `task_type` of a PEFT adapter dir (None when the config has none).
pub fn read_adapter_task_type(dir: &Path) -> Result<Option<String>> {
    let v = read_adapter_json(dir)?;
    Ok(v.get("task_type")
        .and_then(Value::as_str)
        .map(str::to_string))
}

/// Read a PEFT `adapter_config.json` into our LoRA settings. For a SEQ_CLS
/// adapter, the classifier/score entries PEFT adds to modules_to_save are
/// implied by the score head and not listed in the result.
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join("adapter_config.json");
    let v = read_adapter_json(dir)?;
    let seq_cls = v.get("task_type").and_then(Value::as_str) == Some(TASK_SEQ_CLS);
    let ctx = || format!("in {}", path.display());
    if let Some(t) = v.get("peft_type").and_then(Value::as_str) {
        if t != "LORA" {
            bail!(
                "{}: peft_type {t:?} is not supported (expected \"LORA\")",
                path.display()
            );
        }
    }
    for flag in ["use_dora", "use_rslora"] {
        if v.get(flag).and_then(Value::as_bool) == Some(true) {
            bail!("{}: {flag} adapters are not supported", path.display());
        }
    }
    let r = v
        .get("r")
        .and_then(Value::as_u64)
        .context("missing integer \"r\"")
        .with_context(ctx)? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .context("missing number \"lora_alpha\"")
        .with_context(ctx)? as f32;
    let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
    let targets = match v.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
        Some(Value::String(s)) => s.clone(),
        _ => bail!("{}: missing \"target_modules\"", path.display()),
    };
    let mut target_modules = LoraConfig::parse_target_modules(&targets).with_context(ctx)?;
    // Keep our canonical module order regardless of the order PEFT wrote.
    target_modules.sort_by_key(|m| super::params::LINEAR_MODULES.iter().position(|x| x == m));
    let mts = match v.get("modules_to_save") {
        Some(Value::Array(a)) => Some(
            a.iter()
                .filter_map(Value::as_str)
                .filter(|m| !(seq_cls && SEQ_CLS_MODULES.contains(m)))
                .collect::<Vec<_>>()
                .join(","),
        ),
        _ => None,
    };
    let modules_to_save = LoraConfig::parse_modules_to_save(mts.as_deref()).with_context(ctx)?;
    Ok(LoraConfig {
        r,
        alpha,
        dropout,
        target_modules,
        modules_to_save,
    })
}

/// Whether a tensor is saved with the stage's weights (the adapter, or the
/// model in full mode): every trainable tensor but the value head.
fn adapter_tensor(e: &TensorEntry) -> bool {
    e.slot.trainable && e.kind != TensorKind::ValueHead
}

impl<B: Backend> Llama<B> {
    /// Overwrite one tensor of the layout with host data.
    pub fn set_tensor(&mut self, name: &str, data: &[f32]) -> Result<()> {
        let e = self.layout.find(name)?;
        if data.len() != e.slot.len {
            bail!(
                "tensor {name:?}: {} values for shape {:?}",
                data.len(),
                e.shape
            );
        }
        let buf = if e.slot.trainable {
            &mut self.train
        } else {
            &mut self.frozen
        };
        self.be.write(self.be.view_mut(buf, e.slot.range()), data)?;
        Ok(())
    }

    /// Read one tensor of the layout to the host.
    pub fn get_tensor(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.layout.find(name)?;
        Ok(self
            .be
            .download(self.be.view(self.weights_of(e.slot), e.slot.range()))?)
    }

    /// The gradient of a trainable tensor, to the host.
    pub fn get_grad(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.layout.find(name)?;
        if !e.slot.trainable {
            bail!("tensor {name:?} is frozen: it has no gradient");
        }
        Ok(self
            .be
            .download(self.be.view(&self.grads, e.slot.range()))?)
    }

    /// The name a trainable tensor has in a PEFT adapter file.
    pub fn peft_name(name: &str) -> String {
        format!("{PEFT_PREFIX}{name}")
    }

    /// Trainable tensors with their on-disk names (PEFT names in LoRA mode, HF names in full mode).
    pub fn trainable_tensors(&self) -> Result<Vec<NamedTensor>> {
        let full = matches!(self.mode, TrainMode::Full);
        let mut out = Vec::new();
        for e in self.layout.tensors.iter().filter(|e| adapter_tensor(e)) {
            let data = self
                .be
                .download(self.be.view(&self.train, e.slot.range()))?;
            let name = if full {
                e.name.clone()
            } else {
                Self::peft_name(&e.name)
            };
            out.push((name, e.shape.clone(), data));
        }
        Ok(out)
    }

    /// Set the trainable tensors from a file written by [`Self::trainable_tensors`]
    /// (an adapter_model.safetensors, or model weights in full mode).
    pub fn load_trainable(&mut self, files: &TensorFiles) -> Result<()> {
        let full = matches!(self.mode, TrainMode::Full);
        let entries: Vec<_> = self
            .layout
            .tensors
            .iter()
            .filter(|e| adapter_tensor(e))
            .cloned()
            .collect();
        for e in entries {
            let name = if full {
                e.name.clone()
            } else {
                Self::peft_name(&e.name)
            };
            let data = files.read_f32(&name, &e.shape)?;
            let buf = &mut self.train;
            self.be
                .write(self.be.view_mut(buf, e.slot.range()), &data)?;
        }
        Ok(())
    }

    /// Load a PEFT adapter dir's weights into this LoRA model (whose LoRA
    /// settings must match the adapter's config).
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let TrainMode::Lora(mine) = &self.mode else {
            bail!("cannot load an adapter into a full fine-tuning model")
        };
        let task = read_adapter_task_type(dir)?;
        let want = peft_task_type(self.layout.head);
        // An adapter without a task type is taken as a causal-LM one.
        if task.as_deref().unwrap_or(TASK_CAUSAL_LM) != want {
            bail!(
                "adapter in {} has task_type {:?}, but this model needs a {want} adapter{}",
                dir.display(),
                task.unwrap_or_default(),
                if want == TASK_SEQ_CLS {
                    " (a reward model's, with its score head)"
                } else {
                    ""
                }
            );
        }
        let theirs = read_adapter_config(dir)?;
        if theirs.r != mine.r
            || theirs.target_modules != mine.target_modules
            || theirs.modules_to_save != mine.modules_to_save
        {
            bail!(
                "adapter in {} has r={} targets={:?} modules_to_save={:?}, but the model was set up with r={} targets={:?} modules_to_save={:?}",
                dir.display(),
                theirs.r,
                theirs.target_modules,
                theirs.modules_to_save,
                mine.r,
                mine.target_modules,
                mine.modules_to_save
            );
        }
        let files = TensorFiles::open_files(&[dir.join("adapter_model.safetensors")])?;
        self.load_trainable(&files)
            .with_context(|| format!("loading the adapter in {}", dir.display()))
    }

    /// Write the value head (TRL's names) to `dir/value_head.safetensors`.
    pub fn save_value_head(&self, dir: &Path) -> Result<()> {
        let mut tensors = Vec::new();
        for e in self
            .layout
            .tensors
            .iter()
            .filter(|e| e.kind == TensorKind::ValueHead)
        {
            let data = self
                .be
                .download(self.be.view(&self.train, e.slot.range()))?;
            tensors.push((e.name.clone(), e.shape.clone(), data));
        }
        if tensors.is_empty() {
            bail!("this model has no value head");
        }
        save_tensors(&dir.join(VALUE_HEAD_FILE), &tensors, SaveDtype::F32, None)
    }

    /// Read the value head written by [`Self::save_value_head`].
    pub fn load_value_head(&mut self, dir: &Path) -> Result<()> {
        let files = TensorFiles::open_files(&[dir.join(VALUE_HEAD_FILE)])?;
        let entries: Vec<_> = self
            .layout
            .tensors
            .iter()
            .filter(|e| e.kind == TensorKind::ValueHead)
            .cloned()
            .collect();
        if entries.is_empty() {
            bail!("this model has no value head");
        }
        for e in entries {
            let data = files.read_f32(&e.name, &e.shape)?;
            self.be
                .write(self.be.view_mut(&mut self.train, e.slot.range()), &data)?;
        }
        Ok(())
    }

    /// Write a PEFT adapter dir: adapter_config.json + adapter_model.safetensors.
    pub fn save_adapter(&self, dir: &Path, base_model_name_or_path: Option<&str>) -> Result<()> {
        let TrainMode::Lora(l) = &self.mode else {
            bail!("save_adapter needs a LoRA model")
        };
        let tensors = self.trainable_tensors()?;
        save_tensors(
            &dir.join("adapter_model.safetensors"),
            &tensors,
            SaveDtype::F32,
            Some([("format".to_string(), "pt".to_string())].into()),
        )?;
        // PEFT lists classifier and score for every SEQ_CLS adapter.
        let mut modules_to_save = l.modules_to_save.clone();
        if self.layout.head == Head::Score {
            modules_to_save.extend(SEQ_CLS_MODULES.iter().map(|m| m.to_string()));
        }
        let config = json!({
            "peft_type": "LORA",
            "task_type": peft_task_type(self.layout.head),
            "base_model_name_or_path": base_model_name_or_path,
            "r": l.r,
            "lora_alpha": crate::fsutil::json_f32(l.alpha),
            "lora_dropout": crate::fsutil::json_f32(l.dropout),
            "target_modules": l.target_modules,
            "modules_to_save": if modules_to_save.is_empty() { Value::Null } else { json!(modules_to_save) },
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        });
        write_json_atomic(&dir.join("adapter_config.json"), &config)
    }

    /// Write a transformers-loadable model dir (config.json + model.safetensors)
    /// with every weight — merged with the LoRA update when in LoRA mode.
    pub fn save_full_model(&self, dir: &Path, dtype: SaveDtype) -> Result<()> {
        let mut tensors = Vec::new();
        for e in self
            .layout
            .tensors
            .iter()
            .filter(|e| e.kind == TensorKind::Base)
        {
            let buf = self.weights_of(e.slot);
            tensors.push((
                e.name.clone(),
                e.shape.clone(),
                self.be.download(self.be.view(buf, e.slot.range()))?,
            ));
        }
        if let TrainMode::Lora(l) = &self.mode {
            // W += s · B·A for every adapted linear.
            let s = l.scaling();
            for (name, shape, w) in tensors.iter_mut() {
                let Some(prefix) = name.strip_suffix(".weight") else {
                    continue;
                };
                let (Ok(a), Ok(b)) = (
                    self.get_tensor(&format!("{prefix}.lora_A.weight")),
                    self.get_tensor(&format!("{prefix}.lora_B.weight")),
                ) else {
                    continue;
                };
                let (n_out, n_in, r) = (shape[0], shape[1], l.r);
                for o in 0..n_out {
                    for i in 0..n_in {
                        let mut acc = 0f32;
                        for k in 0..r {
                            acc += b[o * r + k] * a[k * n_in + i];
                        }
                        w[o * n_in + i] += s * acc;
                    }
                }
            }
        }
        save_tensors(
            &dir.join("model.safetensors"),
            &tensors,
            dtype,
            Some([("format".to_string(), "pt".to_string())].into()),
        )?;
        let mut config = self.cfg.raw.clone();
        if let Some(obj) = config.as_object_mut() {
            obj.insert("torch_dtype".into(), json!(dtype.torch_name()));
            if obj.contains_key("dtype") {
                obj.insert("dtype".into(), json!(dtype.torch_name()));
            }
            if self.layout.head == Head::Score {
                seq_cls_config(obj, self.cfg.pad_token_id)?;
            }
        }
        write_json_atomic(&dir.join("config.json"), &config)
    }
}

/// Turn a causal-LM config.json into the `*ForSequenceClassification`
/// config transformers writes for num_labels = 1: the architecture renamed,
/// one label (`id2label`/`label2id`, from which transformers derives
/// num_labels), and the pad token id it reads scores by.
fn seq_cls_config(
    obj: &mut serde_json::Map<String, Value>,
    pad_token_id: Option<u32>,
) -> Result<()> {
    let arch = obj
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .map(str::to_string);
    let model_type = obj
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("llama")
        .to_string();
    let base = match arch.as_deref() {
        Some(a) => a
            .strip_suffix("ForCausalLM")
            .or_else(|| a.strip_suffix("ForSequenceClassification"))
            .unwrap_or(a)
            .to_string(),
        None => match model_type.as_str() {
            "qwen2" => "Qwen2".into(),
            "mistral" => "Mistral".into(),
            _ => "Llama".into(),
        },
    };
    obj.insert(
        "architectures".into(),
        json!([format!("{base}ForSequenceClassification")]),
    );
    obj.insert("id2label".into(), json!({"0": "LABEL_0"}));
    obj.insert("label2id".into(), json!({"LABEL_0": 0}));
    obj.remove("num_labels");
    let Some(pad) = pad_token_id else {
        bail!("a reward model needs a pad_token_id to find each sequence's last token; none is set")
    };
    obj.insert("pad_token_id".into(), json!(pad));
    Ok(())
}
