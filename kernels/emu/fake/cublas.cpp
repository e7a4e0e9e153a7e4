// A fake libcublas.so.13 for the emulated CUDA device (kernels/emu/fake/cuda.cpp):
// device pointers are host pointers, so GEMMs run on the host, synchronously.
// cublasGemmEx with column-major semantics as cuBLAS documents them:
//   C = alpha·op(A)·op(B) + beta·C,  op(A) m×k, op(B) k×n, C m×n,
//   element (i,j) of a matrix X with leading dimension ld at X[i + j·ld];
// inputs f32, bf16 or f16 (A and B of one type), C of that type or f32, f32
// accumulation (CUBLAS_COMPUTE_32F), host-pointer f32 alpha and beta; when
// beta is 0, C is not read (it may hold NaN). bf16/f16 results are rounded to
// nearest even. Anything else aborts naming the function and the argument.

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

typedef int cublasStatus_t;
typedef void* cublasHandle_t;
typedef void* cudaStream_t;

enum { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_NOT_INITIALIZED = 1, CUBLAS_STATUS_INVALID_VALUE = 7 };
enum { CUDA_R_32F = 0, CUDA_R_16F = 2, CUDA_R_16BF = 14 };
enum { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_16F = 74, CUBLAS_COMPUTE_32F_FAST_16BF = 75 };

#define FAKE_API extern "C" __attribute__((visibility("default")))

[[noreturn]] __attribute__((format(printf, 2, 3))) static void die(const char* fn, const char* fmt, ...) {
    fprintf(stderr, "\nfake libcublas: %s: ", fn);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, " (not emulated)\n");
    fflush(stderr);
    abort();
}

struct Handle {
    cudaStream_t stream = nullptr;
    int math_mode = 0;
    int pointer_mode = 0;  // CUBLAS_POINTER_MODE_HOST
};

static float bits_to_f32(uint32_t b) {
    float f;
    memcpy(&f, &b, 4);
    return f;
}
static uint32_t f32_to_bits(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return b;
}
static float bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }
static uint16_t f32_to_bf16(float f) {
    uint32_t b = f32_to_bits(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40);  // quiet NaN
    b += 0x7fffu + ((b >> 16) & 1u);  // round to nearest even
    return (uint16_t)(b >> 16);
}
static float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0) {
        const float v = std::ldexp((float)man, -24);
        return sign ? -v : v;
    }
    if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (man << 13));
    return bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
}
static uint16_t f32_to_f16(float f) {
    const uint32_t b = f32_to_bits(f);
    const uint16_t sign = (uint16_t)((b >> 16) & 0x8000);
    const uint32_t a = b & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00;  // NaN
    if (a >= 0x477ff000u) return sign | 0x7c00;  // ≥ 65520 rounds to infinity
    if (a < 0x38800000u) {  // below the smallest normal 2^-14: subnormal (units of 2^-24)
        const double v = std::fabs((double)f) * 16777216.0;  // exact
        return sign | (uint16_t)std::nearbyint(v);          // default rounding: to nearest even
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round to nearest even at bit 13
    return sign | (uint16_t)(((r >> 13) - (112u << 10)) & 0x7fff);
}

static bool known_type(int t) { return t == CUDA_R_32F || t == CUDA_R_16F || t == CUDA_R_16BF; }
static float load(const void* p, int t, size_t i) {
    switch (t) {
        case CUDA_R_32F: return ((const float*)p)[i];
        case CUDA_R_16BF: return bf16_to_f32(((const uint16_t*)p)[i]);
        default: return f16_to_f32(((const uint16_t*)p)[i]);
    }
}
static void store(void* p, int t, size_t i, float v) {
    switch (t) {
        case CUDA_R_32F: ((float*)p)[i] = v; break;
        case CUDA_R_16BF: ((uint16_t*)p)[i] = f32_to_bf16(v); break;
        default: ((uint16_t*)p)[i] = f32_to_f16(v); break;
    }
}

FAKE_API cublasStatus_t cublasCreate_v2(cublasHandle_t* h) {
    if (!h) return CUBLAS_STATUS_INVALID_VALUE;
    *h = new Handle();
    return CUBLAS_STATUS_SUCCESS;
}
FAKE_API cublasStatus_t cublasDestroy_v2(cublasHandle_t h) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete (Handle*)h;
    return CUBLAS_STATUS_SUCCESS;
}
FAKE_API cublasStatus_t cublasSetStream_v2(cublasHandle_t h, cudaStream_t s) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    ((Handle*)h)->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}
FAKE_API cublasStatus_t cublasGetStream_v2(cublasHandle_t h, cudaStream_t* s) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    *s = ((Handle*)h)->stream;
    return CUBLAS_STATUS_SUCCESS;
}
FAKE_API cublasStatus_t cublasSetMathMode(cublasHandle_t h, int mode) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    ((Handle*)h)->math_mode = mode;
    return CUBLAS_STATUS_SUCCESS;
}
FAKE_API cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t h, int mode) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (mode != 0) die("cublasSetPointerMode_v2", "device pointer mode");
    return CUBLAS_STATUS_SUCCESS;
}
FAKE_API cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t h, void*, size_t) {
    return h ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}
FAKE_API const char* cublasGetStatusString(cublasStatus_t s) {
    return s == CUBLAS_STATUS_SUCCESS ? "CUBLAS_STATUS_SUCCESS" : "fake cuBLAS error";
}

FAKE_API cublasStatus_t cublasGemmEx(cublasHandle_t h, int transa, int transb, int m, int n, int k,
                                     const void* alpha, const void* A, int atype, int lda, const void* B, int btype,
                                     int ldb, const void* beta, void* C, int ctype, int ldc, int compute, int algo) {
    const char* fn = "cublasGemmEx";
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (compute != CUBLAS_COMPUTE_32F) die(fn, "compute type %d (only CUBLAS_COMPUTE_32F)", compute);
    (void)algo;
    if (!known_type(atype) || !known_type(btype) || !known_type(ctype))
        die(fn, "data types A=%d B=%d C=%d", atype, btype, ctype);
    if (atype != btype) die(fn, "A (%d) and B (%d) of different types", atype, btype);
    if (ctype != atype && ctype != CUDA_R_32F) die(fn, "C of type %d with inputs of type %d", ctype, atype);
    if (transa < 0 || transa > 2 || transb < 0 || transb > 2) return CUBLAS_STATUS_INVALID_VALUE;
    // cuBLAS's argument checks (cublas docs, "Error values").
    if (m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
    const int a_rows = transa ? k : m, b_rows = transb ? n : k;
    if (lda < std::max(1, a_rows) || ldb < std::max(1, b_rows) || ldc < std::max(1, m))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    const float al = *(const float*)alpha, be = *(const float*)beta;
    for (int j = 0; j < n; ++j) {
        for (int i = 0; i < m; ++i) {
            float acc = 0.0f;
            for (int p = 0; p < k; ++p) {
                const size_t ai = transa ? (size_t)p + (size_t)i * lda : (size_t)i + (size_t)p * lda;
                const size_t bi = transb ? (size_t)j + (size_t)p * ldb : (size_t)p + (size_t)j * ldb;
                acc += load(A, atype, ai) * load(B, btype, bi);
            }
            const size_t ci = (size_t)i + (size_t)j * ldc;
            float v = al * acc;
            if (be != 0.0f) v += be * load(C, ctype, ci);
            store(C, ctype, ci, v);
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}
