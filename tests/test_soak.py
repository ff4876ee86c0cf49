"""Soak (issue 9): thousands of steps on a small noisy problem, with faults injected all along.

Each step draws a mini-batch of a noisy regression problem (dropout on) and, with small
probabilities fixed by a seed, one fault:

* ``nan_batch``: a NaN in the inputs, so the loss and every gradient are NaN (skipped);
* ``inf_grad``: one gradient entry set to +inf after backward (skipped);
* ``raise``: the closure raises on its 2nd-4th call, i.e. inside the search if the step searches;
  the training loop catches the error and moves on, as a trainer with a retry policy does;
* ``liar``: the loss function used for trials adds a constant, so every trial is rejected and the
  search exhausts (no step, η reset to its average);
* ``flat``: a batch whose loss does not depend on θ (zero gradient).

At the end: parameters, state and step sizes are finite; second moments are non-negative; the
parameters, gradients and state are still views of the flat buffers; the counters add up (one
``step`` per completed call, every injected skip reported in ``stats['skipped']``, every
exhaustion in ``stats['exhausted']``); the model learned (clean loss well below its start); and a
checkpoint of the final state continues bit for bit.

The default test runs ~10 s on a 2-core CPU. The ``slow`` one runs every direction on both CPU
backends for 12 000 steps (~2 min); it runs only when selected, ``pytest -m slow tests/test_soak.py``.
"""

from __future__ import annotations

import io
import math
import random

import pytest
import torch
from _backends import needs_cpp  # noqa: E402
from torch import nn

from armijo_fused import ArmijoAdam, ArmijoSGD

SGD_DIRS = ("sgd", "momentum", "nesterov")
FAULTS = (("nan_batch", 0.02), ("inf_grad", 0.01), ("raise", 0.03), ("liar", 0.01),
          ("flat", 0.01))




pytestmark = pytest.mark.usefixtures("one_intra_op_thread")




class Injected(Exception):
    """The error a faulty closure raises (a data loader or remote call dying)."""


def build(direction, backend, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Dropout(0.1), nn.Linear(24, 1))
    cls = ArmijoSGD if direction in SGD_DIRS else ArmijoAdam
    opt = cls(model.parameters(), direction=direction, backend=backend, model=model,
              weight_decay=1e-3, max_trials=8)
    return model, opt


def data(seed, n=2048):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 1, generator=g) / math.sqrt(8)
    y = torch.tanh(X @ w) + 0.3 * torch.randn(n, 1, generator=g)  # noisy labels: floor 0.09
    return X, y


def clean_loss(model, X, y):
    with torch.no_grad():
        model.eval()
        out = float(nn.functional.mse_loss(model(X), y))
        model.train()
    return out


def soak(direction, backend, steps, seed=0):
    model, opt = build(direction, backend, seed)
    X, y = data(seed)
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    evals = [clean_loss(model, X, y)]
    counts = dict.fromkeys([name for name, _ in FAULTS] + ["raised", "completed", "skipped",
                                                          "exhausted", "searched"], 0)
    expected_skips = 0
    backwards = 0
    for k in range(steps):
        idx = torch.randint(0, X.shape[0], (32,), generator=gen)
        xb, yb = X[idx], y[idx]
        fault = None
        if k > 0:  # the first loss must be finite (that is an error, tested elsewhere)
            r = rnd.random()
            for name, p in FAULTS:
                if r < p:
                    fault = name
                    break
                r -= p
        if fault:
            counts[fault] += 1
        if fault == "nan_batch":
            xb = xb.clone()
            xb[0, 0] = math.nan
        raise_at = rnd.randint(2, 4)
        calls = [0]

        def loss_fn(xb=xb, yb=yb, fault=fault):
            out = nn.functional.mse_loss(model(xb), yb)
            if fault == "flat":
                out = out.detach() * 0 + 1.0 + 0 * sum(p.sum() for p in model.parameters())
            return out

        def closure(loss_fn=loss_fn, fault=fault, calls=calls, raise_at=raise_at, k=k):
            calls[0] += 1
            if fault == "raise" and calls[0] == raise_at:
                raise Injected(f"step {k}: the data loader died")
            opt.zero_grad()
            out = loss_fn()
            out.backward()
            if fault == "inf_grad":
                model[0].weight.grad[3, 1] = math.inf
            return out

        try:
            if fault == "liar":
                opt.capture_rng()
                l0 = closure()
                backwards += 1
                opt.step(loss_fn=lambda loss_fn=loss_fn: loss_fn() + 10.0, loss=l0)
            else:
                opt.step(closure)
                backwards += 1
        except Injected:
            counts["raised"] += 1
            backwards += 1  # the training backward ran before the search raised
            continue
        counts["completed"] += 1
        if counts["completed"] % 100 == 0:
            evals.append(clean_loss(model, X, y))
        s = opt.stats
        counts["skipped"] += bool(s["skipped"])
        counts["exhausted"] += bool(s["exhausted"])
        counts["searched"] += bool(s["searched"])
        expected_skips += fault in ("nan_batch", "inf_grad")
        if fault in ("nan_batch", "inf_grad"):
            assert s["skipped"], (k, fault)
        if fault == "liar" and s["searched"]:  # no trial passes: no step, however it ends
            assert s["step_size"] == 0.0, (k, dict(s))
            assert s["exhausted"] or s["unresolved"] or s["skipped"], (k, dict(s))
    evals.append(clean_loss(model, X, y))
    return model, opt, counts, expected_skips, backwards, evals


