// C++ test of the SIMD half-precision helpers of csrc/cpu/simd.h (load, round, store, and the
// select that takes weights written into a half model) against their scalar definitions, for bf16
// and fp16, on the build's baseline instruction set (SSE2 on x86-64, NEON on aarch64) or AVX2 +
// F16C when built with -DARMIJO_SIMD_AVX2=1 -mavx2 -mf16c: ties to even both ways, NaN, ±inf, the
// largest finite values, subnormals, ±0 and random bit patterns. The scalar fp16 helpers are
// checked against the compiler's _Float16 conversions (IEEE round to nearest even) where it has
// them: every fp16 value, and every float pattern above. Needs no torch, so it also
// cross-compiles (aarch64-linux-gnu-g++ -O3 -std=c++17 -Icsrc; run under qemu-aarch64).
// Exit status 0 only if every lane matched.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/simd.h"

namespace s = armijo_fused::simd;

namespace {

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

int g_failures = 0;

void fail(const char* what, uint32_t pattern, uint32_t got, uint32_t want) {
  if (g_failures++ < 12) {
    std::fprintf(stderr, "FAIL %s %08x: got %08x want %08x\n", what, pattern, got, want);
  }
}

// The vector helpers against the scalar ones, for one kind of half.
void check_vectors(const std::vector<uint32_t>& patterns, bool fp16, std::mt19937& rng) {
  const char* kind = fp16 ? "fp16" : "bf16";
  const size_t n = patterns.size();
  std::vector<float> x(n);
  std::vector<uint16_t> stored(n), model(n);
  for (size_t i = 0; i < n; ++i) {
    x[i] = from_bits(patterns[i]);
    // a model copy that holds x rounded, except every third lane (written by the user)
    model[i] = i % 3 ? s::float_to_half(x[i], fp16) : static_cast<uint16_t>(rng() & 0xFFFF);
  }
  for (size_t i = 0; i < n; i += s::kLanes) {
    const s::F8 v = s::F8::load(x.data() + i);
    s::store_half(v, stored.data() + i, fp16);
    float rounded[8], loaded[8], taken[8];
    s::round_half(v, fp16).store(rounded);
    const s::F8 m = s::load_half(model.data() + i, fp16);
    m.store(loaded);
    s::select_ne(s::round_half(v, fp16), m, m, v).store(taken);
    for (int l = 0; l < s::kLanes; ++l) {
      const size_t k = i + l;
      const uint16_t want = s::float_to_half(x[k], fp16);
      const float want_round = s::half_to_float(want, fp16);
      const float m_k = s::half_to_float(model[k], fp16);
      const float want_taken = want_round != m_k ? m_k : x[k];
      if (stored[k] != want) fail(kind, patterns[k], stored[k], want);
      if (bits(rounded[l]) != bits(want_round)) fail(kind, patterns[k], bits(rounded[l]), bits(want_round));
      // a loaded NaN may keep its payload in hardware; compare NaN by class
      const bool both_nan = loaded[l] != loaded[l] && m_k != m_k;
      if (!both_nan && bits(loaded[l]) != bits(m_k)) fail(kind, model[k], bits(loaded[l]), bits(m_k));
      const bool taken_nan = taken[l] != taken[l] && want_taken != want_taken;
      if (!taken_nan && bits(taken[l]) != bits(want_taken)) fail(kind, patterns[k], bits(taken[l]), bits(want_taken));
    }
  }
}

// The compiler's own IEEE half type, where it has one (GCC's C++ front end has _Float16 on x86
// and __fp16 on aarch64).
#if defined(__aarch64__) && defined(__ARM_FP16_FORMAT_IEEE)
using RefHalf = __fp16;
#define ARMIJO_REF_HALF 1
#elif defined(__x86_64__) && defined(__FLT16_MAX__)
using RefHalf = _Float16;
#define ARMIJO_REF_HALF 1
#endif

// The scalar fp16 helpers against the compiler's IEEE conversions.
void check_scalar_f16(const std::vector<uint32_t>& patterns) {
#if defined(ARMIJO_REF_HALF)
  for (uint32_t h = 0; h < 0x10000; ++h) {
    RefHalf v;
    const uint16_t hb = static_cast<uint16_t>(h);
    std::memcpy(&v, &hb, sizeof v);
    const float want = static_cast<float>(v);
    const float got = s::f16_to_float(hb);
    if (want == want && bits(got) != bits(want)) fail("f16_to_float", h, bits(got), bits(want));
    if (want != want && got == got) fail("f16_to_float NaN", h, bits(got), bits(want));
  }
  for (uint32_t p : patterns) {
    const float f = from_bits(p);
    if (f != f) continue;  // NaN: the helper's canonical quiet NaN, checked above by class
    const RefHalf v = static_cast<RefHalf>(f);
    uint16_t want;
    std::memcpy(&want, &v, sizeof want);
    const uint16_t got = s::float_to_f16(f);
    if (got != want) fail("float_to_f16", p, got, want);
  }
#else
  (void)patterns;
  std::printf("(no IEEE half type in this compiler: the scalar fp16 helpers are not "
              "cross-checked)\n");
#endif
}

}  // namespace

int main() {
  std::vector<uint32_t> patterns = {
      // bf16 ties, NaN, ±inf, the largest finite floats, subnormals, ±0
      0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF, 0x3F807FFF, 0x7F7FFFFF, 0xFF7FFFFF,
      0x7F7F8000, 0x00000001, 0x00008000, 0x00018000, 0x80000000, 0x00000000, 0x7F800000,
      0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001,
      // fp16: 65504, the 65520 tie to inf, just below it, ties at bit 13, the smallest normal
      // and subnormal, the 2^-25 tie to 0, just above it, 1.5 units, the subnormal/normal edge
      0x477FE000, 0x477FF000, 0x477FEFFF, 0x3F801000, 0x3F803000, 0x38800000, 0x33800000,
      0x33000000, 0x33000001, 0x33C00000, 0x387FC000, 0x387FE000, 0x387FFFFF, 0xB3000001,
      0x477FF000 | 0x80000000u, 0x477FF001};
  std::mt19937 rng(0);
  while (patterns.size() % 8 != 0 || patterns.size() < 8192) patterns.push_back(rng());
  for (uint32_t e = 100; e < 144; ++e) {  // every exponent near fp16's range, random mantissas
    for (int j = 0; j < 64; ++j) patterns.push_back((e << 23) | (rng() & 0x7FFFFF));
  }
  while (patterns.size() % 8 != 0) patterns.push_back(rng());
  check_vectors(patterns, /*fp16=*/false, rng);
  check_vectors(patterns, /*fp16=*/true, rng);
  check_scalar_f16(patterns);
  std::printf("%zu values, bf16 and fp16, %d failures (simd: %s)\n", patterns.size(), g_failures,
              ARMIJO_SIMD);
  return g_failures == 0 ? 0 : 1;
}
