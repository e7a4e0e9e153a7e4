//! PPO split into trainer and rollout workers: what passes between them.
//!
//! The trainers own the policy and update it; after each update the first
//! trainer publishes the trainable values (LoRA adapter and value head — the
//! frozen base never moves, every worker loads it once). The rollout
//! workers take prompt batches (shares) of the iteration as the coordinator
//! hands them out, sample them with the newest policy, score them with the
//! reward model, and send back what a trainer needs to redo the rest
//! (log-probabilities, values, reference) exactly as one process would.
//! The transport is the coordinator ([`crate::agent`] implements this trait
//! over its gRPC service).

use anyhow::Result;

/// What this rank does in a split PPO stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Trainer `rank` of `trainers` (they all-reduce among themselves).
    Trainer { rank: usize, trainers: usize },
    /// A rollout worker (no optimizer, no gradients).
    Rollout,
}

/// A rollout as sampled and scored: the trainer recomputes everything else.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledRollout {
    pub key: u64,
    pub response: Vec<u32>,
    pub response_text: String,
    pub finished: bool,
    pub raw_score: f32,
}

/// A share of rollouts to sample: iteration `iteration`'s share `share`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RolloutTask {
    pub iteration: u64,
    pub share: usize,
}

pub trait RolloutExchange: Send {
    fn role(&self) -> Role;
    /// First trainer: the policy that samples `iteration`'s `shares` shares.
    /// Returns the bytes shipped.
    fn publish_policy(&mut self, iteration: u64, shares: usize, values: &[f32]) -> Result<u64>;
    /// Rollout worker: the next share to sample (waits for one); None when
    /// the trainers are done.
    fn next_task(&mut self) -> Result<Option<RolloutTask>>;
    /// Rollout worker: the trainable values of `iteration`'s policy.
    fn fetch_policy(&mut self, iteration: u64) -> Result<Vec<f32>>;
    /// Rollout worker: a sampled share; returns the bytes shipped.
    fn submit(
        &mut self,
        task: RolloutTask,
        rollouts: &[SampledRollout],
        seconds: f64,
    ) -> Result<u64>;
    /// Trainer: a share as its rollout worker sampled it (waits for it), and
    /// the rollout worker's seconds for it.
    fn fetch(&mut self, task: RolloutTask) -> Result<(Vec<SampledRollout>, f64)>;
    /// First trainer: no more iterations.
    fn finish(&mut self) -> Result<()>;
}

/// f32 values as little-endian bytes, and back.
pub fn to_le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
pub fn from_le_bytes(bytes: &[u8]) -> Result<Vec<f32>> {
    if bytes.len() % 4 != 0 {
        anyhow::bail!("{} bytes are not a whole number of f32 values", bytes.len());
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_survive_the_byte_round_trip_bit_for_bit() {
        let v = [
            0.0f32,
            -0.0,
            1.5e-38,
            f32::MAX,
            -3.25,
            f32::MIN_POSITIVE / 2.0,
        ];
        let back = from_le_bytes(&to_le_bytes(&v)).unwrap();
        assert_eq!(
            v.map(f32::to_bits).to_vec(),
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert!(from_le_bytes(&[1, 2, 3]).is_err());
    }
}
