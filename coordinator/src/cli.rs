//! `rlhf coordinator` and `rlhf status`.

use crate::pipeline::Pipeline;
use crate::proto::coordinator_client::CoordinatorClient;
use crate::server::{start, CoordinatorConfig, DEFAULT_LISTEN};
use anyhow::{bail, Context, Result};
use rlhf_proto::auth::{channel, AttachToken, TlsFiles, Token, MAX_CONTROL_MESSAGE};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `rlhf coordinator`: drive a pipeline on the workers that register.
#[derive(clap::Args, Clone, Debug)]
pub struct CoordinatorArgs {
    /// The pipeline file (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// gRPC address to listen on (use 0.0.0.0:PORT to accept other machines).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Also serve GET /status as JSON over plain HTTP here (bearer token required).
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// File holding the shared token (else $RLHF_TOKEN).
    #[arg(long = "token-file")]
    pub token_file: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsFiles,
    /// Journal directory (default: the pipeline's [cluster] state_dir).
    #[arg(long = "state-dir")]
    pub state_dir: Option<PathBuf>,
}

/// Run the coordinator until the pipeline ends; an error when it failed.
pub fn run_coordinator(args: &CoordinatorArgs) -> Result<()> {
    let pipeline = Pipeline::load(&args.config)?;
    let token = Token::load(args.token_file.as_deref())?;
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| pipeline.cluster.state_dir.clone());
    let cfg = CoordinatorConfig {
        pipeline,
        listen: args.listen,
        http: args.http,
        token,
        tls: args.tls.clone(),
        state_dir,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let outcome = rt.block_on(async {
        let running = start(cfg).await?;
        let stopper = running.stopper();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::warn!(
                    "interrupted: stopping the coordinator (the journal lets a restart resume)"
                );
                stopper.stop();
            }
        });
        running.wait().await
    })?;
    println!(
        "{}",
        serde_json::json!({
            "success": outcome.success,
            "message": outcome.message,
            "results": outcome.results.iter().map(|(s, r)| serde_json::json!({"stage": s, "results": r})).collect::<Vec<_>>(),
        })
    );
    if !outcome.success {
        bail!("{}", outcome.message);
    }
    Ok(())
}

/// `rlhf status`: what a coordinator is doing.
#[derive(clap::Args, Clone, Debug)]
pub struct StatusArgs {
    /// The coordinator's address (host:port or URL).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub coordinator: String,
    /// File holding the shared token (else $RLHF_TOKEN).
    #[arg(long = "token-file")]
    pub token_file: Option<PathBuf>,
    /// Print the status JSON as the coordinator sends it.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub tls: TlsFiles,
}

/// Fetch the coordinator's status document.
pub async fn fetch_status(addr: &str, token: Token, tls: &TlsFiles) -> Result<String> {
    let ch = channel(addr, tls, Duration::from_secs(5))?;
    let mut client = CoordinatorClient::with_interceptor(ch, AttachToken(token))
        .max_decoding_message_size(MAX_CONTROL_MESSAGE);
    let reply = tokio::time::timeout(
        Duration::from_secs(15),
        client.status(crate::proto::StatusRequest {}),
    )
    .await
    .with_context(|| format!("no answer from the coordinator at {addr} within 15 s"))?
    .map_err(|e| {
        anyhow::anyhow!(
            "asking the coordinator at {addr} for its status: {:?}: {}",
            e.code(),
            e.message()
        )
    })?;
    Ok(reply.into_inner().json)
}

pub fn run_status(args: &StatusArgs) -> Result<()> {
    let token = Token::load(args.token_file.as_deref())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let json = rt.block_on(fetch_status(&args.coordinator, token, &args.tls.clone()))?;
    if args.json {
        println!("{json}");
        return Ok(());
    }
    let v: Value =
        serde_json::from_str(&json).context("the coordinator sent a status that is not JSON")?;
    print!("{}", render_status(&v));
    Ok(())
}

fn num(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "-".into(),
    }
}

