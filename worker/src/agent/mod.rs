//! `rlhf worker`: one worker process under a coordinator.
//!
//! It starts its collective server, registers with the coordinator (retrying
//! with backoff, so workers may start first), heart-beats, and runs the stage
//! assignments it is given until told to shut down. A stage runs on a plain
//! thread; the heartbeat task aborts it when the coordinator moves to another
//! generation (a peer died) or forgets this worker (it restarted), and the
//! worker then asks for its next assignment.

mod exchange;
pub mod roots;
mod stage;

pub use stage::DemoStageArgs;

use crate::collective::server::{CollectiveServer, ServerConfig};
use anyhow::{bail, Context, Result};
use clap::Args;
use rlhf_proto::auth::{self, AttachToken, TlsFiles, Token};
use rlhf_proto::v1::coordinator_client::CoordinatorClient;
use rlhf_proto::v1::{self as pb, assignment};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub type Client = CoordinatorClient<InterceptedService<Channel, AttachToken>>;

#[derive(Args, Clone, Debug)]
pub struct WorkerArgs {
    /// The coordinator's address (http://host:port, or https:// with TLS).
    #[arg(long)]
    pub coordinator: String,
    /// File holding the shared token (else $RLHF_TOKEN).
    #[arg(long = "token-file")]
    pub token_file: Option<PathBuf>,
    /// Every path the coordinator sends resolves under this directory.
    #[arg(long, default_value = ".")]
    pub root: PathBuf,
    /// Where this worker's collective service listens (peers connect to it).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// The address peers dial to reach the collective service (default: the bound --listen address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// A collective peer silent this long is an error (seconds).
    #[arg(long = "collective-timeout-s", default_value_t = 120)]
    pub collective_timeout_s: u64,
    /// Give up if the coordinator cannot be reached for this long (seconds; 0 = never).
    #[arg(long = "give-up-after-s", default_value_t = 0)]
    pub give_up_after_s: u64,
    /// Fault-injection tests only: sleep this long before every optimizer step,
    /// so a test can kill a process in the middle of a stage.
    #[arg(long = "test-step-delay-ms", default_value_t = 0, hide = true)]
    pub test_step_delay_ms: u64,
    #[command(flatten)]
    pub tls: TlsFiles,
}

/// What the heartbeat task and the stage thread share.
pub(crate) struct Shared {
    /// The generation being run (0: idle).
    pub generation: AtomicU64,
    /// Set to stop the running stage.
    pub abort: Mutex<Arc<AtomicBool>>,
    /// The coordinator forgot this worker (or is unreachable): register again.
    pub lost: AtomicBool,
}

impl Shared {
    fn abort_stage(&self, why: &str) {
        let flag = self.abort.lock().unwrap_or_else(|e| e.into_inner());
        if !flag.swap(true, Ordering::SeqCst) && self.generation.load(Ordering::SeqCst) != 0 {
            tracing::warn!("stopping the running stage: {why}");
        }
    }
}

