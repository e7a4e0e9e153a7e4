//! Causal grouped-query attention on CUDA: launchers for the flash-attention
//! style kernels of attention.cu (design, tiles and tensor-core use are
//! described there). Semantics are the CPU op's (`crate::cpu::attention`).
//!
//! Limits: 1 ≤ HD ≤ 128; B, NH and NKV ≤ 65 535 (grid dimensions);
//! q, k, v, out, dout, dq, dk, dv share one storage type (the kernels are
//! instantiated per type), lse is f32.

use super::{Cuda, CudaView, CudaViewMut, Dtype};
use crate::backend::{AttnShape, Backend, Result};
use crate::cpu::check::{expect_len, product, shape_err};
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Largest head dimension the kernels' tiles hold.
const MAX_HD: usize = 128;

/// Largest grid y / z dimension (heads, batch).
const MAX_GRID_YZ: usize = 65_535;

/// Tile sizes of `AttnCfg<T>` in attention.cu (keep in sync): the dynamic
/// shared memory of a launch is computed from them, and the kernels check
/// (and trap) that they got at least their layout's size.
#[derive(Clone, Copy)]
struct Tiles {
    /// Row padding of storage-type tiles, in elements (16 bytes).
    pad: usize,
    /// Warps of a forward block; it owns 16 query rows per warp.
    fwd_warps: usize,
    /// Keys per forward tile.
    fwd_bk: usize,
    /// Query rows and keys per backward tile.
    bwd_b: usize,
}

/// Warps of a backward tile block (`AttnCfg::BWD_WARPS`).
const BWD_WARPS: usize = 4;

impl Tiles {
    fn of(dt: Dtype) -> Tiles {
        let wide = dt == Dtype::F32;
        Tiles {
            pad: 16 / dt.size(),
            fwd_warps: if wide { 2 } else { 4 },
            fwd_bk: if wide { 16 } else { 32 },
            bwd_b: if wide { 16 } else { 32 },
        }
    }
    fn fwd_bq(self) -> usize {
        16 * self.fwd_warps
    }
    /// `ldk`: row length of the Q/K/V/dO tiles (HD padded to 16, plus `pad`).
    fn ldk(self, hd: usize) -> usize {
        hd.div_ceil(16) * 16 + self.pad
    }
    /// `attn_fwd_smem_bytes<T>`: Q, K, V and P tiles, the key flags.
    fn fwd_smem(self, dt: Dtype, hd: usize) -> usize {
        let (bq, bk) = (self.fwd_bq(), self.fwd_bk);
        ((bq + 2 * bk) * self.ldk(hd) + bq * (bk + self.pad)) * dt.size() + bk * 4
    }
    /// `attn_bwd_smem_bytes<T>`: Q, dO, K, V, P and dS tiles, lse, D and
    /// the key flags.
    fn bwd_smem(self, dt: Dtype, hd: usize) -> usize {
        let bb = self.bwd_b;
        (4 * self.ldk(hd) + 2 * (bb + self.pad)) * bb * dt.size() + 3 * bb * 4
    }
}

/// Validated dimensions, as the kernels take them.
struct Dims {
    b: usize,
    t: usize,
    seq: i32,
    nh: i32,
    nkv: i32,
    hd: i32,
    scale: f32,
    dt: Dtype,
    /// 16-byte tile loads allowed (see `check`).
    vec: i32,
    /// Elements of lse (B·NH·T).
    lse_len: usize,
}

