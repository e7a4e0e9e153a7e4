//! Fused LoRA linear (lora.cu): the frozen base products go to cuBLAS
//! ([`super::gemm`]), the LoRA branch runs in our tensor-core kernels.
//!
//! Forward, y[N,OUT] (=|+=) x·Wᵀ + s·dropout(x)·Aᵀ·Bᵀ:
//! 1. `lora_skinny`: xa[N,R] = dropout(x)·Aᵀ (the mask applied to x on load,
//!    1/(1−p) folded into the f32 result);
//! 2. `lora_rank_update`: y = s·xa·Bᵀ (+ y when accumulating);
//! 3. cuBLAS y += x·Wᵀ (β = 1: the rank-R pass costs one write of y, not a
//!    read and a write after the GEMM).
//!
//! Backward:
//! 1. `lora_skinny`: dxa[N,R] = s·dy·B (into `scratch_dxa`);
//! 2. `lora_rank_update`: dx += dropout'(dxa·A) (mask regenerated from the seeds);
//! 3. cuBLAS dx += dy·W;
//! 4. `lora_rows_partial` + `lora_reduce_partials`: dB += s·dyᵀ·xa and
//!    dA += dxaᵀ·dropout(x), reductions over N split into fixed chunks of rows
//!    whose f32 partials are summed in chunk order: no atomics, bitwise the same
//!    on every run (the chunking depends on the shapes alone).
//!
//! A and B are f32 master weights: the kernels read them as they are and
//! round them to the compute type (what the tensor cores take) on the way to
//! shared memory. `scratch_x` is not needed: dropout(x) is never materialised.

use super::{gemm, grid_for, memory, ptr_of, Cuda, CudaBuf, CudaView, CudaViewMut, Dtype};
use crate::backend::{dropout_threshold, Backend, Gemm, LoraDropout, LoraShape, Result};
use crate::cpu::check::{expect_len, product, shape_err};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// Threads per block of every LoRA kernel (`LORA_THREADS` in lora.cu).
const THREADS: u32 = 256;
/// Output tile of `lora_skinny`: rows × columns (BM, BR in lora.cu).
const SKINNY_TILE: (usize, usize) = (64, 64);
/// Output tile of `lora_rank_update`: rows × columns (BM, BN).
const RANK_TILE: (usize, usize) = (128, 128);
/// Tile of `lora_rows_partial`: columns of P × columns of Q (BC, BR).
const ROWS_TILE: (usize, usize) = (128, 64);
/// Rows of one reduction chunk are a multiple of this (≥ the kernel's row step).
const CHUNK_ROW_STEP: usize = 64;
/// A row reduction is split into about this many blocks (chunks × tiles).
const ROWS_TARGET_BLOCKS: usize = 512;

/// The dropout mask as the kernels take it.
struct Mask {
    /// Keeps the uploaded seeds alive until the launches are queued (frees
    /// are stream-ordered).
    _seeds: Option<CudaSlice<u64>>,
    /// Device pointer to seeds[samples], or 0: no dropout.
    seeds: u64,
    rows_per_sample: i32,
    threshold: u64,
    /// 1/(1−p), folded into the kernels' f32 scale (1 without dropout, 0 at
    /// p = 1 where everything is dropped, so that no 0·∞ appears).
    inv_keep: f32,
}

impl Mask {
    fn none() -> Self {
        Mask {
            _seeds: None,
            seeds: 0,
            rows_per_sample: 1,
            threshold: 0,
            inv_keep: 1.0,
        }
    }

