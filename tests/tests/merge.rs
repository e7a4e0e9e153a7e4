//! `rlhf merge`: an adapter trained by `rlhf pt`, merged into its base, must
//! evaluate exactly like base + adapter; bad input is refused naming the file.

use crate::{rlhf, setup, Setup};
use rlhf_tests::*;
use std::path::{Path, PathBuf};

/// A LoRA adapter trained for 20 steps at lr 1e-2 (far enough from the base
/// that a merge that dropped or mis-scaled the update would show).
fn trained_adapter(s: &Setup) -> PathBuf {
    let adapter = s.ws.path("adapter");
    rlhf()
        .pt(&s.model, &s.data, &adapter)
        .opt("--max_steps", "20")
        .opt("--learning_rate", "1e-2")
        .ok();
    adapter
}

fn merge_cmd(base: &Path, adapter: &Path, out: &Path) -> Cmd {
    rlhf()
        .cmd("merge")
        .opt("--model_name_or_path", base)
        .opt("--peft_path", adapter)
        .opt("--output_dir", out)
}

#[test]
fn merged_model_evaluates_like_base_plus_adapter() {
    let s = setup();
    let adapter = trained_adapter(&s);
    let file = s.data.join("train.txt");
    let with_adapter = rlhf().eval(&s.model, Some(&adapter), &file);
    let base_only = rlhf().eval(&s.model, None, &file);
    for (out, shard) in [("merged", "10GB"), ("merged_sharded", "20KB")] {
        let out = s.ws.path(out);
        let summary = merge_cmd(&s.model, &adapter, &out)
            .opt("--max_shard_size", shard)
            .ok()
            .json();
        assert_eq!(summary["lora_merged"], 7 * TINY_LAYERS as u64, "{summary}");
        let merged = rlhf().eval(&out, None, &file);
        let (a, m) = (num(&with_adapter, "loss"), num(&merged, "loss"));
        assert!(
            (a - m).abs() < 1e-4,
            "{shard}: merged loss {m} vs base + adapter {a}"
        );
        assert_eq!(merged["tokens"], with_adapter["tokens"]);
        assert!(
            (num(&base_only, "loss") - m).abs() > 1e-3,
            "the adapter must change the loss for this test to mean anything"
        );
        // A plain HF dir: config, weights, the tokenizer training saved beside the adapter.
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            assert!(out.join(f).is_file(), "{f} missing in {}", out.display());
        }
        assert!(!out.join("adapter_config.json").exists());
        assert_eq!(temp_files(&out), Vec::<String>::new());
    }
    assert!(s.ws.path("merged").join("model.safetensors").is_file());
    assert!(s
        .ws
        .path("merged_sharded")
        .join("model.safetensors.index.json")
        .is_file());
}

#[test]
fn medicalgpt_argument_names_work() {
    // merge_peft_adapter.py: --base_model, --lora_model.
    let s = setup();
    let adapter = trained_adapter(&s);
    let out = s.ws.path("merged");
    rlhf()
        .cmd("merge")
        .opt("--base_model", &s.model)
        .opt("--lora_model", &adapter)
        .opt("--output_dir", &out)
        .opt("--torch_dtype", "bfloat16")
        .ok();
    let cfg = read_json(&out.join("config.json"));
    let dtype = cfg.get("dtype").or(cfg.get("torch_dtype")).unwrap();
    assert_eq!(dtype, "bfloat16");
}

#[test]
fn bad_input_names_the_file_and_leaves_no_output() {
    let s = setup();
    let adapter = trained_adapter(&s);
    let out = s.ws.path("merged");

    // No adapter weights.
    let broken = s.ws.path("broken");
    copy_dir(&adapter, &broken);
    std::fs::remove_file(broken.join("adapter_model.safetensors")).unwrap();
    merge_cmd(&s.model, &broken, &out)
        .fails()
        .assert_stderr_has(&["adapter_model.safetensors", "missing", "broken"]);
    assert!(!out.exists());

    // A base of another shape (hidden 48): the first mismatching tensor and both files are named.
    let other = s.ws.path("other");
    rlhf()
        .cmd("init-model")
        .opt("--corpus", s.data.join("train.txt"))
        .opt("--output_dir", &other)
        .opt("--vocab_size", "300")
        .opt("--hidden_size", "48")
        .opt("--intermediate_size", "64")
        .opt("--num_hidden_layers", "2")
        .opt("--num_attention_heads", "4")
        .opt("--num_key_value_heads", "2")
        .ok();
    merge_cmd(&other, &adapter, &out)
        .fails()
        .assert_stderr_has(&[
            "shape mismatch",
            "other/model.safetensors",
            "adapter/adapter_model.safetensors",
        ]);
    assert!(!out.exists());

    // A base dir without config.json.
    let empty = s.ws.mkdir("empty");
    merge_cmd(&empty, &adapter, &out)
        .fails()
        .assert_stderr_has(&["empty/config.json"]);

    // An output dir with something in it is not overwritten.
    s.ws.write("merged/notes.txt", "keep me");
    merge_cmd(&s.model, &adapter, &out)
        .fails()
        .assert_stderr_has(&["not empty", "merged"]);
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "keep me"
    );
    let hidden: Vec<String> = list_tree(&s.ws.path(""))
        .into_iter()
        .filter(|p| p.split('/').any(|c| c.starts_with(".merged")))
        .collect();
    assert!(hidden.is_empty(), "staging dirs left: {hidden:?}");
}
