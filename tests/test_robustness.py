"""Robustness (issue 9): faults never corrupt the model or the optimizer, and say what went wrong.

Cases already covered elsewhere are not repeated here (see test_store_and_faults.py and
test_optimizers.py): a NaN first trial for Adam, a NaN/inf gradient for Adam on the torch backend,
a loss_fn raising at trial 1 (parameters only), exhaustion for Adam, the basic degenerate inputs.
This file widens each of them to every direction, both CPU backends, the exact-revert and inverse
restore paths, and adds the cases nothing covered yet. docs/robustness.md tabulates the outcomes.

Tolerances: with ``exact_revert=True`` a restore is a copy, so comparisons are bitwise; without it
θ0 is recovered as (θ + η u) / (1 − η λ) and the gradient is taken back out of the state by
inverting the update, exact to a few fp32 ulps (``INVERSE_TOL``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from _backends import needs_cpp
from torch import nn

from armijo_fused import ArmijoAdam, ArmijoSGD
from armijo_fused.linesearch import trial as trial_mod

SGD_DIRS = ("sgd", "momentum", "nesterov")
ADAM_DIRS = ("rmsprop", "adam", "nadam")
ALL_DIRS = SGD_DIRS + ADAM_DIRS
INVERSE_TOL = dict(rtol=1e-5, atol=1e-6)
#: the line-search counters that count work done (a raising step did a forward): not state
COUNTERS = ("forwards", "backwards")


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
BACKENDS = ["torch", pytest.param("cpp", marks=needs_cpp)]


def make_opt(direction, params, **kw):
    kw.setdefault("backend", "torch")
    cls = ArmijoSGD if direction in SGD_DIRS else ArmijoAdam
    return cls(params, direction=direction, **kw)


def make_closure(opt, loss):
    def closure():
        opt.zero_grad()
        out = loss()
        out.backward()
        return out

    return closure


def net():
    """Small, with the two things trials must not disturb: dropout masks and BatchNorm statistics.
    A Sequential, so that layer-wise mode finds three blocks (0, 1, 4) from the names."""
    return nn.Sequential(nn.Linear(6, 12, bias=False), nn.BatchNorm1d(12), nn.Tanh(),
                         nn.Dropout(0.2), nn.Linear(12, 1))


class Run:
    """A model, its data and an optimizer, built the same way every time (twins compare)."""

    def __init__(self, direction="adam", seed=0, **kw):
        torch.manual_seed(seed)
        self.model = net()
        g = torch.Generator().manual_seed(seed + 1)
        self.x, self.y = torch.randn(32, 6, generator=g), torch.randn(32, 1, generator=g)
        kw.setdefault("cadence", "every")
        kw.setdefault("weight_decay", 0.01)
        self.opt = make_opt(direction, self.model.parameters(), model=self.model, **kw)
        torch.manual_seed(seed + 2)

    def loss(self):
        return nn.functional.mse_loss(self.model(self.x), self.y)

    def closure(self):
        self.opt.zero_grad()
        out = self.loss()
        out.backward()
        return out

    def steps(self, n):
        for _ in range(n):
            self.opt.step(self.closure)

    def backward(self, capture=True):
        """The training forward/backward of the loss_fn form; returns the loss."""
        if capture:  # so that trials replay this forward's dropout masks
            self.opt.capture_rng()
        self.opt.zero_grad()
        out = self.loss()
        out.backward()
        return out

    def theta(self):
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()]).clone()

    def snapshot(self):
        return dict(
            theta=self.theta(),
            state={id(p): {k: v.clone() for k, v in s.items()} for p, s in self.opt.state.items()},
            groups=[{k: _copy(v) for k, v in g.items() if k not in ("params",) + COUNTERS}
                    for g in self.opt.param_groups],
            buffers=[b.clone() for b in self.model.buffers()],
            rng=torch.get_rng_state(),
        )


def _copy(v):
    return list(v) if isinstance(v, list) else v


def assert_snapshots(a, b, *, exact, theta_atol=INVERSE_TOL["atol"]):
    """Everything in snapshot ``b`` equals ``a``: bitwise when ``exact``, else to INVERSE_TOL
    for θ and the state (the bookkeeping in param_groups, buffers and RNG always bitwise).
    ``theta_atol``: θ's absolute tolerance, for a move back from far along the line (the
    inverse recovers θ0 to a few ulps of the point it left)."""
    cmp = torch.equal if exact else (lambda u, v: torch.allclose(u, v, **INVERSE_TOL))
    near = torch.equal if exact else (
        lambda u, v: torch.allclose(u, v, rtol=INVERSE_TOL["rtol"], atol=theta_atol))
    assert near(b["theta"], a["theta"]), (b["theta"] - a["theta"]).abs().max()
    for pid, s in b["state"].items():
        for name, v in s.items():
            old = a["state"].get(pid, {}).get(name, torch.zeros_like(v))
            assert cmp(v, old), (name, (v - old).abs().max())
    assert b["groups"] == a["groups"]
    assert all(torch.equal(u, v) for u, v in zip(a["buffers"], b["buffers"]))
    assert torch.equal(a["rng"], b["rng"])


def assert_restored_but_the_training_forward(before, run, *, exact, **tol):
    """After a step that raised: everything as in ``before`` except what the training forward
    itself did (BatchNorm statistics moved, RNG drawn), and no trial patch left behind."""
    after = run.snapshot()
    after["buffers"] = before["buffers"]
    after["rng"] = before["rng"]
    assert_snapshots(before, after, exact=exact, **tol)
    assert nothing_leaked()


def second_moments_non_negative(opt):
    return all(bool((v >= 0).all()) for s in opt.state.values()
               for k, v in s.items() if k in ("exp_avg_sq", "square_avg"))


_UNPATCHED = (torch.Tensor.backward, torch.autograd.backward, nn.Module.zero_grad,
              torch.optim.Optimizer.zero_grad)


def nothing_leaked():
    """The trial environment patches backward / zero_grad; a fault must not leave them patched."""
    return (not trial_mod.in_trial() and torch.is_grad_enabled() and not trial_mod._BACKWARD._values
            and (torch.Tensor.backward, torch.autograd.backward, nn.Module.zero_grad,
                 torch.optim.Optimizer.zero_grad) == _UNPATCHED)


# == non-finite values ============================================================================
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("direction", ["sgd", "nesterov", "adam"])
def test_non_finite_trial_loss_is_a_rejection(direction, bad):
    # -inf would pass a naive f(trial) <= bound comparison: it must be rejected like NaN
    run = Run(direction)
    run.steps(2)
    eta_first = run.opt.policy.first_trial(run.opt.param_groups[0]["step_size"])
    calls = [0]

    def first_trial_bad():
        calls[0] += 1
        out = run.loss()
        return out * 0 + bad if calls[0] == 1 else out

    l0 = run.backward()
    run.opt.step(loss_fn=first_trial_bad, loss=l0)
    s = run.opt.stats
    assert s["trials"] >= 2 and not s["exhausted"] and not s["skipped"]
    assert 0 < s["step_size"] <= run.opt.backtrack * eta_first * (1 + 1e-12)
    assert math.isfinite(s["loss_after"]) and s["loss_after"] < s["loss_before"]
    assert torch.isfinite(run.theta()).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_every_trial_non_finite_exhausts_and_restores_theta0(backend, bad):
    run = Run("adam", backend=backend, max_trials=5)
    run.steps(2)
    theta0 = run.theta()
    l0 = run.backward()
    run.opt.step(loss_fn=lambda: run.loss() * bad, loss=l0)
    s = run.opt.stats
    assert s["exhausted"] and s["trials"] == 5 and s["step_size"] == 0.0
    torch.testing.assert_close(run.theta(), theta0, **INVERSE_TOL)
    run.steps(3)
    assert torch.isfinite(run.theta()).all() and run.opt.stats["step_size"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ALL_DIRS)
@pytest.mark.parametrize("where", ["search", "plain"])
def test_non_finite_gradient_skips_with_theta_and_state_untouched(direction, backend, where):
    # searched steps read the guard on the host; plain steps skip inside the pass with no sync
    run = Run(direction, backend=backend, cadence="every" if where == "search" else 1000)
    run.steps(1)  # the first step searches under either cadence
    before = run.snapshot()

    def poisoned():
        out = run.closure()
        run.model[0].weight.grad[1, 2] = math.nan
        run.model[4].bias.grad[0] = math.inf
        return out

    run.opt.step(poisoned)
    assert run.opt.stats["skipped"] and run.opt.stats["searched"] == (where == "search")
    after = run.snapshot()
    assert torch.equal(after["theta"], before["theta"])
    for pid, s in after["state"].items():
        for name, v in s.items():
            assert torch.equal(v, before["state"][pid][name]), name
    for g0, g1 in zip(before["groups"], after["groups"]):
        assert g1["step_size"] == g0["step_size"] and g1["step_size_avg"] == g0["step_size_avg"]
    run.steps(2)
    assert not run.opt.stats["skipped"] and torch.isfinite(run.theta()).all()
    assert not torch.equal(run.theta(), before["theta"])


@pytest.mark.parametrize("kw", [dict(max_grad_norm=1.0, check_finite=False),
                                dict(layerwise=True, block_search="exact"),
                                dict(layerwise=True, block_search="round_robin"),
                                dict(exact_revert=True)],
                         ids=["clip-only", "layerwise-exact", "layerwise-rr", "exact-revert"])
def test_non_finite_gradient_skips_in_every_mode(kw):
    run = Run("adam", **kw)
    run.steps(2)
    before = run.snapshot()

    def poisoned():
        out = run.closure()
        run.model[1].bias.grad[0] = -math.inf
        return out

    run.opt.step(poisoned)
    assert run.opt.stats["skipped"]
    assert torch.equal(run.theta(), before["theta"])
    run.steps(2)
    assert torch.isfinite(run.theta()).all() and not run.opt.stats["skipped"]


@pytest.mark.parametrize("direction", ALL_DIRS)
@pytest.mark.parametrize("explosion", ["inf and large", "squares overflow"])
def test_a_search_step_skips_an_exploded_gradient_bitwise(direction, explosion):
    # The guard reads g before a search step's first pass, which then writes nothing. A guard
    # that let the pass run and undid it (tried at ed36633, reverted) brought Adam's second
    # moments back to the rounding of (1-β2)·g², not of their own size: after a spike of 1e3
    # with one inf, a v of 1.6e-6 came back as 0 beside its m of 4e-3, and the next step moved
    # that weight by m/eps (0.9 on weights of about 1; a review's repro); SGD's θ − η·g came
    # back from elements of 1e19 to the rounding of η·g, larger than θ
    run = Run(direction, cadence="every")
    run.steps(2)
    before = run.snapshot()

    def exploded():
        out = run.closure()
        for p in run.model.parameters():
            if explosion == "inf and large":
                p.grad.mul_(1e3)
            else:  # every element squares to a finite 1e38; Σ g² overflows
                p.grad.fill_(1e19)
        if explosion == "inf and large":
            run.model[0].weight.grad[1, 1] = math.inf
        return out

    run.opt.step(exploded)
    assert run.opt.stats["skipped"] and run.opt.stats["searched"]
    after = run.snapshot()
    assert torch.equal(after["theta"], before["theta"])
    for pid, s in after["state"].items():
        for name, v in s.items():
            assert torch.equal(v, before["state"][pid][name]), name
    run.steps(2)
    assert torch.isfinite(run.theta()).all() and not run.opt.stats["skipped"]


def _skip_or_leave_out(run, skip):
    """One call whose gradient is NaN (skip) or, in the twin, its forward and backward without
    a step (the dropout draws and BatchNorm statistics as the skip's) and the step counter moved
    on as the skip moves it: the runs must go on alike."""
    if skip:
        def poisoned():
            out = run.closure()
            run.model[0].weight.grad.fill_(math.nan)
            return out

        run.opt.step(poisoned)
        assert run.opt.stats["skipped"]
    else:
        run.closure()
        for g in run.opt.param_groups:
            g["step"] += 1


def test_a_skipped_first_step_leaves_the_first_search_to_replace_init_step_size():
    # `searches` counts the skip, and the first real search was taken for a later one: the
    # step it backtracked to was averaged with the start it had rejected and held there by
    # max_drop (η̄ 0.5 against 0.0375 in a review's repro, θ 0.7 apart after 12 steps)
    runs = []
    for skip in (True, False):
        run = Run("adam", init_step_size=1.0, trend_guard=False)
        _skip_or_leave_out(run, skip)
        run.steps(4)
        runs.append(run)
    a, b = runs
    assert b.opt.param_groups[0]["step_size_avg"] < 0.5  # (the start was rejected: a backtrack)
    for key in ("step_size", "step_size_avg"):
        assert a.opt.param_groups[0][key] == b.opt.param_groups[0][key], key
    assert torch.equal(a.theta(), b.theta())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skipped_step_keeps_the_length_cap_of_the_steps_without_a_search(backend, monkeypatch):
    # the skipped pass's sums (zeros) became the record of ‖d‖ the next step's cap reads, which
    # then read no cap: SGD with momentum, whose d grows between searches, moved on uncapped
    # (a review's repro: 0.0409 against the capped 0.0391)
    import armijo_fused.optimizers.search as search

    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(30, 32, 8, generator=g), torch.randn(30, 32, 1, generator=g)

    def run(skip, ratio=search.STEP_LENGTH_RATIO):
        monkeypatch.setattr(search, "STEP_LENGTH_RATIO", ratio)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                              nn.Linear(16, 1))
        opt = ArmijoSGD(model.parameters(), model=model, momentum=0.9, nesterov=True,
                        backend=backend)
        plain = []
        for i in range(26):
            def closure(i=i):
                opt.zero_grad()
                out = nn.functional.mse_loss(model(xs[i]), ys[i])
                out.backward()
                if skip and i == 21:
                    model[0].weight.grad[0, 0] = math.nan
                return out
            if i == 21 and not skip:  # the twin: the batch left out, the count moved on
                for group in opt.param_groups:
                    group["step"] += 1
                continue
            opt.step(closure)
            plain.append(not opt.stats["searched"])
        assert plain[20] and plain[21]  # (the skipped step and the next: no search)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    skipped, left_out = run(True), run(False)
    assert not torch.equal(left_out, run(False, ratio=1e30))  # (the cap binds in this run)
    assert torch.equal(skipped, left_out)


def test_non_finite_gradient_on_the_very_first_step_leaves_fresh_state():
    run = Run("adam")
    theta = run.theta()

    def poisoned():
        out = run.closure()
        run.model[0].weight.grad.fill_(math.nan)
        return out

    run.opt.step(poisoned)
    assert run.opt.stats["skipped"] and torch.equal(run.theta(), theta)
    assert all(int(torch.count_nonzero(v)) == 0 for s in run.opt.state.values() for v in s.values())
    run.steps(2)
    assert torch.isfinite(run.theta()).all() and run.opt.stats["step_size"] > 0


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("triton", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("cadence", ["every", 1000], ids=["search", "plain"])
@pytest.mark.parametrize("bad", ["gradient", "loss"])
def test_skipped_step_does_not_count_in_the_bias_correction(backend, cadence, bad):
    # a skipped step folds nothing into the moments, so the bias corrections after it must be
    # those of a run that never saw it (torch's Adam does the same for GradScaler's skips).
    # On a GPU a plain step's skip flag is read one step late (no sync): the triton case.
    device = "cuda" if backend == "triton" else "cpu"
    g = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(5, 16, 5, generator=g), torch.randn(5, 16, 3, generator=g)
    xs, ys = xs.to(device), ys.to(device)

    def train(batches, poisoned_at=None):
        torch.manual_seed(0)
        model = nn.Linear(5, 3).to(device)
        opt = ArmijoAdam(model.parameters(), backend=backend, cadence=cadence)
        for i in batches:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(xs[i]), ys[i])
            loss.backward()
            if i == poisoned_at and bad == "gradient":
                model.weight.grad[0, 0] = math.nan
            if i == poisoned_at and bad == "loss":
                loss = loss * math.inf
            opt.step(loss_fn=lambda i=i: nn.functional.mse_loss(model(xs[i]), ys[i]), loss=loss)
            assert opt.stats["skipped"] == (i == poisoned_at)
        return model, opt

    model, opt = train([0, 1, 2, 3, 4], poisoned_at=2)
    twin, twin_opt = train([0, 1, 3, 4])
    assert opt.param_groups[0]["step"] == 5 and opt.param_groups[0]["folded"] == 4
    assert twin_opt.param_groups[0]["folded"] == 4
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][name], twin_opt.state[q][name]), name


@pytest.mark.parametrize("module", [nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2))])
def test_a_module_passed_as_params_is_named(module):
    with pytest.raises(TypeError, match=r"pass model.parameters\(\)"):
        ArmijoAdam(module)


def test_checkpoint_without_the_fold_count_resumes_with_the_step_count():
    model = nn.Linear(3, 2)
    opt = ArmijoAdam(model.parameters(), cadence="every")
    for _ in range(2):
        opt.step(make_closure(opt, lambda: model(torch.ones(1, 3)).square().sum()))
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        del group["folded"]  # as written before the count existed
    fresh = ArmijoAdam(model.parameters(), cadence="every")
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["folded"] == fresh.param_groups[0]["step"] == 2


def test_skipped_step_reports_no_applied_step():
    run = Run("adam", cadence=1000)
    run.steps(1)

    def poisoned():
        out = run.closure()
        run.model[1].bias.grad[0] = math.nan
        return out

    run.opt.step(poisoned)
    assert run.opt.stats["skipped"]
    assert run.opt.stats["applied_step"] == 0.0 and run.opt.stats["step_size"] == 0.0


@pytest.mark.parametrize("cadence", ["every", 1000])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_after_the_first_step_is_skipped(cadence, bad):
    run = Run("adam", cadence=cadence)
    run.steps(1)
    before = run.snapshot()
    l0 = run.backward()
    run.opt.step(loss_fn=run.loss, loss=l0 * bad)
    assert run.opt.stats["skipped"]
    assert torch.equal(run.theta(), before["theta"])
    run.steps(1)
    assert not run.opt.stats["skipped"] and torch.isfinite(run.theta()).all()


@pytest.mark.parametrize("form", ["closure", "loss_fn"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_first_loss_is_a_clear_error_and_the_optimizer_stays_usable(form, bad):
    run = Run("momentum")
    before = run.snapshot()
    with pytest.raises(ValueError, match=r"loss at the first step is not finite \((nan|-?inf)\)"):
        if form == "closure":
            run.opt.step(lambda: run.closure() * bad)
        else:  # no loss given: the optimizer evaluates f0 with the loss function itself
            run.backward()
            run.opt.step(loss_fn=lambda: run.loss() * bad)
    assert torch.equal(run.theta(), before["theta"])
    assert run.opt.param_groups[0]["step"] == 0 and run.opt.param_groups[0]["searches"] == 0
    assert nothing_leaked()
    run.steps(2)  # once the data is fixed, training starts normally
    assert run.opt.stats["step_size"] > 0 and torch.isfinite(run.theta()).all()


# == a closure or loss_fn that raises ============================================================
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exact", [False, True], ids=["inverse", "exact_revert"])
@pytest.mark.parametrize("direction", ALL_DIRS)
@pytest.mark.parametrize("at_trial", [1, 2, 5])
def test_loss_fn_raising_mid_search_restores_everything(at_trial, direction, exact, backend):
    # the twin never sees the fault; it runs first so that both draw the same dropout masks
    twin = Run(direction, backend=backend, exact_revert=exact)
    twin.steps(3)
    twin.backward(capture=False)  # the training forward below (BatchNorm, RNG draws)
    twin.steps(2)

    run = Run(direction, backend=backend, exact_revert=exact)
    run.steps(3)
    l0 = run.backward()
    before = run.snapshot()
    err = KeyError("data loader died")
    calls = [0]

    def flaky():
        calls[0] += 1
        if calls[0] == at_trial:
            raise err
        return run.loss() + 1.0  # rejected, so the search goes on to the next trial

    with pytest.raises(KeyError) as info:
        run.opt.step(loss_fn=flaky, loss=l0)
    assert info.value is err and calls[0] == at_trial
    assert_snapshots(before, run.snapshot(), exact=exact)
    assert second_moments_non_negative(run.opt) and nothing_leaked()
    # the next steps go on exactly as if the failed call had never happened
    run.steps(2)
    if exact:
        assert torch.equal(run.theta(), twin.theta())
    else:
        torch.testing.assert_close(run.theta(), twin.theta(), **INVERSE_TOL)
    assert run.opt.param_groups[0]["step"] == twin.opt.param_groups[0]["step"] == 5


@pytest.mark.parametrize("exact", [False, True], ids=["inverse", "exact_revert"])
@pytest.mark.parametrize("at_call", [1, 2, 4])
def test_closure_raising_restores_everything(at_call, exact):
    # call 1 is the training forward/backward (nothing written yet), later calls are trials
    run = Run("nadam", exact_revert=exact)
    run.steps(2)
    calls = [0]

    def flaky():
        calls[0] += 1
        if calls[0] == at_call:
            raise RuntimeError("CUDA error: an illegal memory access")  # what users do see
        out = run.closure()
        return out if calls[0] == 1 else out + 1.0

    before = run.snapshot()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run.opt.step(flaky)
    assert_restored_but_the_training_forward(before, run, exact=exact)
    run.steps(1)
    assert torch.isfinite(run.theta()).all() and run.opt.stats["step_size"] > 0


def test_a_retried_closure_step_draws_the_same_dropout_masks_as_an_uninterrupted_run():
    # θ and the state were put back bitwise (exact_revert) after a trial raised, but the
    # training call's dropout draws stayed drawn: the retried step drew other masks, and the
    # run parted from the uninterrupted one by 0.01 (a LoRA user's audit). The generators now
    # go back to where the call found them too
    x = torch.randn(16, 6)

    def run(fault):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 1))
        opt = ArmijoAdam(model.parameters(), model=model, cadence="every", exact_revert=True,
                         max_step=1e-2)
        raised = []
        for step in range(5):
            def closure():
                if fault and step == 3 and trial_mod.in_trial() and not raised:
                    raised.append(1)
                    raise RuntimeError("CUDA out of memory (simulated)")
                opt.zero_grad()
                loss = model(x).pow(2).mean()
                if torch.is_grad_enabled():
                    loss.backward()
                return loss

            if fault and step == 3:
                rng = torch.get_rng_state()
                with pytest.raises(RuntimeError, match="simulated"):
                    opt.step(closure)
                assert torch.equal(torch.get_rng_state(), rng)
            opt.step(closure)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    assert torch.equal(run(True), run(False))


def test_keyboard_interrupt_mid_search_restores_bitwise():
    run = Run("adam", exact_revert=True)
    run.steps(2)
    l0 = run.backward()
    before = run.snapshot()
    calls = [0]

    def interrupted():
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return run.loss() + 1.0

    with pytest.raises(KeyboardInterrupt):
        run.opt.step(loss_fn=interrupted, loss=l0)
    assert_snapshots(before, run.snapshot(), exact=True)
    assert nothing_leaked()


class TwoGroupRun(Run):
    """Run with two param groups: two flat buffers, so a pass is two launches."""

    def __init__(self, direction="adam", seed=0, **kw):
        torch.manual_seed(seed)
        self.model = net()
        g = torch.Generator().manual_seed(seed + 1)
        self.x, self.y = torch.randn(32, 6, generator=g), torch.randn(32, 1, generator=g)
        kw.setdefault("weight_decay", 0.01)
        m = self.model
        groups = [{"params": list(m[0].parameters()) + list(m[1].parameters())},
                  {"params": list(m[4].parameters())}]
        self.opt = make_opt(direction, groups, model=m, **kw)
        torch.manual_seed(seed + 2)


def _fail_on_call(monkeypatch, backend, name, at_call, exc):
    """Make the backend's pass ``name`` raise on its ``at_call``-th launch (1-based)."""
    from armijo_fused.backends import cpp_backend, torch_backend

    module = {"torch": torch_backend, "cpp": cpp_backend}[backend]
    original, calls = getattr(module, name), [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at_call:
            raise exc("injected: the second buffer's launch failed")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["first_pass", "move", "plain"])
def test_a_pass_failing_between_two_buffers_rolls_back_the_first(where, exc, backend,
                                                                  monkeypatch):
    # Two groups are two launches per pass: an error (or Ctrl-C) after the first buffer's
    # launch must undo that buffer's update too, in a step with a search and in one without.
    run = TwoGroupRun("adam", backend=backend, cadence=1000 if where == "plain" else "every")
    run.steps(2)
    if where == "move":  # a first trial far too long: the search backtracks (move runs)
        for g in run.opt.param_groups:
            g["step_size"] = 5.0
    before = run.snapshot()
    calls = _fail_on_call(monkeypatch, backend, "move" if where == "move" else "first_pass",
                          2, exc)
    with pytest.raises(exc, match="injected"):
        run.opt.step(run.closure)
    assert calls[0] >= 2  # (the rollback moves the first buffer back: more calls)
    monkeypatch.undo()
    # "move": the first trial sat at η = 5 along an Adam |d| of order 1, so θ0 comes back to a few
    # ulps of 5 (atol 1e-6 held on an Intel CPU by luck: 1.3e-6 on an AMD one, at HEAD too)
    tol = {"theta_atol": 16 * 5.0 * torch.finfo(torch.float32).eps} if where == "move" else {}
    assert_restored_but_the_training_forward(before, run, exact=False, **tol)
    run.steps(1)
    assert torch.isfinite(run.theta()).all() and not run.opt.stats["skipped"]


@pytest.mark.parametrize("cadence", ["every", 1000], ids=["search", "plain"])
def test_a_failing_length_cap_collective_rolls_back_the_step(cadence, monkeypatch):
    # Under FSDP2 the step's ‖d_b‖² (the next step's length cap) is all-reduced: a rank whose
    # collective fails must leave θ and the state as they were, not a step applied but uncounted
    run = Run("adam", cadence=cadence)
    run.steps(2)
    before = run.snapshot()

    def failing(*args):
        raise RuntimeError("injected: the all-reduce of the step lengths failed")

    monkeypatch.setattr(run.opt, "_step_dd", failing)
    with pytest.raises(RuntimeError, match="injected"):
        run.opt.step(run.closure)
    monkeypatch.undo()
    assert_restored_but_the_training_forward(before, run, exact=False)
    run.steps(1)
    assert torch.isfinite(run.theta()).all() and not run.opt.stats["skipped"]


@pytest.mark.parametrize("exact", [False, True], ids=["inverse", "exact_revert"])
def test_raising_after_the_non_descent_fallback_restores_theta0(exact):
    # Adam's momentum points uphill once the gradient flips: the search moves to the
    # preconditioned gradient, and a revert from there must recover θ0 along that direction.
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(10))
    sign = [1.0]

    def loss():
        return ((w - 5.0 * sign[0]) ** 2).mean()

    opt = ArmijoAdam([w], backend="torch", cadence="every", exact_revert=exact)

    def step(fn):
        opt.zero_grad()
        l0 = loss()
        l0.backward()
        return opt.step(loss_fn=fn, loss=l0)

    for _ in range(6):
        step(loss)
    sign[0] = -1.0
    theta, state = w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()}
    calls = [0]

    def flaky():
        calls[0] += 1
        if calls[0] == 2:  # trial 1 found ⟨g, d⟩ <= 0; trial 2 is on the fallback direction
            raise RuntimeError("boom")
        return loss() + 100.0

    with pytest.raises(RuntimeError, match="boom"):
        step(flaky)
    cmp = torch.equal if exact else (lambda a, b: torch.allclose(a, b, **INVERSE_TOL))
    assert cmp(w.detach(), theta)
    assert all(cmp(v, state[k]) for k, v in opt.state[w].items())
    step(loss)
    assert opt.stats["non_descent"]  # the fault hit the path it was meant to hit


