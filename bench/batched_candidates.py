"""Batched candidates vs sequential backtracking: time per search step when trials > 1.

Runs the same optimizer (ArmijoAdam, cadence="every") with ``candidates=None`` and with
``candidates=K`` on an MLP regression task where the first trial usually overshoots
(``growth=4``: each search starts at 4x the last accepted step, so 2-3 trials are typical),
and records ms, trials and forwards per step; every configuration runs ``--rounds`` times, in
alternating order, and its ms/step is the median over the rounds. The MLP is small (on a GPU its
steps are bound by launches and the host), so the comparison holds for models of its size: a
transformer's K batched forwards cost about K times one forward's compute. Whether each K
accepts what sequential backtracking accepts is checked from the same point at every step (the
batched run is given the sequential run's θ and state first; see :func:`agreement`), and the
step at which the free runs part by rounding is recorded. Writes
bench/results/batched_candidates_<device>.json with device, versions and commit.

Usage: python bench/batched_candidates.py [--device cuda] [--steps 30] [--k 2 4 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

from armijo_fused import ArmijoAdam

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _env import add_out_argument, out_file, positive_int  # noqa: E402
from convergence import environment  # noqa: E402  (the shared environment record)
from torch import nn


def build(device, candidates, width, depth, batch, init_step_size, seed=0):
    """(model, optimizer, closure) of the task, the same weights and batch for every seed."""
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(width, 1)).to(device)
    x = torch.randn(batch, width, device=device)
    y = torch.randn(batch, 1, device=device)
    opt = ArmijoAdam(model.parameters(), cadence="every", model=model, candidates=candidates,
                     init_step_size=init_step_size, growth=4.0)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return model, opt, closure


def agreement(device, candidates, steps, width, depth, batch, init_step_size):
    """Steps at which the batched search accepts the step sequential backtracking accepts from
    the same point: before each step the batched run takes the sequential run's θ and state.
    (Run free, the two part after a while: sequential backtracking reaches its accepted point
    by moves along the line, the batched search by one move from θ0, and the rounding of those
    differs in the last bits of θ, about 3e-6 after 20 steps of the width-16 MLP, until a test
    at the margin goes the other way: there at the 142nd timed step, after 3 untimed ones.)"""
    seq_model, seq, seq_closure = build(device, None, width, depth, batch, init_step_size)
    bat_model, bat, bat_closure = build(device, candidates, width, depth, batch, init_step_size)
    same = 0
    for _ in range(steps):
        with torch.no_grad():
            for p, q in zip(bat_model.parameters(), seq_model.parameters()):
                p.copy_(q)
        bat.load_state_dict(copy.deepcopy(seq.state_dict()))
        seq.step(seq_closure)
        bat.step(bat_closure)
        same += seq.stats["step_size"] == bat.stats["step_size"] and \
            seq.stats["trials"] == bat.stats["trials"]
    return same


def run(device, candidates, steps, width, depth, batch, init_step_size, seed=0):
    model, opt, closure = build(device, candidates, width, depth, batch, init_step_size, seed)
    for _ in range(3):  # warm-up
        opt.step(closure)
    f0 = opt.param_groups[0]["forwards"]
    trials, accepted = 0, []
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = opt.step(closure)
        trials += opt.stats["trials"]
        accepted.append(opt.stats["step_size"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / steps * 1e3
    return dict(candidates=candidates, ms_per_step=ms, trials_per_step=trials / steps,
                forwards_per_step=(opt.param_groups[0]["forwards"] - f0) / steps,
                final_loss=float(loss.detach()), accepted=accepted)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device")
    ap.add_argument("--steps", type=positive_int, default=30,
                    help="timed steps per run (after 3 untimed), each a search")
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4, 8],
                    help="candidate counts, each against sequential backtracking")
    ap.add_argument("--width", type=int, default=256, help="MLP width")
    ap.add_argument("--depth", type=int, default=4, help="MLP hidden layers")
    ap.add_argument("--batch", type=int, default=256, help="rows of the one fixed batch")
    ap.add_argument("--init-step-size", type=float, default=1e-3, help="ArmijoAdam's init_step_size")
    ap.add_argument("--rounds", type=positive_int, default=3,
                    help="runs of every configuration, in alternating order (each one's "
                         "ms/step: the median over the rounds)")
    add_out_argument(ap, one_json=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    # every configuration once per round, the order reversed every other round: sequential
    # went first, once, on a card whose clocks may still have been rising
    configs = [None, *args.k]
    runs = {c: [] for c in configs}
    for rnd in range(args.rounds):
        for c in (configs if rnd % 2 == 0 else configs[::-1]):
            runs[c].append(run(device, c, args.steps, args.width, args.depth, args.batch,
                               args.init_step_size))
    rows = []
    for c in configs:
        row = dict(runs[c][0])
        row["ms_per_step_rounds"] = [r["ms_per_step"] for r in runs[c]]
        row["ms_per_step"] = statistics.median(row["ms_per_step_rounds"])
        row["same_in_every_round"] = all(r["accepted"] == row["accepted"] for r in runs[c])
        rows.append(row)
    for r in rows[1:]:  # the timed step (from 0) at which the free runs part (None: never)
        r["parts_from_sequential_at"] = next(
            (i for i, (a, b) in enumerate(zip(rows[0]["accepted"], r["accepted"])) if a != b),
            None)
        r["agreeing_steps"] = agreement(device, r["candidates"], args.steps, args.width,
                                        args.depth, args.batch, args.init_step_size)
    same = all(r["agreeing_steps"] == args.steps for r in rows[1:])
    print(f"{'candidates':>10} {'ms/step':>9} {'trials/step':>12} {'forwards/step':>14} "
          f"{'same step from the same point':>30}")
    for r in rows:
        agree = f"{r['agreeing_steps']}/{args.steps}" if r["candidates"] else ""
        print(f"{str(r['candidates']):>10} {r['ms_per_step']:9.2f} {r['trials_per_step']:12.2f} "
              f"{r['forwards_per_step']:14.2f} {agree:>30}")
    print(f"the same accepted step as sequential from the same point, every step: {same}")
    result = dict(
        benchmark="batched_candidates", env=environment(device), args=vars(args),
        same_accepted_as_sequential=same,
        same_accepted_means="from the same point (θ and state) at every one of --steps steps",
        rows=rows,
    )
    path = out_file(args.out, f"batched_candidates_{device.type}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
