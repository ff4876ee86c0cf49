"""``ArmijoOptimizer``: the step, top to bottom. ArmijoSGD and ArmijoAdam only choose defaults.

``_step`` takes the loss and gradient at θ0 and works out the step's blocks and step sizes
(a ``StepSetup``); then either ``_plain_step`` (no search: one fused pass) or the search (trial
forwards, rolled back on any failure) and ``_finish_search`` (step sizes, cadence, counters,
``stats``).

Pieces (each its own module): a direction rule (``directions/``), flat storage (``storage/``), the
backend that runs the fused passes (``backends/``), and the line search: controller, step-size
policy, cadence and side-effect-free trials (``linesearch/``).

The optimizer's own parts, beside this file: ``passes.py`` (the fused passes of one step over
all buffers, and undoing them), ``search.py`` (the search plan and the step-size bookkeeping),
``store.py`` (the flat buffers kept in step with ``param_groups``), ``checkpoint.py``
(``state_dict``, ``load_state_dict``, copies), ``calls.py`` (what ``step()`` is handed),
``interrupts.py`` (Ctrl-C held while θ moves) and ``torch_compat.py`` (torch.optim's keywords
and checkpoints).
"""

from __future__ import annotations

import math
import numbers
import threading
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

from ..directions import get_rule
from ..directions.base import check_float32, check_number, in_float32
from ..linesearch import trial as trial_mod
from ..linesearch.batched import check_batchable, parameter_slots, stacked_loss
from ..linesearch.cadence import Cadence
from ..linesearch.controller import (
    evaluate_on_every_rank,
    loss_resolution,
    read_checking_ranks,
    read_floats,
    reduce_with_flag,
)
from ..linesearch.policy import StepSizePolicy
from ..storage.flat import FlatBuffer
from ..storage.layout import DEFAULT_TILE
from ..storage.scalars import to_device
from ..storage.sharded import is_dtensor
from ..telemetry import StepStats
from .calls import (
    as_loss,
    called_from_compiled_code,
    calling_grad_scaler,
    lightning_training_closure,
    loss_in,
    outside_stacklevel,
    refuse_zero_redundancy,
)
from .checkpoint import CheckpointMixin
from .interrupts import HeldInterrupts
from .passes import FlatPasses, _flat_grad, _table, scalar_sum, total
from .repeated_batch import RepeatedBatchWatch, repeated_batch_message
from .search import COUNTER_MINIMA, IN_TURN, SearchMixin
from .settings import SettingsMixin, check_flag
from .store import StoreMixin
from .torch_compat import (
    GROUP_OPTION_KEYS,
    check_group_options,
    lr_peak,
)

#: keys of the line-search state kept in every param group (identical across groups when global).
_LS_KEYS = ("step", "folded", "step_size", "step_size_avg", "step_length", "collapsed",
            "next_search", "search_interval", "searches", "forwards", "backwards")
_COUNTERS = tuple(k for k in COUNTER_MINIMA if k != "folded")
#: every key the optimizer keeps in a group for itself: a group given with one is refused (a
#: per-group "step_size" was taken as the search's state, unlike init_step_size's start)
_OWN_GROUP_KEYS = (*_LS_KEYS, "lr_ref", "loss_trend", "step_size_along", "block_names",
                   "block_owner", "block_searched_at", "block_tested", "block_cursor",
                   "last_dd", "last_dd_trainable", "forward_writes")
# ``step`` counts step() calls (cadence, schedules); ``folded`` counts the gradients folded into
# the group's state, the count behind its bias corrections: a skipped step (non-finite gradient or
# loss) adds to the first and not to the second, as torch's Adam does for a step GradScaler skips,
# and a group added later (progressive unfreezing) starts at 0 with its zero moments.
# ``step_length``: η·‖d‖ of the last accepted step, per block (0: none yet); steps without a
# search move at most STEP_LENGTH_RATIO times that far (search.py). ``collapsed``: per block,
# whether its last search collapsed (a second collapse in a row moves η̄, see policy.py).


def _written_mark(grad: Tensor):
    """(version, storage address) of a gradient, which any write changes; FSDP2's DTensor
    gradients are written through their local shard (``grad._local_tensor += g``), which moves
    neither of the DTensor's own. None where neither can be read (sparse or inference tensors:
    counted as written, so the step's own checks see them as before)."""
    t = grad.to_local() if is_dtensor(grad) else grad
    try:
        return t._version, t.data_ptr()
    except RuntimeError:
        return None


def _forget_replaced_groups(records: dict, groups) -> None:
    """Drop the records (keyed by ``id(group)``) of groups a ``load_state_dict`` replaced:
    kept, they were one more per load, for good. Only where there are more than groups."""
    if len(records) > len(groups):
        live = {id(g) for g in groups}
        for gone in [i for i in records if i not in live]:
            del records[gone]


def report_per_block(values, table, lead: int, layerwise: bool, blocks):
    """``ArmijoOptimizer._report`` on what it reads of the optimizer (``blocks``: its
    ``_report_blocks()``), for telemetry formed later without holding the optimizer."""
    if not layerwise:
        return values[lead]
    every, empty = blocks
    at = {key: v for key, v in zip(table, values) if key not in empty}
    return [at.get(key, math.nan) for key in every]


def _first_moving(block_factors) -> int:
    """The first block whose lr is not 0 now (0 if none): the one a global run's telemetry
    reports (a first group frozen at lr 0 reported an applied step and lr factor of 0)."""
    return next((b for b, f in enumerate(block_factors) if f != 0.0), 0)


def _lr_value(lr) -> float:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"invalid lr: a tensor lr must hold one value, got shape {tuple(lr.shape)}")
        lr = float(lr)
    # (a NumPy scalar is a number too: a schedule read from a float32 table writes one)
    if type(lr) is not float and (not isinstance(lr, numbers.Real) or isinstance(lr, bool)):
        raise ValueError(f"invalid lr: {lr!r} (expected a finite number >= 0)")
    if not 0.0 <= lr < math.inf:
        raise ValueError(f"invalid lr: {lr!r} (expected a finite number >= 0)")
    return float(lr)


_DROPOUT = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
            torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)
#: float attributes of modules that apply dropout functionally, with no Dropout module:
#: nn.MultiheadAttention's ``dropout``, HF Llama/Mistral/Qwen attention's ``attention_dropout``
_DROPOUT_RATES = ("dropout", "attention_dropout", "attn_dropout", "dropout_p")


def _drops_out(m: torch.nn.Module) -> bool:
    if not m.training:
        return False
    if isinstance(m, _DROPOUT):
        return m.p > 0
    if isinstance(m, torch.nn.RNNBase):  # between stacked layers only: none with one layer
        return m.dropout > 0 and m.num_layers > 1
    return any(isinstance(r := getattr(m, k, None), float) and r > 0 for k in _DROPOUT_RATES)


@dataclass(frozen=True)
class StepSetup:
    """What one step has worked out before it either searches or not: the step number, the
    blocks (group, block) in buffer order, their step sizes and lr factors (per group, per
    block, and times 1 - μ where momentum is searched along g), the buffers and the reducer."""

    k: int
    table: list
    etas: list
    factors: list
    block_factors: list
    applied_factors: list
    mfac: list | None
    buffers: list
    reduce: Callable | None


def _in_backward() -> bool:
    """Is this thread inside an autograd backward pass (a gradient hook)?"""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


