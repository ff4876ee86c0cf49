// C++ test of the CPU passes against a plain scalar-loop reference written independently here
// (one switch per rule, no templates, no SIMD), on random data for every rule, with sizes that
// are not multiples of the tile, several blocks, all four fallback combinations of the retry, the
// skip of unchanged blocks, the non-finite gscale guard, determinism across thread counts, the
// dispatcher registration, the error messages, and bf16 gradients with a bf16 model copy. Exit
// status 0 only if every check passed.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "ops.h"

namespace {

int g_failures = 0;
int g_checks = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

// ------------------------------------------------------------------------------------------------
// Layout and random buffers.

struct Layout {
  int64_t tile;
  std::vector<int64_t> numels;      // real elements per block
  std::vector<int32_t> block_tiles; // first tile of each block, plus the end
  std::vector<int32_t> tile_block;
  int64_t n() const { return static_cast<int64_t>(tile_block.size()) * tile; }
  int64_t nblocks() const { return static_cast<int64_t>(numels.size()); }
};

Layout make_layout(std::vector<int64_t> numels, int64_t tile) {
  Layout L{tile, numels, {0}, {}};
  for (size_t b = 0; b < numels.size(); ++b) {
    const int64_t t = std::max<int64_t>(1, (numels[b] + tile - 1) / tile);
    L.block_tiles.push_back(L.block_tiles.back() + static_cast<int32_t>(t));
    for (int64_t i = 0; i < t; ++i) L.tile_block.push_back(static_cast<int32_t>(b));
  }
  return L;
}

at::Tensor i32(const std::vector<int32_t>& v) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kInt);
  std::memcpy(t.data_ptr<int32_t>(), v.data(), v.size() * sizeof(int32_t));
  return t;
}

at::Tensor f32(const std::vector<float>& v) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kFloat);
  std::memcpy(t.data_ptr<float>(), v.data(), v.size() * sizeof(float));
  return t;
}

std::vector<float> vec(const at::Tensor& t) {
  const float* p = t.data_ptr<float>();
  return std::vector<float>(p, p + t.numel());
}

// Random values in the real elements of every block, zeros in the padding.
std::vector<float> random_buffer(const Layout& L, std::mt19937& rng, float scale, bool positive) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> v(L.n(), 0.f);
  for (int64_t b = 0; b < L.nblocks(); ++b) {
    const int64_t start = static_cast<int64_t>(L.block_tiles[b]) * L.tile;
    for (int64_t i = 0; i < L.numels[b]; ++i) {
      const float x = normal(rng) * scale;
      v[start + i] = positive ? std::fabs(x) : x;
    }
  }
  return v;
}

int num_states(int rule) {
  switch (rule) {
    case 0: return 0;
    case 1: case 2: case 3: return 1;
    default: return 2;  // adam, nadam (main() runs rules 0..5)
  }
}

// Host scalars as the Python rules produce them (step 3).
std::vector<double> host_scalars(int rule) {
  const double b1 = 0.9, b2 = 0.999, k = 3;
  switch (rule) {
    case 1:
    case 2: return {0.9, 0, 0, 0, 0};
    case 3: return {0.99, 1e-8, 0, 0, 0};
    case 4:
    case 5: return {b1, b2, 1.0 / (1.0 - std::pow(b1, k)), 1.0 / (1.0 - std::pow(b2, k)), 1e-8};
    default: return {0, 0, 0, 0, 0};
  }
}

// ------------------------------------------------------------------------------------------------
// The scalar reference (same math as python/armijo_fused/backends/torch_backend.py).

struct State {
  std::vector<float> p, g, a, b;
};

float ref_u(int rule, const std::vector<double>& s, float g, float a, float b, bool precond) {
  const float s0 = float(s[0]), s1 = float(s[1]), s2 = float(s[2]), s3 = float(s[3]),
              s4 = float(s[4]), c0 = float(1.0 - s[0]);
  if (precond) {
    if (rule == 3) return g / (std::sqrt(a) + s1);
    if (rule >= 4) return g / (std::sqrt(b * s3) + s4);
    return g;
  }
  switch (rule) {
    case 0: return g;
    case 1: return a;
    case 2: return g + s0 * a;
    case 3: return g / (std::sqrt(a) + s1);
    case 4: return (a * s2) / (std::sqrt(b * s3) + s4);
    default: return ((s0 * a + c0 * g) * s2) / (std::sqrt(b * s3) + s4);
  }
}

