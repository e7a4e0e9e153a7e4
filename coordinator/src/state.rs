//! The coordinator's state machine: workers, generations, the pipeline's
//! progress. Everything sits behind one mutex that is never held across an
//! `.await`; waiters (long polls, the rendezvous barrier) watch a version
//! counter that every change bumps.

use crate::journal::{Committed, DoneStage, Journal, Outcome, Placement};
use crate::pipeline::{Pipeline, StageKind};
use crate::proto;
use crate::rollouts::RolloutExchange;
use rlhf_proto::auth::Token;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tonic::Status;

/// The version a worker must run.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// How long GetAssignment holds a request before answering Wait.
pub(crate) const LONG_POLL: Duration = Duration::from_secs(5);
/// A placed worker that does not pick up its assignment within this long (or
/// the heartbeat timeout, if longer) is left out and the stage re-placed.
const MIN_DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Dead workers status still lists.
const DEPARTED_SHOWN: usize = 16;
/// Metrics reports kept to measure steps per second.
const RATE_WINDOW: usize = 20;

pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

struct WorkerEntry {
    id: String,
    host: String,
    device_kind: String,
    device_memory_bytes: u64,
    peer_address: String,
    last_seen: Instant,
    /// Asked for work (GetAssignment) and not part of the running generation.
    idle: bool,
    shutdown_sent: bool,
}

struct CheckpointVotes {
    ranks: HashSet<usize>,
    path: String,
    committed: bool,
}

struct Running {
    generation: u64,
    stage: usize,
    members: Vec<String>,
    peers: Vec<String>,
    delivered: Vec<bool>,
    placed_at: Instant,
    assignment: proto::StageAssignment,
    arrived: HashSet<usize>,
    nccl_unique_id: Vec<u8>,
    checkpoints: BTreeMap<u64, CheckpointVotes>,
    finished: Vec<Option<String>>,
    /// Split PPO: the policy and rollout shares passed between workers.
    rollouts: RolloutExchange,
}

impl Running {
    fn rank_of(&self, id: &str) -> Option<usize> {
        self.members.iter().position(|m| m == id)
    }
}

enum Phase {
    /// The current stage has not been placed yet in this process. `strict`:
    /// only `min_workers` idle workers start it (the pipeline's very first
    /// placement); otherwise, after a grace of one heartbeat timeout, all the
    /// workers there are (at least one, all idle) do.
    Waiting {
        since: Instant,
        strict: bool,
    },
    Running(Box<Running>),
    /// A generation was aborted; the next one starts once the survivors are idle.
    Recovering {
        since: Instant,
        reason: String,
    },
    /// The pipeline is over (the journal holds the outcome).
    Finished {
        at: Instant,
    },
}

#[derive(Default)]
struct LiveMetrics {
    stage: usize,
    generation: u64,
    step: u64,
    total_steps: u64,
    loss: f64,
    learning_rate: f64,
    grad_norm: f64,
    tokens_per_sec: f64,
    eval_loss: Option<f64>,
    window: VecDeque<(Instant, u64)>,
}

impl LiveMetrics {
    fn steps_per_sec(&self) -> Option<f64> {
        let (t0, s0) = *self.window.front()?;
        let (t1, s1) = *self.window.back()?;
        let dt = t1.duration_since(t0).as_secs_f64();
        (s1 > s0 && dt > 0.0).then(|| (s1 - s0) as f64 / dt)
    }

    fn eta_seconds(&self) -> Option<f64> {
        let sps = self.steps_per_sec()?;
        Some(self.total_steps.saturating_sub(self.step) as f64 / sps)
    }
}

struct Inner {
    journal: Journal,
    workers: Vec<WorkerEntry>,
    /// The last workers declared dead, for status.
    departed: VecDeque<WorkerEntry>,
    next_worker: u64,
    phase: Phase,
    metrics: Option<LiveMetrics>,
    /// The last notable event (abort reason, failure), for status.
    message: String,
    stopped: bool,
}

