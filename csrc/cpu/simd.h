// An eight-lane fp32 vector for the CPU kernels, one definition per instruction set:
// AVX2 (one __m256, in csrc/cpu/kernels_avx2.cpp only), SSE2 (two __m128, the x86-64 baseline),
// NEON (two float32x4_t on aarch64), or plain arrays.
//
// Why not rely on the auto-vectoriser: with the default -fmath-errno, GCC keeps std::sqrt scalar
// (it must be able to set errno), and the build flags are shared with the rest of the extension.
// Why not at::vec::Vectorized<float>: outside ATen's per-capability builds it is the generic
// scalar-loop version.
//
// Every ISA has eight lanes and the same DAcc8 reduction order, and lane-wise IEEE add, mul, div
// and sqrt round like the scalar ops (no fused multiply-add anywhere), so every element and every
// per-tile sum comes out bit for bit the same whichever ISA the machine picks.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "passes.h"

#if defined(ARMIJO_SIMD_AVX2)
#include <immintrin.h>
#define ARMIJO_SIMD "avx2"
#elif defined(__SSE2__)
#include <emmintrin.h>
#define ARMIJO_SIMD "sse2"
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define ARMIJO_SIMD "neon"
#else
#define ARMIJO_SIMD "scalar"
#endif

namespace armijo_fused {
inline namespace ARMIJO_ISA {
namespace simd {

constexpr int kLanes = 8;

// bf16 (its raw bits) <-> fp32, one element: to nearest even, NaN to the quiet NaN 0x7FC0 (c10's
// rounding). The vector versions below take the same integer steps lane by lane, so every ISA
// (and the scalar tail) gives the same bits.
ARMIJO_INLINE float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

ARMIJO_INLINE uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : r);
}

// fp16 (its raw bits) <-> fp32, one element, IEEE: to nearest even, subnormals kept, overflow to
// inf, NaN to the quiet NaN 0x7E00 with its sign (c10::Half's results). The F16C and NEON vector
// versions convert in hardware, NaN first made that quiet NaN, so every ISA gives the same bits.
ARMIJO_INLINE float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  uint32_t u;
  if (exp == 0x1F) {
    u = sign | 0x7F800000u | (mant << 13);  // inf, NaN (payload kept)
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);  // normal: rebias 15 -> 127
  } else {
    const float f = static_cast<float>(mant) * 5.9604644775390625e-08f;  // subnormal: mant·2^-24
    std::memcpy(&u, &f, sizeof u);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

ARMIJO_INLINE uint16_t float_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7E00u;   // NaN
  if (a >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds to inf; inf
  if (a >= 0x38800000u) {                       // a normal fp16: round at bit 13, rebias
    const uint32_t r = a + 0x0FFFu + ((a >> 13) & 1u);
    return sign | static_cast<uint16_t>((r >> 13) - (112u << 10));
  }
  const uint32_t e = a >> 23;
  if (e < 102) return sign;  // below 2^-25 (or exactly half of it, a tie): ±0
  // subnormal: the value in units of 2^-24, rounded to nearest even
  const uint32_t m = (a & 0x7FFFFFu) | 0x800000u, shift = 126 - e;  // shift in 14..24
  const uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
  return sign | static_cast<uint16_t>(q + (rem > half || (rem == half && (q & 1u))));
}

// The final reduction of eight double lanes, in one fixed order for every ISA.
ARMIJO_INLINE double reduce8(const double* l) {
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

#if defined(ARMIJO_SIMD_AVX2)

struct F8 {
  __m256 v;
  F8() = default;
  F8(__m256 x) : v(x) {}                // NOLINT(google-explicit-constructor)
  F8(float x) : v(_mm256_set1_ps(x)) {}  // NOLINT(google-explicit-constructor)
  static ARMIJO_INLINE F8 load(const float* p) { return F8(_mm256_loadu_ps(p)); }
  ARMIJO_INLINE void store(float* p) const { _mm256_storeu_ps(p, v); }
};
ARMIJO_INLINE F8 operator+(F8 a, F8 b) { return _mm256_add_ps(a.v, b.v); }
ARMIJO_INLINE F8 operator-(F8 a, F8 b) { return _mm256_sub_ps(a.v, b.v); }
ARMIJO_INLINE F8 operator*(F8 a, F8 b) { return _mm256_mul_ps(a.v, b.v); }
ARMIJO_INLINE F8 operator/(F8 a, F8 b) { return _mm256_div_ps(a.v, b.v); }
ARMIJO_INLINE F8 vsqrt(F8 a) { return _mm256_sqrt_ps(a.v); }

// (a != b) ? if_ne : if_eq, lane by lane; NaN compares unequal, as in C++.
ARMIJO_INLINE F8 select_ne(F8 a, F8 b, F8 if_ne, F8 if_eq) {
  return _mm256_blendv_ps(if_eq.v, if_ne.v, _mm256_cmp_ps(a.v, b.v, _CMP_NEQ_UQ));
}

ARMIJO_INLINE F8 load_bf16(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// The bf16 bits of each lane, rounded, in the low half of its 32 bits.
ARMIJO_INLINE __m256i bf16_bits(F8 x) {
  const __m256i u = _mm256_castps_si256(x.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256 nan = _mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
}

ARMIJO_INLINE F8 round_bf16(F8 x) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(x), 16));
}

ARMIJO_INLINE F8 load_f16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// NaN lanes made the quiet NaN with their sign, which converts to 0x7E00 / 0xFE00 as the scalar
// helper gives (F16C would keep the payload).
ARMIJO_INLINE __m128i f16_bits(F8 x) {
  const __m256 nan = _mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q);
  const __m256 quiet = _mm256_or_ps(_mm256_and_ps(x.v, _mm256_set1_ps(-0.0f)),
                                    _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)));
  return _mm256_cvtps_ph(_mm256_blendv_ps(x.v, quiet, nan), _MM_FROUND_TO_NEAREST_INT);
}

