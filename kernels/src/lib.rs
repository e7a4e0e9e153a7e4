//! Kernels: the backend interface the model is written against, and its
//! backends: `cpu` (always available) and `cuda` (CUDA libraries opened at run
//! time). `emu` builds the CPU emulator of the CUDA kernels and fake CUDA
//! libraries over it, for tests on machines without a GPU.

pub mod backend;
pub mod cpu;
pub mod cuda;
#[doc(hidden)]
#[path = "../emu/fake/mod.rs"]
pub mod emu;
pub mod lora;

pub use backend::{AdamW, AttnShape, Backend, Gemm, LoraDropout, LoraShape, Precision};
pub use cpu::Cpu;

/// Errors a kernel can report. Shape mistakes are caller bugs, but they are
/// reported (not panicked) so a bad checkpoint can never crash a worker.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("{op}: id {id} out of range for a table of {rows} rows")]
    IndexOutOfRange {
        op: &'static str,
        id: u64,
        rows: usize,
    },
    #[error("backend unavailable: {0}")]
    Unavailable(String),
}
