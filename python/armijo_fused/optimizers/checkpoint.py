"""Checkpoints and copies of an :class:`~armijo_fused.optimizers.base.ArmijoOptimizer`:
``state_dict`` / ``load_state_dict`` (torch.optim checkpoints taken over, foreign or mismatched
ones refused by name before anything changes) and copy / pickle support. A mixin: the methods
use the optimizer's attributes as ``base.py`` sets them up."""

from __future__ import annotations

import json
import warnings
from numbers import Integral

import torch
from torch import Tensor

from ..directions.base import check_number
from ..storage.sharded import is_dtensor
from .search import counter_error
from .settings import cap_step_sizes
from .torch_compat import from_torch_state_dict, is_torch_state_dict

#: a layer-wise group's entries with one value per block
_PER_BLOCK = ("step_size", "step_size_avg", "step_length", "collapsed", "block_owner",
              "block_searched_at", "block_tested")
#: the keys only a layer-wise group has
_LAYERWISE_ONLY = ("block_names", "block_owner", "block_searched_at", "block_tested",
                   "block_cursor", "blocks_by")


#: entries of the first param group that only a checkpoint fills (live: None, so that a checkpoint
#: flattened by torch.distributed.checkpoint, which keeps only the keys the live groups have,
#: carries them back): the last pass's ‖d_b‖² and the tensors that trained then, and the
#: positions of the tensors a forward writes
_CHECKPOINT_ONLY = ("last_dd", "last_dd_trainable", "forward_writes")

#: entries of a group whose structure changes with the run (None in a fresh optimizer, lists of a
#: length that varies later). A checkpoint holds each list as one JSON text, a leaf: torch's
#: get/set_optimizer_state_dict with ``full_state_dict=True`` lays a saved checkpoint's leaves
#: onto the live optimizer's, and a saved list where a fresh optimizer has None raised KeyError
#: (``param_groups.0.loss_trend.0``), or, at another length, would have mixed the two
_RECORDS = ("loss_trend", *_CHECKPOINT_ONLY)


def _record_as_text(value):
    return json.dumps(value) if isinstance(value, list) else value


def _another_order(saved_group: dict, group: dict, saved: dict, known: set) -> str:
    """Where the saved group's state shapes are this group's in another order, say so: the
    parameters are matched by position, as torch matches them, and a model whose parameters
    were registered in another order (pruning re-registers ``weight`` as ``weight_orig`` after
    ``bias``; the saving run built the optimizer before pruning) was called another model."""
    def shape_of(pid):
        return next((tuple(v.shape) for k, v in saved.get(pid, {}).items()
                     if torch.is_tensor(v) and k in known), None)

    shapes = [shape_of(pid) for pid in saved_group["params"]]
    if None in shapes or sorted(shapes) != sorted(tuple(p.shape) for p in group["params"]):
        return ""
    return (", or for these parameters in another order: its tensors' shapes are these ones "
            "reordered. The state is matched by position, as torch's: build the optimizer from "
            "the parameters in the order the saving run had them (pruning registers weight "
            "again as weight_orig, after bias; registration order changes model.parameters())")


