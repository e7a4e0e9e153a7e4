//! Arguments shared by the stages, with MedicalGPT's (and transformers')
//! names and defaults. Booleans take a value as MedicalGPT's scripts pass
//! them (`--use_peft True`), or stand alone (`--gradient_checkpointing`).

use crate::model::params::{LoraConfig, TrainMode};
use crate::train::schedule::ScheduleKind;
use crate::train::TrainArgs;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Parse `true`/`True`/`1`/`yes` and `false`/`False`/`0`/`no`.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" | "True" | "TRUE" | "1" | "yes" | "Yes" => Ok(true),
        "false" | "False" | "FALSE" | "0" | "no" | "No" => Ok(false),
        _ => Err(format!("expected true or false, found {s:?}")),
    }
}

/// `ModelArguments` + `ScriptArguments` (the LoRA part).
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Hugging Face model dir (config.json, safetensors, tokenizer files).
    #[arg(long = "model_name_or_path")]
    pub model_name_or_path: PathBuf,
    /// Tokenizer dir, when not the model dir.
    #[arg(long = "tokenizer_name_or_path")]
    pub tokenizer_name_or_path: Option<PathBuf>,
    /// auto, float32, float16 or bfloat16. The CPU backend computes in float32 whatever the weights' dtype.
    #[arg(long = "torch_dtype")]
    pub torch_dtype: Option<String>,
    /// Train a LoRA adapter (true) or every weight (false).
    #[arg(long = "use_peft", default_value = "true", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub use_peft: bool,
    /// `all` or a comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj.
    #[arg(long = "target_modules", default_value = "all")]
    pub target_modules: String,
    #[arg(long = "lora_rank", default_value_t = 8)]
    pub lora_rank: usize,
    #[arg(long = "lora_alpha", default_value_t = 32.0)]
    pub lora_alpha: f32,
    #[arg(long = "lora_dropout", default_value_t = 0.05)]
    pub lora_dropout: f32,
    /// Comma list of embed_tokens,lm_head trained in full beside the adapter.
    #[arg(long = "modules_to_save")]
    pub modules_to_save: Option<String>,
    /// Continue training this PEFT adapter (its config replaces the lora_* flags).
    #[arg(long = "peft_path")]
    pub peft_path: Option<PathBuf>,
}

impl ModelArgs {
    pub fn tokenizer_dir(&self) -> PathBuf {
        self.tokenizer_name_or_path
            .clone()
            .unwrap_or_else(|| self.model_name_or_path.clone())
    }

    pub fn train_mode(&self) -> Result<TrainMode> {
        if !self.use_peft {
            return Ok(TrainMode::Full);
        }
        if let Some(p) = &self.peft_path {
            return Ok(TrainMode::Lora(
                crate::model::pretrained::read_adapter_config(p)?,
            ));
        }
        if self.lora_rank == 0 {
            anyhow::bail!("lora_rank must be > 0");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            anyhow::bail!("lora_dropout must be in [0, 1), got {}", self.lora_dropout);
        }
        Ok(TrainMode::Lora(LoraConfig {
            r: self.lora_rank,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target_modules: LoraConfig::parse_target_modules(&self.target_modules)?,
            modules_to_save: LoraConfig::parse_modules_to_save(self.modules_to_save.as_deref())?,
        }))
    }
}

/// Where a stage runs: `cpu`, `cuda` (the first GPU) or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device {s:?} (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// transformers' `TrainingArguments` that the trainer honours.
#[derive(Args, Clone, Debug)]
pub struct TrainingArgs {
    #[arg(long = "output_dir")]
    pub output_dir: PathBuf,
    #[arg(long = "per_device_train_batch_size", default_value_t = 8)]
    pub per_device_train_batch_size: usize,
    #[arg(long = "per_device_eval_batch_size", default_value_t = 8)]
    pub per_device_eval_batch_size: usize,
    #[arg(long = "gradient_accumulation_steps", default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    #[arg(long = "learning_rate", default_value_t = 5e-5)]
    pub learning_rate: f64,
    #[arg(long = "weight_decay", default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long = "adam_beta1", default_value_t = 0.9)]
    pub adam_beta1: f64,
    #[arg(long = "adam_beta2", default_value_t = 0.999)]
    pub adam_beta2: f64,
    #[arg(long = "adam_epsilon", default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    #[arg(long = "max_grad_norm", default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long = "num_train_epochs", default_value_t = 3.0)]
    pub num_train_epochs: f64,
    /// > 0 overrides num_train_epochs.
    #[arg(long = "max_steps", default_value_t = -1, allow_negative_numbers = true)]
    pub max_steps: i64,
    /// linear, cosine, constant, constant_with_warmup or polynomial.
    #[arg(long = "lr_scheduler_type", default_value = "linear")]
    pub lr_scheduler_type: String,
    #[arg(long = "warmup_ratio", default_value_t = 0.0)]
    pub warmup_ratio: f64,
    #[arg(long = "warmup_steps", default_value_t = 0)]
    pub warmup_steps: u64,
    #[arg(long = "logging_steps", default_value_t = 500)]
    pub logging_steps: u64,
    /// Evaluate every N steps; without it, once at the end.
    #[arg(long = "eval_steps")]
    pub eval_steps: Option<u64>,
    #[arg(long = "save_steps", default_value_t = 500)]
    pub save_steps: u64,
    #[arg(long = "save_total_limit")]
    pub save_total_limit: Option<usize>,
    #[arg(long = "seed", default_value_t = 42)]
    pub seed: u64,
    /// cpu, cuda or cuda:N (CUDA libraries are loaded at run time).
    #[arg(long = "device", default_value = "cpu")]
    pub device: Device,
    /// A checkpoint dir, or true for the latest checkpoint-* in output_dir.
    #[arg(long = "resume_from_checkpoint")]
    pub resume_from_checkpoint: Option<String>,
    /// Recompute each layer's activations in backward instead of keeping them.
    #[arg(long = "gradient_checkpointing", default_value = "false", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub gradient_checkpointing: bool,
    /// Stop after this many optimizer steps (a resumable interruption; for tests and experiments).
    #[arg(long = "stop_after_steps", hide = true)]
    pub stop_after_steps: Option<u64>,
    /// Accepted for compatibility with MedicalGPT's scripts and ignored (with a warning):
    /// do_train, do_eval, bf16, fp16, overwrite_output_dir, report_to, ... as `--name value`.
    #[arg(long = "do_train", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub do_train: Option<bool>,
    #[arg(long = "do_eval", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub do_eval: Option<bool>,
    /// Compute in bf16 on CUDA (f32 master weights and gradients). No effect on the CPU.
    #[arg(long = "bf16", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub bf16: Option<bool>,
    /// Compute in fp16 on CUDA, with dynamic loss scaling. No effect on the CPU.
    #[arg(long = "fp16", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub fp16: Option<bool>,
    #[arg(long = "overwrite_output_dir", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub overwrite_output_dir: Option<bool>,
    #[arg(long = "report_to", hide = true)]
    pub report_to: Option<String>,
    #[arg(long = "preprocessing_num_workers", hide = true)]
    pub preprocessing_num_workers: Option<usize>,
}

