"""Storage that leaves the parameters where they are (``flat=False``).

:class:`~armijo_fused.storage.flat.FlatBuffer` re-points every parameter into one buffer per
group, which is what makes one launch cover the group. Some programs cannot have their
parameters re-pointed: CUDA graphs captured before the optimizer existed, storage shared with
another tensor or process, code that holds ``p.data`` and expects it to stay. For them the passes
run on the tensors in place, through a tile table (:mod:`.table`: the address of each tile of θ
and g), exactly as for FSDP2's shards; only the optimizer state lives in flat buffers. Tensors a
table cannot address (bf16/fp16, not contiguous, not 16-byte aligned) are copied in before each
step and θ copied back after each pass that moves it, still without touching ``p.data``.

This is :class:`~armijo_fused.storage.sharded.ShardedBuffer` on plain tensors: one rank's whole
tensors, so no mesh, no resharding, and local sums that are the sums.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sharded import ShardedBuffer, is_dtensor


class InPlaceBuffer(ShardedBuffer):
    distributed = False

    def _distribution(self, process_group) -> float:
        if any(is_dtensor(p) for p in self.params):
            raise TypeError("InPlaceBuffer takes plain tensors; DTensors go to ShardedBuffer")
        return 1.0  # whole tensors: the local sums are the sums

    @staticmethod
    def _wrap(view: Tensor, p) -> Tensor:
        return view  # state[p][name] is the view of the flat state itself

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch does: drop the gradients (``set_to_none``; their memory is free through the
        next forward, and the next step points the table at the backward's new tensors), or
        zero them where they are, in one launch."""
        if set_to_none:
            return self._drop_grads()
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)
