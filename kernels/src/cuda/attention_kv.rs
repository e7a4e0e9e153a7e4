//! Attention of new queries over a key/value cache (attention_kv.cu): one
//! warp per query row, online softmax. Semantics and validation are the CPU
//! op's (`crate::cpu::attention_kv`).
//!
//! Limits: HD ≤ 256 (8 dims per lane); q, out and the caches share one
//! storage type.

use super::elementwise::{grid_rows, launch_cfg};
use super::{ptr_of, Cuda, CudaView, CudaViewMut};
use crate::backend::{KvAttnShape, Result};
use crate::cpu::check::shape_err;
use cudarc::driver::PushKernelArg;

const OP: &str = "attention_kv_forward";

/// Largest head dim: 32 lanes × `ATTN_KV_MAX_PER_LANE` in attention_kv.cu.
const MAX_HD: usize = 256;

/// out[B,TQ,NH,HD] from q[B,TQ,NH,HD] over k, v[B,CAP,NKV,HD], key_mask[B,START+TQ].
pub(super) fn forward(
    cu: &Cuda,
    out: CudaViewMut<'_>,
    q: CudaView<'_>,
    k: CudaView<'_>,
    v: CudaView<'_>,
    key_mask: &[u8],
    s: KvAttnShape,
) -> Result<()> {
    crate::cpu::attention_kv::check(s, out.len, q.len, k.len, v.len, key_mask.len())?;
    if s.hd > MAX_HD {
        return Err(shape_err(
            OP,
            format!(
                "head dim {} > {MAX_HD} is not supported by the CUDA kernel",
                s.hd
            ),
        ));
    }
    let dt = out.dtype;
    for (what, d) in [("q", q.dtype), ("k_cache", k.dtype), ("v_cache", v.dtype)] {
        if d != dt {
            return Err(shape_err(
                OP,
                format!(
                    "{what} is {} but out is {}: q, out and the caches must share one storage type",
                    d.name(),
                    dt.name()
                ),
            ));
        }
    }
    let rows = s.b * s.tq * s.nh;
    if rows == 0 {
        return Ok(());
    }
    let grid = grid_rows(OP, rows)?;
    let mask_dev = cu.upload_ints(key_mask)?;
    let mask_ptr = ptr_of(&mask_dev, cu.stream());
    let [tq, cap, start, nh, nkv, hd] = [s.tq, s.cap, s.start, s.nh, s.nkv, s.hd].map(|x| x as i64);
    let scale = 1.0 / (s.hd as f32).sqrt();
    let f = cu.func("attention_kv_forward")?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&out.ptr)
        .arg(&q.ptr)
        .arg(&k.ptr)
        .arg(&v.ptr)
        .arg(&out.dt)
        .arg(&mask_ptr)
        .arg(&tq)
        .arg(&cap)
        .arg(&start)
        .arg(&nh)
        .arg(&nkv)
        .arg(&hd)
        .arg(&scale);
    // SAFETY: the CPU check above proved out and q hold B·TQ·NH·HD elements,
    // k and v B·CAP·NKV·HD, the mask B·(START+TQ) bytes, START+TQ ≤ CAP and
    // NKV | NH; all views share one dtype (checked). Block `row` < B·TQ·NH
    // reads q/out[row·HD + d] for d < HD ≤ 256 (8 per lane of 32 threads),
    // k/v rows of batch row b at slots j ≤ START+i < CAP, mask[b·LEN + j]
    // with j < LEN, and writes only its own out row. `mask_dev` lives until
    // after the launch is queued and the stream orders its free.
    unsafe { l.launch(launch_cfg((grid, 1, 1), (32, 1, 1))) }.map_err(|e| cu.driver_err(OP, e))?;
    Ok(())
}
