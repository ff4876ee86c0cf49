"""Where a step's host time goes, on a CPU, for the GPU's code path: the Triton backend with its
kernels replaced by no-ops.

On a GPU the whole step with one accepted trial is mostly host time: the H200 machine measured
2.36 ms for a step whose device work is about 1.0 ms (first pass 0.86 ms, guard 0.12 ms), and its
host runs this Python about five times slower than the 2-core CI machine (cProfile's per-call
times: ``data_ptr`` 0.36 against 0.07 µs). What the device waits for is the host work before the
first pass is queued and after the search's one read; the work between them (the trial forward's
launches) overlaps the pass. This script measures those phases without a GPU:
``TRITON_INTERPRET=1`` lets the Triton wrappers take CPU tensors, and every kernel is replaced by a
launch that does nothing (the block sums write ones, so the search sees a descent direction and
accepts its first trial). What is left is exactly the Python of the step on the Triton path:
checks, allocations, grids, the controller, the bookkeeping. Triton's own launch (~15 µs each on
the H200) and the CUDA ops' dispatch are not in it.

The parameter list is GPT-2 124M's 148 tensors, 16 elements each (as bench/host_overhead.py).
Phases, median µs of ``--repeats`` steps each:

* ``to_passes``: from ``step()`` to the passes' set-up (validation, the store's per-step check);
* ``to_first``: from ``step()`` to the first pass's call (the guard included);
* ``first``: the first pass's call (its wrapper);
* ``window``: from the first pass's return to the search's read (the trial's loss function);
* ``read``: the read (no device here, so no wait);
* ``after_read``: from the read to the end of ``step()`` (the bookkeeping);
* ``exposed``: to_first + first + after_read, what a GPU waits for; ``total``.

A/B: ``--against DIR`` runs the same measurement, in turn, with another checkout's package first on
``sys.path`` (``DIR`` is its ``python/`` folder; copy this checkout's ``_C*.so`` into its
``armijo_fused/`` when it has none, else it runs without the C++ view check), ``--rounds`` times
each, and reports the lower median of each (this shared CPU moves ~10% between runs). Writes
``bench/results/host_phases_cpu.json`` (device, versions, commit).

Usage: python bench/host_phases.py [--mode search|plain] [--repeats 2000] [--against DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

PHASES = ("to_passes", "to_first", "first", "window", "read", "after_read", "exposed", "total")


def measure(mode: str, repeats: int) -> dict:
    """The phases' medians (µs) in this process; imports the package from ``sys.path``."""
    os.environ["TRITON_INTERPRET"] = "1"  # (before triton is imported: CPU tensors allowed)
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from host_overhead import make_params

    import armijo_fused
    import armijo_fused.backends.triton_backend as tb
    import armijo_fused.linesearch.controller as controller
    import armijo_fused.optimizers.passes as passes

    class NoKernel:
        """``kernel[grid](*args)`` that runs nothing; ``ones``: the argument it fills with ones
        (the block sums' output: the search then sees ⟨g, d⟩ > 0 and accepts)."""

        def __init__(self, ones=None):
            self.ones = ones

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if self.ones is not None:
                    args[self.ones].fill_(1.0)
            return launch

    for name in ("first_pass_kernel", "move_kernel", "tile_sq_sum_kernel",
                 "table_tile_sq_sum_kernel", "trial_points_kernel"):
        setattr(tb, name, NoKernel())
    tb.block_sum_kernel = NoKernel(ones=2)

    marks: dict = {}

    def timed(owner, attr, key):
        inner = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            marks.setdefault(key + "_in", time.perf_counter())
            out = inner(*args, **kwargs)
            marks[key + "_out"] = time.perf_counter()
            return out
        setattr(owner, attr, wrapper)

    timed(passes.FlatPasses, "__init__", "passes")
    timed(passes.FlatPasses, "first", "first")
    timed(controller, "read_floats", "read")
    search = mode == "search"
    opt = armijo_fused.ArmijoAdam(make_params(148, "cpu"), weight_decay=0.1, max_step=1e-3,
                                  backend="triton", cadence="every" if search else 10**9)
    f0, far_below = torch.zeros(()), torch.full((), -1e30)
    # (nor the check of the trial function at θ0 against the loss handed over: the stand-in
    # trial loss differs from it by design)
    warnings.filterwarnings("ignore", message=".*at θ0 gives")
    rows = []
    for i in range(repeats + 100):
        marks.clear()
        t0 = time.perf_counter()
        opt.step(loss_fn=lambda: far_below, loss=f0)
        t1 = time.perf_counter()
        if i < 100:  # warm-up (the first step builds the store)
            continue
        row = {"to_passes": marks["passes_in"] - t0, "to_first": marks["first_in"] - t0,
               "first": marks["first_out"] - marks["first_in"], "total": t1 - t0}
        if search:
            row.update(window=marks["read_in"] - marks["first_out"],
                       read=marks["read_out"] - marks["read_in"],
                       after_read=t1 - marks["read_out"])
            row["exposed"] = row["to_first"] + row["first"] + row["after_read"]
        else:  # no read: everything after the first pass overlaps it
            row["exposed"] = row["to_first"] + row["first"]
        rows.append(row)
    stats = opt.stats
    if search and not (stats["searched"] and stats["trials"] == 1):
        raise RuntimeError(f"the timed steps were not searches with one trial: {stats}")
    return {"package": str(Path(armijo_fused.__file__).parent), "mode": mode,
            "us": {k: 1e6 * statistics.median(r[k] for r in rows) for k in PHASES
                   if k in rows[0]}}


