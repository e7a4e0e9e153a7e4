//! One stage assignment on this worker: rendezvous with the other ranks,
//! build the ring, run the stage on a plain thread, report to the coordinator.

use super::exchange::CoordinatorExchange;
use super::roots::resolve_args;
use super::Client;
use crate::collective::error::CollectiveError;
use crate::collective::nccl::NcclAllReduce;
use crate::collective::ring::{RingAllReduce, RingConfig};
use crate::collective::server::CollectiveServer;
use crate::collective::{Collective, Single, ViaHost};
use crate::rl::exchange::{Role, RolloutExchange};
use crate::stages::args::Device;
use crate::stages::dpo::DpoArgs;
use crate::stages::grpo::GrpoArgs;
use crate::stages::ppo::PpoArgs;
use crate::stages::pt::PtArgs;
use crate::stages::rm::RmArgs;
use crate::stages::sft::SftArgs;
use crate::stages::DistStage;
use crate::train::TrainHooks;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser};
use rlhf_kernels::cuda::nccl::NcclComm;
use rlhf_kernels::cuda::{Cuda, Dtype};
use rlhf_kernels::{Backend, Cpu};
use rlhf_proto::auth::{TlsFiles, Token};
use rlhf_proto::v1 as pb;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The arguments of the training stages that are paths (resolved under the root).
const PATH_FLAGS: &[&str] = &[
    "model_name_or_path",
    "tokenizer_name_or_path",
    "train_file_dir",
    "validation_file_dir",
    "peft_path",
    "output_dir",
    "resume_from_checkpoint",
    "eval_qa_file",
    "reward_model_name_or_path",
    "reward_base_model_name_or_path",
    "tokenizer_path",
];

/// The stage was stopped by the coordinator (a new generation, or it was lost).
#[derive(Debug, thiserror::Error)]
#[error("stage aborted by the coordinator")]
pub struct StageAborted;

pub(crate) struct StageContext {
    pub client: Client,
    pub worker_id: String,
    pub root: PathBuf,
    pub tls: TlsFiles,
    pub token: Token,
    pub abort: Arc<AtomicBool>,
    pub collective_timeout: Duration,
    pub step_delay: Duration,
    pub runtime: tokio::runtime::Handle,
}

/// Errors another placement may fix: a peer or the coordinator went away.
pub fn is_retryable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<CollectiveError>().is_some()
            || c.downcast_ref::<StageAborted>().is_some()
            || c.downcast_ref::<tonic::Status>().is_some()
    })
}

/// Run one assignment; the JSON is the stage's results (rank 0) or null.
pub(crate) async fn run_assignment(
    ctx: StageContext,
    a: pb::StageAssignment,
    server: &Arc<CollectiveServer>,
) -> Result<serde_json::Value> {
    tracing::info!(
        stage = %a.stage_name, kind = %a.stage_kind, generation = a.generation,
        rank = a.rank, world = a.world_size, resume = %a.resume_checkpoint,
        "assigned"
    );
    let (device, dtype) = stage_device(&ctx, &a)?;
    let cuda_world = matches!(device, Device::Cuda(_)) && a.world_size > 1;
    // Rank 0 of a multi-GPU stage creates the NCCL id; the coordinator hands
    // it to every rank with the rendezvous.
    let nccl_id = if cuda_world && a.rank == 0 {
        rlhf_kernels::cuda::nccl::unique_id()?
    } else {
        Vec::new()
    };
    let rv = rendezvous(&ctx, a.generation, nccl_id).await?;
    let role = split_role(&ctx, &a, rv.rank as usize, rv.world_size as usize)?;
    // The ranks that all-reduce: every rank, or a split PPO stage's trainers.
    let (coll_rank, peers) = match role {
        None => (rv.rank as usize, rv.peers.clone()),
        Some(Role::Trainer { rank, trainers }) => (rank, rv.peers[..trainers].to_vec()),
        Some(Role::Rollout) => (0, Vec::new()),
    };
    let coll_world = peers.len().max(1);
    let server = server.clone();
    // The ring blocks on the runtime, so it is built and used on a plain thread.
    let handle = tokio::task::spawn_blocking(move || match device {
        Device::Cpu => {
            let collective: Box<dyn Collective<Cpu>> = if coll_world <= 1 {
                Box::new(Single)
            } else {
                let mut cfg = RingConfig::new(coll_rank, peers, ctx.token.clone(), a.generation);
                cfg.tls = ctx.tls.clone();
                cfg.io_timeout = ctx.collective_timeout;
                cfg.abort = ctx.abort.clone();
                let ring = RingAllReduce::new(&server, ctx.runtime.clone(), cfg)?;
                Box::new(ViaHost(ring))
            };
            run_stage_blocking(Cpu, ctx, a, collective, role)
        }
        Device::Cuda(ordinal) => {
            let be = Cuda::new(ordinal, dtype)?;
            tracing::info!(device = ?be, "CUDA backend ready");
            let collective: Box<dyn Collective<Cuda>> = if coll_world <= 1 {
                Box::new(Single)
            } else {
                Box::new(NcclAllReduce(NcclComm::new(
                    &be,
                    coll_rank,
                    coll_world,
                    &rv.nccl_unique_id,
                    ctx.collective_timeout,
                    ctx.abort.clone(),
                )?))
            };
            run_stage_blocking(be, ctx, a, collective, role)
        }
    });
    handle.await.context("the stage thread panicked")?
}

