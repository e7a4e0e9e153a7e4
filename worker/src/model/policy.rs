//! The model as a policy (PPO, DPO, GRPO): per-token log-probabilities,
//! entropies and values from one forward, and a backward from any per-token
//! weights of the log-probabilities and values. The reference policy is the
//! same weights with the adapter switched off.

use super::llama::{all, all_mut, Batch, Llama};
use super::params::Head;
use anyhow::{bail, Context, Result};
use rlhf_kernels::Backend;

/// What one forward gives per position (row b·T + t of a [B,T] batch).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenOutputs {
    /// log p(labels[b,t+1] | tokens ..= t): [B,T], 0 where nothing is predicted
    /// (label −100, and the last position).
    pub logp: Vec<f32>,
    /// Entropy of the next-token distribution at every position: [B,T].
    pub entropy: Option<Vec<f32>>,
    /// The value head's estimate at every position: [B,T] (with a value head).
    pub values: Option<Vec<f32>>,
}

impl<B: Backend> Llama<B> {
    /// Switch the LoRA adapter off (the base model alone: the reference
    /// policy) or back on. A full fine-tuning model has none to switch.
    pub fn set_adapter_enabled(&mut self, on: bool) {
        self.adapter_enabled = on;
    }

    pub fn adapter_enabled(&self) -> bool {
        self.adapter_enabled
    }

    fn require_lm_head(&self) -> Result<()> {
        match self.layout.head {
            Head::CausalLm | Head::CausalLmWithValue => Ok(()),
            Head::Score => bail!(
                "per-token log-probabilities need a causal-LM head; this model has a score head"
            ),
        }
    }

    /// Forward over `batch`: per-token log-probabilities of its labels, and
    /// optionally entropies, plus values when the model has a value head.
    /// Keeps the activations for [`Self::token_backward`] of the same batch
    /// with the same `dropout_seed`.
    pub fn token_forward(
        &mut self,
        batch: &Batch,
        dropout_seed: Option<u64>,
        want_entropy: bool,
    ) -> Result<TokenOutputs> {
        self.require_lm_head()?;
        self.check_batch(batch)?;
        self.ensure_rope(batch.t)?;
        self.ensure_acts(batch.b, batch.t)?;
        self.run_forward(batch, dropout_seed)?;
        let targets = batch.shifted_targets();
        let v = self.cfg.vocab_size;
        let be = &self.be;
        let acts = self.acts.as_mut().context("activations")?;
        let entropy = if want_entropy {
            Some(be.softmax_entropy(all(be, &acts.w.logits), v)?)
        } else {
            None
        };
        let values = if self.layout.value.is_some() {
            Some(be.download(all(be, &acts.w.values))?)
        } else {
            None
        };
        // Without a gradient the logits are left as they are, for the backward.
        let losses = be.cross_entropy(all_mut(be, &mut acts.w.logits), &targets, v, None)?;
        let logp = losses
            .iter()
            .zip(&targets)
            .map(|(&l, &t)| if t == -100 { 0.0 } else { -l })
            .collect();
        Ok(TokenOutputs {
            logp,
            entropy,
            values,
        })
    }

