//! Ring all-reduce over gRPC between worker processes (CPU data parallelism).
//!
//! Reduce-scatter then all-gather, `world − 1` steps each, with every segment
//! cut into chunks that are forwarded as soon as they are reduced, so the
//! links stay busy and no rank waits for a whole segment. Each rank keeps one
//! client stream to its right neighbour for the whole generation; its left
//! neighbour's stream arrives through the process's [`CollectiveServer`].
//!
//! The sum of segment `k` is `((x_k + x_{k+1}) + x_{k+2}) + …` in ring order,
//! fixed by the world size, and the all-gather copies the final bits, so every
//! rank ends with the same bits, run after run.

use super::error::CollectiveError;
use super::layout::{add_le, chunks, copy_from_le, recv_segment, segment, BufPool};
use super::server::{CollectiveServer, Inbound, Registry};
use super::HostAllReduce;
use rlhf_proto::auth::{endpoint, AttachToken, TlsFiles, Token};
use rlhf_proto::v1::collective_client::CollectiveClient;
use rlhf_proto::v1::RingChunk;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// Default chunk: big enough that per-message costs vanish, small enough that
/// the pipeline fills quickly and fits the HTTP/2 windows twice.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

/// How often a waiting rank looks at the abort flag.
const ABORT_POLL: Duration = Duration::from_millis(20);

/// What a ring is built from (one per stage placement).
#[derive(Clone, Debug)]
pub struct RingConfig {
    pub rank: usize,
    pub world_size: usize,
    /// Every rank's collective address ("host:port"), in rank order.
    pub peers: Vec<String>,
    pub token: Token,
    pub tls: TlsFiles,
    /// The placement this ring belongs to; a neighbour on another one is refused.
    pub generation: u64,
    /// A neighbour silent this long (or a connection this slow to open) is an error.
    pub io_timeout: Duration,
    /// Set by anyone to make every wait return [`CollectiveError::Aborted`] promptly.
    pub abort: Arc<AtomicBool>,
    /// Largest chunk payload in bytes (rounded down to whole f32s).
    pub chunk_bytes: usize,
}

impl RingConfig {
    pub fn new(rank: usize, peers: Vec<String>, token: Token, generation: u64) -> RingConfig {
        RingConfig {
            rank,
            world_size: peers.len(),
            peers,
            token,
            tls: TlsFiles::default(),
            generation,
            io_timeout: Duration::from_secs(60),
            abort: Arc::new(AtomicBool::new(false)),
            chunk_bytes: DEFAULT_CHUNK_BYTES,
        }
    }
}

/// The stream to the right neighbour: chunks go in unbounded (a rank must
/// never block on sending while its left neighbour waits on it, or a full ring
/// deadlocks); HTTP/2 flow control paces the wire.
struct Outgoing {
    tx: mpsc::UnboundedSender<RingChunk>,
    /// Fires when the call ends: with an error, or Ok if the neighbour closed it.
    done: oneshot::Receiver<Result<(), CollectiveError>>,
}

pub struct RingAllReduce {
    rank: usize,
    world: usize,
    generation: u64,
    io_timeout: Duration,
    abort: Arc<AtomicBool>,
    chunk_elems: usize,
    left: String,
    right: String,
    handle: Handle,
    registry: Option<Arc<Registry>>,
    inbox: Option<mpsc::Receiver<Inbound>>,
    out: Option<Outgoing>,
    /// Sequence number of the next all-reduce in this generation.
    op: u64,
    failed: Option<CollectiveError>,
    /// Buffers of the chunks this rank sends, reused once sent.
    pool: BufPool,
}