/// This rank's role when the stage is PPO with `rollout_workers` > 0: the
/// first world − rollout_workers ranks train, the last ones sample.
fn split_role(
    ctx: &StageContext,
    a: &pb::StageAssignment,
    rank: usize,
    world: usize,
) -> Result<Option<Role>> {
    if a.stage_kind != PpoArgs::KIND {
        return Ok(None);
    }
    let argv = resolve_args(&ctx.root, &a.args, PATH_FLAGS)?;
    let k = parse_stage_args::<PpoArgs>(PpoArgs::KIND, &argv)?
        .ppo
        .rollout_workers;
    if k == 0 {
        return Ok(None);
    }
    if k >= world {
        bail!("rollout_workers = {k} leaves no trainer among the stage's {world} workers");
    }
    let trainers = world - k;
    Ok(Some(if rank < trainers {
        Role::Trainer { rank, trainers }
    } else {
        Role::Rollout
    }))
}

/// The device a stage asks for (its `--device`) and the CUDA compute type.
fn stage_device(ctx: &StageContext, a: &pb::StageAssignment) -> Result<(Device, Dtype)> {
    fn of<S: DistStage>(ctx: &StageContext, a: &pb::StageAssignment) -> Result<(Device, Dtype)> {
        let argv = resolve_args(&ctx.root, &a.args, PATH_FLAGS)?;
        let t = parse_stage_args::<S>(S::KIND, &argv)?;
        Ok((t.run_flags().device, t.run_flags().cuda_dtype()?))
    }
    match a.stage_kind.as_str() {
        PtArgs::KIND => of::<PtArgs>(ctx, a),
        SftArgs::KIND => of::<SftArgs>(ctx, a),
        RmArgs::KIND => of::<RmArgs>(ctx, a),
        PpoArgs::KIND => of::<PpoArgs>(ctx, a),
        DpoArgs::KIND => of::<DpoArgs>(ctx, a),
        GrpoArgs::KIND => of::<GrpoArgs>(ctx, a),
        _ => Ok((Device::Cpu, Dtype::F32)),
    }
}

/// Wait at the coordinator's barrier, giving up if the stage is aborted.
async fn rendezvous(
    ctx: &StageContext,
    generation: u64,
    nccl_unique_id: Vec<u8>,
) -> Result<pb::RendezvousReply> {
    let req = pb::RendezvousRequest {
        worker_id: ctx.worker_id.clone(),
        generation,
        nccl_unique_id,
    };
    let mut client = ctx.client.clone();
    let call = client.rendezvous(req);
    tokio::pin!(call);
    loop {
        tokio::select! {
            r = &mut call => {
                return r.map(|r| r.into_inner()).map_err(|s| anyhow::Error::new(s).context("rendezvous"));
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if ctx.abort.load(Ordering::SeqCst) {
                    return Err(StageAborted.into());
                }
            }
        }
    }
}

