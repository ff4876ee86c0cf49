"""Tile tables: θ and g of tensors that must stay where they are, found through pointers.

FSDP2 owns the storage of its parameter shards (and writes a new gradient tensor after every
backward), so they cannot be re-pointed into one flat buffer as :class:`FlatBuffer` does. Rather
than copying them into a flat buffer and back around every pass, the passes read and write them in
place: the layout is :func:`~.layout.place_tensors_tiled` (each tensor starts on a tile, so a tile
covers part of one tensor only) and, for every tile, the table holds the address of its first θ
element, of its first g element, and how many of its elements are real. The optimizer state still
lives in flat buffers of the layout's length, which the optimizer owns.

Backends that take a table (``table=`` of ``first_pass`` / ``move`` / ``grad_sq_norm``) ignore the
``param`` and ``grad`` buffers and use it instead; the torch twin gathers the tensors into flat
temporaries, runs the flat reference and scatters θ back, which defines what the kernels must do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .layout import FlatLayout
from .scalars import to_device

#: the byte alignment every tensor of a table must have: the kernels load 16-byte vectors
TABLE_ALIGN = 16


@dataclass
class TileTable:
    layout: FlatLayout
    offsets: list[int]  # tile-aligned flat offset of each tensor
    params: list[Tensor]  # 1-D fp32 views of the tensors θ lives in (written in place)
    grads: list[Tensor]  # 1-D fp32 views of their gradients (read)
    param_ptrs: Tensor  # int64 [ntiles]: address of each tile's first θ element
    grad_ptrs: Tensor  # int64 [ntiles]: address of each tile's first g element
    lengths: Tensor  # int32 [ntiles]: real elements of each tile (0 for an empty block's tile)
    tensor_blocks: Tensor  # int64 [ntensors]: the block of each tensor
    full_tiles: Tensor  # int32: the tiles whose every element is real (vectorised launch)
    partial_tiles: Tensor  # int32: the others, one per tensor at most (element-masked launch)
    # host-side, for rebuilding an address column in a few ops (see _tile_addresses)
    tile_owner: Tensor  # int64 [ntiles]: the tensor each tile belongs to (ntensors: none)
    tile_rank: Tensor  # int64 [ntiles]: the tile's index among its tensor's tiles

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype if self.params else torch.float32


def grad_sq_norm(table: TileTable) -> Tensor:
    """Per-block Σ g² of the table's gradients: one multi-tensor norm, no gather."""
    nblocks = table.layout.nblocks
    out = torch.zeros(nblocks, dtype=torch.float32, device=table.lengths.device)
    if table.grads:
        sq = torch.stack(torch._foreach_norm(table.grads)).float().square()
        out.index_add_(0, table.tensor_blocks, sq.to(out.device))
    return out


def table_ok(tensors: Sequence[Tensor]) -> str:
    """Why these tensors cannot go in a table ('' when they can)."""
    for t in tensors:
        if t.dtype != torch.float32:
            return f"a tile table takes float32 tensors, got {t.dtype}"
        if not t.is_contiguous():
            return "a tile table takes contiguous tensors"
        if t.numel() and t.data_ptr() % TABLE_ALIGN:
            return f"a tensor is not {TABLE_ALIGN}-byte aligned"
    return ""


