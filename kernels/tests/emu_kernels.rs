//! EVERY kernel of the CUDA program (kernels/src/cuda/*.cu) run on the CPU
//! emulator of kernels/emu/ and compared with the CPU backend's op, for f32,
//! bf16 and fp16 storage — in plain `cargo test`, no GPU needed (only a C++
//! compiler; without one every test prints SKIPPED and passes).
//!
//! How: kernels/emu/harness.rs compiles the exact program NVRTC compiles
//! (`cuda::compile::program_source()`) with the emulator into a shared
//! library and launches kernels by name. The functions under "Launchers"
//! below MIRROR the launchers of kernels/src/cuda/<op>.rs — the same grid,
//! block, shared memory, argument order and types (the emulator checks the
//! count and size of every argument against the kernel), scratch buffers and
//! host-side arithmetic — so the host side is checked as far as a copy can
//! be. A CHANGE TO A LAUNCHER MUST BE MIRRORED HERE (argument mismatches then
//! fail loudly; a silently different grid does not). cuBLAS is not ours: the
//! GEMM steps of the LoRA launcher run through the CPU backend's gemm.
//!
//! Conventions as in the GPU tests (tests/cuda_*.rs): the CPU sees inputs
//! rounded to the storage type; outputs start as NaN (an element left
//! unwritten fails), gradients start random (checks the +=); relative L2
//! error ≤ 1e-5 (f32), 1e-2 (bf16), 5e-3 (fp16); dropout masks must match
//! exactly. Kernels with block- or warp-level cooperation are run a second
//! time under another block order and thread schedule and must give the same
//! bits. Shapes are small: the emulator runs one fiber per CUDA thread.

#[path = "../emu/harness.rs"]
mod emu;

use emu::{round, DevBuf, DevInts, Emu, LaunchConfig, View};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rlhf_kernels::backend::{dropout_keep, dropout_threshold};
use rlhf_kernels::cuda::Dtype;
use rlhf_kernels::{AdamW, AttnShape, Backend, Cpu, Gemm, LoraDropout, LoraShape};

type E = &'static Emu;

/// Compute dtypes and their tolerances on ‖got − want‖₂ / ‖want‖₂.
const DTYPES: [(Dtype, f64); 3] = [(Dtype::F32, 1e-5), (Dtype::Bf16, 1e-2), (Dtype::F16, 5e-3)];
const F32: Dtype = Dtype::F32;

// ---- helpers --------------------------------------------------------------------

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn random(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    let scale = if scale > 0.0 { scale } else { 1.0 };
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

/// |v| ≥ 0.25: a zero output can only come from a dropped element.
fn nonzero(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v: f32 = r.random_range(-1.0..1.0);
            if v < 0.0 {
                v - 0.25
            } else {
                v + 0.25
            }
        })
        .collect()
}

fn rms(x: &[f32]) -> f32 {
    (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len().max(1) as f64).sqrt() as f32
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[track_caller]
fn assert_rel(what: &str, dt: Dtype, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what} [{}]: length", dt.name());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite(),
            "{what} [{}]: element {i} = {g} (want {w})",
            dt.name()
        );
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    let e = num.sqrt() / den.sqrt().max(1e-30);
    eprintln!("{what} [{}]: rel err {e:.2e} (tol {tol:.0e})", dt.name());
    assert!(
        e <= tol,
        "{what} [{}]: rel err {e:.3e} > {tol:.0e}",
        dt.name()
    );
}

/// Runs `f` under the default schedule and under another one; both must
/// give the same bits.
#[track_caller]
fn deterministic(what: &str, f: impl Fn() -> Vec<Vec<f32>>) -> Vec<Vec<f32>> {
    let a = f();
    let b = emu::with_schedule(0x5eed, &f);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            bits(x) == bits(y),
            "{what}: output {i} differs under another block order / thread schedule"
        );
    }
    a
}

// ---- Launchers: mirrors of kernels/src/cuda/*.rs (keep in sync) ---------------------

/// mod.rs `grid_for`.
fn grid_for(n: usize, block: u32) -> u32 {
    (n.div_ceil(block as usize)).clamp(1, 65_535) as u32
}

/// elementwise.rs `BLOCK`, `launch_cfg`, `stride_cfg`.
const BLOCK: u32 = 256;
fn launch_cfg(grid: (u32, u32, u32), block: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: block,
        shared_mem_bytes: 0,
    }
}
fn stride_cfg(n: usize) -> LaunchConfig {
    launch_cfg((grid_for(n, BLOCK), 1, 1), (BLOCK, 1, 1))
}

