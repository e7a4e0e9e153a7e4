// A fake libnccl.so.2 for the emulated CUDA device (kernels/emu/fake/cuda.cpp):
// the ranks of a communicator are separate PROCESSES on one machine, which
// meet in a rendezvous folder through files. Device pointers are host
// pointers there, so buffers are read and written directly.
//
//   - ncclGetUniqueId creates a fresh folder `fake-nccl-<random hex>` under
//     $FAKE_NCCL_DIR, else $TMPDIR, else /tmp, and puts its path in the id.
//   - ncclCommInitRank[Config] joins it: writes `join.r<rank>`; the
//     communicator is ready when every rank's join file exists. Non-blocking
//     (config->blocking == 0): the call returns ncclInProgress and
//     ncclCommGetAsyncError reports ncclInProgress until then.
//   - ncclAllReduce (f32, sum only; anything else is ncclInvalidArgument)
//     writes this rank's input for call number `seq` to `s<seq>.r<rank>`
//     (a temporary file renamed into place), waits until every rank's file of
//     that call exists, and sums them IN RANK ORDER (((x0 + x1) + x2) + ...)
//     into the output, so every rank gets the same bits. Non-blocking: the
//     call returns ncclInProgress and the sum happens in a later
//     ncclCommGetAsyncError (the caller must poll it, as with real NCCL,
//     before it may use the buffer). A size mismatch between ranks is
//     ncclInvalidUsage. After call `seq` completes, every rank has read all
//     files of call `seq - 1`, so each rank then deletes its own file of it.
//   - A wait longer than $FAKE_NCCL_TIMEOUT_S (default 60) seconds fails with
//     ncclSystemError (through ncclCommGetAsyncError when non-blocking).
//   - ncclCommDestroy writes `done.r<rank>`; the rank that finds every done
//     file removes the folder. ncclCommAbort removes this rank's files only.
//   - $FAKE_NCCL_LOG, when set, names a file to which each rank appends one
//     line when it joins and one when its communicator is destroyed (with
//     the number of all-reduces and floats): how tests see NCCL was used.
//   - count == 0 is a no-op (as in NCCL). Messages go to stderr prefixed
//     "fake libnccl:"; ncclGetLastError returns the last one.

#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <mutex>
#include <string>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>
#include <dirent.h>
#include <vector>

typedef int ncclResult_t;
enum {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7,
};
enum { ncclFloat32 = 7 };
enum { ncclSum = 0 };

#define NCCL_UNIQUE_ID_BYTES 128
typedef struct {
    char internal[NCCL_UNIQUE_ID_BYTES];
} ncclUniqueId;

// ncclConfig_t as of NCCL 2.17 (later versions append fields).
typedef struct {
    size_t size;
    unsigned int magic;
    unsigned int version;
    int blocking;
    int cgaClusterSize;
    int minCTAs;
    int maxCTAs;
    const char* netName;
} ncclConfig_v21700;

#define FAKE_API extern "C" __attribute__((visibility("default")))

namespace {
const char MAGIC[8] = {'F', 'A', 'K', 'E', 'N', 'C', 'C', 'L'};

std::mutex g_err_mu;
std::string g_last_error;

__attribute__((format(printf, 2, 3))) ncclResult_t fail(ncclResult_t r, const char* fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "fake libnccl: %s\n", msg);
    fflush(stderr);
    std::lock_guard<std::mutex> lock(g_err_mu);
    g_last_error = msg;
    return r;
}

double timeout_s() {
    const char* s = getenv("FAKE_NCCL_TIMEOUT_S");
    double t = s ? atof(s) : 0;
    return t > 0 ? t : 60.0;
}

bool exists(const std::string& p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0;
}

// Write `n` bytes to `path` atomically (a temporary file renamed into place).
bool write_file(const std::string& path, const void* data, size_t n) {
    const std::string tmp = path + ".tmp" + std::to_string(getpid());
    int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return false;
    const char* p = (const char*)data;
    size_t left = n;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            close(fd);
            unlink(tmp.c_str());
            return false;
        }
        p += w;
        left -= (size_t)w;
    }
    if (close(fd) != 0 || rename(tmp.c_str(), path.c_str()) != 0) {
        unlink(tmp.c_str());
        return false;
    }
    return true;
}

