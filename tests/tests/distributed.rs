//! The coordinator and workers as real processes on loopback: data parallel
//! training that does not depend on the worker count, and recovery from a
//! worker or the coordinator killed with SIGKILL in the middle of a stage.

use crate::{setup, Setup};
use rlhf_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_rlhf");

/// A PT pipeline on the tiny model, paths relative to the workspace root.
/// LoRA keeps its default dropout (0.05): masks must not depend on placement.
fn pipeline(s: &Setup, name: &str, workers: usize, batch: usize, steps: u64, save: u64) -> PathBuf {
    let text = format!(
        r#"[cluster]
workers = {workers}
heartbeat_interval_ms = 200
heartbeat_timeout_ms = 2000
state_dir = "{name}/.coordinator"

[[stage]]
name = "pt"
kind = "pt"
model_name_or_path = "model"
train_file_dir = "data"
output_dir = "{name}/pt"
block_size = 32
per_device_train_batch_size = {batch}
max_steps = {steps}
learning_rate = 1e-3
logging_steps = 1
save_steps = {save}
use_peft = true
"#
    );
    s.ws.write(&format!("{name}.toml"), text)
}

/// `rlhf run FILE [extra]` in the workspace; panics with its output on failure.
fn rlhf_run(s: &Setup, file: &Path, extra: &[&str]) -> std::process::Output {
    crate::rlhf().run_pipeline(&s.ws.path(""), file, extra)
}

fn adapter(s: &Setup, name: &str) -> std::collections::BTreeMap<String, Tensor> {
    read_safetensors(&s.ws.path(&format!("{name}/pt/adapter_model.safetensors")))
}

fn losses(s: &Setup, name: &str) -> Vec<(u64, f64)> {
    let m = read_jsonl(&s.ws.path(&format!("{name}/pt/metrics.jsonl")));
    train_lines(&m)
        .iter()
        .map(|v| (num(v, "step") as u64, num(v, "loss")))
        .collect()
}

/// Per tensor, the relative error ‖a − b‖₂ / ‖b‖₂ ≤ tol, and the same names.
fn assert_close(
    a: &std::collections::BTreeMap<String, Tensor>,
    b: &std::collections::BTreeMap<String, Tensor>,
    tol: f64,
) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "different tensors"
    );
    let mut worst = 0f64;
    for (name, ta) in a {
        let (x, y) = (ta.f32s(), b[name].f32s());
        let norm = y
            .iter()
            .map(|v| (*v as f64).powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-30);
        let diff = x
            .iter()
            .zip(&y)
            .map(|(p, q)| (*p as f64 - *q as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            diff / norm <= tol,
            "{name}: relative error {:e} > {tol:e}",
            diff / norm
        );
        worst = worst.max(diff / norm);
    }
    eprintln!("largest relative error of a tensor: {worst:e}");
}

