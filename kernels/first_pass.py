"""The first pass of a step: state update, direction, per-tile sums and the first trial point.

One program per tile of ``BLOCK_SIZE`` elements (the layout's tile), block ``tile_block[tile]``::

    g      = grad * gscale[0]                  # true gradient (undo AMP scaling)
    g_in   = g * gscale[1]                     # what the state absorbs (clipping)
    θ0    <- model where bf16/fp16(θ0) != model  # only WRITE_MODEL: the user wrote the model
    state <- update_state(state, g_in)
    d      = u(state, g_in) + wd * θ0          # applied direction, decoupled weight decay
    θ     <- θ0 - eta[block] * d               # PRECOND: θ0 - eta[block] * precond_grad(g_in)
    model <- bf16/fp16(θ)                      # only WRITE_MODEL: fp32 master weights
    partial[tile] = (Σ g·d, Σ g², Σ d²)

With ``TABLE``, θ and g are found through a tile table (FSDP2 shards that stay in place:
``storage/table.py``) instead of the flat buffers; the states stay flat.

Traffic per element: reads θ, g and the state, writes θ and the state (28 B for Adam in fp32;
with a bf16 model and fp32 master, g is 2 B and the model copy is read and written: 30 B).
If either gscale entry is not finite the program writes zero partials and nothing else.
``PRECOND`` puts the first trial on the fallback line (a search along g whose step then applies
d: SGD with momentum), saving the move there; the sums are d's either way.
"""

import triton
import triton.language as tl

from .reductions import is_finite, store_tile_sums, store_zero_tile_sums
from .rules import (
    direction,
    load_states,
    precond_grad,
    round_to_model,
    store_states,
    store_theta,
    tile_pointers,
    update_state,
    widen,
)


@triton.jit
def _first_pass_tile(param_ptr, model_ptr, grad_ptr, lengths_ptr, state0_ptr, state1_ptr, eta,
                     partial_ptr, tile, unscale, clip, n_elements, weight_decay,
                     s0, s1, s2, s3, s4, om0, om1, RULE: tl.constexpr, NSTATES: tl.constexpr,
                     WRITE_MODEL: tl.constexpr, TABLE: tl.constexpr, FULL: tl.constexpr,
                     PRECOND: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offs = tile * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    theta_ptrs, grad_ptrs, mask = tile_pointers(param_ptr, grad_ptr, lengths_ptr, tile, offs,
                                                n_elements, BLOCK_SIZE, TABLE, FULL)
    theta = tl.load(theta_ptrs, mask=mask, other=0.0)
    if WRITE_MODEL:  # weights the user wrote into the model since the last step win
        model = tl.load(model_ptr + offs, mask=mask, other=0.0)
        written = widen(round_to_model(theta, model_ptr.dtype.element_ty)) != widen(model)
        theta = tl.where(written, widen(model), theta)
    g = widen(tl.load(grad_ptrs, mask=mask, other=0.0)) * unscale
    g_in = g * clip
    a, b = load_states(state0_ptr, state1_ptr, offs, mask, NSTATES, BLOCK_SIZE)

    a, b = update_state(g_in, a, b, s0, s1, om0, om1, RULE)
    d = direction(g_in, a, b, s0, s1, s2, s3, s4, om0, RULE) + weight_decay * theta

    if PRECOND:
        line = precond_grad(g_in, a, b, s1, s3, s4, RULE)
    else:
        line = d
    store_theta(theta_ptrs, model_ptr + offs, mask, theta - eta * line, WRITE_MODEL)
    store_states(state0_ptr, state1_ptr, offs, mask, a, b, NSTATES)
    store_tile_sums(partial_ptr, tile, g, d)


@triton.jit
def first_pass_kernel(
    param_ptr,
    model_ptr,
    grad_ptr,
    lengths_ptr,
    tiles_ptr,
    state0_ptr,
    state1_ptr,
    eta_ptr,
    gscale_ptr,
    tile_block_ptr,
    partial_ptr,
    n_elements,
    weight_decay,
    s0,
    s1,
    s2,
    s3,
    s4,
    om0,
    om1,
    RULE: tl.constexpr,
    NSTATES: tl.constexpr,
    WRITE_MODEL: tl.constexpr,
    TABLE: tl.constexpr,
    FULL: tl.constexpr,
    PRECOND: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    if TABLE:  # launched once over the full tiles (FULL) and once over the others
        tile = tl.load(tiles_ptr + tile).to(tl.int64)
    unscale = tl.load(gscale_ptr)
    clip = tl.load(gscale_ptr + 1)
    if not (is_finite(unscale) & is_finite(clip)):
        store_zero_tile_sums(partial_ptr, tile)
        return
    eta = tl.load(eta_ptr + tl.load(tile_block_ptr + tile))
    _first_pass_tile(param_ptr, model_ptr, grad_ptr, lengths_ptr, state0_ptr, state1_ptr, eta,
                     partial_ptr, tile, unscale, clip, n_elements, weight_decay, s0, s1, s2, s3,
                     s4, om0, om1, RULE, NSTATES, WRITE_MODEL, TABLE, FULL, PRECOND,
                     BLOCK_SIZE)
