"""Full-batch (deterministic) problems: the adaptive cadence against a search at every step.

Between searches the adaptive cadence applies the searched η untested. On noisy mini-batches
that keeps the quality at a tenth of the searches (docs/design.md §8); on a problem whose loss
is the same function at every step nothing stops an η that passed one test from overshooting at
the next points. This script measures what that costs, and what ``cadence="every"`` buys:

* ``lsq``: least squares ½‖Aw − b‖² with 200 rows, 20 unknowns, A's singular values spread
  over 10^1.5 (κ(AᵀA) = 1000), b in A's range (the minimum is 0), w from 0;
* ``mlp``: a 4-64-64-1 tanh MLP regressing a smooth function of 256 fixed points (MSE).

For ArmijoSGD and ArmijoAdam (defaults, no schedule) with the adaptive cadence and with
``cadence="every"``: the loss after ``--steps`` steps, forwards per step, and the steps without a
search whose loss rose. Writes ``bench/results/full_batch_<device>.json`` (device, versions,
commit).

Usage: python bench/full_batch.py [--steps 500] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
from _env import add_out_argument, positive_int, write_runs
from torch import nn

from armijo_fused import ArmijoAdam, ArmijoSGD


def least_squares(seed: int):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(200, 20, generator=g))
    v, _ = torch.linalg.qr(torch.randn(20, 20, generator=g))
    a = (u * torch.logspace(1, -0.5, 20)) @ v.T
    b = a @ torch.randn(20, generator=g)
    w = nn.Parameter(torch.zeros(20))
    return [w], lambda: 0.5 * (a @ w - b).pow(2).sum()


def mlp(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 4, generator=g)
    y = torch.sin(3 * x[:, :1]) * x[:, 1:2] + 0.1 * x[:, 2:3]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 1))
    return list(model.parameters()), lambda: (model(x) - y).pow(2).mean()


PROBLEMS = {"lsq": least_squares, "mlp": mlp}
OPTIMIZERS = {"ArmijoSGD": ArmijoSGD, "ArmijoAdam": ArmijoAdam}


def run(problem: str, optimizer: str, cadence: str, seed: int, steps: int) -> dict:
    params, loss = PROBLEMS[problem](seed)
    opt = OPTIMIZERS[optimizer](params, cadence=cadence)

    def closure():
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    with torch.no_grad():
        start = float(loss())
    rises, before = 0, start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the run's own warnings are not what is measured)
        for _ in range(steps):
            opt.step(closure)
            with torch.no_grad():
                now = float(loss())
            rises += int(now > before and not opt.stats["searched"])
            before = now
    return {"problem": problem, "optimizer": optimizer, "cadence": cadence, "seed": seed,
            "loss_start": start, "loss_end": before,
            "forwards_per_step": opt.param_groups[0]["forwards"] / steps,
            "rises_without_search": rises}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=positive_int, default=500, help="steps per run")
    ap.add_argument("--seeds", default="0,1,2", help="comma separated")
    add_out_argument(ap, one_json=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    runs = []
    for problem in PROBLEMS:
        for optimizer in OPTIMIZERS:
            for cadence in ("adaptive", "every"):
                for seed in (int(s) for s in args.seeds.split(",")):
                    r = run(problem, optimizer, cadence, seed, args.steps)
                    runs.append(r)
                    print(f"{problem} {optimizer:10s} {cadence:8s} seed {seed} loss "
                          f"{r['loss_start']:.3g} -> {r['loss_end']:.3e}  forwards/step "
                          f"{r['forwards_per_step']:.2f}  rises {r['rises_without_search']}",
                          flush=True)
    write_runs(args, "full_batch", torch.device("cpu"), runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
