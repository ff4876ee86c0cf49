"""The search plan, running it, and the step-size bookkeeping after it: which blocks backtrack
(global, one block at a time, or each block alone), the policy's update of η and η̄ per block,
merging collapsed blocks, and the length cap of the steps without a search. A mixin of
:class:`~armijo_fused.optimizers.base.ArmijoOptimizer`."""

from __future__ import annotations

import math
from dataclasses import replace
from numbers import Integral

import torch
from torch import Tensor

from ..directions.base import as_real
from ..linesearch.batched import batched_armijo_search
from ..linesearch.controller import FP32_RESOLUTION, armijo_search, loss_resolution
from ..storage.scalars import compute_dtype, device_floats
from ..storage.sharded import ShardedBuffer
from .passes import _flat_grad, _table, scalar_sum, total

#: the counters every param group keeps (and a checkpoint holds), with their least valid value
COUNTER_MINIMA = {"step": 0, "folded": 0, "next_search": 0, "search_interval": 1, "searches": 0,
                  "forwards": 0, "backwards": 0}


def counter_error(group: dict) -> str | None:
    """What is wrong with the first of ``group``'s counters that is not an integer at or above
    its minimum (a key the group lacks is not checked); None when none is wrong."""
    for key, lo in COUNTER_MINIMA.items():
        v = group.get(key, lo)
        if type(v) is int and v >= lo:  # the usual case, first: this runs at every step
            continue
        if isinstance(v, Integral) and not isinstance(v, bool) and v >= lo:  # (numpy ints)
            continue
        return f"invalid {key}: {v!r} (expected an integer >= {lo})"
    return None

#: a step without a search moves at most this many times η·‖d‖ of the last search's step
#: (the group key ``step_length``; see ``_length_caps``)
STEP_LENGTH_RATIO = 2.0
#: the layer-wise schedules whose blocks take turns (a cursor that moves once a search completes)
IN_TURN = ("round_robin", "grow_all")


def _in_range(v, low) -> bool:
    """One finite real number (a one-element tensor too, as schedules write) above ``low``
    (None: at or above 0)."""
    x = as_real(v)
    if x is None or not math.isfinite(x):
        return False
    return x > low if low is not None else x >= 0.0


