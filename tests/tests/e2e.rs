//! End-to-end tests: the real `rlhf` binary on real files.

mod pt;