fn run_stage_blocking<B: Backend>(
    be: B,
    ctx: StageContext,
    a: pb::StageAssignment,
    collective: Box<dyn Collective<B>>,
    role: Option<Role>,
) -> Result<serde_json::Value> {
    let rank = collective.rank();
    match a.stage_kind.as_str() {
        "demo" => {
            let args = parse_demo(&ctx.root, &a.args)?;
            if rank == 0 {
                let assets =
                    crate::demo::write_demo_assets(&args.output_dir, args.seed, args.train_docs)?;
                Ok(serde_json::json!({
                    "base_model": assets.base_model, "data": assets.data,
                }))
            } else {
                Ok(serde_json::Value::Null)
            }
        }
        PtArgs::KIND => run_training_stage::<PtArgs, B>(be, &ctx, &a, collective, None),
        SftArgs::KIND => run_training_stage::<SftArgs, B>(be, &ctx, &a, collective, None),
        RmArgs::KIND => run_training_stage::<RmArgs, B>(be, &ctx, &a, collective, None),
        PpoArgs::KIND => run_training_stage::<PpoArgs, B>(be, &ctx, &a, collective, role),
        "merge" => {
            let argv = resolve_args(&ctx.root, &a.args, PATH_FLAGS)?;
            let args = parse_stage_args::<crate::merge::MergeArgs>("merge", &argv)?;
            if rank != 0 {
                return Ok(serde_json::Value::Null);
            }
            // A merge is written whole or not at all; one left by an earlier
            // placement of this stage is made again.
            if args.output_dir.exists() {
                tracing::info!(dir = %args.output_dir.display(), "replacing the output of an earlier merge");
                std::fs::remove_dir_all(&args.output_dir)
                    .with_context(|| format!("removing {}", args.output_dir.display()))?;
            }
            Ok(serde_json::to_value(crate::merge::run(&args)?)?)
        }
        DpoArgs::KIND => run_training_stage::<DpoArgs, B>(be, &ctx, &a, collective, None),
        GrpoArgs::KIND => run_training_stage::<GrpoArgs, B>(be, &ctx, &a, collective, None),
        other => bail!("this worker does not know stage kind {other:?}"),
    }
}

/// One rank of a training stage: resume where the coordinator says, report
/// logs and checkpoints through the hooks.
fn run_training_stage<S: DistStage, B: Backend>(
    be: B,
    ctx: &StageContext,
    a: &pb::StageAssignment,
    mut collective: Box<dyn Collective<B>>,
    role: Option<Role>,
) -> Result<serde_json::Value> {
    let rank = collective.rank();
    let mut argv = a.args.clone();
    if !a.resume_checkpoint.is_empty() {
        argv.push("--resume_from_checkpoint".into());
        argv.push(a.resume_checkpoint.clone());
    }
    let argv = resolve_args(&ctx.root, &argv, PATH_FLAGS)?;
    let args = parse_stage_args::<S>(S::KIND, &argv)?;
    let resumed = drop_abandoned_checkpoints(rank, args.run_flags(), &a.resume_checkpoint)?;
    let global_batch = (a.global_batch_size > 0).then_some(a.global_batch_size as usize);
    let mut hooks = StageHooks {
        client: ctx.client.clone(),
        runtime: ctx.runtime.clone(),
        worker_id: ctx.worker_id.clone(),
        generation: a.generation,
        root: ctx.root.clone(),
        abort: ctx.abort.clone(),
        reported: resumed.into_iter().collect(),
        step_delay: ctx.step_delay,
        exchange: role.map(|role| CoordinatorExchange {
            client: ctx.client.clone(),
            runtime: ctx.runtime.clone(),
            worker_id: ctx.worker_id.clone(),
            generation: a.generation,
            abort: ctx.abort.clone(),
            role,
        }),
    };
    let (finished, results) =
        S::outcome(args.run_dist(be, collective.as_mut(), global_batch, &mut hooks)?);
    collective.finish()?;
    if !finished {
        bail!("the stage stopped before its last step");
    }
    Ok(results)
}

/// A new generation resumes from the committed checkpoint: checkpoints after
/// it were written by an abandoned placement; rank 0 deletes them so that
/// save_total_limit never keeps them over the committed one. Returns the
/// resumed step.
fn drop_abandoned_checkpoints(
    rank: usize,
    run: crate::stages::args::RunFlags<'_>,
    resume: &str,
) -> Result<Option<u64>> {
    let (false, Some(arg)) = (resume.is_empty(), run.resume_from_checkpoint) else {
        return Ok(None);
    };
    let out = run.output_dir;
    let dir = crate::train::checkpoint::resolve(arg, out)?;
    let state = crate::train::checkpoint::load_state(&dir)?;
    if rank == 0 {
        for (step, dir) in crate::train::checkpoint::list(out)? {
            if step > state.global_step {
                tracing::info!(dir = %dir.display(), "removing a checkpoint of an abandoned placement");
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing {}", dir.display()))?;
            }
        }
    }
    Ok(Some(state.global_step))
}

