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

    /// The AdamW moments on the host (for a checkpoint): (m, v), [train_len] each.
    pub fn moments(&self, model: &Llama<B>) -> Result<(Vec<f32>, Vec<f32>)> {
        let (be, n) = (&model.be, model.layout.train_len);
        Ok((
            be.download(be.view(&self.m, 0..n))?,
            be.download(be.view(&self.v, 0..n))?,
        ))
    }

    /// Restore the moments written by [`Self::moments`] and the step count.
    pub fn restore(&mut self, model: &Llama<B>, m: &[f32], v: &[f32], step: u64) -> Result<()> {
        let be = &model.be;
        be.write(be.view_mut(&mut self.m, 0..m.len()), m)?;
        be.write(be.view_mut(&mut self.v, 0..v.len()), v)?;
        self.step = step;
        Ok(())
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
        let norm = scaled_norm * unscale as f64;
        // torch.nn.utils.clip_grad_norm_: scale by min(1, max/(norm+1e-6)).
        let clip = if self.cfg.max_grad_norm > 0.0 {
            (self.cfg.max_grad_norm as f64 / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        // Unscaling and clipping in one pass (the scale is a power of two, so
        // this rounds exactly as clipping the unscaled gradients would).
        let factor = (clip as f32) * unscale;
        if factor != 1.0 {
            be.scale(be.view_mut(&mut model.grads, 0..n), factor)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Batch, LoraConfig, ModelConfig, TrainMode};
    use rlhf_kernels::Cpu;

    fn model() -> Llama<Cpu> {
        let cfg = ModelConfig::from_json(serde_json::json!({
            "model_type": "llama", "vocab_size": 50, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 16, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "tie_word_embeddings": false, "hidden_act": "silu",
        }))
        .unwrap();
        let mode = TrainMode::Lora(LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            modules_to_save: vec![],
        });
        let mut x = 1u32;
        Llama::from_tensors(Cpu, cfg, mode, |e| {
            Ok((0..e.slot.len)
                .map(|_| {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    ((x >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.2
                })
                .collect())
        })
        .unwrap()
    }

    fn batch() -> Batch {
        let ids: Vec<u32> = (0..12).map(|i| (i * 7 % 50) as u32).collect();
        Batch {
            b: 2,
            t: 6,
            labels: ids.iter().map(|&i| i as i32).collect(),
            input_ids: ids,
            attention_mask: None,
            sample_keys: vec![0, 1],
        }
    }

    fn cfg() -> OptimConfig {
        OptimConfig {
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
        }
    }

    /// fp16's loss scaling: gradients of a loss scaled by 2¹⁶, unscaled in
    /// the step, give exactly (bitwise: powers of two) the unscaled update.
    #[test]
    fn a_scaled_loss_unscaled_in_the_step_is_the_same_update() {
        let mut plain = model();
        let mut scaled = model();
        let (mut o1, mut o2) = (
            Optimizer::new(&plain, cfg()).unwrap(),
            Optimizer::new(&scaled, cfg()).unwrap(),
        );
        let s = 65536.0f32;
        plain.zero_grads().unwrap();
        plain.forward_backward(&batch(), 1.0 / 10.0, None).unwrap();
        scaled.zero_grads().unwrap();
        scaled.forward_backward(&batch(), s / 10.0, None).unwrap();
        let n1 = o1.step(&mut plain, 1e-3, 1.0).unwrap().unwrap();
        let n2 = o2.step(&mut scaled, 1e-3, 1.0 / s).unwrap().unwrap();
        assert_eq!(n1, n2, "reported grad norm is of the unscaled gradients");
        assert_eq!(plain.train, scaled.train);
        assert_eq!(o1.m, o2.m);
    }

    /// An overflowed (non-finite) gradient is not applied: weights, moments
    /// and the step count stay as they were.
    #[test]
    fn a_non_finite_gradient_skips_the_step() {
        let mut m = model();
        let mut opt = Optimizer::new(&m, cfg()).unwrap();
        m.zero_grads().unwrap();
        m.forward_backward(&batch(), 1.0 / 10.0, None).unwrap();
        m.grads[3] = f32::INFINITY;
        let before = m.train.clone();
        assert_eq!(opt.step(&mut m, 1e-3, 1.0).unwrap(), None);
        assert_eq!(m.train, before);
        assert_eq!(opt.step, 0);
        assert!(opt.m.iter().all(|&v| v == 0.0));
    }
}
