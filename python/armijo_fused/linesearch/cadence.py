"""When to search: every step, every k-th step, or adaptively.

A search costs one or more extra forward passes; a step without one costs none and no host sync
(it applies the last accepted step size). ``adaptive`` searches while the accepted step size is
still moving and backs off once it has settled, as SaLSa does:

* after each search, the step size counts as settled when it lies within a factor ``tolerance``
  (default 2) of its running average η̄ (see policy.py);
* settled: the interval to the next search doubles, up to ``max_interval`` (default 10, the sparse
  cadence measured in docs/design.md §8 to keep quality); moving: it halves, down to 1;
* a search that accepted nothing (trials exhausted) or collapsed makes the next step search
  again, with any cadence: the step size it falls back to was just rejected, and steps without a
  search would apply it blindly.

Cadence state (``next_search``, ``search_interval``) lives in the param groups like the step sizes.
"""

from __future__ import annotations

import math

from ..directions.base import as_int


class Cadence:
    def __init__(self, spec="adaptive", *, max_interval: int = 10, tolerance: float = 2.0):
        if spec == "every":
            spec = 1
        # (a numpy int from a config file is an int here)
        spec, max_interval = as_int(spec), as_int(max_interval)
        if isinstance(spec, bool) or not (spec == "adaptive" or isinstance(spec, int)):
            raise ValueError(f"invalid cadence: {spec!r} (expected 'every', 'adaptive' or an int k)")
        if isinstance(spec, int) and spec < 1:
            raise ValueError(f"invalid cadence: {spec!r} (an int cadence must be >= 1)")
        if isinstance(max_interval, bool) or not isinstance(max_interval, int) or max_interval < 1:
            raise ValueError(f"invalid max_interval: {max_interval!r} (expected >= 1)")
        if not tolerance > 1.0:
            raise ValueError(f"invalid cadence tolerance: {tolerance!r} (expected > 1)")
        self.spec = spec
        self.max_interval = max_interval
        self.log_tol = math.log(tolerance)

    def should_search(self, step: int, next_search: int) -> bool:
        """``step`` is the 1-based index of the step about to be taken."""
        if self.spec == "adaptive":
            return step >= next_search
        return (step - 1) % self.spec == 0 or step == next_search

    def after_search(self, step: int, interval: int, settled: bool,
                     search_again: bool = False) -> tuple[int, int]:
        """(next_search, interval) after searching at ``step``; ``search_again``: the search
        accepted nothing or collapsed, so the next step searches whatever the cadence."""
        if search_again:
            return step + 1, 1
        if self.spec != "adaptive":
            return step + self.spec, self.spec
        interval = min(interval * 2, self.max_interval) if settled else max(interval // 2, 1)
        return step + interval, interval

    def settled(self, accepted: float | None, avg: float) -> bool:
        return accepted is not None and abs(math.log(accepted / avg)) <= self.log_tol
