//! Inference with a key/value cache: the model's own blocks
//! (`FwdCtx::block_forward_with`) run on the new tokens only, each layer
//! appending its keys and values (after rope) to the cache and attending over
//! everything cached so far. LoRA adapters stay unmerged (the same
//! `lora_linear_forward` path as training, without dropout).

use crate::model::llama::{all, all_mut, Batch, BlockActs, FwdCtx, LayerKv, Llama, W};
use anyhow::{bail, Context, Result};
use rlhf_kernels::{Backend, Gemm, Precision};

/// Keys and values of every layer for B rows of up to CAP positions, in the
/// model's compute precision, and the host-side key mask.
pub struct KvCache<B: Backend> {
    b: usize,
    cap: usize,
    /// Slots filled so far in every row (rows advance together).
    len: usize,
    k: Vec<B::Buf>, // L × [B, CAP, NKV, HD]
    v: Vec<B::Buf>, // L × [B, CAP, NKV, HD]
    /// [B, CAP]: 0 = padding key (left padding of the prompts).
    mask: Vec<u8>,
    /// Buffers of one step of TQ tokens, kept while TQ stays the same.
    scratch: Option<Scratch<B>>,
}

/// The work buffers of one forward over [B, TQ] new tokens.
struct Scratch<B: Backend> {
    tq: usize,
    block: BlockActs<B>, // one block's activations, reused by every layer
    x: B::Buf,           // [B·TQ, C] residual stream entering a block
    x_next: B::Buf,      // [B·TQ, C] and leaving it
    lora_x: B::Buf,      // [B·TQ, max(in)] LoRA scratch (empty without LoRA)
    last: B::Buf,        // [B, C] residual of each row's last new token
    hf: B::Buf,          // [B, C] final rmsnorm of it
    rstd: B::Buf,        // [B]
    logits: B::Buf,      // [B, V]
}

impl<B: Backend> KvCache<B> {
    /// Slots filled in every row.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity in positions.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn batch(&self) -> usize {
        self.b
    }
}