std::vector<double> ref_first(int rule, State& st, const std::vector<double>& s, double wd,
                              const std::vector<float>& eta, float unscale, float clip,
                              const Layout& L) {
  std::vector<double> sums(L.nblocks() * 3, 0.0);
  if (!std::isfinite(unscale) || !std::isfinite(clip)) return sums;
  const float s0 = float(s[0]), s1 = float(s[1]), c0 = float(1.0 - s[0]), c1 = float(1.0 - s[1]);
  for (int64_t i = 0; i < L.n(); ++i) {
    const int b = L.tile_block[i / L.tile];
    const float g = st.g[i] * unscale;
    const float gi = g * clip;
    float a = st.a.empty() ? 0.f : st.a[i], bb = st.b.empty() ? 0.f : st.b[i];
    if (rule == 1 || rule == 2) a = a * s0 + gi;
    if (rule == 3) a = a * s0 + c0 * gi * gi;
    if (rule >= 4) {
      a = a * s0 + c0 * gi;
      bb = bb * s1 + c1 * gi * gi;
    }
    if (!st.a.empty()) st.a[i] = a;
    if (!st.b.empty()) st.b[i] = bb;
    const float d = ref_u(rule, s, gi, a, bb, false) + float(wd) * st.p[i];
    st.p[i] = st.p[i] - eta[b] * d;
    sums[b * 3 + 0] += double(g) * d;
    sums[b * 3 + 1] += double(g) * g;
    sums[b * 3 + 2] += double(d) * d;
  }
  return sums;
}

std::vector<double> ref_move(int rule, State& st, const std::vector<double>& s, double wd,
                             const std::vector<float>& eo, const std::vector<float>& en,
                             float unscale, float clip, const Layout& L, bool po, bool pn) {
  std::vector<double> sums(L.nblocks() * 3, 0.0);
  if (!std::isfinite(unscale) || !std::isfinite(clip)) return sums;
  for (int64_t i = 0; i < L.n(); ++i) {
    const int b = L.tile_block[i / L.tile];
    const float g = st.g[i] * unscale;
    const float gi = g * clip;
    const float a = st.a.empty() ? 0.f : st.a[i], bb = st.b.empty() ? 0.f : st.b[i];
    const double wd_old = po ? 0.0 : wd;
    const float wd_new = pn ? 0.f : float(wd);
    const float theta0 = (st.p[i] + eo[b] * ref_u(rule, s, gi, a, bb, po)) /
                         float(1.0 - double(eo[b]) * wd_old);
    const float d = ref_u(rule, s, gi, a, bb, pn) + wd_new * theta0;
    if (eo[b] != en[b] || po != pn) st.p[i] = theta0 - en[b] * d;
    sums[b * 3 + 0] += double(g) * d;
    sums[b * 3 + 1] += double(g) * g;
    sums[b * 3 + 2] += double(d) * d;
  }
  return sums;
}

// ------------------------------------------------------------------------------------------------
// Comparisons.

bool close_vec(const std::vector<float>& x, const std::vector<float>& y, double rtol, double atol,
               std::string* why) {
  if (x.size() != y.size()) {
    *why = "size " + std::to_string(x.size()) + " vs " + std::to_string(y.size());
    return false;
  }
  for (size_t i = 0; i < x.size(); ++i) {
    const double diff = std::fabs(double(x[i]) - double(y[i]));
    if (!(diff <= atol + rtol * std::fabs(double(y[i])))) {
      *why = "element " + std::to_string(i) + ": " + std::to_string(x[i]) + " vs " +
             std::to_string(y[i]);
      return false;
    }
  }
  return true;
}

