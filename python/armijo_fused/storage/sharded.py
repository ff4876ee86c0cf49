"""Storage for DTensor parameters (FSDP2 ``fully_shard``): flat buffers over the local shards.

FSDP2 owns the storage of its sharded parameters: its all-gather reads from it, so the model's
tensors cannot be re-pointed into our buffer as :class:`~armijo_fused.storage.flat.FlatBuffer`
does (assigning ``p.data`` would also strip the DTensor wrapper). :class:`ShardedBuffer` keeps the
same interface (``param``, ``grad``, ``states``, ``layout``) in one of two ways:

* **in place** (the default when every local shard is a contiguous, 16-byte aligned fp32 tensor):
  a tile table (:mod:`.table`) points the passes at the shards and at this step's gradient shards,
  so θ is read and written where FSDP2 keeps it and nothing is copied. ``sync`` rebuilds the
  table's gradient column (FSDP2 writes a new gradient tensor after every backward); ``param`` and
  ``grad`` are gathered copies, for the rare readers (batched candidates, ``exact_revert``), and
  :meth:`set_param` writes θ back.
* **copies** (otherwise, e.g. bf16 shards): ``sync`` copies the local shard of each parameter and
  of its gradient into flat buffers (two ``torch._foreach_copy_`` launches), and ``after_write``
  (after every pass that moves θ) copies the flat θ back into the local shards, so the next
  all-gather, and hence the next (trial) forward, sees the moved weights. bf16/fp16 shards get
  fp32 master weights there, as :class:`FlatBuffer` gives them: the flat θ is the master (state
  ``master``) and the states are fp32; ``sync`` keeps the master and takes a shard's value only
  where it is not the master rounded (weights written since the last step), and ``after_write``
  rounds the master into the shards.

In both:

* anything that wrote the shards between steps (DCP load, ``load_state_dict``, a user) is seen at
  the next step;
* the optimizer state lives only in the flat buffers; ``state[p][name]`` is a DTensor with the
  parameter's mesh and placements whose local tensor is a view into them, so ``state_dict`` and
  torch.distributed.checkpoint see sharded state like that of any torch optimizer.

The per-block sums of the passes are partial sums over this rank's shard. The true sums
⟨g_b, d_b⟩ = Σ_ranks ⟨g_b, d_b⟩_local are formed by the optimizer's one all-reduce per trial,
which averages over the ranks: the local sums are multiplied by ``sum_scale`` = the number of
shards first (mean of W·s_r = Σ s_r). That needs the shards to span the optimizer's process group
(a 1-D mesh over the world, FSDP2's default); other meshes (HSDP, 2-D) are refused.

Cost of the copies against the in-place path: one copy of θ and g per step and one copy of θ per
pass, and one extra buffer each for θ and g. Replicated DTensors (no ``Shard`` placement) are
stored the same way with ``sum_scale`` 1.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from ..directions.base import DirectionRule
from .flat import MASTER_DTYPES, master_rounded
from .layout import DEFAULT_TILE, place_tensors, place_tensors_tiled
from .table import gather, make_table, scatter, table_ok, with_grads


@functools.cache  # (asked for every tensor at every step: an import each time cost the most)
def dtensor_class():
    """``torch.distributed.tensor.DTensor`` or None when this torch has no DTensor."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return None
    return DTensor


def is_dtensor(t) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def _local(t: Tensor) -> Tensor:
    # the local shard itself (not an autograd view of it), so in-place writes land in FSDP's storage
    return t._local_tensor if is_dtensor(t) else t


def _is_sharded(p) -> bool:
    from torch.distributed.tensor import Shard

    return any(isinstance(pl, Shard) for pl in p.placements)


def _at_offset_zero(view: Tensor) -> Tensor:
    """The contiguous ``view`` as a tensor at storage offset 0, over a slice of its storage:
    the same memory, and the slice keeps the whole buffer alive. A DTensor built on a view at an
    offset carries the offset in its storage-less wrapper (torch >= 2.10), and torch.save and
    copy.deepcopy then fail on it ("invalid python storage"); at offset 0 they treat it as the
    wrapper it is. So the state that ``state_dict()`` hands out can be saved and copied."""
    if view.storage_offset() == 0:
        return view
    size = view.element_size()
    start = view.storage_offset() * size
    piece = view.untyped_storage()[start : start + view.numel() * size]
    return torch.empty(0, dtype=view.dtype, device=view.device).set_(
        piece, 0, view.shape, view.stride())


