// The tile kernels for the baseline instruction set of the build (SSE2 on x86-64, NEON on
// aarch64, scalar elsewhere): armijo_fused::base::tile_kernels().
#include "cpu/kernels.h"