// Read the whole of `path` into `out`; false when it cannot be read.
bool read_file(const std::string& path, std::vector<char>& out) {
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        close(fd);
        return false;
    }
    out.resize((size_t)st.st_size);
    size_t got = 0;
    while (got < out.size()) {
        ssize_t r = read(fd, out.data() + got, out.size() - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fd);
    return got == out.size();
}

void append_log(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void append_log(const char* fmt, ...) {
    const char* path = getenv("FAKE_NCCL_LOG");
    if (!path || !*path) return;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n <= 0) return;
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) return;
    // One write of a short line with O_APPEND: lines of processes don't mix.
    ssize_t w = write(fd, line, strnlen(line, sizeof line));
    (void)w;
    close(fd);
}

using Clock = std::chrono::steady_clock;

struct Comm {
    std::string dir;
    int rank = 0;
    int nranks = 1;
    bool blocking = true;
    bool joined = false;
    Clock::time_point started;  // of the pending join or all-reduce
    // The pending all-reduce (non-blocking mode), if any.
    bool pending = false;
    float* recv = nullptr;
    size_t count = 0;
    unsigned long long seq = 0;  // all-reduces issued so far
    unsigned long long floats = 0;
    ncclResult_t error = ncclSuccess;  // sticky

    std::string file(unsigned long long s, int r) const {
        return dir + "/s" + std::to_string(s) + ".r" + std::to_string(r);
    }
    std::string join_file(int r) const { return dir + "/join.r" + std::to_string(r); }
    std::string done_file(int r) const { return dir + "/done.r" + std::to_string(r); }

    bool timed_out() const {
        return std::chrono::duration<double>(Clock::now() - started).count() > timeout_s();
    }

    // Join: ncclSuccess when every rank has joined, ncclInProgress before.
    ncclResult_t poll_join() {
        for (int r = 0; r < nranks; ++r)
            if (!exists(join_file(r))) {
                if (timed_out())
                    return error = fail(ncclSystemError, "rank %d: rank %d did not join %s within %.0f s", rank, r,
                                        dir.c_str(), timeout_s());
                return ncclInProgress;
            }
        joined = true;
        append_log("join rank %d of %d in %s\n", rank, nranks, dir.c_str());
        return ncclSuccess;
    }

    // The pending all-reduce: ncclSuccess when it is done, ncclInProgress before.
    ncclResult_t poll_reduce() {
        const unsigned long long s = seq - 1;
        for (int r = 0; r < nranks; ++r)
            if (!exists(file(s, r))) {
                if (timed_out())
                    return error = fail(ncclSystemError,
                                        "rank %d: all-reduce #%llu: no data from rank %d within %.0f s (in %s)", rank,
                                        s, r, timeout_s(), dir.c_str());
                return ncclInProgress;
            }
        std::vector<float> acc(count);
        std::vector<char> data;
        for (int r = 0; r < nranks; ++r) {
            if (!read_file(file(s, r), data))
                return error = fail(ncclSystemError, "rank %d: reading %s: %s", rank, file(s, r).c_str(),
                                    strerror(errno));
            if (data.size() != count * sizeof(float))
                return error = fail(ncclInvalidUsage,
                                    "rank %d: all-reduce #%llu of %zu floats, but rank %d gave %zu (ranks must make "
                                    "the same calls)",
                                    rank, s, count, r, data.size() / sizeof(float));
            const float* x = (const float*)data.data();
            if (r == 0)
                memcpy(acc.data(), x, count * sizeof(float));
            else
                for (size_t i = 0; i < count; ++i) acc[i] += x[i];
        }
        memcpy(recv, acc.data(), count * sizeof(float));
        // Every rank wrote its file of call s after it finished reading call
        // s - 1, so nobody reads this rank's file of s - 1 any more.
        if (s > 0) unlink(file(s - 1, rank).c_str());
        pending = false;
        floats += count;
        return ncclSuccess;
    }

    // Wait (blocking mode) for `poll` to finish.
    template <class F>
    ncclResult_t wait(F poll) {
        for (;;) {
            ncclResult_t r = poll();
            if (r != ncclInProgress) return r;
            std::this_thread::sleep_for(std::chrono::microseconds(200));
        }
    }

    // Remove this rank's files (abort: peers may then fail, as they would).
    void remove_own() {
        if (seq > 0) unlink(file(seq - 1, rank).c_str());
        if (seq > 1) unlink(file(seq - 2, rank).c_str());
        unlink(join_file(rank).c_str());
    }
};

bool valid(const Comm* c) { return c != nullptr; }

