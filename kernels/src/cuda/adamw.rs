//! One AdamW step on the device (adamw.cu), torch.optim.AdamW semantics; the
//! bias corrections are computed here in f64 exactly as the CPU does.

use super::elementwise::stride_cfg;
use super::{Cuda, CudaView, CudaViewMut, Dtype};
use crate::backend::{AdamW, Result};
use crate::cpu::check::{expect_len, shape_err};
use cudarc::driver::PushKernelArg;

/// Updates params, m and v in place; all four are f32 buffers of equal length.
pub(super) fn adamw(
    cu: &Cuda,
    params: CudaViewMut<'_>,
    grads: CudaView<'_>,
    m: CudaViewMut<'_>,
    v: CudaViewMut<'_>,
    h: AdamW,
) -> Result<()> {
    const OP: &str = "adamw";
    let n = params.len;
    for (what, len) in [("grads", grads.len), ("m", m.len), ("v", v.len)] {
        expect_len(OP, what, len, n)?;
    }
    if h.step == 0 {
        return Err(shape_err(
            OP,
            "step counts from 1 (step 0 has no bias correction)",
        ));
    }
    for (what, dtype) in [
        ("params", params.dtype),
        ("grads", grads.dtype),
        ("m", m.dtype),
        ("v", v.dtype),
    ] {
        if dtype != Dtype::F32 {
            return Err(shape_err(
                OP,
                format!("{what} must be stored in f32, not {}", dtype.name()),
            ));
        }
    }
    if n == 0 {
        return Ok(());
    }
    // The CPU's host-side terms, bit for bit.
    let step = h.step.min(i32::MAX as u64) as i32; // β^step is 0 long before this cap
    let bc1 = 1.0 - (h.beta1 as f64).powi(step);
    let bc2 = 1.0 - (h.beta2 as f64).powi(step);
    let step_size = (h.lr as f64 / bc1) as f32;
    let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
    let decay = 1.0 - h.lr * h.weight_decay;
    let (b1, b2, eps) = (h.beta1, h.beta2, h.eps);
    let n_arg = n as i64;
    let f = cu.func("adamw_step")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&params.ptr)
        .arg(&grads.ptr)
        .arg(&m.ptr)
        .arg(&v.ptr)
        .arg(&b1)
        .arg(&b2)
        .arg(&eps)
        .arg(&decay)
        .arg(&step_size)
        .arg(&inv_sqrt_bc2)
        .arg(&n_arg);
    // SAFETY: the four views hold n f32s each (lengths and dtypes checked
    // above); params, m and v are distinct mutable borrows; indices < n only.
    unsafe { l.launch(stride_cfg(n)) }.map_err(|e| cu.driver_err(OP, e))?;
    Ok(())
}
