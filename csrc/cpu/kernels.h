// The tile kernels, compiled once per instruction set: include this from exactly one
// csrc/cpu/kernels_<isa>.cpp, after defining ARMIJO_ISA (and ARMIJO_SIMD_<ISA> if not baseline).
//
// Every kernel makes one pass over its tile: eight lanes at a time (simd.h), then a scalar tail
// running the same per-element templates (passes.h). The sums of a tile are added per lane in
// fp32 over runs of kChunk vectors, then in eight double lanes (converting every product to
// double costs as much as the Adam math itself), plus the tail in double, reduced in a fixed
// order: the same on every ISA, every thread count and every run.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cpu/simd.h"
#include "cpu/tile_args.h"
#include "passes.h"

namespace armijo_fused {
inline namespace ARMIJO_ISA {
namespace {

using simd::DAcc8;
using simd::F8;
using simd::float_to_half;
using simd::half_to_float;
using simd::kLanes;
using simd::load_half;
using simd::round_half;
using simd::select_ne;
using simd::store_half;

// Vectors whose products are summed in fp32 before they go to the double accumulators.
constexpr int kChunk = 8;

// (Σ g·d, Σ g², Σ d²) of the vector part of a tile.
struct Sums3 {
  DAcc8 acc[3];
  F8 run[3];
  int k;
  ARMIJO_INLINE Sums3() : run{F8(0.f), F8(0.f), F8(0.f)}, k(0) {}
  ARMIJO_INLINE void add(F8 g, F8 d) {
    run[0] = run[0] + g * d;
    run[1] = run[1] + g * g;
    run[2] = run[2] + d * d;
    if (++k == kChunk) flush();
  }
  ARMIJO_INLINE void flush() {
    for (int j = 0; j < 3; ++j) {
      acc[j].add(run[j]);
      run[j] = F8(0.f);
    }
    k = 0;
  }
  ARMIJO_INLINE void finish(double* out) {
    if (k > 0) flush();
    for (int j = 0; j < 3; ++j) out[j] = acc[j].sum();
  }
};

template <int R, bool PRECOND>
void first_tile_impl(const FirstTile& t) {
  constexpr int NS = num_states(R);
  const Coeffs<F8> kv(t.scalars);
  const Coeffs<float> ks(t.scalars);
  float* __restrict__ p = t.p;
  const float* __restrict__ gr = t.g;
  float* __restrict__ a = t.a;
  float* __restrict__ b = t.b;
  const uint16_t* __restrict__ g16 = t.g16;
  uint16_t* __restrict__ m16 = t.model16;
  const bool h = t.fp16;
  const int64_t n = t.n;
  Sums3 sums;
  const F8 vu(t.unscale), vc(t.clip), vwd(t.wd), veta(t.eta);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    F8 th = F8::load(p + i), sa(0.f), sb(0.f), g, d;
    if (m16) {  // a weight written into the half model since the last step wins
      const F8 m = load_half(m16 + i, h);
      th = select_ne(round_half(th, h), m, m, th);
    }
    if constexpr (NS >= 1) sa = F8::load(a + i);
    if constexpr (NS >= 2) sb = F8::load(b + i);
    const F8 graw = g16 ? load_half(g16 + i, h) : F8::load(gr + i);
    first_step<R, PRECOND>(kv, vu, vc, vwd, veta, th, graw, sa, sb, g, d);
    th.store(p + i);
    if (m16) store_half(th, m16 + i, h);
    if constexpr (NS >= 1) sa.store(a + i);
    if constexpr (NS >= 2) sb.store(b + i);
    sums.add(g, d);
  }
  double v[3];
  sums.finish(v);
  double gd = v[0], gg = v[1], dd = v[2];
  for (; i < n; ++i) {
    float th = p[i], sa = 0.f, sb = 0.f, g, d;
    if (m16) {
      const float m = half_to_float(m16[i], h);
      th = half_to_float(float_to_half(th, h), h) != m ? m : th;
    }
    if constexpr (NS >= 1) sa = a[i];
    if constexpr (NS >= 2) sb = b[i];
    const float graw = g16 ? half_to_float(g16[i], h) : gr[i];
    first_step<R, PRECOND>(ks, t.unscale, t.clip, t.wd, t.eta, th, graw, sa, sb, g, d);
    p[i] = th;
    if (m16) m16[i] = float_to_half(th, h);
    if constexpr (NS >= 1) a[i] = sa;
    if constexpr (NS >= 2) b[i] = sb;
    gd += static_cast<double>(g * d);
    gg += static_cast<double>(g * g);
    dd += static_cast<double>(d * d);
  }
  t.out[0] = gd;
  t.out[1] = gg;
  t.out[2] = dd;
}

template <int R, bool PO, bool PN, bool WRITE, bool SUMS>
void move_tile_impl(const MoveTile& t) {
  constexpr int NS = num_states(R);
  // a retry without sums reads no gradient when the directions do not need it (Adam: 16 B/param)
  constexpr bool kGrad = SUMS || direction_reads_grad(R, PO) || direction_reads_grad(R, PN);
  const Coeffs<F8> kv(t.scalars);
  const Coeffs<float> ks(t.scalars);
  float* __restrict__ p = t.p;
  const float* __restrict__ gr = t.g;
  const float* __restrict__ a = t.a;
  const float* __restrict__ b = t.b;
  const uint16_t* __restrict__ g16 = t.g16;
  uint16_t* __restrict__ m16 = t.model16;
  const bool h = t.fp16;
  const int64_t n = t.n;
  Sums3 sums;
  const F8 vu(t.unscale), vc(t.clip), veo(t.e_old), vden(t.den_old), vwd(t.wd_new), ven(t.e_new);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    F8 th = F8::load(p + i), sa(0.f), sb(0.f), g(0.f), d;
    if constexpr (NS >= 1) sa = F8::load(a + i);
    if constexpr (NS >= 2) sb = F8::load(b + i);
    if constexpr (kGrad) g = (g16 ? load_half(g16 + i, h) : F8::load(gr + i)) * vu;
    move_step<R, PO, PN>(kv, g * vc, sa, sb, veo, vden, vwd, ven, th, d);
    if constexpr (WRITE) {
      th.store(p + i);
      if (m16) store_half(th, m16 + i, h);
    }
    if constexpr (SUMS) sums.add(g, d);
  }
  double v[3] = {0.0, 0.0, 0.0};
  if constexpr (SUMS) sums.finish(v);
  double gd = v[0], gg = v[1], dd = v[2];
  for (; i < n; ++i) {
    float th = p[i], sa = 0.f, sb = 0.f, g = 0.f, d;
    if constexpr (NS >= 1) sa = a[i];
    if constexpr (NS >= 2) sb = b[i];
    if constexpr (kGrad) g = (g16 ? half_to_float(g16[i], h) : gr[i]) * t.unscale;
    move_step<R, PO, PN>(ks, g * t.clip, sa, sb, t.e_old, t.den_old, t.wd_new, t.e_new, th, d);
    if constexpr (WRITE) {
      p[i] = th;
      if (m16) m16[i] = float_to_half(th, h);
    }
    if constexpr (SUMS) {
      gd += static_cast<double>(g * d);
      gg += static_cast<double>(g * g);
      dd += static_cast<double>(d * d);
    }
  }
  if constexpr (SUMS) {
    t.out[0] = gd;
    t.out[1] = gg;
    t.out[2] = dd;
  }
}

// The K trial points of a tile: d formed once per vector (as a first pass would, from the
// updated state: g_in = g·unscale·clip, u or the fallback, + wd·θ0 on the rule's own line), then
// one row store per step size. θ0 − η·d with the product rounded first, as the torch twin does.
template <int R, bool PRECOND>
void trial_tile_impl(const TrialTile& t) {
  constexpr int NS = num_states(R);
  const Coeffs<F8> kv(t.scalars);
  const Coeffs<float> ks(t.scalars);
  const float* __restrict__ p = t.p;
  const float* __restrict__ gr = t.g;
  const float* __restrict__ a = t.a;
  const float* __restrict__ b = t.b;
  const uint16_t* __restrict__ g16 = t.g16;
  float* __restrict__ out = t.out;
  const bool h = t.fp16;
  const int64_t n = t.n;
  const F8 vu(t.unscale), vc(t.clip), vwd(t.wd);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const F8 th = F8::load(p + i);
    F8 sa(0.f), sb(0.f);
    if constexpr (NS >= 1) sa = F8::load(a + i);
    if constexpr (NS >= 2) sb = F8::load(b + i);
    const F8 g_in = ((g16 ? load_half(g16 + i, h) : F8::load(gr + i)) * vu) * vc;
    F8 d = search_direction<R, PRECOND>(kv, g_in, sa, sb);
    if constexpr (!PRECOND) d = d + vwd * th;
    for (int64_t k = 0; k < t.k; ++k) (th - F8(t.etas[k]) * d).store(out + k * t.stride + i);
  }
  for (; i < n; ++i) {
    const float th = p[i];
    float sa = 0.f, sb = 0.f;
    if constexpr (NS >= 1) sa = a[i];
    if constexpr (NS >= 2) sb = b[i];
    const float g_in = ((g16 ? half_to_float(g16[i], h) : gr[i]) * t.unscale) * t.clip;
    float d = search_direction<R, PRECOND>(ks, g_in, sa, sb);
    if constexpr (!PRECOND) d = d + t.wd * th;
    for (int64_t k = 0; k < t.k; ++k) out[k * t.stride + i] = th - t.etas[k] * d;
  }
}

