// Shared by every kernel source: the CUDA sources under kernels/src/cuda/ are
// concatenated after this header into ONE NVRTC program (one compile, one
// module, one cache entry), so nothing here may be defined twice.
//
// Storage dtypes. A buffer is f32 (master weights, gradients, optimizer
// moments, statistics) or the backend's compute dtype (weights and
// activations: f32, bf16 or fp16). Generic kernels take each pointer with its
// dtype code and convert through ld/st; arithmetic is always f32.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define DT_F32 0
#define DT_BF16 1
#define DT_F16 2

typedef long long i64;

__device__ __forceinline__ float ld(const void* p, int dt, i64 i) {
    if (dt == DT_BF16) return __bfloat162float(((const __nv_bfloat16*)p)[i]);
    if (dt == DT_F16) return __half2float(((const __half*)p)[i]);
    return ((const float*)p)[i];
}

__device__ __forceinline__ void st(void* p, int dt, i64 i, float v) {
    if (dt == DT_BF16) ((__nv_bfloat16*)p)[i] = __float2bfloat16(v);
    else if (dt == DT_F16) ((__half*)p)[i] = __float2half(v);
    else ((float*)p)[i] = v;
}

// Typed conversions for the templated (performance-critical) kernels.
template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of up to 1024 threads (blockDim.x a multiple of 32), in a
// fixed order: the result is the same on every run. Every thread gets it.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // `partial` may still be read by a previous call
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    float t = lane < warps ? partial[lane] : 0.0f;
    return warp_sum(t);
}

// The dropout mask of backend.rs (`dropout_bits`): a keyed lowbias32 hash of
// the element index. Must stay bit-identical to the Rust version.
__device__ __forceinline__ unsigned int dropout_bits(unsigned long long seed, unsigned long long i) {
    unsigned int idx = (unsigned int)i ^ ((unsigned int)(i >> 32) * 0x9E3779B9u);
    unsigned int mul = (unsigned int)(seed >> 32) | 1u;
    unsigned int x = idx * mul ^ (unsigned int)seed;
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}

// keep iff bits >= threshold, threshold = p * 2^32 (as a u64: p = 1 drops all).
__device__ __forceinline__ bool dropout_keep(unsigned long long seed, unsigned long long i,
                                             unsigned long long threshold) {
    return (unsigned long long)dropout_bits(seed, i) >= threshold;
}
