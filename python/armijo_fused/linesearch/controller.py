"""The backtracking controller: trials, the Armijo test, backtracking and the fallbacks.

It drives the fused passes through a :class:`Passes` object (one launch per flat buffer) and never
touches tensors element-wise itself. One search, for step sizes η_b per block (the layer-wise
blocks across all buffers; equal in the global mode):

1. ``first``: state update, direction d, sums ⟨g_b, d_b⟩, θ ← θ0 − η d (one fused pass).
2. Trial forward; then one host read of [f0, f(trial), per-block sums] (one sync per trial).
3. If Σ_b η_b ⟨g_b, d_b⟩ ≤ 0 the direction is not a descent direction (momentum can do that):
   move to the fallback direction (preconditioned gradient, always descent) at the same η and
   re-evaluate; counted in ``non_descent``.
4. Armijo: accept when f(trial) ≤ f0 − c · Σ_b η_b ⟨g_b, d_b⟩, in float64 on the host, on the
   direction actually applied. A non-finite trial loss is a rejection.
5. Else η ← β·η, move θ in place to the new trial point (one fused pass), go to 2.
6. Once the predicted decrease η·⟨g,d⟩ is below the loss's float resolution, or the trial
   loss equals f0 exactly (e.g. a loss that underflowed to 0), the comparison is decided by
   rounding: the search stops there (``unresolved``), takes no step and keeps η. After a
   rejection the search got there by backtracking from a step the test judged: it is exhausted
   (7), unless the last trial's loss equals f0 to the bit (a bf16 model's rounding hid the
   smaller step): unresolved then, with the step sizes of its last rejected trial in
   ``rejected``.
7. After ``max_trials`` rejections: the documented fallback is to take no step (θ moves back to
   θ0, to the rounding of the largest trial point; the state keeps the gradient, as an Adam
   step with lr 0 would), and the policy resets η to its running average.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor


@dataclass
class SearchResult:
    accepted: list | None  # the accepted step size per block (unscaled); None: no step taken
    trials: int
    loss_before: float
    loss_after: float  # loss at the accepted trial point (nan when none)
    gd: float  # Σ ⟨g, d⟩ of the applied direction
    grad_sq: float  # Σ ‖g‖²
    non_descent: bool = False
    unresolved: bool = False  # the predicted decrease fell below the loss's float resolution
    # ... because the search's first trial returned f0 exactly although a decrease was
    # predicted (its forward did not see the moved weights; after a backtrack a bf16 model's
    # rounding does that too, so later trials do not count)
    unchanged: bool = False
    # ... after a trial the test judged had failed it (the last trial's loss was then f0 to the
    # last bit: a bf16 model's rounding hid the backtracked step): that trial's η per block, the
    # smallest the test rejected on the line searched last; None otherwise
    rejected: list | None = None
    skipped: bool = False  # the guard was not finite (non-finite gradient or f0): nothing moved
    history: list = field(default_factory=list)  # (eta per block, loss) per trial
    block_gd: list = field(default_factory=list)  # <g_b, d_b> per block
    block_dd: list = field(default_factory=list)  # ‖d_b‖² per block (of the accepted direction)
    # along_fallback: ⟨g_b, d_b⟩ of the first pass's own direction (the momentum direction), read
    # with the first trial
    first_gd: list = field(default_factory=list)
    # the accepted trial was the optimistic one (every block grown): every block was tested
    optimistic: bool = False
    # unresolved because ⟨g, d⟩ overflowed float32: the test could judge no step (not settled,
    # and no sign of a loss that cannot resolve the decrease)
    overflow: bool = False
    # the blocks that left the trials at the first rejection (``drop_on_reject``): at θ0 and
    # judged by nothing; the caller keeps their η, as a frozen block's
    waited: tuple = ()
    # momentum_search="gradient": the search along g whose η the momentum check (this result)
    # tested along d; its history says where each block's search started (merge_below)
    searched: SearchResult | None = None


class Passes:
    """The interface the controller needs; implemented over the optimizer's flat buffers.

    It remembers where θ sits (``eta``: one step size per block, in buffer order; ``precond``:
    whether the fallback direction is in use), so a move names only its destination and a revert
    is one call. ``first`` and ``move_to(..., compute_sums=True)`` return each buffer's per-block
    sums, a [blocks, 3] tensor of ⟨g_b, d_b⟩, ‖g_b‖², ‖d_b‖². (The optimizer reads more of its
    own implementation, :class:`~armijo_fused.optimizers.passes.FlatPasses`; the controller and
    the batched search need only this.)
    """

    eta: list
    precond: bool

    def first(self, eta: Sequence[float], *, precond: bool = False) -> list[Tensor]: ...

    def fallback_sums(self, sums: list[Tensor]) -> list[Tensor] | None: ...

    def move_to(
        self, eta: Sequence[float], *, precond: bool | None = None, compute_sums: bool = False
    ) -> list[Tensor] | None: ...


def evaluate_on_every_rank(evaluate: Callable[[], Tensor], reduce, device):
    """``(value, failure)``: ``evaluate()``, or, in a distributed run (``reduce`` given), NaN and
    the exception it raised. The other ranks are waiting in the collective that follows, so a
    rank whose loss function raised must still take part in it: see :func:`reduce_with_flag`.
    A ``KeyboardInterrupt`` too (Ctrl-C reaches a trial forward at once): the rank takes part,
    then raises it."""
    try:
        return evaluate(), None
    except BaseException as e:
        if reduce is None:
            raise
        return torch.full((), math.nan, dtype=torch.float64, device=device), e


def reduce_with_flag(reduce, values: Tensor, failure: BaseException | None):
    """Reduce ``values`` (1-D, float64) with one more entry, "this rank's loss function raised";
    returns the reduced values and that entry's mean over ranks, both on the device (read them
    with the rest, in the read the caller does anyway)."""
    flag = torch.full((1,), float(failure is not None), dtype=torch.float64, device=values.device)
    out = reduce(torch.cat([values, flag]))
    return out[:-1], out[-1:]


def raise_if_a_rank_failed(failure: BaseException | None, failed: float, what: str) -> None:
    """After a collective that carried each rank's flag (their mean, ``failed``): the rank that
    failed raises its own error, every other rank one that says so; each rank's step then
    undoes itself, and the ranks' next collectives still pair up."""
    if failure is not None:
        raise failure
    if failed > 0.0:
        raise RuntimeError(f"{what} raised on another rank (its traceback is in that rank's "
                           "output); the step has been undone on every rank")