// Sums agree to fp32 summation error relative to the largest sum of each kind.
bool close_sums(const at::Tensor& got, const std::vector<double>& want, int64_t nblocks,
                std::string* why) {
  const float* o = got.data_ptr<float>();
  if (got.numel() != nblocks * 3) {
    *why = "shape";
    return false;
  }
  for (int j = 0; j < 3; ++j) {
    double scale = 1e-30;
    for (int64_t b = 0; b < nblocks; ++b) scale = std::max(scale, std::fabs(want[b * 3 + j]));
    for (int64_t b = 0; b < nblocks; ++b) {
      if (!(std::fabs(o[b * 3 + j] - want[b * 3 + j]) <= 2e-6 * scale)) {
        *why = "block " + std::to_string(b) + " sum " + std::to_string(j) + ": " +
               std::to_string(o[b * 3 + j]) + " vs " + std::to_string(want[b * 3 + j]);
        return false;
      }
    }
  }
  return true;
}

struct Tensors {
  at::Tensor p, g;
  std::vector<at::Tensor> states;
};

Tensors to_tensors(const State& st) {
  Tensors t{f32(st.p), f32(st.g), {}};
  if (!st.a.empty()) t.states.push_back(f32(st.a));
  if (!st.b.empty()) t.states.push_back(f32(st.b));
  return t;
}

void compare_state(const Tensors& t, const State& st, const std::string& what) {
  std::string why;
  check(close_vec(vec(t.p), st.p, 1e-6, 1e-7, &why), what + " param: " + why);
  if (!st.a.empty()) check(close_vec(vec(t.states[0]), st.a, 1e-6, 1e-9, &why), what + " a: " + why);
  if (!st.b.empty()) check(close_vec(vec(t.states[1]), st.b, 1e-6, 1e-9, &why), what + " b: " + why);
}

State random_state(int rule, const Layout& L, std::mt19937& rng) {
  State st;
  st.p = random_buffer(L, rng, 1.f, false);
  st.g = random_buffer(L, rng, 0.1f, false);
  if (num_states(rule) >= 1) st.a = random_buffer(L, rng, 1e-2f, rule == 3);
  if (num_states(rule) >= 2) st.b = random_buffer(L, rng, 1e-2f, true);
  return st;
}

std::vector<float> random_eta(const Layout& L, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(1e-3f, 1.1e-2f);
  std::vector<float> e(L.nblocks());
  for (auto& x : e) x = u(rng);
  return e;
}

// ------------------------------------------------------------------------------------------------
// The checks.

const float kUnscale = 0.5f, kClip = 0.25f;  // both away from 1
const double kWd = 0.01;