/// What running any stage needs besides its own arguments: where, in
/// which compute type, and where its checkpoints are.
#[derive(Clone, Copy, Debug)]
pub struct RunFlags<'a> {
    pub device: Device,
    pub bf16: Option<bool>,
    pub fp16: Option<bool>,
    pub output_dir: &'a std::path::Path,
    pub resume_from_checkpoint: Option<&'a str>,
}

impl RunFlags<'_> {
    /// The CUDA compute type from --bf16/--fp16 (f32 when neither, as in
    /// transformers). On the CPU both are accepted and have no effect.
    pub fn cuda_dtype(&self) -> Result<rlhf_kernels::cuda::Dtype> {
        use rlhf_kernels::cuda::Dtype;
        let (bf16, fp16) = (self.bf16 == Some(true), self.fp16 == Some(true));
        if bf16 && fp16 {
            anyhow::bail!("--bf16 and --fp16 are both set; choose one");
        }
        if self.device == Device::Cpu {
            if bf16 || fp16 {
                tracing::warn!("--bf16/--fp16 have no effect on the CPU, which computes in f32");
            }
            return Ok(Dtype::F32);
        }
        Ok(if bf16 {
            Dtype::Bf16
        } else if fp16 {
            Dtype::F16
        } else {
            tracing::info!("computing in f32 on {}; --bf16 is much faster", self.device);
            Dtype::F32
        })
    }
}

impl TrainingArgs {
    pub fn run_flags(&self) -> RunFlags<'_> {
        RunFlags {
            device: self.device,
            bf16: self.bf16,
            fp16: self.fp16,
            output_dir: &self.output_dir,
            resume_from_checkpoint: self.resume_from_checkpoint.as_deref(),
        }
    }

    /// See [`RunFlags::cuda_dtype`].
    pub fn cuda_dtype(&self) -> Result<rlhf_kernels::cuda::Dtype> {
        self.run_flags().cuda_dtype()
    }

    pub fn to_train_args(&self) -> Result<TrainArgs> {
        for (name, set) in [
            ("do_train", self.do_train.is_some()),
            ("do_eval", self.do_eval.is_some()),
            ("overwrite_output_dir", self.overwrite_output_dir.is_some()),
            ("report_to", self.report_to.is_some()),
            (
                "preprocessing_num_workers",
                self.preprocessing_num_workers.is_some(),
            ),
        ] {
            if set {
                tracing::warn!("--{name} is accepted for compatibility and has no effect here");
            }
        }
        if self.per_device_train_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            anyhow::bail!(
                "per_device_train_batch_size and gradient_accumulation_steps must be > 0"
            );
        }
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            anyhow::bail!(
                "learning_rate must be a non-negative number, got {}",
                self.learning_rate
            );
        }
        let kind: ScheduleKind = self.lr_scheduler_type.parse()?;
        Ok(TrainArgs {
            output_dir: self.output_dir.clone(),
            per_device_train_batch_size: self.per_device_train_batch_size,
            per_device_eval_batch_size: self.per_device_eval_batch_size,
            gradient_accumulation_steps: self.gradient_accumulation_steps,
            learning_rate: self.learning_rate,
            weight_decay: self.weight_decay,
            adam_beta1: self.adam_beta1,
            adam_beta2: self.adam_beta2,
            adam_epsilon: self.adam_epsilon,
            max_grad_norm: self.max_grad_norm,
            num_train_epochs: self.num_train_epochs,
            max_steps: self.max_steps,
            lr_scheduler_type: kind,
            warmup_ratio: self.warmup_ratio,
            warmup_steps: self.warmup_steps,
            logging_steps: self.logging_steps,
            eval_steps: self.eval_steps,
            save_steps: self.save_steps,
            save_total_limit: self.save_total_limit,
            seed: self.seed,
            resume_from_checkpoint: self.resume_from_checkpoint.clone(),
            stop_after_steps: self.stop_after_steps,
            show_progress: true,
        })
    }
}
