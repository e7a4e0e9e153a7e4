//! The Llama-family decoder (Llama 1/2/3, Mistral, Qwen2), written once against
//! the backend interface: forward, and a hand-written backward in reverse order.
//!
//! Per block (pre-norm residual):
//!   h1 = rmsnorm(x) ; q,k,v = linears(h1) ; rope(q,k) ; a = attention(q,k,v)
//!   x_mid = x + o(a) ; h2 = rmsnorm(x_mid) ; x_out = x_mid + down(silu(gate(h2)) * up(h2))

use super::config::ModelConfig;
use super::params::{Head, Layout, Linear, Slot, TrainMode};
use super::rope;
use anyhow::{bail, Context, Result};
use rlhf_kernels::backend::KvAttnShape;
use rlhf_kernels::{AttnShape, Backend, Gemm, LoraDropout, LoraShape, Precision};

/// One batch of token rows. `labels` are unshifted, as in transformers: the
/// loss at position t predicts labels[t+1]; -100 is ignored.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub b: usize,
    pub t: usize,
    pub input_ids: Vec<u32>,             // [B,T]
    pub attention_mask: Option<Vec<u8>>, // [B,T], 0 = padding
    pub labels: Vec<i32>,                // [B,T]
    /// [B] identity of each row's sample for LoRA dropout: a row's mask is a
    /// function of (step seed, key, position in the row), so it does not
    /// depend on which micro-batch, rank or padding length the sample got.
    pub sample_keys: Vec<u64>,
}

impl Batch {
    /// Token rows right-padded with `pad_id` to the longest, no labels, rows
    /// keyed 0..B (the caller may re-key them).
    pub fn right_padded(rows: &[&[u32]], pad_id: u32) -> Batch {
        let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let b = rows.len();
        let mut input_ids = vec![pad_id; b * t];
        let mut mask = vec![0u8; b * t];
        for (i, r) in rows.iter().enumerate() {
            input_ids[i * t..i * t + r.len()].copy_from_slice(r);
            mask[i * t..i * t + r.len()].fill(1);
        }
        Batch {
            b,
            t,
            input_ids,
            attention_mask: mask.contains(&0).then_some(mask),
            labels: vec![-100; b * t],
            sample_keys: (0..b as u64).collect(),
        }
    }

    /// Targets aligned with logits rows: targets[b,t] = labels[b,t+1], -100 at t = T-1.
    pub fn shifted_targets(&self) -> Vec<i32> {
        let mut out = vec![-100; self.b * self.t];
        for b in 0..self.b {
            for t in 0..self.t.saturating_sub(1) {
                out[b * self.t + t] = self.labels[b * self.t + t + 1];
            }
        }
        out
    }
}

/// Activations of one block kept for its backward (and the scratch of one
/// block's forward during generation).
pub(super) struct BlockActs<B: Backend> {
    h1: B::Buf,    // [N,C] rmsnorm(x)
    rstd1: B::Buf, // [N]
    q: B::Buf,     // [N, NH*HD] after rope
    k: B::Buf,     // [N, NKV*HD] after rope
    v: B::Buf,     // [N, NKV*HD]
    att: B::Buf,   // [N, NH*HD] attention output
    lse: B::Buf,   // [B, NH, T]
    h2: B::Buf,    // [N,C] rmsnorm(x_mid)
    rstd2: B::Buf, // [N]
    gate: B::Buf,  // [N,F]
    up: B::Buf,    // [N,F]
    act: B::Buf,   // [N,F] silu(gate)*up
    x_mid: B::Buf, // [N,C]
    /// dropout(x)·Aᵀ of each LoRA linear, LINEAR_MODULES order: [N, r]
    lora_xa: [Option<B::Buf>; 7],
}

/// Every buffer a forward/backward of shape (B,T) needs.
pub(super) struct Acts<B: Backend> {
    pub(super) b: usize,
    pub(super) t: usize,
    /// Residual stream entering each block, plus the final one: L+1 × [N,C].
    /// With gradient checkpointing these are all that is kept of the forward.
    pub(super) xs: Vec<B::Buf>,
    pub(super) w: Work<B>,
}

/// The rest of the activations and the backward scratch.
pub(super) struct Work<B: Backend> {
    /// L block activations, or 1 reused for recomputation under checkpointing.
    blocks: Vec<BlockActs<B>>,
    hf: B::Buf,                // [N,C] final rmsnorm
    rstdf: B::Buf,             // [N]
    pub(super) logits: B::Buf, // [N,V], overwritten by its gradient; empty with the score head
    score: ScoreActs<B>,
    /// The value head's outputs [N], overwritten by their gradient before the
    /// backward; empty without a value head.
    pub(super) values: B::Buf,
    /// This micro-batch's d value weight [C] (f32), added to the gradient once.
    dvalue_w: B::Buf,
    // backward scratch
    dres: B::Buf,  // [N,C] gradient of the residual stream
    dh: B::Buf,    // [N,C]
    dq: B::Buf,    // [N, NH*HD]
    dk: B::Buf,    // [N, NKV*HD]
    dv: B::Buf,    // [N, NKV*HD]
    datt: B::Buf,  // [N, NH*HD]
    dgate: B::Buf, // [N,F]
    dup: B::Buf,   // [N,F]
    dact: B::Buf,  // [N,F]
    /// LoRA scratch: dropout(x) / dropped gradient [N, max(in)], and [N, r]
    lora_x: B::Buf,
    lora_dxa: B::Buf,
}

/// The score head's buffers (all empty with the causal-LM head).
struct ScoreActs<B: Backend> {
    /// Row of hf (b·T + t) each sequence's reward is read at: [B].
    rows: Vec<usize>,
    pooled: B::Buf,  // [B,C] hf at `rows`
    scores: B::Buf,  // [B] (= [B,1]) pooled · scoreᵀ, then overwritten by dscores
    dpooled: B::Buf, // [B,C]
    /// This micro-batch's d score, added to the gradient in one addition (as
    /// the all-reduce adds a rank's): [C] (f32 like the gradients).
    dweight: B::Buf,
}

