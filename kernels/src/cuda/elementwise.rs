//! axpy, scale and the sum of squares over flat buffers (elementwise.cu),
//! plus the small launch helpers the other op files of this backend share.

use super::{grid_for, Cuda, CudaView, CudaViewMut};
use crate::backend::Result;
use crate::cpu::check::{expect_len, shape_err};
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Threads per block of the grid-stride elementwise kernels.
pub(super) const BLOCK: u32 = 256;

/// Blocks of `sum_squares`: at most this many partial sums.
const SUM_SQUARES_MAX_BLOCKS: usize = 1024;

/// A launch of `grid` × `block` threads without dynamic shared memory.
pub(super) fn launch_cfg(grid: (u32, u32, u32), block: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: block,
        shared_mem_bytes: 0,
    }
}

/// A 1-D grid-stride launch over `n` elements.
pub(super) fn stride_cfg(n: usize) -> LaunchConfig {
    launch_cfg((grid_for(n, BLOCK), 1, 1), (BLOCK, 1, 1))
}

/// `rows` as a grid x dimension (one block per row): at most 2³¹ − 1.
pub(super) fn grid_rows(op: &'static str, rows: usize) -> Result<u32> {
    if rows > i32::MAX as usize {
        return Err(shape_err(
            op,
            format!("{rows} rows exceed the {} blocks of one launch", i32::MAX),
        ));
    }
    Ok(rows as u32)
}

/// y += alpha · x.
pub(super) fn axpy(cu: &Cuda, y: CudaViewMut<'_>, alpha: f32, x: CudaView<'_>) -> Result<()> {
    expect_len("axpy", "x", x.len, y.len)?;
    if y.len == 0 {
        return Ok(());
    }
    let n = y.len as i64;
    let f = cu.func("elementwise_axpy")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&y.ptr)
        .arg(&y.dt)
        .arg(&alpha)
        .arg(&x.ptr)
        .arg(&x.dt)
        .arg(&n);
    // SAFETY: y and x are live ranges of n elements of their dtypes (lengths
    // checked above); the grid-stride loop touches indices < n only.
    unsafe { l.launch(stride_cfg(y.len)) }.map_err(|e| cu.driver_err("axpy", e))?;
    Ok(())
}

/// x *= s.
pub(super) fn scale(cu: &Cuda, x: CudaViewMut<'_>, s: f32) -> Result<()> {
    if x.len == 0 {
        return Ok(());
    }
    let n = x.len as i64;
    let f = cu.func("elementwise_scale")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&x.ptr).arg(&x.dt).arg(&s).arg(&n);
    // SAFETY: x is a live range of n elements; indices < n only.
    unsafe { l.launch(stride_cfg(x.len)) }.map_err(|e| cu.driver_err("scale", e))?;
    Ok(())
}

/// Σ x², in f64: a fixed grid (chosen from the length alone) writes one f64
/// partial per block, and the partials are added here in block order, so the
/// result is the same on every run. NaN and inf propagate.
pub(super) fn sum_squares(cu: &Cuda, x: CudaView<'_>) -> Result<f64> {
    if x.len == 0 {
        return Ok(0.0);
    }
    let blocks = x
        .len
        .div_ceil(BLOCK as usize * 16)
        .clamp(1, SUM_SQUARES_MAX_BLOCKS);
    let stream = cu.stream();
    let partial = stream
        .alloc_zeros::<f64>(blocks)
        .map_err(|e| cu.driver_err("sum_squares: allocating", e))?;
    let partial_ptr = super::ptr_of(&partial, stream);
    let n = x.len as i64;
    let f = cu.func("elementwise_sum_squares")?;
    let mut l = stream.launch_builder(f);
    l.arg(&partial_ptr).arg(&x.ptr).arg(&x.dt).arg(&n);
    // SAFETY: x is a live range of n elements (indices < n only); `partial`
    // holds `blocks` f64s and block b writes partial[b] only, b < blocks.
    unsafe { l.launch(launch_cfg((blocks as u32, 1, 1), (BLOCK, 1, 1))) }
        .map_err(|e| cu.driver_err("sum_squares", e))?;
    let host = stream
        .clone_dtoh(&partial)
        .map_err(|e| cu.driver_err("sum_squares: download", e))?;
    cu.synchronize()?;
    Ok(host.iter().sum())
}
