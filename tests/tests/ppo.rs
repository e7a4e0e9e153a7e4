//! `rlhf ppo` end to end on a tiny model: PT on conversations whose answers
//! are helpful or not, a reward model that prefers the helpful ones (a LoRA
//! adapter on the PT model, so PPO shares its base), then PPO raises the
//! reward; a run stopped and resumed from its checkpoint ends bitwise where
//! an uninterrupted one does.

use crate::distributed::{committed_step, registered_workers, Cluster};
use crate::rlhf;
use rlhf_tests::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const QUESTIONS: [&str; 6] = [
    "What should I do about fever?",
    "What should I do about a cough?",
    "What should I do about headache?",
    "What should I do about a rash?",
    "What should I do about nausea?",
    "What should I do about back pain?",
];
const GOOD: [&str; 3] = [
    "Rest, drink water and see a doctor if it lasts.",
    "Take the prescribed medicine and rest.",
    "Drink fluids and rest; see a doctor if it gets worse.",
];
const BAD: [&str; 3] = ["I do not know.", "Ignore it.", "No idea, sorry."];

fn chatml(q: &str, a: &str) -> String {
    format!(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
    )
}

struct PpoSetup {
    ws: Workspace,
    pt_model: PathBuf,
    rm: PathBuf,
    prompts: PathBuf,
    valid: PathBuf,
}

/// PT (so the model answers both ways), then an RM adapter on the PT model.
fn ppo_setup() -> PpoSetup {
    let ws = Workspace::new();
    // PT documents: whole conversations (JSON lines keep their newlines).
    let mut docs = String::new();
    for (i, q) in QUESTIONS.iter().enumerate() {
        for j in 0..3 {
            for a in [GOOD[(i + j) % 3], BAD[(i + 2 * j) % 3]] {
                docs.push_str(&serde_json::json!({ "text": chatml(q, a) }).to_string());
                docs.push('\n');
            }
        }
    }
    ws.write("pt/data.jsonl", docs.repeat(8));
    // The tokenizer is trained on the same text, one conversation per line.
    let lines: String = docs
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .replace('\n', " ")
                + "\n"
        })
        .collect();
    let corpus_file = ws.write("corpus.txt", lines.repeat(8));
    let base = ws.path("base");
    rlhf().init_tiny_model(&corpus_file, &base);
    let pt_model = ws.path("pt_out");
    rlhf()
        .pt(&base, &ws.path("pt"), &pt_model)
        .opt("--use_peft", "false")
        .opt("--block_size", "64")
        .opt("--per_device_train_batch_size", "4")
        .opt("--max_steps", "600")
        .opt("--learning_rate", "5e-3")
        .opt("--save_steps", "1000")
        .ok();
    let pair = |q: &str, c: &str, r: &str| {
        format!(
            "{{\"conversations\": [{{\"from\": \"human\", \"value\": \"{q}\"}}], \"chosen\": \"{c}\", \"rejected\": \"{r}\"}}\n"
        )
    };
    let mut pairs = String::new();
    for (i, q) in QUESTIONS.iter().enumerate() {
        for j in 0..3 {
            pairs.push_str(&pair(q, GOOD[(i + j) % 3], BAD[(i + j + 1) % 3]));
        }
    }
    ws.write("pairs/train.jsonl", &pairs);
    let rm = ws.path("rm_out");
    rlhf()
        .cmd("rm")
        .opt("--model_name_or_path", &pt_model)
        .opt("--train_file_dir", ws.path("pairs"))
        .opt("--validation_split_percentage", "0")
        .opt("--output_dir", &rm)
        .opt("--per_device_train_batch_size", "6")
        .opt("--learning_rate", "3e-3")
        .opt("--max_steps", "30")
        .opt("--save_steps", "1000")
        .ok();
    let conv = |q: &str| {
        format!("{{\"conversations\": [{{\"from\": \"human\", \"value\": \"{q}\"}}, {{\"from\": \"gpt\", \"value\": \"x\"}}]}}\n")
    };
    // PPO samples the first four questions; evaluation asks all six.
    let prompts: String = QUESTIONS[..4].iter().map(|q| conv(q)).collect();
    let valid: String = QUESTIONS.iter().map(|q| conv(q)).collect();
    ws.write("prompts/train.jsonl", prompts);
    // Three times over: 18 prompts are two evaluation chunks of 16, so two
    // workers split the evaluation.
    ws.write("prompts_valid/valid.jsonl", valid.repeat(3));
    PpoSetup {
        pt_model,
        rm,
        prompts: ws.path("prompts"),
        valid: ws.path("prompts_valid"),
        ws,
    }
}

