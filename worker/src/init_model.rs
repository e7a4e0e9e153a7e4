//! `init-model`: create a randomly initialized Llama model directory in the
//! Hugging Face layout, with a byte-level BPE tokenizer trained on a corpus.
//!
//! Why: MedicalGPT's PT stage continues training a pretrained model; for
//! demos and tests without downloads we start from a small fresh model that
//! both this project and `transformers.AutoModelForCausalLM` can load.
//!
//! Output files (each written atomically; `config.json` last, so a directory
//! with a `config.json` is complete): `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`, `generation_config.json`, `config.json`.

use crate::data::pretrain::{list_data_files, read_data_file};
use crate::fsutil::{write_atomic, write_json_atomic};
use crate::tokenizer::{train_byte_level_bpe, Tokenizer};
use anyhow::{anyhow, bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Standard deviation of the normal initialization (HF `initializer_range`).
pub const INITIALIZER_RANGE: f32 = 0.02;

/// Model shape and initialization options (names as in HF `LlamaConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct InitModelArgs {
    /// Target vocabulary size for BPE training; the config gets the size the
    /// tokenizer actually reached, which is smaller on a small corpus.
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub seed: u64,
}

impl Default for InitModelArgs {
    /// A tiny model that trains on a CPU in minutes.
    fn default() -> Self {
        InitModelArgs {
            vocab_size: 4096,
            hidden_size: 256,
            intermediate_size: 688,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 512,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            seed: 0,
        }
    }
}

impl InitModelArgs {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Reject shapes a Llama cannot have, with the offending values named.
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in sizes {
            if v == 0 {
                bail!("{name} must be > 0");
            }
        }
        if !divides(self.num_attention_heads, self.hidden_size) {
            bail!(
                "num_attention_heads ({}) must divide hidden_size ({})",
                self.num_attention_heads,
                self.hidden_size
            );
        }
        if !divides(self.num_key_value_heads, self.num_attention_heads) {
            bail!(
                "num_key_value_heads ({}) must divide num_attention_heads ({})",
                self.num_key_value_heads,
                self.num_attention_heads
            );
        }
        if !divides(2, self.head_dim()) {
            bail!(
                "head_dim = hidden_size / num_attention_heads = {} must be even for RoPE",
                self.head_dim()
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            bail!(
                "rope_theta must be a positive number, got {}",
                self.rope_theta
            );
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            bail!(
                "rms_norm_eps must be a positive number, got {}",
                self.rms_norm_eps
            );
        }
        Ok(())
    }
}

/// `d` divides `n` (written out: `usize::is_multiple_of` needs Rust 1.87, the workspace says 1.85).
fn divides(d: usize, n: usize) -> bool {
    let rem = n % d;
    rem == 0
}

/// Read the corpus (files or folders of `.txt`/`.json`/`.jsonl`, as PT reads them).
fn read_corpus(corpus_files: &[PathBuf]) -> Result<Vec<String>> {
    if corpus_files.is_empty() {
        bail!("no corpus files given to train the tokenizer on");
    }
    let mut texts = Vec::new();
    for path in corpus_files {
        for file in list_data_files(path)? {
            texts.extend(read_data_file(&file, true)?.into_iter().map(|d| d.text));
        }
    }
    Ok(texts)
}

/// `(name, shape, init)` of every tensor, in HF Llama naming.
fn tensor_specs(args: &InitModelArgs, vocab: usize) -> Vec<(String, Vec<usize>, Init)> {
    let (c, f, hd) = (args.hidden_size, args.intermediate_size, args.head_dim());
    let (q, kv) = (args.num_attention_heads * hd, args.num_key_value_heads * hd);
    let mut specs = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![vocab, c],
        Init::Normal,
    )];
    for i in 0..args.num_hidden_layers {
        let p = format!("model.layers.{i}");
        specs.extend([
            (format!("{p}.input_layernorm.weight"), vec![c], Init::Ones),
            (
                format!("{p}.self_attn.q_proj.weight"),
                vec![q, c],
                Init::Normal,
            ),
            (
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv, c],
                Init::Normal,
            ),
            (
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv, c],
                Init::Normal,
            ),
            (
                format!("{p}.self_attn.o_proj.weight"),
                vec![c, q],
                Init::Normal,
            ),
            (
                format!("{p}.post_attention_layernorm.weight"),
                vec![c],
                Init::Ones,
            ),
            (
                format!("{p}.mlp.gate_proj.weight"),
                vec![f, c],
                Init::Normal,
            ),
            (format!("{p}.mlp.up_proj.weight"), vec![f, c], Init::Normal),
            (
                format!("{p}.mlp.down_proj.weight"),
                vec![c, f],
                Init::Normal,
            ),
        ]);
    }
    specs.push(("model.norm.weight".to_string(), vec![c], Init::Ones));
    if !args.tie_word_embeddings {
        specs.push(("lm_head.weight".to_string(), vec![vocab, c], Init::Normal));
    }
    specs
}

