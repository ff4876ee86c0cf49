"""Random flat problems shared by the kernel parity tests of every backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from armijo_fused.directions import RULES
from armijo_fused.storage.layout import FlatLayout, make_layout

# (block sizes, tile): single and several blocks, sizes that are not multiples of the tile,
# a block smaller than one tile, an empty block, and a 0-dim-like block of one element.
SHAPES = [
    ((1,), 256),
    ((1000,), 256),
    ((4096,), 1024),
    ((3000, 17, 1), 512),
    ((777, 0, 2049), 1024),
    ((20000,), 2048),
]


@dataclass
class FlatCase:
    layout: FlatLayout
    param: torch.Tensor
    grad: torch.Tensor
    states: list
    scalars: tuple
    weight_decay: float
    eta: torch.Tensor
    gscale: torch.Tensor

    def clone(self) -> FlatCase:
        return FlatCase(
            self.layout,
            self.param.clone(),
            self.grad.clone(),
            [s.clone() for s in self.states],
            self.scalars,
            self.weight_decay,
            self.eta.clone(),
            self.gscale.clone(),
        )


def _zero_padding(t, layout):
    for b in range(layout.nblocks):
        start = layout.block_offsets[b] + layout.block_numels[b]
        t[start : layout.block_offsets[b + 1]] = 0


def make_case(rule_name, block_sizes, tile, *, seed=0, weight_decay=0.01, step=3, device="cpu"):
    rule = RULES[rule_name]
    gen = torch.Generator().manual_seed(seed)
    layout = make_layout(block_sizes, tile=tile, device=device)
    n = layout.numel

    def rand(scale=1.0, positive=False):
        t = torch.randn(n, generator=gen) * scale
        t = t.abs() if positive else t
        _zero_padding(t, layout)
        return t.to(device)

    group = {"momentum": 0.9, "alpha": 0.99, "betas": (0.9, 0.999), "eps": 1e-8}
    states = [
        rand(1e-2, positive=name in ("exp_avg_sq", "square_avg")) for name in rule.state_names
    ]
    eta = (torch.rand(layout.nblocks, generator=gen) * 1e-2 + 1e-3).to(device)
    return FlatCase(
        layout=layout,
        param=rand(),
        grad=rand(0.1),
        states=states,
        scalars=rule.scalars(group, step),
        weight_decay=weight_decay,
        eta=eta,
        gscale=torch.tensor([1.0, 1.0], device=device),
    )


def rounding_edge_values() -> torch.Tensor:
    """fp32 values where a cast to bf16/fp16 can go wrong: exact ties to even (down and up),
    the largest finite fp32 (rounds to inf in fp16), subnormals, ±0, ±inf, and random values."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF, 0x7F7FFFFF, 0xFF7FFFFF,
                         0x00000001, 0x00008000, 0x00018000, 0x80000000, 0, 0x7F800000,
                         0xFF800000, 0x477FF000, 0x33800000], dtype=torch.int64)
    edge = bits.to(torch.int32).view(torch.float32)  # int64 -> int32 wraps: the same bits
    return torch.cat([edge, torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 100])
