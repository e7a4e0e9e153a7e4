//! Fused softmax cross-entropy (cross_entropy.cu): one block per row, the
//! loss from one online pass over the row, and with per-row `grad_scales`
//! the gradient written over the logits in place.

use super::elementwise::{grid_rows, launch_cfg};
use super::{ptr_of, Cuda, CudaViewMut, Dtype};
use crate::backend::{Backend, Result};
use crate::cpu::cross_entropy::check_inputs;
use cudarc::driver::PushKernelArg;

/// Threads per row block (a multiple of 32, ≤ 1024).
const ROW_BLOCK: u32 = 512;

/// Per-row loss −log softmax(logits)[target] (0 for ignored rows); with
/// `grad_scales` = Some(s) (s: [N]), row n of the logits becomes
/// s[n]·(softmax − onehot(target[n])) (zero rows for ignored targets).
pub(super) fn cross_entropy(
    cu: &Cuda,
    logits: CudaViewMut<'_>,
    targets: &[i32],
    v: usize,
    grad_scales: Option<&[f32]>,
) -> Result<Vec<f32>> {
    const OP: &str = "cross_entropy";
    // The CPU op's checks: the same inputs are rejected on both backends.
    let n = check_inputs(logits.len, targets, v, grad_scales)?;
    let blocks = grid_rows(OP, n)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let targets_dev = cu.upload_ints(targets)?; // [N]
    let targets_ptr = ptr_of(&targets_dev, cu.stream());
    // [N] f32 scales, or a null pointer: no gradient.
    let scales_dev = grad_scales.map(|s| cu.upload_ints(s)).transpose()?;
    let scales_ptr: u64 = scales_dev.as_ref().map_or(0, |s| ptr_of(s, cu.stream()));
    let loss = cu.alloc(n, Dtype::F32)?; // [N]
    let loss_view = cu.view(&loss, 0..n);
    let v_arg = v as i64;
    let f = cu.func("cross_entropy_rows")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&logits.ptr)
        .arg(&logits.dt)
        .arg(&targets_ptr)
        .arg(&loss_view.ptr)
        .arg(&v_arg)
        .arg(&scales_ptr);
    // SAFETY: logits hold N·V elements, targets_dev N targets each −100 or in
    // [0, V), scales_dev (when present; else the pointer is null and the
    // kernel neither reads it nor writes the logits) N f32s, `loss` N f32s —
    // all checked above, and targets_dev/scales_dev live until after the
    // launch is enqueued and the download below synchronises. Block `row` < N
    // reads scales[row], targets[row], touches row `row` of the logits (each
    // element read and written by one thread, the writes after every read of
    // the row) and loss[row] only.
    unsafe { l.launch(launch_cfg((blocks, 1, 1), (ROW_BLOCK, 1, 1))) }
        .map_err(|e| cu.driver_err(OP, e))?;
    cu.download(loss_view)
}
