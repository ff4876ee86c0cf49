"""The optimizer's store: its parameters, grouped into flat buffers per (param group, device,
dtype), re-validated against ``param_groups`` at every step and rebuilt when they change; the
layer-wise blocks; what trials must keep unchanged (the models' buffers); state that restarts.
A mixin of :class:`~armijo_fused.optimizers.base.ArmijoOptimizer`."""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from time import perf_counter

import torch
from torch import Tensor

from .. import ops
from ..backends import buffer_backend
from ..linesearch import trial as trial_mod
from ..storage.flat import MASTER_DTYPES, FlatBuffer
from ..storage.in_place import InPlaceBuffer
from ..storage.sharded import ShardedBuffer, fsdp_modules, is_dtensor
from .calls import outside_stacklevel

# the live optimizer whose flat buffer a storage is (by its data pointer): a parameter that a
# rebuild finds in another optimizer's buffer has been taken by it (see _warn_taken)
_FLAT_HOLDERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _code_of(fn, depth: int = 2):
    """What identifies a loss function across steps, where a new closure object is made at
    every step from the same code: its code object and the modules it holds at the first
    level (in closure cells, a partial's arguments, its defaults) or as attributes of the
    objects it holds there (a method's or a callable's object, their slots too), and the same
    of the functions it holds there (a closure that calls the phase's loss function `f`: the
    switch to a loss that runs a discriminator went unseen). Modules with parameters or
    buffers only: they live as long as training, where a wrapper object made per phase may be
    freed and its id reused, and a criterion made at every step (nn.MSELoss() in the loop)
    made the key new at every step, and the walk of the loss function's reach with it (+50 %
    of a step at 600 modules, a review). A network reached through a container or a rebound
    global name is not told apart."""
    held = []
    if isinstance(fn, functools.partial):
        held += [fn.func, *fn.args, *fn.keywords.values()]
        fn = fn.func
    if inspect.ismethod(fn):
        held.append(fn.__self__)
        fn = fn.__func__
    code = getattr(fn, "__code__", None)
    if code is None:  # a callable object
        held.append(fn)
        code = type(fn)
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            held.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    held += getattr(fn, "__defaults__", None) or ()
    modules, inner = [], []
    for x in held:
        if isinstance(x, torch.nn.Module):
            modules.append(x)
        elif depth > 0 and (inspect.isfunction(x) or inspect.ismethod(x) or
                            isinstance(x, functools.partial)):
            inner.append(_code_of(x, depth - 1))
        elif not isinstance(x, (Tensor, type)):
            values = list(vars(x).values()) if isinstance(getattr(x, "__dict__", None),
                                                          dict) else []
            try:  # (a slot whose read raises is not ours to judge)
                values += [getattr(x, n) for n in trial_mod.slot_names(type(x))
                           if hasattr(x, n)]
            except Exception:
                pass
            modules += [v for v in values if isinstance(v, torch.nn.Module)]
    kept = tuple(id(m) for m in modules if next(m.parameters(), None) is not None or
                 next(m.buffers(), None) is not None)
    return code, kept, tuple(inner)


def trainable_key_reference(param_groups) -> tuple:
    """Per group, (number of tensors, then each one's id() if it requires grad, else 0): the
    reference of ``_C.trainable_key``."""
    return tuple([(len(g["params"]), *[id(p) if p.requires_grad else 0 for p in g["params"]])
                  for g in param_groups])


def _storage_ptr(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _extent(t: Tensor) -> int:
    """Elements from a tensor's first to one past its last (its span in memory)."""
    return 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))


