// Fused LoRA linear (lora.rs drives these; backend.rs and lora.rs at the crate
// root define the semantics):
//   forward   xa[N,R]  = dropout(x)·Aᵀ                      lora_skinny (QT=0)
//             y[N,OUT] = s·xa·Bᵀ (+ y)                       lora_rank_update (QT=0)
//             y       += x·Wᵀ                                cuBLAS (gemm.rs)
//   backward  dxa[N,R] = s·dy·B                              lora_skinny (QT=1)
//             dx      += dropout'(dxa·A)                     lora_rank_update (QT=1, mask)
//             dx      += dy·W                                cuBLAS
//             dB[OUT,R] += s·dyᵀ·xa                          lora_rows_partial + lora_reduce_partials
//             dA[R,IN]  += dxaᵀ·dropout(x)                   lora_rows_partial (mask) + lora_reduce_partials
//
// Storage: x, y, dy, dx, xa, dxa are the compute type T (float, __half or
// __nv_bfloat16); A and B are the f32 master weights, rounded to T as their
// tiles are stored to shared memory (the tensor cores take T); gradients and
// partials are f32. Every product accumulates in f32.
//
// Dropout: inverted dropout with keep probability 1-p is keep(i)·v·inv with
// inv = 1/(1-p) a scalar, so it is applied as a 0/1 mask on x (exact in T)
// and `inv` is folded into the f32 scale of the result. The mask of x's
// element (row, col) is dropout_keep(seeds[row / rps], (row % rps)·IN + col):
// rows are grouped by sample and the index counts from the sample's start.
//
// Tensor cores: for bf16/fp16 every product is warp-level
// mma.sync.m16n8k16 (f32 accumulators) fed by ldmatrix from padded shared
// memory tiles. Inline PTX rather than <mma.h>'s wmma: its fragment layout
// is documented (wmma's is opaque), so the epilogues work straight from
// registers and no header beyond cuda_fp16.h / cuda_bf16.h is needed (the
// first NVRTC setup lacked crt/mma.h). The f32 instantiations run
// the same code with a CUDA-core emulation of the same fragment (LoraFragA /
// LoraFragB / lora_mma for float), exact f32 FMAs.
//
// Determinism: every output element is produced by one thread with a fixed
// summation order; reductions over rows go through f32 partials per fixed
// row chunk and are summed in chunk order (no atomics). Bitwise reproducible.
//
// All blocks have LORA_THREADS = 256 threads (8 warps).

#define LORA_THREADS 256
// Row padding of every shared tile, in elements: keeps rows 16-byte aligned
// (ldmatrix, vector stores) and spreads ldmatrix's 8 rows over all banks.
#define LORA_PAD 8

// ---------------------------------------------------------------------------
// Dropout mask of x's elements (seeds == nullptr: no dropout).
struct LoraMask {
    const unsigned long long* seeds;
    int rps;                  // rows per sample
    long long n_in;           // x's row length (IN)
    unsigned long long thr;   // dropout_threshold(p)
};

__device__ __forceinline__ LoraMask lora_no_mask() {
    LoraMask m;
    m.seeds = nullptr;
    m.rps = 1;
    m.n_in = 0;
    m.thr = 0;
    return m;
}

// The seed and the index of element (row, 0) within its sample.
__device__ __forceinline__ void lora_mask_row(const LoraMask& mk, int row, unsigned long long& seed,
                                              unsigned long long& base) {
    int smp = row / mk.rps;
    seed = mk.seeds[smp];
    base = (unsigned long long)(row - smp * mk.rps) * (unsigned long long)mk.n_in;
}

// ---------------------------------------------------------------------------
template <typename A, typename B> struct LoraSame { static constexpr bool value = false; };
template <typename A> struct LoraSame<A, A> { static constexpr bool value = true; };

// Global → registers → shared copy of a ROWS×COLS tile of a row-major matrix
// g[nrows][ldg] (ldg = its row length = ncols) of element type S, starting at
// (row0, col0), into a shared tile s[r·lds + c] of type T (S is T, or f32
// converted to T in store()). Elements outside the matrix become 0, as do
// dropped ones when MASK and mk.seeds is set. Each thread moves 8-element
// chunks (16 bytes of 16-bit elements, 32 of f32): chunk q = tid + i·LORA_THREADS
// is row q / (COLS/8), columns (q % (COLS/8))·8 … +7, so a warp reads whole
// rows. fetch() and store() are split so the next tile's loads are in flight
// while the current one is multiplied (the registers keep S until store()).
template <typename T, int ROWS, int COLS, typename S = T>
struct LoraTile {
    static constexpr int CPR = COLS / 8;
    static constexpr int PER = ROWS * CPR / LORA_THREADS;
    static constexpr int U = (int)sizeof(S) / 2;  // uint4 per chunk as loaded
    static_assert(COLS % 8 == 0, "tile columns");
    static_assert(ROWS * CPR % LORA_THREADS == 0, "tile chunks per thread");
    static_assert(LoraSame<S, T>::value || LoraSame<S, float>::value, "tile source type");
    uint4 v[PER][U];

