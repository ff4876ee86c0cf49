"""``ArmijoOptimizer``: the step, top to bottom. ArmijoSGD and ArmijoAdam only choose defaults.

Pieces (each its own module): a direction rule (``directions/``), flat storage (``storage/``), the
backend that runs the fused passes (``backends/``), and the line search: controller, step-size
policy, cadence and side-effect-free trials (``linesearch/``).
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Callable

import torch
from torch import Tensor

from ..backends import resolve_backend, torch_backend
from ..directions import get_rule
from ..directions.base import check_number
from ..linesearch import trial as trial_mod
from ..linesearch.batched import batched_armijo_search, check_batchable, stacked_loss
from ..linesearch.cadence import Cadence
from ..linesearch.controller import (
    Passes,
    armijo_search,
    evaluate_on_every_rank,
    loss_resolution,
    read_checking_ranks,
    read_floats,
    reduce_with_flag,
)
from ..linesearch.policy import StepSizePolicy
from ..storage.flat import FlatBuffer
from ..storage.in_place import InPlaceBuffer
from ..storage.layout import DEFAULT_TILE
from ..storage.scalars import device_floats, to_device
from ..storage.sharded import ShardedBuffer, fsdp_modules, is_dtensor
from ..telemetry import StepStats
from .interrupts import HeldInterrupts
from .torch_compat import (
    GROUP_OPTION_KEYS,
    check_group_options,
    from_torch_state_dict,
    is_torch_state_dict,
    lr_peak,
)

#: keys of the line-search state kept in every param group (identical across groups when global).
_LS_KEYS = ("step", "folded", "step_size", "step_size_avg", "step_length", "collapsed",
            "next_search", "search_interval", "searches", "forwards", "backwards")
# ``step`` counts step() calls (cadence, schedules); ``folded`` counts the gradients folded into
# the group's state, the count behind its bias corrections: a skipped step (non-finite gradient or
# loss) adds to the first and not to the second, as torch's Adam does for a step GradScaler skips,
# and a group added later (progressive unfreezing) starts at 0 with its zero moments.
# ``step_length``: η·‖d‖ of the last accepted step, per block (0: none yet); steps without a
# search move at most STEP_LENGTH_RATIO times that far (see ``_length_caps``). ``collapsed``: per
# block, whether its last search collapsed (a second collapse in a row moves η̄, see policy.py).
STEP_LENGTH_RATIO = 2.0


def _outside_stacklevel() -> int:
    """The ``stacklevel`` of a warning raised inside the optimizer (a step, its construction,
    ``add_param_group``) that points at the user's line:
    the first frame outside this package and torch (the optimizer hooks and the compiler's
    ``disable`` wrapper sit between the two, in numbers that vary with torch's version)."""
    inside = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
              os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _calling_grad_scaler(opt):
    """The enabled ``torch.amp.GradScaler`` whose ``step(opt, ...)`` called this step, if one
    did. GradScaler unscales the gradients that exist before it calls ``step``; a closure
    passed positionally (GradScaler refuses only the keyword; accelerate's optimizer wrapper
    passes it so) then recomputes them scaled, and the step must unscale those itself."""
    frame = sys._getframe(2)
    for _ in range(12):  # GradScaler.step -> _maybe_opt_step -> torch's hooks -> step
        if frame is None:
            return None
        # f_locals only of GradScaler's own frames: on Python <= 3.12 reading it leaves a
        # snapshot on the frame that would keep a training loop's deleted tensors alive
        if frame.f_code.co_name in ("step", "_maybe_opt_step") and \
                frame.f_code.co_filename.endswith("grad_scaler.py"):
            scaler = frame.f_locals.get("self")
            caller = frame.f_locals.get("optimizer")
            # (or a wrapper that shares our groups: Lookahead-style optimizers)
            if isinstance(scaler, torch.amp.GradScaler) and (
                    caller is opt or getattr(caller, "param_groups", None) is opt.param_groups):
                return scaler if scaler.is_enabled() else None
        frame = frame.f_back
    return None


def _lr_value(lr) -> float:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"invalid lr: a tensor lr must hold one value, got shape {tuple(lr.shape)}")
        lr = float(lr)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0.0 <= lr < math.inf:
        raise ValueError(f"invalid lr: {lr!r} (expected a finite number >= 0)")
    return float(lr)


_DROPOUT = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
            torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def _structured_loss(value):
    """The loss inside what a closure returned, when that is a structure: a dict or an HF
    ``ModelOutput`` with ``loss``, an object with a tensor ``.loss``, or a tuple whose first
    entry is the loss (HF's ``return_dict=False``) and the only scalar; else None."""
    if isinstance(value, Mapping):
        return value.get("loss")
    if isinstance(value, tuple):
        scalars = [v for v in value if isinstance(v, Tensor) and v.numel() == 1]
        if len(scalars) > 1:  # (loss_a, loss_b): which one the gradient belongs to is a guess
            raise TypeError(
                f"the closure returned a tuple of {len(scalars)} scalar tensors; return the "
                "loss the gradient belongs to (or a dict with 'loss')")
        return value[0] if value else None
    loss = getattr(value, "loss", None)
    return loss if isinstance(loss, Tensor) else None


def _as_loss(value, what: str) -> Tensor:
    if not isinstance(value, (Tensor, numbers.Real)):
        inner = _structured_loss(value)
        if inner is not None:
            value = inner
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{what} returned a tensor of shape {tuple(value.shape)}; expected a scalar loss "
                "(reduce it, e.g. with .mean())"
            )
        value = value.detach()
        return value if value.dim() == 0 else value.reshape(())  # (a view op is a dispatch)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy scalars too
        return torch.tensor(float(value), dtype=torch.float64)
    raise TypeError(f"{what} returned {type(value).__name__}; expected a scalar loss (a tensor or "
                    "a float, or a dict / ModelOutput with 'loss', or a tuple starting with it)")


def _refuse_zero_redundancy(name: str) -> None:
    """``ZeroRedundancyOptimizer(params, optimizer_class=ArmijoAdam)`` builds one optimizer per
    rank over that rank's shard of the parameters: its trials would move only that shard, so the
    Armijo test would judge a point that is never applied (and ranks holding different numbers
    of blocks would send collectives of different sizes). It constructs the optimizer from its
    own ``__init__`` / ``add_param_group``: look for it a few frames up."""
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zero is None:
        return
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return
        if isinstance(frame.f_locals.get("self"), zero.ZeroRedundancyOptimizer):
            raise TypeError(
                f"{name} cannot run inside torch.distributed.optim.ZeroRedundancyOptimizer: "
                "each rank would search along its own shard of the parameters only. Use DDP "
                "(the optimizer over all parameters on every rank) or FSDP2 (fully_shard, "
                "which shards the optimizer state and which the line search supports)"
            )
        frame = frame.f_back


