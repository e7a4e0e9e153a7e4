//! The reward model's score head against transformers'
//! `*ForSequenceClassification` and PEFT SEQ_CLS adapters on tiny random
//! models (fixtures made by scripts/make_reward_fixtures.py; see its README).
//!
//! Set RLHF_REWARD_CHECK_OUT=DIR to also keep the adapter and model dir we
//! save, with our scores, for `python scripts/check_reward_model.py DIR`.

use rlhf_kernels::Cpu;
use rlhf_worker::model::llama::last_non_pad_positions;
use rlhf_worker::model::params::{Head, SCORE_WEIGHT};
use rlhf_worker::model::pretrained::{load_model, load_model_with_head, read_adapter_config};
use rlhf_worker::model::weights::{save_tensors, SaveDtype, TensorFiles};
use rlhf_worker::model::{Batch, Llama, TrainMode};
use rlhf_worker::stages::rm::pairwise_loss;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const PAD: u32 = 0;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reward(case: &str) -> PathBuf {
    fixtures().join("reward").join(case)
}

fn inputs() -> Value {
    let p = fixtures().join("reward/inputs.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn rows(v: &Value, key: &str) -> Vec<Vec<i64>> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect()
}

/// The fixture batch: 2 pairs as rows [c0, r0, c1, r1], right-padded with PAD.
fn batch() -> Batch {
    let v = inputs();
    let ids = rows(&v, "input_ids");
    let mask = rows(&v, "attention_mask");
    let (b, t) = (ids.len(), ids[0].len());
    Batch {
        b,
        t,
        input_ids: ids.iter().flatten().map(|&x| x as u32).collect(),
        attention_mask: Some(mask.iter().flatten().map(|&x| x as u8).collect()),
        labels: vec![-100; b * t],
        sample_keys: (0..b as u64).collect(),
    }
}

fn rel_err(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let scale = reference.iter().fold(0f64, |m, &x| m.max(x.abs() as f64));
    let diff = ours
        .iter()
        .zip(reference)
        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    diff / scale.max(1e-30)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .fold(0f32, |m, (&x, &y)| m.max((x - y).abs()))
}

fn read(files: &TensorFiles, name: &str) -> Vec<f32> {
    let shape = files
        .shape(name)
        .unwrap_or_else(|| panic!("fixture lacks {name}"));
    files.read_f32(name, &shape).unwrap()
}

fn expected(case: &str, file: &str) -> TensorFiles {
    TensorFiles::open_files(&[reward(case).join(file)]).unwrap()
}

/// The base model dir of a case: llama has its own seq-cls dir (with
/// score.weight and pad_token_id); qwen2 uses the causal-LM fixture dir.
fn base_dir(case: &str) -> PathBuf {
    match case {
        "llama_gqa" => reward(case).join("model"),
        _ => fixtures().join(case).join("model"),
    }
}

/// Load a case's base with the score head; for the causal-LM dir, set what
/// transformers was given: pad_token_id and (full mode) the score weight.
fn load(case: &str, mode: TrainMode) -> Llama<Cpu> {
    let mut m = load_model_with_head(Cpu, &base_dir(case), mode, Head::Score, 0).unwrap();
    if case != "llama_gqa" {
        assert_eq!(m.cfg.pad_token_id, None);
        m.cfg.pad_token_id = Some(PAD);
        let w = read(&expected(case, "expected.safetensors"), SCORE_WEIGHT);
        m.set_tensor(SCORE_WEIGHT, &w).unwrap();
    }
    m
}

/// Scores, mean pairwise loss, and gradients (added into model.grads).
fn run(m: &mut Llama<Cpu>, b: &Batch) -> (Vec<f32>, f64) {
    m.zero_grads().unwrap();
    let scores = m.score_forward(b, None).unwrap();
    let pairs = b.b / 2;
    let (loss_sum, dscores) = pairwise_loss(&scores, 1.0 / pairs as f32);
    m.score_backward(b, &dscores, None).unwrap();
    (scores, loss_sum / pairs as f64)
}

fn check_scores_and_loss(case: &str, file: &str, scores: &[f32], loss: f64) {
    let exp = expected(case, file);
    let e = max_abs_diff(scores, &read(&exp, "scores"));
    assert!(e < 1e-4, "{case} {file}: scores differ by {e:e}");
    let ref_loss = read(&exp, "loss")[0] as f64;
    assert!(
        (loss - ref_loss).abs() < 1e-5,
        "{case} {file}: loss {loss} vs {ref_loss}"
    );
}

#[test]
fn reward_is_read_where_transformers_reads_it() {
    let v = inputs();
    let b = batch();
    let want: Vec<usize> = v["last_non_pad"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(
        last_non_pad_positions(&b.input_ids, b.b, b.t, Some(PAD)).unwrap(),
        want
    );
    // argmax(arange(T) * (ids != pad)): left padding, a pad inside the text,
    // and a row of pads only (index 0).
    let ids = [0, 0, 5, 6, 7, 0, 8, 0, 0, 0, 0, 0];
    assert_eq!(
        last_non_pad_positions(&ids, 3, 4, Some(0)).unwrap(),
        [3, 2, 0]
    );
    // No pad token: transformers reads the last position, for one row only.
    assert_eq!(last_non_pad_positions(&ids, 1, 4, None).unwrap(), [3]);
    let err = last_non_pad_positions(&ids, 3, 4, None).unwrap_err();
    assert!(err.to_string().contains("pad token"), "{err}");
}

fn check_full(case: &str) {
    let mut m = load(case, TrainMode::Full);
    let (scores, loss) = run(&mut m, &batch());
    check_scores_and_loss(case, "expected.safetensors", &scores, loss);
    let exp = expected(case, "expected.safetensors");
    let mut checked = 0;
    for key in exp.names().filter(|n| n.starts_with("grad.")) {
        let name = &key["grad.".len()..];
        let err = rel_err(&m.get_grad(name).unwrap(), &read(&exp, key));
        assert!(err < 1e-3, "{case}: {key} rel err {err:e}");
        checked += 1;
    }
    assert_eq!(checked, 5);
}

#[test]
fn llama_seq_cls_scores_loss_and_gradients_match_pytorch() {
    check_full("llama_gqa");
}

#[test]
fn qwen2_score_head_on_a_causal_lm_dir_matches_pytorch() {
    check_full("qwen2");
}

/// Base + PEFT's SEQ_CLS adapter, as PeftModel.from_pretrained loads it.
fn load_lora(case: &str, adapter: &Path) -> Llama<Cpu> {
    let lora = read_adapter_config(adapter).unwrap();
    // classifier/score are implied by the head, not a module_to_save of ours.
    assert!(
        lora.modules_to_save.is_empty(),
        "{:?}",
        lora.modules_to_save
    );
    let mut m = load(case, TrainMode::Lora(lora));
    m.load_adapter(adapter).unwrap();
    m
}

fn check_lora(case: &str) {
    let mut m = load_lora(case, &reward(case).join("adapter"));
    let (scores, loss) = run(&mut m, &batch());
    check_scores_and_loss(case, "expected_lora.safetensors", &scores, loss);
    let exp = expected(case, "expected_lora.safetensors");
    let mut checked = 0;
    let trainable: Vec<String> = m
        .layout
        .tensors
        .iter()
        .filter(|e| e.slot.trainable)
        .map(|e| e.name.clone())
        .collect();
    assert!(trainable.iter().any(|n| n == SCORE_WEIGHT), "score trains");
    for name in &trainable {
        let key = format!("grad.{}", Llama::<Cpu>::peft_name(name));
        let err = rel_err(&m.get_grad(name).unwrap(), &read(&exp, &key));
        assert!(err < 1e-3, "{case}: {key} rel err {err:e}");
        checked += 1;
    }
    let n_ref = exp.names().filter(|n| n.starts_with("grad.")).count();
    assert_eq!(checked, n_ref, "every gradient PEFT reports was checked");
}

#[test]
fn llama_peft_seq_cls_adapter_scores_and_gradients_match_peft() {
    check_lora("llama_gqa");
}

#[test]
fn qwen2_peft_seq_cls_adapter_scores_and_gradients_match_peft() {
    check_lora("qwen2");
}

fn tensor_shapes(path: &Path) -> BTreeMap<String, Vec<usize>> {
    let f = TensorFiles::open_files(&[path.to_path_buf()]).unwrap();
    f.names()
        .map(|n| (n.to_string(), f.shape(n).unwrap()))
        .collect()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Where to keep what we save for the Python check, when asked.
fn check_out(name: &str) -> Option<PathBuf> {
    std::env::var_os("RLHF_REWARD_CHECK_OUT").map(|d| {
        let p = PathBuf::from(d).join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    })
}

/// Change the trainable weights (one plain gradient step), so a saved
/// adapter differs from the one we loaded.
fn perturb(m: &mut Llama<Cpu>) {
    run(m, &batch());
    let names: Vec<String> = m
        .layout
        .tensors
        .iter()
        .filter(|e| e.slot.trainable)
        .map(|e| e.name.clone())
        .collect();
    for n in names {
        let w = m.get_tensor(&n).unwrap();
        let g = m.get_grad(&n).unwrap();
        let new: Vec<f32> = w.iter().zip(&g).map(|(w, g)| w - 0.5 * g).collect();
        m.set_tensor(&n, &new).unwrap();
    }
}

fn save_scores(dir: &Path, scores: &[f32]) {
    save_tensors(
        &dir.join("scores.safetensors"),
        &[("scores".into(), vec![scores.len()], scores.to_vec())],
        SaveDtype::F32,
        None,
    )
    .unwrap();
}

#[test]
fn our_seq_cls_adapter_has_peft_names_shapes_and_config_and_reloads() {
    for case in ["llama_gqa", "qwen2"] {
        let peft_dir = reward(case).join("adapter");
        let mut m = load_lora(case, &peft_dir);
        perturb(&mut m);
        let scores = m.score_forward(&batch(), None).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = check_out(&format!("{case}_adapter")).unwrap_or(tmp.path().to_path_buf());
        m.save_adapter(&out, None).unwrap();
        save_scores(&out, &scores);
        assert_eq!(
            tensor_shapes(&out.join("adapter_model.safetensors")),
            tensor_shapes(&peft_dir.join("adapter_model.safetensors")),
            "{case}: tensor names and shapes as PEFT writes them"
        );
        let (ours, theirs) = (
            read_json(&out.join("adapter_config.json")),
            read_json(&peft_dir.join("adapter_config.json")),
        );
        for key in [
            "peft_type",
            "task_type",
            "modules_to_save",
            "r",
            "bias",
            "fan_in_fan_out",
            "use_rslora",
            "use_dora",
        ] {
            assert_eq!(ours[key], theirs[key], "{case}: adapter_config {key}");
        }
        // Numbers by value (PEFT keeps the int 8 the script passed; we write 8.0).
        for key in ["lora_alpha", "lora_dropout"] {
            assert_eq!(ours[key].as_f64(), theirs[key].as_f64(), "{case}: {key}");
        }
        let set = |v: &Value| {
            let mut t: Vec<String> = v["target_modules"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect();
            t.sort();
            t
        };
        assert_eq!(set(&ours), set(&theirs));
        // Our own loader reads it back to the same scores.
        let mut back = load_lora(case, &out);
        let again = back.score_forward(&batch(), None).unwrap();
        assert_eq!(again, scores);
        // The perturbed weights really are what was saved.
        let first = expected(case, "expected_lora.safetensors");
        assert!(max_abs_diff(&scores, &read(&first, "scores")) > 1e-3);
    }
}

#[test]
fn full_mode_saves_a_transformers_seq_cls_dir() {
    for case in ["llama_gqa", "qwen2"] {
        let mut m = load(case, TrainMode::Full);
        perturb(&mut m);
        let scores = m.score_forward(&batch(), None).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = check_out(&format!("{case}_model")).unwrap_or(tmp.path().to_path_buf());
        m.save_full_model(&out, SaveDtype::F32).unwrap();
        save_scores(&out, &scores);
        let cfg = read_json(&out.join("config.json"));
        let arch = if case == "qwen2" {
            "Qwen2ForSequenceClassification"
        } else {
            "LlamaForSequenceClassification"
        };
        assert_eq!(cfg["architectures"], serde_json::json!([arch]));
        assert_eq!(
            cfg["id2label"].as_object().unwrap().len(),
            1,
            "num_labels 1"
        );
        assert_eq!(cfg["pad_token_id"], PAD);
        let shapes = tensor_shapes(&out.join("model.safetensors"));
        assert_eq!(shapes[SCORE_WEIGHT], [1, 32]);
        assert!(!shapes.contains_key("lm_head.weight"));
        // transformers' own seq-cls dir has the same tensors.
        if case == "llama_gqa" {
            assert_eq!(
                shapes,
                tensor_shapes(&reward(case).join("model/model.safetensors"))
            );
        }
        let mut back = load_model_with_head(Cpu, &out, TrainMode::Full, Head::Score, 9).unwrap();
        assert_eq!(back.score_forward(&batch(), None).unwrap(), scores);
    }
}

#[test]
fn a_new_score_head_is_drawn_from_the_seed_with_initializer_range() {
    let dir = fixtures().join("qwen2/model");
    let get = |seed| {
        load_model_with_head(Cpu, &dir, TrainMode::Full, Head::Score, seed)
            .unwrap()
            .get_tensor(SCORE_WEIGHT)
            .unwrap()
    };
    let (a, b, c) = (get(1), get(1), get(2));
    assert_eq!(a, b);
    assert_ne!(a, c);
    // initializer_range 0.02 in the config: the sample std of 32 draws.
    let std = (a.iter().map(|x| x * x).sum::<f32>() / a.len() as f32).sqrt();
    assert!((0.01..0.03).contains(&std), "std {std}");
}

#[test]
fn heads_refuse_the_other_heads_calls() {
    let mut rm = load("llama_gqa", TrainMode::Full);
    let err = rm.forward(&batch(), false).unwrap_err();
    assert!(err.to_string().contains("head"), "{err}");
    let mut lm = load_model(Cpu, &fixtures().join("llama_gqa/model"), TrainMode::Full, 0).unwrap();
    let err = lm.score_forward(&batch(), None).unwrap_err();
    assert!(err.to_string().contains("head"), "{err}");
    // A causal-LM adapter does not load into a reward model.
    let lora = read_adapter_config(&fixtures().join("llama_gqa/adapter")).unwrap();
    let mut m = load("llama_gqa", TrainMode::Lora(lora));
    let err = m
        .load_adapter(&fixtures().join("llama_gqa/adapter"))
        .unwrap_err();
    assert!(err.to_string().contains("SEQ_CLS"), "{err}");
}

#[test]
fn gradient_checkpointing_gives_identical_score_gradients() {
    let mut all = Vec::new();
    for ckpt in [false, true] {
        let mut m = load_lora("llama_gqa", &reward("llama_gqa").join("adapter"));
        m.gradient_checkpointing = ckpt;
        run(&mut m, &batch());
        all.push(m.get_grad(SCORE_WEIGHT).unwrap());
    }
    assert!(all[0].iter().any(|&g| g != 0.0));
    assert_eq!(all[0], all[1]);
}

/// An in-process all-reduce between threads: each rank deposits its values,
/// rank order sums them, every rank reads the sum.
struct ThreadAllReduce {
    rank: usize,
    world: usize,
    shared: std::sync::Arc<(std::sync::Mutex<Vec<Vec<f32>>>, std::sync::Barrier)>,
}

impl rlhf_worker::collective::HostAllReduce for ThreadAllReduce {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum_host(&mut self, data: &mut [f32]) -> anyhow::Result<()> {
        let (slots, barrier) = &*self.shared;
        slots.lock().unwrap()[self.rank] = data.to_vec();
        barrier.wait();
        {
            let s = slots.lock().unwrap();
            for (i, x) in data.iter_mut().enumerate() {
                *x = (0..self.world).map(|r| s[r][i]).sum();
            }
        }
        barrier.wait();
        Ok(())
    }
}

#[derive(clap::Parser)]
struct RmCli {
    #[command(flatten)]
    args: rlhf_worker::stages::rm::RmArgs,
}

/// `rlhf rm` as one rank with batch 4, and as two ranks with batch 2 each
/// (same global batch): the same losses, evaluation and adapter.
#[test]
fn two_data_parallel_ranks_train_what_one_rank_trains() {
    use clap::Parser;
    use rlhf_worker::stages::rm::{run_dist, RmArgs};
    let ws = tempfile::tempdir().unwrap();
    let d = ws.path();
    let mut lines = String::new();
    let mut corpus = String::new();
    for i in 0..20 {
        let (q, good, bad) = (
            format!("What helps with symptom {}?", i % 5),
            ["Rest and fluids.", "See a doctor soon."][i % 2],
            ["Nothing.", "No idea."][i % 2],
        );
        lines.push_str(&format!(
            "{{\"question\": \"{q}\", \"response_chosen\": \"{good}\", \"response_rejected\": \"{bad}\"}}\n"
        ));
        corpus.push_str(&format!("Question: {q}\n\nAnswer: {good} {bad}\n"));
    }
    std::fs::create_dir_all(d.join("data")).unwrap();
    std::fs::write(d.join("data/pairs.jsonl"), lines).unwrap();
    std::fs::write(d.join("corpus.txt"), corpus.repeat(10)).unwrap();
    let init = rlhf_worker::init_model::InitModelArgs {
        vocab_size: 300,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 128,
        ..Default::default()
    };
    rlhf_worker::init_model::init_model(&[d.join("corpus.txt")], &d.join("model"), &init).unwrap();
    let args = |out: &str, bs: &str| -> RmArgs {
        let (m, data, o) = (d.join("model"), d.join("data"), d.join(out));
        RmCli::parse_from([
            "rm".as_ref(),
            "--model_name_or_path".as_ref(),
            m.as_os_str(),
            "--train_file_dir".as_ref(),
            data.as_os_str(),
            "--output_dir".as_ref(),
            o.as_os_str(),
            "--validation_split_percentage".as_ref(),
            "20".as_ref(),
            "--per_device_train_batch_size".as_ref(),
            bs.as_ref(),
            "--per_device_eval_batch_size".as_ref(),
            "1".as_ref(),
            "--max_steps".as_ref(),
            "4".as_ref(),
            "--learning_rate".as_ref(),
            "2e-3".as_ref(),
            "--logging_steps".as_ref(),
            "1".as_ref(),
            "--lora_dropout".as_ref(),
            "0.1".as_ref(),
        ])
        .args
    };
    let one = rlhf_worker::stages::run_single(&args("one", "4")).unwrap();
    let shared = std::sync::Arc::new((
        std::sync::Mutex::new(vec![Vec::new(); 2]),
        std::sync::Barrier::new(2),
    ));
    let two: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let a = args("two", "2");
                let shared = shared.clone();
                s.spawn(move || {
                    let mut c = rlhf_worker::collective::ViaHost(ThreadAllReduce {
                        rank,
                        world: 2,
                        shared,
                    });
                    run_dist(Cpu, &a, &mut c, Some(4), &mut rlhf_worker::train::NoHooks).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        (one.summary.global_step, two[0].summary.global_step),
        (4, 4)
    );
    let (e1, e2) = (one.summary.eval.unwrap(), two[0].summary.eval.unwrap());
    assert_eq!(e1.pairs, 4);
    assert_eq!(e2.pairs, 4, "the ranks' evaluations add up");
    assert!((e1.loss - e2.loss).abs() < 1e-5, "{e1:?} vs {e2:?}");
    assert_eq!(e1.accuracy, e2.accuracy);
    assert!((one.summary.train_loss - two[0].summary.train_loss).abs() < 1e-5);
    let a = TensorFiles::open_files(&[d.join("one/adapter_model.safetensors")]).unwrap();
    let b = TensorFiles::open_files(&[d.join("two/adapter_model.safetensors")]).unwrap();
    for name in a.names() {
        let (x, y) = (read(&a, name), read(&b, name));
        assert!(max_abs_diff(&x, &y) < 1e-5, "{name}");
    }
    assert!(a.names().count() > 0);
}