/// Checks head counts, limits, lengths and storage types. `q_like`:
/// `[B,T,NH,HD]` tensors, `kv_like`: `[B,T,NKV,HD]`; all of one storage type.
/// `loaded`: the device pointers the kernels read in 16-byte chunks.
fn check(
    op: &'static str,
    s: AttnShape,
    q_like: &[(&str, usize, Dtype)],
    kv_like: &[(&str, usize, Dtype)],
    lse: (usize, Dtype),
    mask: Option<&[u8]>,
    loaded: &[u64],
) -> Result<Dims> {
    let AttnShape { b, t, nh, nkv, hd } = s;
    if nh == 0 || nkv == 0 || hd == 0 || nh % nkv != 0 {
        return Err(shape_err(
            op,
            format!("need NH, NKV, HD > 0 and NKV dividing NH, got {s:?}"),
        ));
    }
    if hd > MAX_HD {
        return Err(shape_err(
            op,
            format!("head dim {hd} > {MAX_HD} is not supported by the CUDA kernels"),
        ));
    }
    if b > MAX_GRID_YZ || nh > MAX_GRID_YZ || t > i32::MAX as usize {
        return Err(shape_err(
            op,
            format!("B and NH must be ≤ {MAX_GRID_YZ} and T < 2³¹, got {s:?}"),
        ));
    }
    let q_len = product(op, &[b, t, nh, hd])?;
    let kv_len = product(op, &[b, t, nkv, hd])?;
    let lse_len = product(op, &[b, nh, t])?;
    let dt = q_like[0].2;
    let tensors = q_like
        .iter()
        .map(|a| (a, q_len))
        .chain(kv_like.iter().map(|a| (a, kv_len)));
    for (&(what, len, dtype), want) in tensors {
        expect_len(op, what, len, want)?;
        if dtype != dt {
            return Err(shape_err(
                op,
                format!(
                    "{what} is {} but {} is {}: q, k, v, out and their gradients must share one storage type",
                    dtype.name(),
                    q_like[0].0,
                    dt.name()
                ),
            ));
        }
    }
    expect_len(op, "lse", lse.0, lse_len)?;
    if lse.1 != Dtype::F32 {
        return Err(shape_err(
            op,
            format!("lse must be f32, got {}", lse.1.name()),
        ));
    }
    if let Some(mask) = mask {
        expect_len(op, "key_mask", mask.len(), b * t)?;
    }
    // 16-byte loads: every row (and head) start is a multiple of HD elements
    // from a 16-byte aligned base, so HD must hold whole 16-byte chunks.
    let vec = hd % (16 / dt.size()) == 0 && loaded.iter().all(|p| p % 16 == 0);
    Ok(Dims {
        b,
        t,
        seq: t as i32,
        nh: nh as i32,
        nkv: nkv as i32,
        hd: hd as i32,
        scale: 1.0 / (hd as f32).sqrt(),
        dt,
        vec: vec as i32,
        lse_len,
    })
}

/// The key mask on the device (None: no mask, the kernels get a null pointer).
struct DevMask {
    _mem: Option<cudarc::driver::CudaSlice<u8>>,
    ptr: u64,
}

fn upload_mask(cu: &Cuda, mask: Option<&[u8]>) -> Result<DevMask> {
    Ok(match mask {
        None => DevMask { _mem: None, ptr: 0 },
        Some(m) => {
            let mem = cu.upload_ints(m)?;
            let ptr = super::ptr_of(&mem, cu.stream());
            DevMask {
                _mem: Some(mem),
                ptr,
            }
        }
    })
}

fn config(grid: (usize, usize, usize), threads: usize, smem: usize) -> Result<LaunchConfig> {
    let dim = |n: usize| {
        u32::try_from(n)
            .map_err(|_| shape_err("attention", format!("grid dimension {n} too large")))
    };
    Ok(LaunchConfig {
        grid_dim: (dim(grid.0)?, dim(grid.1)?, dim(grid.2)?),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    })
}

