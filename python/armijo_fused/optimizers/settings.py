"""The optimizer's own settings, checked whenever they are written, not only at construction.

The integrations write ``max_grad_norm`` after construction (Lightning's ``gradient_clip_val``,
HF's ``max_grad_norm``), and a user may tune ``c`` or the cadence mid-run. Checked only in
``__init__``, a bad value written later surfaced as a bare error deep inside a step, or not at
all: ``max_grad_norm = nan`` skipped every step in silence. Each setting here raises where it
is written, with its name. (Per-group hyperparameters, ``lr``, ``weight_decay``, ``betas``, are
checked at every step instead: torch's schedulers write them in place.)

Settings a later write could not honour are fixed at construction: the flat store, the blocks
and the saved step sizes are built from ``layerwise``, ``flat``, ``tile`` and
``momentum_search``; a write to them was taken and did nothing, or broke the next step. Writing
one raises, naming the way to change it (a new optimizer loading this one's ``state_dict()``).
So does a write to ``init_step_size``, ``direction`` or ``model``, which the constructor read
(the step sizes, the direction rule, the modules trials restore).
The others take effect at the next step: ``backend`` moves the buffers built so far onto the new
backend at once (an impossible one is refused there), ``block_search``, ``merge_below``,
``candidates`` and ``exact_revert`` are checked against the settings they combine with.
"""

from __future__ import annotations

import dataclasses

from ..backends import BACKENDS, buffer_backend
from ..directions.base import as_int, as_real, check_number
from ..linesearch.cadence import Cadence
from ..linesearch.policy import StepSizePolicy
from .search import IN_TURN


class Checked:
    """A data descriptor: ``check(value)`` validates (and may convert) every value set."""

    def __init__(self, check):
        self.check = check

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        # _target inlined: a step reads these ~40 times, a call each was ~0.1 µs more
        values = obj.__dict__
        inner = values.get("_optimizer")
        if inner is not None and isinstance(inner, SettingsMixin):
            values = inner.__dict__
        try:
            return values[self.name]
        except KeyError:  # (before __init__ set it: as a plain attribute would)
            raise AttributeError(self.name) from None

    def __set__(self, obj, value):
        obj = _target(obj)
        # (the value lives in the instance's __dict__ under its own name, so copies, pickles
        # and torch's __setstate__, which update __dict__ directly, carry it as before)
        obj.__dict__[self.name] = self.check(obj, value)


def _target(obj):
    """The optimizer itself where ``obj`` wraps it: Lightning's ``LightningOptimizer`` (what
    ``self.optimizers()`` returns) takes the optimizer's class as a base, so these descriptors
    ran on the wrapper, and a write (``opt.c = 0.3``) stayed there, unread by the step."""
    inner = obj.__dict__.get("_optimizer")
    return inner if isinstance(inner, SettingsMixin) else obj


def _fraction(name):
    def check(obj, value):
        check_number(name, value, 0.0, 1.0, lo_open=True, hi_open=True)
        return float(value)
    return check


def _max_trials(obj, value):
    value = as_int(value)  # (a config file's numpy int was refused as "not an int")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"invalid max_trials: {value!r} (expected an int >= 1)")
    return value


def _max_grad_norm(obj, value):
    if value is None:
        return None
    x = as_real(value)
    if x is None or not x > 0:  # (inf: the norm is computed and logged, nothing is clipped,
        # as HF's TrainingArguments(max_grad_norm=inf) and Lightning's clip value mean it)
        raise ValueError(f"invalid max_grad_norm: {value!r} (expected a number > 0, inf for "
                         "no clipping with the norm computed, or None)")
    return x


def check_flag(name: str, value) -> bool:
    """``value`` as a bool, or a TypeError naming ``name`` (bool("no") is True: a string was
    a silent yes)."""
    if value not in (True, False):
        raise TypeError(f"invalid {name}: {value!r} (expected True or False)")
    return bool(value)


def _flag(name):
    return lambda obj, value: check_flag(name, value)


def _cadence(obj, value):
    if isinstance(value, Cadence):
        return value
    # a spec written later keeps the cadence's max_interval
    old = obj.__dict__.get("cadence")
    if old is None:
        return Cadence(value)
    new = Cadence(value, max_interval=old.max_interval)
    new.log_tol = old.log_tol
    return new


def _fixed(name: str, built: str):
    """A setting the optimizer's structures are ``built`` from: set once, then only to the same
    value (a copy or a pickle restores it through ``__dict__``, not through here)."""
    def check(obj, value):
        if name in obj.__dict__:
            old = obj.__dict__[name]
            if value is old or _equal(value, old):
                return old  # (the same value, in any spelling: np.False_, 2048.0)
            raise AttributeError(
                f"{name} is fixed at construction ({built}): build a new optimizer with "
                f"{name}={value!r} and load this one's state_dict() into it")
        return value
    return check


