// A fake libcuda.so.1 (the CUDA driver API) on top of the emulator, so that the
// REAL CUDA backend (rlhf_kernels::cuda::Cuda: cudarc, our launchers, memory.rs,
// gemm.rs) runs on the CPU. Built by kernels/emu/fake/mod.rs together with
// driver.cpp and the rewritten kernel program; cudarc opens it by SONAME.
//
//   - One device (ordinal 0), compute capability 9.0, named "emulated".
//   - Device pointers are host pointers (emu_alloc: guard pages and a canary;
//     a free that finds the canary overwritten aborts).
//   - Everything is synchronous: async copies, memsets and launches complete
//     before the call returns; streams and events are tokens.
//   - Modules: the PTX given to cuModuleLoadData is ignored; functions are
//     looked up by name in the emulator's kernel table (the same program,
//     compiled as host C++). cuLaunchKernel runs emu_launch with the kernel's
//     own parameter sizes (the driver API passes none); a failed launch prints
//     the emulator's message and returns CUDA_ERROR_LAUNCH_FAILED, which then
//     sticks (as on a GPU).
//   - Functions cudarc can call but this file lacks fail in cudarc with
//     "Missing symbol cuXxx"; unsupported arguments abort naming the function.

#include "driver.cpp"

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUmodule;
typedef void* CUevent;
typedef const emu::Entry* CUfunction;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_LAUNCH_FAILED = 719,
};

#define FAKE_API extern "C" __attribute__((visibility("default")))

namespace fake {
[[noreturn]] __attribute__((format(printf, 2, 3))) static void die(const char* fn, const char* fmt, ...) {
    fprintf(stderr, "\nfake libcuda: %s: ", fn);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, " (not emulated)\n");
    fflush(stderr);
    abort();
}
static std::atomic<bool> g_init{false};
static std::atomic<int> g_sticky{CUDA_SUCCESS};  // a failed launch poisons the context
static char g_ctx_token;                         // the primary context
static char g_module_token;
static thread_local CUcontext g_current = nullptr;
static std::atomic<unsigned long long> g_launches{0};
static constexpr size_t TOTAL_MEM = 16ull << 30;
static std::atomic<size_t> g_used{0};
static std::mutex g_sizes_mu;
static std::vector<std::pair<void*, size_t>> g_sizes;

static unsigned long long seed_base() {
    const char* s = getenv("RLHF_EMU_SEED");
    return s ? strtoull(s, nullptr, 0) : 0x5eedull;
}
// RLHF_EMU_LAUNCH_LOG=<file>: every launched kernel's name is appended to it,
// one a line (the tests' coverage guard reads it).
static void log_launch(const char* name) {
    static const char* path = getenv("RLHF_EMU_LAUNCH_LOG");
    if (!path || !*path) return;
    static std::mutex mu;
    std::lock_guard<std::mutex> lock(mu);
    if (FILE* f = fopen(path, "a")) {
        fprintf(f, "%s\n", name);
        fclose(f);
    }
}
static CUresult check() {
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    return g_sticky.load();
}
static CUresult alloc(CUdeviceptr* p, size_t bytes) {
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    void* m = emu_alloc(bytes ? bytes : 1);
    if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
    {
        std::lock_guard<std::mutex> lock(g_sizes_mu);
        g_sizes.push_back({m, bytes});
    }
    g_used += bytes;
    *p = (CUdeviceptr)(uintptr_t)m;
    return CUDA_SUCCESS;
}
static CUresult release(const char* fn, CUdeviceptr p) {
    {
        std::lock_guard<std::mutex> lock(g_sizes_mu);
        for (size_t i = 0; i < g_sizes.size(); ++i)
            if (g_sizes[i].first == (void*)(uintptr_t)p) {
                g_used -= g_sizes[i].second;
                g_sizes.erase(g_sizes.begin() + i);
                break;
            }
    }
    const int r = emu_free((void*)(uintptr_t)p);
    if (r == 1) die(fn, "the buffer at %p was written past its end (canary overwritten)", (void*)(uintptr_t)p);
    if (r == -1) return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}
}  // namespace fake

using namespace fake;

