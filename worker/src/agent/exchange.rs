//! [`RolloutExchange`] over the coordinator's gRPC service: the policy goes
//! up in chunks that fit a control message, shares go up and down as
//! `RolloutShare` messages, and the waits are long polls that give up when
//! the stage is aborted.

use super::stage::StageAborted;
use super::Client;
use crate::rl::exchange::{
    from_le_bytes, to_le_bytes, Role, RolloutExchange, RolloutTask, SampledRollout,
};
use anyhow::{bail, Context, Result};
use prost::Message;
use rlhf_proto::auth::MAX_CONTROL_MESSAGE;
use rlhf_proto::v1 as pb;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Policy bytes per PublishPolicy call: a control message with room to spare.
const POLICY_CHUNK: usize = MAX_CONTROL_MESSAGE - (256 << 10);

pub(crate) struct CoordinatorExchange {
    pub client: Client,
    pub runtime: tokio::runtime::Handle,
    pub worker_id: String,
    pub generation: u64,
    pub abort: Arc<AtomicBool>,
    pub role: Role,
}

impl CoordinatorExchange {
    fn check_abort(&self) -> Result<()> {
        if self.abort.load(Ordering::SeqCst) {
            return Err(StageAborted.into());
        }
        Ok(())
    }
}

impl RolloutExchange for CoordinatorExchange {
    fn role(&self) -> Role {
        self.role
    }

    fn publish_policy(&mut self, iteration: u64, shares: usize, values: &[f32]) -> Result<u64> {
        let bytes = to_le_bytes(values);
        let chunks: Vec<&[u8]> = if bytes.is_empty() {
            vec![&[]]
        } else {
            bytes.chunks(POLICY_CHUNK).collect()
        };
        for (i, data) in chunks.iter().enumerate() {
            let req = pb::PolicyChunk {
                worker_id: self.worker_id.clone(),
                generation: self.generation,
                iteration,
                shares: shares as u32,
                chunk: i as u32,
                chunks: chunks.len() as u32,
                data: data.to_vec(),
            };
            let mut c = self.client.clone();
            self.runtime
                .block_on(c.publish_policy(req))
                .map_err(|s| anyhow::Error::new(s).context("publishing the policy"))?;
        }
        Ok(bytes.len() as u64)
    }

    fn next_task(&mut self) -> Result<Option<RolloutTask>> {
        loop {
            self.check_abort()?;
            let req = pb::RolloutTaskRequest {
                worker_id: self.worker_id.clone(),
                generation: self.generation,
            };
            let mut c = self.client.clone();
            let t = self
                .runtime
                .block_on(c.next_rollout_task(req))
                .map_err(|s| anyhow::Error::new(s).context("asking for a rollout share"))?
                .into_inner();
            if t.done {
                return Ok(None);
            }
            if !t.wait {
                return Ok(Some(RolloutTask {
                    iteration: t.iteration,
                    share: t.share as usize,
                }));
            }
        }
    }

    fn fetch_policy(&mut self, iteration: u64) -> Result<Vec<f32>> {
        let mut bytes = Vec::new();
        let mut chunk = 0;
        loop {
            let req = pb::PolicyChunkRequest {
                worker_id: self.worker_id.clone(),
                generation: self.generation,
                iteration,
                chunk,
            };
            let mut c = self.client.clone();
            let r = self
                .runtime
                .block_on(c.fetch_policy(req))
                .map_err(|s| {
                    anyhow::Error::new(s)
                        .context(format!("fetching the policy of iteration {iteration}"))
                })?
                .into_inner();
            bytes.extend_from_slice(&r.data);
            chunk += 1;
            if chunk >= r.chunks {
                break;
            }
        }
        from_le_bytes(&bytes).context("the published policy")
    }

    fn submit(
        &mut self,
        task: RolloutTask,
        rollouts: &[SampledRollout],
        seconds: f64,
    ) -> Result<u64> {
        let msg = pb::RolloutShare {
            worker_id: self.worker_id.clone(),
            generation: self.generation,
            iteration: task.iteration,
            share: task.share as u32,
            rollouts: rollouts
                .iter()
                .map(|r| pb::RolloutRecord {
                    key: r.key,
                    response: r.response.clone(),
                    response_text: r.response_text.clone(),
                    finished: r.finished,
                    raw_score: r.raw_score,
                })
                .collect(),
            seconds,
            ready: true,
        };
        let len = msg.encoded_len();
        if len > MAX_CONTROL_MESSAGE {
            bail!(
                "a share of {} rollouts is {len} bytes, over the coordinator's message limit of {MAX_CONTROL_MESSAGE}; lower batch_size or max_target_length",
                rollouts.len()
            );
        }
        let mut c = self.client.clone();
        self.runtime
            .block_on(c.submit_rollouts(msg))
            .map_err(|s| anyhow::Error::new(s).context("submitting rollouts"))?;
        Ok(len as u64)
    }

    fn fetch(&mut self, task: RolloutTask) -> Result<(Vec<SampledRollout>, f64)> {
        loop {
            self.check_abort()?;
            let req = pb::RolloutShareRequest {
                worker_id: self.worker_id.clone(),
                generation: self.generation,
                iteration: task.iteration,
                share: task.share as u32,
            };
            let mut c = self.client.clone();
            let s = self
                .runtime
                .block_on(c.fetch_rollouts(req))
                .map_err(|s| anyhow::Error::new(s).context("fetching rollouts"))?
                .into_inner();
            if !s.ready {
                continue;
            }
            let rollouts = s
                .rollouts
                .into_iter()
                .map(|r| SampledRollout {
                    key: r.key,
                    response: r.response,
                    response_text: r.response_text,
                    finished: r.finished,
                    raw_score: r.raw_score,
                })
                .collect();
            return Ok((rollouts, s.seconds));
        }
    }

    fn finish(&mut self) -> Result<()> {
        let req = pb::RolloutsDone {
            worker_id: self.worker_id.clone(),
            generation: self.generation,
        };
        let mut c = self.client.clone();
        self.runtime
            .block_on(c.finish_rollouts(req))
            .map_err(|s| anyhow::Error::new(s).context("ending the rollouts"))?;
        Ok(())
    }
}
