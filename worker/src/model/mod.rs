//! The Llama-family model: config, weights on disk, parameter layout, rope,
//! and the forward/backward written against the backend interface.

pub mod adapters;
pub mod config;
pub mod generate;
pub mod llama;
pub mod params;
pub mod policy;
pub mod pretrained;
pub mod rope;
pub mod weights;

pub use adapters::Adapter;
pub use config::ModelConfig;
pub use llama::{Batch, Llama, LossStats};
pub use params::{LoraConfig, TrainMode};
pub use policy::TokenOutputs;