    /// Validates `d` for `n` rows (every row in exactly one sample) and uploads
    /// the seeds. p = 0 keeps everything: no mask at all.
    fn new(cu: &Cuda, op: &'static str, d: Option<LoraDropout<'_>>, n: usize) -> Result<Self> {
        let Some(d) = d else {
            return Ok(Mask::none());
        };
        if !(0.0..=1.0).contains(&d.p) {
            return Err(shape_err(
                op,
                format!("drop probability {} is outside [0, 1]", d.p),
            ));
        }
        if d.seeds.len().checked_mul(d.rows_per_sample) != Some(n) {
            return Err(shape_err(
                op,
                format!(
                    "dropout: {} seeds × {} rows per sample do not cover the {n} rows",
                    d.seeds.len(),
                    d.rows_per_sample
                ),
            ));
        }
        if d.p == 0.0 || n == 0 {
            return Ok(Mask::none());
        }
        let seeds = cu.upload_ints(d.seeds)?;
        Ok(Mask {
            seeds: ptr_of(&seeds, cu.stream()),
            _seeds: Some(seeds),
            rows_per_sample: dim(op, d.rows_per_sample)?,
            threshold: dropout_threshold(d.p),
            inv_keep: if d.p >= 1.0 { 0.0 } else { 1.0 / (1.0 - d.p) },
        })
    }
}

fn dim(op: &'static str, d: usize) -> Result<i32> {
    i32::try_from(d).map_err(|_| shape_err(op, format!("dimension {d} exceeds i32")))
}

fn grid_dim(op: &'static str, blocks: usize, max: usize) -> Result<u32> {
    if blocks > max {
        return Err(shape_err(
            op,
            format!("{blocks} blocks exceed the grid limit {max}"),
        ));
    }
    Ok(blocks as u32)
}

fn expect_dtype(op: &'static str, what: &str, got: Dtype, want: Dtype) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(shape_err(
            op,
            format!("{what} is {}, expected {}", got.name(), want.name()),
        ))
    }
}

/// A trainable weight: f32 (master weights) or already the compute type.
fn expect_weight_dtype(op: &'static str, what: &str, got: Dtype, compute: Dtype) -> Result<()> {
    if got == Dtype::F32 || got == compute {
        Ok(())
    } else {
        Err(shape_err(
            op,
            format!(
                "{what} is {}, expected f32 or {}",
                got.name(),
                compute.name()
            ),
        ))
    }
}

fn at_least(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got >= want {
        Ok(())
    } else {
        Err(shape_err(
            op,
            format!("{what} has length {got}, expected at least {want}"),
        ))
    }
}

/// Device pointers to A and B as f32, which the kernels read (rounding to
/// the compute type on the way to shared memory): themselves, or — for
/// weights stored in the compute type — f32 copies in one scratch buffer
/// kept alive in `keep`.
fn weights_f32(
    cu: &Cuda,
    a: CudaView<'_>,
    b: CudaView<'_>,
    keep: &mut Option<CudaBuf>,
) -> Result<(u64, u64)> {
    let a_len = if a.dtype == Dtype::F32 { 0 } else { a.len };
    let b_len = if b.dtype == Dtype::F32 { 0 } else { b.len };
    if a_len + b_len == 0 {
        return Ok((a.ptr, b.ptr));
    }
    // B's copy starts 16-byte aligned, so the kernels' vector loads apply.
    let b_at = a_len.div_ceil(4) * 4;
    let buf = keep.insert(cu.alloc(b_at + b_len, Dtype::F32)?);
    let mut ptrs = (a.ptr, b.ptr);
    if a_len > 0 {
        let dst = cu.view_mut(buf, 0..a_len);
        ptrs.0 = dst.ptr;
        memory::convert(cu, dst, a)?;
    }
    if b_len > 0 {
        let dst = cu.view_mut(buf, b_at..b_at + b_len);
        ptrs.1 = dst.ptr;
        memory::convert(cu, dst, b)?;
    }
    Ok(ptrs)
}

