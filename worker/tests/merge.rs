//! `rlhf merge` against PEFT's `merge_and_unload()` and transformers'
//! `save_pretrained` (fixtures: scripts/make_merge_fixtures.py, see
//! tests/fixtures/merge/README.md), plus adapter interop in both directions.

#[path = "merge/interop.rs"]
mod interop;

use rlhf_kernels::Cpu;
use rlhf_worker::merge::{run, MergeArgs, MergeSummary};
use rlhf_worker::model::pretrained::load_model;
use rlhf_worker::model::weights::TensorFiles;
use rlhf_worker::model::{Batch, TrainMode};
use safetensors::Dtype;
use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}
fn gqa(sub: &str) -> PathBuf {
    fixtures().join("llama_gqa").join(sub)
}
fn merge_fixture(sub: &str) -> PathBuf {
    fixtures().join("merge").join(sub)
}

/// The llama_gqa fixture batch (inputs.json).
pub fn batch() -> Batch {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gqa("inputs.json")).unwrap()).unwrap();
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
pub fn rel_err(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let scale = reference.iter().fold(0f64, |m, &x| m.max(x.abs() as f64));
    let diff = ours
        .iter()
        .zip(reference)
        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    diff / scale.max(1e-30)
}

pub fn read(files: &TensorFiles, name: &str) -> Vec<f32> {
    let shape = files
        .shape(name)
        .unwrap_or_else(|| panic!("no tensor {name}"));
    files.read_f32(name, &shape).unwrap()
}

fn args(base: &Path, adapter: &Path, out: &Path) -> MergeArgs {
    MergeArgs {
        model_name_or_path: base.to_path_buf(),
        peft_path: adapter.to_path_buf(),
        output_dir: out.to_path_buf(),
        tokenizer_path: None,
        max_shard_size: "10GB".into(),
        torch_dtype: "auto".into(),
        resize_emb: false,
    }
}

fn merge(base: &Path, adapter: &Path, out: &Path) -> MergeSummary {
    run(&args(base, adapter, out)).unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Our model's logits for the fixture batch from a plain model dir.
fn logits_of_dir(dir: &Path) -> Vec<f32> {
    let mut m = load_model(Cpu, dir, TrainMode::Full, 0).unwrap();
    m.forward(&batch(), true).unwrap().1.unwrap()
}

/// Every tensor PEFT's merge produced (`tensor.<name>` in `expected`) equals
/// ours within 1e-6 relative, and we wrote no other tensors.
fn assert_tensors_match(ours: &TensorFiles, expected: &TensorFiles, prefix: &str, all: bool) {
    let (mut n, mut worst) = (0, 0f64);
    for key in expected.names().filter(|k| k.starts_with(prefix)) {
        let name = &key[prefix.len()..];
        assert!(ours.contains(name), "merged dir lacks {name}");
        let e = rel_err(&read(ours, name), &read(expected, key));
        worst = worst.max(e);
        assert!(e < 1e-6, "{name}: rel err {e:e} vs PEFT's merge");
        n += 1;
    }
    assert!(n > 0);
    eprintln!("{n} merged tensors vs PEFT: worst rel err {worst:e}");
    if all {
        assert_eq!(ours.names().count(), n, "exactly PEFT's tensor names");
    }
}

#[test]
fn merged_dir_equals_peft_merge_and_unload_and_gives_its_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let s = merge(&gqa("model"), &gqa("adapter_mts"), &out);
    assert_eq!(s.lora_merged, 14, "7 linears × 2 layers");
    assert_eq!(s.replaced, ["lm_head.weight", "model.embed_tokens.weight"]);
    assert_eq!(s.weight_files, ["model.safetensors"], "fits in one file");
    let exp = TensorFiles::open_files(&[merge_fixture("expected_causal.safetensors")]).unwrap();
    let ours = TensorFiles::open_model_dir(&out).unwrap();
    assert_tensors_match(&ours, &exp, "tensor.", true);
    assert!(ours.names().all(|n| ours.info(n).unwrap().0 == Dtype::F32));
    let e = rel_err(&logits_of_dir(&out), &read(&exp, "logits"));
    eprintln!("merged dir logits vs PEFT merge_and_unload: rel err {e:e}");
    assert!(
        e < 1e-4,
        "logits of our merged dir vs PEFT merge_and_unload: rel err {e:e}"
    );
    // The config is the base's (f32 stays f32: no dtype change).
    assert_eq!(
        json(&out.join("config.json")),
        json(&gqa("model/config.json"))
    );
    // Nothing but the output dir is left beside it.
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["merged"]);
}

