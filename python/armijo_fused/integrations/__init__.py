"""Integrations with training frameworks; each imports its framework only when used.

* :mod:`armijo_fused.integrations.hf`: ``LineSearchTrainer`` for HuggingFace ``Trainer``.
* :mod:`armijo_fused.integrations.lightning`: ``ArmijoLightningMixin`` for PyTorch Lightning.
* :mod:`armijo_fused.integrations.distributed`: DDP / FSDP2 helpers.
* :func:`armijo_optimizer`: the optimizer inside a framework's wrapper (accelerate, Lightning).

Plain loops, nanoGPT / torchtitan-style loops and GradScaler need no integration: see
docs/integrations.md and examples/.
"""

from __future__ import annotations


def armijo_optimizer(optimizer):
    """The armijo_fused optimizer inside wrappers that keep it as ``.optimizer`` (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``), or None if there is none."""
    from ..optimizers.base import ArmijoOptimizer

    seen = 0
    while optimizer is not None and not isinstance(optimizer, ArmijoOptimizer) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, ArmijoOptimizer) else None


__all__ = ["armijo_optimizer", "hf", "lightning", "distributed"]
