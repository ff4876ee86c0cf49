#!/usr/bin/env bash
# Configure and build the C++ test against the installed torch, then run it with ctest.
# Exits non-zero if configuring, building or any test fails. Build tree: build/ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
BUILD=build/ctest
TORCH_DIR="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')/Torch"
GEN=()
if command -v ninja >/dev/null 2>&1; then
  GEN=(-G Ninja)
fi
if [[ -f "$BUILD/CMakeCache.txt" ]] && ! grep -q "CMAKE_GENERATOR:INTERNAL=${GEN[1]:-Unix Makefiles}$" "$BUILD/CMakeCache.txt"; then
  rm -rf "$BUILD"  # generator changed: start clean
fi
# A CUDA build of torch makes find_package(Torch) look for the CUDA toolkit, even for these
# CPU-only tests; CMake (and torch's CUDA_HOME) guess its root from nvcc's path, which fails
# where nvcc is not inside the toolkit (a wrapper in /usr/local/bin). Give the first candidate
# that has the runtime's header.
CUDA_ARGS=()
if [[ "$("$PY" -c 'import torch; print(torch.version.cuda or "")')" != "" ]]; then
  NVCC=$(command -v nvcc || true)
  for root in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda "${NVCC:+$(dirname "$(dirname "$NVCC")")}"; do
    if [[ -n $root && -f $root/include/cuda_runtime.h ]]; then
      CUDA_ARGS=(-DCUDA_TOOLKIT_ROOT_DIR="$root" -DCUDAToolkit_ROOT="$root")
      break
    fi
  done
fi
cmake -S . -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DTorch_DIR="$TORCH_DIR" "${CUDA_ARGS[@]}"
cmake --build "$BUILD" --target test_passes test_simd_half -j "${JOBS:-2}"
ctest --test-dir "$BUILD" --output-on-failure
