//! Causal self-attention with grouped-query heads, flash-attention style: the
//! forward keeps only out and the per-row log-sum-exp, and the backward
//! recomputes the probabilities from q, k and lse.
//!
//! Layouts: q, out: [B,T,NH,HD]; k, v: [B,T,NKV,HD]; lse: [B,NH,T];
//! key_mask: [B,T] (0 = padding). A head's rows are strided by NH·HD (or
//! NKV·HD), and the GEMMs read and write them in place through strides.
//!
//! Query rows are processed in blocks of [`QB`]: a block [i0, i1) can only see
//! keys [0, i1), so the score matrix of a block is QB × i1 — causal work is
//! skipped and scratch stays O(QB·T) however long the sequence.
//!
//! A query row with no visible key (left padding) gets out = 0 and
//! lse = −inf; backward gives such rows zero probability everywhere, hence
//! zero gradient and no NaN.

mod backward;
mod forward;
pub mod naive;
#[cfg(test)]
mod tests;

pub use backward::backward;
pub use forward::forward;

use super::check::{expect_len, product, shape_err};
use crate::backend::{AttnShape, Result};

/// Query rows per block (see the module doc).
const QB: usize = 64;

/// Validated dimensions and the derived strides every pass needs.
#[derive(Clone, Copy)]
struct Dims {
    t: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    /// Query heads per key/value head: query head h reads kv head h / group.
    group: usize,
    /// Row stride of one head in q/out (NH·HD) and in k/v (NKV·HD).
    q_rs: usize,
    kv_rs: usize,
    scale: f32,
}

impl Dims {
    /// Checks the head counts and the lengths of q [B,T,NH,HD], k and v
    /// [B,T,NKV,HD], out-like buffers (same as q), lse [B,NH,T] and the mask [B,T].
    fn check(
        op: &'static str,
        s: AttnShape,
        q_like: &[(&str, usize)],
        kv_like: &[(&str, usize)],
        lse: usize,
        mask: Option<&[u8]>,
    ) -> Result<Dims> {
        let AttnShape { b, t, nh, nkv, hd } = s;
        if nh == 0 || nkv == 0 || hd == 0 || nh % nkv != 0 {
            return Err(shape_err(
                op,
                format!("need NH, NKV, HD > 0 and NKV dividing NH, got {s:?}"),
            ));
        }
        let q_len = product(op, &[b, t, nh, hd])?;
        let kv_len = product(op, &[b, t, nkv, hd])?;
        for &(what, len) in q_like {
            expect_len(op, what, len, q_len)?;
        }
        for &(what, len) in kv_like {
            expect_len(op, what, len, kv_len)?;
        }
        expect_len(op, "lse", lse, product(op, &[b, nh, t])?)?;
        if let Some(mask) = mask {
            expect_len(op, "key_mask", mask.len(), b * t)?;
        }
        Ok(Dims {
            t,
            nh,
            nkv,
            hd,
            group: nh / nkv,
            q_rs: nh * hd,
            kv_rs: nkv * hd,
            scale: 1.0 / (hd as f32).sqrt(),
        })
    }

    /// Offset of q[b, i, h, 0] (also of out, dq, dout).
    fn q_off(&self, b: usize, i: usize, h: usize) -> usize {
        ((b * self.t + i) * self.nh + h) * self.hd
    }

    /// Offset of k[b, j, kvh, 0] (also of v, dk, dv).
    fn kv_off(&self, b: usize, j: usize, kvh: usize) -> usize {
        ((b * self.t + j) * self.nkv + kvh) * self.hd
    }
}

/// Whether query i may attend to key j: causal, and the key is not padding.
/// `mask` is this batch row's [T] key mask.
#[inline]
fn visible(mask: Option<&[u8]>, i: usize, j: usize) -> bool {
    j <= i && mask.is_none_or(|m| m[j] != 0)
}
