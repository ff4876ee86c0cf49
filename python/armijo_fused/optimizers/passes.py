"""The fused passes of one step over the optimizer's buffers: :class:`FlatPasses` implements the
line-search controller's :class:`~armijo_fused.linesearch.controller.Passes` by running each
pass once per buffer with that buffer's backend, and knows where every buffer sits on the line,
so that an error undoes exactly what was written."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..backends import torch_backend
from ..linesearch.controller import Passes
from ..storage.scalars import compute_dtype, device_floats, to_device
from ..storage.sharded import ShardedBuffer

if TYPE_CHECKING:
    from ..storage.flat import FlatBuffer
    from .base import ArmijoOptimizer


def _table(buf):
    """The tile table of a buffer whose passes work on the tensors in place (FSDP2 shards,
    ``flat=False``), else None."""
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


def scalar_sum(x: Tensor) -> Tensor:
    """Σ of a small tensor as a 0-dim one; a view, not a launch, when it has one element."""
    return x.reshape(()) if x.numel() == 1 else x.sum()


def total(tensors: list) -> Tensor:
    """Σ of a non-empty list of tensors (``sum`` would add a 0 first: one more launch)."""
    out = tensors[0]
    for t in tensors[1:]:
        out = out + t
    return out


class FlatPasses(Passes):
    """Runs each fused pass once per flat buffer with that buffer's backend."""

    def __init__(self, opt: ArmijoOptimizer, buffers: list[FlatBuffer], f0,
                 loss_follows: bool = False, grad_sq: dict | None = None):
        """``grad_sq``: per buffer index, per-block Σ g² already read this step (not read
        again by the guard)."""
        self.opt, self.buffers = opt, buffers
        # each buffer's compute dtype and guard key, once (read at every pass)
        self._dtypes = [compute_dtype(b.dtype) for b in buffers]
        self._keys = [(b.device, dt) for b, dt in zip(buffers, self._dtypes)]
        self._known_sq = grad_sq or {}
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
        # whether self.eta gives buffer i's position exactly (not after a capped first pass)
        self._known = [False] * len(buffers)
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
                [scalar_sum(self._known_sq[i] if i in self._known_sq else
                            b.backend.grad_sq_norm(_flat_grad(b), b.layout, table=_table(b)))
                 .to(dev0) for i, b in enumerate(self.buffers)])
            self._grad_sq = self._probe = sq
            if opt.max_grad_norm is not None:
                # (in float64 where a float64 buffer made Σ g² float64: in fp32 the factor of a
                # gradient of 1e40 was subnormal, of 1e50 0, and no step was taken)
                clip = (opt.max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
                dtype = compute_dtype(clip.dtype)
                self._base = torch.cat([self._base[:1].to(dtype), clip.reshape(1).to(dtype)])
        if f0 is not None:
            self.set_loss(f0)
        elif not loss_follows:
            self._set_scale()

    def _set_scale(self) -> None:
        # base + 0·probe is base where the probe is finite and NaN in both entries where it is
        # not (0·inf = 0·NaN = NaN), where isfinite + where takes five launches. One launch
        # (add's alpha) on CPU and CUDA for a probe of at most float32's range; two elsewhere:
        # MPS's add returns base itself at alpha 0, and add would round a float64 probe (the
        # mean loss over ranks, a float64 model's) to float32 first, 1e300 to inf
        probe = self._probe
        if probe is None:
            self._scale0 = self._base
        elif probe.dtype != torch.float64 and probe.device.type in ("cpu", "cuda"):
            self._scale0 = torch.add(self._base, probe, alpha=0)
        else:
            self._scale0 = self._base + probe * 0
        self._skipped = None
        # per device, and per dtype the passes compute in (the fused backends take fp32)
        self._gscale = {key: self._scale0.to(*key) for key in self._keys}

    def _sum_over_shards(self, per_buffer: list) -> Tensor:
        """Σ g² over the model from each buffer's local sum. FSDP2: the sharded buffers' sums
        are summed over the ranks (one all-reduce), so clipping and the non-finite guard agree
        on every rank; other buffers hold whole tensors and count once."""
        sharded = [isinstance(b, ShardedBuffer) and b.sum_scale != 1.0 for b in self.buffers]
        whole = [x for x, s in zip(per_buffer, sharded) if not s]
        sq = total(whole) if whole else None
        if any(sharded):
            part = total([x for x, s in zip(per_buffer, sharded) if s]).clone()
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
        b = self.buffers[i]
        return device_floats(eta[self.slices[i]], b.device, self._dtypes[i])

    def first(self, eta, caps=None, factors=None, precond=False):
        """``caps``: per buffer, a device tensor of the largest searched η per block (a step
        without a search, see ``_length_caps``); the pass applies min(η, cap)·factor.
        ``precond``: the trial goes on the fallback line (the sums are still d's)."""
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
                self.wd[i], eta_i, self._gscale[self._keys[i]], b.layout, _model_copy(b),
                table=_table(b), precond=precond))
            self._passed(i, eta_i, eta, precond, known=caps is None)
        sums = self._written(sums)
        self._first_sums = sums
        self.precond = precond
        return sums

    def fallback_sums(self, sums) -> list | None:
        """Per buffer, the sums along the fallback line p (Σ g·p, Σ g², Σ p²) from the first
        pass's (Σ g·d, Σ g², Σ d²), where the rule allows: for the SGD family p is the clipped
        gradient c·g, so they are (c·Σ g², Σ g², c²·Σ g²), a few small ops instead of a pass
        over memory. None for the other rules (a move with ``compute_sums`` forms them)."""
        if not self.opt.rule.precond_is_gradient:
            return None
        out = []
        for key, s in zip(self._keys, sums):
            clip = self._gscale[key][1:].to(s.device)
            gg = s[:, 1]
            out.append(torch.stack([gg * clip, gg, gg * (clip * clip)], dim=1))
        return out

    @property
    def started(self) -> bool:
        """Has a first pass folded this step's gradient into some buffer's state?"""
        return any(at is not None for at in self._at)

    def _passed(self, i: int, eta_i: Tensor, eta, precond: bool, known: bool = True) -> None:
        self._at[i], self._precond_at[i], self._known[i] = eta_i, precond, known
        self.eta[self.slices[i]] = eta[self.slices[i]]

    def trial_points(self, etas, precond):
        """θ0 − η_k d for every η_k, stacked: (params, [K, *shape] tensors), θ at θ0: one pass
        per buffer that reads θ, g and the state once and writes the K trial points."""
        params, stacked = [], []
        for i, b in enumerate(self.buffers):
            # a tile table has no flat θ for a kernel: its gathered copies, in torch math
            backend = torch_backend if _table(b) is not None else b.backend
            trial = backend.trial_points(self.opt.rule, b.param, b.grad, b.states, self.scalars[i],
                                         self.wd[i], etas, self._gscale[self._keys[i]], b.layout,
                                         precond)
            for j, p in enumerate(b.params):
                params.append(p)
                rows = b.rows(trial, j)
                stacked.append(rows if rows.dtype == p.dtype else rows.to(p.dtype))
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
        self._known = [False] * len(self.buffers)

    def _written(self, sums, moved=None):
        """After a pass (which has already written a bf16/fp16 model's copy of its fp32 master):
        sharded buffers copy θ back into the DTensor shards and scale their local sums by the
        shard count, so the optimizer's mean over ranks forms Σ over shards. ``moved``: the
        buffers the pass wrote (None: all)."""
        for i, b in enumerate(self.buffers):
            if moved is not None and i not in moved:
                continue
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
        folded = all(math.isfinite(x) for x in self._scale0.tolist())  # else nothing written
        for i, b in enumerate(self.buffers):
            if self._at[i] is None:
                continue
            self._move_buffer(i, self._at[i] * 0, False, False)
            if folded:
                scale = [float(x) for x in self._gscale[self._keys[i]].tolist()]
                g_in = b.grad.to(self._dtypes[i]) * (scale[0] * scale[1])
                self.opt.rule.undo_state(g_in, b.states, self.scalars[i])
        self._written(None)
        self._forget()

    def _move_buffer(self, i: int, eta_i: Tensor, precond: bool, compute_sums: bool):
        """Buffer i from where it sits to η_i (one fused pass); its sums if asked."""
        b = self.buffers[i]
        return b.backend.move(
            self.opt.rule, _flat_param(b), _flat_grad(b), b.states, self.scalars[i],
            self.wd[i], self._at[i], eta_i, self._gscale[self._keys[i]], b.layout,
            self._precond_at[i], precond, compute_sums, _model_copy(b), table=_table(b))

    def move_to(self, eta, *, precond=None, compute_sums=False):
        precond = self.precond if precond is None else precond
        out, moved = [], []
        for i in range(len(self.buffers)):
            sl = self.slices[i]
            if (not compute_sums and self._known[i] and self._precond_at[i] == precond
                    and self.eta[sl] == list(eta[sl])):
                # already there (exact mode moves one block at a time: moving every buffer
                # on every trial was quadratic in the buffers)
                out.append(None)
                continue
            eta_i = self._eta(i, eta)
            out.append(self._move_buffer(i, eta_i, precond, compute_sums))
            self._passed(i, eta_i, eta, precond)
            moved.append(i)
        out = self._written(out if compute_sums else None, set(moved))
        self.precond = precond
        return out

    def grad_norm(self, sums=None):
        """‖g‖ (unclipped): the guard's Σ g² where it was formed (over the ranks under FSDP2),
        else from the first pass's sums (``sums``: those sums over the ranks)."""
        return self.grad_norm_reader(sums)()

    def guard(self) -> Tensor:
        return self._scale0

    # readers for telemetry formed later: they keep the tensors they read, not the passes
    # (which hold the optimizer: a kept stats object held θ, g, m and v)
    def skipped_reader(self):
        """:meth:`skipped` as a function of the guard's tensor alone (formed when first read:
        on a GPU each op is a launch, and a step that cannot skip has not formed it)."""
        if self._skipped is not None:
            flag = self._skipped
            return lambda: flag
        scale0, read = self._scale0, []

        def skipped():
            if not read:
                read.append(torch.isnan(scale0[0]))
            return read[0]
        return skipped

    def grad_norm_reader(self, sums=None):
        """:meth:`grad_norm` as a function of the sums alone."""
        grad_sq, sums = self._grad_sq, sums or self._first_sums
        if grad_sq is not None:
            return lambda: grad_sq.sqrt()
        return lambda: sum(s[:, 1].sum() for s in sums).sqrt()

    def skipped(self):
        if self._skipped is None:  # read by the step, the fold count and the telemetry
            self._skipped = torch.isnan(self._scale0[0])  # the guard puts NaN in both entries
        return self._skipped
