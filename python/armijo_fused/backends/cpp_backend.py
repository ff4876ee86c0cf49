"""The C++ CPU backend: the fused passes of :mod:`.torch_backend`, same signatures.

Each call is one vectorised, OpenMP-parallel pass over the flat buffer
(``csrc/cpu/passes.cpp``); the math, the gscale convention and the skip rules are documented in
:mod:`.torch_backend`, which is the ground truth the C++ kernels are tested against. Per-block
sums are per-tile partial sums added in tile order, so they are the same bit for bit on every
run and for every thread count. A bf16/fp16 gradient and a half model's copy of its fp32 master
are read and written by the SIMD kernels themselves (fp16 through F16C with AVX2; lane by lane
on the SSE2 baseline).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import ops
from ..directions.base import DirectionRule
from ..storage.layout import FlatLayout
from ..storage.table import TileTable

name = "cpp"


def supports(rule: DirectionRule) -> bool:
    """Whether the built extension has kernels for ``rule`` (same id, same name: a renamed
    subclass of a rule may change its math, so it is not taken for its parent)."""
    names = ops._C.rule_names()
    return 0 <= rule.rule_id < len(names) and names[rule.rule_id] == rule.name


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
    if table is not None:
        return ops.first_pass_table(
            rule.rule_id, table.param_ptrs, table.grad_ptrs, table.lengths, states, scalars,
            weight_decay, eta, gscale, layout.tile_block, layout.block_tiles, layout.tile,
            precond=precond,
        )
    return ops.first_pass(
        rule.rule_id, param, grad, states, scalars, weight_decay, eta, gscale,
        layout.tile_block, layout.block_tiles, layout.tile, model_param, precond=precond,
    )


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
    if table is not None:
        sums = ops.move_table(
            rule.rule_id, table.param_ptrs, table.grad_ptrs, table.lengths, states, scalars,
            weight_decay, eta_old, eta_new, gscale, layout.tile_block, layout.block_tiles,
            layout.tile, precond_old, precond_new, compute_sums,
        )
        return sums if compute_sums else None
    sums = ops.move(
        rule.rule_id, param, grad, states, scalars, weight_decay, eta_old, eta_new, gscale,
        layout.tile_block, layout.block_tiles, layout.tile, precond_old, precond_new,
        compute_sums, model_param,
    )
    return sums if compute_sums else None


def trial_points(rule: DirectionRule, param: Tensor, grad: Tensor, states: Sequence[Tensor],
                 scalars: Sequence[float], weight_decay: float, etas: Sequence[float],
                 gscale: Tensor, layout: FlatLayout, precond: bool = False) -> Tensor:
    """[K, numel] rows θ0 − η_k·d in one pass that reads θ, g and the state once (the torch
    twin forms d, then each row: a small model's batched step spent as long on it as on the
    batched forward)."""
    if not etas:
        raise ValueError("cpp backend: trial_points needs at least one step size")
    e = torch.tensor([float(x) for x in etas], dtype=torch.float32)
    return ops.trial_points(rule.rule_id, param, grad, states, scalars, weight_decay, e, gscale,
                            layout.tile, precond)


def grad_sq_norm(grad: Tensor, layout: FlatLayout, table: TileTable | None = None) -> Tensor:
    if table is not None:
        return ops.grad_sq_norm_table(table.grad_ptrs, table.lengths, layout.tile_block,
                                      layout.block_tiles, layout.tile)
    return ops.grad_sq_norm(grad, layout.tile_block, layout.block_tiles, layout.tile)