// Σ g² of a tile. Two fp32 runs take alternate vectors: with one, each vector waited on the
// previous add (256K cached elements, one thread: 32 µs against 24 µs, torch's sum 17 µs).
double sq_tile(const float* g, int64_t n) {
  DAcc8 acc;
  F8 run0(0.f), run1(0.f);
  int k = 0;
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    const F8 x0 = F8::load(g + i), x1 = F8::load(g + i + kLanes);
    run0 = run0 + x0 * x0;
    run1 = run1 + x1 * x1;
    if (++k == kChunk) {
      acc.add(run0);
      acc.add(run1);
      run0 = F8(0.f);
      run1 = F8(0.f);
      k = 0;
    }
  }
  if (i + kLanes <= n) {  // an odd vector count: the last vector joins the first run
    const F8 x = F8::load(g + i);
    run0 = run0 + x * x;
    i += kLanes;
    ++k;
  }
  if (k > 0) {
    acc.add(run0);
    acc.add(run1);
  }
  double s = acc.sum();
  for (; i < n; ++i) s += static_cast<double>(g[i] * g[i]);
  return s;
}

// Runtime values to template parameters (once per tile: a switch per 2048 elements).
template <typename F>
void with_rule(int rule, F&& f) {
  switch (rule) {
    case kSGD: return f(std::integral_constant<int, kSGD>{});
    case kMomentum: return f(std::integral_constant<int, kMomentum>{});
    case kNesterov: return f(std::integral_constant<int, kNesterov>{});
    case kRMSProp: return f(std::integral_constant<int, kRMSProp>{});
    case kAdam: return f(std::integral_constant<int, kAdam>{});
    case kNAdam: return f(std::integral_constant<int, kNAdam>{});
    // the ops validate ids first; a rule added without its case here must not run as another
    default:
      throw std::invalid_argument("armijo_fused: no kernel for direction rule id " +
                                  std::to_string(rule));
  }
}