def assert_consistent(model, opt, counts, expected_skips, backwards, evals):
    # every kind of fault happened, and raising closures did hit searches
    assert all(counts[name] > 0 for name, _ in FAULTS) and counts["raised"] > 0, counts
    assert counts["skipped"] == expected_skips, counts
    assert counts["exhausted"] > 0
    for p in model.parameters():
        assert torch.isfinite(p).all()
    for s in opt.state.values():
        for name, v in s.items():
            assert torch.isfinite(v).all(), name
            if name in ("exp_avg_sq", "square_avg"):
                assert (v >= 0).all()
    g = opt.param_groups[0]
    etas = g["step_size"] if isinstance(g["step_size"], list) else [g["step_size"]]
    assert all(math.isfinite(e) and e > 0 for e in etas + [g["step_size_avg"]])
    assert g["step"] == counts["completed"]  # a call that raised is not a step
    assert g["backwards"] == backwards
    # the flat store still backs the model: no tensor was swapped out by a fault
    (buf,) = opt._buffers
    for p in model.parameters():
        assert p.untyped_storage().data_ptr() == buf.param.untyped_storage().data_ptr()
        assert p.grad.untyped_storage().data_ptr() == buf.grad.untyped_storage().data_ptr()
        for v, flat_state in zip(opt.state[p].values(), buf.states):
            assert v.untyped_storage().data_ptr() == flat_state.untyped_storage().data_ptr()
    # it learned, and did not diverge: stochastic line searches with momentum are noisy on this
    # problem even without faults (the clean loss can spike several-fold between evaluations),
    # so this asks for learning at some point and a sane end, not a monotone curve
    assert min(evals) < 0.5 * evals[0] and evals[-1] < 2 * evals[0], evals


def assert_checkpoint_continues(model, opt, direction, backend):
    blob = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict(), "rng": torch.get_rng_state()},
               blob)
    blob.seek(0)
    ck = torch.load(blob, weights_only=True)
    model2, opt2 = build(direction, backend, seed=123)
    model2.load_state_dict(ck["m"])
    opt2.load_state_dict(ck["o"])
    X, y = data(5, n=64)
    for m, o in ((model, opt), (model2, opt2)):
        torch.set_rng_state(ck["rng"])
        for i in range(5):
            def closure(m=m, o=o, i=i):
                o.zero_grad()
                out = nn.functional.mse_loss(m(X[i::5]), y[i::5])
                out.backward()
                return out

            o.step(closure)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("direction, backend, steps", [
    ("adam", "torch", 4000),
    pytest.param("momentum", "cpp", 4000, marks=needs_cpp),
])
def test_soak_with_injected_faults(direction, backend, steps):
    model, opt, *rest = soak(direction, backend, steps)
    assert_consistent(model, opt, *rest)
    assert_checkpoint_continues(model, opt, direction, backend)


@pytest.mark.slow
@pytest.mark.skipif("'slow' not in config.getoption('markexpr')",
                    reason="a 2-minute soak: run it with -m slow")
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
# plain SGD was an expected failure here until steps after an exhausted search stopped applying
# the rejected η and steps without a search were capped at twice the tested step length; it has
# passed since (seeds 0-4 x torch/cpp checked when the mark was removed)
@pytest.mark.parametrize("direction", ["sgd", "momentum", "nesterov", "rmsprop", "adam", "nadam"])
def test_long_soak_with_injected_faults(direction, backend):
    model, opt, *rest = soak(direction, backend, 12_000, seed=1)
    assert_consistent(model, opt, *rest)
    assert_checkpoint_continues(model, opt, direction, backend)
