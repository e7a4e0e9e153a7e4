//! Matrix products through cuBLAS (`cublasGemmEx`, f32 accumulation). Used for
//! the frozen base weights and every GEMM the model asks for directly; the
//! LoRA path has its own kernels (lora.cu).
//!
//! Row-major ↔ column-major: a row-major `[r,c]` matrix is the column-major
//! `[c,r]` matrix (its transpose), so `C = op(a)·op(b)` (row-major) is computed
//! as the column-major `Cᵀ = op(b)ᵀ·op(a)ᵀ`: cuBLAS's A is our `b` and its B
//! is our `a`, with m and n swapped.

use super::{memory, Cuda, CudaBuf, CudaView, CudaViewMut, Dtype};
use crate::backend::{Backend, Gemm, Result};
use crate::cpu::check::{expect_len, product, shape_err};
use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use std::ffi::c_void;

fn data_type(d: Dtype) -> cudaDataType {
    match d {
        Dtype::F32 => cudaDataType::CUDA_R_32F,
        Dtype::Bf16 => cudaDataType::CUDA_R_16BF,
        Dtype::F16 => cudaDataType::CUDA_R_16F,
    }
}

/// `v` in storage type `to`: itself when it already is, else a converted copy
/// kept alive in `keep`.
fn as_dtype<'a>(
    cu: &Cuda,
    v: CudaView<'a>,
    to: Dtype,
    keep: &'a mut Option<CudaBuf>,
) -> Result<CudaView<'a>> {
    if v.dtype == to {
        return Ok(v);
    }
    let mut buf = cu.alloc(v.len, to)?;
    memory::convert(cu, cu.view_mut(&mut buf, 0..v.len), v)?;
    let buf = keep.insert(buf);
    Ok(cu.view(buf, 0..v.len))
}

pub(super) fn gemm(
    cu: &Cuda,
    out: CudaViewMut<'_>,
    a: CudaView<'_>,
    b: CudaView<'_>,
    g: Gemm,
) -> Result<()> {
    const OP: &str = "gemm";
    expect_len(OP, "a", a.len, product(OP, &[g.m, g.k])?)?;
    expect_len(OP, "b", b.len, product(OP, &[g.k, g.n])?)?;
    expect_len(OP, "out", out.len, product(OP, &[g.m, g.n])?)?;
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    let (m, n, k) = (dim(g.m)?, dim(g.n)?, dim(g.k)?);
    // cublasGemmEx takes A and B of one type, and C of that type or f32.
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
    let (mut keep_a, mut keep_b) = (None, None);
    let a = as_dtype(cu, a, inputs, &mut keep_a)?;
    let b = as_dtype(cu, b, inputs, &mut keep_b)?;

    // cuBLAS's A = our b: stored row-major [k,n] (= col-major [n,k], no
    // transpose) or, when trans_b, [n,k] (= col-major [k,n], transposed).
    let (op_b, ld_b) = if g.trans_b {
        (cublasOperation_t::CUBLAS_OP_T, k)
    } else {
        (cublasOperation_t::CUBLAS_OP_N, n)
    };
    // cuBLAS's B = our a: [m,k] (col-major [k,m]) or, when trans_a, [k,m].
    let (op_a, ld_a) = if g.trans_a {
        (cublasOperation_t::CUBLAS_OP_T, m)
    } else {
        (cublasOperation_t::CUBLAS_OP_N, k)
    };
    let alpha = g.alpha;
    let beta: f32 = if g.accumulate { 1.0 } else { 0.0 };
    if k == 0 {
        // An empty sum: out = 0 (or unchanged when accumulating).
        return if g.accumulate {
            Ok(())
        } else {
            memory::fill(cu, out, 0.0)
        };
    }
    // SAFETY: the three views were checked above to hold exactly m·k, k·n and
    // m·n elements of their storage types, which are the types passed; the
    // leading dimensions match those shapes; alpha and beta are f32 as
    // CUBLAS_COMPUTE_32F requires and outlive the call (cuBLAS reads host
    // scalars before returning). The handle is bound to the backend's stream,
    // so the product is ordered with every other kernel.
    unsafe {
        gemm_ex(
            *cu.blas().handle(),
            op_b,
            op_a,
            n,
            m,
            k,
            &alpha as *const f32 as *const c_void,
            b.ptr as *const c_void,
            data_type(b.dtype),
            ld_b,
            a.ptr as *const c_void,
            data_type(a.dtype),
            ld_a,
            &beta as *const f32 as *const c_void,
            out.ptr as *mut c_void,
            data_type(out.dtype),
            n,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| shape_err(OP, format!("cuBLAS: {e:?} (m={} n={} k={})", g.m, g.n, g.k)))
}

fn dim(d: usize) -> Result<i32> {
    i32::try_from(d).map_err(|_| shape_err("gemm", format!("dimension {d} exceeds i32")))
}