def _record_from_text(key: str, value):
    """A record as the checkpoint holds it, back as the list it was (a list, from an earlier
    version's checkpoint or an edit, is taken as it is), its shape checked: one that is not what
    ``state_dict()`` writes is refused by name before anything changes (a ``last_dd`` of
    numbers, not lists, loaded and the next step raised a bare TypeError after θ had moved).
    ``loss_trend``'s values are checked with the policy's other entries."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"the checkpoint's {key} is not the JSON text of a list: "
                             f"{value[:60]!r}") from None
    if value is None or key == "loss_trend":
        return value

    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    expected = {"last_dd": ("a list per buffer of the blocks' ‖d‖²", number),
                "last_dd_trainable": ("a list per group of 1/0 by tensor",
                                      lambda x: x in (0, 1)),
                "forward_writes": ("tensor positions", None)}[key]
    what, item = expected
    if item is None:  # a flat list of positions
        good = isinstance(value, list) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
    else:
        good = isinstance(value, list) and all(
            isinstance(row, list) and all(item(x) for x in row) for row in value)
    if not good:
        raise ValueError(f"the checkpoint's {key} is not {what}: {str(value)[:60]!r} "
                         "(edited, or not this optimizer's)")
    return value


class CheckpointMixin:

    #: what a copy or a pickle carries besides torch's (defaults, state, param_groups): the
    #: configuration, with the model registered as ``model=`` (a pickle of the optimizer alone
    #: then holds a copy of it; pickled with the model, one model). The rest is rebuilt: the
    #: flat buffers (from the state, at the next step), device handles, what a step in flight
    #: holds, and a registered closure (it evaluates the original model, not the copy:
    #: register it again). Not ``self.__dict__`` wholesale: a
    #: scheduler puts a ``step`` wrapper there that calls the original optimizer.
    _CARRIED = ("rule", "policy", "cadence", "c", "backtrack", "max_trials", "max_grad_norm",
                "check_finite", "backend", "tile", "layerwise", "block_search", "merge_below",
                "exact_revert", "candidates", "flat", "momentum_search", "process_group",
                "_modules",
                "_resumed_dd", "_gathered_steps", "_init_step_size")

    def __repr__(self) -> str:
        """torch's listing of the groups, without the entries only a checkpoint fills (always
        None in a live optimizer)."""
        lines = [type(self).__name__ + " ("]
        for i, group in enumerate(self.param_groups):
            lines += [""] * (i > 0) + [f"Parameter Group {i}"]
            lines += [f"    {key}: {group[key]}" for key in sorted(group)
                      if key != "params" and not (key in _CHECKPOINT_ONLY and group[key] is None)]
        return "\n".join(lines) + "\n)"

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
        self._follow_moved_tensors()  # (as state_dict(): a copy must not lose a move's count)
        out = super().__getstate__()
        out.update({k: self.__dict__[k] for k in self._CARRIED if k in self.__dict__})
        # the next plain step's length cap, as state_dict() has it
        out["_resumed_dd"] = self._saved_dd()
        # the tensors a forward writes (kept around each trial), by position: ids change
        out["_forward_writes"] = self._forward_write_positions()
        # block names are keyed by the tensors' ids, which a copy changes: carry them by position
        out["_names"] = [[self._names.get(id(p)) for p in g["params"]] for g in self.param_groups]
        # ... and the groups name_parameters() may still cut, by position too
        unnamed = self.__dict__.get("_unnamed_groups", ())
        out["_unnamed_groups"] = [i for i, g in enumerate(self.param_groups) if id(g) in unnamed]
        return out

    def __setstate__(self, state: dict) -> None:
        # torch's __setstate__ adds 'differentiable' to the defaults (for its own optimizers);
        # a group added later took it, where one added without a resume does not
        had = "differentiable" in (state["defaults"] if "defaults" in state else self.defaults)
        self._set_state(state)
        if not had:
            self.defaults.pop("differentiable", None)

    def _set_state(self, state: dict) -> None:
        if "defaults" not in state:  # torch's load_state_dict: only state and param_groups
            return super().__setstate__(state)
        names = state.pop("_names", None)
        unnamed = state.pop("_unnamed_groups", ())
        writes = state.pop("_forward_writes", ())
        super().__setstate__(state)  # torch: the attributes, its hook dicts, the step wrapper
        self._take_forward_writes(writes)
        resumed = self.__dict__.get("_resumed_dd")
        if resumed is not None and not isinstance(resumed, tuple):
            # an older pickle: its record was carried only while the same tensors trained
            self._resumed_dd = (resumed, self._trainable_mask(self._trainable_key()))
        self._unnamed_groups = {id(self.param_groups[i]) for i in unnamed}
        for key in ("_buffers", "_buffer_key", "_closure", "_pending_rng", "_pending_bufs",
                    "_trial_sources", "_pending_loss",
                    "_pending_skip", "_skip_host", "_last_dd", "_held", "_returned",
                    "_block_names_of", "_group_of"):
            setattr(self, key, None)
        self._sharded, self._constants, self.stats = False, {}, self._stats_before_any_step()
        self._scaled_closure = False
        self._names = {id(p): n for g, ns in zip(self.param_groups, names or [])
                       for p, n in zip(g["params"], ns) if n is not None}
        if not self._names and getattr(self, "_modules", None):
            self._names = {id(p): n for n, p in self._modules[0].named_parameters()}

    def _saved_dd(self) -> tuple | None:
        """The last pass's ‖d_b‖², behind the next plain step's length cap, as host floats (one
        read), per buffer in buffer order, with the buffers' trainable tensors (per group, 1/0
        by position): a resumed run or a copy caps as this one would, which is only while the
        same tensors train (a tensor frozen in between: the buffers are rebuilt, no cap).
        None: no pass yet."""
        last = self._last_dd
        if last is None:  # no pass since a load or a copy: what that carried, not yet used
            return self._resumed_dd
        if self._tensors_replaced() or any(b.moved() for b in self._buffers or ()):
            return None  # (the next step rebuilds the buffers: no cap, here or in a copy)
        # (FSDP2: reduced, the same on every rank)
        return [dd.tolist() for dd in last[1]], self._trainable_mask(self._buffer_key)

    def _tensors_replaced(self) -> bool:
        """Has a group gained or lost tensors, or a tensor that trained at the last pass and
        trains now been replaced by another, since the buffers were built? (A tensor that
        only stopped or started training is what the record's mask tells.)"""
        now, built = self._trainable_key(), self._buffer_key
        if now == built:
            return False
        return built is None or len(now) != len(built) or any(
            len(a) != len(b) or a[0] != b[0] or any(x and y and x != y for x, y in zip(a[1:], b[1:]))
            for a, b in zip(now, built))

    @staticmethod
    def _trainable_mask(key) -> list | None:
        """Per group, 1 for each tensor that trains, 0 for each frozen one (from a
        ``_trainable_key``), by position: what a checkpoint can hold."""
        return None if key is None else [[int(x != 0) for x in g[1:]] for g in key]

    def _forward_write_positions(self) -> list:
        """The positions (over every group's tensors, in order) of the tensors a forward was
        seen to write (``_note_forward_writes``): ids do not survive a copy or a checkpoint."""
        writes = self.__dict__.get("_forward_writes", ())
        return [i for i, p in enumerate(p for g in self.param_groups for p in g["params"])
                if id(p) in writes]

    def _take_forward_writes(self, positions) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        self._forward_writes = {id(params[i]) for i in positions or () if 0 <= i < len(params)}

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
        """The optimizer's state as a dict, as torch's, with what a resume needs to continue
        bit for bit:

        * ``state``: per parameter (by index), the direction rule's buffers (``exp_avg``,
          ``exp_avg_sq`` for the Adam family; ``momentum_buffer`` with momentum) and, for
          bf16/fp16 parameters, the fp32 ``master`` weights;
        * ``param_groups``: each group's hyperparameters and the line search's: ``step_size``
          (η) and ``step_size_avg`` (η̄), ``step_length`` (η·‖d‖ of the last search, behind the
          cap on steps without a search), ``collapsed``, the counters ``step``, ``folded`` (steps
          whose gradient entered the moments), ``searches``, ``next_search``,
          ``search_interval``, ``forwards``, ``backwards``, and ``lr_ref`` (lr_0 of the lr
          factor); layer-wise, η, η̄, ``step_length`` and ``collapsed`` are lists over the
          group's blocks, with ``block_names``, ``block_owner`` (merges), ``block_searched_at``,
          ``block_tested``, ``block_cursor`` and ``blocks_by``; the first group carries
          ``last_dd`` (‖d‖² per block of the last pass), ``last_dd_trainable`` (which tensors
          trained then, 1/0 by position) and ``forward_writes`` (the positions of tensors a
          forward was seen to write in place, or None), and, with the trend guard,
          ``loss_trend`` (its windows). These four are None or the JSON text of a list: one
          leaf each, whose length may differ between the checkpoint and a fresh optimizer
          (torch.distributed.checkpoint's ``full_state_dict=True`` lays the saved leaves onto
          the live ones);
        * ``direction``: the rule's name.

        Tensors are the live ones, as torch's: save or copy the dict before the next step
        (the counters and the layer-wise lists in it are copies). Post-hooks see the whole
        dict, ``direction`` included. Refused inside ``step()`` (a trial's hook), where the
        state is mid-step."""
        self._refuse_mid_step("state_dict()")
        self._settle_skip()  # the checkpoint must hold the count of the steps that folded
        # tensors moved into a group of their own since the last step bring their count now,
        # as the next step's build would (a resume had them start again at 0)
        self._follow_moved_tensors()
        g0 = self.param_groups[0]
        saved_dd = self._saved_dd()
        g0["last_dd"], g0["last_dd_trainable"] = saved_dd or (None, None)
        g0["forward_writes"] = self._forward_write_positions() or None
        # post-hooks run here, once the dict is whole (torch's would run before "direction")
        post = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = type(post)()
        try:
            out = super().state_dict()  # copies the groups' dicts, not the lists in them
        finally:
            for key in _CHECKPOINT_ONLY:  # a checkpoint's entries, not live state
                g0[key] = None
            self._optimizer_state_dict_post_hooks = post
        # the layer-wise lists (η per block, ...) are changed in place by the next steps: a
        # checkpoint held across them, or edited by a hook, must not share them
        for group in out["param_groups"]:
            for key, value in group.items():
                if key in _RECORDS:
                    group[key] = _record_as_text(value)
                elif isinstance(value, list):
                    group[key] = [list(x) if isinstance(x, list) else x for x in value]
        # a model cast to bf16/fp16 since the last step: its fp32 θ, still in the store, is the
        # master the next step keeps; the checkpoint holds it too (it had none, and the resumed
        # run went on from the rounded weights: 3.5e-3 off the uninterrupted one). Into the
        # checkpoint only: the live state is not changed by taking one
        masters = self._masters_of_a_cast(self._buffers)
        if masters:
            index = {id(p): i for i, p in enumerate(
                p for g in self.param_groups for p in g["params"])}
            for pid, master in masters.items():
                i = index.get(pid)
                if i is not None and i in out["state"]:
                    out["state"][i] = {**out["state"][i], "master": master}
        # the direction rule: adam and nadam (momentum and nesterov) keep the same state
        # and hyperparameters, so nothing else in a checkpoint tells them apart
        out["direction"] = self.rule.name
        for hook in post.values():
            result = hook(self, out)
            if result is not None:
                out = result
        return out

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
            with torch.inference_mode(False):  # (the store it builds must outlive the region)
                self._load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre
            self._optimizer_load_state_dict_post_hooks = post
        for hook in post.values():
            hook(self)

    def _load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict.get("param_groups")
        if isinstance(groups, list) and all(isinstance(g, dict) for g in groups):
            # (betas: a tuple again where a checkpoint's traversal made it a list, as
            # torch.distributed.checkpoint's full_state_dict does)
            state_dict = {**state_dict, "param_groups": [
                {k: _record_from_text(k, v) if k in _RECORDS else
                 tuple(v) if k == "betas" and isinstance(v, list) else v for k, v in g.items()}
                for g in groups]}
        from_torch = is_torch_state_dict(state_dict)
        if from_torch:
            state_dict = from_torch_state_dict(type(self).__name__, self.rule, self.param_groups,
                                               state_dict, layerwise=self.layerwise)
        else:
            state_dict = self._check_saved_step_sizes(state_dict)
            self._check_saved_blocks(state_dict)
        self._check_loadable(state_dict)
        self._check_saved_hyperparameters(state_dict)
        self._check_saved_values(state_dict)
        self._note_other_direction(state_dict)
        state_dict = self._step_sizes_along_ours(state_dict)
        if not self.layerwise:
            state_dict = self._global_from_layerwise(state_dict)
        saved = state_dict.get("state", {})
        self._group_of = None  # (the loaded groups are new ones: no tensor has moved)
        super().load_state_dict(state_dict)
        if from_torch:
            # the run's start is the torch optimizer's lr, not init_step_size (the warning about
            # a step size grown without a schedule measures from it); set once the load holds
            self._growth_start = max(
                v for g in state_dict["param_groups"] for v in (
                    g["step_size"] if isinstance(g["step_size"], list) else [g["step_size"]]))
        self._pending_skip = None  # a flag of the steps before the load is no longer ours
        self._repeats().restart()  # (nor is what the watch waited for: it looks again)
        self._last_dd = None
        g0 = self.param_groups[0]
        # taken up by _length_caps (if the same tensors train then)
        # (a checkpoint of an earlier version has no mask: it held a record only while the
        # same tensors trained, those that train here)
        self._resumed_dd = None if g0.get("last_dd") is None else (
            g0["last_dd"], g0.get("last_dd_trainable") or
            self._trainable_mask(self._trainable_key()))
        self._take_forward_writes(g0.get("forward_writes"))
        for key in _CHECKPOINT_ONLY:
            g0[key] = None
        cap_step_sizes(self.param_groups, self.policy)  # this optimizer's max_step holds
        for g in self.param_groups:
            # checkpoints from before ``folded``: no skip recorded
            g.setdefault("folded", g["step"])
            g.setdefault("collapsed", [0] * len(g["step_size"]) if isinstance(
                g["step_size"], list) else 0)  # ... or before ``collapsed``
            g.setdefault("step_length", [0.0] * len(g["step_size"]) if isinstance(
                g["step_size"], list) else 0.0)  # ... or before the length cap (0: none)
        g0.setdefault("loss_trend", None)  # ... or before the loss-trend guard
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if self.layerwise:
            # rebuild the store: the build checks the checkpoint's blocks against the model's
            # (and sets them up for a global checkpoint, whose groups have none, as for a fresh
            # optimizer)
            self._buffers, self._blocks_loaded = None, True
        # The values go into the flat buffers now, built here if need be, and the checkpoint's
        # tensors are not kept: they may be a live optimizer's, which go on changing with its
        # steps (torch.distributed.checkpoint between two optimizers in one process), and a copy
        # kept until the first step held m and v twice (4 copies of θ above AdamW's at resume,
        # 6 while the caller still held the loaded dict). FSDP2 shards and meta tensors wait
        # for the first step, on copies.
        later = any(is_dtensor(p) or p.device.type == "meta" for p in params)
        self._deferred_load = later  # (the build then lets the loaded masters win)
        for pid, p in zip(ids, params):
            # copies where the store will not take the values in now: FSDP2 shards and meta
            # tensors (at the first step), frozen tensors (which the store does not hold)
            copy = (later and self._buffers is None) or not p.requires_grad
            for key, value in saved.get(pid, {}).items():
                if isinstance(value, Tensor) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, copy=copy)
        if not later:
            self._loading = True
            try:
                with torch.no_grad():
                    self._sync_buffers()
            finally:
                self._loading = False

    def _step_sizes_along_ours(self, state_dict: dict) -> dict:
        """SGD momentum: a checkpoint's step sizes measured along another direction than this
        optimizer's (``momentum_search``; a checkpoint from before the option measured them
        along the momentum direction d) in this one's units, η_g = η_d / (1 - μ) and back, so
        that the first steps after the load apply what the saved run applied (they were 10×
        off at μ = 0.9). Returns a copy where anything changes; the caller's dict is kept."""
        if not self.rule.heavy_ball:
            return state_dict
        ours, groups, changed = self.momentum_search, [], False
        for group in state_dict.get("param_groups", []):
            along = group.get("step_size_along", "direction")
            if along != ours:
                mu = float(group.get("momentum", 0.0))
                f = 1.0 / (1.0 - mu) if ours == "gradient" else 1.0 - mu
                group = dict(group, step_size_along=ours)
                for key in ("step_size", "step_size_avg", "step_length"):
                    if key in group:
                        v = group[key]
                        group[key] = [x * f for x in v] if isinstance(v, list) else v * f
                changed = True
            groups.append(group)
        return dict(state_dict, param_groups=groups) if changed else state_dict

    def _check_saved_step_sizes(self, state_dict: dict) -> dict:
        """The line-search entries of one of our checkpoints, checked before anything changes: a
        NaN or infinite step size wrote NaN into the model at the next step, a negative one
        stepped uphill, and a zero or negative average raised a bare 'math domain error' after
        the search had moved θ. An exact 0 is repaired, with a warning: an earlier version took
        a torch checkpoint saved at lr 0 (a frozen group, a warmup from 0) as η = 0, which never
        grew; such entries start from the smallest positive step size of the checkpoint (as a
        block new to a run does), or ``init_step_size`` if it has none. Returns the state dict,
        a copy where repaired."""
        keys = ("step_size", "step_size_avg")

        def entries(group, key):  # (a key an older checkpoint lacks is not checked; a None is)
            if key not in group:
                return []
            v = group[key]
            return list(v) if isinstance(v, (list, tuple)) else [v]

        groups = state_dict.get("param_groups", [])
        for gi, group in enumerate(groups):
            # the counters too: a None among them loaded, and the next step raised after θ moved
            problems = [counter_error(group)]
            if problems[0] is None:  # (the trend's first step is checked against the count)
                problems.append(self.policy.trend_error(group.get("loss_trend"),
                                                        group.get("step", 0)))
            for key in (*keys, "step_length", "collapsed"):
                for v in entries(group, key):
                    try:
                        check_number(key, v, 0.0)
                    except ValueError as e:
                        problems.append(str(e))
            problem = next((p for p in problems if p is not None), None)
            if problem is not None:
                raise ValueError(f"the state dict's param group {gi} has an {problem}: the "
                                 "checkpoint is corrupt or was edited")
        if not any(float(v) == 0.0 for g in groups for k in keys for v in entries(g, k)):
            return state_dict
        fill = min((float(v) for g in groups for k in keys for v in entries(g, k)
                    if float(v) > 0.0), default=self._init_step_size)
        repaired = []
        for group in groups:
            group = dict(group)
            for key in keys:
                v = group.get(key)
                if isinstance(v, (list, tuple)):
                    group[key] = [fill if float(x) == 0.0 else x for x in v]
                elif v is not None and float(v) == 0.0:
                    group[key] = fill
            repaired.append(group)
        warnings.warn(
            f"the state dict holds step sizes of 0 (an earlier version's import of a torch "
            f"checkpoint saved at lr 0); they start from {fill:g}, the smallest positive one",
            stacklevel=4)
        return dict(state_dict, param_groups=repaired)

    def _check_saved_blocks(self, state_dict: dict) -> None:
        """A layer-wise checkpoint's per-block entries agree with its blocks, checked before
        anything changes: a list of another length, or a scalar among the lists, loaded and
        made every later step raise a bare IndexError or TypeError; a ``block_owner`` out of
        range loaded silently."""
        for gi, group in enumerate(state_dict.get("param_groups", [])):
            names = group.get("block_names")
            if names is None:
                continue  # a global checkpoint, or a torch one taken over (blocks cut later)
            n = len(names)
            for key in _PER_BLOCK:
                if key in group and not (isinstance(group[key], (list, tuple))
                                         and len(group[key]) == n):
                    v = group[key]
                    what = (f"{len(v)} entries" if isinstance(v, (list, tuple))
                            else f"the single value {v!r}")
                    raise ValueError(
                        f"the state dict's param group {gi} has {what} in {key!r} for its {n} "
                        f"blocks {list(names[:4])}{' ...' if n > 4 else ''}: the checkpoint is "
                        "corrupt or was edited")
            owner = group.get("block_owner")
            if owner is not None and not all(
                    isinstance(o, Integral) and 0 <= o < n and owner[o] == o for o in owner):
                raise ValueError(
                    f"the state dict's param group {gi} has block_owner {list(owner)}, which "
                    f"does not name, for each of its {n} blocks, a block that owns itself: the "
                    "checkpoint is corrupt or was edited")

    def _global_from_layerwise(self, state_dict: dict) -> dict:
        """A layer-wise checkpoint (a step size per block) into a global optimizer: every group
        takes the smallest step size of any tested block of a group that trains, which every
        block passed a test at or above (its largest made the stiff blocks diverge: block 0's η
        applied to all, loss 1e-3 to 6.5e6 on a two-block quadratic), drops the per-block
        record, and searches at the next step. A copy; the caller's dict is kept."""
        groups = state_dict.get("param_groups", [])
        if not any(isinstance(g.get("step_size"), (list, tuple)) for g in groups):
            return state_dict
        def smallest(key):
            """Over every group (the global search shares one η: a block per group saved [flat,
            stiff] gave the flat one's to all), over the blocks a test has judged in groups that
            train (an untested or frozen block's η is only its start); else over all."""
            judged, every = [], []
            for g in groups:
                v, tested = g.get(key), g.get("block_tested")
                trains = float(g.get("lr", 1.0)) > 0.0
                for b, x in enumerate(v if isinstance(v, (list, tuple)) else [v]):
                    if x is None:
                        continue
                    every.append(x)
                    if trains and not (isinstance(tested, (list, tuple)) and b < len(tested)
                                       and not tested[b]):
                        judged.append(x)
            found = judged or every
            return min(found) if found else None

        lowest = {key: smallest(key) for key in ("step_size", "step_size_avg", "step_length")}
        converted = []
        for group in groups:
            group = {k: v for k, v in group.items() if k not in _LAYERWISE_ONLY}
            for key, value in lowest.items():
                if key in group:
                    group[key] = self._init_step_size if value is None else value
            group.update(collapsed=0, search_interval=1,
                         next_search=min(group.get("next_search", 1), group.get("step", 0) + 1))
            converted.append(group)
        converted[0]["last_dd"] = None  # per block; a global step's ‖d‖² is over the group
        self._warn_once("layerwise_into_global", (
            f"the state dict is a layer-wise optimizer's (a step size per block); this global "
            f"{type(self).__name__} starts from the smallest block's step size and searches at "
            "the next step. Pass layerwise=True to continue it per block"))
        return dict(state_dict, param_groups=converted)

    def _note_other_direction(self, state_dict: dict) -> None:
        """A checkpoint of a rule with the same state and hyperparameters (adam into nadam,
        momentum into nesterov) loads, as torch's would; say so, since nothing else does."""
        saved = state_dict.get("direction")  # (None: a checkpoint from before the key)
        if saved is not None and saved != self.rule.name:
            warnings.warn(
                f"the state dict was saved by an optimizer with direction {saved!r}; this "
                f"{type(self).__name__} takes over its moments and step sizes (searched along "
                f"that direction) and goes on with direction {self.rule.name!r}. If that is not "
                f"meant, build it with direction={saved!r}", stacklevel=4)

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
        # plain ArmijoSGD's groups carry momentum 0 (for the schedulers that look for the key)
        # and no momentum buffer: loaded into a momentum rule it would silently continue at μ 0
        saved_names = {k for s in state_dict.get("state", {}).values() for k in s}
        if "momentum" in self.rule.hyperparameters and self.rule.state_names and all(
                g.get("momentum") == 0.0 for g in state_dict.get("param_groups", [])) and \
                not saved_names & set(self.rule.state_names):
            raise ValueError(
                f"the state dict was saved by an optimizer without momentum (momentum=0 and no "
                f"momentum buffer); this {who} would continue at momentum 0. Build the same "
                "optimizer as the one that saved it")
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
                            "saved for another model" + _another_order(sg, g, saved, known))

    def _check_saved_hyperparameters(self, state_dict: dict) -> None:
        """The checkpoint's group hyperparameters win at load, as torch's do; a value the next
        step would refuse (betas (2, 0.999), a negative eps or weight decay, a NaN lr) loaded,
        and that step raised with the previous state already replaced. Checked as a step
        checks them, before anything changes."""
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            return  # torch's own check names the mismatch
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            probe = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            try:
                self._validate_group(probe)
            except (ValueError, TypeError) as e:
                raise ValueError(f"the state dict's param group {gi} holds a value this "
                                 f"optimizer refuses: {e}") from None

    def _check_saved_values(self, state_dict: dict) -> None:
        """The saved moments, momentum buffers and masters, checked before anything changes: one
        NaN or inf among them (or a negative average of g²) loaded silently and wrote NaN into
        the model at the next step (the gradient guard sees the gradient only), after which
        every step was skipped. One pass over the state, at load time only."""
        names = {id(p): self._names.get(id(p)) for g in self.param_groups for p in g["params"]}
        ids = [i for g in state_dict.get("param_groups", []) for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(ids, params)) if len(ids) == len(params) else {}
        needed = set(self.rule.state_names)
        problem, mesh = None, None  # (the first bad value; the shards' mesh and device)
        for pid, pstate in state_dict.get("state", {}).items():
            p = by_id.get(pid)
            what = (names.get(id(p)) if p is not None else None) or f"#{pid}"
            have = needed & {k for k, v in pstate.items() if torch.is_tensor(v)}
            if have and have != needed:
                # the missing one restarted at 0 while the others and the fold count went on:
                # that tensor's next step came out 24x too large, without a word
                raise ValueError(
                    f"the state dict's state of parameter {what} holds "
                    f"{', '.join(map(repr, sorted(have)))} but not "
                    f"{', '.join(map(repr, sorted(needed - have)))}: the checkpoint is "
                    "incomplete or was edited")
            for name, value in pstate.items():
                if not (torch.is_tensor(value) and value.is_floating_point()
                        and (name in needed or name == "master")) or value.device.type == "meta":
                    continue
                if is_dtensor(value):
                    local = value.to_local()  # (this rank's shard)
                    if mesh is None and value.device_mesh.ndim == 1:  # (others: refused later)
                        # (the mesh's device type: a state loaded to the CPU keeps an NCCL mesh)
                        mesh = value.device_mesh, torch.device(value.device_mesh.device_type)
                else:
                    local = value
                bad = None
                if not bool(torch.isfinite(local).all()):
                    bad = "non-finite values (NaN or inf)"
                elif name in self.rule.squared_states and local.numel() and \
                        bool((local < 0).any()):
                    bad = "negative values (it averages g²)"
                if bad is not None and problem is None:
                    problem = (f"the state dict's {name!r} of parameter {what} holds {bad}: the "
                               "checkpoint is corrupt or the run that saved it had diverged")
        if mesh is not None:
            # each rank sees its own shards: one that refused alone left the others loading the
            # checkpoint, and the ranks trained on from different states
            flag = torch.tensor([0.0 if problem is None else 1.0], device=mesh[1])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX,
                                         group=mesh[0].get_group())
            if problem is None and float(flag) > 0:
                problem = ("another rank's shard of the state dict holds non-finite or negative "
                           "moments (that rank's error names the parameter): the checkpoint is "
                           "corrupt or the run that saved it had diverged; no rank loaded it")
        if problem is not None:
            raise ValueError(problem)
