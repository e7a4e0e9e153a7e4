//! Checkpoints and `--resume_from_checkpoint`: an interrupted run that is
//! resumed ends exactly where an uninterrupted one does.

use crate::{rlhf, setup, Setup};
use rlhf_tests::*;
use std::path::Path;

/// The weights file a run writes: the adapter in LoRA mode, the model in full.
fn weights_file(use_peft: &str) -> &'static str {
    if use_peft == "true" {
        "adapter_model.safetensors"
    } else {
        "model.safetensors"
    }
}

/// 8 steps, a checkpoint every 3; LoRA keeps its default dropout 0.05, so
/// the resumed run must also replay the dropout masks.
fn run8(s: &Setup, out: &Path, use_peft: &str) -> Cmd {
    rlhf()
        .pt(&s.model, &s.data, out)
        .opt("--use_peft", use_peft)
        .opt("--max_steps", "8")
}

fn assert_resume_is_bitwise_identical(use_peft: &str) {
    let s = setup();
    let (a, b) = (s.ws.path("a"), s.ws.path("b"));
    run8(&s, &a, use_peft).ok();

    // Interrupted after step 4: checkpoint-3 is there, the final weights are not.
    let stopped = run8(&s, &b, use_peft).opt("--stop_after_steps", "4").ok();
    assert_eq!(stopped.json()["global_step"], 4);
    assert_eq!(checkpoints(&b), ["checkpoint-3"]);
    assert!(
        !b.join(weights_file(use_peft)).exists(),
        "an interrupted run wrote final weights"
    );
    let before = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();

    // Resumed from the latest checkpoint (step 3): step 4 is redone.
    run8(&s, &b, use_peft)
        .opt("--resume_from_checkpoint", "True")
        .ok();
    let w = weights_file(use_peft);
    let (wa, wb) = (
        std::fs::read(a.join(w)).unwrap(),
        std::fs::read(b.join(w)).unwrap(),
    );
    assert!(
        wa == wb,
        "use_peft {use_peft}: resumed {w} differs from the uninterrupted one"
    );

    // metrics.jsonl reads as one run: each step once, with the same losses.
    let ma = read_jsonl(&a.join("metrics.jsonl"));
    let mb = read_jsonl(&b.join("metrics.jsonl"));
    let steps: Vec<u64> = train_lines(&mb)
        .iter()
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        (1..=8).collect::<Vec<_>>(),
        "each step logged exactly once"
    );
    let losses = |m: &[serde_json::Value]| -> Vec<f64> {
        train_lines(m).iter().map(|v| num(v, "loss")).collect()
    };
    assert_eq!(losses(&ma), losses(&mb));
    // Steps 1–3 are the interrupted run's own lines, kept byte for byte
    // (tokens_per_sec is a timing, so a rerun from step 0 would rewrite them).
    let after = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    let first3 = |t: &str| t.lines().take(3).map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(first3(&after), first3(&before));
    let evals = |m: &[serde_json::Value]| -> Vec<f64> {
        m.iter()
            .filter(|v| v.get("eval_loss").is_some())
            .map(|v| num(v, "eval_loss"))
            .collect()
    };
    assert_eq!(evals(&mb).len(), 1, "the final evaluation is logged once");
    assert_eq!(evals(&ma), evals(&mb));
    assert_eq!(temp_files(&b), Vec::<String>::new());
}

#[test]
fn lora_resume_after_interruption_is_bitwise_identical() {
    assert_resume_is_bitwise_identical("true");
}

#[test]
fn full_finetune_resume_after_interruption_is_bitwise_identical() {
    assert_resume_is_bitwise_identical("false");
}

#[test]
fn resume_starts_at_the_latest_checkpoint_step() {
    // Interrupt at 4 (checkpoint-3), resume for 2 more steps: a run that
    // really starts from checkpoint-3 stops at step 5, one from scratch at 2.
    let s = setup();
    let out = s.ws.path("out");
    run8(&s, &out, "true").opt("--stop_after_steps", "4").ok();
    let r = run8(&s, &out, "true")
        .opt("--resume_from_checkpoint", "True")
        .opt("--stop_after_steps", "2")
        .ok();
    assert_eq!(r.json()["global_step"], 5, "{r}");
    // An explicit checkpoint path works too.
    let ckpt = out.join("checkpoint-3");
    let r = run8(&s, &out, "true")
        .opt("--resume_from_checkpoint", &ckpt)
        .opt("--stop_after_steps", "1")
        .ok();
    assert_eq!(r.json()["global_step"], 4, "{r}");
}

#[test]
fn save_total_limit_1_keeps_only_the_latest_complete_checkpoint() {
    for (use_peft, weights) in [
        ("true", ["adapter_model.safetensors", "adapter_config.json"]),
        ("false", ["model.safetensors", "config.json"]),
    ] {
        let s = setup();
        let out = s.ws.path("out");
        // Checkpoints at steps 3 and 6 and, as transformers does, at the last
        // step 8; the limit deletes all but checkpoint-8.
        run8(&s, &out, use_peft).opt("--save_total_limit", "1").ok();
        assert_eq!(checkpoints(&out), ["checkpoint-8"], "use_peft {use_peft}");
        let ckpt = out.join("checkpoint-8");
        for f in [
            "trainer_state.json",
            "optimizer.safetensors",
            weights[0],
            weights[1],
        ] {
            assert!(
                ckpt.join(f).is_file(),
                "{f} missing: {:?}",
                list_tree(&ckpt)
            );
        }
        let state = read_json(&ckpt.join("trainer_state.json"));
        assert_eq!(state["global_step"], 8);
        // AdamW's two moments, one value per trainable weight.
        let opt = read_safetensors(&ckpt.join("optimizer.safetensors"));
        let n = state["train_len"].as_u64().unwrap() as usize;
        assert!(n > 0);
        assert_eq!(opt["exp_avg"].shape, [n]);
        assert_eq!(opt["exp_avg_sq"].shape, [n]);
        assert_eq!(temp_files(&out), Vec::<String>::new());
    }
}

#[test]
fn resuming_with_a_different_batch_size_is_refused() {
    // The data position is derived from the step and steps per epoch; a
    // changed batch size would silently replay different data.
    let s = setup();
    let out = s.ws.path("out");
    run8(&s, &out, "true").opt("--stop_after_steps", "4").ok();
    let r = run8(&s, &out, "true")
        .opt("--resume_from_checkpoint", "True")
        .opt("--per_device_train_batch_size", "4")
        .fails();
    r.assert_stderr_has(&["checkpoint-3", "steps per epoch"]);
    assert!(!out.join("adapter_model.safetensors").exists());
}

#[test]
fn resume_from_checkpoint_true_without_checkpoints_is_an_error() {
    let s = setup();
    let out = s.ws.path("out");
    let r = run8(&s, &out, "true")
        .opt("--resume_from_checkpoint", "True")
        .fails();
    r.assert_stderr_has(&["no checkpoint-*", "out"]);
    assert_no_partial_outputs(&out);
}
