"""Trial forwards that are comparable with the training forward and leave no trace.

A trial evaluates the loss at a trial point on the same mini-batch. To compare it with f(θ0) it
must see the same randomness (dropout masks), and to leave training unchanged it must not advance
the global RNG, update BatchNorm running statistics, build an autograd graph, run a backward pass
or zero the gradient the search still needs. :class:`TrialEnv` arranges all of that:

* RNG (torch's, Python's ``random`` and NumPy's global one; NumPy's is read before every
  training forward of a search and set in the trials only where that forward drew from it,
  which :func:`numpy_moved_since` tells at a glance): every trial starts from ``rng_before`` (the
  state the training forward started from, when the optimizer called the closure itself or
  the caller recorded it with ``capture_rng``); after
  the step the RNG is set to ``rng_after``, the state it had when the step began its trials, so
  the steps that follow draw the same numbers whether or not trials ran.
* Buffers: the persistent buffers of the registered modules (BatchNorm statistics, counters),
  and of the modules in training mode the loss function reaches beside them (a GAN's
  discriminator; not TorchScript ones), are copied before the trials and restored after them,
  and a buffer a forward *reassigned* (``self.count = self.count + 1``) is put back as the
  tensor it was. Every trial starts from the same buffers, as it starts from the same RNG
  state: those the training forward started from (``buffers_before``, recorded with the RNG
  state by :func:`snapshot_buffers`; a spectral norm's power-iteration vectors, a running
  normaliser the forward both updates and uses), or, where none were recorded (the first
  search without ``model=``), those it left. Without that, each trial ran on what the previous
  one left (a running normaliser's trials drifted 5% off f0 and η collapsed to 2e-8).
  Non-persistent buffers are treated as caches and left as the trials leave them (a module may
  keep attributes that go with one); if a trial modifies or replaces one, a warning names it.
  The states of torchmetrics ``Metric`` submodules (a metric updated in ``training_step``) are
  restored as well. Without a registered model, the models the loss function reaches
  (:func:`models_in_reach`), or else the modules that own the parameters
  (:func:`owned_buffers`), are found once and their buffers kept the same way.
  (Nothing is patched around a forward for this: a compiled model would recompile every trial.)
* Parameters: a forward may write them in place (``nn.Embedding(max_norm=...)`` renormalises
  the rows it looks up, a hook clamps weights). The search moves θ by increments, so such a
  write would go into every later trial point and the step: the tensors known to be written are
  copied before each trial and put back after it, and the trainable ones' version counters tell
  the optimizer of a write it did not know of (``TrialEnv.written``).
* Autocast: torch caches the low-precision copies of the parameters until the outermost autocast
  region exits; a step called inside one would let every trial reuse θ0's copies (every trial
  loss equal to f0). The cache is cleared before each trial and after the last, and so is the
  cache of a ``torch.nn.utils.parametrize.cached()`` region (weight_norm, spectral_norm).
* Autograd: trials run under ``torch.no_grad()``; ``Tensor.backward``, ``torch.autograd.backward``
  and ``zero_grad`` of modules and optimizers are no-ops inside a trial, in the thread that runs
  it (:class:`ThreadScopedPatch`), so a closure that does ``zero_grad(); loss.backward()``
  (LBFGS / Lightning style) costs a forward only.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import random
import sys
import threading
import types

import torch
from torch import nn


def get_rng_state(numpy: bool = True):
    """The global random states a forward may draw from (``armijo_fused.get_rng_state()``):
    torch's, of the CPU and of every CUDA device in use (dropout masks), Python's ``random``
    (LayerDrop written with ``random.random()``) and NumPy's global ``np.random`` (HF's
    wav2vec2 / HuBERT SpecAugment masks, BigBird's random attention). For a loop that draws
    from them between its micro-batches (a random transform in the dataset, a
    ``torch.randint`` batch sampler), record it before each micro-batch's forward and
    :func:`set_rng_state` it before the same micro-batch in the trial function
    (docs/integrations.md). A generator of the model's own (``torch.Generator``,
    ``np.random.default_rng``) is not seen. ``numpy=False``: without NumPy's (about 40 µs to
    read and as much to set, where torch's and Python's take 2 and 15)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    np = sys.modules.get("numpy") if numpy else None
    return (torch.get_rng_state(), cuda, random.getstate(),
            np.random.get_state(legacy=False) if np is not None else None)


