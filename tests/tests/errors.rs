//! Bad input: each must end with a non-zero exit code and an error message
//! that names the file (and line) and the problem — never a panic — and must
//! leave nothing in output_dir that looks like a result.

use crate::{rlhf, setup, Setup};
use rlhf_tests::*;
use std::path::Path;

/// `rlhf pt` of the setup's model on `data` into `s/out`; asserts a clean
/// failure whose stderr has every one of `needles`, and no partial outputs.
fn pt_fails(s: &Setup, model: &Path, data: &Path, extra: &[(&str, &str)], needles: &[&str]) -> Run {
    let out = s.ws.path("out");
    let mut cmd = rlhf().pt(model, data, &out);
    for (k, v) in extra {
        cmd = cmd.opt(k, v);
    }
    let r = cmd.fails();
    r.assert_stderr_has(needles);
    assert_no_partial_outputs(&out);
    r
}

#[test]
fn missing_train_dir_is_named() {
    let s = setup();
    let missing = s.ws.path("no_such_dir");
    pt_fails(
        &s,
        &s.model,
        &missing,
        &[],
        &["no_such_dir", "does not exist"],
    );
}

#[test]
fn empty_train_dir_is_named() {
    let s = setup();
    let empty = s.ws.mkdir("empty");
    pt_fails(
        &s,
        &s.model,
        &empty,
        &[],
        &["empty", "no .txt/.json/.jsonl files"],
    );
}

#[test]
fn non_utf8_txt_names_file_and_line() {
    let s = setup();
    s.ws.write("bad/a.txt", b"fine\nstill fine\nbad \xff byte\n");
    pt_fails(&s, &s.model, &s.ws.path("bad"), &[], &["a.txt:3", "UTF-8"]);
}

#[test]
fn invalid_json_line_names_file_and_line() {
    let s = setup();
    s.ws.write(
        "bad/docs.jsonl",
        "{\"text\": \"one\"}\n{\"text\": \"two\"}\n{\"text\": oops}\n",
    );
    pt_fails(
        &s,
        &s.model,
        &s.ws.path("bad"),
        &[],
        &["docs.jsonl:3", "invalid JSON"],
    );
}

#[test]
fn jsonl_record_without_text_names_file_line_and_field() {
    let s = setup();
    s.ws.write(
        "bad/docs.jsonl",
        "{\"text\": \"one\"}\n{\"content\": \"two\"}\n",
    );
    pt_fails(
        &s,
        &s.model,
        &s.ws.path("bad"),
        &[],
        &["docs.jsonl:2", "missing field \"text\"", "content"],
    );
}

/// A copy of the setup's model at `rel`, for breaking.
fn model_copy(s: &Setup, rel: &str) -> std::path::PathBuf {
    let dir = s.ws.path(rel);
    copy_dir(&s.model, &dir);
    dir
}

/// Rewrite one top-level field of a model dir's config.json.
fn set_config(dir: &Path, key: &str, value: serde_json::Value) {
    let mut cfg = read_json(&dir.join("config.json"));
    cfg[key] = value;
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

#[test]
fn config_disagreeing_with_weights_names_the_tensor_and_shapes() {
    let s = setup();
    let m = model_copy(&s, "wide");
    set_config(&m, "hidden_size", 64.into());
    pt_fails(
        &s,
        &m,
        &s.data,
        &[],
        &[
            "model.safetensors",
            "model.embed_tokens.weight",
            "[300, 32]",
            "[300, 64]",
        ],
    );
}

#[test]
fn missing_tensor_is_named() {
    let s = setup();
    let m = model_copy(&s, "holey");
    let w = m.join("model.safetensors");
    write_safetensors_without(
        &s.model.join("model.safetensors"),
        &w,
        "model.layers.1.mlp.up_proj.weight",
    );
    pt_fails(
        &s,
        &m,
        &s.data,
        &[],
        &["missing tensor", "model.layers.1.mlp.up_proj.weight"],
    );
}

#[test]
fn truncated_weights_file_is_named() {
    let s = setup();
    let m = model_copy(&s, "cut");
    let w = m.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() - 100]).unwrap();
    pt_fails(
        &s,
        &m,
        &s.data,
        &[],
        &["model.safetensors", "truncated or corrupt"],
    );
}

