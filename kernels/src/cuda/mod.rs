//! The CUDA backend: the same [`Backend`] interface as the CPU, so the model
//! runs unchanged. Libraries are opened at run time (cudarc dynamic loading,
//! after [`loader`] has checked they exist); the kernels are CUDA C++ sources
//! in this folder, compiled by NVRTC for the GPU present and cached on disk
//! ([`compile`]). Frozen GEMMs go to cuBLAS; everything else is ours.
//!
//! Storage: a buffer is f32 or the backend's compute dtype (see
//! [`Precision`]); every kernel accumulates in f32. Buffers are raw device
//! allocations addressed by pointer, and all work is queued on one stream, in
//! order, so no cross-stream event tracking is needed (it is switched off).
//!
//! Kernel launches are `unsafe`: the device cannot check the pointers and
//! lengths it is given. Every launcher validates lengths on the host first
//! (shape errors, like the CPU backend) and states what it relies on in a
//! `// SAFETY:` comment.

mod adamw;
mod attention;
mod attention_kv;
mod bias;
pub mod compile;
mod cross_entropy;
mod dropout;
mod elementwise;
mod embedding;
mod gemm;
pub mod loader;
mod lora;
mod memory;
pub mod nccl;
mod rmsnorm;
mod rope;
mod softmax_entropy;
mod swiglu;

use crate::backend::{
    AdamW, AttnShape, Backend, Gemm, KvAttnShape, LoraDropout, LoraShape, Precision, Result,
};
use crate::KernelError;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

/// Storage type of a buffer. The codes are the kernels' `DT_*` (common.cuh).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32 = 0,
    Bf16 = 1,
    F16 = 2,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }
    pub fn code(self) -> i32 {
        self as i32
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "fp16",
        }
    }
    /// Suffix of a templated kernel's instantiation (`attention_forward_bf16`).
    pub fn suffix(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}

impl std::str::FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "fp32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "fp16" | "f16" | "float16" => Ok(Dtype::F16),
            _ => Err(format!("unknown dtype {s:?} (expected bf16, fp16 or f32)")),
        }
    }
}

/// An owned device allocation of `len` elements of `dtype`.
pub struct CudaBuf {
    mem: CudaSlice<u8>,
    ptr: u64,
    len: usize,
    dtype: Dtype,
}

/// A borrowed range of a [`CudaBuf`]: base pointer already offset.
#[derive(Clone, Copy, Debug)]
pub struct CudaView<'a> {
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    pub(crate) dtype: Dtype,
    /// `dtype.code()`, stored so a launch can borrow it as an argument.
    pub(crate) dt: i32,
    _buf: PhantomData<&'a CudaBuf>,
}

/// A mutably borrowed range of a [`CudaBuf`].
#[derive(Debug)]
pub struct CudaViewMut<'a> {
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    pub(crate) dtype: Dtype,
    pub(crate) dt: i32,
    _buf: PhantomData<&'a mut CudaBuf>,
}

struct Inner {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    _module: Arc<CudaModule>,
    funcs: HashMap<String, CudaFunction>,
    dtype: Dtype,
    arch: &'static str,
    device_name: String,
}

/// The CUDA backend on one GPU. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Cuda {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Cuda(cuda:{} {} {}, {})",
            self.inner.ordinal,
            self.inner.device_name,
            self.inner.arch,
            self.inner.dtype.name()
        )
    }
}

/// Every library the backend opens, checked before cudarc touches any
/// (cudarc panics on a missing one).
pub fn check_libraries() -> Result<()> {
    loader::require(loader::DRIVER)?;
    loader::require(loader::NVRTC)?;
    loader::require(loader::CUBLASLT)?;
    loader::require(loader::CUBLAS)?;
    Ok(())
}

/// Number of CUDA devices, or why there are none usable.
pub fn device_count() -> Result<usize> {
    loader::require(loader::DRIVER)?;
    let n = CudaContext::device_count()
        .map_err(|e| KernelError::Unavailable(format!("the CUDA driver failed to start: {e:?}")))?;
    Ok(n as usize)
}

