// One AdamW step (torch.optim.AdamW, decoupled weight decay) on f32 params,
// grads and moments, with the host's bias-correction terms (cpu/adamw.rs):
//   m = β1·m + (1−β1)·g;  v = β2·v + (1−β2)·g²
//   p = p·decay − step_size·m / (sqrt(v)·inv_sqrt_bc2 + eps)
// decay = 1 − lr·wd, step_size = lr / bc1, inv_sqrt_bc2 = 1/sqrt(bc2).
extern "C" __global__ void adamw_step(float* p, const float* g, float* m, float* v, float b1, float b2, float eps,
                                      float decay, float step_size, float inv_sqrt_bc2, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float gi = g[i];
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float pi = p[i] * decay;
        pi -= step_size * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps);
        p[i] = pi;
    }
}
