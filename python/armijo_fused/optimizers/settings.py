"""The optimizer's own settings, checked whenever they are written, not only at construction.

The integrations write ``max_grad_norm`` after construction (Lightning's ``gradient_clip_val``,
HF's ``max_grad_norm``), and a user may tune ``c`` or the cadence mid-run. Checked only in
``__init__``, a bad value written later surfaced as a bare error deep inside a step, or not at
all: ``max_grad_norm = nan`` skipped every step in silence. Each setting here raises where it
is written, with its name. (Per-group hyperparameters, ``lr``, ``weight_decay``, ``betas``, are
checked at every step instead: torch's schedulers write them in place.)
"""

from __future__ import annotations

from ..directions.base import as_int, as_real, check_number
from ..linesearch.cadence import Cadence


class Checked:
    """A data descriptor: ``check(value)`` validates (and may convert) every value set."""

    def __init__(self, check):
        self.check = check

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        try:
            return obj.__dict__[self.name]
        except KeyError:  # (before __init__ set it: as a plain attribute would)
            raise AttributeError(self.name) from None

    def __set__(self, obj, value):
        # (the value lives in the instance's __dict__ under its own name, so copies, pickles
        # and torch's __setstate__, which update __dict__ directly, carry it as before)
        obj.__dict__[self.name] = self.check(obj, value)


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
    return Cadence(value, max_interval=old.max_interval if old is not None else 10)


class SettingsMixin:
    """The settings a step reads from the optimizer itself (see the module docstring)."""

    c = Checked(_fraction("c"))
    backtrack = Checked(_fraction("backtrack"))
    max_trials = Checked(_max_trials)
    max_grad_norm = Checked(_max_grad_norm)
    check_finite = Checked(_flag("check_finite"))
    cadence = Checked(_cadence)
