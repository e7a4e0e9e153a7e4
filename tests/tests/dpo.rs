//! `rlhf dpo`: Direct Preference Optimization end to end on the RM tests'
//! pairs (a helpful answer preferred to an unhelpful one) — the policy
//! starts equal to its reference (rewards 0), learns to prefer the chosen
//! answers of held-out pairs, logs TRL's metrics and saves a PEFT adapter.

use crate::rlhf;
use crate::rm::{pairs, rm_setup, RmSetup};
use rlhf_tests::*;
use std::path::Path;

/// `rlhf dpo` with small, fast settings: 32 steps of 4 pairs, no warmup,
/// LoRA on every linear, a metrics line every 4 steps.
fn dpo(s: &RmSetup, out: &Path) -> Cmd {
    rlhf()
        .cmd("dpo")
        .opt("--model_name_or_path", &s.model)
        .opt("--train_file_dir", &s.train)
        .opt("--validation_file_dir", &s.valid)
        .opt("--output_dir", out)
        .opt("--per_device_train_batch_size", "4")
        .opt("--per_device_eval_batch_size", "4")
        .opt("--gradient_accumulation_steps", "1")
        .opt("--target_modules", "all")
        .opt("--learning_rate", "5e-3")
        .opt("--warmup_steps", "0")
        .opt("--max_steps", "32")
        .opt("--logging_steps", "4")
}

#[test]
fn lora_dpo_learns_the_preference_against_its_reference_and_saves_an_adapter() {
    let s = rm_setup();
    let out = s.ws.path("out");
    let printed = dpo(&s, &out).ok().json();
    let r = read_json(&out.join("all_results.json"));
    assert_eq!(num(&r, "train_samples"), 48.0);
    assert_eq!(num(&r, "eval_samples"), 8.0);
    assert_eq!(num(&r, "global_step"), 32.0);
    // Before training the adapter is zero (LoRA B = 0): the policy is its
    // reference, every reward is 0, no pair is won, the loss is ln 2.
    assert_eq!(num(&r, "initial_eval_rewards/margins"), 0.0, "{r}");
    assert_eq!(num(&r, "initial_eval_rewards/accuracies"), 0.0, "{r}");
    assert!((num(&r, "initial_eval_loss") - std::f64::consts::LN_2).abs() < 1e-6);
    // After: held-out pairs are won, by a clear margin, at a lower loss.
    let acc = num(&r, "eval_rewards/accuracies");
    let margin = num(&r, "eval_rewards/margins");
    assert!(acc >= 0.875, "accuracy {acc}: {r}");
    assert!(margin > 0.5, "margin {margin}: {r}");
    assert!(num(&r, "eval_loss") < 0.5 * std::f64::consts::LN_2, "{r}");
    assert!(num(&r, "eval_rewards/chosen") > num(&r, "eval_rewards/rejected"));
    assert_eq!(num(&printed, "eval_rewards/accuracies"), acc);
    eprintln!(
        "DPO eval: accuracy 0 -> {acc}, margin 0 -> {margin:.3}, loss {:.4} -> {:.4}",
        num(&r, "initial_eval_loss"),
        num(&r, "eval_loss")
    );
    // TRL's training metrics every logging step; the margin grows.
    let metrics = read_jsonl(&out.join("metrics.jsonl"));
    let train = train_lines(&metrics);
    assert_eq!(train.len(), 8);
    for key in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(train.iter().all(|l| l[key].is_number()), "{key}: {train:?}");
    }
    let first = num(train[0], "rewards/margins");
    let last = num(train[7], "rewards/margins");
    assert!(last > first + 0.5, "margins {first} → {last}");
    // A PEFT CAUSAL_LM adapter, as sft writes it.
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    let tensors = read_safetensors(&out.join("adapter_model.safetensors"));
    let lora = tensors.keys().filter(|k| k.contains(".lora_")).count();
    assert_eq!(lora, 2 * 7 * TINY_LAYERS);
    assert_eq!(tensors.len(), lora);
    assert_eq!(temp_files(&out), Vec::<String>::new());
}

#[test]
fn dpo_refuses_full_fine_tuning_and_names_bad_pairs() {
    let s = rm_setup();
    let out = s.ws.path("out");
    dpo(&s, &out)
        .opt("--use_peft", "False")
        .fails()
        .assert_stderr_has(&["full fine-tuning", "frozen copy", "--use_peft true"]);
    assert_no_partial_outputs(&out);

    let mut text = pairs(4, 3);
    text.push_str(
        "{\"question\": \"q\", \"response_chosen\": \"same\", \"response_rejected\": \"same\"}\n",
    );
    s.ws.write("bad/pairs.jsonl", text);
    dpo(&s, &out)
        .opt("--train_file_dir", s.ws.path("bad"))
        .fails()
        .assert_stderr_has(&[
            "pairs.jsonl:5:",
            "response_chosen/response_rejected",
            "expected two different answers",
        ]);
    s.ws.write(
        "missing/pairs.jsonl",
        "{\"question\": \"q\", \"response_chosen\": \"a\"}\n",
    );
    dpo(&s, &out)
        .opt("--train_file_dir", s.ws.path("missing"))
        .fails()
        .assert_stderr_has(&["pairs.jsonl:1:", "response_rejected"]);
    assert_no_partial_outputs(&out);
}

#[test]
fn an_interrupted_dpo_run_resumes_to_the_same_adapter() {
    let s = rm_setup();
    let (a, b) = (s.ws.path("a"), s.ws.path("b"));
    let short = |out: &Path| {
        dpo(&s, out)
            .opt("--max_steps", "8")
            .opt("--save_steps", "4")
    };
    short(&a).ok();
    short(&b).opt("--stop_after_steps", "4").ok();
    assert!(!b.join("adapter_model.safetensors").exists());
    // The reference log-probs are computed again from the base: the same.
    short(&b).opt("--resume_from_checkpoint", "true").ok();
    assert_eq!(
        std::fs::read(a.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(b.join("adapter_model.safetensors")).unwrap()
    );
}
