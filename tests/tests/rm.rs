//! `rlhf rm`: a reward model trained on preference pairs end to end — the
//! loss falls, evaluation reports accuracy and margin, the adapter (or the
//! seq-cls model dir) is written as PEFT / transformers write them.

use crate::rlhf;
use rlhf_tests::*;
use std::path::{Path, PathBuf};

const SYMPTOMS: [&str; 6] = [
    "fever",
    "a cough",
    "headache",
    "a rash",
    "nausea",
    "back pain",
];
const GOOD: [&str; 3] = [
    "Rest, drink water and see a doctor if it lasts.",
    "Take the prescribed medicine and rest.",
    "Drink fluids and rest; see a doctor if it gets worse.",
];
const BAD: [&str; 3] = ["I do not know.", "Ignore it.", "No idea, sorry."];

/// `n` pairs in MedicalGPT's 2023 format: a helpful answer is preferred to
/// an unhelpful one (a preference a tiny model learns in a few steps).
pub(crate) fn pairs(n: usize, seed: usize) -> String {
    (0..n)
        .map(|i| {
            let k = i * 7 + seed * 3;
            format!(
                "{{\"question\": \"What should I do about {}?\", \"response_chosen\": \"{}\", \"response_rejected\": \"{}\"}}\n",
                SYMPTOMS[k % 6],
                GOOD[(k / 6) % 3],
                BAD[(k / 2) % 3]
            )
        })
        .collect()
}

pub(crate) struct RmSetup {
    pub ws: Workspace,
    pub model: PathBuf,
    pub train: PathBuf,
    pub valid: PathBuf,
}

/// A tiny model whose tokenizer was trained on the pairs' text; 48 training
/// and 8 validation pairs in their own folders.
pub(crate) fn rm_setup() -> RmSetup {
    let ws = Workspace::new();
    ws.write("train/pairs.jsonl", pairs(48, 1));
    ws.write("valid/pairs.jsonl", pairs(8, 2));
    let mut corpus = String::new();
    for s in SYMPTOMS {
        corpus.push_str(&format!(
            "Question: What should I do about {s}?\n\nAnswer: \n"
        ));
    }
    for a in GOOD.iter().chain(BAD.iter()) {
        corpus.push_str(&format!("{a}\n"));
    }
    let corpus = ws.write("corpus.txt", corpus.repeat(20));
    let model = ws.path("model");
    rlhf().init_tiny_model(&corpus, &model);
    RmSetup {
        train: ws.path("train"),
        valid: ws.path("valid"),
        model,
        ws,
    }
}

/// `rlhf rm` with small, fast settings: 24 steps of 4 pairs, lr 2e-3, a
/// metrics line every 2 steps, a checkpoint every 12.
fn rm(s: &RmSetup, out: &Path) -> Cmd {
    rlhf()
        .cmd("rm")
        .opt("--model_name_or_path", &s.model)
        .opt("--train_file_dir", &s.train)
        .opt("--validation_file_dir", &s.valid)
        .opt("--output_dir", out)
        .opt("--per_device_train_batch_size", "4")
        .opt("--learning_rate", "2e-3")
        .opt("--max_steps", "24")
        .opt("--logging_steps", "2")
        .opt("--save_steps", "12")
}