#[derive(Debug, Clone, Copy)]
enum Init {
    Normal,
    Ones,
}

/// FNV-1a: a stable per-tensor seed, so a tensor's values depend only on
/// `(seed, name, shape)`, not on the other tensors or on thread scheduling.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Little-endian f32 bytes of one tensor.
fn init_tensor(name: &str, numel: usize, init: Init, seed: u64) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(numel * 4);
    match init {
        Init::Ones => (0..numel).for_each(|_| out.extend_from_slice(&1f32.to_le_bytes())),
        Init::Normal => {
            let normal = Normal::new(0.0f32, INITIALIZER_RANGE)
                .map_err(|e| anyhow!("normal distribution: {e}"))?;
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ name_hash(name));
            (0..numel).for_each(|_| out.extend_from_slice(&normal.sample(&mut rng).to_le_bytes()));
        }
    }
    Ok(out)
}

/// The HF `config.json` of a Llama with these args and tokenizer.
///
/// `pad_token_id` is null on purpose: HF builds `nn.Embedding(padding_idx=
/// pad_token_id)`, which zeroes and freezes that row, and our PAD is EOS.
/// `bos_token_id` is EOS (as Qwen): the tokenizer adds no BOS, and
/// generation from nothing starts after a document separator.
pub fn llama_config(args: &InitModelArgs, tokenizer: &Tokenizer) -> Result<serde_json::Value> {
    let eos = tokenizer
        .eos_id()
        .context("the tokenizer has no eos_token")?;
    Ok(json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": tokenizer.bos_id().unwrap_or(eos),
        "eos_token_id": eos,
        "pad_token_id": null,
        "head_dim": args.head_dim(),
        "hidden_act": "silu",
        "hidden_size": args.hidden_size,
        "initializer_range": crate::fsutil::json_f32(INITIALIZER_RANGE),
        "intermediate_size": args.intermediate_size,
        "max_position_embeddings": args.max_position_embeddings,
        "mlp_bias": false,
        "num_attention_heads": args.num_attention_heads,
        "num_hidden_layers": args.num_hidden_layers,
        "num_key_value_heads": args.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": args.rms_norm_eps,
        "rope_scaling": null,
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": args.tie_word_embeddings,
        "torch_dtype": "float32",
        "use_cache": true,
        "vocab_size": tokenizer.vocab_size(),
    }))
}

