// A CPU emulator for the CUDA subset the kernels of kernels/src/cuda/ use, so
// that EVERY kernel of the real program (the concatenated source NVRTC
// compiles, compile.rs) runs on a machine without a GPU: the fake CUDA
// libraries in fake/ run the real backend on it (kernels/tests/cuda_backend.rs
// compares every op with the CPU backend), and kernels/tests/emu_kernels.rs
// tests the emulator itself through direct launches. Pieces: this header (what kernel
// code sees), include/ (shims for <cuda_fp16.h>, <cuda_bf16.h>, <mma.h> and
// the vector types), driver.cpp (scheduler, device memory, the C API),
// harness.rs (source rewrite, build, launches from Rust), selftest.cu.
//
// What it emulates
//   - Execution: each CUDA thread of a block is a fiber (ucontext to start,
//     _setjmp/_longjmp to switch) with its own stack; blocks run one at a
//     time, in a random order. Threads switch only at synchronisation points:
//     __syncthreads, __syncwarp, warp shuffles and votes, the warp-collective
//     PTX instructions (mma.sync, ldmatrix) and wmma calls. Between two such
//     points the threads of a block run one after the other in a random order
//     (reshuffled at every barrier; seeded per launch, so runs repeat), so a
//     missing barrier usually shows up as a wrong result or as a result that
//     changes with the schedule (the tests run such kernels twice).
//   - Strictness: a barrier or warp collective that not every thread reaches
//     (some exited, or wait elsewhere) is reported as a deadlock; lanes of a
//     warp that meet at different collectives (a __syncwarp against a
//     shuffle, a bf16 mma against an f16 one) as divergence. Partial-warp
//     masks, collectives in a partial warp, launch dimensions past the device
//     limits, more than 48 KB of shared memory (static + dynamic: no launcher
//     opts in to more) and argument lists that do not match the kernel's
//     parameters (count and sizes) are errors; so is __trap(). Every error
//     names the kernel, block and thread.
//   - Memory: device memory is host memory (emu_alloc: a guard page on each
//     side of every buffer, so an access just outside one faults and is
//     reported; a canary catches writes into the <16 alignment bytes after
//     the end). Every __shared__ variable (rewritten into a registered static,
//     one block runs at a time) and the dynamic shared memory (which ends at a
//     guard page) is filled with 0xff — NaN in every float type — before each
//     block uses it.
//   - Numbers: f32 arithmetic is the host's (SSE, no FMA contraction, glibc
//     expf/logf); __half and __nv_bfloat16 convert with round-to-nearest-even
//     (include/); mma.sync m16n8k16 (bf16/f16 inputs, f32 accumulators) and
//     wmma multiply exactly and sum in double, rounding once to f32.
//   - Inline PTX: harness.rs rewrites every `asm(...)` statement into a call
//     of emu::ptx() with the same template and operands, which interprets the
//     instruction: mov of %dynamic_smem_size / %laneid / %warpid,
//     mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 (the
//     PTX ISA's fragment layouts), ldmatrix.sync.aligned.m8n8.{x1,x2,x4}
//     [.trans].shared.b16 (row addresses from __cvta_generic_to_shared,
//     checked to be shared memory and 16-byte aligned). Any other instruction
//     is reported as not emulated, with its template. `extern __shared__ T
//     name[];` becomes a pointer to the launch's dynamic shared memory.
//
// Known blind spots
//   - No real concurrency: a race between two barriers is caught only when
//     the order of the threads changes the result; races between blocks are
//     never caught (blocks run one after another, in a random order). No
//     memory model: fences and volatile are no-ops, atomics are not provided
//     (add them before a kernel uses one). Lanes of a warp are not in
//     lock-step, as on Volta and later: warp-synchronous code without
//     __syncwarp is (rightly) treated as racy.
//   - Reads of uninitialised global memory are not detected (only shared
//     memory is poisoned), nor accesses far outside a buffer (past its guard
//     page) or reads of the <16 bytes after its end.
//   - Misaligned accesses fault only when the host compiler happens to use an
//     aligned instruction (it does for most uint4 copies); ldmatrix addresses
//     are checked, other pointers are not.
//   - Not modelled: performance, occupancy, registers, bank conflicts, warp
//     scheduling, the static shared memory of code a block did not reach.
//   - Transcendentals and tensor-core rounding differ from the GPU's in the
//     last bits; results are compared with tolerances.
//   - __CUDA_ARCH__ is 800: code for newer architectures only is not compiled.
#pragma once
#undef _FORTIFY_SOURCE  // its __longjmp_chk makes every switch between fibers a system call

