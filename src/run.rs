//! `rlhf run [PIPELINE] [--workers N]`: the one-command launch. It starts a
//! coordinator in this process and N worker processes on loopback, with a
//! fresh token, and runs every stage of the pipeline to the end. A worker
//! that dies is replaced (up to --max-restarts times); the coordinator rolls
//! the stage back to its last committed checkpoint and goes on.

use anyhow::{bail, Context, Result};
use clap::Args;
use rlhf_coordinator::pipeline::Pipeline;
use rlhf_coordinator::{CoordinatorConfig, PipelineOutcome};
use rlhf_proto::auth::{TlsFiles, Token, TOKEN_ENV};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The pipeline `rlhf run` uses without a file: examples/pipeline.toml.
pub const DEFAULT_PIPELINE: &str = include_str!("../examples/pipeline.toml");

#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// The pipeline file (TOML). Without it, the embedded demo pipeline (examples/pipeline.toml).
    pub pipeline: Option<PathBuf>,
    /// Worker processes to start (default: the pipeline's [cluster] workers). The
    /// global batch stays the pipeline's, whatever this number.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Where the coordinator listens (workers connect here).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
    /// Serve the status JSON over HTTP at this address (GET /status).
    #[arg(long)]
    pub http: Option<std::net::SocketAddr>,
    /// The coordinator's journal (default: the pipeline's state_dir).
    #[arg(long = "state-dir")]
    pub state_dir: Option<PathBuf>,
    /// How many times a dead worker process is replaced.
    #[arg(long = "max-restarts", default_value_t = 3)]
    pub max_restarts: usize,
}

pub fn run(a: &RunArgs) -> Result<()> {
    let mut pipeline = match &a.pipeline {
        Some(p) => Pipeline::load(p)?,
        None => {
            let tmp =
                std::env::temp_dir().join(format!("rlhf-pipeline-{}.toml", std::process::id()));
            std::fs::write(&tmp, DEFAULT_PIPELINE)?;
            let p = Pipeline::load(&tmp);
            let _ = std::fs::remove_file(&tmp);
            let mut p = p?;
            p.source = PathBuf::from("examples/pipeline.toml (embedded)");
            p
        }
    };
    let workers = a.workers.unwrap_or(pipeline.cluster.workers).max(1);
    pipeline.cluster.min_workers = pipeline.cluster.min_workers.min(workers);
    let state_dir = a
        .state_dir
        .clone()
        .unwrap_or_else(|| pipeline.cluster.state_dir.clone());
    let journal = state_dir.join("journal.json");
    if journal.exists() {
        eprintln!(
            "continuing the run recorded in {} (a finished run just reports again; delete {} to start afresh)",
            journal.display(),
            state_dir.display()
        );
    }
    let token = Token::generate();
    // For `rlhf status` and the HTTP status while the run goes on (owner-only).
    let token_file = state_dir.join("token");
    write_token(&token_file, &token)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let outcome = rt.block_on(async {
        let coordinator = rlhf_coordinator::start(CoordinatorConfig {
            pipeline,
            listen: a.listen,
            http: a.http,
            token: token.clone(),
            tls: TlsFiles::default(),
            state_dir: state_dir.clone(),
        })
        .await?;
        let url = format!("http://{}", coordinator.addr);
        tracing::info!(coordinator = %url, workers, "coordinator up; starting workers");
        eprintln!(
            "progress: rlhf status --coordinator {url} --token-file {}",
            token_file.display()
        );
        if let Some(h) = coordinator.http_addr {
            eprintln!("status JSON: http://{h}/status (Authorization: Bearer <the token file's contents>)");
        }
        let mut fleet = Fleet::start(&url, &token, workers)?;
        let wait = coordinator.wait();
        tokio::pin!(wait);
        let mut none_since: Option<std::time::Instant> = None;
        let outcome = loop {
            tokio::select! {
                o = &mut wait => break o,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if fleet.replace_dead(a.max_restarts)? > 0 {
                        none_since = None;
                    } else if none_since.get_or_insert_with(std::time::Instant::now).elapsed()
                        > Duration::from_secs(3)
                    {
                        // Workers exit by themselves only when told the
                        // pipeline is over; with none left it cannot go on.
                        bail!(
                            "every worker process exited ({} restarts used) before the pipeline ended; \
                             see their errors above. Progress is kept in {}: run again to continue",
                            fleet.restarts,
                            state_dir.display()
                        );
                    }
                }
            }
        };
        fleet.finish(Duration::from_secs(10));
        outcome
    })?;
    report(&outcome)
}

