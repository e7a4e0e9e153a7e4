// Attention of new queries over a key/value cache (generation): one warp
// (block of 32 threads) per query row (b, i, h). Lanes split the head dim
// (lane owns dims lane, lane+32, ...); keys are visited in order with an
// online softmax (running max m and sum l, rescaling the accumulator), all in
// f32, so the result does not depend on any schedule.
// q, out: [B,TQ,NH,HD]; k, v: [B,CAP,NKV,HD]; mask: [B,LEN], LEN = START+TQ,
// 0 = padding. Query i sits at slot START+i and sees keys j ≤ START+i.
// A query with no visible key gets out = 0.

#define ATTN_KV_MAX_PER_LANE 8  // HD ≤ 256
#define ATTN_KV_NEG_INF __int_as_float((int)0xff800000u)

extern "C" __global__ void attention_kv_forward(void* out, const void* q, const void* k, const void* v, int dt,
                                                const unsigned char* mask, i64 tq, i64 cap, i64 start, i64 nh,
                                                i64 nkv, i64 hd, float scale) {
    i64 row = blockIdx.x;  // (b·TQ + i)·NH + h
    i64 h = row % nh, i = (row / nh) % tq, b = row / (nh * tq);
    i64 kvh = h / (nh / nkv);
    i64 len = start + tq, last = start + i;
    int lane = threadIdx.x;
    float qv[ATTN_KV_MAX_PER_LANE], acc[ATTN_KV_MAX_PER_LANE];
#pragma unroll
    for (int c = 0; c < ATTN_KV_MAX_PER_LANE; c++) {
        i64 d = lane + 32 * c;
        qv[c] = d < hd ? ld(q, dt, row * hd + d) : 0.0f;
        acc[c] = 0.0f;
    }
    float m = ATTN_KV_NEG_INF, l = 0.0f;
    for (i64 j = 0; j <= last; j++) {
        if (!mask[b * len + j]) continue;  // uniform over the warp
        i64 kb = ((b * cap + j) * nkv + kvh) * hd;
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < ATTN_KV_MAX_PER_LANE; c++) {
            i64 d = lane + 32 * c;
            if (d < hd) s += qv[c] * ld(k, dt, kb + d);
        }
        s = warp_sum(s) * scale;
        float m_new = fmaxf(m, s);
        float corr = expf(m - m_new);  // 0 on the first visible key (m = −inf)
        float p = expf(s - m_new);
        l = l * corr + p;
#pragma unroll
        for (int c = 0; c < ATTN_KV_MAX_PER_LANE; c++) {
            i64 d = lane + 32 * c;
            if (d < hd) acc[c] = acc[c] * corr + p * ld(v, dt, kb + d);
        }
        m = m_new;
    }
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int c = 0; c < ATTN_KV_MAX_PER_LANE; c++) {
        i64 d = lane + 32 * c;
        if (d < hd) st(out, dt, row * hd + d, acc[c] * inv);
    }
}
