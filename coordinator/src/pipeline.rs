//! The pipeline file (TOML): cluster settings and an ordered list of stages,
//! each with the arguments of its single-process subcommand.
//!
//! ```toml
//! [cluster]
//! workers = 2
//!
//! [[stage]]
//! name = "demo"
//! kind = "demo"
//! output_dir = "out/pipeline/demo"
//!
//! [[stage]]
//! name = "pt"
//! kind = "pt"
//! model_name_or_path = "{demo.output_dir}/base-model"
//! output_dir = "out/pipeline/pt"
//! ```
//!
//! Every key of a stage other than `name` and `kind` is an argument of the
//! stage's subcommand (`rlhf pt --key value`), checked against that
//! subcommand's clap definition when the file is loaded: an unknown key, a
//! bad value or a missing required argument is an error naming the file, the
//! line, the stage and the key. `{stage.key}` inside a string is replaced by
//! an earlier stage's value of `key` (its default when it does not set it).

use anyhow::{anyhow, bail, Context, Result};
use clap::{Arg, ArgAction, Args, Command};
use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// The stage kinds a pipeline may name (more as stages land).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageKind {
    /// Writes the demo domain (tiny model + corpus) into its output_dir (rank 0 only).
    Demo,
    /// Continued pre-training (`rlhf pt`).
    Pt,
    /// Supervised fine-tuning on conversations (`rlhf sft`).
    Sft,
    /// Reward modelling on preference pairs (`rlhf rm`).
    Rm,
    /// A LoRA adapter merged into its base model (`rlhf merge`, rank 0 only).
    Merge,
    /// PPO from a reward model (`rlhf ppo`).
    Ppo,
    /// Direct Preference Optimization on preference pairs (`rlhf dpo`).
    Dpo,
    /// GRPO from rule rewards and/or a reward model (`rlhf grpo`). Its global
    /// batch counts completions (TRL's per_device_train_batch_size does):
    /// workers × per_device_train_batch_size × gradient_accumulation_steps,
    /// which must be a multiple of num_generations.
    Grpo,
}

impl StageKind {
    /// Every kind, in the order error messages list them.
    pub const ALL: [StageKind; 8] = [
        StageKind::Demo,
        StageKind::Pt,
        StageKind::Sft,
        StageKind::Rm,
        StageKind::Merge,
        StageKind::Ppo,
        StageKind::Dpo,
        StageKind::Grpo,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            StageKind::Demo => "demo",
            StageKind::Pt => "pt",
            StageKind::Sft => "sft",
            StageKind::Rm => "rm",
            StageKind::Merge => "merge",
            StageKind::Ppo => "ppo",
            StageKind::Dpo => "dpo",
            StageKind::Grpo => "grpo",
        }
    }

    /// The kind named `s` (`"pt"`), if there is one.
    pub fn parse(s: &str) -> Option<StageKind> {
        StageKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The clap definition of the stage's arguments: for `pt` exactly the
    /// arguments of `rlhf pt`; for `demo`, `--output_dir` (required) and
    /// `--seed` (default 42).
    pub fn command(&self) -> Command {
        let cmd = Command::new(self.as_str());
        match self {
            StageKind::Pt => rlhf_worker::stages::pt::PtArgs::augment_args(cmd),
            StageKind::Sft => rlhf_worker::stages::sft::SftArgs::augment_args(cmd),
            StageKind::Rm => rlhf_worker::stages::rm::RmArgs::augment_args(cmd),
            StageKind::Merge => rlhf_worker::merge::MergeArgs::augment_args(cmd),
            StageKind::Ppo => rlhf_worker::stages::ppo::PpoArgs::augment_args(cmd),
            StageKind::Dpo => rlhf_worker::stages::dpo::DpoArgs::augment_args(cmd),
            StageKind::Grpo => rlhf_worker::stages::grpo::GrpoArgs::augment_args(cmd),
            StageKind::Demo => rlhf_worker::agent::DemoStageArgs::augment_args(cmd),
        }
    }
}

