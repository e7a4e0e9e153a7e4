// Kernels that test the emulator itself (not part of the CUDA program):
// appended to the program by harness.rs, run by the emulator_* tests of
// kernels/tests/emu_kernels.rs. They cover what no kernel of the program uses
// yet (the <mma.h> shim) and the warp primitives against plain definitions.
#include <mma.h>

// c[16×16] (f32, row-major) = a[16×16] (row-major) · b[16×16] (stored
// column-major: b[n·16 + k]) + c, one warp. bf: a and b are bf16, else fp16.
template <typename T>
__device__ __forceinline__ void emu_selftest_wmma_t(const T* a, const T* b, float* c) {
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
    wmma::load_matrix_sync(fa, a, 16);
    wmma::load_matrix_sync(fb, b, 16);
    wmma::load_matrix_sync(fc, c, 16, wmma::mem_row_major);
    wmma::mma_sync(fc, fa, fb, fc);
    for (int i = 0; i < fc.num_elements; ++i) fc.x[i] *= 2.0f;  // elementwise ops on fragments
    wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}

extern "C" __global__ void emu_selftest_wmma(const void* a, const void* b, float* c, int bf) {
    if (bf) emu_selftest_wmma_t<__nv_bfloat16>((const __nv_bfloat16*)a, (const __nv_bfloat16*)b, c);
    else emu_selftest_wmma_t<__half>((const __half*)a, (const __half*)b, c);
}

// Per thread t of a block (blockDim.x a multiple of 32), lane l = t % 32:
// out[6t..6t+5] = xor-shuffle(v, 5), shfl(v, 31 − l), shfl_down(v, 3),
// shfl_up(v, 3), ballot(v > 0) as float bits, any/all(v > 0) + 2·all, and
// a block-wide sum through __shared__ memory and __syncthreads.
extern "C" __global__ void emu_selftest_warp(const float* v, float* out) {
    __shared__ float total[1];
    const int t = threadIdx.x, l = t & 31;
    const float x = v[t];
    if (t == 0) total[0] = 0.0f;
    __syncthreads();
    for (int u = 0; u < (int)blockDim.x; ++u) {
        if (u == t) total[0] += x;  // one thread at a time, in thread order
        __syncthreads();
    }
    out[7 * t + 0] = __shfl_xor_sync(0xffffffffu, x, 5);
    out[7 * t + 1] = __shfl_sync(0xffffffffu, x, 31 - l);
    out[7 * t + 2] = __shfl_down_sync(0xffffffffu, x, 3);
    out[7 * t + 3] = __shfl_up_sync(0xffffffffu, x, 3);
    out[7 * t + 4] = __uint_as_float(__ballot_sync(0xffffffffu, x > 0.0f));
    out[7 * t + 5] = (float)(__any_sync(0xffffffffu, x > 0.0f) + 2 * __all_sync(0xffffffffu, x > 0.0f));
    out[7 * t + 6] = total[0];
}

// A __syncthreads that the threads past `live` never reach: must be
// reported as a deadlock.
extern "C" __global__ void emu_selftest_deadlock(int live) {
    if ((int)threadIdx.x >= live) return;
    __syncthreads();
}