class ShardedBuffer:
    """Flat θ / g / state buffers over the local shards of one group's DTensor parameters."""

    distributed = True  # DTensors: trials reshard FSDP modules, local sums span the ranks
    model_param = None  # bf16/fp16 shards get the master's rounding in after_write, not in a pass
    #: in_place when the constructor is not told: None chooses in place wherever the shards allow
    #: it; False forces the copies (tests and benchmarks compare the two)
    default_in_place: bool | None = None

    def __init__(
        self,
        group_index: int,
        params: Sequence[Tensor],
        rule: DirectionRule,
        state: dict,
        *,
        block_ids: Sequence[int] | None = None,
        tile: int = DEFAULT_TILE,
        process_group=None,
        in_place: bool | None = None,
        loading: bool = False,
    ):
        if not params:
            raise ValueError("a sharded buffer needs at least one parameter")
        self.group_index = group_index
        self.rule = rule
        self.params = list(params)
        self.sum_scale = self._distribution(process_group)
        local = [_local(p) for p in self.params]
        self.device = local[0].device
        self.dtype = local[0].dtype
        why = table_ok(local)
        in_place = self.default_in_place if in_place is None else in_place
        if in_place and why:
            raise ValueError(f"in_place=True, but {why}")
        self.in_place = not why if in_place is None else in_place
        block_ids = list(block_ids) if block_ids is not None else [0] * len(params)
        place = place_tensors_tiled if self.in_place else place_tensors
        self.layout, self.offsets = place([t.numel() for t in local], block_ids, tile=tile,
                                          device=self.device)
        self.block_ids = block_ids

        n = self.layout.numel
        kw = dict(dtype=self.dtype, device=self.device)
        # half-precision shards (never in place: a table takes fp32) get an fp32 master
        self.master = self.dtype in MASTER_DTYPES
        self.state_names = rule.state_names + (("master",) if self.master else ())
        self.fresh: set[int] = set()  # tensors whose state sync() found deleted, and restarted
        fp = dict(kw, dtype=torch.float32) if self.master else kw
        self.states = [torch.zeros(n, **fp) for _ in rule.state_names]
        self._shapes = [t.shape for t in local]
        self._ptrs = [t.data_ptr() for t in local]
        self.table = None
        if self.in_place:
            self._zero_grads = {}  # a zero gradient for a parameter that got none this step
            self.table = make_table(self.layout, self.offsets, local, local, self.device)
        else:
            self._param = torch.zeros(n, **fp)  # the fp32 master for half shards
            self._grad = torch.zeros(n, **kw)
            self._param_views = [self._view(self._param, i) for i in range(len(local))]
            self._grad_views = [self._view(self._grad, i) for i in range(len(local))]
        masters = [self._param] if self.master else []
        self._state_dt = [
            [self._wrap(self._view(s, i), p) for s in self.states + masters]
            for i, p in enumerate(self.params)
        ]
        # a kept master meets the tensors: as in FlatBuffer's build, the tensors win where they
        # differ (weights the user wrote while they were frozen), a master being loaded wins
        self._building = not loading
        self.sync(state)
        self._building = False
        self.fresh.clear()  # a tensor without state when the store is built is simply new

    def _distribution(self, process_group) -> float:
        """Check the DTensors' mesh; the factor that turns the mean over ranks of the local
        sums into their sum over the shards (1 for replicated tensors)."""
        if not all(is_dtensor(p) for p in self.params):
            raise TypeError("ShardedBuffer takes DTensor parameters only")
        mesh = self.params[0].device_mesh
        placements = tuple(self.params[0].placements)
        for p in self.params:
            if p.device_mesh != mesh or tuple(p.placements) != placements:
                raise ValueError(
                    "the DTensor parameters of one param group must share one device mesh and "
                    "placements (give each mesh its own param group)"
                )
        if mesh.ndim != 1:
            raise NotImplementedError(
                f"DTensor parameters on a {mesh.ndim}-D device mesh are not supported (HSDP, "
                "tensor parallel): armijo_fused supports FSDP2 on a 1-D mesh"
            )
        if not _is_sharded(self.params[0]):
            return 1.0
        world = torch.distributed.get_world_size(process_group)
        if mesh.size() != world:
            raise NotImplementedError(
                f"the parameters are sharded over a mesh of {mesh.size()} ranks but the "
                f"optimizer's process group has {world}: the per-block sums would be "
                "reduced over the wrong ranks (pass process_group= the mesh's group)"
            )
        return float(world)

    def _view(self, flat: Tensor, i: int) -> Tensor:
        o, shape = self.offsets[i], self._shapes[i]
        return flat[o : o + shape.numel()].view(shape)

    @staticmethod
    def _wrap(view: Tensor, p) -> Tensor:
        DTensor = dtensor_class()
        with torch.no_grad():
            return DTensor.from_local(_at_offset_zero(view), p.device_mesh, p.placements,
                                      run_check=False, shape=p.shape, stride=p.stride())

    @property
    def param(self) -> Tensor:
        """θ as one flat buffer: the buffer itself with copies, a gathered copy in place (write
        it back with :meth:`set_param`)."""
        return gather(self.table.params, self.table) if self.in_place else self._param

    @property
    def grad(self) -> Tensor:
        """g as one flat buffer (a gathered copy in place)."""
        return gather(self.table.grads, self.table) if self.in_place else self._grad

    def set_param(self, flat: Tensor) -> None:
        """Write θ from a flat buffer of the layout (restoring a snapshot)."""
        with torch.no_grad():
            if self.in_place:
                scatter(flat, self.table.params, self.table)
            else:
                self._param.copy_(flat)
                self.after_write()

    def _grad_shards(self) -> list[Tensor]:
        """This step's local gradient shards, as tensors the table can address."""
        out = []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:  # unused this step: counts as zero
                if i not in self._zero_grads:
                    self._zero_grads[i] = torch.zeros(self._shapes[i], dtype=self.dtype,
                                                      device=self.device)
                g = self._zero_grads[i]
            else:
                g = _local(g)
                if g.is_sparse:
                    raise RuntimeError("armijo_fused optimizers do not support sparse gradients")
                if table_ok([g]) or g.shape != self._shapes[i]:  # not addressable as it is
                    g = g.to(self.dtype).reshape(self._shapes[i]).clone()
            out.append(g)
        return out

    def moved(self) -> bool:
        """Have the shards moved or changed shape, dtype or device since the build (the next
        ``sync`` then asks for a rebuild)? Changes nothing."""
        local = [_local(p) for p in self.params]
        # (a cast, model.double() or .float() of a bf16 model: rebuilt as the flat store is;
        # the old store rounded each new gradient to the old dtype and kept a stale master)
        return (any(t.shape != s for t, s in zip(local, self._shapes))
                or any(t.dtype != self.dtype or t.device != self.device for t in local)
                or (self.in_place and [t.data_ptr() for t in local] != self._ptrs))

    def sync(self, state: dict) -> bool:
        """Take this step's θ and g (copies in, or the table's gradient column in place) and
        re-attach the state; False: the shards moved or changed shape or dtype, rebuild
        needed."""
        if self.moved():
            return False
        local = [_local(p) for p in self.params]
        reloaded: set[int] = set()  # tensors whose master was replaced (load_state_dict)
        with torch.no_grad():
            if self.in_place:
                grads = self._grad_shards()
                if [g.data_ptr() for g in grads] != [g.data_ptr() for g in self.table.grads]:
                    self.table = with_grads(self.table, grads)  # new gradients: new g column
            elif not self.master:
                torch._foreach_copy_(self._param_views, local)
            for i, p in enumerate(self.params):
                if not self.in_place:
                    g = p.grad
                    if g is None:
                        self._grad_views[i].zero_()
                    else:
                        g = _local(g)
                        if g.is_sparse:
                            raise RuntimeError(
                                "armijo_fused optimizers do not support sparse gradients")
                        self._grad_views[i].copy_(g)
                pstate = state[p]
                for name, dt in zip(self.state_names, self._state_dt[i]):
                    old = pstate.get(name)
                    if old is not dt:
                        if old is not None:
                            _local(dt).copy_(_local(old))
                            if name == "master":  # a reloaded master: the shard follows it
                                reloaded.add(i)
                        elif name == "master":  # none saved: the shard is the master
                            _local(dt).copy_(local[i])
                        else:  # deleted (opt.state.clear(), ...): afresh, as torch does
                            _local(dt).zero_()
                            self.fresh.add(i)
                        pstate[name] = dt
            if self.master:  # the shards win only where they changed since the last pass
                for i, (view, t) in enumerate(zip(self._param_views, local)):
                    if i in reloaded and not self._building:
                        t.copy_(view)  # (as FlatBuffer does: θ follows a replaced master)
                    elif self._building:  # (also where a cast rounded the master twice)
                        view.copy_(torch.where(master_rounded(view, t), view, t.float()))
                    else:
                        view.copy_(torch.where(view.to(t.dtype) != t, t.float(), view))
            elif self._building:  # a half model cast to fp32 since: θ takes its kept master
                for i, (p, t) in enumerate(zip(self.params, local)):
                    kept = state[p].get("master")
                    if kept is not None and _local(kept).shape == t.shape:
                        kept = _local(kept).to(t.device)
                        t.copy_(torch.where(master_rounded(kept, t), kept.to(t.dtype), t))
                        if not self.in_place:
                            self._param_views[i].copy_(t)
        return True

    def take_fresh(self) -> set[int]:
        """The tensors whose deleted state :meth:`sync` restarted since the last call."""
        fresh, self.fresh = self.fresh, set()
        return fresh

    def after_write(self) -> None:
        """Copy the flat θ back into the local shards (after every pass that moved θ); in place
        the passes wrote the shards themselves."""
        if self.in_place:
            return
        with torch.no_grad():
            torch._foreach_copy_([_local(p) for p in self.params], self._param_views)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """FSDP2 writes a fresh gradient DTensor after the next backward: drop the current one
        (whatever ``set_to_none`` says)."""
        self._drop_grads()

    def _drop_grads(self) -> None:
        """Drop the gradients, the table's references included (they held the last step's
        gradients through the next forward): its g column is stale until :meth:`sync`, which
        finds no tensors to match and rebuilds it before any pass runs."""
        for p in self.params:
            p.grad = None
        if self.table is not None:
            self.table = replace(self.table, grads=[])


def fsdp_modules(modules) -> list:
    """Every FSDP2 module (``fully_shard``-ed) inside ``modules``, outermost first."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    found, seen = [], set()
    for module in modules:
        for m in module.modules():
            if isinstance(m, FSDPModule) and id(m) not in seen:
                seen.add(id(m))
                found.append(m)
    return found
