//! Our logits, loss and gradients against PyTorch/transformers/PEFT on tiny
//! random models (fixtures made by scripts/make_fixtures.py; see its README).

use rlhf_kernels::Cpu;
use rlhf_worker::model::pretrained::{load_model, read_adapter_config};
use rlhf_worker::model::weights::TensorFiles;
use rlhf_worker::model::{Batch, Llama, TrainMode};
use std::path::{Path, PathBuf};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(case)
}

fn batch(case: &str) -> Batch {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(case).join("inputs.json")).unwrap())
            .unwrap();
    let rows = |k: &str| -> Vec<i64> {
        v[k].as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
            .collect()
    };
    Batch {
        b: v["batch"].as_u64().unwrap() as usize,
        t: v["seq_len"].as_u64().unwrap() as usize,
        input_ids: rows("input_ids").into_iter().map(|x| x as u32).collect(),
        attention_mask: Some(
            rows("attention_mask")
                .into_iter()
                .map(|x| x as u8)
                .collect(),
        ),
        labels: rows("labels").into_iter().map(|x| x as i32).collect(),
        sample_keys: (0..v["batch"].as_u64().unwrap()).collect(),
    }
}

/// max|a−b| / max|b|: the error relative to the reference's scale.
fn rel_err(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let scale = reference.iter().fold(0f64, |m, &x| m.max(x.abs() as f64));
    let diff = ours
        .iter()
        .zip(reference)
        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    diff / scale.max(1e-30)
}

fn expected(case: &str, file: &str) -> TensorFiles {
    TensorFiles::open_files(&[fixture(case).join(file)]).unwrap()
}

fn read(files: &TensorFiles, name: &str) -> Vec<f32> {
    let shape = files
        .shape(name)
        .unwrap_or_else(|| panic!("fixture lacks {name}"));
    files.read_f32(name, &shape).unwrap()
}

/// Forward + backward with the mean-over-tokens loss, like transformers.
fn run(model: &mut Llama<Cpu>, b: &Batch) -> (f64, Vec<f32>) {
    let (stats, logits) = model.forward(b, true).unwrap();
    model.zero_grads().unwrap();
    let s2 = model
        .forward_backward(b, 1.0 / stats.tokens as f32, None)
        .unwrap();
    assert_eq!(s2, stats, "forward and forward_backward agree");
    (stats.loss_sum / stats.tokens as f64, logits.unwrap())
}

fn check_full(case: &str, model_subdir: &str, logits_tol: f64, grad_tol: f64) {
    let mut model = load_model(Cpu, &fixture(case).join(model_subdir), TrainMode::Full, 0).unwrap();
    let exp = expected(case, "expected.safetensors");
    let (loss, logits) = run(&mut model, &batch(case));
    let e = rel_err(&logits, &read(&exp, "logits"));
    assert!(
        e < logits_tol,
        "{case}/{model_subdir}: logits rel err {e:e}"
    );
    let ref_loss = read(&exp, "loss")[0] as f64;
    assert!(
        (loss - ref_loss).abs() / ref_loss < logits_tol,
        "{case}: loss {loss} vs {ref_loss}"
    );
    let mut checked = 0;
    for e in model.layout.tensors.clone() {
        let g = model.get_grad(&e.name).unwrap();
        let r = read(&exp, &format!("grad.{}", e.name));
        let err = rel_err(&g, &r);
        assert!(err < grad_tol, "{case}: grad of {} rel err {err:e}", e.name);
        checked += 1;
    }
    let n_ref = exp.names().filter(|n| n.starts_with("grad.")).count();
    assert_eq!(
        checked, n_ref,
        "every parameter PyTorch has a gradient for was checked"
    );
}

#[test]
fn llama_gqa_full_finetune_matches_transformers() {
    check_full("llama_gqa", "model", 1e-4, 1e-3);
}

#[test]
fn llama_tied_llama3_rope_full_finetune_matches_transformers() {
    check_full("llama_tied", "model", 1e-4, 1e-3);
}

#[test]
fn qwen2_qkv_bias_full_finetune_matches_transformers() {
    check_full("qwen2", "model", 1e-4, 1e-3);
}

#[test]
fn sharded_checkpoint_loads_identically() {
    check_full("llama_gqa", "model_sharded", 1e-4, 1e-3);
}

#[test]
fn f16_and_bf16_weights_load_close_to_f32() {
    // The fixtures' README: reloaded in PyTorch, f16 logits are within 8.8e-3
    // and bf16 within 6.6e-2 of the f32 model's (max abs). Same bound here.
    let exp = expected("llama_gqa", "expected.safetensors");
    let reference = read(&exp, "logits");
    for (dir, tol) in [("model_f16", 2e-2), ("model_bf16", 1e-1)] {
        let mut m = load_model(Cpu, &fixture("llama_gqa").join(dir), TrainMode::Full, 0).unwrap();
        let (_, logits) = m.forward(&batch("llama_gqa"), true).unwrap();
        let max_abs = logits
            .unwrap()
            .iter()
            .zip(&reference)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(max_abs < tol, "{dir}: max abs diff {max_abs}");
        assert!(max_abs > 0.0, "{dir}: rounding must show");
    }
}