fn block_cfg(grid: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// out[M,R] = scale · P[M,K]·Q, P masked when `mask` has seeds; out and P
/// in the compute type, Q f32. `qt` false: Q = A [R,K] (Q(k,r) = A[r,k]);
/// true: Q = B [K,R]. Callers check that out holds M·R, P M·K and Q K·R
/// elements.
#[allow(clippy::too_many_arguments)]
fn skinny(
    cu: &Cuda,
    out: u64,
    p: u64,
    q: u64,
    (m, k, r): (usize, usize, usize),
    scale: f32,
    qt: bool,
    mask: &Mask,
) -> Result<()> {
    const OP: &str = "lora_skinny";
    let gx = grid_dim(OP, m.div_ceil(SKINNY_TILE.0), i32::MAX as usize)?;
    let gy = grid_dim(OP, r.div_ceil(16).div_ceil(SKINNY_TILE.1 / 16), 65_535)?;
    if gx == 0 || gy == 0 {
        return Ok(());
    }
    let (m, k, r) = (dim(OP, m)?, dim(OP, k)?, dim(OP, r)?);
    let qt = qt as i32;
    let f = cu.func(&format!("{OP}_{}", cu.dtype().suffix()))?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&out)
        .arg(&p)
        .arg(&q)
        .arg(&m)
        .arg(&k)
        .arg(&r)
        .arg(&scale)
        .arg(&qt)
        .arg(&mask.seeds)
        .arg(&mask.rows_per_sample)
        .arg(&mask.threshold);
    // SAFETY: the caller checked out and P hold M·R and M·K elements of the
    // compute type the kernel is instantiated for, Q K·R f32s; the kernel reads
    // P[m,k] and Q only for m < M, k < K, r < R and writes out[m,r] only for
    // m < M, r < R. With seeds ≠ 0, seeds holds ⌈M / rows_per_sample⌉ values
    // (Mask::new checked seeds·rows = M) and is kept alive by `mask`.
    unsafe { l.launch(block_cfg((gx, gy, 1))) }.map_err(|e| cu.driver_err(OP, e))?;
    Ok(())
}

/// out[M,NN] = (beta ? out : 0) + scale·P[M,R]·Q, the product masked
/// element-wise (out shaped like x) when `mask` has seeds; out and P in the
/// compute type, Q f32. `qt` false: Q = B [NN,R] (Q(k,n) = B[n,k]); true:
/// Q = A [R,NN].
#[allow(clippy::too_many_arguments)]
fn rank_update(
    cu: &Cuda,
    out: u64,
    p: u64,
    q: u64,
    (m, nn, r): (usize, usize, usize),
    scale: f32,
    beta: bool,
    qt: bool,
    mask: &Mask,
) -> Result<()> {
    const OP: &str = "lora_rank_update";
    let gx = grid_dim(OP, nn.div_ceil(RANK_TILE.1), i32::MAX as usize)?;
    let gy = grid_dim(OP, m.div_ceil(RANK_TILE.0), 65_535)?;
    if gx == 0 || gy == 0 {
        return Ok(());
    }
    let (m, nn, r) = (dim(OP, m)?, dim(OP, nn)?, dim(OP, r)?);
    let (beta, qt) = (beta as i32, qt as i32);
    let f = cu.func(&format!("{OP}_{}", cu.dtype().suffix()))?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&out)
        .arg(&p)
        .arg(&q)
        .arg(&m)
        .arg(&nn)
        .arg(&r)
        .arg(&scale)
        .arg(&beta)
        .arg(&qt)
        .arg(&mask.seeds)
        .arg(&mask.rows_per_sample)
        .arg(&mask.threshold);
    // SAFETY: the caller checked out and P hold M·NN and M·R elements of the
    // compute type, Q R·NN f32s; the kernel reads P and Q inside those
    // bounds and reads/writes out[m,n] only for m < M, n < NN (each element
    // by one thread). Seeds as in `skinny`.
    unsafe { l.launch(block_cfg((gx, gy, 1))) }.map_err(|e| cu.driver_err(OP, e))?;
    Ok(())
}

/// How a reduction over N rows into a [C, R] result is split: `chunks`
/// chunks of `chunk_rows` rows (the last one shorter), column tiles of C and
/// of R; partials are [chunks][cpad][rp] (or [chunks][rp][cpad]) f32.
struct RowsPlan {
    chunks: usize,
    chunk_rows: usize,
    c_tiles: usize,
    r_tiles: usize,
    cpad: usize,
    rp: usize,
}

