//! Rotary position embedding in place (rope.cu), forward and backward.

use super::elementwise::stride_cfg;
use super::{ptr_of, Cuda, CudaView, CudaViewMut};
use crate::backend::Result;
use crate::cpu::check::{expect_len, product, rows_of, shape_err};
use crate::KernelError;
use cudarc::driver::PushKernelArg;

/// In place on x[N, H, HD]: rotation by +angle (forward) or −angle
/// (`backward`). cos, sin: [P, HD/2]; positions: [N], each < P.
#[allow(clippy::too_many_arguments)]
#[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
pub(super) fn apply(
    cu: &Cuda,
    x: CudaViewMut<'_>,
    cos: CudaView<'_>,
    sin: CudaView<'_>,
    positions: &[u32],
    heads: usize,
    hd: usize,
    backward: bool,
) -> Result<()> {
    let op = if backward {
        "rope_backward"
    } else {
        "rope_forward"
    };
    // The CPU's validation, in its order.
    if hd == 0 || hd % 2 != 0 {
        return Err(shape_err(
            op,
            format!("head dim {hd} must be positive and even"),
        ));
    }
    let n = rows_of(op, "x", x.len, product(op, &[heads, hd])?)?;
    expect_len(op, "positions", positions.len(), n)?;
    let p = rows_of(op, "cos", cos.len, hd / 2)?;
    expect_len(op, "sin", sin.len, cos.len)?;
    if let Some(&pos) = positions.iter().find(|&&pos| pos as usize >= p) {
        return Err(KernelError::IndexOutOfRange {
            op,
            id: pos as u64,
            rows: p,
        });
    }
    let pairs = x.len / 2; // N·H·HD/2
    if pairs == 0 {
        return Ok(());
    }
    let pos_dev = cu.upload_ints(positions)?;
    let pos_ptr = ptr_of(&pos_dev, cu.stream());
    let (heads_arg, half_arg, pairs_arg) = (heads as i64, (hd / 2) as i64, pairs as i64);
    let sign: f32 = if backward { -1.0 } else { 1.0 };
    let f = cu.func("rope_apply")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&x.ptr)
        .arg(&x.dt)
        .arg(&cos.ptr)
        .arg(&cos.dt)
        .arg(&sin.ptr)
        .arg(&sin.dt)
        .arg(&pos_ptr)
        .arg(&heads_arg)
        .arg(&half_arg)
        .arg(&sign)
        .arg(&pairs_arg);
    // SAFETY: x holds N·H·HD elements, positions N entries each < P, cos and
    // sin P·HD/2 (checked above). Pair i < N·H·HD/2 reads and writes
    // x[(i / (HD/2))·HD + i % (HD/2)] and the element HD/2 after it (one
    // thread per pair, so no two threads touch the same element) and reads
    // cos/sin[positions[i / (H·HD/2)]·HD/2 + i % (HD/2)].
    unsafe { l.launch(stride_cfg(pairs)) }.map_err(|e| cu.driver_err(op, e))?;
    Ok(())
}
