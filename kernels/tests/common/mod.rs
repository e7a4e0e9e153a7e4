//! Shared by the CUDA op tests (kernels/tests/cuda_*.rs): each test runs a
//! CUDA op and the CPU op (the reference) on the same fresh random inputs and
//! compares. The tests are `#[ignore]`d (cargo test lists them as ignored,
//! "needs a CUDA GPU"); scripts/gpu-check.sh runs them with
//! `--include-ignored` and RLHF_REQUIRE_GPU=1, under which a missing GPU is a
//! failure. Run by hand without a GPU, they print SKIPPED and pass.
#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rlhf_kernels::cuda::{Cuda, CudaBuf, Dtype};
use rlhf_kernels::{Backend, Precision};

/// The compute dtypes under test with their tolerance on the relative error
/// ‖got − want‖₂ / ‖want‖₂: bf16 ≤ 1e-2, fp16 ≤ 5e-3 (f32 ≤ 1e-5).
pub const CASES: [(Dtype, f64); 3] = [(Dtype::Bf16, 1e-2), (Dtype::F16, 5e-3), (Dtype::F32, 1e-5)];

/// One backend per compute dtype, or none (SKIPPED) without a usable GPU.
pub fn backends(test: &str) -> Vec<(Cuda, f64)> {
    let mut out = Vec::new();
    for (dtype, tol) in CASES {
        match Cuda::new(0, dtype) {
            Ok(cu) => out.push((cu, tol)),
            Err(e) => {
                if std::env::var_os("RLHF_REQUIRE_GPU").is_some() {
                    panic!("RLHF_REQUIRE_GPU is set but CUDA is unusable: {e}");
                }
                eprintln!("SKIPPED {test}: no usable GPU ({e})");
                return Vec::new();
            }
        }
    }
    out
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform in [-scale, scale), fresh for every seed.
pub fn random(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// `x` rounded to what a buffer of `p` holds on `cu` (so the CPU reference
/// sees the same inputs as the kernel).
pub fn rounded(cu: &Cuda, p: Precision, x: &[f32]) -> Vec<f32> {
    let dtype = match p {
        Precision::F32 => Dtype::F32,
        Precision::Compute => cu.dtype(),
    };
    x.iter()
        .map(|&v| match dtype {
            Dtype::F32 => v,
            Dtype::Bf16 => half::bf16::from_f32(v).to_f32(),
            Dtype::F16 => half::f16::from_f32(v).to_f32(),
        })
        .collect()
}

/// An output buffer filled with NaN, so a kernel that leaves any element
/// unwritten fails the comparison.
pub fn poisoned(cu: &Cuda, n: usize, p: Precision) -> CudaBuf {
    cu.upload(&vec![f32::NAN; n], p).expect("upload")
}

/// A buffer holding `x` (for outputs that are accumulated into).
pub fn upload(cu: &Cuda, x: &[f32], p: Precision) -> CudaBuf {
    cu.upload(x, p).expect("upload")
}

pub fn download(cu: &Cuda, b: &CudaBuf) -> Vec<f32> {
    cu.download(cu.view(b, 0..cu.len(b))).expect("download")
}

/// ‖got − want‖₂ / max(‖want‖₂, tiny); panics on any NaN or infinity in `got`.
pub fn rel_err(what: &str, got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}[{i}] = {g} (want {w})");
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    num.sqrt() / den.sqrt().max(1e-30)
}

/// Asserts rel_err ≤ tol and prints the figure (gpu-check's log keeps it).
#[track_caller]
pub fn assert_rel(what: &str, cu: &Cuda, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(what, got, want);
    eprintln!(
        "{what} [{}]: rel err {e:.2e} (tol {tol:.0e})",
        cu.dtype().name()
    );
    assert!(
        e <= tol,
        "{what} [{}]: rel err {e:.3e} > {tol:.0e}",
        cu.dtype().name()
    );
}
