// Causal self-attention with grouped-query heads, flash-attention style:
// the forward keeps only out and the per-row log-sum-exp (lse), the backward
// (FlashAttention-2) recomputes the probabilities tile by tile. No T×T
// matrix ever exists in global memory; softmax statistics and every
// accumulation are f32.
//
// Semantics (= kernels/src/cpu/attention): q, out, dout, dq: [B,T,NH,HD];
// k, v, dk, dv: [B,T,NKV,HD]; lse and D: [B,NH,T] f32; key_mask: [B,T] u8,
// 0 = padding (null: no mask). Query i sees key j iff j <= i and the key is
// not padding; query head h reads kv head h / (NH/NKV); scores are scaled by
// `scale` = 1/sqrt(HD) and lse is the log-sum-exp of the scaled scores. A row
// with no visible key gets out = 0, lse = -inf and contributes no gradient.
// The backward ADDS into dq, dk, dv (read, add in f32, write back).
//
// Storage type T: float, __half or __nv_bfloat16 (q, k, v, out, dout, dq, dk,
// dv all T). Each kernel is a template instantiated three times as
// `extern "C"` entry points with the suffixes _f32, _bf16, _f16.
//
// Matrix products are done by one warp on 16×16 output blocks whose operands
// are tiles in shared memory (AttnMma below), accumulating in f32 registers:
//   - T = __half / __nv_bfloat16: TENSOR CORES (PTX mma.sync m16n8k16,
//     16-bit inputs, f32 accumulators) for every product: Q·Kᵀ and P·V in the
//     forward; Q·Kᵀ, dO·Vᵀ, Pᵀ·dO, dSᵀ·Q and dS·K in the backward.
//     P and dS are rounded to T before their products (as FlashAttention does).
//   - T = float: the same tiling with plain f32 FMAs on the CUDA cores
//     (exact f32; the reference-precision path).
// Both keep an accumulator in the same documented per-lane layout (that of
// mma's C fragment), so row-wise work (masking, online softmax, rescaling,
// the final normalisation and the += into gradients) runs on registers.
//
// Tiles (AttnCfg; the host mirrors the shared-memory sizes in attention.rs):
//   forward:  a block owns BQ query rows of one (b, h), 16 per warp
//             (bf16/f16: 4 warps, BQ = 64, key tiles of BK = 32; f32: 2 warps,
//             BQ = 32, BK = 16) and walks the key tiles up to the causal
//             diagonal, keeping Q, the K and V tile and the warp's P tile in
//             shared memory.
//   backward: square tiles of BB query rows × BB keys (bf16/f16: 32, f32: 16),
//             4 warps. attention_backward_dkdv: a block owns BB keys of one
//             (b, kv head) and loops over the query heads of its group and
//             over the query tiles at or below the diagonal; the block alone
//             writes those dk/dv rows. attention_backward_dq: a block owns BB
//             query rows of one (b, h) and loops over key tiles. No atomics:
//             every sum runs in a fixed order, so results are bitwise
//             reproducible.
// Limits: 1 <= HD <= 128 (tiles are zero-padded to a multiple of 16
// columns). Shared memory stays under 48 KB per block (no opt-in needed).
#define ATTN_FULL 0xffffffffu

__device__ __forceinline__ float attn_neg_inf() { return __int_as_float(0xff800000); }

// HD rounded up to the 16-column blocks of the matrix products.
__device__ __forceinline__ int attn_hd16(int hd) { return (hd + 15) & ~15; }

// Tile sizes per storage type. attention.rs mirrors PAD, FWD_WARPS, FWD_BK
// and BWD_B to size the dynamic shared memory: keep them in sync.
template <typename T>
struct AttnCfg {
    // Row padding of T tiles (elements; 16 bytes): spreads rows over banks
    // (conflict-free fragment loads) and keeps rows 16-byte aligned.
    static constexpr int PAD = 16 / (int)sizeof(T);
    static constexpr int FWD_WARPS = sizeof(T) == 4 ? 2 : 4;
    static constexpr int FWD_BQ = 16 * FWD_WARPS;            // query rows per forward block
    static constexpr int FWD_BK = sizeof(T) == 4 ? 16 : 32;  // keys per forward tile
    static constexpr int BWD_WARPS = 4;
    static constexpr int BWD_B = sizeof(T) == 4 ? 16 : 32;  // query rows = keys per backward tile
};

// Dynamic shared memory of the forward kernel (bytes). Layout, in order:
// sQ [BQ][ldk], sK [BK][ldk], sV [BK][ldk], sP [BQ][BK+PAD] (all T), sOk [BK]
// int; ldk = hd16 + PAD. Every region starts 16-byte aligned.
template <typename T>
__device__ __forceinline__ unsigned attn_fwd_smem_bytes(int hd) {
    typedef AttnCfg<T> C;
    const int ldk = attn_hd16(hd) + C::PAD;
    return (unsigned)(((C::FWD_BQ + 2 * C::FWD_BK) * ldk + C::FWD_BQ * (C::FWD_BK + C::PAD)) * (int)sizeof(T) +
                      C::FWD_BK * 4);
}

