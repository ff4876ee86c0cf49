"""The K trial points of a batched-candidates search, written in one pass.

One program per tile; θ sits at θ0 and the state is already updated (the search ran the first
pass with eta 0), so nothing here is written but the output::

    g_in   = grad * gscale[0] * gscale[1]
    d      = u(state, g_in) + wd * θ0          # or precond_grad(g_in), no weight decay, PRECOND
    out[k] = θ0 - etas[k] * d                  # k < K, rows of n_elements

Traffic per element: reads θ and the state once, and g where the direction needs it (12 B for
Adam, whose u does not read g once the state is updated), writes 4·K B.
"""

import triton
import triton.language as tl

from .rules import line_direction, load_states, widen


@triton.jit
def trial_points_kernel(
    param_ptr,
    grad_ptr,
    state0_ptr,
    state1_ptr,
    etas_ptr,
    gscale_ptr,
    out_ptr,
    n_elements,
    n_candidates,
    weight_decay,
    s0,
    s1,
    s2,
    s3,
    s4,
    om0,
    RULE: tl.constexpr,
    NSTATES: tl.constexpr,
    PRECOND: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    offs = tile * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    unscale = tl.load(gscale_ptr)
    clip = tl.load(gscale_ptr + 1)

    theta = tl.load(param_ptr + offs, mask=mask, other=0.0)
    g_in = widen(tl.load(grad_ptr + offs, mask=mask, other=0.0)) * unscale * clip
    a, b = load_states(state0_ptr, state1_ptr, offs, mask, NSTATES, BLOCK_SIZE)
    d = line_direction(g_in, a, b, s0, s1, s2, s3, s4, om0, RULE, PRECOND)
    if not PRECOND:  # the fallback direction carries no weight decay
        d = d + weight_decay * theta

    # row k starts k * n_elements further on: advance 64-bit pointers row by row, since the
    # product k * n_elements, taken in int32, would wrap once (K - 1) * n_elements >= 2**31
    out_row = out_ptr + offs
    for k in range(n_candidates):
        eta = tl.load(etas_ptr + k)
        tl.store(out_row, theta - eta * d, mask=mask)
        out_row += n_elements
