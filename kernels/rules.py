"""The six direction rules as Triton helpers, chosen at compile time by the ``RULE`` constexpr.

``RULE`` is ``DirectionRule.rule_id``: 0 sgd, 1 momentum, 2 nesterov, 3 rmsprop, 4 adam, 5 nadam.
Each helper is the element-wise twin of the torch reference in ``armijo_fused.directions`` and
keeps its operation order, so both round the same way. The state is at most two fp32 tensors
``a`` and ``b`` (momentum buffer / square average / exp_avg, exp_avg_sq); unused ones are zeros.

Host scalars (``kernel_scalars``): the rule's five scalars ``s0..s4`` plus ``om0 = 1 - s0`` and
``om1 = 1 - s1`` computed in float64 on the host, as the torch twin does, rather than in fp32::

    momentum / nesterov: s0 = mu
    rmsprop:             s0 = alpha, s1 = eps
    adam / nadam:        s0 = beta1, s1 = beta2, s2 = 1/bc1, s3 = 1/bc2, s4 = eps

Divisions and square roots use the IEEE round-to-nearest forms (``div_rn``, ``sqrt_rn``): on a GPU
``/`` and ``tl.sqrt`` are approximate, which would break parity with torch for no speed gain in a
memory-bound pass.
"""

from collections.abc import Sequence

import triton
import triton.language as tl

#: the rules these kernels implement, by rule_id (``DirectionRule.name``).
RULE_NAMES = ("sgd", "momentum", "nesterov", "rmsprop", "adam", "nadam")
#: state buffers each rule keeps, by rule_id (must equal ``len(rule.state_names)``).
STATE_COUNT = (0, 1, 1, 1, 2, 2)
#: whether ``u`` recomputed from the state reads the gradient, by rule_id. SGD's ``u`` is ``g``.
DIRECTION_READS_GRAD = (True, False, True, True, False, True)


def kernel_scalars(scalars: Sequence[float]) -> tuple[float, ...]:
    """``(s0, s1, s2, s3, s4, 1 - s0, 1 - s1)`` as Python floats (the kernels take fp32)."""
    s = [float(x) for x in scalars]
    if len(s) != 5:
        raise ValueError(f"a direction rule passes 5 host scalars, got {len(s)}: {s}")
    return (*s, 1.0 - s[0], 1.0 - s[1])