_MT_LOOK: list = [None, None]  # [the global MT19937 looked at, (pos, key) read from its C state]


def _mt19937_look():
    """(pos, key): ctypes views of the C state of NumPy's global MT19937 (its position in the
    key and the key), or None where the global generator is another one or the layout read
    does not match its ``state`` (confirmed once per generator object)."""
    np = sys.modules.get("numpy")
    bg = getattr(getattr(getattr(np, "random", None), "mtrand", None), "_rand", None)
    bg = getattr(bg, "_bit_generator", None)
    if bg is None:
        return None
    if _MT_LOOK[0] is not bg:
        look = None
        if type(bg).__name__ == "MT19937":
            try:
                import ctypes

                addr = bg.ctypes.state_address
                key = (ctypes.c_uint32 * 624).from_address(addr)
                pos = ctypes.c_int.from_address(addr + 624 * 4)
                st = bg.state["state"]
                if pos.value == st["pos"] and all(key[i] == st["key"][i] for i in (0, 1, 623)):
                    look = (pos, key)
            except Exception:  # (no ctypes view: the full state is compared instead)
                look = None
        _MT_LOOK[:] = [bg, look]  # (holding bg: its id and address stay its own)
    return _MT_LOOK[1]


def numpy_glance():
    """A fingerprint of NumPy's global MT19937 (position and first two key words, from its C
    state: well under a µs), or None where it cannot be had (see :func:`_mt19937_look`). Equal
    fingerprints: no uniform bits drawn in between (a cached Gaussian may have been)."""
    look = _mt19937_look()
    return None if look is None else (look[0].value, look[1][0], look[1][1])


def numpy_moved_since(state) -> bool:
    """Has NumPy's global generator drawn since ``state`` (NumPy's entry of
    :func:`get_rng_state`)? For the global MT19937 without a cached Gaussian, a look at its
    position and first key words in its C state (well under a µs; reading the state costs
    about 35): every draw of uniform bits moves the position, and a pass through the whole key
    renews it. Otherwise (another bit generator; a cached Gaussian, which a legacy normal draw
    consumes without moving the position) the states are compared in full."""
    look = _mt19937_look()
    if look is not None and state.get("bit_generator") == "MT19937" and \
            not state.get("has_gauss"):
        pos, key = look
        s = state["state"]
        return not (pos.value == s["pos"] and key[0] == s["key"][0] and key[1] == s["key"][1])
    return not _same_state(state, sys.modules["numpy"].random.get_state(legacy=False))


def _same_state(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            _same_state(a[k], b[k]) for k in a)
    if hasattr(a, "shape"):  # an array
        return hasattr(b, "shape") and a.shape == b.shape and bool((a == b).all())
    return a == b


def set_rng_state(state) -> None:
    """Put back a state from :func:`get_rng_state` (``armijo_fused.set_rng_state``). Inside a
    trial this is undone when the trial ends: training goes on from the RNG state it had."""
    if not (isinstance(state, tuple) and len(state) in (2, 4) and torch.is_tensor(state[0])):
        raise TypeError("set_rng_state takes what armijo_fused.get_rng_state() returned (the "
                        f"torch, Python and NumPy states together), got {type(state).__name__}")
    cpu, cuda, py, np_state = state if len(state) == 4 else (*state, None, None)
    env = getattr(_here, "env", None)
    if env is not None:
        env.rng_set = True  # (the trial's own doing: not a draw it cannot replay)
        if np_state is not None:
            env.keep_numpy_state()  # (before it changes: undone when the trials end)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    if py is not None:
        random.setstate(py)
    if np_state is not None:
        sys.modules["numpy"].random.set_state(np_state)


_here = threading.local()  # .env: the TrialEnv whose trial runs now in this thread

_depth = 0  # trials running now, in all threads (in_trial())