@pytest.mark.parametrize("mode", ["exact", "round_robin"])
def test_raising_in_a_layerwise_search_restores_everything(mode):
    run = Run("adam", layerwise=True, block_search=mode, exact_revert=True, max_trials=3)
    run.steps(2)
    l0 = run.backward()
    before = run.snapshot()
    calls = [0]

    raise_at = 4 if mode == "exact" else 2  # exact: block 0 exhausts after 3 trials, 4 is block 1's

    def flaky():
        calls[0] += 1
        if calls[0] == raise_at:
            raise OSError("disk full")
        return run.loss() + 1.0

    with pytest.raises(OSError):
        run.opt.step(loss_fn=flaky, loss=l0)
    after = run.snapshot()
    for g in before["groups"] + after["groups"]:
        g.pop("block_cursor", None)  # see the test below
    assert_snapshots(before, after, exact=True)


def test_raising_layerwise_round_robin_step_does_not_advance_the_cursor():
    run = Run("adam", layerwise=True, block_search="round_robin")
    run.steps(1)
    cursor = run.opt.param_groups[0]["block_cursor"]
    l0 = run.backward()

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run.opt.step(loss_fn=broken, loss=l0)
    assert run.opt.param_groups[0]["block_cursor"] == cursor


# == exhausted trials ============================================================================
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ALL_DIRS)
def test_exhausted_search_falls_back_to_theta0_and_resets_the_step_size(direction, backend):
    # The documented fallback keeps the gradient in the state, as a step with lr 0 would: the
    # twin takes that step (a scheduler at 0). It runs first so both draw the same dropout masks.
    twin = Run(direction, backend=backend, max_trials=6)
    sched = torch.optim.lr_scheduler.LambdaLR(twin.opt, lambda s: 1.0 if s < 3 else 0.0)
    for _ in range(3):
        twin.steps(1)
        sched.step()
    l0 = twin.backward()
    twin.opt.step(loss_fn=twin.loss, loss=l0)

    run = Run(direction, backend=backend, max_trials=6)
    run.steps(3)
    theta0 = run.theta()
    avg = run.opt.param_groups[0]["step_size_avg"]
    l0 = run.backward()
    run.opt.step(loss_fn=lambda: run.loss() + 1.0, loss=l0)  # every trial looks worse
    s = run.opt.stats
    # (an exhausted search is not reported as a collapse: none was accepted)
    assert s["exhausted"] and not s["collapsed"] and not s["skipped"] and not s["unresolved"]
    assert s["trials"] == 6 and s["step_size"] == 0.0 and s["applied_step"] == 0.0
    assert s["next_step_size"] == avg == run.opt.param_groups[0]["step_size"]
    torch.testing.assert_close(run.theta(), theta0, **INVERSE_TOL)
    assert twin.opt.stats["applied_step"] == 0.0
    torch.testing.assert_close(twin.theta(), theta0, **INVERSE_TOL)
    for p, q in zip(run.model.parameters(), twin.model.parameters()):
        for name, v in run.opt.state[p].items():
            torch.testing.assert_close(v, twin.opt.state[q][name], rtol=1e-6, atol=1e-7)
    # and training continues
    with torch.no_grad():
        run.model.eval()
        before = float(run.loss())
        run.model.train()
    run.steps(6)
    with torch.no_grad():
        run.model.eval()
        assert float(run.loss()) < before
    assert torch.isfinite(run.theta()).all()


