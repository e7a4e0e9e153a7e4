//! The rollout exchange of a PPO stage split into trainer and rollout
//! workers: the newest policy (trainable values only, in chunks), the
//! rollout shares of its iteration still to hand out, and the shares sampled
//! but not yet fetched by their trainer. One per running generation, in
//! memory: a new generation starts with an empty one.

use crate::proto;
use std::collections::HashMap;
use tonic::Status;

/// The policy the rollout workers sample the current iteration with.
struct Policy {
    iteration: u64,
    shares: u32,
    chunks: Vec<Option<Vec<u8>>>,
}

impl Policy {
    fn complete(&self) -> bool {
        self.chunks.iter().all(Option::is_some)
    }
}

#[derive(Default)]
pub(crate) struct RolloutExchange {
    policy: Option<Policy>,
    /// Next share of the policy's iteration to hand out.
    next_share: u32,
    /// Sampled shares waiting for their trainer: (iteration, share).
    sampled: HashMap<(u64, u32), proto::RolloutShare>,
    done: bool,
    /// Totals for status: policy bytes received, rollout shares passed on.
    pub policy_bytes: u64,
    pub shares_passed: u64,
}

impl RolloutExchange {
    /// A chunk of the policy of `c.iteration` (a newer iteration replaces the old policy).
    pub fn publish(&mut self, c: proto::PolicyChunk) -> Result<(), Status> {
        if c.chunks == 0 || c.chunk >= c.chunks || c.shares == 0 {
            return Err(Status::invalid_argument(format!(
                "policy chunk {} of {} for {} shares",
                c.chunk, c.chunks, c.shares
            )));
        }
        let fresh = match &self.policy {
            Some(p) if p.iteration == c.iteration => {
                if p.chunks.len() != c.chunks as usize || p.shares != c.shares {
                    return Err(Status::invalid_argument(format!(
                        "policy of iteration {}: chunk {} says {} chunks and {} shares, earlier ones {} and {}",
                        c.iteration,
                        c.chunk,
                        c.chunks,
                        c.shares,
                        p.chunks.len(),
                        p.shares
                    )));
                }
                false
            }
            Some(p) if p.iteration > c.iteration => {
                return Err(Status::failed_precondition(format!(
                    "policy of iteration {} published after iteration {}",
                    c.iteration, p.iteration
                )))
            }
            _ => true,
        };
        if fresh {
            self.policy = Some(Policy {
                iteration: c.iteration,
                shares: c.shares,
                chunks: vec![None; c.chunks as usize],
            });
            self.next_share = 0;
        }
        self.policy_bytes += c.data.len() as u64;
        let p = self.policy.as_mut().expect("set above");
        p.chunks[c.chunk as usize] = Some(c.data);
        Ok(())
    }

    /// The next share to sample, or None while there is none (the policy is
    /// incomplete, or every share of its iteration was handed out).
    pub fn next_task(&mut self) -> Option<proto::RolloutTask> {
        if self.done {
            return Some(proto::RolloutTask {
                done: true,
                ..Default::default()
            });
        }
        let p = self.policy.as_ref().filter(|p| p.complete())?;
        if self.next_share >= p.shares {
            return None;
        }
        let share = self.next_share;
        self.next_share += 1;
        Some(proto::RolloutTask {
            wait: false,
            done: false,
            iteration: p.iteration,
            share,
            chunks: p.chunks.len() as u32,
        })
    }

    /// Chunk `chunk` of the policy of `iteration`.
    pub fn chunk(&self, iteration: u64, chunk: u32) -> Result<proto::PolicyChunk, Status> {
        let p = self
            .policy
            .as_ref()
            .filter(|p| p.iteration == iteration)
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "the policy of iteration {iteration} is not the current one"
                ))
            })?;
        let data = p
            .chunks
            .get(chunk as usize)
            .and_then(Clone::clone)
            .ok_or_else(|| {
                Status::not_found(format!("policy chunk {chunk} of iteration {iteration}"))
            })?;
        Ok(proto::PolicyChunk {
            iteration,
            shares: p.shares,
            chunk,
            chunks: p.chunks.len() as u32,
            data,
            ..Default::default()
        })
    }

    pub fn submit(&mut self, s: proto::RolloutShare) {
        self.sampled.insert((s.iteration, s.share), s);
    }

    /// The sampled share, once (it is dropped from memory when taken).
    pub fn take(&mut self, iteration: u64, share: u32) -> Option<proto::RolloutShare> {
        let s = self.sampled.remove(&(iteration, share))?;
        self.shares_passed += 1;
        Some(s)
    }

    pub fn finish(&mut self) {
        self.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(iteration: u64, chunk: u32, chunks: u32, data: &[u8]) -> proto::PolicyChunk {
        proto::PolicyChunk {
            iteration,
            shares: 2,
            chunk,
            chunks,
            data: data.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn shares_are_handed_out_once_the_whole_policy_is_there() {
        let mut x = RolloutExchange::default();
        assert!(x.next_task().is_none(), "no policy yet");
        x.publish(chunk(0, 1, 2, b"bb")).unwrap();
        assert!(x.next_task().is_none(), "chunk 0 missing");
        assert!(x.chunk(0, 0).is_err());
        x.publish(chunk(0, 0, 2, b"a")).unwrap();
        assert_eq!(x.chunk(0, 1).unwrap().data, b"bb");
        let shares: Vec<u32> = std::iter::from_fn(|| x.next_task().map(|t| t.share)).collect();
        assert_eq!(shares, [0, 1]);
        // The next iteration replaces the policy and reopens its shares.
        x.publish(chunk(1, 0, 1, b"c")).unwrap();
        assert!(x.chunk(0, 0).is_err(), "superseded");
        let t = x.next_task().unwrap();
        assert_eq!((t.iteration, t.share, t.chunks), (1, 0, 1));
        assert!(x.publish(chunk(0, 0, 1, b"old")).is_err());
        assert!(x.publish(chunk(1, 0, 3, b"other shape")).is_err());
        x.finish();
        assert!(x.next_task().unwrap().done);
        assert_eq!(x.policy_bytes, 4);
    }

    #[test]
    fn a_sampled_share_is_taken_once() {
        let mut x = RolloutExchange::default();
        x.submit(proto::RolloutShare {
            iteration: 3,
            share: 1,
            ready: true,
            ..Default::default()
        });
        assert!(x.take(3, 0).is_none());
        assert!(x.take(3, 1).unwrap().ready);
        assert!(x.take(3, 1).is_none());
        assert_eq!(x.shares_passed, 1);
    }
}
