//! Entropy of the softmax of each row of logits (softmax_entropy.cu): one
//! block per row, one online pass over the row, read only.

use super::elementwise::{grid_rows, launch_cfg};
use super::{Cuda, CudaView, Dtype};
use crate::backend::{Backend, Result};
use crate::cpu::check::rows_of;
use cudarc::driver::PushKernelArg;

/// Threads per row block (a multiple of 32, ≤ 1024), as for cross-entropy.
const ROW_BLOCK: u32 = 512;

/// H[n] = logsumexp(x_n) − Σ_j softmax(x_n)_j·x_n,j for each row of
/// `logits` [N,V]; returns [N].
pub(super) fn softmax_entropy(cu: &Cuda, logits: CudaView<'_>, v: usize) -> Result<Vec<f32>> {
    const OP: &str = "softmax_entropy";
    let n = rows_of(OP, "logits", logits.len, v)?;
    let blocks = grid_rows(OP, n)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let out = cu.alloc(n, Dtype::F32)?; // [N]
    let out_view = cu.view(&out, 0..n);
    let v_arg = v as i64;
    let f = cu.func("softmax_entropy_rows")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&logits.ptr)
        .arg(&logits.dt)
        .arg(&out_view.ptr)
        .arg(&v_arg);
    // SAFETY: logits hold N·V elements of type `dt` (checked above: V divides
    // the view's length) and `out` N f32s; block `row` < N only reads row
    // `row` of the logits and writes out[row] (thread 0 alone).
    unsafe { l.launch(launch_cfg((blocks, 1, 1), (ROW_BLOCK, 1, 1))) }
        .map_err(|e| cu.driver_err(OP, e))?;
    cu.download(out_view)
}
