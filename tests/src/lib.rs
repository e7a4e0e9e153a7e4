//! Helpers for the end-to-end tests in `tests/tests/*.rs`, which run the real
//! `rlhf` binary on real files: a runner that captures what a command prints
//! and how it exits, a tiny model and corpus, and readers for the JSON,
//! JSONL and safetensors files the commands write.
//!
//! The binary's path comes from the test target (`env!("CARGO_BIN_EXE_rlhf")`
//! is only set there), so it is passed in: `Rlhf::new(path)`.

use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;

pub use safetensors;
pub use serde_json;
pub use tempfile;

/// `rlhf init-model` flags for a model that trains in milliseconds: 2 layers,
/// hidden 32, GQA (4 heads, 2 KV heads), a 300-token BPE.
pub const TINY_MODEL: &[&str] = &[
    "--vocab_size",
    "300",
    "--hidden_size",
    "32",
    "--intermediate_size",
    "64",
    "--num_hidden_layers",
    "2",
    "--num_attention_heads",
    "4",
    "--num_key_value_heads",
    "2",
    "--max_position_embeddings",
    "128",
];

/// The shape [`TINY_MODEL`] gives (for checking tensor shapes).
pub const TINY_HIDDEN: usize = 32;
pub const TINY_INTERMEDIATE: usize = 64;
pub const TINY_LAYERS: usize = 2;
/// num_key_value_heads × head_dim = 2 × (32 / 4).
pub const TINY_KV_DIM: usize = 16;

/// The seven Llama linear layers MedicalGPT's `--target_modules all` adapts.
pub const ALL_TARGET_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The `rlhf` binary.
#[derive(Clone, Debug)]
pub struct Rlhf {
    bin: PathBuf,
}

impl Rlhf {
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Rlhf { bin: bin.into() }
    }

    /// A command line for `rlhf <subcommand>`.
    pub fn cmd(&self, subcommand: &str) -> Cmd {
        Cmd {
            bin: self.bin.clone(),
            subcommand: subcommand.into(),
            flags: Vec::new(),
        }
    }

    /// `rlhf run FILE [extra]` in `dir` (a pipeline's paths are relative to
    /// it); panics with its output on failure.
    pub fn run_pipeline(&self, dir: &Path, file: &Path, extra: &[&str]) -> std::process::Output {
        let out = std::process::Command::new(&self.bin)
            .current_dir(dir)
            .arg("run")
            .arg(file)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rlhf run failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `rlhf init-model` of the tiny model, tokenizer trained on `corpus`.
    pub fn init_tiny_model(&self, corpus: &Path, out: &Path) -> Run {
        let mut c = self
            .cmd("init-model")
            .opt("--corpus", corpus)
            .opt("--output_dir", out);
        for kv in TINY_MODEL.chunks(2) {
            c = c.opt(kv[0], kv[1]);
        }
        c.ok()
    }

    /// `rlhf pt` with small, fast settings (each can be replaced with
    /// [`Cmd::opt`]): block_size 32, 6 steps of batch 2, lr 1e-3, a metrics
    /// line every step, a checkpoint every 3 steps, LoRA (the default).
    pub fn pt(&self, model: &Path, data: &Path, out: &Path) -> Cmd {
        self.cmd("pt")
            .opt("--model_name_or_path", model)
            .opt("--train_file_dir", data)
            .opt("--output_dir", out)
            .opt("--block_size", "32")
            .opt("--max_steps", "6")
            .opt("--per_device_train_batch_size", "2")
            .opt("--learning_rate", "1e-3")
            .opt("--logging_steps", "1")
            .opt("--save_steps", "3")
    }

    /// `rlhf eval` of `model` (+ `adapter`) on `file` with block_size 32;
    /// asserts success and returns the JSON it prints.
    pub fn eval(&self, model: &Path, adapter: Option<&Path>, file: &Path) -> Value {
        let mut c = self
            .cmd("eval")
            .opt("--model_name_or_path", model)
            .opt("--validation_file", file)
            .opt("--block_size", "32");
        if let Some(a) = adapter {
            c = c.opt("--peft_path", a);
        }
        c.ok().json()
    }
}

