"""Host numbers handed to the device without a stream synchronisation.

``torch.tensor(python_list, device="cuda")`` copies from pageable memory and then synchronises the
stream (``memcpy_and_sync``): the host waits for every queued kernel, the backward included, before
it can launch the next one. The step sizes and caps a pass reads are such lists, so they go through
pinned memory with ``non_blocking=True``, which queues the copy like a kernel (the caching host
allocator keeps the pinned block alive until the copy has run).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def device_floats(values: Sequence[float], device: torch.device,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """``values`` as a 1-D tensor on ``device``; on CUDA without a sync."""
    if torch.device(device).type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; a CPU tensor goes to CUDA through pinned memory, without a sync."""
    device = torch.device(device)
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the passes compute in for buffers (or a Σ g²) of ``dtype``: float64 for a float64
    model's (the torch backend, the only one that takes them), else fp32 (bf16/fp16 widened)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
