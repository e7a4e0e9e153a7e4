//! SiLU-gated MLP activation, forward and backward (swiglu.cu).

use super::elementwise::stride_cfg;
use super::{Cuda, CudaView, CudaViewMut};
use crate::backend::Result;
use crate::cpu::check::expect_len;
use cudarc::driver::PushKernelArg;

/// out[N,F] = silu(gate) · up.
pub(super) fn forward(
    cu: &Cuda,
    out: CudaViewMut<'_>,
    gate: CudaView<'_>,
    up: CudaView<'_>,
) -> Result<()> {
    const OP: &str = "swiglu_forward";
    expect_len(OP, "gate", gate.len, out.len)?;
    expect_len(OP, "up", up.len, out.len)?;
    if out.len == 0 {
        return Ok(());
    }
    let n = out.len as i64;
    let f = cu.func("swiglu_forward")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&out.ptr)
        .arg(&out.dt)
        .arg(&gate.ptr)
        .arg(&gate.dt)
        .arg(&up.ptr)
        .arg(&up.dt)
        .arg(&n);
    // SAFETY: out, gate and up hold n elements each (checked above); the
    // grid-stride loop touches indices < n only.
    unsafe { l.launch(stride_cfg(out.len)) }.map_err(|e| cu.driver_err(OP, e))?;
    Ok(())
}

/// dgate += dout · up · silu'(gate); dup += dout · silu(gate).
pub(super) fn backward(
    cu: &Cuda,
    dgate: CudaViewMut<'_>,
    dup: CudaViewMut<'_>,
    dout: CudaView<'_>,
    gate: CudaView<'_>,
    up: CudaView<'_>,
) -> Result<()> {
    const OP: &str = "swiglu_backward";
    let n = dout.len;
    for (what, len) in [
        ("dgate", dgate.len),
        ("dup", dup.len),
        ("gate", gate.len),
        ("up", up.len),
    ] {
        expect_len(OP, what, len, n)?;
    }
    if n == 0 {
        return Ok(());
    }
    let n_arg = n as i64;
    let f = cu.func("swiglu_backward")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&dgate.ptr)
        .arg(&dgate.dt)
        .arg(&dup.ptr)
        .arg(&dup.dt)
        .arg(&dout.ptr)
        .arg(&dout.dt)
        .arg(&gate.ptr)
        .arg(&gate.dt)
        .arg(&up.ptr)
        .arg(&up.dt)
        .arg(&n_arg);
    // SAFETY: all five views hold n elements (checked above); dgate and dup
    // are distinct mutable borrows; indices < n only.
    unsafe { l.launch(stride_cfg(n)) }.map_err(|e| cu.driver_err(OP, e))?;
    Ok(())
}
