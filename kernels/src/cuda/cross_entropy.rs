//! Fused softmax cross-entropy (cross_entropy.cu): one block per row, the
//! loss from one online pass over the row, and with `grad_scale` the
//! gradient written over the logits in place.

use super::elementwise::{grid_rows, launch_cfg};
use super::{ptr_of, Cuda, CudaViewMut, Dtype};
use crate::backend::{Backend, Result};
use crate::cpu::check::{expect_len, rows_of, shape_err};
use crate::KernelError;
use cudarc::driver::PushKernelArg;

/// The target that marks a row as ignored (PyTorch's `ignore_index`).
const IGNORE: i32 = -100;

/// Threads per row block (a multiple of 32, ≤ 1024).
const ROW_BLOCK: u32 = 512;

/// Per-row loss −log softmax(logits)[target] (0 for ignored rows); with
/// `grad_scale` = Some(s), logits become s·(softmax − onehot(target)) (zero
/// rows for ignored targets).
pub(super) fn cross_entropy(
    cu: &Cuda,
    logits: CudaViewMut<'_>,
    targets: &[i32],
    v: usize,
    grad_scale: Option<f32>,
) -> Result<Vec<f32>> {
    const OP: &str = "cross_entropy";
    let n = rows_of(OP, "logits", logits.len, v)?;
    expect_len(OP, "targets", targets.len(), n)?;
    for (row, &t) in targets.iter().enumerate() {
        if t == IGNORE {
            continue;
        }
        if t < 0 {
            return Err(shape_err(
                OP,
                format!("target {t} at row {row} is negative and not {IGNORE}"),
            ));
        }
        if t as usize >= v {
            return Err(KernelError::IndexOutOfRange {
                op: OP,
                id: t as u64,
                rows: v,
            });
        }
    }
    let blocks = grid_rows(OP, n)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let targets_dev = cu.upload_ints(targets)?;
    let targets_ptr = ptr_of(&targets_dev, cu.stream());
    let loss = cu.alloc(n, Dtype::F32)?; // [N]
    let loss_view = cu.view(&loss, 0..n);
    let v_arg = v as i64;
    let write_grad: i32 = grad_scale.is_some().into();
    let scale = grad_scale.unwrap_or(0.0);
    let f = cu.func("cross_entropy_rows")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&logits.ptr)
        .arg(&logits.dt)
        .arg(&targets_ptr)
        .arg(&loss_view.ptr)
        .arg(&v_arg)
        .arg(&write_grad)
        .arg(&scale);
    // SAFETY: logits hold N·V elements, targets_dev N targets each −100 or in
    // [0, V) (checked above), `loss` N f32s; block `row` < N touches row `row`
    // of the logits (each element read and written by one thread, the writes
    // after every read of the row) and loss[row] only.
    unsafe { l.launch(launch_cfg((blocks, 1, 1), (ROW_BLOCK, 1, 1))) }
        .map_err(|e| cu.driver_err(OP, e))?;
    cu.download(loss_view)
}