// Dynamic shared memory of the backward tile kernels (bytes). Layout:
// sQ, sdO, sK, sV [BB][ldk] T; sP, sdS [BB][BB+PAD] T; sLse, sD [BB] f32;
// sOk [BB] int.
template <typename T>
__device__ __forceinline__ unsigned attn_bwd_smem_bytes(int hd) {
    typedef AttnCfg<T> C;
    const int ldk = attn_hd16(hd) + C::PAD;
    return (unsigned)((4 * ldk + 2 * (C::BWD_B + C::PAD)) * C::BWD_B * (int)sizeof(T) + 3 * C::BWD_B * 4);
}

// The launch must provide the layout's shared memory (the host computes the
// same formula): a mismatch traps instead of corrupting memory.
__device__ __forceinline__ void attn_check_smem(unsigned need) {
    unsigned have;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
    if (have < need) __trap();
}

// Two 16-bit elements p[0] and p[step] packed into 32 bits, p[0] in the low
// half (CONTIG: step = 1, one 4-byte load; p is then 4-byte aligned).
template <bool CONTIG, typename T>
__device__ __forceinline__ unsigned attn_pair(const T* p, int step) {
    if (CONTIG) return *(const unsigned*)p;
    const unsigned short* u = (const unsigned short*)p;
    return (unsigned)u[0] | ((unsigned)u[step] << 16);
}

// d[0..3] += A·B for one m16n8k16 tensor-core product (f32 accumulators).
template <typename T>
__device__ __forceinline__ void attn_mma16816(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                              unsigned b0, unsigned b1);
template <>
__device__ __forceinline__ void attn_mma16816<__nv_bfloat16>(float* d, unsigned a0, unsigned a1, unsigned a2,
                                                             unsigned a3, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void attn_mma16816<__half>(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                                      unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The accumulator layout, shared by both AttnMma versions: element x[e]
// (e < 8) of lane l is at row attn_acc_row(e), column attn_acc_col(e) of the
// 16×16 block: with g = l/4, t = l%4, rows g (e = 0, 1, 4, 5) and g+8
// (e = 2, 3, 6, 7), columns 2t + (e&1) (e < 4) and 8 + 2t + (e&1) (e >= 4).
// This is the C fragment of mma.m16n8k16, one per 8-column half.
__device__ __forceinline__ int attn_acc_half(int e) { return (e >> 1) & 1; }  // 0: row g, 1: row g+8
__device__ __forceinline__ int attn_acc_row(int e) { return ((threadIdx.x & 31) >> 2) + attn_acc_half(e) * 8; }
__device__ __forceinline__ int attn_acc_col(int e) { return (e >> 2) * 8 + (threadIdx.x & 3) * 2 + (e & 1); }

// Warp-level 16×16 matrix products on shared-memory tiles.
//   Acc: a 16×16 f32 accumulator spread over the 32 lanes of a warp (layout above).
//   mma<AT, BT>(acc, a, lda, b, ldb, k): acc += A·B with A 16×k, B k×16 (k a
//     multiple of 16). A(r, x) = AT ? a[x*lda + r] : a[r*lda + x];
//     B(x, c) = BT ? b[c*ldb + x] : b[x*ldb + c].
// All lanes of the warp must call mma together.
//
// T = __half / __nv_bfloat16: TENSOR CORES, PTX mma.sync.m16n8k16 (row.col,
// f32 accumulate), two per 16-column block (n = 0..7 and 8..15). Fragment
// layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with g = lane/4,
// t = lane%4, each 32-bit register holding two 16-bit values, the lower
// column (A) / row (B) in the low half:
//   A 16×16: a0 = A(g, 2t..2t+1), a1 = A(g+8, 2t..), a2 = A(g, 2t+8..), a3 = A(g+8, 2t+8..)
//   B 16×8:  b0 = B(2t..2t+1, g), b1 = B(2t+8..2t+9, g)
//   C 16×8:  c0, c1 = C(g, 2t), C(g, 2t+1); c2, c3 = C(g+8, 2t), C(g+8, 2t+1)
// Acc::x[4n + i] is c_i of the n-th 8-column half. Row pairs of a row-major
// operand (A not transposed, B transposed) are contiguous: one 4-byte load
// (even ld and even offsets keep it aligned); the others take two 2-byte loads.
// (nvcuda::wmma would need crt/mma.h, which the pip CUDA wheels that provide
// NVRTC's headers do not ship, and its accumulator layout is unspecified; the
// instruction needs no header and documents its layout.)
template <typename T>
struct AttnMma {
    struct Acc {
        float x[8];
    };

    template <bool AT, bool BT>
    static __device__ __forceinline__ void mma(Acc& acc, const T* a, int lda, const T* b, int ldb, int k) {
        const int lane = threadIdx.x & 31, g = lane >> 2, t2 = (lane & 3) * 2;
        for (int x = 0; x < k; x += 16) {
            // A(r, c) and A(r, c+1): row-major contiguous, else lda apart.
            const unsigned a0 = AT ? attn_pair<false>(a + (x + t2) * lda + g, lda) : attn_pair<true>(a + g * lda + x + t2, 1);
            const unsigned a1 = AT ? attn_pair<false>(a + (x + t2) * lda + g + 8, lda) : attn_pair<true>(a + (g + 8) * lda + x + t2, 1);
            const unsigned a2 = AT ? attn_pair<false>(a + (x + t2 + 8) * lda + g, lda) : attn_pair<true>(a + g * lda + x + t2 + 8, 1);
            const unsigned a3 = AT ? attn_pair<false>(a + (x + t2 + 8) * lda + g + 8, lda) : attn_pair<true>(a + (g + 8) * lda + x + t2 + 8, 1);
#pragma unroll
            for (int n = 0; n < 2; ++n) {
                const int c = n * 8 + g;  // this lane's column of B
                // B(r, c) and B(r+1, c): contiguous when B is stored transposed, else ldb apart.
                const unsigned b0 = BT ? attn_pair<true>(b + c * ldb + x + t2, 1) : attn_pair<false>(b + (x + t2) * ldb + c, ldb);
                const unsigned b1 = BT ? attn_pair<true>(b + c * ldb + x + t2 + 8, 1) : attn_pair<false>(b + (x + t2 + 8) * ldb + c, ldb);
                attn_mma16816<T>(acc.x + 4 * n, a0, a1, a2, a3, b0, b1);
            }
        }
    }
};

// f32: CUDA cores, same accumulator layout. Per k: A(g, x), A(g+8, x) and
// B(x, c) for the lane's four columns c = 2t, 2t+1, 8+2t, 9+2t.
template <>
struct AttnMma<float> {
    struct Acc {
        float x[8];
    };

    template <bool AT, bool BT>
    static __device__ __forceinline__ void mma(Acc& acc, const float* a, int lda, const float* b, int ldb, int k) {
        const int lane = threadIdx.x & 31, g = lane >> 2, t2 = (lane & 3) * 2;
        for (int x = 0; x < k; ++x) {
            const float a0 = AT ? a[x * lda + g] : a[g * lda + x];              // row g
            const float a1 = AT ? a[x * lda + g + 8] : a[(g + 8) * lda + x];    // row g+8
            float bv[4];                                                         // columns of e = 0, 1, 4, 5
#pragma unroll
            for (int n = 0; n < 4; ++n) {
                const int c = (n >> 1) * 8 + t2 + (n & 1);
                bv[n] = BT ? b[c * ldb + x] : b[x * ldb + c];
            }
#pragma unroll
            for (int e = 0; e < 8; ++e)
                acc.x[e] = fmaf(attn_acc_half(e) ? a1 : a0, bv[(e >> 2) * 2 + (e & 1)], acc.x[e]);
        }
    }
};

template <typename Acc>
__device__ __forceinline__ void attn_acc_zero(Acc& acc) {
#pragma unroll
    for (int e = 0; e < 8; ++e) acc.x[e] = 0.0f;
}

// dst[(row0 + r)·rs + col0 + c] += mult · acc(r, c) for rows < seq and
// columns < hd, converting through f32 (each element is this lane's alone).
template <typename T, typename Acc>
__device__ __forceinline__ void attn_acc_add(T* __restrict__ dst, i64 base, i64 rs, int row0, int col0, int seq, int hd,
                                             const Acc& acc, float mult) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const int row = row0 + attn_acc_row(e), c = col0 + attn_acc_col(e);
        if (row < seq && c < hd) {
            const i64 idx = base + row * rs + c;
            dst[idx] = from_f32<T>(to_f32<T>(dst[idx]) + mult * acc.x[e]);
        }
    }
}

