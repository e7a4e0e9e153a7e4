// RMSNorm: out = x · rstd · w, rstd = 1/sqrt(mean(x²) + eps), per row of C.
// Backward, for one row with g = dout and r = rstd:
//   dx_j += r·w_j·g_j − x_j · r³ · mean_k(x_k·w_k·g_k)
//   dw_j += Σ_rows g_j · x_j · r  (two stages, see bias.cu)
// One block per row for the row kernels (blockDim.x a multiple of 32);
// row sums in f64 through elementwise_block_sum_f64 (fixed order).

// out[N,C], rstd[N] (f32); x[N,C], w[C].
extern "C" __global__ void rmsnorm_forward(void* out, int dt_out, float* rstd, const void* x, int dt_x,
                                           const void* w, int dt_w, i64 c, float eps) {
    i64 row = blockIdx.x;
    i64 base = row * c;
    double ss = 0.0;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
        double v = (double)ld(x, dt_x, base + j);
        ss += v * v;
    }
    ss = elementwise_block_sum_f64(ss);
    float r = (float)(1.0 / sqrt(ss / (double)c + (double)eps));
    if (threadIdx.x == 0) rstd[row] = r;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x)
        st(out, dt_out, base + j, ld(x, dt_x, base + j) * r * ld(w, dt_w, j));
}

// dx[N,C] += r·w·g − x·k with k = r³·mean(x·w·g), per row.
extern "C" __global__ void rmsnorm_backward_dx(void* dx, int dt_dx, const void* dout, int dt_g, const void* x,
                                               int dt_x, const void* w, int dt_w, const float* rstd, i64 c) {
    i64 row = blockIdx.x;
    i64 base = row * c;
    double dot = 0.0;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x)
        dot += (double)ld(x, dt_x, base + j) * (double)ld(w, dt_w, j) * (double)ld(dout, dt_g, base + j);
    dot = elementwise_block_sum_f64(dot);
    float r = rstd[row];
    double rd = (double)r;
    float k = (float)(rd * rd * rd * (dot / (double)c));
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
        float g = ld(dout, dt_g, base + j), xv = ld(x, dt_x, base + j), wv = ld(w, dt_w, j);
        st(dx, dt_dx, base + j, ld(dx, dt_dx, base + j) + (r * wv * g - xv * k));
    }
}

// Stage 1 of dw (the layout of bias_backward_partial): thread t of block
// (bx, chunk) owns column col = bx·blockDim.x + t and writes
// partial[chunk, col] = Σ over the chunk's rows r, in order, of g·x·rstd[r].
extern "C" __global__ void rmsnorm_backward_dw_partial(float* partial, const void* dout, int dt_g, const void* x,
                                                       int dt_x, const float* rstd, i64 rows, i64 c,
                                                       i64 rows_per_chunk) {
    i64 col = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if (col >= c) return;
    i64 chunk = blockIdx.y;
    i64 r0 = chunk * rows_per_chunk;
    i64 r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
    float acc = 0.0f;
    for (i64 r = r0; r < r1; ++r) acc += ld(dout, dt_g, r * c + col) * ld(x, dt_x, r * c + col) * rstd[r];
    partial[chunk * c + col] = acc;
}