/// Where transformers' `*ForSequenceClassification` reads each row's score:
/// the rightmost position whose token is not `pad_token_id`
/// (`argmax(arange(T) * (ids != pad))`, so 0 for a row of pads only), which
/// handles left and right padding alike. Without a pad token only a batch of
/// one row is accepted, read at its last position.
pub fn last_non_pad_positions(
    input_ids: &[u32], // [B,T]
    b: usize,
    t: usize,
    pad_token_id: Option<u32>,
) -> Result<Vec<usize>> {
    match pad_token_id {
        None if b != 1 => bail!("cannot score a batch of {b} rows without a pad token id"),
        None => Ok(vec![t - 1]),
        Some(pad) => Ok((0..b)
            .map(|r| {
                input_ids[r * t..(r + 1) * t]
                    .iter()
                    .rposition(|&id| id != pad)
                    .unwrap_or(0)
            })
            .collect()),
    }
}

/// Statistics of one forward(/backward).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossStats {
    /// Sum of per-token losses over predicted tokens.
    pub loss_sum: f64,
    /// Number of predicted (non-ignored) tokens.
    pub tokens: usize,
}

pub struct Llama<B: Backend> {
    pub cfg: ModelConfig,
    pub be: B,
    pub mode: TrainMode,
    pub layout: Layout,
    pub frozen: B::Buf, // [layout.frozen_len]
    pub train: B::Buf,  // [layout.train_len]
    pub grads: B::Buf,  // [layout.train_len]
    pub gradient_checkpointing: bool,
    /// false runs the base model alone: the LoRA branches are skipped (the
    /// PPO/DPO reference policy, without a second copy of the weights).
    pub(super) adapter_enabled: bool,
    pub(super) rope_cos: B::Buf, // [P, HD/2]
    pub(super) rope_sin: B::Buf, // [P, HD/2]
    rope_positions: usize,
    pub(super) acts: Option<Acts<B>>,
}

/// Weight views by slot.
pub(super) struct W<'a, B: Backend> {
    pub(super) be: &'a B,
    pub(super) frozen: &'a B::Buf,
    pub(super) train: &'a B::Buf,
}

impl<'a, B: Backend> W<'a, B> {
    pub(super) fn get(&self, s: Slot) -> B::View<'a> {
        let buf = if s.trainable { self.train } else { self.frozen };
        self.be.view(buf, s.range())
    }
}

fn grad<'a, B: Backend>(be: &B, grads: &'a mut B::Buf, s: Slot) -> Option<B::ViewMut<'a>> {
    s.trainable.then(|| be.view_mut(grads, s.range()))
}

/// The gradients of two trainable tensors at once (LoRA's A and B), as
/// disjoint views of the one gradient buffer; None for a frozen one.
fn two_grads<'a, B: Backend>(
    be: &B,
    grads: &'a mut B::Buf,
    s1: Slot,
    s2: Slot,
) -> (Option<B::ViewMut<'a>>, Option<B::ViewMut<'a>>) {
    match (s1.trainable, s2.trainable) {
        (true, true) => {
            let (first, second, swapped) = if s1.offset <= s2.offset {
                (s1, s2, false)
            } else {
                (s2, s1, true)
            };
            assert!(
                first.offset + first.len <= second.offset,
                "overlapping slots"
            );
            let whole = be.view_mut(grads, first.offset..second.offset + second.len);
            let (lo, hi) = be.split_mut(whole, second.offset - first.offset);
            let lo = be.split_mut(lo, first.len).0;
            let hi = be.split_mut(hi, second.len).0;
            if swapped {
                (Some(hi), Some(lo))
            } else {
                (Some(lo), Some(hi))
            }
        }
        (true, false) => (grad(be, grads, s1), None),
        (false, true) => (None, grad(be, grads, s2)),
        (false, false) => (None, None),
    }
}

pub(super) fn all<'a, B: Backend>(be: &B, buf: &'a B::Buf) -> B::View<'a> {
    be.view(buf, 0..be.len(buf))
}

pub(super) fn all_mut<'a, B: Backend>(be: &B, buf: &'a mut B::Buf) -> B::ViewMut<'a> {
    let n = be.len(buf);
    be.view_mut(buf, 0..n)
}

