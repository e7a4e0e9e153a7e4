//! The collective service a worker process starts once, before it knows its
//! rank: it accepts the `Ring` stream of whichever rank is its left neighbour
//! in the current generation and hands the chunks to the ring instance that
//! registered that generation.

use super::error::CollectiveError;
use rlhf_proto::auth::{RequireToken, TlsFiles, Token, MAX_CHUNK_MESSAGE};
use rlhf_proto::v1::collective_server::{Collective, CollectiveServer as CollectiveService};
use rlhf_proto::v1::{RingChunk, RingDone};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};

/// What a ring receives from its left neighbour: chunks, or the stream's error.
pub(crate) type Inbound = Result<RingChunk, Status>;

/// Chunks buffered between the gRPC stream and the ring; beyond this, HTTP/2
/// flow control holds the sender back.
const INBOX_CHUNKS: usize = 4;

/// How the server listens.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// "host:port" to bind; port 0 picks a free one (see [`CollectiveServer::local_addr`]).
    pub listen: String,
    pub token: Token,
    pub tls: TlsFiles,
    /// How long a stream for a generation newer than the registered one waits
    /// for the local ring of that generation to be built (the left neighbour
    /// may get its placement first).
    pub attach_wait: Duration,
}

impl ServerConfig {
    pub fn new(token: Token) -> ServerConfig {
        ServerConfig {
            listen: "127.0.0.1:0".into(),
            token,
            tls: TlsFiles::default(),
            attach_wait: Duration::from_secs(120),
        }
    }
}

/// The generation the local ring runs, and the sender its left neighbour's
/// stream takes (once).
struct Slot {
    generation: u64,
    inbox: Option<mpsc::Sender<Inbound>>,
}

pub(crate) struct Registry {
    slot: Mutex<Slot>,
    /// Bumped on every registration so that waiting streams look again.
    changed: watch::Sender<u64>,
    attach_wait: Duration,
}

impl Registry {
    /// Make `generation` the current one and return the receiving end of its inbox.
    pub(crate) fn register(&self, generation: u64) -> mpsc::Receiver<Inbound> {
        let (tx, rx) = mpsc::channel(INBOX_CHUNKS);
        {
            let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
            *slot = Slot {
                generation,
                inbox: Some(tx),
            };
        }
        self.changed.send_modify(|n| *n += 1);
        rx
    }

    /// Forget `generation` if it is still the current one (its ring is gone).
    pub(crate) fn unregister(&self, generation: u64) {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if slot.generation == generation {
            slot.inbox = None;
        }
    }

    /// The inbox of `generation`, waiting for it to be registered if it is newer.
    async fn attach(&self, generation: u64) -> Result<mpsc::Sender<Inbound>, Status> {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + self.attach_wait;
        loop {
            {
                let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
                if slot.generation == generation {
                    return slot.inbox.take().ok_or_else(|| {
                        Status::already_exists(format!(
                            "generation {generation} already has its left neighbour's stream, or has ended"
                        ))
                    });
                }
                if slot.generation > generation {
                    return Err(Status::failed_precondition(format!(
                        "stale generation {generation}: this worker runs generation {}",
                        slot.generation
                    )));
                }
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => {
                    return Err(Status::failed_precondition(format!(
                        "generation {generation} did not start on this worker within {:?}",
                        self.attach_wait
                    )))
                }
            }
        }
    }
}

struct Service(Arc<Registry>);

