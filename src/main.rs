//! `rlhf`: the command line. Each stage takes MedicalGPT's argument names
//! (snake_case) and defaults.

mod bench;
mod bench_allreduce;
mod bench_cuda;
mod bench_generate;
mod demo;
mod launch;
mod run;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use rlhf_worker::init_model::{init_model, InitModelArgs};
use rlhf_worker::stages;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "rlhf", version, about = "LLM training pipeline: PT, SFT, RM, RLHF — LoRA or full fine-tuning", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Continued pre-training on .txt/.json/.jsonl text (MedicalGPT pretraining.py).
    Pt(stages::pt::PtArgs),
    /// Supervised fine-tuning on ShareGPT/Alpaca conversations (MedicalGPT supervised_finetuning.py).
    Sft(stages::sft::SftArgs),
    /// Reward modelling on preference pairs: a scalar score head, pairwise loss (MedicalGPT reward_modeling.py).
    Rm(stages::rm::RmArgs),
    /// Direct Preference Optimization on preference pairs: LoRA policy, reference = adapter off, TRL's sigmoid loss (MedicalGPT dpo_training.py).
    Dpo(stages::dpo::DpoArgs),
    /// PPO from a reward model: policy LoRA + value head, reference and reward model on one shared base (MedicalGPT ppo_training.py).
    Ppo(stages::ppo::PpoArgs),
    /// GRPO: G sampled completions per prompt, group-relative advantages from rule rewards (accuracy, format) and/or a reward model (MedicalGPT grpo_training.py, TRL GRPOTrainer).
    Grpo(stages::grpo::GrpoArgs),
    /// Loss and perplexity of a model (+ adapter) on a text file, as JSON.
    Eval(stages::eval::EvalArgs),
    /// Merge a PEFT LoRA adapter into its base model: a plain HF model dir (MedicalGPT merge_peft_adapter.py).
    Merge(rlhf_worker::merge::MergeArgs),
    /// Completions for a file of prompts (KV cache; greedy or sampled), as JSON lines.
    Generate(stages::generate::GenerateArgs),
    /// Talk to a model (+ adapter) in the terminal: chat template, streamed replies, multi-turn history.
    Chat(stages::chat::ChatArgs),
    /// Make a small random Llama model dir with a BPE tokenizer trained on a corpus.
    #[command(name = "init-model")]
    InitModel(InitModelCli),
    /// The demo: a fictional medical domain, a small model, PT, held-out perplexity before and after.
    Demo(demo::DemoArgs),
    /// Training throughput (tokens/s, model FLOP/s, peak memory) of LoRA and full fine-tuning on built-in model shapes.
    Bench(bench::BenchArgs),
    /// Ring all-reduce between worker processes on loopback vs plain TCP baselines (algorithm and bus bandwidth).
    #[command(name = "bench-allreduce")]
    BenchAllreduce(bench_allreduce::BenchAllreduceArgs),
    /// Start `rlhf worker`s over ssh on the hosts of a DeepSpeed-style hostfile (`host slots=N`).
    Launch(launch::LaunchArgs),
    /// Run a pipeline (TOML) end to end: a local coordinator and N worker processes on loopback.
    Run(run::RunArgs),
    /// One worker: registers with a coordinator and runs the stages it is given.
    Worker(rlhf_worker::agent::WorkerArgs),
    /// Drive a pipeline file's stages on the workers that register (gRPC; journal for restarts).
    Coordinator(rlhf_coordinator::CoordinatorArgs),
    /// What a running coordinator does: stage, step, loss, tokens/s, ETA, workers.
    Status(rlhf_coordinator::StatusArgs),
}

