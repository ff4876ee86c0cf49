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

struct DAcc8 {
  double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  ARMIJO_INLINE void add(F8 x) {
    for (int i = 0; i < 8; ++i) l[i] += static_cast<double>(x.v[i]);
  }
  ARMIJO_INLINE double sum() const { return reduce8(l); }
};

#endif

}  // namespace simd
}  // namespace ARMIJO_ISA
}  // namespace armijo_fused