def read_checking_ranks(vec: list[Tensor], flagged: bool, failure, f0_failure) -> list[float]:
    """:func:`read_floats` of ``vec`` (ending with this trial's reduced flag when ``flagged``)
    and of the f0 flag ``f0_failure`` carries (None: none); raises for a rank whose loss
    function raised (:func:`raise_if_a_rank_failed`); returns the values without the flags."""
    vals = read_floats(vec + ([f0_failure[1]] if f0_failure is not None else []))
    if f0_failure is not None:
        failed0, vals = vals[-1], vals[:-1]
        raise_if_a_rank_failed(f0_failure[0], failed0, "the loss function")
    if flagged:
        failed, vals = vals[-1], vals[:-1]
        raise_if_a_rank_failed(failure, failed, "the loss function")
    return vals


def read_floats(tensors: Sequence[Tensor]) -> list[float]:
    """Bring small device tensors to the host in one transfer per device (the search's sync)."""
    out = []
    by_device: dict = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append((i, t.detach().reshape(-1)))
    values: dict[int, list[float]] = {}
    for items in by_device.values():
        # cat promotes to the widest dtype (exact); tolist() makes Python floats of any float
        # dtype exactly, so no cast to float64 first (one launch less before the read)
        flat = torch.cat([t for _, t in items])
        flat = (flat if flat.is_floating_point() else flat.double()).tolist()
        pos = 0
        for i, t in items:
            values[i] = flat[pos : pos + t.numel()]
            pos += t.numel()
    for i in range(len(tensors)):
        out.extend(values[i])
    return out


#: the relative resolution of an fp32 loss (see :func:`loss_resolution`): 9.5e-7
FP32_RESOLUTION = 8.0 * torch.finfo(torch.float32).eps


