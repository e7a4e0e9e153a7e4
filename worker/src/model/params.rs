//! Where every weight lives. Two flat buffers: `frozen` (base weights not being
//! trained) and `train` (what the optimizer updates: LoRA A/B and
//! modules_to_save, or every weight in a full fine-tune). Gradients and AdamW
//! moments mirror `train` exactly, so all-reduce and zero-grad are one call each.

use super::config::ModelConfig;
use anyhow::{bail, Result};

/// The seven linear layers of a Llama block, in PEFT's names.
pub const LINEAR_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// A tensor's place in one of the two flat buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub trainable: bool,
    pub offset: usize,
    pub len: usize,
}

impl Slot {
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    /// Subset of [`LINEAR_MODULES`].
    pub target_modules: Vec<String>,
    /// `embed_tokens` and/or `lm_head`, trained in full.
    pub modules_to_save: Vec<String>,
}

impl LoraConfig {
    /// PEFT's scaling of the low-rank update: alpha / r.
    pub fn scaling(&self) -> f32 {
        self.alpha / self.r as f32
    }

    /// Parse MedicalGPT's `--target_modules` (`all` or a comma list).
    pub fn parse_target_modules(s: &str) -> Result<Vec<String>> {
        let s = s.trim();
        if s == "all" || s.is_empty() {
            return Ok(LINEAR_MODULES.iter().map(|m| m.to_string()).collect());
        }
        let mut out = Vec::new();
        for m in s.split(',').map(str::trim).filter(|m| !m.is_empty()) {
            if !LINEAR_MODULES.contains(&m) {
                bail!(
                    "target module {m:?} is not one of all, {}",
                    LINEAR_MODULES.join(", ")
                );
            }
            if !out.iter().any(|o: &String| o == m) {
                out.push(m.to_string());
            }
        }
        Ok(out)
    }

    /// Parse `--modules_to_save` (comma list of embed_tokens, lm_head).
    pub fn parse_modules_to_save(s: Option<&str>) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for m in s
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
        {
            if m != "embed_tokens" && m != "lm_head" {
                bail!("modules_to_save entry {m:?} is not supported (expected embed_tokens and/or lm_head)");
            }
            out.push(m.to_string());
        }
        Ok(out)
    }
}

/// The output head on top of the final norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Head {
    /// `lm_head` [V, C] (or the tied embedding): next-token logits (`*ForCausalLM`).
    #[default]
    CausalLm,
    /// `score` [1, C], no bias: one scalar per sequence, read at its last
    /// non-padding token (`*ForSequenceClassification` with num_labels = 1).
    /// Trained in full in LoRA mode too (PEFT SEQ_CLS puts it in modules_to_save).
    Score,
    /// `lm_head` plus a value head (TRL's `AutoModelForCausalLMWithValueHead`):
    /// `v_head.summary` Linear(C, 1) with bias on the final hidden state of
    /// every position. The value head is always trained (the PPO critic).
    CausalLmWithValue,
}

/// Names of the value head's weight [1, C] and bias [1], as TRL saves them.
pub const VALUE_WEIGHT: &str = "v_head.summary.weight";
pub const VALUE_BIAS: &str = "v_head.summary.bias";

/// The value head's two tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValueHead {
    pub weight: Slot, // [1, C]
    pub bias: Slot,   // [1]
}

/// Name of the sequence-classification head's weight in a transformers model dir.
pub const SCORE_WEIGHT: &str = "score.weight";

/// What is trained.
#[derive(Clone, Debug, PartialEq)]
pub enum TrainMode {
    Full,
    Lora(LoraConfig),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorKind {
    /// A weight of the Hugging Face model.
    Base,
    LoraA,
    LoraB,
    /// The PPO value head: neither a base weight nor part of a PEFT adapter
    /// (saved on its own, as TRL does).
    ValueHead,
}

/// One named tensor: `name` is the Hugging Face name for base weights
/// (`model.layers.0.self_attn.q_proj.weight`) and the module prefix plus
/// `.lora_A.weight`/`.lora_B.weight` for LoRA tensors.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub slot: Slot,
    pub kind: TensorKind,
}

/// A linear layer y = x·Wᵀ (+ b) (+ s·dropout(x)·Aᵀ·Bᵀ).
#[derive(Clone, Debug)]
pub struct Linear {
    pub n_in: usize,
    pub n_out: usize,
    pub w: Slot,            // [n_out, n_in]
    pub bias: Option<Slot>, // [n_out]
    /// (A [r, n_in], B [n_out, r])
    pub lora: Option<(Slot, Slot)>,
}

#[derive(Clone, Debug)]
pub struct Block {
    pub ln1: Slot, // [C]
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub ln2: Slot, // [C]
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Block {
    /// The linears in LINEAR_MODULES order.
    pub fn linears(&self) -> [&Linear; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }
}

/// The whole model's layout.
#[derive(Clone, Debug)]
pub struct Layout {
    pub embed: Slot, // [V, C]
    pub blocks: Vec<Block>,
    pub norm: Slot, // [C]
    pub head: Head,
    /// [V, C]; the same slot as `embed` when tied. None with the score head.
    pub lm_head: Option<Slot>,
    /// [1, C] with the score head.
    pub score: Option<Slot>,
    /// With [`Head::CausalLmWithValue`].
    pub value: Option<ValueHead>,
    pub tensors: Vec<TensorEntry>,
    pub frozen_len: usize,
    pub train_len: usize,
}

struct Builder<'a> {
    mode: &'a TrainMode,
    tensors: Vec<TensorEntry>,
    frozen_len: usize,
    train_len: usize,
}