def _tile_owners(tensors: Sequence[Tensor], offsets: Sequence[int], layout: FlatLayout):
    """Per tile, (the tensor it belongs to or ``len(tensors)`` for none, its rank in it)."""
    tile = layout.tile
    owner = torch.full((layout.ntiles,), len(tensors), dtype=torch.int64)
    rank = torch.zeros(layout.ntiles, dtype=torch.int64)
    for i, (t, off) in enumerate(zip(tensors, offsets)):
        k = -(-t.numel() // tile)
        if k:
            first = off // tile
            owner[first:first + k] = i
            rank[first:first + k] = torch.arange(k, dtype=torch.int64)
    return owner, rank


def _tile_addresses(tensors: Sequence[Tensor], owner: Tensor, rank: Tensor, tile: int,
                    dummy: int) -> Tensor:
    """Each tile's first element's address: a gather over the tensors' addresses, not a loop
    over tensors, since FSDP2 rebuilds the g column at every step (the loop took 1.2 ms of host
    time for GPT-2 124M's 148 tensors). Every tensor is fp32 (``table_ok``): 4 bytes."""
    base = torch.tensor([t.data_ptr() for t in tensors] + [dummy], dtype=torch.int64)
    return base[owner] + rank * (tile * 4)


def make_table(layout: FlatLayout, offsets: Sequence[int], params: Sequence[Tensor],
               grads: Sequence[Tensor], device) -> TileTable:
    """The table of ``params`` and ``grads`` (same shapes, in layout order) at ``offsets``."""
    # (detached: a view of a Parameter made with autograd on keeps its AccumulateGrad node
    # alive, and a tensor resized through .data, as HF's resize_token_embeddings does, then
    # failed its next backward against the old shape)
    params = [p.detach().reshape(-1) for p in params]
    grads = [g.detach().reshape(-1) for g in grads]
    why = table_ok(params + grads)
    if why:
        raise ValueError(why)
    for p, g in zip(params, grads):
        if p.numel() != g.numel():
            raise ValueError(f"a gradient has {g.numel()} elements, its tensor {p.numel()}")
    tile = layout.tile
    lengths = torch.zeros(layout.ntiles, dtype=torch.int32)
    for p, off in zip(params, offsets):
        n, first = p.numel(), off // tile
        k = -(-n // tile)
        if k:
            lengths[first:first + k] = tile
            lengths[first + k - 1] = n - (k - 1) * tile
    # a tile without elements still needs a valid address: the kernels mask every access
    dummy = next((p.data_ptr() for p in params if p.numel()), 0)
    owner, rank = _tile_owners(params, offsets, layout)
    return TileTable(
        layout=layout, offsets=list(offsets), params=params, grads=grads,
        param_ptrs=_tile_addresses(params, owner, rank, tile, dummy).to(device),
        grad_ptrs=_tile_addresses(grads, owner, rank, tile, dummy).to(device),
        lengths=lengths.to(device),
        # an empty tensor may sit past the last tile: any block will do, it adds a zero norm
        tensor_blocks=layout.tile_block.cpu()[[min(o // tile, layout.ntiles - 1)
                                               for o in offsets]].long().to(device),
        full_tiles=(lengths == tile).nonzero().flatten().int().to(device),
        partial_tiles=(lengths != tile).nonzero().flatten().int().to(device),
        tile_owner=owner, tile_rank=rank,
    )


def with_grads(table: TileTable, grads: Sequence[Tensor]) -> TileTable:
    """The table with new gradient tensors (same shapes): FSDP2 writes a new gradient after
    every backward, so the g column is rebuilt at every step; θ's column stays."""
    grads = [g.detach().reshape(-1) for g in grads]
    why = table_ok(grads)
    if why:
        raise ValueError(why)
    dummy = next((p.data_ptr() for p in table.params if p.numel()), 0)
    ptrs = _tile_addresses(grads, table.tile_owner, table.tile_rank, table.layout.tile, dummy)
    return replace(table, grads=grads, grad_ptrs=to_device(ptrs, table.grad_ptrs.device))


def gather(tensors: Sequence[Tensor], table: TileTable) -> Tensor:
    """The tensors copied into one flat buffer of the layout (zeros in the padding)."""
    flat = torch.zeros(table.layout.numel, dtype=table.dtype,
                       device=tensors[0].device if tensors else "cpu")
    for t, off in zip(tensors, table.offsets):
        flat[off:off + t.numel()].copy_(t)
    return flat


def scatter(flat: Tensor, tensors: Sequence[Tensor], table: TileTable) -> None:
    """Copy each tensor's slice of ``flat`` back into it."""
    for t, off in zip(tensors, table.offsets):
        t.copy_(flat[off:off + t.numel()])
