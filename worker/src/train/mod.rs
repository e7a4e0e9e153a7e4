//! Training: schedules, AdamW, the shared loop, checkpoints, metrics.

pub mod checkpoint;
pub mod loss_scale;
pub mod metrics;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use trainer::{
    collate, collate_keyed, evaluate, evaluate_sharded, train, train_dist, Dist, EvalResult,
    LogRecord, NoHooks, Sample, TrainArgs, TrainHooks, TrainSummary,
};