def loss_resolution(loss: Tensor, float64_model: bool = False) -> float:
    """The relative resolution of a loss value: 8 units in the last place of its dtype, so a
    decrease below it is decided by rounding in f(trial) and f0. fp32 (and a Python float,
    usually one's ``.item()``): 9.5e-7; a bf16 / fp16 loss (autocast without an fp32 loss):
    6.3e-2 / 7.8e-3. A float64 loss counts as fp32 (``loss.double()`` of an fp32 model's
    forward) unless ``float64_model``, every trained tensor float64 (autocast leaves float64
    alone): 1.8e-15. (Taken as fp32, a float64 model's 1e6 + ½‖x‖² stalled at 200 above 1e6.)"""
    if loss.dtype in (torch.bfloat16, torch.float16):
        dtype = loss.dtype
    elif loss.dtype == torch.float64 and float64_model:
        dtype = torch.float64
    else:
        dtype = torch.float32
    return 8.0 * torch.finfo(dtype).eps


def armijo_search(
    passes: Passes,
    evaluate: Callable[[], Tensor],
    f0: Tensor,
    eta0: Sequence[float],
    *,
    c: float,
    backtrack: float,
    max_trials: int,
    search: Sequence[int] | None = None,
    sums: list[Tensor] | None = None,
    allow_fallback: bool = True,
    reduce: Callable[[Tensor], Tensor] | None = None,
    guard: Tensor | None = None,
    resolution: float = FP32_RESOLUTION,
    f0_failure: tuple | None = None,
    along_fallback: bool = False,
    optimistic: Sequence[float] | None = None,
    joint_restart: bool = False,
    drop_on_reject: Sequence[int] = (),
    probe_held: bool = False,
) -> SearchResult:
    """Run one backtracking search; θ ends at the accepted trial point (or at θ0 if none).

    ``eta0`` holds one step size per block (all flat buffers' blocks, in order). ``search``: the
    blocks whose step size backtracks (None: all, the global search); the others keep theirs, and
    the test is the combined one, Σ over all blocks (see ``optimistic``). If half of
    ``max_trials`` pass without acceptance, every block that can move backtracks from then on,
    since the blocks held fixed may be the ones overshooting. ``joint_restart``: the blocks held
    fixed have all passed a test before; if the first backtrack of the searched blocks does not
    shrink the test's miss, f(trial) − (f0 − c·Σ η⟨g,d⟩), by the factor ``backtrack`` at least,
    the held blocks are the ones overshooting (the miss of a searched block that overshoots
    shrinks by about ``backtrack``², its quadratic term), and the search restarts from ``eta0``
    with every block backtracking that can move (η > 0 and a direction that is not zero), instead
    of shrinking the searched blocks alone towards a collapse first. ``probe_held``: the
    searched blocks' η is one no test has judged (a layer unfrozen, a head added), so they are
    the likelier culprits; where that miss rule would restart, the held blocks are tried alone
    instead (the searched ones at θ0; the first such trial not counted against
    ``max_trials``), backtracking alone until they pass the test; then the searched blocks go
    on from where they were (retried there if the held ones had to backtrack, else below it),
    the held ones at the η they passed at. (Far past its
    overshoot the miss of an untested block shrank by less than ``backtrack``, and the restart
    dragged the tested blocks 8-16x down with it, for good: an audit; where the held blocks did
    overshoot, the restart shrank them to the searched block's scale.) ``drop_on_reject``: held
    blocks whose η no test has judged (a layer-wise run's first searches): they move in the
    trials until one is rejected; then they leave them (η 0, reported in ``waited``) and the
    search goes on from ``eta0`` without them (that trial not counted against
    ``max_trials``), since they may be what overshot. Kept in, the searched block backtracked
    alone for half of ``max_trials`` first and ended 500x below the others, for good (the
    first block of an MLP, a UNet, a ResNet: an audit); all backtracking together instead,
    every block took the stiffest one's scale (4x the iterations on the block quadratic).
    ``sums``: per-block sums of a
    first pass that already ran (θ is then moved to ``eta0``); by default the first pass runs
    here.
    ``allow_fallback``: switch to the preconditioned gradient when Σ η⟨g,d⟩ <= 0 (else such a
    search ends unresolved).
    ``guard``: a small device tensor read along with the first trial; if any entry is not finite
    the passes wrote nothing (see torch_backend.py) and the search ends as skipped.
    ``reduce``: mean over ranks (distributed runs) of the trial loss, the per-block sums and the
    guard, in one collective per trial; ``f0`` must already be reduced.
    ``f0_failure``: (this rank's exception or None, the reduced flag) of the f0 evaluation in a
    distributed run (:func:`reduce_with_flag`), read with the first trial and raised then.
    ``resolution``: relative float resolution of the loss (:func:`loss_resolution`); once the
    predicted decrease Σ η⟨g,d⟩ <= resolution·|f0| the search stops without a step
    (``unresolved``), since rounding decides such comparisons. The predicted decrease, not its
    c-fraction: with a small ``c`` the test is close to f(trial) <= f0, which a measurable
    decrease still decides (c·Σ η⟨g,d⟩ made every search unresolved at c = 1e-4).
    ``optimistic``: a first trial tried before ``eta0`` (layer-wise: every block grown, where
    ``eta0`` grows the searched block only); if it passes, every block takes it (all were tested
    together); if it does not pass (rejected, a decrease too small to resolve, or Σ η⟨g,d⟩ ≤ 0
    at the grown blocks), the search goes on from ``eta0`` as it would have (the trial is
    counted, but not against ``max_trials``). A non-finite trial loss is a rejection even where
    the predicted decrease cannot be resolved (or, without ``allow_fallback``, is ≤ 0): a
    search whose every trial loss is NaN ends exhausted, which resets η, rather than
    unresolved, which would keep it.
    """
    pending = optimistic is not None and list(optimistic) != list(eta0)
    eta = list(optimistic) if pending else list(eta0)
    on_fallback = False  # whether the first pass put the trial on the fallback line itself
    if sums is None:
        sums = passes.first(eta, precond=along_fallback)
        on_fallback = along_fallback
    else:  # (along the direction: a search along the fallback may have run before)
        passes.move_to(eta, precond=False)
    precond = False
    first_gd = None
    if along_fallback:  # (the first pass folded g into the state; the trials move along g)
        # (read with the first trial; buffers on several devices: gathered on the first's)
        first_gd = torch.cat([s[:, 0].reshape(-1).to(sums[0].device) for s in sums])
        line = passes.fallback_sums(sums) if on_fallback else None
        if line is None:  # (a pass that moves there, or only sums when already there)
            line = passes.move_to(eta, precond=True, compute_sums=True)
        sums, precond = line, True
    moving = set(range(len(eta))) if search is None else set(search)
    non_descent = False
    history = []
    f_before = math.nan
    gd = grad_sq = math.nan
    gd_b: list[float] = []
    dd_b: list[float] = []
    first_gd_b: list[float] = []
    unresolved = unchanged = overflow = False
    # trials the search may take: max_trials, plus one for each trial that is not counted
    # (the non-descent one, a failed optimistic one, the retry once untested held blocks left,
    # the held blocks' first trial alone, once); each raises it by one: at most four past
    limit = max_trials
    # the last trial the test could judge (or whose loss was not finite) and rejected: its η
    rejected = None
    optimistic_rejected = None  # grow_all's optimistic trial, rejected
    solo_misses = []  # the test's miss at each rejected trial that held some blocks fixed
    drop = set(drop_on_reject) - moving
    waited = ()
    # during the held blocks' own trials (probe_held): the searched blocks' η, the held blocks
    # that can move, and whether those have backtracked
    probing, probe_able, held_shrank, probed = None, set(), False, False
    cleared = False  # that trial passed: the held blocks backtrack no more in this search
    for trial in itertools.count(1):
        ft, failure = evaluate_on_every_rank(evaluate, reduce, f0.device)
        vec = [f0.reshape(1), ft.reshape(1)] + [s.reshape(-1) for s in sums]
        if guard is not None and trial == 1:
            vec.append(guard.reshape(-1))
        if first_gd is not None and trial == 1:
            vec.append(first_gd)
        if reduce is not None:  # f0 is reduced once by the caller; the rest in one collective
            rest = torch.cat([v.double().to(vec[0].device) for v in vec[1:]])
            vec = [vec[0].double().to(rest.device), *reduce_with_flag(reduce, rest, failure)]
        vals = read_checking_ranks(vec, reduce is not None, failure,
                                   f0_failure if trial == 1 else None)
        f_before, f_trial, rows = vals[0], vals[1], vals[2:]
        if first_gd is not None and trial == 1:
            first_gd_b, rows = rows[len(rows) - first_gd.numel() :], rows[: -first_gd.numel()]
        if guard is not None and trial == 1:
            g_vals, rows = rows[len(rows) - guard.numel() :], rows[: -guard.numel()]
            if not all(math.isfinite(x) for x in g_vals):
                return SearchResult(None, 1, f_before, math.nan, math.nan, math.nan, skipped=True,
                                    history=[(list(eta), f_trial)])
        gd_b, gsq_b, dd_b = rows[0::3], rows[1::3], rows[2::3]
        gd, grad_sq = sum(gd_b), sum(gsq_b)
        decrease = sum(e * x for e, x in zip(eta, gd_b))
        history.append((list(eta), f_trial))
        if not math.isfinite(f_before):
            break  # caller handles; θ reverted below
        if probing is not None:  # the held blocks alone (probe_held): are they overshooting?
            # (a decrease below the loss's resolution, or f0 to the last bit: rounding would
            # decide, and they move too little to be what overshot)
            cleared = math.isfinite(f_trial) and (
                f_trial <= f_before - c * max(decrease, 0.0) or f_trial == f_before
                or decrease <= resolution * abs(f_before))
            # (and no trial alone that only a trial after it could use: the last one)
            if trial == limit or (not cleared and trial + 1 == limit):
                break
            if cleared:  # the held blocks at the η they passed at, the searched ones back:
                # where the held ones passed at once, the trial that held them at it was
                # rejected for the searched ones' sake, who go on below it; else it is retried
                shrink = 1.0 if held_shrank else backtrack
                eta = [shrink * probing[b] if b in moving else e for b, e in enumerate(eta)]
                probing = None
            else:  # they backtrack alone, to their own scale (not to the searched blocks')
                eta = [backtrack * e if b in probe_able else e for b, e in enumerate(eta)]
                held_shrank = True
            passes.move_to(eta)
            continue
        informative = decrease > resolution * abs(f_before)
        passed = (informative and math.isfinite(f_trial) and f_trial != f_before
                  and f_trial <= f_before - c * decrease)
        if pending and not passed:
            # The optimistic trial binds the search only by passing the test; otherwise (a
            # rejection, a decrease too small to resolve, a non-descent combination of the
            # grown blocks) the search proper starts at eta0 as it would have, uncounted.
            # A rejection it had is reported should the search end unresolved (it is then not
            # settled), but does not make the search proper's end an exhausted one
            if informative and f_trial != f_before:  # (a NaN trial loss: rejected too)
                optimistic_rejected = list(eta)
            pending = False
            eta = list(eta0)
            passes.move_to(eta)
            limit += 1
            continue
        # (the blocks still in the trials: after a drop, a searched block whose gradient is
        # zero took a fallback line, and a forward, for the waited blocks' gradient)
        live_sq = sum(x for b, x in enumerate(gsq_b) if b not in waited) if waited else grad_sq
        if decrease <= 0.0 and not precond and live_sq > 0.0 and allow_fallback:
            # Not a descent direction: switch to the preconditioned gradient at the same η.
            # (⟨g, d⟩ arrives with the trial's loss, in one read: that forward is spent, but it
            # does not count against max_trials. Usually the first trial; a layer-wise search
            # that backtracks some blocks only can also turn the weighted sum ≤ 0 later.)
            sums = passes.move_to(eta, precond=True, compute_sums=True)
            precond = non_descent = True
            limit += 1
            solo_misses.clear()  # (a new line: the misses along d say nothing about it)
            rejected = optimistic_rejected = None  # (nor its rejections)
            cleared = False  # (nor the held blocks' trial alone)
            continue
        if not math.isfinite(decrease):
            # ⟨g, d⟩ overflowed float32 (‖g‖ of 1e18 with momentum: Σ g² still finite, so the
            # guard let it through): f0 − c·η·⟨g, d⟩ is −inf or NaN at every η, so the test
            # cannot judge any step. Unresolved: no step, η kept (as rejections, every such
            # search exhausted and cut η by backtrack^max_trials: 1e-38 after two)
            unresolved = overflow = True
            break
        if math.isfinite(f_trial) and (not informative or f_trial == f_before):
            # The predicted decrease is below what the loss can resolve (float rounding, or a
            # gradient that underflowed on a batch already fit), or the trial's loss is f0 to
            # the last bit (its forward saw θ0's weights: a step below a bf16 model's
            # rounding; backtracking would only make it smaller): the test carries no
            # information either way. Take no step and leave η alone (neither growth nor
            # collapse).
            # (a non-finite trial loss is a rejection instead, even here: a search whose every
            # trial loss is NaN ends exhausted, which resets η, rather than keeping it)
            # Not after a rejection, though: backtracking reached the loss's resolution from a
            # step the test did judge, and failed; keeping that η, steps without a search
            # applied it blind (a loss whose gradient points uphill climbed at 52 steps of 60).
            # That search is exhausted: η resets and the next step searches again. (A trial
            # whose loss is f0 to the last bit after a rejection stays unresolved: a bf16
            # model's rounding hides the smaller step, and going on below it would only find
            # more hidden ones)
            unresolved = rejected is None or f_trial == f_before
            unchanged = informative and len(history) == 1
            break
        if passed:  # (the unresolved cases have ended the search above)
            return SearchResult(eta, trial, f_before, f_trial, gd, grad_sq,
                                non_descent=non_descent, history=history, block_gd=gd_b,
                                block_dd=dd_b, first_gd=first_gd_b, optimistic=pending,
                                waited=waited)
        rejected = list(eta)
        if drop and not waited:
            # the blocks no test has judged leave the trials (see the docstring), and the
            # searched ones try eta0 again without them
            waited = tuple(drop)
            eta0 = [0.0 if b in drop else e for b, e in enumerate(eta0)]
            eta = list(eta0)
            solo_misses.clear()
            # (a rejection they caused says nothing of the searched blocks: one below the
            # loss's resolution alone is unresolved, not exhausted, as after the fallback)
            rejected = optimistic_rejected = None
            limit += 1
            passes.move_to(eta)
            continue
        if trial == limit:
            break
        if len(moving) < len(eta):
            solo_misses.append(f_trial - (f_before - c * decrease))
            # the held blocks that can overshoot: a step size and a direction that moves them
            # (not a frozen one, at η 0, nor one whose gradient is zero at this step)
            able = {b for b in range(len(eta))
                    if b not in moving and eta0[b] > 0.0 and dd_b[b] > 0.0}
            if cleared:
                pass  # (the held blocks passed the test alone: the searched ones overshoot)
            elif joint_restart and able and _held_blocks_overshoot(solo_misses, backtrack):
                # (once per search: on the fallback line after it, the restart; and not for
                # searched blocks whose direction is zero, which cannot be what overshoots)
                if probe_held and not probed and any(dd_b[b] > 0.0 for b in moving):
                    probing, probe_able, held_shrank, probed = eta, able, False, True
                    eta = [0.0 if b in moving else e for b, e in enumerate(eta)]
                    limit += 1
                    passes.move_to(eta)
                    continue
                moving, eta = moving | able, list(eta0)
            elif trial - (limit - max_trials) >= max_trials // 2:
                moving = moving | able
        eta = [backtrack * e if b in moving else e for b, e in enumerate(eta)]
        passes.move_to(eta)
    # No acceptable step: back to θ0 (the documented fallback).
    passes.move_to([0.0] * len(eta))
    # (‖d_b‖² too: exact mode takes the length of every block's direction from the first
    # block's result, which may be this one)
    return SearchResult(None, len(history), f_before, math.nan, gd, grad_sq,
                        non_descent=non_descent, unresolved=unresolved, unchanged=unchanged,
                        overflow=overflow,
                        rejected=(rejected or optimistic_rejected) if unresolved else None,
                        history=history, waited=waited,
                        block_gd=gd_b, block_dd=dd_b, first_gd=first_gd_b)


def _held_blocks_overshoot(misses: list[float], backtrack: float) -> bool:
    """After the searched blocks' first backtrack (η ← backtrack·η): did the test's miss shrink
    by less than that factor? Had they been what overshoots, it would have shrunk by about
    backtrack² (the quadratic term of their part of the loss); so the blocks held fixed are.
    Non-finite losses say nothing either way (the search goes on as before)."""
    if len(misses) != 2 or not all(math.isfinite(m) for m in misses):
        return False
    return misses[1] > backtrack * misses[0]