/// One `rlhf` command line: the subcommand and `--flag [value]` pairs, in
/// order. Setting a flag again replaces its value (clap refuses repeats).
#[derive(Clone, Debug)]
pub struct Cmd {
    bin: PathBuf,
    subcommand: String,
    flags: Vec<(String, Option<OsString>)>,
}

impl Cmd {
    /// Set `--name value` (replacing an earlier value of `--name`).
    pub fn opt(mut self, name: &str, value: impl AsRef<OsStr>) -> Self {
        let v = Some(value.as_ref().to_owned());
        match self.flags.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = v,
            None => self.flags.push((name.into(), v)),
        }
        self
    }

    /// A flag with no value (`--bf16`).
    pub fn flag(mut self, name: &str) -> Self {
        self.flags.retain(|(n, _)| n != name);
        self.flags.push((name.into(), None));
        self
    }

    /// Drop a flag set earlier (e.g. one of [`Rlhf::pt`]'s defaults).
    pub fn without(mut self, name: &str) -> Self {
        self.flags.retain(|(n, _)| n != name);
        self
    }

    fn args(&self) -> Vec<OsString> {
        let mut args = vec![OsString::from(&self.subcommand)];
        for (n, v) in &self.flags {
            args.push(n.into());
            args.extend(v.clone());
        }
        args
    }

    /// Run it and capture its exit code, stdout and stderr.
    pub fn run(&self) -> Run {
        self.run_with_stdin("")
    }

    /// [`Cmd::run`] with `input` as its standard input.
    pub fn run_with_stdin(&self, input: &str) -> Run {
        use std::io::Write;
        let args = self.args();
        let mut child = Command::new(&self.bin)
            .args(&args)
            // Plain log lines whatever the caller's environment says.
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        let mut stdin = child.stdin.take().expect("piped stdin");
        let input = input.to_owned();
        // Written from a thread: a large input must not block while the child's pipes fill.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(input.as_bytes());
        });
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        let _ = writer.join();
        Run {
            cmdline: std::iter::once(self.bin.as_os_str().to_owned())
                .chain(args)
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" "),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: strip_ansi(&String::from_utf8_lossy(&out.stderr)),
        }
    }

    /// [`Cmd::ok`] with `input` as standard input.
    pub fn ok_with_stdin(&self, input: &str) -> Run {
        let r = self.run_with_stdin(input);
        assert!(r.code == Some(0), "expected success\n{r}");
        r
    }

    /// Run it and panic (showing stderr) unless it exits 0.
    pub fn ok(&self) -> Run {
        let r = self.run();
        assert!(r.code == Some(0), "expected success\n{r}");
        r
    }

    /// Run it and assert a clean failure: a non-zero exit code (not a
    /// signal) and no panic.
    pub fn fails(&self) -> Run {
        let r = self.run();
        assert!(
            matches!(r.code, Some(c) if c != 0),
            "expected a non-zero exit code\n{r}"
        );
        assert!(
            !r.stderr.contains("panicked"),
            "a bad input must be an error message, not a panic\n{r}"
        );
        r
    }
}

/// What a finished command did.
#[derive(Clone, Debug)]
pub struct Run {
    pub cmdline: String,
    /// None when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    /// With any ANSI colour codes removed.
    pub stderr: String,
}