class ThreadScopedPatch:
    """Patches of functions of torch's (NumPy's, Python's) that act only in the threads that
    asked for them, each with a value of its own (``active(value)``); in every other thread the
    patched function is the original. Installed when the first thread enters, removed when the
    last one leaves, under a lock: two threads each putting back what it found at entry left
    the patches installed for good (torch's backward a no-op in the whole process).

    ``places()``: the (owner, name) pairs to patch, looked up at install time;
    ``act(real, value, args, kwargs)``: what a call does in a thread that asked."""

    def __init__(self, places, act):
        self._places, self._act = places, act
        self._lock = threading.Lock()
        self._values: dict = {}  # thread id -> stack of the values its entries gave
        self._originals: list = []
        self._made: dict = {}  # (id(owner), name) -> (original, its patch): made once

    def _patched(self, real):
        values, act = self._values, self._act

        @functools.wraps(real)
        def patched(*args, **kwargs):
            stack = values.get(threading.get_ident())
            if not stack:
                return real(*args, **kwargs)
            return act(real, stack[-1][0], args, kwargs)
        return patched

    @contextlib.contextmanager
    def active(self, value=True):
        # the undo is entered first and takes back only this entry (a token of its own), so an
        # exception anywhere in the entry (a Ctrl-C) leaves nothing installed that it put in
        here, token = threading.get_ident(), (value,)
        try:
            with self._lock:
                if not self._values:
                    if not self._originals:  # (kept where an undo was cut short: still true)
                        self._originals = [(owner, name, owner.__dict__[name])
                                           for owner, name in self._places()]
                    for owner, name, real in self._originals:
                        made = self._made.get((id(owner), name))
                        if made is None or made[0] is not real:
                            made = self._made[(id(owner), name)] = (real, self._patched(real))
                        setattr(owner, name, made[1])
                self._values.setdefault(here, []).append(token)
            yield
        finally:
            with self._lock:
                stack = self._values.get(here, [])
                for i in range(len(stack) - 1, -1, -1):
                    if stack[i] is token:
                        del stack[i]
                        break
                if not stack:
                    self._values.pop(here, None)
                if not self._values:
                    for owner, name, real in self._originals:
                        setattr(owner, name, real)
                    self._originals = []


def _rng_setter_places():
    np = sys.modules.get("numpy")
    places = [(torch, "set_rng_state"), (torch.random, "set_rng_state"), (random, "setstate")]
    if np is not None:
        places.append((np.random, "set_state"))
    if torch.cuda.is_initialized():
        places += [(torch.cuda, "set_rng_state"), (torch.cuda, "set_rng_state_all")]
    return places


def _mark_rng_set(real, env, args, kwargs):
    env.rng_set = True
    return real(*args, **kwargs)


_RNG_SETTERS = ThreadScopedPatch(_rng_setter_places, _mark_rng_set)


def in_trial() -> bool:
    """True while a trial forward runs (``armijo_fused.in_trial()``). Python-side effects of a
    forward, such as a forward hook that logs activations, a counter of seen tokens or a metric
    updated inside ``forward``, run once per trial too: guard them with ``if not in_trial()``.
    Process-wide: ``nn.DataParallel`` runs the trial's forward in threads of its own. (The
    suppression of ``backward`` and ``zero_grad`` is not: :func:`in_trial_here`.)"""
    return _depth > 0


def in_trial_here() -> bool:
    """True in a thread that runs a trial (its closure's backward and ``zero_grad`` are
    suppressed; our own ``zero_grad`` checks this too, it overrides the patch; a Ctrl-C is
    delivered at once), False in every other: a training loop in a thread of its own goes on.
    Entered after the trial's patches and left before them, as :func:`in_trial`."""
    return getattr(_here, "depth", 0) > 0


def _backward_places():
    clip = torch.nn.utils.clip_grad
    places = [(torch.Tensor, "backward"), (torch.autograd, "backward"), (nn.Module, "zero_grad"),
              (torch.optim.Optimizer, "zero_grad")]
    if "_clip_grads_with_norm_" in clip.__dict__:  # (torch >= 2.6; called by name)
        places.append((clip, "_clip_grads_with_norm_"))
    if "clip_grads_with_norm_" in torch.nn.utils.__dict__:  # (the same, exported)
        places.append((torch.nn.utils, "clip_grads_with_norm_"))
    return places