    template <bool MASK>
    __device__ __forceinline__ void fetch(const S* g, long long ldg, int nrows, int ncols, int row0,
                                          int col0, const LoraMask& mk) {
        const bool vec = (((unsigned long long)g) & 15) == 0 && ((ldg * (long long)sizeof(S)) & 15) == 0;
        const S zero = from_f32<S>(0.0f);
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int q = threadIdx.x + i * LORA_THREADS;
            const int r = q / CPR, c = (q % CPR) * 8;
            const int gr = row0 + r, gc = col0 + c;
            S* e = reinterpret_cast<S*>(v[i]);
            if (gr < nrows && vec && gc + 8 <= ncols) {
                const uint4* src = reinterpret_cast<const uint4*>(g + (long long)gr * ldg + gc);
#pragma unroll
                for (int u = 0; u < U; ++u) v[i][u] = src[u];
            } else {
#pragma unroll
                for (int j = 0; j < 8; ++j)
                    e[j] = (gr < nrows && gc + j < ncols) ? g[(long long)gr * ldg + gc + j] : zero;
            }
            if (MASK && mk.seeds != nullptr && gr < nrows) {
                unsigned long long seed, base;
                lora_mask_row(mk, gr, seed, base);
#pragma unroll
                for (int j = 0; j < 8; ++j)
                    if (!dropout_keep(seed, base + (unsigned long long)(gc + j), mk.thr)) e[j] = zero;
            }
        }
    }

    __device__ __forceinline__ void store(T* s, int lds) const {
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int q = threadIdx.x + i * LORA_THREADS;
            const int r = q / CPR, c = (q % CPR) * 8;
            uint4* d = reinterpret_cast<uint4*>(s + r * lds + c);
            if constexpr (LoraSame<S, T>::value) {
#pragma unroll
                for (int u = 0; u < U; ++u) d[u] = v[i][u];
            } else {  // f32 → T (16-bit): 8 values, one uint4
                const float* e = reinterpret_cast<const float*>(v[i]);
                uint4 packed;
                T* o = reinterpret_cast<T*>(&packed);
#pragma unroll
                for (int j = 0; j < 8; ++j) o[j] = from_f32<T>(e[j]);
                d[0] = packed;
            }
        }
    }
};

// ---------------------------------------------------------------------------
// Warp-level 16×16×16 step: c[j] (j = 0, 1) is the 16×8 f32 accumulator of
// output columns n0+8j … n0+8j+7, in mma.m16n8k16's layout: with
// g = lane/4, t = lane%4, c[j][e] is row g + 8·(e/2), column 8j + 2t + e%2.
//
// Operands come from shared tiles. A (16×16, rows m, depth k) is stored
// k-contiguous (A(m,k) = s[m·lds + k], A_KMAJOR = false) or m-contiguous
// (A(m,k) = s[k·lds + m], A_KMAJOR = true). B (16×16, depth k, columns n) is
// stored k-contiguous (B(k,n) = s[n·lds + k], B_KMAJOR = false) or
// n-contiguous (B(k,n) = s[k·lds + n], B_KMAJOR = true).
//
// mma.m16n8k16 fragments (PTX ISA), g = lane/4, t = lane%4, each register
// two 16-bit values, the lower k in the low half:
//   A: a0 = (m g,   k 2t..2t+1)   a1 = (m g+8, k 2t..2t+1)
//      a2 = (m g,   k 2t+8..+9)   a3 = (m g+8, k 2t+8..+9)
//   B: b0 = (k 2t..2t+1, n g)     b1 = (k 2t+8..+9, n g)
// ldmatrix.x4 loads four 8×8 matrices; lanes 8j … 8j+7 give the row
// addresses of matrix j and register j of lane l receives row l/4, elements
// 2(l%4), 2(l%4)+1 of matrix j (.trans: column l/4, rows 2(l%4), 2(l%4)+1).

__device__ __forceinline__ unsigned lora_smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void lora_ldsm_x4(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(lora_smem_addr(p))
                 : "memory");
}

__device__ __forceinline__ void lora_ldsm_x4_trans(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(lora_smem_addr(p))
                 : "memory");
}