impl Builder<'_> {
    fn push(&mut self, name: String, shape: Vec<usize>, trainable: bool, kind: TensorKind) -> Slot {
        let len = shape.iter().product();
        let offset = if trainable {
            &mut self.train_len
        } else {
            &mut self.frozen_len
        };
        let slot = Slot {
            trainable,
            offset: *offset,
            len,
        };
        *offset += len;
        self.tensors.push(TensorEntry {
            name,
            shape,
            slot,
            kind,
        });
        slot
    }

    fn base(&mut self, name: String, shape: Vec<usize>, module_to_save: Option<&str>) -> Slot {
        let trainable = match self.mode {
            TrainMode::Full => true,
            TrainMode::Lora(l) => {
                module_to_save.is_some_and(|m| l.modules_to_save.iter().any(|x| x == m))
            }
        };
        self.push(name, shape, trainable, TensorKind::Base)
    }

    fn linear(
        &mut self,
        prefix: String,
        module: &str,
        n_in: usize,
        n_out: usize,
        bias: bool,
    ) -> Linear {
        let w = self.base(format!("{prefix}.weight"), vec![n_out, n_in], None);
        let bias = bias.then(|| self.base(format!("{prefix}.bias"), vec![n_out], None));
        let lora = match self.mode {
            TrainMode::Lora(l) if l.target_modules.iter().any(|m| m == module) => {
                let a = self.push(
                    format!("{prefix}.lora_A.weight"),
                    vec![l.r, n_in],
                    true,
                    TensorKind::LoraA,
                );
                let b = self.push(
                    format!("{prefix}.lora_B.weight"),
                    vec![n_out, l.r],
                    true,
                    TensorKind::LoraB,
                );
                Some((a, b))
            }
            _ => None,
        };
        Linear {
            n_in,
            n_out,
            w,
            bias,
            lora,
        }
    }
}

impl Layout {
    /// The causal-LM layout.
    pub fn new(cfg: &ModelConfig, mode: &TrainMode) -> Layout {
        Self::with_head(cfg, mode, Head::CausalLm)
    }

    pub fn with_head(cfg: &ModelConfig, mode: &TrainMode, head: Head) -> Layout {
        let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let mut b = Builder {
            mode,
            tensors: Vec::new(),
            frozen_len: 0,
            train_len: 0,
        };
        let embed = b.base(
            "model.embed_tokens.weight".into(),
            vec![v, c],
            Some("embed_tokens"),
        );
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let ln1 = b.base(format!("{p}.input_layernorm.weight"), vec![c], None);
            let q = b.linear(
                format!("{p}.self_attn.q_proj"),
                "q_proj",
                c,
                cfg.q_dim(),
                cfg.qkv_bias,
            );
            let k = b.linear(
                format!("{p}.self_attn.k_proj"),
                "k_proj",
                c,
                cfg.kv_dim(),
                cfg.qkv_bias,
            );
            let vv = b.linear(
                format!("{p}.self_attn.v_proj"),
                "v_proj",
                c,
                cfg.kv_dim(),
                cfg.qkv_bias,
            );
            let o = b.linear(
                format!("{p}.self_attn.o_proj"),
                "o_proj",
                cfg.q_dim(),
                c,
                cfg.o_bias,
            );
            let ln2 = b.base(
                format!("{p}.post_attention_layernorm.weight"),
                vec![c],
                None,
            );
            let gate = b.linear(
                format!("{p}.mlp.gate_proj"),
                "gate_proj",
                c,
                f,
                cfg.mlp_bias,
            );
            let up = b.linear(format!("{p}.mlp.up_proj"), "up_proj", c, f, cfg.mlp_bias);
            let down = b.linear(
                format!("{p}.mlp.down_proj"),
                "down_proj",
                f,
                c,
                cfg.mlp_bias,
            );
            blocks.push(Block {
                ln1,
                q,
                k,
                v: vv,
                o,
                ln2,
                gate,
                up,
                down,
            });
        }
        let norm = b.base("model.norm.weight".into(), vec![c], None);
        let (lm_head, score) = match head {
            Head::CausalLm | Head::CausalLmWithValue if cfg.tie_word_embeddings => {
                (Some(embed), None)
            }
            Head::CausalLm | Head::CausalLmWithValue => (
                Some(b.base("lm_head.weight".into(), vec![v, c], Some("lm_head"))),
                None,
            ),
            // Trainable in both modes: fully, or as a PEFT SEQ_CLS module to save.
            Head::Score => (
                None,
                Some(b.push(SCORE_WEIGHT.into(), vec![1, c], true, TensorKind::Base)),
            ),
        };
        // After every base tensor, so the frozen part is the causal LM's.
        let value = (head == Head::CausalLmWithValue).then(|| ValueHead {
            weight: b.push(VALUE_WEIGHT.into(), vec![1, c], true, TensorKind::ValueHead),
            bias: b.push(VALUE_BIAS.into(), vec![1], true, TensorKind::ValueHead),
        });
        Layout {
            embed,
            blocks,
            norm,
            head,
            lm_head,
            score,
            value,
            tensors: b.tensors,
            frozen_len: b.frozen_len,
            train_len: b.train_len,
        }
    }

    /// The tensor called `name`.
    pub fn find(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| anyhow::anyhow!("no tensor {name:?} in the model"))
    }

    /// Whether weight decay applies (HF Trainer: not to biases and norm weights).
    pub fn decays(name: &str) -> bool {
        !(name.ends_with(".bias") || name.contains("norm"))
    }
}
