// Elementwise ops over flat buffers: axpy and scale (gradient accumulation,
// clipping) and the sum of squares behind the global gradient norm.
// Every kernel is a grid-stride loop over i < n, so any grid size is correct.

// Sum of a double over a block of up to 1024 threads (blockDim.x a multiple
// of 32), in a fixed order: the same result on every run, in every thread.
// Also used by rmsnorm.cu and cross_entropy.cu (one NVRTC program).
__device__ __forceinline__ double elementwise_block_sum_f64(double v) {
    __shared__ double elementwise_partial_f64[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();  // the shared array may still be read by a previous call
    if (lane == 0) elementwise_partial_f64[warp] = v;
    __syncthreads();
    double t = lane < warps ? elementwise_partial_f64[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    return t;
}

// y[i] += alpha * x[i].
extern "C" __global__ void elementwise_axpy(void* y, int dt_y, float alpha, const void* x, int dt_x, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st(y, dt_y, i, ld(y, dt_y, i) + alpha * ld(x, dt_x, i));
}

// x[i] *= s.
extern "C" __global__ void elementwise_scale(void* x, int dt, float s, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st(x, dt, i, ld(x, dt, i) * s);
}

// partial[blockIdx.x] = Σ x[i]² (in f64) over the indices this block's threads
// visit in the grid-stride loop. The host fixes the grid from n alone and adds
// the partials in block order, so the result is deterministic. inf and NaN
// propagate (squares are ≥ 0, so no inf − inf can appear).
extern "C" __global__ void elementwise_sum_squares(double* partial, const void* x, int dt, i64 n) {
    double acc = 0.0;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        double v = (double)ld(x, dt, i);
        acc += v * v;
    }
    acc = elementwise_block_sum_f64(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}
