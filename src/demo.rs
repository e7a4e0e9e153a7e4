//! `rlhf demo`: the README's main job, offline from a fresh clone. It writes a
//! corpus about a fictional pharmacopoeia, makes a small random Llama with a
//! BPE tokenizer trained on it, runs `rlhf pt` on it, and prints the held-out
//! perplexity before and after.

use anyhow::Result;
use clap::Args;
use rlhf_worker::demo::write_demo_assets;
use rlhf_worker::stages::pt::{PtArgs, PtDataFlags};
use rlhf_worker::stages::{args::ModelArgs, args::TrainingArgs};
use std::path::PathBuf;

#[derive(Args, Clone, Debug)]
pub struct DemoArgs {
    /// Where the data, the base model and the trained output go.
    #[arg(long = "output_dir", default_value = "out/demo")]
    pub output_dir: PathBuf,
    /// Passes over the demo corpus.
    #[arg(long = "num_train_epochs", default_value_t = 10.0)]
    pub num_train_epochs: f64,
    #[arg(long = "train_docs", default_value_t = 3000)]
    pub train_docs: usize,
    #[arg(long = "seed", default_value_t = 42)]
    pub seed: u64,
}

pub fn run(a: &DemoArgs) -> Result<()> {
    let assets = write_demo_assets(&a.output_dir, a.seed, a.train_docs)?;
    let (data, base) = (assets.data, assets.base_model);
    let out = a.output_dir.join("pt");
    let pt = PtArgs {
        model: ModelArgs {
            model_name_or_path: base.clone(),
            tokenizer_name_or_path: None,
            torch_dtype: None,
            // A randomly initialised model learns the domain fastest with every weight trained.
            use_peft: false,
            target_modules: "all".into(),
            lora_rank: 8,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            modules_to_save: None,
            peft_path: None,
        },
        data: PtDataFlags {
            train_file_dir: data.join("train"),
            validation_file_dir: Some(data.join("valid")),
            block_size: 128,
            validation_split_percentage: 1,
            max_train_samples: None,
            max_eval_samples: None,
            keep_linebreaks: true,
        },
        training: demo_training(&out, a),
    };
    let r = rlhf_worker::stages::run_single(&pt)?;
    let before = r.initial_eval.map(|e| e.perplexity).unwrap_or(f64::NAN);
    let after = r.summary.eval.map(|e| e.perplexity).unwrap_or(f64::NAN);
    println!(
        "demo PT on a fictional pharmacopoeia ({} train blocks of 128 tokens, {} held-out)",
        r.train_blocks, r.eval_blocks
    );
    println!("  held-out perplexity before: {before:10.2}");
    println!(
        "  held-out perplexity after:  {after:10.2}   ({} steps, {:.0} tokens/s)",
        r.summary.global_step, r.summary.tokens_per_sec
    );
    println!("  model: {}   output: {}", base.display(), out.display());
    // Written so that a NaN perplexity also fails.
    if after.partial_cmp(&before) != Some(std::cmp::Ordering::Less) {
        anyhow::bail!("held-out perplexity did not fall ({before} -> {after})");
    }
    Ok(())
}

fn demo_training(out: &std::path::Path, a: &DemoArgs) -> TrainingArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        t: TrainingArgs,
    }
    // Start from the CLI defaults, so the demo uses exactly what `rlhf pt` would.
    let mut t = P::parse_from([
        "demo",
        "--output_dir",
        out.to_str().unwrap_or("out/demo/pt"),
    ])
    .t;
    t.per_device_train_batch_size = 8;
    t.per_device_eval_batch_size = 8;
    t.learning_rate = 2e-3;
    t.warmup_ratio = 0.05;
    t.lr_scheduler_type = "cosine".into();
    t.num_train_epochs = a.num_train_epochs;
    t.logging_steps = 10;
    t.save_steps = 100;
    t.save_total_limit = Some(1);
    t.weight_decay = 0.01;
    t.seed = a.seed;
    t
}
