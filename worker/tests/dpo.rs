//! DPO against PyTorch + PEFT (fixture made by scripts/make_dpo_fixtures.py
//! on the llama_gqa model and adapter, TRL's sigmoid loss written by hand):
//! the reference log-probabilities with the adapter off, the loss, the
//! rewards and the gradient of every LoRA tensor, all through the code the
//! `rlhf dpo` stage runs (precompute_reference, the DpoPairs objective,
//! evaluate_dpo).

use rlhf_kernels::Cpu;
use rlhf_worker::collective::Single;
use rlhf_worker::model::params::Head;
use rlhf_worker::model::pretrained::{load_model_with_head, read_adapter_config};
use rlhf_worker::model::weights::TensorFiles;
use rlhf_worker::model::{Llama, TrainMode};
use rlhf_worker::stages::dpo::{evaluate_dpo, precompute_reference, DpoPair, DpoPairs};
use rlhf_worker::train::trainer::Objective;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read(files: &TensorFiles, name: &str) -> Vec<f32> {
    let shape = files
        .shape(name)
        .unwrap_or_else(|| panic!("fixture lacks {name}"));
    files.read_f32(name, &shape).unwrap()
}

/// max|a−b| / max|b|.
fn rel_err(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let scale = reference.iter().fold(0f64, |m, &x| m.max(x.abs() as f64));
    let diff = ours
        .iter()
        .zip(reference)
        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    diff / scale.max(1e-30)
}

fn inputs() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("dpo/inputs.json")).unwrap())
        .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The fixture's pairs, reference log-probs not yet set.
fn pairs(v: &Value) -> Vec<DpoPair> {
    v["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| DpoPair {
            prompt: ids(&p["prompt"]),
            chosen: ids(&p["chosen"]),
            rejected: ids(&p["rejected"]),
            ref_chosen: f32::NAN,
            ref_rejected: f32::NAN,
        })
        .collect()
}

/// The llama_gqa model with its PEFT adapter (lora_dropout 0).
fn policy() -> Llama<Cpu> {
    let adapter = fixtures().join("llama_gqa/adapter");
    let mode = TrainMode::Lora(read_adapter_config(&adapter).unwrap());
    let mut m = load_model_with_head(
        Cpu,
        &fixtures().join("llama_gqa/model"),
        mode,
        Head::CausalLm,
        0,
    )
    .unwrap();
    m.load_adapter(&adapter).unwrap();
    m
}

/// Compare every `grad.*` tensor of the fixture with the model's gradients.
fn assert_grads_match(m: &Llama<Cpu>, exp: &TensorFiles, what: &str) -> f64 {
    let mut worst = 0f64;
    let mut checked = 0;
    for name in exp.names().map(str::to_string).collect::<Vec<_>>() {
        let Some(key) = name.strip_prefix("grad.") else {
            continue;
        };
        let ours_name = key.strip_prefix("base_model.model.").unwrap_or(key);
        let e = rel_err(&m.get_grad(ours_name).unwrap(), &read(exp, &name));
        assert!(e < 1e-4, "{what}: {ours_name}: rel err {e}");
        worst = worst.max(e);
        checked += 1;
    }
    assert_eq!(checked, 2 * 7 * 2, "{what}: every LoRA tensor");
    worst
}

