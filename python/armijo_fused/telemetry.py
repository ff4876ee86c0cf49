"""``opt.stats``: what the last step did, readable without forcing a host sync.

Values that live on the device (the gradient norm, ⟨g,d⟩ of a step that did not search) are kept
as tensors and turned into floats only when read, so a training loop that never looks at the
statistics never waits for the GPU on non-search steps.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


class StepStats(Mapping):
    def __init__(self, **values):
        self._values = values

    def __getitem__(self, key):
        v = self._values[key]
        if isinstance(v, Tensor):
            v = bool(v) if v.dtype == torch.bool else float(v)
            self._values[key] = v
        return v

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def __repr__(self):
        return f"StepStats({dict(self.items())})"