impl<B: Backend> Llama<B> {
    /// An empty cache for `b` rows of up to `cap` positions.
    pub fn new_kv_cache(&mut self, b: usize, cap: usize) -> Result<KvCache<B>> {
        if b == 0 || cap == 0 {
            bail!("a KV cache needs at least one row and one position (got {b} × {cap})");
        }
        // Rope tables for every position a row can reach.
        self.ensure_rope(cap)?;
        let n = b * cap * self.cfg.kv_dim();
        let layers = self.cfg.num_hidden_layers;
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(self.be.zeros(n, Precision::Compute)?);
            v.push(self.be.zeros(n, Precision::Compute)?);
        }
        Ok(KvCache {
            b,
            cap,
            len: 0,
            k,
            v,
            mask: vec![0; b * cap],
            scratch: None,
        })
    }

    /// Runs TQ new tokens of every row through the model, appending them to
    /// `cache`, and returns the logits of each row's LAST new token: [B, V].
    /// ids, mask, positions: [B, TQ] (mask 0 = padding; positions are the
    /// rotary positions, transformers' `cumsum(mask) − 1`).
    #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
    pub fn forward_cached(
        &mut self,
        cache: &mut KvCache<B>,
        ids: &[u32],
        mask: &[u8],
        positions: &[u32],
    ) -> Result<Vec<f32>> {
        let b = cache.b;
        if ids.is_empty() || ids.len() % b != 0 {
            bail!(
                "{} new token ids do not split into the cache's {b} rows",
                ids.len()
            );
        }
        let tq = ids.len() / b;
        if mask.len() != ids.len() || positions.len() != ids.len() {
            bail!(
                "ids, mask and positions must all be [{b}, {tq}]: got {}, {}, {}",
                ids.len(),
                mask.len(),
                positions.len()
            );
        }
        if cache.len + tq > cache.cap {
            bail!(
                "the KV cache holds {} positions: {} cached + {tq} new do not fit",
                cache.cap,
                cache.len
            );
        }
        let vocab = self.cfg.vocab_size;
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("token id {id} is outside the model's vocabulary of {vocab}");
        }
        if let Some(&p) = positions.iter().find(|&&p| p as usize >= cache.cap) {
            bail!("position {p} is beyond the cache's {} positions", cache.cap);
        }
        if cache.scratch.as_ref().is_none_or(|s| s.tq != tq) {
            cache.scratch = None; // free the old shape first
            cache.scratch = Some(self.alloc_scratch(b, tq)?);
        }
        let start = cache.len;
        for bi in 0..b {
            cache.mask[bi * cache.cap + start..bi * cache.cap + start + tq]
                .copy_from_slice(&mask[bi * tq..(bi + 1) * tq]);
        }
        // [B, START+TQ] key mask of this step.
        let keys = start + tq;
        let key_mask: Vec<u8> = (0..b)
            .flat_map(|bi| {
                cache.mask[bi * cache.cap..bi * cache.cap + keys]
                    .iter()
                    .copied()
            })
            .collect();
        let lora = self.lora_run(None);
        let Llama {
            cfg,
            be,
            layout,
            frozen,
            train,
            rope_cos,
            rope_sin,
            ..
        } = self;
        let s = cache.scratch.as_mut().expect("allocated above");
        let w = W {
            be: &*be,
            frozen,
            train,
        };
        let c = cfg.hidden_size;
        be.embedding_forward(all_mut(be, &mut s.x), w.get(layout.embed), ids, c)?;
        // The block reads the batch's shape (and, for LoRA dropout, which is
        // off here, its sample keys); labels are unused.
        let batch = Batch {
            b,
            t: tq,
            input_ids: ids.to_vec(),
            attention_mask: Some(mask.to_vec()),
            labels: Vec::new(),
            sample_keys: (0..b as u64).collect(),
        };
        let ctx = FwdCtx {
            cfg,
            be: &*be,
            w: &w,
            batch: &batch,
            positions,
            rope_cos,
            rope_sin,
            lora,
        };
        for l in 0..cfg.num_hidden_layers {
            ctx.block_forward_with(
                l,
                &layout.blocks[l],
                &s.x,
                &mut s.x_next,
                &mut s.block,
                &mut s.lora_x,
                Some(LayerKv {
                    k: &mut cache.k[l],
                    v: &mut cache.v[l],
                    cap: cache.cap,
                    start,
                    key_mask: &key_mask,
                }),
            )?;
            std::mem::swap(&mut s.x, &mut s.x_next);
        }
        // Only each row's last token predicts the next one.
        for bi in 0..b {
            let from = (bi * tq + tq - 1) * c;
            be.copy(
                be.view_mut(&mut s.last, bi * c..(bi + 1) * c),
                be.view(&s.x, from..from + c),
            )?;
        }
        be.rmsnorm_forward(
            all_mut(be, &mut s.hf),
            all_mut(be, &mut s.rstd),
            all(be, &s.last),
            w.get(layout.norm),
            c,
            cfg.rms_norm_eps,
        )?;
        let lm_head = layout
            .lm_head
            .context("generation needs a causal-LM head; this model has a score head")?;
        be.gemm(
            all_mut(be, &mut s.logits),
            all(be, &s.hf),
            w.get(lm_head),
            Gemm::linear(b, vocab, c),
        )?;
        let logits = be.download(all(be, &s.logits))?;
        cache.len += tq;
        Ok(logits)
    }

    fn alloc_scratch(&self, b: usize, tq: usize) -> Result<Scratch<B>> {
        let be = &self.be;
        let cfg = &self.cfg;
        let (n, c) = (b * tq, cfg.hidden_size);
        let lora_x = if self.lora_run(None).r > 0 {
            n * c.max(cfg.intermediate_size).max(cfg.q_dim())
        } else {
            0
        };
        Ok(Scratch {
            tq,
            block: self.alloc_block(b, tq)?,
            x: be.zeros(n * c, Precision::Compute)?,
            x_next: be.zeros(n * c, Precision::Compute)?,
            lora_x: be.zeros(lora_x, Precision::Compute)?,
            last: be.zeros(b * c, Precision::Compute)?,
            hf: be.zeros(b * c, Precision::Compute)?,
            rstd: be.zeros(b, Precision::F32)?,
            logits: be.zeros(b * cfg.vocab_size, Precision::Compute)?,
        })
    }
}