class StoreMixin:

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
        if self._blocks_by(gi) == "group":
            names, ids = [group.get("block", f"group.{gi}")], [0] * len(params)
        else:
            from ..blocks import block_names

            # from every tensor of the group, trainable or not: freezing one layer must not
            # rename (and so restart) the blocks of the others
            # (over the whole model, for its stacks; once per set of names, not per group)
            key = (id(self._names), len(self._names))
            cached = self.__dict__.get("_block_names_of")
            if cached is None or cached[0] != key:
                cached = self._block_names_of = (key, block_names(self._names.values()))
            named = cached[1]
            of, names = {}, []
            for p in group["params"]:
                of[id(p)] = name = named.get(self._names.get(id(p)), "unnamed")
                if name not in names:
                    names.append(name)
            ids = [names.index(of[id(p)]) for p in params]
        if group.get("block_names") != names:
            self._rename_blocks(group, names)
        return ids

    def _all_under(self, group: dict, module: str) -> bool:
        """Does every tensor of ``group`` have a name under ``module`` (past wrapper prefixes)?"""
        from ..blocks import bare_name

        names = [self._names.get(id(p)) for p in group["params"]]
        return bool(names) and all(
            n is not None and bare_name(n).startswith(module + ".") for n in names)

    def _blocks_by(self, gi) -> str:
        """How group gi is cut into blocks: ``"name"`` (module names) or ``"group"`` (the group
        is one block); see :meth:`_default_blocks_by`. Decided once, when the group is set up,
        so that a group added later (a new head) does not re-cut the first one."""
        group = self.param_groups[gi]
        mode = group.get("blocks_by")
        if mode is None:  # a checkpoint from before the key: as its blocks were cut
            old = group.get("block_names")
            if old is not None:
                mode = "group" if old == [group.get("block", f"group.{gi}")] else "name"
            else:
                mode = self._default_blocks_by(group, constructing=True)
            group["blocks_by"] = mode
        return mode

    def _default_blocks_by(self, group: dict, constructing: bool) -> str:
        """Module names cut a group given at construction into blocks when its tensors have
        names (``model=``, or ``named_parameters()``): HF Trainer and nanoGPT split the model
        into two weight-decay groups, which as blocks hid every layer (two step sizes for a
        whole GPT-2). A group of unnamed tensors (several groups given without names), or one
        added later (a new head), is one block; ``"blocks_by": "group"`` in a group asks for
        that, ``"name"`` for the cut."""
        named = any(id(p) in self._names for p in group["params"])
        return "name" if constructing and named else "group"

    def _rename_blocks(self, group: dict, names: list) -> None:
        """Give the group per-block state for ``names``. A block that keeps its name (the same
        model's, a checkpoint's) keeps its step sizes, step length, merge and search record; a
        new one starts from the smallest step size carried over (mid-run: no untested step
        longer than a tested one), else from the group's global η (a global checkpoint) or
        ``init_step_size``; it is untested (``block_tested``) until an accepted search moves it."""
        from ..blocks import bare_name, is_container_block

        old = group.get("block_names")
        lists = isinstance(group["step_size"], list) and old is not None
        keys = ("step_size", "step_size_avg", "step_length", "collapsed", "block_searched_at",
                "block_tested")
        where = {}
        if lists:
            where = {n: i for i, n in enumerate(old)}
            if "block_tested" not in group:  # a checkpoint from before the key: as tested
                group["block_tested"] = [1] * len(old)
            if not all(isinstance(group.get(k), list) and len(group[k]) == len(old)
                       for k in keys + ("block_owner",)):
                where = {}  # a checkpoint without some of them: start every block afresh
        # a model wrapped inside the module that holds it (torch.compile's _orig_mod., DDP's
        # module., peft's base_model.model.) named its containers with the wrapper before such
        # a module was cut below its name: "unet._orig_mod.down_blocks.0" is now
        # "unet.down_blocks.0", the same block. Matched both ways, by the name without the
        # wrapper, where one block has it (a held module with no tensors of its own keeps the
        # wrapper in its containers' names), and not onto a name this model has itself
        def unwrapped(name):
            head, dot, rest = name.partition(".")
            return f"{head}.{bare_name(rest)}" if dot else name

        by_key: dict[str, list] = {}
        for n in names:
            by_key.setdefault(unwrapped(n), []).append(n)
        renamed = {}
        for o in list(where):
            alias = by_key.get(unwrapped(o), [])
            if o not in names and len(alias) == 1 and alias[0] not in where:
                renamed[o] = alias[0]
                where[alias[0]] = where.pop(o)
        # a block cut finer (a checkpoint from before its container's layers were blocks of
        # their own: "transformer_blocks" is now "transformer_blocks.0", ...): each part
        # carries its whole's state, as the whole had it
        # (only a cut the blocks' rules make, a layer of a numbered container: "layer" and
        # "layer.0" are another model's blocks; or a module's own block beside its containers,
        # "unet" beside "unet.down_blocks.0", now cut below its name: "unet.conv_in", ...)
        parts = {}
        for n in names:
            whole_of = [o for o in where if n not in where and n.startswith(o + ".")]
            if not whole_of:
                continue
            whole = max(whole_of, key=len)
            # (only where every block the checkpoint had below it is still one: another cut,
            # a stack's layers renamed, has its own state, which the whole's would overwrite)
            below = [o for o in where if o.startswith(whole + ".")]
            # (or none: before its containers were blocks, the whole module was one; its parts
            # are then the cut, which has a numbered container among them)
            cut = below or any(is_container_block(m) for m in names if m.startswith(whole + "."))
            held = "." not in whole and whole not in names and cut and all(
                o in names for o in below)
            # (a container's layer: from the container's own block, not any block above it)
            if (is_container_block(n) and whole == n.rsplit(".", 1)[0]) or held:
                parts[n] = where[whole]
        refined = bool(parts or renamed) and all(n in where or n in parts for n in names) \
            and all(o in names or any(n.startswith(o + ".") for n in parts) for o in where)
        where.update(parts)
        carried = [n for n in names if n in where]
        # a single block named after the module every tensor of the group lies under: the whole
        # group's η, as from a global checkpoint (a model held by one module, self.net =
        # nn.Sequential(...), was one block "net" before its blocks were read below it). Not
        # another model's single block: that restarts with the warning below
        whole = len(where) == 1 and not carried and self._all_under(group, old[0])
        if carried:
            eta = min(group["step_size"][where[n]] for n in carried)
            avg = min(group["step_size_avg"][where[n]] for n in carried)
        elif whole:
            eta, avg = group["step_size"][0], group["step_size_avg"][0]
        else:
            eta = group["step_size"] if not isinstance(group["step_size"], list) \
                else self._init_step_size
            avg = group["step_size_avg"] if not isinstance(group["step_size_avg"], list) \
                else self._init_step_size
        fresh = dict(step_size=eta, step_size_avg=avg, step_length=0.0, collapsed=0,
                     block_searched_at=0, block_tested=0)
        new = {k: [group[k][where[n]] if n in where else fresh[k] for n in names] for k in keys}
        owner = []
        for j, n in enumerate(names):  # a merge holds where both blocks are still there
            o = old[group["block_owner"][where[n]]] if n in where else n
            o = renamed.get(o, o) if n in where else o  # (its owner under the checkpoint's name)
            owner.append(names.index(o) if o in names and n not in parts else j)
        if old is not None and self.__dict__.get("_blocks_loaded") and set(old) != set(names) \
                and not whole and not refined:
            self._warn_once("blocks_renamed", (
                f"the checkpoint's blocks {old[:4]} are not this model's {names[:4]}: the "
                f"blocks it does not name start from step size {eta:g}. Block names are read "
                "past wrapper prefixes (module., _orig_mod., peft's base_model.model.); a "
                "checkpoint of a wrapped model saved before that was so names its blocks after "
                "the wrapper (a PeftModel's head: 'base_model'), one saved by a version of "
                "armijo_fused that cut this model otherwise (armijo_fused.blocks names the "
                "blocks) names older blocks, or it is another model's"))
        group.update(block_names=names, block_owner=owner, **new)

    def _trainable_key(self) -> tuple:
        """Which tensors train, group by group: the flat buffers are rebuilt when it changes.
        Per group (number of tensors, then each one's id() if it trains, else 0). It runs before
        every step's first pass: the C++ twin (``_C.trainable_key``) where it is built."""
        fast = getattr(ops._C, "trainable_key", None)  # (not in an extension built before it)
        if fast is not None:
            return fast([g["params"] for g in self.param_groups])
        return trainable_key_reference(self.param_groups)

    def _sync_buffers(self) -> list[FlatBuffer]:
        """The flat buffers, re-validated against ``param_groups`` (rebuilt if anything moved)."""
        key = self._trainable_key()
        if self._buffers is not None and key == self._buffer_key:
            if all(b.sync(self.state) for b in self._buffers):
                if any(b.fresh for b in self._buffers):
                    self._restart_fresh_tensors()
                self._warn_gathered_grads()
                if self.__dict__.get("_masters_pending") and not self.__dict__.get("_loading"):
                    self._drop_stale_masters(self._buffers)
                return self._buffers
        # a sync that stopped at a moved tensor may have restarted deleted state before it
        restarted = {id(b.params[i]) for b in self._buffers or () for i in b.take_fresh()}
        if self._buffers is not None and self.flat:
            self._warn_taken()
        self._restart_or_warn_stateless(restarted)
        self._follow_moved_tensors()
        self._warn_shared_storage()
        self._keep_fp32_as_masters(self._buffers)
        by_slot: dict = {}
        for gi, p in self._trainable():
            if p.device.type == "meta":  # else a bare "Cannot copy out of meta tensor" later
                raise ValueError(
                    f"a parameter ({self._shown([p])}) is on the meta device and holds no data: "
                    "materialise the model before the first step. model.to_empty(device=...) "
                    "makes new parameters unless torch.__future__."
                    "set_swap_module_params_on_conversion(True) is set, so build the "
                    "optimizer after it (and after initialising the weights)")
            if any(st == 0 and n > 1 for st, n in zip(p.stride(), p.shape)):
                # (torch's optimizers refuse it too; the flat store split its rows apart)
                raise ValueError(
                    f"a parameter ({self._shown([p])}) is an expanded view: several of its "
                    f"elements share one memory location (stride {tuple(p.stride())}), so a "
                    "step on each is not defined. Make it a tensor "
                    "of its own (nn.Parameter(t.expand(...).clone())), or keep the small tensor "
                    "as the parameter and expand it in forward")
            self._refuse_state_of_another_shape(p)
            by_slot.setdefault((gi, p.device, p.dtype, is_dtensor(p)), []).append(p)
        if self.layerwise and len({gi for gi, _, _, _ in by_slot}) != len(by_slot):
            raise ValueError("layerwise=True needs each param group on one device and dtype")
        self._refuse_dtensors_unsupported(any(dtensor for *_, dtensor in by_slot))
        buffers = []
        for (gi, _, _, dtensor), plist in by_slot.items():
            ids = self._group_blocks(gi, plist)
            order = sorted(range(len(plist)), key=lambda i: ids[i])  # params ordered by block
            used = sorted(set(ids))  # buffer-local block index -> group block index
            local = [used.index(ids[i]) for i in order]
            # a master being loaded wins over θ: at the load, or at the first build after a
            # load that had to wait for it (FSDP2 shards, meta tensors); at any other build the
            # model's weights win where they differ from the master rounded (weights written
            # since, also after a load)
            loading = any(self.__dict__.get(k) for k in ("_loading", "_deferred_load"))
            if dtensor:  # FSDP2 shards: FSDP owns their storage, so work on copies of them
                buf = ShardedBuffer(gi, [plist[i] for i in order], self.rule, self.state,
                                    block_ids=local, tile=self.tile,
                                    process_group=self.process_group, loading=loading)
            elif not self.flat:  # the tensors stay where they are (storage/in_place.py)
                buf = InPlaceBuffer(gi, [plist[i] for i in order], self.rule, self.state,
                                    block_ids=local, tile=self.tile, loading=loading)
            else:
                buf = FlatBuffer(gi, [plist[i] for i in order], self.rule, self.state,
                                 block_ids=local, tile=self.tile, loading=loading)
            buf.group_blocks = used
            buf.backend = buffer_backend(self.backend, buf)
            buffers.append(buf)
        old, self._buffers, self._buffer_key = self._buffers, buffers, key
        self._empty_blocks = self._blocks_without_elements(buffers)
        self._deferred_load = False
        self._outside = self._tensors_outside(buffers)
        # each trained tensor's group, for the next build (_follow_moved_tensors)
        self._group_of = {id(p): self.param_groups[b.group_index] for b in buffers
                          for p in b.params}
        self._last_dd = None  # (it held the old buffers; a cap needs a pass over the new ones)
        resumed = self.__dict__.get("_resumed_dd")  # ... a resumed one: only while they train
        if isinstance(resumed, tuple) and resumed[1] is not None and \
                not self.__dict__.get("_loading") and resumed[1] != self._trainable_mask(key):
            self._resumed_dd = None
        if old:
            self._release(old, buffers)
        # (the old buffers' keys go: a freed storage stayed keyed to this live optimizer, one
        # entry per layer-wise reload, for good)
        for ptr in [k for k, holder in _FLAT_HOLDERS.items() if holder is self]:
            del _FLAT_HOLDERS[ptr]
        for b in buffers:
            if type(b) is FlatBuffer:
                _FLAT_HOLDERS[_storage_ptr(b.params[0])] = self
        self._blocks_loaded = False
        if self.__dict__.get("_loading"):  # built by load_state_dict: the model may still be
            self._masters_pending = True  # cast to bf16 before the first step, which decides
        else:
            self._drop_stale_masters(buffers)
        self._sharded = any(getattr(b, "distributed", False) for b in buffers)
        return buffers

    def _refuse_state_of_another_shape(self, p: Tensor) -> None:
        """Before any buffer is built: a tensor whose ``.data`` was replaced by one of another
        shape (a layer resized or pruned in place) still has the state of its old shape, which
        the build's copy failed on with a bare size mismatch."""
        st = self.state.get(p)
        if not st:
            return
        # (a master only where one is kept: a tensor cast to fp32 drops its stale one)
        names = self.rule.state_names + (("master",) if p.dtype in MASTER_DTYPES else ())
        for name in names:
            v = st.get(name)
            if isinstance(v, Tensor) and v.shape != p.shape:
                raise ValueError(
                    f"the optimizer state {name!r} of a parameter ({self._shown([p])}) has "
                    f"shape {tuple(v.shape)}, the parameter {tuple(p.shape)}: its .data was "
                    "replaced by a tensor of another shape since the state was made. Start its "
                    "state afresh (del opt.state[p]) or build the optimizer again; nothing has "
                    "moved")

    def _refuse_dtensors_unsupported(self, dtensors: bool) -> None:
        """What DTensor (FSDP2) parameters cannot do, refused before the store changes (a
        refusal after the new buffers were in place left a store every later step tripped
        over with a bare AttributeError)."""
        if not dtensors:
            return
        if self.candidates is not None:  # trial weights swapped in would not be shards
            raise ValueError("candidates= does not support FSDP2 (DTensor) parameters: "
                             "use the sequential search (candidates=None)")
        if not self._modules:
            raise ValueError(
                "DTensor (FSDP2) parameters need the model: pass model= to the optimizer or "
                "to set_closure(fn, model=...), so that every FSDP module is resharded "
                "between trial forwards and they see the moved weights"
            )

    def _warn_taken(self) -> None:
        """Warn when a rebuild finds parameters of this optimizer's flat buffers re-pointed into
        another live optimizer's: both step them, and each step of either takes them back (a
        copy of θ and a rebuild at every step). A new optimizer replacing this one is not
        warned about: this one takes nothing back unless it steps again."""
        taken = []
        for b in self._buffers:
            if type(b) is not FlatBuffer:
                continue
            for p in b.params:
                other = _FLAT_HOLDERS.get(_storage_ptr(p))
                if other is not None and other is not self and any(
                        type(ob) is FlatBuffer and _storage_ptr(ob.params[0]) == _storage_ptr(p)
                        for ob in other._buffers or ()):
                    taken.append(p)
        if taken:
            self._warn_once("taken", (
                f"{self._shown(taken)} are also stepped by another armijo_fused optimizer, "
                "which has moved them into its own flat buffer; each of the two moves them back "
                "at its step (a copy of the parameters and a rebuild at every step). Give each "
                "optimizer its own parameters, or pass flat=False to both"))

    def _warn_shared_storage(self) -> None:
        """Distinct parameters whose memory overlaps (weights tied through ``.data``) get a
        flat-buffer slot each, so from here they train apart where torch's optimizers keep them
        tied. Say so, once. (Slices of one storage that do not overlap, such as another
        optimizer's flat buffer, train apart in torch too.)"""
        spans, seen_ids = [], set()
        # frozen ones too: a frozen alias of a trained tensor; and, with the flat store, the
        # registered models' tensors outside the groups (a frozen alias filtered out by
        # requires_grad: the optimized one moves into the flat buffer, the alias stays, and they
        # parted unseen where torch's optimizers keep them tied, a multi-model user's audit)
        outside = [p for model in (self._modules if self.flat else ()) for p in model.parameters()]
        for params in [g["params"] for g in self.param_groups] + [outside]:
            for p in params:
                if id(p) in seen_ids or p.device.type == "meta" or is_dtensor(p) or \
                        p.numel() == 0 or _extent(p) != p.numel() or \
                        (not self.flat and not p.requires_grad):  # (in place: not stepped)
                    continue  # (a strided view's span is not its elements: not judged)
                seen_ids.add(id(p))
                start = p.data_ptr()
                spans.append((p.device, start, start + p.element_size() * p.numel(), p))
        trained = {id(p) for _, p in self._trainable()}
        spans.sort(key=lambda s: (str(s[0]), s[1]))
        # an overlap with the span reaching furthest so far (it starts before this one and
        # ends inside or after it) is judged where one of the two trains: frozen tensors tied
        # only to each other stay tied (a frozen tied autoencoder was warned about, a review)
        shared, end, dev, reach = [], -1, None, None
        for device, start, stop, p in spans:
            if device == dev and start < end and (id(p) in trained or id(reach) in trained):
                shared += [t for t in (reach, p) if all(t is not s for s in shared)]
            if device != dev or stop > end:
                dev, end, reach = device, max(stop, end if device == dev else -1), p
        if shared:
            what = ("The flat store gives each its own slot, so they train apart from here" if
                    self.flat else
                    "With flat=False each is stepped in place along its own direction, which "
                    "the search's predicted decrease counts apart, as if they were not tied "
                    "(and the torch backend keeps the last tensor's step only)")
            self._warn_once("shared_storage", (
                f"{len(shared)} parameter(s) share their memory with another parameter "
                f"({self._shown(shared)}): weights tied through .data? {what}. Tie weights as "
                "one Parameter (head.weight = emb.weight): one gradient, one direction"))

    def _keep_fp32_as_masters(self, old) -> None:
        """A model cast from fp32 to bf16/fp16 since the last build: the old flat buffer still
        holds θ in fp32, which becomes the tensor's master (the build keeps it where the weight
        is its rounding), so the cast rounds the model's copy only, not the training's. (The
        master used to be built from the rounded weight.) Not for flat=False: the cast has
        replaced the tensors that held θ. Not in a load either: the weights loaded since win,
        and the old θ would have come back over them."""
        if any(self.__dict__.get(k) for k in ("_loading", "_deferred_load")):
            return
        by_id = {id(p): p for b in old or () for p in b.params}
        for pid, master in self._masters_of_a_cast(old).items():
            self.state[by_id[pid]]["master"] = master  # (the old buffer goes)

    def _masters_of_a_cast(self, old) -> dict:
        """id(tensor) -> its fp32 master: the θ the flat buffers ``old`` still hold for
        tensors cast to bf16/fp16 since they were built, which have no master yet."""
        out = {}
        for b in old or ():
            if type(b) is not FlatBuffer or b.master:
                continue
            for p, view in zip(b.params, b._param_views):
                if p.dtype in MASTER_DTYPES and p.shape == view.shape and \
                        p.device == view.device and "master" not in self.state.get(p, {}):
                    out[id(p)] = view.to(torch.float32, copy=True)
        return out

    def _drop_stale_masters(self, buffers) -> None:
        """A bf16 checkpoint's master, loaded for what is fp32 now: θ is its own master, and a
        stale one would come back at the next bf16 load over what trained since."""
        self._masters_pending = False
        for buf in buffers:
            if not getattr(buf, "master", False):
                for p in buf.params:
                    self.state[p].pop("master", None)

    @torch.no_grad()
    def _release(self, old: list, new: list) -> None:
        """After a rebuild: the tensors that left the store (frozen, taken out of the groups)
        stop viewing the old buffers, so that those are freed. Their values and state (kept for
        when they train again) get storage of their own, their gradient is dropped (as torch's
        ``zero_grad`` would drop it). Else one frozen bias kept every old buffer alive: the
        parameters, gradients and moments twice, and checkpoints twice their size."""
        kept = {id(p) for b in new for p in b.params}
        self.__dict__.setdefault("_left_at", {})
        for b in old:
            mine = [*b.states]
            if isinstance(b, FlatBuffer):  # (the others leave θ and g in the model's tensors)
                mine += [b.param, b.model_param, b.grad]
            if isinstance(b, ShardedBuffer) and getattr(b, "master", False) and \
                    getattr(b, "_param", None) is not None:
                mine.append(b._param)  # (an in-place buffer's fp32 master)
            # the memory they span (a sharded buffer's state DTensors sit on slices of its
            # storages, see sharded._at_offset_zero)
            spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                     for t in mine]

            def inside(t, spans=spans):
                if is_dtensor(t):  # FSDP2: the shard is what lives in our buffers
                    t = t.to_local()
                if not isinstance(t, Tensor):
                    return False
                at = t.untyped_storage().data_ptr()
                return any(lo <= at < lo + n for lo, n in spans)

            folded = self.param_groups[b.group_index]["folded"] \
                if b.group_index < len(self.param_groups) else 0
            for p in b.params:
                if id(p) in kept:
                    continue
                self._left_at[id(p)] = folded  # its moments hold this many gradients
                if inside(p.data):
                    p.data = p.data.clone()
                if inside(p.grad):
                    p.grad = None
                pstate = self.state.get(p, {})
                for name, value in list(pstate.items()):
                    if inside(value):
                        pstate[name] = value.clone()

    def _check_model_still_holds_params(self) -> None:
        """With ``model=``: a parameter the model held and holds no more was replaced
        (``module.weight = nn.Parameter(...)``, ``load_state_dict(..., assign=True)``). The
        optimizer would go on training the old tensor while the model's own never moves, and
        every search would see no effect of its steps: say so, once. (Parameters the model never
        held, such as a free-standing temperature, are not its business.) The walk over the
        model's parameters cost 0.6 µs a tensor at every search (1.5 ms of a 3.5 ms host step at
        2400 tensors): it runs on the first search of this process and every 31st; between,
        each search only looks up where the walk found each tensor (its module's
        ``_parameters``), which catches a replaced attribute at once, and a replaced submodule
        at the next walk."""
        if not self._modules or "replaced" in self.__dict__.get("_warned", ()):
            return
        slots = self.__dict__.get("_held_slots")
        if slots is not None and self.param_groups[0]["searches"] % 31 and \
                all(d.get(name) is p for d, name, p in slots):
            return
        every = trial_mod.modules_of(self._modules).values()
        held = {id(p) for m in every for p in m._parameters.values() if p is not None}
        ours = [p for g in self.param_groups for p in g["params"]]
        if getattr(self, "_in_model", None) is None:
            self._in_model = {id(p) for p in ours if id(p) in held}
        self._held_slots, seen = [], set()
        for m in every:
            for name, p in m._parameters.items():
                if p is not None and id(p) in self._in_model and id(p) not in seen:
                    seen.add(id(p))
                    self._held_slots.append((m._parameters, name, p))
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
        the parameters (found once, and again when the loss function's code changes: the
        closure is usually a new object every step, and a second phase whose loss runs another
        network, a discriminator, had its BatchNorm statistics moved by every trial, a
        multi-model user's audit). Else the parameters' own modules: ``_owned_buffers``."""
        # which tensors train (formed by this step's _sync_buffers), and the function's code
        key = (self._buffer_key, _code_of(evaluate))
        if getattr(self, "_reached", (None, None))[0] != key:
            self._reached = (key, trial_mod.models_in_reach(
                evaluate, [p for g in self.param_groups for p in g["params"]]))
        return self._reached[1] or []

    def _modules_beside_model(self, evaluate) -> list:
        """With a registered model: the other modules the loss function reaches (a GAN
        generator's loss runs the discriminator, whose BatchNorm statistics and spectral-norm
        vectors each trial forward advanced for good). Found again when the trainable tensors,
        the registered model or the loss function's code change (a second phase of training
        whose loss runs another network)."""
        key = (self._buffer_key, tuple(id(m) for m in self._modules), _code_of(evaluate))
        if getattr(self, "_beside", (None, None))[0] != key:
            inside = {id(m) for model in self._modules for m in model.modules()}
            reached = trial_mod.models_in_reach(
                evaluate, [p for g in self.param_groups for p in g["params"]], complete=False)
            self._beside = (key, [m for m in reached if id(m) not in inside])
        return self._beside[1]

    def _owned_buffers(self) -> list:
        """Without a model registered or in the loss function's reach: the buffers of the
        modules that hold the parameters (BatchNorm statistics), found once and again after the
        parameters change (a heap scan: see trial.owned_buffers)."""
        key = self._buffer_key
        if getattr(self, "_owned", (None, None))[0] != key:
            start = perf_counter()
            self._owned = (key, trial_mod.owned_buffers(
                p for g in self.param_groups for p in g["params"]))
            took = perf_counter() - start
            if took > 0.5:
                self._warn_once("heap_scan", (
                    f"finding the modules that hold the parameters took {took:.1f} s (a scan of "
                    "the heap, repeated whenever the trainable tensors change): pass model= to "
                    "the optimizer, or to set_closure(fn, model=...), to skip it"))
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
            "leave DDP's gradient_as_bucket_view off.", stacklevel=outside_stacklevel())

    def _restart_or_warn_stateless(self, restarted: set = frozenset()) -> None:
        """Before the buffers are built: tensors without state inside a group that has already
        folded gradients (see :meth:`_restart_or_warn`). ``restarted``: ids of tensors a sync of
        the old buffers has already restarted (deleted state met on the way to the rebuild)."""
        left_at = self.__dict__.setdefault("_left_at", {})
        if not self.rule.bias_corrected:
            return left_at.clear()
        first = self.rule.state_names[0]
        missing = [(gi, p) for gi, p in self._trainable()
                   if self.param_groups[gi]["folded"] > 0
                   and (id(p) in restarted or first not in self.state.get(p, {}))]
        if missing:
            self._restart_or_warn(missing)
        back = [(gi, p, self.param_groups[gi]["folded"] - left_at.pop(id(p)))
                for gi, p in self._trainable() if id(p) in left_at]
        back = [(gi, p, k) for gi, p, k in back if k > 0 and first in self.state.get(p, {})]
        if back:
            shown = self._shown([p for _, p, _ in back])
            # (once: alternating phases that freeze part of a group repeated it at every
            # unfreeze, 9 times in 20 steps)
            self._warn_once(
                "train_again",
                f"{len(back)} parameter(s) train again after {max(k for *_, k in back)} step(s) "
                f"frozen inside a param group that went on training ({shown}): their moments "
                "are bias-corrected with the group's count of steps, not with the count of "
                "gradients they hold, so their next directions are mis-corrected (by a factor "
                "that grows with the time frozen). Freeze and unfreeze whole param groups (a "
                "group for each part you freeze; a group with no trainable tensor keeps its "
                "count), and the correction stays exact. (Said once.)")

    def _tensors_outside(self, buffers) -> list:
        """The groups' tensors that ``buffers`` do not hold (frozen ones, those added since)."""
        held = {id(p) for b in buffers for p in b.params}
        return [p for g in self.param_groups for p in g["params"] if id(p) not in held]

    def _follow_moved_tensors(self) -> None:
        """Before the buffers are rebuilt: trained tensors that now sit in another param group
        than at the last build (taken out of one and added with ``add_param_group``, to give
        the head its own weight decay). Their moments hold the gradients their old group
        folded, and the bias correction is the group's count: a fresh group made only of
        tensors from groups with one count takes that count, as torch's per-tensor ``step``
        goes on (it started at 0: the moved head's steps were 0.08-0.3x AdamW's, relative to
        the body, for hundreds of steps, a user audit); where counts differ, say so."""
        before = self.__dict__.get("_group_of")
        if not before or not self.rule.bias_corrected:
            return
        first = self.rule.state_names[0]
        moved: dict = {}  # new group index -> [old group of each moved tensor]
        for gi, p in self._trainable():
            old, new = before.get(id(p)), self.param_groups[gi]
            if old is not None and old is not new and first in self.state.get(p, {}) and \
                    old["folded"] != new["folded"]:
                moved.setdefault(gi, []).append((p, old))
        for gi, items in moved.items():
            group = self.param_groups[gi]
            counts = {old["folded"] for _, old in items}
            ours = {id(p) for p, _ in items}
            if group["folded"] == 0 and len(counts) == 1 and all(
                    id(p) in ours or first not in self.state.get(p, {}) or
                    not self.state[p][first].any() for p in group["params"]) and all(
                    id(p) in ours for p in group["params"] if p.requires_grad):
                group["folded"] = counts.pop()
                continue
            self._warn_once("moved between groups", (
                f"{len(items)} trained parameter(s) moved into param group {gi} "
                f"({self._shown([p for p, _ in items])}), whose count of gradients folded "
                f"({group['folded']}) is not the one their moments hold "
                f"({', '.join(str(c) for c in sorted(counts))}): bias corrections are counted "
                "per group, so their next directions are mis-corrected. Move them into a new "
                "group of their own (add_param_group with only them, from one group), which "
                "takes their count. (Said once.)"))

    def _shown(self, params) -> str:
        """The first few of ``params`` by name, for a warning."""
        names = [self._names.get(id(p), f"a tensor of shape {tuple(p.shape)}") for p in params]
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

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
        shown = self._shown([p for _, p in partial])
        folded = self.param_groups[partial[0][0]]["folded"]
        warnings.warn(
            f"{len(partial)} parameter(s) start with zero moments inside a param group that has "
            f"already taken {folded} step(s) ({shown}): they became trainable, or their state "
            "was deleted. They share the group's bias correction, so their first directions are "
            "mis-corrected (up to ~3x Adam's). Unfreeze by adding them as a new group "
            "(optimizer.add_param_group) instead of switching requires_grad on inside an "
            "existing one; reset the state of a whole group, or of the whole optimizer "
            "(opt.state.clear()), rather than of single tensors.",
            stacklevel=outside_stacklevel())

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

    def _blocks_without_elements(self, buffers) -> frozenset:
        """Layer-wise: the (group, block) keys whose trainable tensors all have 0 elements (an
        ``nn.Linear(0, 0)``, a rank-0 adapter). They have nothing to train, as a frozen block:
        the step treats them as at lr 0 (no search turn, no η growth, no merge target) and the
        telemetry reports NaN. (Global numels: an FSDP2 shard may hold none of a block's.)"""
        if not self.layerwise:
            return frozenset()
        sizes: dict = {}
        for b in buffers:
            for p, local in zip(b.params, b.block_ids):
                key = (b.group_index, b.group_blocks[local])
                sizes[key] = sizes.get(key, 0) + p.numel()
        return frozenset(key for key, n in sizes.items() if n == 0)

    def _block_table(self):
        """(group index, block index within the group) of every block, in buffer order."""
        table = []
        for b in self._buffers:
            for local in range(b.layout.nblocks):
                table.append((b.group_index, b.group_blocks[local]))
        return table