// dst[r][c] (row stride ld) = head row r0 + r, column c, for r < rows and
// c < hd16: zero for c >= hd and for rows >= seq. Row j of the head starts at
// src + j*rs. All threads of the block take part. `vec`: 16-byte copies,
// allowed when hd is a multiple of 16/sizeof(T) and src is 16-byte aligned
// (checked on the host; then every row start is 16-byte aligned too).
template <typename T>
__device__ __forceinline__ void attn_load_tile(T* dst, int ld, const T* __restrict__ src, i64 rs, int r0, int rows,
                                               int seq, int hd, int hd16, int vec) {
    if (vec) {
        constexpr int VE = 16 / (int)sizeof(T);  // elements per 16-byte chunk
        const int cpr = hd16 / VE;               // chunks per row
        for (int x = threadIdx.x; x < rows * cpr; x += blockDim.x) {
            const int r = x / cpr, c = (x % cpr) * VE;
            uint4 val = make_uint4(0u, 0u, 0u, 0u);
            if (r0 + r < seq && c < hd) val = *(const uint4*)(src + (i64)(r0 + r) * rs + c);
            *(uint4*)(dst + r * ld + c) = val;
        }
    } else {
        for (int x = threadIdx.x; x < rows * hd16; x += blockDim.x) {
            const int r = x / hd16, c = x % hd16;
            T val = from_f32<T>(0.0f);
            if (r0 + r < seq && c < hd) val = src[(i64)(r0 + r) * rs + c];
            dst[r * ld + c] = val;
        }
    }
}

// sOk[c] = 1 iff key k0 + c exists and is not padding (c < n).
__device__ __forceinline__ void attn_load_key_ok(int* sOk, int n, const unsigned char* __restrict__ mask, int k0,
                                                 int seq) {
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        const int j = k0 + c;
        sOk[c] = j < seq && (mask == nullptr || mask[j] != 0);
    }
}

