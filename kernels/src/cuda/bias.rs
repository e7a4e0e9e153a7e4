//! Row-broadcast bias and its gradient (bias.cu), and the deterministic
//! column reduction that rmsnorm's dw shares: per-(chunk of rows, column)
//! partial sums in an f32 scratch, then one thread per column adding its
//! chunks in order. The chunking depends on the row count alone, so results
//! are the same on every run.

use super::elementwise::{launch_cfg, stride_cfg};
use super::{Cuda, CudaBuf, CudaView, CudaViewMut, Dtype};
use crate::backend::{Backend, Result};
use crate::cpu::check::{expect_len, rows_of};
use cudarc::driver::PushKernelArg;

/// Fewest rows one chunk of a column reduction sums.
const MIN_ROWS_PER_CHUNK: usize = 64;
/// Most chunks (the grid's y dimension).
const MAX_CHUNKS: usize = 65_535;

/// (rows per chunk, chunks) for a column reduction over `rows` rows.
pub(super) fn row_chunks(rows: usize) -> (usize, usize) {
    let per = MIN_ROWS_PER_CHUNK.max(rows.div_ceil(MAX_CHUNKS));
    (per, rows.div_ceil(per))
}

/// Launch shape of a stage-1 column reduction: one thread per column (blocks
/// of up to 256), grid (column blocks, chunks).
pub(super) fn partial_cfg(c: usize, chunks: usize) -> cudarc::driver::LaunchConfig {
    let threads = (c.min(256) as u32).div_ceil(32) * 32;
    let col_blocks = c.div_ceil(threads as usize) as u32;
    launch_cfg((col_blocks, chunks as u32, 1), (threads, 1, 1))
}

/// Stage 2: dst[C] += Σ_k partial[k, :] over the `chunks` rows of the f32
/// scratch `partial` ([chunks, C]), in chunk order.
pub(super) fn sum_partials(
    cu: &Cuda,
    op: &str,
    dst: &CudaViewMut<'_>,
    partial: &CudaBuf,
    chunks: usize,
    c: usize,
) -> Result<()> {
    assert!(dst.len == c && partial.len >= chunks * c && partial.dtype == Dtype::F32);
    let p = cu.view(partial, 0..chunks * c);
    let (chunks_arg, c_arg) = (chunks as i64, c as i64);
    let f = cu.func("bias_sum_partials")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&dst.ptr)
        .arg(&dst.dt)
        .arg(&p.ptr)
        .arg(&chunks_arg)
        .arg(&c_arg);
    // SAFETY: dst holds c elements of its dtype and p holds chunks·c f32s
    // (asserted above); thread `col` < c reads partial[k·c + col], k < chunks,
    // and writes dst[col] only.
    unsafe { l.launch(stride_cfg(c)) }.map_err(|e| cu.driver_err(op, e))?;
    Ok(())
}

/// x[N,C] += bias[C].
pub(super) fn add_bias(cu: &Cuda, x: CudaViewMut<'_>, bias: CudaView<'_>, c: usize) -> Result<()> {
    const OP: &str = "add_bias";
    rows_of(OP, "x", x.len, c)?;
    expect_len(OP, "bias", bias.len, c)?;
    if x.len == 0 {
        return Ok(());
    }
    let (c_arg, n) = (c as i64, x.len as i64);
    let f = cu.func("bias_add")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&x.ptr)
        .arg(&x.dt)
        .arg(&bias.ptr)
        .arg(&bias.dt)
        .arg(&c_arg)
        .arg(&n);
    // SAFETY: x holds n = N·C elements and bias C (checked above); the kernel
    // touches x[i], i < n, and reads bias[i % C].
    unsafe { l.launch(stride_cfg(x.len)) }.map_err(|e| cu.driver_err(OP, e))?;
    Ok(())
}

/// dbias[C] += Σ_n dout[n, :], deterministically (two stages, no atomics).
pub(super) fn bias_backward(
    cu: &Cuda,
    dbias: CudaViewMut<'_>,
    dout: CudaView<'_>,
    c: usize,
) -> Result<()> {
    const OP: &str = "bias_backward";
    let rows = rows_of(OP, "dout", dout.len, c)?;
    expect_len(OP, "dbias", dbias.len, c)?;
    if rows == 0 {
        return Ok(());
    }
    let (per, chunks) = row_chunks(rows);
    let partial = cu.alloc(chunks * c, Dtype::F32)?; // [chunks, C]
    let p = cu.view(&partial, 0..chunks * c);
    let (rows_arg, c_arg, per_arg) = (rows as i64, c as i64, per as i64);
    let f = cu.func("bias_backward_partial")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&p.ptr)
        .arg(&dout.ptr)
        .arg(&dout.dt)
        .arg(&rows_arg)
        .arg(&c_arg)
        .arg(&per_arg);
    // SAFETY: dout holds rows·C elements (checked above) and the scratch
    // chunks·C f32s; block (bx, chunk) reads rows < min((chunk+1)·per, rows)
    // of columns < C and writes partial[chunk, col] only, chunk < chunks.
    unsafe { l.launch(partial_cfg(c, chunks)) }.map_err(|e| cu.driver_err(OP, e))?;
    sum_partials(cu, OP, &dbias, &partial, chunks, c)
}
