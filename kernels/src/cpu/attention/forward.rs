//! Attention forward: per (batch, query head), per block of query rows,
//! S = scale·Q·Kᵀ (GEMM), row softmax with lse, O = P·V (GEMM).

use super::{visible, Dims, QB};
use crate::backend::{AttnShape, Result};
use crate::cpu::matmul::{gemm_strided, Mat, MatMut};
use crate::cpu::par::SyncPtr;
use crate::cpu::simd;
use gemm::Parallelism;
use rayon::prelude::*;

/// out[B,T,NH,HD], lse[B,NH,T] from q[B,T,NH,HD], k, v[B,T,NKV,HD].
pub fn forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: Option<&[u8]>,
    s: AttnShape,
) -> Result<()> {
    let d = Dims::check(
        "attention_forward",
        s,
        &[("q", q.len()), ("out", out.len())],
        &[("k", k.len()), ("v", v.len())],
        lse.len(),
        key_mask,
    )?;
    if d.t == 0 {
        return Ok(()); // nothing to do (and par_chunks_mut(0) would panic)
    }
    let out_ptr = SyncPtr::new(out);
    // One task per (b, h): it owns lse[b, h, :] (a contiguous chunk) and the
    // strided rows out[b, :, h, :].
    lse.par_chunks_mut(d.t)
        .enumerate()
        .for_each_init(Vec::new, |scores, (bh, lse)| {
            let (b, h) = (bh / d.nh, bh % d.nh);
            let kvh = h / d.group;
            let mask = key_mask.map(|m| &m[b * d.t..(b + 1) * d.t]); // [T]
            for i0 in (0..d.t).step_by(QB) {
                let i1 = (i0 + QB).min(d.t);
                let (rows, cols) = (i1 - i0, i1); // queries [i0,i1) see keys [0,i1)
                scores.resize(rows * cols, 0.0); // [rows, cols]

                // SAFETY: q rows i0..i1 of head h: offsets q_off(b,i,h) + [0,HD) < q.len()
                // (lengths checked); k rows 0..i1 of head kvh likewise in k. `scores`
                // holds rows·cols elements and is this task's own scratch.
                unsafe {
                    gemm_strided(
                        rows,
                        cols,
                        d.hd,
                        MatMut::rows(scores.as_mut_ptr(), cols),
                        false,
                        Mat::rows(q.as_ptr().add(d.q_off(b, i0, h)), d.q_rs),
                        Mat::transposed(k.as_ptr().add(d.kv_off(b, 0, kvh)), d.kv_rs),
                        d.scale,
                        Parallelism::None, // already inside a rayon task
                    );
                }
                for (r, row) in scores.chunks_exact_mut(cols).enumerate() {
                    lse[i0 + r] = softmax_row(row, i0 + r, mask);
                }
                // SAFETY: v rows 0..i1 of head kvh are in bounds as k's are. The
                // destination rows out[b, i0..i1, h, :] are in bounds (out has q's
                // length) and are written by this (b, h) task only; `out` is
                // exclusively borrowed for this call, so no one else reads them.
                unsafe {
                    gemm_strided(
                        rows,
                        d.hd,
                        cols,
                        MatMut::rows(out_ptr.get().add(d.q_off(b, i0, h)), d.q_rs),
                        false,
                        Mat::rows(scores.as_ptr(), cols),
                        Mat::rows(v.as_ptr().add(d.kv_off(b, 0, kvh)), d.kv_rs),
                        1.0,
                        Parallelism::None,
                    );
                }
            }
        });
    Ok(())
}

/// Turns the scaled scores of query `i` (over keys 0..row.len()) into
/// probabilities in place, zero on invisible keys, and returns the row's
/// log-sum-exp: −inf, with an all-zero row, when no key is visible.
fn softmax_row(row: &mut [f32], i: usize, mask: Option<&[u8]>) -> f32 {
    let max = match mask {
        None => simd::max_dispatch(&row[..=i]),
        Some(_) => (0..=i)
            .filter(|&j| visible(mask, i, j))
            .map(|j| row[j])
            .fold(f32::NEG_INFINITY, f32::max),
    };
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return f32::NEG_INFINITY;
    }
    let sum = simd::masked_exp_row(row, i, mask, max); // ≥ 1: the max term is exp(0)
    let inv = (1.0 / sum) as f32;
    row[..=i].iter_mut().for_each(|x| *x *= inv);
    (max as f64 + sum.ln()) as f32
}