// ---------------------------------------------------------------------------
// Forward. grid (ceil(T/BQ), NH, B), block 32·FWD_WARPS threads, dynamic
// shared memory attn_fwd_smem_bytes<T>(hd). Warp w owns the 16 query rows
// q0 + 16w .. q0 + 16w + 15; in the accumulator layout each lane holds
// elements of two of them, rows g and g+8 (u = 0, 1 below), and keeps their
// running max m[u] and sum l[u] (online softmax; the four lanes of a quad
// share a row and agree through shuffles). Per key tile:
//   S = Q_w·Kᵀ (registers) → scale, mask → row max → P = exp(S − m_new)
//   (to the warp's P tile as T) → O ·= exp(m_old − m_new) → O += P·V.
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void attn_forward(T* __restrict__ out, float* __restrict__ lse, const T* __restrict__ q,
                                             const T* __restrict__ k, const T* __restrict__ v,
                                             const unsigned char* __restrict__ key_mask, int seq, int nh, int nkv,
                                             int hd, float scale, int vec) {
    typedef AttnCfg<T> C;
    typedef AttnMma<T> M;
    constexpr int BQ = C::FWD_BQ, BK = C::FWD_BK, NB = BK / 16;
    constexpr int LDP = BK + C::PAD;
    const int hd16 = attn_hd16(hd), ldk = hd16 + C::PAD, nt = hd16 / 16;

    extern __shared__ __align__(128) unsigned char attn_smem[];
    attn_check_smem(attn_fwd_smem_bytes<T>(hd));
    T* sQ = (T*)attn_smem;          // [BQ][ldk]
    T* sK = sQ + BQ * ldk;          // [BK][ldk] keys k0 .. k0+BK−1
    T* sV = sK + BK * ldk;          // [BK][ldk]
    T* sP = sV + BK * ldk;          // [BQ][LDP] probabilities (unnormalised), 16 rows per warp
    int* sOk = (int*)(sP + BQ * LDP);  // [BK] key exists and is not padding

    const int b = blockIdx.z, h = blockIdx.y;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;  // the longest (last) query tiles start first
    const int kvh = h / (nh / nkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const i64 qrs = (i64)nh * hd, kvrs = (i64)nkv * hd;  // row strides of q/out and k/v
    const i64 qbase = ((i64)b * seq * nh + h) * hd;      // q[b, 0, h, 0]
    const i64 kvbase = ((i64)b * seq * nkv + kvh) * hd;  // k[b, 0, kvh, 0]
    const unsigned char* mask = key_mask ? key_mask + (i64)b * seq : nullptr;

    const int w0 = q0 + warp * 16;  // first query row of this warp
    const int g = lane >> 2;        // this lane's rows: w0 + g + 8u, u = 0, 1
    const T* sQw = sQ + warp * 16 * ldk;
    T* sPw = sP + warp * 16 * LDP;

    attn_load_tile(sQ, ldk, q + qbase, qrs, q0, BQ, seq, hd, hd16, vec);

    typename M::Acc o[8];  // O[16 rows][16j .. 16j+15], j < nt
#pragma unroll
    for (int j = 0; j < 8; ++j) attn_acc_zero(o[j]);
    float m[2] = {attn_neg_inf(), attn_neg_inf()};  // running max of the scaled scores
    float l[2] = {0.0f, 0.0f};                      // running sum of exp(score − m)

    const int kend = min(seq, q0 + BQ);  // keys past the block's last row are never visible
    for (int k0 = 0; k0 < kend; k0 += BK) {
        __syncthreads();  // the previous tile's readers of sK, sV, sOk are done
        attn_load_tile(sK, ldk, k + kvbase, kvrs, k0, BK, seq, hd, hd16, vec);
        attn_load_tile(sV, ldk, v + kvbase, kvrs, k0, BK, seq, hd, hd16, vec);
        attn_load_key_ok(sOk, BK, mask, k0, seq);
        __syncthreads();
        // Skip a warp none of whose rows exists or reaches k0: all masked for it.
        if (w0 >= seq || w0 + 15 < k0) continue;

        // S[16][BK] = Q_w · K_tileᵀ, block nb holding keys k0 + 16nb ..
        typename M::Acc s[NB];
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
            attn_acc_zero(s[nb]);
            M::template mma<false, true>(s[nb], sQw, ldk, sK + nb * 16 * ldk, ldk, hd16);
        }
        // Scale and mask (−inf where not visible), and each row's max over the tile.
        float mx[2] = {attn_neg_inf(), attn_neg_inf()};
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int u = attn_acc_half(e), c = nb * 16 + attn_acc_col(e);
                const int i = w0 + g + 8 * u, j = k0 + c;
                const bool vis = i < seq && j <= i && sOk[c];
                s[nb].x[e] = vis ? s[nb].x[e] * scale : attn_neg_inf();
                mx[u] = fmaxf(mx[u], s[nb].x[e]);
            }
        }
        float alpha[2], mnew[2], sum[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            mx[u] = fmaxf(mx[u], __shfl_xor_sync(ATTN_FULL, mx[u], 1));
            mx[u] = fmaxf(mx[u], __shfl_xor_sync(ATTN_FULL, mx[u], 2));
            mnew[u] = fmaxf(m[u], mx[u]);
            // Nothing visible yet: keep everything 0 (and avoid exp(−inf − −inf)).
            alpha[u] = mnew[u] == attn_neg_inf() ? 1.0f : expf(m[u] - mnew[u]);  // 0 when m = −inf
            sum[u] = 0.0f;
        }
        // P = exp(S − m_new) (invisible: exp(−inf) = 0), to the warp's P tile.
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int u = attn_acc_half(e);
                const float p = mnew[u] == attn_neg_inf() ? 0.0f : expf(s[nb].x[e] - mnew[u]);
                sum[u] += p;
                sPw[attn_acc_row(e) * LDP + nb * 16 + attn_acc_col(e)] = from_f32<T>(p);
            }
        }
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            sum[u] += __shfl_xor_sync(ATTN_FULL, sum[u], 1);
            sum[u] += __shfl_xor_sync(ATTN_FULL, sum[u], 2);
            l[u] = l[u] * alpha[u] + sum[u];
            m[u] = mnew[u];
        }
        // O[16][16j..] = alpha·O + P_w[16][BK] · V_tile[BK][16j..]
        __syncwarp();  // the whole P tile of the warp is written
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if (j < nt) {
#pragma unroll
                for (int e = 0; e < 8; ++e) o[j].x[e] *= alpha[attn_acc_half(e)];
                M::template mma<false, false>(o[j], sPw, LDP, sV + j * 16, ldk, BK);
            }
        }
        // sPw is rewritten only after the next tile's barriers: no sync needed here.
    }

    // out = O / l, 0 for a row with no visible key; lse = m + log(l), −inf there.
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        if (j < nt) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int u = attn_acc_half(e);
                const int i = w0 + g + 8 * u, c = j * 16 + attn_acc_col(e);
                if (i < seq && c < hd) out[qbase + i * qrs + c] = from_f32<T>(l[u] > 0.0f ? o[j].x[e] / l[u] : 0.0f);
            }
        }
    }
    if ((lane & 3) == 0) {
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const int i = w0 + g + 8 * u;
            if (i < seq) lse[((i64)b * nh + h) * seq + i] = l[u] > 0.0f ? m[u] + logf(l[u]) : attn_neg_inf();
        }
    }
}