class SearchMixin:
    """The search's plan and its bookkeeping; see the module docstring."""

    def _search_plan(self, table, frozen) -> list[list[int]]:
        """Which blocks backtrack, as a list of searches run one after the other.

        Global: one search over all blocks (they share η). Layer-wise ``round_robin`` / ``stale``
        / ``grow_all``: one block (with the blocks merged into it) per search step, tested with
        the combined Armijo condition, so it costs what a global search costs (``grow_all``
        first tries every block grown, the optimistic trial). ``exact``: every block in turn,
        the others frozen at θ0. ``frozen`` blocks (lr 0 now) are in no search; the caller makes
        sure some block is not frozen.
        """
        if not self.layerwise:
            return [[b for b in range(len(table)) if not frozen[b]]]
        # each merged set without its frozen members: a set shares its group's lr, but a block
        # with no elements is frozen alone, and a set merged into one must still be searched
        every = [[b for b in m if not frozen[b]] for m in self._merged_blocks(table)]
        members = [m for m in every if m]
        if self.block_search == "exact":
            return members
        g0 = self.param_groups[0]
        # blocks no accepted search has moved yet (frozen from the start, a group added later)
        # come first, in turn, so that backtracking acts on them
        untested = [m for m in members if not all(self._tested(*table[b]) for b in m)]
        pool = untested if untested and len(untested) < len(members) else members
        if self.block_search in IN_TURN:
            n, at = len(every), g0.get("block_cursor", 0)
            heads = {m[0] for m in pool}  # (a set: a list test made the scan quadratic)
            pos = next(i % n for i in range(at, at + n) if every[i % n] and
                       every[i % n][0] in heads)
            chosen, self._cursor_next = every[pos], (pos + 1) % n
        else:  # most stale: the block searched longest ago
            def last(m):
                gi, lb = table[m[0]]
                return self.param_groups[gi]["block_searched_at"][lb]
            chosen = min(pool, key=last)
        return [chosen]

    # block_tested values: 1 tested; 0 not yet; BLIND not yet, and its last (exact) test was
    # blind: it waits for the first step at which its gradient is not zero (_blind_gradient_live)
    BLIND = 2

    def _tested_value(self, gi: int, lb: int) -> int:
        tested = self.param_groups[gi].get("block_tested")
        return 1 if not isinstance(tested, list) else tested[lb]  # (not layer-wise: tested)

    def _tested_all(self, table) -> list:
        """``_tested`` of every ``(group, block)`` of ``table``, in one pass."""
        values = [g.get("block_tested") for g in self.param_groups]
        return [(values[gi][lb] if isinstance(values[gi], list) else 1) == 1 for gi, lb in table]

    def _tested(self, gi: int, lb: int) -> bool:
        """Has an accepted search moved block lb of group gi (layer-wise)? Until one has, its
        step size is applied only inside a search's Armijo test, never by a plain step."""
        return self._tested_value(gi, lb) == 1

    def _hurries(self, gi: int, lb: int) -> bool:
        """Does this untested block make the next step search? Not when its last test was
        blind: a layer the forward never uses made every step a search (40 in 40 steps)."""
        return self._tested_value(gi, lb) != self.BLIND

    def _hurrying(self, table, untested) -> bool:
        """Does a block of ``untested`` (per block of ``table``: not yet tested, and not at lr
        0) make the next step search? (:meth:`_hurries`)"""
        return any(u and self._hurries(*table[b]) for b, u in enumerate(untested))

    def _blind_waiting(self) -> bool:
        """Does some block wait after a blind test (exact mode; or, in turn, its search once
        the untested held blocks left it: ``_finish_search``)?"""
        return (self.layerwise
                and any(self.BLIND in (g.get("block_tested") or ()) for g in self.param_groups))

    def _blind_gradient_live(self, buffers, table, factors, reduce=None, known=None):
        """On a step without a scheduled search: has a block that waits after a blind test a
        finite, non-zero gradient now? Then this step searches. Returns (live?, the per-block
        Σ g² read, by buffer index: the non-finite guard reuses them rather than read g again).
        Waiting for the cadence's searches instead, a head trained on every other step
        (multi-task) was blind at every search (the intervals 2, 4, 8, 10 keep their parity)
        and did not move for 200 steps. Costs, only while such a block waits: one host read (on
        a GPU a sync, which steps without a search otherwise avoid); with DDP one all-reduce of
        the answer, so that every rank decides alike (a gradient DDP does not average, of an
        ignored parameter, differs between ranks). FSDP2 shards (a local norm) wait for the
        cadence. ``known``: the per-block Σ g² the guard has read already, by buffer index.
        Where no waiting block has anything to train now (frozen, at lr 0), they are marked
        untested again here, where the table says so, and nothing is read.
        """
        known = known or {}
        if any(isinstance(b, ShardedBuffer) and b.sum_scale != 1.0 for b in buffers):
            return False, known
        waiting = [self._tested_value(gi, lb) == self.BLIND and f != 0.0
                   for (gi, lb), f in zip(table, factors)]
        if not any(waiting):  # (alike on every rank: the blocks' marks and lr are)
            # the blocks that wait have nothing to train now (frozen, at lr 0): untested
            # again, searched first once they train, as a block frozen from the start. Kept
            # waiting, every step captured the trials' RNG and buffers for a search that could
            # not come (a review)
            for g in self.param_groups:
                tested = g.get("block_tested")
                if isinstance(tested, list):
                    g["block_tested"] = [0 if t == self.BLIND else t for t in tested]
            return False, known
        pos, parts, read = 0, [], dict(known)
        for i, b in enumerate(buffers):
            n = b.layout.nblocks
            if any(waiting[pos:pos + n]):
                mask = torch.tensor(waiting[pos:pos + n], device=b.device)
                sq = read[i] = (read[i] if i in read else
                                b.backend.grad_sq_norm(_flat_grad(b), b.layout, table=_table(b)))
                # a non-finite gradient is the guard's to skip, not a reason to search
                live_b = ((sq > 0) & sq.isfinite() & mask).any()
                parts.append(live_b.reshape(1).to(buffers[0].device))
            pos += n
        live = torch.cat(parts).any().double().reshape(1) if parts else None
        if reduce is not None:  # every rank takes part, with a block waiting here or not
            live = reduce(live if live is not None
                          else torch.zeros(1, dtype=torch.float64, device=buffers[0].device))
        return live is not None and bool(live.item() > 0), read

    def _mark_tested(self, table, accepted, frozen, blind=()) -> None:
        """After an accepted search (or an unresolved one, which cannot judge its blocks):
        every block that moved inside its trials (a frozen one, at lr 0, did not) is tested from
        now on; ``blind`` blocks (see ``_unresolved_kind``) not yet tested wait (``BLIND``).
        ``accepted``: per block, the step size it moved by."""
        for b, (gi, lb) in enumerate(table):
            tested = self.param_groups[gi].get("block_tested")
            if not isinstance(tested, list) or frozen[b]:
                continue
            if accepted[b] > 0.0:
                tested[lb] = 1
            elif b in blind and tested[lb] != 1:
                tested[lb] = self.BLIND

    @staticmethod
    def _judged(result, accepted, etas) -> tuple[list[float], set[int]]:
        """For ``_mark_tested``: per block the step size its search ended at (the accepted one;
        its own η where the search, or in exact mode its own test, was unresolved by a decrease
        below the loss's resolution, which ends the wait as in a global search), and the blocks
        whose own exact-mode test was blind."""
        judged = list(accepted if accepted is not None else etas)
        blind = set()
        for members, _, kind in getattr(result, "exact", None) or []:
            for b in members if kind is not None else []:
                if kind == "blind":
                    blind.add(b)
                else:
                    judged[b] = etas[b]
        return judged, blind

    def _merged_blocks(self, table) -> list[list[int]]:
        """The blocks that search together: each block with the blocks merged into it."""
        owners = {}
        for b, (gi, lb) in enumerate(table):
            owners.setdefault((gi, self.param_groups[gi]["block_owner"][lb]), []).append(b)
        return list(owners.values())

    def _advance_cursor(self) -> None:
        """Past the block just searched (blocks frozen by lr 0 were stepped over)."""
        for g in self.param_groups:
            g["block_cursor"] = self._cursor_next

    def _run_search(self, passes, trial_loss, f0, etas, plan, reduce=None, trial_losses=None,
                    frozen=None, resolution=None, f0_failure=None, along_fallback=False, *,
                    table):
        kw = dict(c=self.c, backtrack=self.backtrack, max_trials=self.max_trials,
                  guard=passes.guard(), reduce=reduce, f0_failure=f0_failure,
                  resolution=loss_resolution(f0) if resolution is None else resolution)
        frozen = frozen or [False] * len(etas)
        if len(plan) == 1:  # global, or one block with the combined test
            searched = set(plan[0])
            eta0 = [self.policy.first_trial(e) if b in searched else 0.0 if frozen[b] else e
                    for b, e in enumerate(etas)]
            eta0 = self._cap_for_weight_decay(eta0)
            if self.candidates is not None and not any(frozen):  # (candidates share one η)
                result = batched_armijo_search(passes, trial_losses, f0, eta0[0],
                                               candidates=self.candidates, **kw)
                return result, result.accepted
            partial = self.layerwise or any(frozen)
            # grow_all: a block grows only on its own turn (one block per search), so the blocks
            # lagged far behind a global η; first try every block grown, tested together
            optimistic = None
            if self.layerwise and self.block_search == "grow_all":
                optimistic = self._cap_for_weight_decay(
                    [0.0 if frozen[b] or e == 0.0 else self.policy.first_trial(e)
                     for b, e in enumerate(etas)])
            # one block searched, the others held at η that passed a test before: if the
            # held ones overshoot now, restart with all backtracking (see armijo_search).
            # Held blocks no test has judged (at the start, every block but the searched one,
            # at init_step_size) leave the trials at the first rejection instead, and wait for
            # their turn: shrinking all of them to the stiffest block's scale left the others
            # far too small (4x the iterations on the block quadratic), and shrinking the
            # searched one alone left it 500x below them
            # (which held blocks can move at all, the controller sees from the first pass)
            held = [b for b in range(len(etas)) if b not in searched and not frozen[b]]
            untested = [b for b in held if self.layerwise and not self._tested(*table[b])]
            # the searched block no test has judged (a layer unfrozen, a head added) is the
            # likelier culprit: the held ones are tried alone before they are made to backtrack
            probe = self.layerwise and any(not self._tested(*table[b]) for b in searched)
            result = armijo_search(passes, trial_loss, f0, eta0,
                                   search=plan[0] if partial else None,
                                   along_fallback=along_fallback, optimistic=optimistic,
                                   joint_restart=self.layerwise,
                                   drop_on_reject=untested, probe_held=probe, **kw)
            return result, result.accepted
        # exact: each block alone, the others at θ0, from one first pass
        n = len(etas)
        sums = passes.first([0.0] * n)
        # one tensor, read with every block's every trial: a tensor per buffer made each read
        # cost O(buffers), and the search O(buffers²)
        sums = [torch.cat([s.reshape(-1).to(sums[0].device) for s in sums])]
        accepted = [0.0] * n
        results = []
        for members in plan:
            eta0 = [self.policy.first_trial(etas[b]) if b in members else 0.0 for b in range(n)]
            r = armijo_search(passes, trial_loss, f0, self._cap_for_weight_decay(eta0),
                              search=members, sums=sums, allow_fallback=False, **kw)
            kw["guard"] = kw["f0_failure"] = None  # read with the first block's first trial
            results.append((members, r))
            if r.skipped:
                return r, None
            if r.accepted is not None:
                for b in members:
                    accepted[b] = r.accepted[b]
            passes.move_to([0.0] * n)
        # per block: its members, what its own search accepted, and why it was unresolved
        exact = [(m, r.accepted, self._unresolved_kind(r, m)) for m, r in results]
        trials = sum(r.trials for _, r in results)
        loss_after = next((r.loss_after for _, r in results if r.accepted is not None), math.nan)
        moving = [m for m, r in results if r.accepted is not None and r.accepted[m[0]] > 0]
        shrunk = False  # did the combined test below shrink the blocks' own step sizes?
        if len(moving) > 1:
            # Each block passed its own test with the others at θ0; the step moves them all at
            # once, a point no trial has seen (it raised its batch's loss on 1-2 searches in
            # 60). One more test, of the combined step, backtracking every block together.
            joint = armijo_search(passes, trial_loss, f0, accepted, sums=sums,
                                  allow_fallback=False, **kw)
            trials += joint.trials
            shrunk = joint.accepted != accepted  # (the blocks' own η were not what collapsed)
            accepted = joint.accepted  # None: no step (θ is back at θ0)
            loss_after = joint.loss_after
            exact = [(m, accepted if m in moving else acc, kind) for m, acc, kind in exact]
        merged = replace(results[0][1],  # (a copy: the first block's own result is read above)
                         trials=trials, loss_after=loss_after,
                         # (a non-descent block is not unresolved here: it is exhausted)
                         unresolved=all(kind is not None for _, _, kind in exact),
                         unchanged=all(r.unchanged for _, r in results), non_descent=False,
                         rejected=None)  # (each block's own: block_results)
        merged.exact, merged.block_results = exact, results
        merged.joint_shrunk = shrunk
        # no block accepted anything: no step, reported as an exhausted global search is (the
        # stats said collapsed). ``accepted`` stays zeros: the per-block bookkeeping (a blind
        # block's mark) reads them
        merged.none_accepted = all(r.accepted is None for _, r in results)
        return merged, accepted

    @staticmethod
    def _unresolved_kind(result, members) -> str | None:
        """Exact mode: why this block's own search ended unresolved. ``"blind"``: no decrease
        to predict at all, ⟨g_b, d_b⟩ = 0 (a zero gradient: a layer the forward does not use, a
        LoRA factor facing a zero one, a gate still shut): the test says nothing about η, which
        no direction has exercised yet. ``"faint"``: a decrease below the loss's resolution (a
        bf16 loss, a tiny gradient), as an unresolved global search. None: resolved, or a
        direction that is not a descent one (no fallback in exact mode): exhausted."""
        if not result.unresolved or not result.history or not result.block_gd:
            return None
        eta = result.history[-1][0]
        decrease = sum(eta[b] * result.block_gd[b] for b in members)
        return "blind" if decrease == 0.0 else "faint" if decrease > 0.0 else None

    def _fill_frozen(self, accepted, etas, frozen):
        """The accepted step sizes with the frozen blocks' (0 in the passes) filled in, so the
        bookkeeping sees no collapse there: the shared η (global) or the block's own η."""
        if accepted is None or not any(frozen):
            return accepted
        shared = next(a for a, f in zip(accepted, frozen) if not f)
        keep = etas if self.layerwise else [shared] * len(etas)
        return [k if f else a for a, k, f in zip(accepted, keep, frozen)]

    def _momentum_factors(self, table):
        """Per block, 1 - μ when the search runs along the gradient and the step applies the
        momentum direction (``momentum_search="gradient"``), else None (no change anywhere).

        Heavy-ball momentum (b ← μb + g, θ ← θ - α b) moves θ by α·g/(1-μ) in total for each
        gradient g, over the steps that follow; the Armijo test sees one step only. So the
        search finds η along g, as plain ArmijoSGD does, and the step applies α = (1-μ)·η
        along the momentum direction: each gradient's total displacement is the η·g the test
        accepted (the dampened / EMA form of momentum, m ← μm + (1-μ)g, θ ← θ - η m)."""
        if getattr(self, "momentum_search", "direction") != "gradient":
            return None
        factors = [1.0 - float(self.param_groups[gi]["momentum"]) for gi, _ in table]
        return None if all(f == 1.0 for f in factors) else factors  # μ = 0: d is g

    def _momentum_step(self, passes, trial_loss, f0, result, accepted, mfac, reduce, resolution):
        """After the search along g accepted η (``momentum_search="gradient"``): test the step
        the optimizer applies, α = (1-μ)·η along the momentum direction d, with the same Armijo
        condition on ⟨g, d⟩, backtracking α once if it fails, so that θ ends at a point that passed
        the test, as with every other direction. One more forward per search when it passes. If
        no α passes (d points uphill, or its decrease is below the loss's resolution) the step
        is the tested one along g, as the non-descent fallback. Returns (result, η per block
        in the units of the search along g, the step size along the applied direction, whether
        that direction is g)."""
        alpha = [a * m for a, m in zip(accepted, mfac)]
        if (result.first_gd and sum(a * x for a, x in zip(alpha, result.first_gd))
                <= resolution * abs(result.loss_before)):
            # ⟨g, d⟩ of the first pass, read with the search's first trial, already says that
            # the test below rejects every α (as unresolved): no forward spent on it
            return replace(result, non_descent=True), accepted, accepted, True
        # at most one backtrack: past it d is a poor direction at this η, and the step along g
        # already passed (a long backtrack also took η down to a collapse with it)
        check = armijo_search(passes, trial_loss, f0, alpha, c=self.c, backtrack=self.backtrack,
                              max_trials=min(self.max_trials, 2), sums=passes._first_sums,
                              allow_fallback=False, reduce=reduce, resolution=resolution)
        trials = result.trials + check.trials
        if check.accepted is None:
            return replace(result, trials=trials, non_descent=True), accepted, accepted, True
        # (η itself where the check kept α: x / m came back off by rounding, 0.3 as
        # 0.30000000000000004, and a held block counted as shrunk)
        along_g = [a if x == al else (x / m if m > 0 else a)
                   for x, al, m, a in zip(check.accepted, alpha, mfac, accepted)]
        return (replace(check, trials=trials, searched=result, optimistic=result.optimistic),
                along_g, check.accepted, False)

    @staticmethod
    def _below_rejections(result, etas, frozen) -> tuple[dict, bool]:
        """After an unresolved search that had rejected a trial (its last trial's loss f0 to the
        bit: a bf16 model's rounding hid the smaller step; exact mode: a block's own search):
        (the step size each block carries instead, whether there was such a search).

        A block whose η the test rejected (a rejected trial at or below it) carries the hidden
        trial's η, which no test rejected, where keeping η the steps without a search applied a
        rejected step blind. Where only a grown trial (above η) was rejected, η stays: dropping
        it to the hidden step every time ratcheted it down on a bf16 model until even the first
        trials were hidden (and warned about as a loop whose trials miss the weights)."""
        per_block = getattr(result, "block_results", None)  # exact mode: each block's own
        pairs = per_block if per_block is not None else [(range(len(etas)), result)]
        lowered, rejected = {}, False
        for members, r in pairs:
            if not r.unresolved or r.rejected is None:
                continue
            rejected, tried = True, r.history[-1][0]
            for b in members:
                if not frozen[b] and r.rejected[b] <= etas[b] and tried[b] < etas[b]:
                    lowered[b] = tried[b]
        return lowered, rejected

    def _climb_to_resolution(self, table, etas, plan, frozen, result, resolution) -> None:
        """After a search whose first trial predicted a decrease below the loss's resolution and
        judged nothing: a block whose η sits below its running average η̄ goes on from the
        trial tried (one growth up), at most to η̄, at the cadence's next search; at most to
        ``init_step_size`` instead where η̄ is below it and the loss would resolve the fall
        its gradient predicts there (64 resolutions: the gradient is not that of a minimum).

        Keeping η there, as at a minimum, stalled training for good after η had been lowered
        to a hidden trial's step (:meth:`_below_rejections`): one step whose gradient did not
        match its loss (a stale ``.grad``) backtracked until the trial's loss equalled f0 to the
        bit, η fell to that step (2e-6 against η̄ 0.43), and every later search was unresolved
        with η unchanged (ArmijoSGD, full batch: 500 steps without a move). At a minimum η
        climbs to η̄, a step the test has accepted, and no further (on to init_step_size
        there, the steps between searches applied steps no test had passed: a stiff quadratic's
        loss spiked from 1 to 1.2 again and again, a review). η̄ alone was no bound where it had
        fallen with η on a live gradient: two searches exhausted by trials that did not see the
        training forward's function (a loss module's buffer they advanced) took η and η̄ to
        6e-8, and every later search, on a sound loss, was unresolved with η at η̄: the model
        never moved again (a self-supervised user's audit).

        Not for a bf16 / fp16 model (master weights): there a grown trial is rejected by
        rounding and the one below it is hidden, and a climb carried η from a level whose
        blind steps still trained (slowly, through the masters) into that range, where
        layer-wise ``grow_all`` searched at every step for good without a step (a review:
        3x the forwards, the loss frozen)."""
        tried = result.history[-1][0]
        climb = {}
        for b in plan[0]:
            if frozen[b] or not tried[b] > etas[b]:
                continue
            top = self._eta(*table[b], key="step_size_avg")
            gd = result.block_gd[b] if b < len(result.block_gd) else result.gd
            if top < self._init_step_size and \
                    self._init_step_size * gd > 64.0 * resolution * abs(result.loss_before):
                top = self._init_step_size  # (η̄ collapsed on a gradient the loss can see)
            if etas[b] < top:
                climb[b] = min(tried[b], top)
        if climb:
            self._set_each(table, list(climb), list(climb.values()))

    def _cap_for_weight_decay(self, eta):
        # keep 1 - η·wd away from 0: θ0 is recovered by dividing by it
        wd = max((g["weight_decay"] for g in self.param_groups), default=0.0)
        if wd <= 0:
            return eta
        cap = 0.5 / wd  # (once, not once per block: quadratic in the groups)
        return [min(e, cap) for e in eta]

    def _update_step_sizes(self, table, etas, plan, result, accepted, skipped, k, frozen,
                           resolution=FP32_RESOLUTION):
        """Policy update per searched block; returns (settled, collapsed) for the cadence.
        ``frozen`` blocks (lr 0 at this step) were not searched and keep their η."""
        exact = getattr(result, "exact", None)
        if result.unresolved and result.unchanged and exact is None:
            # the trial's loss was f0 to the last bit: its step was invisible to the forward (a
            # bf16 model's rounding) or landed on f0's level set by symmetry; either way keeping
            # η would repeat the same trial forever: the next search starts one growth further
            tried = result.history[-1][0]
            grown = [b for b in plan[0] if not frozen[b] and tried[b] > etas[b]]
            self._set_each(table, grown, [tried[b] for b in grown])
        if (result.unresolved and not result.unchanged and result.rejected is None
                and not result.overflow and exact is None and result.history
                and not any(getattr(b, "master", False) for b in self._buffers or ())):
            self._climb_to_resolution(table, etas, plan, frozen, result, resolution)
        # (an unresolved search that had rejected a trial is not settled: the cadence comes
        # back sooner rather than apply η blind for twice as long)
        lowered, rejected = self._below_rejections(result, etas, frozen)
        if lowered:
            self._set_each(table, list(lowered), list(lowered.values()))
            etas = [lowered.get(b, e) for b, e in enumerate(etas)]
        if skipped or result.unresolved:
            # (an overflowing ⟨g, d⟩ judged nothing: not settled, the next steps search again
            # rather than apply η blind along that direction; a climb is: the steps between
            # apply η, and under bf16 autocast, where rounding rejects grown trials and hides
            # the ones below, a climb that brought the next search sooner searched at every
            # step, for good, without a step: 100 against 38 searches in 300 steps)
            return result.unresolved and not rejected and not result.overflow, False
        outcomes = exact if exact is not None else [(plan[0], accepted, None)]
        turn = None  # the blocks whose turn this search was (None: the outcomes' blocks)
        if exact is None and accepted is not None and result.optimistic:
            # every block grown and tested together: each takes the policy's update
            live = ([b for b in m if not frozen[b]] for m in self._merged_blocks(table))
            outcomes = [(m, accepted, None) for m in live if m]
            turn = set(plan[0])
        settled_all, collapsed_any = not rejected, False
        new = list(etas)
        found = {}  # block -> the step size its search accepted this step
        for members, acc, kind in outcomes:
            if kind is not None:
                # exact mode: this block's own test could not judge η (see _unresolved_kind):
                # keep it, as an unresolved global search does; a collapse would search at
                # every step
                continue
            gi, lb = table[members[0]]
            avg = self._eta(gi, lb, key="step_size_avg")
            a = acc[members[0]] if acc is not None else None
            if a is not None:
                found.update({b: a for b in members})
            # η̄ is still the start: no search has judged this block. Global: none has run,
            # or none has been accepted (no step length recorded) and η̄ is the start still
            # (init_step_size, or a torch checkpoint's lr). `searches` also counts the skipped
            # and unresolved ones, which judged nothing (after a skipped first step the first
            # real search was averaged with the start it rejected, held by max_drop); a
            # checkpoint from before step_length existed, or one converted from layer-wise,
            # may hold a length of 0 after searches
            untested = (self.param_groups[gi]["block_searched_at"][lb] == 0 if self.layerwise
                        else self.param_groups[gi]["searches"] == 0 or (
                            self._eta(gi, lb, key="step_length") == 0.0
                            and avg == self.__dict__.get("_growth_start", self._init_step_size)))
            again = bool(self._eta(gi, lb, key="collapsed"))  # its last search collapsed too
            lowest = None  # where the next search goes on after an exhausted one: its first
            # trial (η·growth) is the step below the last one this search tried, whatever the
            # settings (with max_trials=1, or growth·backtrack^(max_trials-1) >= 1, the last
            # one tried is no lower than η̄: taken as it was, every search repeated the same
            # trials, for good)
            last = self._last_tried(result, members) if a is None else None
            if last is not None:
                lowest = last * self.backtrack / self.policy.growth or None
            # (its first trial passed: η was small already, not cut by this batch, as the joint
            # phase of other blocks' searches leaves it. Layer-wise only: a global η below the
            # average was lowered under a rejected trial, _below_rejections, and resets there)
            at_once = (self.layerwise and a is not None
                       and a >= self._first_trial(result, members[0]))
            eta, new_avg, collapsed = self.policy.after_search(avg, a, untested=untested,
                                                               again=again, lowest=lowest,
                                                               at_once=at_once)
            settled_all &= self.cadence.settled(a, avg) and not collapsed
            collapsed_any |= collapsed
            self._set_each(table, members, [new_avg] * len(members), key="step_size_avg")
            self._set_each(table, members, [int(collapsed)] * len(members), key="collapsed")
            for b in members:
                new[b] = eta
                if self.layerwise and (turn is None or b in turn):
                    g, lb_b = self.param_groups[table[b][0]], table[b][1]
                    g["block_searched_at"][lb_b] = k
        held_shrunk = getattr(result, "joint_shrunk", False)  # (exact mode's combined test)
        if exact is None and accepted is not None:
            # blocks held fixed but shrunk in the joint phase keep the step that passed the test
            searched = set(plan[0])
            for b, a in enumerate(accepted):
                if b not in searched and not frozen[b] and a != etas[b]:
                    new[b] = a
                    held_shrunk |= a < etas[b]  # (grow_all's grown ones did not shrink)
        moving = [b for b in range(len(table)) if not frozen[b]]
        self._set_each(table, moving, [new[b] for b in moving])
        # (not where held blocks had to shrink too: the searched block's small η was theirs to
        # answer for, and a flat block merged because stiff untested ones overshot)
        if self.layerwise and self.merge_below is not None and not held_shrunk:
            # a collapse is a backtrack below the threshold: a block whose first (grown) trial
            # passed has not collapsed, wherever it sits (it merged when below the threshold)
            small = {table[b]: a for b, a in found.items()
                     if 0.0 < a < self.merge_below and a < self._first_trial(result, b)}
            self._merge_collapsed(small, set(table) - self.__dict__.get("_empty_blocks", set()))
        self._follow_loss_trend(table, result.loss_before, frozen, k)
        return settled_all, collapsed_any

    def _follow_loss_trend(self, table, f0: float, frozen, k: int) -> None:
        """The loss-trend guard (``trend_guard``, policy.py): f0 of each resolved search, a
        fresh batch's loss before its step, goes into running averages over windows of steps;
        where the recent one is above the longer one, the loss of unseen batches is rising
        while the searches pass on their own batches: η̄ of every block shrinks by the policy's
        factor, but not below where the run started, η to at most η̄."""
        g0 = self.param_groups[0]
        trend, shrink = self.policy.follow_loss(g0.get("loss_trend"), f0, k)
        g0["loss_trend"] = trend
        if not shrink:
            return
        moving = [b for b in range(len(table)) if not frozen[b]]
        # it takes back growth only: never below the start, init_step_size under max_step (a
        # flat noisy loss sets it off now and then, and η̄ decayed to 0 on plateaus: parity,
        # mixed tasks; annealing is the schedule's). Not a loaded torch optimizer's lr, which
        # neither a checkpoint nor a copy of this one carries: resumes stay bitwise
        floor = self.policy.cap(self._init_step_size)
        avg = [max(a / shrink, min(a, floor))
               for a in (self._eta(*table[b], key="step_size_avg") for b in moving)]
        self._set_each(table, moving, avg, key="step_size_avg")
        self._set_each(table, moving, [min(self._eta(*table[b]), a) for b, a in zip(moving, avg)])

    @staticmethod
    def _last_tried(result, members) -> float | None:
        """The largest η among ``members`` at the last trial of a search that tried them all
        and exhausted (exact mode: the block's own search; None where the block's own search
        passed and only the combined test after it failed, or ended unresolved)."""
        per_block = getattr(result, "block_results", None)
        if per_block is None:
            # (not a trial of the held blocks alone, the searched ones at 0: probe_held)
            moved = [eta for eta, _ in result.history if any(eta[b] for b in members)]
            return max(moved[-1][b] for b in members) if moved else None
        for m, r in per_block:
            if list(m) == list(members) and r.accepted is None and not r.unresolved \
                    and r.history:
                return max(r.history[-1][0][b] for b in members)
        return None

    @staticmethod
    def _first_trial(result, b) -> float:
        """The η block b's search tried first (exact mode: the block's own search; after the
        momentum check, the search along g before it), in the search's units."""
        for members, r in getattr(result, "block_results", None) or ():
            if b in members:
                return r.history[0][0][b] if r.history else math.inf
        result = result.searched or result
        return result.history[0][0][b] if result.history else math.inf

    def _merge_collapsed(self, small, present=None):
        """Merge each block whose search just accepted an η below ``merge_below`` into its
        neighbour in the same group (the previous block, else the next): from then on they share
        one step size. A block that has already absorbed another is not merged into a third
        (it may absorb more: with a threshold above the blocks' usual step sizes every block
        ends in one). ``small`` maps
        (group index, block index) to the step size just accepted; ``present``: the blocks
        with trainable tensors at this step (a frozen block is no merge target: its step size
        would be set to one never tested on it)."""
        for gi, g in enumerate(self.param_groups):
            owner = g["block_owner"]
            for lb in range(len(owner)):
                if owner[lb] != lb or (gi, lb) not in small or owner.count(lb) > 1:
                    continue
                others = [o for o in range(len(owner)) if owner[o] == o and o != lb
                          and (present is None or (gi, o) in present)]
                if not others:
                    continue
                target = max((o for o in others if o < lb), default=min(others))
                # the merged block starts from the small step: the stiff part must pass the test
                eta = small[(gi, lb)]
                for m in range(len(owner)):
                    if owner[m] in (lb, target):
                        owner[m] = target
                        g["step_size"][m] = g["step_size_avg"][m] = eta

    def _record_step_length(self, table, block_dd) -> None:
        """η·‖d‖ after a search: the η the next steps will apply (after the policy's update)
        times the length of the direction the search tested; per block (layer-wise), or of the
        whole step (global). Only ‖d‖ growing since the search makes the cap bind, not η."""
        def length(eta, dd):  # (‖d‖² overflowing float32: no cap, 0, as before any search;
            x = eta * math.sqrt(max(dd, 0.0))  # an inf or NaN one is refused in a group)
            return x if math.isfinite(x) else 0.0

        if self.layerwise:
            for (gi, lb), dd in zip(table, block_dd):
                self._set_eta(gi, lb, length(self._eta(gi, lb), dd), key="step_length")
        else:
            gi, lb = table[0]
            self._set_eta(gi, lb, length(self._eta(gi, lb), sum(block_dd)), key="step_length")

    def _length_caps(self, table, buffers) -> list[Tensor] | None:
        """Per buffer, the largest η each block may apply on a step without a search.

        The search tested its η on the direction d of that step. Between searches momentum keeps
        growing d (d ≈ g when the buffer is young, up to g/(1-μ) once it has built up), so the
        same η moves ever further than what was tested, and SGD with (Nesterov) momentum
        diverged on noisy problems between searches. So a step without a search moves at most
        STEP_LENGTH_RATIO times η·‖d_search‖ (``step_length``): η ≤ ratio·length/‖d‖, with ‖d‖
        from the previous step's first pass, on the device (no sync). The cap binds only when
        ‖d‖ has grown past the ratio since the search; Adam's ‖d‖ hardly changes. None: no cap
        (no search yet, or buffers rebuilt since)."""
        saved, self._resumed_dd = self._resumed_dd, None
        if self._last_dd is None and saved:  # just resumed: if the same tensors train
            saved, mask = saved if isinstance(saved, tuple) else (saved, None)  # (older pickles)
            if (mask is None or mask == self._trainable_mask(self._buffer_key)) and \
                    len(saved) == len(buffers) and all(
                    len(v) == b.layout.nblocks for v, b in zip(saved, buffers)):
                self._last_dd = (buffers, [device_floats(v, b.device, compute_dtype(b.dtype))
                                           for v, b in zip(saved, buffers)])
        last = self._last_dd
        if last is None or last[0] is not buffers:
            return None
        lengths = self._etas(table, key="step_length")
        if not any(x > 0 for x in lengths):
            return None
        ref = [x if x > 0 else math.inf for x in lengths]
        if not self.layerwise:  # one length for the whole step: ‖d‖ over every block
            dev0 = buffers[0].device
            inv_norm = total([scalar_sum(dd).to(dev0) for dd in last[1]]).rsqrt()
            cap = torch.nan_to_num(inv_norm * (STEP_LENGTH_RATIO * ref[0]), nan=math.inf)
            # (each in its buffer's dtype: a float64 buffer's ‖d‖² made it float64, which the
            # fp32 buffers' fused passes refuse)
            return [cap.to(b.device, compute_dtype(b.dtype)).expand(b.layout.nblocks) for b in buffers]
        caps, pos = [], 0
        for b, dd in zip(buffers, last[1]):
            n = b.layout.nblocks
            r = device_floats(ref[pos : pos + n], dd.device, compute_dtype(b.dtype))
            caps.append(torch.nan_to_num(dd.rsqrt() * (STEP_LENGTH_RATIO * r), nan=math.inf))
            pos += n
        return caps

    def _step_dd(self, buffers, sums, reduce) -> tuple[list, list]:
        """This step's per-block ‖d_b‖² (the first pass's sums), kept for the next step's cap,
        and the first pass's sums over the model (for the telemetry of a step without a search).
        FSDP2: each rank's sums are its shards' (times the shard count), so their mean over the
        ranks is the model's: one small collective, queued on the device (no host wait), so
        that every rank caps as a single process would, and reports the model's ⟨g, d⟩ and ‖g‖
        (each rank reported its own shards')."""
        if self._sharded and reduce is not None:
            dev0 = sums[0].device
            mean = reduce(torch.cat([s.reshape(-1).to(dev0) for s in sums]))
            sums = [x.reshape(-1, 3).to(b.device) for x, b in zip(
                mean.split([3 * b.layout.nblocks for b in buffers]), buffers)]
        return [s[:, 2] for s in sums], sums

    def _check_step_sizes(self) -> None:
        """η and η̄ must be finite and > 0. The optimizer writes them, but code that edits
        ``param_groups`` can write anything: a NaN η wrote NaN into the model, a negative one
        stepped uphill, and a bad η̄ raised from the policy after the search had moved θ.
        Refused by name at the start of the step, before the closure runs (a min and a sum
        over each group's floats: no loop in Python per block)."""
        for gi, group in enumerate(self.param_groups):
            # (step_length and the collapse flag too, which may be 0: a string written into
            # any of them raised a bare comparison error, a NaN length was overwritten unseen)
            for key, low in (("step_size", 0.0), ("step_size_avg", 0.0), ("step_length", None),
                             ("collapsed", None)):
                if key not in group:
                    continue
                value = group[key]
                values = value if isinstance(value, list) else (value,)
                try:
                    if not values or ((min(values) > low if low is not None
                                       else min(values) >= 0.0) and math.isfinite(sum(values))):
                        continue
                except TypeError:  # (a string, None: not a number)
                    pass
                b = next((i for i, v in enumerate(values) if not _in_range(v, low)), None)
                if b is None:  # (each in range, their sum beyond a float: large, not wrong)
                    continue
                names = group.get("block_names") or []
                where = f"param group {gi}" + (
                    "" if not isinstance(value, list) else f", block {names[b]!r}"
                    if b < len(names) else f", block {b}")
                raise ValueError(f"invalid {key} in {where}: {values[b]!r} (expected a finite "
                                 f"number {'> 0' if low is not None else '>= 0'}; the optimizer "
                                 "keeps it, code that writes it must too)")

    def _check_counters(self) -> None:
        """The step counts in every group (:data:`COUNTER_MINIMA`) must be integers at or above
        their minimum: the step adds to them after θ has moved, so a ``None`` written into
        ``param_groups`` raised there and left θ and the moments stepped with ``step`` not
        counted (a retry folded the gradient twice). Refused by name at the start instead."""
        for gi, group in enumerate(self.param_groups):
            problem = counter_error(group)
            if problem is not None:
                raise ValueError(f"{problem} in param group {gi}: the optimizer keeps its "
                                 "counters, code that writes them must too")

    def _eta(self, gi, lb, key="step_size"):
        v = self.param_groups[gi][key]
        return v[lb] if isinstance(v, list) else v

    def _etas(self, table, key="step_size") -> list:
        """``_eta`` of every ``(group, block)`` of ``table``, in one pass: called per block, it
        was a tenth of a layer-wise step's host time at 50 blocks."""
        values = [g[key] for g in self.param_groups]
        return [values[gi][lb] if isinstance(values[gi], list) else values[gi]
                for gi, lb in table]

    def _set_eta(self, gi, lb, value, key="step_size"):
        if self.layerwise:
            self.param_groups[gi][key][lb] = value
        else:
            for g in self.param_groups:  # global: every group shares η
                g[key] = value

    def _set_each(self, table, blocks, values, key="step_size"):
        """``_set_eta`` for each of ``blocks``. Global: the blocks share one value (any of them
        sets it), set once; once per block was quadratic in the groups (0.27 s at 4,000)."""
        if not self.layerwise:
            blocks, values = blocks[-1:], values[-1:]
        for b, v in zip(blocks, values):
            self._set_eta(*table[b], v, key=key)
