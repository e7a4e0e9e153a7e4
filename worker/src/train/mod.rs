//! Training: schedules, AdamW, the shared loop, checkpoints, metrics.

pub mod checkpoint;
pub mod metrics;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use trainer::{collate, evaluate, train, EvalResult, Sample, TrainArgs, TrainSummary};
