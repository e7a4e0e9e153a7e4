// The emulator's driver: compiles the whole kernel program (the source NVRTC
// compiles, after the rewrite of its inline PTX; see emu.h) as host C++ and
// exports a C API to launch any kernel by name, as cuLaunchKernel would; the
// fake libcuda (fake/cuda.cpp) is built on it, and kernels/tests/emu_kernels.rs
// loads it directly (harness.rs) to test the emulator itself:
//
//   emu_launch(name, grid[3], block[3], dynamic smem bytes, nargs, args, arg sizes, seed, err, errlen)
//   emu_alloc / emu_free / emu_check: device buffers (host memory between guard pages)
//   emu_kernel_count / emu_kernel_name: the kernels compiled in
//
// Built by the test: c++ -std=c++17 -O2 -shared -fPIC -I<dir of emu_program.cu>
// -Ikernels/emu -Ikernels/emu/include kernels/emu/driver.cpp, where the
// generated folder holds emu_program.cu (the rewritten program) and
// emu_kernels.inc (one EMU_KERNEL(name) per kernel of cuda::kernel_names()).

#include "emu.h"

#include <pthread.h>

#include "emu_program.cu"

namespace emu {

// ---- kernel table ----------------------------------------------------------------
template <typename... A>
struct Sig {
    static constexpr unsigned n = sizeof...(A);
    static constexpr size_t sizes[sizeof...(A) + 1] = {sizeof(A)..., 0};
};
template <typename... A>
Sig<A...> sig_of(void (*)(A...));

template <typename... A, size_t... I>
inline void invoke(void (*fn)(A...), void** args, std::index_sequence<I...>) {
    fn(*reinterpret_cast<std::remove_cv_t<A>*>(args[I])...);
}
template <auto F>
void call(void** args) {
    invoke(F, args, std::make_index_sequence<decltype(sig_of(F))::n>{});
}

struct Entry {
    const char* name;
    void (*call)(void**);
    unsigned nargs;
    const size_t* sizes;
};

#define EMU_KERNEL(name) \
    Entry{#name, &call<&::name>, decltype(sig_of(&::name))::n, decltype(sig_of(&::name))::sizes},
static const Entry kernels[] = {
#include "emu_kernels.inc"
};
#undef EMU_KERNEL

// ---- fibers -------------------------------------------------------------------------
constexpr size_t STACK = 512 * 1024;
static size_t page_size() { return (size_t)sysconf(_SC_PAGESIZE); }

static void fiber_main() {
    for (;;) {
        g_body(g_args);
        g_cur->state = ST_DONE;
        yield();  // resumed for the next block
    }
}

static Fiber* new_fiber() {
    Fiber* f = new Fiber();
    const size_t pg = page_size();
    void* m = mmap(nullptr, STACK + pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        perror("emulator: mmap of a fiber stack");
        abort();
    }
    mprotect(m, pg, PROT_NONE);  // overflow faults
    f->stack = (char*)m;
    f->stack_size = STACK + pg;
    return f;
}

static void resume(Fiber* f) {
    g_cur = f;
    if (!_setjmp(g_sched)) {
        if (f->fresh) {
            f->fresh = false;
            getcontext(&f->uc);
            f->uc.uc_stack.ss_sp = f->stack + page_size();
            f->uc.uc_stack.ss_size = STACK;
            f->uc.uc_link = nullptr;
            makecontext(&f->uc, fiber_main, 0);
            setcontext(&f->uc);
        } else {
            _longjmp(f->jb, 1);
        }
    }
    g_cur = nullptr;
}

static std::string deadlock_report(unsigned n) {
    char buf[512];
    int exited = 0, at_block = 0;
    for (unsigned i = 0; i < n; ++i) {
        if (g_fibers[i]->state == ST_DONE) exited++;
        else if (g_fibers[i]->wait == &g_block_bar) at_block++;
    }
    snprintf(buf, sizeof buf, "deadlock: %d of %u threads wait at __syncthreads, %d have exited", at_block, n, exited);
    std::string r = buf;
    for (size_t w = 0; w < g_warps.size(); ++w) {
        const Warp& wp = g_warps[w];
        if (wp.bar.arrived == 0) continue;
        int lanes_exited = 0, lanes_block = 0;
        for (int l = 0; l < wp.size; ++l) {
            const Fiber* f = g_fibers[w * 32 + l];
            if (f->state == ST_DONE) lanes_exited++;
            else if (f->wait == &g_block_bar) lanes_block++;
        }
        snprintf(buf, sizeof buf, "; warp %zu: %d lanes at %s, %d at __syncthreads, %d exited", w, wp.bar.arrived,
                 tag_name(wp.bar.tag), lanes_block, lanes_exited);
        r += buf;
    }
    return r;
}

// Runs the current block (blockIdx set) to the end; false on an error.
static bool run_block(unsigned n) {
    for (unsigned i = 0; i < n; ++i) {
        Fiber* f = g_fibers[i];
        f->linear = i;
        f->tid = uint3{i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
        f->state = ST_READY;
        f->wait = nullptr;
    }
    g_block_bar = Barrier{(int)n, 0, 0, TAG_NONE};
    for (size_t w = 0; w < g_warps.size(); ++w) {
        g_warps[w].bar = Barrier{g_warps[w].size, 0, 0, TAG_NONE};
    }
    static std::vector<unsigned> order;
    order.resize(n);
    for (unsigned i = 0; i < n; ++i) order[i] = i;
    for (;;) {
        for (unsigned i = n; i > 1; --i) std::swap(order[i - 1], order[rnd() % i]);
        unsigned ran = 0, done = 0;
        for (unsigned i : order) {
            Fiber* f = g_fibers[i];
            if (f->state == ST_DONE) {
                done++;
                continue;
            }
            if (f->state == ST_WAIT && f->wait->gen == f->wait_gen) continue;
            resume(f);
            ran++;
            if (g_failed) return false;
            if (f->state == ST_DONE) done++;
        }
        if (done == n) return true;
        if (ran == 0) {
            g_failed = true;
            g_error = deadlock_report(n) + " (" + where() + ")";
            return false;
        }
    }
}

// ---- device memory ---------------------------------------------------------------------
struct Alloc {
    unsigned char* map;
    size_t map_len;
    unsigned char* user;
    size_t bytes;
};
static std::mutex g_alloc_mu;
static std::vector<Alloc> g_allocs;
constexpr unsigned char CANARY = 0xa5;

static const Alloc* find_alloc(const void* p) {  // caller holds g_alloc_mu
    for (const Alloc& a : g_allocs)
        if ((const unsigned char*)p == a.user) return &a;
    return nullptr;
}

static bool canary_ok(const Alloc& a) {
    const unsigned char* end = a.map + a.map_len - page_size();
    for (const unsigned char* c = a.user + a.bytes; c < end; ++c)
        if (*c != CANARY) return false;
    return true;
}

// ---- faults -----------------------------------------------------------------------------
static std::mutex g_launch_mu;
static pthread_t g_launch_thread;
static struct sigaction g_old_segv, g_old_bus;

static void describe_fault(const void* addr, char* out, size_t len) {
    const unsigned char* a = (const unsigned char*)addr;
    const size_t pg = page_size();
    for (const Fiber* f : g_fibers)
        if (a >= (const unsigned char*)f->stack && a < (const unsigned char*)f->stack + pg) {
            snprintf(out, len, "stack overflow of an emulated thread (stacks are %zu KB)", STACK / 1024);
            return;
        }
    if (g_dyn_area && a >= g_dyn_area + DYN_CAP && a < g_dyn_area + DYN_CAP + pg) {
        snprintf(out, len, "access past the end of the %zu bytes of dynamic shared memory", g_dyn_size);
        return;
    }
    for (const Alloc& al : g_allocs) {  // no lock: we are about to abort
        if (a >= al.map && a < al.map + pg) {
            snprintf(out, len, "access %zu bytes before a device buffer of %zu bytes at %p",
                     (size_t)(al.user - a), al.bytes, (void*)al.user);
            return;
        }
        if (a >= al.map + al.map_len - pg && a < al.map + al.map_len) {
            snprintf(out, len, "access %zu bytes past the end of a device buffer of %zu bytes at %p",
                     (size_t)(a - al.user) - al.bytes, al.bytes, (void*)al.user);
            return;
        }
    }
    snprintf(out, len, "invalid or misaligned access (a null or wild pointer, or an aligned vector instruction)");
}

static void on_fault(int sig, siginfo_t* si, void* ctx) {
    if (g_in_launch && pthread_equal(pthread_self(), g_launch_thread)) {
        char what[256];
        describe_fault(si->si_addr, what, sizeof what);
        fprintf(stderr, "\nemulator: %s at address %p: %s (%s)\n", sig == SIGSEGV ? "SIGSEGV" : "SIGBUS",
                si->si_addr, what, where().c_str());
        fflush(stderr);
        signal(SIGABRT, SIG_DFL);
        abort();
    }
    // Not ours: hand it back to the previous handler (the access faults again).
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    (void)ctx;
}

static void install_fault_handler() {
    static bool installed = false;
    if (!installed) {
        installed = true;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_old_segv);
        sigaction(SIGBUS, &sa, &g_old_bus);
    }
}

// The handler runs on an alternate signal stack (a fiber's stack may be the
// one that overflowed), ours during a launch: the one Rust gives its threads
// is too small for the report.
struct AltStack {
    stack_t old;
    bool swapped = false;
    AltStack() {
        static thread_local void* mem = nullptr;
        const size_t size = 256 * 1024;
        if (!mem) mem = malloc(size);  // kept for the life of the thread
        stack_t ss;
        ss.ss_sp = mem;
        ss.ss_size = size;
        ss.ss_flags = 0;
        swapped = mem && sigaltstack(&ss, &old) == 0;
    }
    ~AltStack() {
        if (swapped) sigaltstack(&old, nullptr);
    }
};

}  // namespace emu

// ---- the C API ------------------------------------------------------------------------------
#define EMU_API extern "C" __attribute__((visibility("default")))

EMU_API unsigned emu_kernel_count() { return sizeof(emu::kernels) / sizeof(emu::kernels[0]); }
EMU_API const char* emu_kernel_name(unsigned i) { return i < emu_kernel_count() ? emu::kernels[i].name : nullptr; }

// A zeroed buffer of `bytes` bytes, 16-byte aligned, between guard pages (its
// end at most 15 bytes before the trailing one; those bytes hold a canary).
EMU_API void* emu_alloc(size_t bytes) {
    using namespace emu;
    const size_t pg = page_size();
    const size_t body = (bytes + 15 + pg - 1) / pg * pg;
    const size_t len = body + 2 * pg;
    void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    unsigned char* map = (unsigned char*)m;
    mprotect(map, pg, PROT_NONE);
    mprotect(map + len - pg, pg, PROT_NONE);
    unsigned char* end = map + len - pg;
    unsigned char* user = (unsigned char*)((uintptr_t)(end - bytes) & ~(uintptr_t)15);
    memset(user + bytes, CANARY, (size_t)(end - (user + bytes)));
    std::lock_guard<std::mutex> lock(g_alloc_mu);
    g_allocs.push_back(Alloc{map, len, user, bytes});
    return user;
}

// The number of live buffers whose canary was overwritten (a write past the end).
EMU_API int emu_check_all() {
    using namespace emu;
    std::lock_guard<std::mutex> lock(g_alloc_mu);
    int bad = 0;
    for (const Alloc& a : g_allocs) bad += !canary_ok(a);
    return bad;
}

// 0: fine; 1: the canary after the buffer was overwritten; -1: not a buffer.
EMU_API int emu_check(const void* p) {
    using namespace emu;
    std::lock_guard<std::mutex> lock(g_alloc_mu);
    const Alloc* a = find_alloc(p);
    if (!a) return -1;
    return canary_ok(*a) ? 0 : 1;
}

EMU_API int emu_free(void* p) {
    using namespace emu;
    std::lock_guard<std::mutex> lock(g_alloc_mu);
    for (size_t i = 0; i < g_allocs.size(); ++i) {
        if (g_allocs[i].user == p) {
            const Alloc a = g_allocs[i];
            const int ok = canary_ok(a) ? 0 : 1;
            g_allocs.erase(g_allocs.begin() + i);
            munmap(a.map, a.map_len);
            return ok;
        }
    }
    return -1;
}

// Runs kernel `name` over grid × block threads with `smem` bytes of dynamic
// shared memory. args[i] points at argument i (as for cuLaunchKernel) and
// sizes[i] is its size in bytes, checked against the kernel's parameters.
// `seed` fixes the block order and the thread schedules. Returns 0, or 1 with
// a message in err.
EMU_API int emu_launch(const char* name, const unsigned* grid, const unsigned* block, unsigned smem, unsigned nargs,
                       void** args, const size_t* sizes, unsigned long long seed, char* err, size_t errlen) {
    using namespace emu;
    std::lock_guard<std::mutex> lock(g_launch_mu);
    g_failed = false;
    g_error.clear();
    auto error = [&](const std::string& msg) {
        snprintf(err, errlen, "%s", msg.c_str());
        return 1;
    };
    const Entry* e = nullptr;
    for (const Entry& k : kernels)
        if (strcmp(k.name, name) == 0) e = &k;
    if (!e) return error(std::string("no kernel named ") + name + " in the program");
    g_kernel = e->name;
    char buf[512];
    if (nargs != e->nargs) {
        snprintf(buf, sizeof buf, "%s takes %u arguments, the launch passed %u", name, e->nargs, nargs);
        return error(buf);
    }
    for (unsigned i = 0; i < nargs; ++i)
        if (sizes[i] != e->sizes[i]) {
            snprintf(buf, sizeof buf, "%s: argument %u is %zu bytes, the launch passed %zu", name, i, e->sizes[i], sizes[i]);
            return error(buf);
        }
    // The device's limits (compute capability 8.x/9.x).
    const unsigned long long threads = (unsigned long long)block[0] * block[1] * block[2];
    if (grid[0] < 1 || grid[0] > 0x7fffffffu || grid[1] < 1 || grid[1] > 65535 || grid[2] < 1 || grid[2] > 65535 ||
        block[0] < 1 || block[0] > 1024 || block[1] < 1 || block[1] > 1024 || block[2] < 1 || block[2] > 64 ||
        threads > 1024) {
        snprintf(buf, sizeof buf, "%s: invalid launch grid (%u,%u,%u) block (%u,%u,%u)", name, grid[0], grid[1], grid[2],
                 block[0], block[1], block[2]);
        return error(buf);
    }
    if (smem > 48 * 1024) {
        snprintf(buf, sizeof buf, "%s: %u bytes of dynamic shared memory exceed 48 KB (no opt-in is made)", name, smem);
        return error(buf);
    }
    const unsigned long long blocks = (unsigned long long)grid[0] * grid[1] * grid[2];
    if (blocks * threads > (1ull << 26)) {
        snprintf(buf, sizeof buf, "%s: %llu threads are too many to emulate", name, blocks * threads);
        return error(buf);
    }

    const size_t pg = page_size();
    if (!g_dyn_area) {
        void* m = mmap(nullptr, DYN_CAP + pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) return error("mmap of the shared memory failed");
        g_dyn_area = (unsigned char*)m;
        mprotect(g_dyn_area + DYN_CAP, pg, PROT_NONE);
    }
    g_dyn_size = smem;
    g_dyn_base = (unsigned char*)((uintptr_t)(g_dyn_area + DYN_CAP - smem) & ~(uintptr_t)127);

    gridDim = dim3(grid[0], grid[1], grid[2]);
    blockDim = dim3(block[0], block[1], block[2]);
    const unsigned n = (unsigned)threads;
    while (g_fibers.size() < n) g_fibers.push_back(new_fiber());
    g_warps.assign((n + 31) / 32, Warp{});
    for (size_t w = 0; w < g_warps.size(); ++w) g_warps[w].size = (int)std::min<size_t>(32, n - 32 * w);
    g_body = e->call;
    g_args = args;
    g_rng = seed;

    std::vector<unsigned> order((size_t)blocks);
    for (size_t i = 0; i < order.size(); ++i) order[i] = (unsigned)i;
    for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rnd() % i]);

    install_fault_handler();
    AltStack alt;
    g_launch_thread = pthread_self();
    g_in_launch = true;
    bool ok = true;
    for (unsigned b : order) {
        blockIdx = uint3{b % grid[0], (b / grid[0]) % grid[1], b / (grid[0] * grid[1])};
        g_block_epoch++;
        for (SharedVar& v : g_shared)
            if (v.file_scope) memset(v.ptr, 0xff, v.bytes);
        memset(g_dyn_base, 0xff, (size_t)(g_dyn_area + DYN_CAP - g_dyn_base));
        if (!run_block(n)) {
            ok = false;
            break;
        }
        // Without an opt-in (the launchers make none), static plus dynamic
        // shared memory must fit in 48 KB. Static: the variables this block
        // reached.
        size_t stat = 0;
        for (const SharedVar& v : g_shared)
            if (v.file_scope || v.epoch == g_block_epoch) stat += v.bytes;
        if (stat + smem > 48 * 1024) {
            snprintf(buf, sizeof buf, "%s: %zu bytes of static and %u of dynamic shared memory exceed 48 KB", name,
                     stat, smem);
            g_failed = true;
            g_error = buf;
            ok = false;
            break;
        }
    }
    g_in_launch = false;
    if (!ok) {
        // Threads were abandoned mid-flight: their stacks start afresh next time.
        for (Fiber* f : g_fibers) f->fresh = true;
        return error(g_error);
    }
    return 0;
}
