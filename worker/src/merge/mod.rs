//! `rlhf merge`: fold a PEFT LoRA adapter into its base model and write a
//! plain Hugging Face model dir (MedicalGPT `tools/merge_peft_adapter.py`,
//! which calls PEFT's `merge_and_unload()`).
//!
//! Streaming, one tensor at a time: base tensors are memory-mapped, each LoRA
//! target becomes `W + s·B·A` (computed in f32, written in the base tensor's
//! dtype unless --torch_dtype says otherwise), saved full modules replace
//! their base tensor, everything else is copied byte for byte. The output is
//! built in a hidden sibling dir and renamed into place, so a failed merge
//! leaves no --output_dir behind.

pub mod adapter;
pub mod files;
pub mod order;

use crate::model::weights::sharded::{parse_shard_size, write_model_weights, PlannedTensor};
use crate::model::weights::{decode_to_f32, encode_f32, SaveDtype, TensorFiles};
use adapter::{Adapter, LoraPair, TaskType};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Clone, Debug)]
pub struct MergeArgs {
    /// The base model dir the adapter was trained on (MedicalGPT: --base_model).
    #[arg(long = "model_name_or_path", visible_alias = "base_model")]
    pub model_name_or_path: PathBuf,
    /// The PEFT adapter dir: adapter_config.json + adapter_model.safetensors (MedicalGPT: --lora_model).
    #[arg(long = "peft_path", visible_alias = "lora_model")]
    pub peft_path: PathBuf,
    /// Where the merged model goes; must not exist or be empty.
    #[arg(long = "output_dir", default_value = "./merged")]
    pub output_dir: PathBuf,
    /// Tokenizer files to copy (default: the adapter dir if it has them, else the base).
    #[arg(long = "tokenizer_path")]
    pub tokenizer_path: Option<PathBuf>,
    /// Largest shard (decimal units as transformers: 10GB = 10⁹·10 bytes); a
    /// model that fits is one model.safetensors. MedicalGPT saves with 10GB.
    #[arg(long = "max_shard_size", default_value = "10GB")]
    pub max_shard_size: String,
    /// auto keeps each base tensor's dtype; float32, bfloat16 or float16 converts every float tensor.
    #[arg(long = "torch_dtype", default_value = "auto")]
    pub torch_dtype: String,
    /// The adapter saved embed_tokens and lm_head with a larger vocabulary
    /// (MedicalGPT's vocabulary extension): take them and the new vocab_size.
    #[arg(long = "resize_emb", default_value = "false", value_parser = crate::stages::args::parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub resize_emb: bool,
}

/// What a merge wrote (printed as JSON by the CLI).
#[derive(Clone, Debug, serde::Serialize)]
pub struct MergeSummary {
    pub output_dir: PathBuf,
    pub task_type: &'static str,
    /// Weight files written (model.safetensors, or the shards).
    pub weight_files: Vec<String>,
    pub total_size: u64,
    pub total_parameters: u64,
    /// How many linear layers got W + s·B·A.
    pub lora_merged: usize,
    pub scaling: f64,
    /// Base tensors replaced by the adapter's saved copies (modules_to_save, score).
    pub replaced: Vec<String>,
    /// Tensors the base lacks that the merge added (a reward model's score head).
    pub added: Vec<String>,
    /// Base tensors left out (lm_head of a reward model).
    pub dropped: Vec<String>,
    /// Files copied beside the weights (tokenizer, generation config, *.py).
    pub copied: Vec<String>,
    pub tokenizer_from: Option<PathBuf>,
    pub torch_dtype: String,
    /// The new vocab_size with --resize_emb, when it changed.
    pub vocab_size: Option<usize>,
}

/// Where an output tensor's values come from.
enum Source {
    /// Copied from the base (dtype converted if needed).
    Base,
    /// Base weight + s·B·A.
    Lora(LoraPair),
    /// The adapter's full copy, under this key.
    Adapter(String),
}

