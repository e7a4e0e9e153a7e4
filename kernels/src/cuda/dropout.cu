// Inverted dropout with the counter-based mask of common.cuh: element i of
// the view is kept iff dropout_bits(seed, i) ≥ threshold (threshold = p·2³²
// as a u64, the host's dropout_threshold(p)), the CPU's exact mask. Dropped
// elements are never read, so p = 1 (inv_keep = inf) gives zeros, not NaN.

// out[i] = keep(i) ? x[i]·inv_keep : 0.
extern "C" __global__ void dropout_forward(void* out, int dt_out, const void* x, int dt_x, unsigned long long seed,
                                           unsigned long long threshold, float inv_keep, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        bool keep = dropout_keep(seed, (unsigned long long)i, threshold);
        st(out, dt_out, i, keep ? ld(x, dt_x, i) * inv_keep : 0.0f);
    }
}

// dx[i] += keep(i) ? dout[i]·inv_keep : 0.
extern "C" __global__ void dropout_backward(void* dx, int dt_dx, const void* dout, int dt_dout,
                                            unsigned long long seed, unsigned long long threshold, float inv_keep,
                                            i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        bool keep = dropout_keep(seed, (unsigned long long)i, threshold);
        st(dx, dt_dx, i, ld(dx, dt_dx, i) + (keep ? ld(dout, dt_dout, i) * inv_keep : 0.0f));
    }
}
