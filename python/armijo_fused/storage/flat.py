"""Flat storage: a group's parameters, gradients and state in contiguous buffers.

One :class:`FlatBuffer` holds the parameters of one param group that share a (device, dtype); the
model's tensors are re-pointed as views into it (``p.data``, ``p.grad`` and the optimizer state
``state[p][name]``), so one kernel launch covers the whole group and no copy of θ is ever made.

The model stays in charge of its tensors, so the buffer re-validates them at every step
(:meth:`FlatBuffer.sync`: one C++ call that compares each tensor's address, sizes and strides,
its ``.grad`` and its state entries with the views, ``_C.ViewCheck``; the Python loop is the
reference, does every repair, and runs alone without the extension):

* a gradient that arrived as a new tensor (``zero_grad(set_to_none=True)`` elsewhere) is copied in
  and the view re-attached; a missing gradient (parameter unused this step) counts as zero;
* state tensors replaced by ``load_state_dict`` are copied in and re-pointed; deleted ones
  (``opt.state.clear()``) restart at zero, as in torch, and a missing master is taken from θ;
* a parameter whose storage moved (``model.to()``, accelerate swapping in new tensors) makes
  ``sync`` return False and the optimizer rebuilds the buffer from the tensors as they are now.

bf16 / fp16 parameters get fp32 master weights: ``param`` is then the fp32 master (what the passes
update, kept in the optimizer state as ``master`` so resume is exact) and the model's tensors are
views of ``model_param`` in their own dtype. Each pass that moves θ also writes its value into
``model_param``, rounded once, in the same pass over memory (the backends' ``model_param``
argument); :meth:`publish` does the same as a separate copy where θ changes outside a pass
(adoption, a reloaded master, a restored snapshot). Trial points are always written from the
master, so no rounding accumulates over trials or steps. Weights written into the model's tensors
by the user between steps (``load_state_dict``, an initialiser, a swap) are not lost: the first
pass of the next step takes the model's value wherever it is not the master rounded. Gradients
stay in the model's dtype and the kernels widen them as they read them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import ops
from ..directions.base import DirectionRule
from .layout import DEFAULT_TILE, place_tensors

#: parameter dtypes that get fp32 master weights
MASTER_DTYPES = (torch.bfloat16, torch.float16)


def master_rounded(master: Tensor, value: Tensor) -> Tensor:
    """Where a model's weight ``value`` is its fp32 ``master`` rounded: to the weight's dtype, or
    to a half dtype first (a model cast since the master was kept: bf16 to fp32 or to fp16).
    There the master holds the weight's precision; elsewhere the user wrote the weight."""
    same = master.to(value.dtype) == value
    for dtype in MASTER_DTYPES:
        if dtype != value.dtype:
            same |= master.to(dtype).to(value.dtype) == value
    return same


def _dense(p: Tensor, g: Tensor) -> Tensor:
    if g.is_sparse:
        raise RuntimeError(
            "armijo_fused optimizers do not support sparse gradients "
            f"(the parameter of shape {tuple(p.shape)} has one; use sparse=False)"
        )
    return g


def _dense_strides(t: Tensor) -> tuple[int, ...] | None:
    """t's strides if its elements fill numel() consecutive slots in some order of the
    dimensions (channels_last, a transpose) but not the row-major one; None if t is contiguous
    or not dense (such a tensor's view in the buffer is then row-major)."""
    if t.is_contiguous():
        return None
    expected = 1
    for d in sorted((d for d in range(t.dim()) if t.shape[d] > 1), key=t.stride):
        if t.stride(d) != expected:
            return None
        expected *= t.shape[d]
    return tuple(t.stride())


def _row_major_strides(shape) -> tuple[int, ...]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))


def _moved(p: Tensor, pview: Tensor, shape) -> bool:
    """Is tensor ``p`` no longer its view in the flat buffer (another address, shape or
    strides)? Against the view as it is now: a storage moved as a whole (``share_memory_()``)
    moved every view with it, and the tensors still view the buffer."""
    return p.data_ptr() != pview.data_ptr() or p.shape != shape or p.stride() != pview.stride()


