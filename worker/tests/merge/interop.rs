//! Adapter interop, direction rlhf → PEFT (PEFT → rlhf is
//! against_pytorch.rs `check_lora`). The fixture script loaded an adapter our
//! save code wrote (fixtures/merge/rlhf_adapter) with `PeftModel.from_pretrained`
//! and committed its logits; it also committed what PEFT itself writes for the
//! same LoraConfig. Here we save the same adapter with today's code and require
//! (i) PEFT's config fields, tensor names, shapes and dtypes, (ii) the files
//! PEFT loaded, unchanged, and (iii) our logits = PEFT's on our adapter.
//! A change to the save format fails (i) or (ii) until the fixture is
//! regenerated — and re-checked by PEFT.

use super::{batch, fixtures, read, rel_err};
use rlhf_kernels::Cpu;
use rlhf_worker::model::pretrained::{load_model, read_adapter_config};
use rlhf_worker::model::weights::TensorFiles;
use rlhf_worker::model::{Llama, LoraConfig, TrainMode};
use serde_json::Value;
use std::path::Path;

/// The adapter's values: exact binary fractions the fixture script computes
/// identically (`fixed_value` there), keyed by the PEFT tensor name.
fn fixed_value(name: &str, i: usize) -> f32 {
    (((i * 7 + name.len()) % 17) as f32 - 8.0) / 64.0
}

fn lora_config() -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.05,
        target_modules: LoraConfig::parse_target_modules("all").unwrap(),
        modules_to_save: vec!["lm_head".into()],
    }
}

/// Our model on llama_gqa with the fixed adapter values, saved with our code.
fn save_with_our_code(dir: &Path) -> Llama<Cpu> {
    let base = fixtures().join("llama_gqa/model");
    let mut m = load_model(Cpu, &base, TrainMode::Lora(lora_config()), 0).unwrap();
    let trainable: Vec<_> = m
        .layout
        .tensors
        .iter()
        .filter(|e| e.slot.trainable)
        .map(|e| (e.name.clone(), e.slot.len))
        .collect();
    for (name, len) in trainable {
        let key = Llama::<Cpu>::peft_name(&name);
        let v: Vec<f32> = (0..len).map(|i| fixed_value(&key, i)).collect();
        m.set_tensor(&name, &v).unwrap();
    }
    m.save_adapter(dir, None).unwrap();
    m
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Regenerates fixtures/merge/rlhf_adapter (then run scripts/make_merge_fixtures.py).
#[test]
#[ignore]
fn write_rlhf_adapter_fixture() {
    let dir = fixtures().join("merge/rlhf_adapter");
    let _ = std::fs::remove_dir_all(&dir);
    save_with_our_code(&dir);
}

#[test]
fn adapter_saved_by_rlhf_has_peft_format_and_peft_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ours = save_with_our_code(tmp.path());
    let merge_dir = fixtures().join("merge");

    // (i) adapter_config.json: every field PEFT reads to rebuild the LoRA layers
    // has PEFT's value, and we write no field PEFT does not know.
    let cfg = json(&tmp.path().join("adapter_config.json"));
    let peft = json(&merge_dir.join("peft_reference_adapter_config.json"));
    let as_set = |v: &Value| -> std::collections::BTreeSet<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        as_set(&cfg["target_modules"]),
        as_set(&peft["target_modules"])
    );
    for key in [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "bias",
        "fan_in_fan_out",
        "use_rslora",
        "use_dora",
        "init_lora_weights",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
        "inference_mode",
    ] {
        assert!(cfg.get(key).is_some(), "we do not write {key:?}");
        // Numbers compare by value: PEFT writes alpha 8, we write 8.0; Python reads both as 8.
        match (&cfg[key], &peft[key]) {
            (Value::Number(a), Value::Number(b)) => assert_eq!(a.as_f64(), b.as_f64(), "{key}"),
            (a, b) => assert_eq!(a, b, "{key}"),
        }
    }
    for key in cfg.as_object().unwrap().keys() {
        assert!(
            peft.get(key).is_some(),
            "we write {key:?}, which PEFT does not know"
        );
    }
    // Tensor names, shapes and dtypes: exactly what PEFT writes.
    let files = TensorFiles::open_files(&[tmp.path().join("adapter_model.safetensors")]).unwrap();
    let reference = json(&merge_dir.join("peft_reference_tensors.json"));
    let reference = reference.as_object().unwrap();
    assert_eq!(files.names().count(), reference.len());
    for (name, want) in reference {
        let (dtype, shape) = files
            .info(name)
            .unwrap_or_else(|| panic!("we do not write {name}"));
        let want_shape: Vec<usize> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(shape, want_shape, "{name}");
        assert_eq!(want["dtype"], "float32");
        assert_eq!(dtype, safetensors::Dtype::F32, "{name}");
    }

    // (ii) What PEFT loaded is what we write today: same config, same tensors.
    let committed = merge_dir.join("rlhf_adapter");
    assert_eq!(
        cfg,
        json(&committed.join("adapter_config.json")),
        "adapter_config.json changed"
    );
    let then = TensorFiles::open_files(&[committed.join("adapter_model.safetensors")]).unwrap();
    for name in files.names() {
        assert_eq!(
            files.raw_bytes(name).unwrap(),
            then.raw_bytes(name).unwrap(),
            "{name} changed"
        );
    }
    assert_eq!(read_adapter_config(tmp.path()).unwrap(), lora_config());

    // (iii) PEFT's logits on our adapter = ours.
    let exp = TensorFiles::open_files(&[merge_dir.join("expected_interop.safetensors")]).unwrap();
    let logits = ours.forward(&batch(), true).unwrap().1.unwrap();
    let e = rel_err(&logits, &read(&exp, "logits"));
    eprintln!("our logits vs PEFT's on our adapter: rel err {e:e}");
    assert!(
        e < 1e-4,
        "our logits vs PEFT's on our adapter: rel err {e:e}"
    );
    // And through the loading path a user takes.
    let base = fixtures().join("llama_gqa/model");
    let mut reloaded = load_model(
        Cpu,
        &base,
        TrainMode::Lora(read_adapter_config(tmp.path()).unwrap()),
        1,
    )
    .unwrap();
    reloaded.load_adapter(tmp.path()).unwrap();
    let e2 = rel_err(
        &reloaded.forward(&batch(), true).unwrap().1.unwrap(),
        &read(&exp, "logits"),
    );
    assert!(e2 < 1e-4, "reloaded: rel err {e2:e}");
}