def _child(path: str | None, mode: str, repeats: int) -> dict:
    from _env import run_child  # (bench/ is on the path: main puts it there)

    return run_child(__file__, ["--child", "--mode", mode, "--repeats", str(repeats)], path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--mode", choices=("search", "plain", "both"), default="both",
                    help="a step with a search (one accepted trial), without one, or both")
    ap.add_argument("--repeats", type=int, default=2000, help="timed steps per run")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each checkout, in turn")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _env import add_ab_arguments, add_out_argument, environment, git_commit, out_file, write_result

    add_ab_arguments(ap)
    add_out_argument(ap, one_json=True)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.rounds < 1:
        ap.error("--repeats and --rounds must be at least 1")
    if args.child:
        print(json.dumps(measure(args.mode, args.repeats)))
        return 0
    import torch

    modes = ("search", "plain") if args.mode == "both" else (args.mode,)
    variants = {"this": None} if args.against is None else {"against": args.against,
                                                            "this": None}
    runs = {v: {m: [] for m in modes} for v in variants}
    for _ in range(args.rounds):
        for mode in modes:
            for name, path in variants.items():
                runs[name][mode].append(_child(path, mode, args.repeats))
    result = {"environment": environment(torch.device("cpu")), "tensors": 148,
              "numel_each": 16, "repeats": args.repeats, "rounds": args.rounds, "variants": {}}
    for name, by_mode in runs.items():
        package = by_mode[modes[0]][0]["package"]
        commit = git_commit(package)  # (short, as git shows it; -dirty kept)
        commit = commit if commit == "unknown" else commit[:7] + commit[40:]
        entry = result["variants"][name] = {"package": package, "commit": commit}
        for mode, rs in by_mode.items():
            # the lower median of the rounds, phase by phase (the machine's slow spells removed)
            low = {k: min(r["us"][k] for r in rs) for k in rs[0]["us"]}
            entry[mode] = {"us": low, "rounds_total_us": [r["us"]["total"] for r in rs]}
            shown = " ".join(f"{k}={v:.0f}" for k, v in low.items())
            print(f"{name:8s} {mode:6s} {shown}  (µs)", flush=True)
    write_result(out_file(args.out, "host_phases_cpu.json"), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
