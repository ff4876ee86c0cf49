"""Training telemetry: what every step did, for plots and for choosing a clipping threshold.

After each ``optimizer.step()`` the recorder stores one record::

    {"step", "loss", "step_size": [per block], "applied_step": [per block], "trials",
     "searched", "grad_norm"}

from ``opt.stats`` when the optimizer has them (the armijo_fused optimizers; ``grad_norm`` there is
the norm of the true, unclipped gradient), or, for a plain torch optimizer, from its param groups
(``lr`` as the step size) and the gradient norm computed here from ``p.grad`` (call ``record``
after ``step`` and before ``zero_grad``). Use ``record(loss)`` in the loop, or ``attach(opt)`` to
record after every step through ``Optimizer.register_step_post_hook``.

Host syncs: ``record`` reads the step's values at the call (the gradient norm of a step without a
search lives on the device: one sync on a GPU). ``attach`` keeps them on the device and reads
``read_every`` steps' worth in one transfer (a sync every 64 steps by default, where one per step
would undo the optimizer's sync-free steps); any read of the records reads what is pending first.

Clipping: ``suggest_clip(90)`` is the 90th percentile of the recorded gradient norms — a
threshold that clips the 10% largest gradients and leaves the typical step alone; ``check_clip(c)``
returns the fraction of steps whose gradient norm exceeds c and warns when that is more than half
(a threshold that clips most steps is no longer a safeguard but a rescaled learning rate).
"""

from __future__ import annotations

import json
import math
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..linesearch.controller import read_floats

__all__ = ["TelemetryRecorder"]

_FORMAT = "armijo_fused.telemetry/1"


def _float(x, keep: bool = False):
    """A recorded number: a float, or with ``keep`` a device tensor left for a later read."""
    if x is None:
        return math.nan
    if isinstance(x, torch.Tensor):
        if keep:
            return x.detach()
        return float(x.detach().reshape(-1)[0].item()) if x.numel() else math.nan
    return float(x)


def _floats(x, keep: bool = False) -> list:
    if isinstance(x, (list, tuple)):
        return [_float(v, keep) for v in x]
    return [_float(x, keep)]


def _read_tensors(records: list) -> None:
    """Replace the tensors ``_float(keep=True)`` left in ``records`` by floats: one transfer per
    device (the first element of each, NaN for an empty one, as ``_float`` reads them)."""
    places = []  # (record, key, index in its list or None, tensor)
    for r in records:
        for key in ("loss", "grad_norm", "step_size", "applied_step"):
            v = r[key]
            if isinstance(v, list):
                places.extend((r, key, i, x) for i, x in enumerate(v) if isinstance(x, torch.Tensor))
            elif isinstance(v, torch.Tensor):
                places.append((r, key, None, v))
    read = [t for *_, t in places if t.numel()]
    values = iter(read_floats([t.reshape(-1)[:1] for t in read]) if read else [])
    for r, key, i, t in places:
        v = next(values) if t.numel() else math.nan
        if i is None:
            r[key] = v
        else:
            r[key][i] = v


def _grad_norm(optimizer, keep: bool = False):
    """‖g‖₂ over every parameter of ``optimizer`` with a gradient (float64 accumulation); with
    ``keep``, a device tensor where the gradients are on one device."""
    sums = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            if g.is_sparse:
                g = g.coalesce().values()
            sums.append(g.detach().double().square().sum())
    if not sums:
        return math.nan
    if keep and len({s.device for s in sums}) == 1:
        return torch.stack(sums).sum().sqrt()
    return math.sqrt(sum(float(s) for s in sums))


