// Row-broadcast bias and its gradient, plus the deterministic column
// reduction shared with rmsnorm.cu's dw: stage 1 writes one partial sum per
// (chunk of rows, column) into a scratch, stage 2 (bias_sum_partials) adds
// the chunks of each column in chunk order. No float atomics anywhere.

// x[N,C] += bias[C]; n = N·C.
extern "C" __global__ void bias_add(void* x, int dt_x, const void* bias, int dt_b, i64 c, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st(x, dt_x, i, ld(x, dt_x, i) + ld(bias, dt_b, i % c));
}

// Stage 1 of dbias: block (bx, chunk) with 1-D threads; thread t owns column
// col = bx·blockDim.x + t and sums dout[r, col] over the chunk's rows
// r ∈ [chunk·rows_per_chunk, min(+rows_per_chunk, rows)) in order:
// partial[chunk, col] (partial: [chunks, C], f32).
extern "C" __global__ void bias_backward_partial(float* partial, const void* dout, int dt, i64 rows, i64 c,
                                                 i64 rows_per_chunk) {
    i64 col = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if (col >= c) return;
    i64 chunk = blockIdx.y;
    i64 r0 = chunk * rows_per_chunk;
    i64 r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
    float acc = 0.0f;
    for (i64 r = r0; r < r1; ++r) acc += ld(dout, dt, r * c + col);
    partial[chunk * c + col] = acc;
}

// Stage 2: dst[col] += Σ_k partial[k, col] for k = 0..chunks in order (in f64).
extern "C" __global__ void bias_sum_partials(void* dst, int dt_dst, const float* partial, i64 chunks, i64 c) {
    for (i64 col = blockIdx.x * (i64)blockDim.x + threadIdx.x; col < c; col += (i64)gridDim.x * blockDim.x) {
        double s = 0.0;
        for (i64 k = 0; k < chunks; ++k) s += (double)partial[k * c + col];
        st(dst, dt_dst, col, ld(dst, dt_dst, col) + (float)s);
    }
}
