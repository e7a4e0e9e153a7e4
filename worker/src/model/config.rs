//! The model's hyper-parameters, read from a Hugging Face `config.json`.
//! Accepts Llama 1/2/3, Mistral and Qwen2 in both the transformers 4.x layout
//! (`rope_theta`/`rope_scaling` at the top) and 5.x (`rope_parameters`).

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// How rotary frequencies are rescaled (`rope_scaling` / `rope_parameters.rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.x: low frequencies divided by `factor`, a smooth blend in between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama with `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Mistral/Qwen2 sliding-window attention size, when enabled.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// The original JSON, so a saved full model keeps every key the user had.
    pub raw: Value,
}

impl ModelConfig {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let raw: Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing {} as JSON", path.display()))?;
        Self::from_json(raw).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_json(raw: Value) -> Result<Self> {
        let model_type = str_field(&raw, "model_type")?.unwrap_or_else(|| "llama".into());
        if !matches!(model_type.as_str(), "llama" | "mistral" | "qwen2") {
            bail!("model_type {model_type:?} is not supported (expected llama, mistral or qwen2)");
        }
        if let Some(act) = str_field(&raw, "hidden_act")? {
            if act != "silu" {
                bail!("hidden_act {act:?} is not supported (expected \"silu\")");
            }
        }
        let hidden_size = req_usize(&raw, "hidden_size")?;
        let num_attention_heads = req_usize(&raw, "num_attention_heads")?;
        let num_key_value_heads =
            opt_usize(&raw, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim =
            opt_usize(&raw, "head_dim")?.unwrap_or(hidden_size / num_attention_heads.max(1));
        let rope_params = raw.get("rope_parameters").filter(|v| v.is_object());
        let rope_theta = match (
            opt_f64(&raw, "rope_theta")?,
            rope_params
                .map(|p| opt_f64(p, "rope_theta"))
                .transpose()?
                .flatten(),
        ) {
            (Some(t), _) | (None, Some(t)) => t,
            (None, None) => 10000.0,
        };
        let scaling_json = raw
            .get("rope_scaling")
            .filter(|v| !v.is_null())
            .or(rope_params);
        let rope_scaling = match scaling_json {
            Some(s) => parse_rope_scaling(s)?,
            None => RopeScaling::None,
        };
        let is_qwen2 = model_type == "qwen2";
        let attention_bias = bool_field(&raw, "attention_bias")?.unwrap_or(false);
        let sliding_window = match model_type.as_str() {
            "mistral" => opt_usize(&raw, "sliding_window")?,
            "qwen2" if bool_field(&raw, "use_sliding_window")?.unwrap_or(false) => {
                opt_usize(&raw, "sliding_window")?
            }
            _ => None,
        };
        let cfg = ModelConfig {
            vocab_size: req_usize(&raw, "vocab_size")?,
            hidden_size,
            intermediate_size: req_usize(&raw, "intermediate_size")?,
            num_hidden_layers: req_usize(&raw, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: opt_usize(&raw, "max_position_embeddings")?.unwrap_or(2048),
            rms_norm_eps: opt_f64(&raw, "rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: bool_field(&raw, "tie_word_embeddings")?.unwrap_or(false),
            qkv_bias: is_qwen2 || attention_bias,
            o_bias: !is_qwen2 && attention_bias,
            mlp_bias: bool_field(&raw, "mlp_bias")?.unwrap_or(false),
            sliding_window,
            bos_token_id: token_id(&raw, "bos_token_id")?,
            eos_token_id: token_id(&raw, "eos_token_id")?,
            pad_token_id: token_id(&raw, "pad_token_id")?,
            model_type,
            raw,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                bail!("{name} must be > 0");
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim
            );
        }
        Ok(())
    }

    /// Width of the q projection's output: NH*HD.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    /// Width of the k and v projections' outputs: NKV*HD.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

fn parse_rope_scaling(s: &Value) -> Result<RopeScaling> {
    let kind = str_field(s, "rope_type")?
        .or(str_field(s, "type")?)
        .unwrap_or_else(|| "default".into());
    let factor = || -> Result<f64> {
        opt_f64(s, "factor")?.with_context(|| format!("rope scaling {kind:?} needs a \"factor\""))
    };
    Ok(match kind.as_str() {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: opt_f64(s, "low_freq_factor")?
                .context("llama3 rope scaling needs low_freq_factor")?,
            high_freq_factor: opt_f64(s, "high_freq_factor")?
                .context("llama3 rope scaling needs high_freq_factor")?,
            original_max_position_embeddings: opt_f64(s, "original_max_position_embeddings")?
                .context("llama3 rope scaling needs original_max_position_embeddings")?,
        },
        other => bail!(
            "rope scaling type {other:?} is not supported (supported: default, linear, llama3); \
             refusing to train with different position encodings than the model was made with"
        ),
    })
}

fn str_field(v: &Value, key: &str) -> Result<Option<String>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => bail!("field {key:?}: expected a string, found {other}"),
    }
}

