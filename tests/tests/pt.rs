//! `rlhf pt`, `rlhf eval`, `rlhf init-model` end to end.