class ArmijoOptimizer(torch.optim.Optimizer):
    """Base class: a direction rule searched along by a stochastic Armijo line search.

    Subclasses fix the direction family and its defaults; see :class:`ArmijoAdam` for the
    update rule and the meaning of every argument.
    """

    def __init__(
        self,
        params,
        *,
        lr,
        direction: str,
        weight_decay: float,
        init_step_size: float,
        c: float,
        backtrack: float,
        growth: float,
        smoothing: float,
        max_trials: int,
        max_step: float | None,
        collapse_ratio: float,
        cadence,
        max_interval: int,
        max_grad_norm: float | None,
        check_finite: bool,
        backend: str,
        layerwise: bool,
        model: torch.nn.Module | None,
        rule_defaults: dict,
        block_search: str = "round_robin",
        merge_below: float | None = None,
        exact_revert: bool = False,
        process_group=None,
        candidates: int | None = None,
        flat: bool = True,
        tile: int = DEFAULT_TILE,
    ):
        _lr_value(lr)  # validates; schedulers own the value
        _refuse_zero_redundancy(type(self).__name__)
        rule = get_rule(direction)
        check_number("weight_decay", weight_decay, 0.0)
        check_number("init_step_size", init_step_size, 0.0, lo_open=True)
        check_number("c", c, 0.0, 1.0, lo_open=True, hi_open=True)
        check_number("backtrack", backtrack, 0.0, 1.0, lo_open=True, hi_open=True)
        if not isinstance(max_trials, int) or isinstance(max_trials, bool) or max_trials < 1:
            raise ValueError(f"invalid max_trials: {max_trials!r} (expected an int >= 1)")
        if max_grad_norm is not None:
            check_number("max_grad_norm", max_grad_norm, 0.0, lo_open=True)
        if backend not in ("auto", "triton", "cpp", "torch"):
            raise ValueError(f"invalid backend: {backend!r} (choose auto, triton, cpp or torch)")
        if block_search not in ("round_robin", "stale", "exact"):
            raise ValueError(
                f"invalid block_search: {block_search!r} (choose round_robin, stale or exact)"
            )
        if merge_below is not None:
            check_number("merge_below", merge_below, 0.0, lo_open=True)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if candidates is not None:
            if not isinstance(candidates, int) or isinstance(candidates, bool) or candidates < 2:
                raise ValueError(f"invalid candidates: {candidates!r} (expected an int >= 2 or None)")
            if model is None:
                raise ValueError("candidates needs model=: trial weights are swapped into it")
            if layerwise:
                raise ValueError("candidates works with the global search (layerwise=False)")
            if not flat:
                raise ValueError("candidates needs the flat buffers (flat=True): the K trial "
                                 "points are cut from them")
        self.rule = rule
        self.policy = StepSizePolicy(growth=growth, smoothing=smoothing,
                                     collapse_ratio=collapse_ratio, max_step=max_step)
        self.policy.validate()
        self.cadence = Cadence(cadence, max_interval=max_interval)
        self.c, self.backtrack, self.max_trials = float(c), float(backtrack), max_trials
        self.max_grad_norm, self.check_finite = max_grad_norm, bool(check_finite)
        self.backend, self.tile = backend, tile
        self.layerwise, self.block_search = bool(layerwise), block_search
        self.merge_below = merge_below
        self.exact_revert = bool(exact_revert)
        self.candidates = candidates
        self.flat = bool(flat)
        self.process_group = process_group
        self._modules = [model] if model is not None else []
        self._names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        self._closure: Callable | None = None
        self._pending_rng = None
        self._pending_loss = None
        self._returned = None  # what the closure returned, when it is a structure (HF outputs)
        self._pending_skip = None  # (pinned flag, event) of a GPU step whose skip is unread
        self._last_dd = None  # (buffers, per-buffer ‖d_b‖² of the last first pass): _length_caps
        self._sharded = False
        self._resumed_dd = None  # the ‖d_b‖² a loaded checkpoint carried
        self._skip_host = None
        self._constants: dict = {}  # per device: see _ones2
        self._buffers: list[FlatBuffer] | None = None
        self._gathered_steps = 0  # steps whose gradients arrived as new tensors
        self._buffer_key = None
        self.stats: StepStats = StepStats()

        defaults = dict(lr=lr, weight_decay=weight_decay, **rule_defaults)
        self._init_step_size = float(init_step_size)
        if isinstance(params, torch.nn.Module):  # torch's own error: "'Linear' is not iterable"
            raise TypeError(
                f"params is a module ({type(params).__name__}): pass model.parameters() (and "
                "model=model to let trials restore its buffers and name its layers)")
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._init_group(group)
        # filled by state_dict() only; a live key, so that a checkpoint flattened by
        # torch.distributed.checkpoint (flatten_optimizer_state_dict, which keeps only the keys
        # the live groups have) carries it back
        self.param_groups[0].setdefault("last_dd", None)
        self._warn_group_lrs()
        if self.layerwise and len(self.param_groups) == 1 and not self._names:
            raise ValueError(
                "layerwise=True needs blocks: pass one param group per block (for instance "
                "armijo_fused.blocks.param_groups(model)) or model= to split by module names"
            )

    def _init_group(self, group: dict) -> None:
        """Validate a param group and give it the line-search keys. A group added later
        (``add_param_group``, progressive unfreezing) joins the current global step size."""
        self._validate_group(group)
        for p in group["params"]:
            if not p.is_floating_point():
                raise TypeError(f"parameters must be floating point, got {p.dtype}")
        # torch >= 2.6 takes named_parameters(): their names find the blocks without model=
        for name, p in zip(group.get("param_names", ()), group["params"]):
            self._names.setdefault(id(p), name)
        first = self.param_groups[0]
        joining = group is not first and not self.layerwise and "step_size" in first
        group.setdefault("lr_ref", _lr_value(group["lr"]))
        for key in _LS_KEYS:
            default = {"step_size": self._init_step_size,
                       "step_size_avg": self._init_step_size,
                       "next_search": 1, "search_interval": 1}.get(key, 0)
            group.setdefault(key, first[key] if joining and key != "folded" else default)
        if self.layerwise:  # present from the start: DCP loads only the keys a fresh one has
            group.setdefault("block_cursor", first.get("block_cursor", 0))

    def _validate_group(self, group: dict) -> None:
        """The hyperparameters a step reads from a group: at construction, and again at every
        step, since schedulers and user code write them (a weight-decay schedule, a momentum
        cycle); a bad value is refused by name before anything moves."""
        _lr_value(group["lr"])
        check_number("weight_decay", group["weight_decay"], 0.0)
        self.rule.validate(group)
        check_group_options(type(self).__name__, self.rule, group)

    def _validate_changed_groups(self) -> None:
        """:meth:`_validate_group` for each group whose hyperparameters changed since it was
        last validated (lr is checked at every step anyway, by ``_lr_factor``): a tuple
        comparison per group instead of the checks, which add up with a group per layer."""
        keys = self.__dict__.get("_validation_keys")
        if keys is None:
            keys = self._validation_keys = ("weight_decay", *self.rule.hyperparameters,
                                            *GROUP_OPTION_KEYS)
        seen = self.__dict__.setdefault("_validated", {})
        for group in self.param_groups:
            values = tuple([group.get(k) for k in keys])
            if seen.get(id(group)) != values:
                self._validate_group(group)
                seen[id(group)] = values

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_init_step_size") and len(self.param_groups) > 1 \
                and "step" in self.param_groups[0]:
            try:
                self._init_group(self.param_groups[-1])
            except Exception:  # a refused group must not stay half set up
                self.param_groups.pop()
                raise
            self._warn_group_lrs()

    def _warn_group_lrs(self) -> None:
        """Groups given different learning rates (a faster head, layer-wise lr decay) ask for
        a ratio that torch's optimizers apply and one searched step size does not: say so once."""
        lrs = sorted(g["lr_ref"] for g in self.param_groups if g["lr_ref"] > 0)
        if self.layerwise or not lrs or lrs[-1] <= lrs[0] * (1 + 1e-6):  # (a tensor lr rounds)
            return
        self._warn_once(
            "lrs", f"the param groups have different lr ({lrs[0]:g} … {lrs[-1]:g}), but one "
            "searched step size η moves them all: each group follows its own schedule "
            "(η · lr_t / lr_0), not the ratio between the groups' lr. For a step size per group "
            "pass layerwise=True; a group at lr 0 stays frozen")

    def _warn_once(self, flag: str, message: str) -> None:
        """Warn (pointing at the caller's line) unless the warning ``flag`` was given before."""
        warned = self.__dict__.setdefault("_warned", set())
        if flag not in warned:
            warned.add(flag)
            warnings.warn(f"{type(self).__name__}: {message}", stacklevel=_outside_stacklevel())

    # -- copies and pickling -------------------------------------------------------------------
    #: what a copy or a pickle carries besides torch's (defaults, state, param_groups): the
    #: configuration. The rest is rebuilt: the flat buffers (from the state, at the next step),
    #: device handles, what a step in flight holds, and a registered closure (it evaluates the
    #: original model, not the copy: register it again). Not ``self.__dict__`` wholesale: a
    #: scheduler puts a ``step`` wrapper there that calls the original optimizer.
    _CARRIED = ("rule", "policy", "cadence", "c", "backtrack", "max_trials", "max_grad_norm",
                "check_finite", "backend", "tile", "layerwise", "block_search", "merge_below",
                "exact_revert", "candidates", "flat", "process_group", "_modules",
                "_resumed_dd", "_gathered_steps", "_init_step_size")

    def __getstate__(self) -> dict:
        """torch's optimizers pickle only (defaults, state, param_groups) and rebuild the rest
        from the class; this one also needs its configuration (direction rule, policy, cadence,
        backend, ...)."""
        if self.__dict__.get("process_group") is not None:
            raise TypeError(
                f"a {type(self).__name__} with an explicit process_group cannot be copied or "
                "pickled (a torch ProcessGroup cannot be); copy its state_dict() instead")
        self._refuse_mid_step("__getstate__() (a copy or a pickle)")
        self._settle_skip()
        out = super().__getstate__()
        out.update({k: self.__dict__[k] for k in self._CARRIED if k in self.__dict__})
        saved_dd = self._saved_dd()  # the next plain step's length cap, as state_dict() has it
        if saved_dd is not None:
            out["_resumed_dd"] = saved_dd
        # block names are keyed by the tensors' ids, which a copy changes: carry them by position
        out["_names"] = [[self._names.get(id(p)) for p in g["params"]] for g in self.param_groups]
        return out

    def __setstate__(self, state: dict) -> None:
        if "defaults" not in state:  # torch's load_state_dict: only state and param_groups
            return super().__setstate__(state)
        names = state.pop("_names", None)
        super().__setstate__(state)  # torch: the attributes, its hook dicts, the step wrapper
        for key in ("_buffers", "_buffer_key", "_closure", "_pending_rng", "_pending_loss",
                    "_pending_skip", "_skip_host", "_last_dd", "_held", "_returned"):
            setattr(self, key, None)
        self._sharded, self._constants, self.stats = False, {}, StepStats()
        self._names = {id(p): n for g, ns in zip(self.param_groups, names or [])
                       for p, n in zip(g["params"], ns) if n is not None}
        if not self._names and getattr(self, "_modules", None):
            self._names = {id(p): n for n, p in self._modules[0].named_parameters()}

    def _saved_dd(self) -> list | None:
        """The last pass's ‖d_b‖², behind the next plain step's length cap, as host floats (one
        read), per buffer in buffer order, so a resumed run or a copy caps as this one would."""
        last = self._last_dd
        if last is None:  # no pass since a load or a copy: what that carried, not yet used
            return self._resumed_dd
        return [dd.tolist() for dd in last[1]] if not self._sharded else None

    def _refuse_mid_step(self, what: str) -> None:
        """A checkpoint taken inside a step (a hook in a trial forward, a signal handler) would
        hold this step's gradient in the moments, a count that has not advanced and parameters
        at a trial point: resumed, the step would fold its gradient twice."""
        if self.__dict__.get("_moving"):
            raise RuntimeError(
                f"{type(self).__name__}.{what} was called inside step() (from a trial forward, a "
                "hook or a signal handler), where the state is mid-step: the moments hold this "
                "step's gradient and the parameters sit at a trial point. Call it before or "
                "after step() (a signal handler can set a flag that the loop checks)")

    def state_dict(self) -> dict:
        self._refuse_mid_step("state_dict()")
        self._settle_skip()  # the checkpoint must hold the count of the steps that folded
        self.param_groups[0]["last_dd"] = self._saved_dd()
        try:
            return super().state_dict()  # copies the groups' entries
        finally:
            self.param_groups[0]["last_dd"] = None  # a checkpoint's entry, not live state

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that state tensors keep their saved dtype: torch casts them to the
        parameter's dtype, which would round the fp32 moments and master weights of bf16/fp16
        parameters. A torch.optim checkpoint (AdamW, Adam, RMSprop, SGD, ...) is taken over: its
        moments and step count continue, η starts at its learning rate
        (:func:`~armijo_fused.optimizers.torch_compat.from_torch_state_dict`).

        Load pre-hooks run first, as in torch, so a hook can adapt a checkpoint before it is
        checked or converted, and what a hook returns is what loads; post-hooks run last, on
        the state as the next step will see it."""
        self._refuse_mid_step("load_state_dict()")
        state_dict = state_dict.copy()  # shallow, as torch's
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        pre, post = (self._optimizer_load_state_dict_pre_hooks,
                     self._optimizer_load_state_dict_post_hooks)
        # emptied while torch's load_state_dict runs, so that it does not run them a second time
        self._optimizer_load_state_dict_pre_hooks = type(pre)()
        self._optimizer_load_state_dict_post_hooks = type(post)()
        try:
            self._load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre
            self._optimizer_load_state_dict_post_hooks = post
        for hook in post.values():
            hook(self)

    def _load_state_dict(self, state_dict: dict) -> None:
        if is_torch_state_dict(state_dict):
            state_dict = from_torch_state_dict(type(self).__name__, self.rule, self.param_groups,
                                               state_dict, layerwise=self.layerwise)
        self._check_loadable(state_dict)
        saved = state_dict.get("state", {})
        super().load_state_dict(state_dict)
        self._pending_skip = None  # a flag of the steps before the load is no longer ours
        self._last_dd = None
        self._resumed_dd = self.param_groups[0].get("last_dd")  # taken up by _length_caps
        self.param_groups[0]["last_dd"] = None
        for g in self.param_groups:  # checkpoints from before ``folded``: no skip recorded
            g.setdefault("folded", g["step"])
            g.setdefault("collapsed", [0] * len(g["step_size"]) if isinstance(
                g["step_size"], list) else 0)  # ... or before ``collapsed``
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if self.layerwise:
            # rebuild the store at the next step: the build checks the checkpoint's blocks
            # against the model's (and sets them up for a global checkpoint, whose groups have
            # none, as for a fresh optimizer)
            self._buffers, self._blocks_loaded = None, True
        # without buffers the values wait for the next step's build: take copies, since the
        # checkpoint's tensors may be a live optimizer's, which go on changing
        copy = self._buffers is None
        for pid, p in zip(ids, params):
            for key, value in saved.get(pid, {}).items():
                if isinstance(value, Tensor) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, copy=copy)
        if self._buffers is not None:
            # copy the values into the flat buffers now: a state dict of a live optimizer holds
            # its tensors, which go on changing with its steps (torch.distributed.checkpoint's
            # get/set_optimizer_state_dict between two optimizers in one process)
            with torch.no_grad():
                self._sync_buffers()

    def _check_loadable(self, state_dict: dict) -> None:
        """A state dict of another direction (an ArmijoSGD's into an ArmijoAdam) replaced the
        groups' hyperparameters and left moments it cannot use, and the next step failed with a
        KeyError. Refuse it by name before anything changes."""
        who = f"{type(self).__name__} (direction {self.rule.name!r})"
        needed = list(self.rule.hyperparameters)
        for group in state_dict.get("param_groups", []):
            missing = [k for k in needed if k not in group]
            if missing:
                raise ValueError(
                    f"the state dict's param groups lack {', '.join(map(repr, missing))}: it was "
                    f"saved by an optimizer with another direction than this {who}")
        known = set(self.rule.state_names) | {"master"}
        for pstate in state_dict.get("state", {}).values():
            foreign = sorted(k for k, v in pstate.items() if torch.is_tensor(v) and k not in known)
            if foreign:
                raise ValueError(
                    f"the state dict holds {', '.join(map(repr, foreign))}, which this {who} "
                    f"does not keep (it keeps {', '.join(self.rule.state_names) or 'no state'}): "
                    "it was saved by an optimizer with another direction")
        # a tensor of another shape: torch would load it and fail at the next step, or midway
        # through a load into an optimizer that has stepped (half the state replaced)
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)):
            return  # torch's own check names the mismatch
        saved = state_dict.get("state", {})
        for sg, g in zip(saved_groups, self.param_groups):
            for pid, p in zip(sg["params"], g["params"]):
                for name, value in saved.get(pid, {}).items():
                    if torch.is_tensor(value) and name in known and value.shape != p.shape:
                        what = self._names.get(id(p), f"#{pid}")
                        raise ValueError(
                            f"the state dict's {name!r} of parameter {what} has shape "
                            f"{tuple(value.shape)}, the parameter has {tuple(p.shape)}: it was "
                            "saved for another model")

    # -- user-facing hooks ---------------------------------------------------------------------
    def set_closure(self, closure: Callable | None, model: torch.nn.Module | None = None) -> None:
        """Register a loss-only closure for loops that call ``step()`` bare (HF Trainer,
        torchtitan). It is called with no arguments and must return the loss on the current batch
        at the current parameters. ``model``: modules whose buffers trials must not change."""
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        self._closure = closure
        if model is not None:
            self._modules = [model]

    def provide_loss(self, loss) -> None:
        """Give the next ``step()`` the loss at the current parameters, which your loop has
        already computed (a trainer that calls ``step()`` bare after its own forward/backward):
        a search then takes it as f(θ0) instead of calling the registered closure once more.
        Used once; a later call replaces it."""
        self._pending_loss = _as_loss(loss, "loss")

    def capture_rng(self) -> None:
        """Record the RNG state before your training forward, so that trial forwards replay its
        dropout masks when you pass ``loss=`` to ``step`` (the closure form needs no call)."""
        self._pending_rng = trial_mod.capture_rng()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. They stay views of the flat gradient buffer (``flat=False``: the
        same tensors, zeroed where they are; FSDP2: dropped, FSDP writes new ones), so the next
        backward accumulates in place: ``set_to_none`` is ignored once the buffers exist."""
        if trial_mod.in_trial():
            return
        if self._buffers is None:
            return super().zero_grad(set_to_none=set_to_none)
        for buf in self._buffers:
            buf.zero_grad()

    # -- the step ------------------------------------------------------------------------------
    # Not traced when a compiled function calls it: the search reads losses on the host, so a
    # trace would break there anyway, and specialising on each step size recompiled every step
    # until dynamo's limit. The model's forward inside the closure stays compiled.
    @torch.compiler.disable
    def step(self, closure=None, *, loss_fn: Callable | None = None, loss=None):
        """One optimizer step; returns the loss at the parameters before the step (or None).

        ``step(closure)``: the closure computes the loss (and usually ``zero_grad`` + backward,
        torch style); it is called once with autograd on, then for trials without autograd or
        backward. ``step(loss_fn=fn, loss=loss)``: after your own backward; ``fn()`` returns the
        loss at the current parameters, ``loss`` the loss you already have (else ``fn`` gives
        it). ``step(closure, loss_fn=fn)``: the closure runs once for the loss and gradient
        (Lightning's training closure, which also runs hooks), ``fn`` serves the trials, so no
        trial repeats the closure's side effects. ``step()``: uses the closure registered with
        ``set_closure``.
        """
        try:
            out = self._step(closure, loss_fn, loss)
            # a closure that returned a structure (HF outputs) gets it back, as from torch
            return out if self._returned is None else self._returned
        finally:
            self._moving, self._returned = False, None
            held, self._held = self.__dict__.get("_held"), None
            if held is not None:
                held.release()  # a Ctrl-C that came while θ moved: raised now, step whole

    def _step(self, closure, loss_fn, loss):
        if closure is not None and loss_fn is not None and loss is not None:
            raise ValueError("pass loss= only without a closure: the closure computes the loss")
        for name, fn in (("closure", closure), ("loss_fn", loss_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        self._validate_changed_groups()
        self._settle_skip()
        groups = self.param_groups
        g0 = groups[0]
        k = g0["step"] + 1
        factors = [self._lr_factor(g) for g in groups]
        evaluate = loss_fn or closure or self._closure
        search = self.cadence.should_search(k, g0["next_search"])
        if evaluate is None:
            if any(f != 0.0 for f in factors):
                raise RuntimeError(
                    f"{type(self).__name__}.step() needs the loss at trial points: pass a closure "
                    "(step(closure)), a loss function (step(loss_fn=fn, loss=loss)), or register "
                    "one with set_closure(fn); HF Trainer: use armijo_fused.integrations.hf."
                    "LineSearchTrainer; Lightning: armijo_fused.integrations.lightning."
                    "ArmijoLightningMixin"
                )
            if not self.state:
                # every lr 0, no loss, no state yet: torch.distributed.checkpoint initialising
                # the state of an optimizer that has not stepped (zero gradients, lr 0, a bare
                # step()). Build the state and count nothing: a step here would add to the
                # bias-correction count, and the run would differ from one never checkpointed
                self._sync_buffers()
                return None
            search = False  # later: a step at lr 0 (the state takes the gradient, as torch's)

        # 1. The loss at θ0 and the gradient, from the training forward/backward.
        # the RNG state the training forward starts from, for the trials to replay (a search
        # only: with CUDA this reads every device's generator)
        pending = self._pending_rng  # recorded before the loop's own training forward
        replayed = closure is not None or pending is not None
        rng_before = pending or (trial_mod.capture_rng() if search else None)
        self._pending_rng = None
        f0 = loss if loss is not None or closure is not None else self._pending_loss
        self._pending_loss = None
        if closure is not None:
            scaler = _calling_grad_scaler(self)
            with torch.enable_grad():
                f0 = closure()
            if not isinstance(f0, (Tensor, numbers.Real)) and f0 is not None:
                self._returned = f0
            if scaler is not None:  # scaler.step(opt, closure): the closure's gradient is scaled
                self._unscale_gradients(scaler)
        self._count(forwards=1, backwards=1)
        if f0 is not None:
            f0 = _as_loss(f0, "the closure" if closure is not None else "loss")
        buffers = self._sync_buffers()
        if not buffers:
            self._advance(k, folded=())
            return f0
        table = self._block_table()
        etas = [self._eta(gi, lb) for gi, lb in table]
        block_factors = [factors[gi] for gi, _ in table]
        if all(f == 0.0 for f in block_factors):
            search = False  # every lr is 0 at this step (warmup from 0, frozen): nothing to test
        reduce = self._reducer()
        loss_before = f0  # what the step reports and returns: with DDP, the mean over the ranks
        given = f0 is not None
        if not search and reduce is not None:
            # the guard skips the step if f0 is not finite: on every rank or on none (a rank's
            # batch of padding only has a NaN mean loss and a zero gradient); a search reduces
            # f0 below, with its first trial's sums
            f0, loss_before = self._loss_over_ranks(f0, buffers[0].device, reduce)
        passes = _FlatPasses(self, buffers, f0, loss_follows=search)  # a search sets f0 below
        self._moving = True  # from here to the end of the step the state is mid-step
        self._held = HeldInterrupts.begin()  # ... so Ctrl-C waits for its end (interrupts.py)

        if not search:
            etas = self._cap_for_weight_decay(etas)  # as every trial is (η̄ may start above it)
            try:
                with torch.no_grad():
                    caps = self._length_caps(table, buffers)
                    sums = passes.first([e * f for e, f in zip(etas, block_factors)], caps=caps,
                                        factors=block_factors)
            except BaseException:  # a pass raised, or an interrupt came between two launches
                with torch.no_grad():
                    passes.rollback()
                raise
            finally:
                self._reshard_fsdp()
            self._last_dd = (buffers, [s[:, 2] for s in sums])
            self._advance_unsettled(k, passes)

            # telemetry: device values, formed only when read (each op is a launch on a GPU)
            def applied(scaled: bool):
                moved = (~passes.skipped()).float()  # a skipped step moved nothing
                per_block = etas if caps is None else [  # the η each block applied
                    c.clamp(max=e) for c, e in zip((c for cap in caps for c in cap), etas)]
                return self._report([moved * (e * f if scaled else e)
                                     for e, f in zip(per_block, block_factors)])

            self.stats = StepStats(
                step=k, searched=False, step_size=lambda: applied(False),
                applied_step=lambda: applied(True), lr_factor=factors[0], trials=0,
                loss_before=loss_before if loss_before is not None else math.nan,
                loss_after=math.nan,
                gd=lambda: _total([s[:, 0].sum() for s in sums]), grad_norm=passes.grad_norm,
                non_descent=False, unresolved=False, exhausted=False, collapsed=False,
                skipped=passes.skipped, searched_blocks=[],
                forwards=g0["forwards"], backwards=g0["backwards"],
            )
            return loss_before if given else None

        # 2. The search, on trial forwards that leave no trace.
        self._check_model_still_holds_params()
        models = self._modules or self._models_for_trials(evaluate)
        if not replayed:
            self._check_dropout_replayed(models)
        env = trial_mod.TrialEnv(models, rng_before, () if models else self._owned_buffers())
        what = "loss_fn" if loss_fn is not None else "the closure"

        def trial_loss() -> Tensor:
            self._reshard_fsdp()  # FSDP2: the forward must all-gather the moved shards
            with env.trial():
                try:
                    out = evaluate()
                except RuntimeError as e:
                    if "does not require grad" not in str(e):
                        raise
                    raise RuntimeError(
                        f"{what} failed under no_grad (at a trial point, or at θ0 when no "
                        f"loss was given): {e}. Trial forwards run under "
                        "torch.no_grad() (a loss is all they need). A loss that itself takes "
                        "derivatives (a gradient penalty, PINN residuals, torch.autograd.grad "
                        "inside the loss) must open its own graph: wrap that part in "
                        "torch.enable_grad(). A closure that computes the gradient itself "
                        "(torch.autograd.grad, then p.grad = ...) needs a loss-only function "
                        "for the trials: step(closure, loss_fn=fn). The step has been undone"
                        ) from e
            self._count(forwards=1)
            return _as_loss(out, what)

        def trial_losses(etas, precond) -> Tensor:  # batched candidates: one forward for all
            params, stacked = passes.trial_points(etas, precond)
            names = [self._names[id(p)] for p in params]
            with env.trial():
                out = stacked_loss(self._modules[0], evaluate, names)(stacked)
            self._count(forwards=1)
            return out.detach()

        # a group whose lr is 0 at this step (frozen, warmup from 0) stays at θ0 in every trial
        # and out of the test: its η is 0 in the passes, so its θ is not touched at all
        frozen = [f == 0.0 for f in block_factors]
        if self.candidates is not None and not any(frozen):
            check_batchable(self._modules[0])
        plan = self._search_plan(table, frozen)
        snapshot = passes.snapshot() if self.exact_revert else None
        try:
            with torch.no_grad():
                failure = f0_failure = None
                if f0 is None:
                    f0, failure = evaluate_on_every_rank(trial_loss, reduce, buffers[0].device)
                resolution = loss_resolution(f0)  # of the loss's own dtype, before the mean
                if reduce is not None:  # the loss of the global batch, identical on every rank
                    # with a flag: a rank whose loss function raised takes part all the same;
                    # the flag is read with the first trial (no read of its own)
                    value = f0.double().reshape(1).to(buffers[0].device)
                    f0, flag = reduce_with_flag(reduce, value, failure)
                    f0, f0_failure = f0.reshape(()), (failure, flag)
                passes.set_loss(f0)
                if g0["searches"] == 0:  # one read of f0 (and of the ranks' flag: this read
                    # comes first, so it carries it and the search need not)
                    (f0_value,) = read_checking_ranks([f0.reshape(1)], False, None, f0_failure)
                    f0_failure = None
                    if not math.isfinite(f0_value):
                        ranks = ("" if reduce is None else " (the mean over the ranks: some "
                                 "rank's loss is not finite)")
                        raise ValueError(
                            f"the loss at the first step is not finite ({f0_value}){ranks}; "
                            "check the model, the data and the loss function before optimizing"
                        )
                result, accepted = self._run_search(passes, trial_loss, f0, etas, plan, reduce,
                                                    trial_losses, frozen, resolution, f0_failure)
                if accepted is None and snapshot is not None and not result.skipped:
                    passes.restore_params(snapshot)  # bitwise θ0; the state keeps g
                # 3. The applied step: the search's η times the scheduler's lr_t / lr_0.
                if accepted is not None:
                    final = [a * f for a, f in zip(accepted, block_factors)]
                    if final != passes.eta:
                        passes.move_to(final)
        except BaseException:
            # Nothing half-done survives: θ back to θ0 and the state to before the first pass
            # (bitwise from the snapshot with exact_revert, else by inverting the update).
            with torch.no_grad():
                if snapshot is not None:
                    passes.restore(snapshot)
                else:
                    passes.rollback()
            raise
        finally:
            env.close()
            self._reshard_fsdp()  # the next training forward gathers the final weights

        # 4. Bookkeeping: step sizes, cadence, counters, telemetry.
        skipped = result.skipped or not math.isfinite(result.loss_before)
        accepted = self._fill_frozen(accepted, etas, frozen)
        settled, collapsed = self._update_step_sizes(table, etas, plan, result, accepted,
                                                     skipped, k, frozen)
        if passes._first_sums is not None:
            self._last_dd = (buffers, [s[:, 2] for s in passes._first_sums])
        if accepted is not None and not skipped and result.block_dd:
            self._record_step_length(table, result.block_dd)
        exhausted = accepted is None and not (skipped or result.unresolved)
        if result.grad_sq == 0.0 and not skipped:
            self._warn_zero_gradient(k)
        self._note_unchanged_trials(result)
        # after a collapse η is reset to η̄, which this search has just rejected: like an
        # exhausted search, the next step must test it rather than apply it blindly
        next_search, interval = self.cadence.after_search(k, g0["search_interval"], settled,
                                                          exhausted or collapsed)
        if self.layerwise and self.block_search == "round_robin":
            self._advance_cursor()
        for g in groups:
            g.update(next_search=next_search, search_interval=interval,
                     searches=g["searches"] + 1)
        self._advance(k, folded=() if skipped else passes.groups)
        taken = accepted if accepted is not None else [0.0] * len(table)
        self.stats = StepStats(
            step=k, searched=True, step_size=self._report(taken),
            applied_step=self._report([a * f for a, f in zip(taken, block_factors)]),
            lr_factor=factors[0], trials=result.trials, loss_before=result.loss_before,
            loss_after=result.loss_after, gd=result.gd,
            grad_norm=math.sqrt(result.grad_sq) if result.grad_sq >= 0 else math.nan,
            non_descent=result.non_descent, unresolved=result.unresolved,
            exhausted=exhausted,
            collapsed=collapsed, skipped=skipped, searched_blocks=sorted(set().union(*plan)),
            next_step_size=self._report([self._eta(gi, lb) for gi, lb in table]),
            forwards=g0["forwards"], backwards=g0["backwards"],
        )
        return f0

    def _check_dropout_replayed(self, models) -> None:
        """The loop ran its own training forward (``loss=``, ``provide_loss``, a registered
        closure) without ``capture_rng()`` before it: the trials cannot replay its dropout masks,
        and the Armijo test compares losses under different masks (noise of the order of the
        decrease it tests). Looked for once, at the first such search."""
        if self.__dict__.get("_dropout_checked"):
            return
        self._dropout_checked = True
        active = [type(m).__name__ for model in models for m in model.modules()
                  if isinstance(m, _DROPOUT) and m.training and m.p > 0]
        if active:
            self._warn_once("capture_rng", (
                f"the model has active dropout ({active[0]}) but the trials cannot replay the "
                "training forward's masks: call opt.capture_rng() before the training forward "
                "when you pass loss=, provide_loss() or step() with a registered closure (the "
                "closure form, step(closure), needs nothing)"))

    def _note_unchanged_trials(self, result) -> None:
        """Trial losses equal to f0 to the last bit, though a decrease was predicted, mean the
        trial forwards did not see the moved weights. Now and then that is a step below a bf16
        model's rounding; search after search it is the loop: say so, once."""
        n = self.__dict__.get("_unchanged_searches", 0) + 1 if result.unchanged else 0
        self._unchanged_searches = n
        if n == 3:
            self._warn_once("unchanged", (
                f"the trial forwards of {n} searches in a row returned exactly the loss at θ0 "
                f"(last {result.loss_before:.6g}) although a decrease was predicted, so no step "
                "was taken: they do not see the moved parameters. Is the loss computed from a "
                "copy of the model, cached outputs, or weights cast once outside the loss "
                "function? (A cast cached by torch.autocast is cleared before each trial.)"))

    # -- the search plan and the step-size bookkeeping -----------------------------------------
    def _search_plan(self, table, frozen) -> list[list[int]]:
        """Which blocks backtrack, as a list of searches run one after the other.

        Global: one search over all blocks (they share η). Layer-wise ``round_robin`` / ``stale``:
        one block (with the blocks merged into it) per search step, tested with the combined
        Armijo condition, so it costs what a global search costs. ``exact``: every block in turn,
        the others frozen at θ0. ``frozen`` blocks (lr 0 now) are in no search; the caller makes
        sure some block is not frozen.
        """
        if not self.layerwise:
            return [[b for b in range(len(table)) if not frozen[b]]]
        every = self._merged_blocks(table)
        members = [m for m in every if not frozen[m[0]]]
        if self.block_search == "exact":
            return members
        g0 = self.param_groups[0]
        if self.block_search == "round_robin":  # the cursor moves once the search completes
            n, at = len(every), g0.get("block_cursor", 0)
            pos = next(i % n for i in range(at, at + n) if not frozen[every[i % n][0]])
            chosen, self._cursor_next = every[pos], (pos + 1) % n
        else:  # most stale: the block searched longest ago
            def last(m):
                gi, lb = table[m[0]]
                return self.param_groups[gi]["block_searched_at"][lb]
            chosen = min(members, key=last)
        return [chosen]

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
                    frozen=None, resolution=None, f0_failure=None):
        kw = dict(c=self.c, backtrack=self.backtrack, max_trials=self.max_trials,
                  guard=passes.guard(), reduce=reduce, f0_failure=f0_failure,
                  resolution=loss_resolution(f0) if resolution is None else resolution)
        frozen = frozen or [False] * len(etas)
        if len(plan) == 1:  # global, or one block with the combined test
            eta0 = [self.policy.first_trial(e) if b in plan[0] else 0.0 if frozen[b] else e
                    for b, e in enumerate(etas)]
            eta0 = self._cap_for_weight_decay(eta0)
            if self.candidates is not None and not any(frozen):  # (candidates share one η)
                result = batched_armijo_search(passes, trial_losses, f0, eta0[0],
                                               candidates=self.candidates, **kw)
                return result, result.accepted
            partial = self.layerwise or any(frozen)
            result = armijo_search(passes, trial_loss, f0, eta0,
                                   search=plan[0] if partial else None, **kw)
            return result, result.accepted
        # exact: each block alone, the others at θ0, from one first pass
        n = len(etas)
        sums = passes.first([0.0] * n)
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
        merged = results[0][1]
        merged.trials = sum(r.trials for _, r in results)
        merged.unresolved = all(r.unresolved for _, r in results)
        merged.unchanged = all(r.unchanged for _, r in results)
        merged.non_descent = False
        merged.exact = [(m, r.accepted) for m, r in results]
        return merged, accepted

    def _fill_frozen(self, accepted, etas, frozen):
        """The accepted step sizes with the frozen blocks' (0 in the passes) filled in, so the
        bookkeeping sees no collapse there: the shared η (global) or the block's own η."""
        if accepted is None or not any(frozen):
            return accepted
        shared = next(a for a, f in zip(accepted, frozen) if not f)
        keep = etas if self.layerwise else [shared] * len(etas)
        return [k if f else a for a, k, f in zip(accepted, keep, frozen)]

    def _cap_for_weight_decay(self, eta):
        # keep 1 - η·wd away from 0: θ0 is recovered by dividing by it
        wds = [g["weight_decay"] for g in self.param_groups if g["weight_decay"] > 0]
        return [min(e, 0.5 / max(wds)) for e in eta] if wds else eta

    def _update_step_sizes(self, table, etas, plan, result, accepted, skipped, k, frozen):
        """Policy update per searched block; returns (settled, collapsed) for the cadence.
        ``frozen`` blocks (lr 0 at this step) were not searched and keep their η."""
        exact = getattr(result, "exact", None)
        if result.unresolved and result.unchanged and exact is None:
            # the trial's loss was f0 to the last bit: its step was invisible to the forward (a
            # bf16 model's rounding) or landed on f0's level set by symmetry; either way keeping
            # η would repeat the same trial forever: the next search starts one growth further
            tried = result.history[-1][0]
            for b, (gi, lb) in enumerate(table):
                if b in plan[0] and not frozen[b] and tried[b] > etas[b]:
                    self._set_eta(gi, lb, tried[b])
        if skipped or result.unresolved:
            return result.unresolved, False
        outcomes = exact if exact is not None else [(plan[0], accepted)]
        settled_all, collapsed_any = True, False
        new = list(etas)
        found = {}  # block -> the step size its search accepted this step
        for members, acc in outcomes:
            gi, lb = table[members[0]]
            avg = self._eta(gi, lb, key="step_size_avg")
            a = acc[members[0]] if acc is not None else None
            if a is not None:
                found.update({b: a for b in members})
            untested = (self.param_groups[gi]["block_searched_at"][lb] == 0 if self.layerwise
                        else self.param_groups[gi]["searches"] == 0)  # η̄ is still the start
            again = bool(self._eta(gi, lb, key="collapsed"))  # its last search collapsed too
            eta, new_avg, collapsed = self.policy.after_search(avg, a, untested=untested,
                                                               again=again)
            settled_all &= self.cadence.settled(a, avg) and not collapsed
            collapsed_any |= collapsed
            for b in members:
                new[b] = eta
                self._set_eta(*table[b], new_avg, key="step_size_avg")
                self._set_eta(*table[b], int(collapsed), key="collapsed")
                if self.layerwise:
                    g, lb_b = self.param_groups[table[b][0]], table[b][1]
                    g["block_searched_at"][lb_b] = k
        if exact is None and accepted is not None:
            # blocks held fixed but shrunk in the joint phase keep the step that passed the test
            searched = set(plan[0])
            for b, a in enumerate(accepted):
                if b not in searched and not frozen[b] and a != etas[b]:
                    new[b] = a
        for b, (gi, lb) in enumerate(table):
            if not frozen[b]:  # (global: any block sets the shared η)
                self._set_eta(gi, lb, new[b])
        if self.layerwise and self.merge_below is not None:
            small = {table[b]: a for b, a in found.items() if 0.0 < a < self.merge_below}
            self._merge_collapsed(small)
        return settled_all, collapsed_any

    def _merge_collapsed(self, small):
        """Merge each block whose search just accepted an η below ``merge_below`` into its
        neighbour in the same group (the previous block, else the next): from then on they share
        one step size. A block that has already absorbed another is not merged again, so one
        stiff block cannot drag the whole group into a chain of merges. ``small`` maps
        (group index, block index) to the step size just accepted."""
        for gi, g in enumerate(self.param_groups):
            owner = g["block_owner"]
            for lb in range(len(owner)):
                if owner[lb] != lb or (gi, lb) not in small or owner.count(lb) > 1:
                    continue
                others = [o for o in range(len(owner)) if owner[o] == o and o != lb]
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
        if self.layerwise:
            for (gi, lb), dd in zip(table, block_dd):
                self._set_eta(gi, lb, self._eta(gi, lb) * math.sqrt(max(dd, 0.0)),
                              key="step_length")
        else:
            gi, lb = table[0]
            self._set_eta(gi, lb, self._eta(gi, lb) * math.sqrt(max(sum(block_dd), 0.0)),
                          key="step_length")

    def _length_caps(self, table, buffers) -> list[Tensor] | None:
        """Per buffer, the largest η each block may apply on a step without a search.

        The search tested its η on the direction d of that step. Between searches momentum keeps
        growing d (d ≈ g when the buffer is young, up to g/(1-μ) once it has built up), so the
        same η moves ever further than what was tested, and SGD with (Nesterov) momentum
        diverged on noisy problems between searches. So a step without a search moves at most
        STEP_LENGTH_RATIO times η·‖d_search‖ (``step_length``): η ≤ ratio·length/‖d‖, with ‖d‖
        from the previous step's first pass, on the device (no sync). The cap binds only when
        ‖d‖ has grown past the ratio since the search; Adam's ‖d‖ hardly changes. None: no cap
        (no search yet, buffers rebuilt since, or FSDP2 shards, whose local sums differ between
        ranks)."""
        saved, self._resumed_dd = self._resumed_dd, None
        if self._last_dd is None and saved:  # just resumed
            if len(saved) == len(buffers) and all(
                    len(v) == b.layout.nblocks for v, b in zip(saved, buffers)):
                self._last_dd = (buffers, [device_floats(v, b.device)
                                           for v, b in zip(saved, buffers)])
        last = self._last_dd
        if last is None or last[0] is not buffers or self._sharded:
            return None
        lengths = [self._eta(gi, lb, key="step_length") for gi, lb in table]
        if not any(x > 0 for x in lengths):
            return None
        ref = [x if x > 0 else math.inf for x in lengths]
        if not self.layerwise:  # one length for the whole step: ‖d‖ over every block
            dev0 = buffers[0].device
            inv_norm = _total([_scalar_sum(dd).to(dev0) for dd in last[1]]).rsqrt()
            cap = torch.nan_to_num(inv_norm * (STEP_LENGTH_RATIO * ref[0]), nan=math.inf)
            return [cap.to(b.device).expand(b.layout.nblocks) for b in buffers]
        caps, pos = [], 0
        for b, dd in zip(buffers, last[1]):
            n = b.layout.nblocks
            r = device_floats(ref[pos : pos + n], dd.device)
            caps.append(torch.nan_to_num(dd.rsqrt() * (STEP_LENGTH_RATIO * r), nan=math.inf))
            pos += n
        return caps

    def _report(self, values):
        return list(values) if self.layerwise else values[0]

    # -- helpers -------------------------------------------------------------------------------
    def _ones2(self, device) -> Tensor:
        """A constant [1, 1] on ``device`` (the guard of a step that needs none), made once."""
        constants = self.__dict__.setdefault("_constants", {})  # (also when unpickled)
        ones = constants.get(device)
        if ones is None:
            ones = constants[device] = torch.ones(2, dtype=torch.float32, device=device)
        return ones

    def _eta(self, gi, lb, key="step_size"):
        v = self.param_groups[gi][key]
        return v[lb] if isinstance(v, list) else v

    def _set_eta(self, gi, lb, value, key="step_size"):
        if self.layerwise:
            self.param_groups[gi][key][lb] = value
        else:
            for g in self.param_groups:  # global: every group shares η
                g[key] = value

    def _block_table(self):
        """(group index, block index within the group) of every block, in buffer order."""
        table = []
        for b in self._buffers:
            for local in range(b.layout.nblocks):
                table.append((b.group_index, b.group_blocks[local]))
        return table

    def _reducer(self):
        """All-reduce (mean over ranks) of the search's scalars, or None on a single process.

        With DDP every rank holds the same averaged gradient and state, so the per-block sums
        agree already; the trial losses differ (each rank sees its own micro-batch) and their mean
        is the loss of the global batch. One collective per trial carries all of them, and a NaN
        on any rank becomes a NaN everywhere, so every rank takes the same decision.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return None
        world = dist.get_world_size(self.process_group)
        if world == 1:
            return None
        group = self.process_group

        def mean_over_ranks(t: Tensor) -> Tensor:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            return t / world

        return mean_over_ranks

    @staticmethod
    def _loss_over_ranks(f0, device, reduce):
        """(probe, mean) of the losses the ranks hold at a step without a search: the probe,
        for the skip guard, is finite iff every rank's loss is (0 for a rank without one); the
        mean, for the telemetry, is over the ranks that have one. Every rank takes part, with a
        loss or without: a collective on some ranks only would pair with the next one."""
        mine = torch.zeros(2, dtype=torch.float64, device=device)
        if f0 is not None:
            mine = torch.stack([to_device(f0.double().reshape(()), device), mine[1] + 1])
        total = reduce(mine)  # (the mean over ranks: the scale cancels in the ratio)
        return total[0], total[0] / total[1]

    def _warn_zero_gradient(self, k: int) -> None:
        """A search whose gradient is zero everywhere takes no step: most often the closure
        never called ``backward()`` (or zeroed the gradient after it). Say so, once."""
        self._warn_once(
            "zero_grad", f"the gradient is zero everywhere at step {k}, so the search takes no "
            "step. At an exact minimum that is right; otherwise, does the closure call "
            "loss.backward() (after zero_grad, not before), or, with step(loss_fn=..., "
            "loss=...), did backward run before step?")

    @torch.no_grad()
    def _unscale_gradients(self, scaler) -> None:
        """Divide the gradients the closure just computed by the scale its ``scaler.scale(loss)``
        applied (as ``GradScaler.unscale_`` does; a non-finite result is the guard's to skip)."""
        scale = getattr(scaler, "_scale", None)
        if scale is None:  # (torch keeps the scale there; else ask, which syncs)
            scale = torch.tensor(scaler.get_scale())
        inv = scale.double().reciprocal().float()
        by_device: dict = {}
        for _, p in self._trainable():
            if p.grad is not None:
                by_device.setdefault(p.grad.device, []).append(p.grad)
        for device, grads in by_device.items():
            torch._foreach_mul_(grads, inv.to(device))

    def _lr_factor(self, group) -> float:
        """lr_t / lr_0: the scheduler's multiplier of the applied step (docs/design.md §2.6), at
        most 1: a longer step than the search accepted is one the Armijo test never saw."""
        lr_t = _lr_value(group["lr"])
        lr_0 = _lr_value(lr_peak(group))
        if lr_0 == 0.0:
            return 0.0 if lr_t == 0.0 else 1.0
        factor = lr_t / lr_0
        if factor > 1.0 + 1e-6:  # (a schedule's own rounding: LinearLR ends at 1 + 2e-16)
            self._warn_lr_above_peak(lr_t, lr_0)
            return 1.0
        return factor

    def _warn_lr_above_peak(self, lr_t: float, lr_0: float) -> None:
        self._warn_once(
            "lr_peak", f"lr rose to {lr_t:g}, above lr_0 = {lr_0:g} (the group's 'max_lr', "
            "else 'initial_lr', else the lr given at construction). The applied step is "
            "η · lr_t / lr_0 with η the searched step size; a multiplier above 1 would apply "
            "steps longer than the search accepted, so it is capped at 1 and the schedule acts "
            "only where it lowers lr below lr_0. Give the schedule's peak as the optimizer's lr "
            "(a warmup then starts below it), or use OneCycleLR, which records its max_lr")

    def _count(self, forwards=0, backwards=0):
        for g in self.param_groups:
            g["forwards"] += forwards
            g["backwards"] += backwards

    def _advance(self, k, folded):
        """Count the step; ``folded``: the indices of the groups whose state took its gradient."""
        for g in self.param_groups:
            g["step"] = k
        for gi in folded:
            self.param_groups[gi]["folded"] += 1

    def _advance_unsettled(self, k, passes) -> None:
        """A step without a search, whose skip flag lives on the device. On a CPU it is read now
        (free); on a GPU the step counts as folded and the flag is copied to pinned memory
        without a sync, then read when the next step (or state_dict) needs the count: by then
        the GPU is long past it, and the skip is taken back."""
        if not passes.can_skip:
            return self._advance(k, folded=passes.groups)
        flag = passes.skipped()
        if flag.device.type != "cuda":  # CPU: free; other accelerators: one read
            return self._advance(k, folded=() if bool(flag) else passes.groups)
        if self._skip_host is None:  # one pinned flag and event, reused: settled before reuse
            self._skip_host = (torch.empty((), dtype=torch.bool, pin_memory=True),
                               torch.cuda.Event())
        host, event = self._skip_host
        host.copy_(flag, non_blocking=True)
        event.record(torch.cuda.current_stream(flag.device))
        self._pending_skip = (host, event, passes.groups)
        self._advance(k, folded=passes.groups)

    def _settle_skip(self) -> None:
        """Take back the fold count of a GPU step without a search that turned out skipped."""
        pending, self._pending_skip = self._pending_skip, None
        if pending is None:
            return
        host, event, groups = pending
        event.synchronize()
        if bool(host):
            for gi in groups:
                self.param_groups[gi]["folded"] -= 1

    def _trainable(self):
        for gi, group in enumerate(self.param_groups):
            seen = set()  # a tensor listed twice (tied weights gathered twice; torch warns) is
            for p in group["params"]:  # one parameter: one view, counted once in <g, d>
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    yield gi, p

    def _group_blocks(self, gi, params) -> list[int]:
        """Block index (within group gi) of each parameter; sets up the group's block state."""
        group = self.param_groups[gi]
        if not self.layerwise:
            return [0] * len(params)
        if len(self.param_groups) > 1 or not self._names:
            names = [group.get("block", f"group.{gi}")]
            ids = [0] * len(params)
        else:
            from ..blocks import block_name

            names, ids = [], []
            for p in params:
                name = block_name(self._names.get(id(p), "unnamed"))
                if name not in names:
                    names.append(name)
                ids.append(names.index(name))
        if group.get("block_names") != names:
            if group.get("block_names") is not None and self.__dict__.get("_blocks_loaded"):
                self._warn_once("blocks_renamed", (
                    f"the checkpoint's blocks {group['block_names'][:4]} are not this model's "
                    f"{names[:4]}: every block's step size restarts (from "
                    f"{self._init_step_size:g}). Block names are read past wrapper prefixes "
                    "(module., _orig_mod.); a checkpoint of a wrapped model saved before that "
                    "was so names its blocks after the wrapper, or it is another model's"))
            eta = group["step_size"] if not isinstance(group["step_size"], list) \
                else self._init_step_size
            avg = group["step_size_avg"] if not isinstance(group["step_size_avg"], list) \
                else self._init_step_size
            group.update(block_names=names, step_size=[eta] * len(names),
                         step_size_avg=[avg] * len(names), step_length=[0.0] * len(names),
                         collapsed=[0] * len(names),
                         block_owner=list(range(len(names))),
                         block_searched_at=[0] * len(names))
        return ids

    def _sync_buffers(self) -> list[FlatBuffer]:
        """The flat buffers, re-validated against ``param_groups`` (rebuilt if anything moved)."""
        # which tensors train, group by group (list comprehensions: this runs every step)
        key = tuple([(len(g["params"]), *[id(p) if p.requires_grad else 0 for p in g["params"]])
                     for g in self.param_groups])
        if self._buffers is not None and key == self._buffer_key:
            if all(b.sync(self.state) for b in self._buffers):
                if any(b.fresh for b in self._buffers):
                    self._restart_fresh_tensors()
                self._warn_gathered_grads()
                return self._buffers
        # a sync that stopped at a moved tensor may have restarted deleted state before it
        restarted = {id(b.params[i]) for b in self._buffers or () for i in b.take_fresh()}
        self._restart_or_warn_stateless(restarted)
        by_slot: dict = {}
        for gi, p in self._trainable():
            by_slot.setdefault((gi, p.device, p.dtype, is_dtensor(p)), []).append(p)
        if self.layerwise and len({gi for gi, _, _, _ in by_slot}) != len(by_slot):
            raise ValueError("layerwise=True needs each param group on one device and dtype")
        buffers = []
        for (gi, _, _, dtensor), plist in by_slot.items():
            ids = self._group_blocks(gi, plist)
            order = sorted(range(len(plist)), key=lambda i: ids[i])  # params ordered by block
            used = sorted(set(ids))  # buffer-local block index -> group block index
            local = [used.index(ids[i]) for i in order]
            if dtensor:  # FSDP2 shards: FSDP owns their storage, so work on copies of them
                buf = ShardedBuffer(gi, [plist[i] for i in order], self.rule, self.state,
                                    block_ids=local, tile=self.tile,
                                    process_group=self.process_group)
            elif not self.flat:  # the tensors stay where they are (storage/in_place.py)
                buf = InPlaceBuffer(gi, [plist[i] for i in order], self.rule, self.state,
                                    block_ids=local, tile=self.tile)
            else:
                buf = FlatBuffer(gi, [plist[i] for i in order], self.rule, self.state,
                                 block_ids=local, tile=self.tile)
            buf.group_blocks = used
            # the passes work on buf.param: the fp32 master for a bf16/fp16 model
            buf.backend = resolve_backend(self.backend, buf.device,
                                          torch.float32 if getattr(buf, "master", False)
                                          else buf.dtype)
            buffers.append(buf)
        self._buffers, self._buffer_key = buffers, key
        self._blocks_loaded = False
        for buf in buffers:  # a bf16 checkpoint's master, loaded for what is now fp32: θ is
            if not getattr(buf, "master", False):  # its own master; a stale one would come
                for p in buf.params:  # back at the next bf16 load over what trained since
                    self.state[p].pop("master", None)
        self._sharded = any(getattr(b, "distributed", False) for b in buffers)
        if self._sharded:
            if self.candidates is not None:  # trial weights swapped in would not be shards
                raise ValueError("candidates= does not support FSDP2 (DTensor) parameters: "
                                 "use the sequential search (candidates=None)")
            if not self._modules:
                raise ValueError(
                    "DTensor (FSDP2) parameters need the model: pass model= to the optimizer or "
                    "to set_closure(fn, model=...), so that every FSDP module is resharded "
                    "between trial forwards and they see the moved weights"
                )
        return buffers

    def _check_model_still_holds_params(self) -> None:
        """With ``model=``: a parameter the model held and holds no more was replaced
        (``module.weight = nn.Parameter(...)``, ``load_state_dict(..., assign=True)``). The
        optimizer would go on training the old tensor while the model's own never moves, and
        every search would see no effect of its steps: say so, once. (Parameters the model never
        held, such as a free-standing temperature, are not its business.)"""
        if not self._modules or "replaced" in self.__dict__.get("_warned", ()):
            return
        held = {id(p) for m in self._modules for p in m.parameters()}
        ours = [p for g in self.param_groups for p in g["params"]]
        if getattr(self, "_in_model", None) is None:
            self._in_model = {id(p) for p in ours if id(p) in held}
            return
        gone = [p for p in ours if id(p) in self._in_model and id(p) not in held]
        if gone:
            names = [self._names.get(id(p), f"of shape {tuple(p.shape)}") for p in gone[:3]]
            self._warn_once(
                "replaced", f"the model no longer holds {len(gone)} of the optimized "
                f"parameters ({', '.join(names)}{', ...' if len(gone) > 3 else ''}): replaced "
                "by new tensors (module.weight = nn.Parameter(...), load_state_dict(..., "
                "assign=True))? The optimizer still trains the old ones. Copy new values in "
                "place (load_state_dict without assign), or build the optimizer again")

    def _models_for_trials(self, evaluate) -> list:
        """Without a registered model: the models the loss function reaches, if they hold all
        the parameters (found once; the closure is usually a new object every step). Else the
        parameters' own modules are found by ``_owned_buffers``."""
        key = self._buffer_key  # which tensors train: formed by this step's _sync_buffers
        if getattr(self, "_reached", (None, None))[0] != key:
            self._reached = (key, trial_mod.models_in_reach(
                evaluate, [p for g in self.param_groups for p in g["params"]]))
        return self._reached[1] or []

    def _owned_buffers(self) -> list:
        """Without a model registered or in the loss function's reach: the buffers of the
        modules that hold the parameters (BatchNorm statistics), found once and again after the
        parameters change (a heap scan: see trial.owned_buffers)."""
        key = self._buffer_key
        if getattr(self, "_owned", (None, None))[0] != key:
            self._owned = (key, trial_mod.owned_buffers(
                p for g in self.param_groups for p in g["params"]))
        return self._owned[1]

    def _warn_gathered_grads(self) -> None:
        """Gradients that arrived as new tensors (``model.zero_grad()`` sets them to None, then
        backward allocates new ones) are copied into the flat buffer: correct, but one more pass
        over the gradients, and their memory twice until the copy. Once can be normal (the
        first step after the store is built can see it); at a second step it is the loop's
        habit (or DDP's ``gradient_as_bucket_view``, which re-points them at every backward):
        say so, once."""
        gathered = [b for b in self._buffers if getattr(b, "gathered", False)]
        if not gathered:
            return
        for b in gathered:
            b.gathered = False
        seen = self.__dict__.get("_gathered_steps", 0) + 1
        self._gathered_steps = seen
        if seen != 2:
            return
        warnings.warn(
            f"{type(self).__name__}: the gradients arrived as new tensors again (zero_grad with "
            "set_to_none on the model, DDP with gradient_as_bucket_view=True, or .grad "
            "assigned), so every step copies them into the optimizer's flat gradient buffer: "
            "one extra pass over the gradients, and their memory twice. Zero them with the "
            "optimizer's zero_grad() (in place: the backward accumulates into its buffer), and "
            "leave DDP's gradient_as_bucket_view off.", stacklevel=_outside_stacklevel())

    def _restart_or_warn_stateless(self, restarted: set = frozenset()) -> None:
        """Before the buffers are built: tensors without state inside a group that has already
        folded gradients (see :meth:`_restart_or_warn`). ``restarted``: ids of tensors a sync of
        the old buffers has already restarted (deleted state met on the way to the rebuild)."""
        if not self.rule.bias_corrected:
            return
        first = self.rule.state_names[0]
        missing = [(gi, p) for gi, p in self._trainable()
                   if self.param_groups[gi]["folded"] > 0
                   and (id(p) in restarted or first not in self.state.get(p, {}))]
        if missing:
            self._restart_or_warn(missing)

    def _restart_fresh_tensors(self) -> None:
        """After a sync that found deleted state (``opt.state.clear()``, ``del opt.state[p]``, a
        state dict without it): the storage restarted those tensors' moments at zero."""
        fresh = [(b.group_index, b.params[i]) for b in self._buffers
                 for i in sorted(b.take_fresh())]
        if self.rule.bias_corrected:
            self._restart_or_warn([(gi, p) for gi, p in fresh
                                   if self.param_groups[gi]["folded"] > 0])

    def _restart_or_warn(self, missing) -> None:
        """Tensors whose moments start at zero inside a group that has folded gradients. Bias
        corrections are counted per group: a group whose every tensor starts afresh restarts its
        count (as torch's per-tensor ``step`` does when the state is cleared); where only some
        do (unfrozen inside the group, or their state deleted alone), their first directions
        would be mis-corrected: say so, and how to avoid it."""
        gone = {id(p) for _, p in missing}
        groups = {gi for gi, _ in missing}
        first = self.rule.state_names[0]
        partial = []
        for gi in sorted(groups):
            # every member, frozen ones too: a frozen tensor's moments still count the group's
            # steps (freezing one tensor and unfreezing another is not a reset)
            if all(id(p) in gone or first not in self.state.get(p, {})
                   for p in self.param_groups[gi]["params"]):
                self.param_groups[gi]["folded"] = 0
            else:
                partial += [(g, p) for g, p in missing if g == gi]
        if not partial:
            return
        names = [self._names.get(id(p), f"a tensor of shape {tuple(p.shape)}") for _, p in partial]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        folded = self.param_groups[partial[0][0]]["folded"]
        warnings.warn(
            f"{len(partial)} parameter(s) start with zero moments inside a param group that has "
            f"already taken {folded} step(s) ({shown}): they became trainable, or their state "
            "was deleted. They share the group's bias correction, so their first directions are "
            "mis-corrected (up to ~3x Adam's). Unfreeze by adding them as a new group "
            "(optimizer.add_param_group) instead of switching requires_grad on inside an "
            "existing one; reset the state of a whole group, or of the whole optimizer "
            "(opt.state.clear()), rather than of single tensors.",
            stacklevel=_outside_stacklevel())

    def _reshard_fsdp(self) -> None:
        """Reshard every FSDP2 module of the model (a no-op where already sharded).

        FSDP2 keeps a module's parameters unsharded after a forward that no backward follows
        (always the root's, by default): a later forward would then reuse the gathered copy of
        the weights from before the optimizer moved the shards. Resharding before each trial
        forward and after the step makes the next forward all-gather the moved shards.
        """
        if getattr(self, "_sharded", False):
            for m in fsdp_modules(self._modules):
                m.reshard()


def _table(buf):
    """The tile table of a sharded buffer that works on the shards in place (else None)."""
    return getattr(buf, "table", None)


def _flat_param(buf) -> Tensor | None:
    # in place, the passes find θ through the table: no flat buffer to pass (or gather)
    return None if _table(buf) is not None else buf.param


def _flat_grad(buf) -> Tensor | None:
    return None if _table(buf) is not None else buf.grad


def _model_copy(buf) -> Tensor | None:
    """The model's bf16/fp16 tensor storage when ``buf.param`` is its fp32 master: the passes
    write every θ they move there too, rounded once, in the same pass over memory."""
    return getattr(buf, "model_param", None) if getattr(buf, "master", False) else None


def _scalar_sum(x: Tensor) -> Tensor:
    """Σ of a small tensor as a 0-dim one; a view, not a launch, when it has one element."""
    return x.reshape(()) if x.numel() == 1 else x.sum()


def _total(tensors: list) -> Tensor:
    """Σ of a non-empty list of tensors (``sum`` would add a 0 first: one more launch)."""
    out = tensors[0]
    for t in tensors[1:]:
        out = out + t
    return out


class _FlatPasses(Passes):
    """Runs each fused pass once per flat buffer with that buffer's backend."""

    def __init__(self, opt: ArmijoOptimizer, buffers: list[FlatBuffer], f0,
                 loss_follows: bool = False):
        self.opt, self.buffers = opt, buffers
        self.groups = sorted({b.group_index for b in buffers})  # whose state this step updates
        self.slices, pos = [], 0
        for b in buffers:
            self.slices.append(slice(pos, pos + b.layout.nblocks))
            pos += b.layout.nblocks
        self.eta = [0.0] * pos
        self.precond = False
        groups = opt.param_groups
        # bias corrections count the gradients in each group's state, this one included
        self.scalars = [opt.rule.scalars(groups[b.group_index], groups[b.group_index]["folded"] + 1)
                        for b in buffers]
        self.wd = [float(groups[b.group_index]["weight_decay"]) for b in buffers]
        self._grad_sq = None
        self._first_sums = None
        # per buffer, where a pass has left it: the device η it sits at and whether along the
        # fallback direction (None: no pass yet, θ and state as before the step). Kept buffer by
        # buffer, so an error between two buffers' launches rolls back exactly those passed.
        self._at: list = [None] * len(buffers)
        self._precond_at = [False] * len(buffers)
        self._gscale = None  # per device; set by _set_scale
        with torch.no_grad():
            self._make_gscale(None if loss_follows else f0, loss_follows)

    def _make_gscale(self, f0, loss_follows=False):
        """Per-device [unscale, clip] (NaN when the gradient or f0 is not finite): no sync.

        Built from a probe, a device number that is finite iff the step may be taken (Σ g² + f0),
        in as few small ops as possible: each one is a kernel launch on a GPU, and they all run
        before the first pass can start. ``loss_follows``: a search, whose ``set_loss`` forms
        the guard once f0 is known (no pass runs before it)."""
        opt, dev0 = self.opt, self.buffers[0].device
        need_norm = opt.check_finite or opt.max_grad_norm is not None
        self.can_skip = need_norm or f0 is not None  # else the guard stays [1, 1]
        self._base = opt._ones2(dev0)  # shared and never written
        self._probe = None
        if need_norm:
            sq = self._sum_over_shards(
                [_scalar_sum(b.backend.grad_sq_norm(_flat_grad(b), b.layout, table=_table(b)))
                 .to(dev0) for b in self.buffers])
            self._grad_sq = self._probe = sq
            if opt.max_grad_norm is not None:
                clip = (opt.max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
                self._base = torch.cat([self._base[:1], clip.reshape(1).float()])
        if f0 is not None:
            self.set_loss(f0)
        elif not loss_follows:
            self._set_scale()

    def _set_scale(self) -> None:
        # base + 0·probe is base where the probe is finite and NaN in both entries where it is
        # not (0·inf = 0·NaN = NaN): two launches, where isfinite + where takes five
        probe = self._probe
        self._scale0 = self._base if probe is None else self._base + probe * 0
        self._skipped = None
        self._gscale = {b.device: self._scale0.to(b.device) for b in self.buffers}

    def _sum_over_shards(self, per_buffer: list) -> Tensor:
        """Σ g² over the model from each buffer's local sum. FSDP2: the sharded buffers' sums
        are summed over the ranks (one all-reduce), so clipping and the non-finite guard agree
        on every rank; other buffers hold whole tensors and count once."""
        sharded = [isinstance(b, ShardedBuffer) and b.sum_scale != 1.0 for b in self.buffers]
        whole = [x for x, s in zip(per_buffer, sharded) if not s]
        sq = _total(whole) if whole else None
        if any(sharded):
            part = _total([x for x, s in zip(per_buffer, sharded) if s]).clone()
            torch.distributed.all_reduce(part, op=torch.distributed.ReduceOp.SUM,
                                         group=self.opt.process_group)
            sq = part if sq is None else sq + part
        return sq

    def set_loss(self, f0: Tensor) -> None:
        """Fold a non-finite f0 into gscale: the passes then write nothing (no sync needed).
        (Σ g² + f0 is not finite iff either is not, short of an overflow past 1.7e38.)"""
        f0 = to_device(f0, self._base.device)
        self.can_skip = True
        self._probe = f0 if self._grad_sq is None else self._grad_sq + f0
        self._set_scale()

    def _eta(self, i: int, eta) -> Tensor:
        return device_floats(eta[self.slices[i]], self.buffers[i].device)

    def first(self, eta, caps=None, factors=None):
        """``caps``: per buffer, a device tensor of the largest searched η per block (a step
        without a search, see ``_length_caps``); the pass applies min(η, cap)·factor."""
        sums = []
        for i, b in enumerate(self.buffers):
            eta_i = self._eta(i, eta)
            if caps is not None:
                f = set(factors[self.slices[i]])
                if len(f) > 1:  # groups on different schedules: a factor per block
                    cap = caps[i] * self._eta(i, factors)
                else:  # one schedule: a scalar, no copy to the device (none without one)
                    f = f.pop()
                    cap = caps[i] if f == 1.0 else caps[i] * f
                eta_i = torch.minimum(eta_i, cap)
            sums.append(b.backend.first_pass(
                self.opt.rule, _flat_param(b), _flat_grad(b), b.states, self.scalars[i],
                self.wd[i], eta_i, self._gscale[b.device], b.layout, _model_copy(b),
                table=_table(b)))
            self._passed(i, eta_i, eta, False)
        sums = self._written(sums)
        self._first_sums = sums
        return sums

    @property
    def started(self) -> bool:
        """Has a first pass folded this step's gradient into some buffer's state?"""
        return any(at is not None for at in self._at)

    def _passed(self, i: int, eta_i: Tensor, eta, precond: bool) -> None:
        self._at[i], self._precond_at[i] = eta_i, precond
        self.eta[self.slices[i]] = eta[self.slices[i]]

    def trial_points(self, etas, precond):
        """θ0 − η_k d for every η_k, stacked: (params, [K, *shape] tensors), θ at θ0: one pass
        per buffer that reads θ, g and the state once and writes the K trial points."""
        params, stacked = [], []
        for i, b in enumerate(self.buffers):
            # a tile table has no flat θ for a kernel: its gathered copies, in torch math
            backend = torch_backend if _table(b) is not None else b.backend
            trial = backend.trial_points(self.opt.rule, b.param, b.grad, b.states, self.scalars[i],
                                         self.wd[i], etas, self._gscale[b.device], b.layout,
                                         precond)
            for j, (p, off) in enumerate(zip(b.params, b.offsets)):
                params.append(p)
                stacked.append(b.shaped(trial[:, off : off + p.numel()], j).to(p.dtype))
        return params, stacked

    def snapshot(self):
        """Copies of θ and the state of every buffer (``exact_revert``: memory for bitwise)."""
        # a bf16/fp16 model's own tensors too: they may hold weights the master has not taken
        # yet (written by the user since the last step; the first pass takes them)
        return [(b.param.clone(), [s.clone() for s in b.states],
                 b.model_param.clone() if _model_copy(b) is not None else None)
                for b in self.buffers]

    def restore(self, snapshot) -> None:
        for b, (param, states, model) in zip(self.buffers, snapshot):
            b.set_param(param)  # and the model's copy of a master, or the shards
            for s, saved in zip(b.states, states):
                s.copy_(saved)
            if model is not None:
                b.model_param.copy_(model)
        self._forget()

    def restore_params(self, snapshot) -> None:
        """θ (not the state) from the snapshot: a search that took no step, with
        ``exact_revert``, ends at θ0 bitwise rather than moved back along the line. θ0 is
        the master as the first pass took it: with the weights written into a bf16/fp16 model
        since the last step taken over (the snapshot was taken before)."""
        for b, (param, _, model) in zip(self.buffers, snapshot):
            if model is not None:
                param = torch.where(param.to(model.dtype) != model, model.float(), param)
            b.set_param(param)  # and the model's copy, the master rounded
        self._forget()

    def _forget(self) -> None:
        """Every buffer is at θ0 with the state from before the step."""
        self.eta, self.precond = [0.0] * len(self.eta), False
        self._at = [None] * len(self.buffers)
        self._precond_at = [False] * len(self.buffers)

    def _written(self, sums):
        """After a pass (which has already written a bf16/fp16 model's copy of its fp32 master):
        sharded buffers copy θ back into the DTensor shards and scale their local sums by the
        shard count, so the optimizer's mean over ranks forms Σ over shards."""
        for i, b in enumerate(self.buffers):
            if isinstance(b, ShardedBuffer):
                b.after_write()
                if sums is not None and b.sum_scale != 1.0:
                    sums[i] = sums[i] * b.sum_scale
        return sums

    def rollback(self) -> None:
        """θ back to θ0 (to rounding, along the line) and this step's gradient taken back out
        of the state, in every buffer a pass has reached (an error path: a pass or a trial
        raised, or an interrupt came between two buffers' launches)."""
        if not self.started:
            return  # (nor may the guard exist yet: a search forms it once f0 is known)
        scale = [float(x) for x in self._scale0.tolist()]
        folded = all(math.isfinite(x) for x in scale)  # else the first pass wrote nothing
        for i, b in enumerate(self.buffers):
            if self._at[i] is None:
                continue
            self._move_buffer(i, self._at[i] * 0, False, False)
            if folded:
                g_in = b.grad.float() * (scale[0] * scale[1])
                self.opt.rule.undo_state(g_in, b.states, self.scalars[i])
        self._written(None)
        self._forget()

    def _move_buffer(self, i: int, eta_i: Tensor, precond: bool, compute_sums: bool):
        """Buffer i from where it sits to η_i (one fused pass); its sums if asked."""
        b = self.buffers[i]
        return b.backend.move(
            self.opt.rule, _flat_param(b), _flat_grad(b), b.states, self.scalars[i],
            self.wd[i], self._at[i], eta_i, self._gscale[b.device], b.layout,
            self._precond_at[i], precond, compute_sums, _model_copy(b), table=_table(b))

    def move_to(self, eta, *, precond=None, compute_sums=False):
        precond = self.precond if precond is None else precond
        out = []
        for i in range(len(self.buffers)):
            eta_i = self._eta(i, eta)
            out.append(self._move_buffer(i, eta_i, precond, compute_sums))
            self._passed(i, eta_i, eta, precond)
        out = self._written(out if compute_sums else None)
        self.precond = precond
        return out

    def grad_norm(self):
        if self._grad_sq is not None:
            return self._grad_sq.sqrt()
        return sum(s[:, 1].sum() for s in self._first_sums).sqrt()

    def guard(self) -> Tensor:
        return self._scale0

    def skipped(self):
        if self._skipped is None:  # read by the step, the fold count and the telemetry
            self._skipped = torch.isnan(self._scale0[0])  # the guard puts NaN in both entries
        return self._skipped


__all__ = ["ArmijoOptimizer", "read_floats"]