/// Run a worker until the coordinator says the pipeline is over. Err when the
/// pipeline failed (the coordinator's message) or the worker cannot go on.
pub fn run_worker(args: &WorkerArgs) -> Result<()> {
    let token = Token::load(args.token_file.as_deref())?;
    let root = std::fs::canonicalize(&args.root)
        .with_context(|| format!("worker root {}", args.root.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(worker_main(args, token, root))
}

async fn worker_main(args: &WorkerArgs, token: Token, root: PathBuf) -> Result<()> {
    let tls = args.tls.clone();
    let mut server_cfg = ServerConfig::new(token.clone());
    server_cfg.listen = args.listen.clone();
    server_cfg.tls = tls.clone();
    let server = Arc::new(
        CollectiveServer::start(server_cfg)
            .await
            .with_context(|| format!("starting the collective service on {}", args.listen))?,
    );
    let peer_address = args
        .advertise
        .clone()
        .unwrap_or_else(|| server.local_addr().to_string());
    let channel = auth::channel(&args.coordinator, &tls, Duration::from_secs(5))?;
    let client: Client = CoordinatorClient::with_interceptor(channel, AttachToken(token.clone()))
        .max_decoding_message_size(auth::MAX_CONTROL_MESSAGE);
    let host = hostname();
    let shared = Arc::new(Shared {
        generation: AtomicU64::new(0),
        abort: Mutex::new(Arc::new(AtomicBool::new(false))),
        lost: AtomicBool::new(false),
    });
    let give_up = (args.give_up_after_s > 0).then(|| Duration::from_secs(args.give_up_after_s));
    loop {
        // Register, retrying with backoff: the coordinator may not be up yet.
        let reg = register(&client, &host, &peer_address, give_up).await?;
        tracing::info!(worker_id = %reg.worker_id, coordinator = %args.coordinator, peer = %peer_address, "registered");
        shared.lost.store(false, Ordering::SeqCst);
        let hb = tokio::spawn(heartbeat_loop(
            client.clone(),
            reg.worker_id.clone(),
            shared.clone(),
            Duration::from_millis(reg.heartbeat_interval_ms.max(50)),
            Duration::from_millis(reg.heartbeat_timeout_ms.max(200)),
        ));
        let outcome = serve_assignments(
            &client,
            &reg.worker_id,
            &shared,
            &server,
            &root,
            &tls,
            &token,
            Duration::from_secs(args.collective_timeout_s.max(1)),
            Duration::from_millis(args.test_step_delay_ms),
        )
        .await;
        hb.abort();
        match outcome {
            Ok(Some(result)) => return result,
            Ok(None) => {
                tracing::warn!("lost the coordinator; registering again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn register(
    client: &Client,
    host: &str,
    peer_address: &str,
    give_up: Option<Duration>,
) -> Result<pb::RegisterReply> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(100);
    let mut warned = false;
    // What `rlhf status` shows: the GPUs this worker can see, if any.
    let device_kind = match rlhf_kernels::cuda::device_count() {
        Ok(n) if n > 0 => format!("cpu+{n} cuda"),
        _ => "cpu".to_string(),
    };
    loop {
        let req = pb::RegisterRequest {
            host: host.to_string(),
            device_kind: device_kind.clone(),
            device_memory_bytes: total_memory_bytes(),
            peer_address: peer_address.to_string(),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        match client.clone().register(req).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unauthenticated
                        | tonic::Code::FailedPrecondition
                        | tonic::Code::InvalidArgument
                        | tonic::Code::PermissionDenied
                ) =>
            {
                bail!("the coordinator refused this worker: {}", s.message())
            }
            Err(s) => {
                if give_up.is_some_and(|g| start.elapsed() > g) {
                    bail!(
                        "no coordinator after {:.0} s: {}",
                        start.elapsed().as_secs_f64(),
                        s.message()
                    );
                }
                if !warned {
                    tracing::info!("waiting for the coordinator ({}); retrying", s.message());
                    warned = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn heartbeat_loop(
    client: Client,
    worker_id: String,
    shared: Arc<Shared>,
    interval: Duration,
    timeout: Duration,
) {
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(interval).await;
        let running = shared.generation.load(Ordering::SeqCst);
        let req = pb::HeartbeatRequest {
            worker_id: worker_id.clone(),
            generation: running,
        };
        let reply = tokio::time::timeout(timeout, client.clone().heartbeat(req)).await;
        match reply {
            Ok(Ok(r)) => {
                last_ok = Instant::now();
                let r = r.into_inner();
                if !r.known {
                    shared.lost.store(true, Ordering::SeqCst);
                    shared.abort_stage("the coordinator does not know this worker any more");
                    return;
                }
                if running != 0 && r.generation != running {
                    shared.abort_stage(&format!(
                        "the coordinator moved from generation {running} to {}",
                        r.generation
                    ));
                }
            }
            _ => {
                if last_ok.elapsed() > timeout {
                    shared.lost.store(true, Ordering::SeqCst);
                    shared.abort_stage("no answer from the coordinator");
                    return;
                }
            }
        }
    }
}

/// Ask for and run assignments. Ok(Some(result)) when the pipeline is over,
/// Ok(None) when the coordinator was lost (register again).
#[allow(clippy::too_many_arguments)]
async fn serve_assignments(
    client: &Client,
    worker_id: &str,
    shared: &Arc<Shared>,
    server: &Arc<CollectiveServer>,
    root: &std::path::Path,
    tls: &TlsFiles,
    token: &Token,
    collective_timeout: Duration,
    step_delay: Duration,
) -> Result<Option<Result<()>>> {
    loop {
        if shared.lost.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let req = pb::AssignmentRequest {
            worker_id: worker_id.to_string(),
        };
        let reply = match client.clone().get_assignment(req).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                tracing::debug!("get_assignment: {}", s.message());
                if shared.lost.load(Ordering::SeqCst) {
                    return Ok(None);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        match reply.kind {
            None | Some(assignment::Kind::Wait(_)) => continue,
            Some(assignment::Kind::Shutdown(s)) => {
                tracing::info!(success = s.success, "the coordinator ended the pipeline");
                return Ok(Some(if s.success {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("the pipeline failed: {}", s.message))
                }));
            }
            Some(assignment::Kind::Stage(a)) => {
                let abort = Arc::new(AtomicBool::new(false));
                *shared.abort.lock().unwrap_or_else(|e| e.into_inner()) = abort.clone();
                shared.generation.store(a.generation, Ordering::SeqCst);
                let ctx = stage::StageContext {
                    client: client.clone(),
                    worker_id: worker_id.to_string(),
                    root: root.to_path_buf(),
                    tls: tls.clone(),
                    token: token.clone(),
                    abort: abort.clone(),
                    collective_timeout,
                    step_delay,
                    runtime: tokio::runtime::Handle::current(),
                };
                let outcome = stage::run_assignment(ctx, a.clone(), server).await;
                shared.generation.store(0, Ordering::SeqCst);
                if shared.lost.load(Ordering::SeqCst) {
                    return Ok(None);
                }
                let aborted = abort.load(Ordering::SeqCst);
                let finish = match &outcome {
                    Ok(results) => pb::StageResult {
                        worker_id: worker_id.to_string(),
                        generation: a.generation,
                        error: String::new(),
                        retryable: false,
                        results_json: results.to_string(),
                    },
                    Err(e) => {
                        let retryable = aborted || stage::is_retryable(e);
                        if retryable {
                            tracing::warn!(
                                generation = a.generation,
                                "stage {} interrupted: {e:#}",
                                a.stage_name
                            );
                        } else {
                            tracing::error!("stage {} failed: {e:#}", a.stage_name);
                        }
                        pb::StageResult {
                            worker_id: worker_id.to_string(),
                            generation: a.generation,
                            error: format!("{e:#}"),
                            retryable,
                            results_json: String::new(),
                        }
                    }
                };
                if let Err(s) = client.clone().finish_stage(finish).await {
                    tracing::warn!(
                        "reporting the end of stage {}: {}",
                        a.stage_name,
                        s.message()
                    );
                }
            }
        }
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "localhost".into())
}

fn total_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
