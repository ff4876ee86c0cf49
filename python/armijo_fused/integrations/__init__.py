"""Integrations with training frameworks; each imports its framework only when used.

* :mod:`armijo_fused.integrations.hf`: ``LineSearchTrainer`` for HuggingFace ``Trainer``.
* :mod:`armijo_fused.integrations.lightning`: ``ArmijoLightningMixin`` for PyTorch Lightning.
* :mod:`armijo_fused.integrations.distributed`: DDP / FSDP2 helpers.

Plain loops, nanoGPT / torchtitan-style loops and GradScaler need no integration: see
docs/integrations.md and examples/.
"""

from __future__ import annotations

__all__ = ["hf", "lightning", "distributed"]
