//! Token embedding lookup and its scatter-add gradient (embedding.cu).
//! The gradient groups the rows by id on the host (ids are host data), so
//! each table row is written by one block and no float atomics are needed.

use super::elementwise::{grid_rows, launch_cfg, stride_cfg};
use super::{ptr_of, Cuda, CudaView, CudaViewMut};
use crate::backend::Result;
use crate::cpu::check::{expect_len, rows_of, shape_err};
use crate::KernelError;
use cudarc::driver::PushKernelArg;

/// Every id must address a row of a table with `rows` rows (as the CPU).
fn check_ids(op: &'static str, ids: &[u32], rows: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= rows) {
        Some(&id) => Err(KernelError::IndexOutOfRange {
            op,
            id: id as u64,
            rows,
        }),
        None => Ok(()),
    }
}

/// out[N,C] = table[ids[n], :]; table: [V,C].
pub(super) fn forward(
    cu: &Cuda,
    out: CudaViewMut<'_>,
    table: CudaView<'_>,
    ids: &[u32],
    c: usize,
) -> Result<()> {
    const OP: &str = "embedding_forward";
    let v = rows_of(OP, "table", table.len, c)?;
    let n = rows_of(OP, "out", out.len, c)?;
    expect_len(OP, "ids", ids.len(), n)?;
    check_ids(OP, ids, v)?;
    if n == 0 {
        return Ok(());
    }
    let ids_dev = cu.upload_ints(ids)?;
    let ids_ptr = ptr_of(&ids_dev, cu.stream());
    let (c_arg, total) = (c as i64, out.len as i64);
    let f = cu.func("embedding_forward")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&out.ptr)
        .arg(&out.dt)
        .arg(&table.ptr)
        .arg(&table.dt)
        .arg(&ids_ptr)
        .arg(&c_arg)
        .arg(&total);
    // SAFETY: out holds N·C elements, ids_dev N ids each < V (checked above),
    // table V·C elements; element i < N·C reads table[ids[i / C]·C + i % C].
    unsafe { l.launch(stride_cfg(out.len)) }.map_err(|e| cu.driver_err(OP, e))?;
    Ok(())
}

/// dtable[ids[n], :] += dout[n, :]; dtable: [V,C], dout: [N,C]. Rows sharing an
/// id are added in row order, as on the CPU.
pub(super) fn backward(
    cu: &Cuda,
    dtable: CudaViewMut<'_>,
    dout: CudaView<'_>,
    ids: &[u32],
    c: usize,
) -> Result<()> {
    const OP: &str = "embedding_backward";
    let v = rows_of(OP, "dtable", dtable.len, c)?;
    let n = rows_of(OP, "dout", dout.len, c)?;
    expect_len(OP, "ids", ids.len(), n)?;
    check_ids(OP, ids, v)?;
    if n == 0 {
        return Ok(());
    }
    if n > u32::MAX as usize {
        return Err(shape_err(OP, format!("{n} rows exceed u32 row indices")));
    }
    // Group the rows by id: `rows` lists the row indices sorted by id (a stable
    // sort, so ascending within an id); the distinct id uniq[u] owns
    // rows[offsets[u]..offsets[u+1]].
    let mut rows: Vec<u32> = (0..n as u32).collect(); // [N]
    rows.sort_by_key(|&r| ids[r as usize]);
    let mut uniq: Vec<u32> = Vec::new(); // [U]
    let mut offsets: Vec<u32> = Vec::new(); // [U + 1]
    for (k, &r) in rows.iter().enumerate() {
        let id = ids[r as usize];
        if uniq.last() != Some(&id) {
            uniq.push(id);
            offsets.push(k as u32);
        }
    }
    offsets.push(n as u32);
    let blocks = grid_rows(OP, uniq.len())?;

    let (uniq_dev, offsets_dev, rows_dev) = (
        cu.upload_ints(&uniq)?,
        cu.upload_ints(&offsets)?,
        cu.upload_ints(&rows)?,
    );
    let stream = cu.stream();
    let (uniq_ptr, offsets_ptr, rows_ptr) = (
        ptr_of(&uniq_dev, stream),
        ptr_of(&offsets_dev, stream),
        ptr_of(&rows_dev, stream),
    );
    let c_arg = c as i64;
    let threads = (c.min(256) as u32).div_ceil(32) * 32;
    let f = cu.func("embedding_backward")?;
    let mut l = stream.launch_builder(f);
    l.arg(&dtable.ptr)
        .arg(&dtable.dt)
        .arg(&dout.ptr)
        .arg(&dout.dt)
        .arg(&uniq_ptr)
        .arg(&offsets_ptr)
        .arg(&rows_ptr)
        .arg(&c_arg);
    // SAFETY: block u < U reads uniq[u] (< V, checked above), offsets[u] and
    // offsets[u+1] (U + 1 entries), rows[k] for k < N (each < N), dout rows
    // < N of C columns and writes dtable row uniq[u] only; distinct blocks own
    // distinct ids, so no two blocks write the same element.
    unsafe { l.launch(launch_cfg((blocks, 1, 1), (threads, 1, 1))) }
        .map_err(|e| cu.driver_err(OP, e))?;
    Ok(())
}
