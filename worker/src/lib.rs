//! The worker: the Llama-family model written once against the backend
//! interface, LoRA, data formats, training stages, optimizer, checkpoints.

pub mod agent;
pub mod collective;
pub mod data;
pub mod demo;
pub mod fsutil;
pub mod init_model;
pub mod merge;
pub mod model;
pub mod rl;
pub mod stages;
pub mod tokenizer;
pub mod train;