#[derive(Args)]
struct InitModelCli {
    /// Text file(s) to train the tokenizer on (one document per line).
    #[arg(long = "corpus", required = true, num_args = 1..)]
    corpus: Vec<PathBuf>,
    #[arg(long = "output_dir")]
    output_dir: PathBuf,
    #[arg(long = "vocab_size", default_value_t = 4096)]
    vocab_size: usize,
    #[arg(long = "hidden_size", default_value_t = 256)]
    hidden_size: usize,
    #[arg(long = "intermediate_size", default_value_t = 688)]
    intermediate_size: usize,
    #[arg(long = "num_hidden_layers", default_value_t = 4)]
    num_hidden_layers: usize,
    #[arg(long = "num_attention_heads", default_value_t = 4)]
    num_attention_heads: usize,
    #[arg(long = "num_key_value_heads", default_value_t = 2)]
    num_key_value_heads: usize,
    #[arg(long = "max_position_embeddings", default_value_t = 512)]
    max_position_embeddings: usize,
    #[arg(long = "rope_theta", default_value_t = 10000.0)]
    rope_theta: f64,
    #[arg(long = "tie_word_embeddings", default_value = "false", value_parser = stages::args::parse_bool, num_args = 0..=1, default_missing_value = "true")]
    tie_word_embeddings: bool,
    #[arg(long = "seed", default_value_t = 42)]
    seed: u64,
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Pt(args) => {
            let r = stages::run_single(&args)?;
            let mut out = serde_json::json!({
                "global_step": r.summary.global_step,
                "train_loss": r.summary.train_loss,
                "train_blocks": r.train_blocks,
                "eval_blocks": r.eval_blocks,
                "tokens_per_sec": r.summary.tokens_per_sec,
                "output_dir": args.training.output_dir,
            });
            if let Some(e) = r.initial_eval {
                out["initial_eval_loss"] = e.loss.into();
                out["initial_perplexity"] = e.perplexity.into();
            }
            if let Some(e) = r.summary.eval {
                out["eval_loss"] = e.loss.into();
                out["perplexity"] = e.perplexity.into();
            }
            println!("{out}");
        }
        Command::Sft(args) => {
            let r = stages::run_single(&args)?;
            let mut out = serde_json::json!({
                "global_step": r.summary.global_step,
                "train_loss": r.summary.train_loss,
                "train_samples": r.train_samples,
                "eval_samples": r.eval_samples,
                "template": r.template,
                "skipped_invalid": r.skipped_invalid,
                "dropped_all_labels_ignored": r.all_labels_ignored,
                "tokens_per_sec": r.summary.tokens_per_sec,
                "output_dir": args.training.output_dir,
            });
            if let Some(e) = r.initial_eval {
                out["initial_eval_loss"] = e.loss.into();
                out["initial_perplexity"] = e.perplexity.into();
            }
            if let Some(e) = r.summary.eval {
                out["eval_loss"] = e.loss.into();
                out["perplexity"] = e.perplexity.into();
            }
            println!("{out}");
        }
        Command::Rm(args) => {
            let r = stages::run_single(&args)?;
            let mut out = serde_json::json!({
                "global_step": r.summary.global_step,
                "train_loss": r.summary.train_loss,
                "train_pairs": r.train_pairs,
                "eval_pairs": r.eval_pairs,
                "skipped_invalid": r.skipped_invalid,
                "filtered_too_long": r.too_long,
                "tokens_per_sec": r.summary.tokens_per_sec,
                "output_dir": args.training.output_dir,
            });
            if let Some(e) = r.initial_eval {
                out["initial_eval_loss"] = e.loss.into();
                out["initial_eval_accuracy"] = e.accuracy.into();
            }
            if let Some(e) = r.summary.eval {
                out["eval_loss"] = e.loss.into();
                out["eval_accuracy"] = e.accuracy.into();
                out["eval_mean_margin"] = e.mean_margin.into();
            }
            println!("{out}");
        }
        Command::Dpo(args) => {
            let r = stages::run_single(&args)?;
            let mut out = r.results;
            out["output_dir"] = serde_json::json!(args.training.output_dir);
            println!("{out}");
        }
        Command::Ppo(args) => {
            let r = stages::run_single(&args)?;
            let mut out = r.results;
            out["output_dir"] = serde_json::json!(args.ppo.output_dir);
            out["finished"] = r.finished.into();
            out["global_step"] = r.steps.into();
            println!("{out}");
        }
        Command::Grpo(args) => {
            let r = stages::run_single(&args)?;
            let mut out = r.results;
            out["output_dir"] = serde_json::json!(args.grpo.output_dir);
            out["finished"] = r.finished.into();
            out["global_step"] = r.steps.into();
            println!("{out}");
        }
        Command::Eval(args) => println!("{}", stages::eval::run(&args)?),
        Command::Merge(args) => println!(
            "{}",
            serde_json::to_string(&rlhf_worker::merge::run(&args)?)?
        ),
        Command::Chat(args) => stages::chat::run(&args)?,
        Command::Generate(args) => {
            let r = stages::generate::run(&args)?;
            let t = r.timings;
            println!(
                "{}",
                serde_json::json!({
                    "prompts": r.prompts,
                    "generated_tokens": r.generated_tokens,
                    "prefill_tokens_per_sec": stages::generate::per_s(t.prefill_tokens, t.prefill_s),
                    "decode_tokens_per_sec": stages::generate::per_s(t.decode_tokens, t.decode_s),
                    "output_file": args.output_file,
                })
            );
        }
        Command::InitModel(a) => {
            let args = InitModelArgs {
                vocab_size: a.vocab_size,
                hidden_size: a.hidden_size,
                intermediate_size: a.intermediate_size,
                num_hidden_layers: a.num_hidden_layers,
                num_attention_heads: a.num_attention_heads,
                num_key_value_heads: a.num_key_value_heads,
                max_position_embeddings: a.max_position_embeddings,
                rope_theta: a.rope_theta,
                tie_word_embeddings: a.tie_word_embeddings,
                seed: a.seed,
                ..InitModelArgs::default()
            };
            init_model(&a.corpus, &a.output_dir, &args)?;
            println!("{}", serde_json::json!({ "output_dir": a.output_dir }));
        }
        Command::Demo(args) => demo::run(&args)?,
        Command::Bench(args) => bench::run(&args)?,
        Command::BenchAllreduce(args) => bench_allreduce::run(&args)?,
        Command::Launch(args) => launch::run(&args)?,
        Command::Run(args) => run::run(&args)?,
        Command::Worker(args) => rlhf_worker::agent::run_worker(&args)?,
        Command::Coordinator(args) => rlhf_coordinator::run_coordinator(&args)?,
        Command::Status(args) => rlhf_coordinator::run_status(&args)?,
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: logs in files stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