# ``backward``, ``zero_grad`` and the scaling step of ``clip_grad_norm_`` (and
# ``clip_grads_with_norm_``) do nothing in a thread running a trial: a closure's
# ``clip_grad_norm_`` (the port of a torch recipe) ran again in every trial on the gradient the
# search is still using, and, its norm divided by norm + 1e-6, shrank it by about 2e-6 each time
_BACKWARD = ThreadScopedPatch(_backward_places, lambda real, value, args, kwargs: None)


def _ddp_places():
    ddp = torch.nn.parallel.DistributedDataParallel
    return [(ddp, "_check_sync_bufs_pre_fwd")] if "_check_sync_bufs_pre_fwd" in ddp.__dict__ \
        else []  # (another torch: DDP left alone)


def _no_buffer_sync(real, seen, args, kwargs):
    wrapper = args[0]
    seen.setdefault(wrapper, wrapper.require_forward_param_sync)
    return False


# DDP broadcasts its buffers in the first forward after a training forward. In a trial that is a
# collective a rank whose loss function raised before its forward never joins (the ranks' next
# collectives then mismatch: a hang or a crash), and the trial's forward clears the flag
# (``require_forward_param_sync``), so the next training forward broadcast nothing. Inside a
# trial DDP syncs no buffers; the dict given to ``active`` records each wrapper's flag as the
# trial found it, and :meth:`TrialEnv.close` puts it back: the next training forward
# broadcasts, as without trials. (Patched on the class: the loss function may reach a wrapper
# the optimizer never sees.)
_DDP_BUFFER_SYNC = ThreadScopedPatch(_ddp_places, _no_buffer_sync)


_CONTAINER_ITEMS = 16  # entries of a dict / list / tuple that models_in_reach looks into