impl RingAllReduce {
    /// Register `cfg.generation` with this process's server and open the
    /// stream to the right neighbour. `handle` must belong to a multi-threaded
    /// runtime; `all_reduce_sum_host` blocks on it and so must not be called
    /// from inside an async task.
    pub fn new(
        server: &CollectiveServer,
        handle: Handle,
        cfg: RingConfig,
    ) -> Result<RingAllReduce, CollectiveError> {
        let RingConfig {
            rank,
            world_size: world,
            peers,
            token,
            tls,
            generation,
            io_timeout,
            abort,
            chunk_bytes,
        } = cfg;
        if world == 0 || rank >= world || peers.len() != world {
            return Err(CollectiveError::Config(format!(
                "rank {rank} of world {world} with {} peer addresses",
                peers.len()
            )));
        }
        if handle.runtime_flavor() == RuntimeFlavor::CurrentThread {
            return Err(CollectiveError::Config(
                "the ring needs a multi-threaded tokio runtime (it blocks on it from the training thread)".into(),
            ));
        }
        let max_chunk = rlhf_proto::auth::MAX_CHUNK_MESSAGE - 4096;
        let chunk_elems = (chunk_bytes.min(max_chunk) / 4).max(1);
        let name = |k: usize| format!("rank {k} ({})", peers[k]);
        let (left, right) = (name((rank + world - 1) % world), name((rank + 1) % world));
        let mut ring = RingAllReduce {
            rank,
            world,
            generation,
            io_timeout,
            abort,
            chunk_elems,
            left,
            right,
            handle,
            registry: None,
            inbox: None,
            out: None,
            op: 0,
            failed: None,
            pool: BufPool::default(),
        };
        if world == 1 {
            return Ok(ring);
        }
        let ep = endpoint(&peers[(rank + 1) % world], &tls, io_timeout)
            .map_err(|e| CollectiveError::Config(e.to_string()))?;
        ring.inbox = Some(server.registry.register(generation));
        ring.registry = Some(server.registry.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done) = oneshot::channel();
        let right = ring.right.clone();
        ring.handle.spawn(async move {
            let res = async {
                let ch = ep.connect().await.map_err(|e| CollectiveError::PeerLost {
                    peer: right.clone(),
                    detail: format!("connecting: {e}"),
                })?;
                let mut client = CollectiveClient::with_interceptor(ch, AttachToken(token));
                client
                    .ring(UnboundedReceiverStream::new(rx))
                    .await
                    .map(|_| ())
                    .map_err(|st| CollectiveError::from_status(&right, generation, &st))
            }
            .await;
            let _ = done_tx.send(res);
        });
        ring.out = Some(Outgoing { tx, done });
        Ok(ring)
    }

    /// Finish the generation: end the stream to the right neighbour and wait
    /// (up to the I/O timeout) until it has taken every chunk, so that the
    /// neighbour's last all-reduce completes even if this process exits next.
    pub fn close(mut self) -> Result<(), CollectiveError> {
        self.close_stream()
    }

    fn close_stream(&mut self) -> Result<(), CollectiveError> {
        let Some(Outgoing { tx, done }) = self.out.take() else {
            return Ok(());
        };
        drop(tx);
        let (timeout, right) = (self.io_timeout, self.right.clone());
        self.handle.block_on(async move {
            match tokio::time::timeout(timeout, done).await {
                Ok(Ok(res)) => res,
                Ok(Err(_)) => Ok(()),
                Err(_) => Err(CollectiveError::Timeout {
                    peer: right,
                    waited: timeout,
                }),
            }
        })
    }

    fn fail(&mut self, e: CollectiveError) -> CollectiveError {
        self.failed = Some(e.clone());
        e
    }

    fn send(
        &self,
        op: u64,
        step: usize,
        range: &Range<usize>,
        total: usize,
        data: prost::bytes::Bytes,
    ) -> Result<(), CollectiveError> {
        let chunk = RingChunk {
            generation: self.generation,
            from_rank: self.rank as u32,
            op,
            step: step as u32,
            offset: range.start as u64,
            total_len: total as u64,
            data,
        };
        let out = self
            .out
            .as_ref()
            .ok_or_else(|| CollectiveError::Config("ring is closed".into()))?;
        out.tx.send(chunk).map_err(|_| CollectiveError::PeerLost {
            peer: self.right.clone(),
            detail: "the stream to the right neighbour has ended".into(),
        })
    }

