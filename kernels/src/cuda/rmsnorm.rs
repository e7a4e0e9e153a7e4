//! RMSNorm forward and backward (rmsnorm.cu): one block per row for out,
//! rstd and dx; dw through the deterministic two-stage column reduction of
//! bias.rs. rstd is always stored in f32.

use super::bias::{partial_cfg, row_chunks, sum_partials};
use super::elementwise::{grid_rows, launch_cfg};
use super::{Cuda, CudaView, CudaViewMut, Dtype};
use crate::backend::{Backend, Result};
use crate::cpu::check::{expect_len, rows_of, shape_err};
use cudarc::driver::PushKernelArg;

/// Threads per row block (a multiple of 32).
const ROW_BLOCK: u32 = 256;

fn expect_f32(op: &'static str, what: &str, dtype: Dtype) -> Result<()> {
    if dtype == Dtype::F32 {
        Ok(())
    } else {
        Err(shape_err(
            op,
            format!("{what} must be stored in f32, not {}", dtype.name()),
        ))
    }
}

/// out[N,C], rstd[N] (f32); x[N,C], w[C].
pub(super) fn forward(
    cu: &Cuda,
    out: CudaViewMut<'_>,
    rstd: CudaViewMut<'_>,
    x: CudaView<'_>,
    w: CudaView<'_>,
    c: usize,
    eps: f32,
) -> Result<()> {
    const OP: &str = "rmsnorm_forward";
    let n = rows_of(OP, "x", x.len, c)?;
    expect_len(OP, "out", out.len, x.len)?;
    expect_len(OP, "rstd", rstd.len, n)?;
    expect_len(OP, "w", w.len, c)?;
    expect_f32(OP, "rstd", rstd.dtype)?;
    let blocks = grid_rows(OP, n)?;
    if n == 0 {
        return Ok(());
    }
    let c_arg = c as i64;
    let f = cu.func("rmsnorm_forward")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&out.ptr)
        .arg(&out.dt)
        .arg(&rstd.ptr)
        .arg(&x.ptr)
        .arg(&x.dt)
        .arg(&w.ptr)
        .arg(&w.dt)
        .arg(&c_arg)
        .arg(&eps);
    // SAFETY: x and out hold N·C elements, rstd N f32s, w C (checked above);
    // block `row` < N touches row `row` of x/out, rstd[row] and w[..C].
    unsafe { l.launch(launch_cfg((blocks, 1, 1), (ROW_BLOCK, 1, 1))) }
        .map_err(|e| cu.driver_err(OP, e))?;
    Ok(())
}

/// dx[N,C] += ..., dw[C] += ... (dw None for a frozen weight); rstd[N] f32.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    cu: &Cuda,
    dx: CudaViewMut<'_>,
    dw: Option<CudaViewMut<'_>>,
    dout: CudaView<'_>,
    x: CudaView<'_>,
    w: CudaView<'_>,
    rstd: CudaView<'_>,
    c: usize,
) -> Result<()> {
    const OP: &str = "rmsnorm_backward";
    let n = rows_of(OP, "x", x.len, c)?;
    expect_len(OP, "dx", dx.len, x.len)?;
    expect_len(OP, "dout", dout.len, x.len)?;
    expect_len(OP, "rstd", rstd.len, n)?;
    expect_len(OP, "w", w.len, c)?;
    if let Some(dw) = &dw {
        expect_len(OP, "dw", dw.len, c)?;
    }
    expect_f32(OP, "rstd", rstd.dtype)?;
    let blocks = grid_rows(OP, n)?;
    if n == 0 {
        return Ok(());
    }
    let c_arg = c as i64;
    {
        let f = cu.func("rmsnorm_backward_dx")?;
        let mut l = cu.stream().launch_builder(f);
        l.arg(&dx.ptr)
            .arg(&dx.dt)
            .arg(&dout.ptr)
            .arg(&dout.dt)
            .arg(&x.ptr)
            .arg(&x.dt)
            .arg(&w.ptr)
            .arg(&w.dt)
            .arg(&rstd.ptr)
            .arg(&c_arg);
        // SAFETY: dx, dout and x hold N·C elements, w C, rstd N f32s (checked
        // above); block `row` < N touches row `row` only (dx read then written
        // by the same thread).
        unsafe { l.launch(launch_cfg((blocks, 1, 1), (ROW_BLOCK, 1, 1))) }
            .map_err(|e| cu.driver_err(OP, e))?;
    }
    let Some(dw) = dw else {
        return Ok(());
    };
    let (per, chunks) = row_chunks(n);
    let partial = cu.alloc(chunks * c, Dtype::F32)?; // [chunks, C]
    let p = cu.view(&partial, 0..chunks * c);
    let (rows_arg, per_arg) = (n as i64, per as i64);
    let f = cu.func("rmsnorm_backward_dw_partial")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&p.ptr)
        .arg(&dout.ptr)
        .arg(&dout.dt)
        .arg(&x.ptr)
        .arg(&x.dt)
        .arg(&rstd.ptr)
        .arg(&rows_arg)
        .arg(&c_arg)
        .arg(&per_arg);
    // SAFETY: dout and x hold N·C elements, rstd N f32s, the scratch chunks·C
    // f32s; block (bx, chunk) reads rows < min((chunk+1)·per, N) of columns
    // < C and writes partial[chunk, col] only, chunk < chunks.
    unsafe { l.launch(partial_cfg(c, chunks)) }.map_err(|e| cu.driver_err(OP, e))?;
    sum_partials(cu, OP, &dw, &partial, chunks, c)
}
