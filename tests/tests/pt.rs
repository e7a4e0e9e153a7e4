//! `rlhf pt`: what a LoRA or full fine-tuning run writes, and the
//! MedicalGPT flags that change how it trains.

use crate::{medicalgpt_pretrain, rlhf, setup, Setup};
use rlhf_tests::*;
use std::path::{Path, PathBuf};

/// A tiny model with a tokenizer trained on the MedicalGPT sample data, and
/// a 6-step LoRA run on that data: (workspace, model, output dir).
fn lora_pt_on_medicalgpt_data() -> (Workspace, PathBuf, PathBuf) {
    let ws = Workspace::new();
    let model = ws.path("model");
    rlhf().init_tiny_model(&medicalgpt_pretrain(), &model);
    let out = ws.path("out");
    rlhf()
        .pt(&model, &medicalgpt_pretrain(), &out)
        .opt("--use_peft", "True")
        .ok();
    (ws, model, out)
}

#[test]
fn lora_pt_writes_a_peft_adapter_config_with_medicalgpt_defaults() {
    let (_ws, model, out) = lora_pt_on_medicalgpt_data();
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    // MedicalGPT's defaults: lora_rank 8, lora_alpha 32, target_modules all.
    assert_eq!(cfg["r"], 8);
    assert_eq!(num(&cfg, "lora_alpha"), 32.0);
    let mut targets: Vec<&str> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    targets.sort();
    let mut all = ALL_TARGET_MODULES.to_vec();
    all.sort();
    assert_eq!(targets, all);
    assert_eq!(cfg["base_model_name_or_path"], model.to_str().unwrap());
    // The tokenizer travels with the adapter, as MedicalGPT saves it.
    assert!(out.join("tokenizer.json").is_file());
    assert!(out.join("tokenizer_config.json").is_file());
    assert!(
        !out.join("model.safetensors").exists(),
        "LoRA writes no full model"
    );
    assert_eq!(temp_files(&out), Vec::<String>::new());
}

#[test]
fn lora_adapter_tensors_have_peft_names_and_shapes() {
    let (_ws, _model, out) = lora_pt_on_medicalgpt_data();
    let tensors = read_safetensors(&out.join("adapter_model.safetensors"));
    let (c, kv, f, r) = (TINY_HIDDEN, TINY_KV_DIM, TINY_INTERMEDIATE, 8);
    // (module path, in features, out features) of each adapted linear.
    let linears = [
        ("self_attn.q_proj", c, c),
        ("self_attn.k_proj", c, kv),
        ("self_attn.v_proj", c, kv),
        ("self_attn.o_proj", c, c),
        ("mlp.gate_proj", c, f),
        ("mlp.up_proj", c, f),
        ("mlp.down_proj", f, c),
    ];
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..TINY_LAYERS {
        for (m, n_in, n_out) in linears {
            let p = format!("base_model.model.model.layers.{i}.{m}");
            expected.insert(format!("{p}.lora_A.weight"), vec![r, n_in]);
            expected.insert(format!("{p}.lora_B.weight"), vec![n_out, r]);
        }
    }
    let got: std::collections::BTreeMap<String, Vec<usize>> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.shape.clone()))
        .collect();
    assert_eq!(
        got, expected,
        "exactly PEFT's names, with [r, in] / [out, r] shapes"
    );
    assert!(tensors.values().all(|t| t.dtype == safetensors::Dtype::F32));
}

#[test]
fn lora_training_moves_every_lora_b_off_zero() {
    // PEFT starts every lora_B at zero; six steps at lr 1e-3 must move each one.
    let (_ws, _model, out) = lora_pt_on_medicalgpt_data();
    let tensors = read_safetensors(&out.join("adapter_model.safetensors"));
    let mut n = 0;
    for (name, t) in tensors.iter().filter(|(n, _)| n.ends_with("lora_B.weight")) {
        let v = t.f32s();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name} has non-finite values"
        );
        assert!(v.iter().any(|&x| x != 0.0), "{name} is still all zero");
        n += 1;
    }
    assert_eq!(n, 7 * TINY_LAYERS);
}

#[test]
fn metrics_jsonl_logs_every_step_with_linear_lr_decay() {
    let (_ws, _model, out) = lora_pt_on_medicalgpt_data();
    let metrics = read_jsonl(&out.join("metrics.jsonl"));
    let train = train_lines(&metrics);
    let steps: Vec<u64> = train.iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(
        steps,
        [1, 2, 3, 4, 5, 6],
        "one line per step (logging_steps 1)"
    );
    for (i, v) in train.iter().enumerate() {
        for key in ["loss", "learning_rate", "grad_norm", "tokens_per_sec"] {
            let x = num(v, key);
            assert!(x.is_finite() && x >= 0.0, "{key} = {x} in {v}");
        }
        assert!(
            num(v, "loss") > 0.0 && num(v, "tokens_per_sec") > 0.0,
            "{v}"
        );
        // transformers' linear schedule without warmup: lr·(N − s)/N at step s = 0..N-1.
        let want = 1e-3 * (6 - i) as f64 / 6.0;
        let lr = num(v, "learning_rate");
        assert!(
            (lr - want).abs() < 1e-12,
            "step {}: lr {lr}, want {want}",
            i + 1
        );
    }
    // The final evaluation is logged once, at the last step.
    let evals: Vec<_> = metrics
        .iter()
        .filter(|v| v.get("eval_loss").is_some())
        .collect();
    assert_eq!(evals.len(), 1, "{metrics:?}");
    assert_eq!(evals[0]["step"], 6);
}

