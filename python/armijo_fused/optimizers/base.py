"""``ArmijoOptimizer``: the step, top to bottom. ArmijoSGD and ArmijoAdam only choose defaults.

Pieces (each its own module): a direction rule (``directions/``), flat storage (``storage/``), the
backend that runs the fused passes (``backends/``), and the line search: controller, step-size
policy, cadence and side-effect-free trials (``linesearch/``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..backends import resolve_backend
from ..directions import get_rule
from ..linesearch import trial as trial_mod
from ..linesearch.cadence import Cadence
from ..linesearch.controller import Passes, armijo_search, read_floats
from ..linesearch.policy import StepSizePolicy
from ..storage.flat import FlatBuffer
from ..storage.layout import DEFAULT_TILE
from ..telemetry import StepStats

#: keys of the line-search state kept in every param group (identical across groups when global).
_LS_KEYS = ("step", "step_size", "step_size_avg", "next_search", "search_interval",
            "searches", "forwards", "backwards")


def _check_number(name, value, lo, hi=math.inf, *, lo_open=False, hi_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"invalid {name}: {value!r} (expected a number in {lb}{lo}, {hi}{rb})")


def _lr_value(lr) -> float:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"invalid lr: a tensor lr must hold one value, got shape {tuple(lr.shape)}")
        lr = float(lr)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0.0:
        raise ValueError(f"invalid lr: {lr!r} (expected a number >= 0)")
    return float(lr)


def _as_loss(value, what: str) -> Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{what} returned a tensor of shape {tuple(value.shape)}; expected a scalar loss "
                "(reduce it, e.g. with .mean())"
            )
        return value.detach().reshape(())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    raise TypeError(f"{what} returned {type(value).__name__}; expected a scalar loss tensor or float")


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
        tile: int = DEFAULT_TILE,
    ):
        lr_value = _lr_value(lr)
        rule = get_rule(direction)
        _check_number("weight_decay", weight_decay, 0.0)
        _check_number("init_step_size", init_step_size, 0.0, lo_open=True)
        _check_number("c", c, 0.0, 1.0, lo_open=True, hi_open=True)
        _check_number("backtrack", backtrack, 0.0, 1.0, lo_open=True, hi_open=True)
        if not isinstance(max_trials, int) or isinstance(max_trials, bool) or max_trials < 1:
            raise ValueError(f"invalid max_trials: {max_trials!r} (expected an int >= 1)")
        if max_grad_norm is not None:
            _check_number("max_grad_norm", max_grad_norm, 0.0, lo_open=True)
        if backend not in ("auto", "triton", "cpp", "torch"):
            raise ValueError(f"invalid backend: {backend!r} (choose auto, triton, cpp or torch)")
        if layerwise:
            raise NotImplementedError(
                "layerwise=True (a step size per block) is not implemented yet; use layerwise=False"
            )
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.rule = rule
        self.policy = StepSizePolicy(growth=growth, collapse_ratio=collapse_ratio, max_step=max_step)
        self.policy.validate()
        self.cadence = Cadence(cadence, max_interval=max_interval)
        self.c, self.backtrack, self.max_trials = float(c), float(backtrack), max_trials
        self.max_grad_norm, self.check_finite = max_grad_norm, bool(check_finite)
        self.backend, self.tile = backend, tile
        self._modules = [model] if model is not None else []
        self._closure: Callable | None = None
        self._pending_rng = None
        self._buffers: list[FlatBuffer] | None = None
        self._buffer_key = None
        self.stats: StepStats = StepStats()

        defaults = dict(lr=lr, weight_decay=weight_decay, **rule_defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _lr_value(group["lr"])
            _check_number("weight_decay", group["weight_decay"], 0.0)
            rule.validate(group)
            for p in group["params"]:
                if not p.is_floating_point():
                    raise TypeError(f"parameters must be floating point, got {p.dtype}")
                if p.dtype in (torch.float16, torch.bfloat16):
                    raise TypeError(
                        f"{p.dtype} parameters are not supported yet: keep parameters in float32 "
                        "and train under torch.autocast for bf16/fp16 compute"
                    )
            group.setdefault("lr_ref", _lr_value(group["lr"]))
            group.setdefault("step", 0)
            group.setdefault("step_size", float(init_step_size))
            group.setdefault("step_size_avg", float(init_step_size))
            group.setdefault("next_search", 1)
            group.setdefault("search_interval", 1)
            group.setdefault("searches", 0)
            group.setdefault("forwards", 0)
            group.setdefault("backwards", 0)

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

    def capture_rng(self) -> None:
        """Record the RNG state before your training forward, so that trial forwards replay its
        dropout masks when you pass ``loss=`` to ``step`` (the closure form needs no call)."""
        self._pending_rng = trial_mod.capture_rng()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. They stay views of the flat gradient buffer (``set_to_none`` is
        ignored once the buffers exist), so the next backward accumulates in place."""
        if trial_mod.in_trial():
            return
        if self._buffers is None:
            return super().zero_grad(set_to_none=set_to_none)
        for buf in self._buffers:
            buf.zero_grad()

    # -- the step ------------------------------------------------------------------------------
    def step(self, closure=None, *, loss_fn: Callable | None = None, loss=None):
        """One optimizer step; returns the loss at the parameters before the step (or None).

        ``step(closure)``: the closure computes the loss (and usually ``zero_grad`` + backward,
        torch style); it is called once with autograd on, then for trials without autograd or
        backward. ``step(loss_fn=fn, loss=loss)``: after your own backward; ``fn()`` returns the
        loss at the current parameters, ``loss`` the loss you already have (else ``fn`` gives
        it). ``step()``: uses the closure registered with ``set_closure``.
        """
        if closure is not None and loss_fn is not None:
            raise ValueError("pass either closure or loss_fn to step(), not both")
        for name, fn in (("closure", closure), ("loss_fn", loss_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        groups = self.param_groups
        g0 = groups[0]
        k = g0["step"] + 1
        factors = [self._lr_factor(g) for g in groups]
        evaluate = closure or loss_fn or self._closure
        search = self.cadence.should_search(k, g0["next_search"])
        if evaluate is None:
            if any(f != 0.0 for f in factors):
                raise RuntimeError(
                    f"{type(self).__name__}.step() needs the loss at trial points: pass a closure "
                    "(step(closure)), a loss function (step(loss_fn=fn, loss=loss)), or register "
                    "one with set_closure(fn)"
                )
            search = False  # lr = 0 and no closure: the state-initialisation path (DCP)

        # 1. The loss at θ0 and the gradient, from the training forward/backward.
        rng_before = self._pending_rng or trial_mod.capture_rng()
        self._pending_rng = None
        f0 = loss
        if closure is not None:
            with torch.enable_grad():
                f0 = closure()
        self._count(forwards=1, backwards=1)
        if f0 is not None:
            f0 = _as_loss(f0, "the closure" if closure is not None else "loss")
        buffers = self._sync_buffers()
        if not buffers:
            self._advance(k)
            return f0
        passes = _FlatPasses(self, buffers, k, f0)

        if not search:
            with torch.no_grad():
                sums = passes.first([groups[b.group_index]["step_size"] * factors[b.group_index]
                                     for b in buffers])
            self._advance(k)
            eta = g0["step_size"]
            self.stats = StepStats(
                step=k, searched=False, step_size=eta, applied_step=eta * factors[0],
                lr_factor=factors[0], trials=0, loss_before=f0 if f0 is not None else math.nan,
                loss_after=math.nan, gd=sum(s[:, 0].sum() for s in sums),
                grad_norm=passes.grad_norm(), non_descent=False, exhausted=False,
                unresolved=False, collapsed=False, skipped=passes.skipped(),
                forwards=g0["forwards"], backwards=g0["backwards"],
            )
            return f0

        # 2. The search, on trial forwards that leave no trace.
        env = trial_mod.TrialEnv(self._modules, rng_before)
        what = "the closure" if closure is not None else "loss_fn"

        def trial_loss() -> Tensor:
            with env.trial():
                out = evaluate()
            self._count(forwards=1)
            return _as_loss(out, what)

        try:
            with torch.no_grad():
                if f0 is None:
                    f0 = trial_loss()
                passes.set_loss(f0)
                if k == 1 or g0["searches"] == 0:
                    f0_value = float(f0)
                    if not math.isfinite(f0_value):
                        raise ValueError(
                            f"the loss at the first step is not finite ({f0_value}); check the "
                            "model, the data and the loss function before optimizing"
                        )
                eta0 = [self.policy.first_trial(groups[b.group_index]["step_size"])
                        for b in buffers]
                if any(g["weight_decay"] > 0 for g in groups):
                    # keep 1 - η·wd away from 0: θ0 is recovered by dividing by it
                    cap = min(0.5 / g["weight_decay"] for g in groups if g["weight_decay"] > 0)
                    eta0 = [min(e, cap) for e in eta0]
                result = armijo_search(
                    passes, trial_loss, f0, eta0,
                    c=self.c, backtrack=self.backtrack, max_trials=self.max_trials,
                    guard=passes.guard(),
                )
                # 3. The applied step: the search's η times the scheduler's lr_t / lr_0.
                if result.accepted is not None:
                    final = [passes.eta[i] * factors[b.group_index] for i, b in enumerate(buffers)]
                    if final != passes.eta:
                        passes.move_to(final)
        except BaseException:
            with torch.no_grad():
                passes.move_to([0.0] * len(buffers))  # θ back to θ0; the error propagates
            raise
        finally:
            env.close()

        # 4. Bookkeeping: step size, cadence, counters, telemetry.
        skipped = result.skipped or not math.isfinite(result.loss_before)
        accepted = None if skipped else result.accepted
        prev_avg = g0["step_size_avg"]
        if skipped or result.unresolved:
            new_eta, new_avg, collapsed = g0["step_size"], prev_avg, False
        else:
            new_eta, new_avg, collapsed = self.policy.after_search(prev_avg, accepted)
        # An unresolved search (the loss cannot see the step) says nothing about η moving.
        settled = (result.unresolved or self.cadence.settled(accepted, prev_avg)) and not collapsed
        next_search, interval = self.cadence.after_search(k, g0["search_interval"], settled)
        for g in groups:
            g.update(step_size=new_eta, step_size_avg=new_avg, next_search=next_search,
                     search_interval=interval, searches=g["searches"] + 1)
        self._advance(k)
        self.stats = StepStats(
            step=k, searched=True, step_size=accepted if accepted is not None else 0.0,
            applied_step=(accepted or 0.0) * factors[0], lr_factor=factors[0],
            trials=result.trials, loss_before=result.loss_before, loss_after=result.loss_after,
            gd=result.gd, grad_norm=math.sqrt(result.grad_sq) if result.grad_sq >= 0 else math.nan,
            non_descent=result.non_descent, unresolved=result.unresolved,
            exhausted=result.accepted is None and not (skipped or result.unresolved),
            collapsed=collapsed, skipped=skipped, next_step_size=new_eta,
            forwards=g0["forwards"], backwards=g0["backwards"],
        )
        return f0

    # -- helpers -------------------------------------------------------------------------------
    def _lr_factor(self, group) -> float:
        """lr_t / lr_0: the scheduler's multiplier of the applied step (DESIGN.md §2.6)."""
        lr_t = _lr_value(group["lr"])
        lr_0 = _lr_value(group.get("initial_lr", group["lr_ref"]))
        if lr_0 == 0.0:
            return 0.0 if lr_t == 0.0 else 1.0
        return lr_t / lr_0

    def _count(self, forwards=0, backwards=0):
        for g in self.param_groups:
            g["forwards"] += forwards
            g["backwards"] += backwards

    def _advance(self, k):
        for g in self.param_groups:
            g["step"] = k

    def _trainable(self):
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    yield gi, p

    def _sync_buffers(self) -> list[FlatBuffer]:
        """The flat buffers, re-validated against ``param_groups`` (rebuilt if anything moved)."""
        key = tuple((gi, id(p)) for gi, p in self._trainable())
        if self._buffers is not None and key == self._buffer_key:
            if all(b.sync(self.state) for b in self._buffers):
                return self._buffers
        by_slot: dict = {}
        for gi, p in self._trainable():
            by_slot.setdefault((gi, p.device, p.dtype), []).append(p)
        self._buffers = [
            FlatBuffer(gi, plist, self.rule, self.state, tile=self.tile)
            for (gi, _, _), plist in by_slot.items()
        ]
        self._buffer_key = key
        for b in self._buffers:
            b.backend = resolve_backend(self.backend, b.device, b.dtype)
        return self._buffers


class _FlatPasses(Passes):
    """Runs each fused pass once per flat buffer with that buffer's backend."""

    def __init__(self, opt: ArmijoOptimizer, buffers: list[FlatBuffer], step: int, f0):
        self.opt, self.buffers = opt, buffers
        self.eta = [0.0] * len(buffers)
        self.precond = False
        groups = opt.param_groups
        self.scalars = [opt.rule.scalars(groups[b.group_index], step) for b in buffers]
        self.wd = [float(groups[b.group_index]["weight_decay"]) for b in buffers]
        self._grad_sq = None
        self._first_sums = None
        with torch.no_grad():
            self._gscale = self._make_gscale(f0)

    def _make_gscale(self, f0):
        """Per-device [unscale, clip] (NaN when the gradient or f0 is not finite): no sync."""
        opt, dev0 = self.opt, self.buffers[0].device
        need_norm = opt.check_finite or opt.max_grad_norm is not None
        scale = torch.ones(2, dtype=torch.float32, device=dev0)
        if need_norm:
            sq = sum(b.backend.grad_sq_norm(b.grad, b.layout).to(dev0).sum() for b in self.buffers)
            self._grad_sq = sq
            if opt.max_grad_norm is not None:
                clip = (opt.max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
                scale[1] = clip
            scale = torch.where(torch.isfinite(sq), scale, torch.full_like(scale, math.nan))
        self._scale0 = scale
        if f0 is not None:
            self.set_loss(f0)
        return {b.device: self._scale0.to(b.device) for b in self.buffers}

    def set_loss(self, f0: Tensor) -> None:
        """Fold a non-finite f0 into gscale: the passes then write nothing (no sync needed)."""
        f0 = f0.to(self._scale0.device)
        self._scale0 = torch.where(torch.isfinite(f0), self._scale0,
                                   torch.full_like(self._scale0, math.nan))
        self._gscale = {b.device: self._scale0.to(b.device) for b in self.buffers}

    def _eta(self, b: FlatBuffer, value: float) -> Tensor:
        return torch.full((b.layout.nblocks,), value, dtype=torch.float32, device=b.device)

    def first(self, eta):
        sums = []
        for i, b in enumerate(self.buffers):
            sums.append(b.backend.first_pass(
                self.opt.rule, b.param, b.grad, b.states, self.scalars[i], self.wd[i],
                self._eta(b, eta[i]), self._gscale[b.device], b.layout))
        self.eta = list(eta)
        self._first_sums = sums
        return sums

    def move_to(self, eta, *, precond=None, compute_sums=False):
        precond = self.precond if precond is None else precond
        out = []
        for i, b in enumerate(self.buffers):
            s = b.backend.move(
                self.opt.rule, b.param, b.grad, b.states, self.scalars[i], self.wd[i],
                self._eta(b, self.eta[i]), self._eta(b, eta[i]), self._gscale[b.device], b.layout,
                self.precond, precond, compute_sums)
            out.append(s)
        self.eta, self.precond = list(eta), precond
        return out if compute_sums else None

    def grad_norm(self):
        if self._grad_sq is not None:
            return self._grad_sq.sqrt()
        return sum(s[:, 1].sum() for s in self._first_sums).sqrt()

    def guard(self) -> Tensor:
        return self._scale0

    def skipped(self):
        return ~torch.isfinite(self._scale0).all()


__all__ = ["ArmijoOptimizer", "read_floats"]
