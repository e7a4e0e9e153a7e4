//! Attention backward, recomputing P from q, k and lse (flash-attention style).
//! Per query block, with S = scale·Q·Kᵀ and P = exp(S − lse) on visible keys:
//!   dV += Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ∘ (dP − rowsum(dO ∘ O)),
//!   dQ += scale·dS·K,  dK += scale·dSᵀ·Q.
//!
//! One task per (batch, kv head): the query heads of a group all add into the
//! same dk/dv head, so the task that owns that kv head also runs all of its
//! query heads — no two tasks write the same element, with no extra buffers,
//! and each element's additions happen in a fixed order (deterministic).

use super::{Dims, QB};
use crate::backend::{AttnShape, Result};
use crate::cpu::matmul::{gemm_strided, Mat, MatMut};
use crate::cpu::par::SyncPtr;
use crate::cpu::simd;
use gemm::Parallelism;
use rayon::prelude::*;

/// Per-task scratch, reused across blocks.
#[derive(Default)]
struct Scratch {
    p: Vec<f32>,  // [rows, cols]: probabilities of one query block
    ds: Vec<f32>, // [rows, cols]: dP, then dS in place
}

/// dq[B,T,NH,HD], dk, dv[B,T,NKV,HD] += gradients of out given dout.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    key_mask: Option<&[u8]>,
    s: AttnShape,
) -> Result<()> {
    let d = Dims::check(
        "attention_backward",
        s,
        &[
            ("dq", dq.len()),
            ("dout", dout.len()),
            ("q", q.len()),
            ("out", out.len()),
        ],
        &[
            ("dk", dk.len()),
            ("dv", dv.len()),
            ("k", k.len()),
            ("v", v.len()),
        ],
        lse.len(),
        key_mask,
    )?;
    let (dq, dk, dv) = (SyncPtr::new(dq), SyncPtr::new(dk), SyncPtr::new(dv));
    (0..s.b * d.nkv)
        .into_par_iter()
        .for_each_init(Scratch::default, |sc, task| {
            let (b, kvh) = (task / d.nkv, task % d.nkv);
            let mask = key_mask.map(|m| &m[b * d.t..(b + 1) * d.t]); // [T]
            let kv0 = d.kv_off(b, 0, kvh); // k, v, dk, dv rows of this head start here
            for h in kvh * d.group..(kvh + 1) * d.group {
                let lse = &lse[(b * d.nh + h) * d.t..(b * d.nh + h + 1) * d.t]; // [T]
                for i0 in (0..d.t).step_by(QB) {
                    let i1 = (i0 + QB).min(d.t);
                    let (rows, cols) = (i1 - i0, i1); // queries [i0,i1) see keys [0,i1)
                    let q0 = d.q_off(b, i0, h); // q, out, dout, dq rows of this block
                    sc.p.resize(rows * cols, 0.0);
                    sc.ds.resize(rows * cols, 0.0);
                    // SAFETY: (for all GEMMs of this block) row r < rows of a q-like operand lies at
                    // q0 + r·q_rs + [0,HD), row j < cols of a kv-like one at
                    // kv0 + j·kv_rs + [0,HD); with i1 ≤ T these are in bounds of buffers
                    // whose lengths Dims::check verified. `p`/`ds` hold rows·cols and
                    // are this task's own. Destinations: dk, dv rows of kv head (b, kvh)
                    // and dq rows of heads h in its group, which only this task writes;
                    // dq/dk/dv are exclusive borrows distinct from every input.
                    unsafe {
                        gemm_strided(
                            rows,
                            cols,
                            d.hd,
                            MatMut::rows(sc.p.as_mut_ptr(), cols),
                            false,
                            Mat::rows(q.as_ptr().add(q0), d.q_rs),
                            Mat::transposed(k.as_ptr().add(kv0), d.kv_rs),
                            d.scale,
                            Parallelism::None, // already inside a rayon task
                        );
                    }
                    for (r, row) in sc.p.chunks_exact_mut(cols).enumerate() {
                        // P = exp(S − lse). lse = −inf marks a row with no visible key:
                        // masked_exp_row writes zeros there (no exp(−inf − −inf)).
                        simd::masked_exp_row(row, i0 + r, mask, lse[i0 + r]);
                    }
                    // dV[0..cols] += Pᵀ · dO[i0..i1]
                    // SAFETY: as for the first GEMM of this block.
                    unsafe {
                        gemm_strided(
                            cols,
                            d.hd,
                            rows,
                            MatMut::rows(dv.get().add(kv0), d.kv_rs),
                            true,
                            Mat::transposed(sc.p.as_ptr(), cols),
                            Mat::rows(dout.as_ptr().add(q0), d.q_rs),
                            1.0,
                            Parallelism::None,
                        );
                    }
                    // dP = dO[i0..i1] · V[0..cols]ᵀ
                    // SAFETY: as for the first GEMM of this block.
                    unsafe {
                        gemm_strided(
                            rows,
                            cols,
                            d.hd,
                            MatMut::rows(sc.ds.as_mut_ptr(), cols),
                            false,
                            Mat::rows(dout.as_ptr().add(q0), d.q_rs),
                            Mat::transposed(v.as_ptr().add(kv0), d.kv_rs),
                            1.0,
                            Parallelism::None,
                        );
                    }
                    // dS = P ∘ (dP − D), D_i = Σ_j P_ij dP_ij = dO_i · O_i (cheaper).
                    for (r, (ds, p)) in sc
                        .ds
                        .chunks_exact_mut(cols)
                        .zip(sc.p.chunks_exact(cols))
                        .enumerate()
                    {
                        let row = q0 + r * d.q_rs;
                        let dsum: f32 = dout[row..row + d.hd]
                            .iter()
                            .zip(&out[row..row + d.hd])
                            .map(|(a, b)| a * b)
                            .sum();
                        for (x, &p) in ds.iter_mut().zip(p) {
                            *x = p * (*x - dsum);
                        }
                    }
                    // dQ[i0..i1] += scale · dS · K[0..cols]
                    // SAFETY: as for the first GEMM of this block.
                    unsafe {
                        gemm_strided(
                            rows,
                            d.hd,
                            cols,
                            MatMut::rows(dq.get().add(q0), d.q_rs),
                            true,
                            Mat::rows(sc.ds.as_ptr(), cols),
                            Mat::rows(k.as_ptr().add(kv0), d.kv_rs),
                            d.scale,
                            Parallelism::None,
                        );
                    }
                    // dK[0..cols] += scale · dSᵀ · Q[i0..i1]
                    // SAFETY: as for the first GEMM of this block.
                    unsafe {
                        gemm_strided(
                            cols,
                            d.hd,
                            rows,
                            MatMut::rows(dk.get().add(kv0), d.kv_rs),
                            true,
                            Mat::transposed(sc.ds.as_ptr(), cols),
                            Mat::rows(q.as_ptr().add(q0), d.q_rs),
                            d.scale,
                            Parallelism::None,
                        );
                    }
                }
            }
        });
    Ok(())
}