@pytest.mark.filterwarnings("ignore:.*gradient is zero everywhere")
def test_steps_after_an_exhausted_search_do_not_apply_a_rejected_step_size():
    torch.manual_seed(0)
    w = nn.Parameter(torch.tensor([1.0, -0.5, 0.25]))
    curvature = [1.0]
    opt = ArmijoSGD([w], backend="torch", max_trials=8)  # the default adaptive cadence

    def closure():
        opt.zero_grad()
        out = 0.5 * curvature[0] * (w * w).sum()
        out.backward()
        return out

    for _ in range(60):  # η settles near 1 and the cadence backs off to every 10th step
        opt.step(closure)
    g = opt.param_groups[0]
    while g["next_search"] != g["step"] + 1:
        opt.step(closure)
    assert g["search_interval"] == 10
    curvature[0] = 300.0  # the landscape stiffens, as it does when a network starts to diverge
    with torch.no_grad():
        w.copy_(torch.tensor([1.0, -0.5, 0.25]))
    before = float(opt.step(closure))
    assert opt.stats["exhausted"]  # every trial down to 1.2·η̄/128 was rejected: no step
    for _ in range(4):
        opt.step(closure)
    with torch.no_grad():
        after = float(0.5 * curvature[0] * (w * w).sum())
    assert after <= before


def test_a_loss_that_needs_steps_below_the_backtracking_range_trains_after_two_searches():
    # ArmijoSGD at η̄ = 1 on a loss scaled by 1e4 (a sum, not a mean): every search tried the
    # same 20 step sizes from η̄ down to 1e-6 and exhausted, at 21 forwards per step, for good
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    opt = ArmijoSGD(model.parameters(), cadence="every", backend="torch")

    def closure():
        opt.zero_grad()
        loss = 1e4 * nn.functional.mse_loss(model(x), y, reduction="sum")
        loss.backward()
        return loss

    exhausted, losses = [], []
    for _ in range(8):
        losses.append(float(opt.step(closure).detach()))
        exhausted.append(opt.stats["exhausted"])
    assert exhausted[:2] == [True, True] and not any(exhausted[2:])
    assert losses[-1] < 0.7 * losses[0]


def test_exhausted_layerwise_search_restores_and_continues():
    run = Run("adam", layerwise=True, block_search="exact", max_trials=3)
    run.steps(2)
    theta0 = run.theta()
    l0 = run.backward()
    run.opt.step(loss_fn=lambda: run.loss() + 1.0, loss=l0)
    assert run.opt.stats["step_size"] == [0.0] * len(run.opt.stats["step_size"])
    torch.testing.assert_close(run.theta(), theta0, **INVERSE_TOL)
    run.steps(2)
    assert any(e > 0 for e in run.opt.stats["step_size"])


# == degenerate inputs ===========================================================================
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ALL_DIRS)
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.filterwarnings("ignore:.*gradient is zero everywhere")
def test_zero_gradients_take_no_step_and_produce_no_nan(direction, wd, backend):
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    opt = make_opt(direction, model.parameters(), backend=backend, weight_decay=wd,
                   cadence="every")
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    for _ in range(3):  # a loss that does not depend on θ: every gradient is exactly zero
        opt.step(make_closure(opt, lambda: (model.weight * 0).sum() + 1.0))
        assert opt.stats["unresolved"] and opt.stats["step_size"] == 0.0
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    if wd == 0.0:
        assert torch.equal(after, theta)
    else:  # θ0 is recovered from θ0 - η·wd·θ0 by a division: exact to rounding
        torch.testing.assert_close(after, theta, rtol=1e-6, atol=0)
    assert all(bool(torch.isfinite(v).all()) for s in opt.state.values() for v in s.values())