pub fn run(args: &MergeArgs) -> Result<MergeSummary> {
    let base_dir = args.model_name_or_path.as_path();
    if !base_dir.is_dir() {
        bail!(
            "--model_name_or_path {}: not a directory",
            base_dir.display()
        );
    }
    let config_path = base_dir.join("config.json");
    let config_text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let base_config: Value = serde_json::from_str(&config_text)
        .with_context(|| format!("parsing {} as JSON", config_path.display()))?;
    let out_dtype = match args.torch_dtype.as_str() {
        "auto" => None,
        s => Some(SaveDtype::from_torch_dtype(Some(s)).context("--torch_dtype")?),
    };
    let max_shard_size = parse_shard_size(&args.max_shard_size).context("--max_shard_size")?;
    check_output_dir(&args.output_dir)?;

    let adapter = Adapter::open(&args.peft_path)?;
    let base = TensorFiles::open_model_dir(base_dir)?;
    let (plan, summary_parts) =
        plan_tensors(&adapter, &base, base_dir, out_dtype, args.resize_emb)?;
    let tok_dir = files::tokenizer_source(args.tokenizer_path.as_deref(), &adapter.dir, base_dir)?;
    if tok_dir.is_none() {
        tracing::warn!(
            "no tokenizer files in {} or {}: the merged dir will have none",
            adapter.dir.display(),
            base_dir.display()
        );
    }
    let scaling = adapter.scaling();
    tracing::info!(
        base = %base_dir.display(),
        adapter = %adapter.dir.display(),
        lora_modules = adapter.lora.len(),
        scaling,
        tensors = plan.len(),
        "merging"
    );

    let staging = Staging::new(&args.output_dir)?;
    let planned: Vec<PlannedTensor> = plan.iter().map(|(t, _)| t.clone()).collect();
    let source_of: std::collections::HashMap<&str, &Source> =
        plan.iter().map(|(t, s)| (t.name.as_str(), s)).collect();
    let mut done = 0usize;
    let written = write_model_weights(staging.path(), &planned, max_shard_size, &mut |t| {
        let source = *source_of
            .get(t.name.as_str())
            .context("tensor not in the merge plan")?;
        let bytes = produce(t, source, &base, &adapter, scaling as f32)?;
        done += 1;
        if done.is_multiple_of(50) || done == plan.len() {
            tracing::info!("{done}/{} tensors written", plan.len());
        }
        Ok(bytes)
    })?;

    let seq_cls_labels = summary_parts.num_labels;
    let config = files::merged_config(
        &base_config,
        &config_path,
        out_dtype.map(SaveDtype::torch_name),
        seq_cls_labels,
        summary_parts.vocab_size,
    )?;
    crate::fsutil::write_json_atomic(&staging.path().join("config.json"), &config)?;
    let copied = files::copy_side_files(base_dir, tok_dir.as_deref(), staging.path())?;
    staging.commit(&args.output_dir)?;
    tracing::info!(out = %args.output_dir.display(), files = written.files.len(), "merged");

    Ok(MergeSummary {
        output_dir: args.output_dir.clone(),
        task_type: match adapter.task_type {
            TaskType::CausalLm => "CAUSAL_LM",
            TaskType::SeqCls => "SEQ_CLS",
        },
        weight_files: written.files,
        total_size: written.total_size,
        total_parameters: written.total_parameters,
        lora_merged: adapter.lora.len(),
        scaling,
        replaced: summary_parts.replaced,
        added: summary_parts.added,
        dropped: summary_parts.dropped,
        copied,
        tokenizer_from: tok_dir,
        torch_dtype: out_dtype.map_or("auto".into(), |d| d.torch_name().into()),
        vocab_size: summary_parts.vocab_size,
    })
}

/// An existing --output_dir must be an empty directory.
fn check_output_dir(out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!(
            "--output_dir {}: exists and is not a directory",
            out.display()
        );
    }
    let mut entries =
        std::fs::read_dir(out).with_context(|| format!("listing {}", out.display()))?;
    if entries.next().is_some() {
        bail!(
            "--output_dir {}: exists and is not empty; refusing to overwrite it (choose a new directory or empty it)",
            out.display()
        );
    }
    Ok(())
}

#[derive(Default)]
struct PlanSummary {
    replaced: Vec<String>,
    added: Vec<String>,
    dropped: Vec<String>,
    num_labels: Option<usize>,
    vocab_size: Option<usize>,
}

/// The tensors whose first dimension is the vocabulary.
const VOCAB_TENSORS: [&str; 2] = ["model.embed_tokens.weight", "lm_head.weight"];

