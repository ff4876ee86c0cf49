// Per-element math of the six direction rules, shared by every C++ kernel.
//
// Plain C++ (no torch headers): each function is a template over the value type V, which is
// `float` for scalar code or a SIMD vector with +, -, *, / and vsqrt (csrc/cpu/simd.h). The
// operations and their order follow the torch reference twins in
// python/armijo_fused/directions/*.py, so the C++ passes agree with backend="torch" to fp32
// rounding (torch may fuse a multiply-add where we round twice).
//
// Notation (docs/design.md §2): g_in the (clipped) gradient the state absorbs, a and b the rule's
// first and second state buffers, u the direction without weight decay, s[0..4] the rule's five
// host scalars:
//
//   sgd       u = g
//   momentum  a <- s0 a + g                   u = a
//   nesterov  a <- s0 a + g                   u = g + s0 a
//   rmsprop   a <- s0 a + (1-s0) g^2          u = g / (sqrt(a) + s1)
//   adam      a <- s0 a + (1-s0) g            u = (a s2) / (sqrt(b s3) + s4)
//             b <- s1 b + (1-s1) g^2
//   nadam     a, b as adam                    u = ((s0 a + (1-s0) g) s2) / (sqrt(b s3) + s4)
//
// with s2 = 1/(1-beta1^k), s3 = 1/(1-beta2^k) for adam/nadam. The fallback direction
// precond_grad is g for the SGD family, the rmsprop direction itself for rmsprop and
// g / (sqrt(b s3) + s4) for adam/nadam.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__GNUC__)
#define ARMIJO_INLINE inline __attribute__((always_inline))
#else
#define ARMIJO_INLINE inline
#endif

// Each instruction set's kernels are compiled in their own translation unit (csrc/cpu/
// kernels_*.cpp) inside a namespace named for it, so that no inline function is ever shared
// between code built for different instruction sets (the ATen CPU_CAPABILITY scheme).
#ifndef ARMIJO_ISA
#define ARMIJO_ISA base
#endif

