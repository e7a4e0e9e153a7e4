//! Arguments shared by the inference commands (`rlhf generate`, `rlhf chat`):
//! which model to load where, and how to decode.

use super::args::{parse_bool, Device};
use crate::data::template::ChatFormat;
use crate::model::generate::GenerationConfig;
use crate::model::pretrained::{load_model, read_adapter_config};
use crate::model::{Llama, TrainMode};
use crate::tokenizer::Tokenizer;
use anyhow::Result;
use clap::Args;
use rlhf_kernels::cuda::{Cuda, Dtype};
use rlhf_kernels::{Backend, Cpu};
use std::path::PathBuf;

/// The model (+ adapter) and the device it runs on.
#[derive(Args, Clone, Debug)]
pub struct InferenceModelFlags {
    #[arg(long = "model_name_or_path")]
    pub model_name_or_path: PathBuf,
    #[arg(long = "tokenizer_name_or_path")]
    pub tokenizer_name_or_path: Option<PathBuf>,
    /// A PEFT adapter dir, applied unmerged.
    #[arg(long = "peft_path")]
    pub peft_path: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long = "device", default_value = "cpu")]
    pub device: Device,
    /// On CUDA: compute in bf16 (else f32).
    #[arg(long = "bf16", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub bf16: Option<bool>,
}

impl InferenceModelFlags {
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let dir = self
            .tokenizer_name_or_path
            .as_ref()
            .unwrap_or(&self.model_name_or_path);
        Tokenizer::load(dir)
    }

    /// Load the model (+ adapter) on `be`.
    pub fn load<B: Backend>(&self, be: B) -> Result<Llama<B>> {
        let mode = match &self.peft_path {
            Some(p) => TrainMode::Lora(read_adapter_config(p)?),
            None => TrainMode::Full,
        };
        let mut model = load_model(be, &self.model_name_or_path, mode, 0)?;
        if let Some(p) = &self.peft_path {
            model.load_adapter(p)?;
        }
        Ok(model)
    }

    /// Run `f` with the model loaded on the device asked for.
    pub fn with_model<T>(&self, f: impl ModelFn<T>) -> Result<T> {
        match self.device {
            Device::Cpu => f.call(self.load(Cpu)?),
            Device::Cuda(n) => {
                let dtype = if self.bf16 == Some(true) {
                    Dtype::Bf16
                } else {
                    Dtype::F32
                };
                f.call(self.load(Cuda::new(n, dtype)?)?)
            }
        }
    }
}

/// A computation generic over the backend (a closure cannot be generic).
pub trait ModelFn<T> {
    fn call<B: Backend>(self, model: Llama<B>) -> Result<T>;
}

/// Decoding settings; unset ones come from the model's generation_config.json,
/// then transformers' defaults.
#[derive(Args, Clone, Debug)]
pub struct SamplingFlags {
    #[arg(long = "max_new_tokens")]
    pub max_new_tokens: Option<usize>,
    /// Sample instead of greedy decoding (default: generation_config.json's, else false).
    #[arg(long = "do_sample", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub do_sample: Option<bool>,
    #[arg(long = "temperature")]
    pub temperature: Option<f32>,
    #[arg(long = "top_k")]
    pub top_k: Option<usize>,
    #[arg(long = "top_p")]
    pub top_p: Option<f32>,
    #[arg(long = "repetition_penalty")]
    pub repetition_penalty: Option<f32>,
    /// Extra stop strings (the text is cut before them).
    #[arg(long = "stop", num_args = 1..)]
    pub stop: Vec<String>,
    #[arg(long = "seed", default_value_t = 42)]
    pub seed: u64,
}

impl SamplingFlags {
    /// The generation config: generation_config.json of the model dir, these
    /// flags over it, EOS from the tokenizer when the file names none, and the
    /// chat format's end-of-turn markers when there is one.
    pub fn config(
        &self,
        model: &InferenceModelFlags,
        tokenizer: &Tokenizer,
        format: Option<&ChatFormat>,
    ) -> Result<GenerationConfig> {
        let mut cfg = GenerationConfig::from_model_dir(&model.model_name_or_path)?;
        if cfg.eos_token_ids.is_empty() {
            cfg.eos_token_ids.extend(tokenizer.eos_id());
        }
        if let Some(f) = format {
            let turn_end = super::qa_eval::greedy_config(tokenizer, f, 1)?;
            for id in turn_end.eos_token_ids {
                if !cfg.eos_token_ids.contains(&id) {
                    cfg.eos_token_ids.push(id);
                }
            }
            cfg.stop_strings.extend(turn_end.stop_strings);
        }
        cfg.max_new_tokens = self.max_new_tokens.unwrap_or(cfg.max_new_tokens);
        cfg.do_sample = self.do_sample.unwrap_or(cfg.do_sample);
        cfg.temperature = self.temperature.unwrap_or(cfg.temperature);
        cfg.top_k = self.top_k.unwrap_or(cfg.top_k);
        cfg.top_p = self.top_p.unwrap_or(cfg.top_p);
        cfg.repetition_penalty = self.repetition_penalty.unwrap_or(cfg.repetition_penalty);
        cfg.stop_strings.extend(self.stop.iter().cloned());
        cfg.seed = self.seed;
        cfg.validate()?;
        Ok(cfg)
    }
}
