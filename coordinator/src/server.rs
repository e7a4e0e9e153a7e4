//! Starting the coordinator: the gRPC service (token-checked, bounded,
//! optionally TLS), the optional HTTP status endpoint, and the background tick.

use crate::journal::Journal;
use crate::pipeline::Pipeline;
use crate::proto;
use crate::proto::coordinator_server::{Coordinator, CoordinatorServer};
use crate::state::Core;
use anyhow::{bail, Context, Result};
use rlhf_proto::auth::{RequireToken, TlsFiles, Token, MAX_CONTROL_MESSAGE};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

/// Where the coordinator listens by default: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
const TICK: Duration = Duration::from_millis(200);

pub struct CoordinatorConfig {
    pub pipeline: Pipeline,
    pub listen: SocketAddr,
    /// GET /status over plain HTTP (bearer token required), if set.
    pub http: Option<SocketAddr>,
    pub token: Token,
    pub tls: TlsFiles,
    /// Journal and metrics.jsonl.
    pub state_dir: PathBuf,
}

impl CoordinatorConfig {
    /// Loopback default address, no HTTP, no TLS, the pipeline's state dir.
    pub fn new(pipeline: Pipeline, token: Token) -> CoordinatorConfig {
        let state_dir = pipeline.cluster.state_dir.clone();
        CoordinatorConfig {
            pipeline,
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            http: None,
            token,
            tls: TlsFiles::default(),
            state_dir,
        }
    }
}

/// How the pipeline ended.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineOutcome {
    pub success: bool,
    pub message: String,
    /// (stage name, rank 0's results_json) of every stage done, in order.
    pub results: Vec<(String, serde_json::Value)>,
}

/// Stops a running coordinator from anywhere (a Ctrl-C handler, another task).
#[derive(Clone)]
pub struct Stopper {
    core: Arc<Core>,
    stop: Arc<watch::Sender<bool>>,
}

impl Stopper {
    pub fn stop(&self) {
        self.core.stop();
        self.stop.send_replace(true);
    }
}

