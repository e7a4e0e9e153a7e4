//! Ring all-reduce over TCP between worker processes (CPU data parallelism).
//!
//! Reduce-scatter then all-gather, `world − 1` steps each, with every segment
//! cut into chunks that are forwarded as soon as they are reduced, so the
//! links stay busy and no rank waits for a whole segment. Each rank keeps one
//! connection to its right neighbour for the whole generation (plain TCP, or
//! TLS; the frames are in `collective.proto`); its left neighbour's
//! connection arrives through the process's [`CollectiveServer`].
//!
//! The sum of segment `k` is `((x_k + x_{k+1}) + x_{k+2}) + …` in ring order,
//! fixed by the world size, and the all-gather copies the final bits, so every
//! rank ends with the same bits, run after run.

use super::error::CollectiveError;
use super::layout::{
    add_into_le, as_le_bytes, chunks, copy_from_le, recv_segment, segment, BufPool,
};
use super::server::{CollectiveServer, Inbound, Registry};
use super::wire::{self, BoxIo, Chunk, HEADER_BYTES};
use super::HostAllReduce;
use prost::bytes::Bytes;
use rlhf_proto::auth::{TlsFiles, Token};
use rlhf_proto::v1::RingHello;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Default chunk: big enough that per-chunk costs vanish, small enough that
/// the pipeline fills quickly.
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

/// The connection to the right neighbour. The ring's own thread writes to it
/// (its own chunks straight from the caller's buffer), interleaved with
/// receiving, so a rank never blocks on a send while its left neighbour
/// waits on it (a full ring would deadlock); TCP flow control paces the wire.
struct Outgoing {
    /// The dial and handshake, until they finish.
    conn: Option<oneshot::Receiver<Result<WriteHalf<BoxIo>, CollectiveError>>>,
    wr: Option<WriteHalf<BoxIo>>,
    /// The neighbour's one byte back: the end acknowledgement, or EOF / an
    /// error when it goes away first.
    done: oneshot::Receiver<std::io::Result<u8>>,
}

/// A frame waiting to be written (or partly written).
struct Pending {
    head: [u8; HEADER_BYTES],
    payload: Payload,
    /// Bytes of head + payload already written.
    written: usize,
}

enum Payload {
    /// Elements of the caller's buffer (this rank's own segment).
    Own(Range<usize>),
    /// A buffer of its own (a forwarded chunk).
    Owned(Bytes),
}

impl Pending {
    fn len(&self) -> usize {
        HEADER_BYTES
            + match &self.payload {
                Payload::Own(r) => 4 * r.len(),
                Payload::Owned(b) => b.len(),
            }
    }
}

