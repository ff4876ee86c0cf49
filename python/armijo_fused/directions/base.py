"""The interface every direction rule implements.

A direction rule says how the optimizer state absorbs a gradient and which update direction it
yields:

* ``state_names``: the flat fp32 state buffers it keeps (all start at zero);
* ``hyperparameters`` and ``validate(group)``: its param-group keys with their defaults, and
  their checks;
* ``scalars(group, step)``: the host-side numbers its kernels need, in a fixed order of
  ``NUM_SCALARS`` floats (bias corrections are computed here, on the host, from the step count);
* the torch reference math (``update_state``, ``undo_state``, ``direction``, ``precond_grad``),
  which is the ground truth the Triton and C++ twins are tested against;
* five flags the passes and the optimizer read (below: ``direction_reads_grad``,
  ``bias_corrected``, ``heavy_ball``, ``precond_is_gradient``, ``warn_unannealed``).

Notation used by every pass (docs/design.md §2): ``u`` is the rule's direction without weight decay,
``d = u + wd * theta0`` the applied direction with decoupled weight decay, and the fallback
direction ``precond_grad`` is the preconditioned gradient with neither momentum nor weight decay,
which is a descent direction whenever the gradient is non-zero.

The module also holds the range checks the rules' ``validate`` and the optimizers share
(:func:`check_number`, :func:`check_range`, :func:`as_real`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

NUM_SCALARS = 5


class DirectionRule:
    """Base class of the six direction rules; subclasses are stateless singletons."""

    name: ClassVar[str]
    #: index used by the fused kernels (Triton ``RULE`` constexpr, C++ switch); never reorder.
    rule_id: ClassVar[int]
    state_names: ClassVar[tuple[str, ...]] = ()
    #: the state buffers that hold averages of g² (never negative: a checkpoint's are checked).
    squared_states: ClassVar[tuple[str, ...]] = ()
    #: whether recomputing ``u`` from the state needs the gradient too (retry pass traffic).
    direction_reads_grad: ClassVar[bool] = False
    #: whether ``scalars`` corrects the state for its zero start by the fold count (Adam's bias
    #: corrections): parameters that join a group late then need a group of their own.
    bias_corrected: ClassVar[bool] = False
    #: whether the direction is a heavy-ball buffer b ← μb + g (``momentum_search`` applies).
    heavy_ball: ClassVar[bool] = False
    #: whether ``precond_grad`` is the gradient itself (the SGD family): the sums along the
    #: fallback line then follow from a first pass's Σ g² (:meth:`FlatPasses.fallback_sums`).
    precond_is_gradient: ClassVar[bool] = False
    #: whether the optimizer warns when η̄ grows 20× with no schedule annealing the step: the
    #: directions whose searched η was measured to keep growing on noisy batches (Adam's).
    warn_unannealed: ClassVar[bool] = False
    #: the group keys this rule reads, with their defaults (validated by ``validate``).
    hyperparameters: ClassVar[dict[str, object]] = {}

    def validate(self, group: dict) -> None:
        """Raise ``ValueError`` naming the bad hyperparameter."""

    def scalars(self, group: dict, step: int) -> tuple[float, ...]:
        """The ``NUM_SCALARS`` host scalars of this step (``step`` counts from 1)."""
        return (0.0,) * NUM_SCALARS

    # -- torch reference twin ------------------------------------------------------------------
    def update_state(self, g: Tensor, states: Sequence[Tensor], s: Sequence[float]) -> None:
        """Fold the gradient into the state, in place."""

    def undo_state(self, g: Tensor, states: Sequence[Tensor], s: Sequence[float]) -> None:
        """Invert ``update_state`` in place (to rounding): the error path of a step that raised
        after the first pass. A coefficient of 0 means the old state had no influence on any
        later step, so zero stands in for it."""

    def direction(self, g: Tensor, states: Sequence[Tensor], s: Sequence[float]) -> Tensor:
        """``u`` from the already updated state (a new tensor)."""
        raise NotImplementedError

    def precond_grad(self, g: Tensor, states: Sequence[Tensor], s: Sequence[float]) -> Tensor:
        """The fallback descent direction: the gradient under the rule's preconditioner."""
        return g.clone()


def _pad(*values: float) -> tuple[float, ...]:
    return tuple(float(v) for v in values) + (0.0,) * (NUM_SCALARS - len(values))


def unmix(state: Tensor, new: Tensor, keep: float) -> None:
    """Invert ``state <- keep * state + new`` in place."""
    if keep > 0.0:
        state.sub_(new).div_(keep)
    else:
        state.zero_()


def as_real(v) -> float | None:
    """``v`` as a float if it is one real number: a Python or numpy number, or a one-element
    tensor (schedules write those into param groups); None otherwise (bools included)."""
    if isinstance(v, bool):
        return None
    try:  # (an int past the float range, a meta tensor: not a number this can use)
        if isinstance(v, numbers.Real):
            return float(v)
        if isinstance(v, Tensor) and v.numel() == 1 and not v.dtype.is_complex \
                and v.dtype != torch.bool:
            return float(v)
    except (OverflowError, RuntimeError, NotImplementedError):
        return None
    return None


def as_int(v):
    """``v`` as a Python int if it is an integer (a numpy one from a config file included;
    bools are not), else ``v`` unchanged, for the caller's own check to refuse."""
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v)
    return v


def check_number(name: str, value, lo: float, hi: float = math.inf, *, lo_open=False,
                 hi_open=False) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is one finite real number (see
    :func:`as_real`) in the range from ``lo`` to ``hi`` (open ends as flagged)."""
    x = as_real(value)
    ok = x is not None and math.isfinite(x)
    ok = ok and (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
    if not ok:
        lb, rb = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
        raise ValueError(f"invalid {name}: {value!r} (expected a number in {lb}{lo}, {hi}{rb})")


def in_float32(x: float) -> float:
    """``x`` as the passes see it: they compute in float32."""
    return float(torch.tensor(x, dtype=torch.float32))


def check_float32(name: str, value) -> None:
    """Refuse a value finite in float64 but inf in float32, where the passes compute (a weight
    decay or a first trial of 1e39 put inf - inf = NaN into θ at the first move back)."""
    if math.isinf(in_float32(float(value))):
        raise ValueError(f"invalid {name}: {value!r} (it is inf in float32, where the passes "
                         "compute; expected a value below 3.4e38)")


def check_range(group: dict, key: str, lo: float, hi: float, *, lo_open=False, hi_open=True):
    """:func:`check_number` of ``group[key]`` (by default ``lo <= value < hi``)."""
    check_number(key, group[key], lo, hi, lo_open=lo_open, hi_open=hi_open)