impl std::fmt::Display for StageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[cluster]`: how many workers and how they are watched.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterConfig {
    /// Workers the run is planned for: the global batch of every stage is
    /// workers × per_device_train_batch_size × gradient_accumulation_steps,
    /// whatever number of workers actually runs it later.
    pub workers: usize,
    /// A stage starts once this many workers have joined (default: workers).
    pub min_workers: usize,
    pub heartbeat_interval_ms: u64,
    /// A worker silent this long is declared dead (default 10 000, at most 30 000 by default).
    pub heartbeat_timeout_ms: u64,
    /// Where the coordinator keeps its journal (default:
    /// `<common parent of the stages' output_dirs>/.coordinator`, relative to
    /// the working directory like every path in the file).
    pub state_dir: PathBuf,
}

/// Where a `demo` stage puts the small random model, under its output_dir
/// (`rlhf_worker::demo::write_demo_assets`' layout; examples/pipeline.toml's
/// pt stage reads `{demo.output_dir}/base-model`).
pub const DEMO_MODEL_SUBDIR: &str = "base-model";
/// Where a `demo` stage puts the PT corpus, under its output_dir:
/// `data/train/` and `data/valid/`.
pub const DEMO_PT_DATA_SUBDIR: &str = "data";

/// Default of `[cluster] workers`.
pub const DEFAULT_WORKERS: usize = 1;
/// Default of `[cluster] heartbeat_interval_ms`.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 1000;
/// Default of `[cluster] heartbeat_timeout_ms`.
pub const DEFAULT_HEARTBEAT_TIMEOUT_MS: u64 = 10_000;

/// One `[[stage]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct StageSpec {
    pub name: String,
    pub kind: StageKind,
    /// (key, value) in file order; values are strings as they will go on a
    /// command line, references to earlier stages already resolved.
    pub args: Vec<(String, String)>,
}

impl StageSpec {
    /// The value of `key` as set in the file (references resolved), if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `key`: as set in the file, or else the subcommand's
    /// default (None when neither).
    pub fn value_or_default(&self, key: &str) -> Option<String> {
        if let Some(v) = self.get(key) {
            return Some(v.to_string());
        }
        let cmd = self.kind.command();
        let arg = cmd.get_arguments().find(|a| a.get_long() == Some(key))?;
        arg.get_default_values()
            .first()
            .map(|v| v.to_string_lossy().into_owned())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Pipeline {
    pub cluster: ClusterConfig,
    pub stages: Vec<StageSpec>,
    /// The file it came from.
    pub source: PathBuf,
}

impl Pipeline {
    pub fn load(path: &Path) -> Result<Pipeline> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read pipeline file {}", path.display()))?;
        Pipeline::parse(&text, path)
    }

    /// Parse pipeline text; `source` names the file in error messages.
    pub fn parse(text: &str, source: &Path) -> Result<Pipeline> {
        let p = Parser {
            text,
            file: source.display().to_string(),
        }
        .pipeline(source)?;
        // A PPO split that leaves no trainer fails now, not after the stages before it.
        for (i, s) in p.stages.iter().enumerate() {
            if s.kind == StageKind::Ppo {
                p.global_batch(i)
                    .with_context(|| format!("{}", source.display()))?;
            }
        }
        Ok(p)
    }

    /// The index of the stage called `name`.
    pub fn stage_index(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }

    fn stage(&self, i: usize) -> Result<&StageSpec> {
        self.stages.get(i).ok_or_else(|| {
            anyhow!(
                "{}: no stage {i} (the pipeline has {} stages)",
                self.source.display(),
                self.stages.len()
            )
        })
    }

    /// argv for stage `i` (`--key value ...`), references to earlier stages
    /// (`{pt.output_dir}`) resolved.
    pub fn stage_argv(&self, i: usize) -> Result<Vec<String>> {
        Ok(self
            .stage(i)?
            .args
            .iter()
            .flat_map(|(k, v)| [format!("--{k}"), v.clone()])
            .collect())
    }

    /// Samples per optimizer step across all ranks for stage `i`.
    pub fn global_batch(&self, i: usize) -> Result<usize> {
        let s = self.stage(i)?;
        let num = |key: &str| -> Result<usize> {
            let v = s.value_or_default(key).ok_or_else(|| {
                anyhow!(
                    "stage '{}' (kind {}) has no {key}: it does not train",
                    s.name,
                    s.kind
                )
            })?;
            v.parse::<usize>()
                .map_err(|e| anyhow!("stage '{}': {key} = {v:?}: {e}", s.name))
        };
        if s.kind == StageKind::Ppo {
            // Rollouts per iteration: batch_size per planned trainer (the
            // workers not set apart as rollout workers).
            let rollout_workers = num("rollout_workers")?;
            if rollout_workers >= self.cluster.workers {
                bail!(
                    "stage '{}': rollout_workers = {rollout_workers} leaves no trainer among the {} planned workers",
                    s.name,
                    self.cluster.workers
                );
            }
            return Ok((self.cluster.workers - rollout_workers) * num("batch_size")?);
        }
        Ok(self.cluster.workers
            * num("per_device_train_batch_size")?
            * num("gradient_accumulation_steps")?)
    }

    /// The stage's output_dir argument (as written, references resolved).
    pub fn output_dir(&self, i: usize) -> Result<String> {
        let s = self.stage(i)?;
        s.get("output_dir")
            .map(str::to_string)
            .ok_or_else(|| anyhow!("stage '{}' has no output_dir", s.name))
    }
}

// ---------------------------------------------------------------------------
// Parsing

struct Parser<'a> {
    text: &'a str,
    file: String,
}