template <typename F>
void with_bool(bool v, F&& f) {
  if (v) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

void first_tile(int rule, const FirstTile& t) {
  with_rule(rule, [&](auto r) {
    with_bool(t.precond, [&](auto p) {
      first_tile_impl<decltype(r)::value, decltype(p)::value>(t);
    });
  });
}

void move_tile(int rule, bool po, bool pn, bool write, bool sums, const MoveTile& t) {
  with_rule(rule, [&](auto r) {
    with_bool(po, [&](auto o) {
      with_bool(pn, [&](auto w) {
        constexpr int R = decltype(r)::value;
        constexpr bool PO = decltype(o)::value, PN = decltype(w)::value;
        if (write && sums) {
          move_tile_impl<R, PO, PN, true, true>(t);
        } else if (write) {
          move_tile_impl<R, PO, PN, true, false>(t);
        } else if (sums) {
          move_tile_impl<R, PO, PN, false, true>(t);
        }
      });
    });
  });
}

void trial_tile(int rule, bool precond, const TrialTile& t) {
  with_rule(rule, [&](auto r) {
    with_bool(precond, [&](auto p) {
      trial_tile_impl<decltype(r)::value, decltype(p)::value>(t);
    });
  });
}

}  // namespace

const TileKernels* tile_kernels() {
  static const TileKernels table{ARMIJO_SIMD, &first_tile, &move_tile, &sq_tile, &trial_tile};
  return &table;
}

}  // namespace ARMIJO_ISA
}  // namespace armijo_fused