extern "C" __global__ void attention_forward_f32(float* out, float* lse, const float* q, const float* k, const float* v, const unsigned char* key_mask, int seq, int nh, int nkv, int hd, float scale, int vec) {
    attn_forward<float>(out, lse, q, k, v, key_mask, seq, nh, nkv, hd, scale, vec);
}

extern "C" __global__ void attention_forward_bf16(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const unsigned char* key_mask, int seq, int nh, int nkv, int hd, float scale, int vec) {
    attn_forward<__nv_bfloat16>(out, lse, q, k, v, key_mask, seq, nh, nkv, hd, scale, vec);
}

extern "C" __global__ void attention_forward_f16(__half* out, float* lse, const __half* q, const __half* k, const __half* v, const unsigned char* key_mask, int seq, int nh, int nkv, int hd, float scale, int vec) {
    attn_forward<__half>(out, lse, q, k, v, key_mask, seq, nh, nkv, hd, scale, vec);
}

// ---------------------------------------------------------------------------
// Backward, step 1: D[b,h,i] = Σ_d dout[b,i,h,d]·out[b,i,h,d] in f32 (the
// row sums of P∘dP). One warp per row of q's layout (row = (b·T + i)·NH + h);
// any block size that is a multiple of 32.
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void attn_backward_dot(float* __restrict__ dsum, const T* __restrict__ dout,
                                                  const T* __restrict__ out, i64 rows, int seq, int nh, int hd) {
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;  // whole warps only: the shuffles below stay full
    const T* a = dout + row * hd;
    const T* o = out + row * hd;
    float s = 0.0f;
    for (int c = lane; c < hd; c += 32) s += to_f32<T>(a[c]) * to_f32<T>(o[c]);
    s = warp_sum(s);
    if (lane == 0) {
        const i64 bi = row / nh;  // b·T + i
        const int h = (int)(row % nh);
        const i64 b = bi / seq;
        const int i = (int)(bi % seq);
        dsum[(b * nh + h) * seq + i] = s;
    }
}

extern "C" __global__ void attention_backward_dot_f32(float* dsum, const float* dout, const float* out, i64 rows, int seq, int nh, int hd) {
    attn_backward_dot<float>(dsum, dout, out, rows, seq, nh, hd);
}

extern "C" __global__ void attention_backward_dot_bf16(float* dsum, const __nv_bfloat16* dout, const __nv_bfloat16* out, i64 rows, int seq, int nh, int hd) {
    attn_backward_dot<__nv_bfloat16>(dsum, dout, out, rows, seq, nh, hd);
}

extern "C" __global__ void attention_backward_dot_f16(float* dsum, const __half* dout, const __half* out, i64 rows, int seq, int nh, int hd) {
    attn_backward_dot<__half>(dsum, dout, out, rows, seq, nh, hd);
}

