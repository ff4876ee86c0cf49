"""Batched candidates: K step sizes of the backtracking sequence tested in one forward.

Sequential backtracking tests η0, βη0, β²η0, ... one forward at a time and accepts the first that
passes the Armijo test. The batched search tests the same sequence K at a time: the K trial points
θ0 − η_k d are stacked and the loss is evaluated on all of them in one batched forward
(the trial weights swapped into the model under ``torch.func.vmap``). It accepts the first η_k of the
sequence that passes, which is the step sequential backtracking would accept on the same batch,
and it takes ceil(trials / K) dependent forwards instead of ``trials``. The price is K copies of
the parameters and K times the activations, so it is an option for models and batches that fit.

Trial forwards under vmap see the same RNG for all K candidates (``randomness="same"``), replayed
from the training forward's state, so dropout works: every candidate sees the training forward's
masks, and the accepted step equals the sequential search's. They must not update buffers in
place: a model with BatchNorm in train mode (running statistics) is refused by
:func:`check_batchable` and keeps the sequential search.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import torch
from torch import Tensor, nn

try:  # vmap's own steps, without its argument handling (see _vmap_over_first_dim)
    from torch._functorch.vmap import (
        _add_batch_dim,
        _remove_batch_dim,
        lazy_load_decompositions,
        vmap_increment_nesting,
    )
except ImportError:  # (a torch that moved them: torch.func.vmap, the same semantics)
    vmap_increment_nesting = None
try:
    from torch._C._functorch import is_batchedtensor
except ImportError:  # (then no escaped cache is noticed: see stacked_loss)
    def is_batchedtensor(t: Tensor) -> bool:
        return False

from .controller import (
    FP32_RESOLUTION,
    Passes,
    SearchResult,
    evaluate_on_every_rank,
    read_checking_ranks,
    reduce_with_flag,
)


def check_batchable(model: nn.Module) -> None:
    """Refuse, before anything moves, a model whose forward vmap cannot batch over K weight
    sets: a BatchNorm (or InstanceNorm) that updates its running statistics in place."""
    from torch.nn.modules.batchnorm import _NormBase

    for name, m in model.named_modules():
        if isinstance(m, _NormBase) and m.training and m.track_running_stats:
            raise ValueError(
                f"candidates= cannot batch the trial forward over {name or 'the model'} "
                f"({type(m).__name__} in training mode updates its running statistics in "
                "place): use the sequential search (candidates=None), or "
                "track_running_stats=False"
            )


def parameter_slots(model: nn.Module, params: Sequence[Tensor]) -> list[list[tuple[nn.Module, str]]]:
    """For each of ``params``, every place ``model`` holds it: ``(module, name)`` pairs of the
    modules' ``_parameters``. A tensor tied into several modules (a tied embedding and head) has
    several, and :func:`stacked_loss` puts each candidate in all of them. Found once per step
    (the model may change between steps); a tensor the model does not hold is refused, before
    anything moves (the candidates would all see θ0 in its place)."""
    index = {id(p): i for i, p in enumerate(params)}
    slots: list[list[tuple[nn.Module, str]]] = [[] for _ in params]
    for module in model.modules():  # (each module once: a shared one is swapped once)
        for name, q in module._parameters.items():
            i = index.get(id(q)) if q is not None else None
            if i is not None:
                slots[i].append((module, name))
    outside = [tuple(p.shape) for p, s in zip(params, slots) if not s]
    if outside:
        raise ValueError(
            f"candidates= evaluates the K trial points through model=, which does not hold "
            f"{len(outside)} of the optimized tensors (shapes {outside[:4]}"
            f"{' ...' if len(outside) > 4 else ''}): register the module that holds every "
            "optimized parameter as model=, or use the sequential search (candidates=None)")
    return slots


def stacked_loss(fn: Callable[[], Tensor], slots: Sequence[Sequence[tuple[nn.Module, str]]],
                 modules: Sequence[nn.Module] = ()):
    """``losses(stacked)``: ``stacked`` holds one [K, *shape] tensor per entry of ``slots``
    (:func:`parameter_slots`); returns the [K] losses of ``fn()`` evaluated with the model's
    parameters replaced by each slice in turn.

    The slices are put straight into the modules' ``_parameters`` for the call and the
    parameters put back after it, as ``torch.func.functional_call`` does, without its search of
    the module tree on every call (most of a small model's batched trial on the host).

    A non-persistent buffer of ``modules`` that the forward reassigns with a value computed
    from the weights holds a batched tensor of a vmap level that no longer exists once the
    call returns: any use of it raised (the next step's training forward, with "Either your
    tensor may have escaped from inside a function being vmapped"). Such an entry gets its
    tensor from before the call back. (Persistent buffers are the trial environment's: it
    restores them before each trial and after the last. A cache built from the inputs alone
    is an ordinary tensor and stays, as after a sequential trial.)"""
    caching = [m for m in modules if m._non_persistent_buffers_set]

    def one(*tensors):
        held = []
        try:
            for places, t in zip(slots, tensors):
                for module, name in places:
                    held.append((module, name, module._parameters[name]))
                    module._parameters[name] = t
            out = fn()
        finally:
            for module, name, p in reversed(held):
                module._parameters[name] = p
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise ValueError("the loss function must return a scalar tensor for batched candidates")
        return out.reshape(())

    batched = _vmap_over_first_dim(one)

    def losses(stacked: Sequence[Tensor]) -> Tensor:
        caches = [(m._buffers, name, m._buffers.get(name)) for m in caching
                  for name in m._non_persistent_buffers_set]
        try:
            return batched(*stacked)
        except RuntimeError as e:
            said = str(e)
            if said.startswith("vmap: It looks like you're"):  # (vmap's own words ask for a
                raise RuntimeError(                               # bug report in torch)
                    "candidates= evaluates the loss at the K trial points at once, under "
                    "torch.func.vmap, where no tensor's value can be read: return the loss "
                    "tensor itself (not loss.item() or float(loss)) and keep the forward free of "
                    "reads such as .item() or an `if` on a tensor, or use the sequential search "
                    f"(candidates=None). The step has been undone. (vmap: {e})") from e
            # torch's own words only (an LSTM: "Batching rule not implemented"; a channels-last
            # conv: "NYI: querying is_contiguous inside of vmap"; a dynamic shape: "vmap: We do
            # not support ..."), not a message of the user's that mentions vmap
            if said.startswith(("Batching rule not implemented", "vmap:")) or (
                    said.startswith("NYI") and "vmap" in said):
                raise RuntimeError(
                    "candidates= evaluates the loss at the K trial points at once, under "
                    "torch.func.vmap, which cannot batch an operation of this forward: use the "
                    f"sequential search (candidates=None). The step has been undone. (vmap: {e})"
                ) from e
            raise
        finally:
            for bufs, name, buf in caches:
                now = bufs.get(name)
                if now is not buf and isinstance(now, Tensor) and is_batchedtensor(now):
                    bufs[name] = buf

    return losses


_LEAN_VMAP: bool | None = None  # (whether torch's vmap pieces work here; tried once)


def _lean_vmap_works() -> bool:
    """Whether vmap's pieces, as imported, batch a sum as ``torch.func.vmap`` does: tried once
    per process on a 2x3 tensor, so that a torch whose private signatures moved (not only
    their place) falls back on ``torch.func.vmap`` rather than fail in a search."""
    global _LEAN_VMAP
    if _LEAN_VMAP is None:
        _LEAN_VMAP = False
        if vmap_increment_nesting is not None:
            try:
                lazy_load_decompositions()  # (vmap's decompositions, as vmap loads them)
                x = torch.arange(6.0).reshape(2, 3)
                with vmap_increment_nesting(2, "same") as level:
                    y = _remove_batch_dim(_add_batch_dim(x, 0, level).sum(), level, 2, 0)
                _LEAN_VMAP = bool(torch.equal(y, x.sum(1)))
            except Exception:  # (any failure of a private API: the public one instead)
                _LEAN_VMAP = False
    return _LEAN_VMAP


def _vmap_over_first_dim(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``torch.func.vmap(fn, randomness="same")`` for tensors batched along their first
    dimension and one tensor out: the same steps (a vmap level, batch dimensions added, ``fn``,
    the output's batch dimension removed) without vmap's checks and flattening of arbitrary
    ``in_dims`` and argument trees on every call, which cost more than the batching itself for a
    small model: 163 against 111 µs per call for a 5-layer width-16 MLP and K=4 (torch 2.13,
    one CPU thread; a plain forward 53 µs)."""
    if not _lean_vmap_works():
        return torch.func.vmap(fn, randomness="same")

    def batched(*tensors: Tensor) -> Tensor:
        k = tensors[0].shape[0]
        with vmap_increment_nesting(k, "same") as level:
            out = fn(*(_add_batch_dim(t, 0, level) for t in tensors))
            return _remove_batch_dim(out, level, k, 0)

    return batched


def batched_armijo_search(
    passes: Passes,
    evaluate_many: Callable[[Sequence[float], bool], Tensor],
    f0: Tensor,
    eta0: float,
    *,
    c: float,
    backtrack: float,
    max_trials: int,
    candidates: int,
    reduce: Callable[[Tensor], Tensor] | None = None,
    guard: Tensor | None = None,
    resolution: float = FP32_RESOLUTION,
    f0_failure: tuple | None = None,
) -> SearchResult:
    """Global search over the sequence η0·backtrack^j, j < max_trials, ``candidates`` at a time.

    ``evaluate_many(etas, precond)`` returns the [K] losses at θ0 − η_k d (the trial weights are
    built from θ0, so θ stays at θ0 until the accepted step is applied by one ``move_to``).
    Decisions follow :func:`armijo_search`: non-descent → preconditioned gradient (the first
    round's losses are then discarded), unresolved → no step, nothing accepted within
    ``max_trials`` (or unresolved after a rejection, unless the loss equals f0 to the last
    bit) → no step, exhausted. One host read per batched forward. ``reduce``, ``guard`` and
    ``f0_failure`` as in :func:`armijo_search`.
    """
    nblocks = len(passes.eta)
    zeros = [0.0] * nblocks
    sums = passes.first(zeros)  # state update and sums; θ stays at θ0
    eta_seq = [eta0]  # (by repeated products, as the sequential search backtracks: bitwise its η)
    while len(eta_seq) < max_trials:
        eta_seq.append(backtrack * eta_seq[-1])
    precond = non_descent = False
    # the last candidate the test could judge (or whose loss was not finite) and rejected: its η
    rejected = None
    exhausted = False
    history: list = []
    f_before = gd = grad_sq = math.nan
    start = 0
    while start < max_trials:
        etas = eta_seq[start : start + candidates]
        losses, failure = evaluate_on_every_rank(lambda: evaluate_many(etas, precond), reduce,
                                                  f0.device)
        if failure is not None:
            losses = losses.expand(len(etas))
        vec = [losses.reshape(-1)] + [s.reshape(-1) for s in sums]
        if guard is not None and start == 0 and not precond:
            vec.append(guard.reshape(-1))
        rest = [torch.cat([v.double().to(f0.device) for v in vec])]
        if reduce is not None:
            rest = list(reduce_with_flag(reduce, rest[0], failure))
        first = start == 0 and not precond
        vals = read_checking_ranks([f0.reshape(1), *rest], reduce is not None, failure,
                                   f0_failure if first else None)
        f_before, f_k, rows = vals[0], vals[1 : 1 + len(etas)], vals[1 + len(etas) :]
        if guard is not None and start == 0 and not precond:
            g_vals, rows = rows[len(rows) - guard.numel() :], rows[: -guard.numel()]
            if not all(math.isfinite(x) for x in g_vals):
                # (one trial spent, as the sequential search reports a skip: the round's
                # forward; no step size was judged)
                return SearchResult(None, 1, f_before, math.nan, math.nan, math.nan,
                                    skipped=True)
        gd_b = rows[0::3]
        gd, grad_sq = sum(gd_b), sum(rows[1::3])
        if not math.isfinite(f_before):
            break

        def decrease(eta, gd_b=gd_b):  # Σ_b η⟨g_b, d_b⟩, as the sequential search forms it
            return sum(eta * x for x in gd_b)

        if decrease(eta0) <= 0.0 and not precond and grad_sq > 0.0:
            sums = passes.move_to(zeros, precond=True, compute_sums=True)
            precond = non_descent = True
            continue  # same candidates along the fallback direction
        if not math.isfinite(decrease(eta0)):
            # ⟨g, d⟩ overflowed float32: no step can be judged (the sequential search's case)
            return SearchResult(None, 1 + int(non_descent), f_before, math.nan, gd, grad_sq,
                                non_descent=non_descent, unresolved=True, overflow=True,
                                history=history)
        for eta, ft in zip(etas, f_k):
            history.append(([eta] * nblocks, ft))
            # trials as the sequential search counts them: the trial points judged, and the
            # one whose ⟨g, d⟩ showed a non-descent direction (here a whole round, discarded)
            judged = len(history) + int(non_descent)
            unresolved = math.isfinite(ft) and (decrease(eta) <= resolution * abs(f_before)
                                                or ft == f_before)
            if not unresolved and math.isfinite(ft) and ft <= f_before - c * decrease(eta):
                passes.move_to([eta] * nblocks)
                return SearchResult([eta] * nblocks, judged, f_before, ft, gd, grad_sq,
                                    non_descent=non_descent, history=history,
                                    block_dd=list(rows[2::3]))
            if unresolved and rejected is not None and ft != f_before:
                # backtracked into the loss's resolution after rejections: exhausted, as the
                # sequential search ends (keeping the rejected η, steps without a search
                # would apply it blind)
                exhausted = True
                break
            if unresolved:
                return SearchResult(None, judged, f_before, math.nan, gd, grad_sq,
                                    non_descent=non_descent, unresolved=True, history=history,
                                    # (a first trial: the non-descent one counts as one)
                                    unchanged=(decrease(eta) > resolution * abs(f_before)
                                               and judged == 1),
                                    rejected=rejected)
            rejected = [eta] * nblocks
        if exhausted:
            break
        start += len(etas)
    return SearchResult(None, max(len(history) + int(non_descent), 1), f_before, math.nan, gd,
                        grad_sq, non_descent=non_descent, history=history)