fn opt_f64(v: &Value, key: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => bail!("field {key:?}: expected a number, found {other}"),
    }
}

fn opt_usize(v: &Value, key: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(x) => Ok(Some(x as usize)),
            None => bail!("field {key:?}: expected a non-negative integer, found {n}"),
        },
        Some(other) => bail!("field {key:?}: expected a non-negative integer, found {other}"),
    }
}

fn req_usize(v: &Value, key: &str) -> Result<usize> {
    opt_usize(v, key)?.with_context(|| format!("missing field {key:?}"))
}

fn bool_field(v: &Value, key: &str) -> Result<Option<bool>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => bail!("field {key:?}: expected true or false, found {other}"),
    }
}

/// Token ids may be a number or (Llama 3) a list; the first entry is used.
fn token_id(v: &Value, key: &str) -> Result<Option<u32>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_u64().map(|x| x as u32)),
        Some(Value::Array(a)) => Ok(a.first().and_then(|x| x.as_u64()).map(|x| x as u32)),
        Some(other) => bail!("field {key:?}: expected a token id, found {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"model_type":"llama","vocab_size":100,"hidden_size":32,"intermediate_size":64,
               "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5})
    }

    #[test]
    fn reads_rope_theta_from_top_level_or_rope_parameters() {
        let mut a = base();
        a["rope_theta"] = json!(500000.0);
        assert_eq!(ModelConfig::from_json(a).unwrap().rope_theta, 500000.0);
        let mut b = base();
        b["rope_parameters"] = json!({"rope_type":"default","rope_theta":1000000.0});
        let cb = ModelConfig::from_json(b).unwrap();
        assert_eq!(cb.rope_theta, 1000000.0);
        assert_eq!(cb.rope_scaling, RopeScaling::None);
        assert_eq!(ModelConfig::from_json(base()).unwrap().rope_theta, 10000.0);
    }

    #[test]
    fn unknown_rope_scaling_is_an_error_naming_the_type() {
        let mut a = base();
        a["rope_scaling"] = json!({"rope_type":"yarn","factor":4.0});
        let e = format!("{:#}", ModelConfig::from_json(a).unwrap_err());
        assert!(e.contains("\"yarn\""), "{e}");
    }

    #[test]
    fn qwen2_has_qkv_bias_and_gqa_is_checked() {
        let mut a = base();
        a["model_type"] = json!("qwen2");
        let c = ModelConfig::from_json(a).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        let mut b = base();
        b["num_key_value_heads"] = json!(3);
        assert!(format!("{:#}", ModelConfig::from_json(b).unwrap_err())
            .contains("multiple of num_key_value_heads"));
    }

    #[test]
    fn missing_and_mistyped_fields_are_named() {
        let mut a = base();
        a.as_object_mut().unwrap().remove("hidden_size");
        assert!(format!("{:#}", ModelConfig::from_json(a).unwrap_err()).contains("\"hidden_size\""));
        let mut b = base();
        b["vocab_size"] = json!("many");
        assert!(format!("{:#}", ModelConfig::from_json(b).unwrap_err()).contains("\"vocab_size\""));
    }
}