// ---------------------------------------------------------------------------
// Backward tiles. Both kernels share the shared-memory layout of
// attn_bwd_smem_bytes and one step per (query tile, key tile) pair
// (attn_bwd_scores): for each 16×16 block, one warp computes S = Q·Kᵀ and
// dP = dO·Vᵀ in registers, then P = exp(scale·S − lse) on visible entries
// (0 elsewhere, and on rows with lse = −inf) and dS = P∘(dP − D), and
// stores P and dS as T for the products that follow.
// ---------------------------------------------------------------------------
template <typename T>
struct AttnBwdSmem {
    T* q;     // [BB][ldk] query rows q0.. of head h
    T* dout;  // [BB][ldk]
    T* k;     // [BB][ldk] keys k0.. of kv head kvh
    T* v;     // [BB][ldk]
    T* p;     // [BB][BB+PAD] P of the current pair
    T* ds;    // [BB][BB+PAD] dS of the current pair
    float* lse;  // [BB] lse of the query rows (−inf past the end)
    float* d;    // [BB] D of the query rows
    int* ok;     // [BB] key exists and is not padding

    __device__ __forceinline__ AttnBwdSmem(unsigned char* base, int ldk) {
        constexpr int BB = AttnCfg<T>::BWD_B, LDP = BB + AttnCfg<T>::PAD;
        q = (T*)base;
        dout = q + BB * ldk;
        k = dout + BB * ldk;
        v = k + BB * ldk;
        p = v + BB * ldk;
        ds = p + BB * LDP;
        lse = (float*)(ds + BB * LDP);
        d = lse + BB;
        ok = (int*)(d + BB);
    }
};

// Loads the query-side tile: Q and dO rows q0.. of head h (bases: q[b,0,h,0]),
// their lse (lbase: lse[b,h,0]) and D. No barrier.
template <typename T>
__device__ __forceinline__ void attn_bwd_load_q(const AttnBwdSmem<T>& sm, int ldk, const T* __restrict__ q,
                                                const T* __restrict__ dout, const float* __restrict__ lse,
                                                const float* __restrict__ dsum, i64 qbase, i64 qrs, i64 lbase, int q0,
                                                int seq, int hd, int hd16, int vec) {
    constexpr int BB = AttnCfg<T>::BWD_B;
    attn_load_tile(sm.q, ldk, q + qbase, qrs, q0, BB, seq, hd, hd16, vec);
    attn_load_tile(sm.dout, ldk, dout + qbase, qrs, q0, BB, seq, hd, hd16, vec);
    for (int x = threadIdx.x; x < BB; x += blockDim.x) {
        const bool in = q0 + x < seq;
        sm.lse[x] = in ? lse[lbase + q0 + x] : attn_neg_inf();
        sm.d[x] = in ? dsum[lbase + q0 + x] : 0.0f;
    }
}

// P (if WANT_P) and dS of query rows q0.. and keys k0.. into sm.p, sm.ds.
// Both tiles must be loaded and visible to every thread; ends with a barrier,
// after which P and dS are visible to every thread.
template <typename T, bool WANT_P>
__device__ __forceinline__ void attn_bwd_scores(const AttnBwdSmem<T>& sm, int ldk, int hd16, int q0, int k0, int seq,
                                                float scale) {
    typedef AttnCfg<T> C;
    typedef AttnMma<T> M;
    constexpr int BB = C::BWD_B, NB = BB / 16, NW = C::BWD_WARPS;
    constexpr int LDP = BB + C::PAD;
    for (int blk = threadIdx.x >> 5; blk < NB * NB; blk += NW) {
        const int qb = blk / NB, kb = blk % NB;  // rows 16qb.., keys 16kb..
        typename M::Acc s, dp;
        attn_acc_zero(s);
        attn_acc_zero(dp);
        M::template mma<false, true>(s, sm.q + qb * 16 * ldk, ldk, sm.k + kb * 16 * ldk, ldk, hd16);
        M::template mma<false, true>(dp, sm.dout + qb * 16 * ldk, ldk, sm.v + kb * 16 * ldk, ldk, hd16);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int r = qb * 16 + attn_acc_row(e), c = kb * 16 + attn_acc_col(e);
            const int i = q0 + r, j = k0 + c;
            const float li = sm.lse[r];
            const bool vis = i < seq && j <= i && sm.ok[c] && li != attn_neg_inf();
            const float p = vis ? expf(s.x[e] * scale - li) : 0.0f;
            if (WANT_P) sm.p[r * LDP + c] = from_f32<T>(p);
            sm.ds[r * LDP + c] = from_f32<T>(p * (dp.x[e] - sm.d[r]));
        }
    }
    __syncthreads();
}

