//! Asking for CUDA where there is none is a clear error, never a panic
//! (cudarc panics when a library is missing; the loader checks first).

use rlhf_kernels::cuda::{loader, Cuda, Dtype};
use rlhf_kernels::KernelError;

#[test]
fn no_driver_is_a_typed_error_naming_the_library() {
    if loader::require(loader::DRIVER).is_ok() {
        eprintln!(
            "SKIPPED no_driver_is_a_typed_error_naming_the_library: this machine has a CUDA driver"
        );
        return;
    }
    let err = Cuda::new(0, Dtype::Bf16).expect_err("no driver here");
    assert!(matches!(err, KernelError::Unavailable(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("libcuda.so.1") && msg.contains("RLHF_CUDA_LIB_DIRS"),
        "{msg}"
    );
}
