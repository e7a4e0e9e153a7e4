//! The coordinator's journal: what a restarted coordinator needs to go on
//! (stages done, committed checkpoints, the next generation number, the
//! outcome). One JSON file, replaced atomically at every transition.

use crate::pipeline::Pipeline;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub(crate) const JOURNAL_FILE: &str = "journal.json";
const FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct DoneStage {
    pub name: String,
    /// rank 0's results_json (parsed when it is JSON, else the text).
    pub results: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Committed {
    pub step: u64,
    pub path: String,
    pub generation: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Placement {
    pub stage: String,
    pub generation: u64,
    pub world_size: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Outcome {
    pub success: bool,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Journal {
    pub format: u32,
    /// The pipeline file, for people reading the journal.
    pub pipeline: String,
    /// Hash of the stage list (names, kinds, arguments): a journal only resumes the same pipeline.
    pub pipeline_hash: String,
    /// The number the next placement gets; never reused, even across restarts.
    pub next_generation: u64,
    /// Index of the stage to run next (= stages_done.len()).
    pub stage_index: usize,
    pub stages_done: Vec<DoneStage>,
    /// stage name -> last committed checkpoint.
    pub committed: BTreeMap<String, Committed>,
    /// The latest placement of the current stage, if any.
    pub current: Option<Placement>,
    pub outcome: Option<Outcome>,
}

/// FNV-1a 64 over the stage list: stable across builds and platforms.
pub(crate) fn pipeline_hash(p: &Pipeline) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes.iter().chain(std::iter::once(&0xffu8)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for s in &p.stages {
        eat(b"stage");
        eat(s.name.as_bytes());
        eat(s.kind.as_str().as_bytes());
        for (k, v) in &s.args {
            eat(k.as_bytes());
            eat(v.as_bytes());
        }
    }
    format!("{h:016x}")
}

impl Journal {
    pub fn new(p: &Pipeline) -> Journal {
        Journal {
            format: FORMAT,
            pipeline: p.source.display().to_string(),
            pipeline_hash: pipeline_hash(p),
            next_generation: 1,
            stage_index: 0,
            stages_done: Vec::new(),
            committed: BTreeMap::new(),
            current: None,
            outcome: None,
        }
    }

    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(JOURNAL_FILE)
    }

    /// The journal in `state_dir` for pipeline `p`, or a fresh one (written at once).
    pub fn open(state_dir: &Path, p: &Pipeline) -> Result<(Journal, bool)> {
        let path = Journal::path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let j: Journal = serde_json::from_slice(&bytes).with_context(|| {
                    format!(
                        "reading the coordinator journal {} (delete it, or use another --state-dir, to start the pipeline afresh)",
                        path.display()
                    )
                })?;
                if j.format != FORMAT {
                    bail!(
                        "the coordinator journal {} has format {} (this build writes {FORMAT}): use another --state-dir or delete it",
                        path.display(),
                        j.format
                    );
                }
                let want = pipeline_hash(p);
                if j.pipeline_hash != want {
                    bail!(
                        "the state dir {} holds the journal of another pipeline ({}, stage hash {} ≠ {want} for {}): \
                         use another --state-dir, or delete {} to start this pipeline afresh",
                        state_dir.display(),
                        j.pipeline,
                        j.pipeline_hash,
                        p.source.display(),
                        path.display()
                    );
                }
                if j.stage_index != j.stages_done.len() || j.stage_index > p.stages.len() {
                    bail!("the coordinator journal {} is inconsistent (stage index {} with {} stages done, pipeline of {} stages): delete it or use another --state-dir",
                        path.display(), j.stage_index, j.stages_done.len(), p.stages.len());
                }
                Ok((j, true))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let j = Journal::new(p);
                j.save(state_dir)?;
                Ok((j, false))
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Write atomically: a temporary file in the same directory, fsync, rename, fsync the directory.
    pub fn save(&self, state_dir: &Path) -> Result<()> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating the state dir {}", state_dir.display()))?;
        let path = Journal::path(state_dir);
        let tmp = state_dir.join(format!(".{JOURNAL_FILE}.tmp-{}", std::process::id()));
        let bytes = serde_json::to_vec_pretty(self)?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, &path)?;
            // Make the rename itself durable (best effort: not every platform opens directories).
            if let Ok(d) = std::fs::File::open(state_dir) {
                let _ = d.sync_all();
            }
            Ok(())
        };
        write().with_context(|| format!("writing the coordinator journal {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{ClusterConfig, StageKind, StageSpec};

    fn pipeline(arg: &str) -> Pipeline {
        Pipeline {
            cluster: ClusterConfig {
                workers: 1,
                min_workers: 1,
                heartbeat_interval_ms: 100,
                heartbeat_timeout_ms: 1000,
                state_dir: "unused".into(),
            },
            stages: vec![StageSpec {
                name: "pt".into(),
                kind: StageKind::Pt,
                args: vec![("output_dir".into(), arg.into())],
            }],
            source: "p.toml".into(),
        }
    }

    #[test]
    fn hash_follows_the_stage_list_only() {
        let a = pipeline("out");
        let mut moved = a.clone();
        moved.source = "elsewhere/p.toml".into();
        moved.cluster.workers = 4;
        assert_eq!(pipeline_hash(&a), pipeline_hash(&moved));
        assert_ne!(pipeline_hash(&a), pipeline_hash(&pipeline("out2")));
        // Field boundaries count: ("ab","c") is not ("a","bc").
        let mut x = a.clone();
        x.stages[0].args = vec![("ab".into(), "c".into())];
        let mut y = a.clone();
        y.stages[0].args = vec![("a".into(), "bc".into())];
        assert_ne!(pipeline_hash(&x), pipeline_hash(&y));
    }

    #[test]
    fn save_replaces_atomically_and_open_checks_the_pipeline() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let p = pipeline("out");
        let (mut j, resumed) = Journal::open(&state, &p).unwrap();
        assert!(!resumed);
        j.next_generation = 7;
        j.save(&state).unwrap();
        let names: Vec<_> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            names,
            vec![JOURNAL_FILE.to_string()],
            "no temporary file is left"
        );
        let (back, resumed) = Journal::open(&state, &p).unwrap();
        assert!(resumed);
        assert_eq!(back, j);
        let e = Journal::open(&state, &pipeline("other"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("another pipeline") && e.contains("--state-dir"),
            "{e}"
        );
        std::fs::write(Journal::path(&state), "{not json").unwrap();
        let e = format!("{:#}", Journal::open(&state, &p).unwrap_err());
        assert!(e.contains("delete it"), "{e}");
    }
}