#[test]
fn all_results_reports_eval_loss_and_its_perplexity() {
    let (_ws, _model, out) = lora_pt_on_medicalgpt_data();
    let r = read_json(&out.join("all_results.json"));
    let loss = num(&r, "eval_loss");
    assert!(loss.is_finite() && loss > 0.0, "{r}");
    let ppl = num(&r, "perplexity");
    assert!(
        (ppl - loss.exp()).abs() <= 1e-9 * ppl,
        "perplexity {ppl} != exp({loss})"
    );
    assert_eq!(r["global_step"], 6);
    // 1% of the 1496 sample documents (15) is held out by default, as in MedicalGPT.
    assert!(
        num(&r, "eval_samples") > 0.0 && num(&r, "train_samples") > 0.0,
        "{r}"
    );
}

/// Train 6 steps with `mode_flags` on the setup's data, holding out `valid/`
/// as the validation dir; returns the output dir and the validation dir.
fn pt_with_validation_dir(s: &Setup, mode_flags: &[(&str, &str)]) -> (PathBuf, PathBuf) {
    let valid = s.ws.write("valid/valid.txt", corpus_text(40, 2));
    let out = s.ws.path("out");
    let mut cmd = rlhf()
        .pt(&s.model, &s.data, &out)
        .opt("--validation_file_dir", valid.parent().unwrap());
    for (k, v) in mode_flags {
        cmd = cmd.opt(k, v);
    }
    cmd.ok();
    (out, valid)
}

/// `rlhf eval` on the validation data must give the loss the trainer logged
/// for it at the end: proves the saved weights are exactly the trained ones.
fn assert_eval_reproduces_final_eval_loss(out: &Path, eval: &serde_json::Value) {
    let trained = num(&read_json(&out.join("all_results.json")), "eval_loss");
    let reloaded = num(eval, "loss");
    assert!(
        (trained - reloaded).abs() <= 1e-6 * trained,
        "trainer's eval_loss {trained} vs rlhf eval of the saved output {reloaded}"
    );
}