def _mlp_regression(offset=0.0, **kw):
    """An MLP on random targets (loss ~1, ⟨g,d⟩ ~5 at the start), optimizer and closure."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    x, y = torch.randn(256, 16), torch.randn(256, 1)
    opt = ArmijoAdam(model.parameters(), model=model, backend="torch", **kw)
    return opt, make_closure(opt, lambda: nn.functional.mse_loss(model(x), y) + offset)


def test_a_small_c_still_searches():
    # "unresolved" compares the predicted decrease η⟨g,d⟩ with the loss's resolution, not its
    # c-fraction: at the textbook c = 1e-4 every search was unresolved and η never moved
    opt, closure = _mlp_regression(c=1e-4)
    for _ in range(20):
        opt.step(closure)
        assert not (opt.stats["searched"] and opt.stats["unresolved"])
    assert opt.param_groups[0]["step_size"] > 1e-3


def test_a_constant_offset_in_the_loss_does_not_stop_the_search():
    # the same gradient, a loss 1000 larger: fp32 still resolves these decreases (ulp 6e-5)
    runs = [_mlp_regression(offset) for offset in (0.0, 1000.0)]
    for _ in range(60):
        for opt, closure in runs:
            opt.step(closure)
            assert not opt.stats["unresolved"]
    assert [o.param_groups[0]["searches"] for o, _ in runs] == [runs[0][0].param_groups[0]["searches"]] * 2


def test_loss_resolution_follows_the_loss_dtype():
    from armijo_fused.linesearch.controller import loss_resolution

    assert loss_resolution(torch.tensor(1.0)) == 8 * torch.finfo(torch.float32).eps
    assert loss_resolution(torch.tensor(1.0, dtype=torch.float64)) == loss_resolution(
        torch.tensor(1.0))  # a Python float arrives as float64: usually one's .item()
    assert loss_resolution(torch.tensor(1.0, dtype=torch.bfloat16)) == 8 * 2.0 ** -7
    assert loss_resolution(torch.tensor(1.0, dtype=torch.float16)) == 8 * 2.0 ** -10


def test_groups_that_are_empty_frozen_or_gradient_free():
    torch.manual_seed(0)
    trained = nn.Linear(4, 2)
    frozen = nn.Linear(4, 2).requires_grad_(False)
    unused = nn.Parameter(torch.randn(3))
    gain = nn.Parameter(torch.tensor(1.5))  # 0-dim, and trained
    opt = ArmijoAdam([{"params": list(frozen.parameters())}, {"params": []},
                      {"params": list(trained.parameters()) + [gain], "weight_decay": 0.1},
                      {"params": [unused]}], backend="torch", cadence="every")
    frozen_before = [p.clone() for p in frozen.parameters()]
    unused_before = unused.detach().clone()
    x = torch.randn(16, 4)
    loss = lambda: (gain * trained(x) + frozen(x)).pow(2).mean()
    gain0 = float(gain.detach())
    for _ in range(4):
        opt.step(make_closure(opt, loss))
    assert all(torch.equal(p, q) for p, q in zip(frozen.parameters(), frozen_before))
    assert torch.equal(unused.detach(), unused_before)  # zero gradient, no weight decay: fixed
    assert gain.shape == () and float(gain.detach()) != gain0 and math.isfinite(float(gain.detach()))


def _two_part_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", [{}, {"layerwise": True}, {"layerwise": True,
                                                             "block_search": "exact"}],
                         ids=["global", "round_robin", "exact"])
def test_a_group_with_lr_zero_stays_bitwise_and_out_of_the_search(backend, mode):
    """A group whose lr is 0 (frozen by lr, as torch users do) keeps θ bitwise, in trials too,
    and is not part of the Armijo test: the other group trains exactly as an optimizer that only
    holds it, step sizes included."""
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    a, b = _two_part_model(), _two_part_model()
    kw = dict(backend=backend, cadence="every", weight_decay=0.1, **mode)
    # one group per layer (one block each in layer-wise mode); b lacks the frozen one
    opt_a = ArmijoAdam([{"params": a[0].parameters(), "lr": 0.0},
                        {"params": a[2].parameters()}, {"params": a[4].parameters()}],
                       model=a, **kw)
    opt_b = ArmijoAdam([{"params": b[2].parameters()}, {"params": b[4].parameters()}],
                       model=b, **kw)
    frozen_before = [p.detach().clone() for p in a[0].parameters()]
    touched = []
    hook = a[0].register_forward_pre_hook(
        lambda m, inp: touched.append(not torch.equal(m.weight, frozen_before[0])))
    for _ in range(6):
        la = opt_a.step(make_closure(opt_a, lambda: (a(x) - y).pow(2).mean()))
        lb = opt_b.step(make_closure(opt_b, lambda: (b(x) - y).pow(2).mean()))
        assert float(la) == float(lb)
        sa, sb = opt_a.stats, opt_b.stats
        assert sa["trials"] == sb["trials"] >= 1
        if mode:  # the frozen block keeps its η; the others' equal b's
            assert sa["step_size"][0] == 1e-3 and sa["step_size"][1:] == sb["step_size"]
            assert sa["searched_blocks"] == [i + 1 for i in sb["searched_blocks"]]
        else:
            assert sa["step_size"] == sb["step_size"]
    hook.remove()
    assert not any(touched)  # no trial forward saw the frozen group moved
    assert all(torch.equal(p, q) for p, q in zip(a[0].parameters(), frozen_before))
    assert int(torch.count_nonzero(opt_a.state[a[0].weight]["exp_avg"])) > 0  # as torch: folded
    for p, q in zip(list(a[2].parameters()) + list(a[4].parameters()),
                    list(b[2].parameters()) + list(b[4].parameters())):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_step_where_every_lr_is_zero_searches_nothing_and_moves_nothing():
    """Warmup from 0 (transformers' get_linear_schedule_with_warmup): the first step's lr is 0,
    so it tests nothing (no trial forward) and moves nothing; the next step searches."""
    model = _two_part_model()
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    opt = ArmijoAdam(model.parameters(), model=model, backend="torch")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step / 10)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(make_closure(opt, lambda: (model(x) - y).pow(2).mean()))
    assert opt.stats["trials"] == 0 and not opt.stats["searched"]
    assert opt.stats["forwards"] == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    sched.step()
    opt.step(make_closure(opt, lambda: (model(x) - y).pow(2).mean()))
    assert opt.stats["searched"] and opt.stats["trials"] >= 1
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_candidates_with_a_group_at_lr_zero_keep_it_fixed():
    model = _two_part_model()
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    opt = ArmijoAdam([{"params": model[0].parameters(), "lr": 0.0},
                      {"params": list(model[2].parameters()) + list(model[4].parameters())}],
                     model=model, backend="torch", cadence="every", candidates=3)
    before = [p.detach().clone() for p in model[0].parameters()]
    w4 = model[4].weight.detach().clone()
    for _ in range(3):
        opt.step(make_closure(opt, lambda: (model(x) - y).pow(2).mean()))
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), before))
    assert not torch.equal(model[4].weight, w4)


def test_only_frozen_parameters_is_a_no_op_that_returns_the_loss():
    model = nn.Linear(3, 1).requires_grad_(False)
    opt = ArmijoAdam(model.parameters(), backend="torch")
    out = opt.step(lambda: model(torch.ones(2, 3)).sum())
    assert float(out) == float(model(torch.ones(2, 3)).sum())


def test_freezing_and_unfreezing_mid_training_keeps_the_frozen_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(16, 4)
    opt = ArmijoAdam(model.parameters(), backend="torch", cadence="every")
    loss = lambda: model(x).pow(2).mean()
    for _ in range(3):
        opt.step(make_closure(opt, loss))
    w = model[0].weight
    saved = {k: v.clone() for k, v in opt.state[w].items()}
    w_before = w.detach().clone()
    w.requires_grad_(False)
    for _ in range(2):
        opt.step(make_closure(opt, loss))
    assert torch.equal(w.detach(), w_before)
    assert all(torch.equal(opt.state[w][k], v) for k, v in saved.items())
    w.requires_grad_(True)
    opt.step(make_closure(opt, loss))
    assert not torch.equal(w.detach(), w_before)
    (buf,) = opt._buffers  # back in the flat buffer, its moments carried over (not zeroed)
    assert w.untyped_storage().data_ptr() == buf.param.untyped_storage().data_ptr()
    assert int(torch.count_nonzero(opt.state[w]["exp_avg_sq"])) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_parameter_spanning_many_tiles(backend):
    # 2^18 + 3 elements: 129 tiles of 2048, the last one mostly padding
    n = (1 << 18) + 3
    g = torch.Generator().manual_seed(0)
    target = torch.randn(n, generator=g)
    w = nn.Parameter(torch.zeros(n))
    opt = ArmijoSGD([w], backend=backend, cadence="every")
    opt.step(make_closure(opt, lambda: 0.5 * (w - target).pow(2).sum() / n))
    eta = opt.stats["step_size"]
    # one SGD step from 0 on this quadratic: θ = η · target / n (each element exactly)
    torch.testing.assert_close(w.detach(), eta * target / n, rtol=1e-6, atol=0)
    assert opt._buffers[0].layout.ntiles == 129


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_channels_last_parameters_train_like_contiguous_ones(backend):
    def build(contiguous):
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 4, 3)
        lin = nn.Linear(5, 4)
        if not contiguous:
            conv = conv.to(memory_format=torch.channels_last)
            lin.weight = nn.Parameter(lin.weight.detach().t().contiguous().t())  # transposed view
            assert not lin.weight.is_contiguous() and not conv.weight.is_contiguous()
        return conv, lin

    out = []
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    z = torch.randn(7, 5, generator=torch.Generator().manual_seed(2))
    for contiguous in (True, False):
        conv, lin = build(contiguous)
        params = list(conv.parameters()) + list(lin.parameters())
        opt = ArmijoAdam(params, backend=backend, cadence="every")

        def loss(conv=conv, lin=lin):
            return conv(x).pow(2).mean() + lin(z).pow(2).mean()

        strides = [p.stride() for p in params]
        for _ in range(4):
            opt.step(make_closure(opt, loss))
        out.append(torch.cat([p.detach().reshape(-1) for p in params]))
        assert conv(x).shape == (2, 4, 4, 4)  # the model still runs on the re-pointed views
        # the layout is the model's: a channels_last weight stays channels_last (the convolution
        # it picks does not change under the optimizer), and so do its gradient and state
        assert [p.stride() for p in params] == strides
        assert [p.grad.stride() for p in params] == strides
        assert [opt.state[p]["exp_avg"].stride() for p in params] == strides
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) != contiguous
        buf = opt._buffers[0]
        assert all(buf.param.data_ptr() <= p.data_ptr() < buf.param.data_ptr()
                   + 4 * buf.param.numel() for p in params)  # still views of the flat buffer
    # not bitwise: the first forward ran a channels_last convolution, which rounds differently
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-6)


def test_a_parameter_listed_twice_is_one_parameter():
    # tied weights gathered from two modules' parameter lists: torch warns and steps it twice;
    # here it is one view, so <g, d> counts it once and the store is not rebuilt every step
    from armijo_fused.storage import flat

    def run(params_of):
        torch.manual_seed(0)
        emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        head.weight = emb.weight
        tokens = torch.randint(0, 10, (16,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's "duplicate parameters"
            opt = ArmijoAdam(params_of(emb, head), backend="torch", cadence="every")
        gds = []
        for _ in range(3):
            opt.step(make_closure(opt, lambda: nn.functional.cross_entropy(head(emb(tokens)),
                                                                          tokens)))
            gds.append(opt.stats["gd"])
        return gds, emb.weight.detach().clone()

    built = []
    real_init = flat.FlatBuffer.__init__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flat.FlatBuffer, "__init__",
                   lambda self, *a, **k: (built.append(1), real_init(self, *a, **k))[1])
        twice = run(lambda e, h: list(e.parameters()) + list(h.parameters()))
    once = run(lambda e, h: list(e.parameters()))
    assert len(built) == 1  # built once, not every step
    assert twice[0] == once[0]
    assert torch.equal(twice[1], once[1])


def test_a_refused_param_group_leaves_the_optimizer_as_it_was():
    torch.manual_seed(0)
    base, extra = nn.Linear(4, 1), nn.Linear(4, 1)
    x = torch.randn(8, 4)
    opt = ArmijoAdam(base.parameters(), backend="torch", cadence="every")
    opt.step(make_closure(opt, lambda: base(x).pow(2).mean()))
    for bad in ({"weight_decay": -1.0}, {"betas": (0.9, 1.5)}):
        with pytest.raises(ValueError, match="invalid"):
            opt.add_param_group({"params": list(extra.parameters()), **bad})
        assert len(opt.param_groups) == 1
    opt.step(make_closure(opt, lambda: base(x).pow(2).mean()))  # failed with KeyError before
    opt.add_param_group({"params": list(extra.parameters())})  # and the same group, valid
    opt.step(make_closure(opt, lambda: (base(x) + extra(x)).pow(2).mean()))
    assert opt.param_groups[1]["folded"] == 1


def test_tied_parameters_in_layerwise_mode_and_across_groups():
    torch.manual_seed(0)

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(10, 4)
            self.h = nn.ModuleList([nn.Linear(4, 4)])
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.wte.weight

        def forward(self, t):
            return self.lm_head(torch.tanh(self.h[0](self.wte(t))))

    model = TiedLM()
    tokens = torch.randint(0, 10, (32,))
    opt = ArmijoAdam(model.parameters(), backend="torch", layerwise=True, model=model,
                     cadence="every")
    loss = lambda: nn.functional.cross_entropy(model(tokens), tokens)
    first = float(loss().detach())
    for _ in range(10):
        opt.step(make_closure(opt, loss))
    assert model.lm_head.weight is model.wte.weight
    assert float(loss().detach()) < first
    with pytest.raises(ValueError, match="more than one parameter group"):
        ArmijoAdam([{"params": [model.wte.weight]}, {"params": [model.lm_head.weight]}])


def test_mixed_dtypes_are_supported_per_dtype_buffer():
    def run(params):
        opt = ArmijoAdam(params, backend="torch", cadence="every")
        for _ in range(3):
            opt.step(make_closure(opt, lambda: sum((p.float() - 1).pow(2).sum() for p in params)))
        return opt

    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = run([a, b])
    assert sorted(str(buf.dtype) for buf in opt._buffers) == ["torch.float32", "torch.float64"]
    assert a.dtype == torch.float32 and b.dtype == torch.float64
    assert opt.stats["step_size"] > 0 and torch.isfinite(a).all() and torch.isfinite(b).all()
    with pytest.raises(ValueError, match="layerwise=True needs each param group on one device"):
        o = ArmijoAdam([{"params": [a, b]}, {"params": [nn.Parameter(torch.ones(2))]}],
                       backend="torch", layerwise=True)
        o.step(make_closure(o, lambda: a.sum() + b.sum().float()))


@needs_cpp
def test_fused_backend_named_for_float64_is_a_clear_error():
    w = nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = ArmijoAdam([w], backend="cpp")
    with pytest.raises(ValueError, match="takes float32 parameters, got torch.float64"):
        opt.step(make_closure(opt, lambda: w.pow(2).sum()))
    assert torch.isfinite(w).all()


@pytest.mark.gpu
@pytest.mark.parametrize("make", [lambda ps: ArmijoAdam(ps, cadence="every"),
                                  lambda ps: ArmijoSGD(ps, momentum=0.9, cadence="every")],
                         ids=["adam", "sgd-momentum"])
def test_parameters_on_two_devices_are_supported(make):
    # (SGD momentum: the test along d reads the first pass's ⟨g, d⟩ of every buffer at once)
    a = nn.Parameter(torch.randn(8))
    b = nn.Parameter(torch.randn(8, device="cuda"))
    opt = make([a, b])
    for _ in range(3):
        opt.step(make_closure(opt, lambda: a.pow(2).sum() + b.pow(2).sum().cpu()))
    assert {buf.device.type for buf in opt._buffers} == {"cpu", "cuda"}
    assert opt.stats["step_size"] > 0 and torch.isfinite(a).all() and torch.isfinite(b).all()


def test_sparse_gradient_error_leaves_the_model_usable():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, sparse=True)
    head = nn.Linear(4, 1)
    params = list(head.parameters()) + list(emb.parameters())
    before = [p.detach().clone() for p in params]
    opt = ArmijoSGD(params, backend="torch", cadence="every")
    tokens = torch.randint(0, 10, (8,))
    loss = lambda: head(emb(tokens)).pow(2).mean()
    with pytest.raises(RuntimeError, match="sparse gradients .* use sparse=False"):
        opt.step(make_closure(opt, loss))
    assert all(torch.equal(p.detach(), q) for p, q in zip(params, before))
    emb.sparse = False  # the fix the message names
    opt.step(make_closure(opt, loss))
    assert opt.stats["step_size"] > 0 and all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sparse_gradient_assigned_after_the_store_exists_is_the_same_clear_error(backend):
    # (the store compared the gradient's data_ptr with its slot first: a sparse tensor has
    # none, "Cannot access data pointer of Tensor that doesn't have storage")
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = ArmijoAdam(model.parameters(), backend=backend)
    x = torch.randn(8, 4)
    opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    before = [p.detach().clone() for p in model.parameters()]
    state = [v.clone() for v in opt.state[model.weight].values() if torch.is_tensor(v)]
    model.weight.grad = torch.zeros(3, 4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients .* use sparse=False"):
        opt.step(loss_fn=lambda: model(x).pow(2).mean())
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(v, w) for v, w in zip(
        [v for v in opt.state[model.weight].values() if torch.is_tensor(v)], state))
    opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))  # a dense one steps again
    assert opt.stats["step_size"] > 0


def test_complex_parameters_are_a_clear_error():
    with pytest.raises(TypeError, match="parameters must be floating point, got torch.complex64"):
        ArmijoAdam([nn.Parameter(torch.randn(3, dtype=torch.complex64))])


# == wrong usage: clear messages =================================================================
def _usage_setup():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(8, 4)
    return model, x


@pytest.mark.parametrize("call, exc, match", [
    (lambda opt, m, x: opt.step(lambda: m(x)), ValueError,
     r"the closure returned a tensor of shape \(8, 1\); expected a scalar loss"),
    (lambda opt, m, x: opt.step(lambda: None), TypeError,
     "the closure returned NoneType; expected a scalar loss"),
    (lambda opt, m, x: opt.step(lambda: "0.5"), TypeError, "the closure returned str"),
    (lambda opt, m, x: opt.step(3.0), TypeError, "closure must be callable, got float"),
    (lambda opt, m, x: opt.step(loss_fn="loss"), TypeError, "loss_fn must be callable, got str"),
    (lambda opt, m, x: opt.set_closure(m(x)), TypeError, "closure must be callable, got Tensor"),
    (lambda opt, m, x: opt.step(loss_fn=lambda: m(x).mean(), loss=m(x)), ValueError,
     r"loss= is a tensor of shape \(8, 1\)"),
    (lambda opt, m, x: opt.provide_loss("a"), TypeError, "provide_loss\\(\\) got str"),
    (lambda opt, m, x: opt.step(lambda: m(x).mean(), loss=m(x).mean()), ValueError,
     "pass loss= only without a closure"),
])
def test_wrong_calls_are_clear_errors_that_change_nothing(call, exc, match):
    model, x = _usage_setup()
    opt = ArmijoAdam(model.parameters(), backend="torch")
    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(exc, match=match):
        call(opt, model, x)
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), theta))
    assert opt.param_groups[0]["step"] == 0
    assert nothing_leaked()


@pytest.mark.parametrize("src, dst, match", [
    (dict(cls=ArmijoSGD, momentum=0.9), dict(cls=ArmijoAdam), "lack 'betas', 'eps'"),
    (dict(cls=ArmijoAdam), dict(cls=ArmijoSGD, momentum=0.9), "lack 'momentum'"),
    (dict(cls=ArmijoAdam, direction="rmsprop"), dict(cls=ArmijoAdam), "lack 'betas'"),
])
def test_a_state_dict_of_another_direction_is_refused_and_changes_nothing(src, dst, match):
    """It replaced the groups' hyperparameters and left moments the rule cannot use, and the
    next step failed with a KeyError; now the load is refused by name, and the optimizer goes
    on as it was."""
    model, x = _usage_setup()

    def make(spec):
        spec = dict(spec)
        return spec.pop("cls")(model.parameters(), backend="torch", **spec)

    def step(opt):
        opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))

    source, target = make(src), make(dst)
    step(source)
    step(target)
    before = {k: v for k, v in target.param_groups[0].items() if k != "params"}
    theta = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in target.state.items()}
    assert state and all(state.values())  # the target has state of its own to lose
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(source.state_dict())
    assert {k: v for k, v in target.param_groups[0].items() if k != "params"} == before
    # nothing changed: the target's state (the same tensors, the same values) and θ
    assert {id(p): set(s) for p, s in target.state.items()} == {
        i: set(s) for i, s in state.items()}
    assert all(torch.equal(v, state[id(p)][k]) for p, s in target.state.items()
               for k, v in s.items())
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), theta))
    step(target)  # still usable
    assert target.param_groups[0]["step"] == 2


@pytest.mark.parametrize("lr", [-1e-3, math.nan, torch.tensor([1e-3, 2e-3]), "1e-3", True])
@pytest.mark.parametrize("where", ["argument", "group"])
def test_invalid_lr_is_named(lr, where):
    model, _ = _usage_setup()
    params = model.parameters() if where == "argument" else [{"params": model.parameters(),
                                                             "lr": lr}]
    with pytest.raises(ValueError, match="invalid lr"):
        ArmijoSGD(params, **({"lr": lr} if where == "argument" else {}))


@pytest.mark.parametrize("bad", [-0.1, math.nan])
def test_scheduler_writing_an_invalid_lr_is_named_before_anything_moves(bad):
    model, x = _usage_setup()
    opt = ArmijoAdam(model.parameters(), backend="torch", cadence="every")
    opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    theta = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = bad
    with pytest.raises(ValueError, match="invalid lr"):
        opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), theta))


def test_infinite_lr_is_rejected_at_construction():
    model, _ = _usage_setup()
    with pytest.raises(ValueError, match="invalid lr"):
        ArmijoAdam(model.parameters(), lr=math.inf)


def test_scheduler_writing_an_infinite_lr_does_not_corrupt_the_model():
    # refused by name at the step, as a NaN or negative lr is, before anything moves
    model, x = _usage_setup()
    opt = ArmijoAdam(model.parameters(), backend="torch", cadence="every")
    opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    theta = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model.weight].items()}
    opt.param_groups[0]["lr"] = math.inf
    with pytest.raises(ValueError, match=r"invalid lr: inf"):
        opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), theta))
    assert all(torch.equal(opt.state[model.weight][k], v) for k, v in state.items())
    assert opt.param_groups[0]["step"] == 1


@pytest.mark.parametrize("key, value, match", [
    ("weight_decay", math.nan, "invalid weight_decay"),  # a weight-decay schedule gone wrong
    ("weight_decay", -1.0, "invalid weight_decay"),
    ("betas", (0.9, 1.0), r"invalid betas\[1\]"),  # was a bare ZeroDivisionError
    ("eps", 0.0, "invalid eps"),
])
def test_hyperparameters_written_mid_run_are_validated_before_anything_moves(key, value, match):
    model, x = _usage_setup()
    opt = ArmijoAdam(model.parameters(), backend="torch", cadence=2)
    closure = make_closure(opt, lambda: model(x).pow(2).mean())
    opt.step(closure)
    theta = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    opt.param_groups[0][key] = value
    for _ in range(2):  # a step with and one without a search
        with pytest.raises(ValueError, match=match):
            opt.step(closure)
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))
    assert all(torch.equal(opt.state[next(model.parameters())][k], v) for k, v in state.items())
    assert opt.param_groups[0]["step"] == 1


@pytest.mark.parametrize("name, value", [("init_step_size", math.inf),
                                         ("weight_decay", math.inf)])
def test_infinite_hyperparameters_are_rejected(name, value):
    model, _ = _usage_setup()
    with pytest.raises(ValueError, match=f"invalid {name}"):
        ArmijoAdam(model.parameters(), **{name: value})


# (class, keyword, value, the name the message must carry); the constructor cases that
# test_optimizers.py already checks (lr -1, c 1.5, backtrack 1.0, betas (0.9, 1.0), cadence
# "sometimes", direction, backend, max_trials 0) are not repeated.
BAD_HYPERPARAMETERS = [
    (ArmijoAdam, "weight_decay", -0.01, "invalid weight_decay"),
    (ArmijoAdam, "init_step_size", 0.0, "invalid init_step_size"),
    (ArmijoAdam, "init_step_size", math.nan, "invalid init_step_size"),
    (ArmijoAdam, "c", 0.0, "invalid c"),
    (ArmijoAdam, "c", math.nan, "invalid c"),
    (ArmijoSGD, "backtrack", 0.0, "invalid backtrack"),
    (ArmijoSGD, "growth", 0.5, "invalid growth"),
    (ArmijoSGD, "growth", math.inf, "invalid growth"),
    (ArmijoAdam, "max_trials", 2.5, "invalid max_trials"),
    (ArmijoAdam, "max_trials", True, "invalid max_trials"),
    (ArmijoAdam, "max_step", 0.0, "invalid max_step"),
    (ArmijoAdam, "collapse_ratio", 1.0, "invalid collapse_ratio"),
    (ArmijoAdam, "max_drop", 0.5, "invalid max_drop"),
    (ArmijoSGD, "max_drop", math.inf, "invalid max_drop"),
    (ArmijoAdam, "cadence", 0, "invalid cadence"),
    (ArmijoAdam, "cadence", True, "invalid cadence"),
    (ArmijoAdam, "max_interval", 0, "invalid max_interval"),
    (ArmijoAdam, "max_grad_norm", 0.0, "invalid max_grad_norm"),
    (ArmijoAdam, "max_grad_norm", -1.0, "invalid max_grad_norm"),
    (ArmijoAdam, "betas", (0.9,), "invalid betas"),
    (ArmijoAdam, "betas", (-0.1, 0.999), r"invalid betas\[0\]"),
    (ArmijoAdam, "betas", 0.9, r"invalid betas: 0.9 \(expected a pair"),  # 'float' not iterable
    (ArmijoAdam, "betas", None, "invalid betas: None"),
    (ArmijoAdam, "betas", "ab", "invalid betas: 'ab'"),  # (was split into 'a', 'b')
    (ArmijoAdam, "model", nn.Linear(2, 2), "model= got a Linear that holds none of the "),
    (ArmijoAdam, "eps", 0.0, "invalid eps"),
    # 0 in float32, where the passes compute: 0/0 wrote NaN into the model, no skip
    (ArmijoAdam, "eps", 1e-50, r"invalid eps: 1e-50 \(it is 0 in float32"),
    (ArmijoAdam, "alpha", 1.0, "invalid alpha"),
    (ArmijoSGD, "momentum", 1.0, "invalid momentum"),
    (ArmijoSGD, "momentum", math.nan, "invalid momentum"),
    (ArmijoAdam, "block_search", "random", "invalid block_search"),
    (ArmijoAdam, "merge_below", 0.0, "invalid merge_below"),
    (ArmijoAdam, "merge_below", 1e-6, "merge_below merges the blocks of the layer-wise"),
    (ArmijoAdam, "model", "net", "model must be a torch.nn.Module"),
    # (a string is truthy: flat="no" was a silent yes)
    (ArmijoAdam, "flat", "no", "invalid flat"),
    (ArmijoSGD, "check_finite", None, "invalid check_finite"),
    (ArmijoAdam, "layerwise", "x", "invalid layerwise"),
    (ArmijoAdam, "exact_revert", "yes", "invalid exact_revert"),
    (ArmijoAdam, "alpha_with_adam", 1.5, "invalid alpha"),  # unused by adam, still a typo
    (ArmijoAdam, "direction", "sgd", r"invalid direction for ArmijoAdam: 'sgd' .*ArmijoSGD's"),
]


@pytest.mark.parametrize("cls, name, value, match", BAD_HYPERPARAMETERS,
                         ids=[f"{c.__name__}-{n}={v!r}" for c, n, v, _ in BAD_HYPERPARAMETERS])
def test_bad_hyperparameters_are_named(cls, name, value, match):
    model, _ = _usage_setup()
    kw = {name: value}
    if name == "alpha":
        kw["direction"] = "rmsprop"
    if name == "alpha_with_adam":
        kw = {"alpha": value}
    if name == "momentum":
        kw["direction"] = "momentum"
    with pytest.raises((ValueError, TypeError), match=match):
        cls(model.parameters(), **kw)


# settings the optimizer reads at every step, written after construction (Lightning's
# gradient_clip_val and HF's max_grad_norm write max_grad_norm): max_grad_norm=nan skipped
# every step in silence, -1 gave η = 0, c=2 backtracked to 0, cadence="never" raised a bare
# AttributeError inside the step
LATE_SETTINGS = [
    ("max_grad_norm", math.nan), ("max_grad_norm", -1.0), ("max_grad_norm", "1.0"),
    ("c", 2.0), ("backtrack", 1.5), ("max_trials", 0), ("cadence", "never"),
    ("check_finite", "no"),
    # the step-size policy's settings were not attributes at all: a write was taken and ignored
    ("growth", 0.5), ("growth", "1.5"), ("smoothing", 1.0), ("collapse_ratio", -0.1),
    ("max_step", 0.0), ("max_drop", True), ("max_interval", 0), ("policy", None),
]


@pytest.mark.parametrize("name, value", LATE_SETTINGS,
                         ids=[f"{n}={v!r}" for n, v in LATE_SETTINGS])
def test_settings_written_after_construction_are_checked_where_written(name, value):
    model, x = _usage_setup()
    opt = ArmijoAdam(model.parameters(), model=model)
    before = getattr(opt, name)
    with pytest.raises((ValueError, TypeError), match=f"invalid {name}"):
        setattr(opt, name, value)
    assert getattr(opt, name) is before  # the old value stays
    loss = opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    assert not opt.stats["skipped"] and torch.isfinite(loss.detach())


# the settings a step reads that were not checked where written (taken and used later, or never)
LATE_SETTINGS_TOO = [
    ("backend", "cuda"), ("block_search", "layer"), ("merge_below", -1.0), ("candidates", 1),
    ("exact_revert", "yes"),
]


@pytest.mark.parametrize("name, value", LATE_SETTINGS_TOO,
                         ids=[f"{n}={v!r}" for n, v in LATE_SETTINGS_TOO])
def test_structural_settings_written_later_are_checked_where_written(name, value):
    model, x = _usage_setup()
    opt = ArmijoAdam(model.parameters(), model=model)
    opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    before = getattr(opt, name)
    with pytest.raises((ValueError, TypeError), match=f"invalid {name}"):
        setattr(opt, name, value)
    assert getattr(opt, name) is before
    loss = opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    assert not opt.stats["skipped"] and torch.isfinite(loss.detach())


@pytest.mark.parametrize("name, value", [("layerwise", True), ("flat", False), ("tile", 512),
                                         ("momentum_search", "direction")])
def test_settings_the_store_is_built_from_are_fixed_at_construction(name, value):
    # a write was taken and did nothing (flat, tile: the store was already built), or broke the
    # next step (layerwise: groups without blocks); rewriting the same value stays harmless
    model, x = _usage_setup()
    opt = ArmijoSGD(model.parameters(), model=model, direction="momentum")
    opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    before = getattr(opt, name)
    with pytest.raises(AttributeError, match=f"{name} is fixed at construction.*load this one's "
                       r"state_dict\(\)"):
        setattr(opt, name, value)
    assert getattr(opt, name) == before
    setattr(opt, name, before)
    opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    assert not opt.stats["skipped"]


@pytest.mark.parametrize("name, value", [("init_step_size", 0.5), ("direction", "nadam"),
                                         ("model", "other")])
def test_what_the_constructor_read_is_read_back_and_a_write_is_refused(name, value):
    # (an audit) each write was a new attribute nothing read: init_step_size=0.5 written before
    # the first step still started at 1e-3, direction="nadam" still stepped Adam's direction
    model, x = _usage_setup()
    opt = ArmijoAdam(model.parameters(), model=model)
    value = nn.Linear(2, 2) if value == "other" else value
    assert (opt.init_step_size, opt.direction, opt.model) == (1e-3, "adam", model)
    with pytest.raises(AttributeError, match=f"{name} is set at construction: "):
        setattr(opt, name, value)
    assert (opt.init_step_size, opt.direction, opt.model) == (1e-3, "adam", model)
    assert ArmijoSGD(model.parameters(), momentum=0.9).direction == "momentum"
    assert ArmijoSGD(model.parameters()).model is None


def test_options_that_do_nothing_in_the_setup_given_are_said():
    # (an audit: each was taken without a word and ran as if not given)
    model, _ = _usage_setup()
    params = list(model.parameters())
    for kwargs, match in [
            (dict(direction="rmsprop", betas=(0.5, 0.5)), r"betas=\(0.5, 0.5\) is not read by "
             "direction='rmsprop'"),
            (dict(alpha=0.9), "alpha=0.9 is not read by direction='adam'"),
            (dict(cadence=5, max_interval=2), "max_interval=2 is the adaptive cadence's"),
            (dict(cadence="every", max_interval=50), "max_interval=50 .* fixed \\('every'\\)"),
            (dict(block_search="stale"), "block_search='stale' schedules the layer-wise")]:
        with pytest.warns(UserWarning, match=match):
            ArmijoAdam(params, **kwargs)
    with pytest.warns(UserWarning, match="sets blocks_by='group', which says how the layer-wise"):
        ArmijoAdam([{"params": params, "blocks_by": "group"}])
    added = ArmijoAdam([{"params": params[:1]}])
    with pytest.warns(UserWarning, match="sets blocks_by='name'"):
        added.add_param_group({"params": params[1:], "blocks_by": "name"})
    with warnings.catch_warnings():  # (the refusal, not the warning, where warnings are errors)
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="holds none of the optimizer's parameters"):
            ArmijoAdam([{"params": params, "blocks_by": "group"}], model=nn.Linear(2, 2))
    with warnings.catch_warnings():  # the same values where they are read, or the defaults
        warnings.simplefilter("error")
        ArmijoAdam(params, direction="rmsprop", alpha=0.9, betas=[0.9, 0.999])
        ArmijoAdam(params, betas=(0.5, 0.5), cadence="adaptive", max_interval=50)
        two = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
        ArmijoAdam(two.parameters(), model=two, layerwise=True, block_search="stale")
        ArmijoAdam([{"params": params[:1], "blocks_by": "group"}, {"params": params[1:]}],
                   layerwise=True)
        ArmijoSGD(params, trend_guard=None)  # (None: the default, as ArmijoAdam's)


def test_a_flag_given_as_a_string_is_refused_for_nesterov_too():
    # (an audit) nesterov="False" built the Nesterov direction: bool("False") is True
    model, _ = _usage_setup()
    with pytest.raises(TypeError, match="invalid nesterov: 'False' \\(expected True or False"):
        ArmijoSGD(model.parameters(), momentum=0.9, nesterov="False")
    with pytest.raises(TypeError, match="invalid nesterov in a param group: 'no'"):
        ArmijoSGD([{"params": model.parameters(), "nesterov": "no"}], momentum=0.9)
    assert ArmijoSGD(model.parameters(), momentum=0.9, nesterov=np.bool_(True)).direction \
        == "nesterov"
    assert ArmijoSGD(model.parameters(), momentum=0.9, nesterov=None).direction == "momentum"


@pytest.mark.parametrize("key, value", [("step_size", 0.5), ("step", 3), ("loss_trend", (1, 2)),
                                        ("block_names", ["a"])])
def test_a_param_group_holding_the_searchs_own_state_is_refused_by_name(key, value):
    # (an audit) a per-group step_size was taken as the search's state (one global η no
    # longer shared; loss 0.44 against 0.71 after 3 steps); a loss_trend raised a bare
    # ValueError from inside the step-size policy
    model, x = _usage_setup()
    first, *rest = model.parameters()
    with pytest.raises(ValueError, match=f"a param group sets {key}, which the line search "
                       "keeps in each group for itself"):
        ArmijoAdam([{"params": [first]}, {"params": rest, key: value}], model=model)
    opt = ArmijoAdam([{"params": [first]}], model=model)
    with pytest.raises(ValueError, match=f"a param group sets {key}"):
        opt.add_param_group({"params": rest, key: value})
    assert len(opt.param_groups) == 1  # (nothing half added)
    opt.add_param_group({"params": rest})
    opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    assert not opt.stats["skipped"]


def test_settings_written_later_are_checked_against_the_ones_they_combine_with():
    model, x = _usage_setup()
    plain = ArmijoAdam(model.parameters(), model=model)
    with pytest.raises(ValueError, match="merge_below merges the blocks of the layer-wise"):
        plain.merge_below = 1e-6
    nameless = ArmijoAdam(model.parameters())
    with pytest.raises(ValueError, match="candidates needs model="):
        nameless.candidates = 3
    layered = ArmijoAdam([{"params": [p]} for p in model.parameters()], layerwise=True,
                         model=model)
    with pytest.raises(ValueError, match="candidates works with the global search"):
        layered.candidates = 3
    in_place = ArmijoAdam(model.parameters(), model=model, flat=False)
    with pytest.raises(ValueError, match="candidates needs the flat buffers"):
        in_place.candidates = 3
    heavy = ArmijoSGD(model.parameters(), model=model, direction="momentum")  # along g
    with pytest.raises(ValueError, match="measures its step sizes along the gradient"):
        heavy.candidates = 3
    heavy_layered = ArmijoSGD(model.parameters(), model=model, direction="momentum",
                              layerwise=True)
    with pytest.raises(ValueError, match="measures its step sizes along the gradient"):
        heavy_layered.block_search = "exact"
    for opt, name, old in ((plain, "merge_below", None), (nameless, "candidates", None),
                           (layered, "candidates", None), (heavy, "candidates", None),
                           (heavy_layered, "block_search", "round_robin")):
        assert getattr(opt, name) == old
    plain.candidates, heavy_layered.block_search = 3, "stale"  # where they combine, taken
    assert plain.candidates == 3 and heavy_layered.block_search == "stale"


@needs_cpp
def test_a_backend_written_mid_run_moves_the_built_buffers_at_once():
    # it was read only when the store was rebuilt: a write mid-run did nothing until then
    from armijo_fused.backends import cpp_backend, torch_backend

    def run(switch):
        model, x = _usage_setup()
        opt = ArmijoAdam(model.parameters(), model=model, backend="cpp", cadence="every")
        closure = make_closure(opt, lambda: model(x).pow(2).mean())
        for k in range(4):
            if switch and k == 2:
                opt.backend = "torch"
                assert all(b.backend is torch_backend for b in opt._buffers)
            opt.step(closure)
        return opt, [p.detach().clone() for p in model.parameters()]

    opt, switched = run(True)
    assert opt.backend == "torch" and all(b.backend is torch_backend for b in opt._buffers)
    _, stayed = run(False)
    for a, b in zip(switched, stayed):  # the backends agree to fp32 rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model, x = _usage_setup()
    model.double()
    opt = ArmijoAdam(model.parameters(), model=model, backend="torch")
    opt.step(make_closure(opt, lambda: model(x.double()).pow(2).mean()))
    with pytest.raises(ValueError, match="backend='cpp' takes float32 parameters"):
        opt.backend = "cpp"  # refused where written, the buffers left on torch
    assert opt.backend == "torch" and all(b.backend is torch_backend for b in opt._buffers)
    assert cpp_backend is not torch_backend


def test_step_size_settings_written_mid_run_take_effect_at_once():
    # opt.growth, opt.max_step, ... were not attributes: a write made a new attribute that
    # nothing read
    model, x = _usage_setup()
    opt = ArmijoSGD(model.parameters(), model=model, cadence="adaptive", max_interval=8)
    closure = make_closure(opt, lambda: model(x).pow(2).mean())
    for _ in range(6):
        opt.step(closure)
    g = opt.param_groups[0]
    opt.max_step = g["step_size"] / 4  # below the carried η: capped now, not at the next search
    assert g["step_size"] == opt.max_step and g["step_size_avg"] <= opt.max_step
    assert opt.policy.max_step == opt.max_step
    opt.max_interval = 1  # a gap scheduled beyond it is shortened
    assert opt.cadence.max_interval == 1 and g["next_search"] <= g["step"] + 1
    opt.max_step, opt.growth = None, 3.0
    eta, points = g["step_size"], []

    def recording():
        points.append(model.weight.detach().clone())
        return closure()

    opt.step(recording)  # f(θ0) and the gradient, then the trials: the first at growth · η
    assert opt.stats["searched"] and len(points) >= 2
    first = (points[1] - points[0]).norm() / model.weight.grad.norm()
    assert float(first) == pytest.approx(3.0 * eta, rel=1e-4)
    twin = ArmijoSGD(model.parameters(), growth=3.0, max_step=1e-3, smoothing=0.25,
                     collapse_ratio=0.05, max_drop=4.0)
    for name in ("growth", "max_step", "smoothing", "collapse_ratio", "max_drop"):
        assert getattr(twin, name) == getattr(twin.policy, name)


def test_settings_written_in_other_spellings_and_under_a_fixed_cadence():
    model, x = _usage_setup()
    opt = ArmijoSGD(model.parameters(), model=model, cadence=20, growth=torch.tensor(1.5),
                    max_step=np.float32(0.5))
    assert type(opt.growth) is float and opt.growth == 1.5 and opt.max_step == 0.5
    opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    g = opt.param_groups[0]
    scheduled = g["next_search"]
    opt.max_interval = opt.max_interval  # a fixed cadence schedules by k: nothing moves
    assert g["next_search"] == scheduled == 21
    opt.layerwise, opt.tile = np.False_, np.int64(opt.tile)  # the same values: taken, unchanged
    assert opt.layerwise is False and type(opt.tile) is int
    opt.max_step = torch.tensor(0.25)
    assert opt.policy.max_step == 0.25 and type(opt.policy.max_step) is float


def test_an_infinite_max_grad_norm_clips_nothing_as_the_integrations_mean_it():
    # HF's TrainingArguments(max_grad_norm=inf) and Lightning's gradient_clip_val=inf (the norm
    # logged, nothing clipped) reach max_grad_norm; the check of written settings refused them
    runs = []
    for how in ("none", "inf", "inf later"):
        model, x = _usage_setup()
        opt = ArmijoAdam(model.parameters(), model=model,
                         max_grad_norm=math.inf if how == "inf" else None)
        if how == "inf later":
            opt.max_grad_norm = math.inf
        for _ in range(3):
            opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
        runs.append([p.detach().clone() for p in model.parameters()])
        assert math.isfinite(opt.stats["grad_norm"])
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))


def test_good_settings_written_after_construction_take_effect():
    model, x = _usage_setup()
    opt = ArmijoSGD(model.parameters(), model=model, cadence=4, max_interval=7)
    opt.max_grad_norm, opt.cadence, opt.c = 1e-6, "every", 0.3
    assert opt.cadence.spec == 1 and opt.cadence.max_interval == 7 and opt.c == 0.3
    closure = make_closure(opt, lambda: model(x).pow(2).mean())
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(closure)
        assert opt.stats["searched"]  # every step (cadence 4 searched steps 1 and 5)
        moved = math.sqrt(sum(float((p.detach() - b).pow(2).sum())
                              for p, b in zip(model.parameters(), before)))
        assert 0 < moved <= 1.001e-6 * opt.stats["applied_step"]  # along the clipped gradient


def test_set_closure_with_a_model_that_holds_none_of_the_parameters_is_refused():
    # (trials then restored the other model's BatchNorm statistics and let the trained model's
    # count up with every trial forward)
    model, x = _usage_setup()
    opt = ArmijoAdam(model.parameters())
    with pytest.raises(ValueError, match=r"set_closure\(..., model=\) got a Linear that holds "):
        opt.set_closure(lambda: model(x).mean(), model=nn.Linear(2, 2))
    opt.set_closure(lambda: model(x).mean(), model=model)  # the right one is taken


@pytest.mark.parametrize("flat", [True, False])
def test_an_expanded_parameter_is_refused_by_name(flat):
    # nn.Parameter(t.expand(3, 4)): the flat store split its rows into three tensors without a
    # word, flat=False raised torch's bare "more than one element ... single memory location"
    base = torch.randn(1, 4)
    p = nn.Parameter(base.expand(3, 4))
    before = p.detach().clone()
    opt = ArmijoAdam([p], flat=flat)
    with pytest.raises(ValueError, match=r"is an expanded view: .*\(stride \(0, 1\)"):
        opt.step(make_closure(opt, lambda: p.pow(2).sum()))
    assert torch.equal(p.detach(), before) and p.stride() == (0, 1) and not opt.state


def test_parameters_still_on_the_meta_device_at_the_first_step_are_named():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(8, 4, device="meta")
    opt = ArmijoAdam(model.parameters(), model=model)
    closure = make_closure(opt, lambda: model(x).pow(2).mean())
    with pytest.raises(ValueError, match=r"a parameter \(0.weight\) is on the meta device"):
        opt.step(closure)


def test_an_optimizer_built_on_the_meta_device_trains_after_to_empty_with_swapped_params():
    # torch's swap on conversion keeps the Parameter objects, so the optimizer holds the
    # materialised tensors (without it to_empty makes new ones, which the error above names)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        opt = ArmijoAdam(model.parameters(), model=model, cadence="every")
        model.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    torch.manual_seed(0)
    for m in (model[0], model[2]):
        m.reset_parameters()
    x = torch.randn(16, 4)
    closure = make_closure(opt, lambda: model(x).pow(2).mean())
    first = float(opt.step(closure))
    for _ in range(5):
        last = float(opt.step(closure))
    assert last < first


@pytest.mark.parametrize("cls, kw, name", [
    (ArmijoSGD, dict(direction="momentum", momentum="0.9"), "momentum"),
    (ArmijoAdam, dict(eps=None), "eps"),
    (ArmijoAdam, dict(betas=("0.9", 0.999)), "betas"),
    (ArmijoAdam, dict(max_interval="10"), "max_interval"),
], ids=["momentum-str", "eps-None", "betas-str", "max_interval-str"])
def test_hyperparameters_of_the_wrong_type_are_named(cls, kw, name):
    model, _ = _usage_setup()
    with pytest.raises((ValueError, TypeError), match=f"invalid {name}"):
        cls(model.parameters(), **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_group_added_later_gets_its_own_bias_correction(backend):
    # progressive unfreezing: the new group's moments start at zero, so its first Adam direction
    # must be m̂/√v̂ = sign(g), not the under-corrected one of the optimizer's step count
    torch.manual_seed(0)
    base, extra = nn.Linear(4, 1), nn.Parameter(torch.randn(5))
    x = torch.randn(8, 4)
    opt = ArmijoAdam(base.parameters(), backend=backend, cadence="every")
    for _ in range(3):
        opt.step(make_closure(opt, lambda: base(x).pow(2).mean()))
    opt.add_param_group({"params": [extra]})
    assert opt.param_groups[1]["folded"] == 0 and opt.param_groups[0]["folded"] == 3
    before = extra.detach().clone()
    target = torch.linspace(-1.0, 1.0, 5)
    opt.step(make_closure(opt, lambda: base(x).pow(2).mean() + (extra - target).pow(2).sum()))
    g = 2 * (before - target)
    eta = opt.stats["step_size"]
    assert eta > 0 and [g["folded"] for g in opt.param_groups] == [4, 1]
    torch.testing.assert_close(extra.detach(), before - eta * torch.sign(g), rtol=1e-5, atol=1e-7)


def test_unfreezing_inside_a_group_warns_and_adding_a_group_does_not():
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    x = torch.randn(8, 4)
    model[1].weight.requires_grad_(False)
    opt = ArmijoAdam(model.parameters(), model=model, cadence="every")
    closure = make_closure(opt, lambda: model(x).pow(2).mean())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first build and the steps: nothing to say
        for _ in range(2):
            opt.step(closure)
    model[1].weight.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"1 parameter\(s\) start with zero moments .* 2 "
                                         r"step\(s\) \(1.weight\).*add_param_group"):
        opt.step(closure)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: its state exists from now on
        opt.step(closure)
        extra = nn.Parameter(torch.randn(2))
        opt.add_param_group({"params": [extra]})
        opt.step(make_closure(opt, lambda: model(x).pow(2).mean() + extra.pow(2).sum()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["momentum", "nesterov"])
def test_steps_without_a_search_keep_the_tested_step_length(direction, backend, monkeypatch):
    # A constant gradient: momentum grows d from g towards g/(1-μ) after the one search, so the
    # searched η applied as is would move ~10x further than the step the search tested. The cap
    # keeps each plain step within 2x the accepted length (plus one step of lag in ‖d‖).
    import armijo_fused.optimizers.search as base

    def displacements(ratio):
        monkeypatch.setattr(base, "STEP_LENGTH_RATIO", ratio)
        theta = nn.Parameter(torch.zeros(10))
        a = torch.linspace(0.5, 1.5, 10)
        opt = ArmijoSGD([theta], direction=direction, momentum=0.9, backend=backend,
                        cadence=1000)
        out = []
        for _ in range(40):
            before = theta.detach().clone()
            opt.step(make_closure(opt, lambda: (a * theta).sum()))
            out.append(float((theta.detach() - before).norm()))
        return out

    capped, free = displacements(2.0), displacements(math.inf)
    assert capped[0] == free[0] > 0  # the searched step is the same
    assert max(capped) <= 3.0 * capped[0]
    assert max(free) > 5.0 * free[0]  # what the cap prevents


def test_add_param_group_after_construction():
    torch.manual_seed(0)
    base, extra = nn.Linear(4, 1), nn.Parameter(torch.randn(3))
    x = torch.randn(8, 4)
    opt = ArmijoAdam(base.parameters(), backend="torch", cadence="every")
    opt.step(make_closure(opt, lambda: base(x).pow(2).mean()))
    opt.add_param_group({"params": [extra]})  # progressive unfreezing does this
    extra0 = extra.detach().clone()
    opt.step(make_closure(opt, lambda: base(x).pow(2).mean() + extra.pow(2).sum()))
    assert not torch.equal(extra.detach(), extra0)


def test_a_per_tensor_state_dict_replaced_by_user_code_is_reattached():
    # opt.state[p] = {} (code that "resets" a tensor's state) must not leave state_dict()
    # showing something other than the live flat state
    torch.manual_seed(0)
    lin, x = nn.Linear(4, 1), torch.randn(8, 4)
    opt = ArmijoAdam(lin.parameters(), backend="torch", cadence=2)
    for _ in range(3):
        opt.step(make_closure(opt, lambda: lin(x).pow(2).mean()))
    opt.state[lin.weight] = {}
    opt.step(make_closure(opt, lambda: lin(x).pow(2).mean()))
    buf = opt._buffers[0]
    live = opt.state_dict()["state"][0]["exp_avg"]
    start = buf.states[0].data_ptr()
    assert start <= live.data_ptr() < start + 4 * buf.states[0].numel()


# == the step-size policy after small steps =========================================================
def _stiff_quadratic(**kw):
    """0.5 xᵀAx − bᵀx with curvatures 1 … 1e4: plain SGD needs η < 2e-4, far below its start 1."""
    torch.manual_seed(0)
    a, b = torch.logspace(0, 4, 20), torch.randn(20)
    x = nn.Parameter(torch.zeros(20))
    opt = ArmijoSGD([x], backend="torch", **kw)
    scale = [1.0]
    closure = make_closure(opt, lambda: 0.5 * (scale[0] * a * x * x).sum() - b @ x)
    return opt, closure, scale


def test_a_first_search_below_the_untested_start_sets_the_step_size():
    # η̄ starts at init_step_size, which nothing has tested: a first search that backtracks
    # 13 times was a "collapse", η went back to 1 and every later search backtracked again
    opt, closure, _ = _stiff_quadratic(cadence="every")
    opt.step(closure)
    first = opt.stats["step_size"]
    assert first < 1e-3 and not opt.stats["collapsed"]
    assert opt.param_groups[0]["step_size_avg"] == first
    opt.step(closure)
    assert opt.stats["trials"] <= 2


@pytest.mark.parametrize("cadence", [5, "adaptive"])
def test_after_a_collapse_the_next_step_searches_and_a_second_one_moves_the_average(cadence):
    opt, closure, scale = _stiff_quadratic(cadence=cadence, init_step_size=1e-4)
    for _ in range(8):
        opt.step(closure)
    scale[0] = 1e3  # the landscape stiffens 1000x: the next search accepts ~1000x less
    opt.step(closure)
    while not opt.stats["searched"]:
        opt.step(closure)
    assert opt.stats["collapsed"]
    avg = opt.param_groups[0]["step_size_avg"]
    opt.step(closure)  # the reset η̄ was just rejected: not applied blindly
    assert opt.stats["searched"] and not opt.stats["collapsed"]
    assert opt.param_groups[0]["step_size_avg"] < 0.01 * avg  # two in a row: η̄ follows
    for _ in range(5):
        opt.step(closure)
        assert math.isfinite(float(opt.stats["loss_before"]))


def test_steps_without_a_search_keep_the_weight_decay_cap():
    # trials cap η at 0.5 / weight_decay so that 1 − η·wd stays positive; the η̄ applied between
    # searches came from an average with the start and went past it (θ flipped sign each step)
    torch.manual_seed(0)
    target = torch.randn(64)
    p = nn.Parameter(torch.randn(64))
    opt = ArmijoAdam([p], weight_decay=10.0, init_step_size=1.0, cadence=1000, backend="torch")
    closure = make_closure(opt, lambda: ((p - target) ** 2).mean())
    for _ in range(10):
        opt.step(closure)
        assert opt.stats["applied_step"] * 10.0 <= 0.5 * (1 + 1e-6)  # (η in fp32)


def test_after_a_collapse_an_ordinary_backtrack_is_smoothed_as_usual():
    # only a second collapse in a row moves η̄ outright; an ordinary backtrack after one collapse
    # enters the average as any accepted step does
    x = nn.Parameter(torch.ones(4))
    curvature = [1.0]
    opt = ArmijoSGD([x], init_step_size=0.5, smoothing=0.5, cadence="every", backend="torch")
    closure = make_closure(opt, lambda: 0.5 * curvature[0] * (x * x).sum())
    for k in range(1, 7):
        curvature[0] = {5: 1e5, 6: 3.0}.get(k, 1.0)
        with torch.no_grad():
            x.fill_(1.0)
        before = opt.param_groups[0]["step_size_avg"]
        opt.step(closure)
        assert opt.stats["collapsed"] == (k == 5)
    accepted = opt.stats["step_size"]
    assert accepted > 0.01 * before  # an ordinary backtrack, not a second collapse
    assert opt.param_groups[0]["step_size_avg"] == pytest.approx(math.sqrt(before * accepted))


def test_a_first_trial_that_passes_is_no_collapse_however_far_below_the_average():
    # (an audit, layer-wise on GPT-2) other blocks' searches shrank a held block 200x in their
    # joint phase, which left its η̄ where it was; its own search then passed its first trial
    # at once, read as a collapse, and η was reset to η̄, 200x up, untested: the next search
    # dragged every block down again
    from armijo_fused.linesearch.policy import StepSizePolicy

    assert StepSizePolicy(smoothing=0.0).after_search(1.2, 6e-3, at_once=True) == (
        6e-3, 6e-3, False)
    assert StepSizePolicy(smoothing=0.0).after_search(1.2, 6e-3) == (1.2, 1.2, True)
    for cls in (ArmijoSGD, ArmijoAdam):
        a, b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
        opt = cls([{"params": [a]}, {"params": [b]}], layerwise=True, cadence="every",
                  backend="torch")
        closure = make_closure(opt, lambda: 0.5 * (a * a).sum() + 0.5 * (b * b).sum())
        for _ in range(2):  # both blocks searched once
            opt.step(closure)
        g = opt.param_groups[0]
        avg = g["step_size_avg"][0]
        g["step_size"][0] = small = avg / 1000  # (as after other blocks' joint phase)
        g["block_cursor"] = 0  # block 0's turn
        opt.step(closure)
        assert opt.stats["searched_blocks"] == [0] and opt.stats["trials"] == 1
        assert g["collapsed"][0] == 0
        # ArmijoSGD (no smoothing) goes on from the step that passed; ArmijoAdam's η̄ falls by
        # at most max_drop = 2 per search, and η follows η̄, as after any search. (Kept at the
        # step that passed, a review's proposal, the blocks that joint phases had shrunk stayed
        # small: the character LM's layer-wise loss with the schedule 2.231 against 2.180)
        expected = small * 1.2 if cls is ArmijoSGD else avg / 2
        assert g["step_size"][0] == pytest.approx(expected)
    # the global search keeps its rule (a review): its η lies below η̄ only where it was
    # lowered under a rejected trial, and a first trial passing that far below resets
    a = nn.Parameter(torch.ones(4))
    opt = ArmijoSGD([a], cadence="every", backend="torch")
    closure = make_closure(opt, lambda: 0.5 * (a * a).sum())
    opt.step(closure)
    g = opt.param_groups[0]
    g["step_size"] = g["step_size_avg"] / 1000
    opt.step(closure)
    assert opt.stats["trials"] == 1 and g["step_size"] == g["step_size_avg"] and g["collapsed"]


def test_a_collapse_in_one_block_does_not_count_for_another():
    # layer-wise: the "second collapse in a row" is each block's own, and a block whose own
    # search did not collapse keeps the η̄ it would have had
    def run(spike):
        a, b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
        opt = ArmijoSGD([{"params": [a]}, {"params": [b]}], layerwise=True, block_search="exact",
                        cadence="every", init_step_size=0.5, smoothing=0.5, backend="torch")
        stiff = [1.0]
        closure = make_closure(opt, lambda: 0.5 * stiff[0] * (a * a).sum() + (b * b).sum())
        for k in range(6):
            stiff[0] = 1e5 if spike and k in (3, 4) else 1.0
            with torch.no_grad():
                a.fill_(1.0)
                b.fill_(1.0)
            opt.step(closure)
            if spike and k == 3:
                assert [g["collapsed"] for g in opt.param_groups] == [[1], [0]]
        return [g["step_size_avg"] for g in opt.param_groups]

    spiked, plain = run(True), run(False)
    assert spiked[1] == plain[1]  # b: untouched by a's collapses
    assert spiked[0] != plain[0]  # a: two collapses in a row moved its η̄


def test_a_loss_that_takes_derivatives_gets_a_message_naming_the_trial_and_the_fix():
    # PINN-style: the loss differentiates the model's output w.r.t. its input. The first call
    # runs with grad; a trial runs under no_grad and torch's own message said nothing of it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.linspace(0, 1, 16).unsqueeze(1)
    opt = ArmijoAdam(model.parameters(), model=model, backend="torch")

    def residual():
        xx = x.clone().requires_grad_(True)
        du = torch.autograd.grad(model(xx).sum(), xx, create_graph=True)[0]
        return (du - torch.cos(xx)).pow(2).mean()

    def closure():
        opt.zero_grad()
        loss = residual()
        loss.backward()
        return loss

    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"no_grad \(at a trial point.*enable_grad"):
        opt.step(closure)
    for p, t in zip(model.parameters(), theta):
        torch.testing.assert_close(p.detach(), t, rtol=0, atol=1e-6)  # undone (to rounding)

    def closure_with_grad():
        with torch.enable_grad():
            return closure()

    opt.step(closure_with_grad)  # the fix the message names
    assert opt.stats["step_size"] > 0


def test_a_closure_that_sets_the_gradient_itself_is_pointed_at_a_loss_only_function():
    # torch.autograd.grad in the closure fails at a trial (no graph); enable_grad() would make
    # every trial compute a gradient: the message names the loss_fn form, which works
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = ArmijoAdam(model.parameters(), model=model, backend="torch")

    def loss_fn():
        return nn.functional.mse_loss(model(x), y)

    def closure():
        loss = loss_fn()
        for p, g in zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters()))):
            p.grad = g
        return loss

    with pytest.raises(RuntimeError, match=r"step\(closure, loss_fn=fn\)"):
        opt.step(closure)
    opt.step(closure, loss_fn=loss_fn)
    assert opt.stats["step_size"] > 0


def test_in_trial_lets_a_forward_hook_skip_the_trial_forwards():
    import armijo_fused

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(16, 4)
    seen = {"all": 0, "training": 0}

    def count(module, inputs, output):
        seen["all"] += 1
        if not armijo_fused.in_trial():
            seen["training"] += 1

    model.register_forward_hook(count)
    opt = ArmijoAdam(model.parameters(), model=model, cadence="every", init_step_size=10.0)
    for _ in range(3):
        opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    assert seen["training"] == 3  # one training forward per step
    # and the trials (backtracks from 10), and the first search's check of the closure at θ0
    # (a trial too, not counted in forwards)
    assert seen["all"] == opt.stats["forwards"] + 1 > 3 + 3 + 1
    assert not armijo_fused.in_trial()


def test_a_closure_that_never_calls_backward_gets_one_warning():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(8, 4)
    opt = ArmijoAdam(model.parameters(), model=model, cadence="every")

    def closure():  # forgot loss.backward()
        opt.zero_grad()
        return model(x).pow(2).mean()

    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match=r"gradient is zero everywhere at step 1.*backward\(\)"):
        opt.step(closure)
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        opt.step(closure)


@pytest.mark.parametrize("key, value", [("weight_decay", np.float32(0.01)),
                                        ("weight_decay", torch.tensor(0.01)),
                                        ("betas", (np.float32(0.9), 0.999)),
                                        ("betas", (torch.tensor(0.9), 0.999))])
def test_schedules_may_write_numpy_numbers_and_one_element_tensors(key, value):
    model, x = _usage_setup()
    opt = ArmijoAdam(model.parameters(), backend="torch", cadence=2)
    closure = make_closure(opt, lambda: model(x).pow(2).mean())
    opt.step(closure)
    opt.param_groups[0][key] = value  # accepted before per-step validation: still accepted
    for _ in range(2):
        opt.step(closure)
    # and used: the same run with plain floats ends at the same point
    ref_model, _ = _usage_setup()
    ref = ArmijoAdam(ref_model.parameters(), backend="torch", cadence=2)
    ref_closure = make_closure(ref, lambda: ref_model(x).pow(2).mean())
    ref.step(ref_closure)
    ref.param_groups[0][key] = (0.9, 0.999) if key == "betas" else 0.01
    for _ in range(2):
        ref.step(ref_closure)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def _growing_run(error_filter: bool, steps: int = 40):
    """ArmijoAdam on a quadratic whose centre moves a little at each step (a batch of its own:
    on a full batch η may grow, and nothing is said) from a tiny η: the search's η passes 20x
    its start at step 33, where the optimizer warns that no schedule anneals it (after the
    search, in its bookkeeping). Returns (θ, counters) after each step and the steps whose
    warning raised."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(8))
    opt = ArmijoAdam([p], cadence="every", init_step_size=1e-4)

    def closure():
        opt.zero_grad()
        centre = 0.01 * torch.randn(8, generator=torch.Generator().manual_seed(
            opt.param_groups[0]["step"]))
        loss = ((p - centre) ** 2).sum()
        loss.backward()
        return loss

    trace, raised = [], []
    for k in range(1, steps + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("error" if error_filter else "ignore")
            try:
                opt.step(closure)
            except UserWarning:
                raised.append(k)
        g = opt.param_groups[0]
        trace.append((p.detach().clone(), opt.state[p]["exp_avg"].clone(),
                      [g[key] for key in ("step", "folded", "searches", "step_size")]))
    return trace, raised


def test_a_warning_filtered_into_an_error_raises_after_the_step_is_whole():
    # -W error / pytest's filterwarnings = error: the warning raised in the step's bookkeeping,
    # after θ and the moments had moved but before the counters did (step, folded, searches
    # stayed at 32 while θ took step 33): half a step, mis-corrected from then on. It is now
    # raised once the step is whole, and the run goes on exactly as one that ignores warnings
    ignored, _ = _growing_run(error_filter=False)
    as_error, raised = _growing_run(error_filter=True)
    assert raised == [33]
    for (t0, m0, c0), (t1, m1, c1) in zip(ignored, as_error):
        assert torch.equal(t0, t1) and torch.equal(m0, m1) and c0 == c1


def test_config_file_values_and_wrong_calls_of_the_public_helpers():
    # numpy ints (a config file's) were refused as "not an int"; smoothing=None, a plain torch
    # RNG state in set_rng_state, NaN in js_distance and a negative density width gave
    # unrelated errors or plausible numbers
    import numpy as np

    import armijo_fused
    from armijo_fused.diagnostics.heterogeneity import js_distance

    model = nn.Linear(3, 1)
    opt = ArmijoAdam(model.parameters(), max_trials=np.int64(5), cadence=np.int64(3),
                     max_interval=np.int32(4), candidates=np.int64(2), model=model)
    assert (opt.max_trials, opt.cadence.spec, opt.candidates) == (5, 3, 2)
    with pytest.raises(ValueError, match="invalid smoothing: None"):
        ArmijoSGD(model.parameters(), smoothing=None)
    with pytest.raises(TypeError, match=r"set_rng_state takes what armijo_fused.get_rng_state"):
        armijo_fused.set_rng_state(torch.get_rng_state())
    with pytest.raises(ValueError, match="finite"):
        js_distance([math.nan, 1.0], [1.0, 0.0])


def test_a_recorder_attached_twice_records_each_step_once():
    from armijo_fused.diagnostics import TelemetryRecorder

    model = nn.Linear(3, 1)
    opt = ArmijoAdam(model.parameters(), cadence="every")
    rec = TelemetryRecorder(opt)
    rec.attach()
    rec.attach()
    x = torch.randn(8, 3)
    for _ in range(3):
        opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    assert [r["step"] for r in rec.records] == [1, 2, 3]
    rec.detach()
    opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    assert len(rec.records) == 3


def test_name_parameters_refuses_a_model_that_holds_none_of_the_parameters():
    # another model was taken silently: nothing named, layer-wise groups stayed one block
    model, other = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)), nn.Linear(3, 1)
    opt = ArmijoAdam([{"params": model[0].parameters()}, {"params": model[1].parameters()}],
                     layerwise=True)
    with pytest.raises(ValueError, match=r"name_parameters\(\) got a Linear that holds none"):
        opt.name_parameters(other)
    with pytest.raises(TypeError, match="takes a torch.nn.Module, got NoneType"):
        opt.name_parameters(None)
    opt.name_parameters(model)
    assert [g["block_names"] for g in opt.param_groups] == [["0"], ["1"]]


