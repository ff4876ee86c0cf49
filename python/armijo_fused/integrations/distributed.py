"""DDP / FSDP2 helpers.

The optimizer itself takes its decisions from globally reduced scalars (docs/design.md §5.6): under
DDP the trial loss is averaged over the ranks in one all-reduce per trial; under FSDP2 the
parameters are DTensors, stored by :class:`armijo_fused.storage.sharded.ShardedBuffer`, whose
per-block sums ride on the same all-reduce, and every FSDP module is resharded before each trial
forward (docs/design.md §5.7). These helpers only make the common checks explicit.
"""

from __future__ import annotations

import torch

from ..storage.sharded import fsdp_modules, is_dtensor


def reshard_all(model: torch.nn.Module) -> int:
    """Reshard every FSDP2 module in ``model`` (what the optimizer does between trials); returns
    how many there were. Call it after changing sharded parameters by hand outside a step."""
    mods = fsdp_modules([model])
    for m in mods:
        m.reshard()
    return len(mods)


def uses_dtensors(optimizer: torch.optim.Optimizer) -> bool:
    """True when some parameter of ``optimizer`` is a DTensor (FSDP2, after accelerate's swap)."""
    return any(is_dtensor(p) for g in optimizer.param_groups for p in g["params"])


def ranks_agree(*values: float, group=None) -> bool:
    """True when every rank holds the same floats (for example ``opt.stats['step_size']``):
    a cheap check for tests and for debugging a suspected divergence between ranks."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return True
    # compared as bit patterns: MIN/MAX skip NaN, and NaN != NaN
    t = torch.tensor(values, dtype=torch.float64).view(torch.int64)
    lo, hi = t.clone(), t.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    return bool(torch.equal(lo, hi))


__all__ = ["ranks_agree", "reshard_all", "uses_dtensors"]