ncclResult_t init(Comm** out, int nranks, const ncclUniqueId& id, int rank, const ncclConfig_v21700* config) {
    if (!out) return fail(ncclInvalidArgument, "ncclCommInitRank: comm is NULL");
    *out = nullptr;
    if (nranks < 1 || rank < 0 || rank >= nranks)
        return fail(ncclInvalidArgument, "ncclCommInitRank: rank %d of %d", rank, nranks);
    if (memcmp(id.internal, MAGIC, sizeof MAGIC) != 0)
        return fail(ncclInvalidArgument, "ncclCommInitRank: not an id of this fake NCCL's ncclGetUniqueId");
    bool blocking = true;
    if (config) {
        if (config->magic != 0xcafebeef || config->size < offsetof(ncclConfig_v21700, cgaClusterSize))
            return fail(ncclInvalidArgument, "ncclCommInitRankConfig: config not made by NCCL_CONFIG_INITIALIZER");
        if (config->blocking != 0 && config->blocking != 1 && config->blocking != INT32_MIN)
            return fail(ncclInvalidArgument, "ncclCommInitRankConfig: blocking = %d", config->blocking);
        blocking = config->blocking != 0;
    }
    Comm* c = new Comm;
    c->dir.assign(id.internal + sizeof MAGIC, strnlen(id.internal + sizeof MAGIC, NCCL_UNIQUE_ID_BYTES - sizeof MAGIC));
    c->rank = rank;
    c->nranks = nranks;
    c->blocking = blocking;
    c->started = Clock::now();
    const char one = 1;
    if (!write_file(c->join_file(rank), &one, 1)) {
        ncclResult_t r = fail(ncclSystemError, "rank %d: cannot join %s: %s", rank, c->dir.c_str(), strerror(errno));
        delete c;
        return r;
    }
    *out = c;
    if (!blocking) return ncclInProgress;
    ncclResult_t r = c->wait([c] { return c->poll_join(); });
    if (r != ncclSuccess) {
        delete c;
        *out = nullptr;
    }
    return r;
}
}  // namespace

FAKE_API ncclResult_t ncclGetVersion(int* version) {
    if (!version) return ncclInvalidArgument;
    *version = 22800;  // 2.28.0
    return ncclSuccess;
}

FAKE_API ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (!id) return fail(ncclInvalidArgument, "ncclGetUniqueId: id is NULL");
    const char* root = getenv("FAKE_NCCL_DIR");
    if (!root || !*root) root = getenv("TMPDIR");
    if (!root || !*root) root = "/tmp";
    unsigned long long bits[2] = {0, 0};
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd < 0 || read(fd, bits, sizeof bits) != (ssize_t)sizeof bits) {
        bits[0] = (unsigned long long)Clock::now().time_since_epoch().count();
        bits[1] = (unsigned long long)getpid();
    }
    if (fd >= 0) close(fd);
    char path[NCCL_UNIQUE_ID_BYTES];
    int n = snprintf(path, sizeof path, "%s/fake-nccl-%016llx%016llx", root, bits[0], bits[1]);
    if (n < 0 || (size_t)n + sizeof MAGIC >= NCCL_UNIQUE_ID_BYTES)
        return fail(ncclInvalidArgument, "ncclGetUniqueId: the folder name under %s is too long for an id", root);
    if (mkdir(path, 0700) != 0)
        return fail(ncclSystemError, "ncclGetUniqueId: creating %s: %s", path, strerror(errno));
    memset(id->internal, 0, sizeof id->internal);
    memcpy(id->internal, MAGIC, sizeof MAGIC);
    memcpy(id->internal + sizeof MAGIC, path, (size_t)n);
    return ncclSuccess;
}

FAKE_API ncclResult_t ncclCommInitRank(Comm** comm, int nranks, ncclUniqueId id, int rank) {
    return init(comm, nranks, id, rank, nullptr);
}

FAKE_API ncclResult_t ncclCommInitRankConfig(Comm** comm, int nranks, ncclUniqueId id, int rank,
                                             ncclConfig_v21700* config) {
    return init(comm, nranks, id, rank, config);
}

FAKE_API ncclResult_t ncclCommGetAsyncError(Comm* c, ncclResult_t* async_error) {
    if (!valid(c) || !async_error) return ncclInvalidArgument;
    if (c->error == ncclSuccess) {
        if (!c->joined)
            c->poll_join();
        else if (c->pending)
            c->poll_reduce();
    }
    if (c->error != ncclSuccess)
        *async_error = c->error;
    else
        *async_error = (!c->joined || c->pending) ? ncclInProgress : ncclSuccess;
    return ncclSuccess;
}

