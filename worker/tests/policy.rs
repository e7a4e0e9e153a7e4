//! The model as an RL policy against PyTorch + PEFT (fixtures made by
//! scripts/make_policy_fixtures.py on the llama_gqa model and adapter):
//! per-token log-probabilities, entropies, value-head values, the reference
//! log-probabilities with the adapter disabled, and the gradients of
//! Σ w·logp + Σ u·values. Also: a reward-model adapter swapped in over the
//! policy's base scores as PEFT's SEQ_CLS model does, and leaves the policy
//! untouched.

use rlhf_kernels::Cpu;
use rlhf_worker::model::params::Head;
use rlhf_worker::model::pretrained::{load_model_with_head, read_adapter_config};
use rlhf_worker::model::weights::TensorFiles;
use rlhf_worker::model::{Batch, Llama, TrainMode};
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

fn flat(v: &Value, key: &str) -> Vec<i64> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
        .collect()
}

fn batch() -> Batch {
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("policy/inputs.json")).unwrap(),
    )
    .unwrap();
    let ids = flat(&v, "input_ids");
    let b = v["input_ids"].as_array().unwrap().len();
    Batch {
        b,
        t: ids.len() / b,
        input_ids: ids.iter().map(|&x| x as u32).collect(),
        attention_mask: Some(
            flat(&v, "attention_mask")
                .iter()
                .map(|&x| x as u8)
                .collect(),
        ),
        labels: flat(&v, "labels").iter().map(|&x| x as i32).collect(),
        sample_keys: (0..b as u64).collect(),
    }
}

/// The llama_gqa model with its PEFT adapter and the fixture's value head.
fn policy() -> Llama<Cpu> {
    let adapter = fixtures().join("llama_gqa/adapter");
    let mode = TrainMode::Lora(read_adapter_config(&adapter).unwrap());
    let mut m = load_model_with_head(
        Cpu,
        &fixtures().join("llama_gqa/model"),
        mode,
        Head::CausalLmWithValue,
        0,
    )
    .unwrap();
    m.load_adapter(&adapter).unwrap();
    m.load_value_head(&fixtures().join("policy")).unwrap();
    m
}

#[test]
fn log_probs_entropy_values_and_reference_match_pytorch() {
    let exp = TensorFiles::open_files(&[fixtures().join("policy/expected.safetensors")]).unwrap();
    let mut m = policy();
    let b = batch();
    let out = m.token_forward(&b, None, true).unwrap();
    let e = rel_err(&out.logp, &read(&exp, "logp"));
    assert!(e < 1e-5, "logp rel err {e}");
    // Entropy at padded positions is of no use; compare where the mask is 1.
    let mask = b.attention_mask.as_ref().unwrap();
    let keep = |xs: &[f32]| -> Vec<f32> {
        xs.iter()
            .zip(mask)
            .filter(|(_, &m)| m == 1)
            .map(|(&x, _)| x)
            .collect()
    };
    let ent = out.entropy.as_ref().unwrap();
    let e = rel_err(&keep(ent), &keep(&read(&exp, "entropy")));
    assert!(e < 1e-5, "entropy rel err {e}");
    let values = out.values.as_ref().unwrap();
    let e = rel_err(&keep(values), &keep(&read(&exp, "values")));
    assert!(e < 1e-5, "values rel err {e}");
    // Ignored positions give exactly 0.
    let targets = b.shifted_targets();
    for (lp, t) in out.logp.iter().zip(&targets) {
        if *t == -100 {
            assert_eq!(*lp, 0.0);
        }
    }

    // The reference: the same weights with the adapter off.
    m.set_adapter_enabled(false);
    let reference = m.token_forward(&b, None, false).unwrap();
    m.set_adapter_enabled(true);
    let e = rel_err(&reference.logp, &read(&exp, "ref_logp"));
    assert!(e < 1e-5, "reference logp rel err {e}");
    let max_diff = reference
        .logp
        .iter()
        .zip(&out.logp)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        max_diff > 1e-3,
        "the adapter changes the policy ({max_diff})"
    );
    // Switching back gives the policy again, bitwise.
    let again = m.token_forward(&b, None, false).unwrap();
    assert_eq!(again.logp, out.logp);
}

#[test]
fn gradients_of_weighted_log_probs_and_values_match_pytorch() {
    let exp = TensorFiles::open_files(&[fixtures().join("policy/expected.safetensors")]).unwrap();
    let mut m = policy();
    let b = batch();
    let mask = b.attention_mask.clone().unwrap();
    m.zero_grads().unwrap();
    m.token_forward(&b, None, false).unwrap();
    let w = read(&exp, "w");
    let u: Vec<f32> = read(&exp, "u")
        .iter()
        .zip(&mask)
        .map(|(&x, &k)| if k == 1 { x } else { 0.0 })
        .collect();
    m.token_backward(&b, &w, Some(&u), None).unwrap();
    let mut checked = 0;
    for name in exp.names().map(str::to_string).collect::<Vec<_>>() {
        let Some(key) = name.strip_prefix("grad.") else {
            continue;
        };
        let ours_name = key.strip_prefix("base_model.model.").unwrap_or(key);
        let ours = m.get_grad(ours_name).unwrap();
        let e = rel_err(&ours, &read(&exp, &name));
        assert!(e < 1e-4, "{ours_name}: rel err {e}");
        checked += 1;
    }
    assert_eq!(
        checked,
        2 * 7 * 2 + 2,
        "every LoRA tensor and the value head"
    );
}

#[test]
fn a_reward_adapter_over_the_policy_base_scores_as_peft_and_leaves_the_policy_alone() {
    let mut m = policy();
    let b = batch();
    let before = m.token_forward(&b, None, true).unwrap();
    let rm_dir = fixtures().join("reward/llama_gqa/adapter");
    let mut rm = m.load_adapter_over(&rm_dir, Head::Score).unwrap();
    // The reward fixture's batch and PyTorch scores.
    let inputs: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reward/inputs.json")).unwrap(),
    )
    .unwrap();
    let ids = flat(&inputs, "input_ids");
    let rows = inputs["input_ids"].as_array().unwrap().len();
    let rb = Batch {
        b: rows,
        t: ids.len() / rows,
        input_ids: ids.iter().map(|&x| x as u32).collect(),
        attention_mask: Some(
            flat(&inputs, "attention_mask")
                .iter()
                .map(|&x| x as u8)
                .collect(),
        ),
        labels: vec![-100; ids.len()],
        sample_keys: (0..rows as u64).collect(),
    };
    let pad = inputs["pad_token_id"].as_u64().unwrap() as u32;
    let scores = m
        .with_adapter(&mut rm, |m| {
            m.cfg.pad_token_id = Some(pad);
            m.score_forward(&rb, None)
        })
        .unwrap();
    let exp =
        TensorFiles::open_files(&[fixtures().join("reward/llama_gqa/expected_lora.safetensors")])
            .unwrap();
    let e = rel_err(&scores, &read(&exp, "scores"));
    assert!(e < 1e-5, "scores rel err {e}");
    // The policy is back, bitwise, with its own head.
    let after = m.token_forward(&b, None, true).unwrap();
    assert_eq!(after, before);
    // A layout that trains the embeddings cannot share the frozen base.
    let mut lora = read_adapter_config(&rm_dir).unwrap();
    lora.modules_to_save = vec!["embed_tokens".into()];
    let err = m
        .new_adapter(TrainMode::Lora(lora), Head::Score)
        .err()
        .expect("embeddings trained in full cannot share the base");
    assert!(err.to_string().contains("cannot share the base"), "{err}");
}