@triton.jit
def load_states(state0_ptr, state1_ptr, offs, mask, NSTATES: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """The rule's state at ``offs`` as fp32 (zeros for the buffers it does not keep)."""
    a = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    b = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    if NSTATES >= 1:
        a = tl.load(state0_ptr + offs, mask=mask, other=0.0)
    if NSTATES >= 2:
        b = tl.load(state1_ptr + offs, mask=mask, other=0.0)
    return a, b


@triton.jit
def store_states(state0_ptr, state1_ptr, offs, mask, a, b, NSTATES: tl.constexpr):
    if NSTATES >= 1:
        tl.store(state0_ptr + offs, a, mask=mask)
    if NSTATES >= 2:
        tl.store(state1_ptr + offs, b, mask=mask)


@triton.jit
def widen(x):
    """A loaded gradient or model weight in fp32. bf16 is widened on the bits (its 16 bits are
    an fp32's top half, exactly): the interpreter's own bf16 cast misreads subnormals (1.0e-39
    read as 4.4e-39), so CI's interpreted kernels would disagree with the GPU's and with C++."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def round_to_model(theta, DTYPE: tl.constexpr):
    """fp32 θ rounded to the model's bf16/fp16, to nearest even (torch's casts). bf16 is rounded
    on the bits, as c10::BFloat16 does, NaN to the quiet NaN 0x7FC0: the interpreter's own bf16
    cast truncates, and this way CI's interpreted kernels and the GPU's agree bit for bit (and
    with C++; the torch twin's vectorised CPU cast writes another NaN, 0xFFFF: NaN either way)."""
    if DTYPE == tl.bfloat16:
        bits = theta.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(theta == theta, bits, 0x7FC0)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return theta.to(DTYPE)


@triton.jit
def table_tile(addr_ptr, lengths_ptr, tile, BLOCK_SIZE: tl.constexpr, FULL: tl.constexpr):
    """Pointers to one tile of a tile table and the mask of its real elements: ``addr_ptr``
    holds each tile's int64 address (16-byte aligned), ``lengths_ptr`` its real-element count.
    A ``FULL`` tile (all BLOCK_SIZE elements real) gets a mask the compiler knows is all true,
    so its loads and stores stay 16-byte vectors; other tiles mask element by element."""
    local = tl.arange(0, BLOCK_SIZE)
    if FULL:
        mask = local < BLOCK_SIZE
    else:
        mask = local < tl.load(lengths_ptr + tile)
    base = tl.load(addr_ptr + tile).to(tl.pointer_type(tl.float32))
    return tl.multiple_of(base, 16) + local, mask


@triton.jit
def tile_pointers(param_ptr, grad_ptr, lengths_ptr, tile, offs, n_elements,
                  BLOCK_SIZE: tl.constexpr, TABLE: tl.constexpr, FULL: tl.constexpr):
    """Pointers to this tile's θ and g, and the mask of its real elements. Flat: at ``offs`` in
    the flat buffers. ``TABLE``: ``param_ptr`` / ``grad_ptr`` are the tile table's address
    columns (:func:`table_tile`); a launch covers either full tiles or the rest (each tensor's
    last tile)."""
    if TABLE:
        theta_ptrs, mask = table_tile(param_ptr, lengths_ptr, tile, BLOCK_SIZE, FULL)
        grad_ptrs, _ = table_tile(grad_ptr, lengths_ptr, tile, BLOCK_SIZE, FULL)
    else:
        mask = offs < n_elements
        theta_ptrs = param_ptr + offs
        grad_ptrs = grad_ptr + offs
    return theta_ptrs, grad_ptrs, mask


@triton.jit
def store_theta(theta_ptrs, model_ptrs, mask, theta, WRITE_MODEL: tl.constexpr):
    """Write the new θ; a bf16/fp16 model with fp32 master weights (``theta_ptrs`` then point
    into the master) also gets its own copy, rounded once, in the same pass."""
    tl.store(theta_ptrs, theta, mask=mask)
    if WRITE_MODEL:
        tl.store(model_ptrs, round_to_model(theta, model_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def update_state(g, a, b, s0, s1, om0, om1, RULE: tl.constexpr):
    """Fold ``g`` into the state: returns the new ``(a, b)``.

    momentum, nesterov: a <- s0 a + g;  rmsprop: a <- s0 a + (1-s0) g^2;
    adam, nadam: a <- s0 a + (1-s0) g,  b <- s1 b + (1-s1) g^2;  sgd: nothing.
    """
    if RULE == 0:
        pass  # no state
    elif RULE == 1 or RULE == 2:
        a = a * s0 + g
    elif RULE == 3:
        a = a * s0 + om0 * g * g
    elif RULE == 4 or RULE == 5:
        a = a * s0 + om0 * g
        b = b * s1 + om1 * g * g
    else:  # (a rule id without its branch would leave the state as it was, in silence)
        tl.static_assert(False, "kernels/rules.py: update_state has no branch for this RULE")
    return a, b


@triton.jit
def _adam_denominator(b, s3, s4):
    # sqrt(v / bc2) + eps, with 1/bc2 = s3
    return tl.sqrt_rn(b * s3) + s4


@triton.jit
def direction(g, a, b, s0, s1, s2, s3, s4, om0, RULE: tl.constexpr):
    """``u`` from the updated state, without weight decay.

    sgd: g;  momentum: a;  nesterov: g + s0 a;  rmsprop: g / (sqrt(a) + s1);
    adam: (a s2) / (sqrt(b s3) + s4);  nadam: ((s0 a + (1-s0) g) s2) / (sqrt(b s3) + s4).
    """
    if RULE == 0:
        u = g
    elif RULE == 1:
        u = a
    elif RULE == 2:
        u = g + s0 * a
    elif RULE == 3:
        u = tl.div_rn(g, tl.sqrt_rn(a) + s1)
    elif RULE == 4:
        u = tl.div_rn(a * s2, _adam_denominator(b, s3, s4))
    elif RULE == 5:  # (no else: a new rule id without its branch fails to compile, loudly)
        u = tl.div_rn((s0 * a + om0 * g) * s2, _adam_denominator(b, s3, s4))
    return u


@triton.jit
def precond_grad(g, a, b, s1, s3, s4, RULE: tl.constexpr):
    """The fallback descent direction: g under the rule's preconditioner (no momentum, no wd).

    sgd, momentum, nesterov: g;  rmsprop: g / (sqrt(a) + s1);  adam, nadam: g / (sqrt(b s3) + s4).
    """
    if RULE <= 2:
        p = g
    elif RULE == 3:
        p = tl.div_rn(g, tl.sqrt_rn(a) + s1)
    elif RULE == 4 or RULE == 5:  # (no else, as in ``direction``)
        p = tl.div_rn(g, _adam_denominator(b, s3, s4))
    return p


@triton.jit
def line_direction(g, a, b, s0, s1, s2, s3, s4, om0, RULE: tl.constexpr, PRECOND: tl.constexpr):
    """``u`` of the search line: the rule's direction, or with ``PRECOND`` the fallback
    preconditioned gradient (the caller adds weight decay to the former only)."""
    if PRECOND:
        u = precond_grad(g, a, b, s1, s3, s4, RULE)
    else:
        u = direction(g, a, b, s0, s1, s2, s3, s4, om0, RULE)
    return u