/// `rlhf ppo` with small, fast settings: `iters` iterations of 8 rollouts.
fn ppo(s: &PpoSetup, out: &Path, iters: u64) -> Cmd {
    rlhf()
        .cmd("ppo")
        .opt("--model_name_or_path", &s.pt_model)
        .opt("--reward_model_name_or_path", &s.rm)
        .opt("--train_file_dir", &s.prompts)
        .opt("--validation_file_dir", &s.valid)
        .opt("--output_dir", out)
        .opt("--batch_size", "8")
        .opt("--mini_batch_size", "4")
        .opt("--ppo_epochs", "2")
        .opt("--learning_rate", "1e-3")
        .opt("--init_kl_coef", "0.05")
        .opt("--max_target_length", "48")
        .opt("--max_steps", (8 * iters).to_string())
        .opt("--save_steps", "2")
        .opt("--seed", "3")
}

#[test]
fn ppo_raises_the_reward_on_a_shared_base_and_resumes_exactly() {
    let s = ppo_setup();
    let out = s.ws.path("ppo");
    let printed = ppo(&s, &out, 8).ok().json();
    assert_eq!(
        printed["reward_model"],
        "adapter on the policy's base (shared weights)"
    );
    let metrics = read_jsonl(&out.join("metrics.jsonl"));
    assert_eq!(metrics.len(), 8);
    let reward = |m: &serde_json::Value| num(m, "env/reward_mean");
    let first = reward(&metrics[0]);
    let last: f64 = metrics[5..].iter().map(reward).sum::<f64>() / 3.0;
    assert!(last > first + 0.5, "reward did not rise: {first} -> {last}");
    // The adapter starts at zero: the policy is the reference at step 1.
    assert_eq!(num(&metrics[0], "objective/kl"), 0.0);
    for m in &metrics {
        for key in [
            "objective/kl",
            "objective/entropy",
            "ppo/policy/clipfrac",
            "ppo/policy/approxkl",
            "ppo/loss/value",
            "ppo/val/var_explained",
            "tokens/response_len_mean",
            "time/rollout_tokens_per_sec",
            "time/update_s",
        ] {
            assert!(num(m, key).is_finite(), "{key} in {m}");
        }
    }
    // Held-out prompts: the sampled reward rose, with the KL reported.
    let r = read_json(&out.join("all_results.json"));
    let before = num(&r["initial_eval"], "reward_sampled");
    let after = num(&r["eval"], "reward_sampled");
    assert!(after > before + 0.2, "held-out reward {before} -> {after}");
    assert!(num(&r["eval"], "kl_sampled").is_finite());
    // Outputs: a PEFT causal-LM adapter and the value head beside it.
    assert_eq!(
        read_json(&out.join("adapter_config.json"))["task_type"],
        "CAUSAL_LM"
    );
    let vh = read_safetensors(&out.join("value_head.safetensors"));
    assert_eq!(vh["v_head.summary.weight"].shape, [1, TINY_HIDDEN]);
    let adapter = read_safetensors(&out.join("adapter_model.safetensors"));
    assert!(
        adapter.keys().all(|k| k.contains(".lora_")),
        "{:?}",
        adapter.keys()
    );

    // Stop after 3 iterations, resume from the checkpoint at 2: the same end.
    let out2 = s.ws.path("ppo_resumed");
    ppo(&s, &out2, 8).opt("--stop_after_steps", "3").ok();
    assert_eq!(checkpoints(&out2), ["checkpoint-2"]);
    ppo(&s, &out2, 8)
        .opt("--resume_from_checkpoint", "true")
        .ok();
    for f in ["adapter_model.safetensors", "value_head.safetensors"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(out2.join(f)).unwrap(),
            "{f} differs after resume"
        );
    }
    assert_eq!(read_jsonl(&out2.join("metrics.jsonl")).len(), 8);
    assert_eq!(
        metrics_without_timings(&out),
        metrics_without_timings(&out2)
    );
}

/// `out_dir`'s metrics.jsonl without what depends on the clock (timings)
/// or on the placement (bytes shipped to rollout workers).
fn metrics_without_timings(out_dir: &Path) -> Vec<serde_json::Value> {
    read_jsonl(&out_dir.join("metrics.jsonl"))
        .into_iter()
        .map(|mut m| {
            for k in [
                "time/rollout_tokens_per_sec",
                "time/rollout_s",
                "time/update_s",
                "sync/policy_bytes",
            ] {
                m.as_object_mut().unwrap().remove(k);
            }
            m
        })
        .collect()
}