template <typename T, bool A_KMAJOR>
struct LoraFragA {
    unsigned r[4];  // a0..a3
    // The 16×16 block of A at rows m0.., depth k0..
    __device__ __forceinline__ void load(const T* s, int lds, int m0, int k0) {
        const int l = threadIdx.x & 31;
        if (!A_KMAJOR) {
            // matrix j = l/8: rows m0 + 8(j%2) …, columns k0 + 8(j/2) …
            lora_ldsm_x4(r, s + (m0 + (l & 15)) * lds + k0 + (l >> 4) * 8);
        } else {
            // stored [k][m]; matrix j: stored rows k0 + 8(j/2) …, columns m0 + 8(j%2) …
            lora_ldsm_x4_trans(r, s + (k0 + (l >> 4) * 8 + (l & 7)) * lds + m0 + ((l >> 3) & 1) * 8);
        }
    }
};

template <typename T, bool B_KMAJOR>
struct LoraFragB {
    unsigned r[4];  // {b0, b1} of columns n0..n0+7, then of n0+8..n0+15
    // The 16×16 block of B at depth k0.., columns n0..
    __device__ __forceinline__ void load(const T* s, int lds, int n0, int k0) {
        const int l = threadIdx.x & 31;
        if (!B_KMAJOR) {
            // stored [n][k]; matrix j: rows n0 + 8(j/2) …, columns k0 + 8(j%2) …
            lora_ldsm_x4(r, s + (n0 + (l >> 4) * 8 + (l & 7)) * lds + k0 + ((l >> 3) & 1) * 8);
        } else {
            // stored [k][n]; matrix j: stored rows k0 + 8(j%2) …, columns n0 + 8(j/2) …
            lora_ldsm_x4_trans(r, s + (k0 + (l & 15)) * lds + n0 + (l >> 4) * 8);
        }
    }
};

template <typename T>
__device__ __forceinline__ void lora_mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);

template <>
__device__ __forceinline__ void lora_mma16816<__nv_bfloat16>(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                                             unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void lora_mma16816<__half>(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                                      unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T, bool AK, bool BK>
__device__ __forceinline__ void lora_mma(float (&c)[2][4], const LoraFragA<T, AK>& a, const LoraFragB<T, BK>& b) {
    lora_mma16816<T>(c[0], a.r, b.r[0], b.r[1]);
    lora_mma16816<T>(c[1], a.r, b.r[2], b.r[3]);
}

// f32: the same fragment contract on CUDA cores. The "fragments" remember
// where their block lies; lora_mma reads shared memory directly and adds,
// for each of the lane's 8 accumulator elements, a 16-term f32 dot product.
template <bool A_KMAJOR>
struct LoraFragA<float, A_KMAJOR> {
    const float* s;
    int lds, m0, k0;
    __device__ __forceinline__ void load(const float* s_, int lds_, int m0_, int k0_) {
        s = s_;
        lds = lds_;
        m0 = m0_;
        k0 = k0_;
    }
    __device__ __forceinline__ float at(int m, int k) const {
        return A_KMAJOR ? s[(k0 + k) * lds + m0 + m] : s[(m0 + m) * lds + k0 + k];
    }
};

template <bool B_KMAJOR>
struct LoraFragB<float, B_KMAJOR> {
    const float* s;
    int lds, n0, k0;
    __device__ __forceinline__ void load(const float* s_, int lds_, int n0_, int k0_) {
        s = s_;
        lds = lds_;
        n0 = n0_;
        k0 = k0_;
    }
    __device__ __forceinline__ float at(int k, int n) const {
        return B_KMAJOR ? s[(k0 + k) * lds + n0 + n] : s[(n0 + n) * lds + k0 + k];
    }
};

template <bool AK, bool BK>
__device__ __forceinline__ void lora_mma(float (&c)[2][4], const LoraFragA<float, AK>& a,
                                         const LoraFragB<float, BK>& b) {
    const int l = threadIdx.x & 31, g = l >> 2, t = l & 3;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int m = g + 8 * (e >> 1), n = 8 * j + 2 * t + (e & 1);
            float sum = 0.0f;
#pragma unroll 4
            for (int k = 0; k < 16; ++k) sum = fmaf(a.at(m, k), b.at(k, n), sum);
            c[j][e] += sum;
        }
    }
}

// Accumulator element e of an m16n8 tile: row and column within the tile.
__device__ __forceinline__ int lora_acc_row(int e) { return ((threadIdx.x & 31) >> 2) + 8 * (e >> 1); }
__device__ __forceinline__ int lora_acc_col(int e) { return 2 * (threadIdx.x & 3) + (e & 1); }