// ---- initialisation, devices, contexts ---------------------------------------------
FAKE_API CUresult cuInit(unsigned flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    g_init = true;
    return CUDA_SUCCESS;
}
FAKE_API CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return CUDA_SUCCESS;
}
FAKE_API CUresult cuDeviceGetCount(int* n) {
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    *n = 1;
    return CUDA_SUCCESS;
}
FAKE_API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}
FAKE_API CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "emulated");
    return CUDA_SUCCESS;
}
FAKE_API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = TOTAL_MEM;
    return CUDA_SUCCESS;
}
FAKE_API CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    switch (attr) {
        case 1: *v = 1024; break;     // MAX_THREADS_PER_BLOCK
        case 2: *v = 1024; break;     // MAX_BLOCK_DIM_X
        case 3: *v = 1024; break;     // MAX_BLOCK_DIM_Y
        case 4: *v = 64; break;       // MAX_BLOCK_DIM_Z
        case 5: *v = 0x7fffffff; break;  // MAX_GRID_DIM_X
        case 6: *v = 65535; break;    // MAX_GRID_DIM_Y
        case 7: *v = 65535; break;    // MAX_GRID_DIM_Z
        case 8: *v = 48 * 1024; break;   // MAX_SHARED_MEMORY_PER_BLOCK
        case 10: *v = 32; break;      // WARP_SIZE
        case 16: *v = 132; break;     // MULTIPROCESSOR_COUNT
        case 75: *v = 9; break;       // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = 0; break;       // COMPUTE_CAPABILITY_MINOR
        case 97: *v = 48 * 1024; break;  // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN (no opt-in emulated)
        case 115: *v = 1; break;      // MEMORY_POOLS_SUPPORTED
        default: die("cuDeviceGetAttribute", "attribute %d", attr);
    }
    return CUDA_SUCCESS;
}
FAKE_API CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice d) {
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    *ctx = &g_ctx_token;
    return CUDA_SUCCESS;
}
FAKE_API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) { return d == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE; }
FAKE_API CUresult cuCtxSetCurrent(CUcontext ctx) {
    if (ctx && ctx != &g_ctx_token) return CUDA_ERROR_INVALID_HANDLE;
    g_current = ctx;
    return CUDA_SUCCESS;
}
FAKE_API CUresult cuCtxGetCurrent(CUcontext* ctx) {
    *ctx = g_current;
    return CUDA_SUCCESS;
}
FAKE_API CUresult cuCtxGetDevice(CUdevice* d) {
    if (!g_current) return CUDA_ERROR_INVALID_VALUE;
    *d = 0;
    return CUDA_SUCCESS;
}
FAKE_API CUresult cuCtxSynchronize() { return check(); }

// ---- streams and events (tokens: everything completes when issued) -------------------
FAKE_API CUresult cuStreamCreate(CUstream* s, unsigned) {
    *s = new char(0);
    return check();
}
FAKE_API CUresult cuStreamCreateWithPriority(CUstream* s, unsigned, int) {
    *s = new char(0);
    return check();
}
FAKE_API CUresult cuStreamDestroy_v2(CUstream s) {
    delete (char*)s;
    return CUDA_SUCCESS;
}
FAKE_API CUresult cuStreamSynchronize(CUstream) { return check(); }
FAKE_API CUresult cuStreamQuery(CUstream) { return check(); }
FAKE_API CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return check(); }
FAKE_API CUresult cuEventCreate(CUevent* e, unsigned) {
    *e = new char(0);
    return CUDA_SUCCESS;
}
FAKE_API CUresult cuEventDestroy_v2(CUevent e) {
    delete (char*)e;
    return CUDA_SUCCESS;
}
FAKE_API CUresult cuEventRecord(CUevent, CUstream) { return check(); }
FAKE_API CUresult cuEventSynchronize(CUevent) { return check(); }
FAKE_API CUresult cuEventQuery(CUevent) { return check(); }