# --- numerics at the extremes (audit of 2026-12-04) ----------------------------------------


@pytest.mark.parametrize("cls, kw, name", [
    (ArmijoSGD, dict(init_step_size=1e39), "init_step_size"),
    (ArmijoSGD, dict(init_step_size=3e38), "init_step_size"),  # finite; its first trial is not
    (ArmijoAdam, dict(growth=1e39), "growth"),
    (ArmijoAdam, dict(weight_decay=1e39), "weight_decay"),
])
def test_values_beyond_float32_are_refused_by_name(cls, kw, name):
    # finite in float64, inf in float32 where the passes compute: the first move back formed
    # inf - inf and wrote NaN into every parameter
    w = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=f"invalid {name}: .*float32"):
        cls([w], **kw)


def test_a_weight_decay_beyond_float32_written_later_is_refused_before_anything_moves():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = ArmijoAdam(model.parameters())
    closure = make_closure(opt, lambda: nn.functional.mse_loss(model(x), y))
    opt.step(closure)
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["weight_decay"] = 1e39
    with pytest.raises(ValueError, match="invalid weight_decay: .*inf in float32"):
        opt.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="invalid growth"):
        opt.growth = 1e39
    assert opt.growth == 1.2


@pytest.mark.parametrize("kw", [dict(max_trials=1), dict(growth=1e6),
                                dict(backtrack=0.99)],
                         ids=["max_trials=1", "growth=1e6", "backtrack=0.99"])