// Two adjacent elements of T as f32 (p aligned to 2·sizeof(T)).
__device__ __forceinline__ float2 lora_ld2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 lora_ld2(const __half* p) {
    return __half22float2(*reinterpret_cast<const __half2*>(p));
}
__device__ __forceinline__ float2 lora_ld2(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}
__device__ __forceinline__ void lora_st2(float* p, float a, float b) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
__device__ __forceinline__ void lora_st2(__half* p, float a, float b) {
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}
__device__ __forceinline__ void lora_st2(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

// ---------------------------------------------------------------------------
// Skinny product, long reduction: out[M][R] = scale · Σ_k P[m][k]·Q(k, r),
// Q (f32) rounded to T on its way to shared memory.
//   QT = false (xa = dropout(x)·Aᵀ): P = x [M][K], masked with mk;
//                Q(k, r) = Q[r·K + k] (A [R][K])
//   QT = true  (dxa = s·dy·B):       P = dy [M][K], never masked;
//                Q(k, r) = Q[k·R + r] (B [K][R])
// Block: BM = 64 rows × BR = 64 columns of out (grid.y tiles R), streaming
// K in chunks of BK. Warp w: rows 16·(w%4) …, and half w/4 of each chunk's
// k-steps; the two halves are added (in a fixed order) at the end.
template <typename T, bool QT>
struct LoraSkinnyCfg {
    static constexpr int BM = 64, BR = 64, BK = sizeof(T) == 2 ? 128 : 64;
    static constexpr int LDP = BK + LORA_PAD;
    static constexpr int QROWS = QT ? BK : BR, QCOLS = QT ? BR : BK;  // Q tile as stored
    static constexpr int LDQ = QCOLS + LORA_PAD;
    static constexpr int LDC = BR + 4;
    static constexpr int TILE_BYTES = (BM * LDP + QROWS * LDQ) * (int)sizeof(T);
    static constexpr int C_BYTES = BM * LDC * (int)sizeof(float);
    static constexpr int SMEM = TILE_BYTES > C_BYTES ? TILE_BYTES : C_BYTES;
};

template <typename T, bool QT>
__device__ __forceinline__ void lora_skinny(unsigned char* smem, T* __restrict__ out, const T* __restrict__ p,
                                            const float* __restrict__ q, int M, int K, int R, float scale,
                                            LoraMask mk) {
    using Cfg = LoraSkinnyCfg<T, QT>;
    constexpr int BM = Cfg::BM, BR = Cfg::BR, BK = Cfg::BK;
    constexpr int LDP = Cfg::LDP, QROWS = Cfg::QROWS, QCOLS = Cfg::QCOLS, LDQ = Cfg::LDQ, LDC = Cfg::LDC;
    T* Ps = reinterpret_cast<T*>(smem);  // [BM][LDP]: rows m, columns k
    T* Qs = Ps + BM * LDP;               // QT ? [BK][LDQ] (rows k) : [BR][LDQ] (rows r)
    float* Cs = reinterpret_cast<float*>(smem);  // [BM][LDC], after the main loop

    const int warp = threadIdx.x >> 5;
    const int wm = warp & 3, wk = warp >> 2;
    const int m0 = blockIdx.x * BM, r0 = blockIdx.y * BR;
    const int RP = (R + 15) & ~15;
    const int ngrp = min(4, (RP - r0) >> 4);  // 16-column groups of this tile (≥ 1)
    const LoraMask none = lora_no_mask();

    float acc[4][2][4];
#pragma unroll
    for (int f = 0; f < 4; ++f)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[f][j][e] = 0.0f;

    LoraTile<T, BM, BK> tp;
    LoraTile<T, QROWS, QCOLS, float> tq;
    const int nk = (K + BK - 1) / BK;
    if (nk > 0) {
        tp.template fetch<!QT>(p, K, M, K, m0, 0, mk);
        if (QT) tq.template fetch<false>(q, R, K, R, 0, r0, none);  // B [K][R]: rows k, columns r
        else tq.template fetch<false>(q, K, R, K, r0, 0, none);     // A [R][K]: rows r, columns k
    }
    for (int kt = 0; kt < nk; ++kt) {
        __syncthreads();  // the previous chunk's fragments are read
        tp.store(Ps, LDP);
        tq.store(Qs, LDQ);
        __syncthreads();
        if (kt + 1 < nk) {  // next chunk in flight during the mma
            const int k0 = (kt + 1) * BK;
            tp.template fetch<!QT>(p, K, M, K, m0, k0, mk);
            if (QT) tq.template fetch<false>(q, R, K, R, k0, r0, none);
            else tq.template fetch<false>(q, K, R, K, r0, k0, none);
        }
#pragma unroll
        for (int s = 0; s < BK / 32; ++s) {
            const int kk = wk * (BK / 2) + s * 16;
            LoraFragA<T, false> a;
            a.load(Ps, LDP, wm * 16, kk);
#pragma unroll
            for (int f = 0; f < 4; ++f) {
                if (f < ngrp) {
                    LoraFragB<T, QT> b;
                    b.load(Qs, LDQ, f * 16, kk);
                    lora_mma(acc[f], a, b);
                }
            }
        }
    }

    // out = scale · (acc of k-half 0 + acc of k-half 1)
    __syncthreads();  // Cs overlays the tiles
    if (wk == 1) {
#pragma unroll
        for (int f = 0; f < 4; ++f)
            if (f < ngrp)
#pragma unroll
                for (int j = 0; j < 2; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        Cs[(wm * 16 + lora_acc_row(e)) * LDC + f * 16 + j * 8 + lora_acc_col(e)] = acc[f][j][e];
    }
    __syncthreads();
    if (wk == 0) {
#pragma unroll
        for (int f = 0; f < 4; ++f)
            if (f < ngrp)
#pragma unroll
                for (int j = 0; j < 2; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int row = wm * 16 + lora_acc_row(e), col = f * 16 + j * 8 + lora_acc_col(e);
                        const int gm = m0 + row, gr = r0 + col;
                        if (gm < M && gr < R)
                            out[(long long)gm * R + gr] = from_f32<T>(scale * (acc[f][j][e] + Cs[row * LDC + col]));
                    }
    }
}

// ---------------------------------------------------------------------------
// Rank-R update: out[M][NN] = (beta ? out : 0) + epi(Σ_{k<R} P[m][k]·Q(k, n)),
// Q (f32) rounded to T on its way to shared memory.
//   QT = false (y = s·xa·Bᵀ + …):   P = xa [M][R], Q(k, n) = Q[n·R + k] (B [NN][R]),
//                                   epi(v) = scale·v
//   QT = true  (dx += dropout'(dxa·A)): P = dxa [M][R], Q(k, n) = Q[k·NN + n] (A [R][NN]),
//                                   epi(v) = keep(m, n) ? scale·v : 0 with mk
//                                   (out = dx [N][IN] is shaped like x), else scale·v
// Block: 128×128 outputs; warp w: rows 32·(w/2) … (two m16), columns
// 64·(w%2) … (eight n8). R is walked in chunks of 32.
template <typename T, bool QT>
struct LoraRankCfg {
    static constexpr int BM = 128, BN = 128, BKR = 32;
    static constexpr int LDP = BKR + LORA_PAD;
    static constexpr int QROWS = QT ? BKR : BN, QCOLS = QT ? BN : BKR;  // Q tile as stored
    static constexpr int LDQ = QCOLS + LORA_PAD;
    static constexpr int SMEM = (BM * LDP + QROWS * LDQ) * (int)sizeof(T);
};

template <typename T, bool QT>
__device__ __forceinline__ void lora_rank_update(unsigned char* smem, T* __restrict__ out, const T* __restrict__ p,
                                                 const float* __restrict__ q, int M, int NN, int R, float scale,
                                                 int beta, LoraMask mk) {
    using Cfg = LoraRankCfg<T, QT>;
    constexpr int BM = Cfg::BM, BN = Cfg::BN, BKR = Cfg::BKR;
    constexpr int LDP = Cfg::LDP, QROWS = Cfg::QROWS, QCOLS = Cfg::QCOLS, LDQ = Cfg::LDQ;
    T* Ps = reinterpret_cast<T*>(smem);  // [BM][LDP]: rows m, columns k
    T* Qs = Ps + BM * LDP;               // QT ? [BKR][LDQ] (rows k) : [BN][LDQ] (rows n)

    const int warp = threadIdx.x >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int RP = (R + 15) & ~15;
    const LoraMask none = lora_no_mask();

    float acc[2][4][2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int f = 0; f < 4; ++f)
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[i][f][j][e] = 0.0f;

    LoraTile<T, BM, BKR> tp;
    LoraTile<T, QROWS, QCOLS, float> tq;
    for (int k0 = 0; k0 < RP; k0 += BKR) {
        tp.template fetch<false>(p, R, M, R, m0, k0, none);
        if (QT) tq.template fetch<false>(q, NN, R, NN, k0, n0, none);  // A [R][NN]: rows k, columns n
        else tq.template fetch<false>(q, R, NN, R, n0, k0, none);      // B [NN][R]: rows n, columns k
        __syncthreads();  // the previous chunk's fragments are read
        tp.store(Ps, LDP);
        tq.store(Qs, LDQ);
        __syncthreads();
        const int steps = min(BKR / 16, (RP - k0) >> 4);
#pragma unroll
        for (int s = 0; s < BKR / 16; ++s) {
            if (s < steps) {
                LoraFragA<T, false> a[2];
                a[0].load(Ps, LDP, wm * 32, s * 16);
                a[1].load(Ps, LDP, wm * 32 + 16, s * 16);
#pragma unroll
                for (int f = 0; f < 4; ++f) {
                    LoraFragB<T, QT> b;
                    b.load(Qs, LDQ, wn * 64 + f * 16, s * 16);
                    lora_mma(acc[0][f], a[0], b);
                    lora_mma(acc[1][f], a[1], b);
                }
            }
        }
    }

    // Epilogue from registers: each lane owns pairs of adjacent columns.
    const bool pairs = (NN % 2) == 0 && (((unsigned long long)out) % (2 * sizeof(T))) == 0;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // accumulator elements 2h, 2h+1: one row, two columns
            const int row = m0 + wm * 32 + i * 16 + lora_acc_row(2 * h);
            if (row >= M) continue;
            unsigned long long seed = 0, base = 0;
            if (QT && mk.seeds != nullptr) lora_mask_row(mk, row, seed, base);
            T* orow = out + (long long)row * NN;
#pragma unroll
            for (int f = 0; f < 4; ++f)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int col = n0 + wn * 64 + f * 16 + j * 8 + lora_acc_col(2 * h);
                    if (col >= NN) continue;
                    float v0 = scale * acc[i][f][j][2 * h], v1 = scale * acc[i][f][j][2 * h + 1];
                    if (QT && mk.seeds != nullptr) {
                        if (!dropout_keep(seed, base + (unsigned long long)col, mk.thr)) v0 = 0.0f;
                        if (!dropout_keep(seed, base + (unsigned long long)col + 1, mk.thr)) v1 = 0.0f;
                    }
                    if (pairs && col + 1 < NN) {
                        if (beta) {
                            const float2 o = lora_ld2(orow + col);
                            v0 += o.x;
                            v1 += o.y;
                        }
                        lora_st2(orow + col, v0, v1);
                    } else {
                        orow[col] = from_f32<T>(beta ? to_f32<T>(orow[col]) + v0 : v0);
                        if (col + 1 < NN) orow[col + 1] = from_f32<T>(beta ? to_f32<T>(orow[col + 1]) + v1 : v1);
                    }
                }
        }
}