#[test]
fn lora_rm_learns_the_preference_and_saves_a_peft_seq_cls_adapter() {
    let s = rm_setup();
    let out = s.ws.path("out");
    let printed = rm(&s, &out).ok().json();
    // The loss falls: the last logged window is well below the first.
    let metrics = read_jsonl(&out.join("metrics.jsonl"));
    let losses: Vec<f64> = train_lines(&metrics)
        .iter()
        .map(|l| num(l, "loss"))
        .collect();
    assert_eq!(losses.len(), 12);
    assert!(
        losses[11] < 0.5 * losses[0],
        "loss did not fall: {losses:?}"
    );
    // ln 2 at the start: a new score head scores both sides about the same.
    assert!(
        (losses[0] - std::f64::consts::LN_2).abs() < 0.1,
        "{losses:?}"
    );
    // Evaluation: accuracy, margin and loss, before and after.
    let r = read_json(&out.join("all_results.json"));
    assert_eq!(num(&r, "eval_pairs"), 8.0);
    assert_eq!(num(&r, "train_samples"), 48.0);
    assert_eq!(num(&r, "eval_accuracy"), 1.0);
    assert!(num(&r, "eval_mean_margin") > 1.0, "{r}");
    assert!(
        num(&r, "eval_loss") < 0.5 * num(&r, "initial_eval_loss"),
        "{r}"
    );
    assert!(num(&r, "initial_eval_mean_margin").abs() < 0.1, "{r}");
    assert_eq!(num(&printed, "eval_accuracy"), 1.0);
    let eval_line = metrics
        .iter()
        .find(|m| m.get("eval_accuracy").is_some())
        .expect("an eval line in metrics.jsonl");
    assert_eq!(num(eval_line, "step"), 24.0);
    // A PEFT SEQ_CLS adapter: LoRA on every linear, the score head in full.
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["classifier", "score"])
    );
    let tensors = read_safetensors(&out.join("adapter_model.safetensors"));
    assert_eq!(
        tensors["base_model.model.score.weight"].shape,
        [1, TINY_HIDDEN]
    );
    let lora = tensors.keys().filter(|k| k.contains(".lora_")).count();
    assert_eq!(lora, 2 * 7 * TINY_LAYERS);
    assert_eq!(tensors.len(), lora + 1);
    assert_eq!(checkpoints(&out), ["checkpoint-12", "checkpoint-24"]);
    assert_eq!(temp_files(&out), Vec::<String>::new());
}

#[test]
fn full_rm_writes_a_transformers_seq_cls_model_dir() {
    let s = rm_setup();
    let out = s.ws.path("out");
    rm(&s, &out)
        .opt("--use_peft", "False")
        .opt("--learning_rate", "2e-4")
        .opt("--max_steps", "4")
        .ok();
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(
        cfg["architectures"],
        serde_json::json!(["LlamaForSequenceClassification"])
    );
    assert_eq!(cfg["id2label"], serde_json::json!({"0": "LABEL_0"}));
    // The tokenizer's pad, by which the score position is found.
    let tc = read_json(&s.model.join("tokenizer_config.json"));
    let pad_token = tc["pad_token"]
        .as_str()
        .or(tc["eos_token"].as_str())
        .unwrap();
    assert_eq!(cfg["pad_token_id"], token_id(&s.model, pad_token).unwrap());
    let w = read_safetensors(&out.join("model.safetensors"));
    assert_eq!(w["score.weight"].shape, [1, TINY_HIDDEN]);
    assert!(!w.contains_key("lm_head.weight"));
    assert!(!out.join("adapter_config.json").exists());
}