/// Parse a stage's argv with the same clap definition as its subcommand.
fn parse_stage_args<A: Args>(kind: &str, argv: &[String]) -> Result<A> {
    #[derive(Parser)]
    struct Wrap<A: Args> {
        #[command(flatten)]
        inner: A,
    }
    let cmd = std::iter::once(format!("rlhf {kind}")).chain(argv.iter().cloned());
    Wrap::<A>::try_parse_from(cmd)
        .map(|w| w.inner)
        .map_err(|e| anyhow::anyhow!("stage arguments: {}", e.render()))
}

/// The `demo` stage's arguments (the pipeline file validates against these too).
#[derive(Args, Clone, Debug)]
pub struct DemoStageArgs {
    /// Where the demo model (base-model/) and corpus (data/train/, data/valid/) go.
    #[arg(long = "output_dir")]
    pub output_dir: PathBuf,
    #[arg(long = "seed", default_value_t = 42)]
    pub seed: u64,
    /// Training documents of the corpus (a tenth as many held out).
    #[arg(long = "train_docs", default_value_t = 3000)]
    pub train_docs: usize,
}

fn parse_demo(root: &Path, argv: &[String]) -> Result<DemoStageArgs> {
    let argv = resolve_args(root, argv, &["output_dir"])?;
    parse_stage_args::<DemoStageArgs>("demo", &argv)
}

/// The trainer's callbacks, forwarded to the coordinator.
struct StageHooks {
    client: Client,
    runtime: tokio::runtime::Handle,
    worker_id: String,
    generation: u64,
    root: PathBuf,
    abort: Arc<AtomicBool>,
    /// Checkpoint steps this rank reported, oldest first.
    reported: Vec<u64>,
    step_delay: Duration,
    exchange: Option<CoordinatorExchange>,
}

impl TrainHooks for StageHooks {
    fn on_log(&mut self, r: &crate::train::LogRecord) -> Result<()> {
        let req = pb::MetricsReport {
            worker_id: self.worker_id.clone(),
            generation: self.generation,
            step: r.step,
            total_steps: r.total_steps,
            loss: r.loss,
            learning_rate: r.learning_rate,
            grad_norm: r.grad_norm,
            tokens_per_sec: r.tokens_per_sec,
            eval_loss: r.eval_loss.unwrap_or(f64::NAN),
        };
        let mut c = self.client.clone();
        // Metrics are best effort: a lost coordinator is noticed by the heartbeat.
        if let Err(s) = self.runtime.block_on(c.report_metrics(req)) {
            tracing::debug!("report_metrics: {}", s.message());
        }
        Ok(())
    }

    fn on_checkpoint(&mut self, step: u64, dir: Option<&Path>) -> Result<()> {
        let path = match dir {
            Some(d) => d
                .strip_prefix(&self.root)
                .unwrap_or(d)
                .to_string_lossy()
                .into_owned(),
            None => String::new(),
        };
        let req = pb::CheckpointReport {
            worker_id: self.worker_id.clone(),
            generation: self.generation,
            step,
            path,
        };
        let mut c = self.client.clone();
        self.runtime
            .block_on(c.report_checkpoint(req))
            .map_err(|s| anyhow::Error::new(s).context(format!("reporting checkpoint {step}")))?;
        self.reported.push(step);
        Ok(())
    }

    /// The checkpoint before the newest: every rank reported it before rank 0
    /// could finish the next step (they meet in each step's all-reduce), so it
    /// is committed, and a recovery may resume from it.
    fn protected_checkpoint(&self) -> Option<u64> {
        self.reported.iter().rev().nth(1).copied()
    }

    fn take_rollout_exchange(&mut self) -> Option<Box<dyn RolloutExchange>> {
        self.exchange
            .take()
            .map(|x| Box::new(x) as Box<dyn RolloutExchange>)
    }

    fn check_continue(&self) -> Result<()> {
        if !self.step_delay.is_zero() {
            std::thread::sleep(self.step_delay);
        }
        if self.abort.load(Ordering::SeqCst) {
            return Err(StageAborted.into());
        }
        Ok(())
    }
}