impl Run {
    /// stdout parsed as one JSON value (what `pt`, `eval` and `init-model` print).
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e})\n{self}"))
    }

    /// Assert a clean failure (non-zero exit, no panic) whose stderr has each of `needles`.
    pub fn assert_failed_with(&self, needles: &[&str]) {
        assert!(
            matches!(self.code, Some(c) if c != 0) && !self.stderr.contains("panicked"),
            "expected a clean failure\n{self}"
        );
        self.assert_stderr_has(needles);
    }

    /// Assert that stderr contains each of `needles`.
    pub fn assert_stderr_has(&self, needles: &[&str]) {
        for n in needles {
            assert!(self.stderr.contains(n), "stderr lacks {n:?}\n{self}");
        }
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "$ {}\nexit code: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline, self.code, self.stdout, self.stderr
        )
    }
}

/// Remove `ESC [ ... letter` sequences.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A throw-away directory for one test (removed when dropped; kept, and its
/// path printed, when RLHF_E2E_KEEP is set, to look at a failure).
pub struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Self {
        Workspace {
            dir: {
                let keep = std::env::var_os("RLHF_E2E_KEEP").is_some();
                let dir = tempfile::Builder::new()
                    .prefix("rlhf-e2e-")
                    .disable_cleanup(keep)
                    .tempdir()
                    .expect("creating a temp dir");
                if keep {
                    eprintln!("RLHF_E2E_KEEP: workspace {}", dir.path().display());
                }
                dir
            },
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Write `bytes` to `rel` (creating parent folders); returns the path.
    pub fn write(&self, rel: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// An empty folder `rel`.
    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}

impl Default for Workspace {
    fn default() -> Self {
        Self::new()
    }
}

/// A small synthetic medical corpus, one document per line: `lines`
/// sentences from a few templates and word lists, deterministic in `seed`.
/// Repetitive on purpose, so a tiny model's loss visibly drops in a few steps.
pub fn corpus_text(lines: usize, seed: u64) -> String {
    const PEOPLE: [&str; 6] = [
        "The patient",
        "A child",
        "An adult",
        "The nurse",
        "A doctor",
        "Each elderly patient",
    ];
    const CONDITIONS: [&str; 8] = [
        "fever",
        "a cough",
        "headache",
        "influenza",
        "pneumonia",
        "measles",
        "malaria",
        "a rash",
    ];
    const DRUGS: [&str; 6] = [
        "aspirin",
        "ibuprofen",
        "paracetamol",
        "amoxicillin",
        "oseltamivir",
        "quinine",
    ];
    const TIMES: [&str; 4] = [
        "once a day",
        "twice a day",
        "every six hours",
        "before sleep",
    ];
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut pick = |n: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % n
    };
    let mut out = String::new();
    for _ in 0..lines {
        let (p, c, d, t) = (
            PEOPLE[pick(6)],
            CONDITIONS[pick(8)],
            DRUGS[pick(6)],
            TIMES[pick(4)],
        );
        let dose = 100 * (1 + pick(5));
        let line = match pick(3) {
            0 => format!("{p} with {c} takes {dose} mg of {d} {t}."),
            1 => format!("For {c}, {p} was given {d} {t} for {} days.", 2 + pick(6)),
            _ => format!("{p} reports {c}; {d} {dose} mg {t} is the usual treatment."),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The MedicalGPT sample PT data (`shared/data/medicalgpt/pretrain`: English
/// and Chinese medical text), given the root package's manifest dir.
pub fn medicalgpt_pretrain_dir(root_manifest_dir: &str) -> PathBuf {
    Path::new(root_manifest_dir).join("../shared/data/medicalgpt/pretrain")
}

/// Read a JSON file.
pub fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Read a JSON-lines file: one JSON value per non-empty line.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}:{}: {e}: {l}", path.display(), i + 1))
        })
        .collect()
}

/// The lines of a `metrics.jsonl` that log a training step (they have `loss`).
pub fn train_lines(metrics: &[Value]) -> Vec<&Value> {
    metrics.iter().filter(|v| v.get("loss").is_some()).collect()
}

/// A number field of a JSON object, panicking with the object if absent.
pub fn num(v: &Value, key: &str) -> f64 {
    v.get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no number {key:?} in {v}"))
}

/// One tensor of a safetensors file.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Tensor {
    /// The values, for an F32 tensor.
    pub fn f32s(&self) -> Vec<f32> {
        assert_eq!(
            self.dtype,
            safetensors::Dtype::F32,
            "expected an F32 tensor"
        );
        self.bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }
}