// ---------------------------------------------------------------------------
// Reduction over rows, split in fixed chunks of rows for determinism:
//   part[chunk][c][r] (or, transposed, part[chunk][r][c]) = Σ_{n in chunk} P[n][c]·Q[n][r]
//   P: [N][C] (dy; or x masked with mk), Q: [N][R] (xa or dxa)
// part holds RP = ceil16(R) columns and cpad = gridDim.x·BC rows per chunk,
// every one written (zeros in the padding). Block: BC = 128 columns c of P
// (warp w: c 16w … 16w+15) × BR = 64 columns r of Q (grid.z tiles R), rows
// n of chunk blockIdx.y walked in steps of BKN.
template <typename T>
struct LoraRowsCfg {
    static constexpr int BC = 128, BR = 64, BKN = sizeof(T) == 2 ? 64 : 32;
    static constexpr int LDP = BC + LORA_PAD, LDQ = BR + LORA_PAD;
    static constexpr int SMEM = (BKN * LDP + BKN * LDQ) * (int)sizeof(T);
};

template <typename T>
__device__ __forceinline__ void lora_rows_partial(unsigned char* smem, float* __restrict__ part,
                                                  const T* __restrict__ p, const T* __restrict__ q, int N, int C,
                                                  int R, int chunk_rows, int transpose, LoraMask mk) {
    using Cfg = LoraRowsCfg<T>;
    constexpr int BC = Cfg::BC, BR = Cfg::BR, BKN = Cfg::BKN, LDP = Cfg::LDP, LDQ = Cfg::LDQ;
    T* Ps = reinterpret_cast<T*>(smem);  // [BKN][LDP]: rows n, columns c (A(m=c, k=n): k-major)
    T* Qs = Ps + BKN * LDP;              // [BKN][LDQ]: rows n, columns r (B(k=n, r): n-major)

    const int warp = threadIdx.x >> 5;
    const int c0 = blockIdx.x * BC, chunk = blockIdx.y, r0 = blockIdx.z * BR;
    const int n_begin = chunk * chunk_rows;
    const int n_end = min(N, n_begin + chunk_rows);
    const int RP = (R + 15) & ~15;
    const int ngrp = min(4, (RP - r0) >> 4);
    const int cpad = gridDim.x * BC;
    const LoraMask none = lora_no_mask();

    float acc[4][2][4];
#pragma unroll
    for (int f = 0; f < 4; ++f)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[f][j][e] = 0.0f;

    LoraTile<T, BKN, BC> tp;
    LoraTile<T, BKN, BR> tq;
    const int nk = n_end > n_begin ? (n_end - n_begin + BKN - 1) / BKN : 0;
    if (nk > 0) {
        tp.template fetch<true>(p, C, n_end, C, n_begin, c0, mk);
        tq.template fetch<false>(q, R, n_end, R, n_begin, r0, none);
    }
    for (int kt = 0; kt < nk; ++kt) {
        __syncthreads();
        tp.store(Ps, LDP);
        tq.store(Qs, LDQ);
        __syncthreads();
        if (kt + 1 < nk) {
            const int nn = n_begin + (kt + 1) * BKN;
            tp.template fetch<true>(p, C, n_end, C, nn, c0, mk);
            tq.template fetch<false>(q, R, n_end, R, nn, r0, none);
        }
#pragma unroll
        for (int s = 0; s < BKN / 16; ++s) {
            LoraFragA<T, true> a;
            a.load(Ps, LDP, warp * 16, s * 16);
#pragma unroll
            for (int f = 0; f < 4; ++f) {
                if (f < ngrp) {
                    LoraFragB<T, true> b;
                    b.load(Qs, LDQ, f * 16, s * 16);
                    lora_mma(acc[f], a, b);
                }
            }
        }
    }

#pragma unroll
    for (int f = 0; f < 4; ++f)
        if (f < ngrp)
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const long long c = c0 + warp * 16 + lora_acc_row(e);
                    const long long r = r0 + f * 16 + j * 8 + lora_acc_col(e);
                    const long long at = transpose ? ((long long)chunk * RP + r) * cpad + c
                                                   : ((long long)chunk * cpad + c) * RP + r;
                    part[at] = acc[f][j][e];
                }
}