@pytest.mark.parametrize("cls, mode", [(ArmijoSGD, "global"), (ArmijoAdam, "global"),
                                       (ArmijoAdam, "exact")])
def test_searches_exhausted_in_a_row_go_on_below_every_step_tried(cls, mode, kw):
    # settings whose trials never fall below η̄ (one trial; growth·backtrack^(max_trials-1) >= 1):
    # handed the last step size tried, every search repeated the same trials and the model
    # never moved again, at max_trials forwards per step (exact mode: each block's own search;
    # the review found the first fix left it out)
    w = [nn.Parameter(torch.tensor([3.0])), nn.Parameter(torch.tensor([-2.0]))]
    if mode == "exact":
        kw = dict(kw, layerwise=True, block_search="exact")
    opt = cls([{"params": [w[0]]}, {"params": [w[1]]}], backend="torch", init_step_size=10.0,
              **kw)
    tried = []

    def closure():
        opt.zero_grad()
        loss = 2.0 * (w[0] ** 2 + w[1] ** 2).sum()  # curvature 4: ArmijoSGD needs η <= 0.4
        loss.backward()
        return loss

    start = float(closure())
    for _ in range(40):
        opt.step(closure)
        if opt.stats["exhausted"]:
            tried.append(opt.stats["trials"])
    with torch.no_grad():
        end = float(2.0 * (w[0] ** 2 + w[1] ** 2).sum())
    assert tried, "the settings exhaust the first searches"
    assert len(tried) < 35 and end < 0.1 * start  # (before: every search, and end == start)