def _block_names(optimizer, count: int) -> list:
    named: list = []  # (group, block name)
    for gi, group in enumerate(optimizer.param_groups):
        if "block_names" in group:
            named.extend((gi, str(n)) for n in group["block_names"])
        else:
            named.append((gi, str(group.get("block", f"group.{gi}"))))
    if len(named) == count:
        # a layer cut into two weight-decay groups is a block in each: name them apart
        groups_of: dict = {}
        for gi, n in named:
            groups_of.setdefault(n, set()).add(gi)
        return [f"{n} (group {gi})" if len(groups_of[n]) > 1 else n for gi, n in named]
    if count == 1:
        return ["global"]
    return [f"block.{i}" for i in range(count)]


#: the keys of every record (what ``record`` writes)
_RECORD_KEYS = ("step", "loss", "step_size", "applied_step", "trials", "searched", "grad_norm")


class TelemetryRecorder:
    """Per-step loss, step sizes per block, trials, search flag and gradient norm.

    Args:
        optimizer (torch.optim.Optimizer, optional): the default optimizer of ``record``.
        read_every (int, optional): with ``attach``, how many steps' device values are read
            in one transfer (default: 64)
    """

    def __init__(self, optimizer=None, read_every: int = 64):
        if isinstance(read_every, bool) or not isinstance(read_every, int) or read_every < 1:
            raise ValueError(f"read_every must be an int >= 1, got {read_every!r}")
        self._optimizer = None
        self.optimizer = optimizer
        self.read_every = read_every
        self._records: list[dict] = []
        self._unread: list[dict] = []  # records of attach() still holding device tensors
        self.block_names: list[str] = []
        self.meta: dict = {}
        self._handle = None

    # the optimizer through a weak reference: a recorder kept for its plots after training kept
    # the whole optimizer (θ, g, m, v) alive, detached or not
    @property
    def optimizer(self):
        """The default optimizer of ``record`` (held weakly: None once it is gone)."""
        return None if self._optimizer is None else self._optimizer()

    @optimizer.setter
    def optimizer(self, opt) -> None:
        try:
            self._optimizer = None if opt is None else weakref.ref(opt)
        except TypeError:  # (an object without weak references: held as before)
            self._optimizer = lambda: opt

    def _missing(self, what: str) -> str:
        if self._optimizer is not None:  # (given, and collected since)
            return (f"{what}: the recorder's optimizer is gone (it is held weakly, so that a "
                    "recorder kept for its plots does not keep it alive); pass one here")
        return f"{what} needs an optimizer: pass one here or to the recorder"

    def __getstate__(self):  # (pickled or copied: the records, not the optimizer or the hook)
        self._read_pending()
        return {**self.__dict__, "_optimizer": None, "_handle": None}

    @property
    def records(self) -> list:
        """Every record, in step order, its values read from the device."""
        self._read_pending()
        return self._records

    @records.setter
    def records(self, value: list) -> None:
        self._records, self._unread = list(value), []

    def _read_pending(self) -> None:
        if self._unread:
            _read_tensors(self._unread)  # (cleared once read: a failed read is tried again)
            self._unread = []

    # -- recording ------------------------------------------------------------------------------
    # (every record holds _RECORD_KEYS; a file whose records lack one is refused at load: a
    # report read it and raised KeyError in the middle of its plots)
    def record(self, loss=None, optimizer=None) -> dict:
        """Store what the last ``optimizer.step()`` did; returns the record. A call with no
        step since the last record (GradScaler skipped it: the optimizer never ran) stores
        nothing and returns that record; one before any step (a fresh optimizer, or one just
        loaded) stores nothing and returns an empty dict."""
        rec = self._record(loss, optimizer, keep=False)
        self._read_pending()  # (the records before it, the hook's, in the same transfer)
        return rec

    def _record(self, loss, optimizer, keep: bool) -> dict:
        """``keep``: leave device values as tensors, read with the next ``read_every``."""
        opt = optimizer or self.optimizer
        if opt is None:
            raise ValueError(self._missing("record()"))
        records = self._records
        stats = getattr(opt, "stats", None)
        if isinstance(stats, Mapping) and "step_size" in stats and records and \
                "step" in stats and int(stats["step"]) == records[-1]["step"]:
            return records[-1]  # (it stored the step twice, with the skipped batch's loss)
        if isinstance(stats, Mapping) and "step_size" in stats and "step" in stats and \
                int(stats["step"]) == 0:
            # no step yet (a fresh optimizer, or one just loaded, whose first step GradScaler
            # skipped): nothing to store (it stored a step 0 of NaN between steps 3 and 4)
            return {}
        if isinstance(stats, Mapping) and "step_size" in stats:
            get = stats.peek if keep and hasattr(stats, "peek") else stats.__getitem__

            def value(key, default=None):
                return get(key) if key in stats else default

            step_size = _floats(get("step_size"), keep)
            rec = {
                "step": int(value("step", len(records) + 1)),
                "loss": _float(loss if loss is not None else value("loss_before"), keep),
                "step_size": step_size,
                "applied_step": _floats(value("applied_step", get("step_size")), keep),
                "trials": int(value("trials", 0)),
                "searched": bool(value("searched", False)),
                "grad_norm": _float(value("grad_norm"), keep),
            }
        else:
            # (a copy of a tensor lr: schedulers write it in place)
            step_size = [_float(g["lr"].clone() if keep and isinstance(g["lr"], torch.Tensor)
                                else g["lr"], keep) for g in opt.param_groups]
            rec = {
                "step": len(records) + 1, "loss": _float(loss, keep),
                "step_size": step_size, "applied_step": list(step_size), "trials": 0,
                "searched": False, "grad_norm": _grad_norm(opt, keep),
            }
        names = _block_names(opt, len(rec["step_size"]))
        if len(names) > len(self.block_names):
            # a param group added later (a new head) is a block of its own: a new column, NaN
            # at the steps before it existed (new blocks come after the old ones)
            extra = [math.nan] * (len(names) - len(self.block_names))
            for r in records:
                r["step_size"] = r["step_size"] + extra
                r["applied_step"] = r["applied_step"] + extra
            self.block_names = names
        elif len(names) < len(self.block_names):
            raise ValueError(
                f"the number of blocks fell from {len(self.block_names)} to {len(names)}: "
                "record one optimizer per recorder"
            )
        records.append(rec)
        if keep:
            self._unread.append(rec)
            if len(self._unread) >= self.read_every:
                self._read_pending()
        return rec

    def attach(self, optimizer=None):
        """Record after every ``optimizer.step()`` (a step post-hook); returns the hook handle.
        Attaching again moves the hook (one record per step).

        The loss comes from ``opt.stats['loss_before']`` (armijo_fused) or is NaN (plain torch
        optimizers: call ``record(loss)`` yourself to keep it)."""
        opt = optimizer or self.optimizer
        if opt is None:
            raise ValueError(self._missing("attach()"))
        self.detach()  # (attached twice, every step was recorded twice and detach kept one)
        self.optimizer = opt
        self._handle = opt.register_step_post_hook(
            lambda o, args, kwargs: self._record(None, o, keep=True))
        return self._handle

    def detach(self) -> None:
        if getattr(self, "_handle", None) is not None:
            self._handle.remove()
            self._handle = None

    # -- views ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._records)

    def column(self, key: str) -> np.ndarray:
        return np.array([r[key] for r in self.records], dtype=np.float64)

    @property
    def grad_norms(self) -> np.ndarray:
        return self.column("grad_norm")

    @property
    def losses(self) -> np.ndarray:
        return self.column("loss")

    def step_sizes(self, key: str = "step_size") -> dict:
        """``{block: array over steps}`` of the searched (or, with key='applied_step', applied)
        step sizes."""
        arr = np.array([r[key] for r in self.records], dtype=np.float64).reshape(
            len(self.records), -1)
        return {n: arr[:, i] for i, n in enumerate(self.block_names)}

    # -- clipping -------------------------------------------------------------------------------
    def suggest_clip(self, percentile: float = 90.0) -> float:
        """The ``percentile``-th percentile of the finite recorded gradient norms."""
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        g = self.grad_norms
        g = g[np.isfinite(g)]
        if g.size == 0:
            raise ValueError("no finite gradient norm recorded yet")
        return float(np.percentile(g, percentile))

    def clipped_fraction(self, threshold: float) -> float:
        """Fraction of recorded steps whose gradient norm exceeds ``threshold`` (``inf``, the
        optimizer's ``max_grad_norm`` that only computes the norm, clips none)."""
        if not 0 < threshold <= math.inf:
            raise ValueError(f"threshold must be a number > 0, got {threshold}")
        g = self.grad_norms
        g = g[np.isfinite(g)]
        return float(np.mean(g > threshold)) if g.size else math.nan

    def check_clip(self, threshold: Optional[float] = None, percentile: float = 90.0) -> float:
        """``clipped_fraction`` at ``threshold`` (default: the optimizer's ``max_grad_norm``),
        with a warning when more than half of the steps would be clipped, which names the
        ``percentile`` of the norms as a threshold to try (the playbook's 90th by default)."""
        if threshold is None:
            opt = self.optimizer
            if opt is None and self._optimizer is not None:
                raise ValueError(self._missing("check_clip()") + ", or a threshold")
            threshold = getattr(opt, "max_grad_norm", None)
            if threshold is None:
                raise ValueError("check_clip() needs a threshold (the optimizer has none)")
        frac = self.clipped_fraction(threshold)
        if frac > 0.5:
            warnings.warn(
                f"{100 * frac:.0f}% of the recorded steps have a gradient norm above the clipping "
                f"threshold {threshold:g}: clipping then rescales most steps instead of guarding "
                f"against rare spikes; the {percentile:g}th percentile of the norms is "
                f"{self.suggest_clip(percentile):.4g}",
                UserWarning, stacklevel=2,
            )
        return frac

    def summary(self) -> dict:
        g = self.grad_norms
        finite = g[np.isfinite(g)]
        return {
            "steps": len(self.records),
            "searched_steps": int(sum(r["searched"] for r in self.records)),
            "trials": int(sum(r["trials"] for r in self.records)),
            "final_loss": self.records[-1]["loss"] if self.records else math.nan,
            "grad_norm_median": float(np.median(finite)) if finite.size else math.nan,
            "clip_p90": float(np.percentile(finite, 90)) if finite.size else math.nan,
        }

    # -- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        def clean(v):  # JSON has no NaN / inf: store null
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return {
            "format": _FORMAT, "block_names": list(self.block_names), "meta": dict(self.meta),
            "records": [{k: clean(v) for k, v in r.items()} for r in self.records],
        }

    @classmethod
    def from_dict(cls, d: dict) -> TelemetryRecorder:
        if not isinstance(d, dict):
            raise ValueError(f"not a telemetry file (a JSON {type(d).__name__}, expected an "
                             "object)")
        if d.get("format") != _FORMAT:
            raise ValueError(f"not a telemetry file (format {d.get('format')!r}, "
                             f"expected {_FORMAT!r})")
        rec = cls()
        rec.block_names = list(d.get("block_names", []))
        rec.meta = dict(d.get("meta", {}))

        def nan(v):
            if v is None:
                return math.nan
            if isinstance(v, list):
                return [nan(x) for x in v]
            return v

        records = d.get("records")
        if not isinstance(records, list) or not all(
                isinstance(r, dict) and all(k in r for k in _RECORD_KEYS) for r in records):
            raise ValueError("not a telemetry file (its 'records' must be a list of objects, "
                             f"each with {', '.join(map(repr, _RECORD_KEYS))})")
        for r in records:
            rec.records.append({k: (nan(v) if k in ("loss", "grad_norm", "step_size",
                                                    "applied_step") else v)
                                for k, v in r.items()})
        return rec

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Union[str, Path]) -> TelemetryRecorder:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(data)