// ---------------------------------------------------------------------------
// part (f32 partials of lora_rows_partial, `chunks` of them, gstride apart):
//   out[i·ldo + j] += scale · Σ_chunk part[chunk·gstride + i·ldp + j],
// i < rows, j < cols, summed in chunk order. out: f32 (or any dtype `dt`).
extern "C" __global__ void lora_reduce_partials(void* out, int dt, const float* part, int chunks, i64 gstride,
                                                int rows, int cols, i64 ldp, i64 ldo, float scale) {
    const i64 total = (i64)rows * cols;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        const i64 r = i / cols, c = i % cols;
        float sum = 0.0f;
        for (int g = 0; g < chunks; ++g) sum += part[g * gstride + r * ldp + c];
        const i64 o = r * ldo + c;
        st(out, dt, o, ld(out, dt, o) + scale * sum);
    }
}

// ---------------------------------------------------------------------------
// Entry points, one per compute type (the Rust side picks `_f32`, `_bf16`,
// `_f16`). seeds == 0: no dropout; rps = rows per sample; thr =
// dropout_threshold(p). qt selects Q's layout (see each kernel above).

template <typename T>
__device__ __forceinline__ void lora_skinny_entry(T* out, const T* p, const float* q, int M, int K, int R, float scale,
                                                  int qt, const unsigned long long* seeds, int rps,
                                                  unsigned long long thr) {
    constexpr int S1 = LoraSkinnyCfg<T, true>::SMEM, S0 = LoraSkinnyCfg<T, false>::SMEM;
    __shared__ __align__(16) unsigned char smem[S1 > S0 ? S1 : S0];
    LoraMask mk;
    mk.seeds = seeds;
    mk.rps = rps;
    mk.n_in = K;
    mk.thr = thr;
    if (qt) lora_skinny<T, true>(smem, out, p, q, M, K, R, scale, mk);
    else lora_skinny<T, false>(smem, out, p, q, M, K, R, scale, mk);
}

