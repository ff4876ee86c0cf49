"""Noticing full-batch (deterministic) training under a cadence that skips searches.

Between searches the adaptive cadence applies the last searched step size untested, and η grows
only at a search. On noisy mini-batches that keeps the quality at a tenth of the searches
(docs/design.md §8). On a problem whose loss is the same function at every step (full-batch least
squares, a PINN, one batch overfit on purpose) a search is cheap information: ArmijoAdam's η
climbed from 1e-3 at one growth per ten steps, and an η that passed one test can overshoot at the
next points until the next search. ``bench/full_batch.py`` (500 steps, seeds 0-2): least squares
with κ(AᵀA) = 1000, ArmijoAdam 0.31, 0.16, 1.6 against 3.6e-10, 5.8e-10, 3.3e-7 with
``cadence="every"`` (1.10 against 2.23 forwards per step); ArmijoSGD and a small MLP regression
end within 1.0-1.9x of each other either way, the loss rising at 16-57 of the steps without a
search (ArmijoAdam's least squares at none). A float64 user's audit saw a PINN with ArmijoSGD at
0.33 against 3.3e-3.

The sign that the batch repeats: the loss at the step after a search equals, to fp32's
resolution, the loss at the point that search accepted (which it evaluated on its own batch).
On different batches that happens by chance rarely, so three searches in a row are asked for
(a sampler that draws one of three samples at a time repeats by chance all the same: a search
whose next loss differs clears it). A repeat found also keeps quiet the warning about η grown
without a schedule, which is about noisy mini-batches. A diagnostic only: nothing here changes
a step, and nothing is saved with the optimizer (a resumed run looks again; after
``load_state_dict`` or ``add_param_group`` it looks again from its last verdict). It sees only
what it can compare: not under a schedule whose factor is below 1 (the step then ends short of
the point the search evaluated), nor without a loss handed to the steps between searches
(``step(loss_fn=fn)`` alone), nor once it has stopped after 20 searches on differing batches;
a search that gives it nothing to compare ends a repeat found before.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..linesearch.controller import FP32_RESOLUTION

#: searches in a row whose next loss repeated their accepted one: the batch repeats
MATCHES = 3
#: searches in a row whose next loss did not, after which the watch stops (mini-batch training)
MISSES = 20


class RepeatedBatchWatch:
    """Compares the loss at the step after each search with the loss that search accepted.

    ``repeated``: the last ``MATCHES`` searches were each followed by their own accepted loss,
    so the batch repeats now; a search whose next loss differs clears it (a full-batch warm-up,
    an "overfit one batch" check, then mini-batches). ``done``: ``MISSES`` in a row, the
    batches differ and the watch stops looking (its cost on a GPU: one copy per search). Call
    ``searched`` after each search and ``plain`` at each step without one. A loss on a GPU at a
    step without a search is not read there (that step has no host sync): it is copied to
    pinned memory without a sync, as the skip flag is, and read at the next search, whose
    trials have synchronised the device past it."""

    def __init__(self):
        self.done = False
        self.repeated = False
        self._accepted = None  # (step, the loss at the point the search accepted)
        self._pending = None  # (step, a device loss not read yet: a tensor, or (host, event))
        self._host = {}  # (device, dtype) -> (pinned host scalar, event), reused
        self._matches = self._misses = 0

    def searched(self, k: int, f0: float, loss_after: float) -> None:
        """At the end of the search at step ``k``: its f0 (the loss at θ_k, the previous
        step's end point) and ``loss_after``, its loss where the step ended (NaN where that is
        not a point it evaluated: a schedule's factor below 1 shortened the step)."""
        if self.done:
            return
        if self._pending is not None:
            step, loss = self._pending
            self._pending = None
            if isinstance(loss, tuple):  # (CUDA: long done, the trials synchronised)
                loss[1].synchronize()
                loss = loss[0]
            self._seen(step, float(loss))
        self._seen(k, f0)
        accepted = (math.isfinite(loss_after) and math.isfinite(f0) and loss_after != 0.0
                    and loss_after < f0)  # (a constant loss repeats whatever the batch)
        if self._accepted is not None or not accepted:
            # the last search's point went uncompared (no loss handed to the step after it),
            # or this one has none (a schedule's factor below 1 shortened its step): no
            # evidence either way, so the streak ends (not counted as a differing batch)
            self._matches, self.repeated = 0, False
        self._accepted = (k, loss_after) if accepted and not self.done else None

    def restart(self) -> None:
        """After ``load_state_dict`` or ``add_param_group``: what was pending belongs to the
        steps before; the verdict stands until the next comparisons say otherwise (dropped,
        a full batch got the growth warning at the first search after a load)."""
        self._accepted = self._pending = None
        self.done, self._misses = False, 0

    def plain(self, k: int, f0) -> None:
        """At the step ``k`` without a search, with its loss at θ_k (None if not handed over)."""
        if self.done or f0 is None or self._accepted is None or self._accepted[0] != k - 1:
            return
        if isinstance(f0, Tensor):
            if f0.device.type == "cuda":
                self._pending = (k, self._to_host(f0.detach()))
                return
            f0 = _read_now(f0)
        self._seen(k, f0)

    def _to_host(self, f0: Tensor) -> tuple:
        key = (f0.device, f0.dtype)  # (an event records on its own device's streams only)
        if key not in self._host:
            self._host[key] = (torch.empty((), dtype=f0.dtype, pin_memory=True),
                               torch.cuda.Event())
        host, event = self._host[key]
        host.copy_(f0.reshape(()), non_blocking=True)
        event.record(torch.cuda.current_stream(f0.device))
        return host, event

    def _seen(self, k: int, f0: float) -> None:
        if self._accepted is None or self._accepted[0] != k - 1:
            return
        accepted = self._accepted[1]
        self._accepted = None
        if abs(f0 - accepted) <= FP32_RESOLUTION * abs(accepted):
            self._matches, self._misses = self._matches + 1, 0
        else:
            self._matches, self._misses = 0, self._misses + 1
        self.repeated = self._matches >= MATCHES
        self.done = self._misses >= MISSES


def repeated_batch_message(cadence) -> str:
    what = f"the {cadence!r} cadence" if isinstance(cadence, str) else f"cadence={cadence}"
    return (
        f"the loss at the step after each of the last {MATCHES} searches was the loss that "
        "search accepted, to fp32's resolution: the batch repeats (full-batch or deterministic "
        f"training?). Between searches {what} applies the searched step size untested, and it "
        "grows only at a search. On a deterministic problem try cadence=\"every\" (about twice "
        "the forwards): on least squares with κ = 1000 ArmijoAdam reached 4e-10 to 3e-7 in 500 "
        "steps with it and 0.16 to 1.6 without; on a small MLP regression the two ended within "
        "2x of each other (bench/full_batch.py)")


def _read_now(f0: Tensor) -> float:
    """A loss not on a GPU, read at once: free on a CPU (another accelerator: one read)."""
    return float(f0.detach())