#[tonic::async_trait]
impl Collective for Service {
    async fn ring(&self, req: Request<Streaming<RingChunk>>) -> Result<Response<RingDone>, Status> {
        let mut stream = req.into_inner();
        let Some(first) = stream.message().await? else {
            return Ok(Response::new(RingDone {}));
        };
        let generation = first.generation;
        let inbox = self.0.attach(generation).await?;
        let mut next = Some(first);
        loop {
            let chunk = match next.take() {
                Some(c) => c,
                None => match stream.message().await {
                    Ok(Some(c)) => c,
                    Ok(None) => return Ok(Response::new(RingDone {})),
                    Err(st) => {
                        // The ring learns why its left neighbour went away.
                        let _ = inbox.send(Err(st.clone())).await;
                        return Err(st);
                    }
                },
            };
            if chunk.generation != generation {
                let st = Status::invalid_argument(format!(
                    "chunk of generation {} on a stream of generation {generation}",
                    chunk.generation
                ));
                let _ = inbox.send(Err(st.clone())).await;
                return Err(st);
            }
            if inbox.send(Ok(chunk)).await.is_err() {
                return Err(Status::failed_precondition(format!(
                    "the ring of generation {generation} has ended on this worker"
                )));
            }
        }
    }
}

/// A running collective server. Dropping it stops it.
pub struct CollectiveServer {
    addr: SocketAddr,
    pub(crate) registry: Arc<Registry>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl CollectiveServer {
    /// Bind and serve on the current tokio runtime (multi-threaded: the rings
    /// block on it from plain threads).
    pub async fn start(cfg: ServerConfig) -> Result<CollectiveServer, CollectiveError> {
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .map_err(|e| CollectiveError::Server(format!("binding {}: {e}", cfg.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| CollectiveError::Server(e.to_string()))?;
        let (changed, _) = watch::channel(0);
        let registry = Arc::new(Registry {
            slot: Mutex::new(Slot {
                generation: 0,
                inbox: None,
            }),
            changed,
            attach_wait: cfg.attach_wait,
        });
        let svc = CollectiveService::from_arc(Arc::new(Service(registry.clone())))
            .max_decoding_message_size(MAX_CHUNK_MESSAGE);
        let svc = InterceptedService::new(svc, RequireToken(cfg.token.clone()));
        let mut builder = Server::builder()
            // Data flows client → server: these are the windows that pace a sender.
            .initial_stream_window_size(Some(WINDOW_STREAM))
            .initial_connection_window_size(Some(WINDOW_CONNECTION))
            .max_frame_size(Some(MAX_FRAME))
            .http2_keepalive_interval(Some(Duration::from_secs(5)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)));
        if cfg.tls.is_enabled() {
            let tls = cfg
                .tls
                .server_config()
                .map_err(|e| CollectiveError::Config(e.to_string()))?;
            builder = builder
                .tls_config(tls)
                .map_err(|e| CollectiveError::Config(format!("TLS: {e}")))?;
        }
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let (shutdown, stop) = oneshot::channel::<()>();
        let router = builder.add_service(svc);
        tokio::spawn(async move {
            let stop = async {
                let _ = stop.await;
            };
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
                tracing::error!("collective server stopped: {e}");
            }
        });
        Ok(CollectiveServer {
            addr,
            registry,
            shutdown: Some(shutdown),
        })
    }

    /// [`CollectiveServer::start`] from a plain (non-async) thread.
    pub fn start_blocking(
        handle: &tokio::runtime::Handle,
        cfg: ServerConfig,
    ) -> Result<CollectiveServer, CollectiveError> {
        handle.block_on(CollectiveServer::start(cfg))
    }

    /// The bound address (the port is the real one when the config asked for 0).
    /// Report this to the coordinator as the worker's peer address, with the
    /// host replaced by a reachable one if the server bound 0.0.0.0.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting and end the streams.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
    }
}

impl Drop for CollectiveServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// HTTP/2 receive windows: large enough that a 4 MiB chunk and the next one are
/// in flight while the ring reduces the previous one.
pub(crate) const WINDOW_STREAM: u32 = 16 << 20;
pub(crate) const WINDOW_CONNECTION: u32 = 32 << 20;
/// Largest HTTP/2 DATA frame the server accepts (the default 16 KiB means 256
/// frames per 4 MiB chunk).
const MAX_FRAME: u32 = 1 << 20;