/// Every tensor of a safetensors file, by name.
pub fn read_safetensors(path: &Path) -> BTreeMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{} is not valid safetensors: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                Tensor {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: view.data().to_vec(),
                },
            )
        })
        .collect()
}

/// Copy the safetensors file `src` to `dst` without the tensor `drop`
/// (keeping the header metadata), as a model dir missing a weight.
pub fn write_safetensors_without(src: &Path, dst: &Path, drop: &str) {
    let bytes = std::fs::read(src).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != drop)
        .collect();
    assert_eq!(
        kept.len() + 1,
        st.len(),
        "{drop} is not in {}",
        src.display()
    );
    let out = safetensors::serialize(kept, meta.metadata().clone()).unwrap();
    std::fs::write(dst, out).unwrap();
}

/// Copy a folder's files (recursively) into `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
}

/// Every file and folder under `dir`, as sorted paths relative to it
/// (empty when `dir` does not exist).
pub fn list_tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in rd {
            let p = entry.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            if p.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The `checkpoint-N` folders directly in `dir`, sorted by N.
pub fn checkpoints(dir: &Path) -> Vec<String> {
    let mut v: Vec<(u64, String)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((n, name))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, n)| n).collect()
}

/// Temp files that an interrupted atomic write would leave: `tempfile`'s
/// `.tmpXXXXXX` names and `*.tmp` (e.g. an unpublished `checkpoint-N.tmp`).
pub fn temp_files(dir: &Path) -> Vec<String> {
    list_tree(dir)
        .into_iter()
        .filter(|p| {
            let name = Path::new(p)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            name.starts_with(".tmp") || name.ends_with(".tmp")
        })
        .collect()
}

/// Assert that a failed run left nothing in `out` that could pass for a
/// result: no temp files, no weights, no adapter or model config.
pub fn assert_no_partial_outputs(out: &Path) {
    const RESULTS: [&str; 5] = [
        "adapter_model.safetensors",
        "adapter_config.json",
        "model.safetensors",
        "config.json",
        "all_results.json",
    ];
    let bad: Vec<String> = list_tree(out)
        .into_iter()
        .filter(|p| {
            let name = Path::new(p)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            name.starts_with(".tmp")
                || name.ends_with(".tmp")
                || p.starts_with("checkpoint-")
                || RESULTS.contains(&name.as_str())
        })
        .collect();
    assert!(
        bad.is_empty(),
        "a failed run left files in {}: {bad:?}",
        out.display()
    );
}

/// The number of distinct token ids in a `tokenizer.json` (the model vocab
/// plus added tokens), and 1 + the largest id.
pub fn tokenizer_size(model_dir: &Path) -> (usize, usize) {
    let t = read_json(&model_dir.join("tokenizer.json"));
    let mut ids: Vec<u64> = t["model"]["vocab"]
        .as_object()
        .expect("tokenizer.json has a model.vocab object")
        .values()
        .map(|v| v.as_u64().unwrap())
        .collect();
    if let Some(added) = t["added_tokens"].as_array() {
        ids.extend(added.iter().map(|a| a["id"].as_u64().unwrap()));
    }
    ids.sort();
    ids.dedup();
    (ids.len(), ids.last().map_or(0, |&m| m as usize + 1))
}

/// The id of a token string in a `tokenizer.json` (vocab or added tokens).
pub fn token_id(model_dir: &Path, token: &str) -> Option<u64> {
    let t = read_json(&model_dir.join("tokenizer.json"));
    t["added_tokens"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["content"] == token))
        .map(|x| x["id"].as_u64().unwrap())
        .or_else(|| t["model"]["vocab"][token].as_u64())
}
