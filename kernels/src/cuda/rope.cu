// Rotary position embedding, HF "rotate_half" layout, in place on x[N,H,HD]:
// dimension k < HD/2 pairs with k + HD/2, both at angle k of the token's
// position. One thread per pair; sign = +1 rotates by +angle (forward),
// −1 by −angle (backward, the transpose). cos, sin: [P, HD/2].
extern "C" __global__ void rope_apply(void* x, int dt_x, const void* cos_t, int dt_cos, const void* sin_t,
                                      int dt_sin, const unsigned int* positions, i64 heads, i64 half,
                                      float sign, i64 pairs) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < pairs; i += (i64)gridDim.x * blockDim.x) {
        i64 k = i % half;        // index within the first half
        i64 nh = i / half;       // token · H + head
        i64 n = nh / heads;      // token
        i64 base = nh * 2 * half;  // start of this head's HD values
        i64 t = (i64)positions[n] * half + k;
        float c = ld(cos_t, dt_cos, t), s = sign * ld(sin_t, dt_sin, t);
        float a = ld(x, dt_x, base + k), b = ld(x, dt_x, base + k + half);
        st(x, dt_x, base + k, a * c - b * s);
        st(x, dt_x, base + k + half, b * c + a * s);
    }
}