/// The PPO stage as a pipeline for the coordinator (paths relative to the workspace).
fn ppo_pipeline(s: &PpoSetup, name: &str, workers: usize, max_steps: u64, extra: &str) -> PathBuf {
    let rel = |p: &Path| p.strip_prefix(s.ws.path("")).unwrap().display().to_string();
    let text = format!(
        r#"[cluster]
workers = {workers}
heartbeat_interval_ms = 200
heartbeat_timeout_ms = 5000
state_dir = "{name}/.coordinator"

[[stage]]
name = "ppo"
kind = "ppo"
model_name_or_path = "{model}"
reward_model_name_or_path = "{rm}"
train_file_dir = "{prompts}"
validation_file_dir = "{valid}"
output_dir = "{name}/ppo"
batch_size = 4
mini_batch_size = 2
ppo_epochs = 2
learning_rate = 1e-3
init_kl_coef = 0.05
max_target_length = 48
max_steps = {max_steps}
save_steps = 2
seed = 5
{extra}
"#,
        model = rel(&s.pt_model),
        rm = rel(&s.rm),
        prompts = rel(&s.prompts),
        valid = rel(&s.valid),
    );
    s.ws.write(&format!("{name}.toml"), text)
}

#[test]
fn two_ppo_workers_update_bitwise_as_one_process_holding_both_shares_or_fed_by_a_rollout_worker() {
    let s = ppo_setup();
    let two = ppo_pipeline(&s, "two", 2, 12, "");
    let two_in_one = ppo_pipeline(&s, "two_in_one", 2, 12, "");
    // Two trainers and a third worker that only samples and scores, with the
    // adapter the trainers ship it after each update.
    let split = ppo_pipeline(&s, "split", 3, 12, "rollout_workers = 1");
    let dir = s.ws.path("");
    rlhf().run_pipeline(&dir, &two, &[]);
    rlhf().run_pipeline(&dir, &two_in_one, &["--workers", "1"]);
    rlhf().run_pipeline(&dir, &split, &[]);
    for run in ["two_in_one", "split"] {
        for f in ["adapter_model.safetensors", "value_head.safetensors"] {
            assert_eq!(
                std::fs::read(s.ws.path(&format!("two/ppo/{f}"))).unwrap(),
                std::fs::read(s.ws.path(&format!("{run}/ppo/{f}"))).unwrap(),
                "{f}: 2 workers differ from {run}"
            );
        }
    }
    let metrics = |run: &str| metrics_without_timings(&s.ws.path(&format!("{run}/ppo")));
    let m = metrics("two");
    assert_eq!(m.len(), 3);
    assert_eq!(m, metrics("two_in_one"));
    assert_eq!(m, metrics("split"));
    let r = read_json(&s.ws.path("two/ppo/all_results.json"));
    assert_eq!(num(&r, "rollouts_per_step"), 8.0, "{r}");
    assert!(r["split"].is_null(), "{r}");
    // The held-out evaluation, split over the trainers, is the one process's.
    for run in ["two_in_one", "split"] {
        let other = read_json(&s.ws.path(&format!("{run}/ppo/all_results.json")));
        for k in ["initial_eval", "eval"] {
            assert!(num(&r[k], "prompts") > 0.0, "{r}");
            assert_eq!(r[k], other[k], "{k}: 2 workers differ from {run}");
        }
    }
    // What crossed to the rollout worker each iteration: the LoRA adapter
    // and value head, as f32, never the base.
    let r = read_json(&s.ws.path("split/ppo/all_results.json"));
    assert_eq!(num(&r, "rollouts_per_step"), 8.0, "{r}");
    assert_eq!(num(&r["split"], "trainers"), 2.0, "{r}");
    let adapter = read_safetensors(&s.ws.path("split/ppo/adapter_model.safetensors"));
    let vh = read_safetensors(&s.ws.path("split/ppo/value_head.safetensors"));
    let trainable: usize = adapter
        .values()
        .chain(vh.values())
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    assert_eq!(
        num(&r["split"], "policy_bytes_per_sync"),
        (4 * trainable) as f64,
        "{r}"
    );
    assert!(
        num(&r["split"], "base_values_not_shipped") > trainable as f64,
        "{r}"
    );
    for line in read_jsonl(&s.ws.path("split/ppo/metrics.jsonl")) {
        assert_eq!(
            num(&line, "sync/policy_bytes"),
            (4 * trainable) as f64,
            "{line}"
        );
    }
}