def _equal(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # (no comparison defined)
        return False


def _backend(obj, value):
    if value not in BACKENDS:
        raise ValueError(f"invalid backend: {value!r} (choose {', '.join(BACKENDS)})")
    # the buffers built so far move to it now, all or none: it used to be read only when the
    # store was rebuilt, so a write mid-run did nothing until then and a bad one raised there
    buffers = obj.__dict__.get("_buffers") or []
    resolved = [buffer_backend(value, b) for b in buffers]
    for b, module in zip(buffers, resolved):
        b.backend = module
    return value


def _block_search(obj, value):
    if value not in (*IN_TURN, "stale", "exact"):
        raise ValueError(
            f"invalid block_search: {value!r} (choose round_robin, grow_all, stale or exact)")
    if value == "exact" and obj.__dict__.get("momentum_search") == "gradient" \
            and obj.__dict__.get("layerwise"):
        raise ValueError(
            "block_search='exact' searches along the momentum direction, and this optimizer "
            "measures its step sizes along the gradient (momentum_search='gradient', fixed at "
            "construction): build it with momentum_search='direction'")
    return value


def _merge_below(obj, value):
    if value is None:
        return None
    check_number("merge_below", value, 0.0, lo_open=True)
    if not obj.__dict__.get("layerwise"):  # (it was taken and did nothing)
        raise ValueError("merge_below merges the blocks of the layer-wise search: pass "
                         "layerwise=True with it")
    return float(value)


def _candidates(obj, value):
    value = as_int(value)  # (a numpy int from a config file)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ValueError(f"invalid candidates: {value!r} (expected an int >= 2 or None)")
    if not obj.__dict__.get("_modules"):
        raise ValueError("candidates needs model=: trial weights are swapped into it")
    if obj.__dict__.get("layerwise"):
        raise ValueError("candidates works with the global search (layerwise=False)")
    if not obj.__dict__.get("flat", True):
        raise ValueError("candidates needs the flat buffers (flat=True): the K trial "
                         "points are cut from them")
    if obj.__dict__.get("momentum_search") == "gradient":
        raise ValueError(
            "candidates search along the momentum direction, and this optimizer measures its "
            "step sizes along the gradient (momentum_search='gradient', fixed at "
            "construction): build it with momentum_search='direction'")
    return value


def cap_step_sizes(groups: list, policy: StepSizePolicy) -> None:
    """``max_step`` holds from now on: a lower one than the step sizes carried let the steps
    without a search apply them until the next search, and an η̄ above it made the first
    search's capped η read as a collapse. (At a load, and where ``max_step`` is written.)"""
    for g in groups:
        for key in ("step_size", "step_size_avg"):
            if key in g:
                v = g[key]
                g[key] = [policy.cap(x) for x in v] if isinstance(v, list) else policy.cap(v)


def _policy(obj, value):
    if not isinstance(value, StepSizePolicy):
        raise TypeError(f"invalid policy: {type(value).__name__} (expected a StepSizePolicy)")
    value.validate()
    cap_step_sizes(obj.__dict__.get("param_groups", ()), value)
    return value


class _PolicyField:
    """``opt.growth`` and the other step-size settings: read from and written into
    ``opt.policy`` (a frozen dataclass, replaced whole, so a bad value leaves the old policy)."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(_target(obj).policy, self.name)

    def __set__(self, obj, value):
        obj = _target(obj)
        obj.policy = dataclasses.replace(obj.policy, **{self.name: value})


class _MaxInterval:
    """``opt.max_interval``: the adaptive cadence's longest gap, read from and written into
    ``opt.cadence``; a gap already scheduled beyond a lower one is shortened to it."""

    def __get__(self, obj, owner=None):
        return self if obj is None else _target(obj).cadence.max_interval

    def __set__(self, obj, value):
        obj = _target(obj)
        old = obj.cadence
        new = Cadence(old.spec, max_interval=value)  # (checks it)
        new.log_tol = old.log_tol
        if old.spec == "adaptive":  # (a fixed cadence k schedules by k, not by this)
            for g in obj.param_groups:
                g["search_interval"] = min(g["search_interval"], new.max_interval)
                g["next_search"] = min(g["next_search"], g["step"] + new.max_interval)
        obj.cadence = new


class _ReadOnly:
    """``opt.init_step_size``, ``opt.direction``, ``opt.model``: read from what the constructor
    built; a write raises, saying where the value is given (written, each was a new attribute
    nothing read: an audit)."""

    def __init__(self, read, how: str):
        self.read, self.how = read, how

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        return self if obj is None else self.read(_target(obj))

    def __set__(self, obj, value):
        raise AttributeError(f"{self.name} is set at construction: {self.how}")


class SettingsMixin:
    """The settings a step reads from the optimizer itself (see the module docstring)."""

    c = Checked(_fraction("c"))
    backtrack = Checked(_fraction("backtrack"))
    max_trials = Checked(_max_trials)
    max_grad_norm = Checked(_max_grad_norm)
    check_finite = Checked(_flag("check_finite"))
    cadence = Checked(_cadence)
    max_interval = _MaxInterval()
    policy = Checked(_policy)
    growth = _PolicyField()
    smoothing = _PolicyField()
    collapse_ratio = _PolicyField()
    max_step = _PolicyField()
    max_drop = _PolicyField()
    trend_guard = _PolicyField()
    exact_revert = Checked(_flag("exact_revert"))
    backend = Checked(_backend)
    block_search = Checked(_block_search)
    merge_below = Checked(_merge_below)
    candidates = Checked(_candidates)
    layerwise = Checked(_fixed("layerwise", "the blocks and the saved step sizes per block"))
    flat = Checked(_fixed("flat", "the store of the parameters"))
    tile = Checked(_fixed("tile", "the buffers' reduction blocks"))
    momentum_search = Checked(_fixed("momentum_search", "which direction the saved step "
                                     "sizes are measured along"))
    init_step_size = _ReadOnly(
        lambda opt: opt._init_step_size,
        "the step sizes since are the search's own (param_groups[i]['step_size']); for "
        "another start, build the optimizer with init_step_size=")
    direction = _ReadOnly(
        lambda opt: opt.rule.name,
        "build a new optimizer with direction= (ArmijoSGD: momentum=, nesterov=) and load "
        "this one's state_dict() into it")
    model = _ReadOnly(
        lambda opt: opt._modules[0] if opt._modules else None,
        "pass model= to the constructor, or opt.set_closure(closure, model=model) (before "
        "the first step, opt.name_parameters(model) names the tensors for the layer-wise "
        "blocks)")