void test_rule(int rule, const std::vector<int64_t>& numels, int64_t tile, unsigned seed) {
  const std::string name = "rule " + std::to_string(rule) + " tile " + std::to_string(tile) +
                           " blocks " + std::to_string(numels.size()) + " first " +
                           std::to_string(numels[0]);
  std::mt19937 rng(seed);
  const Layout L = make_layout(numels, tile);
  const auto s = host_scalars(rule);
  State st = random_state(rule, L, rng);
  const auto eta = random_eta(L, rng);
  Tensors t = to_tensors(st);
  const at::Tensor tb = i32(L.tile_block), bt = i32(L.block_tiles);
  const at::Tensor gscale = f32({kUnscale, kClip});

  // first pass
  auto want = ref_first(rule, st, s, kWd, eta, kUnscale, kClip, L);
  at::Tensor got = armijo_fused::first_pass_cpu(rule, t.p, t.g, t.states, s, kWd, f32(eta),
                                                gscale, tb, bt, tile);
  compare_state(t, st, name + " first_pass");
  std::string why;
  check(close_sums(got, want, L.nblocks(), &why), name + " first_pass sums: " + why);

  // a chain of retries through every fallback combination, with and without sums
  std::vector<float> e_old = eta;
  bool p_old = false;
  const bool combos[4][2] = {{false, false}, {false, true}, {true, true}, {true, false}};
  for (int c = 0; c < 4; ++c) {
    const bool p_new = combos[c][1];
    std::vector<float> e_new = e_old;
    for (size_t b = 0; b < e_new.size(); ++b) e_new[b] *= (b == 0 && c == 2) ? 1.f : 0.5f;
    const bool sums = c % 2 == 1;
    auto want_m = ref_move(rule, st, s, kWd, e_old, e_new, kUnscale, kClip, L, p_old, p_new);
    at::Tensor got_m = armijo_fused::move_cpu(rule, t.p, t.g, t.states, s, kWd, f32(e_old),
                                              f32(e_new), gscale, tb, bt, tile, p_old, p_new,
                                              sums);
    const std::string what = name + " move " + std::to_string(p_old) + std::to_string(p_new);
    compare_state(t, st, what);
    if (sums) check(close_sums(got_m, want_m, L.nblocks(), &why), what + " sums: " + why);
    e_old = e_new;
    p_old = p_new;
  }

  // revert to θ0 of the retry chain's last direction: eta 0
  {
    std::vector<float> zero(L.nblocks(), 0.f);
    ref_move(rule, st, s, kWd, e_old, zero, kUnscale, kClip, L, p_old, p_old);
    armijo_fused::move_cpu(rule, t.p, t.g, t.states, s, kWd, f32(e_old), f32(zero), gscale, tb,
                           bt, tile, p_old, p_old, false);
    compare_state(t, st, name + " revert");
  }

  // grad_sq_norm
  {
    at::Tensor sq = armijo_fused::grad_sq_norm_cpu(t.g, tb, bt, tile);
    std::vector<double> want_sq(L.nblocks() * 3, 0.0);
    for (int64_t i = 0; i < L.n(); ++i) {
      want_sq[L.tile_block[i / tile] * 3] += double(st.g[i]) * st.g[i];
    }
    const float* o = sq.data_ptr<float>();
    for (int64_t b = 0; b < L.nblocks(); ++b) {
      check(std::fabs(o[b] - want_sq[b * 3]) <= 1e-6 * want_sq[b * 3] + 1e-30,
            name + " grad_sq_norm block " + std::to_string(b));
    }
  }

  // trial_points (batched candidates) from θ0 as the revert left it: K rows θ0 − η_k·d
  for (const bool precond : {false, true}) {
    const std::vector<float> etas = {0.3f, 0.05f, 0.f};
    at::Tensor rows = armijo_fused::trial_points_cpu(rule, t.p, t.g, t.states, s, kWd, f32(etas),
                                                     gscale, tile, precond);
    const int64_t n = L.n();
    std::vector<float> want_rows(etas.size() * n);
    for (int64_t i = 0; i < n; ++i) {
      const float g_in = (st.g[i] * kUnscale) * kClip;
      const float a = st.a.empty() ? 0.f : st.a[i], b = st.b.empty() ? 0.f : st.b[i];
      float d = ref_u(rule, s, g_in, a, b, precond);
      if (!precond) d = d + float(kWd) * st.p[i];
      for (size_t k = 0; k < etas.size(); ++k) want_rows[k * n + i] = st.p[i] - etas[k] * d;
    }
    check(rows.size(0) == int64_t(etas.size()) && rows.size(1) == n,
          name + " trial_points shape");
    check(close_vec(vec(rows.reshape({-1})), want_rows, 1e-6, 1e-7, &why),
          name + " trial_points " + std::to_string(precond) + ": " + why);
    compare_state(t, st, name + " after trial_points");  // nothing written
  }
}

void test_non_finite_gscale(int rule) {
  std::mt19937 rng(7);
  const Layout L = make_layout({1000, 3}, 256);
  const auto s = host_scalars(rule);
  const State st = random_state(rule, L, rng);
  const auto eta = random_eta(L, rng);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (auto gs : {std::vector<float>{nan, 1.f}, std::vector<float>{1.f, inf}}) {
    Tensors t = to_tensors(st);
    at::Tensor sums = armijo_fused::first_pass_cpu(rule, t.p, t.g, t.states, s, kWd, f32(eta),
                                                   f32(gs), i32(L.tile_block),
                                                   i32(L.block_tiles), L.tile);
    at::Tensor sums_m = armijo_fused::move_cpu(rule, t.p, t.g, t.states, s, kWd, f32(eta),
                                               f32(std::vector<float>(L.nblocks(), 0.f)),
                                               f32(gs), i32(L.tile_block), i32(L.block_tiles),
                                               L.tile, false, true, true);
    const std::string name = "non-finite gscale rule " + std::to_string(rule);
    check(vec(t.p) == st.p, name + ": param written");
    if (!st.a.empty()) check(vec(t.states[0]) == st.a, name + ": state written");
    if (!st.b.empty()) check(vec(t.states[1]) == st.b, name + ": state written");
    bool zero = true;
    for (float x : vec(sums.reshape(-1))) zero = zero && x == 0.f;
    for (float x : vec(sums_m.reshape(-1))) zero = zero && x == 0.f;
    check(zero, name + ": sums not zero");
  }
}

