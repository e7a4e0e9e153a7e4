//! End-to-end tests: the real `rlhf` binary on real files.
//!
//! Every test works in its own temp dir with its own tiny model (making one
//! takes a few milliseconds), so tests run in parallel and share no state.

mod chat;
mod cuda_emu;
mod distributed;
mod dpo;
mod errors;
mod eval;
mod generate;
mod grpo;
mod init_model;
mod launch;
mod merge;
mod ppo;
mod pt;
mod resume;
mod rm;
mod sft;

use rlhf_tests::{corpus_text, Rlhf, Workspace};
use std::path::PathBuf;

/// The binary under test (only this test target knows its path).
pub fn rlhf() -> Rlhf {
    Rlhf::new(env!("CARGO_BIN_EXE_rlhf"))
}

/// The MedicalGPT sample PT data (English + Chinese), from `../shared`.
pub fn medicalgpt_pretrain() -> PathBuf {
    rlhf_tests::medicalgpt_pretrain_dir(env!("CARGO_MANIFEST_DIR"))
}

/// A workspace with `data/train.txt` (300 synthetic documents), and a tiny
/// model at `model/` whose tokenizer was trained on it.
pub struct Setup {
    pub ws: Workspace,
    pub model: PathBuf,
    pub data: PathBuf,
}

pub fn setup() -> Setup {
    let ws = Workspace::new();
    let corpus = ws.write("data/train.txt", corpus_text(300, 1));
    let model = ws.path("model");
    rlhf().init_tiny_model(&corpus, &model);
    Setup {
        data: ws.path("data"),
        model,
        ws,
    }
}
