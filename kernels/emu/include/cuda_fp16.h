// Emulator shim for <cuda_fp16.h> (see ../emu.h): __half and __half2 as
// plain 16-bit storage with round-to-nearest-even conversions done in
// software, so the kernels compile as host C++. Only what the kernels use is
// here; a kernel that needs more fails to compile (add it, exactly).
#pragma once
#include <cstdint>
#include <cstring>
#include "vector_types.h"

namespace emu_fp {
inline float bits_to_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint32_t f32_to_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
// f32 -> IEEE binary16, round to nearest even (overflow to inf, NaN kept quiet).
inline uint16_t f32_to_f16(float f) {
    const uint32_t x = f32_to_bits(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t e8 = (x >> 23) & 0xffu;
    uint32_t mant = x & 0x7fffffu;
    if (e8 == 0xffu) return (uint16_t)(sign | 0x7c00u | (mant ? (0x200u | (mant >> 13)) : 0u));
    const int exp = (int)e8 - 127 + 15;
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) {  // subnormal half (or zero)
        if (exp < -10) return (uint16_t)sign;
        mant |= 0x800000u;
        const int shift = 14 - exp;  // 14..24
        uint32_t hm = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (hm & 1u))) hm++;
        return (uint16_t)(sign | hm);  // a carry into the exponent is right
    }
    uint32_t r = sign | ((uint32_t)exp << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;  // may carry to inf: right
    return (uint16_t)r;
}
inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        const float v = (float)m * (1.0f / 16777216.0f);  // m · 2^-24, exact
        return sign ? -v : v;
    }
    if (e == 31) return bits_to_f32(sign | 0x7f800000u | (m << 13));
    return bits_to_f32(sign | ((e - 15 + 127) << 23) | (m << 13));
}
}  // namespace emu_fp

struct __half {
    uint16_t __x;
    __half() = default;
    __half(float f) : __x(emu_fp::f32_to_f16(f)) {}
    __half(double f) : __x(emu_fp::f32_to_f16((float)f)) {}
    operator float() const { return emu_fp::f16_to_f32(__x); }
};
struct alignas(4) __half2 {
    __half x, y;
};
typedef struct {
    unsigned short x;
} __half_raw;

inline float __half2float(__half h) { return emu_fp::f16_to_f32(h.__x); }
inline __half __float2half(float f) {
    __half h;
    h.__x = emu_fp::f32_to_f16(f);
    return h;
}
inline __half __float2half_rn(float f) { return __float2half(f); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half(a), __float2half(b)}; }
inline __half2 __float2half2_rn(float a) { return __half2{__float2half(a), __float2half(a)}; }
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) {
    __half h;
    h.__x = u;
    return h;
}
// Arithmetic in f32, rounded once: the correctly rounded half result.
inline __half __hadd(__half a, __half b) { return __float2half(__half2float(a) + __half2float(b)); }
inline __half __hsub(__half a, __half b) { return __float2half(__half2float(a) - __half2float(b)); }
inline __half __hmul(__half a, __half b) { return __float2half(__half2float(a) * __half2float(b)); }
