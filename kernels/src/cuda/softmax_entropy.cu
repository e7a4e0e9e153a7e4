// Entropy of the softmax of each row of logits[N,V], one block per row
// (blockDim.x a multiple of 32, ≤ 1024). Read only: V is 150k for Qwen, so
// there is no probability buffer. Each thread keeps an online triple over its
// strided part of the row — running max m, s = Σ e^(x − m) and
// t = Σ e^(x − m)·(x − m) — rescaled when m grows. Keeping t relative to the
// max (rather than Σ e^(x − m)·x) gives H = ln S − T/S without subtracting two
// terms ≈ max, the same value the CPU computes. The block then combines the
// triples in a fixed order (deterministic). Uses cross_entropy.cu's block
// max and −inf and elementwise.cu's f64 block sum (one NVRTC program).

// out[row] = logsumexp(x) − Σ_j softmax(x)_j·x_j over x = logits[row]. A −inf
// logit adds nothing (skipped); a NaN makes the row NaN, as does a row with
// no finite logit (S = 0).
extern "C" __global__ void softmax_entropy_rows(const void* logits, int dt, float* out, i64 v) {
    i64 base = (i64)blockIdx.x * v;
    float m = CROSS_ENTROPY_NEG_INF, s = 0.0f, t = 0.0f;
    for (i64 j = threadIdx.x; j < v; j += blockDim.x) {
        float x = ld(logits, dt, base + j);
        if (x > m) {
            // Rescale to the new max: e^(y − x) = a·e^(y − m) and
            // y − x = (y − m) + (m − x). Skipped while nothing is summed
            // (m = −inf would give 0·∞).
            if (s != 0.0f) {
                float a = expf(m - x);
                t = a * (t + s * (m - x));
                s *= a;
            }
            s += 1.0f;  // x itself: e^0 = 1, times (x − x) = 0 adds nothing to t
            m = x;
        } else if (x != CROSS_ENTROPY_NEG_INF) {
            // x ≤ m, or NaN (which then propagates into s and t).
            float d = x - m;
            float e = expf(d);
            s += e;
            t += e * d;
        }
    }
    float mx = cross_entropy_block_max(m);
    // Each thread's triple moved to the block max: s·a and a·(t + s·(m − mx)),
    // a = e^(m − mx). A thread with nothing summed (s = 0) contributes 0, even
    // when m = −inf.
    double ps = 0.0, pt = 0.0;
    if (s != 0.0f) {
        double d = (double)m - (double)mx;
        double a = (double)expf(m - mx);
        ps = (double)s * a;
        pt = a * ((double)t + (double)s * d);
    }
    double sum_s = elementwise_block_sum_f64(ps);  // S = Σ_j e^(x_j − mx)
    double sum_t = elementwise_block_sum_f64(pt);  // T = Σ_j e^(x_j − mx)·(x_j − mx)
    if (threadIdx.x == 0) out[blockIdx.x] = (float)(log(sum_s) - sum_t / sum_s);
}
