// Memory ops: fill and dtype conversion (a same-dtype copy is a memcpy).

extern "C" __global__ void fill(void* x, int dt, i64 n, float value) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st(x, dt, i, value);
}

// dst[i] = src[i], converting between storage types (round to nearest even).
extern "C" __global__ void convert(void* dst, int dt_dst, const void* src, int dt_src, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st(dst, dt_dst, i, ld(src, dt_src, i));
}