/// Write what one call takes of the front frame (cancel-safe: a write that
/// does not complete wrote nothing).
async fn write_some(
    wr: &mut WriteHalf<BoxIo>,
    p: &Pending,
    data: &[f32],
) -> std::io::Result<usize> {
    let payload: &[u8] = match &p.payload {
        Payload::Own(r) => {
            as_le_bytes(&data[r.clone()]).expect("own payloads only on little-endian targets")
        }
        Payload::Owned(b) => b,
    };
    if p.written < HEADER_BYTES {
        let bufs = [IoSlice::new(&p.head[p.written..]), IoSlice::new(payload)];
        wr.write_vectored(&bufs).await
    } else {
        wr.write(&payload[p.written - HEADER_BYTES..]).await
    }
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
    /// connection to the right neighbour. `handle` must belong to a multi-threaded
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
        let max_chunk = rlhf_proto::auth::MAX_CHUNK_MESSAGE;
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
        let addr = peers[(rank + 1) % world]
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        let tls = if tls.is_enabled() {
            Some(wire::tls_client(&tls, &addr)?)
        } else {
            None
        };
        ring.inbox = Some(
            server
                .registry
                .register(generation, world, (rank + world - 1) % world),
        );
        ring.registry = Some(server.registry.clone());
        let hello = RingHello {
            token: token.as_str().to_string(),
            generation,
            from_rank: rank as u32,
            world_size: world as u32,
        };
        let (conn_tx, conn) = oneshot::channel();
        let (done_tx, done) = oneshot::channel();
        let right = ring.right.clone();
        ring.handle.spawn(async move {
            match wire::dial(&addr, &right, tls.as_ref(), hello, io_timeout).await {
                Err(e) => {
                    let _ = conn_tx.send(Err(e));
                }
                Ok(io) => {
                    let (mut rd, wr) = tokio::io::split(io);
                    if conn_tx.send(Ok(wr)).is_err() {
                        return; // the ring is gone: both halves drop, the connection closes
                    }
                    let mut b = [0u8; 1];
                    let r = rd.read_exact(&mut b).await.map(|_| b[0]);
                    let _ = done_tx.send(r);
                }
            }
        });
        ring.out = Some(Outgoing {
            conn: Some(conn),
            wr: None,
            done,
        });
        Ok(ring)
    }

    /// Finish the generation: end the connection to the right neighbour and
    /// wait (up to the I/O timeout) until it has taken every chunk, so that the
    /// neighbour's last all-reduce completes even if this process exits next.
    pub fn close(mut self) -> Result<(), CollectiveError> {
        self.close_stream()
    }

    fn close_stream(&mut self) -> Result<(), CollectiveError> {
        let Some(out) = self.out.take() else {
            return Ok(());
        };
        let (timeout, right) = (self.io_timeout, self.right.clone());
        let lost = |detail: String| CollectiveError::PeerLost {
            peer: right.clone(),
            detail,
        };
        let finish = async {
            let mut wr = match (out.wr, out.conn) {
                (Some(wr), _) => wr,
                (None, Some(conn)) => conn
                    .await
                    .map_err(|_| lost("the dialling task ended".into()))??,
                (None, None) => return Err(lost("never connected".into())),
            };
            wire::write_end(&mut wr)
                .await
                .map_err(|e| lost(format!("sending the end of the generation: {e}")))?;
            match out.done.await {
                Ok(Ok(wire::END_ACK)) => Ok(()),
                Ok(Ok(b)) => Err(CollectiveError::Protocol {
                    peer: right.clone(),
                    detail: format!("it answered the end of the generation with {b:#x}"),
                }),
                Ok(Err(e)) => Err(lost(format!(
                    "it closed our connection before taking every chunk: {e}"
                ))),
                Err(_) => Err(lost("the connection task ended".into())),
            }
        };
        self.handle.block_on(async {
            match tokio::time::timeout(timeout, finish).await {
                Ok(res) => res,
                Err(_) => Err(CollectiveError::Timeout {
                    peer: right.clone(),
                    waited: timeout,
                }),
            }
        })
    }

    fn fail(&mut self, e: CollectiveError) -> CollectiveError {
        self.failed = Some(e.clone());
        e
    }

    /// A frame for `range` at `step` of all-reduce `op`.
    fn frame(
        op: u64,
        step: usize,
        range: &Range<usize>,
        total: usize,
        payload: Payload,
    ) -> Pending {
        Pending {
            head: wire::chunk_header(
                op,
                step as u32,
                range.start as u64,
                total as u64,
                4 * range.len(),
            ),
            payload,
            written: 0,
        }
    }

    /// Wait for the next event: a chunk from the left neighbour (when
    /// `recv`), progress writing `queue` to the right one, the connection
    /// coming up, or a failure (abort, timeout, a neighbour gone).
    async fn step_io(
        &mut self,
        queue: &mut VecDeque<Pending>,
        data: &[f32],
        ticker: &mut tokio::time::Interval,
        deadline: &mut Instant,
        recv: bool,
    ) -> Result<Option<Chunk>, CollectiveError> {
        if self.abort.load(Ordering::Relaxed) {
            return Err(CollectiveError::Aborted);
        }
        let (Some(inbox), Some(out)) = (self.inbox.as_mut(), self.out.as_mut()) else {
            return Err(CollectiveError::Config("ring is closed".into()));
        };
        let (left, right, io_timeout) = (&self.left, &self.right, self.io_timeout);
        let dialling = out.wr.is_none() && out.conn.is_some();
        let writable = out.wr.is_some() && !queue.is_empty();
        tokio::select! {
            biased;
            c = async { out.conn.as_mut().expect("dialling").await }, if dialling => match c {
                Ok(Ok(wr)) => {
                    out.wr = Some(wr);
                    out.conn = None;
                    Ok(None)
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(CollectiveError::PeerLost {
                    peer: right.clone(),
                    detail: "the dialling task ended".into(),
                }),
            },
            // (select! builds every branch's future; these run only when enabled.)
            n = async { write_some(out.wr.as_mut().expect("connected"), queue.front().expect("queued"), data).await }, if writable => match n {
                Ok(n) => {
                    let front = queue.front_mut().expect("queued");
                    front.written += n;
                    if front.written >= front.len() {
                        queue.pop_front();
                    }
                    if !recv {
                        *deadline = Instant::now() + io_timeout;
                    }
                    Ok(None)
                }
                Err(e) => Err(CollectiveError::PeerLost {
                    peer: right.clone(),
                    detail: format!("sending a chunk: {e}"),
                }),
            },
            m = inbox.recv(), if recv => match m {
                Some(Ok(c)) => {
                    *deadline = Instant::now() + io_timeout;
                    Ok(Some(c))
                }
                Some(Err(e)) => Err(e),
                None => Err(CollectiveError::PeerLost {
                    peer: left.clone(),
                    detail: "its connection to us ended".into(),
                }),
            },
            r = &mut out.done => Err(match r {
                Ok(Ok(b)) => CollectiveError::Protocol {
                    peer: right.clone(),
                    detail: format!("it sent {b:#x} before the end of the generation"),
                },
                Ok(Err(e)) => CollectiveError::PeerLost {
                    peer: right.clone(),
                    detail: format!("it closed our connection: {e}"),
                },
                Err(_) => CollectiveError::PeerLost {
                    peer: right.clone(),
                    detail: "it closed our connection".into(),
                },
            }),
            _ = ticker.tick() => {
                if Instant::now() >= *deadline {
                    return Err(CollectiveError::Timeout {
                        peer: if recv { left.clone() } else { right.clone() },
                        waited: io_timeout,
                    });
                }
                Ok(None)
            }
        }
    }

    /// One all-reduce; runs on the caller's thread inside `block_on`.
    async fn run(&mut self, data: &mut [f32], op: u64) -> Result<(), CollectiveError> {
        let (world, rank, total) = (self.world, self.rank, data.len());
        let steps = 2 * (world - 1);
        // Step 0: our own segment, written straight from `data` (it is not
        // written to before the all-gather, and the ring cannot reach the
        // all-gather without these chunks).
        let mut queue: VecDeque<Pending> = chunks(segment(total, world, rank), self.chunk_elems)
            .map(|r| {
                let payload = match as_le_bytes(&data[r.clone()]) {
                    Some(_) => Payload::Own(r.clone()),
                    None => Payload::Owned(self.pool.le_bytes(&data[r.clone()])),
                };
                Self::frame(op, 0, &r, total, payload)
            })
            .collect();
        let mut ticker = tokio::time::interval(ABORT_POLL);
        let mut deadline = Instant::now() + self.io_timeout;
        for step in 0..steps {
            let seg = segment(total, world, recv_segment(rank, world, step));
            for expect in chunks(seg, self.chunk_elems) {
                let chunk = loop {
                    if let Some(c) = self
                        .step_io(&mut queue, data, &mut ticker, &mut deadline, true)
                        .await?
                    {
                        break c;
                    }
                };
                self.check(&chunk, op, step, &expect, total)?;
                let local = &mut data[expect.clone()];
                let mut recv = chunk.data;
                if step < world - 1 {
                    // The sum goes into the received buffer and on from there;
                    // the rank keeps it only for the segment it ends up owning
                    // (the others are overwritten by the all-gather).
                    add_into_le(local, recv.vec(), step == world - 2);
                } else {
                    copy_from_le(local, recv.vec());
                }
                if step + 1 < steps {
                    let fwd = Payload::Owned(recv.into_bytes());
                    queue.push_back(Self::frame(op, step + 1, &expect, total, fwd));
                }
            }
        }
        // What is still queued (forwarded chunks) must reach the neighbour's
        // socket before `data` is handed back.
        deadline = Instant::now() + self.io_timeout;
        while !queue.is_empty() {
            self.step_io(&mut queue, data, &mut ticker, &mut deadline, false)
                .await?;
        }
        if let Some(wr) = self.out.as_mut().and_then(|o| o.wr.as_mut()) {
            // A no-op on TCP; TLS may hold the last records.
            let flush = tokio::time::timeout(self.io_timeout, wr.flush());
            match flush.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(CollectiveError::PeerLost {
                        peer: self.right.clone(),
                        detail: format!("sending a chunk: {e}"),
                    })
                }
                Err(_) => {
                    return Err(CollectiveError::Timeout {
                        peer: self.right.clone(),
                        waited: self.io_timeout,
                    })
                }
            }
        }
        Ok(())
    }

    /// The chunk must be exactly the one the fixed schedule expects next.
    fn check(
        &self,
        c: &Chunk,
        op: u64,
        step: usize,
        expect: &Range<usize>,
        total: usize,
    ) -> Result<(), CollectiveError> {
        let ok = c.op == op
            && c.step as usize == step
            && c.offset == expect.start as u64
            && c.total_len == total as u64
            && c.data.as_ref().len() == 4 * expect.len();
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
                c.data.as_ref().len(),
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
        // Not closed: end the connection to the right neighbour in the
        // background (an end frame if it is up, else it closes once dialled).
        if let Some(out) = self.out.take() {
            if let Some(mut wr) = out.wr {
                let done = out.done;
                self.handle.spawn(async move {
                    if wire::write_end(&mut wr).await.is_ok() {
                        let _ = done.await;
                    }
                });
            }
        }
    }
}