#[test]
fn rslora_scale_is_alpha_over_sqrt_r() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let s = merge(&gqa("model"), &merge_fixture("adapter_qv_rslora"), &out);
    assert_eq!(s.scaling, 4.0, "8/√4 (alpha/r would be 2)");
    let exp = TensorFiles::open_files(&[merge_fixture("expected_qv_rslora.safetensors")]).unwrap();
    assert_tensors_match(
        &TensorFiles::open_model_dir(&out).unwrap(),
        &exp,
        "f32.",
        false,
    );
}

/// The distance between two bf16 values in units of the reference's last place.
fn bf16_ulps(ours: f32, reference: f32) -> f32 {
    let ulp = half::bf16::from_f32(reference.abs()).to_f32() * 2f32.powi(-7);
    (ours - reference).abs() / ulp.max(f32::MIN_POSITIVE)
}

#[test]
fn bf16_base_stays_bf16_and_matches_peft_within_one_ulp() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    merge(
        &gqa("model_bf16"),
        &merge_fixture("adapter_qv_rslora"),
        &out,
    );
    let ours = TensorFiles::open_model_dir(&out).unwrap();
    let base = TensorFiles::open_model_dir(&gqa("model_bf16")).unwrap();
    for name in ours.names() {
        assert_eq!(ours.info(name).unwrap().0, Dtype::BF16, "{name}");
        if !name.contains("q_proj") && !name.contains("v_proj") {
            assert_eq!(
                ours.raw_bytes(name).unwrap(),
                base.raw_bytes(name).unwrap(),
                "{name} copied byte for byte"
            );
        }
    }
    assert_eq!(json(&out.join("config.json"))["dtype"], "bfloat16");
    // PEFT rounds the delta to bf16 and then the sum; we round W + delta once.
    // Both are within one bf16 ulp of each other; almost all are identical.
    let exp = TensorFiles::open_files(&[merge_fixture("expected_qv_rslora.safetensors")]).unwrap();
    let (mut same, mut total) = (0, 0);
    for key in exp.names().filter(|k| k.starts_with("bf16.")) {
        let name = &key[5..];
        for (a, b) in read(&ours, name).iter().zip(read(&exp, key)) {
            assert!(bf16_ulps(*a, b) <= 1.0, "{name}: {a} vs PEFT {b}");
            same += (*a == b) as usize;
            total += 1;
        }
    }
    assert_eq!(total, 2 * (32 * 32 + 16 * 32));
    assert!(
        same as f64 > 0.95 * total as f64,
        "{same}/{total} identical to PEFT"
    );
}

#[test]
fn torch_dtype_converts_every_tensor_and_the_config() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let mut a = args(&gqa("model"), &gqa("adapter_mts"), &out);
    a.torch_dtype = "bfloat16".into();
    run(&a).unwrap();
    let ours = TensorFiles::open_model_dir(&out).unwrap();
    let exp = TensorFiles::open_files(&[merge_fixture("expected_causal.safetensors")]).unwrap();
    for name in ours.names() {
        assert_eq!(ours.info(name).unwrap().0, Dtype::BF16, "{name}");
        let want: Vec<f32> = read(&exp, &format!("tensor.{name}"))
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        let got = read(&ours, name);
        let ulps = got
            .iter()
            .zip(&want)
            .map(|(a, b)| bf16_ulps(*a, *b))
            .fold(0f32, f32::max);
        assert!(
            ulps <= 1.0,
            "{name}: {ulps} ulps from PEFT's f32 merge rounded to bf16"
        );
    }
    assert_eq!(json(&out.join("config.json"))["dtype"], "bfloat16");
    let mut bad = args(&gqa("model"), &gqa("adapter_mts"), &tmp.path().join("x"));
    bad.torch_dtype = "float64".into();
    let e = format!("{:#}", run(&bad).unwrap_err());
    assert!(e.contains("--torch_dtype") && e.contains("float64"), "{e}");
}