ARMIJO_INLINE F8 round_f16(F8 x) { return _mm256_cvtph_ps(f16_bits(x)); }

ARMIJO_INLINE void store_f16(F8 x, uint16_t* p) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), f16_bits(x));
}

ARMIJO_INLINE void store_bf16(F8 x, uint16_t* p) {
  const __m256i r = bf16_bits(x);                    // every lane <= 0xFFFF: packus is exact
  const __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit half: r0-3 r0-3 | r4-7 r4-7
  const __m256i ordered = _mm256_permute4x64_epi64(packed, 0x08);  // 64-bit words 0 and 2
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(ordered));
}

// Eight fp32 lanes summed in eight double lanes (each conversion is exact).
struct DAcc8 {
  __m256d lo, hi;
  // explicit: an implicit constructor would not be compiled for the AVX2 target
  ARMIJO_INLINE DAcc8() : lo(_mm256_setzero_pd()), hi(_mm256_setzero_pd()) {}
  ARMIJO_INLINE void add(F8 x) {
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(x.v)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(x.v, 1)));
  }
  ARMIJO_INLINE double sum() const {
    alignas(32) double l[8];
    _mm256_store_pd(l, lo);
    _mm256_store_pd(l + 4, hi);
    return reduce8(l);
  }
};

#elif defined(__SSE2__)

struct F8 {
  __m128 lo, hi;
  F8() = default;
  F8(__m128 a, __m128 b) : lo(a), hi(b) {}
  F8(float x) : lo(_mm_set1_ps(x)), hi(_mm_set1_ps(x)) {}  // NOLINT(google-explicit-constructor)
  static ARMIJO_INLINE F8 load(const float* p) { return F8(_mm_loadu_ps(p), _mm_loadu_ps(p + 4)); }
  ARMIJO_INLINE void store(float* p) const {
    _mm_storeu_ps(p, lo);
    _mm_storeu_ps(p + 4, hi);
  }
};
ARMIJO_INLINE F8 operator+(F8 a, F8 b) { return {_mm_add_ps(a.lo, b.lo), _mm_add_ps(a.hi, b.hi)}; }
ARMIJO_INLINE F8 operator-(F8 a, F8 b) { return {_mm_sub_ps(a.lo, b.lo), _mm_sub_ps(a.hi, b.hi)}; }
ARMIJO_INLINE F8 operator*(F8 a, F8 b) { return {_mm_mul_ps(a.lo, b.lo), _mm_mul_ps(a.hi, b.hi)}; }
ARMIJO_INLINE F8 operator/(F8 a, F8 b) { return {_mm_div_ps(a.lo, b.lo), _mm_div_ps(a.hi, b.hi)}; }
ARMIJO_INLINE F8 vsqrt(F8 a) { return {_mm_sqrt_ps(a.lo), _mm_sqrt_ps(a.hi)}; }

