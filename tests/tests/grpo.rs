//! `rlhf grpo`: a tiny model learns an answer that only the rule reward
//! teaches, and MedicalGPT's GRPO sample data runs.

use crate::rlhf;
use rlhf_tests::*;
use std::path::{Path, PathBuf};

/// Words of the "language" the tiny model is pre-trained on: mostly "no",
/// sometimes "yes". Greedy decoding says "no"; sampling says "yes" often
/// enough for the accuracy reward to have a signal.
fn yes_no_corpus(lines: usize) -> String {
    let mut state = 7u64;
    let mut out = String::new();
    for _ in 0..lines {
        let words: Vec<&str> = (0..8)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                match (state >> 33) % 20 {
                    0..=12 => "no",
                    13..=16 => "maybe",
                    _ => "yes",
                }
            })
            .collect();
        out.push_str(&words.join(" "));
        out.push('\n');
    }
    out
}

/// A tiny model pre-trained (full weights) on the yes/no corpus.
fn yes_no_model(ws: &Workspace) -> PathBuf {
    let corpus = ws.write("pt/train.txt", yes_no_corpus(400));
    let init = ws.path("init");
    rlhf().init_tiny_model(&corpus, &init);
    let pt = ws.path("pt-model");
    rlhf()
        .pt(&init, &ws.path("pt"), &pt)
        .opt("--use_peft", "false")
        .opt("--max_steps", "60")
        .opt("--per_device_train_batch_size", "8")
        .opt("--learning_rate", "1e-2")
        .opt("--save_steps", "1000")
        .opt("--logging_steps", "100")
        .ok();
    pt
}

fn grpo(model: &Path, data: &Path, out: &Path) -> Cmd {
    rlhf()
        .cmd("grpo")
        .opt("--model_name_or_path", model)
        .opt("--train_file_dir", data)
        .opt("--output_dir", out)
        .opt("--reward_funcs", "accuracy")
        .opt("--num_generations", "8")
        .opt("--per_device_train_batch_size", "32")
        .opt("--max_completion_length", "4")
        .opt("--max_prompt_length", "100")
        .opt("--learning_rate", "1e-2")
        .opt("--lora_dropout", "0")
        .opt("--logging_steps", "1")
        .opt("--save_steps", "100")
}

#[test]
fn grpo_raises_the_accuracy_reward_of_a_tiny_model() {
    let ws = Workspace::new();
    let model = yes_no_model(&ws);
    let qa = |from: usize, to: usize| -> String {
        (from..to)
            .map(|k| format!("{{\"question\": \"Question {k}: yes or no?\", \"answer\": \"yes\"}}\n"))
            .collect()
    };
    ws.write("grpo/train/qa.jsonl", qa(0, 40));
    ws.write("grpo/valid/qa.jsonl", qa(100, 108));
    let out = ws.path("out");
    let printed = grpo(&model, &ws.path("grpo/train"), &out)
        .opt("--validation_file_dir", ws.path("grpo/valid"))
        .opt("--max_steps", "12")
        .opt("--beta", "0.04")
        .ok()
        .json();
    let results = read_json(&out.join("all_results.json"));
    assert_eq!(printed["global_step"], 12);
    assert_eq!(results["prompts_per_step"], 4);
    assert_eq!(results["completions_per_step"], 32);
    let before = num(&results["initial_eval"], "reward");
    let after = num(&results["eval"], "reward");
    assert!(after > before, "greedy reward {before} → {after}\n{results}");
    let metrics = read_jsonl(&out.join("metrics.jsonl"));
    let rewards: Vec<f64> = metrics.iter().map(|m| num(m, "reward")).collect();
    assert_eq!(rewards.len(), 12);
    let first: f64 = rewards[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = rewards[9..].iter().sum::<f64>() / 3.0;
    assert!(last > first, "sampled reward should rise: {rewards:?}");
    for m in &metrics {
        for key in [
            "loss",
            "reward_std",
            "rewards/accuracy/mean",
            "frac_reward_zero_std",
            "kl",
            "completions/mean_length",
            "clip_ratio/region_mean",
        ] {
            assert!(m[key].is_number(), "{key} missing in {m}");
        }
        // num_iterations 1: the ratio is 1, nothing is clipped.
        assert_eq!(num(m, "clip_ratio/region_mean"), 0.0);
    }
    assert!(out.join("adapter_model.safetensors").exists());
    assert!(out.join("checkpoint-12").join("optimizer.safetensors").exists());
}

#[test]
fn medicalgpt_grpo_sample_data_runs_a_step() {
    let ws = Workspace::new();
    let model = ws.path("model");
    rlhf().init_tiny_model(&crate::medicalgpt_pretrain(), &model);
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/medicalgpt/grpo");
    let out = ws.path("out");
    let printed = grpo(&model, &data, &out)
        .opt("--reward_funcs", "accuracy,format")
        .opt("--num_generations", "4")
        .opt("--per_device_train_batch_size", "8")
        .opt("--max_steps", "1")
        .ok()
        .json();
    assert_eq!(printed["global_step"], 1);
    assert_eq!(printed["finished"], true);
    // 32 records, the first 10% (4) held out; long prompts are left out and counted.
    let kept = num(&printed, "train_prompts") + num(&printed, "eval_prompts");
    assert_eq!(kept + num(&printed, "filtered_too_long"), 32.0, "{printed}");
    let metrics = read_jsonl(&out.join("metrics.jsonl"));
    assert_eq!(metrics.len(), 1);
    assert!(metrics[0]["rewards/format/mean"].is_number());
}