namespace armijo_fused {
inline namespace ARMIJO_ISA {

// Rule ids: the `rule_id` of each Python DirectionRule; never reorder.
enum RuleId : int { kSGD = 0, kMomentum = 1, kNesterov = 2, kRMSProp = 3, kAdam = 4, kNAdam = 5 };
constexpr int kNumRules = 6;
constexpr int kNumScalars = 5;

// One case per rule, no order assumed: a rule added without its case has -1 (refused by the ops'
// state check) rather than the count of its neighbours.
constexpr int num_states(int rule) {
  switch (rule) {
    case kSGD: return 0;
    case kMomentum: case kNesterov: case kRMSProp: return 1;
    case kAdam: case kNAdam: return 2;
    default: return -1;
  }
}

inline const char* rule_name(int rule) {
  static const char* names[kNumRules] = {"sgd", "momentum", "nesterov", "rmsprop", "adam", "nadam"};
  return (rule >= 0 && rule < kNumRules) ? names[rule] : "unknown";
}

// Whether computing u (or the fallback direction, when `precond`) needs the gradient: when it
// does not, a retry pass without sums never reads the gradient buffer.
// (Named by the rules that need not: a rule added later reads it, which is only slower.)
constexpr bool direction_reads_grad(int rule, bool precond) {
  return precond || !(rule == kMomentum || rule == kAdam);
}

ARMIJO_INLINE float vsqrt(float x) { return std::sqrt(x); }

// The host scalars in the precision the kernels use. 1 - s0 and 1 - s1 are formed in double and
// then rounded, as torch does with `value=1.0 - beta` on an fp32 tensor.
template <typename V>
struct Coeffs {
  V s0, s1, s2, s3, s4, c0, c1;
  explicit Coeffs(const double* s)
      : s0(static_cast<float>(s[0])),
        s1(static_cast<float>(s[1])),
        s2(static_cast<float>(s[2])),
        s3(static_cast<float>(s[3])),
        s4(static_cast<float>(s[4])),
        c0(static_cast<float>(1.0 - s[0])),
        c1(static_cast<float>(1.0 - s[1])) {}
};

// Fold the gradient into the state, in place.
template <int R, typename V>
ARMIJO_INLINE void absorb(const Coeffs<V>& k, V g, V& a, V& b) {
  if constexpr (R == kSGD) {
    // no state
  } else if constexpr (R == kMomentum || R == kNesterov) {
    a = a * k.s0 + g;
  } else if constexpr (R == kRMSProp) {
    a = a * k.s0 + k.c0 * g * g;
  } else {
    // (each chain ends on its last rule's check: a new id fails to compile, not runs as another)
    static_assert(R == kAdam || R == kNAdam, "absorb(): no branch for this rule id");
    a = a * k.s0 + k.c0 * g;
    b = b * k.s1 + k.c1 * g * g;
  }
  (void)a;
  (void)b;
  (void)g;
}

// u: the rule's direction from the (already updated) state, without weight decay.
template <int R, typename V>
ARMIJO_INLINE V direction(const Coeffs<V>& k, V g, V a, V b) {
  if constexpr (R == kSGD) {
    return g;
  } else if constexpr (R == kMomentum) {
    return a;
  } else if constexpr (R == kNesterov) {
    return g + k.s0 * a;
  } else if constexpr (R == kRMSProp) {
    return g / (vsqrt(a) + k.s1);
  } else if constexpr (R == kAdam) {
    return (a * k.s2) / (vsqrt(b * k.s3) + k.s4);
  } else {
    static_assert(R == kNAdam, "direction(): no branch for this rule id");
    return ((k.s0 * a + k.c0 * g) * k.s2) / (vsqrt(b * k.s3) + k.s4);
  }
}

// The fallback descent direction: the gradient under the rule's preconditioner.
template <int R, typename V>
ARMIJO_INLINE V precond_grad(const Coeffs<V>& k, V g, V a, V b) {
  if constexpr (R == kRMSProp) {
    return direction<R>(k, g, a, b);
  } else if constexpr (R == kAdam || R == kNAdam) {
    return g / (vsqrt(b * k.s3) + k.s4);
  } else {
    static_assert(R == kSGD || R == kMomentum || R == kNesterov,
                  "precond_grad(): no branch for this rule id");
    return g;
  }
}

template <int R, bool PRECOND, typename V>
ARMIJO_INLINE V search_direction(const Coeffs<V>& k, V g, V a, V b) {
  if constexpr (PRECOND) {
    return precond_grad<R>(k, g, a, b);
  } else {
    return direction<R>(k, g, a, b);
  }
}

// First pass, one element (or one vector of elements):
//   g = grad*unscale; g_in = g*clip; state <- absorb(g_in); d = u + wd*θ; θ <- θ - eta*d,
// or with PRECOND the first trial on the fallback line: θ <- θ - eta*precond_grad (no wd; a
// search along g whose step applies d: SGD with momentum). Returns g (unclipped) and d for the
// reductions, d being the rule's direction either way.
template <int R, bool PRECOND, typename V>
ARMIJO_INLINE void first_step(const Coeffs<V>& k, V unscale, V clip, V wd, V eta, V& theta,
                              V grad, V& a, V& b, V& g, V& d) {
  g = grad * unscale;
  V g_in = g * clip;
  absorb<R>(k, g_in, a, b);
  d = direction<R>(k, g_in, a, b) + wd * theta;
  if constexpr (PRECOND) {
    theta = theta - eta * precond_grad<R>(k, g_in, a, b);
  } else {
    theta = theta - eta * d;
  }
}

// Move, one element: θ sits at θ0 - e_old*d_old; recover θ0 = (θ + e_old*u_old) / den_old with
// den_old = 1 - e_old*wd_old, then d_new = u_new + wd_new*θ0 and θ_new = θ0 - e_new*d_new.
// (wd is 0 for a fallback direction; den_old is formed in double on the host.)
template <int R, bool PO, bool PN, typename V>
ARMIJO_INLINE void move_step(const Coeffs<V>& k, V g_in, V a, V b, V e_old, V den_old,
                             V wd_new, V e_new, V& theta, V& d_new) {
  V u_old = search_direction<R, PO>(k, g_in, a, b);
  V theta0 = (theta + e_old * u_old) / den_old;
  V u_new;
  if constexpr (PO == PN) {
    u_new = u_old;  // same direction: computed once
  } else {
    u_new = search_direction<R, PN>(k, g_in, a, b);
  }
  d_new = u_new + wd_new * theta0;
  theta = theta0 - e_new * d_new;
}

}  // namespace ARMIJO_ISA
}  // namespace armijo_fused
