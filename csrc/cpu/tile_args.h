// What the per-ISA tile kernels (csrc/cpu/kernels.h) take and export: plain structs and function
// pointers, shared by every translation unit, with no inline code (so nothing compiled for one
// instruction set can leak into another).
#pragma once

#include <cstdint>

// The AVX2 kernels are built (with a target pragma, not a global flag) on x86-64 with GCC/Clang
// and chosen at run time when the CPU has AVX2.
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define ARMIJO_HAVE_AVX2 1
#else
#define ARMIJO_HAVE_AVX2 0
#endif

namespace armijo_fused {

// One tile of the first pass: n elements from p, g, a, b; the three sums go to out[0..2].
// A half-precision gradient comes as its raw bits in g16 (g unused); a half model with p as its
// fp32 master comes as model16: a weight written into it since the last step replaces the
// master's, and the new θ is written into it, rounded. Both are bf16, or fp16 when fp16.
// precond: the trial goes along the fallback line (passes.h, first_step), the sums stay d's.
struct FirstTile {
  const double* scalars;  // the rule's 5 host scalars
  float unscale, clip, wd, eta;
  float* p;
  const float* g;
  float* a;  // first state buffer, or nullptr
  float* b;  // second state buffer, or nullptr
  int64_t n;
  double* out;
  const uint16_t* g16 = nullptr;
  uint16_t* model16 = nullptr;
  bool fp16 = false;
  bool precond = false;
};

// One tile of a move; den_old = 1 - e_old * wd_old rounded to fp32, wd_new 0 for a fallback.
struct MoveTile {
  const double* scalars;
  float unscale, clip, e_old, den_old, wd_new, e_new;
  float* p;
  const float* g;
  const float* a;
  const float* b;
  int64_t n;
  double* out;  // written only when sums
  const uint16_t* g16 = nullptr;  // as in FirstTile
  uint16_t* model16 = nullptr;    // written where θ is
  bool fp16 = false;
};

// One tile of the batched candidates' trial points: out[k * stride + i] = θ0[i] − etas[k]·d[i]
// for k < K, θ and the state only read (θ sits at θ0). precond: d is the fallback direction,
// which carries no weight decay.
struct TrialTile {
  const double* scalars;
  float unscale, clip, wd;
  const float* p;
  const float* g;
  const float* a;
  const float* b;
  int64_t n;
  const float* etas;  // K step sizes
  int64_t k;
  float* out;         // the tile's first element of row 0
  int64_t stride;     // elements from one row to the next
  const uint16_t* g16 = nullptr;  // as in FirstTile
  bool fp16 = false;
};

struct TileKernels {
  const char* isa;
  void (*first)(int rule, const FirstTile& t);
  void (*move)(int rule, bool precond_old, bool precond_new, bool write, bool sums,
               const MoveTile& t);
  double (*sq)(const float* g, int64_t n);  // Σ g² of one tile
  void (*trial)(int rule, bool precond, const TrialTile& t);
};

}  // namespace armijo_fused