fn check_lora(case: &str, adapter: &str, expected_file: &str) {
    let dir = fixture(case);
    let lora = read_adapter_config(&dir.join(adapter)).unwrap();
    assert_eq!(lora.r, 4);
    let mut model = load_model(Cpu, &dir.join("model"), TrainMode::Lora(lora), 0).unwrap();
    model.load_adapter(&dir.join(adapter)).unwrap();
    let exp = expected(case, expected_file);
    let (loss, logits) = run(&mut model, &batch(case));
    let e = rel_err(&logits, &read(&exp, "logits"));
    assert!(e < 1e-4, "{case}: LoRA logits rel err {e:e}");
    let ref_loss = read(&exp, "loss")[0] as f64;
    assert!(
        (loss - ref_loss).abs() / ref_loss < 1e-4,
        "{case}: loss {loss} vs {ref_loss}"
    );
    let mut checked = 0;
    for e in model
        .layout
        .tensors
        .clone()
        .into_iter()
        .filter(|e| e.slot.trainable)
    {
        let g = model.get_grad(&e.name).unwrap();
        let key = format!("grad.{}", Llama::<Cpu>::peft_name(&e.name));
        let err = rel_err(&g, &read(&exp, &key));
        assert!(err < 1e-3, "{case}: {key} rel err {err:e}");
        checked += 1;
    }
    let n_ref = exp.names().filter(|n| n.starts_with("grad.")).count();
    assert_eq!(
        checked, n_ref,
        "every LoRA gradient PEFT reports was checked"
    );
}

#[test]
fn llama_lora_gradients_match_peft() {
    check_lora("llama_gqa", "adapter", "expected_lora.safetensors");
}

#[test]
fn qwen2_lora_gradients_match_peft() {
    check_lora("qwen2", "adapter", "expected_lora.safetensors");
}

#[test]
fn lora_with_modules_to_save_matches_peft() {
    check_lora("llama_gqa", "adapter_mts", "expected_lora_mts.safetensors");
}

#[test]
fn gradient_checkpointing_gives_bitwise_identical_gradients() {
    let dir = fixture("llama_gqa");
    let lora = read_adapter_config(&dir.join("adapter")).unwrap();
    let b = batch("llama_gqa");
    let mut all = Vec::new();
    for ckpt in [false, true] {
        let mut m = load_model(Cpu, &dir.join("model"), TrainMode::Lora(lora.clone()), 0).unwrap();
        m.load_adapter(&dir.join("adapter")).unwrap();
        m.gradient_checkpointing = ckpt;
        m.zero_grads().unwrap();
        m.forward_backward(&b, 0.05, Some(7)).unwrap();
        let names: Vec<String> = m
            .layout
            .tensors
            .iter()
            .filter(|e| e.slot.trainable)
            .map(|e| e.name.clone())
            .collect();
        all.push(
            names
                .iter()
                .map(|n| m.get_grad(n).unwrap())
                .collect::<Vec<_>>(),
        );
    }
    assert!(!all[0].is_empty());
    assert!(all[0].iter().flatten().any(|&g| g != 0.0));
    assert_eq!(all[0], all[1]);
}

#[test]
fn merged_lora_model_dir_gives_the_adapters_logits() {
    // save_full_model in LoRA mode folds s·B·A into each weight (PEFT's
    // merge_and_unload); the merged dir, loaded as a plain model, must give the
    // logits of base + adapter (which match PEFT's, above).
    let dir = fixture("llama_gqa");
    let lora = read_adapter_config(&dir.join("adapter_mts")).unwrap();
    let mut m = load_model(Cpu, &dir.join("model"), TrainMode::Lora(lora), 0).unwrap();
    m.load_adapter(&dir.join("adapter_mts")).unwrap();
    let b = batch("llama_gqa");
    let (_, with_adapter) = m.forward(&b, true).unwrap();
    let out = tempfile::tempdir().unwrap();
    m.save_full_model(out.path(), rlhf_worker::model::weights::SaveDtype::F32)
        .unwrap();
    let mut merged = load_model(Cpu, out.path(), TrainMode::Full, 0).unwrap();
    let (_, logits) = merged.forward(&b, true).unwrap();
    let exp = expected("llama_gqa", "expected_lora_mts.safetensors");
    let e = rel_err(&logits.unwrap(), &read(&exp, "logits"));
    assert!(e < 1e-4, "merged logits rel err vs PEFT {e:e}");
    let e2 = rel_err(&with_adapter.unwrap(), &read(&exp, "logits"));
    assert!(e2 < 1e-4);
}
