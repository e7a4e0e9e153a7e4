//! The coordinator: registers workers, watches their heartbeats, places the
//! pipeline's stages on them as numbered generations, and keeps a journal so
//! that a restarted coordinator resumes where it stopped.
//!
//! Start one with [`start`] (or `rlhf coordinator`, [`run_coordinator`]);
//! ask one what it does with `rlhf status` ([`run_status`]).

pub mod cli;
mod http;
mod journal;
pub mod pipeline;
mod rollouts;
mod server;
mod state;

pub use cli::{
    fetch_status, render_status, run_coordinator, run_status, CoordinatorArgs, StatusArgs,
};
pub use rlhf_proto::v1 as proto;
pub use server::{
    start, CoordinatorConfig, PipelineOutcome, RunningCoordinator, Stopper, DEFAULT_LISTEN,
};
pub use state::VERSION;