ARMIJO_INLINE __m128 select_ne4(__m128 a, __m128 b, __m128 if_ne, __m128 if_eq) {
  const __m128 ne = _mm_cmpneq_ps(a, b);  // NaN compares unequal, as in C++
  return _mm_or_ps(_mm_and_ps(ne, if_ne), _mm_andnot_ps(ne, if_eq));
}

ARMIJO_INLINE F8 select_ne(F8 a, F8 b, F8 if_ne, F8 if_eq) {
  return {select_ne4(a.lo, b.lo, if_ne.lo, if_eq.lo), select_ne4(a.hi, b.hi, if_ne.hi, if_eq.hi)};
}

ARMIJO_INLINE F8 load_bf16(const uint16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i z = _mm_setzero_si128();  // (0, h) word pairs are h << 16 as 32-bit lanes
  return {_mm_castsi128_ps(_mm_unpacklo_epi16(z, v)), _mm_castsi128_ps(_mm_unpackhi_epi16(z, v))};
}

ARMIJO_INLINE __m128i bf16_bits4(__m128 x) {
  const __m128i u = _mm_castps_si128(x);
  const __m128i lsb = _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1));
  const __m128i r = _mm_srli_epi32(_mm_add_epi32(_mm_add_epi32(u, _mm_set1_epi32(0x7FFF)), lsb), 16);
  const __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(x, x));
  return _mm_or_si128(_mm_and_si128(nan, _mm_set1_epi32(0x7FC0)), _mm_andnot_si128(nan, r));
}

ARMIJO_INLINE F8 round_bf16(F8 x) {
  return {_mm_castsi128_ps(_mm_slli_epi32(bf16_bits4(x.lo), 16)),
          _mm_castsi128_ps(_mm_slli_epi32(bf16_bits4(x.hi), 16))};
}

ARMIJO_INLINE void store_bf16(F8 x, uint16_t* p) {
  // SSE2 packs with signed saturation: shift 0..0xFFFF to the signed range and back
  const __m128i bias = _mm_set1_epi32(0x8000);
  const __m128i packed = _mm_packs_epi32(_mm_sub_epi32(bf16_bits4(x.lo), bias),
                                         _mm_sub_epi32(bf16_bits4(x.hi), bias));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_xor_si128(packed, _mm_set1_epi16(static_cast<short>(0x8000))));
}

struct DAcc8 {
  __m128d q[4] = {_mm_setzero_pd(), _mm_setzero_pd(), _mm_setzero_pd(), _mm_setzero_pd()};
  ARMIJO_INLINE void add(F8 x) {
    q[0] = _mm_add_pd(q[0], _mm_cvtps_pd(x.lo));
    q[1] = _mm_add_pd(q[1], _mm_cvtps_pd(_mm_movehl_ps(x.lo, x.lo)));
    q[2] = _mm_add_pd(q[2], _mm_cvtps_pd(x.hi));
    q[3] = _mm_add_pd(q[3], _mm_cvtps_pd(_mm_movehl_ps(x.hi, x.hi)));
  }
  ARMIJO_INLINE double sum() const {
    alignas(16) double l[8];
    for (int i = 0; i < 4; ++i) _mm_store_pd(l + 2 * i, q[i]);
    return reduce8(l);
  }
};

#elif defined(__aarch64__) && defined(__ARM_NEON)

struct F8 {
  float32x4_t lo, hi;
  F8() = default;
  F8(float32x4_t a, float32x4_t b) : lo(a), hi(b) {}
  F8(float x) : lo(vdupq_n_f32(x)), hi(vdupq_n_f32(x)) {}  // NOLINT(google-explicit-constructor)
  static ARMIJO_INLINE F8 load(const float* p) { return F8(vld1q_f32(p), vld1q_f32(p + 4)); }
  ARMIJO_INLINE void store(float* p) const {
    vst1q_f32(p, lo);
    vst1q_f32(p + 4, hi);
  }
};
ARMIJO_INLINE F8 operator+(F8 a, F8 b) { return {vaddq_f32(a.lo, b.lo), vaddq_f32(a.hi, b.hi)}; }
ARMIJO_INLINE F8 operator-(F8 a, F8 b) { return {vsubq_f32(a.lo, b.lo), vsubq_f32(a.hi, b.hi)}; }
ARMIJO_INLINE F8 operator*(F8 a, F8 b) { return {vmulq_f32(a.lo, b.lo), vmulq_f32(a.hi, b.hi)}; }
ARMIJO_INLINE F8 operator/(F8 a, F8 b) { return {vdivq_f32(a.lo, b.lo), vdivq_f32(a.hi, b.hi)}; }
ARMIJO_INLINE F8 vsqrt(F8 a) { return {vsqrtq_f32(a.lo), vsqrtq_f32(a.hi)}; }