    /// Backward after [`Self::token_forward`] of the same batch: the
    /// gradients of Σ dlogp·logp + Σ dvalues·values are ADDED into
    /// `self.grads`. dlogp, dvalues: [B,T] (dlogp is ignored where nothing is
    /// predicted); dvalues only with a value head (None: zero).
    pub fn token_backward(
        &mut self,
        batch: &Batch,
        dlogp: &[f32],
        dvalues: Option<&[f32]>,
        dropout_seed: Option<u64>,
    ) -> Result<()> {
        self.require_lm_head()?;
        let n = batch.b * batch.t;
        let acts = self.acts.as_mut().context("activations")?;
        if acts.b != batch.b || acts.t != batch.t {
            bail!("token_backward without a token_forward of this batch");
        }
        if dlogp.len() != n {
            bail!(
                "{} log-prob gradients for a [{}, {}] batch",
                dlogp.len(),
                batch.b,
                batch.t
            );
        }
        let be = &self.be;
        match (self.layout.value.is_some(), dvalues) {
            (true, d) => {
                let zeros;
                let d = match d {
                    Some(d) => d,
                    None => {
                        zeros = vec![0.0; n];
                        &zeros
                    }
                };
                if d.len() != n {
                    bail!(
                        "{} value gradients for a [{}, {}] batch",
                        d.len(),
                        batch.b,
                        batch.t
                    );
                }
                be.write(all_mut(be, &mut acts.w.values), d)?;
            }
            (false, Some(_)) => bail!("value gradients given, but the model has no value head"),
            (false, None) => {}
        }
        // logp = −loss, so d/dlogits of Σ g·logp is the loss gradient scaled by −g.
        let scales: Vec<f32> = dlogp.iter().map(|&g| -g).collect();
        let targets = batch.shifted_targets();
        be.cross_entropy(
            all_mut(be, &mut acts.w.logits),
            &targets,
            self.cfg.vocab_size,
            Some(&scales),
        )?;
        self.run_backward(batch, dropout_seed)
    }
}

impl<B: Backend> Llama<B> {
    /// Σ over each row's predicted tokens of log p (a sequence's
    /// log-likelihood, as DPO and a likelihood reward model read it): [B].
    /// Keeps the activations for [`Self::sequence_logp_backward`].
    pub fn sequence_logp(&mut self, batch: &Batch, dropout_seed: Option<u64>) -> Result<Vec<f32>> {
        let out = self.token_forward(batch, dropout_seed, false)?;
        Ok(out
            .logp
            .chunks(batch.t)
            .map(|row| row.iter().map(|&x| x as f64).sum::<f64>() as f32)
            .collect())
    }

    /// Gradients of Σ_b d[b]·sequence_logp[b] added into `self.grads`.
    pub fn sequence_logp_backward(
        &mut self,
        batch: &Batch,
        d: &[f32],
        dropout_seed: Option<u64>,
    ) -> Result<()> {
        if d.len() != batch.b {
            bail!("{} sequence gradients for {} rows", d.len(), batch.b);
        }
        let dlogp: Vec<f32> = d
            .iter()
            .flat_map(|&g| std::iter::repeat_n(g, batch.t))
            .collect();
        self.token_backward(batch, &dlogp, None, dropout_seed)
    }
}

/// Predicted tokens per row of a batch (labels that are not −100 after the shift).
fn predicted_per_row(batch: &Batch) -> Vec<f32> {
    batch
        .shifted_targets()
        .chunks(batch.t)
        .map(|r| r.iter().filter(|&&t| t != -100).count() as f32)
        .collect()
}

impl<B: Backend> Llama<B> {
    /// The mean log p over each row's predicted tokens (a length-normalised
    /// likelihood, the score of a likelihood reward model): [B], 0 for a row
    /// that predicts nothing. Keeps the activations for [`Self::mean_logp_backward`].
    pub fn mean_logp(&mut self, batch: &Batch, dropout_seed: Option<u64>) -> Result<Vec<f32>> {
        let sums = self.sequence_logp(batch, dropout_seed)?;
        Ok(sums
            .iter()
            .zip(predicted_per_row(batch))
            .map(|(&s, n)| if n > 0.0 { s / n } else { 0.0 })
            .collect())
    }

    /// Gradients of Σ_b d[b]·mean_logp[b] added into `self.grads`.
    pub fn mean_logp_backward(
        &mut self,
        batch: &Batch,
        d: &[f32],
        dropout_seed: Option<u64>,
    ) -> Result<()> {
        let scaled: Vec<f32> = d
            .iter()
            .zip(predicted_per_row(batch))
            .map(|(&g, n)| if n > 0.0 { g / n } else { 0.0 })
            .collect();
        self.sequence_logp_backward(batch, &scaled, dropout_seed)
    }
}