/// Serialize freshly initialized weights as safetensors bytes (f32).
pub fn init_weights(args: &InitModelArgs, vocab: usize) -> Result<Vec<u8>> {
    let specs = tensor_specs(args, vocab);
    let data: Vec<Vec<u8>> = specs
        .par_iter()
        .map(|(name, shape, init)| init_tensor(name, shape.iter().product(), *init, args.seed))
        .collect::<Result<_>>()?;
    let views = specs
        .iter()
        .zip(&data)
        .map(|((name, shape, _), bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| anyhow!("tensor {name} {shape:?}: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| anyhow!("serializing the weights: {e}"))
}

/// Train the tokenizer on `corpus_files`, initialize a Llama of shape `args`
/// and write the model directory `output_dir`.
///
/// The config's `vocab_size` is the trained tokenizer's real size (ids
/// `0..vocab_size`, no padding rows): every embedding row is a real token.
pub fn init_model(corpus_files: &[PathBuf], output_dir: &Path, args: &InitModelArgs) -> Result<()> {
    args.validate()?;
    let texts = read_corpus(corpus_files)?;
    let mut tokenizer =
        train_byte_level_bpe(&texts, args.vocab_size).context("training the tokenizer")?;
    tokenizer.set_model_max_length(Some(args.max_position_embeddings));
    let vocab = tokenizer.vocab_size();
    tracing::info!(
        "trained a byte-level BPE with {vocab} tokens (target {})",
        args.vocab_size
    );

    let config = llama_config(args, &tokenizer)?;
    let weights = init_weights(args, vocab)?;
    std::fs::create_dir_all(output_dir)
        .with_context(|| format!("creating {}", output_dir.display()))?;
    write_atomic(&output_dir.join("model.safetensors"), &weights)?;
    tokenizer.save(output_dir)?;
    let eos = config["eos_token_id"].clone();
    write_json_atomic(
        &output_dir.join("generation_config.json"),
        &json!({
            "_from_model_config": true,
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": eos,
            "pad_token_id": eos,
        }),
    )?;
    write_json_atomic(&output_dir.join("config.json"), &config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;

    fn tiny() -> InitModelArgs {
        InitModelArgs {
            vocab_size: 400,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 64,
            seed: 11,
            ..Default::default()
        }
    }

    fn corpus(dir: &Path) -> PathBuf {
        let p = dir.join("corpus.txt");
        let docs = crate::demo::DemoDomain::new(1).pretrain_corpus(200, 0);
        write_atomic(&p, docs.join("\n").as_bytes()).unwrap();
        p
    }

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    #[test]
    fn writes_a_loadable_llama_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("model");
        let args = tiny();
        init_model(&[corpus(tmp.path())], &out, &args).unwrap();

        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        let tok = Tokenizer::load(&out).unwrap();
        let v = tok.vocab_size();
        assert!(v > 259 && v <= 400, "{v}");
        assert_eq!(cfg["vocab_size"], v);
        assert_eq!(cfg["model_type"], "llama");
        assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
        assert_eq!(cfg["head_dim"], 8);
        assert_eq!(cfg["eos_token_id"], tok.eos_id().unwrap());
        assert_eq!(cfg["pad_token_id"], serde_json::Value::Null);
        assert_eq!(tok.model_max_length(), Some(64));
        let gen: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("generation_config.json")).unwrap())
                .unwrap();
        assert_eq!(gen["eos_token_id"], cfg["eos_token_id"]);

        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .and_then(|m| m.get("format"))
                .map(String::as_str),
            Some("pt")
        );
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<&str> = st.names();
        names.sort();
        assert_eq!(names.len(), 1 + 2 * 9 + 1 + 1);
        let shape = |n: &str| st.tensor(n).unwrap().shape().to_vec();
        assert_eq!(shape("model.embed_tokens.weight"), [v, 32]);
        assert_eq!(shape("lm_head.weight"), [v, 32]);
        assert_eq!(shape("model.layers.1.self_attn.q_proj.weight"), [32, 32]);
        assert_eq!(shape("model.layers.1.self_attn.k_proj.weight"), [16, 32]);
        assert_eq!(shape("model.layers.1.self_attn.v_proj.weight"), [16, 32]);
        assert_eq!(shape("model.layers.1.self_attn.o_proj.weight"), [32, 32]);
        assert_eq!(shape("model.layers.0.mlp.gate_proj.weight"), [64, 32]);
        assert_eq!(shape("model.layers.0.mlp.up_proj.weight"), [64, 32]);
        assert_eq!(shape("model.layers.0.mlp.down_proj.weight"), [32, 64]);
        assert_eq!(shape("model.norm.weight"), [32]);
        assert!(st.tensors().iter().all(|(_, t)| t.dtype() == Dtype::F32));
        assert!(f32s(
            st.tensor("model.layers.0.input_layernorm.weight")
                .unwrap()
                .data()
        )
        .iter()
        .all(|&x| x == 1.0));
        let w = f32s(st.tensor("model.embed_tokens.weight").unwrap().data());
        let mean = w.iter().sum::<f32>() / w.len() as f32;
        let std = (w.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / w.len() as f32).sqrt();
        assert!(
            mean.abs() < 0.002 && (std - 0.02).abs() < 0.002,
            "mean {mean} std {std}"
        );
        assert_ne!(
            st.tensor("lm_head.weight").unwrap().data(),
            st.tensor("model.embed_tokens.weight").unwrap().data()
        );

        // Same seed and corpus: byte-identical weights.
        let out2 = tmp.path().join("model2");
        init_model(&[tmp.path().join("corpus.txt")], &out2, &args).unwrap();
        assert_eq!(
            std::fs::read(out2.join("model.safetensors")).unwrap(),
            bytes
        );
    }

    #[test]
    fn tied_embeddings_have_no_lm_head() {
        let args = InitModelArgs {
            tie_word_embeddings: true,
            ..tiny()
        };
        let bytes = init_weights(&args, 300).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert!(st.tensor("lm_head.weight").is_err());
        assert_eq!(st.names().len(), 1 + 2 * 9 + 1);
    }

    #[test]
    fn bad_args_are_rejected() {
        let check = |args: InitModelArgs, want: &str| {
            let e = args.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        };
        check(
            InitModelArgs {
                hidden_size: 0,
                ..tiny()
            },
            "hidden_size must be > 0",
        );
        check(
            InitModelArgs {
                num_attention_heads: 5,
                ..tiny()
            },
            "must divide hidden_size",
        );
        check(
            InitModelArgs {
                num_key_value_heads: 3,
                ..tiny()
            },
            "must divide num_attention_heads",
        );
        check(
            InitModelArgs {
                hidden_size: 12,
                num_attention_heads: 4,
                num_key_value_heads: 1,
                ..tiny()
            },
            "even",
        );
        check(
            InitModelArgs {
                rope_theta: -1.0,
                ..tiny()
            },
            "rope_theta",
        );
        let tmp = tempfile::tempdir().unwrap();
        let e = format!(
            "{:#}",
            init_model(&[tmp.path().join("nope.txt")], tmp.path(), &tiny()).unwrap_err()
        );
        assert!(e.contains("nope.txt"), "{e}");
        assert!(init_model(&[], tmp.path(), &tiny()).is_err());
    }
}
