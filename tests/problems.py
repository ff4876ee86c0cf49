"""Small deterministic problems shared by the optimizer tests."""

from __future__ import annotations

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