/// out[B,T,NH,HD], lse[B,NH,T] from q[B,T,NH,HD], k, v[B,T,NKV,HD].
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    cu: &Cuda,
    out: CudaViewMut<'_>,
    lse: CudaViewMut<'_>,
    q: CudaView<'_>,
    k: CudaView<'_>,
    v: CudaView<'_>,
    key_mask: Option<&[u8]>,
    s: AttnShape,
) -> Result<()> {
    let op = "attention_forward";
    let d = check(
        op,
        s,
        &[("q", q.len, q.dtype), ("out", out.len, out.dtype)],
        &[("k", k.len, k.dtype), ("v", v.len, v.dtype)],
        (lse.len, lse.dtype),
        key_mask,
        &[q.ptr, k.ptr, v.ptr],
    )?;
    if d.b * d.t == 0 {
        return Ok(());
    }
    let tiles = Tiles::of(d.dt);
    let mask = upload_mask(cu, key_mask)?;
    let cfg = config(
        (d.t.div_ceil(tiles.fwd_bq()), s.nh, d.b),
        32 * tiles.fwd_warps,
        tiles.fwd_smem(d.dt, s.hd),
    )?;
    let f = cu.func(&format!("attention_forward_{}", d.dt.suffix()))?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&out.ptr)
        .arg(&lse.ptr)
        .arg(&q.ptr)
        .arg(&k.ptr)
        .arg(&v.ptr)
        .arg(&mask.ptr)
        .arg(&d.seq)
        .arg(&d.nh)
        .arg(&d.nkv)
        .arg(&d.hd)
        .arg(&d.scale)
        .arg(&d.vec);
    // SAFETY: `check` verified every length against the shape (q, out:
    // B·T·NH·HD; k, v: B·T·NKV·HD; lse: B·NH·T; the mask, when present, B·T
    // bytes, uploaded above and alive until after this call) and that the
    // tensors share the storage type the kernel instantiation expects; the
    // views are live device ranges, `out`/`lse` exclusively borrowed. The
    // kernel reads and writes only rows < T, heads < NH (NKV), columns < HD
    // of them; grid (⌈T/BQ⌉, NH, B) matches its indexing, 16-byte loads are
    // enabled only for aligned pointers, and the dynamic shared memory is its
    // layout's size (the kernel traps if it were smaller).
    unsafe { l.launch(cfg) }.map_err(|e| cu.driver_err(op, e))?;
    Ok(())
}