impl Cuda {
    /// Open GPU `ordinal` with `dtype` as the compute type: checks the
    /// libraries, compiles (or loads cached) kernels for its architecture.
    pub fn new(ordinal: usize, dtype: Dtype) -> Result<Self> {
        check_libraries()?;
        let count = device_count()?;
        if ordinal >= count {
            return Err(KernelError::Unavailable(if count == 0 {
                "no CUDA device is visible (CUDA_VISIBLE_DEVICES?)".to_string()
            } else {
                format!("cuda:{ordinal} requested but only {count} CUDA device(s) are visible")
            }));
        }
        let drv = |what: &str| {
            let what = what.to_string();
            move |e: cudarc::driver::DriverError| {
                KernelError::Unavailable(format!("cuda:{ordinal}: {what}: {e:?}"))
            }
        };
        let ctx = CudaContext::new(ordinal).map_err(drv("creating the context"))?;
        // One stream, in order: nothing to track between streams.
        // SAFETY: no buffer of this context exists yet, and every operation
        // below is queued on the single stream `stream`.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(drv("compute capability"))?;
        let arch = compile::arch_name(major, minor)?;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let stream = ctx.default_stream();
        let ptx = compile::compile_cached(arch)?;
        let module = ctx.load_module(ptx).map_err(drv("loading the kernels"))?;
        let mut funcs = HashMap::new();
        for name in kernel_names() {
            let f = module
                .load_function(&name)
                .map_err(drv(&format!("kernel {name}")))?;
            funcs.insert(name, f);
        }
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| KernelError::Unavailable(format!("cuBLAS: {e:?}")))?;
        Ok(Cuda {
            inner: Arc::new(Inner {
                ordinal,
                ctx,
                stream,
                blas,
                _module: module,
                funcs,
                dtype,
                arch,
                device_name,
            }),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }
    pub fn dtype(&self) -> Dtype {
        self.inner.dtype
    }
    pub fn device_name(&self) -> &str {
        &self.inner.device_name
    }
    pub fn arch(&self) -> &'static str {
        self.inner.arch
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }
    pub(crate) fn blas(&self) -> &CudaBlas {
        &self.inner.blas
    }

    /// Wait until every queued operation has finished; reports a failed one.
    pub fn synchronize(&self) -> Result<()> {
        self.inner
            .stream
            .synchronize()
            .map_err(|e| self.driver_err("synchronize", e))
    }

    /// (free, total) bytes of device memory.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.inner
            .ctx
            .bind_to_thread()
            .map_err(|e| self.driver_err("binding", e))?;
        cudarc::driver::result::mem_get_info().map_err(|e| self.driver_err("mem_get_info", e))
    }

    /// A compiled kernel by its `extern "C"` name.
    pub(crate) fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.inner.funcs.get(name).ok_or_else(|| {
            KernelError::Unavailable(format!("kernel {name} is not in the compiled module"))
        })
    }

    pub(crate) fn driver_err(&self, op: &str, e: cudarc::driver::DriverError) -> KernelError {
        KernelError::Unavailable(format!("cuda:{} {op}: {e:?}", self.inner.ordinal))
    }

    /// A buffer of `n` elements of `dtype`, zeroed.
    pub fn alloc(&self, n: usize, dtype: Dtype) -> Result<CudaBuf> {
        // At least one element, so every buffer has a valid pointer.
        let bytes = n.max(1) * dtype.size();
        let mem = self
            .inner
            .stream
            .alloc_zeros::<u8>(bytes)
            .map_err(|e| self.driver_err(&format!("allocating {bytes} bytes"), e))?;
        let ptr = ptr_of(&mem, &self.inner.stream);
        Ok(CudaBuf {
            ptr,
            mem,
            len: n,
            dtype,
        })
    }

    fn dtype_of(&self, p: Precision) -> Dtype {
        match p {
            Precision::F32 => Dtype::F32,
            Precision::Compute => self.inner.dtype,
        }
    }

    /// Small host inputs (ids, positions, masks, seeds, per-row f32 scales)
    /// copied to the device.
    pub(crate) fn upload_ints<T: cudarc::driver::DeviceRepr + Copy>(
        &self,
        host: &[T],
    ) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            // SAFETY: a one-element allocation that no kernel reads (n = 0).
            return unsafe { self.inner.stream.alloc::<T>(1) }
                .map_err(|e| self.driver_err("allocating", e));
        }
        self.inner
            .stream
            .clone_htod(host)
            .map_err(|e| self.driver_err("uploading", e))
    }
}

