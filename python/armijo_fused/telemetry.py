"""``opt.stats``: what the last step did, readable without forcing a host sync.

Values that live on the device (the gradient norm, ⟨g,d⟩ of a step that did not search) are kept
as tensors and turned into floats only when read, so a training loop that never looks at the
statistics never waits for the GPU on non-search steps. A value may also be given as a function
of no arguments, called on first read: telemetry that takes device ops to form (a step without a
search) then costs no kernel launches unless someone reads it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


class StepStats(Mapping):
    """What the last step did, as a read-only mapping (``opt.stats``): ``step``, ``searched``,
    ``step_size`` and ``applied_step`` (η and η · min(1, lr_t / lr_0); lists per block when
    layer-wise), ``lr_factor``, ``trials``, ``loss_before``, ``loss_after`` (where the step
    ended, NaN where unknown), ``loss_trial`` (the accepted trial's), ``gd`` (⟨g, d⟩),
    ``grad_norm`` (unclipped), ``non_descent``, ``unresolved``, ``exhausted``, ``collapsed``,
    ``skipped``, ``searched_blocks``, ``next_step_size``, and the running totals ``forwards``
    and ``backwards`` (README, "What a step does"). Device values are read on first access."""

    def __init__(self, **values):
        self._values = values

    @classmethod
    def before_any_step(cls, blocks: int | None = None) -> StepStats:
        """The keys a step reports, before any has run (or after a resume): step 0, nothing
        searched, NaN for the numbers, so a loop that logs ``opt.stats[...]`` after a step the
        optimizer never ran (one GradScaler skipped on an overflow) reads values, not KeyError.
        ``blocks``: layer-wise, the number of blocks (the groups are cut into blocks when the
        optimizer is built); the per-block values are lists, as after a step (a NaN scalar
        broke ``stats["step_size"][0]``)."""
        nan = float("nan")
        def per_block():  # (a list each: one shared list would be changed for all three)
            return nan if blocks is None else [nan] * blocks

        return cls(step=0, searched=False, step_size=per_block(), applied_step=per_block(),
                   lr_factor=nan,
                   trials=0, loss_before=nan, loss_after=nan, loss_trial=nan, gd=nan, grad_norm=nan,
                   non_descent=False, unresolved=False, exhausted=False, collapsed=False,
                   skipped=False, searched_blocks=[], next_step_size=per_block(), forwards=0,
                   backwards=0)

    def __getitem__(self, key):
        v = self._values[key]
        if callable(v) and not isinstance(v, Tensor):
            v = self._values[key] = v()
        if isinstance(v, Tensor):
            v = self._value(v)
            self._values[key] = v
        elif isinstance(v, list) and any(isinstance(x, Tensor) for x in v):
            v = [self._value(x) if isinstance(x, Tensor) else x for x in v]
            self._values[key] = v
        return v

    def peek(self, key):
        """The value of ``key`` without reading it from the device: a tensor (or a list
        holding tensors) where the step left one, as ``TelemetryRecorder.attach`` keeps it to
        read many steps' values in one transfer; otherwise what ``stats[key]`` gives."""
        v = self._values[key]
        if callable(v) and not isinstance(v, Tensor):
            v = self._values[key] = v()
        return v

    @staticmethod
    def _value(t: Tensor):
        return bool(t) if t.dtype == torch.bool else float(t)

    def __contains__(self, key):  # (Mapping's reads the value: a host sync on a GPU)
        return key in self._values

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def __repr__(self):
        return f"StepStats({dict(self.items())})"