template <typename T>
__device__ __forceinline__ void lora_rank_update_entry(T* out, const T* p, const float* q, int M, int NN, int R,
                                                       float scale, int beta, int qt,
                                                       const unsigned long long* seeds, int rps,
                                                       unsigned long long thr) {
    constexpr int S1 = LoraRankCfg<T, true>::SMEM, S0 = LoraRankCfg<T, false>::SMEM;
    __shared__ __align__(16) unsigned char smem[S1 > S0 ? S1 : S0];
    LoraMask mk;
    mk.seeds = seeds;
    mk.rps = rps;
    mk.n_in = NN;
    mk.thr = thr;
    if (qt) lora_rank_update<T, true>(smem, out, p, q, M, NN, R, scale, beta, mk);
    else lora_rank_update<T, false>(smem, out, p, q, M, NN, R, scale, beta, mk);
}

template <typename T>
__device__ __forceinline__ void lora_rows_partial_entry(float* part, const T* p, const T* q, int N, int C, int R,
                                                        int chunk_rows, int transpose,
                                                        const unsigned long long* seeds, int rps,
                                                        unsigned long long thr) {
    __shared__ __align__(16) unsigned char smem[LoraRowsCfg<T>::SMEM];
    LoraMask mk;
    mk.seeds = seeds;
    mk.rps = rps;
    mk.n_in = C;
    mk.thr = thr;
    lora_rows_partial<T>(smem, part, p, q, N, C, R, chunk_rows, transpose, mk);
}