/// Every output tensor with its dtype and source, in transformers' save order;
/// checks the adapter against the base first, so nothing is written for a
/// mismatched pair.
fn plan_tensors(
    adapter: &Adapter,
    base: &TensorFiles,
    base_dir: &Path,
    out_dtype: Option<SaveDtype>,
    resize_emb: bool,
) -> Result<(Vec<(PlannedTensor, Source)>, PlanSummary)> {
    let wp = adapter.weights_path.display();
    let mismatch_hint = "is --model_name_or_path the model this adapter was trained on?";
    let dtype_for = |stored: Dtype| match (out_dtype, SaveDtype::from_safetensors(stored)) {
        (Some(d), Some(_)) => d.to_safetensors(),
        _ => stored,
    };
    let mut summary = PlanSummary::default();
    for (name, pair) in &adapter.lora {
        let Some((dtype, shape)) = base.info(name) else {
            bail!(
                "{wp}: {} adapts {name:?}, but the base model in {} has no such tensor ({mismatch_hint})",
                pair.a_key,
                base_dir.display()
            );
        };
        let a = adapter.files.shape(&pair.a_key).unwrap_or_default();
        let b = adapter.files.shape(&pair.b_key).unwrap_or_default();
        if shape.len() != 2 || a[1] != shape[1] || b[0] != shape[0] {
            bail!(
                "shape mismatch: {} has {name:?} {shape:?} ([out, in]), but {wp} has {} {a:?} ([r, in]) and {} {b:?} ([out, r]) ({mismatch_hint})",
                base.file_of(name).map(|p| p.display().to_string()).unwrap_or_default(),
                pair.a_key,
                pair.b_key
            );
        }
        if SaveDtype::from_safetensors(dtype).is_none() {
            bail!(
                "{}: {name:?} is stored as {dtype:?}; merging LoRA into non-float (quantized) weights is not supported",
                base.file_of(name).map(|p| p.display().to_string()).unwrap_or_default()
            );
        }
    }
    let seq_cls = adapter.task_type == TaskType::SeqCls;
    if seq_cls {
        let Some(score_key) = adapter.replace.get("score.weight") else {
            bail!(
                "{wp}: a SEQ_CLS (reward model) adapter must hold the score head as \"base_model.model.score.weight\" (PEFT saves it as a module to save); it does not"
            );
        };
        let shape = adapter.files.shape(score_key).unwrap_or_default();
        summary.num_labels = shape.first().copied();
    }
    let mut out: Vec<(PlannedTensor, Source)> = Vec::new();
    for name in base.names() {
        if seq_cls && name.starts_with("lm_head.") {
            summary.dropped.push(name.to_string());
            continue;
        }
        let (dtype, mut shape) = base.info(name).context("index out of sync")?;
        let source = if let Some(pair) = adapter.lora.get(name) {
            Source::Lora(pair.clone())
        } else if let Some(key) = adapter.replace.get(name) {
            let theirs = adapter.files.shape(key).unwrap_or_default();
            let vocab_only = VOCAB_TENSORS.contains(&name)
                && theirs.len() == 2
                && shape.len() == 2
                && theirs[1] == shape[1];
            if theirs != shape && vocab_only && resize_emb {
                if summary.vocab_size.is_some_and(|v| v != theirs[0]) {
                    bail!("{wp}: embed_tokens and lm_head have different vocabulary sizes");
                }
                summary.vocab_size = Some(theirs[0]);
                shape = theirs;
            } else if theirs != shape {
                let hint = if vocab_only {
                    "the vocabulary was extended: pass --resize_emb to take the adapter's embed_tokens and lm_head"
                } else {
                    mismatch_hint
                };
                bail!(
                    "shape mismatch: {wp} saves {key:?} as {theirs:?}, but the base's {name:?} is {shape:?} ({hint})"
                );
            }
            summary.replaced.push(name.to_string());
            Source::Adapter(key.clone())
        } else {
            Source::Base
        };
        let planned = PlannedTensor {
            name: name.to_string(),
            dtype: dtype_for(dtype),
            shape,
        };
        out.push((planned, source));
    }
    for (name, key) in &adapter.replace {
        if base.contains(name) {
            continue;
        }
        if !(seq_cls && name.starts_with("score.")) {
            bail!(
                "{wp}: saves {key:?} in full, but the base model in {} has no tensor {name:?} ({mismatch_hint})",
                base_dir.display()
            );
        }
        // The reward head is new: give it the dtype of the embedding (the model's dtype).
        let model_dtype = base
            .info("model.embed_tokens.weight")
            .map(|(d, _)| d)
            .filter(|d| SaveDtype::from_safetensors(*d).is_some())
            .unwrap_or(Dtype::F32);
        let (_, shape) = adapter.files.info(key).context("index out of sync")?;
        summary.added.push(name.clone());
        out.push((
            PlannedTensor {
                name: name.clone(),
                dtype: dtype_for(model_dtype),
                shape,
            },
            Source::Adapter(key.clone()),
        ));
    }
    if let Some(v) = summary.vocab_size {
        // Every vocabulary-sized tensor must come from the adapter at the new size:
        // transformers would fill missing rows at random.
        for (t, _) in &out {
            if VOCAB_TENSORS.contains(&t.name.as_str()) && t.shape[0] != v {
                bail!(
                    "--resize_emb: {wp} saves a {v}-token vocabulary but not {:?} (it has {} rows in the base); \
                     the adapter must save both embed_tokens and lm_head (modules_to_save)",
                    t.name,
                    t.shape[0]
                );
            }
        }
    }
    out.sort_by(|(a, _), (b, _)| order::save_order(&a.name, &b.name));
    Ok((out, summary))
}

