"""The layout of one flat buffer: blocks padded to whole tiles.

Every fused pass runs one program (Triton) or one work item (C++) per *tile* of ``tile`` elements.
Each block (a set of parameters that shares one step size) starts on a tile boundary, so a tile
belongs to exactly one block and the per-block reductions are per-tile partial sums added up in a
fixed order: deterministic, no atomics. Padding elements hold zeros in θ, g and every state buffer;
all six rules map zeros to a zero direction, so the padding never moves and adds nothing to a sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: elements per tile; the Triton BLOCK_SIZE and the C++ chunk. 2048 fp32 = 8 KiB per stream.
DEFAULT_TILE = 2048


@dataclass(frozen=True)
class FlatLayout:
    numel: int  # padded length: a multiple of ``tile``
    tile: int
    block_offsets: tuple[int, ...]  # element offset where each block starts, plus the end
    block_numels: tuple[int, ...]  # real (unpadded) elements per block
    tile_block: Tensor  # int32 [numel // tile]: the block each tile belongs to
    block_tiles: Tensor  # int32 [nblocks + 1]: first tile of each block, plus the end

    @property
    def nblocks(self) -> int:
        return len(self.block_numels)

    @property
    def ntiles(self) -> int:
        return self.numel // self.tile


def make_layout(block_numels, *, tile: int = DEFAULT_TILE, device="cpu") -> FlatLayout:
    """Lay out blocks of the given sizes back to back, each padded to a whole number of tiles."""
    block_numels = tuple(int(n) for n in block_numels)
    if not block_numels:
        raise ValueError("a flat layout needs at least one block")
    if any(n < 0 for n in block_numels):
        raise ValueError(f"block sizes must be non-negative, got {block_numels}")
    if tile <= 0 or tile & (tile - 1):
        raise ValueError(f"tile must be a positive power of two, got {tile}")
    return _layout(block_numels, [max(1, -(-n // tile)) for n in block_numels], tile, device)


def _layout(block_numels, tiles_per_block, tile: int, device) -> FlatLayout:
    block_tiles = [0]
    for t in tiles_per_block:
        block_tiles.append(block_tiles[-1] + t)
    tile_block = [b for b, t in enumerate(tiles_per_block) for _ in range(t)]
    return FlatLayout(
        numel=block_tiles[-1] * tile,
        tile=tile,
        block_offsets=tuple(t * tile for t in block_tiles),
        block_numels=tuple(block_numels),
        tile_block=torch.tensor(tile_block, dtype=torch.int32, device=device),
        block_tiles=torch.tensor(block_tiles, dtype=torch.int32, device=device),
    )


def place_tensors(numels, block_ids, *, tile: int = DEFAULT_TILE,
                  device="cpu") -> tuple[FlatLayout, list[int]]:
    """Lay out tensors of ``numels`` elements, grouped into blocks by ``block_ids`` (ascending):
    the layout, and the element offset of each tensor (blocks start on tile boundaries)."""
    block_ids = list(block_ids)
    if sorted(block_ids) != block_ids:
        raise ValueError("parameters must be ordered by block")
    block_numels = [0] * (block_ids[-1] + 1)
    for n, b in zip(numels, block_ids):
        block_numels[b] += n
    layout = make_layout(block_numels, tile=tile, device=device)
    cursor = list(layout.block_offsets[:-1])
    offsets = []
    for n, b in zip(numels, block_ids):
        offsets.append(cursor[b])
        cursor[b] += n
    return layout, offsets


def place_tensors_tiled(numels, block_ids, *, tile: int = DEFAULT_TILE,
                        device="cpu") -> tuple[FlatLayout, list[int]]:
    """Like :func:`place_tensors`, but every tensor starts on a tile boundary, so that a tile
    covers part of one tensor only: the layout of a tile table (``storage.table``), whose passes
    find each tile's θ and g through a pointer rather than in a flat buffer. An empty tensor gets
    no tile; a block with no elements keeps one (empty) tile."""
    block_ids = list(block_ids)
    if sorted(block_ids) != block_ids:
        raise ValueError("parameters must be ordered by block")
    if tile <= 0 or tile & (tile - 1):
        raise ValueError(f"tile must be a positive power of two, got {tile}")
    nblocks = block_ids[-1] + 1
    block_numels, tiles = [0] * nblocks, [0] * nblocks
    for n, b in zip(numels, block_ids):
        block_numels[b] += int(n)
        tiles[b] += -(-int(n) // tile)
    layout = _layout(block_numels, [max(1, t) for t in tiles], tile, device)
    cursor = list(layout.block_offsets[:-1])
    offsets = []
    for n, b in zip(numels, block_ids):
        offsets.append(cursor[b])
        cursor[b] += -(-int(n) // tile) * tile
    return layout, offsets
