//! The CPU backend: f32 compute, GEMMs through the `gemm` crate on the global
//! rayon pool. One op per file, each with its naive reference and tests beside it.
//!
//! Every op validates all lengths before writing anything and reports a bad
//! shape as `KernelError::Shape`. Parallel loops split outputs into fixed
//! chunks and never split a float reduction in a schedule-dependent way, so
//! results are bitwise identical for any number of threads.

pub mod adamw;
pub mod attention;
pub mod attention_kv;
pub mod bias;
pub(crate) mod check;
pub mod cross_entropy;
pub mod dropout;
pub mod elementwise;
pub mod embedding;
pub mod matmul;
pub mod memory;
mod par;
pub mod rmsnorm;
pub mod rope;
mod simd;
pub mod softmax_entropy;
pub mod swiglu;
#[cfg(test)]
mod testutil;

use crate::backend::{AdamW, AttnShape, Backend, Gemm, KvAttnShape, Precision, Result};
use std::ops::Range;

/// The CPU backend. Buffers are `Vec<f32>`, views are slices.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];

    fn name(&self) -> &'static str {
        "cpu"
    }

    // ---- memory ---------------------------------------------------------
    fn zeros(&self, n: usize, _: Precision) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }
    fn upload(&self, host: &[f32], _: Precision) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    /// Panics if `range` is out of bounds: the trait gives views no error path.
    fn view<'a>(&self, buf: &'a Vec<f32>, range: Range<usize>) -> &'a [f32] {
        &buf[range]
    }
    /// Panics if `range` is out of bounds: the trait gives views no error path.
    fn view_mut<'a>(&self, buf: &'a mut Vec<f32>, range: Range<usize>) -> &'a mut [f32] {
        &mut buf[range]
    }
    fn slice<'a>(&self, v: Self::View<'a>, range: Range<usize>) -> Self::View<'a> {
        &v[range]
    }
    fn slice_mut<'a>(&self, v: &'a mut &mut [f32], range: Range<usize>) -> &'a mut [f32] {
        &mut v[range]
    }
    fn split_mut<'a>(
        &self,
        v: Self::ViewMut<'a>,
        mid: usize,
    ) -> (Self::ViewMut<'a>, Self::ViewMut<'a>) {
        v.split_at_mut(mid)
    }
    fn freeze<'a>(&self, v: Self::ViewMut<'a>) -> Self::View<'a> {
        v
    }
    fn view_len(&self, v: &[f32]) -> usize {
        v.len()
    }
    fn download(&self, src: &[f32]) -> Result<Vec<f32>> {
        Ok(src.to_vec())
    }
    fn copy(&self, dst: &mut [f32], src: &[f32]) -> Result<()> {
        memory::copy(dst, src)
    }
    fn write(&self, dst: &mut [f32], host: &[f32]) -> Result<()> {
        memory::write(dst, host)
    }
    fn fill(&self, dst: &mut [f32], value: f32) -> Result<()> {
        memory::fill(dst, value)
    }

    // ---- elementwise ----------------------------------------------------
    fn axpy(&self, y: &mut [f32], alpha: f32, x: &[f32]) -> Result<()> {
        elementwise::axpy(y, alpha, x)
    }
    fn scale(&self, x: &mut [f32], s: f32) -> Result<()> {
        elementwise::scale(x, s)
    }
    fn sum_squares(&self, x: &[f32]) -> Result<f64> {
        elementwise::sum_squares(x)
    }

    // ---- matmul ---------------------------------------------------------
    fn gemm(&self, out: &mut [f32], a: &[f32], b: &[f32], g: Gemm) -> Result<()> {
        matmul::gemm(out, a, b, g)
    }
    fn add_bias(&self, x: &mut [f32], bias: &[f32], c: usize) -> Result<()> {
        bias::add_bias(x, bias, c)
    }
    fn bias_backward(&self, dbias: &mut [f32], dout: &[f32], c: usize) -> Result<()> {
        bias::bias_backward(dbias, dout, c)
    }

    // ---- embedding ------------------------------------------------------
    fn embedding_forward(
        &self,
        out: &mut [f32],
        table: &[f32],
        ids: &[u32],
        c: usize,
    ) -> Result<()> {
        embedding::forward(out, table, ids, c)
    }
    fn embedding_backward(
        &self,
        dtable: &mut [f32],
        dout: &[f32],
        ids: &[u32],
        c: usize,
    ) -> Result<()> {
        embedding::backward(dtable, dout, ids, c)
    }

    // ---- RMSNorm --------------------------------------------------------
    fn rmsnorm_forward(
        &self,
        out: &mut [f32],
        rstd: &mut [f32],
        x: &[f32],
        w: &[f32],
        c: usize,
        eps: f32,
    ) -> Result<()> {
        rmsnorm::forward(out, rstd, x, w, c, eps)
    }
    fn rmsnorm_backward(
        &self,
        dx: &mut [f32],
        dw: Option<&mut [f32]>,
        dout: &[f32],
        x: &[f32],
        w: &[f32],
        rstd: &[f32],
        c: usize,
    ) -> Result<()> {
        rmsnorm::backward(dx, dw, dout, x, w, rstd, c)
    }

    // ---- rotary embedding -----------------------------------------------
    fn rope_forward(
        &self,
        x: &mut [f32],
        cos: &[f32],
        sin: &[f32],
        positions: &[u32],
        heads: usize,
        hd: usize,
    ) -> Result<()> {
        rope::forward(x, cos, sin, positions, heads, hd)
    }
    fn rope_backward(
        &self,
        dx: &mut [f32],
        cos: &[f32],
        sin: &[f32],
        positions: &[u32],
        heads: usize,
        hd: usize,
    ) -> Result<()> {
        rope::backward(dx, cos, sin, positions, heads, hd)
    }

    // ---- attention ------------------------------------------------------
    /// Rows with no visible key get out = 0 and lse = −inf.
    fn attention_forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        key_mask: Option<&[u8]>,
        s: AttnShape,
    ) -> Result<()> {
        attention::forward(out, lse, q, k, v, key_mask, s)
    }
    fn attention_kv_forward(
        &self,
        out: &mut [f32],
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        key_mask: &[u8],
        s: KvAttnShape,
    ) -> Result<()> {
        attention_kv::forward(out, q, k_cache, v_cache, key_mask, s)
    }
    fn attention_backward(
        &self,
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
        attention::backward(dq, dk, dv, dout, q, k, v, out, lse, key_mask, s)
    }

    // ---- SwiGLU ---------------------------------------------------------
    fn swiglu_forward(&self, out: &mut [f32], gate: &[f32], up: &[f32]) -> Result<()> {
        swiglu::forward(out, gate, up)
    }
    fn swiglu_backward(
        &self,
        dgate: &mut [f32],
        dup: &mut [f32],
        dout: &[f32],
        gate: &[f32],
        up: &[f32],
    ) -> Result<()> {
        swiglu::backward(dgate, dup, dout, gate, up)
    }

    // ---- dropout --------------------------------------------------------
    /// `p` must be in [0, 1]; p = 1 drops everything (zeros, not NaN).
    fn dropout_forward(&self, out: &mut [f32], x: &[f32], p: f32, seed: u64) -> Result<()> {
        dropout::forward(out, x, p, seed)
    }
    fn dropout_backward(&self, dx: &mut [f32], dout: &[f32], p: f32, seed: u64) -> Result<()> {
        dropout::backward(dx, dout, p, seed)
    }

    // ---- cross-entropy --------------------------------------------------
    fn cross_entropy(
        &self,
        logits: &mut [f32],
        targets: &[i32],
        v: usize,
        grad_scales: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        cross_entropy::cross_entropy(logits, targets, v, grad_scales)
    }

    // ---- softmax entropy ------------------------------------------------
    fn softmax_entropy(&self, logits: &[f32], v: usize) -> Result<Vec<f32>> {
        softmax_entropy::softmax_entropy(logits, v)
    }

    // ---- optimizer ------------------------------------------------------
    /// `h.step` must be ≥ 1 (else a Shape error).
    fn adamw(
        &self,
        params: &mut [f32],
        grads: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        h: AdamW,
    ) -> Result<()> {
        adamw::adamw(params, grads, m, v, h)
    }
}