#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "vector_types.h"
#include "cuda_bf16.h"
#include "cuda_fp16.h"

// ---- CUDA keywords ------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __constant__
// The rewrite in harness.rs turns every `__shared__` declaration into a static
// variable registered with the emulator (shared_here / FileShared): one block
// runs at a time, so a static is the block's shared memory. Any left over
// (from a macro, say) fails to compile here.
#define __shared__ EMU_SHARED_DECLARATION_NOT_REWRITTEN
#define __CUDACC__ 1
#define __CUDACC_RTC__ 1
#define __CUDA_ARCH__ 800
#define warpSize 32

namespace emu {

// ---- state ---------------------------------------------------------------------
enum FiberState { ST_READY, ST_WAIT, ST_DONE };

// What a thread waits at; lanes of a warp must meet at the same kind.
enum Tag {
    TAG_NONE,
    TAG_SYNCTHREADS,
    TAG_SYNCWARP,
    TAG_SHFL,
    TAG_VOTE,
    TAG_MMA_BF16,
    TAG_MMA_F16,
    TAG_LDMATRIX,
    TAG_WMMA_LOAD,
    TAG_WMMA_MMA,
    TAG_WMMA_STORE,
};

inline const char* tag_name(int t) {
    switch (t) {
        case TAG_SYNCTHREADS: return "__syncthreads";
        case TAG_SYNCWARP: return "__syncwarp";
        case TAG_SHFL: return "a warp shuffle";
        case TAG_VOTE: return "a warp vote";
        case TAG_MMA_BF16: return "mma.sync (bf16)";
        case TAG_MMA_F16: return "mma.sync (f16)";
        case TAG_LDMATRIX: return "ldmatrix";
        case TAG_WMMA_LOAD: return "wmma::load_matrix_sync";
        case TAG_WMMA_MMA: return "wmma::mma_sync";
        case TAG_WMMA_STORE: return "wmma::store_matrix_sync";
        default: return "nothing";
    }
}

struct Barrier {
    int expected = 0, arrived = 0;
    long gen = 0;
    int tag = TAG_NONE;
};

struct Fiber {
    ucontext_t uc;
    jmp_buf jb;
    char* stack = nullptr;  // lowest page is a guard
    size_t stack_size = 0;
    bool fresh = true;  // needs makecontext before it runs
    uint3 tid{0, 0, 0};
    unsigned linear = 0;
    int state = ST_READY;
    Barrier* wait = nullptr;
    long wait_gen = 0;
    int wait_tag = TAG_NONE;
};

// Warp exchange slots, double-buffered by the parity of the barrier's
// generation: a lane cannot be two collectives ahead of another.
struct Warp {
    Barrier bar;
    int size = 32;
    uint64_t slot[2][32][4];
};

inline Fiber* g_cur = nullptr;
inline jmp_buf g_sched;
inline std::vector<Fiber*> g_fibers;
inline std::vector<Warp> g_warps;
inline Barrier g_block_bar;
inline void (*g_body)(void**) = nullptr;
inline void** g_args = nullptr;
inline const char* g_kernel = "";
inline bool g_failed = false;
inline std::string g_error;
inline bool g_in_launch = false;
inline uint64_t g_rng = 1;
// Dynamic shared memory: an area that ends at a guard page; a launch's
// `smem` bytes end there too.
constexpr size_t DYN_CAP = 256 * 1024;
inline unsigned char* g_dyn_area = nullptr;  // DYN_CAP bytes, guard page after
inline unsigned char* g_dyn_base = nullptr;  // this launch's dynamic shared memory
inline size_t g_dyn_size = 0;
constexpr size_t SHARED_DYN_WINDOW = 0x40000000u;  // shared-window address of g_dyn_area

// A static __shared__ variable: where it is, its address in the shared
// window (__cvta_generic_to_shared), and the block it was last poisoned in.
struct SharedVar {
    unsigned char* ptr;
    size_t bytes;
    size_t window;
    unsigned long long epoch;
    bool file_scope;
};
inline std::vector<SharedVar> g_shared;
inline size_t g_shared_window_end = 0;
inline unsigned long long g_block_epoch = 0;  // counts blocks: a new one poisons every variable again

inline SharedVar& shared_register(void* p, size_t bytes, bool file_scope) {
    for (SharedVar& v : g_shared)
        if (v.ptr == p) return v;
    g_shared.push_back(SharedVar{(unsigned char*)p, bytes, g_shared_window_end, 0, file_scope});
    g_shared_window_end += (bytes + 127) / 128 * 128;
    return g_shared.back();
}

// Executed where a function-scope __shared__ variable is declared: the first
// thread of a block to get there fills it with 0xff (NaN in every float type).
inline void shared_here(void* p, size_t bytes) {
    SharedVar& v = shared_register(p, bytes, false);
    if (v.epoch != g_block_epoch) {
        v.epoch = g_block_epoch;
        memset(v.ptr, 0xff, v.bytes);
    }
}

// A file-scope __shared__ variable, poisoned at the start of every block.
struct FileShared {
    FileShared(void* p, size_t bytes) { shared_register(p, bytes, true); }
};

}  // namespace emu

