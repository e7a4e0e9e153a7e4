//! The coordinator: registers workers, shards datasets and drives the stage
//! pipeline. Built out by the coordinator issue; for now it only re-exports the
//! protocol so the workspace layout is final.

pub use rlhf_proto::v1 as proto;
