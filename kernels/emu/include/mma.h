// Emulator shim for <mma.h> (nvcuda::wmma; see ../emu.h): the 16×16×16
// shape with __half / __nv_bfloat16 inputs and float (or __half)
// accumulators: fill_fragment, load_matrix_sync, mma_sync, store_matrix_sync.
//
// The element layout of a fragment is unspecified in CUDA; here element e of
// lane l is element (32·e + l) of the 16×16 tile in row-major order — any
// kernel that assumes another layout (reads fragment.x[] as if it knew the
// position) gets wrong results, as it may on some GPU. Every call is
// warp-collective (all 32 lanes must arrive, at the same kind of call).
// mma_sync multiplies exactly and sums in double, rounding once.
#pragma once
#include "../emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "the emulator's wmma has only the 16x16x16 shape");
    static constexpr int num_elements = 8;
    T x[8];
};

namespace detail {
inline int row_of(int e) { return (32 * e + (int)emu::lane_id()) / 16; }
inline int col_of(int e) { return (32 * e + (int)emu::lane_id()) % 16; }
inline void sync(int tag, const char* what) {
    emu::Warp& w = emu::warp_of(0xffffffffu, what);
    emu::arrive(w.bar, tag);
}
template <typename Layout>
inline bool is_row_major() {
    static_assert(std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value,
                  "matrix_a/matrix_b fragments need a row_major or col_major layout");
    return std::is_same<Layout, row_major>::value;
}
}  // namespace detail

template <typename Use, typename T, typename Layout, typename V>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const V& v) {
    for (int e = 0; e < 8; ++e) f.x[e] = T(v);
}

// A and B fragments: element (r, c) of the tile at p[r·ldm + c] (row_major)
// or p[c·ldm + r] (col_major).
template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
    detail::sync(emu::TAG_WMMA_LOAD, "wmma::load_matrix_sync");
    const bool rm = detail::is_row_major<Layout>();
    for (int e = 0; e < 8; ++e) {
        const int r = detail::row_of(e), c = detail::col_of(e);
        f.x[e] = rm ? p[r * ldm + c] : p[c * ldm + r];
    }
}

template <typename T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* p, unsigned ldm, layout_t l) {
    detail::sync(emu::TAG_WMMA_LOAD, "wmma::load_matrix_sync");
    for (int e = 0; e < 8; ++e) {
        const int r = detail::row_of(e), c = detail::col_of(e);
        f.x[e] = l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
    }
}

template <typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm, layout_t l) {
    detail::sync(emu::TAG_WMMA_STORE, "wmma::store_matrix_sync");
    for (int e = 0; e < 8; ++e) {
        const int r = detail::row_of(e), c = detail::col_of(e);
        (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[e];
    }
}

// d = a·b + c.
template <typename TI, typename LA, typename LB, typename TC, typename TD>
inline void mma_sync(fragment<accumulator, 16, 16, 16, TD>& d, const fragment<matrix_a, 16, 16, 16, TI, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TI, LB>& b, const fragment<accumulator, 16, 16, 16, TC>& c) {
    static_assert(sizeof(TI) == 2, "wmma inputs are 16-bit here");
    emu::Warp& w = emu::warp_of(0xffffffffu, "wmma::mma_sync");
    const unsigned lane = emu::lane_id();
    auto s = emu::slots(w);
    memcpy(&s[lane][0], a.x, 16);
    memcpy(&s[lane][2], b.x, 16);
    emu::arrive(w.bar, emu::TAG_WMMA_MMA);
    auto elem = [&](int which, int r, int col) -> float {  // which: 0 = A, 2 = B
        const int idx = r * 16 + col;
        TI v;
        memcpy(&v, (const unsigned char*)&s[idx % 32][which] + 2 * (idx / 32), 2);
        return (float)v;
    };
    TD out[8];
    for (int e = 0; e < 8; ++e) {
        const int r = detail::row_of(e), col = detail::col_of(e);
        double acc = 0.0;
        for (int k = 0; k < 16; ++k) acc += (double)elem(0, r, k) * (double)elem(2, k, col);
        out[e] = TD((float)(acc + (double)(float)c.x[e]));
    }
    for (int e = 0; e < 8; ++e) d.x[e] = out[e];
}

}  // namespace wmma
}  // namespace nvcuda