def test_an_exhausted_search_never_raises_the_running_average():
    from armijo_fused.linesearch.policy import StepSizePolicy

    # η above η̄ (handed on by a search whose trials the loss could not see), then exhausted
    # again: η goes on below the trials, η̄ stays
    eta, avg, collapsed = StepSizePolicy().after_search(1.0, None, again=True, lowest=2.0)
    assert collapsed and eta == 2.0 and avg == 1.0


def test_a_first_trial_within_max_step_is_not_refused_for_its_uncapped_start():
    w = nn.Parameter(torch.tensor([3.0, -2.0]))
    opt = ArmijoSGD([w], init_step_size=3e38, max_step=1.0)  # the first trial is 1.0
    opt.step(make_closure(opt, lambda: 2.0 * (w * w).sum()))
    assert torch.isfinite(w).all() and opt.param_groups[0]["step_size"] <= 1.0


def test_a_max_step_below_init_step_size_caps_the_steps_before_the_first_search():
    # the steps without a search applied init_step_size (1e10 times max_step) while every
    # capped search ended unresolved: the loss grew from 3.7 to 1.6e18 in 14 steps
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 1) * 0.3)
    g = torch.Generator().manual_seed(1)
    opt = ArmijoSGD([w], max_step=1e-10)
    assert opt.param_groups[0]["step_size"] == opt.param_groups[0]["step_size_avg"] == 1e-10
    for _ in range(14):
        x = torch.randn(64, 8, generator=g) * 2
        opt.step(make_closure(opt, lambda x=x: ((x @ w - x[:, :1]) ** 2).mean()))
        assert opt.stats["applied_step"] <= 1e-10 * (1 + 1e-6)
    assert torch.isfinite(w).all() and w.abs().max() < 10


@pytest.mark.parametrize("backend, mode", [("torch", "global"), ("cpp", "global"),
                                           ("torch", "candidates"), ("torch", "exact")])
def test_a_slope_whose_product_with_the_direction_overflows_leaves_the_step_size_alone(backend,
                                                                                       mode):
    # ‖g‖ = 1e19 with momentum along its direction: Σ g² is finite (the guard passes), ⟨g, d⟩
    # is inf, so f0 − c·η·⟨g, d⟩ = −inf rejected every trial: two exhausted searches cut η by
    # 2^-19 each and every search after them was unresolved at 7e-38 (the batched search's
    # too: the review)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 1, bias=False), nn.Linear(1, 1, bias=False))
    nn.init.zeros_(model[0].weight)
    nn.init.ones_(model[1].weight)
    kw = {"global": {}, "candidates": dict(model=model, candidates=2),
          "exact": dict(model=model, layerwise=True, block_search="exact")}[mode]
    opt = ArmijoSGD(model.parameters(), init_step_size=1e-30, backend=backend, cadence="every",
                    momentum=0.9, momentum_search="direction", **kw)
    closure = make_closure(opt, lambda: (model(torch.ones(4, 100)) * 2.5e17).sum())
    outcomes = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the unresolved-searches warning does not apply)
        for _ in range(14):
            opt.step(closure)
            s = opt.stats
            outcomes.append("E" if s["exhausted"] else "U" if s["unresolved"] else "a")
    assert "E" not in outcomes and outcomes[-1] == "U"
    assert min(np.ravel(opt.stats["next_step_size"])) > 1e-31
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_search_that_could_judge_no_step_is_not_settled():
    # the default cadence took the unresolved search as settled and applied η blind along
    # the overflowing direction for the steps after it (21 of 24)
    w = nn.Parameter(torch.zeros(100))
    opt = ArmijoSGD([w], init_step_size=1e-30, momentum=0.9, momentum_search="direction")
    closure = make_closure(opt, lambda: (w * 1e18).sum())
    outcomes = ""
    for _ in range(20):
        opt.step(closure)
        s = opt.stats
        outcomes += ("U" if s["unresolved"] else "a") if s["searched"] else "."
    first = outcomes.index("U")  # (a.a...U.UUU...: the interval halves at each one)
    assert outcomes[first:].count(".") <= 1, outcomes


