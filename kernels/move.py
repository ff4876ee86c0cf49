"""The retry pass: move θ along the line from eta_old to eta_new without a copy of θ0.

One program per tile; ``u`` is recomputed from the (already updated) state, never stored::

    u_old = precond_grad if PRECOND_OLD else u,   wd_old = 0 if PRECOND_OLD else wd
    θ0    = (θ + eta_old * u_old) / (1 - eta_old * wd_old)   # the divisor in fp64, rounded once
    d_new = u_new + wd_new * θ0                 # u_new, wd_new likewise from PRECOND_NEW
    θ    <- θ0 - eta_new * d_new               # and the model's bf16/fp16 copy with WRITE_MODEL
    partial[tile] = (Σ g·d_new, Σ g², Σ d_new²)  # only when COMPUTE_SUMS

A tile whose block keeps its step size (eta_old == eta_new, read from device memory) and its
direction (PRECOND_OLD == PRECOND_NEW) does not write θ; without COMPUTE_SUMS it returns before
touching anything else, so queued retries of other blocks cost nothing here. ``LOAD_GRAD`` is
False when neither direction, nor the sums, read the gradient (momentum, adam): the pass then
reads θ and the state and writes θ (16 B per element for Adam). If either gscale entry is not
finite, nothing is written and the partials are zero. ``TABLE``: θ and g through a tile table,
as in the first pass.

The divisor ``1 - eta_old * wd`` is formed in fp64 from the float64 weight decay (passed as three
fp32 pieces, ``weight_decay + wd_mid + wd_lo``, which add up to it exactly) and rounded once to
fp32, as the torch twin (a Python-float divisor) and the C++ kernel form it; in fp32 its two
roundings differ from theirs for about one step size in 1400 at wd = 0.01, and then most of the
block's elements land an ulp away from the twins'.
"""

import triton
import triton.language as tl

from .reductions import is_finite, store_tile_sums, store_zero_tile_sums
from .rules import line_direction, load_states, store_theta, tile_pointers, widen


@triton.jit
def _move_tile(param_ptr, model_ptr, grad_ptr, lengths_ptr, state0_ptr, state1_ptr, eta_old,
               eta_new, partial_ptr, tile, unscale, clip, n_elements, weight_decay,
               wd_mid, wd_lo, s0, s1, s2, s3, s4, om0, RULE: tl.constexpr, NSTATES: tl.constexpr,
               PRECOND_OLD: tl.constexpr, PRECOND_NEW: tl.constexpr, COMPUTE_SUMS: tl.constexpr,
               LOAD_GRAD: tl.constexpr, WRITE_MODEL: tl.constexpr, TABLE: tl.constexpr,
               FULL: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offs = tile * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    theta_ptrs, grad_ptrs, mask = tile_pointers(param_ptr, grad_ptr, lengths_ptr, tile, offs,
                                                n_elements, BLOCK_SIZE, TABLE, FULL)
    theta = tl.load(theta_ptrs, mask=mask, other=0.0)
    a, b = load_states(state0_ptr, state1_ptr, offs, mask, NSTATES, BLOCK_SIZE)
    g = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    if LOAD_GRAD:
        g = widen(tl.load(grad_ptrs, mask=mask, other=0.0)) * unscale
    g_in = g * clip

    u_old = line_direction(g_in, a, b, s0, s1, s2, s3, s4, om0, RULE, PRECOND_OLD)
    if PRECOND_OLD:
        den_old = 1.0 - eta_old * 0.0
    else:  # 1 - eta_old * wd in fp64 (wd exact: three fp32 pieces), rounded once
        wd64 = (tl.cast(weight_decay, tl.float64) + tl.cast(wd_mid, tl.float64)
                + tl.cast(wd_lo, tl.float64))
        den_old = tl.cast(1.0 - tl.cast(eta_old, tl.float64) * wd64, tl.float32)
    theta0 = tl.div_rn(theta + eta_old * u_old, den_old)
    u_new = line_direction(g_in, a, b, s0, s1, s2, s3, s4, om0, RULE, PRECOND_NEW)
    wd_new = 0.0 if PRECOND_NEW else weight_decay
    d_new = u_new + wd_new * theta0

    theta_new = theta0 - eta_new * d_new
    if PRECOND_OLD != PRECOND_NEW:
        store_theta(theta_ptrs, model_ptr + offs, mask, theta_new, WRITE_MODEL)
    elif eta_old != eta_new:  # an unchanged block keeps θ bitwise
        store_theta(theta_ptrs, model_ptr + offs, mask, theta_new, WRITE_MODEL)
    if COMPUTE_SUMS:
        store_tile_sums(partial_ptr, tile, g, d_new)


@triton.jit
def move_kernel(
    param_ptr,
    model_ptr,
    grad_ptr,
    lengths_ptr,
    tiles_ptr,
    state0_ptr,
    state1_ptr,
    eta_old_ptr,
    eta_new_ptr,
    gscale_ptr,
    tile_block_ptr,
    partial_ptr,
    n_elements,
    weight_decay,
    wd_mid,
    wd_lo,
    s0,
    s1,
    s2,
    s3,
    s4,
    om0,
    RULE: tl.constexpr,
    NSTATES: tl.constexpr,
    PRECOND_OLD: tl.constexpr,
    PRECOND_NEW: tl.constexpr,
    COMPUTE_SUMS: tl.constexpr,
    LOAD_GRAD: tl.constexpr,
    WRITE_MODEL: tl.constexpr,
    TABLE: tl.constexpr,
    FULL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    if TABLE:  # launched once over the full tiles (FULL) and once over the others
        tile = tl.load(tiles_ptr + tile).to(tl.int64)
    block = tl.load(tile_block_ptr + tile)
    eta_old = tl.load(eta_old_ptr + block)
    eta_new = tl.load(eta_new_ptr + block)
    if PRECOND_OLD == PRECOND_NEW and not COMPUTE_SUMS:
        if eta_old == eta_new:
            return  # this block is not moving: no traffic beyond three scalars
    unscale = tl.load(gscale_ptr)
    clip = tl.load(gscale_ptr + 1)
    if not (is_finite(unscale) & is_finite(clip)):
        if COMPUTE_SUMS:
            store_zero_tile_sums(partial_ptr, tile)
        return
    _move_tile(param_ptr, model_ptr, grad_ptr, lengths_ptr, state0_ptr, state1_ptr, eta_old,
               eta_new, partial_ptr, tile, unscale, clip, n_elements, weight_decay, wd_mid, wd_lo,
               s0, s1, s2, s3, s4, om0, RULE, NSTATES, PRECOND_OLD, PRECOND_NEW, COMPUTE_SUMS,
               LOAD_GRAD, WRITE_MODEL, TABLE, FULL, BLOCK_SIZE)