/// What a stage needs while later stages are parsed.
struct Parsed {
    spec: StageSpec,
    line: usize,
}

impl Parser<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn err<T>(&self, offset: usize, msg: impl std::fmt::Display) -> Result<T> {
        Err(anyhow!("{}:{}: {msg}", self.file, self.line(offset)))
    }

    fn pipeline(&self, source: &Path) -> Result<Pipeline> {
        let doc = match DeTable::parse(self.text) {
            Ok(d) => d,
            Err(e) => {
                let line = e.span().map(|s| self.line(s.start)).unwrap_or(1);
                bail!("{}:{line}: {}", self.file, e.to_string().trim_end());
            }
        };
        let doc = doc.get_ref();
        let mut cluster_tbl = None;
        let mut stage_arr = None;
        for (k, v) in sorted(doc) {
            match k.get_ref().as_ref() {
                "cluster" => match v.get_ref() {
                    DeValue::Table(t) => cluster_tbl = Some((t, v.span().start)),
                    _ => self.err(k.span().start, "'cluster' must be a table ([cluster])")?,
                },
                "stage" => match v.get_ref() {
                    DeValue::Array(a) => stage_arr = Some(a),
                    _ => self.err(
                        k.span().start,
                        "'stage' must be an array of tables ([[stage]])",
                    )?,
                },
                other => self.err(
                    k.span().start,
                    format!(
                        "unknown key '{other}' at the top level (expected [cluster] and [[stage]]){}",
                        did_you_mean(other, ["cluster", "stage"])
                    ),
                )?,
            }
        }

        let mut stages: Vec<Parsed> = Vec::new();
        for item in stage_arr.map(|a| &a[..]).unwrap_or(&[]) {
            let DeValue::Table(t) = item.get_ref() else {
                self.err(item.span().start, "each stage must be a table ([[stage]])")?
            };
            let p = self.stage(t, item.span().start, &stages)?;
            stages.push(p);
        }
        if stages.is_empty() {
            bail!("{}: no [[stage]] in the pipeline", self.file);
        }
        // Two stages writing into one directory would overwrite each other.
        for (i, b) in stages.iter().enumerate() {
            let dir = b.spec.get("output_dir");
            if let Some(a) = stages[..i].iter().find(|a| a.spec.get("output_dir") == dir) {
                self.err_line(
                    b.line,
                    format!(
                        "stage '{}' has the same output_dir as stage '{}' (line {}): {:?}",
                        b.spec.name,
                        a.spec.name,
                        a.line,
                        dir.unwrap_or_default()
                    ),
                )?;
            }
        }
        let stages: Vec<StageSpec> = stages.into_iter().map(|p| p.spec).collect();
        let cluster = self.cluster(cluster_tbl, &stages)?;
        Ok(Pipeline {
            cluster,
            stages,
            source: source.to_path_buf(),
        })
    }

    fn err_line<T>(&self, line: usize, msg: impl std::fmt::Display) -> Result<T> {
        Err(anyhow!("{}:{line}: {msg}", self.file))
    }

    fn cluster(
        &self,
        tbl: Option<(&DeTable<'_>, usize)>,
        stages: &[StageSpec],
    ) -> Result<ClusterConfig> {
        const KEYS: [&str; 5] = [
            "workers",
            "min_workers",
            "heartbeat_interval_ms",
            "heartbeat_timeout_ms",
            "state_dir",
        ];
        let mut workers = None;
        let mut min_workers = None;
        let mut interval = None;
        let mut timeout = None;
        let mut state_dir = None;
        let mut table_line = 1;
        if let Some((t, start)) = tbl {
            table_line = self.line(start);
            for (k, v) in sorted(t) {
                let key = k.get_ref().as_ref();
                let at = k.span().start;
                let positive = || -> Result<u64> {
                    match v.get_ref() {
                        DeValue::Integer(n) => match u64::from_str_radix(n.as_str(), n.radix()) {
                            Ok(n) if n > 0 => Ok(n),
                            _ => self.err(
                                at,
                                format!("[cluster] {key} must be a positive integer, found {n}"),
                            ),
                        },
                        other => self.err(
                            at,
                            format!(
                                "[cluster] {key} must be a positive integer, found {}",
                                a_type(other)
                            ),
                        ),
                    }
                };
                match key {
                    "workers" => workers = Some((positive()? as usize, at)),
                    "min_workers" => min_workers = Some((positive()? as usize, at)),
                    "heartbeat_interval_ms" => interval = Some((positive()?, at)),
                    "heartbeat_timeout_ms" => timeout = Some((positive()?, at)),
                    "state_dir" => match v.get_ref() {
                        DeValue::String(s) if !s.is_empty() => {
                            state_dir = Some(PathBuf::from(s.as_ref()))
                        }
                        _ => self.err(at, "[cluster] state_dir must be a non-empty string")?,
                    },
                    other => self.err(
                        at,
                        format!(
                            "unknown key '{other}' in [cluster]{}",
                            did_you_mean(other, KEYS)
                        ),
                    )?,
                }
            }
        }
        let workers_n = workers.map(|w| w.0).unwrap_or(DEFAULT_WORKERS);
        let min_n = min_workers.map(|w| w.0).unwrap_or(workers_n);
        if min_n > workers_n {
            let at = min_workers.map(|w| w.1).unwrap_or(0);
            self.err(
                at,
                format!("[cluster] min_workers ({min_n}) is more than workers ({workers_n})"),
            )?;
        }
        let interval_ms = interval
            .map(|i| i.0)
            .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL_MS);
        let timeout_ms = timeout.map(|t| t.0).unwrap_or(DEFAULT_HEARTBEAT_TIMEOUT_MS);
        if timeout_ms <= interval_ms {
            let line = timeout
                .or(interval)
                .map(|t| self.line(t.1))
                .unwrap_or(table_line);
            self.err_line(
                line,
                format!(
                    "[cluster] heartbeat_timeout_ms ({timeout_ms}) must be more than heartbeat_interval_ms ({interval_ms})"
                ),
            )?;
        }
        let state_dir = state_dir.unwrap_or_else(|| default_state_dir(stages));
        Ok(ClusterConfig {
            workers: workers_n,
            min_workers: min_n,
            heartbeat_interval_ms: interval_ms,
            heartbeat_timeout_ms: timeout_ms,
            state_dir,
        })
    }

    fn stage(&self, t: &DeTable<'_>, start: usize, earlier: &[Parsed]) -> Result<Parsed> {
        let entries = sorted(t);
        // The `[[stage]]` header's line (the table's span starts there or at its first key).
        let header_line = self.line(start);
        let text_of = |key: &str| -> Result<Option<(String, usize)>> {
            match t.get(key) {
                None => Ok(None),
                Some(v) => match v.get_ref() {
                    DeValue::String(s) => Ok(Some((s.to_string(), v.span().start))),
                    other => self.err(
                        v.span().start,
                        format!("stage {key} must be a string, found {}", a_type(other)),
                    ),
                },
            }
        };
        let Some((name, name_at)) = text_of("name")? else {
            return self.err_line(header_line, "stage without a name (add name = \"...\")");
        };
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_name {
            self.err(
                name_at,
                format!("stage name {name:?} must be letters, digits, '_' or '-'"),
            )?;
        }
        if let Some(prev) = earlier.iter().find(|p| p.spec.name == name) {
            self.err(
                name_at,
                format!(
                    "duplicate stage name '{name}' (first used on line {})",
                    prev.line
                ),
            )?;
        }
        let Some((kind_s, kind_at)) = text_of("kind")? else {
            return self.err(
                name_at,
                format!("stage '{name}' has no kind (add kind = \"pt\")"),
            );
        };
        let Some(kind) = StageKind::parse(&kind_s) else {
            let kinds: Vec<&str> = StageKind::ALL.iter().map(|k| k.as_str()).collect();
            return self.err(
                kind_at,
                format!(
                    "unknown kind '{kind_s}' in stage '{name}' (known: {}){}",
                    kinds.join(", "),
                    did_you_mean(&kind_s, kinds.iter().copied())
                ),
            );
        };
        let cmd = kind.command();
        let longs: Vec<&str> = cmd.get_arguments().filter_map(|a| a.get_long()).collect();

        let mut args: Vec<(String, String)> = Vec::new();
        for (k, v) in &entries {
            let key = k.get_ref().as_ref();
            if key == "name" || key == "kind" {
                continue;
            }
            let at = k.span().start;
            let Some(arg) = cmd.get_arguments().find(|a| a.get_long() == Some(key)) else {
                self.err(
                    at,
                    format!(
                        "unknown key '{key}' in stage '{name}' (kind {kind}){}",
                        did_you_mean(key, longs.iter().copied())
                    ),
                )?
            };
            let raw = self.value_string(v, arg, key, &name)?;
            let value = self.resolve(&raw, v.span().start, key, &name, earlier)?;
            self.check_value(&cmd, arg, &value, at, key, &name)?;
            args.push((key.to_string(), value));
        }
        // Required arguments of the subcommand.
        for a in cmd.get_arguments() {
            if a.is_required_set() {
                let long = a.get_long().unwrap_or(a.get_id().as_str());
                if !args.iter().any(|(k, _)| k == long) {
                    self.err(
                        name_at,
                        format!("stage '{name}' (kind {kind}) needs '{long}'"),
                    )?;
                }
            }
        }
        // And the whole command line, as `rlhf <kind>` would see it.
        let argv: Vec<String> = std::iter::once(kind.as_str().to_string())
            .chain(args.iter().flat_map(|(k, v)| [format!("--{k}"), v.clone()]))
            .collect();
        if let Err(e) = cmd.clone().try_get_matches_from(argv) {
            self.err(
                name_at,
                format!("stage '{name}' (kind {kind}): {}", clap_message(&e)),
            )?;
        }
        Ok(Parsed {
            spec: StageSpec { name, kind, args },
            line: self.line(name_at),
        })
    }

    /// A TOML value as its command-line string.
    fn value_string(
        &self,
        v: &Spanned<DeValue<'_>>,
        arg: &Arg,
        key: &str,
        stage: &str,
    ) -> Result<String> {
        let at = v.span().start;
        match v.get_ref() {
            DeValue::Array(items) => {
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                let delim = arg.get_value_delimiter().or_else(|| {
                    help.to_ascii_lowercase()
                        .contains("comma list")
                        .then_some(',')
                });
                let Some(delim) = delim else {
                    return self.err(
                        at,
                        format!("'{key}' in stage '{stage}' takes one value, not an array"),
                    );
                };
                let mut parts = Vec::with_capacity(items.len());
                for item in items.iter() {
                    if matches!(item.get_ref(), DeValue::Array(_) | DeValue::Table(_)) {
                        return self.err(
                            item.span().start,
                            format!(
                                "'{key}' in stage '{stage}': arrays may hold only plain values"
                            ),
                        );
                    }
                    parts.push(self.scalar(item, key, stage)?);
                }
                Ok(parts.join(&delim.to_string()))
            }
            _ => self.scalar(v, key, stage),
        }
    }

    fn scalar(&self, v: &Spanned<DeValue<'_>>, key: &str, stage: &str) -> Result<String> {
        match v.get_ref() {
            DeValue::String(s) => Ok(s.to_string()),
            DeValue::Integer(n) => match n.radix() {
                10 => Ok(n.as_str().to_string()),
                r => i128::from_str_radix(n.as_str(), r)
                    .map(|x| x.to_string())
                    .or_else(|e| self.err(v.span().start, format!("'{key}': {e}"))),
            },
            DeValue::Float(f) => Ok(f.as_str().to_string()),
            DeValue::Boolean(b) => Ok(b.to_string()),
            other => self.err(
                v.span().start,
                format!(
                    "'{key}' in stage '{stage}' must be a string, number or boolean, found {}",
                    a_type(other)
                ),
            ),
        }
    }

    /// Replace `{stage.key}` by an earlier stage's value of `key`.
    fn resolve(
        &self,
        raw: &str,
        at: usize,
        key: &str,
        stage: &str,
        earlier: &[Parsed],
    ) -> Result<String> {
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let reference = after.find('}').and_then(|close| {
                let inner = &after[..close];
                let (s, k) = inner.split_once('.')?;
                let word = |w: &str| {
                    !w.is_empty()
                        && w.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                };
                (word(s) && word(k)).then_some((s, k, close))
            });
            let Some((s, k, close)) = reference else {
                // Not a reference: a literal brace.
                out.push('{');
                rest = after;
                continue;
            };
            let Some(target) = earlier.iter().find(|p| p.spec.name == s) else {
                let later = if s == stage {
                    " (a stage cannot refer to itself)".to_string()
                } else {
                    " (references may name only earlier stages)".to_string()
                };
                return self.err(
                    at,
                    format!(
                        "'{key}' in stage '{stage}' refers to '{{{s}.{k}}}', but there is no earlier stage '{s}'{later}{}",
                        did_you_mean(s, earlier.iter().map(|p| p.spec.name.as_str()))
                    ),
                );
            };
            let Some(value) = target.spec.value_or_default(k) else {
                return self.err(
                    at,
                    format!(
                        "'{key}' in stage '{stage}' refers to '{{{s}.{k}}}', but stage '{s}' (line {}) has no '{k}'",
                        target.line
                    ),
                );
            };
            out.push_str(&value);
            rest = &after[close + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// Parse one `--key value` with the argument's own clap definition.
    fn check_value(
        &self,
        cmd: &Command,
        arg: &Arg,
        value: &str,
        at: usize,
        key: &str,
        stage: &str,
    ) -> Result<()> {
        let mut one = arg.clone().required(false);
        if matches!(arg.get_action(), ArgAction::Append) {
            one = one.action(ArgAction::Append);
        }
        let probe = Command::new("stage").arg(one);
        let flag = format!("--{key}");
        if let Err(e) = probe.try_get_matches_from([cmd.get_name(), flag.as_str(), value]) {
            self.err(
                at,
                format!(
                    "bad value for '{key}' in stage '{stage}': {}",
                    clap_message(&e)
                ),
            )?;
        }
        Ok(())
    }
}

/// A table's entries in file order (the map is sorted by key).
fn sorted<'a, 'i>(
    t: &'a DeTable<'i>,
) -> Vec<(
    &'a Spanned<toml::de::DeString<'i>>,
    &'a Spanned<DeValue<'i>>,
)> {
    let mut v: Vec<_> = t.iter().collect();
    v.sort_by_key(|(k, _)| k.span().start);
    v
}

/// "an integer", "a string", ...
fn a_type(v: &DeValue<'_>) -> String {
    let t = v.type_str();
    let article = if t.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {t}")
}

/// The first line of a clap error, without its `error: ` prefix.
fn clap_message(e: &clap::Error) -> String {
    let s = e.to_string();
    let first = s.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// `<common parent of the stages' output_dirs>/.coordinator`.
fn default_state_dir(stages: &[StageSpec]) -> PathBuf {
    let mut common: Option<PathBuf> = None;
    for s in stages {
        let Some(dir) = s.get("output_dir") else {
            continue;
        };
        let parent = Path::new(dir)
            .parent()
            .unwrap_or(Path::new(""))
            .to_path_buf();
        common = Some(match common {
            None => parent,
            Some(c) => c
                .components()
                .zip(parent.components())
                .take_while(|(a, b)| a == b)
                .map(|(a, _)| a)
                .collect(),
        });
    }
    common.unwrap_or_default().join(".coordinator")
}

/// ` (did you mean 'x'?)` when one candidate is close to `word`.
fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    let best = candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((d, c)) if d > 0 && d <= (word.len() / 3).max(2) => {
            format!(" (did you mean '{c}'?)")
        }
        _ => String::new(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