#[test]
fn tiny_max_shard_size_writes_transformers_shards_and_index() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let mut a = args(&gqa("model"), &gqa("adapter_mts"), &out);
    a.max_shard_size = "20KB".into();
    let s = run(&a).unwrap();
    assert_eq!(s.weight_files.len(), 5);
    // transformers' save_pretrained(max_shard_size="20KB") of this architecture
    // (model_sharded, f32 like ours): the same index, byte for byte.
    assert_eq!(
        std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
        std::fs::read_to_string(gqa("model_sharded/model.safetensors.index.json")).unwrap()
    );
    assert!(!out.join("model.safetensors").exists());
    // Every tensor is in exactly one shard, the one the index names; sizes add up.
    let index = json(&out.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    let mut seen = std::collections::BTreeMap::new();
    let mut bytes = 0u64;
    for f in &s.weight_files {
        let shard = TensorFiles::open_files(&[out.join(f)]).unwrap();
        for n in shard.names() {
            assert!(
                seen.insert(n.to_string(), f.clone()).is_none(),
                "{n} in two shards"
            );
            assert_eq!(map[n], f.as_str());
            bytes += shard.raw_bytes(n).unwrap().len() as u64;
        }
    }
    assert_eq!(seen.len(), map.len());
    assert_eq!(index["metadata"]["total_size"], bytes);
    // Our loader reads the shards back to the same merged model.
    let exp = TensorFiles::open_files(&[merge_fixture("expected_causal.safetensors")]).unwrap();
    assert!(rel_err(&logits_of_dir(&out), &read(&exp, "logits")) < 1e-4);
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

#[test]
fn tokenizer_generation_config_and_custom_code_are_copied() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    copy_dir(&gqa("model"), &base);
    for (f, text) in [
        ("tokenizer.json", "base tokenizer"),
        ("tokenizer_config.json", "{\"from\": \"base\"}"),
        ("special_tokens_map.json", "{}"),
        ("chat_template.jinja", "{{ messages }}"),
        ("tokenizer.model", "spm"),
        ("modeling_custom.py", "# custom model code"),
        ("tokenization_custom.py", "# custom tokenizer code"),
    ] {
        std::fs::write(base.join(f), text).unwrap();
    }
    // 1. Adapter without tokenizer files: everything from the base.
    let out = tmp.path().join("m1");
    let s = merge(&base, &gqa("adapter"), &out);
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "tokenizer.model",
        "modeling_custom.py",
        "tokenization_custom.py",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(base.join(f)).unwrap(),
            "{f}"
        );
        assert!(
            s.copied.iter().any(|c| c == f),
            "{f} listed in {:?}",
            s.copied
        );
    }
    assert_eq!(s.tokenizer_from.as_deref(), Some(base.as_path()));
    // 2. The adapter dir's tokenizer (saved by training, maybe with added tokens) wins.
    let adapter = tmp.path().join("adapter");
    copy_dir(&gqa("adapter"), &adapter);
    std::fs::write(adapter.join("tokenizer.json"), "adapter tokenizer").unwrap();
    let out2 = tmp.path().join("m2");
    merge(&base, &adapter, &out2);
    assert_eq!(
        std::fs::read_to_string(out2.join("tokenizer.json")).unwrap(),
        "adapter tokenizer"
    );
    assert!(
        !out2.join("tokenizer.model").exists(),
        "one tokenizer source, not a mix"
    );
    assert!(
        out2.join("modeling_custom.py").exists(),
        "*.py always from the base"
    );
    // 3. --tokenizer_path wins over both; an empty one is an error naming it.
    let tok = tmp.path().join("tok");
    std::fs::create_dir(&tok).unwrap();
    std::fs::write(tok.join("tokenizer.json"), "explicit tokenizer").unwrap();
    let out3 = tmp.path().join("m3");
    let mut a = args(&base, &adapter, &out3);
    a.tokenizer_path = Some(tok.clone());
    run(&a).unwrap();
    assert_eq!(
        std::fs::read_to_string(out3.join("tokenizer.json")).unwrap(),
        "explicit tokenizer"
    );
    a.tokenizer_path = Some(tmp.path().join("m1/..").join("base/none"));
    a.output_dir = tmp.path().join("m4");
    std::fs::create_dir(base.join("none")).unwrap();
    let e = format!("{:#}", run(&a).unwrap_err());
    assert!(e.contains("--tokenizer_path") && e.contains("none"), "{e}");
    assert!(!tmp.path().join("m4").exists());
}