pub struct RunningCoordinator {
    /// The gRPC address actually bound (port 0 resolved).
    pub addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    core: Arc<Core>,
    stopper: Stopper,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningCoordinator {
    /// Resolves when the pipeline finished (ok or failed) and every alive
    /// worker was told to shut down (or after two heartbeat timeouts), then
    /// stops the servers. After `shutdown()` before the end: an error.
    pub async fn wait(mut self) -> Result<PipelineOutcome> {
        let mut stop_rx = self.stopper.stop.subscribe();
        let outcome = loop {
            if let Some(o) = self.core.settled_outcome() {
                break Some(o);
            }
            if *stop_rx.borrow_and_update() {
                break None;
            }
            let mut rx = self.core.subscribe();
            tokio::select! {
                _ = rx.changed() => {}
                _ = stop_rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        };
        // Let the last answers (Shutdown) leave before the servers stop.
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.stopper.stop();
        for t in std::mem::take(&mut self.tasks) {
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        match outcome {
            Some(o) => Ok(PipelineOutcome {
                success: o.success,
                message: o.message,
                results: self.core.results(),
            }),
            None => bail!(
                "the coordinator was stopped before the pipeline finished (its journal in {} lets a restart resume)",
                self.core.state_dir.display()
            ),
        }
    }

    /// Stop serving now (the journal stays: a restart resumes).
    pub fn shutdown(&self) {
        self.stopper.stop();
    }

    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// The status document, as the Status RPC returns it.
    pub fn status_json(&self) -> serde_json::Value {
        self.core.status_json()
    }
}

impl Drop for RunningCoordinator {
    fn drop(&mut self) {
        if !self.tasks.is_empty() {
            self.stopper.stop();
            for t in &self.tasks {
                t.abort();
            }
        }
    }
}

/// Open (or resume) the journal, bind, and serve.
pub async fn start(cfg: CoordinatorConfig) -> Result<RunningCoordinator> {
    let p = &cfg.pipeline;
    if p.stages.is_empty() {
        bail!("the pipeline {} has no stages", p.source.display());
    }
    if p.cluster.heartbeat_interval_ms == 0
        || p.cluster.heartbeat_timeout_ms <= p.cluster.heartbeat_interval_ms
    {
        bail!(
            "heartbeat_timeout_ms ({}) must exceed heartbeat_interval_ms ({}), which must be positive",
            p.cluster.heartbeat_timeout_ms,
            p.cluster.heartbeat_interval_ms
        );
    }
    let (journal, resumed) = Journal::open(&cfg.state_dir, p)?;
    if resumed {
        match &journal.outcome {
            Some(o) => tracing::info!(
                "the journal in {} records a finished pipeline ({}): {}",
                cfg.state_dir.display(),
                if o.success { "success" } else { "failure" },
                o.message
            ),
            None => tracing::info!(
                "resuming from the journal in {}: {} stage(s) done, next generation {}",
                cfg.state_dir.display(),
                journal.stages_done.len(),
                journal.next_generation
            ),
        }
    }
    let core = Arc::new(Core::new(
        cfg.pipeline,
        cfg.state_dir,
        cfg.token.clone(),
        journal,
    ));
    let (stop_tx, _) = watch::channel(false);
    let stopper = Stopper {
        core: core.clone(),
        stop: Arc::new(stop_tx),
    };
    let stopped = |s: &Stopper| {
        let mut rx = s.stop.subscribe();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    };

    if !cfg.tls.is_enabled() && !cfg.listen.ip().is_loopback() {
        tracing::warn!(
            "listening on {} without TLS: the token and all traffic cross the network in clear (pass --tls-cert/--tls-key)",
            cfg.listen
        );
    }
    if let Some(h) = cfg.http.filter(|h| !h.ip().is_loopback()) {
        tracing::warn!("the status endpoint on {h} is plain HTTP: its bearer token crosses the network in clear");
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding the coordinator to {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let mut builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    if cfg.tls.is_enabled() {
        builder = builder
            .tls_config(cfg.tls.server_config()?)
            .context("TLS set-up of the coordinator")?;
    }
    let svc = InterceptedService::new(
        CoordinatorServer::from_arc(Arc::new(Service(core.clone())))
            .max_decoding_message_size(MAX_CONTROL_MESSAGE)
            .max_encoding_message_size(MAX_CONTROL_MESSAGE),
        RequireToken(cfg.token.clone()),
    );
    let router = builder.add_service(svc);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let shutdown = stopped(&stopper);
    let mut tasks = vec![tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
        {
            tracing::error!("coordinator gRPC server: {e}");
        }
    })];
    tracing::info!(
        "coordinator listening on {addr} ({})",
        if cfg.tls.is_enabled() {
            "TLS"
        } else {
            "plain gRPC"
        }
    );

    let mut http_addr = None;
    if let Some(h) = cfg.http {
        let listener = tokio::net::TcpListener::bind(h)
            .await
            .with_context(|| format!("binding the status endpoint to {h}"))?;
        let a = listener.local_addr()?;
        http_addr = Some(a);
        tasks.push(tokio::spawn(crate::http::serve(
            listener,
            core.clone(),
            stopped(&stopper),
        )));
        tracing::info!("status at http://{a}/status (bearer token required)");
    }

    let tick_core = core.clone();
    let mut tick_stop = stopper.stop.subscribe();
    tasks.push(tokio::spawn(async move {
        let mut every = tokio::time::interval(TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => tick_core.tick(),
                _ = tick_stop.wait_for(|v| *v) => break,
            }
        }
    }));

    Ok(RunningCoordinator {
        addr,
        http_addr,
        core,
        stopper,
        tasks,
    })
}

struct Service(Arc<Core>);

#[tonic::async_trait]
impl Coordinator for Service {
    async fn register(
        &self,
        req: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterReply>, Status> {
        self.0.register(req.into_inner()).map(Response::new)
    }

    async fn heartbeat(
        &self,
        req: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatReply>, Status> {
        Ok(Response::new(self.0.heartbeat(req.into_inner())))
    }

    async fn get_assignment(
        &self,
        req: Request<proto::AssignmentRequest>,
    ) -> Result<Response<proto::Assignment>, Status> {
        let id = req.into_inner().worker_id;
        self.0.get_assignment(&id).await.map(Response::new)
    }

    async fn rendezvous(
        &self,
        req: Request<proto::RendezvousRequest>,
    ) -> Result<Response<proto::RendezvousReply>, Status> {
        self.0.rendezvous(req.into_inner()).await.map(Response::new)
    }

    async fn report_metrics(
        &self,
        req: Request<proto::MetricsReport>,
    ) -> Result<Response<proto::Ack>, Status> {
        self.0.report_metrics(req.into_inner())?;
        Ok(Response::new(proto::Ack {}))
    }

    async fn report_checkpoint(
        &self,
        req: Request<proto::CheckpointReport>,
    ) -> Result<Response<proto::CheckpointReply>, Status> {
        let committed = self.0.report_checkpoint(req.into_inner())?;
        Ok(Response::new(proto::CheckpointReply { committed }))
    }

    async fn finish_stage(
        &self,
        req: Request<proto::StageResult>,
    ) -> Result<Response<proto::Ack>, Status> {
        self.0.finish_stage(req.into_inner())?;
        Ok(Response::new(proto::Ack {}))
    }

    async fn status(
        &self,
        _req: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusReply>, Status> {
        Ok(Response::new(proto::StatusReply {
            json: self.0.status_json().to_string(),
        }))
    }

    async fn publish_policy(
        &self,
        req: Request<proto::PolicyChunk>,
    ) -> Result<Response<proto::Ack>, Status> {
        self.0.publish_policy(req.into_inner())?;
        Ok(Response::new(proto::Ack {}))
    }

    async fn fetch_policy(
        &self,
        req: Request<proto::PolicyChunkRequest>,
    ) -> Result<Response<proto::PolicyChunk>, Status> {
        self.0.fetch_policy(req.into_inner()).map(Response::new)
    }

    async fn next_rollout_task(
        &self,
        req: Request<proto::RolloutTaskRequest>,
    ) -> Result<Response<proto::RolloutTask>, Status> {
        self.0
            .next_rollout_task(req.into_inner())
            .await
            .map(Response::new)
    }

    async fn submit_rollouts(
        &self,
        req: Request<proto::RolloutShare>,
    ) -> Result<Response<proto::Ack>, Status> {
        self.0.submit_rollouts(req.into_inner())?;
        Ok(Response::new(proto::Ack {}))
    }

    async fn fetch_rollouts(
        &self,
        req: Request<proto::RolloutShareRequest>,
    ) -> Result<Response<proto::RolloutShare>, Status> {
        self.0
            .fetch_rollouts(req.into_inner())
            .await
            .map(Response::new)
    }

    async fn finish_rollouts(
        &self,
        req: Request<proto::RolloutsDone>,
    ) -> Result<Response<proto::Ack>, Status> {
        self.0.finish_rollouts(req.into_inner())?;
        Ok(Response::new(proto::Ack {}))
    }
}
