//! The coordinator: registers workers, shards datasets and drives the stage
//! pipeline.

pub mod pipeline;

pub use rlhf_proto::v1 as proto;
