"""Property-based invariants of the backtracking controller (linesearch/controller.py).

The controller only sees the passes through a narrow interface (``Passes``), so it is driven here
by a simulated one: per block b a slope ⟨g_b, d_b⟩ (any sign: momentum can point uphill) and a
curvature a_b ≥ 0, the loss along the direction f(η) = 1 − Σ η_b⟨g_b, d_b⟩ + Σ a_b η_b², and along
the fallback line (⟨g_b, p_b⟩ = 1) f(η) = 1 − Σ η_b + Σ a_b η_b². Now and then a trial loss is NaN,
every trial is worse by a constant (a loss that does not follow the model), and a held block is
frozen (η 0) or has a zero direction. Hypothesis draws the blocks, the start, the searched subset
(layer-wise), the optimistic trial (grow_all), the joint restart and the hyperparameters; every
search must:

* end where it says: θ at the accepted point, or back at θ0 (η = 0) without one;
* accept only a point that passes the Armijo test on the line it was tested on;
* take at most max_trials counted trials (plus at most two uncounted ones);
* never try a step size above the start (eta0, or the optimistic trial's);
* move a block held fixed only by whole backtracking factors from its start, and one that
  cannot move (frozen at η 0, or a zero direction) not at all;
* never try the same point twice in a row (but for the switch to the fallback line).
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from problems import SimulatedPasses

from armijo_fused.linesearch.controller import armijo_search

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def searches(draw, held_alone=False):
    """A search's problem and options. ``held_alone``: always layer-wise, with the restart and
    the held blocks' trial alone (probe_held), on a loss that often saturates, so that the
    trial alone is reached (about 1 example in 300 of the general draw reaches it)."""
    n = draw(st.integers(2, 4) if held_alone else st.integers(1, 4))
    gd = draw(st.lists(st.floats(-1.0, 2.0), min_size=n, max_size=n))
    curvature = draw(st.lists(st.floats(0.0, 50.0), min_size=n, max_size=n))
    eta0 = draw(st.lists(st.floats(1e-3, 4.0), min_size=n, max_size=n))
    dd = [1.0] * n
    search = None
    drop = []
    if n > 1 and (held_alone or draw(st.booleans())):  # layer-wise: some searched, some held
        search = sorted(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n - 1)))
        for b in set(range(n)) - set(search):  # a held block that cannot move, now and then
            kind = draw(st.sampled_from(["moves", "frozen", "zero direction", "untested"]))
            if kind == "frozen":
                eta0[b] = 0.0
            elif kind == "zero direction":
                gd[b] = dd[b] = 0.0
            elif kind == "untested":  # leaves the trials at the first rejection
                drop.append(b)
    optimistic = None
    if search is not None and draw(st.booleans()):  # grow_all: every block grown first
        optimistic = [e * draw(st.floats(1.0, 2.0)) for e in eta0]
    nan_at = draw(st.sets(st.integers(1, 12), max_size=2))
    shift = draw(st.sampled_from([0.0, 0.0, 0.5, 5.0]))
    # (a saturating loss: the miss rule blames the held blocks, and probe_held tries them alone)
    ceiling = draw(st.sampled_from([None, 1.5, 2.0, 5.0]))
    joint_restart = held_alone or draw(st.booleans())
    kw = dict(c=draw(st.floats(0.01, 0.5)), backtrack=draw(st.sampled_from([0.3, 0.5, 0.8])),
              max_trials=draw(st.integers(1, 12)), search=search, optimistic=optimistic,
              joint_restart=joint_restart, drop_on_reject=sorted(drop),
              # (it acts on the restart)
              probe_held=held_alone or (joint_restart and draw(st.booleans())))
    return gd, curvature, nan_at, eta0, dd, shift, ceiling, kw


@SETTINGS
@given(searches())
def test_every_search_keeps_the_controllers_invariants(case):
    _search_keeps_the_invariants(case)


@SETTINGS
@given(searches(held_alone=True))
def test_searches_that_try_the_held_blocks_alone_keep_the_invariants(case):
    _search_keeps_the_invariants(case)


def _search_keeps_the_invariants(case):
    gd, curvature, nan_at, eta0, dd, shift, ceiling, kw = case
    passes = SimulatedPasses(gd, curvature, nan_at, dd, shift, ceiling)
    result = armijo_search(passes, passes.loss, torch.tensor(1.0, dtype=torch.float64), eta0,
                           **kw)

    # θ ends where the result says
    if result.accepted is None:
        assert passes.eta == [0.0] * len(eta0)
    else:
        assert passes.eta == result.accepted
        # the accepted point passed the test, on the line it was tested on
        slopes = passes.slopes(passes.precond)
        decrease = sum(e * s for e, s in zip(result.accepted, slopes))
        assert decrease > 0.0
        assert result.loss_after <= 1.0 - kw["c"] * decrease

    # counted trials, plus the uncounted ones (a non-descent switch, a failed optimistic trial,
    # the retry once the untested held blocks left, the held blocks' first trial alone)
    alone = any(all(eta[b] == 0.0 for b in kw["search"] or ()) and any(eta)
                for eta, _ in result.history) and kw["probe_held"]
    assert result.trials == len(result.history) <= (kw["max_trials"] + 2 + bool(result.waited)
                                                    + alone)
    assert set(result.waited) <= set(kw["drop_on_reject"])
    if result.waited and result.accepted is not None:  # they did not move
        assert all(result.accepted[b] == 0.0 for b in result.waited)

    # no trial repeats the point before it (but for the switch to the fallback line, at the
    # same η): a wasted forward
    etas = [eta for eta, _ in result.history]
    repeats = sum(a == b for a, b in zip(etas, etas[1:]))
    assert repeats <= int(result.non_descent)
    if not result.non_descent:  # nor any point before, on the one line searched
        assert len({tuple(eta) for eta in etas}) == len(etas), etas

    start = kw["optimistic"] or eta0
    held = set(range(len(eta0))) - set(kw["search"] or range(len(eta0)))
    for i, (eta, _) in enumerate(result.history):
        for b, e in enumerate(eta):
            # never above the start (the optimistic trial's, or eta0)
            assert e <= max(start[b], eta0[b]) * (1 + 1e-12)
            optimistic_trial = i == 0 and kw["optimistic"] is not None
            if b in result.waited and e == 0.0:
                continue  # left the trials
            if b in held and eta0[b] == 0.0:
                assert e == 0.0  # frozen
            elif b in held and dd[b] == 0.0 and not (result.non_descent or optimistic_trial):
                assert e == eta0[b]  # it cannot move, so no trial learns anything of its η
            elif b in held and not optimistic_trial:
                # a held block moves only by whole backtracking factors from its start
                j = round(math.log(e / eta0[b]) / math.log(kw["backtrack"]))
                assert j >= 0 and math.isclose(e, eta0[b] * kw["backtrack"] ** j, rel_tol=1e-9)


class QuantizedPasses(SimulatedPasses):
    """A loss read on a grid of spacing ``quantum`` (as a bf16 model's forward rounds): a step
    too small to move it returns f0 to the last bit."""

    def __init__(self, gd, curvature, quantum):
        super().__init__(gd, curvature)
        self.quantum = quantum

    def at(self, eta, precond):
        slopes = self.slopes(precond)
        value = 1.0 - sum(e * s for e, s in zip(eta, slopes)) + sum(
            a * e * e for a, e in zip(self.a, eta))
        if self.quantum:
            value = 1.0 + self.quantum * round((value - 1.0) / self.quantum)
        return value

    def loss(self):
        return torch.tensor(self.at(self.eta, self.precond), dtype=torch.float64)


@SETTINGS
@given(n=st.integers(1, 3), gd=st.floats(-1.0, 2.0), curvature=st.floats(0.0, 50.0),
       eta0=st.floats(1e-3, 4.0), quantum=st.sampled_from([0.0, 1e-3, 0.05, 0.3]),
       resolution=st.sampled_from([8.0 * torch.finfo(torch.float32).eps, 1e-3, 0.05]),
       c=st.floats(0.01, 0.5), backtrack=st.sampled_from([0.3, 0.5, 0.8]),
       max_trials=st.integers(1, 12), candidates=st.integers(1, 4))
def test_batched_and_sequential_searches_end_the_same_way(n, gd, curvature, eta0, quantum,
                                                          resolution, c, backtrack, max_trials,
                                                          candidates):
    # A search that backtracked into the loss's resolution after rejections ended exhausted
    # in the sequential controller but unresolved (η kept, applied blind) in the batched one.
    # Both must end alike: accepted (the same η), unresolved (with or without a rejection
    # before: a loss hiding the backtracked step), or exhausted; and flag the same (a first
    # trial unchanged, the η rejected last), to the last bit (the decrease summed alike).
    from armijo_fused.linesearch.batched import batched_armijo_search

    def outcome(result):
        kind = ("accepted" if result.accepted is not None else "skipped" if result.skipped
                else "unresolved" if result.unresolved else "exhausted")
        # (unchanged: the next search starts one growth further; rejected: η may fall)
        return kind, result.accepted, result.rejected, result.non_descent, result.unchanged

    kw = dict(c=c, backtrack=backtrack, max_trials=max_trials, resolution=resolution)
    f0 = torch.tensor(1.0, dtype=torch.float64)
    seq = QuantizedPasses([gd] * n, [curvature] * n, quantum)
    sequential = armijo_search(seq, seq.loss, f0, [eta0] * n, **kw)
    bat = QuantizedPasses([gd] * n, [curvature] * n, quantum)

    def evaluate_many(etas, precond):
        return torch.tensor([bat.at([e] * n, precond) for e in etas], dtype=torch.float64)

    bat.first([eta0] * n)
    batched = batched_armijo_search(bat, evaluate_many, f0, eta0, candidates=candidates, **kw)
    assert outcome(batched) == outcome(sequential)
    assert batched.trials == sequential.trials