// ---- built-in variables ------------------------------------------------------------
inline uint3 blockIdx;
inline dim3 blockDim, gridDim;
#define threadIdx (::emu::g_cur->tid)

namespace emu {

inline uint64_t rnd() {  // splitmix64
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

inline std::string where() {
    char buf[160];
    if (g_cur)
        snprintf(buf, sizeof buf, "kernel %s, block (%u,%u,%u), thread (%u,%u,%u)", g_kernel, blockIdx.x,
                 blockIdx.y, blockIdx.z, g_cur->tid.x, g_cur->tid.y, g_cur->tid.z);
    else
        snprintf(buf, sizeof buf, "kernel %s, block (%u,%u,%u)", g_kernel, blockIdx.x, blockIdx.y, blockIdx.z);
    return buf;
}

// Reports an error: inside a thread, abandons the launch (back to the scheduler).
[[noreturn]] __attribute__((format(printf, 1, 2))) inline void fail(const char* fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (!g_failed) {
        g_failed = true;
        g_error = std::string(msg) + " (" + where() + ")";
    }
    if (g_cur && g_in_launch) _longjmp(g_sched, 1);
    fprintf(stderr, "emulator: %s\n", g_error.c_str());
    abort();
}

inline void yield() {
    if (!_setjmp(g_cur->jb)) _longjmp(g_sched, 1);
}

// Arrive at `b` and wait until everyone expected has.
inline void arrive(Barrier& b, int tag) {
    Fiber* f = g_cur;
    if (b.arrived == 0) b.tag = tag;
    else if (b.tag != tag)
        fail("divergence: this thread is at %s while others of its %s are at %s", tag_name(tag),
             &b == &g_block_bar ? "block" : "warp", tag_name(b.tag));
    f->wait = &b;
    f->wait_gen = b.gen;
    f->wait_tag = tag;
    f->state = ST_WAIT;
    if (++b.arrived == b.expected) {
        b.arrived = 0;
        b.gen++;
    }
    yield();  // even the last one: the order after the barrier is random too
    f->state = ST_READY;
    f->wait = nullptr;
}

inline unsigned lane_id() { return g_cur->linear & 31u; }

inline Warp& warp_of(unsigned mask, const char* what) {
    if (mask != 0xffffffffu) fail("%s with mask 0x%08x: only full-warp masks are emulated", what, mask);
    Warp& w = g_warps[g_cur->linear >> 5];
    if (w.size != 32) fail("%s in a partial warp of %d threads (blockDim is not a multiple of 32)", what, w.size);
    return w;
}

// Lane slots of the current collective (write yours before exchange()).
inline uint64_t (*slots(Warp& w))[4] { return w.slot[w.bar.gen & 1]; }

// ---- shared-memory window (__cvta_generic_to_shared and back) -----------------------
inline size_t cvta_shared(const void* p) {
    const unsigned char* a = (const unsigned char*)p;
    for (const SharedVar& v : g_shared)
        if (a >= v.ptr && a < v.ptr + v.bytes) return v.window + (size_t)(a - v.ptr);
    if (g_dyn_area && a >= g_dyn_area && a < g_dyn_area + DYN_CAP) return SHARED_DYN_WINDOW + (size_t)(a - g_dyn_area);
    fail("__cvta_generic_to_shared(%p): not a pointer to shared memory", p);
}

// The host address of `bytes` bytes at shared-window address `addr`.
inline unsigned char* shared_at(uint64_t addr, size_t bytes, const char* what) {
    if (addr >= SHARED_DYN_WINDOW) {
        unsigned char* p = g_dyn_area + (addr - SHARED_DYN_WINDOW);
        if (p >= g_dyn_base && p + bytes <= g_dyn_area + DYN_CAP) return p;
    } else {
        for (const SharedVar& v : g_shared)
            if (addr >= v.window && addr + bytes <= v.window + v.bytes) return v.ptr + (addr - v.window);
    }
    fail("%s: shared address 0x%llx (+%zu bytes) is outside the block's shared memory", what,
         (unsigned long long)addr, bytes);
}

}  // namespace emu

// ---- intrinsics ------------------------------------------------------------------------
inline void __syncthreads() { emu::arrive(emu::g_block_bar, emu::TAG_SYNCTHREADS); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    emu::Warp& w = emu::warp_of(mask, "__syncwarp");
    emu::arrive(w.bar, emu::TAG_SYNCWARP);
}
inline void __threadfence() {}
inline void __threadfence_block() {}
[[noreturn]] inline void __trap() { emu::fail("__trap()"); }
inline size_t __cvta_generic_to_shared(const void* p) { return emu::cvta_shared(p); }
template <typename T>
inline T __ldg(const T* p) {
    return *p;
}

namespace emu {
// v from lane src(lane) of the warp (own value when src is out of range).
template <typename T, typename F>
inline T shfl(unsigned mask, T v, int width, const char* what, F src) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a large type");
    if (width != 32) fail("%s with width %d: only width 32 is emulated", what, width);
    Warp& w = warp_of(mask, what);
    const unsigned lane = lane_id();
    auto s = slots(w);
    memcpy(&s[lane][0], &v, sizeof(T));
    arrive(w.bar, TAG_SHFL);
    const int from = src((int)lane);
    T r = v;
    if (from >= 0 && from < 32) memcpy(&r, &s[from][0], sizeof(T));
    return r;
}
inline unsigned ballot(unsigned mask, int pred, const char* what) {
    Warp& w = warp_of(mask, what);
    auto s = slots(w);
    s[lane_id()][0] = pred != 0;
    arrive(w.bar, TAG_VOTE);
    unsigned r = 0;
    for (int l = 0; l < 32; ++l) r |= (unsigned)s[l][0] << l;
    return r;
}
}  // namespace emu

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return emu::shfl(mask, v, width, "__shfl_xor_sync", [&](int l) { return l ^ lane_mask; });
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return emu::shfl(mask, v, width, "__shfl_sync", [&](int) { return src & 31; });
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu::shfl(mask, v, width, "__shfl_down_sync", [&](int l) { return l + (int)delta; });
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu::shfl(mask, v, width, "__shfl_up_sync", [&](int l) { return l - (int)delta; });
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return emu::ballot(mask, pred, "__ballot_sync"); }
inline int __any_sync(unsigned mask, int pred) { return emu::ballot(mask, pred, "__any_sync") != 0; }
inline int __all_sync(unsigned mask, int pred) { return emu::ballot(mask, pred, "__all_sync") == 0xffffffffu; }