FAKE_API ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count, int datatype, int op, Comm* c,
                                    void* stream) {
    (void)stream;  // the fake CUDA's streams complete everything when issued
    if (!valid(c)) return fail(ncclInvalidArgument, "ncclAllReduce: comm is NULL");
    if (c->error != ncclSuccess) return c->error;
    if (!c->joined || c->pending)
        return fail(ncclInvalidUsage, "ncclAllReduce: rank %d: the previous operation has not completed", c->rank);
    if (datatype != ncclFloat32)
        return fail(ncclInvalidArgument, "ncclAllReduce: datatype %d (only ncclFloat32 is emulated)", datatype);
    if (op != ncclSum) return fail(ncclInvalidArgument, "ncclAllReduce: op %d (only ncclSum is emulated)", op);
    if (count == 0) return ncclSuccess;
    if (!sendbuff || !recvbuff) return fail(ncclInvalidArgument, "ncclAllReduce: NULL buffer");
    const unsigned long long s = c->seq;
    if (!write_file(c->file(s, c->rank), sendbuff, count * sizeof(float)))
        return c->error = fail(ncclSystemError, "rank %d: writing %s: %s", c->rank, c->file(s, c->rank).c_str(),
                               strerror(errno));
    c->seq = s + 1;
    c->pending = true;
    c->recv = (float*)recvbuff;
    c->count = count;
    c->started = Clock::now();
    if (!c->blocking) return ncclInProgress;
    return c->wait([c] { return c->poll_reduce(); });
}

static void release(Comm* c, bool destroy) {
    // At destroy, peers may still be reading this rank's last file: the
    // folder goes when every rank is done.
    if (destroy) {
        append_log("destroy rank %d of %d: %llu all-reduces, %llu floats\n", c->rank, c->nranks, c->seq, c->floats);
        const char one = 1;
        write_file(c->done_file(c->rank), &one, 1);
        bool all = true;
        for (int r = 0; r < c->nranks; ++r) all = all && exists(c->done_file(r));
        // The last rank done (each wrote its done file before looking) removes
        // the folder: nobody reads it any more.
        if (all) {
            if (DIR* d = opendir(c->dir.c_str())) {
                while (struct dirent* e = readdir(d))
                    if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
                        unlink((c->dir + "/" + e->d_name).c_str());
                closedir(d);
            }
            rmdir(c->dir.c_str());
        }
    } else {
        c->remove_own();
        rmdir(c->dir.c_str());  // when this rank was the last one there
    }
    delete c;
}

FAKE_API ncclResult_t ncclCommDestroy(Comm* c) {
    if (!valid(c)) return ncclInvalidArgument;
    if (c->pending && c->error == ncclSuccess) c->wait([c] { return c->poll_reduce(); });
    release(c, c->error == ncclSuccess && c->joined);
    return ncclSuccess;
}

FAKE_API ncclResult_t ncclCommFinalize(Comm* c) {
    if (!valid(c)) return ncclInvalidArgument;
    if (c->pending && c->error == ncclSuccess) return c->wait([c] { return c->poll_reduce(); });
    return c->error;
}

FAKE_API ncclResult_t ncclCommAbort(Comm* c) {
    if (!valid(c)) return ncclInvalidArgument;
    release(c, false);
    return ncclSuccess;
}

FAKE_API ncclResult_t ncclCommCount(const Comm* c, int* count) {
    if (!valid(c) || !count) return ncclInvalidArgument;
    *count = c->nranks;
    return ncclSuccess;
}

FAKE_API ncclResult_t ncclCommUserRank(const Comm* c, int* rank) {
    if (!valid(c) || !rank) return ncclInvalidArgument;
    *rank = c->rank;
    return ncclSuccess;
}

FAKE_API const char* ncclGetErrorString(ncclResult_t r) {
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
        case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
        case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
        case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
        case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
        case ncclRemoteError: return "remote process exited or there was a network error";
        case ncclInProgress: return "NCCL operation in progress";
        default: return "unknown result code";
    }
}

FAKE_API const char* ncclGetLastError(Comm*) {
    static thread_local std::string copy;
    std::lock_guard<std::mutex> lock(g_err_mu);
    copy = g_last_error;
    return copy.c_str();
}