def _view_check(*args):
    """The C++ ViewCheck over these lists, or None (the Python loop alone) without the
    extension, or with one built from older sources whose ViewCheck takes other arguments (an
    editable install updated without a rebuild)."""
    view_check = getattr(ops._C, "ViewCheck", None)
    if view_check is None:
        return None
    try:
        return view_check(*args)
    except TypeError:
        return None


class FlatBuffer:
    def __init__(
        self,
        group_index: int,
        params: Sequence[Tensor],
        rule: DirectionRule,
        state: dict,
        *,
        block_ids: Sequence[int] | None = None,
        tile: int = DEFAULT_TILE,
        loading: bool = False,
    ):
        if not params:
            raise ValueError("a flat buffer needs at least one parameter")
        self.group_index = group_index
        self.rule = rule
        self.device = params[0].device
        self.dtype = params[0].dtype
        block_ids = list(block_ids) if block_ids is not None else [0] * len(params)
        # Element offset of each parameter: blocks start on tile boundaries (see layout.py).
        self.layout, self.offsets = place_tensors([p.numel() for p in params], block_ids,
                                                  tile=tile, device=self.device)
        self.params = list(params)
        self.block_ids = block_ids
        self.strides = [_dense_strides(p) for p in self.params]  # None: contiguous
        self._view_strides = [s if s is not None else _row_major_strides(p.shape)
                              for p, s in zip(self.params, self.strides)]

        n = self.layout.numel
        kw = dict(dtype=self.dtype, device=self.device)
        self.master = self.dtype in MASTER_DTYPES
        self.state_names = rule.state_names + (("master",) if self.master else ())
        fp32 = dict(dtype=torch.float32, device=self.device)
        self.gathered = False  # has sync() copied in a gradient that arrived as a new tensor?
        self.fresh: set[int] = set()  # tensors whose state sync() found deleted, and restarted
        # Built one buffer at a time, each taking its tensors over (and so letting the old ones
        # go) before the next is allocated: at most one buffer's worth above AdamW's θ, g, m, v
        # at any moment. Allocating θ, g, m and v first held 2 copies of θ more at the first
        # step, a step that could run out of memory where AdamW fits.
        with torch.no_grad():
            self.param = torch.zeros(n, **(fp32 if self.master else kw))
            self.model_param = torch.zeros(n, **kw) if self.master else self.param
            self._param_views = [self._view(self.model_param, i) for i in range(len(params))]
            self._master_views = [self._view(self.param, i) for i in range(len(params))]
            for p, pview, mview in zip(self.params, self._param_views, self._master_views):
                pview.copy_(p.detach())
                if self.master:
                    mview.copy_(p.detach())  # overwritten by a saved master
                p.data = pview
            self.grad = torch.zeros(n, **kw)
            self._grad_views = [self._view(self.grad, i) for i in range(len(params))]
            # where each gradient view must point: views never handed out, so that a view whose
            # data was re-pointed (``p.grad.data = ...``, ``model.half()``, which keep the
            # tensor object) is seen, as the parameters' are against their own views
            self._grad_slots = [self._view(self.grad, i) for i in range(len(params))]
            for p, gview in zip(self.params, self._grad_views):
                if p.grad is not None:
                    gview.copy_(_dense(p, p.grad))
                p.grad = gview
            self.states, by_name = [], []
            for name in rule.state_names:
                buf = torch.zeros(n, **(fp32 if self.master else kw))
                self.states.append(buf)
                by_name.append([self._view(buf, i) for i in range(len(params))])
                self._take_state(state, name, by_name[-1])
            if self.master:
                by_name.append(self._master_views)
                self._take_state(state, "master", self._master_views)
                # a weight written into the model's tensor since its master was kept (while it
                # was frozen) is the user's: the master takes it. A master being loaded
                # (``loading``) wins instead, as one loaded into a live optimizer does.
                if not loading:
                    for pview, mview in zip(self._param_views, self._master_views):
                        mview.copy_(torch.where(master_rounded(mview, pview), mview,
                                                pview.float()))
            elif not loading:  # (in a load the checkpoint decides, as for the in-place store)
                self._take_kept_masters(state)
            self.publish()
        self._state_views = [[views[i] for views in by_name] for i in range(len(params))]
        # what sync() compares each step: tensor, its view (address, strides) and shape, grad view
        # and its slot, and (name, view) of each state entry; one flat tuple per tensor, since the
        # loop is host time before the first pass
        self._checks = [(i, p, pv, pv.shape, gv, gs, tuple(zip(self.state_names, sv)))
                        for i, (p, pv, gv, gs, sv) in enumerate(zip(
                            self.params, self._param_views, self._grad_views, self._grad_slots,
                            self._state_views))]
        # the same checks in one C++ call (None without the extension: the loop alone)
        self._checker = _view_check(
            list(self.params), list(self._param_views), list(self._grad_views),
            list(self._grad_slots), list(self.state_names),
            [[sv[j] for sv in self._state_views] for j in range(len(self.state_names))])

    def _take_kept_masters(self, state: dict) -> None:
        """A bf16/fp16 model cast to fp32 (or fp64) since its masters were kept: θ takes each
        master where the weight is that master rounded, so the cast loses no precision (θ was
        the rounded weight, up to 1e-3 off). The stale entries are dropped after the build."""
        for p, pview in zip(self.params, self._param_views):
            kept = state[p].get("master")
            if kept is not None and kept.shape == p.shape and kept.device == pview.device:
                pview.copy_(torch.where(master_rounded(kept, pview), kept.to(self.dtype), pview))

    def _take_state(self, state: dict, name: str, views: list) -> None:
        """State entry ``name`` of every tensor: its value copied in (zero, or θ for a master,
        when it has none), then the entry re-pointed at its view."""
        for p, view in zip(self.params, views):
            pstate = state[p]
            old = pstate.get(name)
            if old is not None:
                view.copy_(old)
            pstate[name] = view

    def _view(self, flat: Tensor, i: int) -> Tensor:
        o = self.offsets[i]
        return self.shaped(flat[o : o + self.params[i].numel()], i)

    def shaped(self, chunk: Tensor, i: int) -> Tensor:
        """``chunk`` (``[..., numel]``: tensor i's slots in a buffer) in tensor i's shape, each
        element where tensor i keeps it: a channels_last or transposed weight keeps its strides,
        so the model's layout (and the kernels it picks) does not change under the optimizer."""
        p, strides = self.params[i], self.strides[i]
        lead = tuple(chunk.shape[:-1])
        if strides is None:
            return chunk.view(lead + tuple(p.shape))
        return chunk.as_strided(lead + tuple(p.shape), tuple(chunk.stride()[:-1]) + strides)

    def rows(self, rows: Tensor, i: int) -> Tensor:
        """Tensor i of every row of ``rows`` (``[K, numel]``, laid out as the buffer) as one
        ``[K, *shape]`` view with tensor i's strides: :meth:`shaped` of the rows' slice in one
        call instead of two (the batched candidates' K trial points, once per tensor per round,
        where a GPT-2's 148 tensors took 0.5 ms of host time on the CI machine)."""
        return rows.as_strided((rows.shape[0], *self.params[i].shape),
                               (rows.stride(0), *self._view_strides[i]),
                               rows.storage_offset() + self.offsets[i])

    def moved(self) -> bool:
        """Has a tensor left its view (``p.data = ...``, ``model.double()``), so that the next
        ``sync`` asks for a rebuild? Changes nothing."""
        return any(_moved(p, pview, shape) for _, p, pview, shape, *_ in self._checks)

    def sync(self, state: dict) -> bool:
        """Re-validate the views before a step; False means the parameters moved: rebuild."""
        checker = self._checker
        if checker is not None and isinstance(state, dict):
            # one C++ call looks at every tensor; the helpers below repair what it found amiss
            moved, foreign, state_ok = checker.check(self.params, state)
            if moved < 0:
                if foreign >= 0:
                    self._reattach_grads(foreign)
                if not state_ok:
                    self._reattach_states(state)
                return True
        return self._sync_loop(state)  # the reference, and where a tensor moved

    def _reattach_grads(self, start: int) -> None:
        """Re-attach the gradient views from tensor ``start`` on (as :meth:`_sync_loop`)."""
        for _, p, _, _, gview, slot, _ in self._checks[start:]:
            if p.grad is not gview or gview.data_ptr() != slot.data_ptr():
                self._attach_grad(p, gview, slot)

    def _attach_grad(self, p: Tensor, gview: Tensor, slot: Tensor) -> None:
        """Point ``p.grad`` back at its view, taking the value of a gradient that arrived as a
        new tensor (None: zero), or that the view itself now holds elsewhere: ``.data`` assigned
        to it (``p.grad.data = p.grad.data / n``; ``model.half()`` / ``.float()`` /
        ``.to(memory_format=...)``, which convert gradients that way) keeps the object and moves
        its data out of the buffer, where the passes would never see it again."""
        g = p.grad
        with torch.no_grad():
            if g is None:
                slot.zero_()
            elif g.is_sparse or g.data_ptr() != slot.data_ptr():  # (a sparse one has no data_ptr)
                slot.copy_(_dense(p, g))
                self.gathered = True
        if gview.data_ptr() != slot.data_ptr():
            gview.data = slot  # the same object (held by p.grad, maybe by the caller) comes home
        p.grad = gview

    def _reattach_states(self, state: dict) -> None:
        """Re-attach the state views (as :meth:`_sync_loop`)."""
        for i, p, _, _, _, _, entries in self._checks:
            pstate = state[p]
            for name, view in entries:
                if pstate.get(name) is not view:
                    self._reattach(i, pstate, name, view)

    def _sync_loop(self, state: dict) -> bool:
        # runs every step over every tensor: one tuple per tensor, cached (see _checks); the
        # state dict of each tensor is looked up every time, since code may replace one
        # (opt.state[p] = {...}) and state_dict() must then still show the live state
        for i, p, pview, shape, gview, slot, entries in self._checks:
            if _moved(p, pview, shape):
                return False
            if p.grad is not gview or gview.data_ptr() != slot.data_ptr():
                self._attach_grad(p, gview, slot)
            pstate = state[p]
            for name, view in entries:
                if pstate.get(name) is not view:
                    self._reattach(i, pstate, name, view)
        return True

    def take_fresh(self) -> set[int]:
        """The tensors whose deleted state :meth:`sync` restarted since the last call."""
        fresh, self.fresh = self.fresh, set()
        return fresh

    def _reattach(self, i: int, pstate: dict, name: str, view: Tensor) -> None:
        """A state entry of tensor i that is not its view any more: user code replaced it (take
        its value), or deleted it (``opt.state.clear()``, ``del opt.state[p]``, a state dict
        without it: start afresh, as torch does: zero moments, a master equal to θ; only a
        deleted moment marks the tensor ``fresh``, since checkpoints of fp32 models and torch's
        hold no master). Then put the view back."""
        old = pstate.get(name)
        with torch.no_grad():
            if old is not None:
                view.copy_(old)
                if name == "master":  # θ follows a replaced master
                    self._param_views[i].copy_(self._master_views[i])
            elif name == "master":  # none saved (an fp32 or torch checkpoint): θ is the master
                view.copy_(self._param_views[i])
            else:
                view.zero_()
                self.fresh.add(i)
        pstate[name] = view

    def set_param(self, flat: Tensor) -> None:
        """Write θ (the master for bf16/fp16) from a flat buffer and publish it to the model."""
        with torch.no_grad():
            self.param.copy_(flat)
        self.publish()

    def publish(self) -> None:
        """Write the fp32 master into the model's bf16/fp16 tensors (no-op for fp32)."""
        if self.master:
            with torch.no_grad():
                self.model_param.copy_(self.param)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient and keep the views attached (one launch, not one per tensor).
        ``set_to_none`` is ignored: dropping the views would make every step copy the new
        gradients back in (one more pass, and their memory twice at the step). A tensor that
        has moved out of the buffer (``model.half()``, ``.to(...)``; the next step rebuilds the
        store) gets None, as torch gives it: its view would hold its gradient from before."""
        self.grad.zero_()
        checker, any_moved = self._checker, True
        if checker is not None:
            moved, foreign, _ = checker.check(self.params, None)
            if moved < 0 and foreign < 0:
                return  # every gradient is its view, at home: the usual case, one C++ call
            any_moved = moved >= 0  # (else, e.g. after model.zero_grad(), no address to read)
        for _, p, pview, shape, gview, slot, _ in self._checks:
            if any_moved and _moved(p, pview, shape):
                p.grad = None
                continue
            if gview.data_ptr() != slot.data_ptr():
                gview.data = slot  # (zeroed above)
            if p.grad is not gview:
                p.grad = gview
