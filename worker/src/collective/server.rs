//! The collective listener a worker process starts once, before it knows its
//! rank: it accepts the ring connection of whichever rank is its left
//! neighbour in the current generation, checks its handshake (token,
//! generation, rank) and hands the chunks it reads to the ring instance that
//! registered that generation. The wire format is in `collective.proto`.

use super::error::CollectiveError;
use super::layout::BufPool;
use super::wire::{self, BoxIo, Chunk, Frame, ReadError};
use rlhf_proto::auth::{TlsFiles, Token};
use rlhf_proto::v1::ring_status::Code;
use rlhf_proto::v1::{RingHello, RingStatus};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

/// What a ring receives from its left neighbour: chunks, or why they stopped.
pub(crate) type Inbound = Result<Chunk, CollectiveError>;

/// Chunks buffered between the connection and the ring; beyond this, TCP flow
/// control holds the sender back.
const INBOX_CHUNKS: usize = 4;

/// How long a new connection has for its TLS and ring handshakes.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How the server listens.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// "host:port" to bind; port 0 picks a free one (see [`CollectiveServer::local_addr`]).
    pub listen: String,
    pub token: Token,
    pub tls: TlsFiles,
    /// How long a connection for a generation newer than the registered one
    /// waits for the local ring of that generation to be built (the left
    /// neighbour may get its placement first).
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

/// The generation the local ring runs, who its left neighbour is, and the
/// sender that neighbour's connection takes (once).
struct Slot {
    generation: u64,
    world: usize,
    left: usize,
    inbox: Option<mpsc::Sender<Inbound>>,
}

pub(crate) struct Registry {
    slot: Mutex<Slot>,
    /// Bumped on every registration so that waiting connections look again.
    changed: watch::Sender<u64>,
    attach_wait: Duration,
}

impl Registry {
    /// Make `generation` the current one (a ring of `world` ranks whose left
    /// neighbour is rank `left`) and return the receiving end of its inbox.
    pub(crate) fn register(
        &self,
        generation: u64,
        world: usize,
        left: usize,
    ) -> mpsc::Receiver<Inbound> {
        let (tx, rx) = mpsc::channel(INBOX_CHUNKS);
        {
            let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
            *slot = Slot {
                generation,
                world,
                left,
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

    /// The inbox of the hello's generation, waiting for it to be registered if
    /// it is newer; a refusal is the status to send back.
    async fn attach(&self, hello: &RingHello) -> Result<mpsc::Sender<Inbound>, RingStatus> {
        let generation = hello.generation;
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + self.attach_wait;
        loop {
            {
                let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
                if slot.generation == generation {
                    if hello.world_size as usize != slot.world
                        || hello.from_rank as usize != slot.left
                    {
                        return Err(wire::status(
                            Code::BadRequest,
                            format!(
                                "rank {} of world {} is not the left neighbour of this worker's ring (rank {} of world {})",
                                hello.from_rank,
                                hello.world_size,
                                (slot.left + 1) % slot.world.max(1),
                                slot.world
                            ),
                        ));
                    }
                    return slot.inbox.take().ok_or_else(|| {
                        wire::status(
                            Code::GenerationRefused,
                            format!("generation {generation} already has its left neighbour's connection, or has ended"),
                        )
                    });
                }
                if slot.generation > generation {
                    return Err(wire::status(
                        Code::GenerationRefused,
                        format!(
                            "stale generation {generation}: this worker runs generation {}",
                            slot.generation
                        ),
                    ));
                }
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => {
                    return Err(wire::status(
                        Code::GenerationRefused,
                        format!(
                            "generation {generation} did not start on this worker within {:?}",
                            self.attach_wait
                        ),
                    ))
                }
            }
        }
    }
}

/// One accepted connection: TLS, handshake, then chunks into the ring's inbox
/// until the end frame (acknowledged) or an error (handed to the ring).
async fn serve_connection(
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    token: Token,
    registry: Arc<Registry>,
) {
    let _ = tcp.set_nodelay(true);
    let mut io: BoxIo = match tls {
        None => Box::new(tcp),
        Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
        {
            Ok(Ok(s)) => Box::new(s),
            Ok(Err(e)) => {
                tracing::warn!("collective: TLS handshake with {remote} failed: {e}");
                return;
            }
            Err(_) => return,
        },
    };
    let hello: RingHello =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, wire::read_message(&mut io)).await {
            Ok(Ok(h)) => h,
            Ok(Err(ReadError::Protocol(d))) => {
                let _ = wire::write_message(&mut io, &wire::status(Code::BadRequest, d)).await;
                return;
            }
            _ => return,
        };
    if !token.matches(&hello.token) {
        let msg = if hello.token.is_empty() {
            "no token: the ring handshake must carry the shared token"
        } else {
            "wrong token"
        };
        tracing::warn!("collective: refused {remote}: {msg}");
        let _ = wire::write_message(&mut io, &wire::status(Code::Unauthenticated, msg)).await;
        return;
    }
    let inbox = match registry.attach(&hello).await {
        Ok(tx) => tx,
        Err(st) => {
            let _ = wire::write_message(&mut io, &st).await;
            return;
        }
    };
    let peer = format!("rank {} ({remote})", hello.from_rank);
    if let Err(e) = wire::write_message(&mut io, &wire::status(Code::Ok, "")).await {
        let _ = inbox
            .send(Err(CollectiveError::PeerLost {
                peer,
                detail: format!("answering its handshake: {e}"),
            }))
            .await;
        return;
    }
    let pool = BufPool::default();
    loop {
        // A ring that is gone (done, or failed) fails the next chunk's send
        // below; its end frame is still acknowledged.
        let err = match wire::read_frame(&mut io, &pool).await {
            Ok(Frame::Chunk(c)) => {
                if inbox.send(Ok(c)).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(Frame::End) => {
                // Every chunk before the end is in the inbox: tell the sender.
                drop(inbox);
                let _ = io.write_all(&[wire::END_ACK]).await;
                let _ = io.flush().await;
                let _ = io.shutdown().await;
                return;
            }
            Err(ReadError::Io(e)) => CollectiveError::PeerLost {
                peer,
                detail: format!("its connection to us failed mid-generation: {e}"),
            },
            Err(ReadError::Protocol(detail)) => CollectiveError::Protocol { peer, detail },
        };
        let _ = inbox.send(Err(err)).await;
        return;
    }
}

/// A running collective server. Dropping it stops it and closes its connections.
pub struct CollectiveServer {
    addr: SocketAddr,
    pub(crate) registry: Arc<Registry>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl CollectiveServer {
    /// Bind and serve on the current tokio runtime (multi-threaded: the rings
    /// block on it from plain threads).
    pub async fn start(cfg: ServerConfig) -> Result<CollectiveServer, CollectiveError> {
        let tls = if cfg.tls.is_enabled() {
            Some(wire::tls_acceptor(&cfg.tls)?)
        } else {
            None
        };
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
                world: 0,
                left: 0,
                inbox: None,
            }),
            changed,
            attach_wait: cfg.attach_wait,
        });
        let (shutdown, mut stop) = oneshot::channel::<()>();
        let (reg, token) = (registry.clone(), cfg.token.clone());
        tokio::spawn(async move {
            // Dropped when the server stops: aborts every connection.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    a = listener.accept() => match a {
                        Ok((tcp, remote)) => {
                            conns.spawn(serve_connection(tcp, remote, tls.clone(), token.clone(), reg.clone()));
                        }
                        Err(e) => {
                            tracing::warn!("collective server: accept: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
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

    /// Stop accepting and close the connections.
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