void test_determinism() {
  std::mt19937 rng(11);
  const Layout L = make_layout({200001, 5000, 77}, 2048);
  const int rule = 4;
  const auto s = host_scalars(rule);
  const State st = random_state(rule, L, rng);
  const auto eta = random_eta(L, rng);
  auto run = [&](int threads) {
    at::set_num_threads(threads);
    Tensors t = to_tensors(st);
    at::Tensor a = armijo_fused::first_pass_cpu(rule, t.p, t.g, t.states, s, kWd, f32(eta),
                                                f32({1.f, 1.f}), i32(L.tile_block),
                                                i32(L.block_tiles), L.tile);
    std::vector<float> out = vec(a.reshape(-1));
    for (float x : vec(t.p)) out.push_back(x);
    return out;
  };
  const auto one = run(1), two = run(2), again = run(2);
  check(one == two, "determinism: 1 vs 2 threads differ");
  check(two == again, "determinism: two runs differ");
  // every instruction set gives the same bits (same lanes, same reduction order, no FMA)
  const std::string isa = armijo_fused::cpu_simd();
  for (const char* other : {"baseline", "avx2"}) {
    try {
      armijo_fused::set_cpu_simd(other);
    } catch (const c10::Error&) {
      continue;  // not on this machine
    }
    check(run(2) == two, std::string("determinism: ") + armijo_fused::cpu_simd() + " differs");
  }
  armijo_fused::set_cpu_simd(isa == "avx2" ? "avx2" : "baseline");
}

template <typename F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    check(false, "expected an error containing '" + needle + "'");
  } catch (const c10::Error& e) {
    const std::string msg = e.what();
    check(msg.find(needle) != std::string::npos,
          "error '" + msg.substr(0, 200) + "' does not contain '" + needle + "'");
  }
}

void test_errors() {
  std::mt19937 rng(3);
  const Layout L = make_layout({100}, 64);
  const auto s = host_scalars(4);
  const State st = random_state(4, L, rng);
  Tensors t = to_tensors(st);
  const at::Tensor tb = i32(L.tile_block), bt = i32(L.block_tiles), eta = f32({1e-3f}),
                   gs = f32({1.f, 1.f});
  expect_error([&] { armijo_fused::first_pass_cpu(9, t.p, t.g, t.states, s, 0, eta, gs, tb, bt, 64); },
               "unknown rule id 9");
  expect_error([&] { armijo_fused::first_pass_cpu(4, t.p.to(at::kDouble), t.g, t.states, s, 0, eta, gs, tb, bt, 64); },
               "param must be float32");
  expect_error([&] { armijo_fused::first_pass_cpu(4, t.p, t.g.slice(0, 0, 64), t.states, s, 0, eta, gs, tb, bt, 64); },
               "grad has 64 elements but param has 128");
  expect_error([&] { armijo_fused::first_pass_cpu(4, t.p, t.g, {t.states[0]}, s, 0, eta, gs, tb, bt, 64); },
               "keeps 2 state buffer");
  expect_error([&] { armijo_fused::move_cpu(4, t.p, t.g, t.states, s, 0, eta, f32({1.f, 2.f}), gs, tb, bt, 64, false, false, false); },
               "eta_new must be");
  expect_error([&] { armijo_fused::grad_sq_norm_cpu(t.g, tb, bt, 48); },
               "not a whole number of tiles");
}

