"""The readable torch reference of every fused pass: the ground truth of the kernel tests.

All passes work on one flat fp32 buffer laid out by :class:`FlatLayout` and share one signature
across the three backends (``torch_backend``, ``triton_backend``, ``cpp_backend``):

``first_pass(rule, param, grad, states, scalars, weight_decay, eta, gscale, layout,
model_param=None, table=None, precond=False) -> sums``
    Fold the gradient into the state, form the direction and move θ to the first trial point::

        g      = grad * gscale[0]            # the true gradient (gscale[0] undoes AMP scaling)
        g_in   = g * gscale[1]               # what the state absorbs (gscale[1] clips)
        state  <- rule.update_state(g_in)
        d      = u(state, g_in) + wd * θ0    # the applied direction, decoupled weight decay
        θ      <- θ0 - eta[b] * d            # eta is per block, a device tensor
        sums[b] = (<g, d>, |g|^2, |d|^2)     # fp32, per block

    With ``precond`` the trial is θ0 - eta[b] * rule.precond_grad(g_in) (the fallback line, no
    weight decay: a search along g whose step then applies d), the sums still d's.

``move(rule, param, grad, states, scalars, weight_decay, eta_old, eta_new, gscale, layout,
precond_old, precond_new, compute_sums, model_param=None, table=None) -> sums | None``
    θ sits at θ0 - eta_old * d_old; move it to θ0 - eta_new * d_new without a copy of θ0: θ0 is
    recovered as (θ + eta_old * u_old) / (1 - eta_old * wd_old). ``precond`` selects the fallback
    direction (rule.precond_grad, no weight decay) instead of ``u + wd θ0``. A block whose step size
    and direction are unchanged is left untouched (the kernels exit early there). Serves
    backtracking, the final scaling by lr_t/lr_0, the revert (eta_new = 0) and the fallback.

``trial_points(rule, param, grad, states, scalars, weight_decay, etas, gscale, layout, precond)
-> [K, numel]``
    The K trial points θ0 - eta_k d of a batched-candidates search, θ at θ0 and the state already
    updated (the first pass ran with eta 0): d = u + wd θ0, or the fallback rule.precond_grad
    with ``precond``. One read of θ, g and the state, K writes; nothing else is written.

``grad_sq_norm(grad, layout, table=None) -> [nblocks]``: per-block Σ grad², the pre-pass behind the non-finite
    check and clipping inside the optimizer.

``model_param``: for bf16/fp16 models with fp32 master weights, ``param`` is the fp32 master and
``model_param`` the model's own tensor storage; every element of θ a pass writes is written there
too, rounded once from the master (the fused kernels do it in the same pass). The first pass
first takes the model's side where the two disagree (the master rounds to something else than
the model holds): the user wrote the weights since the last step (``load_state_dict``, an
initialiser, a weight swap), and the model's value is then the starting point, not the stale
master. ``grad`` may be fp32, bf16 or fp16; the math runs in fp32. Only this backend takes fp64
buffers (a float64 model's), and runs their math, sums and Σ g² in fp64: in fp32 a revert
missed θ0 by 1e-4 at a step of 1e3 and Σ g² of a gradient of 1e-50 was 0.

``table``: a :class:`~armijo_fused.storage.table.TileTable` of tensors that stay where they are
(FSDP2 shards). The passes then ignore ``param`` and ``grad`` and read and write θ and g in
those tensors; here by gathering them into flat temporaries and scattering θ back, in the fused
backends through the table's pointers. The states stay flat buffers of the table's layout.

``gscale`` is a float32 device tensor of two entries; if either is not finite the first pass and
the move write nothing and return zero sums, so a step with a non-finite gradient leaves θ and
state untouched without a host sync (``trial_points`` writes only its own output, whose rows are
then not finite: the batched search reads the guard with them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..directions.base import DirectionRule
from ..storage.layout import FlatLayout
from ..storage.scalars import compute_dtype
from ..storage.table import TileTable, gather, scatter
from ..storage.table import grad_sq_norm as table_grad_sq_norm

name = "torch"


def _blocks(layout: FlatLayout):
    for b in range(layout.nblocks):
        yield b, slice(layout.block_offsets[b], layout.block_offsets[b + 1])


def _block_sums(g: Tensor, d: Tensor) -> Tensor:
    return torch.stack([(g * d).sum(), (g * g).sum(), (d * d).sum()])


def _check_flat(op: str, layout: FlatLayout, **buffers) -> None:
    """The reference takes what the other backends take: flat buffers of ``layout.numel``
    elements, floating point (the reference also runs fp64 models), all on θ's device.
    (Unchecked, a short buffer gave a block an empty slice and sums of 0, and an int gradient
    ran.)"""
    device = buffers["param"].device if "param" in buffers else None
    for what, t in buffers.items():
        for i, x in enumerate(t if isinstance(t, (list, tuple)) else [t]):
            if x is None:
                continue
            name = f"{what}[{i}]" if isinstance(t, (list, tuple)) else what
            if x.dim() != 1 or x.numel() != layout.numel or not x.is_contiguous():
                raise ValueError(f"torch backend {op}: {name} must be a contiguous flat buffer of "
                                 f"layout.numel={layout.numel} elements, got shape "
                                 f"{tuple(x.shape)}")
            if not x.is_floating_point():
                raise TypeError(f"torch backend {op}: {name} must be floating point, got "
                                f"{x.dtype}")
            if device is not None and x.device != device:
                raise ValueError(f"torch backend {op}: {name} is on {x.device}, param on {device}")


def _unpack_scale(gscale: Tensor) -> tuple[float, float] | None:
    unscale, clip = (float(x) for x in gscale.tolist())
    if not (torch.isfinite(torch.tensor([unscale, clip])).all()):
        return None
    return unscale, clip


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
    """Fold g into the state, form d, write θ0 − η·d (with ``precond``: θ0 − η·p(g), the
    fallback line, as a search along g whose step applies d does); sums of (g, d) per block."""
    if table is not None:
        param, grad = gather(table.params, table), gather(table.grads, table)
        sums = first_pass(rule, param, grad, states, scalars, weight_decay, eta, gscale, layout,
                          precond=precond)
        scatter(param, table.params, table)
        return sums
    _check_flat("first_pass", layout, param=param, grad=grad, states=list(states),
                model_param=model_param)
    ct = compute_dtype(param.dtype)
    sums = torch.zeros(layout.nblocks, 3, dtype=ct, device=param.device)
    scale = _unpack_scale(gscale)
    if scale is None:
        return sums
    if model_param is not None:  # weights written by the user since the last step win
        written = param.to(model_param.dtype) != model_param
        param[written] = model_param[written].float()
    g = grad.to(ct) * scale[0]  # bf16/fp16 gradients: the math runs in fp32
    g_in = g * scale[1]
    rule.update_state(g_in, states, scalars)
    moved = []
    try:
        d = rule.direction(g_in, states, scalars) + weight_decay * param
        line = rule.precond_grad(g_in, states, scalars) if precond else d
        for b, sl in _blocks(layout):
            param[sl].sub_(eta[b].to(param.dtype) * line[sl])
            moved.append((b, sl))
            sums[b] = _block_sums(g[sl], d[sl])
    except BaseException:  # out of memory midway: nothing half-written survives (to rounding)
        for b, sl in moved:
            param[sl].add_(eta[b].to(param.dtype) * line[sl])
        rule.undo_state(g_in, states, scalars)
        raise
    if model_param is not None:
        model_param.copy_(param)
    return sums


def _direction(rule, g_in, states, scalars, weight_decay, precond):
    if precond:
        return rule.precond_grad(g_in, states, scalars), 0.0
    return rule.direction(g_in, states, scalars), weight_decay


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
        param, grad = gather(table.params, table), gather(table.grads, table)
        sums = move(rule, param, grad, states, scalars, weight_decay, eta_old, eta_new, gscale,
                    layout, precond_old, precond_new, compute_sums)
        scatter(param, table.params, table)
        return sums
    _check_flat("move", layout, param=param, grad=grad, states=list(states),
                model_param=model_param)
    ct = compute_dtype(param.dtype)
    sums = torch.zeros(layout.nblocks, 3, dtype=ct, device=param.device)
    scale = _unpack_scale(gscale)
    if scale is None:
        return sums if compute_sums else None
    g = grad.to(ct) * scale[0]  # bf16/fp16 gradients: the math runs in fp32
    g_in = g * scale[1]
    u_old, wd_old = _direction(rule, g_in, states, scalars, weight_decay, precond_old)
    u_new, wd_new = _direction(rule, g_in, states, scalars, weight_decay, precond_new)
    moved = []
    try:
        for b, sl in _blocks(layout):
            e_old, e_new = float(eta_old[b]), float(eta_new[b])
            theta0 = (param[sl] + e_old * u_old[sl]) / (1.0 - e_old * wd_old)
            d_new = u_new[sl] + wd_new * theta0
            if e_old != e_new or precond_old != precond_new:
                param[sl].copy_(theta0 - e_new * d_new)
                moved.append((sl, e_old, e_new))
                if model_param is not None:
                    model_param[sl].copy_(param[sl])
            if compute_sums:
                sums[b] = _block_sums(g[sl], d_new)
    except BaseException:  # out of memory midway: the blocks moved go back (to rounding)
        for sl, e_old, e_new in moved:
            theta0 = (param[sl] + e_new * u_new[sl]) / (1.0 - e_new * wd_new)
            param[sl].copy_(theta0 - e_old * (u_old[sl] + wd_old * theta0))
            if model_param is not None:
                model_param[sl].copy_(param[sl])
        raise
    return sums if compute_sums else None


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
    _check_flat("trial_points", layout, param=param, grad=grad, states=list(states))
    unscale, clip = (float(x) for x in gscale.tolist())
    ct = compute_dtype(param.dtype)
    g_in = grad.to(ct) * unscale * clip
    u, wd = _direction(rule, g_in, states, scalars, weight_decay, precond)
    d = u if precond else u + wd * param
    del g_in, u
    e = torch.tensor(list(etas), dtype=ct, device=param.device)  # (as the passes' η)
    # row by row into the result: θ0 − η_k·d as [K, n] products and then their difference held
    # 2K copies of θ at once (the same roundings: the product, then the difference)
    out = torch.empty((len(etas), param.numel()), dtype=torch.promote_types(param.dtype, d.dtype),
                      device=param.device)
    for k, row in enumerate(out):
        torch.mul(d, e[k], out=row)
        torch.sub(param, row, out=row)
    return out


def grad_sq_norm(grad: Tensor, layout: FlatLayout, table: TileTable | None = None) -> Tensor:
    if table is not None:
        return table_grad_sq_norm(table)
    _check_flat("grad_sq_norm", layout, grad=grad)
    ct = compute_dtype(grad.dtype)
    out = torch.empty(layout.nblocks, dtype=ct, device=grad.device)
    for b, sl in _blocks(layout):
        out[b] = grad[sl].to(ct).square().sum()
    return out