fn write_token(path: &std::path::Path, token: &Token) -> Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing the run's token to {}", path.display()))?;
    f.write_all(token.as_str().as_bytes())?;
    Ok(())
}

/// One line of the closing table: what a stage was for, measured on
/// held-out data before and after it.
struct Measure {
    stage: String,
    what: String,
    before: String,
    after: String,
}

/// The held-out measures in a stage's results (all_results.json).
fn measures(stage: &str, results: &serde_json::Value) -> Vec<Measure> {
    let f = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_f64());
    let pct = |x: Option<f64>| x.map_or("-".into(), |x| format!("{:.1}%", 100.0 * x));
    let num = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.3}"));
    let mut out = Vec::new();
    let mut push = |what: String, before: String, after: String| {
        out.push(Measure {
            stage: stage.to_string(),
            what,
            before,
            after,
        })
    };
    if let (Some(b), Some(a)) = (f(results, "initial_perplexity"), f(results, "perplexity")) {
        push(
            "held-out perplexity".into(),
            format!("{b:.2}"),
            format!("{a:.2}"),
        );
    }
    if let Some(a) = f(results, "qa_accuracy") {
        push(
            format!(
                "held-out answer accuracy ({} questions)",
                f(results, "qa_total").unwrap_or(f64::NAN)
            ),
            pct(f(results, "initial_qa_accuracy")),
            pct(Some(a)),
        );
    }
    if let (Some(b), Some(a)) = (
        f(results, "initial_eval_accuracy"),
        f(results, "eval_accuracy"),
    ) {
        push(
            format!(
                "held-out pair accuracy ({} pairs)",
                f(results, "eval_pairs").unwrap_or(f64::NAN)
            ),
            pct(Some(b)),
            pct(Some(a)),
        );
    }
    if let (Some(b), Some(a)) = (
        f(results, "initial_eval_rewards/accuracies"),
        f(results, "eval_rewards/accuracies"),
    ) {
        push(
            format!(
                "held-out preference accuracy, DPO reward ({} pairs)",
                f(results, "eval_pairs").unwrap_or(f64::NAN)
            ),
            pct(Some(b)),
            pct(Some(a)),
        );
    }
    // RL stages: {initial_eval, eval} objects.
    let (ie, e) = (&results["initial_eval"], &results["eval"]);
    if e.is_object() {
        push(
            format!(
                "held-out reward, greedy ({} prompts)",
                f(e, "prompts").unwrap_or(f64::NAN)
            ),
            num(f(ie, "reward_greedy")),
            num(f(e, "reward_greedy")),
        );
        push(
            "held-out reward, sampled".into(),
            num(f(ie, "reward_sampled")),
            num(f(e, "reward_sampled")),
        );
        push(
            "KL to the reference, sampled (nats/response)".into(),
            num(f(ie, "kl_sampled")),
            num(f(e, "kl_sampled")),
        );
        if e["qa"].is_object() {
            push(
                format!(
                    "held-out answer accuracy ({} questions)",
                    f(&e["qa"], "total").unwrap_or(f64::NAN)
                ),
                pct(f(&ie["qa"], "accuracy")),
                pct(f(&e["qa"], "accuracy")),
            );
        }
        if e["qa_sampled"].is_object() {
            push(
                "held-out answer accuracy, sampled as the rollouts".into(),
                pct(f(&ie["qa_sampled"], "accuracy")),
                pct(f(&e["qa_sampled"], "accuracy")),
            );
        }
    }
    out
}