pub(crate) struct Core {
    pub pipeline: Pipeline,
    pub state_dir: PathBuf,
    pub token: Token,
    boot_id: String,
    /// The outcome was already in the journal when this process started.
    pub finished_at_start: bool,
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl Core {
    pub fn new(pipeline: Pipeline, state_dir: PathBuf, token: Token, journal: Journal) -> Core {
        let now = Instant::now();
        let finished_at_start = journal.outcome.is_some();
        let phase = if finished_at_start {
            Phase::Finished { at: now }
        } else {
            Phase::Waiting {
                since: now,
                strict: journal.stage_index == 0 && journal.current.is_none(),
            }
        };
        let boot: u32 = rand::random();
        Core {
            pipeline,
            state_dir,
            token,
            boot_id: format!("{boot:08x}"),
            finished_at_start,
            inner: Mutex::new(Inner {
                journal,
                workers: Vec::new(),
                departed: VecDeque::new(),
                next_worker: 1,
                phase,
                metrics: None,
                message: String::new(),
                stopped: false,
            }),
            changed: watch::channel(0).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent-enough state for status and shutdown.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn interval(&self) -> Duration {
        ms(self.pipeline.cluster.heartbeat_interval_ms)
    }

    fn timeout(&self) -> Duration {
        ms(self.pipeline.cluster.heartbeat_timeout_ms)
    }

    fn save(&self, j: &Journal) {
        if let Err(e) = j.save(&self.state_dir) {
            tracing::error!("{e:#}");
        }
    }

    // ---------------------------------------------------------------- RPCs

    pub fn register(&self, req: proto::RegisterRequest) -> Result<proto::RegisterReply, Status> {
        if req.version != VERSION {
            return Err(Status::failed_precondition(format!(
                "worker version {} does not match coordinator version {VERSION}: run the same rlhf build on every machine",
                if req.version.is_empty() { "(none)" } else { &req.version }
            )));
        }
        let mut g = self.lock();
        let id = format!("w-{}-{}", self.boot_id, g.next_worker);
        g.next_worker += 1;
        tracing::info!(
            worker = %id, host = %req.host, device = %req.device_kind, peer = %req.peer_address,
            "worker registered"
        );
        g.workers.push(WorkerEntry {
            id: id.clone(),
            host: req.host,
            device_kind: req.device_kind,
            device_memory_bytes: req.device_memory_bytes,
            peer_address: req.peer_address,
            last_seen: Instant::now(),
            idle: false,
            shutdown_sent: false,
        });
        drop(g);
        self.notify();
        Ok(proto::RegisterReply {
            worker_id: id,
            heartbeat_interval_ms: self.pipeline.cluster.heartbeat_interval_ms,
            heartbeat_timeout_ms: self.pipeline.cluster.heartbeat_timeout_ms,
        })
    }

    pub fn heartbeat(&self, req: proto::HeartbeatRequest) -> proto::HeartbeatReply {
        let mut g = self.lock();
        let generation = current_generation(&g);
        match g.workers.iter_mut().find(|w| w.id == req.worker_id) {
            Some(w) => {
                w.last_seen = Instant::now();
                proto::HeartbeatReply {
                    known: true,
                    generation,
                }
            }
            None => proto::HeartbeatReply {
                known: false,
                generation,
            },
        }
    }

    /// One look at the state for GetAssignment: Some(answer) or None (wait; the reason).
    fn assignment_step(&self, id: &str) -> Result<Result<proto::Assignment, String>, Status> {
        use proto::assignment::Kind;
        let mut g = self.lock();
        if g.stopped {
            return Err(Status::unavailable("the coordinator is shutting down"));
        }
        if let Some(o) = g.journal.outcome.clone() {
            if let Some(w) = g.workers.iter_mut().find(|w| w.id == id) {
                w.shutdown_sent = true;
                w.idle = false;
            }
            drop(g);
            self.notify();
            return Ok(Ok(proto::Assignment {
                kind: Some(Kind::Shutdown(proto::Shutdown {
                    success: o.success,
                    message: o.message,
                })),
            }));
        }
        let now = Instant::now();
        let Some(wi) = g.workers.iter().position(|w| w.id == id) else {
            return Err(Status::not_found(format!(
                "unknown worker {id} (the coordinator restarted or declared it dead): register again"
            )));
        };
        g.workers[wi].last_seen = now;
        let mut member = None;
        if let Phase::Running(r) = &mut g.phase {
            if let Some(k) = r.rank_of(id) {
                member = Some(k);
                if r.finished[k].is_some() {
                    return Ok(Err(format!(
                        "waiting for the other ranks to finish stage {}",
                        r.assignment.stage_name
                    )));
                }
                if !r.delivered[k] {
                    r.delivered[k] = true;
                    let mut a = r.assignment.clone();
                    a.rank = k as u32;
                    return Ok(Ok(proto::Assignment {
                        kind: Some(Kind::Stage(a)),
                    }));
                }
            }
        }
        if let Some(k) = member {
            let gen = current_generation(&g);
            self.abort(
                &mut g,
                format!("worker {id} (rank {k}) asked for new work: it abandoned generation {gen}"),
            );
        }
        g.workers[wi].idle = true;
        self.try_place(&mut g);
        // Placed just now?
        if let Phase::Running(r) = &mut g.phase {
            if let Some(k) = r.rank_of(id) {
                r.delivered[k] = true;
                let mut a = r.assignment.clone();
                a.rank = k as u32;
                drop(g);
                self.notify();
                return Ok(Ok(proto::Assignment {
                    kind: Some(Kind::Stage(a)),
                }));
            }
        }
        let reason = self.wait_reason(&g);
        drop(g);
        if member.is_some() {
            self.notify();
        }
        Ok(Err(reason))
    }

    pub async fn get_assignment(&self, id: &str) -> Result<proto::Assignment, Status> {
        let mut reason = String::new();
        let assignment = self
            .long_poll(|| Ok(self.assignment_step(id)?.map_err(|r| reason = r).ok()))
            .await?;
        Ok(assignment.unwrap_or(proto::Assignment {
            kind: Some(proto::assignment::Kind::Wait(proto::Wait { reason })),
        }))
    }

    pub async fn rendezvous(
        &self,
        req: proto::RendezvousRequest,
    ) -> Result<proto::RendezvousReply, Status> {
        let mut first = true;
        loop {
            let mut rx = self.subscribe();
            let complete = {
                let mut g = self.lock();
                if g.stopped {
                    return Err(Status::unavailable("the coordinator is shutting down"));
                }
                touch(&mut g, &req.worker_id);
                let cur = current_generation(&g);
                let Phase::Running(r) = &mut g.phase else {
                    return Err(stale(req.generation, cur));
                };
                if r.generation != req.generation {
                    return Err(stale(req.generation, cur));
                }
                let Some(k) = r.rank_of(&req.worker_id) else {
                    return Err(Status::aborted(format!(
                        "worker {} is not part of generation {}",
                        req.worker_id, r.generation
                    )));
                };
                let mut newly = false;
                if first {
                    if k == 0 {
                        r.nccl_unique_id = req.nccl_unique_id.clone();
                    }
                    newly = r.arrived.insert(k);
                    first = false;
                }
                let world = r.members.len();
                if r.arrived.len() == world {
                    let reply = proto::RendezvousReply {
                        rank: k as u32,
                        world_size: world as u32,
                        left_peer: r.peers[(k + world - 1) % world].clone(),
                        right_peer: r.peers[(k + 1) % world].clone(),
                        peers: r.peers.clone(),
                        nccl_unique_id: r.nccl_unique_id.clone(),
                    };
                    if newly {
                        tracing::info!(generation = r.generation, world, "rendezvous complete");
                    }
                    Some((reply, newly))
                } else {
                    None
                }
            };
            if let Some((reply, newly)) = complete {
                if newly {
                    self.notify();
                }
                return Ok(reply);
            }
            let _ = rx.changed().await;
        }
    }

    /// `f` on the running generation `generation`, of which `worker_id` is a member.
    fn with_running<R>(
        &self,
        worker_id: &str,
        generation: u64,
        f: impl FnOnce(&mut Running) -> R,
    ) -> Result<R, Status> {
        let mut g = self.lock();
        if g.stopped {
            return Err(Status::unavailable("the coordinator is shutting down"));
        }
        touch(&mut g, worker_id);
        let cur = current_generation(&g);
        match &mut g.phase {
            Phase::Running(r) if r.generation == generation => {
                if r.rank_of(worker_id).is_none() {
                    return Err(Status::aborted(format!(
                        "worker {worker_id} is not part of generation {generation}"
                    )));
                }
                Ok(f(r))
            }
            _ => Err(stale(generation, cur)),
        }
    }

    /// Ask `step` again (on every change) until it answers or LONG_POLL passes.
    async fn long_poll<T>(
        &self,
        mut step: impl FnMut() -> Result<Option<T>, Status>,
    ) -> Result<Option<T>, Status> {
        let deadline = tokio::time::Instant::now() + LONG_POLL;
        loop {
            let mut rx = self.subscribe();
            if let Some(t) = step()? {
                return Ok(Some(t));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
        }
    }

    pub fn publish_policy(&self, c: proto::PolicyChunk) -> Result<(), Status> {
        let (id, generation) = (c.worker_id.clone(), c.generation);
        self.with_running(&id, generation, |r| r.rollouts.publish(c))??;
        self.notify();
        Ok(())
    }

    pub fn fetch_policy(&self, q: proto::PolicyChunkRequest) -> Result<proto::PolicyChunk, Status> {
        self.with_running(&q.worker_id, q.generation, |r| {
            r.rollouts.chunk(q.iteration, q.chunk)
        })?
    }

    pub async fn next_rollout_task(
        &self,
        q: proto::RolloutTaskRequest,
    ) -> Result<proto::RolloutTask, Status> {
        let task = self
            .long_poll(|| self.with_running(&q.worker_id, q.generation, |r| r.rollouts.next_task()))
            .await?;
        Ok(task.unwrap_or(proto::RolloutTask {
            wait: true,
            ..Default::default()
        }))
    }

    pub fn submit_rollouts(&self, s: proto::RolloutShare) -> Result<(), Status> {
        let (id, generation) = (s.worker_id.clone(), s.generation);
        self.with_running(&id, generation, |r| r.rollouts.submit(s))?;
        self.notify();
        Ok(())
    }

    pub async fn fetch_rollouts(
        &self,
        q: proto::RolloutShareRequest,
    ) -> Result<proto::RolloutShare, Status> {
        let share = self
            .long_poll(|| {
                self.with_running(&q.worker_id, q.generation, |r| {
                    r.rollouts.take(q.iteration, q.share)
                })
            })
            .await?;
        Ok(share.unwrap_or_default())
    }

    pub fn finish_rollouts(&self, q: proto::RolloutsDone) -> Result<(), Status> {
        self.with_running(&q.worker_id, q.generation, |r| r.rollouts.finish())?;
        self.notify();
        Ok(())
    }

    pub fn report_metrics(&self, m: proto::MetricsReport) -> Result<(), Status> {
        let mut g = self.lock();
        touch(&mut g, &m.worker_id);
        let cur = current_generation(&g);
        let (stage, stage_name) = match &g.phase {
            Phase::Running(r) if r.generation == m.generation => {
                (r.stage, r.assignment.stage_name.clone())
            }
            _ => return Err(stale(m.generation, cur)),
        };
        let now = Instant::now();
        let live = g.metrics.get_or_insert_with(LiveMetrics::default);
        if live.stage != stage || live.generation != m.generation {
            if live.stage != stage {
                *live = LiveMetrics::default();
            }
            live.window.clear();
            live.stage = stage;
            live.generation = m.generation;
        }
        live.step = m.step;
        live.total_steps = m.total_steps;
        live.loss = m.loss;
        live.learning_rate = m.learning_rate;
        live.grad_norm = m.grad_norm;
        live.tokens_per_sec = m.tokens_per_sec;
        if !m.eval_loss.is_nan() {
            live.eval_loss = Some(m.eval_loss);
        }
        if live.window.back().is_some_and(|&(_, s)| s >= m.step) {
            live.window.clear();
        }
        live.window.push_back((now, m.step));
        while live.window.len() > RATE_WINDOW {
            live.window.pop_front();
        }
        let line = json!({
            "time": unix_now(),
            "stage": stage_name,
            "generation": m.generation,
            "worker_id": m.worker_id,
            "step": m.step,
            "total_steps": m.total_steps,
            "loss": finite(m.loss),
            "learning_rate": finite(m.learning_rate),
            "grad_norm": finite(m.grad_norm),
            "tokens_per_sec": finite(m.tokens_per_sec),
            "eval_loss": finite(m.eval_loss),
        });
        let path = self.state_dir.join("metrics.jsonl");
        let append = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            writeln!(f, "{line}")
        };
        if let Err(e) = append() {
            tracing::warn!("appending to {}: {e}", path.display());
        }
        Ok(())
    }

    pub fn report_checkpoint(&self, c: proto::CheckpointReport) -> Result<bool, Status> {
        let mut g = self.lock();
        touch(&mut g, &c.worker_id);
        let cur = current_generation(&g);
        let Phase::Running(r) = &mut g.phase else {
            return Err(stale(c.generation, cur));
        };
        if r.generation != c.generation {
            return Err(stale(c.generation, cur));
        }
        let Some(k) = r.rank_of(&c.worker_id) else {
            return Err(Status::aborted(format!(
                "worker {} is not part of generation {}",
                c.worker_id, r.generation
            )));
        };
        let world = r.members.len();
        let votes = r
            .checkpoints
            .entry(c.step)
            .or_insert_with(|| CheckpointVotes {
                ranks: HashSet::new(),
                path: String::new(),
                committed: false,
            });
        votes.ranks.insert(k);
        if !c.path.is_empty() && (k == 0 || votes.path.is_empty()) {
            votes.path = c.path.clone();
        }
        if votes.committed || votes.ranks.len() < world {
            return Ok(false);
        }
        votes.committed = true;
        let path = votes.path.clone();
        let (stage, generation) = (r.assignment.stage_name.clone(), r.generation);
        r.checkpoints.retain(|&s, _| s > c.step);
        tracing::info!(stage = %stage, step = c.step, path = %path, generation, "checkpoint committed");
        g.journal.committed.insert(
            stage,
            Committed {
                step: c.step,
                path,
                generation,
            },
        );
        let j = g.journal.clone();
        self.save(&j);
        drop(g);
        self.notify();
        Ok(true)
    }

    pub fn finish_stage(&self, res: proto::StageResult) -> Result<(), Status> {
        let mut g = self.lock();
        touch(&mut g, &res.worker_id);
        let cur = current_generation(&g);
        let Phase::Running(r) = &mut g.phase else {
            return Err(stale(res.generation, cur));
        };
        if r.generation != res.generation {
            return Err(stale(res.generation, cur));
        }
        let Some(k) = r.rank_of(&res.worker_id) else {
            return Err(Status::aborted(format!(
                "worker {} is not part of generation {}",
                res.worker_id, r.generation
            )));
        };
        let stage_name = r.assignment.stage_name.clone();
        let host = g
            .workers
            .iter()
            .find(|w| w.id == res.worker_id)
            .map(|w| w.host.clone())
            .unwrap_or_default();
        if !res.error.is_empty() {
            if res.retryable {
                self.abort(
                    &mut g,
                    format!(
                        "stage {stage_name}: rank {k} ({}, {host}) hit a retryable error: {}",
                        res.worker_id, res.error
                    ),
                );
            } else {
                let message = format!(
                    "stage {stage_name} failed on rank {k} ({}, {host}): {}",
                    res.worker_id, res.error
                );
                tracing::error!("{message}");
                self.finish(&mut g, false, message);
            }
            drop(g);
            self.notify();
            return Ok(());
        }
        let Phase::Running(r) = &mut g.phase else {
            unreachable!()
        };
        r.finished[k] = Some(res.results_json);
        if r.finished.iter().any(|f| f.is_none()) {
            return Ok(());
        }
        // Every rank is done: the stage is.
        let text = r.finished[0].take().unwrap_or_default();
        let stage = r.stage;
        let results = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        tracing::info!(stage = %stage_name, "stage done");
        g.journal.stages_done.push(DoneStage {
            name: stage_name.clone(),
            results,
        });
        g.journal.stage_index = stage + 1;
        g.journal.current = None;
        g.metrics = None;
        if stage + 1 == self.pipeline.stages.len() {
            let message = format!(
                "pipeline finished: {} stage(s) done",
                self.pipeline.stages.len()
            );
            self.finish(&mut g, true, message);
        } else {
            let j = g.journal.clone();
            self.save(&j);
            g.phase = Phase::Waiting {
                since: Instant::now(),
                strict: false,
            };
            g.message = format!("stage {stage_name} done");
        }
        drop(g);
        self.notify();
        Ok(())
    }

    // ------------------------------------------------------------- internals

    /// End the pipeline: journal the outcome; every worker gets Shutdown as it asks.
    fn finish(&self, g: &mut Inner, success: bool, message: String) {
        g.journal.outcome = Some(Outcome {
            success,
            message: message.clone(),
        });
        g.journal.current = None;
        let j = g.journal.clone();
        self.save(&j);
        g.phase = Phase::Finished { at: Instant::now() };
        for w in &mut g.workers {
            w.idle = false;
        }
        g.message = message;
    }

    /// Abort the running generation (a member died, failed, or left it).
    fn abort(&self, g: &mut Inner, reason: String) {
        let Phase::Running(r) = &g.phase else { return };
        tracing::warn!(
            generation = r.generation,
            at_unix_s = unix_now(),
            "generation aborted: {reason}"
        );
        let members: HashSet<String> = r.members.iter().cloned().collect();
        for w in &mut g.workers {
            if members.contains(&w.id) {
                w.idle = false;
            }
        }
        g.message = reason.clone();
        g.phase = Phase::Recovering {
            since: Instant::now(),
            reason,
        };
    }

    /// Start the next generation if the rules allow it. Returns whether it did.
    fn try_place(&self, g: &mut Inner) -> bool {
        let now = Instant::now();
        let idle: Vec<usize> = (0..g.workers.len())
            .filter(|&i| g.workers[i].idle)
            .collect();
        if idle.is_empty() {
            return false;
        }
        let all_idle = idle.len() == g.workers.len();
        let min = self.pipeline.cluster.min_workers.max(1);
        let ok = match &g.phase {
            Phase::Waiting { since, strict } => {
                idle.len() >= min
                    || (!strict && all_idle && now.duration_since(*since) >= self.timeout())
            }
            Phase::Recovering { since, .. } => {
                // A worker that is neither idle nor heart-beating for two
                // intervals is presumed gone for this placement (it is still
                // declared dead only after the timeout): recovery takes about
                // two heartbeat intervals, not the whole timeout.
                let busy_silent = g
                    .workers
                    .iter()
                    .filter(|w| !w.idle)
                    .all(|w| now.duration_since(w.last_seen) >= 2 * self.interval());
                let waited = now.duration_since(*since);
                waited >= self.interval() && (all_idle || busy_silent || waited >= self.timeout())
            }
            _ => false,
        };
        if !ok {
            return false;
        }
        let stage = g.journal.stage_index;
        let spec = &self.pipeline.stages[stage];
        let inputs = stage_inputs(&self.pipeline, stage);
        let (args, global_batch) = match inputs {
            Ok(v) => v,
            Err(e) => {
                let message = format!("stage {}: {e:#}", spec.name);
                tracing::error!("{message}");
                self.finish(g, false, message);
                return true;
            }
        };
        let generation = g.journal.next_generation;
        g.journal.next_generation += 1;
        let members: Vec<String> = idle.iter().map(|&i| g.workers[i].id.clone()).collect();
        let peers: Vec<String> = idle
            .iter()
            .map(|&i| g.workers[i].peer_address.clone())
            .collect();
        for &i in &idle {
            g.workers[i].idle = false;
        }
        let resume = g
            .journal
            .committed
            .get(&spec.name)
            .map(|c| c.path.clone())
            .unwrap_or_default();
        let world = members.len();
        tracing::info!(
            stage = %spec.name, generation, world, resume = %resume,
            "stage placed on {}", members.join(", ")
        );
        g.journal.current = Some(Placement {
            stage: spec.name.clone(),
            generation,
            world_size: world,
        });
        let j = g.journal.clone();
        self.save(&j);
        g.message = String::new();
        g.phase = Phase::Running(Box::new(Running {
            generation,
            stage,
            delivered: vec![false; world],
            finished: vec![None; world],
            rollouts: RolloutExchange::default(),
            members,
            peers,
            placed_at: now,
            assignment: proto::StageAssignment {
                generation,
                stage_name: spec.name.clone(),
                stage_kind: spec.kind.as_str().to_string(),
                args,
                global_batch_size: global_batch,
                resume_checkpoint: resume,
                rank: 0,
                world_size: world as u32,
            },
            arrived: HashSet::new(),
            nccl_unique_id: Vec::new(),
            checkpoints: BTreeMap::new(),
        }));
        true
    }

    fn wait_reason(&self, g: &Inner) -> String {
        let idle = g.workers.iter().filter(|w| w.idle).count();
        match &g.phase {
            Phase::Waiting { .. } => format!(
                "waiting for workers: {idle} idle of {} alive, stage {} starts with {}",
                g.workers.len(),
                self.pipeline.stages[g.journal.stage_index].name,
                self.pipeline.cluster.min_workers.max(1)
            ),
            Phase::Recovering { reason, .. } => {
                format!("recovering ({reason}): waiting for the survivors")
            }
            Phase::Running(r) => format!(
                "stage {} runs as generation {} on {} worker(s)",
                r.assignment.stage_name,
                r.generation,
                r.members.len()
            ),
            Phase::Finished { .. } => "the pipeline is over".into(),
        }
    }

    /// Background work, every ~200 ms: declare silent workers dead, start
    /// generations whose waits are over, drop workers that never pick up their assignment.
    pub fn tick(&self) {
        let mut g = self.lock();
        if g.stopped {
            return;
        }
        let now = Instant::now();
        let timeout = self.timeout();
        let mut changed = false;
        let mut i = 0;
        while i < g.workers.len() {
            let silent = now.duration_since(g.workers[i].last_seen);
            if silent <= timeout
                || matches!(g.phase, Phase::Finished { .. }) && g.workers[i].shutdown_sent
            {
                i += 1;
                continue;
            }
            let mut w = g.workers.remove(i);
            w.idle = false;
            changed = true;
            tracing::warn!(
                worker = %w.id, host = %w.host, silent_ms = silent.as_millis() as u64,
                detected_at_unix_s = unix_now(),
                "worker declared dead (no heartbeat for {} ms)", silent.as_millis()
            );
            let rank = match &g.phase {
                Phase::Running(r) => r.rank_of(&w.id),
                _ => None,
            };
            if let Some(k) = rank {
                self.abort(
                    &mut g,
                    format!(
                        "worker {} (rank {k}, {}) silent for {} ms",
                        w.id,
                        w.host,
                        silent.as_millis()
                    ),
                );
            }
            g.departed.push_back(w);
            if g.departed.len() > DEPARTED_SHOWN {
                g.departed.pop_front();
            }
        }
        // Placed workers that never came for their assignment.
        let delivery_timeout = timeout.max(MIN_DELIVERY_TIMEOUT);
        let mut laggards = Vec::new();
        if let Phase::Running(r) = &g.phase {
            if now.duration_since(r.placed_at) > delivery_timeout {
                for (k, d) in r.delivered.iter().enumerate() {
                    if !d {
                        laggards.push((k, r.members[k].clone()));
                    }
                }
            }
        }
        if let Some((k, id)) = laggards.first() {
            let gen = current_generation(&g);
            self.abort(
                &mut g,
                format!(
                    "worker {id} (rank {k}) did not pick up its assignment of generation {gen}"
                ),
            );
            changed = true;
        }
        if self.try_place(&mut g) {
            changed = true;
        }
        drop(g);
        if changed {
            self.notify();
        }
    }

    /// The outcome, once the pipeline is over and every alive worker got its
    /// Shutdown (or two heartbeat timeouts passed).
    pub fn settled_outcome(&self) -> Option<Outcome> {
        let g = self.lock();
        let Phase::Finished { at } = g.phase else {
            return None;
        };
        let o = g.journal.outcome.clone()?;
        let all_told = g.workers.iter().all(|w| w.shutdown_sent);
        (self.finished_at_start || all_told || at.elapsed() >= 2 * self.timeout()).then_some(o)
    }

    pub fn stop(&self) {
        self.lock().stopped = true;
        self.notify();
    }

    pub fn results(&self) -> Vec<(String, Value)> {
        self.lock()
            .journal
            .stages_done
            .iter()
            .map(|d| (d.name.clone(), d.results.clone()))
            .collect()
    }

    /// The status document (Status RPC and GET /status).
    pub fn status_json(&self) -> Value {
        let g = self.lock();
        let now = Instant::now();
        let state = match &g.phase {
            Phase::Waiting { .. } => "waiting_for_workers",
            Phase::Running(_) => "running",
            Phase::Recovering { .. } => "recovering",
            Phase::Finished { .. } => match &g.journal.outcome {
                Some(o) if o.success => "done",
                _ => "failed",
            },
        };
        let idx = g.journal.stage_index;
        let stage = self.pipeline.stages.get(idx).map(|s| {
            let running = match &g.phase {
                Phase::Running(r) => Some(r),
                _ => None,
            };
            let live = g.metrics.as_ref().filter(|m| m.stage == idx);
            json!({
                "name": s.name,
                "kind": s.kind.as_str(),
                "index": idx,
                "of": self.pipeline.stages.len(),
                "generation": running.map(|r| r.generation),
                "world_size": running.map(|r| r.members.len()),
                "step": live.map(|m| m.step),
                "total_steps": live.map(|m| m.total_steps),
                "loss": live.and_then(|m| finite(m.loss)),
                "learning_rate": live.and_then(|m| finite(m.learning_rate)),
                "grad_norm": live.and_then(|m| finite(m.grad_norm)),
                "tokens_per_sec": live.and_then(|m| finite(m.tokens_per_sec)),
                "eval_loss": live.and_then(|m| m.eval_loss).and_then(finite),
                "eta_seconds": live.and_then(|m| m.eta_seconds()).and_then(finite),
                "committed_step": g.journal.committed.get(&s.name).map(|c| c.step),
                "committed_checkpoint": g.journal.committed.get(&s.name).map(|c| c.path.clone()),
            })
        });
        let running = match &g.phase {
            Phase::Running(r) => Some(r),
            _ => None,
        };
        let alive = g.workers.iter().map(|w| (w, true));
        let dead = g.departed.iter().map(|w| (w, false));
        let workers: Vec<Value> = alive
            .chain(dead)
            .map(|(w, alive)| {
                json!({
                    "id": w.id,
                    "host": w.host,
                    "device_kind": w.device_kind,
                    "device_memory_bytes": w.device_memory_bytes,
                    "rank": running.filter(|_| alive).and_then(|r| r.rank_of(&w.id)),
                    "alive": alive,
                    "idle": w.idle,
                    "last_heartbeat_s_ago": now.duration_since(w.last_seen).as_secs_f64(),
                    "peer_address": w.peer_address,
                })
            })
            .collect();
        let message = match &g.journal.outcome {
            Some(o) => o.message.clone(),
            None => g.message.clone(),
        };
        json!({
            "pipeline": self.pipeline.source.display().to_string(),
            "version": VERSION,
            "state": state,
            "stage": stage,
            "workers": workers,
            "stages_done": g.journal.stages_done.iter().map(|d| json!({"name": d.name, "results": d.results})).collect::<Vec<_>>(),
            "next_generation": g.journal.next_generation,
            "message": message,
        })
    }
}

fn current_generation(g: &Inner) -> u64 {
    match &g.phase {
        Phase::Running(r) => r.generation,
        _ => 0,
    }
}

fn touch(g: &mut Inner, id: &str) {
    if let Some(w) = g.workers.iter_mut().find(|w| w.id == id) {
        w.last_seen = Instant::now();
    }
}

fn stale(asked: u64, current: u64) -> Status {
    Status::aborted(format!(
        "generation {asked} is not running (current: {}): abort and ask for a new assignment",
        if current == 0 {
            "none".to_string()
        } else {
            current.to_string()
        }
    ))
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// argv and global batch of stage `i` ("demo" stages have no batch: 0).
fn stage_inputs(p: &Pipeline, i: usize) -> anyhow::Result<(Vec<String>, u64)> {
    let args = p.stage_argv(i)?;
    let batch = match p.stages[i].kind {
        StageKind::Demo | StageKind::Merge => 0,
        _ => p.global_batch(i)? as u64,
    };
    Ok((args, batch))
}
