"""Typed Python wrappers over the compiled ops ``torch.ops.armijo_fused.*`` (C++, CPU).

Importing ``armijo_fused._C`` loads the extension, which registers seven ops (schemas in
``csrc/ops.cpp``, CPU kernels in ``csrc/cpu/passes.cpp``); the math of each is documented in
:mod:`armijo_fused.backends.torch_backend`. Calls go through ``torch.ops`` rather than the pybind
module so that ``torch.compile`` can trace them; the fake (meta) implementations below tell it the
output shapes without running a kernel. (The module also carries ``_C.ViewCheck``, a host-side
helper of ``storage/flat.py``, not an op: ``csrc/view_check.cpp``.)

* ``first_pass(rule_id, param, grad, states, scalars, weight_decay, eta, gscale, tile_block,
  block_tiles, tile, model_param=None, precond=False) -> sums [nblocks, 3]``: writes ``param``
  and ``states``; ``precond`` puts the trial on the fallback line (the sums stay d's).
* ``move(rule_id, param, grad, states, scalars, weight_decay, eta_old, eta_new, gscale,
  tile_block, block_tiles, tile, precond_old, precond_new, compute_sums, model_param=None)
  -> sums [nblocks, 3]``: writes ``param`` only (zeros when ``compute_sums`` is False).
* ``grad_sq_norm(grad, tile_block, block_tiles, tile) -> [nblocks]``.
* ``trial_points(rule_id, param, grad, states, scalars, weight_decay, etas, gscale, tile,
  precond=False) -> [K, numel]``: θ − etas[k]·d for each step size (batched candidates); writes
  nothing.
* ``first_pass_table`` / ``move_table`` / ``grad_sq_norm_table``: the same passes with θ and g
  reached through a tile table (``param_ptrs``, ``grad_ptrs``, ``lengths``:
  :mod:`armijo_fused.storage.table`) instead of flat buffers. They reach θ and g through raw
  addresses no schema can name (the first two write there): eager use only, so the third has
  no fake kernel either (a traced read could be moved past the writes it depends on).

``grad`` may be fp32, bf16 or fp16 (widened in the kernel). ``model_param``, for bf16/fp16
models with fp32 master weights (``param`` is then the master), is the model's own copy: the
first pass takes its value where it is not the master rounded (weights written since the last
step), and every element of θ a pass writes is written there too, rounded once, in the same pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)

    _IMPORT_ERROR: Exception | None = None
except ImportError as e:  # not built: pip install --no-build-isolation -e .
    _C = None
    _IMPORT_ERROR = e


def available() -> bool:
    """Whether the compiled extension is loaded and its ops are registered."""
    return _C is not None and hasattr(torch.ops.armijo_fused, "first_pass")


def why_unavailable() -> str:
    """A one-line reason when :func:`available` is False (empty otherwise)."""
    if available():
        return ""
    if _IMPORT_ERROR is not None:
        return (
            f"armijo_fused._C is not built or cannot load ({_IMPORT_ERROR}); build it with "
            "`pip install --no-build-isolation -e .`"
        )
    return "armijo_fused._C loaded but registered no ops"


def cpu_simd() -> str:
    """The instruction set the CPU kernels run with: avx2, sse2, neon or scalar."""
    _require()
    return _C.cpu_simd()


def set_cpu_simd(name: str) -> str:
    """Choose the CPU kernels ("auto", "baseline" or "avx2"); returns the one now in use.

    Every choice gives bitwise the same results (same lanes, same reduction order, no fused
    multiply-add); this is for tests and benchmarks. ``ARMIJO_FUSED_SIMD=baseline`` in the
    environment sets the default.
    """
    _require()
    return _C.set_cpu_simd(name)


def _require():
    if not available():
        raise RuntimeError(why_unavailable())


def first_pass(
    rule_id: int,
    param: Tensor,
    grad: Tensor,
    states: Sequence[Tensor],
    scalars: Sequence[float],
    weight_decay: float,
    eta: Tensor,
    gscale: Tensor,
    tile_block: Tensor,
    block_tiles: Tensor,
    tile: int,
    model_param: Tensor | None = None,
    precond: bool = False,
) -> Tensor:
    _require()
    return torch.ops.armijo_fused.first_pass(
        int(rule_id), param, grad, list(states), [float(s) for s in scalars],
        float(weight_decay), eta, gscale, tile_block, block_tiles, int(tile), model_param,
        bool(precond),
    )


def move(
    rule_id: int,
    param: Tensor,
    grad: Tensor,
    states: Sequence[Tensor],
    scalars: Sequence[float],
    weight_decay: float,
    eta_old: Tensor,
    eta_new: Tensor,
    gscale: Tensor,
    tile_block: Tensor,
    block_tiles: Tensor,
    tile: int,
    precond_old: bool = False,
    precond_new: bool = False,
    compute_sums: bool = False,
    model_param: Tensor | None = None,
) -> Tensor:
    _require()
    return torch.ops.armijo_fused.move(
        int(rule_id), param, grad, list(states), [float(s) for s in scalars],
        float(weight_decay), eta_old, eta_new, gscale, tile_block, block_tiles, int(tile),
        bool(precond_old), bool(precond_new), bool(compute_sums), model_param,
    )


def first_pass_table(rule_id: int, param_ptrs: Tensor, grad_ptrs: Tensor, lengths: Tensor,
                     states: Sequence[Tensor], scalars: Sequence[float], weight_decay: float,
                     eta: Tensor, gscale: Tensor, tile_block: Tensor, block_tiles: Tensor,
                     tile: int, precond: bool = False) -> Tensor:
    """:func:`first_pass` with θ and g reached through a tile table (``storage.table``)."""
    _require()
    return torch.ops.armijo_fused.first_pass_table(
        int(rule_id), param_ptrs, grad_ptrs, lengths, list(states), [float(s) for s in scalars],
        float(weight_decay), eta, gscale, tile_block, block_tiles, int(tile), bool(precond),
    )


def move_table(rule_id: int, param_ptrs: Tensor, grad_ptrs: Tensor, lengths: Tensor,
               states: Sequence[Tensor], scalars: Sequence[float], weight_decay: float,
               eta_old: Tensor, eta_new: Tensor, gscale: Tensor, tile_block: Tensor,
               block_tiles: Tensor, tile: int, precond_old: bool = False,
               precond_new: bool = False, compute_sums: bool = False) -> Tensor:
    """:func:`move` with θ and g reached through a tile table (``storage.table``)."""
    _require()
    return torch.ops.armijo_fused.move_table(
        int(rule_id), param_ptrs, grad_ptrs, lengths, list(states), [float(s) for s in scalars],
        float(weight_decay), eta_old, eta_new, gscale, tile_block, block_tiles, int(tile),
        bool(precond_old), bool(precond_new), bool(compute_sums),
    )


def trial_points(rule_id: int, param: Tensor, grad: Tensor, states: Sequence[Tensor],
                 scalars: Sequence[float], weight_decay: float, etas: Tensor, gscale: Tensor,
                 tile: int, precond: bool = False) -> Tensor:
    _require()
    return torch.ops.armijo_fused.trial_points(
        int(rule_id), param, grad, list(states), [float(s) for s in scalars],
        float(weight_decay), etas, gscale, int(tile), bool(precond))


def grad_sq_norm(grad: Tensor, tile_block: Tensor, block_tiles: Tensor, tile: int) -> Tensor:
    _require()
    return torch.ops.armijo_fused.grad_sq_norm(grad, tile_block, block_tiles, int(tile))


def grad_sq_norm_table(grad_ptrs: Tensor, lengths: Tensor, tile_block: Tensor,
                       block_tiles: Tensor, tile: int) -> Tensor:
    """:func:`grad_sq_norm` with g reached through a tile table (``storage.table``)."""
    _require()
    return torch.ops.armijo_fused.grad_sq_norm_table(grad_ptrs, lengths, tile_block,
                                                     block_tiles, int(tile))


if available():

    def _nblocks(block_tiles: Tensor) -> int:
        return block_tiles.shape[0] - 1

    def _one_device(op: str, first: Tensor, **others) -> None:
        """The fake kernels are also the ops' Meta kernels, which the dispatcher picks for a
        call where any input is on the meta device: a CPU call with a stray meta tensor then
        returned uninitialised sums without a word. Refuse it as the CPU kernel would."""
        for name, t in others.items():
            for i, x in enumerate(t if isinstance(t, (list, tuple)) else [t]):
                if x is not None and x.device != first.device:
                    where = f"{name}[{i}]" if isinstance(t, (list, tuple)) else name
                    raise RuntimeError(f"armijo_fused.{op}: {where} is on {x.device}, the first "
                                       f"buffer on {first.device}")

    @torch.library.register_fake("armijo_fused::first_pass")
    def _first_pass_fake(rule, param, grad, states, scalars, weight_decay, eta, gscale,
                         tile_block, block_tiles, tile, model_param=None, precond=False):
        _one_device("first_pass", param, grad=grad, states=states, eta=eta, gscale=gscale,
                    tile_block=tile_block, block_tiles=block_tiles, model_param=model_param)
        return param.new_empty((_nblocks(block_tiles), 3))

    @torch.library.register_fake("armijo_fused::move")
    def _move_fake(rule, param, grad, states, scalars, weight_decay, eta_old, eta_new, gscale,
                   tile_block, block_tiles, tile, precond_old, precond_new, compute_sums,
                   model_param=None):
        _one_device("move", param, grad=grad, states=states, eta_old=eta_old, eta_new=eta_new,
                    gscale=gscale, tile_block=tile_block, block_tiles=block_tiles,
                    model_param=model_param)
        return param.new_empty((_nblocks(block_tiles), 3))

    @torch.library.register_fake("armijo_fused::trial_points")
    def _trial_points_fake(rule, param, grad, states, scalars, weight_decay, etas, gscale, tile,
                           precond=False):
        _one_device("trial_points", param, grad=grad, states=states, etas=etas, gscale=gscale)
        return param.new_empty((etas.shape[0], param.shape[0]))

    @torch.library.register_fake("armijo_fused::grad_sq_norm")
    def _grad_sq_norm_fake(grad, tile_block, block_tiles, tile):  # fp32 for a half gradient too
        _one_device("grad_sq_norm", grad, tile_block=tile_block, block_tiles=block_tiles)
        return grad.new_empty((_nblocks(block_tiles),), dtype=torch.float32)
