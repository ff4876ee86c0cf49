// The tile kernels built for AVX2 with F16C (armijo_fused::avx2::tile_kernels()), chosen at run
// time on CPUs that have both (F16C converts fp16). The rest of the extension keeps the portable
// -march=x86-64-v2 flags: only the code below this pragma is compiled for AVX2, and it lives in
// its own namespace, so no AVX2 instruction can reach a CPU without AVX2. (No FMA: the lanes must
// round like the baseline's.)
#include "cpu/tile_args.h"

#if ARMIJO_HAVE_AVX2
// Headers with inline code go before the pragma, so they stay baseline code: every standard
// header kernels.h, simd.h and passes.h include. GCC 13's <string> marks ~allocator()
// always_inline; included under the pragma it was AVX2 code that baseline code then had to
// inline ("inlining failed ... target specific option mismatch": the H200 machines' g++ 13
// could not build the extension; GCC 12 let it pass).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#endif

#define ARMIJO_ISA avx2
#define ARMIJO_SIMD_AVX2 1
#include "cpu/kernels.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // ARMIJO_HAVE_AVX2