/// A per-(layer, module) dropout seed derived from the step's seed.
fn module_seed(seed: u64, layer: usize, module: usize) -> u64 {
    seed ^ ((layer as u64 * 8 + module as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

/// The dropout seed of one sample (row) from its layer/module seed.
fn sample_seed(seed: u64, key: u64) -> u64 {
    seed ^ (key.wrapping_add(1)).wrapping_mul(0x9FB2_1C65_1E98_DF25)
}

impl<B: Backend> Llama<B> {
    /// Build a model whose weights are given by `load(entry) -> f32 data` for
    /// each tensor of the layout (base weights from disk, LoRA from an init).
    pub fn from_tensors(
        be: B,
        cfg: ModelConfig,
        mode: TrainMode,
        load: impl FnMut(&super::params::TensorEntry) -> Result<Vec<f32>>,
    ) -> Result<Self> {
        Self::from_tensors_with_head(be, cfg, mode, Head::CausalLm, load)
    }

    /// [`Self::from_tensors`] with the given output head.
    pub fn from_tensors_with_head(
        be: B,
        cfg: ModelConfig,
        mode: TrainMode,
        head: Head,
        mut load: impl FnMut(&super::params::TensorEntry) -> Result<Vec<f32>>,
    ) -> Result<Self> {
        let layout = Layout::with_head(&cfg, &mode, head);
        let mut frozen = vec![0f32; layout.frozen_len];
        let mut train = vec![0f32; layout.train_len];
        for e in &layout.tensors {
            let data = load(e)?;
            if data.len() != e.slot.len {
                bail!(
                    "tensor {}: {} values for shape {:?}",
                    e.name,
                    data.len(),
                    e.shape
                );
            }
            let dst = if e.slot.trainable {
                &mut train
            } else {
                &mut frozen
            };
            dst[e.slot.range()].copy_from_slice(&data);
        }
        let rope_positions = cfg.max_position_embeddings.max(1);
        let (cos, sin) = rope::tables(&cfg, rope_positions);
        Ok(Llama {
            frozen: be.upload(&frozen, Precision::Compute)?,
            grads: be.zeros(layout.train_len, Precision::F32)?,
            train: be.upload(&train, Precision::F32)?,
            rope_cos: be.upload(&cos, Precision::F32)?,
            rope_sin: be.upload(&sin, Precision::F32)?,
            rope_positions,
            cfg,
            be,
            mode,
            layout,
            gradient_checkpointing: false,
            adapter_enabled: true,
            acts: None,
        })
    }

    /// The flat buffer (frozen or trainable) that holds `slot`.
    pub fn weights_of(&self, slot: Slot) -> &B::Buf {
        if slot.trainable {
            &self.train
        } else {
            &self.frozen
        }
    }

    /// The LoRA settings of one pass; dropout only when training with a seed.
    pub(super) fn lora_run(&self, dropout_seed: Option<u64>) -> LoraRun {
        match &self.mode {
            TrainMode::Lora(l) => LoraRun {
                enabled: self.adapter_enabled,
                scaling: l.scaling(),
                r: l.r,
                dropout: dropout_seed
                    .filter(|_| l.dropout > 0.0)
                    .map(|s| (l.dropout, s)),
            },
            TrainMode::Full => LoraRun {
                enabled: false,
                scaling: 0.0,
                r: 0,
                dropout: None,
            },
        }
    }

    /// Make sure the rope tables cover `t` positions.
    pub(super) fn ensure_rope(&mut self, t: usize) -> Result<()> {
        if t > self.rope_positions {
            let (cos, sin) = rope::tables(&self.cfg, t);
            self.rope_cos = self.be.upload(&cos, Precision::F32)?;
            self.rope_sin = self.be.upload(&sin, Precision::F32)?;
            self.rope_positions = t;
        }
        Ok(())
    }

    /// Which of the 7 linears (LINEAR_MODULES order) carry a LoRA adapter.
    fn lora_on(&self) -> [bool; 7] {
        let mut on = [false; 7];
        if let TrainMode::Lora(l) = &self.mode {
            for (o, m) in on.iter_mut().zip(super::params::LINEAR_MODULES) {
                *o = l.target_modules.iter().any(|t| t == m);
            }
        }
        on
    }

    /// The buffers of one block's forward (and backward) on a [B,T] batch.
    pub(super) fn alloc_block(&self, b: usize, t: usize) -> Result<BlockActs<B>> {
        let be = &self.be;
        let cfg = &self.cfg;
        let n = b * t;
        let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd, nh) = (cfg.q_dim(), cfg.kv_dim(), cfg.num_attention_heads);
        let r = self.lora_run(None).r;
        let mut lora_xa: [Option<B::Buf>; 7] = Default::default();
        for (xa, on) in lora_xa.iter_mut().zip(self.lora_on()) {
            if on {
                *xa = Some(be.zeros(n * r, Precision::Compute)?);
            }
        }
        Ok(BlockActs {
            h1: be.zeros(n * c, Precision::Compute)?,
            rstd1: be.zeros(n, Precision::F32)?,
            q: be.zeros(n * qd, Precision::Compute)?,
            k: be.zeros(n * kvd, Precision::Compute)?,
            v: be.zeros(n * kvd, Precision::Compute)?,
            att: be.zeros(n * qd, Precision::Compute)?,
            lse: be.zeros(b * nh * t, Precision::F32)?,
            h2: be.zeros(n * c, Precision::Compute)?,
            rstd2: be.zeros(n, Precision::F32)?,
            gate: be.zeros(n * f, Precision::Compute)?,
            up: be.zeros(n * f, Precision::Compute)?,
            act: be.zeros(n * f, Precision::Compute)?,
            x_mid: be.zeros(n * c, Precision::Compute)?,
            lora_xa,
        })
    }

    pub(super) fn ensure_acts(&mut self, b: usize, t: usize) -> Result<()> {
        if self.acts.as_ref().is_some_and(|a| a.b == b && a.t == t) {
            return Ok(());
        }
        self.acts = None; // free before allocating the new shape
        let be = &self.be;
        let cfg = &self.cfg;
        let n = b * t;
        let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let r = self.lora_run(None).r;
        let nblocks = if self.gradient_checkpointing {
            1
        } else {
            cfg.num_hidden_layers
        };
        let mut blocks = Vec::with_capacity(nblocks);
        for _ in 0..nblocks {
            blocks.push(self.alloc_block(b, t)?);
        }
        let max_in = c.max(f).max(qd);
        let xs = (0..=cfg.num_hidden_layers)
            .map(|_| be.zeros(n * c, Precision::Compute))
            .collect::<Result<Vec<_>, _>>()?;
        let has_lora = r > 0;
        // Only the head in use gets its buffers: vocab logits are the largest of all.
        let (n_logits, n_pooled, n_scores) = match self.layout.head {
            Head::CausalLm | Head::CausalLmWithValue => (n * v, 0, 0),
            Head::Score => (0, b * c, b),
        };
        let n_values = if self.layout.value.is_some() { n } else { 0 };
        self.acts = Some(Acts {
            b,
            t,
            xs,
            w: Work {
                blocks,
                hf: be.zeros(n * c, Precision::Compute)?,
                rstdf: be.zeros(n, Precision::F32)?,
                logits: be.zeros(n_logits, Precision::Compute)?,
                score: ScoreActs {
                    rows: Vec::new(),
                    pooled: be.zeros(n_pooled, Precision::Compute)?,
                    scores: be.zeros(n_scores, Precision::Compute)?,
                    dpooled: be.zeros(n_pooled, Precision::Compute)?,
                    dweight: be.zeros(n_pooled.min(c), Precision::F32)?,
                },
                values: be.zeros(n_values, Precision::Compute)?,
                dvalue_w: be.zeros(if n_values > 0 { c } else { 0 }, Precision::F32)?,
                dres: be.zeros(n * c, Precision::Compute)?,
                dh: be.zeros(n * c, Precision::Compute)?,
                dq: be.zeros(n * qd, Precision::Compute)?,
                dk: be.zeros(n * kvd, Precision::Compute)?,
                dv: be.zeros(n * kvd, Precision::Compute)?,
                datt: be.zeros(n * qd, Precision::Compute)?,
                dgate: be.zeros(n * f, Precision::Compute)?,
                dup: be.zeros(n * f, Precision::Compute)?,
                dact: be.zeros(n * f, Precision::Compute)?,
                lora_x: be.zeros(if has_lora { n * max_in } else { 0 }, Precision::Compute)?,
                lora_dxa: be.zeros(if has_lora { n * r } else { 0 }, Precision::Compute)?,
            },
        });
        Ok(())
    }

    pub(super) fn check_batch(&self, batch: &Batch) -> Result<()> {
        let n = batch.b * batch.t;
        if batch.b == 0 || batch.t == 0 {
            bail!("empty batch");
        }
        if batch.input_ids.len() != n || batch.labels.len() != n {
            bail!(
                "batch of shape [{}, {}] has {} ids and {} labels",
                batch.b,
                batch.t,
                batch.input_ids.len(),
                batch.labels.len()
            );
        }
        if let Some(m) = &batch.attention_mask {
            if m.len() != n {
                bail!(
                    "attention mask has {} entries for a [{}, {}] batch",
                    m.len(),
                    batch.b,
                    batch.t
                );
            }
        }
        if let Some(w) = self.cfg.sliding_window {
            if batch.t > w {
                bail!("sequence length {} exceeds the model's sliding window {w}; sliding-window attention is not implemented", batch.t);
            }
        }
        if let Some(&id) = batch
            .input_ids
            .iter()
            .find(|&&id| id as usize >= self.cfg.vocab_size)
        {
            bail!(
                "token id {id} is outside the model's vocabulary of {}",
                self.cfg.vocab_size
            );
        }
        Ok(())
    }

    /// Forward only: the loss statistics, and (optionally) the logits [B,T,V].
    pub fn forward(
        &mut self,
        batch: &Batch,
        want_logits: bool,
    ) -> Result<(LossStats, Option<Vec<f32>>)> {
        self.require_head(Head::CausalLm)?;
        self.check_batch(batch)?;
        self.ensure_rope(batch.t)?;
        self.ensure_acts(batch.b, batch.t)?;
        self.run_forward(batch, None)?;
        let logits = if want_logits {
            let acts = self.acts.as_ref().context("activations")?;
            Some(self.be.download(all(&self.be, &acts.w.logits))?)
        } else {
            None
        };
        let stats = self.loss(batch, None)?;
        Ok((stats, logits))
    }

    /// Forward and backward: gradients are ADDED into `self.grads`, scaled by
    /// `grad_scale` (the caller passes 1/tokens-in-the-optimizer-step, so that
    /// accumulation over micro-batches gives the mean over all of them).
    /// `dropout_seed`: Some(seed) to train with LoRA dropout, None for none.
    pub fn forward_backward(
        &mut self,
        batch: &Batch,
        grad_scale: f32,
        dropout_seed: Option<u64>,
    ) -> Result<LossStats> {
        self.require_head(Head::CausalLm)?;
        self.check_batch(batch)?;
        self.ensure_rope(batch.t)?;
        self.ensure_acts(batch.b, batch.t)?;
        self.run_forward(batch, dropout_seed)?;
        let stats = self.loss(batch, Some(grad_scale))?;
        self.run_backward(batch, dropout_seed)?;
        Ok(stats)
    }

    pub(super) fn require_head(&self, head: Head) -> Result<()> {
        if self.layout.head != head {
            bail!(
                "this model has the {:?} head; the call needs the {head:?} head",
                self.layout.head
            );
        }
        Ok(())
    }

    /// Score head forward: one scalar per row [B], read at each row's last
    /// token that is not the config's `pad_token_id` (see
    /// [`last_non_pad_positions`]). Keeps the activations for
    /// [`Self::score_backward`] of the same batch with the same `dropout_seed`.
    pub fn score_forward(&mut self, batch: &Batch, dropout_seed: Option<u64>) -> Result<Vec<f32>> {
        self.require_head(Head::Score)?;
        self.check_batch(batch)?;
        let rows =
            last_non_pad_positions(&batch.input_ids, batch.b, batch.t, self.cfg.pad_token_id)?;
        self.ensure_rope(batch.t)?;
        self.ensure_acts(batch.b, batch.t)?;
        let acts = self.acts.as_mut().context("activations")?;
        acts.w.score.rows = rows
            .iter()
            .enumerate()
            .map(|(r, &p)| r * batch.t + p)
            .collect();
        self.run_forward(batch, dropout_seed)?;
        let acts = self.acts.as_ref().context("activations")?;
        Ok(self.be.download(all(&self.be, &acts.w.score.scores))?)
    }

    /// Score head backward after [`Self::score_forward`] of the same batch:
    /// gradients of `dscores` [B] are ADDED into `self.grads`.
    pub fn score_backward(
        &mut self,
        batch: &Batch,
        dscores: &[f32],
        dropout_seed: Option<u64>,
    ) -> Result<()> {
        self.require_head(Head::Score)?;
        let acts = self.acts.as_mut().context("activations")?;
        if acts.b != batch.b || acts.t != batch.t || acts.w.score.rows.len() != batch.b {
            bail!("score_backward without a score_forward of this batch");
        }
        if dscores.len() != batch.b {
            bail!("{} score gradients for {} rows", dscores.len(), batch.b);
        }
        self.be
            .write(all_mut(&self.be, &mut acts.w.score.scores), dscores)?;
        self.run_backward(batch, dropout_seed)
    }

    pub fn zero_grads(&mut self) -> Result<()> {
        let n = self.be.len(&self.grads);
        Ok(self.be.fill(self.be.view_mut(&mut self.grads, 0..n), 0.0)?)
    }

    pub(super) fn run_forward(&mut self, batch: &Batch, dropout_seed: Option<u64>) -> Result<()> {
        let lora = self.lora_run(dropout_seed);
        let Llama {
            cfg,
            be,
            layout,
            frozen,
            train,
            acts,
            rope_cos,
            rope_sin,
            gradient_checkpointing,
            ..
        } = self;
        let acts = acts.as_mut().context("activations")?;
        let w = W {
            be: &*be,
            frozen,
            train,
        };
        let c = cfg.hidden_size;
        be.embedding_forward(
            all_mut(be, &mut acts.xs[0]),
            w.get(layout.embed),
            &batch.input_ids,
            c,
        )?;
        let positions = positions(batch);
        let ctx = FwdCtx {
            cfg,
            be: &*be,
            w: &w,
            batch,
            positions: &positions,
            rope_cos,
            rope_sin,
            lora,
        };
        for l in 0..cfg.num_hidden_layers {
            let ba = if *gradient_checkpointing {
                &mut acts.w.blocks[0]
            } else {
                &mut acts.w.blocks[l]
            };
            let (before, after) = acts.xs.split_at_mut(l + 1);
            ctx.block_forward(
                l,
                &layout.blocks[l],
                &before[l],
                &mut after[0],
                ba,
                &mut acts.w.lora_x,
            )?;
        }
        be.rmsnorm_forward(
            all_mut(be, &mut acts.w.hf),
            all_mut(be, &mut acts.w.rstdf),
            all(be, &acts.xs[cfg.num_hidden_layers]),
            w.get(layout.norm),
            c,
            cfg.rms_norm_eps,
        )?;
        let n = batch.b * batch.t;
        match (layout.lm_head, layout.score) {
            (Some(lm_head), _) => be.gemm(
                all_mut(be, &mut acts.w.logits),
                all(be, &acts.w.hf),
                w.get(lm_head),
                Gemm::linear(n, cfg.vocab_size, c),
            )?,
            (None, Some(score)) => {
                // Gather each row's scoring position, then scores[B,1] = pooled · scoreᵀ:
                // the head never runs on the other positions.
                let sa = &mut acts.w.score;
                for (r, &row) in sa.rows.iter().enumerate() {
                    be.copy(
                        be.view_mut(&mut sa.pooled, r * c..(r + 1) * c),
                        be.view(&acts.w.hf, row * c..(row + 1) * c),
                    )?;
                }
                be.gemm(
                    all_mut(be, &mut sa.scores),
                    all(be, &sa.pooled),
                    w.get(score),
                    Gemm::linear(batch.b, 1, c),
                )?;
            }
            (None, None) => bail!("the model has no output head"),
        }
        if let Some(vh) = layout.value {
            // values[N,1] = hf · weightᵀ + bias
            be.gemm(
                all_mut(be, &mut acts.w.values),
                all(be, &acts.w.hf),
                w.get(vh.weight),
                Gemm::linear(n, 1, c),
            )?;
            be.add_bias(all_mut(be, &mut acts.w.values), w.get(vh.bias), 1)?;
        }
        Ok(())
    }

    /// Cross-entropy on the logits; with a grad scale, logits become dlogits.
    fn loss(&mut self, batch: &Batch, grad_scale: Option<f32>) -> Result<LossStats> {
        let targets = batch.shifted_targets();
        let acts = self.acts.as_mut().context("activations")?;
        // The same scale for every row: the gradient of grad_scale·Σ loss.
        let grad_scales = grad_scale.map(|s| vec![s; targets.len()]); // [N]
        let losses = self.be.cross_entropy(
            all_mut(&self.be, &mut acts.w.logits),
            &targets,
            self.cfg.vocab_size,
            grad_scales.as_deref(),
        )?;
        let tokens = targets.iter().filter(|&&t| t != -100).count();
        let loss_sum = losses.iter().map(|&x| x as f64).sum();
        Ok(LossStats { loss_sum, tokens })
    }

    pub(super) fn run_backward(&mut self, batch: &Batch, dropout_seed: Option<u64>) -> Result<()> {
        let lora = self.lora_run(dropout_seed);
        let Llama {
            cfg,
            be,
            layout,
            frozen,
            train,
            grads,
            acts,
            rope_cos,
            rope_sin,
            gradient_checkpointing,
            ..
        } = self;
        let acts = acts.as_mut().context("activations")?;
        let w = W {
            be: &*be,
            frozen,
            train,
        };
        let (n, c, v) = (batch.b * batch.t, cfg.hidden_size, cfg.vocab_size);
        let nl = cfg.num_hidden_layers;
        if let Some(score) = layout.score {
            score_head_backward(be, &w, grads, score, &mut acts.w, batch.b, c)?;
        }
        // lm_head: logits[N,V] = hf[N,C] · Wᵀ
        let lm_head = layout.lm_head;
        if let Some(lm_head) = lm_head {
            be.gemm(
                all_mut(be, &mut acts.w.dh),
                all(be, &acts.w.logits),
                w.get(lm_head),
                Gemm {
                    m: n,
                    n: c,
                    k: v,
                    trans_a: false,
                    trans_b: false,
                    alpha: 1.0,
                    accumulate: false,
                },
            )?;
        }
        if let Some(vh) = layout.value {
            value_head_backward(be, &w, grads, vh, &mut acts.w, n, c)?;
        }
        if let Some(dw) = lm_head.and_then(|s| grad(be, grads, s)) {
            be.gemm(
                dw,
                all(be, &acts.w.logits),
                all(be, &acts.w.hf),
                Gemm {
                    m: v,
                    n: c,
                    k: n,
                    trans_a: true,
                    trans_b: false,
                    alpha: 1.0,
                    accumulate: true,
                },
            )?;
        }
        be.fill(all_mut(be, &mut acts.w.dres), 0.0)?;
        be.rmsnorm_backward(
            all_mut(be, &mut acts.w.dres),
            grad(be, grads, layout.norm),
            all(be, &acts.w.dh),
            all(be, &acts.xs[nl]),
            w.get(layout.norm),
            all(be, &acts.w.rstdf),
            c,
        )?;
        let positions = positions(batch);
        let ctx = FwdCtx {
            cfg,
            be: &*be,
            w: &w,
            batch,
            positions: &positions,
            rope_cos,
            rope_sin,
            lora,
        };
        for l in (0..nl).rev() {
            let bi = if *gradient_checkpointing { 0 } else { l };
            if *gradient_checkpointing {
                // Recompute this block's activations from its saved input.
                let (before, after) = acts.xs.split_at_mut(l + 1);
                ctx.block_forward(
                    l,
                    &layout.blocks[l],
                    &before[l],
                    &mut after[0],
                    &mut acts.w.blocks[0],
                    &mut acts.w.lora_x,
                )?;
            }
            ctx.block_backward(l, &layout.blocks[l], &acts.xs[l], bi, &mut acts.w, grads)?;
        }
        if let Some(dw) = grad(be, grads, layout.embed) {
            be.embedding_backward(dw, all(be, &acts.w.dres), &batch.input_ids, c)?;
        }
        Ok(())
    }
}

/// The score head's backward: from dscores (in `acts.score.scores`, [B]) to
/// d score [1,C] and dh [N,C] (zero except at the scoring rows).
fn score_head_backward<B: Backend>(
    be: &B,
    w: &W<'_, B>,
    grads: &mut B::Buf,
    score: Slot,
    acts: &mut Work<B>,
    b: usize,
    c: usize,
) -> Result<()> {
    let sa = &mut acts.score;
    // dpooled[B,C] = dscores[B,1] · score[1,C]
    be.gemm(
        all_mut(be, &mut sa.dpooled),
        all(be, &sa.scores),
        w.get(score),
        Gemm {
            m: b,
            n: c,
            k: 1,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            accumulate: false,
        },
    )?;
    // d score[1,C] += dscoresᵀ[1,B] · pooled[B,C], computed apart and added
    // once, so that micro-batches accumulated here sum exactly as ranks
    // summed by the all-reduce.
    if let Some(dw) = grad(be, grads, score) {
        be.gemm(
            all_mut(be, &mut sa.dweight),
            all(be, &sa.scores),
            all(be, &sa.pooled),
            Gemm {
                m: 1,
                n: c,
                k: b,
                trans_a: true,
                trans_b: false,
                alpha: 1.0,
                accumulate: false,
            },
        )?;
        be.axpy(dw, 1.0, all(be, &sa.dweight))?;
    }
    be.fill(all_mut(be, &mut acts.dh), 0.0)?;
    for (r, &row) in sa.rows.iter().enumerate() {
        be.copy(
            be.view_mut(&mut acts.dh, row * c..(row + 1) * c),
            be.view(&sa.dpooled, r * c..(r + 1) * c),
        )?;
    }
    Ok(())
}

/// The value head's backward, after the lm_head's: from dvalues (in
/// `acts.values`, [N]) to d weight [1,C], d bias [1], and dh [N,C] += ….
fn value_head_backward<B: Backend>(
    be: &B,
    w: &W<'_, B>,
    grads: &mut B::Buf,
    vh: super::params::ValueHead,
    acts: &mut Work<B>,
    n: usize,
    c: usize,
) -> Result<()> {
    // dh[N,C] += dvalues[N,1] · weight[1,C]
    be.gemm(
        all_mut(be, &mut acts.dh),
        all(be, &acts.values),
        w.get(vh.weight),
        Gemm {
            m: n,
            n: c,
            k: 1,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            accumulate: true,
        },
    )?;
    // d weight[1,C] += dvaluesᵀ[1,N] · hf[N,C], computed apart and added once
    // (as the score head's, so accumulation sums as the all-reduce does).
    if let Some(dw) = grad(be, grads, vh.weight) {
        be.gemm(
            all_mut(be, &mut acts.dvalue_w),
            all(be, &acts.values),
            all(be, &acts.hf),
            Gemm {
                m: 1,
                n: c,
                k: n,
                trans_a: true,
                trans_b: false,
                alpha: 1.0,
                accumulate: false,
            },
        )?;
        be.axpy(dw, 1.0, all(be, &acts.dvalue_w))?;
    }
    if let Some(db) = grad(be, grads, vh.bias) {
        be.bias_backward(db, all(be, &acts.values), 1)?;
    }
    Ok(())
}

/// Positions 0..T for every row (transformers' default position_ids).
fn positions(batch: &Batch) -> Vec<u32> {
    (0..batch.b).flat_map(|_| 0..batch.t as u32).collect()
}

/// Everything a block's forward and backward read.
pub(super) struct FwdCtx<'a, B: Backend> {
    pub(super) cfg: &'a ModelConfig,
    pub(super) be: &'a B,
    pub(super) w: &'a W<'a, B>,
    pub(super) batch: &'a Batch,
    /// [N] rotary position of each row.
    pub(super) positions: &'a [u32],
    pub(super) rope_cos: &'a B::Buf,
    pub(super) rope_sin: &'a B::Buf,
    pub(super) lora: LoraRun,
}

/// One layer's key/value cache during generation, and where this step's
/// tokens go in it: the block writes its k, v (after rope) to slots
/// START..START+TQ and attends over slots 0..START+TQ instead of running
/// the training attention.
pub(super) struct LayerKv<'c, B: Backend> {
    pub(super) k: &'c mut B::Buf, // [B, CAP, NKV, HD]
    pub(super) v: &'c mut B::Buf, // [B, CAP, NKV, HD]
    pub(super) cap: usize,
    pub(super) start: usize,
    /// [B, START+TQ], 0 = padding key.
    pub(super) key_mask: &'c [u8],
}