fn duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// The human table of a status document.
pub fn render_status(v: &Value) -> String {
    let mut out = String::new();
    let s = |x: &Value| x.as_str().unwrap_or("-").to_string();
    out += &format!(
        "pipeline  {}\nstate     {}\n",
        s(&v["pipeline"]),
        s(&v["state"])
    );
    let st = &v["stage"];
    if st.is_object() {
        let idx = st["index"].as_u64().unwrap_or(0);
        out += &format!(
            "stage     {} ({}) {}/{}",
            s(&st["name"]),
            s(&st["kind"]),
            idx + 1,
            st["of"].as_u64().unwrap_or(0)
        );
        if let Some(g) = st["generation"].as_u64() {
            out += &format!(
                ", generation {g} on {} worker(s)",
                st["world_size"].as_u64().unwrap_or(0)
            );
        }
        out += "\n";
        if let Some(step) = st["step"].as_u64() {
            out += &format!(
                "step      {step}/{}   loss {}   lr {}   tokens/s {}   ETA {}\n",
                st["total_steps"].as_u64().unwrap_or(0),
                num(&st["loss"], 4),
                match st["learning_rate"].as_f64() {
                    Some(x) => format!("{x:.3e}"),
                    None => "-".into(),
                },
                num(&st["tokens_per_sec"], 0),
                st["eta_seconds"]
                    .as_f64()
                    .map(duration)
                    .unwrap_or_else(|| "-".into()),
            );
        }
        if let Some(c) = st["committed_step"].as_u64() {
            out += &format!(
                "committed checkpoint at step {c}: {}\n",
                s(&st["committed_checkpoint"])
            );
        }
    }
    if let Some(done) = v["stages_done"].as_array() {
        if !done.is_empty() {
            let names: Vec<String> = done.iter().map(|d| s(&d["name"])).collect();
            out += &format!("done      {}\n", names.join(", "));
        }
    }
    if let Some(m) = v["message"].as_str().filter(|m| !m.is_empty()) {
        out += &format!("message   {m}\n");
    }
    let workers = v["workers"].as_array().cloned().unwrap_or_default();
    out += &format!("\n{} worker(s)\n", workers.len());
    if !workers.is_empty() {
        let rows: Vec<[String; 6]> = workers
            .iter()
            .map(|w| {
                [
                    s(&w["id"]),
                    s(&w["host"]),
                    s(&w["device_kind"]),
                    w["rank"]
                        .as_u64()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| "idle".into()),
                    if w["alive"].as_bool().unwrap_or(false) {
                        "yes"
                    } else {
                        "no"
                    }
                    .into(),
                    w["last_heartbeat_s_ago"]
                        .as_f64()
                        .map(|x| format!("{x:.1}s ago"))
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        let head = ["ID", "HOST", "DEVICE", "RANK", "ALIVE", "LAST HEARTBEAT"];
        let mut width = head.map(|h| h.len());
        for r in &rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut l = String::new();
            for (i, c) in cells.iter().enumerate() {
                l += &format!("{c:<w$}  ", w = width[i]);
            }
            l.trim_end().to_string() + "\n"
        };
        out += &line(&head.map(String::from));
        for r in &rows {
            out += &line(r);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table_shows_stage_progress_and_workers() {
        let v = serde_json::json!({
            "pipeline": "p.toml", "state": "running",
            "stage": {"name": "pt", "kind": "pt", "index": 1, "of": 2, "generation": 3, "world_size": 2,
                      "step": 50, "total_steps": 100, "loss": 2.5, "learning_rate": 0.0002,
                      "tokens_per_sec": 1234.4, "eta_seconds": 125.0, "committed_step": 40,
                      "committed_checkpoint": "out/checkpoint-40"},
            "workers": [{"id": "w-1", "host": "a", "device_kind": "cpu", "rank": 0, "alive": true, "last_heartbeat_s_ago": 0.3},
                        {"id": "w-2", "host": "b", "device_kind": "cuda", "rank": null, "alive": true, "last_heartbeat_s_ago": 1.0}],
            "stages_done": [{"name": "demo"}], "message": ""
        });
        let t = render_status(&v);
        assert!(
            t.contains("pt (pt) 2/2, generation 3 on 2 worker(s)"),
            "{t}"
        );
        assert!(t.contains("step      50/100"), "{t}");
        assert!(t.contains("ETA 2m05s"), "{t}");
        assert!(t.contains("tokens/s 1234"), "{t}");
        assert!(t.contains("w-2  b     cuda    idle"), "{t}");
        assert!(t.contains("done      demo"), "{t}");
    }
}
