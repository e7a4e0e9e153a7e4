//! `rlhf grpo`: a tiny model learns an answer that only the rule reward
//! teaches, and MedicalGPT's GRPO sample data runs.

use crate::rlhf;
use rlhf_tests::*;
use std::path::{Path, PathBuf};

/// Documents of the "language" the tiny model is pre-trained on: lines of
/// "no" (55%), "yes" (25%) and "maybe" (20%). Greedy decoding says "no";
/// sampling says "yes" often enough for the accuracy reward to have a signal.
fn yes_no_corpus(docs: usize) -> String {
    let mut state = 7u64;
    let mut word = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        match (state >> 33) % 20 {
            0..=10 => "no",
            11..=15 => "yes",
            _ => "maybe",
        }
    };
    let mut out = String::new();
    for _ in 0..docs {
        // Several lines per document: the model learns that words follow a newline,
        // as they must after the chat template's "assistant\n".
        let lines: Vec<String> = (0..4)
            .map(|_| (0..8).map(|_| word()).collect::<Vec<_>>().join(" "))
            .collect();
        out.push_str(&serde_json::json!({ "text": lines.join("\n") }).to_string());
        out.push('\n');
    }
    out
}

/// A tiny model pre-trained (full weights) on the yes/no corpus.
fn yes_no_model(ws: &Workspace) -> PathBuf {
    let corpus = ws.write("pt/train.jsonl", yes_no_corpus(100));
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
        .opt("--max_completion_length", "3")
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
            .map(|k| {
                format!("{{\"question\": \"Question {k}: yes or no?\", \"answer\": \"yes\"}}\n")
            })
            .collect()
    };
    ws.write("grpo/train/qa.jsonl", qa(0, 40));
    ws.write("grpo/valid/qa.jsonl", qa(100, 108));
    let out = ws.path("out");
    // Full fine-tuning with TRL's default beta 0 (no reference model); the
    // LoRA + reference path is the resume test's.
    let printed = grpo(&model, &ws.path("grpo/train"), &out)
        .opt("--validation_file_dir", ws.path("grpo/valid"))
        .opt("--use_peft", "false")
        .opt("--learning_rate", "5e-3")
        .opt("--max_steps", "16")
        .ok()
        .json();
    let results = read_json(&out.join("all_results.json"));
    assert_eq!(printed["global_step"], 16);
    assert_eq!(results["prompts_per_step"], 4);
    assert_eq!(results["completions_per_step"], 32);
    // Greedy "no no no" before: no held-out prompt is answered.
    let before = num(&results["initial_eval"], "reward");
    let after = num(&results["eval"], "reward");
    assert_eq!(before, 0.0, "{results}");
    assert!(after > 0.5, "greedy reward {before} → {after}\n{results}");
    let metrics = read_jsonl(&out.join("metrics.jsonl"));
    let rewards: Vec<f64> = metrics.iter().map(|m| num(m, "reward")).collect();
    assert_eq!(rewards.len(), 16);
    let first: f64 = rewards[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = rewards[12..].iter().sum::<f64>() / 4.0;
    assert!(last > first, "sampled reward should rise: {rewards:?}");
    for m in &metrics {
        for key in [
            "loss",
            "grad_norm",
            "reward_std",
            "rewards/accuracy/mean",
            "rewards/accuracy/std",
            "frac_reward_zero_std",
            "completions/mean_length",
            "completions/clipped_ratio",
            "clip_ratio/region_mean",
        ] {
            assert!(m[key].is_number(), "{key} missing in {m}");
        }
        // beta 0: no reference, no KL.
        assert!(m.get("kl").is_none(), "{m}");
        // num_iterations 1: the ratio is 1, nothing is clipped.
        assert_eq!(num(m, "clip_ratio/region_mean"), 0.0);
    }
    assert!(out.join("model.safetensors").exists());
    assert!(out
        .join("checkpoint-16")
        .join("optimizer.safetensors")
        .exists());
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

#[test]
fn an_interrupted_grpo_run_resumes_exactly() {
    let ws = Workspace::new();
    let model = yes_no_model(&ws);
    let qa: String = (0..16)
        .map(|k| format!("{{\"question\": \"Question {k}: yes or no?\", \"answer\": \"yes\"}}\n"))
        .collect();
    ws.write("grpo/qa.jsonl", qa);
    let data = ws.path("grpo");
    let run = |out: &Path| {
        grpo(&model, &data, out)
            .opt("--validation_split_percentage", "0")
            .opt("--per_device_train_batch_size", "16")
            .opt("--save_steps", "2")
            .opt("--beta", "0.04")
            .opt("--lora_dropout", "0.1")
            .opt("--num_iterations", "2")
    };
    let whole = ws.path("whole");
    run(&whole).opt("--max_steps", "8").ok();
    let parts = ws.path("parts");
    run(&parts)
        .opt("--max_steps", "8")
        .opt("--stop_after_steps", "2")
        .ok();
    assert!(parts.join("checkpoint-2").exists());
    assert!(!parts.join("checkpoint-4").exists());
    run(&parts)
        .opt("--max_steps", "8")
        .opt("--resume_from_checkpoint", "true")
        .ok();
    let a = std::fs::read(whole.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(parts.join("adapter_model.safetensors")).unwrap();
    assert!(
        a == b,
        "the resumed run's adapter differs from the uninterrupted one"
    );
    let rewards = |dir: &Path| -> Vec<(f64, f64)> {
        read_jsonl(&dir.join("metrics.jsonl"))
            .iter()
            .map(|m| (num(m, "reward"), num(m, "kl")))
            .collect()
    };
    assert_eq!(rewards(&whole), rewards(&parts));
    assert_eq!(rewards(&whole).len(), 4);
}

/// A pipeline of one GRPO stage planned for two workers (global batch 32
/// completions: 4 prompts × 8).
fn grpo_pipeline(ws: &Workspace, name: &str) -> PathBuf {
    let text = format!(
        r#"[cluster]
workers = 2
heartbeat_interval_ms = 200
heartbeat_timeout_ms = 2000
state_dir = "{name}/.coordinator"

[[stage]]
name = "grpo"
kind = "grpo"
model_name_or_path = "pt-model"
train_file_dir = "grpo/qa.jsonl"
validation_split_percentage = 0
output_dir = "{name}/grpo"
reward_funcs = ["accuracy"]
num_generations = 8
per_device_train_batch_size = 16
max_completion_length = 3
max_prompt_length = 100
learning_rate = 1e-2
lora_dropout = 0.0
beta = 0.04
max_steps = 3
logging_steps = 1
save_steps = 100
"#
    );
    ws.write(&format!("{name}.toml"), text)
}

fn rlhf_run(ws: &Workspace, file: &Path, extra: &[&str]) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .current_dir(ws.path(""))
        .arg("run")
        .arg(file)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rlhf run failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_grpo_stage_trains_the_same_on_two_workers_as_on_one() {
    let ws = Workspace::new();
    yes_no_model(&ws);
    let qa: String = (0..16)
        .map(|k| format!("{{\"question\": \"Question {k}: yes or no?\", \"answer\": \"yes\"}}\n"))
        .collect();
    ws.write("grpo/qa.jsonl", qa);
    let two = grpo_pipeline(&ws, "two");
    let one = grpo_pipeline(&ws, "one");
    rlhf_run(&ws, &two, &[]);
    // The same global batch in one process.
    rlhf_run(&ws, &one, &["--workers", "1"]);
    let metrics = |run: &str| -> Vec<(f64, f64)> {
        read_jsonl(&ws.path(&format!("{run}/grpo/metrics.jsonl")))
            .iter()
            .map(|m| (num(m, "reward"), num(m, "completions/mean_length")))
            .collect()
    };
    // Every completion is seeded by its position in the step, not by the
    // rank that samples it: the same rewards whichever rank holds a group.
    assert_eq!(metrics("two"), metrics("one"));
    assert_eq!(metrics("two").len(), 3);
    let adapter = |run: &str| {
        let path = ws.path(&format!("{run}/grpo/adapter_model.safetensors"));
        read_safetensors(&path)
    };
    let (a, b) = (adapter("two"), adapter("one"));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, x) in &a {
        let y = &b[name];
        let (mut d, mut n) = (0f64, 0f64);
        for (p, q) in x.f32s().iter().zip(y.f32s()) {
            d += ((p - q) as f64).powi(2);
            n += (q as f64).powi(2);
        }
        // The gradient sums differ in order only (two ranks' all-reduce vs
        // one rank's micro-batches); Adam's first steps magnify that a little.
        assert!(d.sqrt() <= 1e-3 * n.sqrt().max(1e-12), "{name}: {d} vs {n}");
    }
}

#[test]
fn a_reward_model_on_the_policys_base_is_one_more_reward_function() {
    let ws = Workspace::new();
    let model = yes_no_model(&ws);
    let pairs: String = (0..16)
        .map(|k| format!("{{\"question\": \"Question {k}: yes or no?\", \"response_chosen\": \"yes\", \"response_rejected\": \"no\"}}\n"))
        .collect();
    ws.write("pairs/train/p.jsonl", &pairs);
    let valid: String = pairs.lines().take(4).map(|l| format!("{l}\n")).collect();
    ws.write("pairs/valid/p.jsonl", valid);
    let rm = ws.path("rm");
    rlhf()
        .cmd("rm")
        .opt("--model_name_or_path", &model)
        .opt("--train_file_dir", ws.path("pairs/train"))
        .opt("--validation_file_dir", ws.path("pairs/valid"))
        .opt("--output_dir", &rm)
        .opt("--per_device_train_batch_size", "4")
        .opt("--max_steps", "4")
        .opt("--save_steps", "100")
        .ok();
    let qa: String = (0..8)
        .map(|k| format!("{{\"question\": \"Question {k}: yes or no?\", \"answer\": \"yes\"}}\n"))
        .collect();
    ws.write("grpo/qa.jsonl", qa);
    let out = ws.path("out");
    let printed = grpo(&model, &ws.path("grpo"), &out)
        .opt("--reward_model_name_or_path", &rm)
        .opt("--reward_weights", "1,0.5")
        .opt("--per_device_train_batch_size", "16")
        .opt("--max_steps", "2")
        .opt("--validation_split_percentage", "25")
        .ok()
        .json();
    assert_eq!(
        printed["reward_funcs"],
        serde_json::json!(["accuracy", "reward_model"])
    );
    assert!(
        printed["reward_model"].as_str().unwrap().contains("shared"),
        "{printed}"
    );
    let metrics = read_jsonl(&out.join("metrics.jsonl"));
    assert_eq!(metrics.len(), 2);
    for m in &metrics {
        let (acc, rm) = (
            num(m, "rewards/accuracy/mean"),
            num(m, "rewards/reward_model/mean"),
        );
        // The total is the weighted sum of the functions' rewards.
        assert!((num(m, "reward") - (acc + 0.5 * rm)).abs() < 1e-4, "{m}");
    }
    let eval = &printed["eval"]["rewards"];
    assert!(eval["reward_model"].is_number(), "{printed}");
    // A wrong number of weights is an error that names both counts.
    grpo(&model, &ws.path("grpo"), &ws.path("bad"))
        .opt("--reward_model_name_or_path", &rm)
        .opt("--reward_weights", "1")
        .opt("--max_steps", "1")
        .fails()
        .assert_stderr_has(&["--reward_weights has 1 values for 2 reward functions"]);
}