// ---- math the CUDA headers provide -------------------------------------------------------
inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    memcpy(&i, &f, 4);
    return i;
}
inline float __uint_as_float(unsigned i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned i;
    memcpy(&i, &f, 4);
    return i;
}
inline double __longlong_as_double(long long i) {
    double f;
    memcpy(&f, &i, 8);
    return f;
}
inline long long __double_as_longlong(double f) {
    long long i;
    memcpy(&i, &f, 8);
    return i;
}
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
template <typename A, typename B, typename = std::enable_if_t<std::is_integral<A>::value && std::is_integral<B>::value>>
inline std::common_type_t<A, B> min(A a, B b) {
    using C = std::common_type_t<A, B>;
    return (C)b < (C)a ? (C)b : (C)a;
}
template <typename A, typename B, typename = std::enable_if_t<std::is_integral<A>::value && std::is_integral<B>::value>>
inline std::common_type_t<A, B> max(A a, B b) {
    using C = std::common_type_t<A, B>;
    return (C)a < (C)b ? (C)b : (C)a;
}

// ---- inline PTX (see the top of this file) -------------------------------------------------
namespace emu {

// One operand of an asm statement: outputs ("=r", "+f") by address, inputs by value.
struct AsmOp {
    void* p;
    uint64_t v;
    unsigned size;
};
template <typename T>
inline AsmOp asm_out(T& x) {
    return AsmOp{(void*)&x, 0, (unsigned)sizeof(T)};
}
template <typename T>
inline AsmOp asm_in(const T& x) {
    static_assert(sizeof(T) <= 8, "asm input wider than 64 bits");
    AsmOp o{nullptr, 0, (unsigned)sizeof(T)};
    memcpy(&o.v, &x, sizeof(T));
    return o;
}
inline uint32_t op_u32(const AsmOp& o) {
    uint32_t r = 0;
    memcpy(&r, o.p ? o.p : (const void*)&o.v, o.size < 4 ? o.size : 4);
    return r;
}
inline uint64_t op_u64(const AsmOp& o) {
    uint64_t r = 0;
    memcpy(&r, o.p ? o.p : (const void*)&o.v, o.size < 8 ? o.size : 8);
    return r;
}
inline void op_set_u32(const AsmOp& o, uint32_t v) {
    if (!o.p || o.size != 4) fail("asm: output operand is not a 32-bit lvalue");
    memcpy(o.p, &v, 4);
}
inline float op_f32(const AsmOp& o) {
    uint32_t u = op_u32(o);
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline void op_set_f32(const AsmOp& o, float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    op_set_u32(o, u);
}

// A parsed instruction: mnemonic and operands; an operand is a list of
// operand numbers ({%0,%1}), an address ([%4]) or a special register.
struct PtxOperand {
    std::vector<int> regs;
    bool address = false;
    std::string special;
};
struct PtxInstr {
    std::string text, mnemonic;
    std::vector<PtxOperand> ops;
};

inline std::string trim(const std::string& s) {
    size_t a = 0, b = s.size();
    while (a < b && isspace((unsigned char)s[a])) a++;
    while (b > a && isspace((unsigned char)s[b - 1])) b--;
    return s.substr(a, b - a);
}

inline PtxInstr parse_ptx(const char* tmpl) {
    PtxInstr in;
    in.text = tmpl;
    std::string s = trim(tmpl);
    // One instruction: "mnemonic operands;"
    size_t semi = s.find(';');
    if (semi == std::string::npos || !trim(s.substr(semi + 1)).empty())
        fail("asm: only single PTX instructions are emulated: \"%s\"", tmpl);
    s = trim(s.substr(0, semi));
    size_t sp = 0;
    while (sp < s.size() && !isspace((unsigned char)s[sp])) sp++;
    in.mnemonic = s.substr(0, sp);
    std::string rest = s.substr(sp);
    std::vector<std::string> parts;
    int depth = 0;
    std::string cur;
    for (char c : rest) {
        if (c == '{' || c == '[') depth++;
        if (c == '}' || c == ']') depth--;
        if (c == ',' && depth == 0) {
            parts.push_back(trim(cur));
            cur.clear();
        } else {
            cur += c;
        }
    }
    if (!trim(cur).empty()) parts.push_back(trim(cur));
    for (const std::string& p : parts) {
        PtxOperand op;
        std::string body = p;
        if (!body.empty() && (body[0] == '{' || body[0] == '[')) {
            op.address = body[0] == '[';
            body = body.substr(1, body.size() - 2);
        }
        size_t i = 0;
        while (i < body.size()) {
            if (body[i] == '%' && i + 1 < body.size() && body[i + 1] == '%') {
                size_t j = i + 2;
                while (j < body.size() && (isalnum((unsigned char)body[j]) || body[j] == '_')) j++;
                op.special = body.substr(i + 2, j - i - 2);
                i = j;
            } else if (body[i] == '%') {
                size_t j = i + 1;
                while (j < body.size() && isdigit((unsigned char)body[j])) j++;
                if (j == i + 1) fail("asm: cannot parse operand \"%s\" of \"%s\"", p.c_str(), tmpl);
                op.regs.push_back(atoi(body.substr(i + 1, j - i - 1).c_str()));
                i = j;
            } else if (body[i] == ',' || isspace((unsigned char)body[i])) {
                i++;
            } else {
                fail("asm: operand \"%s\" of \"%s\" is not emulated (only %%N, {%%N,...}, [%%N], %%%%special)",
                     p.c_str(), tmpl);
            }
        }
        in.ops.push_back(op);
    }
    return in;
}

inline bool starts_with(const std::string& s, const char* p) { return s.rfind(p, 0) == 0; }

inline const AsmOp& asm_operand(const std::vector<AsmOp>& ops, int n, const PtxInstr& in) {
    if (n < 0 || n >= (int)ops.size()) fail("asm: operand %%%d out of range in \"%s\"", n, in.text.c_str());
    return ops[n];
}

// d = a·b + c for one m16n8k16 (row.col), 16-bit inputs, f32 accumulators.
template <typename T>
inline void mma_m16n8k16(const PtxInstr& in, const std::vector<AsmOp>& ops, int tag) {
    if (in.ops.size() != 4 || in.ops[0].regs.size() != 4 || in.ops[1].regs.size() != 4 ||
        in.ops[2].regs.size() != 2 || in.ops[3].regs.size() != 4)
        fail("asm: unexpected operands of \"%s\"", in.text.c_str());
    Warp& w = warp_of(0xffffffffu, "mma.sync");
    const unsigned lane = lane_id();
    auto s = slots(w);
    uint32_t a[4], b[2];
    for (int i = 0; i < 4; ++i) a[i] = op_u32(asm_operand(ops, in.ops[1].regs[i], in));
    for (int i = 0; i < 2; ++i) b[i] = op_u32(asm_operand(ops, in.ops[2].regs[i], in));
    float c[4];
    for (int i = 0; i < 4; ++i) c[i] = op_f32(asm_operand(ops, in.ops[3].regs[i], in));
    s[lane][0] = a[0] | (uint64_t)a[1] << 32;
    s[lane][1] = a[2] | (uint64_t)a[3] << 32;
    s[lane][2] = b[0] | (uint64_t)b[1] << 32;
    arrive(w.bar, tag);
    auto reg = [&](int l, int r) -> uint32_t { return (uint32_t)(s[l][r >> 1] >> (32 * (r & 1))); };
    auto half = [](uint32_t r, int hi) -> float {
        T h;
        uint16_t bits = (uint16_t)(hi ? r >> 16 : r);
        memcpy(&h, &bits, 2);
        return (float)h;
    };
    // A(row, k): lane (row%8)·4 + (k%8)/2, register row/8 + 2·(k/8), half k%2.
    // B(k, col): lane col·4 + (k%8)/2, register 4 + k/8, half k%2.
    const int g = lane >> 2, t = lane & 3;
    float d[4];
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        double acc = 0.0;
        for (int k = 0; k < 16; ++k) {
            const float av = half(reg((row & 7) * 4 + ((k & 7) >> 1), (row >> 3) + 2 * (k >> 3)), k & 1);
            const float bv = half(reg(col * 4 + ((k & 7) >> 1), 4 + (k >> 3)), k & 1);
            acc += (double)av * (double)bv;
        }
        d[i] = (float)(acc + (double)c[i]);
    }
    for (int i = 0; i < 4; ++i) op_set_f32(asm_operand(ops, in.ops[0].regs[i], in), d[i]);
}

// ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16: N 8×8 matrices of 16-bit
// elements; lanes 8j..8j+7 hold the row addresses of matrix j.
inline void ldmatrix(const PtxInstr& in, const std::vector<AsmOp>& ops, int nmat, bool trans) {
    if (in.ops.size() != 2 || (int)in.ops[0].regs.size() != nmat || !in.ops[1].address ||
        in.ops[1].regs.size() != 1)
        fail("asm: unexpected operands of \"%s\"", in.text.c_str());
    Warp& w = warp_of(0xffffffffu, "ldmatrix");
    const unsigned lane = lane_id();
    auto s = slots(w);
    s[lane][0] = op_u64(asm_operand(ops, in.ops[1].regs[0], in));
    arrive(w.bar, TAG_LDMATRIX);
    auto row = [&](int j, int r) -> const unsigned char* {
        const uint64_t addr = (uint32_t)s[8 * j + r][0];
        if (addr & 15) fail("ldmatrix: row address 0x%llx (lane %d) is not 16-byte aligned", (unsigned long long)addr, 8 * j + r);
        return shared_at(addr, 16, "ldmatrix");
    };
    for (int j = 0; j < nmat; ++j) {
        uint32_t v;
        if (!trans) {
            memcpy(&v, row(j, lane >> 2) + 4 * (lane & 3), 4);
        } else {
            uint16_t lo, hi;
            memcpy(&lo, row(j, 2 * (lane & 3)) + 2 * (lane >> 2), 2);
            memcpy(&hi, row(j, 2 * (lane & 3) + 1) + 2 * (lane >> 2), 2);
            v = lo | (uint32_t)hi << 16;
        }
        op_set_u32(asm_operand(ops, in.ops[0].regs[j], in), v);
    }
}

inline const PtxInstr& parsed(const char* tmpl) {
    static std::unordered_map<const char*, PtxInstr> cache;
    auto it = cache.find(tmpl);
    if (it == cache.end()) it = cache.emplace(tmpl, parse_ptx(tmpl)).first;
    return it->second;
}

// Interprets one asm statement (emitted by the source rewrite, rewrite.rs).
inline void ptx(const char* tmpl, std::initializer_list<AsmOp> list) {
    const std::vector<AsmOp> ops(list);
    const PtxInstr& in = parsed(tmpl);
    const std::string& m = in.mnemonic;
    if (starts_with(m, "mov.") && in.ops.size() == 2 && in.ops[0].regs.size() == 1 && !in.ops[1].special.empty()) {
        const std::string& sp = in.ops[1].special;
        uint32_t v;
        if (sp == "dynamic_smem_size") v = (uint32_t)g_dyn_size;
        else if (sp == "laneid") v = lane_id();
        else if (sp == "warpid") v = g_cur->linear >> 5;
        else fail("asm: special register %%%s is not emulated", sp.c_str());
        op_set_u32(asm_operand(ops, in.ops[0].regs[0], in), v);
        return;
    }
    if (m == "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") return mma_m16n8k16<__nv_bfloat16>(in, ops, TAG_MMA_BF16);
    if (m == "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") return mma_m16n8k16<__half>(in, ops, TAG_MMA_F16);
    if (starts_with(m, "ldmatrix.sync.aligned.m8n8.")) {
        std::string q = m.substr(strlen("ldmatrix.sync.aligned.m8n8."));
        int nmat = 0;
        if (starts_with(q, "x1.")) nmat = 1;
        else if (starts_with(q, "x2.")) nmat = 2;
        else if (starts_with(q, "x4.")) nmat = 4;
        q = q.substr(3);
        bool trans = false;
        if (starts_with(q, "trans.")) {
            trans = true;
            q = q.substr(6);
        }
        if (nmat && (q == "shared.b16" || q == "shared::cta.b16")) return ldmatrix(in, ops, nmat, trans);
    }
    fail("asm: PTX instruction not emulated: \"%s\"", tmpl);
}

}  // namespace emu