/// LoRA settings of one forward/backward: scaling alpha/r, rank, and
/// (p, seed) when dropout is on.
#[derive(Clone, Copy, Debug)]
pub(super) struct LoraRun {
    /// false: the adapters are switched off and every linear is its base
    /// weight alone (PEFT's `disable_adapter()`).
    enabled: bool,
    scaling: f32,
    pub(super) r: usize,
    dropout: Option<(f32, u64)>,
}

impl<B: Backend> FwdCtx<'_, B> {
    fn shape(&self) -> AttnShape {
        let cfg = self.cfg;
        AttnShape {
            b: self.batch.b,
            t: self.batch.t,
            nh: cfg.num_attention_heads,
            nkv: cfg.num_key_value_heads,
            hd: cfg.head_dim,
        }
    }

    fn n(&self) -> usize {
        self.batch.b * self.batch.t
    }

    /// The LoRA branch's dropout for the module seeded `seed`: one mask seed
    /// per sample (keyed by the sample, not its place in the batch).
    fn lora_dropout(&self, seed: u64) -> Option<(f32, Vec<u64>)> {
        self.lora.dropout.map(|(p, _)| {
            let seeds = self
                .batch
                .sample_keys
                .iter()
                .map(|&key| sample_seed(seed, key))
                .collect();
            (p, seeds)
        })
    }

    fn lora_shape(&self, lin: &Linear) -> LoraShape {
        LoraShape {
            n: self.n(),
            n_in: lin.n_in,
            n_out: lin.n_out,
            r: self.lora.r,
            scaling: self.lora.scaling,
        }
    }

    /// y[N,out] (=|+=) x[N,in]·Wᵀ + s·dropout(x)·Aᵀ·Bᵀ + b; keeps dropout(x)·Aᵀ in `xa`.
    #[allow(clippy::too_many_arguments)]
    fn linear_forward(
        &self,
        lin: &Linear,
        y: &mut B::Buf,
        x: &B::Buf,
        accumulate: bool,
        xa: Option<&mut B::Buf>,
        lora_x: &mut B::Buf,
        seed: u64,
    ) -> Result<()> {
        let be = self.be;
        let n = self.n();
        match (lin.lora.filter(|_| self.lora.enabled), xa) {
            (Some((a, b)), Some(xa)) => {
                let drop = self.lora_dropout(seed);
                be.lora_linear_forward(
                    all_mut(be, y),
                    all_mut(be, xa),
                    all_mut(be, lora_x),
                    all(be, x),
                    self.w.get(lin.w),
                    self.w.get(a),
                    self.w.get(b),
                    drop.as_ref().map(|(p, seeds)| LoraDropout {
                        p: *p,
                        seeds,
                        rows_per_sample: self.batch.t,
                    }),
                    self.lora_shape(lin),
                    accumulate,
                )?;
            }
            _ => be.gemm(
                all_mut(be, y),
                all(be, x),
                self.w.get(lin.w),
                Gemm {
                    accumulate,
                    ..Gemm::linear(n, lin.n_out, lin.n_in)
                },
            )?,
        }
        if let Some(bias) = lin.bias {
            be.add_bias(all_mut(be, y), self.w.get(bias), lin.n_out)?;
        }
        Ok(())
    }

    /// dx += dy·W (+ LoRA path); dW, db, dA, dB += when trainable.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        lin: &Linear,
        dy: &B::Buf,
        x: &B::Buf,
        dx: &mut B::Buf,
        xa: Option<&B::Buf>,
        grads: &mut B::Buf,
        lora_x: &mut B::Buf,
        lora_dxa: &mut B::Buf,
        seed: u64,
    ) -> Result<()> {
        let be = self.be;
        let n = self.n();
        let (ni, no) = (lin.n_in, lin.n_out);
        match (lin.lora.filter(|_| self.lora.enabled), xa) {
            (Some((a, b)), Some(xa)) => {
                let drop = self.lora_dropout(seed);
                let (da, db) = two_grads(be, grads, a, b);
                be.lora_linear_backward(
                    all_mut(be, dx),
                    da,
                    db,
                    all_mut(be, lora_x),
                    all_mut(be, lora_dxa),
                    all(be, dy),
                    all(be, x),
                    all(be, xa),
                    self.w.get(lin.w),
                    self.w.get(a),
                    self.w.get(b),
                    drop.as_ref().map(|(p, seeds)| LoraDropout {
                        p: *p,
                        seeds,
                        rows_per_sample: self.batch.t,
                    }),
                    self.lora_shape(lin),
                )?;
            }
            _ => be.gemm(
                all_mut(be, dx),
                all(be, dy),
                self.w.get(lin.w),
                Gemm {
                    m: n,
                    n: ni,
                    k: no,
                    trans_a: false,
                    trans_b: false,
                    alpha: 1.0,
                    accumulate: true,
                },
            )?,
        }
        if let Some(dw) = grad(be, grads, lin.w) {
            be.gemm(
                dw,
                all(be, dy),
                all(be, x),
                Gemm {
                    m: no,
                    n: ni,
                    k: n,
                    trans_a: true,
                    trans_b: false,
                    alpha: 1.0,
                    accumulate: true,
                },
            )?;
        }
        if let Some(db) = lin.bias.and_then(|s| grad(be, grads, s)) {
            be.bias_backward(db, all(be, dy), no)?;
        }
        Ok(())
    }

    /// Appends this step's k, v [B,TQ,NKV,HD] to the layer's cache at slot
    /// START of every row, then att = attention of q over slots 0..START+TQ.
    fn attention_cached(
        &self,
        att: &mut B::Buf, // [B,TQ,NH,HD]
        lse: &mut B::Buf, // [B,NH,TQ], written by the prefill only
        q: &B::Buf,       // [B,TQ,NH,HD]
        k: &B::Buf,       // [B,TQ,NKV,HD]
        v: &B::Buf,       // [B,TQ,NKV,HD]
        kv: LayerKv<'_, B>,
    ) -> Result<()> {
        let be = self.be;
        let s = self.shape();
        let row = s.t * self.cfg.kv_dim(); // one batch row of k: [TQ, NKV·HD]
        for bi in 0..s.b {
            let at = (bi * kv.cap + kv.start) * self.cfg.kv_dim();
            be.copy(
                be.view_mut(kv.k, at..at + row),
                be.view(k, bi * row..(bi + 1) * row),
            )?;
            be.copy(
                be.view_mut(kv.v, at..at + row),
                be.view(v, bi * row..(bi + 1) * row),
            )?;
        }
        if kv.start == 0 {
            // An empty cache: the keys are this step's own, so this is the
            // training attention (the flash kernels, much faster on long prompts).
            be.attention_forward(
                all_mut(be, att),
                all_mut(be, lse),
                all(be, q),
                all(be, k),
                all(be, v),
                Some(kv.key_mask),
                s,
            )?;
            return Ok(());
        }
        be.attention_kv_forward(
            all_mut(be, att),
            all(be, q),
            all(be, kv.k),
            all(be, kv.v),
            kv.key_mask,
            KvAttnShape {
                b: s.b,
                tq: s.t,
                cap: kv.cap,
                start: kv.start,
                nh: s.nh,
                nkv: s.nkv,
                hd: s.hd,
            },
        )?;
        Ok(())
    }

    fn seed(&self, layer: usize, module: usize) -> u64 {
        module_seed(self.lora.dropout.map(|d| d.1).unwrap_or(0), layer, module)
    }

    fn block_forward(
        &self,
        l: usize,
        blk: &super::params::Block,
        x: &B::Buf,
        x_out: &mut B::Buf,
        a: &mut BlockActs<B>,
        lora_x: &mut B::Buf,
    ) -> Result<()> {
        self.block_forward_with(l, blk, x, x_out, a, lora_x, None)
    }

    /// The block's forward; with `kv`, attention runs over the layer's
    /// key/value cache (generation) instead of over this batch alone.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn block_forward_with(
        &self,
        l: usize,
        blk: &super::params::Block,
        x: &B::Buf,
        x_out: &mut B::Buf,
        a: &mut BlockActs<B>,
        lora_x: &mut B::Buf,
        kv: Option<LayerKv<'_, B>>,
    ) -> Result<()> {
        let be = self.be;
        let cfg = self.cfg;
        let c = cfg.hidden_size;
        let s = self.shape();
        be.rmsnorm_forward(
            all_mut(be, &mut a.h1),
            all_mut(be, &mut a.rstd1),
            all(be, x),
            self.w.get(blk.ln1),
            c,
            cfg.rms_norm_eps,
        )?;
        let [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d] = &mut a.lora_xa;
        self.linear_forward(
            &blk.q,
            &mut a.q,
            &a.h1,
            false,
            xa_q.as_mut(),
            lora_x,
            self.seed(l, 0),
        )?;
        self.linear_forward(
            &blk.k,
            &mut a.k,
            &a.h1,
            false,
            xa_k.as_mut(),
            lora_x,
            self.seed(l, 1),
        )?;
        self.linear_forward(
            &blk.v,
            &mut a.v,
            &a.h1,
            false,
            xa_v.as_mut(),
            lora_x,
            self.seed(l, 2),
        )?;
        let (cos, sin) = (all(be, self.rope_cos), all(be, self.rope_sin));
        be.rope_forward(all_mut(be, &mut a.q), cos, sin, self.positions, s.nh, s.hd)?;
        let (cos, sin) = (all(be, self.rope_cos), all(be, self.rope_sin));
        be.rope_forward(all_mut(be, &mut a.k), cos, sin, self.positions, s.nkv, s.hd)?;
        match kv {
            None => be.attention_forward(
                all_mut(be, &mut a.att),
                all_mut(be, &mut a.lse),
                all(be, &a.q),
                all(be, &a.k),
                all(be, &a.v),
                self.batch.attention_mask.as_deref(),
                s,
            )?,
            Some(kv) => self.attention_cached(&mut a.att, &mut a.lse, &a.q, &a.k, &a.v, kv)?,
        }
        // x_mid = x + o(att)
        be.copy(all_mut(be, &mut a.x_mid), all(be, x))?;
        self.linear_forward(
            &blk.o,
            &mut a.x_mid,
            &a.att,
            true,
            xa_o.as_mut(),
            lora_x,
            self.seed(l, 3),
        )?;
        be.rmsnorm_forward(
            all_mut(be, &mut a.h2),
            all_mut(be, &mut a.rstd2),
            all(be, &a.x_mid),
            self.w.get(blk.ln2),
            c,
            cfg.rms_norm_eps,
        )?;
        self.linear_forward(
            &blk.gate,
            &mut a.gate,
            &a.h2,
            false,
            xa_g.as_mut(),
            lora_x,
            self.seed(l, 4),
        )?;
        self.linear_forward(
            &blk.up,
            &mut a.up,
            &a.h2,
            false,
            xa_u.as_mut(),
            lora_x,
            self.seed(l, 5),
        )?;
        be.swiglu_forward(all_mut(be, &mut a.act), all(be, &a.gate), all(be, &a.up))?;
        // x_out = x_mid + down(act)
        be.copy(all_mut(be, x_out), all(be, &a.x_mid))?;
        self.linear_forward(
            &blk.down,
            x_out,
            &a.act,
            true,
            xa_d.as_mut(),
            lora_x,
            self.seed(l, 6),
        )?;
        Ok(())
    }

    /// On entry acts.dres = d x_out; on exit acts.dres = d x (the block input).
    fn block_backward(
        &self,
        l: usize,
        blk: &super::params::Block,
        x: &B::Buf,
        bi: usize,
        acts: &mut Work<B>,
        grads: &mut B::Buf,
    ) -> Result<()> {
        let be = self.be;
        let cfg = self.cfg;
        let c = cfg.hidden_size;
        let s = self.shape();
        let Work {
            blocks,
            dres,
            dh,
            dq,
            dk,
            dv,
            datt,
            dgate,
            dup,
            dact,
            lora_x,
            lora_dxa,
            ..
        } = acts;
        let a = &blocks[bi];
        let xa = |i: usize| a.lora_xa[i].as_ref();
        // x_out = x_mid + down(act)
        be.fill(all_mut(be, dact), 0.0)?;
        self.linear_backward(
            &blk.down,
            dres,
            &a.act,
            dact,
            xa(6),
            grads,
            lora_x,
            lora_dxa,
            self.seed(l, 6),
        )?;
        be.fill(all_mut(be, dgate), 0.0)?;
        be.fill(all_mut(be, dup), 0.0)?;
        be.swiglu_backward(
            all_mut(be, dgate),
            all_mut(be, dup),
            all(be, dact),
            all(be, &a.gate),
            all(be, &a.up),
        )?;
        be.fill(all_mut(be, dh), 0.0)?;
        self.linear_backward(
            &blk.gate,
            dgate,
            &a.h2,
            dh,
            xa(4),
            grads,
            lora_x,
            lora_dxa,
            self.seed(l, 4),
        )?;
        self.linear_backward(
            &blk.up,
            dup,
            &a.h2,
            dh,
            xa(5),
            grads,
            lora_x,
            lora_dxa,
            self.seed(l, 5),
        )?;
        be.rmsnorm_backward(
            all_mut(be, dres),
            grad(be, grads, blk.ln2),
            all(be, dh),
            all(be, &a.x_mid),
            self.w.get(blk.ln2),
            all(be, &a.rstd2),
            c,
        )?;
        // x_mid = x + o(att)
        be.fill(all_mut(be, datt), 0.0)?;
        self.linear_backward(
            &blk.o,
            dres,
            &a.att,
            datt,
            xa(3),
            grads,
            lora_x,
            lora_dxa,
            self.seed(l, 3),
        )?;
        be.fill(all_mut(be, dq), 0.0)?;
        be.fill(all_mut(be, dk), 0.0)?;
        be.fill(all_mut(be, dv), 0.0)?;
        be.attention_backward(
            all_mut(be, dq),
            all_mut(be, dk),
            all_mut(be, dv),
            all(be, datt),
            all(be, &a.q),
            all(be, &a.k),
            all(be, &a.v),
            all(be, &a.att),
            all(be, &a.lse),
            self.batch.attention_mask.as_deref(),
            s,
        )?;
        let (cos, sin) = (all(be, self.rope_cos), all(be, self.rope_sin));
        be.rope_backward(all_mut(be, dq), cos, sin, self.positions, s.nh, s.hd)?;
        let (cos, sin) = (all(be, self.rope_cos), all(be, self.rope_sin));
        be.rope_backward(all_mut(be, dk), cos, sin, self.positions, s.nkv, s.hd)?;
        be.fill(all_mut(be, dh), 0.0)?;
        self.linear_backward(
            &blk.q,
            dq,
            &a.h1,
            dh,
            xa(0),
            grads,
            lora_x,
            lora_dxa,
            self.seed(l, 0),
        )?;
        self.linear_backward(
            &blk.k,
            dk,
            &a.h1,
            dh,
            xa(1),
            grads,
            lora_x,
            lora_dxa,
            self.seed(l, 1),
        )?;
        self.linear_backward(
            &blk.v,
            dv,
            &a.h1,
            dh,
            xa(2),
            grads,
            lora_x,
            lora_dxa,
            self.seed(l, 2),
        )?;
        be.rmsnorm_backward(
            all_mut(be, dres),
            grad(be, grads, blk.ln1),
            all(be, dh),
            all(be, x),
            self.w.get(blk.ln1),
            all(be, &a.rstd1),
            c,
        )?;
        Ok(())
    }
}
