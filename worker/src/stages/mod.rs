//! The training stages. Each takes MedicalGPT's arguments (same names, same
//! defaults); each runs in one process (`rlhf pt`) or as one rank of a
//! coordinator-driven stage (`run_dist`, through the worker agent).

pub mod args;
pub mod chat;
pub mod dpo;
pub mod eval;
pub mod generate;
pub mod grpo;
pub mod infer_args;
pub mod ppo;
pub mod pt;
pub mod qa_eval;
pub mod rm;
pub mod sft;

use crate::collective::Collective;
use crate::model::params::TrainMode;
use crate::model::weights::TensorFiles;
use crate::model::Llama;
use crate::train::TrainHooks;
use anyhow::{Context, Result};
use rlhf_kernels::Backend;
use std::path::Path;

/// A training stage: one rank of a data-parallel stage (the worker agent
/// runs it so, its arguments parsed by the same clap definition as its
/// subcommand), or the whole stage in one process ([`run_single`]).
pub trait DistStage: clap::Args + Sized {
    /// The subcommand and pipeline stage kind (`"pt"`).
    const KIND: &'static str;
    /// What the stage reports (`PtResult`, ...).
    type Output;
    /// Device, compute type, output and resume flags.
    fn run_flags(&self) -> args::RunFlags<'_>;
    /// Run as one rank.
    fn run_dist<B: Backend>(
        &self,
        be: B,
        collective: &mut dyn Collective<B>,
        global_batch: Option<usize>,
        hooks: &mut dyn TrainHooks,
    ) -> Result<Self::Output>;
    /// Whether the stage ran to its last step, and its results
    /// (all_results.json; null on ranks other than 0).
    fn outcome(out: Self::Output) -> (bool, serde_json::Value);
}

/// `impl DistStage` for a stage module's `run_dist`. By default the run flags
/// are those of the stage's `training` arguments and the result reports
/// `summary.finished`; a stage with its own flags and result says how to
/// read each (`|args| ...`, `|result| ...`).
macro_rules! dist_stage {
    ($args:ty, $kind:literal, $module:ident, $output:ty) => {
        dist_stage!(
            $args,
            $kind,
            $module,
            $output,
            |a| a.training.run_flags(),
            |r| r.summary.finished
        );
    };
    ($args:ty, $kind:literal, $module:ident, $output:ty,
     |$a:ident| $flags:expr, |$r:ident| $finished:expr) => {
        impl DistStage for $args {
            const KIND: &'static str = $kind;
            type Output = $output;
            fn run_flags(&self) -> args::RunFlags<'_> {
                let $a = self;
                $flags
            }
            fn run_dist<B: Backend>(
                &self,
                be: B,
                collective: &mut dyn Collective<B>,
                global_batch: Option<usize>,
                hooks: &mut dyn TrainHooks,
            ) -> Result<$output> {
                $module::run_dist(be, self, collective, global_batch, hooks)
            }
            fn outcome($r: $output) -> (bool, serde_json::Value) {
                ($finished, $r.results)
            }
        }
    };
}

dist_stage!(pt::PtArgs, "pt", pt, pt::PtResult);
dist_stage!(sft::SftArgs, "sft", sft, sft::SftResult);
dist_stage!(rm::RmArgs, "rm", rm, rm::RmResult);
// DPO's own run flags: fp16 by default on CUDA, as MedicalGPT.
dist_stage!(
    dpo::DpoArgs,
    "dpo",
    dpo,
    dpo::DpoResult,
    |a| dpo::DpoArgs::run_flags(a),
    |r| r.summary.finished
);
dist_stage!(
    ppo::PpoArgs,
    "ppo",
    ppo,
    ppo::PpoResult,
    |a| ppo::PpoArgs::run_flags(a),
    |r| r.finished
);
dist_stage!(
    grpo::GrpoArgs,
    "grpo",
    grpo,
    grpo::GrpoResult,
    |a| grpo::GrpoArgs::run_flags(a),
    |r| r.finished
);