/// dq[B,T,NH,HD], dk, dv[B,T,NKV,HD] += gradients of out given dout.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    cu: &Cuda,
    dq: CudaViewMut<'_>,
    dk: CudaViewMut<'_>,
    dv: CudaViewMut<'_>,
    dout: CudaView<'_>,
    q: CudaView<'_>,
    k: CudaView<'_>,
    v: CudaView<'_>,
    out: CudaView<'_>,
    lse: CudaView<'_>,
    key_mask: Option<&[u8]>,
    s: AttnShape,
) -> Result<()> {
    let op = "attention_backward";
    let d = check(
        op,
        s,
        &[
            ("dq", dq.len, dq.dtype),
            ("dout", dout.len, dout.dtype),
            ("q", q.len, q.dtype),
            ("out", out.len, out.dtype),
        ],
        &[
            ("dk", dk.len, dk.dtype),
            ("dv", dv.len, dv.dtype),
            ("k", k.len, k.dtype),
            ("v", v.len, v.dtype),
        ],
        (lse.len, lse.dtype),
        key_mask,
        &[dout.ptr, q.ptr, k.ptr, v.ptr],
    )?;
    if d.b * d.t == 0 {
        return Ok(());
    }
    let tiles = Tiles::of(d.dt);
    let mask = upload_mask(cu, key_mask)?;
    let sfx = d.dt.suffix();

    // 1. D[B,NH,T] = rowsum(dout ∘ out), f32 scratch; one warp per row.
    let mut dsum_buf = cu.alloc(d.lse_len, Dtype::F32)?;
    let dsum = cu.view_mut(&mut dsum_buf, 0..d.lse_len);
    let rows = (d.b * d.t * s.nh) as i64;
    const DOT_WARPS: usize = 8;
    let cfg = config(
        ((rows as usize).div_ceil(DOT_WARPS), 1, 1),
        32 * DOT_WARPS,
        0,
    )?;
    let f = cu.func(&format!("attention_backward_dot_{sfx}"))?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&dsum.ptr)
        .arg(&dout.ptr)
        .arg(&out.ptr)
        .arg(&rows)
        .arg(&d.seq)
        .arg(&d.nh)
        .arg(&d.hd);
    // SAFETY: dout and out hold `rows`·HD elements of the checked storage
    // type, dsum `rows` = B·NH·T f32 (allocated above, freed in stream order
    // after every use below); warps past the last row return at once.
    unsafe { l.launch(cfg) }.map_err(|e| cu.driver_err(op, e))?;

    // 2. dk, dv: one block per (key tile, kv head, batch).
    let smem = tiles.bwd_smem(d.dt, s.hd);
    let threads = 32 * BWD_WARPS;
    let cfg = config((d.t.div_ceil(tiles.bwd_b), s.nkv, d.b), threads, smem)?;
    let f = cu.func(&format!("attention_backward_dkdv_{sfx}"))?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&dk.ptr)
        .arg(&dv.ptr)
        .arg(&dout.ptr)
        .arg(&q.ptr)
        .arg(&k.ptr)
        .arg(&v.ptr)
        .arg(&lse.ptr)
        .arg(&dsum.ptr)
        .arg(&mask.ptr)
        .arg(&d.seq)
        .arg(&d.nh)
        .arg(&d.nkv)
        .arg(&d.hd)
        .arg(&d.scale)
        .arg(&d.vec);
    // SAFETY: as for the forward: every length and storage type was checked
    // against the shape, dsum was filled by the previous launch on this
    // stream, the mask lives until the end of this function; dk and dv are
    // exclusive borrows, and each of their elements is read-modified-written
    // by exactly one thread (block = key tile × kv head × batch). Grid,
    // 16-byte loads and shared memory as the kernel's indexing and layout
    // require (it traps on too little shared memory).
    unsafe { l.launch(cfg) }.map_err(|e| cu.driver_err(op, e))?;

    // 3. dq: one block per (query tile, head, batch).
    let cfg = config((d.t.div_ceil(tiles.bwd_b), s.nh, d.b), threads, smem)?;
    let f = cu.func(&format!("attention_backward_dq_{sfx}"))?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&dq.ptr)
        .arg(&dout.ptr)
        .arg(&q.ptr)
        .arg(&k.ptr)
        .arg(&v.ptr)
        .arg(&lse.ptr)
        .arg(&dsum.ptr)
        .arg(&mask.ptr)
        .arg(&d.seq)
        .arg(&d.nh)
        .arg(&d.nkv)
        .arg(&d.hd)
        .arg(&d.scale)
        .arg(&d.vec);
    // SAFETY: as for step 2; each dq element belongs to exactly one thread
    // (block = query tile × head × batch).
    unsafe { l.launch(cfg) }.map_err(|e| cu.driver_err(op, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every configuration stays within the 48 KB of shared memory a block
    /// may use without opting in.
    #[test]
    fn shared_memory_fits_48k() {
        for dt in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
            let t = Tiles::of(dt);
            for hd in 1..=MAX_HD {
                assert!(t.fwd_smem(dt, hd) <= 48 * 1024, "{dt:?} hd {hd}");
                assert!(t.bwd_smem(dt, hd) <= 48 * 1024, "{dt:?} hd {hd}");
            }
        }
        // Worked examples (HD = 128).
        assert_eq!(Tiles::of(Dtype::Bf16).fwd_smem(Dtype::Bf16, 128), 40_064);
        assert_eq!(Tiles::of(Dtype::F32).fwd_smem(Dtype::F32, 128), 36_416);
        assert_eq!(Tiles::of(Dtype::Bf16).bwd_smem(Dtype::Bf16, 128), 40_320);
        assert_eq!(Tiles::of(Dtype::F32).bwd_smem(Dtype::F32, 128), 36_544);
    }
}
