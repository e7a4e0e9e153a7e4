//! `rlhf sft`: LoRA SFT on MedicalGPT's sample conversations, the legacy
//! Alpaca file, and bad data.

use crate::{medicalgpt_pretrain, rlhf};
use rlhf_tests::*;
use std::path::{Path, PathBuf};

/// MedicalGPT's sample data folder (`shared/data/medicalgpt`).
fn medicalgpt_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/medicalgpt")
}

/// The first `n` lines of a MedicalGPT data file.
fn head(rel: &str, n: usize) -> String {
    let text = std::fs::read_to_string(medicalgpt_data().join(rel)).unwrap();
    text.lines().take(n).map(|l| format!("{l}\n")).collect()
}

/// A tiny model whose tokenizer (ChatML template, EOS <|endoftext|>) was
/// trained on the MedicalGPT PT sample.
fn tiny_model(ws: &Workspace) -> PathBuf {
    let model = ws.path("model");
    rlhf().init_tiny_model(&medicalgpt_pretrain(), &model);
    model
}

fn sft(model: &Path, data: &Path, out: &Path) -> Cmd {
    rlhf()
        .cmd("sft")
        .opt("--model_name_or_path", model)
        .opt("--train_file_dir", data)
        .opt("--output_dir", out)
        .opt("--model_max_length", "128")
        .opt("--max_steps", "12")
        .opt("--per_device_train_batch_size", "4")
        .opt("--learning_rate", "5e-3")
        .opt("--logging_steps", "1")
        .opt("--save_steps", "100")
        .opt("--validation_split_percentage", "10")
}

#[test]
fn lora_sft_on_sharegpt_data_learns_and_writes_an_adapter() {
    let ws = Workspace::new();
    let model = tiny_model(&ws);
    ws.write(
        "data/medical.jsonl",
        head("sft/medical_sft_1K_format.jsonl", 40),
    );
    ws.write(
        "data/sub/multi.jsonl",
        head("sft/sharegpt_zh_1K_format.jsonl", 10),
    );
    let out = ws.path("out");
    let printed = sft(&model, &ws.path("data"), &out).ok().json();

    let results = read_json(&out.join("all_results.json"));
    assert_eq!(results["global_step"], 12);
    assert_eq!(results["template"], "chat_template");
    assert_eq!(results["model_max_length"], 128);
    // 50 conversations: the first 10% (5) are validation.
    assert_eq!(results["train_conversations"], 45);
    assert_eq!(results["eval_conversations"], 5);
    assert_eq!(num(&results, "train_samples"), 45.0);
    assert_eq!(results["skipped_invalid"], serde_json::json!({}));
    assert!(
        num(&results, "eval_loss") < num(&results, "initial_eval_loss"),
        "{results}"
    );
    assert_eq!(printed["train_samples"], results["train_samples"]);

    let metrics = read_jsonl(&out.join("metrics.jsonl"));
    let losses: Vec<f64> = train_lines(&metrics)
        .iter()
        .map(|m| num(m, "loss"))
        .collect();
    assert_eq!(losses.len(), 12);
    let first: f64 = losses[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = losses[9..].iter().sum::<f64>() / 3.0;
    assert!(last < first, "training loss should fall: {losses:?}");

    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
    assert!(out.join("adapter_model.safetensors").is_file());
    assert!(out.join("tokenizer.json").is_file());
    assert_eq!(temp_files(&out), Vec::<String>::new());
}

#[test]
fn named_template_and_legacy_alpaca_file() {
    let ws = Workspace::new();
    let model = tiny_model(&ws);
    // JSON lines despite the .json extension, as in the 2023 MedicalGPT data.
    ws.write(
        "alpaca/Belle_open_source_1k.json",
        head("legacy_2023/finetune/Belle_open_source_1k.json", 30),
    );
    let out = ws.path("out");
    sft(&model, &ws.path("alpaca"), &out)
        .opt("--template_name", "vicuna")
        .opt("--max_steps", "2")
        .opt("--validation_split_percentage", "0")
        .ok();
    let results = read_json(&out.join("all_results.json"));
    assert_eq!(results["template"], "vicuna");
    assert_eq!(results["train_conversations"], 30);
    assert_eq!(results["eval_conversations"], 0);
}

#[test]
fn bad_records_name_file_and_line_unless_skipped() {
    let ws = Workspace::new();
    let model = tiny_model(&ws);
    let good = head("sft/medical_sft_1K_format.jsonl", 8);
    let bad = format!(
        "{good}{}\n{}\n",
        r#"{"conversations":[{"from":"gpt","value":"answer first"},{"from":"human","value":"q"}]}"#,
        r#"{"conversations":[{"from":"robot","value":"q"}]}"#
    );
    ws.write("data/train.jsonl", bad);
    let out = ws.path("out");
    let r = sft(&model, &ws.path("data"), &out).fails();
    r.assert_stderr_has(&[
        "train.jsonl:9",
        "conversations[0].from",
        "expected a user turn first",
        "--skip_invalid",
    ]);
    assert!(!out.join("all_results.json").exists());

    sft(&model, &ws.path("data"), &out)
        .opt("--skip_invalid", "True")
        .opt("--max_steps", "1")
        .opt("--validation_split_percentage", "0")
        .ok();
    let results = read_json(&out.join("all_results.json"));
    assert_eq!(
        results["skipped_invalid"],
        serde_json::json!({"assistant_first": 1, "unknown_role": 1})
    );
    assert_eq!(results["train_conversations"], 8);
}

#[test]
fn bad_arguments_are_errors() {
    let ws = Workspace::new();
    let model = tiny_model(&ws);
    ws.write(
        "data/train.jsonl",
        head("sft/medical_sft_1K_format.jsonl", 4),
    );
    let out = ws.path("out");
    sft(&model, &ws.path("data"), &out)
        .opt("--template_name", "nope")
        .fails()
        .assert_stderr_has(&["nope", "vicuna", "qwen3_5"]);
    sft(&model, &ws.path("data"), &out)
        .opt("--model_max_length", "32")
        .fails()
        .assert_stderr_has(&["model_max_length", "60"]);
}
