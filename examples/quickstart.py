"""Quickstart: ArmijoAdam with its defaults against AdamW at its default lr, on a small classifier.

Runs in seconds on a CPU. It trains the same MLP from the same initial weights on the same batches
and prints the final loss, wall time, and how many extra forward passes the line search used.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from armijo_fused import ArmijoAdam


def make_data(n=4096, dim=32, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    X = centers[y] + torch.randn(n, dim, generator=g)
    return X, y


def train(model, opt, X, y, steps=300, batch=128):
    g = torch.Generator().manual_seed(1)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(X), (batch,), generator=g)
        xb, yb = X[idx], y[idx]

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        final = float(loss_fn(model(X), y))
    return final, elapsed


def main():
    torch.manual_seed(0)
    X, y = make_data()
    base = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                         nn.Linear(128, 4))
    rows = []
    for name in ("ArmijoAdam (defaults)", "AdamW (lr=1e-3)"):
        model = copy.deepcopy(base)
        if name.startswith("Armijo"):
            opt = ArmijoAdam(model.parameters(), model=model)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        final, elapsed = train(model, opt, X, y)
        extra = opt.stats["forwards"] / opt.param_groups[0]["step"] - 1 if hasattr(opt, "stats") else 0.0
        rows.append((name, final, elapsed, extra))
        print(f"{name:24s} done")
    print(f"\n{'optimizer':24s} {'final loss':>10s} {'seconds':>8s} {'extra fwd/step':>15s}")
    for name, final, elapsed, extra in rows:
        print(f"{name:24s} {final:10.4f} {elapsed:8.2f} {extra:15.2f}")


if __name__ == "__main__":
    main()