// bf16 model with fp32 master: a bf16 gradient must give bitwise the fp32 result for the same
// (bf16-representable) gradient values, and the model copy must be c10's rounding of θ.
void test_half_model(int rule) {
  std::mt19937 rng(60 + rule);
  const Layout L = make_layout({3000, 17, 2051}, 512);
  const auto s = host_scalars(rule);
  State st = random_state(rule, L, rng);
  for (float& g : st.g) g = static_cast<float>(c10::BFloat16(g));  // exactly representable
  const auto eta = random_eta(L, rng);
  Tensors full = to_tensors(st), half = to_tensors(st);
  half.g = full.g.to(at::kBFloat16);
  at::Tensor model = full.p.to(at::kBFloat16);  // the model holds its master, rounded
  const at::Tensor tb = i32(L.tile_block), bt = i32(L.block_tiles);
  const at::Tensor gscale = f32({kUnscale, kClip});
  const std::string name = "half model rule " + std::to_string(rule);

  auto same = [&](const std::string& what) {
    check(vec(half.p) == vec(full.p), name + " " + what + ": param differs from the fp32 run");
    for (size_t k = 0; k < full.states.size(); ++k) {
      check(vec(half.states[k]) == vec(full.states[k]), name + " " + what + ": state differs");
    }
    const auto* m = model.data_ptr<c10::BFloat16>();
    const auto p = vec(half.p);
    bool ok = true;
    for (int64_t i = 0; i < L.n(); ++i) ok = ok && m[i].x == c10::BFloat16(p[i]).x;
    check(ok, name + " " + what + ": the model copy is not θ rounded to bf16");
  };
  at::Tensor a = armijo_fused::first_pass_cpu(rule, full.p, full.g, full.states, s, kWd,
                                              f32(eta), gscale, tb, bt, L.tile);
  at::Tensor b = armijo_fused::first_pass_cpu(rule, half.p, half.g, half.states, s, kWd,
                                              f32(eta), gscale, tb, bt, L.tile, model);
  check(vec(a) == vec(b), name + " first_pass sums differ from the fp32 run");
  same("first_pass");
  std::vector<float> e_new = eta;
  for (float& e : e_new) e *= 0.5f;
  a = armijo_fused::move_cpu(rule, full.p, full.g, full.states, s, kWd, f32(eta), f32(e_new),
                             gscale, tb, bt, L.tile, false, true, true);
  b = armijo_fused::move_cpu(rule, half.p, half.g, half.states, s, kWd, f32(eta), f32(e_new),
                             gscale, tb, bt, L.tile, false, true, true, model);
  check(vec(a) == vec(b), name + " move sums differ from the fp32 run");
  same("move");
}

void test_dispatcher() {
  // The ops are reachable by name, as torch.ops.armijo_fused.* finds them.
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("armijo_fused::grad_sq_norm", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  int64_t)>();
  const Layout L = make_layout({10, 300}, 128);
  at::Tensor g = f32(std::vector<float>(L.n(), 2.f));
  at::Tensor out = op.call(g, i32(L.tile_block), i32(L.block_tiles), L.tile);
  check(out.numel() == 2 && out.data_ptr<float>()[0] == 4.f * 128 &&
            out.data_ptr<float>()[1] == 4.f * 384,
        "dispatcher: grad_sq_norm through the registered op");
  for (const char* name : {"armijo_fused::first_pass", "armijo_fused::move"}) {
    check(c10::Dispatcher::singleton().findSchema({name, ""}).has_value(),
          std::string("dispatcher: ") + name + " is registered");
  }
}

}  // namespace

int main() {
  const int threads = at::get_num_threads();
  for (int rule = 0; rule < 6; ++rule) {
    test_rule(rule, {1}, 256, 1 + rule);
    test_rule(rule, {1000}, 256, 10 + rule);               // not a multiple of the tile
    test_rule(rule, {4096}, 1024, 20 + rule);              // an exact multiple
    test_rule(rule, {3000, 17, 0, 2051}, 512, 30 + rule);  // several blocks, an empty one
    test_rule(rule, {77777, 5}, 2048, 40 + rule);          // several parallel work items
    test_rule(rule, {13}, 2, 50 + rule);                   // tiles shorter than a vector
    test_non_finite_gscale(rule);
    test_half_model(rule);
  }
  test_determinism();
  at::set_num_threads(threads);
  test_errors();
  test_dispatcher();
  std::printf("%d checks, %d failures (simd: %s)\n", g_checks, g_failures,
              armijo_fused::cpu_simd());
  return g_failures == 0 ? 0 : 1;
}