#[test]
fn seq_cls_adapter_merges_into_a_sequence_classification_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("rm");
    let s = merge(&gqa("model"), &merge_fixture("adapter_seqcls"), &out);
    assert_eq!(s.task_type, "SEQ_CLS");
    assert_eq!(s.added, ["score.weight"]);
    assert_eq!(s.dropped, ["lm_head.weight"]);
    let ours = TensorFiles::open_model_dir(&out).unwrap();
    assert!(!ours.contains("lm_head.weight"));
    assert_eq!(ours.shape("score.weight"), Some(vec![1, 32]));
    let exp = TensorFiles::open_files(&[merge_fixture("expected_seqcls.safetensors")]).unwrap();
    assert_tensors_match(&ours, &exp, "tensor.", false);
    // The rest is the base, unchanged.
    let base = TensorFiles::open_model_dir(&gqa("model")).unwrap();
    for n in ours
        .names()
        .filter(|n| !n.contains("q_proj") && !n.contains("v_proj") && *n != "score.weight")
    {
        assert_eq!(
            ours.raw_bytes(n).unwrap(),
            base.raw_bytes(n).unwrap(),
            "{n}"
        );
    }
    // config.json exactly as transformers saved PEFT's merged
    // AutoModelForSequenceClassification(num_labels=1).
    assert_eq!(
        json(&out.join("config.json")),
        json(&merge_fixture("transformers_seqcls_config.json"))
    );
}

/// The merge fails with an error containing every needle, and leaves neither
/// the output dir nor a staging dir behind.
fn assert_fails(a: &MergeArgs, needles: &[&str]) -> String {
    let e = format!("{:#}", run(a).unwrap_err());
    for n in needles {
        assert!(e.contains(n), "error lacks {n:?}: {e}");
    }
    assert!(
        !a.output_dir.exists(),
        "{} was created",
        a.output_dir.display()
    );
    let parent = a.output_dir.parent().unwrap();
    let hidden: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "staging left behind: {hidden:?}");
    e
}

/// A copy of an adapter dir with `edit` applied to its adapter_config.json.
fn adapter_with_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let d = dir.join("adapter_edited");
    copy_dir(&gqa("adapter"), &d);
    let mut cfg = json(&d.join("adapter_config.json"));
    edit(&mut cfg);
    std::fs::write(d.join("adapter_config.json"), cfg.to_string()).unwrap();
    d
}