// ---- memory -------------------------------------------------------------------------
FAKE_API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return alloc(p, bytes); }
FAKE_API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream) { return alloc(p, bytes); }
FAKE_API CUresult cuMemFree_v2(CUdeviceptr p) { return release("cuMemFree_v2", p); }
FAKE_API CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { return release("cuMemFreeAsync", p); }
FAKE_API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    *total = TOTAL_MEM;
    *free_bytes = TOTAL_MEM - g_used.load();
    return CUDA_SUCCESS;
}
FAKE_API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    memcpy((void*)(uintptr_t)dst, src, n);
    return check();
}
FAKE_API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream) {
    return cuMemcpyHtoD_v2(dst, src, n);
}
FAKE_API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    memcpy(dst, (const void*)(uintptr_t)src, n);
    return check();
}
FAKE_API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream) {
    return cuMemcpyDtoH_v2(dst, src, n);
}
FAKE_API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    memmove((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n);
    return check();
}
FAKE_API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream) {
    return cuMemcpyDtoD_v2(dst, src, n);
}
FAKE_API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    memset((void*)(uintptr_t)dst, v, n);
    return check();
}
FAKE_API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream) {
    return cuMemsetD8_v2(dst, v, n);
}

// ---- modules and launches -------------------------------------------------------------
FAKE_API CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    if (!image) return CUDA_ERROR_INVALID_VALUE;
    *m = &g_module_token;  // the PTX is ignored: the kernels are compiled in
    return check();
}
FAKE_API CUresult cuModuleUnload(CUmodule) { return CUDA_SUCCESS; }
FAKE_API CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    if (m != &g_module_token) return CUDA_ERROR_INVALID_HANDLE;
    for (const emu::Entry& e : emu::kernels)
        if (strcmp(e.name, name) == 0) {
            *f = &e;
            return CUDA_SUCCESS;
        }
    return CUDA_ERROR_NOT_FOUND;
}
FAKE_API CUresult cuFuncGetAttribute(int* v, int attr, CUfunction) {
    switch (attr) {
        case 0: *v = 1024; break;  // MAX_THREADS_PER_BLOCK
        case 8: *v = 48 * 1024; break;  // MAX_DYNAMIC_SHARED_SIZE_BYTES
        default: die("cuFuncGetAttribute", "attribute %d", attr);
    }
    return CUDA_SUCCESS;
}
FAKE_API CUresult cuFuncSetAttribute(CUfunction, int attr, int v) {
    if (attr == 8 && v <= 48 * 1024) return CUDA_SUCCESS;  // within the default: a no-op
    die("cuFuncSetAttribute", "attribute %d = %d (the emulator has no shared-memory opt-in)", attr, v);
}
FAKE_API CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                 unsigned bz, unsigned smem, CUstream, void** params, void** extra) {
    if (CUresult r = check()) return r;
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    if (extra) die("cuLaunchKernel", "the `extra` argument list");
    if (f->nargs && !params) return CUDA_ERROR_INVALID_VALUE;
    const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
    char err[1024];
    const unsigned long long seed = seed_base() + 0x9e3779b97f4a7c15ull * g_launches.fetch_add(1);
    log_launch(f->name);
    if (emu_launch(f->name, grid, block, smem, f->nargs, params, f->sizes, seed, err, sizeof err)) {
        fprintf(stderr, "fake libcuda: launch of %s failed: %s\n", f->name, err);
        fflush(stderr);
        g_sticky = CUDA_ERROR_LAUNCH_FAILED;
        return CUDA_ERROR_LAUNCH_FAILED;
    }
    return CUDA_SUCCESS;
}

// NVRTC itself opens libcuda.so.1 when it finds one and asks for the driver's
// private export tables; without this it would call a null pointer. None are
// provided, as where the driver is too old for them.
FAKE_API CUresult cuGetExportTable(const void** table, const void* uuid) {
    (void)uuid;
    if (table) *table = nullptr;
    return CUDA_ERROR_NOT_FOUND;
}

// ---- errors -------------------------------------------------------------------------------
static const char* error_name(CUresult r) {
    switch (r) {
        case CUDA_SUCCESS: return "CUDA_SUCCESS";
        case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
        case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
        case CUDA_ERROR_NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
        case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
        case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
        case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
        case CUDA_ERROR_LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
        default: return nullptr;
    }
}
FAKE_API CUresult cuGetErrorName(CUresult r, const char** s) {
    *s = error_name(r);
    return *s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
FAKE_API CUresult cuGetErrorString(CUresult r, const char** s) {
    *s = error_name(r);
    if (r == CUDA_ERROR_LAUNCH_FAILED) *s = "emulated kernel failed (its message is on stderr)";
    return *s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
