"""Deterministic per-block reductions: per-tile partial sums, then a fixed-order sum per block.

Every pass runs one program per tile; a tile belongs to exactly one block (``FlatLayout``). A pass
writes its tile's partial sums to row ``tile`` of a ``[ntiles, NCOLS]`` fp32 buffer, and
``block_sum_kernel`` (one program per block) adds the rows of a block's tiles
``block_tiles[b] .. block_tiles[b+1]`` in a fixed order. No float atomics, so the sums are
bitwise the same on every run and every rank.
"""

import triton
import triton.language as tl

from .rules import table_tile, widen

#: partial-sum columns of the first pass and the move: (Σ g·d, Σ g², Σ d²).
SUM_COLS = 3


@triton.jit
def is_finite(x):
    """True when ``x`` is neither inf nor NaN (NaN fails every comparison)."""
    return tl.abs(x) <= 3.4028234663852886e38  # FLT_MAX


@triton.jit
def store_tile_sums(partial_ptr, tile, g, d):
    """Row ``tile`` of the [ntiles, 3] partials: (Σ g·d, Σ g², Σ d²) over this tile."""
    row = partial_ptr + tile * 3
    tl.store(row + 0, tl.sum(g * d, axis=0))
    tl.store(row + 1, tl.sum(g * g, axis=0))
    tl.store(row + 2, tl.sum(d * d, axis=0))


@triton.jit
def store_zero_tile_sums(partial_ptr, tile):
    row = partial_ptr + tile * 3
    tl.store(row + 0, 0.0)
    tl.store(row + 1, 0.0)
    tl.store(row + 2, 0.0)


@triton.jit
def tile_sq_sum_kernel(x_ptr, partial_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    """partial[tile] = Σ x² over one tile (the first half of ``grad_sq_norm``)."""
    tile = tl.program_id(0).to(tl.int64)
    offs = tile * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    x = widen(tl.load(x_ptr + offs, mask=mask, other=0.0))
    tl.store(partial_ptr + tile, tl.sum(x * x, axis=0))


@triton.jit
def table_tile_sq_sum_kernel(grad_ptr, lengths_ptr, tiles_ptr, partial_ptr,
                             BLOCK_SIZE: tl.constexpr, FULL: tl.constexpr):
    """partial[tile] = Σ g² over one tile of a tile table (``storage/table.py``): ``grad_ptr``
    holds each tile's int64 g address, ``lengths_ptr`` its real elements; this launch covers the
    tiles listed at ``tiles_ptr``. ``FULL`` tiles need no per-element mask (vector loads)."""
    tile = tl.load(tiles_ptr + tl.program_id(0)).to(tl.int64)
    grad_ptrs, mask = table_tile(grad_ptr, lengths_ptr, tile, BLOCK_SIZE, FULL)
    g = tl.load(grad_ptrs, mask=mask, other=0.0)
    tl.store(partial_ptr + tile, tl.sum(g * g, axis=0))


@triton.jit
def block_sum_kernel(
    partial_ptr,
    block_tiles_ptr,
    out_ptr,
    NCOLS: tl.constexpr,
    TILES_PER_ITER: tl.constexpr,
):
    """out[b, :] = Σ_{t in block b} partial[t, :], in tile order, ``TILES_PER_ITER`` at a time."""
    # int64 row indices: tile * NCOLS wraps in int32 once a buffer has 2**31 / NCOLS tiles (a
    # tile of 1 or 2 elements at GPT-2 1.5B's 1.56e9 parameters)
    block = tl.program_id(0).to(tl.int64)
    first = tl.load(block_tiles_ptr + block).to(tl.int64)
    end = tl.load(block_tiles_ptr + block + 1).to(tl.int64)
    cols = tl.arange(0, 4)  # NCOLS <= 4, padded to a power of two
    col_mask = cols < NCOLS
    acc = tl.zeros([4], dtype=tl.float32)
    for start in range(first, end, TILES_PER_ITER):
        tiles = start + tl.arange(0, TILES_PER_ITER)
        mask = (tiles < end)[:, None] & col_mask[None, :]
        rows = tl.load(partial_ptr + tiles[:, None] * NCOLS + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(rows, axis=0)
    tl.store(out_ptr + block * NCOLS + cols, acc, mask=col_mask)