ARMIJO_INLINE F8 select_ne(F8 a, F8 b, F8 if_ne, F8 if_eq) {
  // vceqq is false for NaN: NaN compares unequal, as in C++
  return {vbslq_f32(vceqq_f32(a.lo, b.lo), if_eq.lo, if_ne.lo),
          vbslq_f32(vceqq_f32(a.hi, b.hi), if_eq.hi, if_ne.hi)};
}

ARMIJO_INLINE F8 load_bf16(const uint16_t* p) {
  const uint16x8_t v = vld1q_u16(p);
  return {vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(v), 16)),
          vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(v), 16))};
}

ARMIJO_INLINE uint32x4_t bf16_bits4(float32x4_t x) {
  const uint32x4_t u = vreinterpretq_u32_f32(x);
  const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
  const uint32x4_t r = vshrq_n_u32(vaddq_u32(vaddq_u32(u, vdupq_n_u32(0x7FFF)), lsb), 16);
  return vbslq_u32(vceqq_f32(x, x), r, vdupq_n_u32(0x7FC0));
}

ARMIJO_INLINE F8 round_bf16(F8 x) {
  return {vreinterpretq_f32_u32(vshlq_n_u32(bf16_bits4(x.lo), 16)),
          vreinterpretq_f32_u32(vshlq_n_u32(bf16_bits4(x.hi), 16))};
}

ARMIJO_INLINE void store_bf16(F8 x, uint16_t* p) {
  vst1q_u16(p, vcombine_u16(vmovn_u32(bf16_bits4(x.lo)), vmovn_u32(bf16_bits4(x.hi))));
}

ARMIJO_INLINE F8 load_f16(const uint16_t* p) {
  const uint16x8_t v = vld1q_u16(p);
  return {vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(v))),
          vcvt_f32_f16(vreinterpret_f16_u16(vget_high_u16(v)))};
}

// NaN lanes made the quiet NaN with their sign first, as in the scalar helper.
ARMIJO_INLINE float16x4_t f16_half(float32x4_t x) {
  const uint32x4_t quiet = vorrq_u32(vandq_u32(vreinterpretq_u32_f32(x), vdupq_n_u32(0x80000000u)),
                                     vdupq_n_u32(0x7FC00000u));
  const float32x4_t y = vbslq_f32(vceqq_f32(x, x), x, vreinterpretq_f32_u32(quiet));
  return vcvt_f16_f32(y);
}

ARMIJO_INLINE void store_f16(F8 x, uint16_t* p) {
  vst1q_u16(p, vcombine_u16(vreinterpret_u16_f16(f16_half(x.lo)),
                            vreinterpret_u16_f16(f16_half(x.hi))));
}

ARMIJO_INLINE F8 round_f16(F8 x) {
  return {vcvt_f32_f16(f16_half(x.lo)), vcvt_f32_f16(f16_half(x.hi))};
}

struct DAcc8 {
  float64x2_t q[4] = {vdupq_n_f64(0.0), vdupq_n_f64(0.0), vdupq_n_f64(0.0), vdupq_n_f64(0.0)};
  ARMIJO_INLINE void add(F8 x) {
    q[0] = vaddq_f64(q[0], vcvt_f64_f32(vget_low_f32(x.lo)));
    q[1] = vaddq_f64(q[1], vcvt_high_f64_f32(x.lo));
    q[2] = vaddq_f64(q[2], vcvt_f64_f32(vget_low_f32(x.hi)));
    q[3] = vaddq_f64(q[3], vcvt_high_f64_f32(x.hi));
  }
  ARMIJO_INLINE double sum() const {
    double l[8];
    for (int i = 0; i < 4; ++i) vst1q_f64(l + 2 * i, q[i]);
    return reduce8(l);
  }
};

#else