#[test]
fn an_interrupted_rm_run_resumes_to_the_same_adapter() {
    let s = rm_setup();
    let (a, b) = (s.ws.path("a"), s.ws.path("b"));
    rm(&s, &a).ok();
    rm(&s, &b).opt("--stop_after_steps", "12").ok();
    assert!(!b.join("adapter_model.safetensors").exists());
    rm(&s, &b).opt("--resume_from_checkpoint", "true").ok();
    assert_eq!(
        std::fs::read(a.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(b.join("adapter_model.safetensors")).unwrap()
    );
}

#[test]
fn rm_reads_all_three_medicalgpt_formats_and_reports_long_pairs() {
    let s = rm_setup();
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/medicalgpt");
    for (dir, n) in [
        ("legacy_2023/reward", 100),
        ("legacy_2024/reward", 500),
        ("reward", 511),
    ] {
        let out = s.ws.path(&format!("out-{}", dir.replace('/', "-")));
        let printed = rm(&s, &out)
            .opt("--train_file_dir", shared.join(dir))
            .without("--validation_file_dir")
            .opt("--max_source_length", "150")
            .opt("--max_target_length", "150")
            .opt("--per_device_train_batch_size", "2")
            .opt("--max_steps", "1")
            .ok()
            .json();
        let r = read_json(&out.join("all_results.json"));
        let kept = num(&r, "train_samples") + num(&r, "eval_samples");
        let dropped = num(&r, "filtered_too_long");
        // validation_split_percentage 1: the first 1% validate, the rest train.
        assert_eq!(kept + dropped, n as f64, "{dir}: {r}");
        assert!(dropped > 0.0 && kept > 0.0, "{dir}: {r}");
        assert_eq!(num(&printed, "filtered_too_long"), dropped);
    }
}

#[test]
fn bad_pairs_stop_the_run_naming_file_line_and_field_unless_skipped() {
    let s = rm_setup();
    let mut text = pairs(8, 3);
    text.push_str(
        "{\"question\": \"q\", \"response_chosen\": \"same\", \"response_rejected\": \"same\"}\n",
    );
    text.push_str("{\"conversations\": [{\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"gpt\", \"value\": \"a\"}], \"chosen\": \"x\", \"rejected\": \"y\"}\n");
    s.ws.write("bad/pairs.jsonl", text);
    let out = s.ws.path("out");
    let r = rm(&s, &out)
        .opt("--train_file_dir", s.ws.path("bad"))
        .fails();
    r.assert_stderr_has(&[
        "pairs.jsonl:9:",
        "response_chosen/response_rejected",
        "expected two different answers",
        "--skip_invalid",
    ]);
    assert_no_partial_outputs(&out);
    let printed = rm(&s, &out)
        .opt("--train_file_dir", s.ws.path("bad"))
        .opt("--skip_invalid", "True")
        .opt("--max_steps", "1")
        .ok();
    assert_eq!(num(&printed.json(), "skipped_invalid"), 2.0);
    assert_eq!(
        num(&read_json(&out.join("all_results.json")), "skipped_invalid"),
        2.0
    );
    printed.assert_stderr_has(&["pairs.jsonl:10:", "ending with a human turn"]);
}

#[test]
fn pairs_render_through_the_named_template_and_an_unknown_name_is_refused() {
    let s = rm_setup();
    let out = s.ws.path("out");
    rm(&s, &out)
        .opt("--template_name", "no-such-template")
        .fails()
        .assert_stderr_has(&["no-such-template", "vicuna", "chatml"]);
    assert_no_partial_outputs(&out);
    let printed = rm(&s, &out)
        .opt("--template_name", "chatml")
        .opt("--max_steps", "1")
        .ok();
    assert_eq!(
        read_json(&out.join("all_results.json"))["template"],
        "chatml",
        "{}",
        printed.json()
    );
}

/// The losses of each step of a 6-step LoRA `rlhf rm` with `extra` flags,
/// on the fake CUDA libraries when `fake` is given.
fn rm_losses(s: &RmSetup, out: &str, extra: &[&str], fake: Option<&Path>) -> Vec<f64> {
    let out = s.ws.path(out);
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_rlhf"));
    c.arg("rm")
        .arg("--model_name_or_path")
        .arg(&s.model)
        .arg("--train_file_dir")
        .arg(&s.train)
        .arg("--validation_file_dir")
        .arg(&s.valid)
        .arg("--output_dir")
        .arg(&out)
        .args(["--max_steps", "6", "--per_device_train_batch_size", "4"])
        .args(["--learning_rate", "2e-3", "--logging_steps", "1"])
        .args(["--save_steps", "100"])
        .args(extra)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    if let Some(dir) = fake {
        crate::cuda_emu::use_fake(&mut c, dir);
    }
    let o = c.output().expect("running rlhf");
    assert!(
        o.status.success(),
        "rlhf rm {extra:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    train_lines(&read_jsonl(&out.join("metrics.jsonl")))
        .iter()
        .map(|v| num(v, "loss"))
        .collect()
}

/// The score head on the CUDA backend (emulated GPU, see cuda_emu.rs):
/// its gathers, skinny GEMMs and scatters give the CPU's losses.
#[test]
fn lora_rm_on_emulated_cuda_matches_cpu() {
    let Some(fake) = crate::cuda_emu::fake_libraries("lora_rm_on_emulated_cuda_matches_cpu") else {
        return;
    };
    let s = rm_setup();
    let want = rm_losses(&s, "cpu", &["--device", "cpu"], None);
    assert_eq!(want.len(), 6, "{want:?}");
    for (name, flags, tol) in [
        ("f32", &["--device", "cuda"][..], 1e-4),
        ("bf16", &["--device", "cuda", "--bf16", "true"][..], 3e-2),
    ] {
        let got = rm_losses(&s, name, flags, Some(&fake));
        let e = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs() / w.abs().max(1e-12))
            .fold(0.0, f64::max);
        eprintln!("[{name}] cpu {want:.5?}\n       cuda {got:.5?}\n       max rel diff {e:.2e}");
        assert!(e <= tol, "[{name}] loss rel diff {e:.3e} > {tol:.0e}");
    }
}
