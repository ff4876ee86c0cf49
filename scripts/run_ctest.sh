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
cmake -S . -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DTorch_DIR="$TORCH_DIR"
cmake --build "$BUILD" --target test_passes test_simd_half -j "${JOBS:-2}"
ctest --test-dir "$BUILD" --output-on-failure