#[test]
fn mismatched_base_is_refused_naming_tensor_and_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // llama_tied has 4 kv heads: k_proj is [32, 32], the adapter's lora_B is [16, 4].
    let e = assert_fails(
        &args(&fixtures().join("llama_tied/model"), &gqa("adapter"), &out),
        &[
            "shape mismatch",
            "k_proj",
            "llama_tied",
            "adapter_model.safetensors",
        ],
    );
    assert!(e.contains("[32, 32]") && e.contains("[16, 4]"), "{e}");
    // A base without a tensor the adapter targets.
    let base = tmp.path().join("base");
    std::fs::create_dir(&base).unwrap();
    std::fs::copy(gqa("model/config.json"), base.join("config.json")).unwrap();
    let full = TensorFiles::open_model_dir(&gqa("model")).unwrap();
    let kept: Vec<_> = full
        .names()
        .filter(|n| *n != "model.layers.1.self_attn.q_proj.weight")
        .map(|n| (n.to_string(), full.shape(n).unwrap(), read(&full, n)))
        .collect();
    rlhf_worker::model::weights::save_tensors(
        &base.join("model.safetensors"),
        &kept,
        rlhf_worker::model::weights::SaveDtype::F32,
        None,
    )
    .unwrap();
    assert_fails(
        &args(&base, &gqa("adapter"), &out),
        &[
            "model.layers.1.self_attn.q_proj.weight",
            "no such tensor",
            "base",
        ],
    );
    // modules_to_save of a tensor the (tied) base does not have.
    let mts_only = tmp.path().join("mts");
    std::fs::create_dir(&mts_only).unwrap();
    std::fs::write(
        mts_only.join("adapter_config.json"),
        r#"{"peft_type":"LORA","task_type":"CAUSAL_LM","r":4,"lora_alpha":8,"target_modules":["q_proj"],"modules_to_save":["lm_head"]}"#,
    )
    .unwrap();
    rlhf_worker::model::weights::save_tensors(
        &mts_only.join("adapter_model.safetensors"),
        &[(
            "base_model.model.lm_head.weight".into(),
            vec![96, 32],
            vec![0.5; 96 * 32],
        )],
        rlhf_worker::model::weights::SaveDtype::F32,
        None,
    )
    .unwrap();
    assert_fails(
        &args(&fixtures().join("llama_tied/model"), &mts_only, &out),
        &["lm_head.weight", "llama_tied", "no tensor"],
    );
}

#[test]
fn missing_and_unsupported_adapter_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let no_weights = tmp.path().join("no_weights");
    copy_dir(&gqa("adapter"), &no_weights);
    std::fs::remove_file(no_weights.join("adapter_model.safetensors")).unwrap();
    assert_fails(
        &args(&gqa("model"), &no_weights, &out),
        &["adapter_model.safetensors", "missing"],
    );
    std::fs::write(no_weights.join("adapter_model.bin"), b"pickle").unwrap();
    assert_fails(
        &args(&gqa("model"), &no_weights, &out),
        &["adapter_model.bin", "safe_serialization"],
    );
    let no_config = tmp.path().join("no_config");
    copy_dir(&gqa("adapter"), &no_config);
    std::fs::remove_file(no_config.join("adapter_config.json")).unwrap();
    assert_fails(
        &args(&gqa("model"), &no_config, &out),
        &["adapter_config.json"],
    );
    assert_fails(
        &args(&gqa("model"), &tmp.path().join("nowhere"), &out),
        &["--peft_path", "nowhere"],
    );
    assert_fails(
        &args(&gqa("adapter"), &gqa("adapter"), &out),
        &["config.json", "adapter"],
    );

    let d = adapter_with_config(tmp.path(), |c| c["r"] = 8.into());
    assert_fails(
        &args(&gqa("model"), &d, &out),
        &["r mismatch", "r = 8", "[4, 48]"],
    );
    std::fs::remove_dir_all(&d).unwrap();
    let d = adapter_with_config(tmp.path(), |c| c["use_dora"] = true.into());
    assert_fails(
        &args(&gqa("model"), &d, &out),
        &["use_dora", "adapter_config.json"],
    );
    std::fs::remove_dir_all(&d).unwrap();
    let d = adapter_with_config(tmp.path(), |c| c["task_type"] = "TOKEN_CLS".into());
    assert_fails(&args(&gqa("model"), &d, &out), &["task_type", "TOKEN_CLS"]);
    std::fs::remove_dir_all(&d).unwrap();
    // A SEQ_CLS adapter without its score head cannot make a reward model.
    let d = adapter_with_config(tmp.path(), |c| c["task_type"] = "SEQ_CLS".into());
    assert_fails(&args(&gqa("model"), &d, &out), &["SEQ_CLS", "score.weight"]);
}

#[test]
fn a_non_empty_output_dir_is_refused_and_an_empty_one_is_used() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let e = format!(
        "{:#}",
        run(&args(&gqa("model"), &gqa("adapter"), &out)).unwrap_err()
    );
    assert!(e.contains("not empty") && e.contains("out"), "{e}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    std::fs::remove_file(out.join("keep.txt")).unwrap();
    merge(&gqa("model"), &gqa("adapter"), &out);
    assert!(out.join("model.safetensors").is_file());
}

