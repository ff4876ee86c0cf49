"""Small deterministic problems shared by the optimizer tests."""

from __future__ import annotations

import math

import torch
from torch import nn


def least_squares(seed=0, n=128, dim=8, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, dim, generator=g)
    y = X @ torch.randn(dim, generator=g) + noise * torch.randn(n, generator=g)
    model = nn.Linear(dim, 1)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, dim, generator=g))
        model.bias.zero_()

    def loss(xb=X, yb=y):
        return ((model(xb).squeeze(-1) - yb) ** 2).mean()

    return model, loss, (X, y)


def logistic_regression(seed=0, n=256, dim=10):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, dim, generator=g)
    y = (X @ torch.randn(dim, generator=g) + 0.5 * torch.randn(n, generator=g) > 0).float()
    model = nn.Linear(dim, 1)
    with torch.no_grad():
        model.weight.copy_(0.1 * torch.randn(1, dim, generator=g))
        model.bias.zero_()

    def loss(xb=X, yb=y):
        return nn.functional.binary_cross_entropy_with_logits(model(xb).squeeze(-1), yb)

    return model, loss, (X, y)


PROBLEMS = {"least_squares": least_squares, "logistic_regression": logistic_regression}


def make_closure(opt, loss_fn, *batch):
    def closure():
        opt.zero_grad()
        loss = loss_fn(*batch)
        loss.backward()
        return loss

    return closure


def minibatches(data, batch, seed=0):
    """An endless, seeded stream of mini-batches (with replacement)."""
    X, y = data
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, X.shape[0], (batch,), generator=g)
        yield X[idx], y[idx]


class SimulatedPasses:
    """The controller's view of the passes (linesearch/controller.py ``Passes``), simulated:
    where θ is (η per block, which line) and the loss there, no tensors but the sums. Per block
    b: the slope ⟨g_b, d_b⟩ (``gd``; 1 along the fallback line), a curvature a_b, and ‖d_b‖²
    (``dd``, default 1; 1 along the fallback line); ``loss()`` is 1 − Σ η_b·slope_b + Σ a_b
    η_b² away from θ0, plus ``shift`` (a loss that does not follow the model: every trial worse
    by as much), capped at ``ceiling`` (saturated far past an overshoot, where halving η leaves
    the loss where it was), NaN at the calls numbered in ``nan_at``."""

    def __init__(self, gd, curvature=None, nan_at=(), dd=None, shift=0.0, ceiling=None):
        self.gd, self.nan_at, self.shift, self.ceiling = list(gd), nan_at, shift, ceiling
        self.a = list(curvature) if curvature is not None else [0.0] * len(self.gd)
        self.dd = list(dd) if dd is not None else [1.0] * len(self.gd)
        self.eta, self.precond, self.calls = None, False, 0

    def _sums(self, precond):
        # (the fallback line p is the gradient: a slope of 1, so never zero)
        return [torch.tensor([[1.0, 1.0, 1.0] if precond else [g, 1.0, d]
                              for g, d in zip(self.gd, self.dd)], dtype=torch.float64)]

    def first(self, eta, precond=False):
        self.eta, self.precond = list(eta), precond
        return self._sums(precond)

    def fallback_sums(self, sums):
        return None

    def move_to(self, eta, precond=None, compute_sums=False):
        self.eta = list(eta)
        if precond is not None:
            self.precond = precond
        return self._sums(self.precond) if compute_sums else None

    def slopes(self, precond):
        return [1.0] * len(self.gd) if precond else self.gd

    def loss(self):
        self.calls += 1
        if self.calls in self.nan_at:
            return torch.tensor(math.nan, dtype=torch.float64)
        slopes = self.slopes(self.precond)
        value = 1.0 - sum(e * s for e, s in zip(self.eta, slopes)) + sum(
            a * e * e for a, e in zip(self.a, self.eta))
        if self.ceiling is not None:
            value = min(value, self.ceiling)
        return torch.tensor(value + self.shift, dtype=torch.float64)
