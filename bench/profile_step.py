"""Where a step's time goes on a GPU: a diagnostic for the step benchmarks, not a measurement.

Prints, for GPT-2 124M's parameter list (``optimizer_step.py``'s cases):

* ``host``: cProfile of ArmijoAdam's plain and search steps (the functions with the most own
  time), so the host work around the passes can be placed;
* ``launch``: host µs of one launch of a pass through its wrapper, on a one-tile layout (the
  fixed cost each launch adds to a step);
* ``sums``: device ms of the block sums after a pass at 124M by tiles summed per iteration and
  warps (one program per block adds its tiles in order: the largest block's loop is a latency
  chain), beside the guard's per-tile pass;
* ``spy``: where a search step's and a plain step's wall time goes, sampled by py-spy (when it
  is on the PATH: scripts/fetch_gpu_wheels.sh carries it) from a process that loops over the
  step: inclusive share of each function, the store's one-time build left out. cProfile's
  per-call overhead inflates small Python functions about 4x; sampling does not;
* ``train`` (``--train``): torch.profiler's tables over 3 whole training steps of the 124M model
  (fused AdamW, every-step search, adaptive; ``--steps`` is the host cases'); the profiler's own
  overhead is in their times.

Writes what it printed to ``bench/results/profile_step_<device>.json`` (device, versions,
commit).

Usage: python bench/profile_step.py [--train] [--steps 200]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import add_out_argument, environment, out_file, result_slug, write_result  # noqa: E402
from optimizer_step import armijo_case, shapes_for  # noqa: E402

REPORT: dict = {}  # section -> its lines, as printed


def section(name):
    print(f"\n===== {name}", flush=True)
    REPORT[name] = []


def say(text: str) -> None:
    print(text, flush=True)
    if REPORT:
        REPORT[next(reversed(REPORT))].extend(text.splitlines())


def host(shapes, device, steps):
    for search in (False, True):
        step, _, _ = armijo_case(shapes, device, search=search, check_finite=True)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(steps):
            step()
            torch.cuda.synchronize()
        prof.disable()
        wall = (time.perf_counter() - t0) / steps * 1e6
        section(f"host: {'search' if search else 'plain'} step, {wall:.0f} us/step (synced)")
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(28)
        say("\n".join(s.getvalue().splitlines()[4:40]))
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumtime").print_stats(30)
        say("\n".join(s.getvalue().splitlines()[4:42]))


def launch(device):
    from armijo_fused.backends import triton_backend as tri
    from armijo_fused.directions.adam import Adam
    from armijo_fused.kernels.reductions import tile_sq_sum_kernel
    from armijo_fused.storage.layout import make_layout

    section("launch: host us per launch (one-tile layout, no sync between launches)")
    layout = make_layout([2048], tile=2048, device=device)
    g = torch.randn(2048, device=device)
    p = torch.randn(2048, device=device)
    st = [torch.zeros(2048, device=device), torch.zeros(2048, device=device)]
    eta = torch.full((1,), 1e-3, device=device)
    gscale = torch.ones(2, device=device)
    partials = torch.empty(1, 1, device=device)
    rule = Adam()
    scalars = rule.scalars({"betas": (0.9, 0.999), "eps": 1e-8}, 1)

    def timed(name, fn, n=400):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        say(f"  {name:44s} {t:8.1f} us")

    timed("tile_sq_sum_kernel[grid](...) bare", lambda: tile_sq_sum_kernel[(1,)](
        g, partials, 2048, BLOCK_SIZE=2048, num_warps=4, enable_fp_fusion=False))
    timed("grad_sq_norm (wrapper: checks, guard, block sums)",
          lambda: tri.grad_sq_norm(g, layout))
    timed("torch.empty(3) on cuda", lambda: torch.empty(3, device=device))
    timed("torch add of two 1-element cuda tensors", lambda: eta + eta)
    timed("first_pass (wrapper: checks, pass, block sums)",
          lambda: tri.first_pass(rule, p, g, st, scalars, 0.1, eta, gscale, layout))


def sums(shapes, device):
    import triton
    from bench_kernels import numel

    from armijo_fused.kernels.reductions import block_sum_kernel, tile_sq_sum_kernel
    from armijo_fused.storage.layout import make_layout

    section("sums: device ms at 124M (median of do_bench)")
    blocks = [numel(s) for s in shapes]
    layout = make_layout(blocks, tile=2048, device=device)
    say(f"  {layout.nblocks} blocks, {layout.ntiles} tiles, largest block "
        f"{-(-max(layout.block_numels) // 2048)} tiles")
    partials3 = torch.randn(layout.ntiles, 3, device=device)
    partials1 = torch.randn(layout.ntiles, 1, device=device)
    g = torch.randn(layout.numel, device=device)

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    say(f"  guard tile pass (read g once)        {bench(lambda: tile_sq_sum_kernel[(layout.ntiles,)](g, partials1, layout.numel, BLOCK_SIZE=2048, num_warps=4, enable_fp_fusion=False)):.4f}")  # noqa: E501
    for cols, partials in ((3, partials3), (1, partials1)):
        for per_iter in (128, 512, 1024, 2048, 4096):
            for warps in (4, 8, 16):
                out = torch.empty(layout.nblocks, cols, device=device)
                try:
                    ms = bench(lambda: block_sum_kernel[(layout.nblocks,)](
                        partials, layout.block_tiles, out, NCOLS=cols, TILES_PER_ITER=per_iter,
                        num_warps=warps, enable_fp_fusion=False))
                except Exception as e:
                    say(f"  block sums NCOLS={cols} per_iter={per_iter} warps={warps}: "
                        f"{type(e).__name__}: {e}")
                    continue
                ref = torch.stack([partials[a:b].double().sum(0) for a, b in
                                   zip(layout.block_tiles[:-1].tolist(),
                                       layout.block_tiles[1:].tolist())]).float()
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                say(f"  block sums NCOLS={cols} per_iter={per_iter:5d} warps={warps:2d}  "
                    f"{ms:.4f} ms  rel err {err:.1e}")


def train(device, steps):
    from armijo_fused import ArmijoAdam
    from armijo_fused.data import BatchSampler, load_shakespeare
    from armijo_fused.demo import closure_step, plain_step
    from armijo_fused.models import TransformerLM, gpt2_small_like

    torch.backends.cuda.matmul.allow_tf32 = True
    data = load_shakespeare()
    torch.manual_seed(0)
    base = TransformerLM(gpt2_small_like(context=1024)).to(device)
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    import copy

    for name in ("AdamW fused", "ArmijoAdam every", "ArmijoAdam adaptive"):
        model = copy.deepcopy(base)
        if name == "AdamW fused":
            opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95),
                                    weight_decay=0.1, fused=True)
            step = plain_step(opt, model, autocast)
        else:
            kw = dict(cadence="every") if name.endswith("every") else {}
            opt = ArmijoAdam(model.parameters(), weight_decay=0.1, model=model, **kw)
            step = closure_step(opt, model, autocast)
        sampler = BatchSampler(data.train, 8, 1024, seed=0, device=device)
        for _ in range(8):
            x, y = sampler.next()
            float(step(x, y))
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                x, y = sampler.next()
                torch.cuda.synchronize()
                float(step(x, y))
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / steps * 1e3
        ka = prof.key_averages()
        dev_us = sum(e.self_device_time_total for e in ka) / steps
        section(f"train: {name}: {wall:.2f} ms/step wall (profiled), device busy "
                f"{dev_us / 1e3:.2f} ms/step")
        say(ka.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))
        say(ka.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
        del opt, model, step
        torch.cuda.empty_cache()


def loop(shapes, device, case: str, seconds: float) -> None:
    """Step ``case`` ("search" or "plain") for ``seconds`` (the process py-spy samples)."""
    step, _, _ = armijo_case(shapes, device, search=case == "search", check_finite=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(5):
        step()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        step()
        sync()  # (as optimizer_step.py times it)


#: frames of one-time work (the flat store's build, the heap scan for buffers): not a step's
ONCE = ("FlatBuffer.__init__", "owned_buffers", "_restart_or_warn_stateless")


def spy_shares(raw: str, top: int = 45) -> tuple[int, list[str]]:
    """Inclusive share of each function (lines merged) among the samples inside
    ``ArmijoOptimizer._step``, from py-spy's raw (collapsed) output."""
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if not n.isdigit() or not any(f.startswith("ArmijoOptimizer._step ") for f in frames):
            continue
        if any(f.startswith(ONCE) for f in frames):
            continue
        total += int(n)
        names = {re.sub(r" \(.*?([\w.]+/[\w.]+\.py):\d+\)$", r" (\1)", f) for f in frames}
        for name in names:
            incl[name] += int(n)
    return total, [f"{100 * n / total:5.1f}%  {name}" for name, n in incl.most_common(top)]


