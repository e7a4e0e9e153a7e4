// Fused softmax cross-entropy over logits[N,V], one block per row
// (blockDim.x a multiple of 32, ≤ 1024). Each thread keeps an online
// (running max m, Σ e^(x − m)) over its strided part of the row, so the row is
// read once for the loss (V is 150k for Qwen: no softmax buffer). The block
// then combines the pairs in a fixed order (deterministic). With per-row
// gradient scales, a second pass overwrites row n in place with
// scales[n]·(softmax − onehot(t)): the gradient of Σ_n scales[n]·loss[n].

#define CROSS_ENTROPY_IGNORE (-100)
// −inf (NVRTC has no INFINITY without <math.h>).
#define CROSS_ENTROPY_NEG_INF __int_as_float((int)0xff800000u)

// Max over the block in a fixed order; every thread gets it. Like the CPU's
// max, NaN inputs are passed over (they reach the loss through the sum).
// Also used by softmax_entropy.cu (one NVRTC program), as is the −inf above.
__device__ __forceinline__ float cross_entropy_block_max(float v) {
    __shared__ float cross_entropy_max_part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();  // the shared array may still be read by a previous call
    if (lane == 0) cross_entropy_max_part[warp] = v;
    __syncthreads();
    float t = lane < warps ? cross_entropy_max_part[lane] : CROSS_ENTROPY_NEG_INF;
    return warp_max(t);
}

// loss[row] = −log softmax(logits[row])[t] (0 when t = −100); when scales is
// not null (one f32 per row), logits[row] = scales[row]·(softmax − onehot(t))
// (zeros when t = −100). Targets are checked on the host: t = −100 or
// 0 ≤ t < V.
extern "C" __global__ void cross_entropy_rows(void* logits, int dt, const int* targets, float* loss, i64 v,
                                              const float* scales) {
    i64 row = blockIdx.x;
    i64 base = row * v;
    int t = targets[row];  // the same for the whole block: branches are uniform
    bool write_grad = scales != nullptr;  // uniform too
    if (t == CROSS_ENTROPY_IGNORE) {
        if (threadIdx.x == 0) loss[row] = 0.0f;
        if (write_grad)
            for (i64 j = threadIdx.x; j < v; j += blockDim.x) st(logits, dt, base + j, 0.0f);
        return;
    }
    // Read before the barriers below, so before any thread overwrites the row.
    float xt = threadIdx.x == 0 ? ld(logits, dt, base + t) : 0.0f;

    // Online max and sum over j ≡ threadIdx.x (mod blockDim.x). A −inf logit
    // adds e^(−inf) = 0 (skipped, so −inf − (−inf) never occurs); NaN
    // propagates into s.
    float m = CROSS_ENTROPY_NEG_INF, s = 0.0f;
    for (i64 j = threadIdx.x; j < v; j += blockDim.x) {
        float x = ld(logits, dt, base + j);
        if (x > m) {
            s = s * expf(m - x) + 1.0f;
            m = x;
        } else if (x != CROSS_ENTROPY_NEG_INF) {
            s += expf(x - m);
        }
    }
    float mx = cross_entropy_block_max(m);
    // A thread with nothing summed (s = 0) contributes 0, even when m = −inf.
    double part = s == 0.0f ? 0.0 : (double)(s * expf(m - mx));
    double sum = elementwise_block_sum_f64(part);  // Σ_j e^(x_j − mx)
    if (threadIdx.x == 0) loss[row] = (float)((double)mx + log(sum) - (double)xt);
    if (!write_grad) return;

    // Every thread is past the barriers of the two block reductions, so every
    // read of the first pass is done; each element below is read and then
    // written by the same thread.
    float scale = scales[row];
    float k = (float)((double)scale / sum);  // scale / Σ e^(x − mx)
    for (i64 j = threadIdx.x; j < v; j += blockDim.x) {
        float g = expf(ld(logits, dt, base + j) - mx) * k;
        if (j == t) g -= scale;
        st(logits, dt, base + j, g);
    }
}
