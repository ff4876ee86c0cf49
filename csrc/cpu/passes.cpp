// The CPU ops: validation, the parallel loop over tiles (at::parallel_for, i.e. torch's OpenMP
// pool and torch.set_num_threads) and the per-block reductions. The tile kernels themselves
// (one read and one write of each buffer, vectorised) are in kernels.h, built once per
// instruction set (kernels_base.cpp, kernels_avx2.cpp) and picked at run time.
//
// Determinism: every tile writes its own partial sums (accumulated in double in a fixed order
// inside the tile); the tiles of a block are then added in tile order. The result depends only on
// the layout, never on the number of threads or on how tiles were split between them.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/tile_args.h"
#include "ops.h"
#include "passes.h"

namespace armijo_fused {
inline namespace base {
const TileKernels* tile_kernels();  // kernels_base.cpp
}
#if ARMIJO_HAVE_AVX2
inline namespace avx2 {
const TileKernels* tile_kernels();  // kernels_avx2.cpp
}
#endif

namespace {

// Elements per parallel work item at least: below this, splitting costs more than it saves.
constexpr int64_t kGrainElems = 1 << 15;

bool cpu_has_avx2() {
#if ARMIJO_HAVE_AVX2
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// The kernels to run: AVX2 where the CPU has it, unless ARMIJO_FUSED_SIMD=baseline (or
// set_cpu_simd) says otherwise. Both give bitwise the same results; this only changes speed.
const TileKernels* choose_kernels(const std::string& want) {
#if ARMIJO_HAVE_AVX2
  if ((want == "auto" || want == "avx2") && cpu_has_avx2()) return avx2::tile_kernels();
#endif
  TORCH_CHECK(want == "auto" || want == "baseline" || want == base::tile_kernels()->isa,
              "armijo_fused: SIMD ", want, " is not available on this machine/build (choose "
              "auto, baseline", cpu_has_avx2() ? " or avx2)" : ")");
  return base::tile_kernels();
}

const TileKernels*& active_kernels() {
  static const TileKernels* k = [] {
    const char* env = std::getenv("ARMIJO_FUSED_SIMD");
    return choose_kernels(env && *env ? env : "auto");
  }();
  return k;
}

// ---------------------------------------------------------------------------------------------
// Validation: every message names the op, the argument and what was expected.

struct Layout {
  const int32_t* tile_block;
  const int32_t* block_tiles;
  int64_t ntiles;
  int64_t nblocks;
  int64_t tile;
};

void check_fp32_buffer(const char* op, const char* what, const at::Tensor& t, int64_t numel) {
  TORCH_CHECK(t.defined(), "armijo_fused.", op, ": ", what, " is an undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), "armijo_fused.", op, ": ", what,
              " must be a CPU tensor for the C++ CPU kernels, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "armijo_fused.", op, ": ", what,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, "armijo_fused.", op, ": ", what,
              " must be a 1-D flat buffer, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "armijo_fused.", op, ": ", what, " must be contiguous");
  if (numel >= 0) {
    TORCH_CHECK(t.numel() == numel, "armijo_fused.", op, ": ", what, " has ", t.numel(),
                " elements but param has ", numel,
                " (every buffer has the layout's padded length)");
  }
}

// A gradient may be fp32, bf16 or fp16 (a half gradient is widened a tile at a time).
void check_grad_buffer(const char* op, const at::Tensor& g, int64_t numel) {
  TORCH_CHECK(g.defined(), "armijo_fused.", op, ": grad is an undefined tensor");
  const auto st = g.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, "armijo_fused.", op,
              ": grad must be float32, bfloat16 or float16, got ", st);
  TORCH_CHECK(g.device().is_cpu(), "armijo_fused.", op,
              ": grad must be a CPU tensor for the C++ CPU kernels, got device ", g.device());
  TORCH_CHECK(g.dim() == 1, "armijo_fused.", op, ": grad must be a 1-D flat buffer, got shape ",
              g.sizes());
  TORCH_CHECK(g.is_contiguous(), "armijo_fused.", op, ": grad must be contiguous");
  TORCH_CHECK(numel < 0 || g.numel() == numel, "armijo_fused.", op, ": grad has ", g.numel(),
              " elements but param has ", numel, " (every buffer has the layout's padded length)");
}

// The model's bf16/fp16 copy of θ (fp32 master weights): same length as param.
void check_model_copy(const char* op, const at::Tensor& m, int64_t numel) {
  TORCH_CHECK(m.scalar_type() == at::kBFloat16 || m.scalar_type() == at::kHalf, "armijo_fused.",
              op, ": model_param (the model's copy of the fp32 master) must be bfloat16 or "
              "float16, got ", m.scalar_type());
  TORCH_CHECK(m.device().is_cpu() && m.dim() == 1 && m.is_contiguous(), "armijo_fused.", op,
              ": model_param must be a contiguous 1-D CPU tensor, got shape ", m.sizes(), " on ",
              m.device());
  TORCH_CHECK(m.numel() == numel, "armijo_fused.", op, ": model_param has ", m.numel(),
              " elements but param has ", numel);
}

void check_rule(const char* op, int64_t rule) {
  TORCH_CHECK(rule >= 0 && rule < kNumRules, "armijo_fused.", op, ": unknown rule id ", rule,
              " (expected 0..5: sgd, momentum, nesterov, rmsprop, adam, nadam)");
}

void check_states(const char* op, int64_t rule, at::TensorList states, int64_t numel) {
  const int want = num_states(static_cast<int>(rule));
  TORCH_CHECK(static_cast<int>(states.size()) == want, "armijo_fused.", op, ": rule ",
              rule_name(static_cast<int>(rule)), " (id ", rule, ") keeps ", want,
              " state buffer(s), got ", states.size());
  for (size_t i = 0; i < states.size(); ++i) {
    const std::string what = "states[" + std::to_string(i) + "]";
    check_fp32_buffer(op, what.c_str(), states[i], numel);
  }
}

void check_scalars(const char* op, at::ArrayRef<double> scalars) {
  TORCH_CHECK(static_cast<int>(scalars.size()) == kNumScalars, "armijo_fused.", op,
              ": scalars must hold the rule's ", kNumScalars, " host scalars, got ",
              scalars.size());
}

// The kernels use __restrict__ pointers: the buffers they write must not share memory.
void check_disjoint(const char* op, const std::vector<std::pair<const char*, const at::Tensor*>>& bufs) {
  for (size_t i = 0; i < bufs.size(); ++i) {
    for (size_t j = i + 1; j < bufs.size(); ++j) {
      const auto* a = static_cast<const char*>(bufs[i].second->data_ptr());
      const auto* b = static_cast<const char*>(bufs[j].second->data_ptr());
      const auto na = bufs[i].second->nbytes(), nb = bufs[j].second->nbytes();
      const bool overlap = na > 0 && nb > 0 && a < b + nb && b < a + na;
      TORCH_CHECK(!overlap, "armijo_fused.", op, ": ", bufs[i].first, " and ", bufs[j].first,
                  " share memory; each buffer must be a separate tensor");
    }
  }
}

Layout check_layout(const char* op, const at::Tensor& tile_block, const at::Tensor& block_tiles,
                    int64_t tile, int64_t numel) {
  TORCH_CHECK(tile > 0, "armijo_fused.", op, ": tile must be positive, got ", tile);
  TORCH_CHECK(numel % tile == 0, "armijo_fused.", op, ": the buffers have ", numel,
              " elements, not a whole number of tiles of ", tile);
  const int64_t ntiles = numel / tile;
  for (const auto& [t, what] : {std::pair<const at::Tensor*, const char*>{&tile_block, "tile_block"},
                                {&block_tiles, "block_tiles"}}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kInt && t->dim() == 1 &&
                    t->is_contiguous(),
                "armijo_fused.", op, ": ", what,
                " must be a contiguous 1-D int32 CPU tensor (layout.", what, "), got ",
                t->scalar_type(), " of shape ", t->sizes(), " on ", t->device());
  }
  TORCH_CHECK(tile_block.numel() == ntiles, "armijo_fused.", op, ": tile_block has ",
              tile_block.numel(), " entries but the buffers hold ", ntiles, " tiles of ", tile);
  TORCH_CHECK(block_tiles.numel() >= 2, "armijo_fused.", op,
              ": block_tiles needs nblocks + 1 >= 2 entries, got ", block_tiles.numel());
  Layout L{tile_block.data_ptr<int32_t>(), block_tiles.data_ptr<int32_t>(), ntiles,
           block_tiles.numel() - 1, tile};
  TORCH_CHECK(L.block_tiles[0] == 0 && L.block_tiles[L.nblocks] == ntiles, "armijo_fused.", op,
              ": block_tiles must run from 0 to the tile count ", ntiles, ", got ",
              L.block_tiles[0], " .. ", L.block_tiles[L.nblocks]);
  for (int64_t b = 0; b < L.nblocks; ++b) {
    TORCH_CHECK(L.block_tiles[b] < L.block_tiles[b + 1], "armijo_fused.", op,
                ": block_tiles must increase strictly (every block has a tile), got ",
                L.block_tiles[b], " then ", L.block_tiles[b + 1], " at block ", b);
    for (int64_t t = L.block_tiles[b]; t < L.block_tiles[b + 1]; ++t) {
      TORCH_CHECK(L.tile_block[t] == b, "armijo_fused.", op, ": tile_block[", t, "] is ",
                  L.tile_block[t], " but block_tiles puts that tile in block ", b);
    }
  }
  return L;
}

void check_eta(const char* op, const char* what, const at::Tensor& eta, int64_t nblocks) {
  TORCH_CHECK(eta.device().is_cpu() && eta.scalar_type() == at::kFloat && eta.dim() == 1 &&
                  eta.is_contiguous() && eta.numel() == nblocks,
              "armijo_fused.", op, ": ", what,
              " must be a contiguous float32 CPU tensor with one step size per block (",
              nblocks, "), got ", eta.scalar_type(), " of shape ", eta.sizes(), " on ",
              eta.device());
}

// [unscale, clip], or nothing when either is not finite (then the pass writes nothing).
bool read_gscale(const char* op, const at::Tensor& gscale, float* unscale, float* clip) {
  TORCH_CHECK(gscale.device().is_cpu() && gscale.scalar_type() == at::kFloat &&
                  gscale.numel() == 2 && gscale.is_contiguous(),
              "armijo_fused.", op,
              ": gscale must be a contiguous float32 CPU tensor of 2 entries [unscale, clip], "
              "got ",
              gscale.scalar_type(), " of shape ", gscale.sizes(), " on ", gscale.device());
  const float* s = gscale.data_ptr<float>();
  *unscale = s[0];
  *clip = s[1];
  return std::isfinite(s[0]) && std::isfinite(s[1]);
}

// ---------------------------------------------------------------------------------------------
// Helpers: the tile loop, the per-block reduction.

// Runs f(t) for every tile. Threads take chunks of tiles from a shared counter rather than a
// fixed half each, so a thread the OS delays (a busy 2-core machine) does not hold up the pass.
// Which thread runs a tile never changes its result: every tile writes its own partial sums.
template <typename F>
void for_each_tile(const Layout& L, F&& f) {
  const int64_t chunk = std::max<int64_t>(1, kGrainElems / L.tile);  // tiles per grab
  const int64_t nchunks = (L.ntiles + chunk - 1) / chunk;
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), nchunks);
  if (nthreads <= 1 || at::in_parallel_region()) {
    for (int64_t t = 0; t < L.ntiles; ++t) f(t);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < nchunks; c = next.fetch_add(1)) {
      const int64_t end = std::min(L.ntiles, (c + 1) * chunk);
      for (int64_t t = c * chunk; t < end; ++t) f(t);
    }
  });
}