    /// One all-reduce; runs on the caller's thread inside `block_on`.
    async fn run(&mut self, data: &mut [f32], op: u64) -> Result<(), CollectiveError> {
        let (world, rank, total) = (self.world, self.rank, data.len());
        let steps = 2 * (world - 1);
        // Step 0: our own segment, sent chunk by chunk between receives.
        let mut own = chunks(segment(total, world, rank), self.chunk_elems).peekable();
        let mut ticker = tokio::time::interval(ABORT_POLL);
        let mut deadline = Instant::now() + self.io_timeout;
        for step in 0..steps {
            let seg = segment(total, world, recv_segment(rank, world, step));
            for expect in chunks(seg, self.chunk_elems) {
                let chunk = loop {
                    if self.abort.load(Ordering::Relaxed) {
                        return Err(CollectiveError::Aborted);
                    }
                    let (Some(inbox), Some(out)) = (self.inbox.as_mut(), self.out.as_mut()) else {
                        return Err(CollectiveError::Config("ring is closed".into()));
                    };
                    let pending = own.peek().is_some();
                    tokio::select! {
                        biased;
                        m = inbox.recv() => match m {
                            Some(Ok(c)) => break c,
                            Some(Err(st)) => return Err(CollectiveError::from_status(&self.left, self.generation, &st)),
                            None => return Err(CollectiveError::PeerLost {
                                peer: self.left.clone(),
                                detail: "its stream to us ended".into(),
                            }),
                        },
                        r = &mut out.done => return Err(match r {
                            Ok(Err(e)) => e,
                            _ => CollectiveError::PeerLost {
                                peer: self.right.clone(),
                                detail: "it closed our stream".into(),
                            },
                        }),
                        _ = std::future::ready(()), if pending => {
                            if let Some(r) = own.next() {
                                self.send(op, 0, &r, total, self.pool.le_bytes(&data[r.clone()]))?;
                            }
                            deadline = Instant::now() + self.io_timeout;
                        }
                        _ = ticker.tick() => {
                            if Instant::now() >= deadline {
                                return Err(CollectiveError::Timeout {
                                    peer: self.left.clone(),
                                    waited: self.io_timeout,
                                });
                            }
                        }
                    }
                };
                deadline = Instant::now() + self.io_timeout;
                self.check(&chunk, op, step, &expect, total)?;
                let local = &mut data[expect.clone()];
                let fwd = if step < world - 1 {
                    add_le(local, &chunk.data);
                    self.pool.le_bytes(local)
                } else {
                    copy_from_le(local, &chunk.data);
                    chunk.data
                };
                if step + 1 < steps {
                    // The stream is in schedule order: the rest of step 0 goes first.
                    for r in own.by_ref() {
                        self.send(op, 0, &r, total, self.pool.le_bytes(&data[r.clone()]))?;
                    }
                    self.send(op, step + 1, &expect, total, fwd)?;
                }
            }
        }
        // Our own chunks all went out before the first forward, and the ring
        // cannot complete without them.
        Ok(())
    }

    /// The chunk must be exactly the one the fixed schedule expects next.
    fn check(
        &self,
        c: &RingChunk,
        op: u64,
        step: usize,
        expect: &Range<usize>,
        total: usize,
    ) -> Result<(), CollectiveError> {
        let ok = c.op == op
            && c.step as usize == step
            && c.offset == expect.start as u64
            && c.total_len == total as u64
            && c.data.len() == 4 * expect.len();
        if ok {
            return Ok(());
        }
        Err(CollectiveError::Protocol {
            peer: self.left.clone(),
            detail: format!(
                "expected op {op} step {step} elements {expect:?} of {total}, got op {} step {} offset {} ({} bytes) of {}{}",
                c.op,
                c.step,
                c.offset,
                c.data.len(),
                c.total_len,
                if c.total_len != total as u64 { " (ranks all-reduce different lengths)" } else { "" }
            ),
        })
    }
}

impl HostAllReduce for RingAllReduce {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum_host(&mut self, data: &mut [f32]) -> anyhow::Result<()> {
        if let Some(e) = &self.failed {
            return Err(CollectiveError::Poisoned(Box::new(e.clone())).into());
        }
        if self.world == 1 || data.is_empty() {
            return Ok(());
        }
        if self.abort.load(Ordering::Relaxed) {
            return Err(self.fail(CollectiveError::Aborted).into());
        }
        let op = self.op;
        self.op += 1;
        let handle = self.handle.clone();
        match handle.block_on(self.run(data, op)) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(e).into()),
        }
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        Ok(self.close_stream()?)
    }
}

impl Drop for RingAllReduce {
    fn drop(&mut self) {
        if let Some(reg) = &self.registry {
            reg.unregister(self.generation);
        }
    }
}
