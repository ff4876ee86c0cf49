"""The step-size policy: where the next search starts, and the guard against collapse.

State (kept in every param group so schedulers, DCP and ``load_state_dict`` carry it):

* ``step_size_avg`` η̄: the running geometric average of accepted step sizes,
  ``log η̄ ← s · log η̄ + (1 - s) · log η_accepted`` with ``s = smoothing``.
* ``step_size`` η: what non-search steps apply and where the next search starts (``η · growth``,
  capped by ``max_step``, since backtracking can only shrink): the smoothed η̄, not the raw
  accepted step. The test on one noisy mini-batch is greedy: a lucky batch accepts a step far
  larger than the loss landscape supports on average, and carried over to the steps without a
  search such a step hurts (docs/design.md §8, lessons 1 and 3). Smoothing with s = 0.5 beat the best
  AdamW of a learning-rate sweep on both seeds where raw steps (s = 0) lost by 17–20%
  (bench/results/convergence_cpu.md). ``smoothing=0`` applies the accepted step as is.

The first search that backtracks below ``init_step_size`` (which nothing had tested) sets η and
η̄ to the step it accepted, instead of averaging with the start or counting a collapse.

Bounded fall: η̄ falls by at most a factor ``max_drop`` per search (default 2 for ArmijoAdam).
One search is one noisy measurement: a batch whose direction is barely a descent one (momentum
pointing away from its gradient) backtracks 5-6 times and accepts a step 30-60x below η̄, inside
the collapse guard's range below. Averaged in, it cut η̄ 5-8x, and growth (√1.2 per search, a
search every 10 steps at most) took 250 steps to win it back: on one of four seeds of the
language-model benchmark η̄ never recovered and the run ended at 1.08x the best AdamW, where the
other seeds end at 0.92-0.98x (docs/results.md; bench/results/convergence_cpu.md has the run with
the bound: 0.96x). The step that search accepted is still the one taken; only
what the next steps carry over is bounded. A real change of scale is followed over a few
searches, which come quicker: η̄ is then not settled, so the cadence halves its interval.

Loss-trend guard (``trend_guard``, on for ArmijoAdam's global search): the test on one noisy
mini-batch passes steps that fit that batch; where searches keep passing their first, grown
trial, η̄ grows by √growth per search whatever the loss of the other batches does. On a
classifier that fits its training set (an MLP, 1,500 steps of batch 64, warmup + cosine) η̄
grew 100x past where the loss of fresh batches turned up, and the runs ended at 1.5-8x AdamW's
training loss (11 of 12; README); the searched batches' f0, a loss the step has not yet fit,
shows the turn: see :meth:`follow_loss` (docs/results.md has the measurements).

Collapse guard: one noisy mini-batch can make the search accept a step orders of magnitude smaller
than usual, or none at all (trials exhausted). Carried over, such a step size stalls training for
many steps while growth (×1.2 per search) climbs back. So an accepted step below
``collapse_ratio · η̄`` (default 1e-2: two orders of magnitude), or an exhausted search, does not
enter the average and the step size is reset to η̄ instead (docs/design.md §8, lesson 3), and the next
step searches again (η̄ has just been rejected). If that search collapses too, the small step is
no accident: η and η̄ take it; if it is exhausted too, the next search goes on where it left
off (its first trial is the step below the last one tried), and so on.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from ..directions.base import as_real, in_float32


@dataclass(frozen=True)
class StepSizePolicy:
    growth: float = 1.2
    smoothing: float = 0.5
    collapse_ratio: float = 1e-2
    max_step: float | None = None
    max_drop: float | None = None
    trend_guard: bool = False

    #: the loss-trend guard: f0 is averaged over windows of at least TREND_WINDOW steps, and
    #: the window means go into a recent and a longer running average (weights per window);
    #: it judges a trend from the (TREND_WARMUP + 1)-th window on
    TREND_WINDOW, TREND_FAST, TREND_SLOW, TREND_WARMUP = 10, 0.5, 0.9, 5

    def __post_init__(self):
        # one real number (a numpy one, a one-element tensor) as a float; anything else stays,
        # for validate() to refuse by name
        for f in dataclasses.fields(self):
            if f.name == "trend_guard":
                continue
            x = as_real(getattr(self, f.name))
            if x is not None:
                object.__setattr__(self, f.name, x)

    def validate(self) -> None:
        def check(name, ok, expected, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            # (a string or a bool raised a bare TypeError in the comparison, or passed as 1)
            if not (isinstance(v, float) and ok(v)):
                raise ValueError(f"invalid {name}: {v!r} (expected {expected})")

        check("growth", lambda x: 1.0 <= x and math.isfinite(in_float32(x)),
              "a number >= 1, finite in float32")
        check("smoothing", lambda x: 0.0 <= x < 1.0, "0 <= smoothing < 1")
        check("collapse_ratio", lambda x: 0.0 <= x < 1.0, "0 <= ratio < 1")
        check("max_drop", lambda x: 1.0 <= x < math.inf, "a finite number >= 1 or None",
              optional=True)
        check("max_step", lambda x: x > 0, "> 0 or None", optional=True)
        if self.trend_guard not in (True, False):
            raise TypeError(f"invalid trend_guard: {self.trend_guard!r} (expected True or False)")
        object.__setattr__(self, "trend_guard", bool(self.trend_guard))

    def follow_loss(self, trend: list | None, f0: float,
                    step: int) -> tuple[list | None, float | None]:
        """The loss-trend guard. ``trend``: [recent average, longer average, windows closed,
        sum and count of f0 in the open window, the open window's first step] (None before the
        first search, and while the guard is off); ``f0``: the loss of a search at step
        ``step``. Returns the new trend and the factor η̄ shrinks by (None: it stays; the
        caller never takes η̄ below ``init_step_size``).

        Each f0 is the loss of a batch the step has not yet fit, so its averages follow the
        loss of unseen batches, which the Armijo test on the batch itself does not see: on
        noisy mini-batches every search can pass its own batch while the loss of the others
        rises (the module doc). The f0 of the searches in ``TREND_WINDOW`` steps are averaged
        first (averaged per search, a search at every step compared two and ten batches'
        noise, and η̄ shrank until no search could resolve a decrease). A recent average above
        the longer one shrinks η̄ by growth² times the growth the window's other searches
        could have added (growth^(1 - smoothing) each): about four passing searches' growth
        for ArmijoAdam at its adaptive cadence, more where a window holds several searches."""
        if not self.trend_guard:
            return None, None
        if not math.isfinite(f0):
            return trend, None
        fast, slow, windows, total, count, start = trend or (0.0, 0.0, 0, 0.0, 0, step)
        total, count = total + f0, count + 1
        if step - start + 1 < self.TREND_WINDOW:  # the window is still open
            return [fast, slow, windows, total, count, start], None
        mean = total / count
        if windows == 0:
            fast = slow = mean
        else:
            fast = self.TREND_FAST * fast + (1.0 - self.TREND_FAST) * mean
            slow = self.TREND_SLOW * slow + (1.0 - self.TREND_SLOW) * mean
        windows += 1
        rising = windows > self.TREND_WARMUP and fast > slow and self.growth > 1.0
        if not rising:
            return [fast, slow, windows, 0.0, 0, step + 1], None
        power = 2.0 + (count - 1) * (1.0 - self.smoothing)
        # (growth^11 overflows a float for a growth above 1e28, which is valid)
        shrink = self.growth ** power if power * math.log(self.growth) < 700.0 else \
            math.exp(700.0)
        return [fast, slow, windows, 0.0, 0, step + 1], shrink

    @staticmethod
    def trend_error(trend, step: int) -> str | None:
        """What is wrong with a saved ``loss_trend`` in a group at ``step`` (None: nothing)."""
        if trend is None:
            return None

        def whole(v):
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and \
                math.isfinite(v) and float(v).is_integer() and v >= 0

        ok = isinstance(trend, (list, tuple)) and len(trend) == 6 and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            for v in trend[:2] + trend[3:4]) and all(whole(v) for v in trend[2:3] + trend[4:])
        # (an open window holds at most one f0 per step, and fewer than a window's steps)
        ok = ok and (trend[4] > 0 or trend[3] == 0) and 1 <= trend[5] <= step + 1 and \
            trend[4] <= min(StepSizePolicy.TREND_WINDOW - 1, step + 1 - trend[5])
        return None if ok else (f"invalid loss_trend: {trend!r} (expected None or two finite "
                                "averages, a count of windows, the open window's sum and count "
                                "of losses, and its first step, at most the group's step + 1)")

    def cap(self, eta: float) -> float:
        return eta if self.max_step is None else min(eta, self.max_step)

    def first_trial(self, step_size: float) -> float:
        return self.cap(step_size * self.growth)

    def after_search(self, step_size_avg: float, accepted: float | None,
                     untested: bool = False, again: bool = False,
                     lowest: float | None = None,
                     at_once: bool = False) -> tuple[float, float, bool]:
        """(new step_size, new step_size_avg, collapsed?) after a search that accepted ``accepted``
        (None: trials exhausted). ``untested``: η̄ is still ``init_step_size``, which no search
        has tested: a first search that backtracked below it replaces it (no collapse, and no
        average with a value the test has just rejected). ``again``: this block's previous
        search collapsed; if this one collapses too, two in a row are the landscape changing,
        and η̄ follows. ``lowest``: where an exhausted search leaves off (the caller's: the
        step below the last one it tried, over ``growth``); after a collapse, a second
        exhausted search hands it on, so the next one goes on below every step it tried
        rather than repeating the same sequence from η̄ (a loss whose scale needs steps below
        η̄·backtrack^max_trials never trained, at max_trials forwards per step). ``at_once``:
        the search's first trial passed, so however far below η̄ it lies, it is no collapse (no
        batch cut it; η was that small already, as a layer-wise block's is after other blocks'
        searches shrank it in their joint phase: reset to η̄, it went 200x up, untested, and
        dragged every block down with it at the next search)."""
        if accepted is None and again and lowest is not None:
            # (η̄ never rises on a failed search: η can sit above it after a search whose
            # trials were invisible to the loss, which hands on the grown trial)
            return self.cap(lowest), min(lowest, step_size_avg), True
        small = (accepted is not None and accepted < self.collapse_ratio * step_size_avg
                 and not at_once)
        if accepted is not None and ((untested and accepted < step_size_avg) or (again and small)):
            return self.cap(accepted), accepted, False
        if accepted is None or small:
            return self.cap(step_size_avg), step_size_avg, True
        avg = self.average(step_size_avg, accepted)
        return self.cap(avg), avg, False

    def average(self, step_size_avg: float, accepted: float) -> float:
        """η̄ after a search that accepted ``accepted`` (> 0): the smoothed (geometric) average,
        lowered by at most ``max_drop``."""
        s = self.smoothing
        avg = accepted if s == 0.0 else math.exp(s * math.log(step_size_avg)
                                                   + (1.0 - s) * math.log(accepted))
        if self.max_drop is not None:  # one batch's outlier does not carry over (module doc)
            avg = max(avg, step_size_avg / self.max_drop)
        return avg