# -- the guard on every device: a non-finite gradient or loss skips the step ---------------------
_GUARD_DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", _GUARD_DEVICES)
@pytest.mark.parametrize("bad", ["grad nan", "grad inf", "loss inf", "loss nan"])
@pytest.mark.parametrize("search", [True, False], ids=["search", "plain"])
def test_the_guard_skips_a_non_finite_step_on_every_device(device, bad, search):
    """The guard's scale is base + 0·(Σ g² + f0) (one add with alpha 0): NaN in both entries
    when either is not finite, and the passes then write nothing. This is the device's own add
    that must keep 0·inf = NaN (CUDA's too), with or without a search."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(40, device=device)), nn.Parameter(torch.randn(7, device=device))]
    opt = ArmijoAdam(params, cadence="every" if search else 10**9, weight_decay=0.1)

    def loss_fn():
        return sum((p * p).sum() for p in params)

    for p in params:
        p.grad = 2 * p.detach().clone()
    opt.step(loss_fn=loss_fn, loss=loss_fn().detach())  # a good first step (builds the state)
    before = ([p.detach().clone() for p in params],
              {k: v.clone() for k, v in opt.state[params[0]].items() if torch.is_tensor(v)})
    opt.zero_grad()
    for p in params:
        p.grad.copy_(2 * p.detach())
    loss = loss_fn().detach()
    if bad.startswith("grad"):
        params[1].grad[3] = math.nan if bad == "grad nan" else math.inf
    else:
        loss = torch.tensor(math.inf if bad == "loss inf" else math.nan, device=device)
    opt.step(loss_fn=loss_fn, loss=loss)
    assert opt.stats["skipped"]
    for p, p0 in zip(params, before[0]):
        assert torch.equal(p.detach(), p0)
    for k, v in before[1].items():
        assert torch.equal(opt.state[params[0]][k], v), k


@pytest.mark.parametrize("device", _GUARD_DEVICES)
@pytest.mark.parametrize("search", [True, False], ids=["search", "plain"])
def test_a_skipped_step_is_said_once(device, search):
    """A skip is safe but loses the batch (a fully masked batch's mean loss is 0/0): the first
    is warned about, naming its step, the later ones are not. On a GPU a plain step's skip
    flag is read at the next step, so the warning comes then."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(9, device=device))
    opt = ArmijoAdam([w], cadence="every" if search else 10**9)

    def step(bad=False):
        opt.zero_grad()
        loss = (w * w).sum()
        loss.backward()
        if bad:
            w.grad[4] = math.nan
        opt.step(loss_fn=lambda: (w * w).sum(), loss=loss.detach())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for bad in (False, True, False, True, True, False):
            step(bad)
    said = [str(c.message) for c in caught if "was skipped" in str(c.message)]
    assert len(said) == 1 and "step 2 was skipped" in said[0], said


def test_a_float64_loss_beyond_float32s_range_is_not_taken_for_a_non_finite_one():
    """The guard's one-launch form (add with alpha 0) would round a float64 probe to float32
    first: a float64 loss of 1e300, finite, read as inf and skipped every step. It keeps the
    two-op form for float64 probes (the mean loss over ranks is one too)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = ArmijoAdam([w], cadence=10**9)

    def loss_fn():
        return 1e300 + (w * w).sum()

    for _ in range(2):
        w.grad = 2 * w.detach()
        opt.step(loss_fn=loss_fn, loss=loss_fn().detach())
        assert not opt.stats["skipped"]


@pytest.mark.parametrize("lr", [np.float32(0.1), np.int64(1), np.float64(0.1)])
@pytest.mark.parametrize("cls", [ArmijoAdam, ArmijoSGD])
def test_a_numpy_scalar_lr_is_a_number(cls, lr):
    # refused as "invalid lr: np.float32(0.1) (expected a finite number >= 0)", where AdamW
    # takes it; a LambdaLR reading a float32 NumPy table writes one into the group at each step
    w = nn.Parameter(torch.ones(3))
    opt = cls([w], lr=lr)
    factors = np.linspace(1.0, 0.5, 4, dtype=np.float32)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: factors[min(t, 3)])

    def closure():
        opt.zero_grad()
        loss = (w - 2).pow(2).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
        sched.step()
    assert isinstance(opt.param_groups[0]["lr"], np.floating)
    assert float((w.detach() - 2).pow(2).sum()) < 3.0
    with pytest.raises(ValueError, match="invalid lr"):
        cls([w], lr=np.float32("nan"))


def test_state_of_another_shape_is_named_and_nothing_moves():
    # a parameter's .data replaced by a tensor of another shape (a layer resized in place):
    # the rebuild copied the old state in and failed with a bare size mismatch, after it had
    # re-pointed the tensors; now refused before anything is built, and `del opt.state[p]`
    # starts that tensor afresh
    torch.manual_seed(0)
    a, w = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3, 3))
    x = torch.randn(5, 4)
    opt = ArmijoAdam([a, w], cadence="every")

    def closure():
        opt.zero_grad()
        loss = (x[:, : w.shape[0]] @ w).pow(2).mean() + a.pow(2).sum()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    w.data = torch.randn(4, 2)
    a_storage = a.untyped_storage().data_ptr()
    before = (a.detach().clone(), w.detach().clone(),
              {k: v.clone() for k, v in opt.state[a].items()}, opt.param_groups[0]["step"])
    with pytest.raises(ValueError, match=r"'exp_avg' of a parameter .* has shape \(3, 3\), "
                                         r"the parameter \(4, 2\).*del opt.state\[p\]"):
        opt.step(closure)
    assert torch.equal(a, before[0]) and torch.equal(w, before[1])
    assert all(torch.equal(opt.state[a][k], v) for k, v in before[2].items())
    assert opt.param_groups[0]["step"] == before[3]
    assert a.untyped_storage().data_ptr() == a_storage  # (still the store's: not re-pointed)
    del opt.state[w]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (w restarts with zero moments: warned)
        for _ in range(3):
            opt.step(closure)
    assert opt.state[w]["exp_avg"].shape == (4, 2) and opt.param_groups[0]["step"] == 5


@pytest.mark.parametrize("key, value, cadence", [
    ("step_size", "0.5", "adaptive"), ("step_size_avg", None, "adaptive"),
    ("step_length", "x", 3), ("step_length", math.nan, 3), ("step_length", -1.0, 3),
    ("collapsed", "x", "adaptive"),
])
def test_a_line_search_entry_of_the_wrong_type_is_named_before_anything_moves(key, value,
                                                                             cadence):
    # a string written into a live group raised a bare "'>' not supported between 'str' and
    # 'float'" (nothing had moved); a NaN or negative step_length, or a string collapse flag,
    # was overwritten unseen, where load_state_dict refuses them
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = ArmijoSGD(model.parameters(), momentum=0.9, cadence=cadence)

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    opt.param_groups[0][key] = value
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=f"invalid {key} in param group 0: "):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.param_groups[0]["step"] == 2


def test_a_master_left_by_a_cast_to_fp32_is_not_state_of_another_shape():
    # a bf16 tensor's master is stale once the model is cast to fp32, and dropped: a tensor
    # resized in the same change must not be refused for its master's old shape (the check
    # of state against its tensor's shape did, in review)
    torch.manual_seed(0)
    lin, extra = nn.Linear(4, 1), nn.Parameter(torch.zeros(3))
    lin, extra.data = lin.bfloat16(), extra.data.bfloat16()
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = ArmijoSGD([*lin.parameters(), extra])  # (stateless: a master is its only state)

    def closure():
        opt.zero_grad()
        out = lin(x.to(lin.weight.dtype)).float() + 0.1 * extra.float().sum()
        loss = nn.functional.mse_loss(out, y)
        loss.backward()
        return loss

    opt.step(closure)
    assert list(opt.state[extra]) == ["master"]
    lin.float()
    extra.data = torch.zeros(5)
    for _ in range(2):
        opt.step(closure)
    assert "master" not in opt.state[extra] and extra.dtype == torch.float32


def _td_run(target_inside, steps=60):
    """Q-learning without a target network: the TD target r + γ·max Q(s') from the trained
    network under no_grad, computed inside the closure (so each trial recomputes it at its own
    point) or once before the step."""
    torch.manual_seed(0)
    q = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = ArmijoAdam(q.parameters())
    s, a = torch.randn(2000, 4), torch.randint(0, 2, (2000,))
    r, s2 = torch.randn(2000) * 0.1 + s[:, 0], s + 0.1 * torch.randn(2000, 4)
    for _ in range(steps):
        idx = torch.randint(0, 2000, (64,))
        with torch.no_grad():
            fixed = r[idx] + 0.9 * q(s2[idx]).max(1).values

        def closure(idx=idx, fixed=fixed):
            opt.zero_grad()
            y = fixed
            if target_inside:
                with torch.no_grad():
                    y = r[idx] + 0.9 * q(s2[idx]).max(1).values
            loss = nn.functional.smooth_l1_loss(q(s[idx]).gather(1, a[idx, None]).squeeze(1), y)
            loss.backward()
            return loss

        opt.step(closure)
    return opt


def test_a_target_recomputed_inside_the_loss_function_is_named_when_its_searches_exhaust():
    # a detached target from the trained network inside the loss function: the gradient leaves
    # it out, each trial recomputes it, and the test compared the trial losses with a slope
    # that was not theirs: η 1e-3 -> 1e-8 with, at most, the warning about unresolved searches
    # after the collapse (an RL user's audit). The trials' realised share of the predicted
    # fall held still as η shrank (0.14 at every backtrack), which curvature cannot do
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = _td_run(target_inside=True)
    named = [str(w.message) for w in caught if "not the slope of the loss" in str(w.message)]
    assert len(named) == 1 and "compute it once before the step" in named[0], named
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same run with the target fixed before the step
        _td_run(target_inside=False)
    assert opt.param_groups[0]["step_size_avg"] < 1e-5  # (the collapse the warning names)


def test_searches_exhausted_by_curvature_alone_are_not_taken_for_a_gradient_mismatch():
    # a stiff quadratic whose first trials are far too long: every backtrack is rejected, but
    # the realised share of the predicted fall, 1 - η·κ/2, moves towards 1 as η halves
    w = nn.Parameter(torch.ones(8))
    opt = ArmijoSGD([w], cadence="every", init_step_size=1e3, max_trials=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step(make_closure(opt, lambda: 50.0 * w.pow(2).sum()))
            assert opt.stats["exhausted"]
    assert not [w for w in caught if "not the slope of the loss" in str(w.message)]


def test_trial_losses_a_constant_above_f0_are_named_a_floor_of_the_loss_not_a_mismatch():
    # (a float64 user's audit) a float32 Rosenbrock near its minimum, f0 = 1.7e-11, exhausted a
    # search with every trial 3.6e-13 above f0 whatever η, its rounding; the warning named a
    # target recomputed inside the loss function. A rise that does not shrink with η is a
    # floor of the loss (rounding, noise, a jump at θ0), not another slope
    w = nn.Parameter(torch.linspace(-1.0, 1.0, 8))
    opt = ArmijoSGD([w], cadence="every", max_trials=8)
    loss = (w * w).sum()
    loss.backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(loss_fn=lambda: loss.detach() + 1e-3, loss=loss.detach())
    assert opt.stats["exhausted"]
    said = [str(c.message) for c in caught if "a search exhausted its trials" in str(c.message)]
    assert len(said) == 1 and "does not follow the step" in said[0], said
    assert "not the slope of the loss" not in said[0]


def test_a_warning_raised_as_an_error_after_a_whole_step_does_not_rewind_the_rng():
    # a closure-form search step that raises puts the generators back; a warning the step
    # defers to its end, turned into an error by a filter, raised after θ, the state and the
    # count had moved, and the generators were rewound all the same: a loop that caught it
    # and went on redrew the masks of a step it had applied (a review)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 1))
    x = torch.randn(16, 6)
    gen = torch.Generator().manual_seed(1)  # noise of the loop's own: the θ0 check warns
    opt = ArmijoAdam(model.parameters(), model=model, cadence="every")

    def closure():
        opt.zero_grad()
        loss = model(x + torch.randn(x.shape, generator=gen)).pow(2).mean()
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="at θ0 gives"):
            opt.step(closure)
    assert opt.param_groups[0]["step"] == 1  # (the step is whole)
    assert not torch.equal(torch.get_rng_state(), rng)  # the training call's draws stand


# -- full-batch training under a cadence that skips searches (a float64 user's audit) -----------
def _least_squares_steps(opt, w, steps, batch=None):
    torch.manual_seed(1)
    A, b = torch.randn(256, 20) @ torch.diag(torch.logspace(0, 1.5, 20)), torch.randn(256)
    A, b = A.to(w.device), b.to(w.device)
    for _ in range(steps):
        idx = torch.arange(256) if batch is None else torch.randint(0, 256, (batch,))
        opt.step(make_closure(opt, lambda idx=idx: ((A[idx] @ w - b[idx]) ** 2).mean()))


@pytest.mark.parametrize("cadence", ["adaptive", 4])
def test_a_batch_that_repeats_under_a_cadence_that_skips_searches_is_named(cadence):
    # full batch: the steps between searches applied η untested; on least squares with
    # κ = 1000 ArmijoAdam ended at 0.33 after 500 steps against 7.4e-3 with a search at every
    # step, and nothing said that the cadence was the wrong one for this problem
    w = nn.Parameter(torch.zeros(20))
    opt = ArmijoAdam([w], cadence=cadence)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _least_squares_steps(opt, w, 60)
    said = [str(c.message) for c in caught if "the batch repeats" in str(c.message)]
    assert len(said) == 1 and 'cadence="every"' in said[0], said


@pytest.mark.gpu
def test_a_batch_that_repeats_is_named_on_a_gpu_too():
    # the loss of a step without a search goes to pinned memory there, read at the next search
    # (that it adds no sync: test_host_sync's GPU test, whose plain steps follow searches)
    w = nn.Parameter(torch.zeros(20, device="cuda"))
    opt = ArmijoAdam([w])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _least_squares_steps(opt, w, 60)
    assert [c for c in caught if "the batch repeats" in str(c.message)]


def test_a_search_at_every_step_and_mini_batches_are_not_taken_for_a_repeated_batch():
    w = nn.Parameter(torch.zeros(20))
    opt = ArmijoAdam([w], cadence="every")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _least_squares_steps(opt, w, 30)
    assert not [c for c in caught if "the batch repeats" in str(c.message)]
    w = nn.Parameter(torch.zeros(20))
    opt = ArmijoAdam([w])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _least_squares_steps(opt, w, 300, batch=16)
    assert not [c for c in caught if "the batch repeats" in str(c.message)]
    assert opt._repeat_watch.done  # (the watch ends after 20 searches that did not repeat)


def test_the_repeated_batch_watch_reads_a_deferred_loss_at_the_next_search():
    # on a GPU a step without a search has no host sync: its loss goes to pinned memory and is
    # read at the next search (a CPU tensor kept as pending stands in for the pinned copy)
    from armijo_fused.optimizers.repeated_batch import RepeatedBatchWatch

    watch = RepeatedBatchWatch()
    for k in (1, 4, 7):
        assert not watch.repeated
        watch.searched(k, 2.0, 1.0)  # (f0, the loss where its step ended)
        watch._pending = (k + 1, torch.tensor(1.0))  # the loss at the step after it
    watch.searched(10, 2.0, 1.0)  # the third repeat, read at this search
    assert watch.repeated
    watch.plain(11, torch.tensor(1.5))  # another batch: no longer repeating
    assert not watch.repeated and not watch.done
    watch = RepeatedBatchWatch()  # on a CPU the step after the search compares at once
    for k in (1, 4, 7):
        watch.searched(k, 2.0, 1.0)
        watch.plain(k + 1, torch.tensor(1.0))
    assert watch.repeated


def test_the_repeated_batch_watch_follows_a_cadence_changed_between_steps():
    # (a review) the watch froze the cadence it was created under: switched to "every" it
    # still advised cadence="every"; switched from it, it never looked
    w = nn.Parameter(torch.zeros(20))
    opt = ArmijoAdam([w])
    _least_squares_steps(opt, w, 3)
    opt.cadence = "every"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _least_squares_steps(opt, w, 40)
    assert not [c for c in caught if "the batch repeats" in str(c.message)]
    w = nn.Parameter(torch.zeros(20))
    opt = ArmijoAdam([w], cadence="every")
    _least_squares_steps(opt, w, 10)  # (the batch found to repeat while every step searches)
    opt.cadence = "adaptive"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _least_squares_steps(opt, w, 60)
    assert [c for c in caught if "the batch repeats" in str(c.message)]


def test_a_step_size_that_grows_on_a_full_batch_is_not_taken_for_noise_to_anneal():
    # the 20x growth warning (no schedule attached) is about noisy mini-batches, whose tests
    # pass steps that fit their own batch; on a full batch (Rosenbrock here) η grows because
    # the problem allows it, and the warning told a float64 user to attach a schedule
    x0 = torch.full((10,), -1.2)
    x0[1::2] = 1.0
    w = nn.Parameter(x0)
    opt = ArmijoAdam([w], cadence="every")
    loss = (lambda: (100 * (w[1:] - w[:-1] ** 2) ** 2 + (1 - w[:-1]) ** 2).sum())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(100):
            opt.step(make_closure(opt, loss))
    assert opt.param_groups[0]["step_size_avg"] > 20 * 1e-3  # (it did grow past the bound)
    assert not [c for c in caught if "has grown" in str(c.message)], caught