#[test]
fn full_finetune_writes_a_transformers_model_dir() {
    // MedicalGPT's `--use_peft False`: every weight trained, a model dir saved.
    let s = setup();
    let (out, _) = pt_with_validation_dir(&s, &[("--use_peft", "False")]);
    for f in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(
            out.join(f).is_file(),
            "{f} missing in {:?}",
            list_tree(&out)
        );
    }
    assert!(!out.join("adapter_model.safetensors").exists());
    let base = read_safetensors(&s.model.join("model.safetensors"));
    let tuned = read_safetensors(&out.join("model.safetensors"));
    let shapes = |m: &std::collections::BTreeMap<String, Tensor>| {
        m.iter()
            .map(|(n, t)| (n.clone(), t.shape.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        shapes(&tuned),
        shapes(&base),
        "same tensors as the base model"
    );
    let changed = base.keys().filter(|n| base[*n] != tuned[*n]).count();
    assert_eq!(changed, base.len(), "full fine-tuning updates every tensor");
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(cfg["hidden_size"], TINY_HIDDEN);
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
}

#[test]
fn eval_reloads_a_full_finetune_output_and_reproduces_its_eval_loss() {
    let s = setup();
    let (out, valid) = pt_with_validation_dir(&s, &[("--use_peft", "False")]);
    let eval = rlhf().eval(&out, None, &valid);
    assert_eval_reproduces_final_eval_loss(&out, &eval);
}

#[test]
fn eval_reloads_a_lora_output_and_reproduces_its_eval_loss() {
    let s = setup();
    let (out, valid) = pt_with_validation_dir(&s, &[]);
    let eval = rlhf().eval(&s.model, Some(&out), &valid);
    assert_eval_reproduces_final_eval_loss(&out, &eval);
}

#[test]
fn gradient_checkpointing_gives_bitwise_identical_weights() {
    // Recomputing activations in backward runs the same arithmetic (the
    // dropout masks are a function of seed and step), so LoRA with dropout
    // and full fine-tuning must both come out bit for bit the same.
    for (mode, weights) in [
        ("true", "adapter_model.safetensors"),
        ("false", "model.safetensors"),
    ] {
        let s = setup();
        let plain = s.ws.path("plain");
        let ckpt = s.ws.path("ckpt");
        let cmd = rlhf().pt(&s.model, &s.data, &plain).opt("--use_peft", mode);
        cmd.ok();
        cmd.opt("--output_dir", &ckpt)
            .opt("--gradient_checkpointing", "True")
            .ok();
        let a = std::fs::read(plain.join(weights)).unwrap();
        let b = std::fs::read(ckpt.join(weights)).unwrap();
        assert!(
            a == b,
            "use_peft {mode}: {weights} differs with gradient_checkpointing"
        );
        let losses = |d: &Path| -> Vec<f64> {
            train_lines(&read_jsonl(&d.join("metrics.jsonl")))
                .iter()
                .map(|v| num(v, "loss"))
                .collect()
        };
        assert_eq!(losses(&plain), losses(&ckpt), "use_peft {mode}");
    }
}

#[test]
fn peft_path_continues_training_from_the_adapter() {
    // Train an adapter hard (lr 1e-2, 30 steps), then start a new run from it
    // with --peft_path: its first step sees the same batch as a fresh run's
    // first step (same seed), so its loss must already be lower.
    let s = setup();
    let adapter = s.ws.path("adapter");
    rlhf()
        .pt(&s.model, &s.data, &adapter)
        .opt("--max_steps", "30")
        .opt("--learning_rate", "1e-2")
        .ok();
    let fresh = s.ws.path("fresh");
    let continued = s.ws.path("continued");
    let cmd = rlhf().pt(&s.model, &s.data, &fresh).opt("--max_steps", "2");
    cmd.ok();
    cmd.opt("--output_dir", &continued)
        .opt("--peft_path", &adapter)
        .ok();
    let first_loss = |d: &Path| {
        num(
            train_lines(&read_jsonl(&d.join("metrics.jsonl")))[0],
            "loss",
        )
    };
    let (f, c) = (first_loss(&fresh), first_loss(&continued));
    // A fresh adapter (lora_B = 0) computes exactly the base model's loss;
    // the trained one lowers it by about 0.1 on this data (LoRA cannot move
    // a random tiny model's small logits much), so 0.03 is a clear margin.
    assert!(
        c < f - 0.03,
        "first-step loss from the adapter {c} should be below a fresh adapter's {f}"
    );
    // The continued adapter keeps the loaded adapter's LoRA settings.
    let cfg = read_json(&continued.join("adapter_config.json"));
    assert_eq!(cfg["r"], 8);
}

#[test]
fn lora_settings_and_medicalgpt_compat_flags_are_honoured() {
    // A scaled-down scripts/run_pt.sh: its flags that do nothing here
    // (--do_train, --bf16, ...) are accepted with a warning; the LoRA and
    // schedule flags take effect.
    let s = setup();
    let out = s.ws.path("out");
    let r = rlhf()
        .pt(&s.model, &s.data, &out)
        .flag("--do_train")
        .flag("--do_eval")
        .flag("--bf16")
        .opt("--overwrite_output_dir", "True")
        .opt("--report_to", "tensorboard")
        .opt("--torch_dtype", "bfloat16")
        .opt("--lora_rank", "4")
        .opt("--lora_alpha", "16")
        .opt("--lora_dropout", "0.05")
        .opt("--target_modules", "q_proj,v_proj")
        .opt("--warmup_steps", "2")
        .opt("--weight_decay", "0.01")
        .opt("--gradient_accumulation_steps", "2")
        .opt("--max_train_samples", "40")
        .opt("--max_eval_samples", "3")
        .opt("--eval_steps", "2")
        .ok();
    r.assert_stderr_has(&["--do_train", "--bf16", "no effect"]);
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(
        (cfg["r"].as_u64(), num(&cfg, "lora_alpha")),
        (Some(4), 16.0)
    );
    let names: Vec<String> = read_safetensors(&out.join("adapter_model.safetensors"))
        .into_keys()
        .collect();
    assert_eq!(names.len(), 2 * 2 * TINY_LAYERS, "{names:?}");
    assert!(names
        .iter()
        .all(|n| n.contains("q_proj") || n.contains("v_proj")));
    let metrics = read_jsonl(&out.join("metrics.jsonl"));
    // Warmup over 2 steps as transformers does it: lr·s/2 for steps s = 0, 1, then the peak.
    let lrs: Vec<f64> = train_lines(&metrics)
        .iter()
        .map(|v| num(v, "learning_rate"))
        .collect();
    assert_eq!(lrs[..3], [0.0, 0.5e-3, 1e-3], "{lrs:?}");
    // eval_steps 2 over 6 steps: evaluations at 2, 4 and the final one at 6.
    let eval_steps: Vec<u64> = metrics
        .iter()
        .filter(|v| v.get("eval_loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(eval_steps, [2, 4, 6]);
    // max_eval_samples counts blocks: 3 blocks of 32 → 3·31 predicted tokens.
    assert_eq!(
        num(&read_json(&out.join("all_results.json")), "eval_tokens"),
        93.0
    );
}
