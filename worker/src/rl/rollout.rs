//! Rollouts: a prompt, the response the policy sampled for it, and what the
//! RL update needs per response token (log-probabilities under the policy
//! and the reference, values, rewards, advantages).

use crate::model::generate::{generate_seeded, FinishReason, GenerationConfig};
use crate::model::{Batch, Llama};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use rlhf_kernels::Backend;

/// One sampled response and its per-token quantities ([R] = one per
/// response token).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rollout {
    /// The rollout's index in its step (seeds its sampling and dropout).
    pub key: u64,
    /// The prompt's index in the prompt set.
    pub prompt: usize,
    pub query: Vec<u32>,
    pub response: Vec<u32>,
    pub response_text: String,
    /// Ended by EOS or a stop string (not by max_new_tokens).
    pub finished: bool,
    /// The reward model's score (after baseline, scaling and clipping).
    pub score: f32,
    /// The score as the reward model gave it.
    pub raw_score: f32,
    pub logp: Vec<f32>,       // [R] policy at sampling time
    pub ref_logp: Vec<f32>,   // [R] reference (adapter off)
    pub values: Vec<f32>,     // [R] value head at sampling time
    pub entropy: Vec<f32>,    // [R] policy entropy at each response position
    pub rewards: Vec<f32>,    // [R] −β·KL, plus the score at the last token
    pub advantages: Vec<f32>, // [R]
    pub returns: Vec<f32>,    // [R]
}

impl Rollout {
    /// Row position whose output predicts response token 0 (the last
    /// query token); response token j is predicted at `start + j`.
    pub fn start(&self) -> usize {
        self.query.len() - 1
    }
}

/// Rows query ‖ response, right-padded with `pad_id`; labels are the
/// response tokens (−100 elsewhere); each row keyed by its rollout's key.
pub fn sequence_batch(rollouts: &[&Rollout], pad_id: u32) -> Batch {
    let t = rollouts
        .iter()
        .map(|r| r.query.len() + r.response.len())
        .max()
        .unwrap_or(0);
    let b = rollouts.len();
    let mut input_ids = vec![pad_id; b * t];
    let mut labels = vec![-100i32; b * t];
    let mut mask = vec![0u8; b * t];
    for (i, r) in rollouts.iter().enumerate() {
        let (q, n) = (r.query.len(), r.query.len() + r.response.len());
        let row = i * t;
        input_ids[row..row + q].copy_from_slice(&r.query);
        input_ids[row + q..row + n].copy_from_slice(&r.response);
        for (j, &id) in r.response.iter().enumerate() {
            labels[row + q + j] = id as i32;
        }
        mask[row..row + n].fill(1);
    }
    Batch {
        b,
        t,
        input_ids,
        attention_mask: mask.contains(&0).then_some(mask),
        labels,
        sample_keys: rollouts.iter().map(|r| r.key).collect(),
    }
}

/// The [R] slice of a [B,T] per-position output for row `i` of a
/// [`sequence_batch`].
pub fn response_slice<'a>(xs: &'a [f32], batch: &Batch, i: usize, r: &Rollout) -> &'a [f32] {
    let from = i * batch.t + r.start();
    &xs[from..from + r.response.len()]
}

/// Per-token outputs of one model pass over rollouts.
#[derive(Clone, Debug, Default)]
pub struct ResponseOutputs {
    pub logp: Vec<Vec<f32>>,
    pub values: Option<Vec<Vec<f32>>>,
    pub entropy: Option<Vec<Vec<f32>>>,
}

/// Log-probabilities (and values, entropies) of every rollout's response
/// under `model` as it is now (adapter on or off), in forward batches of
/// `forward_batch` rows, without dropout.
pub fn response_outputs<B: Backend>(
    model: &mut Llama<B>,
    rollouts: &[&Rollout],
    pad_id: u32,
    forward_batch: usize,
    want_entropy: bool,
) -> Result<ResponseOutputs> {
    let mut out = ResponseOutputs::default();
    let mut values = Vec::new();
    let mut entropy = Vec::new();
    for chunk in rollouts.chunks(forward_batch.max(1)) {
        let batch = sequence_batch(chunk, pad_id);
        let o = model.token_forward(&batch, None, want_entropy)?;
        for (i, r) in chunk.iter().enumerate() {
            out.logp
                .push(response_slice(&o.logp, &batch, i, r).to_vec());
            if let Some(v) = &o.values {
                values.push(response_slice(v, &batch, i, r).to_vec());
            }
            if let Some(e) = &o.entropy {
                entropy.push(response_slice(e, &batch, i, r).to_vec());
            }
        }
    }
    if !values.is_empty() {
        out.values = Some(values);
    }
    if !entropy.is_empty() {
        out.entropy = Some(entropy);
    }
    Ok(out)
}

/// Sample one response per query: row i seeded by `keys[i]` (with `seed`),
/// so a rollout does not depend on which batch or rank sampled it.
pub fn sample_responses<B: Backend>(
    model: &mut Llama<B>,
    tokenizer: &Tokenizer,
    queries: &[(usize, &[u32])],
    keys: &[u64],
    cfg: &GenerationConfig,
    seed: u64,
) -> Result<Vec<Rollout>> {
    if queries.len() != keys.len() {
        bail!("{} keys for {} queries", keys.len(), queries.len());
    }
    let prompts: Vec<Vec<u32>> = queries.iter().map(|(_, q)| q.to_vec()).collect();
    let seeds: Vec<u64> = keys
        .iter()
        .map(|&k| seed ^ (k.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect();
    let (gens, _) = generate_seeded(model, tokenizer, &prompts, cfg, &seeds, &mut |_, _| {})?;
    Ok(gens
        .into_iter()
        .zip(queries)
        .zip(keys)
        .map(|((g, (prompt, q)), &key)| Rollout {
            key,
            prompt: *prompt,
            query: q.to_vec(),
            finished: g.finish_reason != FinishReason::Length,
            response: g.token_ids,
            response_text: g.text,
            ..Default::default()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequence_batch_labels_only_the_response() {
        let a = Rollout {
            key: 7,
            query: vec![1, 2, 3],
            response: vec![4, 5],
            ..Default::default()
        };
        let b = Rollout {
            key: 9,
            query: vec![6],
            response: vec![8],
            ..Default::default()
        };
        let batch = sequence_batch(&[&a, &b], 0);
        assert_eq!((batch.b, batch.t), (2, 5));
        assert_eq!(batch.input_ids, [1, 2, 3, 4, 5, 6, 8, 0, 0, 0]);
        assert_eq!(
            batch.labels,
            [-100, -100, -100, 4, 5, -100, 8, -100, -100, -100]
        );
        assert_eq!(batch.sample_keys, [7, 9]);
        // Shifted: position start + j predicts response token j.
        let targets = batch.shifted_targets();
        assert_eq!(targets[a.start()], 4);
        assert_eq!(targets[a.start() + 1], 5);
        assert_eq!(targets[5 + b.start()], 8);
        let xs: Vec<f32> = (0..10).map(|x| x as f32).collect();
        assert_eq!(response_slice(&xs, &batch, 0, &a), &[2.0, 3.0]);
        assert_eq!(response_slice(&xs, &batch, 1, &b), &[5.0]);
    }
}