extern "C" __global__ void lora_skinny_f32(float* out, const float* p, const float* q, int M, int K, int R,
                                           float scale, int qt, const unsigned long long* seeds, int rps,
                                           unsigned long long thr) {
    lora_skinny_entry<float>(out, p, q, M, K, R, scale, qt, seeds, rps, thr);
}
extern "C" __global__ void lora_skinny_bf16(__nv_bfloat16* out, const __nv_bfloat16* p, const float* q,
                                            int M, int K, int R, float scale, int qt,
                                            const unsigned long long* seeds, int rps, unsigned long long thr) {
    lora_skinny_entry<__nv_bfloat16>(out, p, q, M, K, R, scale, qt, seeds, rps, thr);
}
extern "C" __global__ void lora_skinny_f16(__half* out, const __half* p, const float* q, int M, int K, int R,
                                           float scale, int qt, const unsigned long long* seeds, int rps,
                                           unsigned long long thr) {
    lora_skinny_entry<__half>(out, p, q, M, K, R, scale, qt, seeds, rps, thr);
}

extern "C" __global__ void lora_rank_update_f32(float* out, const float* p, const float* q, int M, int NN, int R,
                                                float scale, int beta, int qt, const unsigned long long* seeds,
                                                int rps, unsigned long long thr) {
    lora_rank_update_entry<float>(out, p, q, M, NN, R, scale, beta, qt, seeds, rps, thr);
}
extern "C" __global__ void lora_rank_update_bf16(__nv_bfloat16* out, const __nv_bfloat16* p,
                                                 const float* q, int M, int NN, int R, float scale, int beta,
                                                 int qt, const unsigned long long* seeds, int rps,
                                                 unsigned long long thr) {
    lora_rank_update_entry<__nv_bfloat16>(out, p, q, M, NN, R, scale, beta, qt, seeds, rps, thr);
}
extern "C" __global__ void lora_rank_update_f16(__half* out, const __half* p, const float* q, int M, int NN, int R,
                                                float scale, int beta, int qt, const unsigned long long* seeds,
                                                int rps, unsigned long long thr) {
    lora_rank_update_entry<__half>(out, p, q, M, NN, R, scale, beta, qt, seeds, rps, thr);
}

extern "C" __global__ void lora_rows_partial_f32(float* part, const float* p, const float* q, int N, int C, int R,
                                                 int chunk_rows, int transpose, const unsigned long long* seeds,
                                                 int rps, unsigned long long thr) {
    lora_rows_partial_entry<float>(part, p, q, N, C, R, chunk_rows, transpose, seeds, rps, thr);
}
extern "C" __global__ void lora_rows_partial_bf16(float* part, const __nv_bfloat16* p, const __nv_bfloat16* q, int N,
                                                  int C, int R, int chunk_rows, int transpose,
                                                  const unsigned long long* seeds, int rps, unsigned long long thr) {
    lora_rows_partial_entry<__nv_bfloat16>(part, p, q, N, C, R, chunk_rows, transpose, seeds, rps, thr);
}
extern "C" __global__ void lora_rows_partial_f16(float* part, const __half* p, const __half* q, int N, int C, int R,
                                                 int chunk_rows, int transpose, const unsigned long long* seeds,
                                                 int rps, unsigned long long thr) {
    lora_rows_partial_entry<__half>(part, p, q, N, C, R, chunk_rows, transpose, seeds, rps, thr);
}