/// The bytes of one output tensor.
fn produce(
    t: &PlannedTensor,
    source: &Source,
    base: &TensorFiles,
    adapter: &Adapter,
    scaling: f32,
) -> Result<Vec<u8>> {
    let convert = |files: &TensorFiles, key: &str| -> Result<Vec<u8>> {
        let (stored, _) = files.info(key).context("index out of sync")?;
        let raw = files.raw_bytes(key)?;
        if stored == t.dtype {
            return Ok(raw.to_vec());
        }
        let out = SaveDtype::from_safetensors(t.dtype).context("non-float target dtype")?;
        let values = decode_to_f32(raw, stored).with_context(|| {
            format!(
                "{}: tensor {key:?}",
                files
                    .file_of(key)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            )
        })?;
        Ok(encode_f32(&values, out))
    };
    match source {
        Source::Base => convert(base, &t.name),
        Source::Adapter(key) => convert(&adapter.files, key),
        Source::Lora(pair) => {
            let (n_out, n_in, r) = (t.shape[0], t.shape[1], adapter.r);
            let mut w = base.read_f32(&t.name, &t.shape)?; // [out, in]
            let a = adapter.files.read_f32(&pair.a_key, &[r, n_in])?; // [r, in]
            let b = adapter.files.read_f32(&pair.b_key, &[n_out, r])?; // [out, r]
            add_lora_delta(&mut w, &a, &b, n_in, r, scaling);
            let out = SaveDtype::from_safetensors(t.dtype).context("non-float target dtype")?;
            Ok(encode_f32(&w, out))
        }
    }
}

/// `W += scale · (B·A)`, in f32 and in PEFT's order (`(B @ A) * scaling`,
/// then added): W `[out, in]`, A `[r, in]`, B `[out, r]`. Rows in parallel.
pub fn add_lora_delta(w: &mut [f32], a: &[f32], b: &[f32], n_in: usize, r: usize, scale: f32) {
    w.par_chunks_mut(n_in)
        .zip(b.par_chunks(r))
        .for_each(|(w_row, b_row)| {
            let mut delta = vec![0f32; n_in]; // [in]: row of B·A
            for (k, &bk) in b_row.iter().enumerate() {
                let a_row = &a[k * n_in..(k + 1) * n_in];
                for (d, &ak) in delta.iter_mut().zip(a_row) {
                    *d += bk * ak;
                }
            }
            for (wi, d) in w_row.iter_mut().zip(&delta) {
                *wi += d * scale;
            }
        });
}

/// A hidden sibling of the output dir that the merge is written into; removed
/// unless [`Staging::commit`] renamed it into place.
struct Staging {
    path: PathBuf,
    committed: bool,
}

impl Staging {
    fn new(out: &Path) -> Result<Staging> {
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let name = out
            .file_name()
            .with_context(|| format!("--output_dir {}: has no directory name", out.display()))?
            .to_string_lossy();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = parent.join(format!(".{name}.merging-{}-{stamp}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Staging {
            path,
            committed: false,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Move the finished dir to `out` (which is absent or an empty dir).
    fn commit(mut self, out: &Path) -> Result<()> {
        if out.is_dir() {
            // check_output_dir made sure it is empty.
            std::fs::remove_dir(out)
                .with_context(|| format!("replacing the empty dir {}", out.display()))?;
        }
        std::fs::rename(&self.path, out)
            .with_context(|| format!("renaming {} to {}", self.path.display(), out.display()))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                tracing::warn!("could not remove {}: {e}", self.path.display());
            }
        }
    }
}
