//! Several adapters over one frozen base. The policy's LoRA (with its value
//! head) and the reward model's LoRA (with its score head) are both small; the
//! base is not. Swapping the active trainable buffer, layout and head lets one
//! copy of the base weights serve the policy, the reference (adapter off), the
//! critic (value head) and the reward model.

use super::llama::{Acts, Llama};
use super::params::{Head, Layout, TrainMode};
use super::pretrained::read_adapter_config;
use anyhow::{bail, Result};
use rlhf_kernels::{Backend, Precision};
use std::path::Path;

/// A LoRA adapter (and head) that is not the active one: its weights,
/// layout and activation buffers, kept while another adapter runs.
pub struct Adapter<B: Backend> {
    mode: TrainMode,
    layout: Layout,
    train: B::Buf, // [layout.train_len]
    /// Empty: an inactive adapter is not trained.
    grads: B::Buf,
    acts: Option<Acts<B>>,
}

impl<B: Backend> Adapter<B> {
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
}

impl<B: Backend> Llama<B> {
    /// A zero adapter of `mode` with `head` over this model's frozen base.
    /// Every frozen tensor it reads must be the active layout's tensor at the
    /// same place, so the two share the base (fails when, say, one of them
    /// trains the embeddings in full).
    pub fn new_adapter(&self, mode: TrainMode, head: Head) -> Result<Adapter<B>> {
        if !matches!(mode, TrainMode::Lora(_)) {
            bail!("only a LoRA adapter can share the base weights");
        }
        let layout = Layout::with_head(&self.cfg, &mode, head);
        for e in layout.tensors.iter().filter(|e| !e.slot.trainable) {
            let same = self
                .layout
                .tensors
                .iter()
                .any(|m| m.name == e.name && m.slot == e.slot);
            if !same {
                bail!(
                    "the adapter needs the base tensor {} where the active model does not hold it frozen; the two cannot share the base",
                    e.name
                );
            }
        }
        Ok(Adapter {
            train: self.be.zeros(layout.train_len, Precision::F32)?,
            grads: self.be.zeros(0, Precision::F32)?,
            mode,
            layout,
            acts: None,
        })
    }

    /// Make `other` the active adapter and keep the current one in `other`.
    /// Swapping twice restores the model exactly (gradients included).
    pub fn swap_adapter(&mut self, other: &mut Adapter<B>) {
        std::mem::swap(&mut self.mode, &mut other.mode);
        std::mem::swap(&mut self.layout, &mut other.layout);
        std::mem::swap(&mut self.train, &mut other.train);
        std::mem::swap(&mut self.grads, &mut other.grads);
        std::mem::swap(&mut self.acts, &mut other.acts);
    }

    /// Load the PEFT adapter in `dir` (its own config) with `head` over this
    /// model's base, as an inactive [`Adapter`].
    pub fn load_adapter_over(&mut self, dir: &Path, head: Head) -> Result<Adapter<B>> {
        let config = read_adapter_config(dir)?;
        let mut adapter = self.new_adapter(TrainMode::Lora(config), head)?;
        self.swap_adapter(&mut adapter);
        let loaded = self.load_adapter(dir);
        self.swap_adapter(&mut adapter);
        loaded?;
        Ok(adapter)
    }

    /// Run `f` with `adapter` active, then restore the model's own.
    pub fn with_adapter<T>(
        &mut self,
        adapter: &mut Adapter<B>,
        f: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        let enabled = self.adapter_enabled();
        self.swap_adapter(adapter);
        self.set_adapter_enabled(true);
        let out = f(self);
        self.swap_adapter(adapter);
        self.set_adapter_enabled(enabled);
        out
    }
}