fn assert_losses_close(a: &[(u64, f64)], b: &[(u64, f64)], tol: f64) {
    let steps = |v: &[(u64, f64)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
    assert_eq!(steps(a), steps(b), "different logged steps");
    for ((step, x), (_, y)) in a.iter().zip(b) {
        assert!(((x - y) / y).abs() <= tol, "step {step}: loss {x} vs {y}");
    }
}

#[test]
fn two_workers_of_batch_2_train_what_one_worker_of_batch_4_does() {
    let s = setup();
    let two = pipeline(&s, "two", 2, 2, 6, 3);
    let one = pipeline(&s, "one", 1, 4, 6, 3);
    let two_in_one = pipeline(&s, "two_in_one", 2, 2, 6, 3);
    rlhf_run(&s, &two, &[]);
    rlhf_run(&s, &one, &[]);
    // The same pipeline (global batch 4 = 2 planned workers × 2) on ONE
    // process: two micro-batches accumulated locally instead of summed by the
    // ring. With two ranks each sum has one addition, so this is bitwise.
    rlhf_run(&s, &two_in_one, &["--workers", "1"]);

    let (a, b, c) = (
        adapter(&s, "two"),
        adapter(&s, "one"),
        adapter(&s, "two_in_one"),
    );
    assert_eq!(a, c, "1 process × 2 micro-batches differs from 2 processes");
    // The logged loss crosses the ring as f32 (f64 in one process).
    assert_losses_close(&losses(&s, "two"), &losses(&s, "two_in_one"), 1e-6);
    assert_close(&a, &b, 1e-5);
    let (la, lb) = (losses(&s, "two"), losses(&s, "one"));
    assert_eq!(la.len(), 6);
    assert_losses_close(&la, &lb, 1e-5);
    // It trained: the adapter moved away from B = 0 and the loss fell.
    assert!(a
        .iter()
        .any(|(n, t)| n.contains("lora_B") && t.f32s().iter().any(|v| *v != 0.0)));
    assert!(la[5].1 < la[0].1, "loss did not fall: {la:?}");
    // Only rank 0 writes; nothing half-written is left behind.
    assert_eq!(
        checkpoints(&s.ws.path("two/pt")),
        ["checkpoint-3", "checkpoint-6"]
    );
    assert_eq!(temp_files(&s.ws.path("two/pt")), Vec::<String>::new());
}

/// A coordinator, workers and their logs, as separate processes.
pub(crate) struct Cluster {
    root: PathBuf,
    port: u16,
    token_file: PathBuf,
    coordinator: Option<Child>,
    pub workers: Vec<Child>,
    logs: Vec<PathBuf>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    pub fn new(ws: &Workspace) -> Cluster {
        let token_file = ws.write("token", "0123456789abcdef0123456789abcdef\n");
        Cluster {
            root: ws.path(""),
            port: free_port(),
            token_file,
            coordinator: None,
            workers: Vec::new(),
            logs: Vec::new(),
        }
    }

    fn spawn(&mut self, log: &str, args: &[&str]) -> Child {
        let path = self.root.join(log);
        let f = std::fs::File::create(&path).unwrap();
        self.logs.push(path);
        Command::new(BIN)
            .current_dir(&self.root)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap()
    }

    pub fn start_coordinator(&mut self, pipeline: &Path) {
        self.start_coordinator_with(pipeline, &[]);
    }

    fn start_coordinator_with(&mut self, pipeline: &Path, extra: &[&str]) {
        let listen = format!("127.0.0.1:{}", self.port);
        let token = self.token_file.to_str().unwrap().to_string();
        let n = self.logs.len();
        let mut args = vec![
            "coordinator",
            "--config",
            pipeline.to_str().unwrap(),
            "--listen",
            &listen,
            "--token-file",
            &token,
        ];
        args.extend_from_slice(extra);
        let c = self.spawn(&format!("coordinator-{n}.log"), &args);
        self.coordinator = Some(c);
    }

    pub fn start_worker(&mut self, step_delay_ms: u64) {
        self.start_worker_with(step_delay_ms, "http", &[]);
    }

    fn start_worker_with(&mut self, step_delay_ms: u64, scheme: &str, extra: &[&str]) {
        let url = format!("{scheme}://127.0.0.1:{}", self.port);
        let token = self.token_file.to_str().unwrap().to_string();
        let delay = step_delay_ms.to_string();
        let n = self.logs.len();
        let mut args = vec![
            "worker",
            "--coordinator",
            &url,
            "--token-file",
            &token,
            "--test-step-delay-ms",
            &delay,
        ];
        args.extend_from_slice(extra);
        let w = self.spawn(&format!("worker-{n}.log"), &args);
        self.workers.push(w);
    }

    pub fn logs(&self) -> String {
        self.logs
            .iter()
            .map(|p| {
                format!(
                    "==== {}\n{}",
                    p.display(),
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect()
    }

    /// `rlhf status --json`, None while the coordinator does not answer.
    fn status(&self) -> Option<serde_json::Value> {
        self.status_with("http", &[])
    }

    fn status_with(&self, scheme: &str, extra: &[&str]) -> Option<serde_json::Value> {
        let out = Command::new(BIN)
            .args([
                "status",
                "--coordinator",
                &format!("{scheme}://127.0.0.1:{}", self.port),
                "--json",
                "--token-file",
                self.token_file.to_str().unwrap(),
            ])
            .args(extra)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Poll the status until `pred` holds (panics with the logs after `timeout`).
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Some(v) = self.status() {
                if pred(&v) {
                    return v;
                }
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out waiting for {what}; status {:?}\n{}",
                    self.status(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_coordinator(&mut self, timeout: Duration) -> ExitStatus {
        let c = self.coordinator.as_mut().unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                panic!(
                    "the coordinator did not finish in {timeout:?}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.workers.iter_mut().chain(self.coordinator.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn committed_step(v: &serde_json::Value) -> u64 {
    v["stage"]["committed_step"].as_u64().unwrap_or(0)
}

pub(crate) fn registered_workers(v: &serde_json::Value) -> usize {
    v["workers"].as_array().map(|a| a.len()).unwrap_or(0)
}

/// 12 steps of global batch 4, a checkpoint every 2 steps.
const FAULT_STEPS: u64 = 12;

/// The uninterrupted reference run `ref/`, then the same pipeline `faulty/`
/// under a coordinator and two slowed-down workers, returned once a checkpoint
/// is committed. Registration order gives the ranks: the first worker is
/// rank 0, the one that writes checkpoints — the harder one to lose.
fn fault_run_with_a_committed_checkpoint() -> (Setup, Cluster, PathBuf) {
    let s = setup();
    // save_total_limit 1: pruning must never remove the committed checkpoint
    // a recovery resumes from.
    let with_limit = |p: PathBuf| {
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str("save_total_limit = 1\n");
        std::fs::write(&p, text).unwrap();
        p
    };
    let reference = with_limit(pipeline(&s, "ref", 2, 2, FAULT_STEPS, 2));
    rlhf_run(&s, &reference, &[]);

    let faulty = with_limit(pipeline(&s, "faulty", 2, 2, FAULT_STEPS, 2));
    let mut c = Cluster::new(&s.ws);
    c.start_coordinator(&faulty);
    c.start_worker(150);
    c.wait_status("the first worker", Duration::from_secs(30), |v| {
        registered_workers(v) == 1
    });
    c.start_worker(150);
    c.wait_status("a committed checkpoint", Duration::from_secs(60), |v| {
        committed_step(v) >= 2
    });
    (s, c, faulty)
}

#[test]
fn a_worker_killed_mid_stage_is_replaced_by_the_survivor_and_the_result_is_unchanged() {
    let (s, mut c, _) = fault_run_with_a_committed_checkpoint();
    let killed_at = Instant::now();
    let mut rank0 = c.workers.remove(0);
    rank0.kill().unwrap(); // SIGKILL
    rank0.wait().unwrap();
    let st = c.wait_coordinator(Duration::from_secs(120));
    assert!(st.success(), "coordinator failed\n{}", c.logs());
    let logs = c.logs();
    assert!(
        logs.contains("worker declared dead"),
        "the coordinator did not notice the dead worker\n{logs}"
    );
    // Placed again on the survivor alone, from the committed checkpoint.
    assert!(
        logs.contains("world=1") && logs.contains("resume=faulty/pt/checkpoint-"),
        "no re-placement from a checkpoint\n{logs}"
    );
    eprintln!(
        "kill -9 to finished: {:.1} s",
        killed_at.elapsed().as_secs_f64()
    );

    assert_close(&adapter(&s, "faulty"), &adapter(&s, "ref"), 1e-5);
    // Every step logged once, with the uninterrupted run's loss: no sample
    // was lost or counted twice.
    assert_losses_close(&losses(&s, "faulty"), &losses(&s, "ref"), 1e-5);
}

#[test]
fn a_coordinator_killed_mid_stage_resumes_from_its_journal_and_the_result_is_unchanged() {
    let (s, mut c, faulty) = fault_run_with_a_committed_checkpoint();
    let mut old = c.coordinator.take().unwrap();
    old.kill().unwrap(); // SIGKILL
    old.wait().unwrap();
    assert!(
        s.ws.path("faulty/.coordinator/journal.json").is_file(),
        "no journal to resume from"
    );
    // The workers keep trying to reach it; a new coordinator on the same
    // address and state dir picks the pipeline up.
    std::thread::sleep(Duration::from_millis(500));
    c.start_coordinator(&faulty);
    let st = c.wait_coordinator(Duration::from_secs(120));
    let logs = c.logs();
    assert!(st.success(), "restarted coordinator failed\n{logs}");
    assert!(
        logs.contains("resume=faulty/pt/checkpoint-"),
        "the restarted coordinator did not resume from a checkpoint\n{logs}"
    );

    assert_close(&adapter(&s, "faulty"), &adapter(&s, "ref"), 1e-5);
    assert_losses_close(&losses(&s, "faulty"), &losses(&s, "ref"), 1e-5);
}

#[test]
fn a_worker_with_the_wrong_token_is_refused() {
    let s = setup();
    let p = pipeline(&s, "p", 1, 2, 2, 2);
    let mut c = Cluster::new(&s.ws);
    c.start_coordinator(&p);
    c.wait_status("the coordinator", Duration::from_secs(30), |_| true);
    let bad = s.ws.write("bad-token", "ffffffffffffffffffffffffffffffff");
    let out = Command::new(BIN)
        .current_dir(s.ws.path(""))
        .args([
            "worker",
            "--coordinator",
            &format!("http://127.0.0.1:{}", c.port),
            "--token-file",
            bad.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused") && err.contains("token"), "{err}");
    // And `rlhf status` without the right token gets nothing.
    let out = Command::new(BIN)
        .args([
            "status",
            "--coordinator",
            &format!("http://127.0.0.1:{}", c.port),
            "--token-file",
            bad.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .to_lowercase()
        .contains("token"));
}

#[test]
fn stage_paths_outside_the_worker_root_fail_the_pipeline_with_the_path_named() {
    let s = setup();
    let p = pipeline(&s, "p", 1, 2, 2, 2);
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("output_dir = \"p/pt\"", "output_dir = \"../escape\"");
    std::fs::write(&p, text).unwrap();
    let out = Command::new(BIN)
        .current_dir(s.ws.path(""))
        .args(["run", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("../escape") && err.contains("root"), "{err}");
    assert!(!s.ws.path("../escape").exists());
}

/// Test-only certificates (tests/fixtures/tls/README.md).
fn tls_fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn with_mutual_tls_a_pipeline_runs_and_clients_without_the_ca_are_refused() {
    let s = setup();
    let p = pipeline(&s, "tls", 2, 2, 4, 2);
    let (cert, key, ca, other) = (
        tls_fixture("node.pem"),
        tls_fixture("node.key"),
        tls_fixture("ca.pem"),
        tls_fixture("other-ca.pem"),
    );
    let tls: Vec<&str> = vec!["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca];
    let mut c = Cluster::new(&s.ws);
    c.start_coordinator_with(&p, &tls);
    // Workers are not placed before both joined (min_workers = 2), so the
    // status checks below run against a live coordinator.
    c.start_worker_with(0, "https", &tls);
    let v = (0..300)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            c.status_with("https", &tls)
        })
        .unwrap_or_else(|| panic!("no status over TLS\n{}", c.logs()));
    assert!(registered_workers(&v) <= 1, "{v}");
    // Plain HTTP/2 to a TLS port, a client trusting another CA, and a client
    // without a certificate are all refused.
    assert!(c.status().is_none(), "plain-text status answered");
    assert!(
        c.status_with(
            "https",
            &["--tls-ca", &other, "--tls-cert", &cert, "--tls-key", &key]
        )
        .is_none(),
        "a client trusting another CA accepted the server"
    );
    assert!(
        c.status_with("https", &["--tls-ca", &ca]).is_none(),
        "a client without a certificate was served"
    );
    // The second worker: the ring between the two runs over TLS as well.
    c.start_worker_with(0, "https", &tls);
    let st = c.wait_coordinator(Duration::from_secs(120));
    assert!(st.success(), "TLS pipeline failed\n{}", c.logs());
    assert_eq!(losses(&s, "tls").len(), 4);
}

#[test]
fn workers_started_before_the_coordinator_wait_for_it() {
    let s = setup();
    let p = pipeline(&s, "early", 2, 2, 4, 2);
    let mut c = Cluster::new(&s.ws);
    c.start_worker(0);
    c.start_worker(0);
    std::thread::sleep(Duration::from_millis(1500));
    for w in &mut c.workers {
        assert!(
            w.try_wait().unwrap().is_none(),
            "a worker gave up on the coordinator\n{}",
            c.logs()
        );
    }
    c.start_coordinator(&p);
    let st = c.wait_coordinator(Duration::from_secs(120));
    assert!(st.success(), "pipeline failed\n{}", c.logs());
    assert!(c.logs().contains("waiting for the coordinator"));
    assert_eq!(losses(&s, "early").len(), 4);
    // Told the pipeline is over, the workers exit by themselves, successfully.
    for w in &mut c.workers {
        let start = Instant::now();
        let st = loop {
            if let Some(st) = w.try_wait().unwrap() {
                break st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "a worker did not exit"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(st.success());
    }
}

/// SFT, RM then DPO, as pipeline stages on the tiny model (ChatML chat_template).
fn sft_rm_pipeline(s: &Setup, name: &str, workers: usize, batch: usize) -> PathBuf {
    let text = format!(
        r#"[cluster]
workers = {workers}
heartbeat_interval_ms = 200
heartbeat_timeout_ms = 2000
state_dir = "{name}/.coordinator"

[[stage]]
name = "sft"
kind = "sft"
model_name_or_path = "model"
train_file_dir = "chat/train"
validation_file_dir = "chat/valid"
eval_qa_file = "chat/qa.jsonl"
output_dir = "{name}/sft"
model_max_length = 64
per_device_train_batch_size = {batch}
max_steps = 4
learning_rate = 1e-3
logging_steps = 1
save_steps = 100

[[stage]]
name = "rm"
kind = "rm"
model_name_or_path = "model"
train_file_dir = "pairs/train"
validation_file_dir = "pairs/valid"
output_dir = "{name}/rm"
lora_dropout = 0.0
per_device_train_batch_size = {batch}
max_steps = 4
learning_rate = 1e-3
logging_steps = 1
save_steps = 100

[[stage]]
name = "dpo"
kind = "dpo"
model_name_or_path = "model"
train_file_dir = "pairs/train"
validation_file_dir = "pairs/valid"
output_dir = "{name}/dpo"
per_device_train_batch_size = {batch}
gradient_accumulation_steps = 1
warmup_steps = 0
max_steps = 4
learning_rate = 1e-3
save_steps = 100
"#
    );
    s.ws.write(&format!("{name}.toml"), text)
}

#[test]
fn sft_rm_and_dpo_stages_train_the_same_on_two_workers_as_on_one() {
    let s = setup();
    let words = [
        "patient", "doctor", "fever", "clinic", "dose", "nurse", "cough", "ward",
    ];
    let conv = |i: usize| {
        let (q, a) = (words[i % 8], words[(i * 3 + 1) % 8]);
        format!(
            "{{\"conversations\": [{{\"from\": \"human\", \"value\": \"what about the {q}?\"}}, {{\"from\": \"gpt\", \"value\": \"the {a} is fine.\"}}]}}\n"
        )
    };
    let pair = |i: usize| {
        let (q, a, b) = (words[i % 8], words[(i + 2) % 8], words[(i + 5) % 8]);
        format!("{{\"question\": \"what about the {q}?\", \"response_chosen\": \"the {a}.\", \"response_rejected\": \"the {b}.\"}}\n")
    };
    s.ws.write("chat/train/a.jsonl", (0..16).map(conv).collect::<String>());
    s.ws.write("chat/valid/a.jsonl", (16..20).map(conv).collect::<String>());
    s.ws.write(
        "chat/qa.jsonl",
        "{\"question\": \"what about the fever?\", \"short\": \"fine\"}\n",
    );
    s.ws.write("pairs/train/a.jsonl", (0..16).map(pair).collect::<String>());
    s.ws.write(
        "pairs/valid/a.jsonl",
        (16..20).map(pair).collect::<String>(),
    );
    let two = sft_rm_pipeline(&s, "two", 2, 2);
    let one = sft_rm_pipeline(&s, "one", 1, 4);
    let two_in_one = sft_rm_pipeline(&s, "two_in_one", 2, 2);
    let out = rlhf_run(&s, &two, &[]);
    rlhf_run(&s, &one, &[]);
    // Global batch 4 as 2 micro-batches accumulated in ONE process.
    rlhf_run(&s, &two_in_one, &["--workers", "1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("held-out answer accuracy"), "{stdout}");
    assert!(stdout.contains("held-out pair accuracy"), "{stdout}");
    assert!(stdout.contains("held-out preference accuracy"), "{stdout}");
    for stage in ["sft", "rm", "dpo"] {
        let file = format!("{stage}/adapter_model.safetensors");
        let [a, b, c] = ["two", "one", "two_in_one"]
            .map(|run| read_safetensors(&s.ws.path(&format!("{run}/{file}"))));
        // Bitwise, as for PT: accumulating micro-batches adds each one's
        // gradient once, as the ring adds each rank's.
        assert_eq!(
            a, c,
            "{stage}: 2 processes differ from 1 process x 2 micro-batches"
        );
        // Batch 4 in one micro-batch sums in another order; Adam's first
        // steps on B ≈ 0 magnify that to ~1e-4 in the RM's LoRA B.
        assert_close(&a, &b, 5e-4);
        let results = read_json(&s.ws.path(&format!("two/{stage}/all_results.json")));
        assert_eq!(num(&results, "global_step"), 4.0, "{results}");
    }
    let rm = read_json(&s.ws.path("two/rm/all_results.json"));
    assert_eq!(num(&rm, "eval_pairs"), 4.0, "{rm}");
    // DPO's reference log-probs are shared out across the ranks and summed:
    // the same eval metrics as in one process.
    let [dpo_two, dpo_one] =
        ["two", "one"].map(|run| read_json(&s.ws.path(&format!("{run}/dpo/all_results.json"))));
    assert_eq!(num(&dpo_two, "eval_pairs"), 4.0, "{dpo_two}");
    for key in ["initial_eval_loss", "eval_loss", "eval_rewards/margins"] {
        let (a, b) = (num(&dpo_two, key), num(&dpo_one, key));
        assert!((a - b).abs() < 1e-4, "{key}: two workers {a}, one {b}");
    }
    let sft = read_json(&s.ws.path("two/sft/all_results.json"));
    assert_eq!(num(&sft, "qa_total"), 1.0, "{sft}");
    // The reward adapter carries its score head, as PEFT's SEQ_CLS adapters do.
    let rm_adapter = read_safetensors(&s.ws.path("two/rm/adapter_model.safetensors"));
    assert!(rm_adapter.contains_key("base_model.model.score.weight"));
}