def models_in_reach(fn, params, depth: int = 3, *, complete: bool = True
                    ) -> list[nn.Module] | None:
    """The modules a loss function can reach (its closure cells, defaults, globals it names,
    a bound method's object, their attributes, the first entries of dicts, lists and tuples
    among them: ``depth`` levels), if together they hold every
    one of ``params``; else None (``complete=False``: whatever it reaches). Cheap, and what a
    closure usually captures: the model (or a DDP / compiled wrapper of it, or ``self``
    holding it)."""
    wanted = {id(p) for p in params}
    seen: set[int] = set()
    found: list[nn.Module] = []

    def visit(obj, level: int) -> None:
        if id(obj) in seen or level < 0:
            return
        seen.add(id(obj))
        try:
            look(obj, level)
        except Exception:  # a proxy, a dead weakref, a property that raises: not ours to judge
            pass

    def look(obj, level: int) -> None:
        if isinstance(obj, nn.Module):
            found.append(obj)
        elif inspect.ismethod(obj):
            visit(obj.__self__, level)
            visit(obj.__func__, level)
        elif inspect.isfunction(obj):
            for cell in obj.__closure__ or ():
                try:
                    visit(cell.cell_contents, level - 1)
                except ValueError:  # an empty cell
                    pass
            for value in obj.__defaults__ or ():
                visit(value, level - 1)
            names = obj.__globals__
            for name in _global_names(obj.__code__):
                if name in names:
                    visit(names[name], level - 1)
        elif isinstance(obj, functools.partial):
            for value in (obj.func, *obj.args, *obj.keywords.values()):
                visit(value, level - 1)
        elif isinstance(obj, dict):  # models = {"net": net}; only a few entries: not a dataset
            for value in list(obj.values())[:_CONTAINER_ITEMS]:
                visit(value, level - 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj[:_CONTAINER_ITEMS]:
                visit(value, level - 1)
        elif not isinstance(obj, (type, types.ModuleType)):
            if isinstance(getattr(obj, "__dict__", None), dict):
                for value in list(vars(obj).values()):
                    visit(value, level - 1)
            # an object without a __dict__ keeps its attributes in slots (a dataclass with
            # slots=True holding the discriminator was not looked into: its BatchNorm
            # statistics moved with every trial, a multi-model user's audit)
            for name in slot_names(type(obj)):
                if hasattr(obj, name):
                    visit(getattr(obj, name), level - 1)

    visit(fn, depth)
    if not complete:
        return found
    held = {id(p) for m in found for p in m.parameters()}
    return found if found and wanted <= held else None


@functools.lru_cache(maxsize=256)
def slot_names(cls) -> tuple:
    """The ``__slots__`` attribute names of ``cls`` and its bases (a string is one name), as
    ``getattr`` takes them: a private one (``__disc``) is stored mangled, ``_Holder__disc``."""
    names = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for n in [slots] if isinstance(slots, str) else slots:
            if n in ("__dict__", "__weakref__"):
                continue
            if n.startswith("__") and not n.endswith("__"):
                n = f"_{klass.__name__.lstrip('_')}{n}"
            names.append(n)
    return tuple(names)


def _global_names(code, depth: int = 3) -> list[str]:
    """The names a function's code looks up, with those of the code nested in it (a generator
    expression, a comprehension, an inner lambda: ``sum(model(b) for b in window)`` names
    ``model`` only in its generator's code)."""
    names = list(code.co_names)
    if depth > 0:
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                names += _global_names(const, depth - 1)
    return names


def _clear_cast_caches() -> None:
    """Forget what was computed from the parameters at another point: the casts a
    ``torch.autocast`` region caches until it exits, and the weights a
    ``torch.nn.utils.parametrize.cached()`` region caches (weight_norm, spectral_norm, ...).
    A step called inside either region otherwise ran every trial forward on θ0's weights."""
    torch.clear_autocast_cache()
    parametrize = sys.modules.get("torch.nn.utils.parametrize")
    if parametrize is not None and getattr(parametrize, "_cache_enabled", 0):
        parametrize._cache.clear()


def owned_buffers(params) -> list[tuple[dict, set]]:
    """The buffers of the modules that hold ``params``, as (``_buffers``,
    ``_non_persistent_buffers_set``) of each, for an optimizer built without ``model=``: their
    BatchNorm statistics must survive the trials too.

    A parameter does not know its module; the garbage collector's referrer lists do: a parameter
    is held by its module's ``_parameters`` dict, which is held by the module's ``__dict__``,
    where ``_buffers`` sits beside it. Two scans of the heap, once per optimizer and again when
    the trainable tensors change; they grow with the heap and the tensors (a review measured
    0.5 s for 500 tensors and 4.6 s for 4,000, or 1.6 s with 1.3M objects on the heap): pass
    ``model=`` to skip them. Modules with buffers but no parameters (a BatchNorm with ``affine=False``) are
    not found: pass ``model=`` for those.
    """
    params = list(params)
    if not params:
        return []
    ids = {id(p) for p in params}
    holders = [r for r in gc.get_referrers(*params)
               if type(r) is dict and any(id(v) in ids for v in r.values())]
    if not holders:
        return []
    held = {id(d) for d in holders}
    found = {}
    for r in gc.get_referrers(*holders):
        attrs = r if type(r) is dict else getattr(r, "__dict__", None)
        if (type(attrs) is dict and id(attrs.get("_parameters")) in held
                and type(attrs.get("_buffers")) is dict):
            found[id(attrs)] = (attrs["_buffers"],
                                attrs.get("_non_persistent_buffers_set", set()))
    return list(found.values())


def _metrics(modules) -> list:
    """torchmetrics ``Metric`` submodules: their states are attributes, not buffers."""
    tm = sys.modules.get("torchmetrics")
    if tm is None:
        return []
    return [m for module in modules for m in module.modules() if isinstance(m, tm.Metric)]


# what a Metric's update changes besides its states (kept if present; torchmetrics' own names)
_METRIC_ATTRS = ("_update_count", "_computed", "_forward_cache")


def _copy_metric(metric) -> tuple:
    states = {name: value.detach().clone() if isinstance(value, torch.Tensor) else list(value)
              for name, value in metric.metric_state.items()}
    return metric, states, {a: getattr(metric, a) for a in _METRIC_ATTRS if hasattr(metric, a)}


def modules_of(roots) -> dict:
    """Every module of ``roots`` and below, each once, by id, in the order of
    ``module.modules()``: the same walk without the names ``named_modules`` builds for each
    (half its cost; every search takes it: 110 -> 60 µs for GPT-2's 164 modules here)."""
    every: dict = {}
    stack = list(roots)  # (any iterable, as the comprehension it replaces took)
    stack.reverse()
    while stack:
        m = stack.pop()
        if id(m) in every:
            continue
        every[id(m)] = m
        children = [c for c in m._modules.values() if c is not None]
        children.reverse()
        stack.extend(children)
    return every


def _kept_buffers(modules=(), buffers=(), beside=()) -> tuple[list, list]:
    """The buffers the trials keep, as (``_buffers`` dict, name, tensor), and the
    non-persistent ones of the registered modules they watch, as (module name, ``_buffers``,
    name, tensor, its version); see :class:`TrialEnv` for ``modules``, ``buffers`` and
    ``beside``."""
    kept, caches = [], []
    # (a module reached twice, as a model and inside another, is kept once)
    every = modules_of(modules)
    owned = [(type(m).__name__, m._buffers, m._non_persistent_buffers_set)
             for m in every.values()]
    owned += [(None, bufs, non_persistent) for bufs, non_persistent in buffers]
    for module in beside:
        for m in module.modules():
            # (a TorchScript module's _buffers is a wrapper close() cannot restore through)
            if m.training and id(m) not in every and \
                    not isinstance(m, torch.jit.ScriptModule):
                every[id(m)] = m
                owned.append((None, m._buffers, m._non_persistent_buffers_set))
    for label, bufs, non_persistent in owned:
        for name, buf in bufs.items():
            # (an inference tensor no forward outside inference mode can change in place,
            # and copying it back raised after the trials, leaving the step half done)
            # (nor a lazy module's buffer before its first forward, which has no data)
            if buf is None or isinstance(buf, nn.parameter.UninitializedBuffer) or \
                    buf.is_inference():
                continue
            if name in non_persistent:
                if label is not None:  # only a registered model's are named
                    caches.append((label, bufs, name, buf, buf._version))
            else:
                kept.append((bufs, name, buf))
    return kept, caches


_MISSING = object()  # (an attribute a module did not have)


def tensor_attributes(modules=(), or_none: bool = False) -> list:
    """(label, the module's ``__dict__``, name) of every plain tensor attribute of ``modules``
    and their submodules: state a forward may reassign that is neither a parameter nor a
    buffer (a recurrent state carried from batch to batch, ``self.h = h.detach()``). With
    ``or_none``, those set to None too (a state the first forward creates)."""
    return [(type(m).__name__, m.__dict__, k) for m in modules_of(modules).values()
            for k, v in m.__dict__.items()
            if isinstance(v, torch.Tensor) or (or_none and v is None)]


def snapshot_attributes(places) -> list:
    """(``__dict__``, name, its value now) for :func:`tensor_attributes`' places."""
    return [(d, k, d.get(k, _MISSING)) for _, d, k in places]


def _put_back_attributes(entries) -> None:
    for d, k, value in entries:
        if value is _MISSING:
            d.pop(k, None)
        elif d.get(k, _MISSING) is not value and not _registered(d, k):
            d[k] = value


def _registered(d, k) -> bool:
    """Is ``k`` now a parameter, buffer or submodule of the module whose ``__dict__`` is
    ``d``? Then an attribute of that name put back would hide it: ``prune.remove`` after the
    record (between ``capture_rng()`` and ``step()``) turns the plain ``weight`` into a
    Parameter again, and every trial forward then ran on the stale masked tensor (the search
    exhausted, a user audit)."""
    return any(k in (d.get(slot) or ()) for slot in ("_parameters", "_buffers", "_modules"))


def snapshot_buffers(modules=(), buffers=(), beside=()) -> list:
    """The kept buffers as they are now, (``_buffers``, name, tensor, a copy) each: taken with
    the RNG state before a training forward, they are where every trial starts
    (``TrialEnv(buffers_before=...)``). All of them: a version counter cannot tell which ones
    a forward writes (BatchNorm's kernel updates its running statistics without a bump)."""
    return [(bufs, name, buf, buf.detach().clone())
            for bufs, name, buf in _kept_buffers(modules, buffers, beside)[0]]


def _put_back(entries) -> None:
    """Put (``_buffers``, name, tensor, value) entries back: the tensor in its module (a forward
    may have reassigned the entry), holding the value, at the value's shape."""
    if not entries:
        return
    with torch.no_grad():
        for bufs, name, buf, value in entries:
            if bufs.get(name) is not buf:
                bufs[name] = buf
            if buf.shape != value.shape:
                # a forward that resized it in place (QAT's per-channel observers start at
                # shape (0,) and grow at their first forward): the copy raised, every step
                buf.resize_(value.shape)
        torch._foreach_copy_([e[2] for e in entries], [e[3] for e in entries])


class TrialEnv:
    """``modules``: the registered models; ``buffers``: (``_buffers``, non-persistent names) of
    modules found without one (:func:`owned_buffers`); ``beside``: modules the loss function
    reaches beside the registered models (a GAN's discriminator), whose submodules in training
    mode are kept too (one in eval mode, a frozen teacher, changes nothing: cloning its buffers
    at every search cost 140 ms for 200 MB); ``buffers_before``: :func:`snapshot_buffers` of
    them taken before the training forward, where every trial starts."""

    def __init__(self, modules=(), rng_before=None, buffers=(), beside=(), numpy_rng=True,
                 buffers_before=None, watch=(), protect=(), rng_after=None, attributes=(),
                 attributes_before=None):
        self.rng_before = rng_before if rng_before is not None else get_rng_state(numpy_rng)
        # (``rng_after``: the caller's read of the state now, where it has one)
        self.rng_after = rng_after if rng_after is not None else get_rng_state(numpy_rng)
        # (the module's _buffers dict, name, the tensor, its copy): a forward may reassign the
        # entry, and the restore must then reach the module, not the orphaned tensor
        kept, self._caches = _kept_buffers(modules, buffers, beside)
        self._saved = [(bufs, name, buf, buf.detach().clone()) for bufs, name, buf in kept]
        # where each trial starts: the buffers before the training forward where they were
        # recorded (a record of other modules, from an earlier search, is ignored), else, from
        # the second trial on, the ones it left
        before = {(id(entry[0]), entry[1]): entry for entry in (buffers_before or ())}
        self._start = [before[(id(e[0]), e[1])] for e in self._saved
                       if (id(e[0]), e[1]) in before]
        self._start_later = [e for e in self._saved if (id(e[0]), e[1]) not in before]
        self._metrics = [_copy_metric(m) for m in _metrics(modules)]
        # plain tensor attributes (``attributes``: :func:`tensor_attributes`): each trial starts
        # from their values before the training forward (``attributes_before``, where recorded;
        # else the ones it left), and the ones it left are put back after the trials, so the
        # next batch starts from the training forward's recurrent state, not a trial's
        self._attrs_after = snapshot_attributes(attributes)
        self._attrs_start = (attributes_before if attributes_before is not None
                             else self._attrs_after)
        self._attr_versions = [(label, d, k, d[k], d[k]._version)
                               for label, d, k in attributes if k in d]
        # parameters a forward may write in place (nn.Embedding(max_norm=...) renormalises the
        # rows it looks up, a pre-hook clamps weights): the search moves θ by increments and
        # would carry a trial's write into the next point and the step. ``protect``: known
        # to be written, copied before each trial and put back after it; ``watch``: the
        # trainable ones, whose version counters tell a write the caller learns of (``written``)
        self._watch, self._protect = list(watch), list(protect)
        self.written: list = []
        self._ddp: dict = {}  # DDP wrappers the trials ran through: their buffer-sync flag
        self.used = False
        # whether the trials drew from NumPy's generator (known at close, where it was read):
        self.rng_set = False  # whether the trial function set an RNG state itself

    def keep_numpy_state(self) -> None:
        """A trial function sets NumPy's generator (a state recorded per micro-batch) though
        this step does not replay it: keep its state at the step to put back at the end."""
        if self.rng_after[3] is None and sys.modules.get("numpy") is not None:
            self.rng_after = (*self.rng_after[:3],
                              sys.modules["numpy"].random.get_state(legacy=False))

    @contextlib.contextmanager
    def trial(self, watch_rng_setters: bool = False):
        """One trial forward's surroundings; ``watch_rng_setters``: mark ``rng_set`` when the
        trial function sets an RNG state itself (per micro-batch: a replay of its own, not a
        draw the trials cannot replay; only this thread's calls)."""
        global _depth
        _put_back(self._start + self._start_later if self.used else self._start)
        _put_back_attributes(self._attrs_start)
        self.used = True
        set_rng_state(self.rng_before)
        _clear_cast_caches()  # casts of the previous point (see the module's docstring)
        kept = [p.detach().clone() for p in self._protect]  # (before the trial is entered:
        watched = [p._version for p in self._watch]         # out of memory leaves none open)
        outer, _here.env = getattr(_here, "env", None), self
        try:
            with torch.no_grad(), _BACKWARD.active(), _DDP_BUFFER_SYNC.active(self._ddp), (
                    _RNG_SETTERS.active(self) if watch_rng_setters else contextlib.nullcontext()):
                # in_trial() last in, first out: a Ctrl-C the step holds until then (a trial
                # forward stays interruptible) cannot land in the patches' entries or undos
                _depth += 1
                try:
                    _here.depth = getattr(_here, "depth", 0) + 1
                    try:
                        yield
                    finally:
                        _here.depth -= 1
                finally:
                    _depth -= 1
        finally:
            _here.env = outer
            self._undo_writes(kept, watched)

    def drew_random_numbers(self) -> bool:
        """Whether the trial that just ran drew from torch's or Python's generator (or from
        NumPy's, where replayed): called after a trial of a step that has no record of the RNG
        state before its training forward, whose draws the trials cannot have replayed. A
        trial function that set a state itself (per micro-batch) is taken at its word."""
        if self.rng_set:
            return False
        cpu, cuda, py, np_state = self.rng_before
        if not torch.equal(torch.get_rng_state(), cpu) or random.getstate() != py:
            return True
        if cuda is not None and torch.cuda.is_initialized():
            now = torch.cuda.get_rng_state_all()
            if len(now) != len(cuda) or any(not torch.equal(a, b) for a, b in zip(now, cuda)):
                return True
        return np_state is not None and numpy_moved_since(np_state)

    def _undo_writes(self, kept, watched) -> None:
        if kept:  # (whether written or not: a kernel may write without a version bump)
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in self._protect], kept)
        protected = {id(p) for p in self._protect}
        for p, version in zip(self._watch, watched):
            if p._version != version and id(p) not in protected and \
                    all(p is not q for q in self.written):
                self.written.append(p)  # (this trial's write stays: no copy was kept)

    def close(self) -> list[str]:
        """Restore buffers and RNG; call once, after the last trial (also on failure). Returns
        what the caller should warn about (a non-persistent buffer a trial changed): not
        warned here, since θ sits at the accepted point and the step is not yet whole, and a
        warning filtered into an error would cut it short (the caller warns once it is)."""
        for ddp, flag in self._ddp.items():
            ddp.require_forward_param_sync = flag
        if not self.used:
            return []
        _clear_cast_caches()  # the casts of the last trial point
        _put_back(self._saved)
        _put_back_attributes(self._attrs_after)
        for metric, states, attrs in self._metrics:
            for name, value in {**states, **attrs}.items():
                setattr(metric, name, value)
        set_rng_state(self.rng_after)
        # a cache a trial replaced stays replaced: the module may keep attributes that go with
        # it (a rotary cache and its length); a changed one is named
        written = [f"a trial forward modified the tensor attribute {name!r} of {label} in "
                   "place; armijo_fused puts back a tensor attribute a forward reassigns "
                   "(self.h = h.detach()), not one it writes into (self.h.copy_(h)), so it now "
                   "holds what the trials left: reassign it, or register it as a persistent "
                   "buffer, which the trials restore"
                   for label, d, name, value, version in self._attr_versions
                   if value._version != version and d.get(name) is value]
        return written + [
                f"a trial forward modified the non-persistent buffer {name!r} of {label}; "
                "armijo_fused does not restore non-persistent buffers (a cache, usually), so "
                "it now holds what the trials left. If it is state the forward must keep "
                "(a count, a running statistic), register it with persistent=True, which the "
                "trials restore, or leave it alone under armijo_fused.in_trial()"
                for label, bufs, name, buf, version in self._caches
                if bufs.get(name) is not buf or buf._version != version]
