//! AdamW over the model's flat trainable buffer, with transformers' parameter
//! groups (no weight decay on biases and norm weights) and global-norm clipping.

use crate::model::params::Layout;
use crate::model::Llama;
use anyhow::Result;
use rlhf_kernels::{AdamW, Backend, Precision};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimConfig {
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Clip the global gradient norm to this; <= 0 disables.
    pub max_grad_norm: f32,
}

pub struct Optimizer<B: Backend> {
    pub cfg: OptimConfig,
    pub m: B::Buf, // [train_len] first moment
    pub v: B::Buf, // [train_len] second moment
    /// Optimizer steps taken so far.
    pub step: u64,
}

impl<B: Backend> Optimizer<B> {
    pub fn new(model: &Llama<B>, cfg: OptimConfig) -> Result<Self> {
        let n = model.layout.train_len;
        Ok(Optimizer {
            cfg,
            m: model.be.zeros(n, Precision::F32)?,
            v: model.be.zeros(n, Precision::F32)?,
            step: 0,
        })
    }

    /// The global L2 norm of the gradients (before clipping).
    pub fn grad_norm(model: &Llama<B>) -> Result<f64> {
        let be = &model.be;
        Ok(be
            .sum_squares(be.view(&model.grads, 0..model.layout.train_len))?
            .sqrt())
    }

    /// Unscale (gradients carry the loss scale `1/unscale`), clip, then
    /// update every trainable tensor. Returns the pre-clip norm of the
    /// unscaled gradients, or None — and changes nothing — when the
    /// gradients are not finite (an fp16 overflow: the step is skipped).
    pub fn step(&mut self, model: &mut Llama<B>, lr: f64, unscale: f32) -> Result<Option<f64>> {
        let scaled_norm = Self::grad_norm(model)?;
        if !scaled_norm.is_finite() {
            return Ok(None);
        }
        let be = &model.be;
        let n = model.layout.train_len;
        if unscale != 1.0 {
            be.scale(be.view_mut(&mut model.grads, 0..n), unscale)?;
        }
        let norm = scaled_norm * unscale as f64;
        if self.cfg.max_grad_norm > 0.0 {
            // torch.nn.utils.clip_grad_norm_: scale by min(1, max/(norm+1e-6)).
            let coef = (self.cfg.max_grad_norm as f64 / (norm + 1e-6)).min(1.0);
            if coef < 1.0 {
                be.scale(be.view_mut(&mut model.grads, 0..n), coef as f32)?;
            }
        }
        self.step += 1;
        for e in model.layout.tensors.iter().filter(|e| e.slot.trainable) {
            let r = e.slot.range();
            let h = AdamW {
                lr: lr as f32,
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: if Layout::decays(&e.name) {
                    self.cfg.weight_decay
                } else {
                    0.0
                },
                step: self.step,
            };
            be.adamw(
                be.view_mut(&mut model.train, r.clone()),
                be.view(&model.grads, r.clone()),
                be.view_mut(&mut self.m, r.clone()),
                be.view_mut(&mut self.v, r),
                h,
            )?;
        }
        Ok(Some(norm))
    }
}
