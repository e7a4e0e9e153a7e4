//! The CPU backend: f32 compute, GEMMs through the `gemm` crate on the global
//! rayon pool. One op per file, each with its naive reference and tests beside it.

/// The CPU backend. Buffers are `Vec<f32>`, views are slices.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;
