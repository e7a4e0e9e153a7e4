//! The backend interface: the narrow set of ops the model is written against,
//! once. A backend owns device memory (`Buf`, always f32 for compute) and hands
//! out borrowed views of ranges of it, so parameters and gradients can live in
//! one flat buffer each (one all-reduce, one zero-grad) while ops see tensors.
//!
//! Conventions (as in llm.c):
//! - Row-major. Shapes are written beside every argument: B batch, T sequence,
//!   C hidden, F intermediate, V vocab, NH query heads, NKV key/value heads,
//!   HD head dim, N = B*T rows.
//! - Forward ops overwrite their outputs.
//! - Backward ops ADD (+=) into every gradient they produce, so residual
//!   branches and gradient accumulation need no extra copies. The caller zeroes.
//! - Integer inputs (token ids, targets, masks, positions) are host slices: they
//!   are small, and the CUDA backend uploads them itself.

use crate::KernelError;
use std::ops::Range;

pub type Result<T> = std::result::Result<T, KernelError>;

/// Shape of one matrix product `out[m,n] = alpha * op(a) · op(b) (+ out)`.
/// `op(a)` is `[m,k]`: `a` is stored `[m,k]`, or `[k,m]` when `trans_a`.
/// `op(b)` is `[k,n]`: `b` is stored `[k,n]`, or `[n,k]` when `trans_b`
/// (a `nn.Linear` weight `[out,in]` is used with `trans_b = true`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    /// false: `out = alpha·a·b`; true: `out += alpha·a·b`.
    pub accumulate: bool,
}

impl Gemm {
    /// `y[m,n] = x[m,k] · w[n,k]^T` — the forward of a linear layer.
    pub fn linear(m: usize, n: usize, k: usize) -> Self {
        Gemm {
            m,
            n,
            k,
            trans_a: false,
            trans_b: true,
            alpha: 1.0,
            accumulate: false,
        }
    }
}

/// Shape of causal self-attention with grouped-query heads.
/// q: `[B,T,NH,HD]`, k and v: `[B,T,NKV,HD]`, out: `[B,T,NH,HD]`,
/// lse (log-sum-exp of each softmax row, kept for backward): `[B,NH,T]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
}

/// Shape of attention of new queries over a key/value cache (generation).
/// q, out: `[B,TQ,NH,HD]`; k_cache, v_cache: `[B,CAP,NKV,HD]` (CAP: the cache's
/// capacity in positions). Keys `0..START+TQ` of every row are filled; the
/// TQ new queries sit at cache slots `START..START+TQ`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvAttnShape {
    pub b: usize,
    pub tq: usize,
    pub cap: usize,
    pub start: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
}

impl KvAttnShape {
    /// Keys filled after this step: START + TQ.
    pub fn keys(&self) -> usize {
        self.start + self.tq
    }
}

/// What a buffer holds, which decides its storage type on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Always f32: trainable (master) weights, gradients, optimizer moments,
    /// statistics kept for backward (rstd, lse), rotary tables.
    F32,
    /// The backend's compute type: frozen weights and activations. f32 on the
    /// CPU; f32, bf16 or fp16 on CUDA (f32 accumulation in every kernel).
    Compute,
}

/// One LoRA linear y = x·Wᵀ + s·dropout(x)·Aᵀ·Bᵀ with a frozen W.
/// x: `[N,IN]`, W: `[OUT,IN]`, A: `[R,IN]`, B: `[OUT,R]`, y: `[N,OUT]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraShape {
    pub n: usize,
    pub n_in: usize,
    pub n_out: usize,
    pub r: usize,
    /// alpha / r.
    pub scaling: f32,
}

/// Dropout on the LoRA branch's input: rows are grouped by sample
/// (`rows_per_sample` rows each) and sample `i` draws its mask from
/// `seeds[i]`, indexing elements from the start of that sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraDropout<'a> {
    pub p: f32,
    pub seeds: &'a [u64],
    pub rows_per_sample: usize,
}

/// A compute backend. `Buf` is an owned allocation on the device whose
/// storage type is chosen by its [`Precision`]; every op reads and writes f32
/// values through it. `View`/`ViewMut` borrow a range of one.
pub trait Backend: Send + Sync + Clone {
    type Buf: Send + Sync;
    type View<'a>: Copy
    where
        Self: 'a;
    type ViewMut<'a>
    where
        Self: 'a;

    fn name(&self) -> &'static str;

    /// Whether the compute type needs dynamic loss scaling (fp16's range).
    fn needs_loss_scaling(&self) -> bool {
        false
    }

