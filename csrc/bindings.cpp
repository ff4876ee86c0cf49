// The Python module armijo_fused._C. Importing it loads this library, whose static initialisers
// register the ops torch.ops.armijo_fused.* (first_pass, move, grad_sq_norm, trial_points and the
// tile-table twins; schemas in csrc/ops.cpp, CPU kernels in csrc/cpu/passes.cpp);
// python/armijo_fused/ops.py calls them through torch.ops so that torch.compile sees them. The module itself reports how the kernels
// were built and picks the CPU SIMD level (cpu_simd, set_cpu_simd, rule_names, with_cuda), and
// binds ViewCheck (view_check.cpp).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ops.h"
#include "passes.h"

namespace armijo_fused {
void bind_view_check(pybind11::module& m);  // view_check.cpp
}

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "armijo_fused C++ kernels; the ops live in torch.ops.armijo_fused";
  m.def("cpu_simd", &armijo_fused::cpu_simd,
        "The instruction set the CPU kernels run with: avx2, sse2, neon or scalar");
  m.def("set_cpu_simd", &armijo_fused::set_cpu_simd, pybind11::arg("name"),
        "Choose the CPU kernels: 'auto', 'baseline' or 'avx2'; returns the one in use. Results "
        "are bitwise the same with each; for tests and benchmarks.");
  m.def(
      "rule_names",
      []() {
        pybind11::list names;
        for (int r = 0; r < armijo_fused::kNumRules; ++r) names.append(armijo_fused::rule_name(r));
        return names;
      },
      "Rule names by rule id, as the kernels number them");
  armijo_fused::bind_view_check(m);
#ifdef ARMIJO_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