// ---------------------------------------------------------------------------
// Backward, step 2: dk, dv. grid (ceil(T/BB), NKV, B), block 128, dynamic
// shared memory attn_bwd_smem_bytes<T>(hd). The block keeps K and V of keys
// k0 .. k0+BB−1 in shared memory and, for every query head of the group and
// every query tile from the diagonal on, adds Pᵀ·dO into dV and dSᵀ·Q into dK,
// held as accumulators: output block t = (kb, ct) (keys 16kb.., columns
// 16ct..) belongs to warp t % 4. At the end dk += scale·dK, dv += dV.
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void attn_backward_dkdv(T* __restrict__ dk, T* __restrict__ dv, const T* __restrict__ dout,
                                                   const T* __restrict__ q, const T* __restrict__ k,
                                                   const T* __restrict__ v, const float* __restrict__ lse,
                                                   const float* __restrict__ dsum,
                                                   const unsigned char* __restrict__ key_mask, int seq, int nh,
                                                   int nkv, int hd, float scale, int vec) {
    typedef AttnCfg<T> C;
    typedef AttnMma<T> M;
    constexpr int BB = C::BWD_B, NB = BB / 16, NW = C::BWD_WARPS;
    constexpr int LDP = BB + C::PAD;
    constexpr int MAXT = (NB * 8 + NW - 1) / NW;  // output blocks per warp, at most (HD <= 128)
    const int hd16 = attn_hd16(hd), ldk = hd16 + C::PAD, nt = hd16 / 16;
    const int nblocks = NB * nt;  // output blocks of dK (and of dV)

    extern __shared__ __align__(128) unsigned char attn_smem[];
    attn_check_smem(attn_bwd_smem_bytes<T>(hd));
    const AttnBwdSmem<T> sm(attn_smem, ldk);

    const int b = blockIdx.z, kvh = blockIdx.y, k0 = blockIdx.x * BB;  // early keys (most work) first
    const int group = nh / nkv;
    const int warp = threadIdx.x >> 5;
    const i64 qrs = (i64)nh * hd, kvrs = (i64)nkv * hd;
    const i64 kvbase = ((i64)b * seq * nkv + kvh) * hd;
    const unsigned char* mask = key_mask ? key_mask + (i64)b * seq : nullptr;

    attn_load_tile(sm.k, ldk, k + kvbase, kvrs, k0, BB, seq, hd, hd16, vec);
    attn_load_tile(sm.v, ldk, v + kvbase, kvrs, k0, BB, seq, hd, hd16, vec);
    attn_load_key_ok(sm.ok, BB, mask, k0, seq);

    typename M::Acc dkacc[MAXT], dvacc[MAXT];
#pragma unroll
    for (int t = 0; t < MAXT; ++t) {
        attn_acc_zero(dkacc[t]);
        attn_acc_zero(dvacc[t]);
    }

    for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
        const i64 qbase = ((i64)b * seq * nh + h) * hd;
        const i64 lbase = ((i64)b * nh + h) * seq;
        // Query rows before k0 see none of these keys: start at the diagonal tile.
        for (int q0 = k0; q0 < seq; q0 += BB) {
            __syncthreads();  // the previous pair's readers of the query tile, P and dS are done
            attn_bwd_load_q(sm, ldk, q, dout, lse, dsum, qbase, qrs, lbase, q0, seq, hd, hd16, vec);
            __syncthreads();
            attn_bwd_scores<T, true>(sm, ldk, hd16, q0, k0, seq, scale);
            // dV[kb][ct] += Pᵀ[16kb.., all rows] · dO[all rows, 16ct..];
            // dK[kb][ct] += dSᵀ[16kb.., all rows] · Q[all rows, 16ct..].
#pragma unroll
            for (int t = 0; t < MAXT; ++t) {
                const int blk = warp + NW * t;
                if (blk < nblocks) {
                    const int kb = blk / nt, ct = blk % nt;
                    M::template mma<true, false>(dvacc[t], sm.p + kb * 16, LDP, sm.dout + ct * 16, ldk, BB);
                    M::template mma<true, false>(dkacc[t], sm.ds + kb * 16, LDP, sm.q + ct * 16, ldk, BB);
                }
            }
        }
    }

    // dv += dV, dk += scale·dK
#pragma unroll
    for (int t = 0; t < MAXT; ++t) {
        const int blk = warp + NW * t;
        if (blk < nblocks) {
            const int kb = blk / nt, ct = blk % nt;
            attn_acc_add(dv, kvbase, kvrs, k0 + kb * 16, ct * 16, seq, hd, dvacc[t], 1.0f);
            attn_acc_add(dk, kvbase, kvrs, k0 + kb * 16, ct * 16, seq, hd, dkacc[t], scale);
        }
    }
}

extern "C" __global__ void attention_backward_dkdv_f32(float* dk, float* dv, const float* dout, const float* q, const float* k, const float* v, const float* lse, const float* dsum, const unsigned char* key_mask, int seq, int nh, int nkv, int hd, float scale, int vec) {
    attn_backward_dkdv<float>(dk, dv, dout, q, k, v, lse, dsum, key_mask, seq, nh, nkv, hd, scale, vec);
}

extern "C" __global__ void attention_backward_dkdv_bf16(__nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse, const float* dsum, const unsigned char* key_mask, int seq, int nh, int nkv, int hd, float scale, int vec) {
    attn_backward_dkdv<__nv_bfloat16>(dk, dv, dout, q, k, v, lse, dsum, key_mask, seq, nh, nkv, hd, scale, vec);
}

extern "C" __global__ void attention_backward_dkdv_f16(__half* dk, __half* dv, const __half* dout, const __half* q, const __half* k, const __half* v, const float* lse, const float* dsum, const unsigned char* key_mask, int seq, int nh, int nkv, int hd, float scale, int vec) {
    attn_backward_dkdv<__half>(dk, dv, dout, q, k, v, lse, dsum, key_mask, seq, nh, nkv, hd, scale, vec);
}