impl RowsPlan {
    fn new(n: usize, c: usize, r: usize) -> Self {
        let rp = r.div_ceil(16) * 16;
        let c_tiles = c.div_ceil(ROWS_TILE.0);
        let r_tiles = rp.div_ceil(ROWS_TILE.1);
        let tiles = (c_tiles * r_tiles).max(1);
        let want = ROWS_TARGET_BLOCKS
            .div_ceil(tiles)
            .clamp(1, n.div_ceil(CHUNK_ROW_STEP).max(1));
        let chunk_rows =
            (n.div_ceil(want).div_ceil(CHUNK_ROW_STEP) * CHUNK_ROW_STEP).max(CHUNK_ROW_STEP);
        RowsPlan {
            chunks: n.div_ceil(chunk_rows),
            chunk_rows,
            c_tiles,
            r_tiles,
            cpad: c_tiles * ROWS_TILE.0,
            rp,
        }
    }

    fn partial_len(&self) -> usize {
        self.chunks * self.cpad * self.rp
    }
}

/// part = per-chunk Σ_n P[n,c]·Q[n,r] (P [N,C] masked when `mask` has seeds,
/// Q [N,R], both compute type), laid out [chunk][c][r], or [chunk][r][c] when
/// `transpose`. `part` must hold plan.partial_len() f32s.
#[allow(clippy::too_many_arguments)]
fn rows_partial(
    cu: &Cuda,
    part: &CudaBuf,
    p: u64,
    q: u64,
    (n, c, r): (usize, usize, usize),
    plan: &RowsPlan,
    transpose: bool,
    mask: &Mask,
) -> Result<()> {
    const OP: &str = "lora_rows_partial";
    assert!(part.dtype == Dtype::F32 && part.len >= plan.partial_len());
    let gx = grid_dim(OP, plan.c_tiles, i32::MAX as usize)?;
    let gy = grid_dim(OP, plan.chunks, 65_535)?;
    let gz = grid_dim(OP, plan.r_tiles, 64)?;
    if gx == 0 || gy == 0 || gz == 0 {
        return Ok(());
    }
    let part_ptr = cu.view(part, 0..plan.partial_len()).ptr;
    let (n, c, r) = (dim(OP, n)?, dim(OP, c)?, dim(OP, r)?);
    let chunk_rows = dim(OP, plan.chunk_rows)?;
    let transpose = transpose as i32;
    let f = cu.func(&format!("{OP}_{}", cu.dtype().suffix()))?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&part_ptr)
        .arg(&p)
        .arg(&q)
        .arg(&n)
        .arg(&c)
        .arg(&r)
        .arg(&chunk_rows)
        .arg(&transpose)
        .arg(&mask.seeds)
        .arg(&mask.rows_per_sample)
        .arg(&mask.threshold);
    // SAFETY: the caller checked P and Q hold N·C and N·R elements of the
    // compute type; block (x, y, z) reads rows [y·chunk_rows, min(N, …)) of
    // them inside those bounds and writes part entries of chunk y < chunks,
    // c < c_tiles·128 = cpad, r < rp: inside partial_len() (asserted above).
    // Seeds as in `skinny`.
    unsafe { l.launch(block_cfg((gx, gy, gz))) }.map_err(|e| cu.driver_err(OP, e))?;
    Ok(())
}

/// out[i·ldo + j] += scale · Σ_chunk part[chunk·gstride + i·ldp + j] for
/// i < rows, j < cols, chunks in order.
#[allow(clippy::too_many_arguments)]
fn reduce_partials(
    cu: &Cuda,
    out: &CudaViewMut<'_>,
    part: &CudaBuf,
    chunks: usize,
    gstride: usize,
    (rows, cols): (usize, usize),
    (ldp, ldo): (usize, usize),
    scale: f32,
) -> Result<()> {
    const OP: &str = "lora_reduce_partials";
    let total = rows * cols;
    if total == 0 || chunks == 0 {
        return Ok(());
    }
    // Highest entries touched: the last chunk's (rows−1, cols−1).
    assert!(
        part.dtype == Dtype::F32 && part.len >= (chunks - 1) * gstride + (rows - 1) * ldp + cols
    );
    assert!(out.len >= (rows - 1) * ldo + cols);
    let part_ptr = cu.view(part, 0..part.len).ptr;
    let (chunks, gstride) = (dim(OP, chunks)?, gstride as i64);
    let (rows, cols) = (dim(OP, rows)?, dim(OP, cols)?);
    let (ldp, ldo) = (ldp as i64, ldo as i64);
    let f = cu.func(OP)?;
    let mut l = cu.stream().launch_builder(f);
    l.arg(&out.ptr)
        .arg(&out.dt)
        .arg(&part_ptr)
        .arg(&chunks)
        .arg(&gstride)
        .arg(&rows)
        .arg(&cols)
        .arg(&ldp)
        .arg(&ldo)
        .arg(&scale);
    // SAFETY: the asserts above bound every index the kernel forms (i < rows,
    // j < cols, chunk < chunks) inside part and out; out is read and written
    // through its own dtype code, each element by one thread.
    unsafe { l.launch(block_cfg((grid_for(total, THREADS), 1, 1))) }
        .map_err(|e| cu.driver_err(OP, e))?;
    Ok(())
}