    // ---- memory ---------------------------------------------------------
    fn zeros(&self, n: usize, p: Precision) -> Result<Self::Buf>;
    fn upload(&self, host: &[f32], p: Precision) -> Result<Self::Buf>;
    fn len(&self, buf: &Self::Buf) -> usize;
    fn view<'a>(&self, buf: &'a Self::Buf, range: Range<usize>) -> Self::View<'a>;
    fn view_mut<'a>(&self, buf: &'a mut Self::Buf, range: Range<usize>) -> Self::ViewMut<'a>;
    /// A sub-range of a view (panics when out of bounds, like `view`).
    fn slice<'a>(&self, v: Self::View<'a>, range: Range<usize>) -> Self::View<'a>;
    /// A sub-range of a mutable view, reborrowed.
    fn slice_mut<'a>(&self, v: &'a mut Self::ViewMut<'_>, range: Range<usize>)
        -> Self::ViewMut<'a>;
    /// A mutable view cut in two at `mid` (panics when out of bounds).
    fn split_mut<'a>(
        &self,
        v: Self::ViewMut<'a>,
        mid: usize,
    ) -> (Self::ViewMut<'a>, Self::ViewMut<'a>);
    /// A mutable view given up for reading.
    fn freeze<'a>(&self, v: Self::ViewMut<'a>) -> Self::View<'a>;
    /// The length of a view.
    fn view_len(&self, v: Self::View<'_>) -> usize;
    fn download(&self, src: Self::View<'_>) -> Result<Vec<f32>>;
    /// dst[i] = src[i]; lengths must match.
    fn copy(&self, dst: Self::ViewMut<'_>, src: Self::View<'_>) -> Result<()>;
    /// Overwrite with host data; lengths must match.
    fn write(&self, dst: Self::ViewMut<'_>, host: &[f32]) -> Result<()>;
    fn fill(&self, dst: Self::ViewMut<'_>, value: f32) -> Result<()>;

    // ---- elementwise ----------------------------------------------------
    /// y += alpha * x
    fn axpy(&self, y: Self::ViewMut<'_>, alpha: f32, x: Self::View<'_>) -> Result<()>;
    /// x *= s
    fn scale(&self, x: Self::ViewMut<'_>, s: f32) -> Result<()>;
    /// sum of squares, accumulated in f64 (for the global gradient norm).
    fn sum_squares(&self, x: Self::View<'_>) -> Result<f64>;

    // ---- matmul ---------------------------------------------------------
    /// out[m,n] (=|+=) alpha * op(a)[m,k] · op(b)[k,n]; see [`Gemm`].
    fn gemm(
        &self,
        out: Self::ViewMut<'_>,
        a: Self::View<'_>,
        b: Self::View<'_>,
        g: Gemm,
    ) -> Result<()>;
    /// x[N,C] += bias[C] (Qwen2's q/k/v biases).
    fn add_bias(&self, x: Self::ViewMut<'_>, bias: Self::View<'_>, c: usize) -> Result<()>;
    /// dbias[C] += sum over rows of dout[N,C].
    fn bias_backward(&self, dbias: Self::ViewMut<'_>, dout: Self::View<'_>, c: usize)
        -> Result<()>;

    // ---- embedding ------------------------------------------------------
    /// out[N,C] = table[ids[n], :]. table: [V,C]. Every id must be < V.
    fn embedding_forward(
        &self,
        out: Self::ViewMut<'_>,
        table: Self::View<'_>,
        ids: &[u32],
        c: usize,
    ) -> Result<()>;
    /// dtable[ids[n], :] += dout[n, :].
    fn embedding_backward(
        &self,
        dtable: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        ids: &[u32],
        c: usize,
    ) -> Result<()>;

    // ---- RMSNorm: out = x / sqrt(mean(x^2) + eps) * w -------------------
    /// out[N,C], rstd[N] (1/sqrt(mean(x^2)+eps), kept for backward); x[N,C], w[C].
    fn rmsnorm_forward(
        &self,
        out: Self::ViewMut<'_>,
        rstd: Self::ViewMut<'_>,
        x: Self::View<'_>,
        w: Self::View<'_>,
        c: usize,
        eps: f32,
    ) -> Result<()>;
    /// dx[N,C] += ..., dw[C] += ... (dw may be None when the weight is frozen).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dx: Self::ViewMut<'_>,
        dw: Option<Self::ViewMut<'_>>,
        dout: Self::View<'_>,
        x: Self::View<'_>,
        w: Self::View<'_>,
        rstd: Self::View<'_>,
        c: usize,
    ) -> Result<()>;

    // ---- rotary embedding (HF "rotate_half" layout) ----------------------
    /// In place on x[N, H, HD]: for i < HD/2, with (c, s) = (cos, sin)[pos[n], i]:
    /// x1' = x1·c − x2·s, x2' = x2·c + x1·s, where x1 = x[..i], x2 = x[..i+HD/2].
    /// cos, sin: [P, HD/2] tables; positions: [N], each < P.
    fn rope_forward(
        &self,
        x: Self::ViewMut<'_>,
        cos: Self::View<'_>,
        sin: Self::View<'_>,
        positions: &[u32],
        heads: usize,
        hd: usize,
    ) -> Result<()>;
    /// In place on dx[N, H, HD]: the transpose of the rotation (rotate by −angle).
    fn rope_backward(
        &self,
        dx: Self::ViewMut<'_>,
        cos: Self::View<'_>,
        sin: Self::View<'_>,
        positions: &[u32],
        heads: usize,
        hd: usize,
    ) -> Result<()>;

    // ---- causal self-attention, grouped-query ----------------------------
    /// out = softmax(q·kᵀ/sqrt(HD) + causal mask + key padding mask) · v.
    /// Query head h reads key/value head h / (NH/NKV). `key_mask`: [B,T], 0 = padding
    /// (never attended to). A query row with no visible key gets out = 0.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: Self::ViewMut<'_>,
        lse: Self::ViewMut<'_>,
        q: Self::View<'_>,
        k: Self::View<'_>,
        v: Self::View<'_>,
        key_mask: Option<&[u8]>,
        s: AttnShape,
    ) -> Result<()>;
    /// dq, dk, dv += gradients, recomputing the probabilities from q, k and lse.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dq: Self::ViewMut<'_>,
        dk: Self::ViewMut<'_>,
        dv: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        q: Self::View<'_>,
        k: Self::View<'_>,
        v: Self::View<'_>,
        out: Self::View<'_>,
        lse: Self::View<'_>,
        key_mask: Option<&[u8]>,
        s: AttnShape,
    ) -> Result<()>;

    /// Attention of TQ new queries over a key/value cache, grouped-query:
    /// out = softmax(q·kᵀ/sqrt(HD) + masks) · v, where the query at slot
    /// START+i of row b sees key j iff j ≤ START+i and key_mask[b, j] ≠ 0.
    /// `key_mask`: [B, START+TQ], 0 = padding. A query with no visible key
    /// gets out = 0. Inference only: nothing is kept for a backward.
    fn attention_kv_forward(
        &self,
        out: Self::ViewMut<'_>,
        q: Self::View<'_>,
        k_cache: Self::View<'_>,
        v_cache: Self::View<'_>,
        key_mask: &[u8],
        s: KvAttnShape,
    ) -> Result<()>;

    // ---- SiLU-gated MLP activation: h = silu(gate) * up ------------------
    /// out[N,F] = silu(gate) * up.
    fn swiglu_forward(
        &self,
        out: Self::ViewMut<'_>,
        gate: Self::View<'_>,
        up: Self::View<'_>,
    ) -> Result<()>;
    /// dgate += dout * up * silu'(gate); dup += dout * silu(gate).
    fn swiglu_backward(
        &self,
        dgate: Self::ViewMut<'_>,
        dup: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        gate: Self::View<'_>,
        up: Self::View<'_>,
    ) -> Result<()>;

    // ---- dropout with a counter-based mask (same mask on every backend) ---
    /// out = x * keep / (1-p), keep[i] = dropout_keep(seed, i, p).
    fn dropout_forward(
        &self,
        out: Self::ViewMut<'_>,
        x: Self::View<'_>,
        p: f32,
        seed: u64,
    ) -> Result<()>;
    /// dx += dout * keep / (1-p), regenerating the same mask from `seed`.
    fn dropout_backward(
        &self,
        dx: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        p: f32,
        seed: u64,
    ) -> Result<()>;

    // ---- softmax cross-entropy -------------------------------------------
    /// logits: [N,V]; targets: [N] with -100 = ignored. Returns the per-row loss
    /// −log softmax(logits)[target] (0 for ignored rows). When `grad_scales` is
    /// Some(s) (s: [N]), row n of the logits is overwritten by
    /// s[n]·(softmax − onehot(target[n])) — the gradient of Σ_n s[n]·loss[n] —
    /// (zero rows for ignored targets), without a second [N,V] buffer.
    fn cross_entropy(
        &self,
        logits: Self::ViewMut<'_>,
        targets: &[i32],
        v: usize,
        grad_scales: Option<&[f32]>,
    ) -> Result<Vec<f32>>;

    // ---- softmax entropy -------------------------------------------------
    /// Entropy of softmax over each row of logits [N,V]:
    /// H[n] = logsumexp(x_n) − Σ_j softmax(x_n)_j·x_n,j. Read only; returns [N]
    /// (f32, accumulated in f64 on the CPU). A −inf logit adds nothing; a NaN
    /// logit, or a row without a finite logit, gives NaN.
    fn softmax_entropy(&self, logits: Self::View<'_>, v: usize) -> Result<Vec<f32>>;

    // ---- LoRA linear (frozen W) --------------------------------------------
    /// y[N,OUT] (=|+=) x·Wᵀ + s·dropout(x)·Aᵀ·Bᵀ; keeps xa[N,R] = dropout(x)·Aᵀ
    /// for backward. `scratch_x` [N,IN] holds dropout(x) when dropout is on.
    /// The default composes `gemm` and `dropout_forward`; a backend may fuse.
    #[allow(clippy::too_many_arguments)]
    fn lora_linear_forward(
        &self,
        y: Self::ViewMut<'_>,
        xa: Self::ViewMut<'_>,
        scratch_x: Self::ViewMut<'_>,
        x: Self::View<'_>,
        w: Self::View<'_>,
        a: Self::View<'_>,
        b: Self::View<'_>,
        dropout: Option<LoraDropout<'_>>,
        s: LoraShape,
        accumulate: bool,
    ) -> Result<()> {
        crate::lora::forward(self, y, xa, scratch_x, x, w, a, b, dropout, s, accumulate)
    }

    /// dx[N,IN] += dy·W + dropout'(s·dy·B·A); dA[R,IN] += (s·dy·B)ᵀ·dropout(x);
    /// dB[OUT,R] += s·dyᵀ·xa. No dW: the base weight is frozen. `scratch_x`
    /// [N,IN] and `scratch_dxa` [N,R] are work space.
    #[allow(clippy::too_many_arguments)]
    fn lora_linear_backward(
        &self,
        dx: Self::ViewMut<'_>,
        da: Option<Self::ViewMut<'_>>,
        db: Option<Self::ViewMut<'_>>,
        scratch_x: Self::ViewMut<'_>,
        scratch_dxa: Self::ViewMut<'_>,
        dy: Self::View<'_>,
        x: Self::View<'_>,
        xa: Self::View<'_>,
        w: Self::View<'_>,
        a: Self::View<'_>,
        b: Self::View<'_>,
        dropout: Option<LoraDropout<'_>>,
        s: LoraShape,
    ) -> Result<()> {
        crate::lora::backward(
            self,
            dx,
            da,
            db,
            scratch_x,
            scratch_dxa,
            dy,
            x,
            xa,
            w,
            a,
            b,
            dropout,
            s,
        )
    }

    // ---- optimizer ------------------------------------------------------
    /// One AdamW step (torch.optim.AdamW semantics, decoupled weight decay),
    /// elementwise on params, grads, m, v of equal length. `step` counts from 1.
    fn adamw(
        &self,
        params: Self::ViewMut<'_>,
        grads: Self::View<'_>,
        m: Self::ViewMut<'_>,
        v: Self::ViewMut<'_>,
        h: AdamW,
    ) -> Result<()>;
}

/// AdamW hyper-parameters for one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u64,
}

/// The dropout mask: whether element `i` is kept under seed `seed` with drop
/// probability `p`: a keyed 32-bit hash of `i` (Wellons' lowbias32 of i times
/// an odd key, xor a second key; the keys are the seed's halves) compared with p·2³². Every
/// backend and every recomputation draws the identical mask without storing
/// it, and 32-bit integer math vectorises on CPUs and is native on GPUs.
#[inline(always)]
pub fn dropout_keep(seed: u64, i: u64, p: f32) -> bool {
    dropout_bits(seed, i) as u64 >= dropout_threshold(p)
}

/// Drop iff `dropout_bits(seed, i) < dropout_threshold(p)`; p ≥ 1 drops everything.
#[inline(always)]
pub fn dropout_threshold(p: f32) -> u64 {
    (p.clamp(0.0, 1.0) as f64 * 4_294_967_296.0) as u64
}

/// The 32 random bits behind element `i`'s keep/drop decision.
#[inline(always)]
pub fn dropout_bits(seed: u64, i: u64) -> u32 {
    #[inline(always)]
    fn lowbias32(mut x: u32) -> u32 {
        x ^= x >> 16;
        x = x.wrapping_mul(0x7feb_352d);
        x ^= x >> 15;
        x = x.wrapping_mul(0x846c_a68b);
        x ^ (x >> 16)
    }
    // Keyed by both halves of the seed: an odd multiplier (a different
    // permutation of positions per seed) and an xor, then one mixing round.
    let idx = (i as u32) ^ ((i >> 32) as u32).wrapping_mul(0x9E37_79B9);
    let mul = ((seed >> 32) as u32) | 1;
    lowbias32(idx.wrapping_mul(mul) ^ seed as u32)
}