#[test]
fn a_likelihood_reward_model_ranks_pairs_and_drives_ppo_on_the_shared_base() {
    let s = ppo_setup();
    // The RM's score is the mean log p(answer | conversation) under the PT
    // model + a LoRA adapter, trained on the pairs.
    let rm = s.ws.path("rm_lik");
    let pairs_valid = s.ws.write(
        "pairs_valid/valid.jsonl",
        std::fs::read_to_string(s.ws.path("pairs/train.jsonl")).unwrap(),
    );
    rlhf()
        .cmd("rm")
        .opt("--model_name_or_path", &s.pt_model)
        .opt("--train_file_dir", s.ws.path("pairs"))
        .opt("--validation_file_dir", pairs_valid.parent().unwrap())
        .opt("--score_type", "likelihood")
        .opt("--output_dir", &rm)
        .opt("--per_device_train_batch_size", "6")
        .opt("--learning_rate", "2e-3")
        .opt("--max_steps", "40")
        .opt("--save_steps", "1000")
        .ok();
    let r = read_json(&rm.join("all_results.json"));
    assert_eq!(r["score_type"], "likelihood");
    // The PT model's own likelihood may already rank them: training widens
    // the margin and lowers the pairwise loss.
    assert!(num(&r, "eval_loss") < num(&r, "initial_eval_loss"), "{r}");
    assert!(
        num(&r, "eval_mean_margin") > num(&r, "initial_eval_mean_margin") + 1.0,
        "{r}"
    );
    assert!(num(&r, "eval_accuracy") >= 0.9, "{r}");
    // A causal-LM adapter (no score head) and the file that says how to score.
    assert_eq!(
        read_json(&rm.join("adapter_config.json"))["task_type"],
        "CAUSAL_LM"
    );
    assert_eq!(
        read_json(&rm.join("reward_config.json"))["score_type"],
        "likelihood"
    );
    let adapter = read_safetensors(&rm.join("adapter_model.safetensors"));
    assert!(adapter.keys().all(|k| k.contains(".lora_")));

    let out = s.ws.path("ppo_lik");
    let printed = rlhf()
        .cmd("ppo")
        .opt("--model_name_or_path", &s.pt_model)
        .opt("--reward_model_name_or_path", &rm)
        .opt("--train_file_dir", &s.prompts)
        .opt("--output_dir", &out)
        .opt("--validation_split_percentage", "0")
        .opt("--batch_size", "8")
        .opt("--mini_batch_size", "4")
        .opt("--ppo_epochs", "2")
        .opt("--learning_rate", "1e-3")
        .opt("--max_target_length", "48")
        .opt("--max_steps", "48")
        .opt("--save_steps", "100")
        .ok()
        .json();
    assert_eq!(
        printed["reward_model"],
        "adapter on the policy's base (shared weights)"
    );
    let metrics = read_jsonl(&out.join("metrics.jsonl"));
    let reward = |m: &serde_json::Value| num(m, "env/reward_mean");
    let first = reward(&metrics[0]);
    let last = metrics[3..].iter().map(reward).sum::<f64>() / 3.0;
    assert!(
        last > first,
        "likelihood reward did not rise: {first} -> {last}"
    );
}

#[test]
fn a_rollout_worker_killed_mid_stage_is_replaced_and_the_result_is_unchanged() {
    let s = ppo_setup();
    // 8 iterations of 2 shares of 4 rollouts, a checkpoint every 2.
    let steps = 4 * 8;
    let reference = ppo_pipeline(&s, "ref", 2, steps, "");
    rlhf().run_pipeline(&s.ws.path(""), &reference, &[]);
    // 2 trainers and a rollout worker (the third to register: rank 2).
    let faulty = ppo_pipeline(&s, "faulty", 3, steps, "rollout_workers = 1");
    let mut c = Cluster::new(&s.ws);
    c.start_coordinator(&faulty);
    for n in 1..=3 {
        c.start_worker(150);
        c.wait_status("a worker", Duration::from_secs(30), |v| {
            registered_workers(v) == n
        });
    }
    c.wait_status("a committed checkpoint", Duration::from_secs(90), |v| {
        committed_step(v) >= 2
    });
    let mut rollout = c.workers.remove(2);
    rollout.kill().unwrap(); // SIGKILL
    rollout.wait().unwrap();
    let st = c.wait_coordinator(Duration::from_secs(180));
    assert!(st.success(), "coordinator failed\n{}", c.logs());
    let logs = c.logs();
    assert!(logs.contains("worker declared dead"), "{logs}");
    // Placed again on the two survivors (one trainer holding both shares,
    // one rollout worker), from the committed checkpoint.
    assert!(
        logs.contains("world=2") && logs.contains("resume=faulty/ppo/checkpoint-"),
        "no re-placement from a checkpoint\n{logs}"
    );
    for f in ["adapter_model.safetensors", "value_head.safetensors"] {
        assert_eq!(
            std::fs::read(s.ws.path(&format!("ref/ppo/{f}"))).unwrap(),
            std::fs::read(s.ws.path(&format!("faulty/ppo/{f}"))).unwrap(),
            "{f} differs from the uninterrupted run"
        );
    }
    let metrics = |run: &str| metrics_without_timings(&s.ws.path(&format!("{run}/ppo")));
    let m = metrics("ref");
    assert_eq!(m.len(), 8);
    assert_eq!(
        m,
        metrics("faulty"),
        "every iteration logged once, as uninterrupted"
    );
}