/// See [`crate::backend::Backend::lora_linear_forward`].
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    cu: &Cuda,
    y: CudaViewMut<'_>,
    xa: CudaViewMut<'_>,
    _scratch_x: CudaViewMut<'_>,
    x: CudaView<'_>,
    w: CudaView<'_>,
    a: CudaView<'_>,
    b: CudaView<'_>,
    dropout: Option<LoraDropout<'_>>,
    s: LoraShape,
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "lora_linear_forward";
    let (n, ni, no, r) = (s.n, s.n_in, s.n_out, s.r);
    let t = cu.dtype();
    expect_len(OP, "x", x.len, product(OP, &[n, ni])?)?;
    expect_len(OP, "w", w.len, product(OP, &[no, ni])?)?;
    expect_len(OP, "a", a.len, product(OP, &[r, ni])?)?;
    expect_len(OP, "b", b.len, product(OP, &[no, r])?)?;
    expect_len(OP, "y", y.len, product(OP, &[n, no])?)?;
    at_least(OP, "xa", xa.len, product(OP, &[n, r])?)?;
    expect_dtype(OP, "x", x.dtype, t)?;
    expect_dtype(OP, "y", y.dtype, t)?;
    expect_dtype(OP, "xa", xa.dtype, t)?;
    expect_weight_dtype(OP, "a", a.dtype, t)?;
    expect_weight_dtype(OP, "b", b.dtype, t)?;
    for d in [n, ni, no, r] {
        dim(OP, d)?;
    }
    let mask = Mask::new(cu, OP, dropout, n)?;
    let base = Gemm::linear(n, no, ni);
    if n == 0 || r == 0 {
        return gemm::gemm(cu, y, x, w, Gemm { accumulate, ..base });
    }
    let mut keep = None;
    let (a32, b32) = weights_f32(cu, a, b, &mut keep)?;
    // xa = (1/(1−p)) · (mask ⊙ x)·Aᵀ
    skinny(
        cu,
        xa.ptr,
        x.ptr,
        a32,
        (n, ni, r),
        mask.inv_keep,
        false,
        &mask,
    )?;
    // y = s·xa·Bᵀ (+ y)
    rank_update(
        cu,
        y.ptr,
        xa.ptr,
        b32,
        (n, no, r),
        s.scaling,
        accumulate,
        false,
        &Mask::none(),
    )?;
    // y += x·Wᵀ
    gemm::gemm(
        cu,
        y,
        x,
        w,
        Gemm {
            accumulate: true,
            ..base
        },
    )
}

