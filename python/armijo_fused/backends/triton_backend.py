"""Triton backend: launch wrappers of the fused passes (kernels in ``armijo_fused.kernels``).

Same four passes and signatures as ``torch_backend`` (read its docstring for the math). Each
wrapper checks its inputs, allocates, builds the grid (one program per tile, ``BLOCK_SIZE`` =
``layout.tile``) and launches; the math is in the kernels. Step sizes and ``gscale`` stay on the
device and are read inside the kernels, so no pass syncs with the host. Per-block sums are per-tile
partials added in a fixed order by a second tiny kernel (deterministic, no atomics).

Gradients may be fp32, bf16 or fp16 (widened in the kernel); ``model_param``, for bf16/fp16 models
with fp32 master weights, receives each θ written, rounded once, from the same pass.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
from collections.abc import Sequence

import torch
from torch import Tensor

from ..directions.base import DirectionRule
from ..kernels.candidates import trial_points_kernel
from ..kernels.first_pass import first_pass_kernel
from ..kernels.move import move_kernel
from ..kernels.reductions import (
    SUM_COLS,
    block_sum_kernel,
    table_tile_sq_sum_kernel,
    tile_sq_sum_kernel,
)
from ..kernels.rules import DIRECTION_READS_GRAD, RULE_NAMES, STATE_COUNT, kernel_scalars
from ..storage.layout import FlatLayout
from ..storage.scalars import device_floats
from ..storage.table import TileTable

name = "triton"

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: the largest tile a program takes: 16 fp32 elements per thread at 16 warps (more spills:
#: 912 B of local memory per thread at 16384, measured with ptxas for sm_90)
_MAX_TILE = 8192
#: tiles summed per loop iteration of the block reduction, and its warps. One program adds a
#: block's tiles in order, so the largest block's loop is a chain of dependent loads: at GPT-2
#: 124M (wte: 18,847 tiles of 2048) 128 per iteration on 4 warps took 0.086 ms after every pass,
#: 4096 on 8 warps 0.014 ms (H200, bench/profile_step.py), about 8% of the first pass's time
_TILES_PER_ITER = 4096
_SUM_WARPS = 8


def supports(rule) -> bool:
    """Whether ``kernels/rules.py`` has a twin of ``rule`` (by id and name, with its state count;
    a renamed subclass of a rule may change its math, so it is not taken for its parent)."""
    return (0 <= rule.rule_id < len(RULE_NAMES) and RULE_NAMES[rule.rule_id] == rule.name
            and STATE_COUNT[rule.rule_id] == len(rule.state_names))


def _num_warps(tile: int) -> int:
    # a memory-bound element-wise pass: 16 fp32 elements per thread, as 128-bit loads
    return max(1, min(16, tile // 512))


def _launch_options(tile: int) -> dict:
    if tile > _MAX_TILE:
        raise ValueError(f"triton backend: tile {tile} is above {_MAX_TILE}: with at most 16 "
                         "warps a program would hold more elements than it has registers")
    # No fused multiply-adds: the torch twin rounds every product, and a memory-bound pass gains
    # nothing from FMA. Explicit also because Triton's default for it is changing (3.10).
    return {"num_warps": _num_warps(tile), "enable_fp_fusion": False}


def _fp32(x: float) -> float:
    """``x`` rounded to fp32 (to nearest even, as Triton passes a float argument)."""
    if not abs(x) <= 3.4028234663852886e38:  # inf, NaN or past FLT_MAX: no exact split
        return x
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # rounds up past FLT_MAX
        return x


def _split_fp64(x: float) -> tuple[float, float, float]:
    """``x`` as three fp32 values that add up to it exactly in fp64 (24 + 24 + 24 bits cover
    the 53 of a double): the move forms ``1 - eta_old * wd`` in fp64 from them, as the torch
    twin and the C++ kernel do with the Python float."""
    hi = _fp32(x)
    mid = _fp32(x - hi)
    return hi, mid, _fp32(x - hi - mid)


def _check(rule: DirectionRule, param: Tensor, grad: Tensor | None, states: Sequence[Tensor],
           layout: FlatLayout) -> None:
    def same(t: Tensor, what: str, dtypes=(torch.float32,)) -> None:
        if t.dtype not in dtypes:
            names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"triton backend: {what} must be {names}, got {t.dtype}")
        if t.device != param.device:
            raise ValueError(f"triton backend: {what} is on {t.device}, param on {param.device}")
        if not t.is_contiguous() or t.numel() != layout.numel:
            raise ValueError(
                f"triton backend: {what} must be a contiguous flat buffer of layout.numel="
                f"{layout.numel} elements, got shape {tuple(t.shape)}"
            )

    same(param, "param")
    if grad is not None:  # a half-precision gradient is read as is and widened in the kernel
        same(grad, "grad", _GRAD_DTYPES)
    if not 0 <= rule.rule_id < len(STATE_COUNT):
        raise ValueError(f"triton backend: rule {rule.name!r} (rule_id {rule.rule_id}) has no "
                         "kernel twin in armijo_fused/kernels/rules.py")
    want = STATE_COUNT[rule.rule_id]
    if len(states) != want or len(rule.state_names) != want:
        raise ValueError(
            f"triton backend: rule {rule.name!r} keeps {want} state buffers, got {len(states)}"
        )
    for i, s in enumerate(states):
        same(s, f"states[{i}]")
    if param.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {param.device}"
        )


def _check_scalars(param: Tensor, layout: FlatLayout, **tensors: Tensor) -> None:
    """The device-side scalars (step sizes, gscale) and the layout's tables live with param."""
    sizes = {"gscale": 2}
    for what, t in tensors.items():
        n = sizes.get(what, layout.nblocks)
        if t.dtype != torch.float32 or t.numel() != n or not t.is_contiguous():
            raise ValueError(
                f"triton backend: {what} must be a contiguous float32 tensor of {n} entries, "
                f"got {t.dtype} of shape {tuple(t.shape)}"
            )
    for what, t in dict(tensors, tile_block=layout.tile_block,
                        block_tiles=layout.block_tiles).items():
        if t.device != param.device:
            raise ValueError(
                f"triton backend: {what} is on {t.device}, param on {param.device} "
                "(build the layout with device=param.device)"
            )


