"""Peak host memory of the optimizer on CPU, in copies of θ above the model: the README's memory
paragraph, measured.

Each case runs in a fresh process: it builds the model and its gradient, resets the resident set's
high-water mark (``/proc/self/clear_refs``, Linux), runs the steps, and reports
``(VmHWM − VmRSS at the reset) / bytes(θ)``, and what is still held after the steps
(``held_after_steps``, from VmRSS). Large tensors are separate ``mmap`` allocations, so
the resident set follows what torch holds (pages count once written: AdamW's ``zeros_like``
state too, since its first step writes it).

Cases (33.6M fp32 parameters by default, GPT-like shapes, C++ backend):

* ``adamw_first_step`` / ``armijo_first_step``: the first ``step()`` (state allocated), then two
  more; ArmijoAdam searches (a precomputed loss far below f0: one accepted trial, no model time);
* ``adamw_resume`` / ``armijo_resume``: ``torch.load`` of a checkpoint (moments and step count,
  written by another process), a fresh optimizer loads it, then steps, the loaded dict deleted
  after ``load_state_dict``; measured from before the ``torch.load``;
* ``adamw_resume_dict_held`` / ``armijo_resume_dict_held``: the same, the caller keeping the
  loaded dict alive through the steps.

Writes ``bench/results/memory_cpu.json`` (device, versions, commit).

Usage: python bench/memory.py [--params 33.6e6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = ("adamw_first_step", "armijo_first_step", "adamw_resume", "armijo_resume",
         "adamw_resume_dict_held", "armijo_resume_dict_held")


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> int:
    """Reset the resident set's high-water mark to the present size (Linux >= 4.0); returns
    that size in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def _peak_bytes() -> int:
    return _status_kb("VmHWM") * 1024


def run_case(case: str, params: float, ckpt: str) -> dict:
    """One case, in this process: copies of θ above the model and its gradient at the peak."""
    import warnings

    import torch

    sys.path.insert(0, str(HERE))
    from cpu_first_pass import gpt_shapes

    from armijo_fused import ArmijoAdam

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(0.02 * torch.randn(s)) for s in gpt_shapes(params)]
    for p in ps:
        p.grad = 1e-3 * torch.randn_like(p)
    theta = sum(p.numel() for p in ps) * 4
    armijo = case.startswith("armijo")

    def make():
        if armijo:
            return ArmijoAdam(ps, backend="cpp", cadence="every", weight_decay=0.1)
        return torch.optim.AdamW(ps, weight_decay=0.1, fused=True)

    f0, below = torch.zeros(()), torch.full((), -1e30)

    def step(opt):
        if armijo:
            opt.step(loss_fn=lambda: below, loss=f0)
        else:
            opt.step()

    saved = None
    if "resume" in case:  # a checkpoint of a run that has stepped, written to disk first
        path = Path(ckpt)
        if not path.exists():
            source = make()
            step(source)
            torch.save(source.state_dict(), path)
            return {"case": case, "wrote": str(path)}
    base = _reset_peak()  # from here: the optimizer's own memory (and a checkpoint's)
    if "resume" in case:
        saved = torch.load(ckpt, weights_only=False)
    opt = make()
    if saved is not None:
        opt.load_state_dict(saved)
        if not case.endswith("dict_held"):
            saved = None
    for _ in range(3):
        step(opt)
    return {"case": case, "copies_of_theta": (_peak_bytes() - base) / theta,
            "held_after_steps": (_status_kb("VmRSS") * 1024 - base) / theta,
            "numel": theta // 4, "held_dict": saved is not None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sys.path.insert(0, str(HERE))
    from _env import add_out_argument, positive_float

    ap.add_argument("--params", type=positive_float, default=33.6e6,
                    help="fp32 parameter count (GPT-like tensors)")
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # (one case, in a child)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)  # (the checkpoint a resume case loads)
    add_out_argument(ap, one_json=True)
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.params, args.ckpt)))
        return 0
    import torch

    sys.path.insert(0, str(HERE))
    import tempfile

    from _env import environment, out_file, write_result

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            ckpt = str(Path(tmp) / f"{case.split('_')[0]}.pt")
            cmd = [sys.executable, __file__, "--case", case, "--params", str(args.params),
                   "--ckpt", ckpt]
            # a fixed mmap threshold: glibc's moves up as large blocks are freed, and blocks
            # below it then stay in the heap, resident (±0.5 copies from run to run)
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            if "resume" in case and not Path(ckpt).exists():  # the checkpoint, in a process
                subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            rows[case] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{case:26s} peak {rows[case]['copies_of_theta']:5.2f}, held after the steps "
              f"{rows[case]['held_after_steps']:5.2f} copies of θ", flush=True)
    result = {"environment": environment(torch.device("cpu")), "params": args.params,
              "measure": "peak resident set size above the model and its gradient, in copies "
                         "of θ (fresh process per case)", "rows": rows}
    write_result(out_file(args.out, "memory_cpu.json"), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
