//! Inverted dropout with the backend-independent counter-based mask
//! (dropout.cu): the same keep/drop decisions as the CPU, bit for bit.

use super::elementwise::stride_cfg;
use super::{Cuda, CudaView, CudaViewMut};
use crate::backend::{dropout_threshold, Result};
use crate::cpu::check::{expect_len, shape_err};
use cudarc::driver::PushKernelArg;

/// 1/(1−p), or a Shape error for p outside [0, 1] (NaN included), as the CPU.
fn check_p(op: &'static str, p: f32) -> Result<f32> {
    if !(0.0..=1.0).contains(&p) {
        return Err(shape_err(
            op,
            format!("drop probability {p} is outside [0, 1]"),
        ));
    }
    Ok(1.0 / (1.0 - p))
}

/// out = x · keep / (1−p).
pub(super) fn forward(
    cu: &Cuda,
    out: CudaViewMut<'_>,
    x: CudaView<'_>,
    p: f32,
    seed: u64,
) -> Result<()> {
    const OP: &str = "dropout_forward";
    expect_len(OP, "x", x.len, out.len)?;
    let inv_keep = check_p(OP, p)?;
    if out.len == 0 {
        return Ok(());
    }
    let threshold = dropout_threshold(p);
    let n = out.len as i64;
    let f = cu.func("dropout_forward")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&out.ptr)
        .arg(&out.dt)
        .arg(&x.ptr)
        .arg(&x.dt)
        .arg(&seed)
        .arg(&threshold)
        .arg(&inv_keep)
        .arg(&n);
    // SAFETY: out and x hold n elements each (checked above); indices < n only.
    unsafe { l.launch(stride_cfg(out.len)) }.map_err(|e| cu.driver_err(OP, e))?;
    Ok(())
}

/// dx += dout · keep / (1−p), with the mask regenerated from `seed`.
pub(super) fn backward(
    cu: &Cuda,
    dx: CudaViewMut<'_>,
    dout: CudaView<'_>,
    p: f32,
    seed: u64,
) -> Result<()> {
    const OP: &str = "dropout_backward";
    expect_len(OP, "dout", dout.len, dx.len)?;
    let inv_keep = check_p(OP, p)?;
    if dx.len == 0 {
        return Ok(());
    }
    let threshold = dropout_threshold(p);
    let n = dx.len as i64;
    let f = cu.func("dropout_backward")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&dx.ptr)
        .arg(&dx.dt)
        .arg(&dout.ptr)
        .arg(&dout.dt)
        .arg(&seed)
        .arg(&threshold)
        .arg(&inv_keep)
        .arg(&n);
    // SAFETY: dx and dout hold n elements each (checked above); indices < n only.
    unsafe { l.launch(stride_cfg(dx.len)) }.map_err(|e| cu.driver_err(OP, e))?;
    Ok(())
}
