//! `checkpoint-N/` dirs: the trainable weights (in the stage's output format),
//! the AdamW moments and the trainer state. The data position is the step
//! itself (the order of every epoch is a function of the seed), and dropout
//! masks are a function of (seed, step), so resuming replays the exact run.

use crate::fsutil::write_json_atomic;
use crate::model::weights::{save_tensors, SaveDtype, TensorFiles};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub global_step: u64,
    pub total_steps: u64,
    pub steps_per_epoch: u64,
    pub seed: u64,
    /// Length of the flat trainable buffer, to catch a mismatched model.
    pub train_len: usize,
    /// fp16 loss scaler (absent in checkpoints of f32/bf16 runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<super::loss_scale::LossScaler>,
}

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

pub fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// Write a checkpoint atomically: everything goes to `checkpoint-N.tmp`, then
/// one rename publishes it. `write_weights` writes the stage's weights files.
pub fn save<S: Serialize>(
    output_dir: &Path,
    step: u64,
    state: &S,
    m: Vec<f32>, // [train_len], taken by value: no second copy of the optimizer state
    v: Vec<f32>,
    write_weights: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(output_dir, step);
    let tmp = output_dir.join(format!("checkpoint-{step}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    write_weights(&tmp)?;
    save_tensors(
        &tmp.join(OPTIMIZER_FILE),
        &[
            ("exp_avg".into(), vec![m.len()], m),
            ("exp_avg_sq".into(), vec![v.len()], v),
        ],
        SaveDtype::F32,
        None,
    )?;
    write_json_atomic(&tmp.join(STATE_FILE), state)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)
            .with_context(|| format!("replacing {}", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("publishing {}", final_dir.display()))?;
    Ok(final_dir)
}

/// Read a checkpoint's trainer state.
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    load_state_as(dir)
}

/// Read a checkpoint's trainer_state.json as a stage's own state (the RL
/// stages flatten [`TrainerState`] into theirs).
pub fn load_state_as<S: serde::de::DeserializeOwned>(dir: &Path) -> Result<S> {
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

/// Read a checkpoint's state and AdamW moments.
pub fn load(dir: &Path) -> Result<(TrainerState, Vec<f32>, Vec<f32>)> {
    let state = load_state(dir)?;
    let opt = TensorFiles::open_files(&[dir.join(OPTIMIZER_FILE)])?;
    let m = opt.read_f32("exp_avg", &[state.train_len])?;
    let v = opt.read_f32("exp_avg_sq", &[state.train_len])?;
    Ok((state, m, v))
}

/// All finished `checkpoint-N` dirs in `output_dir`, oldest first.
pub fn list(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(output_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listing {}", output_dir.display())),
    };
    for entry in rd {
        let entry = entry?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join(STATE_FILE).exists() {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Resolve `--resume_from_checkpoint`: a path, or `true`/`True` for the latest in output_dir.
pub fn resolve(arg: &str, output_dir: &Path) -> Result<PathBuf> {
    if matches!(arg, "true" | "True" | "1") {
        match list(output_dir)?.pop() {
            Some((_, p)) => Ok(p),
            None => bail!(
                "resume_from_checkpoint=true but there is no checkpoint-* in {}",
                output_dir.display()
            ),
        }
    } else {
        let p = PathBuf::from(arg);
        if !p.join(STATE_FILE).exists() {
            bail!("{} is not a checkpoint dir (no {STATE_FILE})", p.display());
        }
        Ok(p)
    }
}

/// Delete the oldest checkpoints beyond `limit`.
/// Keep the newest `limit` checkpoints, and `keep` (the last one the
/// coordinator committed, which a recovery would resume from) whatever its age.
pub fn prune(output_dir: &Path, limit: usize, keep: Option<u64>) -> Result<()> {
    let all = list(output_dir)?;
    if all.len() > limit {
        for (step, p) in &all[..all.len() - limit] {
            if Some(*step) == keep {
                continue;
            }
            std::fs::remove_dir_all(p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_list_prune() {
        let dir = tempfile::tempdir().unwrap();
        for step in [2u64, 4, 6] {
            let st = TrainerState {
                global_step: step,
                total_steps: 6,
                steps_per_epoch: 3,
                seed: 1,
                train_len: 3,
                loss_scaler: None,
            };
            save(
                dir.path(),
                step,
                &st,
                vec![1.0, 2.0, 3.0],
                vec![4.0, 5.0, 6.0],
                |d| {
                    std::fs::write(d.join("w"), b"x")?;
                    Ok(())
                },
            )
            .unwrap();
        }
        assert_eq!(
            list(dir.path())
                .unwrap()
                .iter()
                .map(|x| x.0)
                .collect::<Vec<_>>(),
            vec![2, 4, 6]
        );
        prune(dir.path(), 2, None).unwrap();
        assert_eq!(
            list(dir.path())
                .unwrap()
                .iter()
                .map(|x| x.0)
                .collect::<Vec<_>>(),
            vec![4, 6]
        );
        let latest = resolve("True", dir.path()).unwrap();
        let (st, m, v) = load(&latest).unwrap();
        assert_eq!(
            (st.global_step, m, v),
            (6, vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0])
        );
        assert!(latest.join("w").exists());
        assert!(resolve(dir.path().join("nope").to_str().unwrap(), dir.path()).is_err());
    }
}
