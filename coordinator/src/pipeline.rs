//! The pipeline file (TOML): cluster settings and an ordered list of stages,
//! each with the arguments of its single-process subcommand.
//!
//! INTERFACE SKELETON — bodies filled in by the pipeline work.

use anyhow::Result;
use std::path::{Path, PathBuf};

/// The stage kinds a pipeline may name (more as stages land).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageKind {
    /// Writes the demo domain (tiny model + corpus) into its output_dir (rank 0 only).
    Demo,
    /// Continued pre-training (`rlhf pt`).
    Pt,
}

impl StageKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            StageKind::Demo => "demo",
            StageKind::Pt => "pt",
        }
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
    /// Where the coordinator keeps its journal (default: <pipeline file dir>/<output_root>/.coordinator).
    pub state_dir: PathBuf,
}

/// One `[[stage]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct StageSpec {
    pub name: String,
    pub kind: StageKind,
    /// (key, value) in file order; values are strings as they will go on a command line.
    pub args: Vec<(String, String)>,
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
        let _ = path;
        unimplemented!("pipeline parsing")
    }

    /// argv for stage `i` (`--key value ...`), references to earlier stages
    /// (`{pt.output_dir}`) resolved.
    pub fn stage_argv(&self, i: usize) -> Result<Vec<String>> {
        let _ = i;
        unimplemented!("stage argv")
    }

    /// Samples per optimizer step across all ranks for stage `i`.
    pub fn global_batch(&self, i: usize) -> Result<usize> {
        let _ = i;
        unimplemented!("global batch")
    }

    /// The stage's output_dir argument (as written, references resolved).
    pub fn output_dir(&self, i: usize) -> Result<String> {
        let _ = i;
        unimplemented!("output dir")
    }
}