/// Device pointer of a cudarc slice (event tracking is off: no record to keep).
pub(crate) fn ptr_of<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _rec) = s.device_ptr(stream);
    p
}

/// Every `extern "C"` kernel in the sources (scanned from the text, so a new
/// kernel needs no list kept by hand).
pub fn kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for (_, text) in compile::SOURCES {
        for line in text.lines() {
            let line = line.trim_start();
            let Some(rest) = line.strip_prefix("extern \"C\" __global__ void ") else {
                continue;
            };
            if let Some(end) = rest.find('(') {
                names.push(rest[..end].trim().to_string());
            }
        }
    }
    names
}

/// Grid size for a grid-stride loop over `n` elements with `block` threads.
pub(crate) fn grid_for(n: usize, block: u32) -> u32 {
    (n.div_ceil(block as usize)).clamp(1, 65_535) as u32
}

impl Backend for Cuda {
    type Buf = CudaBuf;
    type View<'a> = CudaView<'a>;
    type ViewMut<'a> = CudaViewMut<'a>;

    fn name(&self) -> &'static str {
        "cuda"
    }
    fn needs_loss_scaling(&self) -> bool {
        self.inner.dtype == Dtype::F16
    }

    // ---- memory ---------------------------------------------------------
    fn zeros(&self, n: usize, p: Precision) -> Result<CudaBuf> {
        self.alloc(n, self.dtype_of(p))
    }
    fn upload(&self, host: &[f32], p: Precision) -> Result<CudaBuf> {
        let mut buf = self.alloc(host.len(), self.dtype_of(p))?;
        let n = host.len();
        self.write(self.view_mut(&mut buf, 0..n), host)?;
        Ok(buf)
    }
    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }
    /// Panics if `range` is out of bounds: the trait gives views no error path.
    fn view<'a>(&self, buf: &'a CudaBuf, range: Range<usize>) -> CudaView<'a> {
        assert!(
            range.start <= range.end && range.end <= buf.len,
            "view {range:?} of {}",
            buf.len
        );
        let _ = &buf.mem;
        CudaView {
            ptr: buf.ptr + (range.start * buf.dtype.size()) as u64,
            len: range.len(),
            dtype: buf.dtype,
            dt: buf.dtype.code(),
            _buf: PhantomData,
        }
    }
    /// Panics if `range` is out of bounds: the trait gives views no error path.
    fn view_mut<'a>(&self, buf: &'a mut CudaBuf, range: Range<usize>) -> CudaViewMut<'a> {
        assert!(
            range.start <= range.end && range.end <= buf.len,
            "view {range:?} of {}",
            buf.len
        );
        CudaViewMut {
            ptr: buf.ptr + (range.start * buf.dtype.size()) as u64,
            len: range.len(),
            dtype: buf.dtype,
            dt: buf.dtype.code(),
            _buf: PhantomData,
        }
    }
    fn slice<'a>(&self, v: Self::View<'a>, range: Range<usize>) -> Self::View<'a> {
        assert!(
            range.start <= range.end && range.end <= v.len,
            "slice {range:?} of {}",
            v.len
        );
        CudaView {
            ptr: v.ptr + (range.start * v.dtype.size()) as u64,
            len: range.len(),
            ..v
        }
    }
    fn slice_mut<'a>(&self, v: &'a mut CudaViewMut<'_>, range: Range<usize>) -> CudaViewMut<'a> {
        assert!(
            range.start <= range.end && range.end <= v.len,
            "slice {range:?} of {}",
            v.len
        );
        CudaViewMut {
            ptr: v.ptr + (range.start * v.dtype.size()) as u64,
            len: range.len(),
            dtype: v.dtype,
            dt: v.dt,
            _buf: PhantomData,
        }
    }
    fn split_mut<'a>(
        &self,
        v: Self::ViewMut<'a>,
        mid: usize,
    ) -> (Self::ViewMut<'a>, Self::ViewMut<'a>) {
        assert!(mid <= v.len, "split at {mid} of {}", v.len);
        let hi = CudaViewMut {
            ptr: v.ptr + (mid * v.dtype.size()) as u64,
            len: v.len - mid,
            dtype: v.dtype,
            dt: v.dt,
            _buf: PhantomData,
        };
        (CudaViewMut { len: mid, ..v }, hi)
    }
    fn freeze<'a>(&self, v: Self::ViewMut<'a>) -> Self::View<'a> {
        CudaView {
            ptr: v.ptr,
            len: v.len,
            dtype: v.dtype,
            dt: v.dt,
            _buf: PhantomData,
        }
    }
    fn view_len(&self, v: CudaView<'_>) -> usize {
        v.len
    }
    fn download(&self, src: CudaView<'_>) -> Result<Vec<f32>> {
        memory::download(self, src)
    }
    fn copy(&self, dst: CudaViewMut<'_>, src: CudaView<'_>) -> Result<()> {
        memory::copy(self, dst, src)
    }
    fn write(&self, dst: CudaViewMut<'_>, host: &[f32]) -> Result<()> {
        memory::write(self, dst, host)
    }
    fn fill(&self, dst: CudaViewMut<'_>, value: f32) -> Result<()> {
        memory::fill(self, dst, value)
    }

    // ---- elementwise ----------------------------------------------------
    fn axpy(&self, y: CudaViewMut<'_>, alpha: f32, x: CudaView<'_>) -> Result<()> {
        elementwise::axpy(self, y, alpha, x)
    }
    fn scale(&self, x: CudaViewMut<'_>, s: f32) -> Result<()> {
        elementwise::scale(self, x, s)
    }
    fn sum_squares(&self, x: CudaView<'_>) -> Result<f64> {
        elementwise::sum_squares(self, x)
    }

    // ---- matmul ---------------------------------------------------------
    fn gemm(&self, out: CudaViewMut<'_>, a: CudaView<'_>, b: CudaView<'_>, g: Gemm) -> Result<()> {
        gemm::gemm(self, out, a, b, g)
    }
    fn add_bias(&self, x: CudaViewMut<'_>, bias: CudaView<'_>, c: usize) -> Result<()> {
        bias::add_bias(self, x, bias, c)
    }
    fn bias_backward(&self, dbias: CudaViewMut<'_>, dout: CudaView<'_>, c: usize) -> Result<()> {
        bias::bias_backward(self, dbias, dout, c)
    }

    // ---- embedding ------------------------------------------------------
    fn embedding_forward(
        &self,
        out: CudaViewMut<'_>,
        table: CudaView<'_>,
        ids: &[u32],
        c: usize,
    ) -> Result<()> {
        embedding::forward(self, out, table, ids, c)
    }
    fn embedding_backward(
        &self,
        dtable: CudaViewMut<'_>,
        dout: CudaView<'_>,
        ids: &[u32],
        c: usize,
    ) -> Result<()> {
        embedding::backward(self, dtable, dout, ids, c)
    }

    // ---- RMSNorm --------------------------------------------------------
    fn rmsnorm_forward(
        &self,
        out: CudaViewMut<'_>,
        rstd: CudaViewMut<'_>,
        x: CudaView<'_>,
        w: CudaView<'_>,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        rmsnorm::forward(self, out, rstd, x, w, c, eps)
    }
    fn rmsnorm_backward(
        &self,
        dx: CudaViewMut<'_>,
        dw: Option<CudaViewMut<'_>>,
        dout: CudaView<'_>,
        x: CudaView<'_>,
        w: CudaView<'_>,
        rstd: CudaView<'_>,
        c: usize,
    ) -> Result<()> {
        rmsnorm::backward(self, dx, dw, dout, x, w, rstd, c)
    }

    // ---- rotary embedding -----------------------------------------------
    fn rope_forward(
        &self,
        x: CudaViewMut<'_>,
        cos: CudaView<'_>,
        sin: CudaView<'_>,
        positions: &[u32],
        heads: usize,
        hd: usize,
    ) -> Result<()> {
        rope::apply(self, x, cos, sin, positions, heads, hd, false)
    }
    fn rope_backward(
        &self,
        dx: CudaViewMut<'_>,
        cos: CudaView<'_>,
        sin: CudaView<'_>,
        positions: &[u32],
        heads: usize,
        hd: usize,
    ) -> Result<()> {
        rope::apply(self, dx, cos, sin, positions, heads, hd, true)
    }

    // ---- attention ------------------------------------------------------
    fn attention_forward(
        &self,
        out: CudaViewMut<'_>,
        lse: CudaViewMut<'_>,
        q: CudaView<'_>,
        k: CudaView<'_>,
        v: CudaView<'_>,
        key_mask: Option<&[u8]>,
        s: AttnShape,
    ) -> Result<()> {
        attention::forward(self, out, lse, q, k, v, key_mask, s)
    }
    fn attention_kv_forward(
        &self,
        out: CudaViewMut<'_>,
        q: CudaView<'_>,
        k_cache: CudaView<'_>,
        v_cache: CudaView<'_>,
        key_mask: &[u8],
        s: KvAttnShape,
    ) -> Result<()> {
        attention_kv::forward(self, out, q, k_cache, v_cache, key_mask, s)
    }
    fn attention_backward(
        &self,
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
        attention::backward(self, dq, dk, dv, dout, q, k, v, out, lse, key_mask, s)
    }

    // ---- SwiGLU ---------------------------------------------------------
    fn swiglu_forward(
        &self,
        out: CudaViewMut<'_>,
        gate: CudaView<'_>,
        up: CudaView<'_>,
    ) -> Result<()> {
        swiglu::forward(self, out, gate, up)
    }
    fn swiglu_backward(
        &self,
        dgate: CudaViewMut<'_>,
        dup: CudaViewMut<'_>,
        dout: CudaView<'_>,
        gate: CudaView<'_>,
        up: CudaView<'_>,
    ) -> Result<()> {
        swiglu::backward(self, dgate, dup, dout, gate, up)
    }

    // ---- dropout --------------------------------------------------------
    fn dropout_forward(
        &self,
        out: CudaViewMut<'_>,
        x: CudaView<'_>,
        p: f32,
        seed: u64,
    ) -> Result<()> {
        dropout::forward(self, out, x, p, seed)
    }
    fn dropout_backward(
        &self,
        dx: CudaViewMut<'_>,
        dout: CudaView<'_>,
        p: f32,
        seed: u64,
    ) -> Result<()> {
        dropout::backward(self, dx, dout, p, seed)
    }

    // ---- cross-entropy --------------------------------------------------
    fn cross_entropy(
        &self,
        logits: CudaViewMut<'_>,
        targets: &[i32],
        v: usize,
        grad_scales: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        cross_entropy::cross_entropy(self, logits, targets, v, grad_scales)
    }

    // ---- softmax entropy ------------------------------------------------
    fn softmax_entropy(&self, logits: CudaView<'_>, v: usize) -> Result<Vec<f32>> {
        softmax_entropy::softmax_entropy(self, logits, v)
    }

    // ---- LoRA linear (fused) ----------------------------------------------
    fn lora_linear_forward(
        &self,
        y: CudaViewMut<'_>,
        xa: CudaViewMut<'_>,
        scratch_x: CudaViewMut<'_>,
        x: CudaView<'_>,
        w: CudaView<'_>,
        a: CudaView<'_>,
        b: CudaView<'_>,
        dropout: Option<LoraDropout<'_>>,
        s: LoraShape,
        accumulate: bool,
    ) -> Result<()> {
        lora::forward(self, y, xa, scratch_x, x, w, a, b, dropout, s, accumulate)
    }
    fn lora_linear_backward(
        &self,
        dx: CudaViewMut<'_>,
        da: Option<CudaViewMut<'_>>,
        db: Option<CudaViewMut<'_>>,
        scratch_x: CudaViewMut<'_>,
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
        lora::backward(
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
    fn adamw(
        &self,
        params: CudaViewMut<'_>,
        grads: CudaView<'_>,
        m: CudaViewMut<'_>,
        v: CudaViewMut<'_>,
        h: AdamW,
    ) -> Result<()> {
        adamw::adamw(self, params, grads, m, v, h)
    }
}