/// See [`crate::backend::Backend::lora_linear_backward`].
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    cu: &Cuda,
    dx: CudaViewMut<'_>,
    da: Option<CudaViewMut<'_>>,
    db: Option<CudaViewMut<'_>>,
    _scratch_x: CudaViewMut<'_>,
    scratch_dxa: CudaViewMut<'_>,
    dy: CudaView<'_>,
    x: CudaView<'_>,
    xa: CudaView<'_>,
    w: CudaView<'_>,
    a: CudaView<'_>,
    b: CudaView<'_>,
    dropout: Option<LoraDropout<'_>>,
    s: LoraShape,
) -> Result<()> {
    const OP: &str = "lora_linear_backward";
    let (n, ni, no, r) = (s.n, s.n_in, s.n_out, s.r);
    let t = cu.dtype();
    expect_len(OP, "dx", dx.len, product(OP, &[n, ni])?)?;
    expect_len(OP, "dy", dy.len, product(OP, &[n, no])?)?;
    expect_len(OP, "x", x.len, product(OP, &[n, ni])?)?;
    expect_len(OP, "xa", xa.len, product(OP, &[n, r])?)?;
    expect_len(OP, "w", w.len, product(OP, &[no, ni])?)?;
    expect_len(OP, "a", a.len, product(OP, &[r, ni])?)?;
    expect_len(OP, "b", b.len, product(OP, &[no, r])?)?;
    if let Some(da) = &da {
        expect_len(OP, "da", da.len, product(OP, &[r, ni])?)?;
    }
    if let Some(db) = &db {
        expect_len(OP, "db", db.len, product(OP, &[no, r])?)?;
    }
    at_least(OP, "scratch_dxa", scratch_dxa.len, product(OP, &[n, r])?)?;
    for (what, dtype) in [
        ("dx", dx.dtype),
        ("dy", dy.dtype),
        ("x", x.dtype),
        ("xa", xa.dtype),
        ("scratch_dxa", scratch_dxa.dtype),
    ] {
        expect_dtype(OP, what, dtype, t)?;
    }
    expect_weight_dtype(OP, "a", a.dtype, t)?;
    expect_weight_dtype(OP, "b", b.dtype, t)?;
    for d in [n, ni, no, r] {
        dim(OP, d)?;
    }
    let mask = Mask::new(cu, OP, dropout, n)?;
    let base = Gemm {
        m: n,
        n: ni,
        k: no,
        trans_a: false,
        trans_b: false,
        alpha: 1.0,
        accumulate: true,
    };
    if n == 0 || r == 0 {
        // No LoRA term, and dA, dB get empty sums.
        return gemm::gemm(cu, dx, dy, w, base);
    }
    let mut keep = None;
    let (a32, b32) = weights_f32(cu, a, b, &mut keep)?;
    let dxa = scratch_dxa.ptr;
    // dxa = s·dy·B
    skinny(
        cu,
        dxa,
        dy.ptr,
        b32,
        (n, no, r),
        s.scaling,
        true,
        &Mask::none(),
    )?;
    // dx += (1/(1−p)) · mask ⊙ (dxa·A)
    rank_update(
        cu,
        dx.ptr,
        dxa,
        a32,
        (n, ni, r),
        mask.inv_keep,
        true,
        true,
        &mask,
    )?;
    // dx += dy·W
    gemm::gemm(cu, dx, dy, w, base)?;

    let plan_b = RowsPlan::new(n, no, r);
    let plan_a = RowsPlan::new(n, ni, r);
    let len = db
        .as_ref()
        .map_or(0, |_| plan_b.partial_len())
        .max(da.as_ref().map_or(0, |_| plan_a.partial_len()));
    if len == 0 {
        return Ok(());
    }
    // One scratch for both reductions: the stream runs them one after the other.
    let part = cu.alloc(len, Dtype::F32)?;
    if let Some(db) = db {
        // dB[OUT,R] += s · Σ_n dy[n,:]ᵀ·xa[n,:]; partials [chunk][OUT][rp]
        rows_partial(
            cu,
            &part,
            dy.ptr,
            xa.ptr,
            (n, no, r),
            &plan_b,
            false,
            &Mask::none(),
        )?;
        let gstride = plan_b.cpad * plan_b.rp;
        reduce_partials(
            cu,
            &db,
            &part,
            plan_b.chunks,
            gstride,
            (no, r),
            (plan_b.rp, r),
            s.scaling,
        )?;
    }
    if let Some(da) = da {
        // dA[R,IN] += (1/(1−p)) · Σ_n dxa[n,:]ᵀ·(mask ⊙ x)[n,:]; partials [chunk][rp][IN]
        rows_partial(cu, &part, x.ptr, dxa, (n, ni, r), &plan_a, true, &mask)?;
        let gstride = plan_a.rp * plan_a.cpad;
        reduce_partials(
            cu,
            &da,
            &part,
            plan_a.chunks,
            gstride,
            (r, ni),
            (plan_a.cpad, ni),
            mask.inv_keep,
        )?;
    }
    Ok(())
}