// ---------------------------------------------------------------------------
// Backward, step 3: dq. grid (ceil(T/BB), NH, B), block 128, dynamic shared
// memory attn_bwd_smem_bytes<T>(hd). The block keeps Q, dO, lse and D of
// query rows q0 .. q0+BB−1 and, for every key tile up to the diagonal, adds
// dS·K into dQ, held as accumulators: output block t = (qb, ct) belongs to
// warp t % 4. At the end dq += scale·dQ.
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void attn_backward_dq(T* __restrict__ dq, const T* __restrict__ dout,
                                                 const T* __restrict__ q, const T* __restrict__ k,
                                                 const T* __restrict__ v, const float* __restrict__ lse,
                                                 const float* __restrict__ dsum,
                                                 const unsigned char* __restrict__ key_mask, int seq, int nh, int nkv,
                                                 int hd, float scale, int vec) {
    typedef AttnCfg<T> C;
    typedef AttnMma<T> M;
    constexpr int BB = C::BWD_B, NB = BB / 16, NW = C::BWD_WARPS;
    constexpr int LDP = BB + C::PAD;
    constexpr int MAXT = (NB * 8 + NW - 1) / NW;
    const int hd16 = attn_hd16(hd), ldk = hd16 + C::PAD, nt = hd16 / 16;
    const int nblocks = NB * nt;  // output blocks of dQ

    extern __shared__ __align__(128) unsigned char attn_smem[];
    attn_check_smem(attn_bwd_smem_bytes<T>(hd));
    const AttnBwdSmem<T> sm(attn_smem, ldk);

    const int b = blockIdx.z, h = blockIdx.y;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BB;  // the longest (last) query tiles start first
    const int kvh = h / (nh / nkv);
    const int warp = threadIdx.x >> 5;
    const i64 qrs = (i64)nh * hd, kvrs = (i64)nkv * hd;
    const i64 qbase = ((i64)b * seq * nh + h) * hd;
    const i64 kvbase = ((i64)b * seq * nkv + kvh) * hd;
    const i64 lbase = ((i64)b * nh + h) * seq;
    const unsigned char* mask = key_mask ? key_mask + (i64)b * seq : nullptr;

    attn_bwd_load_q(sm, ldk, q, dout, lse, dsum, qbase, qrs, lbase, q0, seq, hd, hd16, vec);

    typename M::Acc dqacc[MAXT];
#pragma unroll
    for (int t = 0; t < MAXT; ++t) attn_acc_zero(dqacc[t]);

    const int kend = min(seq, q0 + BB);  // keys past the tile's last row are never visible
    for (int k0 = 0; k0 < kend; k0 += BB) {
        __syncthreads();  // the previous pair's readers of K, V and dS are done
        attn_load_tile(sm.k, ldk, k + kvbase, kvrs, k0, BB, seq, hd, hd16, vec);
        attn_load_tile(sm.v, ldk, v + kvbase, kvrs, k0, BB, seq, hd, hd16, vec);
        attn_load_key_ok(sm.ok, BB, mask, k0, seq);
        __syncthreads();
        attn_bwd_scores<T, false>(sm, ldk, hd16, q0, k0, seq, scale);
        // dQ[qb][ct] += dS[16qb.., all keys] · K[all keys, 16ct..]
#pragma unroll
        for (int t = 0; t < MAXT; ++t) {
            const int blk = warp + NW * t;
            if (blk < nblocks) {
                const int qb = blk / nt, ct = blk % nt;
                M::template mma<false, false>(dqacc[t], sm.ds + qb * 16 * LDP, LDP, sm.k + ct * 16, ldk, BB);
            }
        }
    }

    // dq += scale·dQ
#pragma unroll
    for (int t = 0; t < MAXT; ++t) {
        const int blk = warp + NW * t;
        if (blk < nblocks) {
            const int qb = blk / nt, ct = blk % nt;
            attn_acc_add(dq, qbase, qrs, q0 + qb * 16, ct * 16, seq, hd, dqacc[t], scale);
        }
    }
}

extern "C" __global__ void attention_backward_dq_f32(float* dq, const float* dout, const float* q, const float* k, const float* v, const float* lse, const float* dsum, const unsigned char* key_mask, int seq, int nh, int nkv, int hd, float scale, int vec) {
    attn_backward_dq<float>(dq, dout, q, k, v, lse, dsum, key_mask, seq, nh, nkv, hd, scale, vec);
}

extern "C" __global__ void attention_backward_dq_bf16(__nv_bfloat16* dq, const __nv_bfloat16* dout, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse, const float* dsum, const unsigned char* key_mask, int seq, int nh, int nkv, int hd, float scale, int vec) {
    attn_backward_dq<__nv_bfloat16>(dq, dout, q, k, v, lse, dsum, key_mask, seq, nh, nkv, hd, scale, vec);
}

extern "C" __global__ void attention_backward_dq_f16(__half* dq, const __half* dout, const __half* q, const __half* k, const __half* v, const float* lse, const float* dsum, const unsigned char* key_mask, int seq, int nh, int nkv, int hd, float scale, int vec) {
    attn_backward_dq<__half>(dq, dout, q, k, v, lse, dsum, key_mask, seq, nh, nkv, hd, scale, vec);
}