#[test]
fn a_failure_while_writing_leaves_no_output_dir() {
    // An adapter whose saved lm_head is int32: planning accepts it (same
    // shape), converting it fails — after the shards before it were written.
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    copy_dir(&gqa("adapter"), &adapter);
    let lora = TensorFiles::open_files(&[gqa("adapter/adapter_model.safetensors")]).unwrap();
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = lora
        .names()
        .map(|n| {
            let (dt, shape) = lora.info(n).unwrap();
            (
                n.to_string(),
                shape,
                lora.raw_bytes(n).unwrap().to_vec(),
                dt,
            )
        })
        .collect();
    owned.push((
        "base_model.model.lm_head.weight".into(),
        vec![96, 32],
        vec![0u8; 96 * 32 * 4],
        Dtype::I32,
    ));
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, s, b, dt)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        adapter.join("adapter_model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let out = tmp.path().join("sub/out");
    let mut a = args(&gqa("model"), &adapter, &out);
    a.max_shard_size = "20KB".into();
    assert_fails(&a, &["lm_head.weight", "I32"]);
}

/// An adapter that saves `embed_tokens` and/or `lm_head` with `vocab` rows
/// (a vocabulary extended from 96), plus llama_gqa/adapter's LoRA tensors.
fn adapter_with_vocab(dir: &Path, vocab: usize, which: &[&str]) -> PathBuf {
    let d = dir.join(format!("adapter_vocab_{}", which.len()));
    copy_dir(&gqa("adapter"), &d);
    let lora = TensorFiles::open_files(&[gqa("adapter/adapter_model.safetensors")]).unwrap();
    let mut tensors: Vec<_> = lora
        .names()
        .map(|n| (n.to_string(), lora.shape(n).unwrap(), read(&lora, n)))
        .collect();
    for m in which {
        let prefix = if *m == "lm_head" { "" } else { "model." };
        let v: Vec<f32> = (0..vocab * 32)
            .map(|i| ((i % 13) as f32 - 6.0) / 16.0)
            .collect();
        tensors.push((
            format!("base_model.model.{prefix}{m}.weight"),
            vec![vocab, 32],
            v,
        ));
    }
    rlhf_worker::model::weights::save_tensors(
        &d.join("adapter_model.safetensors"),
        &tensors,
        rlhf_worker::model::weights::SaveDtype::F32,
        None,
    )
    .unwrap();
    d
}

#[test]
fn resize_emb_takes_an_extended_vocabulary_from_the_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = adapter_with_vocab(tmp.path(), 100, &["embed_tokens", "lm_head"]);
    let out = tmp.path().join("m");
    // Without the flag: refused, with the hint.
    let e = assert_fails(
        &args(&gqa("model"), &adapter, &out),
        &["[100, 32]", "[96, 32]", "--resize_emb"],
    );
    assert!(e.contains("shape mismatch"), "{e}");
    let mut a = args(&gqa("model"), &adapter, &out);
    a.resize_emb = true;
    let s = run(&a).unwrap();
    assert_eq!(s.vocab_size, Some(100));
    assert_eq!(json(&out.join("config.json"))["vocab_size"], 100);
    let ours = TensorFiles::open_model_dir(&out).unwrap();
    let saved = TensorFiles::open_files(&[adapter.join("adapter_model.safetensors")]).unwrap();
    for (name, key) in [
        (
            "model.embed_tokens.weight",
            "base_model.model.model.embed_tokens.weight",
        ),
        ("lm_head.weight", "base_model.model.lm_head.weight"),
    ] {
        assert_eq!(read(&ours, name), read(&saved, key), "{name}");
    }
    // Our loader reads it as a 100-token model.
    let m = load_model(Cpu, &out, TrainMode::Full, 0).unwrap();
    assert_eq!(m.cfg.vocab_size, 100);
    // Only one of the two saved: the other would need invented rows.
    let half = adapter_with_vocab(tmp.path(), 100, &["embed_tokens"]);
    let mut a = args(&gqa("model"), &half, &tmp.path().join("m2"));
    a.resize_emb = true;
    assert_fails(
        &a,
        &[
            "--resize_emb",
            "lm_head.weight",
            "both embed_tokens and lm_head",
        ],
    );
}
