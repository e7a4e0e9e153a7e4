//! Moving data: host ↔ device (converted on the host), device copies,
//! fill. Conversions between storage types run on the device (`convert`).

use super::{grid_for, Cuda, CudaView, CudaViewMut, Dtype};
use crate::backend::Result;
use crate::cpu::check::expect_len;
use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::{bf16, f16};

pub(super) fn download(cu: &Cuda, src: CudaView<'_>) -> Result<Vec<f32>> {
    let stream = cu.stream();
    let mut bytes = vec![0u8; src.len * src.dtype.size()];
    if !bytes.is_empty() {
        // SAFETY: `src` covers len·size bytes of a live allocation (views are
        // bounds-checked when made); the host buffer has exactly that size and
        // the stream is synchronised before it is read.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut bytes, src.ptr, stream.cu_stream())
        }
        .map_err(|e| cu.driver_err("download", e))?;
    }
    cu.synchronize()?;
    Ok(match src.dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::Bf16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    })
}

pub(super) fn write(cu: &Cuda, dst: CudaViewMut<'_>, host: &[f32]) -> Result<()> {
    expect_len("write", "host data", host.len(), dst.len)?;
    let bytes: Vec<u8> = match dst.dtype {
        Dtype::F32 => host.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::Bf16 => host
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::F16 => host
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
    };
    if bytes.is_empty() {
        return Ok(());
    }
    // SAFETY: `dst` covers exactly bytes.len() bytes of a live allocation.
    // The copy is asynchronous from pageable memory, which the driver stages
    // before returning, so dropping `bytes` afterwards is fine; we still
    // synchronise so the next host read of the source sees the copy done.
    unsafe { cudarc::driver::result::memcpy_htod_async(dst.ptr, &bytes, cu.stream().cu_stream()) }
        .map_err(|e| cu.driver_err("upload", e))?;
    cu.synchronize()
}

pub(super) fn copy(cu: &Cuda, dst: CudaViewMut<'_>, src: CudaView<'_>) -> Result<()> {
    expect_len("copy", "src", src.len, dst.len)?;
    if dst.len == 0 {
        return Ok(());
    }
    if dst.dtype == src.dtype {
        // SAFETY: both ranges are live and len·size bytes long; they come from
        // a shared and a mutable borrow, so they do not overlap.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                dst.ptr,
                src.ptr,
                dst.len * dst.dtype.size(),
                cu.stream().cu_stream(),
            )
        }
        .map_err(|e| cu.driver_err("copy", e))?;
        return Ok(());
    }
    convert(cu, dst, src)
}

/// dst = src in dst's storage type.
pub(crate) fn convert(cu: &Cuda, dst: CudaViewMut<'_>, src: CudaView<'_>) -> Result<()> {
    expect_len("convert", "src", src.len, dst.len)?;
    let n = dst.len as i64;
    let f = cu.func("convert")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&dst.ptr)
        .arg(&dst.dt)
        .arg(&src.ptr)
        .arg(&src.dt)
        .arg(&n);
    // SAFETY: both views are live ranges of n elements of their dtypes; the
    // kernel's grid-stride loop touches indices < n only.
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: (grid_for(dst.len, 256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(|e| cu.driver_err("convert", e))?;
    Ok(())
}

pub(super) fn fill(cu: &Cuda, dst: CudaViewMut<'_>, value: f32) -> Result<()> {
    let n = dst.len as i64;
    if n == 0 {
        return Ok(());
    }
    let f = cu.func("fill")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&dst.ptr).arg(&dst.dt).arg(&n).arg(&value);
    // SAFETY: `dst` is a live range of n elements; indices < n only.
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: (grid_for(dst.len, 256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(|e| cu.driver_err("fill", e))?;
    Ok(())
}
