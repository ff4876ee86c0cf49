"""Host time of one optimizer step: the Python, dispatch and launches around the passes.

On a GPU a step's device time at 124M is about a millisecond, so what the host does around the
kernels matters: work before the first launch is exposed whenever the GPU is idle, and after a
search's one read of the trial loss the GPU waits for the host again. This benchmark takes the
device work away: the parameter list has GPT-2 124M's 148 tensors, each of 16 elements, so a
step's wall time is its host time (launches included). For each case it reports

* ``us``: median wall µs of one ``step()`` (device synchronised around each call);
* ``ops``: the torch operations the step dispatches (views and detaches excluded: they launch
  nothing), counted with a ``TorchDispatchMode`` on the step after the timing. The C++ passes
  are torch operations and count; Triton launches (on a GPU: two for the guard, two per pass)
  are not and do not.

Cases: ArmijoAdam with a search (one accepted trial, a precomputed loss), without a search, and
``torch.optim.AdamW`` fused / foreach on the same tensors. Writes
``bench/results/host_overhead_<device>.json`` (device, versions, commit).

Usage: python bench/host_overhead.py [--device cuda|cpu] [--repeats 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import add_out_argument, environment, out_file, positive_int, result_slug, write_result  # noqa: E402
from _timing import interleaved_times  # noqa: E402
from bench_kernels import MODELS, gpt2_blocks  # noqa: E402

from armijo_fused import ArmijoAdam  # noqa: E402

NO_LAUNCH = {"aten.view.default", "aten.detach.default", "aten.select.int",
             "aten.expand.default", "aten.lift_fresh.default", "aten._reshape_alias.default",
             "aten.alias.default", "aten.unsqueeze.default", "aten.squeeze.dim",
             "profiler._record_function_enter_new.default",
             "profiler._record_function_exit._RecordFunction"}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def make_params(n_tensors: int, device) -> list[torch.nn.Parameter]:
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for _ in range(n_tensors):
        p = torch.nn.Parameter(0.02 * torch.randn(16, generator=g, device=device))
        p.grad = 1e-3 * torch.randn(16, generator=g, device=device)
        params.append(p)
    return params


def armijo_case(n, device, *, search: bool):
    # max_step keeps η (and so θ's drift over hundreds of steps on one fixed gradient) small:
    # every timed search is one accepted trial, no non-descent fallback
    opt = ArmijoAdam(make_params(n, device), weight_decay=0.1, max_step=1e-3,
                     cadence="every" if search else 10**9)
    f0 = torch.zeros((), device=device)
    far_below = torch.full((), -1e30, device=device)  # any η passes the Armijo test
    # (nor the check of the trial function at θ0 against the loss handed over: the stand-in
    # trial loss differs from it by design)
    warnings.filterwarnings("ignore", message=".*at θ0 gives")

    def step():
        opt.step(loss_fn=lambda: far_below, loss=f0)

    step()  # the first step always searches; it also builds the flat buffers
    return step, opt


def adamw_case(n, device, impl: str):
    opt = torch.optim.AdamW(make_params(n, device), lr=1e-3, weight_decay=0.1, **{impl: True})
    return opt.step, opt


def count_ops(step) -> tuple[int, dict]:
    with CountOps() as mode:
        step()
    launched = {k: v for k, v in mode.ops.items() if k not in NO_LAUNCH}
    return sum(launched.values()), dict(sorted(launched.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device")
    ap.add_argument("--repeats", type=positive_int, default=300,
                    help="timed calls of each step (after 20 untimed)")
    add_out_argument(ap, one_json=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("host_overhead.py --device cuda needs CUDA; nothing measured")
        return 0
    n = sum(len(block) for block in gpt2_blocks(*MODELS["gpt2-124m"]))
    built = {
        "armijo_search": armijo_case(n, device, search=True),
        "armijo_plain": armijo_case(n, device, search=False),
        "adamw_fused": adamw_case(n, device, "fused"),
        "adamw_foreach": adamw_case(n, device, "foreach"),
    }
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    times = interleaved_times({k: b[0] for k, b in built.items()}, args.repeats, warmup=20,
                              sync=sync)
    rows = {}
    for key, (step, _) in built.items():
        ops, detail = count_ops(step)
        rows[key] = {"us": 1e3 * statistics.median(times[key]), "ops": ops, "op_counts": detail}
        if key.startswith("armijo"):
            st = built[key][1].stats
            rows[key].update(searched=bool(st["searched"]), trials=int(st["trials"]),
                             non_descent=bool(st["non_descent"]))
        print(f"{key:16s} {rows[key]['us']:8.1f} us  {ops:3d} ops", flush=True)
    result = {"environment": environment(device), "tensors": n, "numel_each": 16,
              "repeats": args.repeats, "rows": rows}
    out = out_file(args.out, f"host_overhead_{result_slug(device)}.json")
    write_result(out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
