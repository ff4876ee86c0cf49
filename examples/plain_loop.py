"""A plain PyTorch loop with ArmijoAdam, in the three forms the optimizer takes.

    python examples/plain_loop.py [--steps 60]

1. closure: the closure does zero_grad + forward + backward (torch/LBFGS style); the optimizer
   calls it once with autograd, then for trials without autograd and without backward;
2. loss_fn: your loop does its own backward, then ``opt.step(loss_fn=fn, loss=loss)``;
3. registered closure: ``opt.set_closure(fn)`` once, then a bare ``opt.step()`` (for loops that
   cannot pass arguments to ``step``).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from armijo_fused import ArmijoAdam


def make(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 16, generator=g)
    y = torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.05 * torch.randn(1024, 1, generator=g)
    return model, x, y


def batches(x, y, steps, size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (size,), generator=g)
        yield x[idx], y[idx]


def train(form: str, steps: int = 60) -> float:
    model, x, y = make()
    # model=: trials restore its buffers (BatchNorm statistics); no lr to tune
    opt = ArmijoAdam(model.parameters(), weight_decay=0.01, model=model)
    loss_of = nn.functional.mse_loss
    for xb, yb in batches(x, y, steps):
        if form == "closure":
            def closure(xb=xb, yb=yb):
                opt.zero_grad()
                loss = loss_of(model(xb), yb)
                loss.backward()
                return loss

            opt.step(closure)
        elif form == "loss_fn":
            opt.capture_rng()  # so trials replay this forward's dropout mask
            opt.zero_grad()
            loss = loss_of(model(xb), yb)
            loss.backward()
            opt.step(loss_fn=lambda xb=xb, yb=yb: loss_of(model(xb), yb), loss=loss)
        else:  # registered closure, bare step()
            opt.set_closure(lambda xb=xb, yb=yb: loss_of(model(xb), yb))
            opt.capture_rng()
            opt.zero_grad()
            loss = loss_of(model(xb), yb)
            loss.backward()
            opt.provide_loss(loss)  # f(θ0), else a search pays one more forward for it
            opt.step()
    model.eval()
    with torch.no_grad():
        final = float(loss_of(model(x), y))
    s = opt.stats
    print(f"{form:10s} full-data loss {final:.4f}  step size {s['step_size']:.2e}  "
          f"forwards/step {s['forwards'] / steps:.2f}")
    return final


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args(argv)
    return {form: train(form, args.steps) for form in ("closure", "loss_fn", "registered")}


if __name__ == "__main__":
    main()