class ArmijoOptimizer(CheckpointMixin, StoreMixin, SearchMixin, SettingsMixin,
                      torch.optim.Optimizer):
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
        max_drop: float | None,
        trend_guard: bool,
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
        momentum_search: str | None = None,
    ):
        _lr_value(lr)  # validates; schedulers own the value
        # checked as they are set, now or later (settings.py)
        self.c, self.backtrack, self.max_trials = c, backtrack, max_trials
        self.max_grad_norm, self.check_finite = max_grad_norm, check_finite
        # (settings.py checks these as they are set, here and later, each against the ones
        # set before it)
        self.layerwise, self.flat = check_flag("layerwise", layerwise), check_flag("flat", flat)
        self.exact_revert = exact_revert
        refuse_zero_redundancy(type(self).__name__)
        rule = get_rule(direction)
        check_number("weight_decay", weight_decay, 0.0)
        check_float32("weight_decay", weight_decay)
        check_number("init_step_size", init_step_size, 0.0, lo_open=True)
        self.backend, self.tile = backend, tile  # (resolved per buffer when the store is built)
        self.block_search = block_search
        self.merge_below = merge_below
        if momentum_search not in (None, "direction", "gradient"):
            raise ValueError(f"invalid momentum_search: {momentum_search!r} (choose direction "
                             "or gradient)")
        # candidates and the exact block search test trial points along the direction itself
        along_direction_only = candidates is not None or (layerwise and block_search == "exact")
        if not rule.heavy_ball:
            momentum_search = "direction"  # (no momentum: the direction is the gradient's own)
        elif momentum_search is None:
            momentum_search = "direction" if along_direction_only else "gradient"
        elif momentum_search == "gradient" and along_direction_only:
            raise ValueError(
                "momentum_search='gradient' does not combine with candidates= or "
                "block_search='exact', which search along the momentum direction: pass "
                "momentum_search='direction' (or leave it unset)")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.momentum_search = momentum_search
        self._modules = [model] if model is not None else []
        self.candidates = candidates
        self.rule = rule
        self.policy = StepSizePolicy(growth=growth, smoothing=smoothing,
                                     collapse_ratio=collapse_ratio, max_step=max_step,
                                     max_drop=max_drop, trend_guard=trend_guard)
        # (checked as set: settings.py)
        self.cadence = Cadence(cadence, max_interval=max_interval)
        self.process_group = process_group
        self._names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        self._closure: Callable | None = None
        self._pending_rng = None
        self._pending_bufs = None  # the kept buffers before the training forward (capture_rng)
        self._pending_attrs = None  # the models' tensor attributes then (a recurrent state)
        self._trial_sources = None  # what the last search's trials kept: (models, owned, beside)
        self._pending_loss = None
        self._returned = None  # what the closure returned, when it is a structure (HF outputs)
        self._pending_skip = None  # (pinned flag, event) of a GPU step whose skip is unread
        self._scaled_closure = False  # this step's closure handed over by scaler.step(opt, closure)
        self._last_dd = None  # (buffers, per-buffer ‖d_b‖² of the last first pass): _length_caps
        self._sharded = False
        self._resumed_dd = None  # the ‖d_b‖² a loaded checkpoint carried
        self._skip_host = None
        self._constants: dict = {}  # per device: see _ones2
        self._buffers: list[FlatBuffer] | None = None
        self._gathered_steps = 0  # steps whose gradients arrived as new tensors
        self._buffer_key = None
        self.stats: StepStats = StepStats.before_any_step()

        defaults = dict(lr=lr, weight_decay=weight_decay, **rule_defaults)
        # the first trial is init_step_size · growth, capped by max_step: so is the η that the
        # steps before the first accepted search apply (an uncapped one, 1e10 times max_step,
        # went on while the capped searches ended unresolved: the loss grew 3.7 -> 1.6e18)
        first = self.policy.first_trial(float(init_step_size))
        if math.isinf(in_float32(first)):
            raise ValueError(
                f"invalid init_step_size: {init_step_size!r} (the first trial, init_step_size · "
                f"growth = {first:.3g}, is inf in float32, where the passes compute)")
        self._init_step_size = self.policy.cap(float(init_step_size))
        if isinstance(params, torch.nn.Module):  # torch's own error: "'Linear' is not iterable"
            raise TypeError(
                f"params is a module ({type(params).__name__}): pass model.parameters() (and "
                "model=model to let trials restore its buffers and name its layers)")
        super().__init__(params, defaults)
        self._unnamed_groups: set = set()  # ids of groups one block for want of names
        for group in self.param_groups:
            self._init_group(group, constructing=True)
        if model is not None:
            self._check_model_holds_params(model, "model=")
        if self.candidates is not None:  # (refused at the first step too: a model sharded later)
            self._refuse_dtensors_unsupported(any(is_dtensor(p) for g in self.param_groups
                                                  for p in g["params"]))
        # filled by state_dict() only; a live key, so that a checkpoint flattened by
        # torch.distributed.checkpoint (flatten_optimizer_state_dict, which keeps only the keys
        # the live groups have) carries it back
        for key in ("last_dd", "last_dd_trainable", "forward_writes"):
            self.param_groups[0].setdefault(key, None)
        self._warn_group_lrs()
        if self.layerwise and len(self.param_groups) == 1 and not self._names:
            raise ValueError(
                "layerwise=True needs blocks: pass one param group per block (for instance "
                "armijo_fused.blocks.param_groups(model)) or model= to split by module names"
            )
        if self.layerwise:  # cut the groups into blocks now, so stats list them before a step
            for gi in range(len(self.param_groups)):
                self._group_blocks(gi, [])
        # (last: a warning before a refusal, where warnings are errors, hid the refusal)
        # options taken and doing nothing in this setup (an audit: each silently)
        if not self.layerwise and block_search != "round_robin":
            self._warn_once("unused block_search", (
                f"block_search={block_search!r} schedules the layer-wise search's blocks, and "
                "this optimizer searches one step size for all (layerwise=False): it does "
                "nothing here"))
        self._warn_unread_blocks_by(self.param_groups)
        if self.cadence.spec != "adaptive" and max_interval != 10:
            self._warn_once("unused max_interval", (
                f"max_interval={max_interval!r} is the adaptive cadence's longest gap between "
                f"searches, and this cadence is fixed ({cadence!r}): it does nothing here"))
        if merge_below is not None and merge_below >= self._init_step_size:
            self._warn_once("merge_below", (
                f"merge_below={merge_below:g} is at or above init_step_size="
                f"{self._init_step_size:g}: every block whose search backtracks below it "
                "merges into a neighbour, and the blocks soon share one step size. Set it "
                "well below the step sizes the blocks settle at"))
        if self.layerwise:
            per_group = [len(g.get("block_names") or (None,)) for g in self.param_groups]
            if sum(per_group) == 1:  # (an audit: model=nn.Sequential(nn.Linear(...)), silently)
                self._warn_once("one block", (
                    "layerwise=True found one block (the model's modules name no layers: "
                    "one module holds every tensor), so the search is a global one. Pass one "
                    "param group per block, or a model whose modules name its layers"))
            elif merge_below is not None and max(per_group) == 1:
                self._warn_once("merge_below groups", (
                    "merge_below merges a block into a neighbour within its param group, and "
                    "each group here is one block: nothing can merge. Give the model's tensors "
                    "in one group with model= (or names) for blocks that merge"))
        self.stats = self._stats_before_any_step()

    def _stats_before_any_step(self) -> StepStats:
        """``opt.stats`` before a step (or after a resume): per block lists when layer-wise."""
        return StepStats.before_any_step(len(self._all_blocks()) if self.layerwise else None)

    def _init_group(self, group: dict, constructing: bool = False) -> None:
        """Validate a param group and give it the line-search keys. A group added later
        (``add_param_group``, progressive unfreezing) joins the current global step size.
        ``constructing``: every group so far starts at ``init_step_size`` (no minimum to take
        over them, which was quadratic in the groups)."""
        own = [key for key in _OWN_GROUP_KEYS if key in group]
        if own:
            name = type(self).__name__
            raise ValueError(
                f"{name}: a param group sets {', '.join(own)}, which the line search keeps in "
                f"each group for itself: every group starts from init_step_size (pass it to "
                f"{name}(...); layerwise=True gives each group its own step size); to go on "
                "from another optimizer's search, load its state_dict()")
        self._validate_group(group)
        for p in group["params"]:
            if not p.is_floating_point():
                raise TypeError(f"parameters must be floating point, got {p.dtype}")
        # torch >= 2.6 takes named_parameters(): their names find the blocks without model=
        for name, p in zip(group.get("param_names", ()), group["params"]):
            self._names.setdefault(id(p), name)
        first = self.param_groups[0]
        joining = group is not first and "step_size" in first
        group.setdefault("lr_ref", _lr_value(group["lr"]))
        for key in _LS_KEYS:
            default = {"step_size": self._init_step_size,
                       "step_size_avg": self._init_step_size,
                       "next_search": 1, "search_interval": 1}.get(key, 0)
            if joining and key != "folded" and (not self.layerwise or key in _COUNTERS):
                default = first[key]  # global: one η for every group; the counters are shared
            elif joining and key in ("step_size", "step_size_avg") and not constructing:
                # layer-wise: the new group's block starts no longer than any block's step
                default = min(self._init_step_size, *[
                    v for g in self.param_groups if g is not group and key in g
                    for v in (g[key] if isinstance(g[key], list) else [g[key]])])
            group.setdefault(key, default)
        if group is first:  # the loss-trend guard's averages (policy.py): one per optimizer
            group.setdefault("loss_trend", None)
        if self.rule.heavy_ball:  # which direction η (step_size) is measured along
            group.setdefault("step_size_along", self.momentum_search)
        if self.layerwise:  # present from the start: DCP loads only the keys a fresh one has
            group.setdefault("block_cursor", first.get("block_cursor", 0))
            if constructing and "blocks_by" not in group and "block" not in group:
                self._unnamed_groups.add(id(group))  # (:meth:`name_parameters` may cut it)
            group.setdefault("blocks_by", self._default_blocks_by(group, constructing))

    def _validate_group(self, group: dict) -> None:
        """The hyperparameters a step reads from a group: at construction, and again at every
        step, since schedulers and user code write them (a weight-decay schedule, a momentum
        cycle); a bad value is refused by name before anything moves."""
        _lr_value(group["lr"])
        check_number("weight_decay", group["weight_decay"], 0.0)
        check_float32("weight_decay", group["weight_decay"])
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
        _forget_replaced_groups(seen, self.param_groups)
        for group in self.param_groups:
            # (the keys: one written into a live group, an option of the whole optimizer that
            # would do nothing there, is refused like one given at construction, also when
            # another key went out at the same time)
            # (a list as a tuple: one changed in place, betas[0] = 1.5, compares unequal)
            values = (tuple(group), *[tuple(v) if isinstance(v, list) else v
                                      for v in map(group.get, keys)])
            if seen.get(id(group)) != values:
                self._validate_group(group)
                seen[id(group)] = values

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group, as torch's (progressive unfreezing, a new head). Its options are
        checked as at construction; a refused group is not left half added.

        Globally, the new group joins the current step size η (one η moves every group) and the
        shared counters; its moments and bias corrections start at zero. Layer-wise, its blocks
        start at the smallest η of any block (no longer than ``init_step_size``) and are searched
        before they take a step without a search."""
        super().add_param_group(param_group)
        if hasattr(self, "_init_step_size") and len(self.param_groups) > 1 \
                and "step" in self.param_groups[0]:
            try:
                self._init_group(self.param_groups[-1])
                if self.layerwise:  # (its blocks now, as the others' at construction)
                    self._group_blocks(len(self.param_groups) - 1, [])
            except Exception:  # a refused group must not stay half set up
                self.param_groups.pop()
                raise
            if self.param_groups[0]["step"] == 0:  # stats before any step list its blocks too
                self.stats = self._stats_before_any_step()
            self._warn_group_lrs()
            self._warn_unread_blocks_by(self.param_groups[-1:])
            self._repeats().restart()  # (another model, or more of it: looked at again)

    def _warn_unread_blocks_by(self, groups) -> None:
        """A group's ``blocks_by`` without ``layerwise=True``: taken, and read by nothing."""
        given = [g["blocks_by"] for g in groups if "blocks_by" in g]
        if given and not self.layerwise:
            self._warn_once("blocks_by", (
                f"a param group sets blocks_by={given[0]!r}, which says how the layer-wise "
                "search cuts the group into blocks, and this optimizer searches one step size "
                "for all (layerwise=False): it does nothing here"))

    def _warn_group_lrs(self) -> None:
        """Groups given different learning rates (a faster head, layer-wise lr decay) ask for
        a ratio that torch's optimizers apply and one searched step size does not: say so once."""
        if self.layerwise or "lrs" in self.__dict__.get("_warned", ()):
            return
        # lr_0 as the factors see it: a scheduler's per-group peaks (OneCycleLR's max_lr=[...],
        # set at its construction, after ours) ask for a ratio as constructor lrs do
        lrs = sorted(v for v in (_lr_value(lr_peak(g)) for g in self.param_groups) if v > 0)
        if not lrs or lrs[-1] <= lrs[0] * (1 + 1e-6):  # (a tensor lr rounds)
            return
        self._warn_once(
            "lrs", f"the param groups have different lr ({lrs[0]:g} … {lrs[-1]:g}), but one "
            "searched step size η moves them all: each group follows its own schedule "
            "(η · lr_t / lr_0), not the ratio between the groups' lr. For a step size per group "
            "pass layerwise=True; a group at lr 0 stays frozen")

    def _warn_once(self, flag: str, message: str) -> None:
        """Warn (pointing at the caller's line) unless the warning ``flag`` was given before.
        While θ moves (``_moving``) the warning waits for the end of the step: a warnings
        filter that turns it into an error (``-W error``, pytest's ``filterwarnings``) would
        otherwise raise with θ and the state moved but the step's counters not yet, half a
        step (``step()`` warns once the step is whole)."""
        warned = self.__dict__.setdefault("_warned", set())
        if flag in warned:
            return
        warned.add(flag)
        message = f"{type(self).__name__}: {message}"
        if self.__dict__.get("_moving"):
            self.__dict__.setdefault("_deferred_warnings", []).append((flag, message))
        else:
            warnings.warn(message, stacklevel=outside_stacklevel())

    def _warn_deferred(self, propagating: bool = False) -> None:
        """Give the warnings the step deferred (see ``_warn_once``), one at a time.
        ``propagating``: an exception is on its way out of ``step()`` (the step's own, the step
        undone; or the first of these warnings, turned into an error by a filter). The rest are
        still given (a trial may have changed a buffer all the same), but one turned into an
        error must not replace that exception: it is taken back, to be given again when it
        next applies."""
        pending = self.__dict__.setdefault("_deferred_warnings", [])
        while pending:
            flag, message = pending.pop(0)
            try:
                warnings.warn(message, stacklevel=outside_stacklevel())
            except Exception:
                if not propagating:
                    raise
                self._warned.discard(flag)

    # -- user-facing hooks ---------------------------------------------------------------------
    def set_closure(self, closure: Callable | None, model: torch.nn.Module | None = None) -> None:
        """Register a loss-only closure for loops that call ``step()`` bare (HF Trainer,
        torchtitan). It is called with no arguments and must return the loss on the current batch
        at the current parameters. ``model``: modules whose buffers trials must not change.
        The optimizer keeps the closure, and what it captures (the batch), until it is replaced;
        ``set_closure(None)`` unregisters it."""
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        if model is not None:
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
            self._check_model_holds_params(model, "set_closure(..., model=)")
        self._closure = closure
        if model is not None:
            self._modules = [model]

    def _check_model_holds_params(self, model: torch.nn.Module, where: str) -> None:
        """A model that holds none of the optimized parameters is another module than the one
        the loss trains (trials would restore its BatchNorm statistics and not the trained
        model's, and the layer-wise blocks would get no names): refused by name. One that holds
        some is fine (a temperature outside the model is optimized too)."""
        held = {id(p) for p in model.parameters()}
        if not any(id(p) in held for g in self.param_groups for p in g["params"]):
            raise ValueError(
                f"{where} got a {type(model).__name__} that holds none of the optimizer's "
                "parameters: pass the module whose parameters these are, the one the loss "
                "runs (trials restore its buffers, BatchNorm statistics, and name its layers)")

    def name_parameters(self, model: torch.nn.Module) -> None:
        """Take the parameters' names from ``model``'s modules, as ``model=`` at construction
        does, for an optimizer built where ``model=`` cannot be passed: HF Trainer's
        ``optimizer_cls_and_kwargs`` builds two weight-decay groups of unnamed tensors
        (:class:`~armijo_fused.integrations.hf.LineSearchTrainer` calls this). The names label
        the telemetry, and with ``layerwise=True`` the groups given at construction that were
        one block for want of names (no ``"blocks_by"`` or ``"block"`` of their own) are cut by
        module names, as ``model=`` would have cut them. Before the first step only
        (``RuntimeError`` after it); a ``model`` that holds none of the parameters is a
        ``ValueError``."""
        if self._buffers is not None:
            raise RuntimeError("name_parameters() must come before the first step (and before "
                               "load_state_dict): the blocks are already cut")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"name_parameters() takes a torch.nn.Module, got "
                            f"{type(model).__name__}")
        # (another model named nothing, and layer-wise groups stayed one block, silently)
        self._check_model_holds_params(model, "name_parameters()")
        for name, p in model.named_parameters():
            self._names.setdefault(id(p), name)
        if self.layerwise:
            for gi, group in enumerate(self.param_groups):
                if id(group) in self._unnamed_groups:
                    group["blocks_by"] = self._default_blocks_by(group, constructing=True)
                    self._group_blocks(gi, [])  # (cut now, as at construction with model=)
            self.stats = self._stats_before_any_step()

    def provide_loss(self, loss) -> None:
        """Give the next ``step()`` the loss at the current parameters, which your loop has
        already computed (a trainer that calls ``step()`` bare after its own forward/backward):
        a search then takes it as f(θ0) instead of calling the registered closure once more.
        Used once; a later call replaces it. Ignored inside a trial (a function that serves as
        the registered closure and also provides the loss: a trial's loss is not the next
        step's f(θ0))."""
        if trial_mod.in_trial_here():
            return
        self._pending_loss = as_loss(loss, "provide_loss()", verb="got")

    def capture_rng(self) -> None:
        """Record the RNG state before your training forward, so that trial forwards replay its
        dropout masks when you pass ``loss=`` to ``step`` (the closure form needs no call): call
        it right before the first random draw the trial function repeats (a diffusion loop
        that draws the noise, then calls a loss function drawing the timesteps, captures after
        the noise; captured before it, the trials draw their timesteps where the noise came
        from, and the first search's check of the trial function at θ0 warns). The
        next step uses it, whatever its form: a capture no step used (a step GradScaler skipped)
        is replayed by the following one, closure or not (the integrations capture before an
        accumulation window's first micro-batch and step with a closure that runs its last).
        Ignored inside a trial, which replays the state captured for it."""
        if trial_mod.in_trial_here():
            return
        # (NumPy's state, about 35 µs to read, only where the coming step is to search)
        self._pending_rng = trial_mod.get_rng_state(numpy=self._next_step_may_search())
        self._pending_bufs = self._buffers_before_forward(self._closure)
        self._pending_attrs = self._attributes_before_forward()

    def _next_step_may_search(self) -> bool:
        g0 = self.param_groups[0]
        return self.cadence.should_search(g0["step"] + 1, g0["next_search"]) or \
            self._blind_waiting()

    def _attributes_before_forward(self) -> list | None:
        """The models' plain tensor attributes before the training forward (a recurrent state
        carried between batches): where each trial starts. Of the places the last search
        found (:meth:`_attribute_places`); before the first, of ``model=``."""
        if not self._next_step_may_search():
            return None
        places = self.__dict__.get("_attr_places")
        if places is None:  # (before the first search: None ones too, the first forward's)
            places = trial_mod.tensor_attributes(self._modules, or_none=True)
        return trial_mod.snapshot_attributes(places) if places else None

    def _attribute_places(self, models) -> list:
        """:func:`trial.tensor_attributes` of the models the trials run: found at the first
        search and every 31st (about 1.7 µs a module), kept in between."""
        places = self.__dict__.get("_attr_places")
        if places is None or self.param_groups[0]["searches"] % 31 == 0:
            places = self._attr_places = trial_mod.tensor_attributes(models)
        return places

    def _buffers_before_forward(self, evaluate=None) -> list | None:
        """Where the trials of the coming step start: a copy of the buffers they keep, taken
        with the RNG state before the training forward (a spectral norm's power-iteration
        vectors, a running normaliser the forward updates and uses: each trial at θ0 then
        computes the training forward's loss). Only when that step will search, and of the
        modules the last search kept; before the first (and in a resumed process), of
        ``model=`` and the modules the loss function ``evaluate`` (the closure, or the one
        ``set_closure`` registered) reaches beside it: a GAN discriminator's (its first search,
        and the first after every resume, started from the buffers the training forward left:
        12 trials exhausted where the uninterrupted run took 1, a multi-model user's audit).
        Without ``model=`` or such a function, the first search's trials start from the
        buffers the training forward left."""
        sources = self.__dict__.get("_trial_sources")
        if not self._next_step_may_search():
            return None
        if sources is None and self._modules:
            beside = self._modules_beside_model(evaluate) if evaluate is not None else ()
            sources = (self._modules, (), beside)
        if sources is None:
            return None
        return trial_mod.snapshot_buffers(*sources)

    def _params_written_by_forward(self, models) -> tuple[list, list]:
        """(the trainable tensors a trial watches for writes, those it keeps a copy of and
        puts back): see ``TrialEnv``. Kept from the start: the weights of embeddings with
        ``max_norm`` in the models; the others once a trial was seen writing them. Watched at
        the first search of this process and every 31st (a version read per tensor and trial:
        150 µs a trial for 600 tensors), so a write that starts later is found within 31.
        Writes through ``.data`` bypass the version counter and are not seen."""
        key = (self._buffer_key, tuple(id(m) for m in models),
               frozenset(self.__dict__.get("_forward_writes", ())))
        cached = self.__dict__.get("_watched")
        if cached is None or cached[0] != key:
            writes = set(self.__dict__.get("_forward_writes", ()))
            writes |= {id(m.weight) for model in models for m in model.modules()
                       if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))
                       and m.max_norm is not None and m.weight.requires_grad}
            watch = [p for _, p in self._trainable() if not is_dtensor(p)]
            # and the models' frozen tensors: a momentum (EMA) encoder updated in place in the
            # forward or the closure was updated again by each trial (a BYOL audit: 41
            # updates in 20 steps), unseen
            # (not a frozen nn.Embedding(max_norm=...): its renormalisation writes every
            # trial, to the same rows, alike; kept, each trial copied the whole table, 23x the
            # step's time for a 100 MB one)
            seen = {id(p) for p in watch} | {
                id(m.weight) for model in models for m in model.modules()
                if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))
                and m.max_norm is not None}
            for model in models:
                for p in model.parameters():
                    if not p.requires_grad and id(p) not in seen and not is_dtensor(p):
                        seen.add(id(p))
                        watch.append(p)
            self._watched = cached = (key, watch, [p for p in watch if id(p) in writes])
        looked = self.__dict__.get("_writes_looked")
        self._writes_looked = True
        look = looked is None or self.param_groups[0]["searches"] % 31 == 0
        return cached[1] if look else [], cached[2]

    def _note_forward_writes(self, written) -> None:
        """A trial forward wrote these tensors in place: from the next trial on, each one keeps
        a copy of them and puts it back (a search moves θ by increments: the write went into
        the next trial points, the accepted one, and the undoing of a failed search)."""
        self.__dict__.setdefault("_forward_writes", set()).update(id(p) for p in written)
        frozen = [p for p in written if not p.requires_grad]
        if frozen:
            named = {id(p): n for model in (self.__dict__.get("_trial_sources") or [()])[0]
                     for n, p in model.named_parameters()}
            names = ", ".join(named.get(id(p)) or f"a tensor of shape {tuple(p.shape)}"
                              for p in frozen[:3])
            self._warn_once("forward writes frozen", (
                f"a trial forward wrote the frozen tensor(s) {names} in place (a momentum / "
                "EMA encoder updated in the forward or the closure?): the trials repeat the "
                "update. From now on each trial puts them back after its forward, so they take "
                "one update per step, but each trial still sees one update more than the "
                "training forward did, and this search's trials kept theirs. Guard the update "
                "with `if not armijo_fused.in_trial()`, or make it after step()"))
            written = [p for p in written if p.requires_grad]
            if not written:
                return
        names = ", ".join(self._names.get(id(p)) or f"a tensor of shape {tuple(p.shape)}"
                          for p in written[:3])
        self._warn_once("forward writes", (
            f"a trial forward wrote the parameter(s) {names} in place (a forward or hook that "
            "clamps or renormalises weights, nn.Embedding(max_norm=...) in a model the "
            "optimizer does not see: pass model=): from now on each trial keeps a copy of "
            "them and puts it back after its forward (one copy of them per trial); this "
            "search's trial points kept the write"))

    def _state_initialisation(self, closure, loss_fn, loss, factors) -> bool:
        """Is this bare ``step()`` torch.distributed.checkpoint building the state of an
        optimizer that has not stepped? It sets every gradient to zeros and every lr to 0 first.
        (A first step of training at lr 0, warmup from 0, has a gradient: it counts, as in
        torch.) Reads the gradients only when all else says so."""
        if (self.state or closure is not None or loss_fn is not None or loss is not None
                or self._pending_loss is not None or any(f != 0.0 for f in factors)):
            return False
        if self._closure is None:
            return True  # (nothing to evaluate trials with: no step of training either)
        return not any(bool(p.grad.any()) for g in self.param_groups for p in g["params"]
                       if p.grad is not None)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. With flat buffers (the default) they stay views of the flat
        gradient buffer, zeroed, so the next backward accumulates in place: ``set_to_none`` is
        ignored once the buffers exist. ``flat=False`` follows ``set_to_none`` as torch does
        (dropped, so their memory is free through the next forward, as with AdamW; or zeroed
        where they are). FSDP2: dropped, FSDP writes new ones."""
        if trial_mod.in_trial_here():
            return
        if self._buffers is None:
            return super().zero_grad(set_to_none=set_to_none)
        # (the event torch's zero_grad records: a profiler trace shows it as AdamW's)
        with torch.autograd.profiler.record_function(getattr(
                self, "_zero_grad_profile_name", "Optimizer.zero_grad")):
            self._zero_grad(set_to_none)

    def _zero_grad(self, set_to_none: bool) -> None:
        for buf in self._buffers:
            buf.zero_grad(set_to_none)
        outside = self._outside  # tensors the store does not hold (frozen): as torch does
        if self._trainable_key() != self._buffer_key:  # (~3 µs at 150 tensors)
            # ... and those put into the groups since it was built (add_param_group, a tensor
            # swapped in; the store takes them at the next step): a linear probe's backbone
            # joining with 20 steps of gradient summed in its .grad folded them all into its
            # first step (22x its gradient, the second moments 480x), where torch's zero_grad
            # clears them
            outside = self._tensors_outside(self._buffers)
        for p in outside:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_() if p.grad.grad_fn is not None else p.grad.requires_grad_(False)
                    p.grad.zero_()

    # -- the step ------------------------------------------------------------------------------
    # Not traced when a compiled function calls it: the search reads losses on the host, so a
    # trace would break there anyway, and specialising on each step size recompiled every step
    # until dynamo's limit. The disable is recursive: what the step calls (the closure, the
    # trials' loss function) runs eagerly too, except a model compiled on its own.
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
        # the optimizer is taken at once (setdefault is one operation under the GIL: a check
        # and a later set let two threads' steps run together in an audit, one step lost), and
        # given back only by the call that took it
        here, token = threading.get_ident(), object()
        try:
            holder = self.__dict__.setdefault("_in_step", (here, token))
            if holder[1] is not token:
                if holder[0] != here:
                    raise RuntimeError(
                        f"{type(self).__name__}.step() called from another thread while this "
                        "optimizer's step runs: one optimizer steps in one thread at a time")
                self._refuse_nested_step()
            if trial_mod.in_trial_here():  # (another optimizer's trial)
                self._refuse_nested_step()
            self._check_caller()
        except BaseException:
            if self.__dict__.get("_in_step", (None, None))[1] is token:
                del self.__dict__["_in_step"]
            raise
        try:
            if torch.is_inference_mode_enabled():  # else the store would be built of inference
                with torch.inference_mode(False):  # tensors, which no backward can use again
                    out = self._step(closure, loss_fn, loss)
            else:
                out = self._step(closure, loss_fn, loss)
            self._rng_at_entry = None  # (the step is whole: a warning raised below undoes nothing)
            # the closure form returns what the closure returned (a tensor with its graph, a
            # float, an HF output), as torch's optimizers do; the others the loss before the step
            out = out if self._returned is None else self._returned
            self._moving = False
            self._warn_deferred()  # (the step is whole: an error filter cannot cut it now)
            return out
        except BaseException:
            self._moving = False
            rng = self.__dict__.get("_rng_at_entry")
            if rng is not None:  # (θ and the state are undone: so is the training call's RNG)
                try:
                    trial_mod.set_rng_state(rng)
                except Exception:  # (a device in error: the step's own exception comes first)
                    pass
            self._warn_deferred(propagating=True)
            raise
        finally:
            self._moving, self._returned = False, None
            self.__dict__.pop("_in_step", None)
            self._rng_at_entry = None
            held, self._held = self.__dict__.get("_held"), None
            if held is not None:
                held.release()  # a Ctrl-C that came while θ moved: raised now, step whole

    def _refuse_nested_step(self):
        # (a loss function, hook or callback reached from a trial called step() again: the
        # nested step folded the gradient a third time, counted nothing, and switched off the
        # mid-step guards of the outer one)
        raise RuntimeError(
            f"{type(self).__name__}.step() called while a step is in progress (from a trial's "
            "loss function, or a forward hook or callback it reaches): call step() once per "
            "training step, outside the loss function")

    def _check_caller(self):
        """Where ``step()`` is called from, before it starts: not inside a backward; and said
        once where a compiled function calls it, looked at in this optimizer's first three
        steps."""
        if _in_backward():
            # (one optimizer per tensor, stepped from a gradient hook, ran a search per tensor
            # inside backward: f0 and a trial forward each, 9 forwards per backward for four
            # tensors, each testing a gradient taken before the later tensors moved)
            raise RuntimeError(
                f"{type(self).__name__}.step() called during a backward pass (an optimizer "
                "stepped from a gradient hook, as the 'optimizer in backward' pattern does with "
                "register_post_accumulate_grad_hook): the line search tests the whole gradient "
                "against the loss at trial points, which it cannot do inside backward. Use one "
                "optimizer over the model and call step() after loss.backward()")
        # looked at in this object's first three calls (a loop calls step() alike throughout;
        # a look walks a dozen frames, ~4 µs). An audit's compiled train step with dropout and
        # loss=: its forward drew inductor's masks, the eager trials torch's, η fell to 1e-8
        checks = self.__dict__.get("_compile_checks", 0)
        self._compile_checks = min(checks + 1, 3)
        if checks < 3 and called_from_compiled_code(depth=14):
            self._warn_once(
                "compiled caller", "step() was called from a torch.compile'd function. The step "
                "runs eagerly (torch.compiler.disable), and with it the closure and the loss "
                "function of its trials: unless the model is compiled on its own, a closure's "
                "forward and backward are not compiled, and a forward the compiled function ran "
                "itself (loss=) differs from the trials' eager one (its dropout masks, its "
                "rounding), so the Armijo test compares two functions. Compile the model "
                "(torch.compile(model) or model.compile()) and call step() from eager code: "
                "compiling the function around step() adds nothing to that")

    def _step(self, closure, loss_fn, loss):
        if closure is not None and loss is not None:  # (it was dropped without a word)
            raise ValueError("pass loss= only without a closure: the closure computes the loss")
        for name, fn in (("closure", closure), ("loss_fn", loss_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        if loss_fn is None and closure is not None and lightning_training_closure(closure):
            # Each trial would re-run training_step (its self.log kept a trial's loss), and
            # with accumulate_grad_batches it is the last micro-batch's loss / A, tested
            # against the whole window's gradient (f0 0.35 for a window whose loss was 0.75)
            raise RuntimeError(
                f"{type(self).__name__}.step() was handed Lightning's training closure: its "
                "trials would re-run training_step (logging a trial's loss) and, with "
                "accumulate_grad_batches, test only the last micro-batch's loss against the "
                "window's gradient. Mix armijo_fused.integrations.lightning."
                "ArmijoLightningMixin into the LightningModule (before L.LightningModule)")
        self._validate_changed_groups()
        self._check_step_sizes()
        self._check_counters()
        self._settle_skip()
        groups = self.param_groups
        g0 = groups[0]
        k = g0["step"] + 1
        factors = [self._lr_factor(g) for g in groups]
        evaluate = loss_fn or closure or self._closure
        search = self.cadence.should_search(k, g0["next_search"])
        if self._state_initialisation(closure, loss_fn, loss, factors):
            # torch.distributed.checkpoint initialising the state of an optimizer that has not
            # stepped (zero gradients, lr 0, a bare step()). Build the state and count nothing:
            # a step here would add to the bias-correction count, and the run would differ
            # from one never checkpointed (also with a closure registered: it is not called)
            self._sync_buffers()
            return None
        if evaluate is None:
            if any(f != 0.0 for f in factors):
                raise RuntimeError(
                    f"{type(self).__name__}.step() needs the loss at trial points: pass a closure "
                    "(step(closure)), a loss function (step(loss_fn=fn, loss=loss)), or register "
                    "one with set_closure(fn); HF Trainer: use armijo_fused.integrations.hf."
                    "LineSearchTrainer; Lightning: armijo_fused.integrations.lightning."
                    "ArmijoLightningMixin; accelerate (an AcceleratedOptimizer's step() takes no "
                    "loss function): armijo_fused.integrations.armijo_optimizer(opt).set_closure("
                    "fn) once the window is complete (docs/integrations.md)"
                )
            search = False  # later: a step at lr 0 (the state takes the gradient, as torch's)

        # 1. The loss at θ0 and the gradient, from the training forward/backward.
        # the RNG state the training forward starts from, for the trials to replay (a search
        # only: with CUDA this reads every device's generator)
        pending = self._pending_rng  # recorded before the loop's own training forward
        replayed = closure is not None or pending is not None
        # exact mode with a block whose last test was blind: this step may turn into a search
        # once the gradient is known (see _blind_gradient_live), so the trials' RNG is kept
        probe = not search and self._blind_waiting()
        # (a loss= step without a record reads it when its first trial needs it, once the
        # first pass is queued: nothing draws from the generators in between)
        rng_before = pending or (trial_mod.get_rng_state()
                                 if (search or probe) and closure is not None else None)
        # a search step in the closure form that raises puts the generators back where the call
        # found them, so a retried step draws the training call's dropout masks again, as an
        # uninterrupted run did (they stayed drawn: a retry after a trial raised parted from
        # it by 0.01 with dropout 0.1, a LoRA user's audit); a capture was the loop's own
        self._rng_at_entry = rng_before if closure is not None and pending is None else None
        # the buffers go with the RNG state: recorded with it, or now, before the closure's
        # forward (a loss= step without capture_rng has neither)
        buffers_before = (self._pending_bufs if pending is not None else
                          self._buffers_before_forward(closure) if closure is not None
                          else None)
        attributes_before = (self._pending_attrs if pending is not None else
                             self._attributes_before_forward() if closure is not None else None)
        self._pending_rng = self._pending_bufs = self._pending_attrs = None
        f0 = loss if loss is not None or closure is not None else self._pending_loss
        self._pending_loss = None
        scaler = None
        if closure is not None:
            scaler = calling_grad_scaler(self)
            before = self._grad_versions() if scaler is not None else None
            with torch.enable_grad():
                f0 = closure()
            self._returned = f0  # what step() returns, as torch's: the closure's own value
            if scaler is not None:  # scaler.step(opt, closure): the closure's gradient is scaled
                self._unscale_gradients(scaler, before)
        self._scaled_closure = scaler is not None  # (its overflows are routine: not warned of)
        self._count(forwards=1, backwards=1)
        if f0 is not None:
            f0 = (as_loss(f0, "the closure") if closure is not None
                  else as_loss(f0, "loss=", verb="is"))
        buffers = self._sync_buffers()
        if not buffers:
            self._advance(k, folded=())
            return f0
        # the guard's read of g (check_finite, max_grad_norm), per buffer and block, queued as
        # soon as the buffers hold the gradient: on a GPU it then runs while the host prepares
        # the first pass, where queued just before that pass it delayed it by its own length
        # (a read of g, ~0.1 ms at 124M) on every step
        probed = (self._probe_grad_sq(buffers)
                  if self.check_finite or self.max_grad_norm is not None else {})
        table = self._block_table()
        etas = self._etas(table)
        # a block with no elements (layer-wise) is at lr 0: it has nothing the test could judge
        empty = self.__dict__.get("_empty_blocks", ())
        block_factors = [0.0 if key in empty else factors[key[0]] for key in table]
        # momentum_search="gradient": η is searched along g, the step applies (1-μ)·η along the
        # momentum direction (search.py, _momentum_factors); None: the applied η is η
        mfac = self._momentum_factors(table)
        applied_factors = block_factors if mfac is None else [
            f * m for f, m in zip(block_factors, mfac)]
        reduce = self._reducer()
        if all(f == 0.0 for f in block_factors):
            search = False  # every lr is 0 at this step (warmup from 0, frozen): nothing to test
        elif probe:  # a block that waits for a test has a gradient now: test it
            search, probed = self._blind_gradient_live(buffers, table, block_factors, reduce,
                                                       probed)
        # what the step reports (and returns, but for the closure form, which returns the
        # closure's own value): with DDP, the mean over the ranks
        loss_before = f0
        given = f0 is not None
        if not search and reduce is not None:
            # the guard skips the step if f0 is not finite: on every rank or on none (a rank's
            # batch of padding only has a NaN mean loss and a zero gradient); a search reduces
            # f0 below, with its first trial's sums. So does a non-finite gradient on one rank
            # (a tensor DDP does not average: a learnable loss weight outside the module), or
            # that rank alone skipped and the replicas parted: its Σ g², read for the guard
            # anyway, rides in the same collective as 0 · Σ g² (NaN iff it is not finite)
            guard = None
            if self.check_finite or self.max_grad_norm is not None:  # (read at the step's start)
                guard = total([scalar_sum(sq).to(buffers[0].device) for sq in probed.values()])
            f0, loss_before = self._loss_over_ranks(f0, buffers[0].device, reduce, guard)
        setup = StepSetup(k, table, etas, factors, block_factors, applied_factors, mfac,
                          buffers, reduce)
        passes = FlatPasses(self, buffers, f0, loss_follows=search,  # a search sets f0 below
                            grad_sq=probed)
        self._moving = True  # from here to the end of the step the state is mid-step
        self._held = HeldInterrupts.begin()  # ... so Ctrl-C waits for its end (interrupts.py)

        if not search:
            return self._plain_step(setup, passes, loss_before, given)

        # 2. The search, on trial forwards that leave no trace.
        self._check_model_still_holds_params()
        scale = (self._scale_to_check(scaler, closure is not None) if f0 is not None and
                 reduce is None and not self.__dict__.get("_scale_checked") else None)
        models = self._modules or self._models_for_trials(evaluate)
        if not replayed:
            self._check_dropout_replayed(models)
        sources = (models, () if models else self._owned_buffers(),
                   self._modules_beside_model(evaluate) if self._modules else ())
        self._trial_sources = sources  # (the next steps record these buffers before a forward)
        envs = []  # the trials' environment, built by the first trial (or the loss at θ0)

        def trial_env() -> trial_mod.TrialEnv:
            """Built when the first trial needs it, usually after the first pass is queued:
            its host work (RNG reads, buffer copies) then overlaps the device's pass, where
            before the pass it delayed it (a GPU waits for the host there). A failure here (out
            of memory copying buffers) is undone as any failure mid-step is: θ back to rounding,
            bitwise with ``exact_revert``; under DDP the other ranks learn of it."""
            nonlocal rng_before
            if envs:
                return envs[0]
            if rng_before is None:  # loss=, nothing recorded: the state as the step found it
                # (NumPy's, about 35 µs to read and as much to set, where these steps' trials
                # draw from it or that is not known yet; else a glance after each trial, and a
                # read at every 31st search: a trial that takes only a legacy Gaussian cached by
                # the training forward leaves the position the glance sees where it was)
                glance = (trial_mod.numpy_glance() if self.__dict__.get("_trials_draw_numpy")
                          is False and g0["searches"] % 31 else None)
                rng_before = trial_mod.get_rng_state(numpy=glance is None)
                numpy_look[0] = glance
            elif replayed and len(rng_before) == 4 and rng_before[3] is not None and \
                    not trial_mod.numpy_moved_since(rng_before[3]):
                # the training forward did not draw from NumPy's generator: nothing of it to
                # replay, and its trials (the same code, the same draws from the others) will
                # not draw either; only a forward that did pays for setting it
                rng_before = (*rng_before[:3], None)
            numpy_rng = len(rng_before) == 4 and rng_before[3] is not None  # (NumPy's too)
            watch, protect = self._params_written_by_forward(models)
            # with no closure and no state recorded before the forward, the state read for
            # the trials is also the one to put back after them (nothing drew since): one read
            # less (Python's random state alone is a 625-int copy)
            env = trial_mod.TrialEnv(sources[0], rng_before, sources[1], sources[2],
                                     numpy_rng=numpy_rng, buffers_before=buffers_before,
                                     watch=watch, protect=protect,
                                     rng_after=rng_before if not replayed else None,
                                     attributes=self._attribute_places(sources[0]),
                                     attributes_before=attributes_before)
            envs.append(env)
            return env

        what = "loss_fn" if loss_fn is not None else "the closure"
        # no record of the RNG before the training forward: do its trials draw random numbers
        # they cannot replay? (looked at after the first trial of the first 10 such searches)
        draws_to_check = [not replayed and self._rng_draw_looks_left()]
        # a loss= step's look at NumPy's generator: [the glance before its trials (or None:
        # read in full), whether still to look]
        numpy_look = [None, not replayed]

        def check_draws() -> None:
            numpy_drew = False
            if numpy_look[1]:  # do the trials of loss= steps draw from NumPy's generator?
                np_state = envs[0].rng_before[3]
                if numpy_look[0] is not None:  # (after each trial, until seen)
                    numpy_drew = trial_mod.numpy_glance() != numpy_look[0]
                    numpy_look[1] = not numpy_drew
                else:
                    numpy_look[1] = False
                    if np_state is not None and not self.__dict__.get("_trials_draw_numpy"):
                        numpy_drew = trial_mod.numpy_moved_since(np_state)
                        self.__dict__.setdefault("_trials_draw_numpy", False)
                if numpy_drew:  # (this search's draws went unreplayed: from the next on, not)
                    self._trials_draw_numpy = True
            if draws_to_check[0]:
                draws_to_check[0] = False
                env = envs[0]
                if (numpy_drew and not env.rng_set) or env.drew_random_numbers():
                    self._warn_unreplayed_draws("the trial forwards draw random numbers")

        def trial_loss(counted: bool = True) -> Tensor:
            self._reshard_fsdp()  # FSDP2: the forward must all-gather the moved shards
            with trial_env().trial(watch_rng_setters=draws_to_check[0]):
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
            check_draws()
            if counted:
                self._count(forwards=1)
            return as_loss(out, what)

        batched_loss = None  # candidates: the K trial points' losses in one forward

        def trial_losses(etas, precond) -> Tensor:  # batched candidates: one forward for all
            _, stacked = passes.trial_points(etas, precond)  # (buffer order, as the slots)
            with trial_env().trial():
                out = batched_loss(stacked)
            check_draws()
            self._count(forwards=1)
            return out.detach()

        # a group whose lr is 0 at this step (frozen, warmup from 0) stays at θ0 in every trial
        # and out of the test: its η is 0 in the passes, so its θ is not touched at all
        frozen = [f == 0.0 for f in block_factors]
        if self.candidates is not None and not any(frozen):
            check_batchable(self._modules[0])
            # (once per step, before anything moves: a tensor the model lacks is refused here)
            slots = parameter_slots(self._modules[0], [p for b in buffers for p in b.params])
            batched_loss = stacked_loss(lambda: loss_in(evaluate()), slots,
                                        list(self._modules[0].modules()))
        plan = self._search_plan(table, frozen)
        snapshot = passes.snapshot() if self.exact_revert else None
        try:
            with torch.no_grad():
                failure = f0_failure = None
                f0_given = f0  # (the rank's own, before the mean over ranks)
                if reduce is not None and "_ranks_given" not in self.__dict__:
                    self._ranks_given = self._share_of_ranks_given_a_loss(
                        f0_given is not None, reduce, buffers[0].device)
                if f0 is None:
                    f0, failure = evaluate_on_every_rank(trial_loss, reduce, buffers[0].device)
                resolution = loss_resolution(  # of the loss's own dtype, before the mean
                    f0, float64_model=f0.dtype == torch.float64 and all(
                        b.dtype == torch.float64 for b in buffers))
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
                # (distributed: on every rank, also one whose f0 the trial function gave, which
                # adds the same value to both means: a loss handed over on some ranks only must
                # not make a collective on those alone)
                # (not where the trials start from the buffers the training forward left: the
                # first search without model=, whose trials a spectral norm's power iteration
                # set 1% apart, once; the next search records them before the forward. Not
                # distributed: the ranks' call forms may differ, and each must take part)
                # (distributed: decided alike on every rank, by the share read at the process's
                # first search; a rank's own f0_given made the check's collectives on some
                # ranks only when the loss was handed over on some from a later step on)
                if (f0_given is not None if reduce is None else self._ranks_given > 0) and \
                        "_replay_checked" not in self.__dict__ and \
                        (buffers_before is not None or not replayed or reduce is not None):
                    # once per run in this process: the trial function at θ0 against the
                    # training forward's loss (one forward, not counted in `forwards`: a
                    # resumed run makes it again, and must count as the run it continues)
                    # (θ is still θ0 here; looked at again at the next search where the losses
                    # were not finite, as in a skipped step: the means, so every rank alike)
                    if reduce is None:
                        at_theta0 = trial_loss(counted=False)
                        if scale is not None:
                            self._refuse_scaled_loss(f0, at_theta0, scale)
                        self._replay_checked = self._check_replayed(f0, at_theta0, what)
                    else:  # the means over the ranks, compared alike on every rank; a rank
                        # whose loss function raised takes part, and every rank then raises
                        dev = buffers[0].device
                        mine, failure = evaluate_on_every_rank(
                            lambda: trial_loss(counted=False), reduce, dev)
                        mean, flag = reduce_with_flag(
                            reduce, mine.double().reshape(1).to(dev), failure)
                        at_theta0, f0_value = read_checking_ranks(
                            [mean, f0.double().reshape(1).to(dev), flag], True, failure,
                            f0_failure)
                        f0_failure = None
                        self._replay_checked = self._check_replayed(
                            f0_value, at_theta0, f"{what} (the mean over the ranks)")
                elif scale is not None:
                    self._refuse_scaled_loss(f0, trial_loss(), scale)
                result, accepted = self._run_search(passes, trial_loss, f0, etas, plan, reduce,
                                                    trial_losses, frozen, resolution, f0_failure,
                                                    along_fallback=mfac is not None,
                                                    table=table)
                if result.waited:  # (they keep their η, as frozen blocks do: armijo_search's
                    # drop_on_reject)
                    frozen = [f or b in result.waited for b, f in enumerate(frozen)]
                if accepted is None and snapshot is not None and not result.skipped:
                    passes.restore_params(snapshot)  # bitwise θ0; the state keeps g
                # 3. The applied step: the search's η times the scheduler's lr_t / lr_0.
                taken_d, along_g = accepted, False  # the step size along the applied direction
                if accepted is not None and mfac is not None and not result.skipped:
                    # searched along g: test (1-μ)·η along the momentum direction (search.py)
                    waited = result.waited  # (the momentum check's result is its own)
                    result, accepted, taken_d, along_g = self._momentum_step(
                        passes, trial_loss, f0, result, accepted, mfac, reduce, resolution)
                    result = replace(result, waited=waited)
                    passes.move_to([a * f for a, f in zip(taken_d, block_factors)],
                                   precond=along_g)
                elif accepted is not None:
                    final = [a * f for a, f in zip(accepted, block_factors)]
                    if final != passes.eta:
                        passes.move_to(final)
                # the next step's length cap; under FSDP2 a collective, so inside the rollback
                # section: a rank that fails it leaves θ and the state as before the step
                dd = (None if passes._first_sums is None
                      else self._step_dd(buffers, passes._first_sums, reduce)[0])
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
            for env in envs:  # (none if no trial ran: a failure before the first)
                for message in env.close():
                    self._warn_once(f"trial buffer: {message}", message)
                if env.written:
                    self._note_forward_writes(env.written)
            self._reshard_fsdp()  # the next training forward gathers the final weights

        # 4. Bookkeeping: step sizes, cadence, counters, telemetry.
        self._finish_search(setup, passes, plan, frozen, result, accepted, taken_d, dd,
                            resolution)
        return f0

    def _finish_search(self, setup: StepSetup, passes, plan, frozen, result, accepted, taken_d,
                       dd, resolution) -> None:
        """After a search: the policy's step sizes, the cadence, the counters and ``stats``.
        ``plan``: the searched blocks (``_search_plan``); ``accepted``: the step size per
        block along the searched line (None: no step); ``taken_d``: along the applied one."""
        k, table, etas, factors = setup.k, setup.table, setup.etas, setup.factors
        block_factors, mfac, buffers = setup.block_factors, setup.mfac, setup.buffers
        lead = _first_moving(block_factors)
        groups = self.param_groups
        g0 = groups[0]
        skipped = result.skipped or not math.isfinite(result.loss_before)
        if skipped:
            self._warn_skipped(k, self._scaled_closure)
        accepted = self._fill_frozen(accepted, etas, frozen)
        settled, collapsed = self._update_step_sizes(table, etas, plan, result, accepted,
                                                     skipped, k, frozen, resolution)
        if dd is not None and not skipped:  # (a skipped pass's sums are zeros: no cap)
            self._last_dd, self._resumed_dd = (buffers, dd), None  # (a record of this pass)
        if accepted is not None and not skipped and result.block_dd:
            # (momentum searched along g: the result is the test of the step applied, along d;
            # after a step along g, whose α along d failed its test, ‖g‖: the next steps apply
            # (1 - μ)·η along d, so the cap holds them to 2(1 - μ)·η‖g‖, on purpose short)
            self._record_step_length(table, result.block_dd)
        if self.layerwise and not skipped and (accepted is not None or result.unresolved):
            # an unresolved search cannot judge its blocks at the loss's resolution: waiting
            # for a resolved one stalled an unfrozen block under a bf16 loss for 30+ steps, so
            # its blocks go on as before any accepted search (they apply their η)
            judged, blind = self._judged(result, accepted, etas)
            if result.waited and accepted is None and \
                    self._unresolved_kind(result, plan[0]) == "blind":
                # the searched blocks alone, once the untested ones left, predicted no decrease
                # (a zero gradient: a layer facing a zero-initialised head, LoRA's B = 0):
                # nothing judged their η, which plain steps then applied (η 1, the loss 9 ->
                # 205 in four steps: a review); they wait as a blind exact-mode block does
                blind = set(blind) | set(plan[0])
                judged = [0.0 if b in blind else j for b, j in enumerate(judged)]
                for b in plan[0]:  # (its turn was had: "stale" chose it again at every step,
                    # a search per step for good behind a head that stayed zero)
                    gi, lb = table[b]
                    groups[gi]["block_searched_at"][lb] = k
            self._mark_tested(table, judged, frozen, blind=blind)
        nothing = accepted is None or getattr(result, "none_accepted", False)
        exhausted = nothing and not (skipped or result.unresolved)
        if result.grad_sq == 0.0 and not skipped and result.loss_before != 0.0:
            self._warn_zero_gradient(k)  # (a loss of exactly 0: a fitted batch, no mistake)
        self._note_growth_without_schedule(table)
        self._warn_group_lrs()  # (again: a scheduler attached since may give each its peak)
        self._note_unchanged_trials(result)
        self._note_unresolved(result, resolution)
        if exhausted:
            self._note_gradient_mismatch(result, resolution)
        # after a collapse η is reset to η̄, which this search has just rejected: like an
        # exhausted search, the next step must test it rather than apply it blindly
        next_search, interval = self.cadence.after_search(k, g0["search_interval"], settled,
                                                          exhausted or collapsed)
        if self.layerwise and not skipped and self._hurrying(table, [
                not t and f != 0.0 for t, f in zip(self._tested_all(table), block_factors)]):
            next_search = k + 1  # a block waits for its first search (drop_on_reject): it is next
        if self.layerwise and self.block_search in IN_TURN and not skipped:
            # (a skipped step searched nothing: the block whose turn it was keeps it, as in a
            # run that never saw the step, and as the most-stale choice keeps it)
            self._advance_cursor()
        for g in groups:
            g.update(next_search=next_search, search_interval=interval,
                     searches=g["searches"] + 1)
        self._advance(k, folded=() if skipped else passes.groups)
        taken = ([0.0] * len(table) if accepted is None else accepted if mfac is None
                 else self._fill_frozen(taken_d, [e * m for e, m in zip(etas, mfac)], frozen))
        # the trial's loss is the loss after the step only where the step applied is the one
        # tested: a schedule's factor below 1 shortens it, and that point's loss is not known
        # (reporting the trial's had overstated the decrease 3x at a factor of 0.25)
        # (a block at lr 0 moves in neither: θ0 in the trial and after the step)
        at_trial = all(f == 1.0 for a, f in zip(taken, block_factors) if a != 0.0 and f != 0.0)
        self.stats = StepStats(
            step=k, searched=True, step_size=self._report(taken, table),
            # (a block that waited did not move: its η is reported, its applied step is 0)
            applied_step=self._report([0.0 if b in result.waited else a * f
                                       for b, (a, f) in enumerate(zip(taken, block_factors))],
                                      table, lead),
            lr_factor=factors[table[lead][0]], trials=result.trials,
            loss_before=result.loss_before,
            loss_after=result.loss_after if at_trial else math.nan,
            loss_trial=result.loss_after, gd=result.gd,
            grad_norm=math.sqrt(result.grad_sq) if result.grad_sq >= 0 else math.nan,
            non_descent=result.non_descent, unresolved=result.unresolved,
            exhausted=exhausted,
            # (the policy counts an exhausted search as a collapse too; the flag reports
            # what the docs call one: an accepted η below collapse_ratio · η̄)
            collapsed=collapsed and not nothing, skipped=skipped,
            searched_blocks=self._positions(
                table, sorted(set().union(*plan))),
            next_step_size=self._next_step_sizes(),
            forwards=g0["forwards"], backwards=g0["backwards"],
        )
        watch = self._repeats()  # (asked at every cadence: a repeat also silences the
        # growth warning, about noisy mini-batches; said only where the cadence skips searches)
        if not watch.done:
            watch.searched(k, result.loss_before,
                           math.nan if exhausted else self.stats["loss_after"])
            self._note_repeated_batch(watch)

    def _note_repeated_batch(self, watch: RepeatedBatchWatch) -> None:
        if watch.repeated and self.cadence.spec != 1:  # (the cadence may change between steps)
            self._warn_once("repeated_batch", repeated_batch_message(self.cadence.spec))

    def _repeats(self) -> RepeatedBatchWatch:
        """The watch for a batch that repeats (full-batch training, repeated_batch.py); it
        warns only while the cadence skips searches (``opt.cadence`` may change between
        steps)."""
        watch = self.__dict__.get("_repeat_watch")
        if watch is None:
            watch = self._repeat_watch = RepeatedBatchWatch()
        return watch

    def _plain_step(self, setup: StepSetup, passes, loss_before, given):
        """A step without a search: the first pass at the η each block carries over, no trial
        forward and no host sync. Returns what ``step()`` returns."""
        k, table, etas, factors = setup.k, setup.table, setup.etas, setup.factors
        block_factors, applied_factors, mfac = (setup.block_factors, setup.applied_factors,
                                                setup.mfac)
        lead = _first_moving(block_factors)
        buffers, reduce, groups = setup.buffers, setup.reduce, self.param_groups
        g0 = groups[0]
        etas = self._cap_for_weight_decay(etas)  # as every trial is (η̄ may start above it)
        if self.layerwise and k > 1:
            # a block no accepted search has moved yet, in a run where others have been
            # (frozen from the start and unfrozen now, a group added later), takes no step
            # until one has (at init_step_size, 1 for SGD, it diverged: loss 0.1 -> 22),
            # and the next step searches it first. Before any search was accepted (its
            # first searches unresolved: a bf16 loss) every block applies its η, as a
            # global run does; a block at lr 0 is no concern of the search
            tested = self._tested_all(table)
            untested = [not t and f != 0.0 for t, f in zip(tested, block_factors)]
            if any(untested) and any(tested):
                etas = [0.0 if u else e for e, u in zip(etas, untested)]
                if self._hurrying(table, untested):
                    for g in groups:
                        g["next_search"] = min(g["next_search"], k + 1)
        try:
            with torch.no_grad():
                caps = self._length_caps(table, buffers)
                sums = passes.first([e * f for e, f in zip(etas, applied_factors)],
                                    caps=caps, factors=applied_factors)
                # (a collective under FSDP2, which also makes the telemetry's sums the model's)
                dd, sums = self._step_dd(buffers, sums, reduce)
        except BaseException:  # a pass raised, or an interrupt came between two launches
            with torch.no_grad():
                passes.rollback()
            raise
        finally:
            self._reshard_fsdp()
        self._last_dd, self._resumed_dd = (buffers, self._dd_over_a_skip(buffers, dd, passes)), None
        self._advance_unsettled(k, passes)

        # telemetry: device values, formed only when read (each op is a launch on a GPU), in
        # this step's blocks (a group added before the read must not lengthen the lists).
        # The functions keep the step's small tensors, not the passes or the optimizer: a
        # stats object kept for logging held the whole optimizer (θ, g, m, v), and the two
        # held each other, so `del opt` freed nothing until the cycle collector ran
        blocks, layerwise = self._report_blocks(), self.layerwise
        skipped, grad_norm = passes.skipped_reader(), passes.grad_norm_reader(sums)

        def applied(scaled: bool):
            moved = (~skipped()).float()  # a skipped step moved nothing
            per_block = etas if caps is None else [  # the η each block applied
                c.clamp(max=e) for c, e in zip((c for cap in caps for c in cap), etas)]
            units = mfac or [1.0] * len(per_block)  # (the step along the applied d)
            return report_per_block([moved * (e * f if scaled else e * u) for e, f, u
                                     in zip(per_block, applied_factors, units)], table, lead,
                                    layerwise, blocks)

        self.stats = StepStats(
            step=k, searched=False, step_size=lambda: applied(False),
            applied_step=lambda: applied(True), lr_factor=factors[table[lead][0]], trials=0,
            loss_before=loss_before if loss_before is not None else math.nan,
            loss_after=math.nan, loss_trial=math.nan,
            # (NaN on a skipped step, as a search's: its sums are zeros, not a ⟨g, d⟩)
            gd=lambda: total([s[:, 0].sum() for s in sums]) / (~skipped()).double(),
            grad_norm=grad_norm,
            non_descent=False, unresolved=False, exhausted=False, collapsed=False,
            skipped=skipped, searched_blocks=[],
            # (host floats, read now: read lazily, a stats object kept for logging later
            # reported the step sizes of whatever step came last)
            next_step_size=self._next_step_sizes(),
            forwards=g0["forwards"], backwards=g0["backwards"],
        )
        watch = self._repeats()
        if not watch.done:
            watch.plain(k, loss_before)
            self._note_repeated_batch(watch)
        return loss_before if given else None

    def _dd_over_a_skip(self, buffers, dd, passes) -> list:
        """The record of ‖d_b‖² the next step's length cap reads, after a pass without a search:
        this pass's, or, where the guard skipped it (its sums are zeros, and the cap read them
        as no cap: SGD with momentum moved on uncapped after any skip), the last one's, chosen
        on the device (the skip is not known on the host without a sync)."""
        last = self._last_dd
        if not passes.can_skip or last is None or last[0] is not buffers:
            return dd
        skipped = passes.skipped()
        return [torch.where(skipped.to(new.device), old, new) for old, new in zip(last[1], dd)]

    def _next_step_sizes(self):
        """The step size (per block, layer-wise) the next step starts from: every block's,
        those with nothing to train now too (frozen, or without elements), as it is kept."""
        every_block = self._all_blocks() if self.layerwise else self._block_table()
        return self._report(self._etas(every_block), every_block,
                            blocks=(every_block, ()) if self.layerwise else None)

    def _check_dropout_replayed(self, models) -> None:
        """The loop ran its own training forward (``loss=``, ``provide_loss``, a registered
        closure) without ``capture_rng()`` before it: the trials cannot replay its dropout masks,
        and the Armijo test compares losses under different masks (noise of the order of the
        decrease it tests). Looked for once, at the first such search; random numbers drawn
        elsewhere (augmentation in the forward, a mixup λ in the loss) are seen by the trials
        drawing them (:meth:`_rng_draw_looks_left`)."""
        if self.__dict__.get("_dropout_checked"):
            return
        self._dropout_checked = True
        active = [type(m).__name__ for model in models for m in model.modules() if _drops_out(m)]
        if active:
            self._warn_unreplayed_draws(f"the model has active dropout ({active[0]})")

    def _rng_draw_looks_left(self) -> bool:
        """Whether this search without a record of the RNG state looks at its first trial's
        draws (about 10 µs): the first 10 such searches, until warned."""
        looks = self.__dict__.get("_rng_draw_looks", 0)
        if looks >= 10 or "capture_rng" in self.__dict__.get("_warned", ()):
            return False
        self._rng_draw_looks = looks + 1
        return True

    def _warn_unreplayed_draws(self, what: str) -> None:
        self._warn_once("capture_rng", (
            f"{what} but the trials cannot replay the training forward's (dropout masks, "
            "random crops or flips, a mixup λ: each trial then sees other ones, and the Armijo "
            "test compares losses under different noise): call opt.capture_rng() before the "
            "training forward when you pass loss=, provide_loss() or step() with a registered "
            "closure (the closure form, step(closure), needs nothing)"))

    def _note_growth_without_schedule(self, table) -> None:
        """On noisy mini-batches the Armijo test accepts steps that fit the batch it is tested
        on; the user's schedule anneals them (docs/design.md §8). With no schedule attached an
        Adam-family η keeps growing (a review measured 0.2–0.3 and the loss rising back over
        2000 steps). Say so, once, when η̄ passes 20× its start while nothing anneals the
        applied step: lr has stayed at its peak lr_0 (lr_t / lr_0 = 1) in every training group
        for the last three searches. That is the case without a scheduler, and also with one
        that does not anneal (a constant LambdaLR, warmup then constant as in
        ``get_constant_schedule_with_warmup``), which the presence of ``initial_lr`` alone
        cannot tell from warmup + cosine (a review's run with warmup then constant grew η 45×
        and ended well above AdamW, without a word)."""
        if not self.rule.warn_unannealed or "no_schedule" in self.__dict__.get("_warned", ()):
            return
        lrs = [_lr_value(g["lr"]) for g in self.param_groups]
        live = [(lr, g) for lr, g in zip(lrs, self.param_groups) if lr > 0.0]
        # at the peak and not moved since the last search: a cosine's first thousandth stays
        # within 1e-6 of the peak (60 steps of 100k), where η̄ had long grown in the warmup
        before, self._lrs_at_search = self.__dict__.get("_lrs_at_search"), lrs
        at_peak = bool(live) and lrs == (before or lrs) and all(
            lr >= (1.0 - 1e-6) * _lr_value(lr_peak(g)) for lr, g in live)
        n = self.__dict__.get("_searches_at_peak", 0) + 1 if at_peak else 0
        self._searches_at_peak = n
        if n < 3:
            return  # the schedule lowers lr now (or reached its peak only just: OneCycleLR)
        avg = max(self._etas(table, key="step_size_avg"))
        start = self.__dict__.get("_growth_start", self._init_step_size)
        if avg >= 20 * start and not self._repeats().repeated:  # (a full batch: no noise for
            # the test to fit, η may grow)
            scheduled = any("initial_lr" in g or g["lr"] != g["lr_ref"] for g in self.param_groups)
            what = ("a schedule is attached, but lr has stayed at its peak lr_0 over the last "
                    "searches, so nothing anneals the applied step (a constant schedule, "
                    "warmup then constant, or the long stable phase of warmup-stable-decay? A "
                    "scheduler stepped once per epoch holds lr for an epoch too: if yours is, "
                    "this comes early)" if scheduled else
                    "the learning rate has not changed since construction: no schedule attached "
                    "(ReduceLROnPlateau, which leaves lr alone until a plateau, cannot be seen "
                    "from here)?")
            self._warn_once("no_schedule", (
                f"the searched step size has grown to {avg:.3g}, {avg / start:.0f}x "
                f"its start, and {what} On noisy mini-batches the Armijo test accepts steps that "
                "fit the batch it is tested on, and without annealing they keep growing (the "
                "loss can rise again over long runs). Attach the schedule you would use with "
                "AdamW (warmup + cosine): the applied step is η · lr_t / lr_0"))

    def _note_unresolved(self, result, resolution: float) -> None:
        """Searches whose predicted decrease is below the loss's float resolution take no step.
        With a bf16 / fp16 loss (a model cast to bf16 whose loss is computed in it) that is
        nearly every search: resolution 6% / 0.8% of the loss. Say so, once, at the third in
        a row; with an fp32 loss at the tenth (a loss scaled very small for ArmijoSGD's η)."""
        plain = (result.unresolved and not result.unchanged and not result.skipped
                 and not result.overflow)
        n = self.__dict__.get("_unresolved_searches", 0) + 1 if plain else 0
        self._unresolved_searches = n
        if n == 10 and resolution <= 1e-4:
            self._warn_once("unresolved", (
                f"{n} searches in a row predicted a decrease η·<g, d> below what the loss "
                f"resolves ({resolution:.1e} of its value, last loss {result.loss_before:.3g}) "
                "and took no step (η kept, or raised at most to its running average). At a "
                "minimum that is right; otherwise "
                "the loss is scaled very small for this step size (with ArmijoSGD, whose η is "
                "in the loss's units, scale the loss up, e.g. a mean over fewer terms or a sum), "
                "or η has collapsed because the trial forwards do not see what the training "
                "forward saw (other random numbers, a generator of your own, other data: their "
                "losses then differ from f(θ0) by more than any decrease, and only ever tinier "
                "steps pass)"))
        if n == 3 and resolution > 1e-4:
            self._warn_once("half_loss", (
                f"the loss is computed in half precision (resolution {resolution:.1e} of its "
                f"value), coarser than the decrease the Armijo test must see: {n} searches in a "
                "row could not tell a decrease from rounding and took no step (with "
                "cadence='every' the model does not train). Compute the loss in fp32 from "
                "fp32 logits, e.g. loss_fn(logits.float(), y)"))

    def _note_gradient_mismatch(self, result, resolution: float) -> None:
        """An exhausted search whose trials show the gradient is not the slope of the loss they
        evaluate. Two successive backtracks, both with a predicted fall η·⟨g, d⟩ the loss
        resolves, whose realised share of it, r = (f0 - f) / (η·⟨g, d⟩), stays below c without
        moving towards 1: curvature makes 1 - r shrink with η (by the backtrack factor per
        backtrack), so a ratio that holds still is the trial function's own slope, not the
        gradient's. A target recomputed from the trained weights inside the loss function and
        detached does that (an RL audit: A2C's (R - V).detach(), a TD target from the online
        network: η 1e-3 -> 1e-8, the only warning, about unresolved searches, after the
        collapse or never). Said once, at the first search that shows it twice."""
        if getattr(result, "exact", None) is not None or result.non_descent or \
                not result.block_gd:
            return
        f0, c, beta = result.loss_before, self.c, self.backtrack
        floor = 16.0 * resolution * abs(f0)
        share = []  # (η, r) of each trial whose predicted fall the loss resolves
        rises = []  # f - f0 of those trials
        for etas, f in result.history:
            fall = sum(e * g for e, g in zip(etas, result.block_gd))
            if math.isfinite(f) and fall > floor:
                share.append((max(etas), (f0 - f) / fall))
                rises.append(f - f0)
        still = sum(e2 < e1 and r2 < c and 1.0 - r2 > 0.5 * (1.0 + beta) * (1.0 - r1)
                    for (e1, r1), (e2, r2) in zip(share, share[1:]))
        last = rises[-3:]
        if still >= 2 and len(last) == 3 and min(last) > 0 and max(last) <= 2 * min(last) \
                and share[-3][0] >= 4 * share[-1][0]:
            # f(trial) - f0 about the same whatever η: a floor of the loss itself, not a slope
            # (a float32 Rosenbrock at f0 = 1.7e-11 rose 3.6e-13 at every trial, its rounding:
            # it was named a gradient mismatch, a target recomputed inside the loss)
            self._warn_once("gradient_mismatch", (
                f"a search exhausted its trials: the trial losses stayed "
                f"{min(last):.3g}-{max(last):.3g} above f0 = {f0:.3g} while η shrank "
                f"{share[-3][0] / share[-1][0]:.0f}x, so at these step sizes the loss does not "
                "follow the step: its change is below the loss's own rounding or noise at this "
                "point (a float32 loss near an exact minimum, computed from terms much larger "
                "than itself: compute it in float64, or stop, there is nothing left to gain "
                "at this precision), or the loss jumps at θ0 (a top-k router whose logits tie, "
                "a hard threshold, trials that see other random numbers, data or buffers than "
                "the training forward)"))
        elif still >= 2:  # (two such backtracks: one could be noise)
            shares = ", ".join(f"{r:.2f}" for _, r in share[-4:])
            self._warn_once("gradient_mismatch", (
                f"a search exhausted its trials although the steps they tried were short "
                f"enough for the gradient to predict the loss: the share of the predicted fall "
                f"η·<g, d> the trials realised stayed at {shares} (c = {c:g}) as η shrank, "
                "where curvature would bring it towards 1. The gradient is not the slope of "
                "the loss the trials evaluate, and η collapses. Usual causes: a target or "
                "advantage computed from the trained weights inside the loss function and "
                "detached (a TD target from the online network, A2C's (R - V).detach()): each "
                "trial recomputes it at its own point; compute it once before the step and let "
                "the loss function close over it; a gradient scaled up after backward (a "
                "GradScaler's scale not taken out); trials that see other random numbers, data "
                "or buffers than the training forward; a gradient of another loss than the one "
                "returned; a loss that jumps at θ0 (a top-k router whose logits tie)"))

    def _note_unchanged_trials(self, result) -> None:
        """Trial losses equal to f0 to the last bit, though a decrease was predicted, mean the
        trial forwards did not see the moved weights. Now and then that is a step below a bf16
        model's rounding; search after search it is the loop: say so, once. Not once a trial
        has moved the loss (the forwards do see the trial weights): a bf16 model whose η came
        down to its rounding (a search that rejected steps down to it) hides three first trials
        in a row without any fault of the loop."""
        f0 = result.loss_before
        if any(math.isfinite(f) and f != f0 for _, f in result.history):
            self._trials_moved_loss = True
        n = self.__dict__.get("_unchanged_searches", 0) + 1 if result.unchanged else 0
        self._unchanged_searches = n
        if n == 3 and not self.__dict__.get("_trials_moved_loss", False):
            self._warn_once("unchanged", (
                f"the trial forwards of {n} searches in a row returned exactly the loss at θ0 "
                f"(last {result.loss_before:.6g}) although a decrease was predicted, so no step "
                "was taken: they do not see the moved parameters. Is the loss computed from a "
                "copy of the model, cached outputs, or weights cast once outside the loss "
                "function? (A cast cached by torch.autocast is cleared before each trial.)"))

    def _report(self, values, table, lead: int = 0, blocks=None):
        """Telemetry per block: one value (global: block ``lead``'s, the first that moves),
        or a list over every group's blocks in ``block_names`` order (layer-wise), NaN for a
        block with no trainable tensor at this step (frozen), so that the list keeps its length
        and order while layers freeze. ``blocks``: ``_report_blocks()`` taken at the step, for
        a value formed later."""
        return report_per_block(values, table, lead, self.layerwise,
                                blocks or self._report_blocks())

    def _report_blocks(self):
        """(every block, the blocks without elements): what the layer-wise lists are over."""
        if not self.layerwise:
            return None
        return self._all_blocks(), self.__dict__.get("_empty_blocks", frozenset())

    def _positions(self, table, blocks) -> list[int]:
        """Where the table's ``blocks`` stand in the telemetry's list (layer-wise)."""
        if not self.layerwise:
            return blocks
        where = {key: i for i, key in enumerate(self._all_blocks())}
        return [where[table[b]] for b in blocks]

    def _all_blocks(self) -> list:
        """(group index, block index) of every block of every group, trainable or not."""
        return [(gi, lb) for gi, g in enumerate(self.param_groups)
                for lb in range(len(g.get("block_names") or (None,)))]

    # -- helpers -------------------------------------------------------------------------------
    def _ones2(self, device) -> Tensor:
        """A constant [1, 1] on ``device`` (the guard of a step that needs none), made once."""
        constants = self.__dict__.setdefault("_constants", {})  # (also when unpickled)
        ones = constants.get(device)
        if ones is None:
            ones = constants[device] = torch.ones(2, dtype=torch.float32, device=device)
        return ones

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

    def _share_of_ranks_given_a_loss(self, given: bool, reduce, device) -> float:
        """The share of the ranks that hand the loss at θ0 over (``loss=``, ``provide_loss``),
        read once per process, at its first search (one collective and one read, before any
        rank's forward). Under FSDP2 a share strictly between 0 and 1 is refused on every rank:
        the ranks without it would evaluate it by a forward, whose all-gathers meet the other
        ranks' loss all-reduce, and every rank hung (DDP's forward has no collective: there a
        rank without it evaluates it, to the same value). No rank with one: the check of the
        trial function at θ0 has no loss to compare with (it compared the trial function with
        itself: one forward more per run)."""
        share = read_floats([reduce(torch.full((1,), float(given), dtype=torch.float64,
                                               device=device))])[0]
        if self._sharded and 0.0 < share < 1.0:
            raise ValueError(
                f"the loss at θ0 was handed over (step(loss=...), provide_loss) on "
                f"{share:.0%} of the ranks only: under FSDP2 give it on every rank or on none "
                "(a rank without it evaluates it by a forward, whose all-gathers the other "
                "ranks would not join: every rank would hang). The step has been undone on "
                "every rank")
        return share

    @staticmethod
    def _probe_grad_sq(buffers) -> dict:
        """Each buffer's per-block Σ g², by buffer index, for the guard."""
        return {i: b.backend.grad_sq_norm(_flat_grad(b), b.layout, table=_table(b))
                for i, b in enumerate(buffers)}

    @staticmethod
    def _loss_over_ranks(f0, device, reduce, guard=None):
        """(probe, mean) of the losses the ranks hold at a step without a search: the probe,
        for the skip guard, is finite iff every rank's loss is (0 for a rank without one) and
        every rank's ``guard`` (its Σ g²; None: not read); the mean, for the telemetry, is over
        the ranks that have a loss. Every rank takes part, with a loss or without: a
        collective on some ranks only would pair with the next one."""
        # three entries on every rank, whatever it reads: the collective's size must not
        # depend on a rank's settings (check_finite, max_grad_norm), or the ranks hang
        mine = torch.zeros(3, dtype=torch.float64, device=device)
        if f0 is not None:
            mine[0], mine[1] = to_device(f0.double().reshape(()), device), 1.0
        if guard is not None:  # (its own entry: the reported loss stays the loss)
            mine[2] = guard.double().reshape(()) * 0
        total = reduce(mine)  # (the mean over ranks: the scale cancels in the ratio)
        return total[0] + total[2], total[0] / total[1]

    def _warn_zero_gradient(self, k: int) -> None:
        """A search whose gradient is zero everywhere takes no step: most often the closure
        never called ``backward()`` (or zeroed the gradient after it). Say so, once."""
        self._warn_once(
            "zero_grad", f"the gradient is zero everywhere at step {k}, so the search takes no "
            "step. At an exact minimum that is right; otherwise, does the closure call "
            "loss.backward() (after zero_grad, not before), or, with step(loss_fn=..., "
            "loss=...), did backward run before step?")

    def _grad_versions(self) -> dict:
        """Each gradient (by a weak reference: ids of freed tensors are reused, and a strong one
        would hold a dropped gradient through the closure) and its version and storage: which
        ones a closure then writes (:meth:`_unscale_gradients`)."""
        return {id(p): (weakref.ref(p.grad), _written_mark(p.grad))
                for _, p in self._trainable() if p.grad is not None}

    def _scale_to_check(self, scaler, from_closure: bool) -> float | None:
        """The scale of the GradScaler whose ``step`` called this search, where the loss it was
        handed may be ``scaler.scale(loss)`` (see ``_refuse_scaled_loss``); None when there is
        nothing to check. Checked once, at the first search (one forward, one host read)."""
        if not from_closure:  # (the closure form found its scaler already)
            scaler = calling_grad_scaler(self)
        scale = scaler.get_scale() if scaler is not None else 0.0
        if scale < 16.0:  # (2**16 at the start; near 1 a scaled loss is the loss)
            self._scale_checked = True
            return None
        return scale

    def _check_replayed(self, f0: Tensor, at_theta0: Tensor, what: str) -> bool:
        """The trials must evaluate the function the training forward evaluated: same batch,
        same random numbers, same state. Where they do not, every Armijo test compares the
        losses of two functions, and their difference, not the step, decides: a diffusion
        loss whose noise came from a ``torch.Generator`` of the loop's own drew new noise in
        each trial and η fell from 1e-3 to 6e-9 in 300 steps, without a word (a user's audit).
        The first search of a run in this process evaluates ``what`` at θ0, which must give
        the training forward's loss; a difference above 1e-3 of it (far above what other
        kernels for the same function, a compiled or no-grad path, change in fp32 or bf16
        autocast) is named in a warning. In a distributed run the means over the ranks are
        compared (one all-reduce more, once), so every rank warns alike."""
        f0, f = float(f0), float(at_theta0)
        if not (math.isfinite(f0) and math.isfinite(f)):
            return False  # (nothing to compare: looked at again at the next search)
        diff = abs(f - f0)
        if diff <= 1e-3 * abs(f0) + 1e-6:
            return True
        self._warn_once("replay", (
            f"{what} at θ0 gives {f:.6g} where the training forward gave {f0:.6g} "
            f"({diff / max(abs(f0), 1e-30):.2%} apart): the trial forwards do not evaluate "
            "the function the training forward did, so each Armijo test compares two "
            "functions, their difference decides instead of the step, and η can shrink towards "
            "0. Usual causes: random numbers from a generator of your own (a torch.Generator "
            "passed to randn/randint, np.random.default_rng: the trials replay only the global "
            "generators; draw from those, or set your generator's state at the start of the "
            "trial function); opt.capture_rng() called before random numbers drawn for the "
            "training forward that the trial function draws again (call it right before the "
            "first draw the trial function repeats); a buffer the training forward updates in "
            "a module the trials do not restore (a loss module's centre or queue outside "
            "model=: pass model=nn.ModuleList([model, loss_module]); with loss=, no "
            "opt.capture_rng() before that forward); a trial function on other data than the "
            "training forward (a batch fetched inside it, random draws between micro-batches: "
            "docs/integrations.md); a training forward compiled with the function that calls "
            "step() (torch.compile(train_step)), where the trials run eagerly: compile the model "
            "instead. Looked at once, at the first search"))
        return True

    def _refuse_scaled_loss(self, f0: Tensor, at_theta0: Tensor, scale: float) -> None:
        """A loss handed over as ``scaler.scale(loss)`` (``loss=``, ``provide_loss`` or the
        closure's return value beside a ``loss_fn``) is compared with unscaled trial losses:
        every first trial passes, η grows without bound. The loss function at θ0 itself (not a
        trial point, which a step may have cut by any factor) tells it: f0 near the scale times
        it is that mistake. Single-process runs only (a rank-local decision could part the
        ranks). Raised inside the search, so θ and the state go back to before the step."""
        self._scale_checked = True
        f0, f = float(f0), float(at_theta0)
        if not (math.isfinite(f0) and math.isfinite(f)) or f == 0.0:
            return
        if scale / 2 <= f0 / f <= 2 * scale:
            raise ValueError(
                f"the loss handed to the step ({f0:.6g}) is {f0 / f:.4g} times the loss the "
                f"loss function gives at the same parameters ({f:.6g}), about the GradScaler's "
                f"scale ({scale:g}): it looks like scaler.scale(loss). Pass the unscaled loss "
                "(loss=loss, provide_loss(loss), or a closure that calls "
                "scaler.scale(loss).backward() and returns loss): the trial losses are "
                "unscaled, so every first trial would pass. The step has been undone")

    @torch.no_grad()
    def _unscale_gradients(self, scaler, before: dict) -> None:
        """Divide the gradients the closure just computed by the scale its ``scaler.scale(loss)``
        applied (as ``GradScaler.unscale_`` does; a non-finite result is the guard's to skip).
        Only those it wrote (new tensors, written in place, or given new storage through
        ``.data =``, as ``before`` tells): a closure that returns the loss of gradients computed
        before the call, which GradScaler has unscaled already, had them divided a second time
        (1024× too small). (A write through ``p.grad.data.copy_`` bumps no version and is not
        seen: write gradients with ``backward`` or ``p.grad.copy_``.)"""
        scale = getattr(scaler, "_scale", None)
        if scale is None:  # (torch keeps the scale there; else ask, which syncs)
            scale = torch.tensor(scaler.get_scale())
        inv = scale.double().reciprocal().float()
        by_device: dict = {}
        for _, p in self._trainable():
            if p.grad is None:
                continue
            ref, mark = before.get(id(p), (None, None))
            if ref is None or ref() is not p.grad or mark is None or _written_mark(p.grad) != mark:
                by_device.setdefault(p.grad.device, []).append(p.grad)
        for device, grads in by_device.items():
            torch._foreach_mul_(grads, inv.to(device))

    def _lr_factor(self, group) -> float:
        """lr_t / lr_0: the scheduler's multiplier of the applied step (docs/design.md §2.6), at
        most 1: a longer step than the search accepted is one the Armijo test never saw."""
        lr_t = _lr_value(group["lr"])
        lr_0 = _lr_value(lr_peak(group))
        if lr_0 == 0.0:
            if lr_t == 0.0:
                return 0.0
            # a scheduler's record of 0 (built while the group was frozen) is no peak: the
            # group's own lr_0, taken when it was unfrozen
            lr_0 = _lr_value(group.get("lr_ref", 0.0)) or \
                self._lr_0_of_a_group_built_frozen(group, lr_t)
        self._note_hand_schedule_below_default(group, lr_t, lr_0)
        factor = lr_t / lr_0
        if factor > 1.0 + 1e-6:
            self._warn_lr_above_peak(lr_t, lr_0)
        # a schedule's rounding at its peak (LinearLR ends at 1 - 2e-16; 1 - 1e-7 with a
        # float32 tensor lr) is the peak: the step applied is then exactly the one tested (and
        # stats' loss_after known); the same tolerance as above it
        return 1.0 if factor >= 1.0 - 1e-6 else factor

    def _lr_0_of_a_group_built_frozen(self, group, lr_t: float) -> float:
        """lr_0 of a group built (or scheduled) at lr 0 whose lr is now above 0 (unfrozen by
        writing an lr into it): the lr at which its factor is the other groups' factor now, as
        if it followed their schedule (the first moving group's), else lr_t. Kept as the
        group's ``lr_ref`` (checkpoints carry it). With lr_0 = 0 the factor was 1 at any lr:
        the unfrozen backbone of a cosine run moved by the full searched step to the end while
        the head's fell to 2% of it (a scheduler user's audit)."""
        lead = next((min(1.0, _lr_value(g["lr"]) / peak) for g in self.param_groups
                     if g is not group and (peak := _lr_value(lr_peak(g))) > 0.0
                     and _lr_value(g["lr"]) > 0.0), None)
        lr_0 = lr_t / lead if lead else lr_t
        group["lr_ref"] = lr_0
        self._warn_once("lr_0 of a frozen group", (
            f"a param group whose lr was 0 at construction (or when its scheduler was built) "
            f"trains now at lr {lr_t:g}: its lr_0, the lr at which it applies the searched step "
            f"in full, is taken as {lr_0:g}, " + (
                "where its factor lr_t / lr_0 is the other groups' now (it follows their "
                "schedule from here)" if lead else "its lr now (no other group has one)") +
            ". Set group['lr_ref'] to its peak if that is not what you want"))
        return lr_0

    def _note_hand_schedule_below_default(self, group, lr_t: float, lr_0: float) -> None:
        """The default lr (1.0) with a schedule written by hand in absolute values (a warmup
        to 5e-4, nanoGPT's get_lr, a constant 3e-4): lr_0 is the lr given at construction, so
        every applied step is η·lr_t, 2000x short, silently (a scheduler user's audit: 0.53
        against 0.43 in loss). Said once, where no scheduler recorded its start and the lr
        never reached 1% of lr_0 in this process, when it falls after rising (a warmup's end,
        nanoGPT's get_lr). Not where the lr rose past 1% (a warmup in units of lr_0), nor for
        a process that met the group mid-run below 1% and saw no rise (a resume near a
        decay's end, a plateau schedule)."""
        if lr_0 != 1.0 or lr_t <= 0.0 or group.get("initial_lr") is not None or \
                group.get("max_lr") is not None or "hand lr" in self.__dict__.get("_warned", ()):
            return
        seen = self.__dict__.setdefault("_lr_seen", {})
        # (the record holds its group, so no other live group has its id; one carried by a
        # pickle or a copy may name another process's or object's)
        held, last, rose, top = seen.get(id(group), (group, lr_t, False, lr_t))
        if held is not group:
            last, rose, top = lr_t, False, lr_t
        rose = rose or lr_t > last
        top = max(top, lr_t)
        seen[id(group)] = (group, lr_t, rose, top)
        _forget_replaced_groups(seen, self.param_groups)
        if top >= 0.01:
            return
        # (only there: a constant or stepped warmup in units of lr_0 stays below 1% for 200
        # steps and more, Detectron's x0.001 for 1000, and a constant lr or a decay written by
        # hand cannot be told from it; reviews)
        if rose and lr_t < last:
            self._warn_once("hand lr", (
                f"lr has stayed below 1% of lr_0 = 1 (the lr given at construction, the "
                f"default), at most {top:g}: each step applies the searched step size times "
                f"lr_t / lr_0 = {lr_t:g}. A schedule written into the groups by hand, in "
                "absolute values (nanoGPT's get_lr: a warmup to 5e-4, then a decay), needs "
                "its peak as the optimizer's lr: ArmijoAdam(params, lr=peak)"))

    def _warn_lr_above_peak(self, lr_t: float, lr_0: float) -> None:
        self._warn_once(
            "lr_peak", f"lr rose to {lr_t:g}, above lr_0 = {lr_0:g} (the group's 'max_lr', "
            "else 'initial_lr', else the lr given at construction or taken from a torch "
            "optimizer's checkpoint). The applied step is "
            "η · lr_t / lr_0 with η the searched step size; a multiplier above 1 would apply "
            "steps longer than the search accepted, so it is capped at 1 and the schedule acts "
            "only where it lowers lr below lr_0. Give the schedule's peak as the optimizer's lr "
            "(a warmup then starts below it), or use OneCycleLR, which records its max_lr. "
            "CyclicLR overwrites both lr and initial_lr with its base_lr and keeps max_lr to "
            "itself: set each group's 'max_lr' to the cycle's peak after building it. A torch "
            "optimizer's checkpoint saved mid-warmup by a schedule written by hand gives the lr "
            "at the save: set each group's 'lr_ref' to the schedule's peak after loading it")

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
            skipped = bool(flag)
            if skipped:
                self._warn_skipped(k, self._scaled_closure)
            return self._advance(k, folded=() if skipped else passes.groups)
        if self._skip_host is None:  # one pinned flag and event, reused: settled before reuse
            self._skip_host = (torch.empty((), dtype=torch.bool, pin_memory=True),
                               torch.cuda.Event())
        host, event = self._skip_host
        host.copy_(flag, non_blocking=True)
        event.record(torch.cuda.current_stream(flag.device))
        self._pending_skip = (host, event, passes.groups, k, self._scaled_closure)
        self._advance(k, folded=passes.groups)

    def _settle_skip(self) -> None:
        """Take back the fold count of a GPU step without a search that turned out skipped."""
        pending, self._pending_skip = self._pending_skip, None
        if pending is None:
            return
        host, event, groups, k, scaled = pending
        event.synchronize()
        if bool(host):
            for gi in groups:
                self.param_groups[gi]["folded"] -= 1
            self._warn_skipped(k, scaled)

    def _warn_skipped(self, k: int, scaled_closure: bool) -> None:
        """A skipped step leaves θ and the state as they were, where torch's optimizers would
        write NaN into them: safe, but a loop that skips (a fully masked batch whose mean loss
        is 0/0, an overflow in bf16) loses those batches' gradients without a word otherwise.
        GradScaler's own skips do not call ``step``; the overflows of a closure that
        ``scaler.step(opt, closure)`` hands over (accelerate's fp16 wrapper) are this step's,
        and as routine: not warned of either."""
        if scaled_closure:
            return
        self._warn_once(
            "skipped", f"step {k} was skipped: its gradient or its loss f(θ0) was not finite "
            "(inf or NaN), so θ and the optimizer state were left as they were. Later skips "
            "are not warned about: stats.skipped says which steps were (a loss that is 0/0 on "
            "a batch whose targets are all masked is one cause)")


__all__ = ["ArmijoOptimizer"]