/// A training stage in one process (`rlhf pt`, `rlhf sft`, `rlhf rm`, ...), on
/// the device its `--device` asks for.
pub fn run_single<S: DistStage>(args: &S) -> Result<S::Output> {
    use crate::collective::Single;
    use crate::train::NoHooks;
    let dtype = args.run_flags().cuda_dtype()?;
    match args.run_flags().device {
        args::Device::Cpu => args.run_dist(rlhf_kernels::Cpu, &mut Single, None, &mut NoHooks),
        args::Device::Cuda(n) => {
            let be = rlhf_kernels::cuda::Cuda::new(n, dtype)?;
            tracing::info!(device = ?be, "CUDA backend ready");
            args.run_dist(be, &mut Single, None, &mut NoHooks)
        }
    }
}

/// The model a training stage starts from: `--model_name_or_path` with the
/// stage's head, LoRA or full per `--use_peft`, `--peft_path` loaded to
/// continue an adapter, gradient checkpointing as asked.
pub fn load_stage_model<B: Backend>(
    be: B,
    model_args: &args::ModelArgs,
    training: &args::TrainingArgs,
    head: crate::model::params::Head,
    tokenizer: &crate::tokenizer::Tokenizer,
    seed: u64,
) -> Result<Llama<B>> {
    let mode = model_args.train_mode()?;
    let mut model = crate::model::pretrained::load_model_with_head(
        be,
        &model_args.model_name_or_path,
        mode,
        head,
        seed,
    )?;
    if model.cfg.vocab_size < tokenizer.vocab_size() {
        tracing::warn!(
            "tokenizer has {} tokens but the model's vocab_size is {}; ids beyond it are errors",
            tokenizer.vocab_size(),
            model.cfg.vocab_size
        );
    }
    if let Some(p) = &model_args.peft_path {
        model.load_adapter(p)?;
        tracing::info!(adapter = %p.display(), "continuing from adapter");
    }
    model.gradient_checkpointing = training.gradient_checkpointing;
    Ok(model)
}

/// Set a model's trainable weights from a checkpoint/output dir written by
/// [`save_weights`].
pub fn load_checkpoint_weights<B: Backend>(model: &mut Llama<B>, dir: &Path) -> Result<()> {
    let file = match model.mode {
        TrainMode::Lora(_) => dir.join("adapter_model.safetensors"),
        TrainMode::Full => dir.join("model.safetensors"),
    };
    let files = TensorFiles::open_files(&[file])?;
    model
        .load_trainable(&files)
        .with_context(|| format!("loading weights from {}", dir.display()))
}

/// Write what a stage produces into `dir`: a PEFT adapter in LoRA mode, a
/// transformers model dir in full mode. Tokenizer files are copied beside it.
pub fn save_weights<B: Backend>(
    model: &Llama<B>,
    dir: &Path,
    base_model: &Path,
    tokenizer_dir: &Path,
) -> Result<()> {
    match model.mode {
        TrainMode::Lora(_) => model.save_adapter(dir, base_model.to_str())?,
        TrainMode::Full => {
            model.save_full_model(dir, crate::model::weights::SaveDtype::F32)?;
            copy_if_present(base_model, dir, &["generation_config.json"])?;
        }
    }
    copy_if_present(
        tokenizer_dir,
        dir,
        &[
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
            "tokenizer.model",
        ],
    )
}

/// Copy the named files that exist in `from` into `to`, atomically each.
fn copy_if_present(from: &Path, to: &Path, names: &[&str]) -> Result<()> {
    if from == to {
        return Ok(());
    }
    for name in names {
        let src = from.join(name);
        if src.exists() {
            let bytes =
                std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
            crate::fsutil::write_atomic(&to.join(name), &bytes)?;
        }
    }
    Ok(())
}