struct F8 {
  float v[8];
  F8() = default;
  F8(float x) : v{x, x, x, x, x, x, x, x} {}  // NOLINT(google-explicit-constructor)
  static ARMIJO_INLINE F8 load(const float* p) {
    F8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = p[i];
    return r;
  }
  ARMIJO_INLINE void store(float* p) const {
    for (int i = 0; i < 8; ++i) p[i] = v[i];
  }
};
#define ARMIJO_LANEWISE(OP)                                  \
  ARMIJO_INLINE F8 operator OP(F8 a, F8 b) {                 \
    F8 r;                                                    \
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] OP b.v[i];   \
    return r;                                                \
  }
ARMIJO_LANEWISE(+)
ARMIJO_LANEWISE(-)
ARMIJO_LANEWISE(*)
ARMIJO_LANEWISE(/)
#undef ARMIJO_LANEWISE
ARMIJO_INLINE F8 vsqrt(F8 a) {
  F8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = std::sqrt(a.v[i]);
  return r;
}

ARMIJO_INLINE F8 select_ne(F8 a, F8 b, F8 if_ne, F8 if_eq) {
  F8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] != b.v[i] ? if_ne.v[i] : if_eq.v[i];
  return r;
}

struct DAcc8 {
  double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  ARMIJO_INLINE void add(F8 x) {
    for (int i = 0; i < 8; ++i) l[i] += static_cast<double>(x.v[i]);
  }
  ARMIJO_INLINE double sum() const { return reduce8(l); }
};

#endif

// Conversions lane by lane through the scalar helpers, where an ISA has no vector one: fp16 on
// SSE2, bf16 and fp16 on the scalar fallback. The same bits as the vector versions by definition.
template <float (*ToFloat)(uint16_t)>
ARMIJO_INLINE F8 load_lanes(const uint16_t* p) {
  alignas(32) float f[8];
  for (int i = 0; i < 8; ++i) f[i] = ToFloat(p[i]);
  return F8::load(f);
}

template <uint16_t (*FromFloat)(float)>
ARMIJO_INLINE void store_lanes(F8 x, uint16_t* p) {
  alignas(32) float f[8];
  x.store(f);
  for (int i = 0; i < 8; ++i) p[i] = FromFloat(f[i]);
}

template <float (*ToFloat)(uint16_t), uint16_t (*FromFloat)(float)>
ARMIJO_INLINE F8 round_lanes(F8 x) {
  alignas(32) float f[8];
  x.store(f);
  for (int i = 0; i < 8; ++i) f[i] = ToFloat(FromFloat(f[i]));
  return F8::load(f);
}

#if !defined(ARMIJO_SIMD_AVX2) && !(defined(__aarch64__) && defined(__ARM_NEON))
ARMIJO_INLINE F8 load_f16(const uint16_t* p) { return load_lanes<f16_to_float>(p); }
ARMIJO_INLINE void store_f16(F8 x, uint16_t* p) { store_lanes<float_to_f16>(x, p); }
ARMIJO_INLINE F8 round_f16(F8 x) { return round_lanes<f16_to_float, float_to_f16>(x); }
#endif
#if !defined(ARMIJO_SIMD_AVX2) && !defined(__SSE2__) && !(defined(__aarch64__) && defined(__ARM_NEON))
ARMIJO_INLINE F8 load_bf16(const uint16_t* p) { return load_lanes<bf16_to_float>(p); }
ARMIJO_INLINE void store_bf16(F8 x, uint16_t* p) { store_lanes<float_to_bf16>(x, p); }
ARMIJO_INLINE F8 round_bf16(F8 x) { return round_lanes<bf16_to_float, float_to_bf16>(x); }
#endif

// A half-precision buffer of either kind (raw bits): fp16 when `fp16`, else bf16. The branch is
// the same for a whole pass, so it predicts perfectly.
ARMIJO_INLINE F8 load_half(const uint16_t* p, bool fp16) { return fp16 ? load_f16(p) : load_bf16(p); }
ARMIJO_INLINE F8 round_half(F8 x, bool fp16) { return fp16 ? round_f16(x) : round_bf16(x); }
ARMIJO_INLINE void store_half(F8 x, uint16_t* p, bool fp16) {
  if (fp16) {
    store_f16(x, p);
  } else {
    store_bf16(x, p);
  }
}
ARMIJO_INLINE float half_to_float(uint16_t h, bool fp16) {
  return fp16 ? f16_to_float(h) : bf16_to_float(h);
}
ARMIJO_INLINE uint16_t float_to_half(float f, bool fp16) {
  return fp16 ? float_to_f16(f) : float_to_bf16(f);
}

}  // namespace simd
}  // namespace ARMIJO_ISA
}  // namespace armijo_fused