#[test]
fn dpo_loss_rewards_and_gradients_match_pytorch() {
    let exp = TensorFiles::open_files(&[fixtures().join("dpo/expected.safetensors")]).unwrap();
    let v = inputs();
    let beta = v["beta"].as_f64().unwrap() as f32;
    let pad = v["pad_token_id"].as_u64().unwrap() as u32;
    let mut m = policy();
    let mut items = pairs(&v);

    // Reference: the adapter off, computed once (batch size 1 here: the
    // padding of a batch must not matter).
    precompute_reference(&mut m, &mut items, 1, pad, &mut Single).unwrap();
    assert!(m.adapter_enabled(), "the adapter is back on afterwards");
    let rc: Vec<f32> = items.iter().map(|p| p.ref_chosen).collect();
    let rr: Vec<f32> = items.iter().map(|p| p.ref_rejected).collect();
    let e_ref = rel_err(&rc, &read(&exp, "reference_chosen_logps"))
        .max(rel_err(&rr, &read(&exp, "reference_rejected_logps")));
    assert!(e_ref < 1e-5, "reference logps rel err {e_ref}");
    let mut batched = pairs(&v);
    precompute_reference(&mut m, &mut batched, 2, pad, &mut Single).unwrap();
    for (a, b) in batched.iter().zip(&items) {
        assert!((a.ref_chosen - b.ref_chosen).abs() < 1e-5);
        assert!((a.ref_rejected - b.ref_rejected).abs() < 1e-5);
    }

    // Both pairs in one micro-batch of a step of 2 pairs: grad_scale 1/2.
    let objective = DpoPairs::new(pad, beta);
    let refs: Vec<&DpoPair> = items.iter().collect();
    m.zero_grads().unwrap();
    let stats = objective
        .forward_backward(&mut m, &refs, &[0, 1], 0.5, 7)
        .unwrap();
    let loss = stats.loss_sum / 2.0;
    let want = read(&exp, "loss")[0] as f64;
    let e_loss = (loss - want).abs() / want.abs();
    assert!(e_loss < 1e-5, "loss {loss} vs PyTorch {want}");
    let e_grad = assert_grads_match(&m, &exp, "one micro-batch");

    // Training metrics as TRL names them, means over the 2 pairs.
    let sums: std::collections::HashMap<_, _> =
        <DpoPairs as Objective<Cpu>>::take_train_sums(&objective)
            .into_iter()
            .collect();
    let cr = read(&exp, "chosen_rewards");
    let rj = read(&exp, "rejected_rewards");
    let mean = |x: &[f32]| x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
    assert!((sums["rewards/chosen"] / 2.0 - mean(&cr)).abs() < 1e-5);
    assert!((sums["rewards/rejected"] / 2.0 - mean(&rj)).abs() < 1e-5);
    let margins: Vec<f32> = cr.iter().zip(&rj).map(|(c, r)| c - r).collect();
    assert!((sums["rewards/margins"] / 2.0 - mean(&margins)).abs() < 1e-5);
    let wins = cr.iter().zip(&rj).filter(|(c, r)| c > r).count() as f64;
    assert_eq!(sums["rewards/accuracies"], wins);
    let pc = read(&exp, "policy_chosen_logps");
    assert!((sums["logps/chosen"] / 2.0 - mean(&pc)).abs() < 1e-4);

    // Gradient accumulation: one pair per micro-batch, the same step.
    m.zero_grads().unwrap();
    for (i, p) in items.iter().enumerate() {
        objective
            .forward_backward(&mut m, &[p], &[i as u64], 0.5, 7)
            .unwrap();
    }
    let e_acc = assert_grads_match(&m, &exp, "accumulated");

    // Evaluation: the same loss and rewards, no gradient needed.
    let ev = evaluate_dpo(&mut m, &items, 1, pad, beta, &mut Single).unwrap();
    assert!((ev.loss - want).abs() / want < 1e-5, "{ev:?}");
    assert!((ev.rewards_chosen - mean(&cr)).abs() < 1e-5, "{ev:?}");
    assert!((ev.rewards_rejected - mean(&rj)).abs() < 1e-5, "{ev:?}");
    assert_eq!(ev.accuracy, wins / 2.0);
    assert_eq!(ev.pairs, 2);
    eprintln!(
        "DPO vs PyTorch: reference logps rel err {e_ref:.2e}, loss {e_loss:.2e}, LoRA grads {e_grad:.2e} (accumulated {e_acc:.2e})"
    );
}

#[test]
fn the_reference_needs_an_adapter() {
    let mut full = load_model_with_head(
        Cpu,
        &fixtures().join("llama_gqa/model"),
        TrainMode::Full,
        Head::CausalLm,
        0,
    )
    .unwrap();
    let mut items = pairs(&inputs());
    let err = precompute_reference(&mut full, &mut items, 1, 0, &mut Single).unwrap_err();
    assert!(err.to_string().contains("adapter"), "{err}");
}
