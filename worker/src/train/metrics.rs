//! Metrics as JSON lines in `output_dir/metrics.jsonl`, and the progress bar.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct Metrics {
    path: PathBuf,
    file: std::fs::File,
}

impl Metrics {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Metrics {
            path: path.to_owned(),
            file,
        })
    }

    /// Append one JSON object as a line (one write call, so lines never interleave).
    pub fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        let mut line = serde_json::to_string(v)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// On resume: drop lines logged after `step` by the interrupted run, so the
    /// file reads as if the run had never stopped.
    pub fn truncate_after(&mut self, step: u64) -> Result<()> {
        let text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_none_or(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        crate::fsutil::write_atomic(&self.path, kept.as_bytes())?;
        *self = Metrics::open(&self.path)?;
        Ok(())
    }
}

/// A progress bar with loss, lr, tokens/s and ETA; hidden when not on a terminal.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    pub fn new(total: u64, start: u64, show: bool) -> Self {
        let bar = ProgressBar::with_draw_target(
            Some(total),
            if show {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(start);
        bar.reset_eta();
        Progress { bar }
    }

    pub fn update(&self, step: u64, loss: f64, lr: f64, tokens_per_sec: f64) {
        self.bar.set_position(step);
        self.bar.set_message(format!(
            "loss {loss:.4}  lr {lr:.2e}  {tokens_per_sec:.0} tok/s"
        ));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
