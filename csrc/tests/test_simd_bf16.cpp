// C++ test of the SIMD bf16 helpers of csrc/cpu/simd.h (load, round, store, the select that takes
// weights written into a bf16 model) against the scalar definition, for the build's baseline
// instruction set (SSE2 on x86-64, NEON on aarch64): ties to even both ways, NaN, ±inf, the
// largest finite values, subnormals, ±0 and random bit patterns. Needs no torch, so it also
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

}  // namespace

int main() {
  std::vector<uint32_t> patterns = {
      0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF, 0x3F807FFF, 0x7F7FFFFF, 0xFF7FFFFF,
      0x7F7F8000, 0x00000001, 0x00008000, 0x00018000, 0x80000000, 0x00000000, 0x7F800000,
      0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x477FF000, 0x33800000};
  std::mt19937 rng(0);
  while (patterns.size() % 8 != 0 || patterns.size() < 4096) patterns.push_back(rng());
  int failures = 0;
  const size_t n = patterns.size();
  std::vector<float> x(n), model(n);
  std::vector<uint16_t> stored(n), model16(n);
  for (size_t i = 0; i < n; ++i) {
    x[i] = from_bits(patterns[i]);
    // a model copy that holds x rounded, except every third lane (written by the user)
    model16[i] = i % 3 ? s::float_to_bf16(x[i]) : static_cast<uint16_t>(rng() & 0xFFFF);
  }
  for (size_t i = 0; i < n; i += s::kLanes) {
    const s::F8 v = s::F8::load(x.data() + i);
    s::store_bf16(v, stored.data() + i);
    float rounded[8], loaded[8], taken[8];
    s::round_bf16(v).store(rounded);
    const s::F8 m = s::load_bf16(model16.data() + i);
    m.store(loaded);
    s::select_ne(s::round_bf16(v), m, m, v).store(taken);
    for (int l = 0; l < s::kLanes; ++l) {
      const size_t k = i + l;
      const uint16_t want = s::float_to_bf16(x[k]);
      const float want_round = s::bf16_to_float(want);
      const float m_k = s::bf16_to_float(model16[k]);
      const float want_taken = want_round != m_k ? m_k : x[k];
      const bool ok = stored[k] == want && bits(rounded[l]) == bits(want_round) &&
                      bits(loaded[l]) == bits(m_k) && bits(taken[l]) == bits(want_taken);
      if (!ok && failures++ < 10) {
        std::fprintf(stderr, "FAIL %08x: stored %04x want %04x, rounded %08x want %08x, "
                     "taken %08x want %08x\n", patterns[k], stored[k], want, bits(rounded[l]),
                     bits(want_round), bits(taken[l]), bits(want_taken));
      }
    }
  }
  std::printf("%zu values, %d failures (simd: %s)\n", n, failures, ARMIJO_SIMD);
  return failures == 0 ? 0 : 1;
}