fn report(o: &PipelineOutcome) -> Result<()> {
    let mut table = Vec::new();
    for (stage, results) in &o.results {
        println!("stage {stage}: {results}");
        let m = measures(stage, results);
        for x in &m {
            println!("  {} {} -> {}", x.what, x.before, x.after);
        }
        table.extend(m);
    }
    if !table.is_empty() {
        println!();
        println!("| stage | held-out measure | before | after |");
        println!("|---|---|---|---|");
        for x in &table {
            println!("| {} | {} | {} | {} |", x.stage, x.what, x.before, x.after);
        }
        println!();
    }
    if !o.success {
        bail!("pipeline failed: {}", o.message);
    }
    println!("pipeline done");
    Ok(())
}

/// The local worker processes.
struct Fleet {
    url: String,
    token: Token,
    children: Vec<Child>,
    restarts: usize,
    /// Compute threads per worker: the machine's cores / workers.
    threads_each: usize,
}

impl Fleet {
    fn start(url: &str, token: &Token, n: usize) -> Result<Fleet> {
        let mut f = Fleet {
            url: url.into(),
            token: token.clone(),
            children: Vec::new(),
            restarts: 0,
            threads_each: std::thread::available_parallelism()
                .map(|p| p.get())
                .unwrap_or(1)
                .div_ceil(n.max(1))
                .max(1),
        };
        for i in 0..n {
            let c = f.spawn(i)?;
            f.children.push(c);
        }
        Ok(f)
    }

    /// Start local worker `slot` (0-based).
    fn spawn(&self, slot: usize) -> Result<Child> {
        let exe = std::env::current_exe().context("finding the rlhf binary")?;
        let mut cmd = Command::new(exe);
        cmd.args(["worker", "--coordinator", &self.url, "--root", "."])
            .env(TOKEN_ENV, self.token.as_str())
            .stdin(Stdio::null());
        // N workers on one machine share its cores: each gets its share of
        // compute threads instead of all of them (unless the user chose).
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            cmd.env("RAYON_NUM_THREADS", self.threads_each.to_string());
        }
        // One GPU per local worker (as torchrun's LOCAL_RANK): worker i sees
        // the i-th of CUDA_VISIBLE_DEVICES (or GPU i), as its `cuda:0`.
        cmd.env("CUDA_VISIBLE_DEVICES", gpu_for_slot(slot));
        cmd.spawn().context("starting a worker process")
    }

    /// Replace workers that exited with an error (a crash or a kill).
    /// A replacement takes the dead worker's slot (and so its GPU).
    /// Returns how many are running.
    fn replace_dead(&mut self, max_restarts: usize) -> Result<usize> {
        let mut running = 0;
        for i in 0..self.children.len() {
            let Some(status) = self.children[i].try_wait()? else {
                running += 1;
                continue;
            };
            {
                if status.success() || self.restarts >= max_restarts {
                    continue;
                }
                self.restarts += 1;
                tracing::warn!(
                    %status,
                    restart = self.restarts,
                    "a worker process died; starting a replacement"
                );
                self.children[i] = self.spawn(i)?;
                running += 1;
            }
        }
        Ok(running)
    }

    /// Wait for the workers to exit (they were told to shut down), then kill stragglers.
    fn finish(&mut self, grace: Duration) {
        let deadline = std::time::Instant::now() + grace;
        for c in &mut self.children {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if std::time::Instant::now() > deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// The GPU local worker `slot` is given: the slot-th entry (cycling) of the
/// user's CUDA_VISIBLE_DEVICES, or GPU `slot` when it is unset.
fn gpu_for_slot(slot: usize) -> String {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default();
    pick_gpu(&visible, slot)
}

fn pick_gpu(visible: &str, slot: usize) -> String {
    let list: Vec<&str> = visible
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if list.is_empty() {
        slot.to_string()
    } else {
        list[slot % list.len()].to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::pick_gpu;

    #[test]
    fn each_local_worker_gets_its_own_gpu() {
        assert_eq!(pick_gpu("", 0), "0");
        assert_eq!(pick_gpu("", 3), "3");
        assert_eq!(pick_gpu("4,5", 0), "4");
        assert_eq!(pick_gpu("4, 5", 1), "5");
        assert_eq!(
            pick_gpu("4,5", 2),
            "4",
            "more workers than GPUs share them in turn"
        );
        assert_eq!(pick_gpu("GPU-1a2b", 1), "GPU-1a2b");
    }
}