/// memory.rs `fill`.
fn fill(e: E, dst: View, value: f32) {
    let n = dst.len as i64;
    let mut l = e.launch_builder("fill");
    l.arg(&dst.ptr).arg(&dst.dt).arg(&n).arg(&value);
    l.launch(LaunchConfig {
        grid_dim: (grid_for(dst.len, 256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    });
}

/// memory.rs `convert`.
fn convert(e: E, dst: View, src: View) {
    let n = dst.len as i64;
    let mut l = e.launch_builder("convert");
    l.arg(&dst.ptr)
        .arg(&dst.dt)
        .arg(&src.ptr)
        .arg(&src.dt)
        .arg(&n);
    l.launch(LaunchConfig {
        grid_dim: (grid_for(dst.len, 256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    });
}

/// elementwise.rs `axpy`.
fn axpy(e: E, y: View, alpha: f32, x: View) {
    let n = y.len as i64;
    let mut l = e.launch_builder("elementwise_axpy");
    l.arg(&y.ptr)
        .arg(&y.dt)
        .arg(&alpha)
        .arg(&x.ptr)
        .arg(&x.dt)
        .arg(&n);
    l.launch(stride_cfg(y.len));
}

/// elementwise.rs `scale`.
fn scale(e: E, x: View, s: f32) {
    let n = x.len as i64;
    let mut l = e.launch_builder("elementwise_scale");
    l.arg(&x.ptr).arg(&x.dt).arg(&s).arg(&n);
    l.launch(stride_cfg(x.len));
}

/// elementwise.rs `sum_squares`.
fn sum_squares(e: E, x: View) -> f64 {
    const SUM_SQUARES_MAX_BLOCKS: usize = 1024;
    let blocks = x
        .len
        .div_ceil(BLOCK as usize * 16)
        .clamp(1, SUM_SQUARES_MAX_BLOCKS);
    let partial = DevInts::upload(e, &vec![0.0f64; blocks]);
    let n = x.len as i64;
    let mut l = e.launch_builder("elementwise_sum_squares");
    l.arg(&partial.ptr).arg(&x.ptr).arg(&x.dt).arg(&n);
    l.launch(launch_cfg((blocks as u32, 1, 1), (BLOCK, 1, 1)));
    partial.download::<f64>(blocks).iter().sum()
}

/// bias.rs `row_chunks`, `partial_cfg`, `sum_partials`.
fn row_chunks(rows: usize) -> (usize, usize) {
    let per = 64usize.max(rows.div_ceil(65_535));
    (per, rows.div_ceil(per))
}
fn partial_cfg(c: usize, chunks: usize) -> LaunchConfig {
    let threads = (c.min(256) as u32).div_ceil(32) * 32;
    let col_blocks = c.div_ceil(threads as usize) as u32;
    launch_cfg((col_blocks, chunks as u32, 1), (threads, 1, 1))
}
fn sum_partials(e: E, dst: View, partial: &DevBuf, chunks: usize, c: usize) {
    let p = partial.view(0..chunks * c);
    let (chunks_arg, c_arg) = (chunks as i64, c as i64);
    let mut l = e.launch_builder("bias_sum_partials");
    l.arg(&dst.ptr)
        .arg(&dst.dt)
        .arg(&p.ptr)
        .arg(&chunks_arg)
        .arg(&c_arg);
    l.launch(stride_cfg(c));
}

/// bias.rs `add_bias`.
fn add_bias(e: E, x: View, bias: View, c: usize) {
    let (c_arg, n) = (c as i64, x.len as i64);
    let mut l = e.launch_builder("bias_add");
    l.arg(&x.ptr)
        .arg(&x.dt)
        .arg(&bias.ptr)
        .arg(&bias.dt)
        .arg(&c_arg)
        .arg(&n);
    l.launch(stride_cfg(x.len));
}

/// bias.rs `bias_backward`.
fn bias_backward(e: E, dbias: View, dout: View, c: usize) {
    let rows = dout.len / c;
    let (per, chunks) = row_chunks(rows);
    let partial = DevBuf::zeros(e, chunks * c, F32);
    let p = partial.view(0..chunks * c);
    let (rows_arg, c_arg, per_arg) = (rows as i64, c as i64, per as i64);
    let mut l = e.launch_builder("bias_backward_partial");
    l.arg(&p.ptr)
        .arg(&dout.ptr)
        .arg(&dout.dt)
        .arg(&rows_arg)
        .arg(&c_arg)
        .arg(&per_arg);
    l.launch(partial_cfg(c, chunks));
    sum_partials(e, dbias, &partial, chunks, c);
}

/// embedding.rs `forward`.
fn embedding_forward(e: E, out: View, table: View, ids: &[u32], c: usize) {
    let ids_dev = DevInts::upload(e, ids);
    let (c_arg, total) = (c as i64, out.len as i64);
    let mut l = e.launch_builder("embedding_forward");
    l.arg(&out.ptr)
        .arg(&out.dt)
        .arg(&table.ptr)
        .arg(&table.dt)
        .arg(&ids_dev.ptr)
        .arg(&c_arg)
        .arg(&total);
    l.launch(stride_cfg(out.len));
}

/// embedding.rs `backward`.
fn embedding_backward(e: E, dtable: View, dout: View, ids: &[u32], c: usize) {
    let n = dout.len / c;
    let mut rows: Vec<u32> = (0..n as u32).collect();
    rows.sort_by_key(|&r| ids[r as usize]);
    let mut uniq: Vec<u32> = Vec::new();
    let mut offsets: Vec<u32> = Vec::new();
    for (k, &r) in rows.iter().enumerate() {
        let id = ids[r as usize];
        if uniq.last() != Some(&id) {
            uniq.push(id);
            offsets.push(k as u32);
        }
    }
    offsets.push(n as u32);
    let blocks = uniq.len() as u32;
    let (uniq_dev, offsets_dev, rows_dev) = (
        DevInts::upload(e, &uniq),
        DevInts::upload(e, &offsets),
        DevInts::upload(e, &rows),
    );
    let c_arg = c as i64;
    let threads = (c.min(256) as u32).div_ceil(32) * 32;
    let mut l = e.launch_builder("embedding_backward");
    l.arg(&dtable.ptr)
        .arg(&dtable.dt)
        .arg(&dout.ptr)
        .arg(&dout.dt)
        .arg(&uniq_dev.ptr)
        .arg(&offsets_dev.ptr)
        .arg(&rows_dev.ptr)
        .arg(&c_arg);
    l.launch(launch_cfg((blocks, 1, 1), (threads, 1, 1)));
}

/// rmsnorm.rs `ROW_BLOCK`, `forward`.
const RMS_ROW_BLOCK: u32 = 256;
fn rmsnorm_forward(e: E, out: View, rstd: View, x: View, w: View, c: usize, eps: f32) {
    let blocks = (x.len / c) as u32;
    let c_arg = c as i64;
    let mut l = e.launch_builder("rmsnorm_forward");
    l.arg(&out.ptr)
        .arg(&out.dt)
        .arg(&rstd.ptr)
        .arg(&x.ptr)
        .arg(&x.dt)
        .arg(&w.ptr)
        .arg(&w.dt)
        .arg(&c_arg)
        .arg(&eps);
    l.launch(launch_cfg((blocks, 1, 1), (RMS_ROW_BLOCK, 1, 1)));
}

/// rmsnorm.rs `backward`.
#[allow(clippy::too_many_arguments)]
fn rmsnorm_backward(
    e: E,
    dx: View,
    dw: Option<View>,
    dout: View,
    x: View,
    w: View,
    rstd: View,
    c: usize,
) {
    let n = x.len / c;
    let blocks = n as u32;
    let c_arg = c as i64;
    {
        let mut l = e.launch_builder("rmsnorm_backward_dx");
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
        l.launch(launch_cfg((blocks, 1, 1), (RMS_ROW_BLOCK, 1, 1)));
    }
    let Some(dw) = dw else { return };
    let (per, chunks) = row_chunks(n);
    let partial = DevBuf::zeros(e, chunks * c, F32);
    let p = partial.view(0..chunks * c);
    let (rows_arg, per_arg) = (n as i64, per as i64);
    let mut l = e.launch_builder("rmsnorm_backward_dw_partial");
    l.arg(&p.ptr)
        .arg(&dout.ptr)
        .arg(&dout.dt)
        .arg(&x.ptr)
        .arg(&x.dt)
        .arg(&rstd.ptr)
        .arg(&rows_arg)
        .arg(&c_arg)
        .arg(&per_arg);
    l.launch(partial_cfg(c, chunks));
    sum_partials(e, dw, &partial, chunks, c);
}

/// rope.rs `apply`.
#[allow(clippy::too_many_arguments)]
fn rope_apply(
    e: E,
    x: View,
    cos: View,
    sin: View,
    positions: &[u32],
    heads: usize,
    hd: usize,
    backward: bool,
) {
    let pairs = x.len / 2;
    let pos_dev = DevInts::upload(e, positions);
    let (heads_arg, half_arg, pairs_arg) = (heads as i64, (hd / 2) as i64, pairs as i64);
    let sign: f32 = if backward { -1.0 } else { 1.0 };
    let mut l = e.launch_builder("rope_apply");
    l.arg(&x.ptr)
        .arg(&x.dt)
        .arg(&cos.ptr)
        .arg(&cos.dt)
        .arg(&sin.ptr)
        .arg(&sin.dt)
        .arg(&pos_dev.ptr)
        .arg(&heads_arg)
        .arg(&half_arg)
        .arg(&sign)
        .arg(&pairs_arg);
    l.launch(stride_cfg(pairs));
}

/// swiglu.rs `forward`.
fn swiglu_forward(e: E, out: View, gate: View, up: View) {
    let n = out.len as i64;
    let mut l = e.launch_builder("swiglu_forward");
    l.arg(&out.ptr)
        .arg(&out.dt)
        .arg(&gate.ptr)
        .arg(&gate.dt)
        .arg(&up.ptr)
        .arg(&up.dt)
        .arg(&n);
    l.launch(stride_cfg(out.len));
}

/// swiglu.rs `backward`.
fn swiglu_backward(e: E, dgate: View, dup: View, dout: View, gate: View, up: View) {
    let n = dout.len;
    let n_arg = n as i64;
    let mut l = e.launch_builder("swiglu_backward");
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
    l.launch(stride_cfg(n));
}

/// dropout.rs `forward` / `backward` (`check_p` gives 1/(1−p)).
fn dropout(e: E, backward: bool, dst: View, src: View, p: f32, seed: u64) {
    let inv_keep = 1.0 / (1.0 - p);
    let threshold = dropout_threshold(p);
    let n = dst.len as i64;
    let mut l = e.launch_builder(if backward {
        "dropout_backward"
    } else {
        "dropout_forward"
    });
    l.arg(&dst.ptr)
        .arg(&dst.dt)
        .arg(&src.ptr)
        .arg(&src.dt)
        .arg(&seed)
        .arg(&threshold)
        .arg(&inv_keep)
        .arg(&n);
    l.launch(stride_cfg(dst.len));
}

/// cross_entropy.rs `cross_entropy`.
fn cross_entropy(
    e: E,
    logits: View,
    targets: &[i32],
    v: usize,
    grad_scale: Option<f32>,
) -> Vec<f32> {
    const ROW_BLOCK: u32 = 512;
    let n = logits.len / v;
    let blocks = n as u32;
    let targets_dev = DevInts::upload(e, targets);
    let loss = DevBuf::zeros(e, n, F32);
    let loss_view = loss.view(0..n);
    let v_arg = v as i64;
    let write_grad: i32 = grad_scale.is_some().into();
    let scale = grad_scale.unwrap_or(0.0);
    let mut l = e.launch_builder("cross_entropy_rows");
    l.arg(&logits.ptr)
        .arg(&logits.dt)
        .arg(&targets_dev.ptr)
        .arg(&loss_view.ptr)
        .arg(&v_arg)
        .arg(&write_grad)
        .arg(&scale);
    l.launch(launch_cfg((blocks, 1, 1), (ROW_BLOCK, 1, 1)));
    loss.download()
}

/// adamw.rs `adamw`.
fn adamw(e: E, params: View, grads: View, m: View, v: View, h: AdamW) {
    let n = params.len;
    let step = h.step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - (h.beta1 as f64).powi(step);
    let bc2 = 1.0 - (h.beta2 as f64).powi(step);
    let step_size = (h.lr as f64 / bc1) as f32;
    let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
    let decay = 1.0 - h.lr * h.weight_decay;
    let (b1, b2, eps) = (h.beta1, h.beta2, h.eps);
    let n_arg = n as i64;
    let mut l = e.launch_builder("adamw_step");
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
    l.launch(stride_cfg(n));
}

/// attention.rs `Tiles` (itself mirroring AttnCfg of attention.cu).
#[derive(Clone, Copy)]
struct Tiles {
    pad: usize,
    fwd_warps: usize,
    fwd_bk: usize,
    bwd_b: usize,
}
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
    fn ldk(self, hd: usize) -> usize {
        hd.div_ceil(16) * 16 + self.pad
    }
    fn fwd_smem(self, dt: Dtype, hd: usize) -> usize {
        let (bq, bk) = (self.fwd_bq(), self.fwd_bk);
        ((bq + 2 * bk) * self.ldk(hd) + bq * (bk + self.pad)) * dt.size() + bk * 4
    }
    fn bwd_smem(self, dt: Dtype, hd: usize) -> usize {
        let bb = self.bwd_b;
        (4 * self.ldk(hd) + 2 * (bb + self.pad)) * bb * dt.size() + 3 * bb * 4
    }
}

/// attention.rs `check`'s dims (`vec` from the pointers the kernels load).
struct Dims {
    seq: i32,
    nh: i32,
    nkv: i32,
    hd: i32,
    scale: f32,
    vec: i32,
}
#[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
fn attn_dims(s: AttnShape, dt: Dtype, loaded: &[u64]) -> Dims {
    let vec = s.hd % (16 / dt.size()) == 0 && loaded.iter().all(|p| p % 16 == 0);
    Dims {
        seq: s.t as i32,
        nh: s.nh as i32,
        nkv: s.nkv as i32,
        hd: s.hd as i32,
        scale: 1.0 / (s.hd as f32).sqrt(),
        vec: vec as i32,
    }
}
fn attn_config(grid: (usize, usize, usize), threads: usize, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

/// attention.rs `forward`.
#[allow(clippy::too_many_arguments)]
fn attention_forward(
    e: E,
    out: View,
    lse: View,
    q: View,
    k: View,
    v: View,
    mask: Option<&[u8]>,
    s: AttnShape,
) {
    let dt = q.dtype;
    let d = attn_dims(s, dt, &[q.ptr, k.ptr, v.ptr]);
    let tiles = Tiles::of(dt);
    let mask_dev = mask.map(|m| DevInts::upload(e, m));
    let mask_ptr = mask_dev.as_ref().map_or(0, |m| m.ptr);
    let cfg = attn_config(
        (s.t.div_ceil(tiles.fwd_bq()), s.nh, s.b),
        32 * tiles.fwd_warps,
        tiles.fwd_smem(dt, s.hd),
    );
    let mut l = e.launch_builder(&format!("attention_forward_{}", dt.suffix()));
    l.arg(&out.ptr)
        .arg(&lse.ptr)
        .arg(&q.ptr)
        .arg(&k.ptr)
        .arg(&v.ptr)
        .arg(&mask_ptr)
        .arg(&d.seq)
        .arg(&d.nh)
        .arg(&d.nkv)
        .arg(&d.hd)
        .arg(&d.scale)
        .arg(&d.vec);
    l.launch(cfg);
}

/// attention.rs `backward`.
#[allow(clippy::too_many_arguments)]
fn attention_backward(
    e: E,
    dq: View,
    dk: View,
    dv: View,
    dout: View,
    q: View,
    k: View,
    v: View,
    out: View,
    lse: View,
    mask: Option<&[u8]>,
    s: AttnShape,
) {
    let dt = q.dtype;
    let d = attn_dims(s, dt, &[dout.ptr, q.ptr, k.ptr, v.ptr]);
    let tiles = Tiles::of(dt);
    let mask_dev = mask.map(|m| DevInts::upload(e, m));
    let mask_ptr = mask_dev.as_ref().map_or(0, |m| m.ptr);
    let sfx = dt.suffix();
    let lse_len = s.b * s.nh * s.t;

    // 1. D = rowsum(dout ∘ out)
    let dsum_buf = DevBuf::zeros(e, lse_len, F32);
    let dsum = dsum_buf.view(0..lse_len);
    let rows = (s.b * s.t * s.nh) as i64;
    const DOT_WARPS: usize = 8;
    let cfg = attn_config(
        ((rows as usize).div_ceil(DOT_WARPS), 1, 1),
        32 * DOT_WARPS,
        0,
    );
    let mut l = e.launch_builder(&format!("attention_backward_dot_{sfx}"));
    l.arg(&dsum.ptr)
        .arg(&dout.ptr)
        .arg(&out.ptr)
        .arg(&rows)
        .arg(&d.seq)
        .arg(&d.nh)
        .arg(&d.hd);
    l.launch(cfg);

    // 2. dk, dv
    let smem = tiles.bwd_smem(dt, s.hd);
    let threads = 32 * BWD_WARPS;
    let cfg = attn_config((s.t.div_ceil(tiles.bwd_b), s.nkv, s.b), threads, smem);
    let mut l = e.launch_builder(&format!("attention_backward_dkdv_{sfx}"));
    l.arg(&dk.ptr)
        .arg(&dv.ptr)
        .arg(&dout.ptr)
        .arg(&q.ptr)
        .arg(&k.ptr)
        .arg(&v.ptr)
        .arg(&lse.ptr)
        .arg(&dsum.ptr)
        .arg(&mask_ptr)
        .arg(&d.seq)
        .arg(&d.nh)
        .arg(&d.nkv)
        .arg(&d.hd)
        .arg(&d.scale)
        .arg(&d.vec);
    l.launch(cfg);

    // 3. dq
    let cfg = attn_config((s.t.div_ceil(tiles.bwd_b), s.nh, s.b), threads, smem);
    let mut l = e.launch_builder(&format!("attention_backward_dq_{sfx}"));
    l.arg(&dq.ptr)
        .arg(&dout.ptr)
        .arg(&q.ptr)
        .arg(&k.ptr)
        .arg(&v.ptr)
        .arg(&lse.ptr)
        .arg(&dsum.ptr)
        .arg(&mask_ptr)
        .arg(&d.seq)
        .arg(&d.nh)
        .arg(&d.nkv)
        .arg(&d.hd)
        .arg(&d.scale)
        .arg(&d.vec);
    l.launch(cfg);
}

// lora.rs: constants, Mask, weights_f32, skinny, rank_update, RowsPlan,
// rows_partial, reduce_partials, forward, backward.
const LORA_THREADS: u32 = 256;
const SKINNY_TILE: (usize, usize) = (64, 64);
const RANK_TILE: (usize, usize) = (128, 128);
const ROWS_TILE: (usize, usize) = (128, 64);
const CHUNK_ROW_STEP: usize = 64;
const ROWS_TARGET_BLOCKS: usize = 512;

struct LoraMask {
    _seeds: Option<DevInts>,
    seeds: u64,
    rows_per_sample: i32,
    threshold: u64,
    inv_keep: f32,
}

impl LoraMask {
    fn none() -> Self {
        LoraMask {
            _seeds: None,
            seeds: 0,
            rows_per_sample: 1,
            threshold: 0,
            inv_keep: 1.0,
        }
    }
    fn new(e: E, d: Option<LoraDropout<'_>>, n: usize) -> Self {
        let Some(d) = d else { return LoraMask::none() };
        if d.p == 0.0 || n == 0 {
            return LoraMask::none();
        }
        let seeds = DevInts::upload(e, d.seeds);
        LoraMask {
            seeds: seeds.ptr,
            _seeds: Some(seeds),
            rows_per_sample: d.rows_per_sample as i32,
            threshold: dropout_threshold(d.p),
            inv_keep: if d.p >= 1.0 { 0.0 } else { 1.0 / (1.0 - d.p) },
        }
    }
}

fn lora_weights_f32(e: E, a: View, b: View, keep: &mut Option<DevBuf>) -> (u64, u64) {
    let a_len = if a.dtype == Dtype::F32 { 0 } else { a.len };
    let b_len = if b.dtype == Dtype::F32 { 0 } else { b.len };
    if a_len + b_len == 0 {
        return (a.ptr, b.ptr);
    }
    let b_at = a_len.div_ceil(4) * 4;
    let buf = keep.insert(DevBuf::zeros(e, b_at + b_len, Dtype::F32));
    let mut ptrs = (a.ptr, b.ptr);
    if a_len > 0 {
        let dst = buf.view(0..a_len);
        ptrs.0 = dst.ptr;
        convert(e, dst, a);
    }
    if b_len > 0 {
        let dst = buf.view(b_at..b_at + b_len);
        ptrs.1 = dst.ptr;
        convert(e, dst, b);
    }
    ptrs
}

fn lora_block_cfg(grid: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (LORA_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[allow(clippy::too_many_arguments)]
fn lora_skinny(
    e: E,
    dt: Dtype,
    out: u64,
    p: u64,
    q: u64,
    (m, k, r): (usize, usize, usize),
    scale: f32,
    qt: bool,
    mask: &LoraMask,
) {
    let gx = m.div_ceil(SKINNY_TILE.0) as u32;
    let gy = r.div_ceil(16).div_ceil(SKINNY_TILE.1 / 16) as u32;
    if gx == 0 || gy == 0 {
        return;
    }
    let (m, k, r) = (m as i32, k as i32, r as i32);
    let qt = qt as i32;
    let mut l = e.launch_builder(&format!("lora_skinny_{}", dt.suffix()));
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
    l.launch(lora_block_cfg((gx, gy, 1)));
}

#[allow(clippy::too_many_arguments)]
fn lora_rank_update(
    e: E,
    dt: Dtype,
    out: u64,
    p: u64,
    q: u64,
    (m, nn, r): (usize, usize, usize),
    scale: f32,
    beta: bool,
    qt: bool,
    mask: &LoraMask,
) {
    let gx = nn.div_ceil(RANK_TILE.1) as u32;
    let gy = m.div_ceil(RANK_TILE.0) as u32;
    if gx == 0 || gy == 0 {
        return;
    }
    let (m, nn, r) = (m as i32, nn as i32, r as i32);
    let (beta, qt) = (beta as i32, qt as i32);
    let mut l = e.launch_builder(&format!("lora_rank_update_{}", dt.suffix()));
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
    l.launch(lora_block_cfg((gx, gy, 1)));
}

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

#[allow(clippy::too_many_arguments)]
fn lora_rows_partial(
    e: E,
    dt: Dtype,
    part: &DevBuf,
    p: u64,
    q: u64,
    (n, c, r): (usize, usize, usize),
    plan: &RowsPlan,
    transpose: bool,
    mask: &LoraMask,
) {
    assert!(part.dtype == Dtype::F32 && part.len >= plan.partial_len());
    let (gx, gy, gz) = (plan.c_tiles as u32, plan.chunks as u32, plan.r_tiles as u32);
    if gx == 0 || gy == 0 || gz == 0 {
        return;
    }
    let part_ptr = part.view(0..plan.partial_len()).ptr;
    let (n, c, r) = (n as i32, c as i32, r as i32);
    let chunk_rows = plan.chunk_rows as i32;
    let transpose = transpose as i32;
    let mut l = e.launch_builder(&format!("lora_rows_partial_{}", dt.suffix()));
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
    l.launch(lora_block_cfg((gx, gy, gz)));
}

#[allow(clippy::too_many_arguments)]
fn lora_reduce_partials(
    e: E,
    out: View,
    part: &DevBuf,
    chunks: usize,
    gstride: usize,
    (rows, cols): (usize, usize),
    (ldp, ldo): (usize, usize),
    scale: f32,
) {
    let total = rows * cols;
    if total == 0 || chunks == 0 {
        return;
    }
    assert!(
        part.dtype == Dtype::F32 && part.len >= (chunks - 1) * gstride + (rows - 1) * ldp + cols
    );
    assert!(out.len >= (rows - 1) * ldo + cols);
    let part_ptr = part.all().ptr;
    let (chunks, gstride) = (chunks as i32, gstride as i64);
    let (rows, cols) = (rows as i32, cols as i32);
    let (ldp, ldo) = (ldp as i64, ldo as i64);
    let mut l = e.launch_builder("lora_reduce_partials");
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
    l.launch(lora_block_cfg((grid_for(total, LORA_THREADS), 1, 1)));
}

/// gemm.rs `gemm` (cuBLAS, not ours): the CPU backend's gemm on the device
/// memory, with gemm.rs's choice of input type and one rounding of the result.
fn gemm(out: View, a: View, b: View, g: Gemm) {
    let inputs = if a.dtype == b.dtype {
        a.dtype
    } else if a.dtype == Dtype::F32 {
        b.dtype
    } else {
        a.dtype
    };
    let inputs = if inputs == Dtype::F32 && out.dtype != Dtype::F32 {
        out.dtype
    } else {
        inputs
    };
    let (ah, bh) = (
        round(inputs, &emu::read_view(a)),
        round(inputs, &emu::read_view(b)),
    );
    let mut oh = emu::read_view(out);
    Cpu.gemm(&mut oh, &ah, &bh, g).expect("cpu gemm");
    emu::write_view(out, &oh);
}

/// lora.rs `forward` (dt: the backend's compute dtype).
#[allow(clippy::too_many_arguments)]
fn lora_forward(
    e: E,
    dt: Dtype,
    y: View,
    xa: View,
    x: View,
    w: View,
    a: View,
    b: View,
    dropout: Option<LoraDropout<'_>>,
    s: LoraShape,
    accumulate: bool,
) {
    let (n, ni, no, r) = (s.n, s.n_in, s.n_out, s.r);
    let mask = LoraMask::new(e, dropout, n);
    let base = Gemm::linear(n, no, ni);
    if n == 0 || r == 0 {
        return gemm(y, x, w, Gemm { accumulate, ..base });
    }
    let mut keep = None;
    let (a32, b32) = lora_weights_f32(e, a, b, &mut keep);
    lora_skinny(
        e,
        dt,
        xa.ptr,
        x.ptr,
        a32,
        (n, ni, r),
        mask.inv_keep,
        false,
        &mask,
    );
    lora_rank_update(
        e,
        dt,
        y.ptr,
        xa.ptr,
        b32,
        (n, no, r),
        s.scaling,
        accumulate,
        false,
        &LoraMask::none(),
    );
    gemm(
        y,
        x,
        w,
        Gemm {
            accumulate: true,
            ..base
        },
    );
}

/// lora.rs `backward`.
#[allow(clippy::too_many_arguments)]
fn lora_backward(
    e: E,
    dt: Dtype,
    dx: View,
    da: Option<View>,
    db: Option<View>,
    scratch_dxa: View,
    dy: View,
    x: View,
    xa: View,
    w: View,
    a: View,
    b: View,
    dropout: Option<LoraDropout<'_>>,
    s: LoraShape,
) {
    let (n, ni, no, r) = (s.n, s.n_in, s.n_out, s.r);
    let mask = LoraMask::new(e, dropout, n);
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
        return gemm(dx, dy, w, base);
    }
    let mut keep = None;
    let (a32, b32) = lora_weights_f32(e, a, b, &mut keep);
    let dxa = scratch_dxa.ptr;
    lora_skinny(
        e,
        dt,
        dxa,
        dy.ptr,
        b32,
        (n, no, r),
        s.scaling,
        true,
        &LoraMask::none(),
    );
    lora_rank_update(
        e,
        dt,
        dx.ptr,
        dxa,
        a32,
        (n, ni, r),
        mask.inv_keep,
        true,
        true,
        &mask,
    );
    gemm(dx, dy, w, base);

    let plan_b = RowsPlan::new(n, no, r);
    let plan_a = RowsPlan::new(n, ni, r);
    let len = db
        .as_ref()
        .map_or(0, |_| plan_b.partial_len())
        .max(da.as_ref().map_or(0, |_| plan_a.partial_len()));
    if len == 0 {
        return;
    }
    let part = DevBuf::zeros(e, len, Dtype::F32);
    if let Some(db) = db {
        lora_rows_partial(
            e,
            dt,
            &part,
            dy.ptr,
            xa.ptr,
            (n, no, r),
            &plan_b,
            false,
            &LoraMask::none(),
        );
        let gstride = plan_b.cpad * plan_b.rp;
        lora_reduce_partials(
            e,
            db,
            &part,
            plan_b.chunks,
            gstride,
            (no, r),
            (plan_b.rp, r),
            s.scaling,
        );
    }
    if let Some(da) = da {
        lora_rows_partial(e, dt, &part, x.ptr, dxa, (n, ni, r), &plan_a, true, &mask);
        let gstride = plan_a.rp * plan_a.cpad;
        lora_reduce_partials(
            e,
            da,
            &part,
            plan_a.chunks,
            gstride,
            (r, ni),
            (plan_a.cpad, ni),
            mask.inv_keep,
        );
    }
}

// ---- the program ----------------------------------------------------------------------

/// Every kernel of the program is exercised by a test below.
#[test]
fn every_kernel_is_covered() {
    let Some(e) = emu::emu("every_kernel_is_covered") else {
        return;
    };
    let this = include_str!("emu_kernels.rs");
    let names: Vec<String> = e
        .kernel_names()
        .into_iter()
        .filter(|n| !n.starts_with("emu_selftest_"))
        .collect();
    assert_eq!(
        names,
        rlhf_kernels::cuda::kernel_names(),
        "the library holds the program's kernels"
    );
    for name in names {
        let templated = ["_f32", "_bf16", "_f16"]
            .iter()
            .find_map(|s| name.strip_suffix(s));
        let quoted = format!("\"{name}\"");
        let covered = this.contains(&quoted)
            || templated.is_some_and(|t| this.contains(&format!("\"{t}_{{")));
        assert!(
            covered,
            "kernel {name} has no emulated test: mirror its launcher here"
        );
    }
}

// ---- the emulator itself (kernels/emu/selftest.cu) ---------------------------------------

/// The source rewrite: inline PTX, static and dynamic shared memory; comments
/// and strings untouched, line numbers kept.
#[test]
fn emulator_rewrite() {
    let src = r#"__shared__ float g[4];
extern __shared__ float gdyn[];
// asm("nop"); in a comment, "__shared__" in a string:
const char* s = "asm __shared__";
__device__ void f(unsigned* r, const void* p) {
    __shared__ __align__(16) unsigned char smem[64];
    extern __shared__ __align__(128) unsigned char dyn[];
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(f2(p, 1)) // the address
                 : "memory");
    asm("mov.u32 %0, " /* two literals, */
        "%%laneid;" : "=r"(r[4]));
}
"#;
    let out = emu::rewrite(src).unwrap();
    // Same lines (a #line directive follows a file-scope macro).
    let lines = out.lines().filter(|l| !l.starts_with("#line")).count();
    assert_eq!(lines, src.lines().count(), "{out}");
    for want in [
        "static float g[4]; static ::emu::FileShared emu_file_shared_g(&g, sizeof(g));",
        "#define gdyn (reinterpret_cast<float*>(::emu::g_dyn_base))\n#line 3\n// asm",
        "// asm(\"nop\"); in a comment, \"__shared__\" in a string:",
        "const char* s = \"asm __shared__\";",
        "static __align__(16) unsigned char smem[64]; ::emu::shared_here(&smem, sizeof(smem));",
        "unsigned char* dyn = reinterpret_cast<unsigned char*>(::emu::g_dyn_base);",
        "::emu::ptx(\"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\\n\", \
         {::emu::asm_out(r[0]), ::emu::asm_out(r[1]), ::emu::asm_out(r[2]), ::emu::asm_out(r[3]), \
         ::emu::asm_in(f2(p, 1))});",
    ] {
        assert!(out.contains(want), "missing `{want}` in:\n{out}");
    }
    assert!(
        out.contains("\"%%laneid;\", {::emu::asm_out(r[4])});"),
        "{out}"
    );
    assert!(emu::rewrite("void f() { asm goto(\"x\" :::: l); }").is_err());
}

/// The <mma.h> shim (no kernel of the program uses wmma yet): d = 2·(a·b + c).
#[test]
fn emulator_wmma() {
    let Some(e) = emu::emu("emulator_wmma") else {
        return;
    };
    let mut r = rng(90);
    for dt in [Dtype::Bf16, Dtype::F16] {
        let (a, b, c) = (
            round(dt, &random(&mut r, 256, 1.0)),
            round(dt, &random(&mut r, 256, 1.0)),
            random(&mut r, 256, 1.0),
        );
        let (ab, bb, cb) = (
            DevBuf::upload(e, &a, dt),
            DevBuf::upload(e, &b, dt),
            DevBuf::upload(e, &c, F32),
        );
        let bf = (dt == Dtype::Bf16) as i32;
        let (pa, pb, pc) = (ab.all().ptr, bb.all().ptr, cb.all().ptr);
        let mut l = e.launch_builder("emu_selftest_wmma");
        l.arg(&pa).arg(&pb).arg(&pc).arg(&bf);
        l.launch(launch_cfg((1, 1, 1), (32, 1, 1)));
        let want: Vec<f32> = (0..256)
            .map(|i| {
                let (m, n) = (i / 16, i % 16);
                let dot: f64 = (0..16)
                    .map(|k| a[m * 16 + k] as f64 * b[n * 16 + k] as f64)
                    .sum();
                (2.0 * (dot + c[i] as f64)) as f32
            })
            .collect();
        assert_rel("wmma", dt, &cb.download(), &want, 1e-6);
    }
}

/// Shuffles, votes and __syncthreads against their definitions.
#[test]
fn emulator_warp_primitives() {
    let Some(e) = emu::emu("emulator_warp_primitives") else {
        return;
    };
    let mut r = rng(91);
    let n = 64;
    let mut v = random(&mut r, n, 1.0);
    v[32..].iter_mut().for_each(|x| *x = x.abs() + 0.5); // warp 1: all positive
    let vb = DevBuf::upload(e, &v, F32);
    let out = DevBuf::poisoned(e, 7 * n, F32);
    let (pv, po) = (vb.all().ptr, out.all().ptr);
    let mut l = e.launch_builder("emu_selftest_warp");
    l.arg(&pv).arg(&po);
    l.launch(launch_cfg((1, 1, 1), (n as u32, 1, 1)));
    let got = out.download();
    let total = v.iter().fold(0.0f32, |a, &x| a + x);
    for t in 0..n {
        let (w, l) = (t / 32 * 32, t % 32);
        let lane = |i: usize| v[w + i];
        let ballot = (0..32).fold(0u32, |b, i| b | ((lane(i) > 0.0) as u32) << i);
        let any = (0..32).any(|i| lane(i) > 0.0) as i32;
        let all = (0..32).all(|i| lane(i) > 0.0) as i32;
        let want = [
            lane(l ^ 5),
            lane(31 - l),
            if l + 3 < 32 { lane(l + 3) } else { v[t] },
            if l >= 3 { lane(l - 3) } else { v[t] },
            f32::from_bits(ballot),
            (any + 2 * all) as f32,
            total,
        ];
        assert_eq!(bits(&got[7 * t..7 * t + 7]), bits(&want), "thread {t}");
    }
}

/// A barrier some threads never reach, and a launch that does not match the
/// kernel's parameters, are reported (and the emulator keeps working).
#[test]
fn emulator_reports_errors() {
    let Some(e) = emu::emu("emulator_reports_errors") else {
        return;
    };
    let live = 40i32;
    let cfg = |threads| launch_cfg((1, 1, 1), (threads, 1, 1));
    let msg = e
        .launch_builder("emu_selftest_deadlock")
        .arg(&live)
        .try_launch(cfg(64))
        .unwrap_err();
    assert!(
        msg.contains("deadlock: 40 of 64 threads wait at __syncthreads, 24 have exited"),
        "{msg}"
    );
    let b = DevBuf::poisoned(e, 10, F32);
    let ptr = b.all().ptr;
    let (dt, n32, n64, v) = (0i32, 10i32, 10i64, 1.0f32);
    let msg = e
        .launch_builder("fill")
        .arg(&ptr)
        .arg(&dt)
        .arg(&n32)
        .arg(&v)
        .try_launch(cfg(32))
        .unwrap_err();
    assert!(
        msg.contains("argument 2 is 8 bytes, the launch passed 4"),
        "{msg}"
    ); // n is i64
    let msg = e
        .launch_builder("fill")
        .arg(&ptr)
        .arg(&dt)
        .arg(&n64)
        .try_launch(cfg(32))
        .unwrap_err();
    assert!(
        msg.contains("fill takes 4 arguments, the launch passed 3"),
        "{msg}"
    );
    let msg = e
        .launch_builder("fill")
        .arg(&ptr)
        .arg(&dt)
        .arg(&n64)
        .arg(&v)
        .try_launch(cfg(2048))
        .unwrap_err();
    assert!(msg.contains("invalid launch"), "{msg}");
    let msg = e
        .launch_builder("no_such_kernel")
        .try_launch(cfg(32))
        .unwrap_err();
    assert!(msg.contains("no kernel named no_such_kernel"), "{msg}");
    fill(e, b.all(), 2.0);
    assert_eq!(b.download(), vec![2.0; 10]);
}

// ---- memory ---------------------------------------------------------------------------

#[test]
fn fill_and_convert_match_cpu() {
    let Some(e) = emu::emu("fill_and_convert_match_cpu") else {
        return;
    };
    let mut r = rng(1);
    let n = 1000 + 3;
    for (dt, _) in DTYPES {
        let b = DevBuf::poisoned(e, n, dt);
        fill(e, b.all(), -0.3);
        let mut want = vec![f32::NAN; n];
        Cpu.fill(&mut want, -0.3).unwrap();
        assert_eq!(
            bits(&b.download()),
            bits(&round(dt, &want)),
            "fill [{}]",
            dt.name()
        );
    }
    // Every pair of storage types, with values that round, overflow fp16,
    // are fp16-subnormal or underflow it, signed zeros and infinities.
    let mut x = random(&mut r, n, 3.0);
    let special = [
        7e4,
        -7e4,
        65504.0,
        6e-5,
        3e-6,
        -2e-8,
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e30,
        1.0 + 1.0 / 256.0, // ties: bf16 rounds to even (down, up), fp16 too
        1.0 + 3.0 / 256.0,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        65520.0,                         // fp16: a tie between 65504 and 2^16 (inf)
        1.5 * 2f32.powi(-24),            // fp16 subnormal tie
        2f32.powi(-25),                  // fp16: a tie between 0 and the least subnormal
        2f32.powi(-25) + 2f32.powi(-40), // just above it
        2f32.powi(-14) - 2f32.powi(-25), // the subnormal / normal boundary
    ];
    x[..special.len()].copy_from_slice(&special);
    for (src_dt, _) in DTYPES {
        let src = DevBuf::upload(e, &x, src_dt);
        for (dst_dt, _) in DTYPES {
            let dst = DevBuf::poisoned(e, n, dst_dt);
            convert(e, dst.all(), src.all());
            let want = round(dst_dt, &round(src_dt, &x));
            assert_eq!(
                bits(&dst.download()),
                bits(&want),
                "convert {} -> {} (round to nearest even, as the half crate)",
                src_dt.name(),
                dst_dt.name()
            );
        }
    }
    // NaN stays NaN.
    let src = DevBuf::upload(e, &[f32::NAN, 1.0], F32);
    for (dt, _) in DTYPES {
        let dst = DevBuf::poisoned(e, 2, dt);
        fill(e, dst.all(), 0.0);
        convert(e, dst.all(), src.all());
        let got = dst.download();
        assert!(
            got[0].is_nan() && got[1] == 1.0,
            "convert NaN [{}]: {got:?}",
            dt.name()
        );
    }
}

// ---- elementwise ------------------------------------------------------------------------

#[test]
fn axpy_scale_sum_squares_match_cpu() {
    let Some(e) = emu::emu("axpy_scale_sum_squares_match_cpu") else {
        return;
    };
    let mut r = rng(2);
    for (dt, tol) in DTYPES {
        let n = 3000 + 13;
        let x = random(&mut r, n, 1.0);
        let y0 = random(&mut r, n, 1.0);
        let xb = DevBuf::upload(e, &x, dt);
        // An f32 accumulator and a compute-dtype y.
        for ydt in [F32, dt] {
            let yb = DevBuf::upload(e, &y0, ydt);
            axpy(e, yb.all(), -0.75, xb.all());
            let mut want = round(ydt, &y0);
            Cpu.axpy(&mut want, -0.75, &round(dt, &x)).unwrap();
            assert_rel(
                &format!("axpy (y {})", ydt.name()),
                dt,
                &yb.download(),
                &want,
                tol,
            );
        }
        for p in [F32, dt] {
            let b = DevBuf::upload(e, &x, p);
            scale(e, b.all(), -1.5);
            let mut want = round(p, &x);
            Cpu.scale(&mut want, -1.5).unwrap();
            assert_rel("scale", dt, &b.download(), &want, tol);
        }
        // One block with idle threads; several blocks.
        for n in [100, 9000] {
            let x = random(&mut r, n, 2.0);
            let b = DevBuf::upload(e, &x, dt);
            let got = deterministic("sum_squares", || vec![vec![sum_squares(e, b.all()) as f32]]);
            let got64 = sum_squares(e, b.all());
            let want = Cpu.sum_squares(&round(dt, &x)).unwrap();
            assert!(
                (got64 - want).abs() <= 1e-12 * want,
                "sum_squares n={n} [{}]: {got64} vs {want}",
                dt.name()
            );
            assert_eq!(got[0][0], got64 as f32);
        }
        // inf and NaN propagate.
        let mut x = random(&mut r, 5000, 1.0);
        x[4321] = f32::INFINITY;
        assert_eq!(
            sum_squares(e, DevBuf::upload(e, &x, dt).all()),
            f64::INFINITY
        );
        x[17] = f32::NAN;
        assert!(sum_squares(e, DevBuf::upload(e, &x, dt).all()).is_nan());
    }
    // Long enough that the grid is capped (1024 blocks, each thread strides).
    let x = random(&mut r, 4_500_001, 1.0);
    let got = sum_squares(e, DevBuf::upload(e, &x, F32).all());
    let want = Cpu.sum_squares(&x).unwrap();
    assert!(
        (got - want).abs() <= 1e-12 * want,
        "sum_squares (capped grid): {got} vs {want}"
    );
}

// ---- bias ---------------------------------------------------------------------------------

#[test]
fn bias_matches_cpu() {
    let Some(e) = emu::emu("bias_matches_cpu") else {
        return;
    };
    let mut r = rng(3);
    // 150 rows: three chunks of the column reduction; 70 columns: a partial
    // warp of columns; 300: two column blocks.
    let rows = 150;
    for (c, dt, tol) in DTYPES
        .iter()
        .flat_map(|&(dt, tol)| [(70, dt, tol), (300, dt, tol)])
    {
        for bdt in [F32, dt] {
            let x = random(&mut r, rows * c, 1.0);
            let bias = random(&mut r, c, 1.0);
            let xb = DevBuf::upload(e, &x, dt);
            let bb = DevBuf::upload(e, &bias, bdt);
            add_bias(e, xb.all(), bb.all(), c);
            let mut want = round(dt, &x);
            Cpu.add_bias(&mut want, &round(bdt, &bias), c).unwrap();
            assert_rel(
                &format!("add_bias (bias {})", bdt.name()),
                dt,
                &xb.download(),
                &want,
                tol,
            );
        }
        let dout = random(&mut r, rows * c, 1.0);
        let db0 = random(&mut r, c, 1.0);
        let doutb = DevBuf::upload(e, &dout, dt);
        let got = deterministic("bias_backward", || {
            let dbb = DevBuf::upload(e, &db0, F32);
            bias_backward(e, dbb.all(), doutb.all(), c);
            vec![dbb.download()]
        });
        let mut want = db0.clone();
        Cpu.bias_backward(&mut want, &round(dt, &dout), c).unwrap();
        assert_rel("bias_backward", dt, &got[0], &want, tol);
    }
}

// ---- embedding ----------------------------------------------------------------------------

#[test]
fn embedding_matches_cpu() {
    let Some(e) = emu::emu("embedding_matches_cpu") else {
        return;
    };
    let mut r = rng(4);
    let n = 64;
    // C = 48: one column per thread; C = 300: threads stride over the columns.
    for (v, c, dt, tol) in DTYPES
        .iter()
        .flat_map(|&(dt, tol)| [(37, 48, dt, tol), (20, 300, dt, tol)])
    {
        let mut ids: Vec<u32> = (0..n).map(|_| r.random_range(0..v as u32)).collect();
        ids[n - 1] = ids[0];
        ids[1] = v as u32 - 1;
        for tp in [F32, dt] {
            let table = random(&mut r, v * c, 1.0);
            let tb = DevBuf::upload(e, &table, tp);
            let out = DevBuf::poisoned(e, n * c, dt);
            embedding_forward(e, out.all(), tb.all(), &ids, c);
            let mut want = vec![0.0f32; n * c];
            Cpu.embedding_forward(&mut want, &round(tp, &table), &ids, c)
                .unwrap();
            assert_rel("embedding_forward", dt, &out.download(), &want, tol);
        }
        let dout = random(&mut r, n * c, 1.0);
        let dt0 = random(&mut r, v * c, 1.0);
        let doutb = DevBuf::upload(e, &dout, dt);
        let got = deterministic("embedding_backward", || {
            let dtb = DevBuf::upload(e, &dt0, F32);
            embedding_backward(e, dtb.all(), doutb.all(), &ids, c);
            vec![dtb.download()]
        });
        let mut want = dt0.clone();
        Cpu.embedding_backward(&mut want, &round(dt, &dout), &ids, c)
            .unwrap();
        assert_rel("embedding_backward", dt, &got[0], &want, tol);
    }
}

// ---- RMSNorm -------------------------------------------------------------------------------

#[test]
fn rmsnorm_matches_cpu() {
    let Some(e) = emu::emu("rmsnorm_matches_cpu") else {
        return;
    };
    let mut r = rng(5);
    let eps = 1e-6f32;
    // 70 rows: two chunks of the dw reduction; 200 columns: idle threads in a
    // row block; 600: threads stride over the row.
    let n = 70;
    for (c, dt, tol) in DTYPES
        .iter()
        .flat_map(|&(dt, tol)| [(200, dt, tol), (600, dt, tol)])
    {
        for wp in [F32, dt] {
            let x = random(&mut r, n * c, 2.0);
            let w: Vec<f32> = random(&mut r, c, 0.5).iter().map(|v| 1.0 + v).collect();
            let (xr, wr) = (round(dt, &x), round(wp, &w));
            let (xb, wb) = (DevBuf::upload(e, &x, dt), DevBuf::upload(e, &w, wp));
            let fwd = deterministic("rmsnorm_forward", || {
                let out = DevBuf::poisoned(e, n * c, dt);
                let rstd = DevBuf::poisoned(e, n, F32);
                rmsnorm_forward(e, out.all(), rstd.all(), xb.all(), wb.all(), c, eps);
                vec![out.download(), rstd.download()]
            });
            let mut want_out = vec![0.0; n * c];
            let mut want_rstd = vec![0.0; n];
            Cpu.rmsnorm_forward(&mut want_out, &mut want_rstd, &xr, &wr, c, eps)
                .unwrap();
            assert_rel("rmsnorm out", dt, &fwd[0], &want_out, tol);
            assert_rel("rmsnorm rstd", dt, &fwd[1], &want_rstd, 1e-6);

            let dout = random(&mut r, n * c, 1.0);
            let dx0 = random(&mut r, n * c, 1.0);
            let dw0 = random(&mut r, c, 1.0);
            let doutb = DevBuf::upload(e, &dout, dt);
            let rstdb = DevBuf::upload(e, &want_rstd, F32);
            for with_dw in [true, false] {
                let got = deterministic("rmsnorm_backward", || {
                    let dxb = DevBuf::upload(e, &dx0, dt);
                    let dwb = DevBuf::upload(e, &dw0, F32);
                    let dw = with_dw.then(|| dwb.all());
                    rmsnorm_backward(
                        e,
                        dxb.all(),
                        dw,
                        doutb.all(),
                        xb.all(),
                        wb.all(),
                        rstdb.all(),
                        c,
                    );
                    vec![dxb.download(), dwb.download()]
                });
                let mut want_dx = round(dt, &dx0);
                let mut want_dw = dw0.clone();
                Cpu.rmsnorm_backward(
                    &mut want_dx,
                    with_dw.then_some(&mut want_dw[..]),
                    &round(dt, &dout),
                    &xr,
                    &wr,
                    &want_rstd,
                    c,
                )
                .unwrap();
                assert_rel("rmsnorm dx", dt, &got[0], &want_dx, tol);
                if with_dw {
                    assert_rel("rmsnorm dw", dt, &got[1], &want_dw, tol);
                } else {
                    assert_eq!(bits(&got[1]), bits(&dw0), "rmsnorm without dw wrote dw");
                }
            }
        }
    }
}

// ---- rotary embedding -------------------------------------------------------------------------

#[test]
fn rope_matches_cpu() {
    let Some(e) = emu::emu("rope_matches_cpu") else {
        return;
    };
    let mut r = rng(6);
    let (n, heads, hd, p) = (12, 3, 16, 40);
    let half = hd / 2;
    let angle = |pos: usize, i: usize| pos as f32 / 10_000f32.powf(2.0 * i as f32 / hd as f32);
    let cos: Vec<f32> = (0..p * half)
        .map(|k| angle(k / half, k % half).cos())
        .collect();
    let sin: Vec<f32> = (0..p * half)
        .map(|k| angle(k / half, k % half).sin())
        .collect();
    let positions: Vec<u32> = (0..n).map(|_| r.random_range(0..p as u32)).collect();
    let (cb, sb) = (DevBuf::upload(e, &cos, F32), DevBuf::upload(e, &sin, F32));
    for (dt, tol) in DTYPES {
        for backward in [false, true] {
            let x = random(&mut r, n * heads * hd, 1.0);
            let xb = DevBuf::upload(e, &x, dt);
            rope_apply(
                e,
                xb.all(),
                cb.all(),
                sb.all(),
                &positions,
                heads,
                hd,
                backward,
            );
            let mut want = round(dt, &x);
            if backward {
                Cpu.rope_backward(&mut want, &cos, &sin, &positions, heads, hd)
                    .unwrap();
            } else {
                Cpu.rope_forward(&mut want, &cos, &sin, &positions, heads, hd)
                    .unwrap();
            }
            assert_rel(
                if backward {
                    "rope_backward"
                } else {
                    "rope_forward"
                },
                dt,
                &xb.download(),
                &want,
                tol,
            );
        }
    }
}

// ---- SwiGLU --------------------------------------------------------------------------------------

#[test]
fn swiglu_matches_cpu() {
    let Some(e) = emu::emu("swiglu_matches_cpu") else {
        return;
    };
    let mut r = rng(7);
    let n = 2000 + 7;
    for (dt, tol) in DTYPES {
        let mut gate = random(&mut r, n, 4.0);
        gate[0] = 80.0; // saturated sigmoids stay finite
        gate[1] = -80.0;
        let up = random(&mut r, n, 2.0);
        let (gr, ur) = (round(dt, &gate), round(dt, &up));
        let (gb, ub) = (DevBuf::upload(e, &gate, dt), DevBuf::upload(e, &up, dt));
        let out = DevBuf::poisoned(e, n, dt);
        swiglu_forward(e, out.all(), gb.all(), ub.all());
        let mut want = vec![0.0; n];
        Cpu.swiglu_forward(&mut want, &gr, &ur).unwrap();
        assert_rel("swiglu_forward", dt, &out.download(), &want, tol);

        let dout = random(&mut r, n, 1.0);
        let (dg0, du0) = (random(&mut r, n, 1.0), random(&mut r, n, 1.0));
        let (dgb, dub) = (DevBuf::upload(e, &dg0, dt), DevBuf::upload(e, &du0, dt));
        swiglu_backward(
            e,
            dgb.all(),
            dub.all(),
            DevBuf::upload(e, &dout, dt).all(),
            gb.all(),
            ub.all(),
        );
        let (mut wg, mut wu) = (round(dt, &dg0), round(dt, &du0));
        Cpu.swiglu_backward(&mut wg, &mut wu, &round(dt, &dout), &gr, &ur)
            .unwrap();
        assert_rel("swiglu dgate", dt, &dgb.download(), &wg, tol);
        assert_rel("swiglu dup", dt, &dub.download(), &wu, tol);
    }
}

// ---- dropout -------------------------------------------------------------------------------------

#[test]
fn dropout_matches_cpu_mask_exactly() {
    let Some(e) = emu::emu("dropout_matches_cpu_mask_exactly") else {
        return;
    };
    let mut r = rng(8);
    let n = 3000 + 1;
    for (dt, tol) in DTYPES {
        for (p, seed) in [
            (0.3f32, 0x1234_5678_9abc_def0u64),
            (0.9, 7),
            (0.0, 1),
            (1.0, 2),
        ] {
            let x = nonzero(&mut r, n);
            let xb = DevBuf::upload(e, &x, dt);
            let out = DevBuf::poisoned(e, n, dt);
            dropout(e, false, out.all(), xb.all(), p, seed);
            let got = out.download();
            let mut want = vec![0.0; n];
            Cpu.dropout_forward(&mut want, &round(dt, &x), p, seed)
                .unwrap();
            for i in 0..n {
                let keep = dropout_keep(seed, i as u64, p);
                assert_eq!(
                    got[i] != 0.0,
                    keep,
                    "dropout_forward p={p} element {i} [{}]",
                    dt.name()
                );
                assert_eq!(want[i] != 0.0, keep, "cpu dropout p={p} element {i}");
            }
            assert_rel(&format!("dropout_forward p={p}"), dt, &got, &want, tol);

            let dout = nonzero(&mut r, n);
            let dx0 = random(&mut r, n, 1.0);
            let dxb = DevBuf::upload(e, &dx0, dt);
            dropout(
                e,
                true,
                dxb.all(),
                DevBuf::upload(e, &dout, dt).all(),
                p,
                seed,
            );
            let mut want = round(dt, &dx0);
            Cpu.dropout_backward(&mut want, &round(dt, &dout), p, seed)
                .unwrap();
            let got = dxb.download();
            let dx0r = round(dt, &dx0);
            for i in 0..n {
                if !dropout_keep(seed, i as u64, p) {
                    assert_eq!(
                        got[i], dx0r[i],
                        "dropout_backward p={p}: dropped element {i} changed"
                    );
                }
            }
            assert_rel(&format!("dropout_backward p={p}"), dt, &got, &want, tol);
        }
    }
}

// ---- cross-entropy ----------------------------------------------------------------------------------

#[test]
fn cross_entropy_matches_cpu() {
    let Some(e) = emu::emu("cross_entropy_matches_cpu") else {
        return;
    };
    let mut r = rng(9);
    // V = 300 < 512 threads (idle threads), V = 1100 (a thread reads several
    // logits); ignored rows; the first and last ids.
    for (v, dt, tol) in DTYPES
        .iter()
        .flat_map(|&(dt, tol)| [(300, dt, tol), (1100, dt, tol)])
    {
        let targets = [-100, 0, v as i32 - 1, 5, -100, 150, 42];
        let n = targets.len();
        let mut logits = random(&mut r, n * v, 4.0);
        logits[3 * v + 7] = 40.0; // a dominant logit
        logits[5 * v..6 * v].iter_mut().for_each(|x| *x -= 30.0); // a shifted row
        let lr = round(dt, &logits);
        for grad_scale in [None, Some(0.25f32)] {
            let got = deterministic("cross_entropy", || {
                let lb = DevBuf::upload(e, &logits, dt);
                let loss = cross_entropy(e, lb.all(), &targets, v, grad_scale);
                vec![loss, lb.download()]
            });
            let mut want_logits = lr.clone();
            let want = Cpu
                .cross_entropy(&mut want_logits, &targets, v, grad_scale)
                .unwrap();
            assert_rel(
                &format!("cross_entropy loss {grad_scale:?}"),
                dt,
                &got[0],
                &want,
                tol.max(1e-6),
            );
            for (row, &t) in targets.iter().enumerate() {
                if t == -100 {
                    assert_eq!(got[0][row], 0.0, "ignored row {row} has a loss");
                }
            }
            if grad_scale.is_some() {
                assert_rel("cross_entropy grad", dt, &got[1], &want_logits, tol);
            } else {
                assert_eq!(
                    bits(&got[1]),
                    bits(&lr),
                    "cross_entropy without grad_scale wrote the logits"
                );
            }
        }
    }
    // A NaN logit makes the row's loss NaN (the kernel's documented
    // behaviour). NOTE: the CPU op differs here — its simd::exp maps NaN to
    // about 1.6e-38, so its loss stays finite — hence no comparison.
    for (dt, _) in DTYPES {
        let mut logits = vec![0.5f32; 2 * 40];
        logits[7] = f32::NAN;
        let lb = DevBuf::upload(e, &logits, dt);
        let loss = cross_entropy(e, lb.all(), &[3, 3], 40, Some(1.0));
        assert!(
            loss[0].is_nan() && (loss[1] - 40f32.ln()).abs() < 1e-6,
            "{loss:?} [{}]",
            dt.name()
        );
    }
}

// ---- AdamW -------------------------------------------------------------------------------------------

#[test]
fn adamw_matches_cpu() {
    let Some(e) = emu::emu("adamw_matches_cpu") else {
        return;
    };
    let mut r = rng(10);
    let n = 1000 + 5; // params, grads and moments are always f32
    for step in [1u64, 10] {
        let h = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            step,
        };
        let p0 = random(&mut r, n, 1.0);
        let g = random(&mut r, n, 1e-2);
        let m0 = random(&mut r, n, 1e-3);
        let v0: Vec<f32> = random(&mut r, n, 1e-4).iter().map(|x| x.abs()).collect();
        let (pb, gb, mb, vb) = (
            DevBuf::upload(e, &p0, F32),
            DevBuf::upload(e, &g, F32),
            DevBuf::upload(e, &m0, F32),
            DevBuf::upload(e, &v0, F32),
        );
        adamw(e, pb.all(), gb.all(), mb.all(), vb.all(), h);
        let (mut wp, mut wm, mut wv) = (p0.clone(), m0.clone(), v0.clone());
        Cpu.adamw(&mut wp, &g, &mut wm, &mut wv, h).unwrap();
        assert_rel("adamw params", F32, &pb.download(), &wp, 1e-6);
        assert_rel("adamw m", F32, &mb.download(), &wm, 1e-6);
        assert_rel("adamw v", F32, &vb.download(), &wv, 1e-6);
    }
}

// ---- attention ----------------------------------------------------------------------------------------

/// Sample 0 left-padded (its first rows see no key), the last one
/// right-padded, holes in between (as tests/cuda_attention.rs).
fn padding_mask(s: AttnShape) -> Vec<u8> {
    let t = s.t;
    let mut m = vec![1u8; s.b * t];
    m[..t / 3].fill(0);
    let last = (s.b - 1) * t;
    m[last + t - t / 4..last + t].fill(0);
    for bi in 0..s.b {
        for j in (bi + 5..t).step_by(11) {
            m[bi * t + j] = 0;
        }
    }
    m
}

/// The key mask of a case.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Keys {
    All,
    /// padding_mask
    Padded,
    /// padding_mask, and the last sample all padding
    EmptySample,
}

/// `off`: every tensor is a view that many elements into its buffer.
fn attention_case(e: E, seed: u64, s: AttnShape, keys: Keys, rerun: bool) {
    attention_case_at(e, seed, s, keys, rerun, 0)
}

fn attention_case_at(e: E, seed: u64, s: AttnShape, keys: Keys, rerun: bool, off: usize) {
    let masked = keys != Keys::All;
    let mask_v = masked.then(|| {
        let mut m = padding_mask(s);
        if keys == Keys::EmptySample {
            m[(s.b - 1) * s.t..].fill(0);
        }
        m
    });
    let mask = mask_v.as_deref();
    let (nq, nk, nl) = (
        s.b * s.t * s.nh * s.hd,
        s.b * s.t * s.nkv * s.hd,
        s.b * s.nh * s.t,
    );
    let mut r = rng(seed);
    let (q, k, v, dout) = (
        random(&mut r, nq, 1.0),
        random(&mut r, nk, 1.0),
        random(&mut r, nk, 1.0),
        random(&mut r, nq, 1.0),
    );
    for (dt, tol) in DTYPES {
        let what = |name: &str| format!("attention {name} {s:?} {keys:?}");
        let (qr, kr, vr, dr) = (
            round(dt, &q),
            round(dt, &k),
            round(dt, &v),
            round(dt, &dout),
        );
        let (qb, kb, vb, db) = (
            DevBuf::upload_at(e, &q, dt, off),
            DevBuf::upload_at(e, &k, dt, off),
            DevBuf::upload_at(e, &v, dt, off),
            DevBuf::upload_at(e, &dout, dt, off),
        );

        // ---- forward ----
        let mut out_cpu = vec![0.0; nq];
        let mut lse_cpu = vec![0.0; nl];
        Cpu.attention_forward(&mut out_cpu, &mut lse_cpu, &qr, &kr, &vr, mask, s)
            .unwrap();
        let run_fwd = || {
            let out = DevBuf::poisoned_at(e, nq, dt, off);
            let lse = DevBuf::poisoned_at(e, nl, F32, off);
            attention_forward(
                e,
                out.all(),
                lse.all(),
                qb.all(),
                kb.all(),
                vb.all(),
                mask,
                s,
            );
            vec![out.download(), lse.download()]
        };
        let fwd = if rerun {
            deterministic(&what("forward"), run_fwd)
        } else {
            run_fwd()
        };
        let (out, lse) = (&fwd[0], &fwd[1]);
        assert_rel(&what("out"), dt, out, &out_cpu, tol);
        let (mut got, mut want, mut hidden) = (Vec::new(), Vec::new(), 0);
        for (row, (&g, &w)) in lse.iter().zip(&lse_cpu).enumerate() {
            if w == f32::NEG_INFINITY {
                hidden += 1;
                assert_eq!(g, f32::NEG_INFINITY, "{}: lse[{row}]", what("lse"));
                let (bh, i) = (row / s.t, row % s.t);
                let (bi, h) = (bh / s.nh, bh % s.nh);
                let o = ((bi * s.t + i) * s.nh + h) * s.hd;
                assert!(
                    out[o..o + s.hd].iter().all(|&x| x == 0.0),
                    "{}: hidden row {row} not 0",
                    what("out")
                );
            } else {
                got.push(g);
                want.push(w);
            }
        }
        assert_eq!(
            hidden > 0,
            masked,
            "the mask must hide whole rows (and only then)"
        );
        assert_rel(&what("lse"), dt, &got, &want, tol.min(1e-4));

        // ---- backward: the CPU's out (rounded) and lse, random initial gradients ----
        let out_r = round(dt, &out_cpu);
        let (mut gq, mut gk, mut gv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
        Cpu.attention_backward(
            &mut gq, &mut gk, &mut gv, &dr, &qr, &kr, &vr, &out_r, &lse_cpu, mask, s,
        )
        .unwrap();
        // Initial gradients about as large as the gradients (both a missing +=
        // and an overwrite show), not below 1e-3 (T = 1: dq is rounding noise).
        let dq0 = round(dt, &random(&mut r, nq, rms(&gq).max(1e-3)));
        let dk0 = round(dt, &random(&mut r, nk, rms(&gk).max(1e-3)));
        let dv0 = round(dt, &random(&mut r, nk, rms(&gv).max(1e-3)));
        let (mut wq, mut wk, mut wv) = (dq0.clone(), dk0.clone(), dv0.clone());
        Cpu.attention_backward(
            &mut wq, &mut wk, &mut wv, &dr, &qr, &kr, &vr, &out_r, &lse_cpu, mask, s,
        )
        .unwrap();
        let (outb, lseb) = (
            DevBuf::upload_at(e, &out_r, dt, off),
            DevBuf::upload_at(e, &lse_cpu, F32, off),
        );
        let run_bwd = || {
            let (dqb, dkb, dvb) = (
                DevBuf::upload_at(e, &dq0, dt, off),
                DevBuf::upload_at(e, &dk0, dt, off),
                DevBuf::upload_at(e, &dv0, dt, off),
            );
            attention_backward(
                e,
                dqb.all(),
                dkb.all(),
                dvb.all(),
                db.all(),
                qb.all(),
                kb.all(),
                vb.all(),
                outb.all(),
                lseb.all(),
                mask,
                s,
            );
            vec![dqb.download(), dkb.download(), dvb.download()]
        };
        let bwd = if rerun {
            deterministic(&what("backward"), run_bwd)
        } else {
            run_bwd()
        };
        assert_rel(&what("dq"), dt, &bwd[0], &wq, tol);
        assert_rel(&what("dk"), dt, &bwd[1], &wk, tol);
        assert_rel(&what("dv"), dt, &bwd[2], &wv, tol);
    }
}

fn shape(b: usize, t: usize, nh: usize, nkv: usize, hd: usize) -> AttnShape {
    AttnShape { b, t, nh, nkv, hd }
}

#[test]
fn attention_hd32_matches_cpu() {
    let Some(e) = emu::emu("attention_hd32_matches_cpu") else {
        return;
    };
    attention_case(e, 100, shape(2, 40, 4, 2, 32), Keys::All, true);
    attention_case(e, 101, shape(2, 40, 4, 2, 32), Keys::Padded, false);
}

#[test]
fn attention_hd64_matches_cpu() {
    let Some(e) = emu::emu("attention_hd64_matches_cpu") else {
        return;
    };
    attention_case(e, 102, shape(2, 40, 4, 2, 64), Keys::All, false);
    attention_case(e, 103, shape(2, 40, 4, 2, 64), Keys::Padded, true);
}

/// The largest head dim, T not a multiple of any tile (the GPU test's main case).
#[test]
fn attention_hd128_matches_cpu() {
    let Some(e) = emu::emu("attention_hd128_matches_cpu") else {
        return;
    };
    attention_case(e, 106, shape(2, 77, 4, 2, 128), Keys::Padded, false);
}

/// Head dims that are not a multiple of 16 (zero-padded tiles): 40 (16-byte
/// loads for every type), 33 (element loads for every type); 3 query heads
/// per kv head.
#[test]
fn attention_odd_head_dims_match_cpu() {
    let Some(e) = emu::emu("attention_odd_head_dims_match_cpu") else {
        return;
    };
    attention_case(e, 104, shape(1, 21, 3, 1, 40), Keys::Padded, false);
    attention_case(e, 105, shape(1, 18, 2, 1, 33), Keys::All, false);
}

/// No grouping (NH = NKV) with T below one tile, a group of 8 query heads,
/// T = 2, a head dim of 1, and a sample whose keys are all padding.
#[test]
fn attention_edge_cases_match_cpu() {
    let Some(e) = emu::emu("attention_edge_cases_match_cpu") else {
        return;
    };
    attention_case(e, 107, shape(3, 9, 2, 2, 16), Keys::Padded, true);
    attention_case(e, 108, shape(2, 33, 8, 1, 64), Keys::Padded, false);
    attention_case(e, 109, shape(1, 2, 1, 1, 8), Keys::All, false);
    attention_case(e, 110, shape(1, 17, 2, 2, 1), Keys::All, false);
    attention_case(e, 111, shape(2, 37, 4, 2, 64), Keys::EmptySample, false);
    // Views one element into their buffers: the launcher turns 16-byte loads off.
    attention_case_at(e, 112, shape(2, 40, 4, 2, 64), Keys::Padded, false, 1);
}

// ---- LoRA ----------------------------------------------------------------------------------------------

struct LoraCase {
    s: LoraShape,
    accumulate: bool,
    /// (p, seeds, rows per sample)
    dropout: Option<(f32, Vec<u64>, usize)>,
    /// A and B stored in the compute type instead of f32 (the launcher converts them).
    weights_compute: bool,
    /// Every tensor is a view this many elements into its buffer (misaligned
    /// for vector loads and paired stores unless a multiple of 16 bytes).
    offset: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    y0: Vec<f32>,
    dy: Vec<f32>,
    xa: Vec<f32>,
    dx0: Vec<f32>,
    da0: Vec<f32>,
    db0: Vec<f32>,
}

impl LoraCase {
    fn new(
        seed: u64,
        (n, n_in, n_out, r): (usize, usize, usize, usize),
        accumulate: bool,
        dropout: Option<(f32, usize)>,
    ) -> Self {
        let mut g = rng(seed);
        let dropout = dropout.map(|(p, samples)| {
            assert_eq!(n % samples, 0);
            let seeds = (0..samples as u64)
                .map(|i| 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(seed + 7 * i + 1))
                .collect();
            (p, seeds, n / samples)
        });
        LoraCase {
            s: LoraShape {
                n,
                n_in,
                n_out,
                r,
                scaling: 2.0,
            },
            accumulate,
            dropout,
            weights_compute: false,
            offset: 0,
            x: random(&mut g, n * n_in, 1.0),
            w: random(&mut g, n_out * n_in, 0.05),
            a: random(&mut g, r * n_in, 0.1),
            b: random(&mut g, n_out * r, 0.1),
            y0: random(&mut g, n * n_out, 0.5),
            dy: random(&mut g, n * n_out, 1.0),
            xa: random(&mut g, n * r, 1.0),
            dx0: random(&mut g, n * n_in, 0.5),
            da0: random(&mut g, r * n_in, 1.0),
            db0: random(&mut g, n_out * r, 1.0),
        }
    }

    fn drop(&self) -> Option<LoraDropout<'_>> {
        self.dropout.as_ref().map(|(p, seeds, rps)| LoraDropout {
            p: *p,
            seeds,
            rows_per_sample: *rps,
        })
    }

    fn label(&self) -> String {
        let s = self.s;
        format!(
            "lora n={} in={} out={} r={} accumulate={} dropout={:?} weights_compute={} offset={}",
            s.n,
            s.n_in,
            s.n_out,
            s.r,
            self.accumulate,
            self.dropout.as_ref().map(|d| d.0),
            self.weights_compute,
            self.offset
        )
    }

    fn check(&self, e: E, dt: Dtype, tol: f64, frozen: (bool, bool), rerun: bool) {
        let s = self.s;
        let (n, ni, no, r) = (s.n, s.n_in, s.n_out, s.r);
        let label = self.label();
        let up = |h: &[f32], dt| DevBuf::upload_at(e, h, dt, self.offset);
        let nan = |n, dt| DevBuf::poisoned_at(e, n, dt, self.offset);
        let wdt = if self.weights_compute { dt } else { F32 };
        let c = |v: &[f32]| round(dt, v);
        let (x, w, a, b) = (
            c(&self.x),
            c(&self.w),
            round(wdt, &self.a),
            round(wdt, &self.b),
        );
        let (xb, wb, ab, bb) = (up(&x, dt), up(&w, dt), up(&a, wdt), up(&b, wdt));

        // ---- forward ----
        let run_fwd = || {
            let y = if self.accumulate {
                up(&self.y0, dt)
            } else {
                nan(n * no, dt)
            };
            let xa = nan(n * r, dt);
            lora_forward(
                e,
                dt,
                y.all(),
                xa.all(),
                xb.all(),
                wb.all(),
                ab.all(),
                bb.all(),
                self.drop(),
                s,
                self.accumulate,
            );
            vec![y.download(), xa.download()]
        };
        let fwd = if rerun {
            deterministic(&format!("{label} forward"), run_fwd)
        } else {
            run_fwd()
        };
        let mut y_ref = if self.accumulate {
            c(&self.y0)
        } else {
            vec![f32::NAN; n * no]
        };
        let mut xa_ref = vec![f32::NAN; n * r];
        let mut scratch = vec![f32::NAN; n * ni];
        Cpu.lora_linear_forward(
            &mut y_ref,
            &mut xa_ref,
            &mut scratch,
            &x,
            &w,
            &a,
            &b,
            self.drop(),
            s,
            self.accumulate,
        )
        .unwrap();
        assert_rel(&format!("y {label}"), dt, &fwd[0], &y_ref, tol);
        assert_rel(&format!("xa {label}"), dt, &fwd[1], &xa_ref, tol);

        // ---- backward ----
        let (dy, xa) = (c(&self.dy), c(&self.xa));
        let (dyb, xab) = (up(&dy, dt), up(&xa, dt));
        let run_bwd = || {
            let dx = up(&self.dx0, dt);
            let da = up(&self.da0, F32);
            let db = up(&self.db0, F32);
            let dxa = nan(n * r, dt);
            lora_backward(
                e,
                dt,
                dx.all(),
                (!frozen.0).then(|| da.all()),
                (!frozen.1).then(|| db.all()),
                dxa.all(),
                dyb.all(),
                xb.all(),
                xab.all(),
                wb.all(),
                ab.all(),
                bb.all(),
                self.drop(),
                s,
            );
            vec![dx.download(), da.download(), db.download()]
        };
        let bwd = if rerun {
            deterministic(&format!("{label} backward"), run_bwd)
        } else {
            run_bwd()
        };
        let mut dx_ref = c(&self.dx0);
        let (mut da_ref, mut db_ref) = (self.da0.clone(), self.db0.clone());
        let mut scratch_dxa = vec![f32::NAN; n * r];
        Cpu.lora_linear_backward(
            &mut dx_ref,
            (!frozen.0).then_some(&mut da_ref[..]),
            (!frozen.1).then_some(&mut db_ref[..]),
            &mut scratch,
            &mut scratch_dxa,
            &dy,
            &x,
            &xa,
            &w,
            &a,
            &b,
            self.drop(),
            s,
        )
        .unwrap();
        assert_rel(&format!("dx {label}"), dt, &bwd[0], &dx_ref, tol);
        if frozen.0 {
            assert_eq!(
                bits(&bwd[1]),
                bits(&self.da0),
                "{label}: frozen dA was written"
            );
        } else {
            assert_rel(&format!("dA {label}"), dt, &bwd[1], &da_ref, tol);
        }
        if frozen.1 {
            assert_eq!(
                bits(&bwd[2]),
                bits(&self.db0),
                "{label}: frozen dB was written"
            );
        } else {
            assert_rel(&format!("dB {label}"), dt, &bwd[2], &db_ref, tol);
        }
    }
}

/// n = 96 rows (two reduction chunks), rank 8 (one 16-column group).
#[test]
fn lora_matches_cpu() {
    let Some(e) = emu::emu("lora_matches_cpu") else {
        return;
    };
    for (dt, tol) in DTYPES {
        LoraCase::new(20, (96, 80, 72, 8), false, None).check(e, dt, tol, (false, false), true);
        LoraCase::new(21, (96, 80, 72, 8), true, Some((0.25, 2))).check(
            e,
            dt,
            tol,
            (false, true),
            false,
        );
    }
}

/// Several tiles in every direction: rank 64 (a full column tile), IN = 260
/// and OUT = 200 (three and two 128-column tiles), 154 rows.
#[test]
fn lora_large_matches_cpu() {
    let Some(e) = emu::emu("lora_large_matches_cpu") else {
        return;
    };
    for (dt, tol) in DTYPES {
        LoraCase::new(23, (154, 260, 200, 64), true, Some((0.2, 2))).check(
            e,
            dt,
            tol,
            (false, false),
            false,
        );
    }
}

/// Rank 20 (two 16-column groups, padded), IN = 136 (two k-chunks of the
/// skinny product, two column tiles elsewhere), rows not a multiple of any
/// tile, dropout over 5 samples, weights stored in the compute type.
#[test]
fn lora_wide_matches_cpu() {
    let Some(e) = emu::emu("lora_wide_matches_cpu") else {
        return;
    };
    for (dt, tol) in DTYPES {
        let mut c = LoraCase::new(22, (70, 136, 40, 20), true, Some((0.1, 5)));
        c.check(e, dt, tol, (false, false), dt != F32);
        c.weights_compute = dt != F32;
        c.accumulate = false;
        c.check(e, dt, tol, (true, false), false);
    }
}

/// One row and rank 1; IN and OUT below one 16-wide step; p = 1 (everything
/// dropped: the launcher's inv_keep is 0); rank 100 (two column tiles of the
/// skinny product and of the row reductions); misaligned views.
#[test]
fn lora_edge_cases_match_cpu() {
    let Some(e) = emu::emu("lora_edge_cases_match_cpu") else {
        return;
    };
    for (dt, tol) in DTYPES {
        LoraCase::new(30, (1, 16, 8, 1), false, None).check(e, dt, tol, (false, false), false);
        LoraCase::new(31, (64, 8, 8, 4), true, Some((0.5, 4))).check(
            e,
            dt,
            tol,
            (false, false),
            false,
        );
        LoraCase::new(32, (130, 64, 64, 16), false, Some((1.0, 2))).check(
            e,
            dt,
            tol,
            (false, false),
            false,
        );
        LoraCase::new(33, (40, 50, 30, 100), true, Some((0.3, 1))).check(
            e,
            dt,
            tol,
            (false, false),
            true,
        );
        // Every tensor 3 elements into its buffer: the kernels' element loads
        // and unpaired stores.
        let mut c = LoraCase::new(34, (96, 80, 72, 8), true, Some((0.25, 2)));
        c.offset = 3;
        c.check(e, dt, tol, (false, false), false);
        // Rank 0 (only the base GEMM); both adapters frozen (no reductions).
        LoraCase::new(35, (16, 24, 8, 0), true, None).check(e, dt, tol, (true, true), false);
        LoraCase::new(36, (16, 24, 8, 4), false, None).check(e, dt, tol, (true, true), false);
    }
}