def _check_disjoint(param: Tensor, grad: Tensor | None, states: Sequence[Tensor],
                    model_param: Tensor | None) -> None:
    """The passes write θ, the state and the model copy in place, element by element from what
    they read: two buffers over the same memory give an order-dependent result (a race between
    tiles on a GPU). Refused, as the C++ passes refuse it."""
    named = [("param", param), ("grad", grad), *((f"states[{i}]", t) for i, t in
                                                 enumerate(states)), ("model_param", model_param)]
    spans = [(n, t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
             for n, t in named if t is not None and t.numel()]
    for i, (a, a0, a1) in enumerate(spans):
        for b, b0, b1 in spans[i + 1:]:
            if a0 < b1 and b0 < a1:
                raise ValueError(f"triton backend: {a} and {b} share memory; each buffer must "
                                 "be a separate tensor")


def _check_model_param(param: Tensor, model_param: Tensor | None, layout: FlatLayout) -> None:
    if model_param is None:
        return
    if model_param.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError("triton backend: model_param (the model's copy of the fp32 master) must "
                        f"be bfloat16 or float16, got {model_param.dtype}")
    if model_param.device != param.device:
        raise ValueError(f"triton backend: model_param is on {model_param.device}, "
                         f"param on {param.device}")
    if not model_param.is_contiguous() or model_param.numel() != layout.numel:
        raise ValueError(
            f"triton backend: model_param must be a contiguous flat buffer of layout.numel="
            f"{layout.numel} elements, got shape {tuple(model_param.shape)}"
        )


def _check_table_columns(table: TileTable, layout: FlatLayout) -> None:
    dev = table.param_ptrs.device
    if dev.type != "cuda" and not _INTERPRET:
        raise RuntimeError(f"triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got {dev}")
    for what, t, dtype in (("param_ptrs", table.param_ptrs, torch.int64),
                           ("grad_ptrs", table.grad_ptrs, torch.int64),
                           ("lengths", table.lengths, torch.int32)):
        if t.dtype != dtype or t.numel() != layout.ntiles or t.device != dev:
            raise ValueError(f"triton backend: table.{what} must be {dtype} with one entry per "
                             f"tile ({layout.ntiles}) on {dev}")


def _check_table(rule: DirectionRule, table: TileTable, states: Sequence[Tensor],
                 layout: FlatLayout) -> None:
    _check_table_columns(table, layout)
    dev = table.param_ptrs.device
    want = STATE_COUNT[rule.rule_id]
    if len(states) != want:
        raise ValueError(
            f"triton backend: rule {rule.name!r} keeps {want} state buffers, got {len(states)}")
    for i, st in enumerate(states):
        if (st.dtype != torch.float32 or st.numel() != layout.numel or st.device != dev
                or not st.is_contiguous()):
            raise ValueError(f"triton backend: states[{i}] must be a contiguous float32 flat "
                             f"buffer of {layout.numel} elements on {dev}")


def _launches(table: TileTable | None, layout: FlatLayout) -> list[tuple[Tensor, bool]]:
    """(tile list, FULL) per launch: one over every tile for flat buffers; for a table one over
    its full tiles (vectorised) and one over the rest (masked per element), skipping empties."""
    if table is None:
        return [(layout.tile_block, True)]  # only its length is used: the grid
    return [(t, full) for t, full in ((table.full_tiles, True), (table.partial_tiles, False))
            if t.numel()]


def _device_guard(device: torch.device):
    """Triton launches on the *current* CUDA device and its current stream, whatever device the
    pointers are on: a buffer on another GPU of this process (a model spread over GPUs with
    ``device_map="auto"``) makes its device current for the launch. A no-op (one cheap query)
    when it already is, and on the CPU (the interpreter)."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _on_buffer_device(launch):
    """Run a launch wrapper on the device of the first tensor (or tile table) it is given."""

    @functools.wraps(launch)
    def wrapper(*args, **kwargs):
        for a in (*args, *kwargs.values()):
            if isinstance(a, Tensor):
                device = a.device
                break
            if isinstance(a, TileTable):
                device = a.grad_ptrs.device
                break
        else:
            return launch(*args, **kwargs)
        with _device_guard(device):
            return launch(*args, **kwargs)

    return wrapper


def _state_ptrs(param: Tensor, states: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    # rules with fewer than two buffers get a placeholder the kernel never touches (``param``
    # here; callers without one pass another tensor)
    padded = list(states) + [param] * (2 - len(states))
    return padded[0], padded[1]


def _block_sums(partials: Tensor, layout: FlatLayout) -> Tensor:
    ncols = partials.shape[1]
    out = torch.empty(layout.nblocks, ncols, dtype=torch.float32, device=partials.device)
    block_sum_kernel[(layout.nblocks,)](
        partials, layout.block_tiles, out, NCOLS=ncols, TILES_PER_ITER=_TILES_PER_ITER,
        num_warps=_SUM_WARPS, enable_fp_fusion=False,
    )
    return out


@_on_buffer_device
def first_pass(
    rule: DirectionRule,
    param: Tensor,
    grad: Tensor,
    states: Sequence[Tensor],
    scalars: Sequence[float],
    weight_decay: float,
    eta: Tensor,
    gscale: Tensor,
    layout: FlatLayout,
    model_param: Tensor | None = None,
    table: TileTable | None = None,
    precond: bool = False,
) -> Tensor:
    if table is None:
        _check(rule, param, grad, states, layout)
        _check_model_param(param, model_param, layout)
        _check_disjoint(param, grad, states, model_param)
        lengths = layout.tile_block  # placeholder: read only with TABLE
    else:  # θ and g through the table: param and grad are its address columns
        _check_table(rule, table, states, layout)
        if model_param is not None:
            raise ValueError("triton backend: a tile table takes no model_param (fp32 only)")
        param, grad, lengths = table.param_ptrs, table.grad_ptrs, table.lengths
    _check_scalars(param, layout, eta=eta, gscale=gscale)
    s0, s1, s2, s3, s4, om0, om1 = kernel_scalars(scalars)
    st0, st1 = _state_ptrs(states[0] if states else eta, states)
    partials = torch.empty(layout.ntiles, SUM_COLS, dtype=torch.float32, device=param.device)
    for tiles, full in _launches(table, layout):
        first_pass_kernel[(tiles.numel(),)](
            param, st0 if model_param is None else model_param, grad, lengths, tiles, st0, st1,
            eta, gscale, layout.tile_block, partials, layout.numel, float(weight_decay), s0, s1,
            s2, s3, s4, om0, om1, RULE=rule.rule_id, NSTATES=len(states),
            WRITE_MODEL=model_param is not None, TABLE=table is not None, FULL=full,
            PRECOND=bool(precond), BLOCK_SIZE=layout.tile, **_launch_options(layout.tile),
        )
    return _block_sums(partials, layout)


@_on_buffer_device
def move(
    rule: DirectionRule,
    param: Tensor,
    grad: Tensor,
    states: Sequence[Tensor],
    scalars: Sequence[float],
    weight_decay: float,
    eta_old: Tensor,
    eta_new: Tensor,
    gscale: Tensor,
    layout: FlatLayout,
    precond_old: bool = False,
    precond_new: bool = False,
    compute_sums: bool = False,
    model_param: Tensor | None = None,
    table: TileTable | None = None,
) -> Tensor | None:
    if table is None:
        _check(rule, param, grad, states, layout)
        _check_model_param(param, model_param, layout)
        _check_disjoint(param, grad, states, model_param)
        lengths = layout.tile_block  # placeholder: read only with TABLE
    else:
        _check_table(rule, table, states, layout)
        if model_param is not None:
            raise ValueError("triton backend: a tile table takes no model_param (fp32 only)")
        param, grad, lengths = table.param_ptrs, table.grad_ptrs, table.lengths
    _check_scalars(param, layout, eta_old=eta_old, eta_new=eta_new, gscale=gscale)
    precond_old, precond_new, compute_sums = bool(precond_old), bool(precond_new), bool(compute_sums)
    load_grad = (compute_sums or precond_old or precond_new
                 or DIRECTION_READS_GRAD[rule.rule_id])
    s0, s1, s2, s3, s4, om0, _ = kernel_scalars(scalars)
    st0, st1 = _state_ptrs(states[0] if states else eta_old, states)
    partials = eta_old  # placeholder: the kernel writes partials only with COMPUTE_SUMS
    if compute_sums:
        partials = torch.empty(layout.ntiles, SUM_COLS, dtype=torch.float32, device=param.device)
    for tiles, full in _launches(table, layout):
        move_kernel[(tiles.numel(),)](
            param, st0 if model_param is None else model_param, grad, lengths, tiles, st0, st1,
            eta_old, eta_new, gscale, layout.tile_block, partials, layout.numel,
            *_split_fp64(float(weight_decay)), s0, s1, s2, s3, s4, om0, RULE=rule.rule_id,
            NSTATES=len(states),
            PRECOND_OLD=precond_old, PRECOND_NEW=precond_new, COMPUTE_SUMS=compute_sums,
            LOAD_GRAD=load_grad, WRITE_MODEL=model_param is not None, TABLE=table is not None,
            FULL=full, BLOCK_SIZE=layout.tile, **_launch_options(layout.tile),
        )
    return _block_sums(partials, layout) if compute_sums else None


@_on_buffer_device
def trial_points(
    rule: DirectionRule,
    param: Tensor,
    grad: Tensor,
    states: Sequence[Tensor],
    scalars: Sequence[float],
    weight_decay: float,
    etas: Sequence[float],
    gscale: Tensor,
    layout: FlatLayout,
    precond: bool = False,
) -> Tensor:
    _check(rule, param, grad, states, layout)
    _check_scalars(param, layout, gscale=gscale)
    if not etas:
        raise ValueError("triton backend: trial_points needs at least one step size")
    s0, s1, s2, s3, s4, om0, _ = kernel_scalars(scalars)
    st0, st1 = _state_ptrs(param, states)
    e = device_floats(list(etas), param.device)  # no stream sync (storage/scalars.py)
    out = torch.empty(len(etas), layout.numel, dtype=torch.float32, device=param.device)
    trial_points_kernel[(layout.ntiles,)](
        param, grad, st0, st1, e, gscale, out, layout.numel, len(etas), float(weight_decay),
        s0, s1, s2, s3, s4, om0, RULE=rule.rule_id, NSTATES=len(states), PRECOND=bool(precond),
        BLOCK_SIZE=layout.tile, **_launch_options(layout.tile),
    )
    return out


@_on_buffer_device
def grad_sq_norm(grad: Tensor, layout: FlatLayout, table: TileTable | None = None) -> Tensor:
    if table is not None:
        return _table_grad_sq_norm(table, layout)
    if grad.dtype not in _GRAD_DTYPES:
        raise TypeError(f"triton backend: grad must be float32, bfloat16 or float16, got {grad.dtype}")
    if grad.numel() != layout.numel or not grad.is_contiguous():
        raise ValueError(
            f"triton backend: grad must be a contiguous flat buffer of layout.numel="
            f"{layout.numel} elements, got shape {tuple(grad.shape)}"
        )
    _check_scalars(grad, layout)
    partials = torch.empty(layout.ntiles, 1, dtype=torch.float32, device=grad.device)
    tile_sq_sum_kernel[(layout.ntiles,)](
        grad, partials, layout.numel, BLOCK_SIZE=layout.tile, **_launch_options(layout.tile)
    )
    return _block_sums(partials, layout)[:, 0]


def _table_grad_sq_norm(table: TileTable, layout: FlatLayout) -> Tensor:
    """Per-block Σ g² through the table: per-tile partials in the flat guard's order, one
    launch per kind of tile (full / the rest), then the fixed-order block sums."""
    _check_table_columns(table, layout)
    partials = torch.empty(layout.ntiles, 1, dtype=torch.float32, device=table.grad_ptrs.device)
    for tiles, full in _launches(table, layout):
        table_tile_sq_sum_kernel[(tiles.numel(),)](
            table.grad_ptrs, table.lengths, tiles, partials, BLOCK_SIZE=layout.tile, FULL=full,
            **_launch_options(layout.tile),
        )
    return _block_sums(partials, layout)[:, 0]