// Per-tile partial sums (width per tile) -> fp32 [nblocks, width], tiles added in order.
at::Tensor reduce_blocks(const std::vector<double>& partial, const Layout& L, int width) {
  at::Tensor out = width == 1 ? at::zeros({L.nblocks}, at::kFloat)
                              : at::zeros({L.nblocks, width}, at::kFloat);
  float* o = out.data_ptr<float>();
  for (int64_t b = 0; b < L.nblocks; ++b) {
    for (int j = 0; j < width; ++j) {
      double acc = 0.0;
      for (int64_t t = L.block_tiles[b]; t < L.block_tiles[b + 1]; ++t) acc += partial[t * width + j];
      o[b * width + j] = static_cast<float>(acc);
    }
  }
  return out;
}

// Half precision: bf16 and fp16 gradients and model copies are read and written by the SIMD tile
// kernels themselves (csrc/cpu/kernels.h). Only grad_sq_norm widens a half gradient here, a tile
// at a time into a per-thread scratch buffer, while the tile is in cache.
inline float to_float(uint16_t bf16_bits) {  // bf16: the top half of an fp32
  const uint32_t u = static_cast<uint32_t>(bf16_bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float to_float(c10::Half h) { return static_cast<float>(h); }

// T is uint16_t (the bits of bf16) or c10::Half.
template <typename T>
void widen(const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

// Where a pass finds each tile's data: flat buffers or a tile table; half-precision buffers go
// to the kernels as raw bits (g16, model16), bf16 or fp16 as `fp16` says.
struct Bufs {
  float* p;
  float* a;  // first state buffer (or nullptr)
  float* b;  // second state buffer (or nullptr)
  const void* g;
  at::ScalarType g_type;
  void* model;  // the model's bf16/fp16 copy of p, or nullptr (fp32 parameters)
  at::ScalarType model_type;
  // A tile table (storage/table.py) instead of the flat p and g: per tile, the address of its
  // first θ and g element and its count of real elements. nullptr: the flat buffers.
  const int64_t* p_table = nullptr;
  const int64_t* g_table = nullptr;
  const int32_t* lengths = nullptr;

  float* theta(int64_t t, int64_t o) const {
    return p_table ? reinterpret_cast<float*>(p_table[t]) : p + o;
  }
  bool grad_half() const { return !g_table && g_type != at::kFloat; }
  // The fp32 gradient of a tile (nullptr for a half gradient: the kernels read g16_at).
  const float* grad_of(int64_t t, int64_t o) const {
    if (g_table) return reinterpret_cast<const float*>(g_table[t]);
    return grad_half() ? nullptr : static_cast<const float*>(g) + o;
  }
  const uint16_t* g16_at(int64_t o) const {
    return grad_half() ? static_cast<const uint16_t*>(g) + o : nullptr;
  }
  uint16_t* model16_at(int64_t o) const {
    return model ? static_cast<uint16_t*>(model) + o : nullptr;
  }
  // grad and model copy share a dtype (checked): the kind of every half buffer of the pass
  bool fp16() const { return g_type == at::kHalf || (model && model_type == at::kHalf); }
  int64_t count(int64_t t, int64_t tile) const { return lengths ? lengths[t] : tile; }

  // The fp32 gradient of elements [o, o + n): the buffer itself, or widened into scratch.
  const float* grad_tile(int64_t o, int64_t n) const {
    if (g_type == at::kFloat) return static_cast<const float*>(g) + o;
    thread_local std::vector<float> scratch;
    scratch.resize(n);
    if (g_type == at::kBFloat16) {
      widen(static_cast<const uint16_t*>(g) + o, scratch.data(), n);
    } else {
      widen(static_cast<const c10::Half*>(g) + o, scratch.data(), n);
    }
    return scratch.data();
  }
};

Bufs buffers(const at::Tensor& param, const at::Tensor& grad, at::TensorList states,
             const c10::optional<at::Tensor>& model_param) {
  const bool copy = model_param.has_value() && model_param->defined();
  return {param.data_ptr<float>(),
          states.size() > 0 ? states[0].data_ptr<float>() : nullptr,
          states.size() > 1 ? states[1].data_ptr<float>() : nullptr,
          grad.data_ptr(), grad.scalar_type(),
          copy ? model_param->data_ptr() : nullptr,
          copy ? model_param->scalar_type() : at::kFloat};
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The ops.

// The checks every op of a rule makes on its flat buffers and scalars.
static void check_rule_buffers(const char* op, int64_t rule, const at::Tensor& param,
                               const at::Tensor& grad, at::TensorList states,
                               at::ArrayRef<double> scalars) {
  check_rule(op, rule);
  check_fp32_buffer(op, "param", param, -1);
  check_grad_buffer(op, grad, param.numel());
  check_states(op, rule, states, param.numel());
  check_scalars(op, scalars);
}

// The checks every pass makes on its buffers and layout; returns the layout.
static Layout check_pass_inputs(const char* op, int64_t rule, const at::Tensor& param,
                                const at::Tensor& grad, at::TensorList states,
                                at::ArrayRef<double> scalars, const at::Tensor& tile_block,
                                const at::Tensor& block_tiles, int64_t tile,
                                const c10::optional<at::Tensor>& model_param) {
  check_rule_buffers(op, rule, param, grad, states, scalars);
  const int64_t n = param.numel();
  std::vector<std::pair<const char*, const at::Tensor*>> bufs{{"param", &param}, {"grad", &grad}};
  if (states.size() > 0) bufs.emplace_back("states[0]", &states[0]);
  if (states.size() > 1) bufs.emplace_back("states[1]", &states[1]);
  if (model_param.has_value() && model_param->defined()) {
    check_model_copy(op, *model_param, n);
    TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == model_param->scalar_type(),
                "armijo_fused.", op, ": a half-precision grad must have model_param's dtype (",
                model_param->scalar_type(), "), got ", grad.scalar_type());
    bufs.emplace_back("model_param", &*model_param);
  }
  check_disjoint(op, bufs);
  return check_layout(op, tile_block, block_tiles, tile, n);
}

// The first pass over every tile, wherever θ and g are (flat buffers or a tile table).
static at::Tensor run_first(const Layout& L, int r, const Bufs& B, at::ArrayRef<double> scalars,
                            double weight_decay, const at::Tensor& eta, float unscale,
                            float clip, bool precond) {
  const float* etas = eta.data_ptr<float>();
  const float wd = static_cast<float>(weight_decay);
  std::vector<double> partial(L.ntiles * 3, 0.0);
  const TileKernels* k = active_kernels();
  for_each_tile(L, [&](int64_t t) {
    const int64_t o = t * L.tile;
    const int64_t n = B.count(t, L.tile);
    FirstTile args{scalars.data(), unscale, clip, wd, etas[L.tile_block[t]],
                   B.theta(t, o), B.grad_of(t, o), B.a ? B.a + o : nullptr,
                   B.b ? B.b + o : nullptr, n, &partial[t * 3]};
    args.g16 = B.g16_at(o);
    args.model16 = B.model16_at(o);
    args.fp16 = B.fp16();
    args.precond = precond;
    k->first(r, args);
  });
  return reduce_blocks(partial, L, 3);
}

at::Tensor first_pass_cpu(int64_t rule, const at::Tensor& param, const at::Tensor& grad,
                          at::TensorList states, at::ArrayRef<double> scalars,
                          double weight_decay, const at::Tensor& eta, const at::Tensor& gscale,
                          const at::Tensor& tile_block, const at::Tensor& block_tiles,
                          int64_t tile, const c10::optional<at::Tensor>& model_param,
                          bool precond) {
  const char* op = "first_pass";
  const Layout L = check_pass_inputs(op, rule, param, grad, states, scalars, tile_block,
                                     block_tiles, tile, model_param);
  check_eta(op, "eta", eta, L.nblocks);
  float unscale, clip;
  if (!read_gscale(op, gscale, &unscale, &clip)) return at::zeros({L.nblocks, 3}, at::kFloat);
  return run_first(L, static_cast<int>(rule), buffers(param, grad, states, model_param), scalars,
                   weight_decay, eta, unscale, clip, precond);
}

// A move over every tile, wherever θ and g are (flat buffers or a tile table).
static at::Tensor run_move(const Layout& L, int r, const Bufs& B, at::ArrayRef<double> scalars,
                           double weight_decay, const at::Tensor& eta_old,
                           const at::Tensor& eta_new, float unscale, float clip,
                           bool precond_old, bool precond_new, bool compute_sums) {
  // Per block: the scalars of the move, and whether θ changes at all.
  const float* eo = eta_old.data_ptr<float>();
  const float* en = eta_new.data_ptr<float>();
  const double wd_old = precond_old ? 0.0 : weight_decay;
  const float wd_new = precond_new ? 0.f : static_cast<float>(weight_decay);
  std::vector<MoveTile> ms(L.nblocks);
  std::vector<char> changed(L.nblocks);
  bool any_work = compute_sums;
  for (int64_t b = 0; b < L.nblocks; ++b) {
    // 1 - e_old*wd_old in double, then rounded: as the torch twin divides by a Python float
    const float den = static_cast<float>(1.0 - static_cast<double>(eo[b]) * wd_old);
    ms[b] = MoveTile{scalars.data(), unscale, clip, eo[b], den, wd_new, en[b],
                     nullptr, nullptr, nullptr, nullptr, L.tile, nullptr};
    changed[b] = eo[b] != en[b] || precond_old != precond_new;
    any_work = any_work || changed[b];
  }
  if (!any_work) return at::zeros({L.nblocks, 3}, at::kFloat);

  std::vector<double> partial(compute_sums ? L.ntiles * 3 : 0, 0.0);
  const TileKernels* k = active_kernels();
  // a retry of Adam or momentum without sums reads no gradient: do not widen one either
  const bool reads_grad = compute_sums || direction_reads_grad(r, precond_old) ||
                          direction_reads_grad(r, precond_new);
  for_each_tile(L, [&](int64_t t) {
    const int32_t blk = L.tile_block[t];
    // an unchanged block is only read, for its sums, or skipped altogether
    if (!changed[blk] && !compute_sums) return;
    const int64_t o = t * L.tile;
    MoveTile args = ms[blk];
    args.n = B.count(t, L.tile);
    args.p = B.theta(t, o);
    args.g = reads_grad ? B.grad_of(t, o) : nullptr;
    args.g16 = reads_grad ? B.g16_at(o) : nullptr;
    args.model16 = B.model16_at(o);
    args.fp16 = B.fp16();
    args.a = B.a ? B.a + o : nullptr;
    args.b = B.b ? B.b + o : nullptr;
    args.out = compute_sums ? &partial[t * 3] : nullptr;
    k->move(r, precond_old, precond_new, changed[blk] != 0, compute_sums, args);
  });
  if (!compute_sums) return at::zeros({L.nblocks, 3}, at::kFloat);
  return reduce_blocks(partial, L, 3);
}

at::Tensor move_cpu(int64_t rule, const at::Tensor& param, const at::Tensor& grad,
                    at::TensorList states, at::ArrayRef<double> scalars, double weight_decay,
                    const at::Tensor& eta_old, const at::Tensor& eta_new,
                    const at::Tensor& gscale, const at::Tensor& tile_block,
                    const at::Tensor& block_tiles, int64_t tile, bool precond_old,
                    bool precond_new, bool compute_sums,
                    const c10::optional<at::Tensor>& model_param) {
  const char* op = "move";
  const Layout L = check_pass_inputs(op, rule, param, grad, states, scalars, tile_block,
                                     block_tiles, tile, model_param);
  check_eta(op, "eta_old", eta_old, L.nblocks);
  check_eta(op, "eta_new", eta_new, L.nblocks);
  float unscale, clip;
  if (!read_gscale(op, gscale, &unscale, &clip)) return at::zeros({L.nblocks, 3}, at::kFloat);
  return run_move(L, static_cast<int>(rule), buffers(param, grad, states, model_param), scalars,
                  weight_decay, eta_old, eta_new, unscale, clip, precond_old, precond_new,
                  compute_sums);
}

// ---------------------------------------------------------------------------------------------
// The same passes over a tile table (python/armijo_fused/storage/table.py): θ and g stay in
// tensors the optimizer does not own (FSDP2 shards) and each tile is found through its pointers.
// The states are flat buffers of the layout's length. The table's tensors are written through raw
// addresses, which the op schemas cannot name: these ops are for eager use.

// Each column of a table (an address or a length per tile) is a contiguous 1-D CPU tensor with
// one entry per tile; every length lies in 0..tile; a tile with elements has non-null, fp32-aligned
// addresses (a wrong address cannot be told from a right one, a null one can: it crashed).
static void check_table_columns(const char* op, const at::Tensor* param_ptrs,
                                const at::Tensor& grad_ptrs, const at::Tensor& lengths,
                                int64_t ntiles, int64_t tile) {
  TORCH_CHECK(tile > 0 && ntiles <= std::numeric_limits<int64_t>::max() / tile, "armijo_fused.",
              op, ": tile must be positive and ", ntiles, " tiles of it countable, got ", tile);
  std::vector<std::tuple<const at::Tensor*, const char*, at::ScalarType>> columns{
      {&grad_ptrs, "grad_ptrs", at::kLong}, {&lengths, "lengths", at::kInt}};
  if (param_ptrs) columns.emplace(columns.begin(), param_ptrs, "param_ptrs", at::kLong);
  for (const auto& [t, what, type] : columns) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == type && t->dim() == 1 &&
                    t->is_contiguous() && t->numel() == ntiles,
                "armijo_fused.", op, ": ", what, " must be a contiguous 1-D ", type,
                " CPU tensor with one entry per tile (", ntiles, "), got ", t->scalar_type(),
                " of shape ", t->sizes(), " on ", t->device());
  }
  const int32_t* len = lengths.data_ptr<int32_t>();
  const int64_t* g = grad_ptrs.data_ptr<int64_t>();
  const int64_t* p = param_ptrs ? param_ptrs->data_ptr<int64_t>() : nullptr;
  for (int64_t t = 0; t < ntiles; ++t) {
    TORCH_CHECK(len[t] >= 0 && len[t] <= tile, "armijo_fused.", op, ": lengths[", t, "] is ",
                len[t], ", outside 0..", tile);
    if (len[t] == 0) continue;
    for (const auto& [addr, what] : {std::pair<const int64_t*, const char*>{g, "grad_ptrs"},
                                     {p, "param_ptrs"}}) {
      TORCH_CHECK(!addr || (addr[t] != 0 && addr[t] % alignof(float) == 0), "armijo_fused.", op,
                  ": ", what, "[", t, "] is ", addr ? addr[t] : 0, " for a tile of ", len[t],
                  " elements; expected the address of its first fp32 element");
    }
  }
}

// The kernels write θ and the states through __restrict__ pointers: no tile's θ or g may overlap
// a state buffer, nor its θ its g, and the states may not overlap each other (as check_disjoint
// for flat buffers; a few comparisons per tile, against a pass's 2048 elements per tile). Tiles
// against each other are not compared (that needs a sort per call).
static void check_table_disjoint(const char* op, const at::Tensor& param_ptrs,
                                 const at::Tensor& grad_ptrs, const at::Tensor& lengths,
                                 at::TensorList states) {
  std::vector<std::pair<const char*, const at::Tensor*>> bufs;
  const char* names[] = {"states[0]", "states[1]"};
  for (size_t i = 0; i < states.size() && i < 2; ++i) bufs.emplace_back(names[i], &states[i]);
  check_disjoint(op, bufs);
  const int64_t* p = param_ptrs.data_ptr<int64_t>();
  const int64_t* g = grad_ptrs.data_ptr<int64_t>();
  const int32_t* len = lengths.data_ptr<int32_t>();
  // (unsigned distances: an address near the top of the range must not overflow the check)
  auto overlap = [](uint64_t a, uint64_t na, uint64_t b, uint64_t nb) {
    return na > 0 && nb > 0 && (a >= b ? a - b < nb : b - a < na);
  };
  for (int64_t t = 0; t < lengths.numel(); ++t) {
    const uint64_t n = uint64_t(len[t]) * sizeof(float);
    const auto pt = static_cast<uint64_t>(p[t]), gt = static_cast<uint64_t>(g[t]);
    TORCH_CHECK(!overlap(pt, n, gt, n), "armijo_fused.", op, ": tile ", t,
                "'s param and grad share memory; each must be a separate tensor");
    for (const auto& [what, st] : bufs) {
      const auto a = reinterpret_cast<uint64_t>(st->data_ptr());
      for (const auto& [addr, name] : {std::pair<uint64_t, const char*>{pt, "param"}, {gt, "grad"}}) {
        TORCH_CHECK(!overlap(addr, n, a, st->nbytes()), "armijo_fused.", op, ": tile ", t, "'s ",
                    name, " shares memory with ", what, "; each buffer must be a separate tensor");
      }
    }
  }
}

static Bufs table_inputs(const char* op, int64_t rule, const at::Tensor& param_ptrs,
                         const at::Tensor& grad_ptrs, const at::Tensor& lengths,
                         at::TensorList states, at::ArrayRef<double> scalars,
                         const at::Tensor& tile_block, const at::Tensor& block_tiles,
                         int64_t tile, Layout* L) {
  check_rule(op, rule);
  check_scalars(op, scalars);
  const int64_t ntiles = tile_block.numel();
  check_table_columns(op, &param_ptrs, grad_ptrs, lengths, ntiles, tile);
  *L = check_layout(op, tile_block, block_tiles, tile, ntiles * tile);
  check_states(op, rule, states, ntiles * tile);
  check_table_disjoint(op, param_ptrs, grad_ptrs, lengths, states);
  Bufs B{nullptr,
         states.size() > 0 ? states[0].data_ptr<float>() : nullptr,
         states.size() > 1 ? states[1].data_ptr<float>() : nullptr,
         nullptr, at::kFloat, nullptr, at::kFloat};
  B.p_table = param_ptrs.data_ptr<int64_t>();
  B.g_table = grad_ptrs.data_ptr<int64_t>();
  B.lengths = lengths.data_ptr<int32_t>();
  return B;
}

at::Tensor first_pass_table_cpu(int64_t rule, const at::Tensor& param_ptrs,
                                const at::Tensor& grad_ptrs, const at::Tensor& lengths,
                                at::TensorList states, at::ArrayRef<double> scalars,
                                double weight_decay, const at::Tensor& eta,
                                const at::Tensor& gscale, const at::Tensor& tile_block,
                                const at::Tensor& block_tiles, int64_t tile, bool precond) {
  const char* op = "first_pass_table";
  Layout L;
  const Bufs B = table_inputs(op, rule, param_ptrs, grad_ptrs, lengths, states, scalars,
                              tile_block, block_tiles, tile, &L);
  check_eta(op, "eta", eta, L.nblocks);
  float unscale, clip;
  if (!read_gscale(op, gscale, &unscale, &clip)) return at::zeros({L.nblocks, 3}, at::kFloat);
  return run_first(L, static_cast<int>(rule), B, scalars, weight_decay, eta, unscale, clip,
                   precond);
}

at::Tensor move_table_cpu(int64_t rule, const at::Tensor& param_ptrs, const at::Tensor& grad_ptrs,
                          const at::Tensor& lengths, at::TensorList states,
                          at::ArrayRef<double> scalars, double weight_decay,
                          const at::Tensor& eta_old, const at::Tensor& eta_new,
                          const at::Tensor& gscale, const at::Tensor& tile_block,
                          const at::Tensor& block_tiles, int64_t tile, bool precond_old,
                          bool precond_new, bool compute_sums) {
  const char* op = "move_table";
  Layout L;
  const Bufs B = table_inputs(op, rule, param_ptrs, grad_ptrs, lengths, states, scalars,
                              tile_block, block_tiles, tile, &L);
  check_eta(op, "eta_old", eta_old, L.nblocks);
  check_eta(op, "eta_new", eta_new, L.nblocks);
  float unscale, clip;
  if (!read_gscale(op, gscale, &unscale, &clip)) return at::zeros({L.nblocks, 3}, at::kFloat);
  return run_move(L, static_cast<int>(rule), B, scalars, weight_decay, eta_old, eta_new,
                  unscale, clip, precond_old, precond_new, compute_sums);
}

at::Tensor grad_sq_norm_cpu(const at::Tensor& grad, const at::Tensor& tile_block,
                            const at::Tensor& block_tiles, int64_t tile) {
  const char* op = "grad_sq_norm";
  check_grad_buffer(op, grad, -1);
  const Layout L = check_layout(op, tile_block, block_tiles, tile, grad.numel());
  const Bufs B{nullptr, nullptr, nullptr, grad.data_ptr(), grad.scalar_type(), nullptr, at::kFloat};
  std::vector<double> partial(L.ntiles, 0.0);
  const TileKernels* k = active_kernels();
  for_each_tile(L, [&](int64_t t) { partial[t] = k->sq(B.grad_tile(t * L.tile, L.tile), L.tile); });
  return reduce_blocks(partial, L, 1);
}

// grad_sq_norm over a tile table: each tile's real elements, read through its g address.
at::Tensor grad_sq_norm_table_cpu(const at::Tensor& grad_ptrs, const at::Tensor& lengths,
                                  const at::Tensor& tile_block, const at::Tensor& block_tiles,
                                  int64_t tile) {
  const char* op = "grad_sq_norm_table";
  const int64_t ntiles = tile_block.numel();
  check_table_columns(op, nullptr, grad_ptrs, lengths, ntiles, tile);
  const Layout L = check_layout(op, tile_block, block_tiles, tile, ntiles * tile);
  const int64_t* g = grad_ptrs.data_ptr<int64_t>();
  const int32_t* len = lengths.data_ptr<int32_t>();
  std::vector<double> partial(L.ntiles, 0.0);
  const TileKernels* k = active_kernels();
  for_each_tile(L, [&](int64_t t) {
    partial[t] = k->sq(reinterpret_cast<const float*>(g[t]), len[t]);
  });
  return reduce_blocks(partial, L, 1);
}

// The batched candidates' trial points: [K, n] rows θ0 − etas[k]·d, from one read of θ, g and
// the state (none written). No per-block sums, so no layout beyond the tile size.
at::Tensor trial_points_cpu(int64_t rule, const at::Tensor& param, const at::Tensor& grad,
                            at::TensorList states, at::ArrayRef<double> scalars,
                            double weight_decay, const at::Tensor& etas,
                            const at::Tensor& gscale, int64_t tile, bool precond) {
  const char* op = "trial_points";
  check_rule_buffers(op, rule, param, grad, states, scalars);
  const int64_t n = param.numel();
  TORCH_CHECK(tile > 0, "armijo_fused.", op, ": tile must be positive, got ", tile);
  TORCH_CHECK(etas.device().is_cpu() && etas.scalar_type() == at::kFloat && etas.dim() == 1 &&
                  etas.is_contiguous() && etas.numel() >= 1,
              "armijo_fused.", op,
              ": etas must be a contiguous 1-D float32 CPU tensor of at least one step size, "
              "got ", etas.scalar_type(), " of shape ", etas.sizes(), " on ", etas.device());
  float unscale, clip;
  // (not finite: the rows are what the torch twin computes with it, inf or NaN where d reads g;
  // the search reads its guard with the first losses and takes none of them)
  read_gscale(op, gscale, &unscale, &clip);
  const int64_t K = etas.numel();
  at::Tensor out = at::empty({K, n}, param.options());
  const Bufs B = buffers(param, grad, states, c10::nullopt);
  const Layout L{nullptr, nullptr, n == 0 ? 0 : (n - 1) / tile + 1, 0, tile};  // (no overflow)
  const float* e = etas.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float wd = precond ? 0.f : static_cast<float>(weight_decay);
  const TileKernels* k = active_kernels();
  for_each_tile(L, [&](int64_t t) {
    const int64_t start = t * tile;
    TrialTile args{scalars.data(), unscale, clip, wd, B.p + start, B.grad_of(t, start),
                   B.a ? B.a + start : nullptr, B.b ? B.b + start : nullptr,
                   std::min(tile, n - start), e, K, o + start, n};
    args.g16 = B.g16_at(start);
    args.fp16 = B.fp16();
    k->trial(static_cast<int>(rule), precond, args);
  });
  return out;
}

const char* cpu_simd() { return active_kernels()->isa; }

const char* set_cpu_simd(const std::string& name) {
  active_kernels() = choose_kernels(name);
  return active_kernels()->isa;
}

}  // namespace armijo_fused

TORCH_LIBRARY_IMPL(armijo_fused, CPU, m) {
  m.impl("first_pass", &armijo_fused::first_pass_cpu);
  m.impl("move", &armijo_fused::move_cpu);
  m.impl("grad_sq_norm", &armijo_fused::grad_sq_norm_cpu);
  m.impl("first_pass_table", &armijo_fused::first_pass_table_cpu);
  m.impl("move_table", &armijo_fused::move_table_cpu);
  m.impl("grad_sq_norm_table", &armijo_fused::grad_sq_norm_table_cpu);
  m.impl("trial_points", &armijo_fused::trial_points_cpu);
}