def spy(device, seconds: float = 8.0) -> None:
    exe = shutil.which("py-spy")
    if exe is None:
        section("spy: skipped (py-spy is not on the PATH)")
        return
    for case in ("search", "plain"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "raw.txt"
            cmd = [exe, "record", "-r", "1000", "-f", "raw", "-o", str(out), "--",
                   sys.executable, str(Path(__file__).resolve()), "--loop", case,
                   "--seconds", str(seconds), "--device", str(device)]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120,
                                 check=False)
            raw = out.read_text() if out.exists() else ""
        total, lines = spy_shares(raw)
        section(f"spy: {case} step, {total} samples in _step (py-spy exit {run.returncode})")
        say("\n".join(lines) if total else run.stderr[-2000:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="profiled steps of each host case")
    ap.add_argument("--train", action="store_true",
                    help="also profile whole training steps of the 124M model")
    ap.add_argument("--loop", choices=("search", "plain"), default=None,
                    help="(for the spy part) only step this case for --seconds, write nothing")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each --loop run")
    ap.add_argument("--device", default="cuda", help="torch device of --loop")
    add_out_argument(ap, one_json=True)
    args = ap.parse_args(argv)
    if args.loop is not None:
        warnings.filterwarnings("ignore")
        device = torch.device(args.device)
        loop(shapes_for(device, 10e6)[1], device, args.loop, args.seconds)
        return 0
    if not torch.cuda.is_available():
        print("profile_step.py needs CUDA; nothing profiled")
        return 0
    warnings.filterwarnings("ignore")
    device = torch.device("cuda")
    _, shapes = shapes_for(device, 0)
    for part in (lambda: launch(device), lambda: sums(shapes, device),
                 lambda: host(shapes, device, args.steps), lambda: spy(device)) + (
            (lambda: train(device, 3),) if args.train else ()):
        try:
            part()
        except Exception as e:  # one part failing should not cost the others
            import traceback

            traceback.print_exc()
            print(f"part failed: {type(e).__name__}: {e}", flush=True)
            # (under a heading of its own, not the last part's)
            REPORT.setdefault("failed", []).append(f"{type(e).__name__}: {e}")
    write_result(out_file(args.out, f"profile_step_{result_slug(device)}.json"),
                 {"environment": environment(device), "steps": args.steps, "report": REPORT})
    return 0


if __name__ == "__main__":
    sys.exit(main())