#[test]
fn yarn_rope_scaling_is_refused_by_name() {
    // Training with other position encodings than the model's would quietly
    // ruin it: unsupported RoPE scaling is an error, not ignored.
    let s = setup();
    let m = model_copy(&s, "yarn");
    set_config(
        &m,
        "rope_scaling",
        serde_json::json!({"type": "yarn", "factor": 4.0}),
    );
    pt_fails(
        &s,
        &m,
        &s.data,
        &[],
        &["config.json", "\"yarn\"", "not supported"],
    );
}

#[test]
fn unknown_argument_is_a_usage_error() {
    let s = setup();
    let r = pt_fails(
        &s,
        &s.model,
        &s.data,
        &[("--no_such_flag", "1")],
        &["--no_such_flag"],
    );
    assert_eq!(r.code, Some(2), "clap's usage-error exit code");
    r.assert_stderr_has(&["unexpected argument", "Usage:"]);
}

#[test]
fn use_peft_maybe_is_rejected() {
    let s = setup();
    let r = pt_fails(
        &s,
        &s.model,
        &s.data,
        &[("--use_peft", "maybe")],
        &["--use_peft", "maybe", "true or false"],
    );
    assert_eq!(r.code, Some(2));
}

#[test]
fn unknown_lr_scheduler_type_lists_the_known_ones() {
    let s = setup();
    pt_fails(
        &s,
        &s.model,
        &s.data,
        &[("--lr_scheduler_type", "warmup_stable")],
        &["warmup_stable", "linear", "cosine"],
    );
}

#[test]
fn peft_path_that_is_not_an_adapter_is_named() {
    let s = setup();
    let not_adapter = s.ws.mkdir("not_adapter");
    let p = not_adapter.to_str().unwrap();
    pt_fails(
        &s,
        &s.model,
        &s.data,
        &[("--peft_path", p)],
        &["not_adapter", "adapter_config.json"],
    );
}

#[test]
fn eval_of_a_bad_validation_file_names_file_and_line() {
    let s = setup();
    let f = s.ws.write("v.jsonl", "{\"text\": \"a\"}\n\n[1, 2]\n");
    let r = rlhf()
        .cmd("eval")
        .opt("--model_name_or_path", &s.model)
        .opt("--validation_file", &f)
        .fails();
    r.assert_stderr_has(&["v.jsonl:3", "expected a JSON object"]);
    assert_eq!(r.stdout, "", "no JSON result on failure");
}

#[test]
fn cuda_without_a_driver_is_a_clear_error() {
    if rlhf_kernels::cuda::loader::require(rlhf_kernels::cuda::loader::DRIVER).is_ok() {
        eprintln!("SKIPPED cuda_without_a_driver_is_a_clear_error: this machine has a CUDA driver");
        return;
    }
    let s = setup();
    let r = pt_fails(
        &s,
        &s.model,
        &s.data,
        &[("--device", "cuda"), ("--bf16", "true")],
        &["libcuda.so.1", "was not found", "RLHF_CUDA_LIB_DIRS"],
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn unknown_device_is_refused() {
    let s = setup();
    pt_fails(
        &s,
        &s.model,
        &s.data,
        &[("--device", "tpu:0")],
        &["tpu:0", "cpu, cuda or cuda:N"],
    );
}

#[test]
fn ppo_rollout_workers_without_a_coordinator_is_refused() {
    let s = setup();
    let r = rlhf()
        .cmd("ppo")
        .opt("--model_name_or_path", &s.model)
        .opt("--reward_model_name_or_path", &s.model)
        .opt("--train_file_dir", &s.data)
        .opt("--output_dir", s.ws.path("ppo"))
        .opt("--rollout_workers", "1")
        .fails();
    assert!(
        r.stderr.contains("--rollout_workers 1 needs a coordinator"),
        "{}",
        r.stderr
    );
    assert!(!s.ws.path("ppo").exists(), "nothing written");
}
