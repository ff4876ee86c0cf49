"""Backends: the same passes (first_pass, move, grad_sq_norm, trial_points) in torch, Triton and
C++.

``torch`` is the readable reference and the ground truth in tests; ``triton`` runs on CUDA tensors
(or on CPU tensors under ``TRITON_INTERPRET=1``, which is how CI tests it); ``cpp`` runs on CPU
tensors through the compiled extension ``armijo_fused._C``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "cpp", "torch")
#: dtypes the fused kernels take for the flat parameter buffer; anything else runs on torch.
FUSED_DTYPES = (torch.float32,)


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _cpp_usable(device: torch.device) -> bool:
    if device.type != "cpu":
        return False
    try:
        from .. import ops
    except ImportError:
        return False
    return ops.available()


def buffer_backend(name: str, buf) -> ModuleType:
    """:func:`resolve_backend` for a flat buffer: the passes work on ``buf.param``, the fp32
    master of a bf16/fp16 model's buffer."""
    return resolve_backend(name, buf.device,
                           torch.float32 if getattr(buf, "master", False) else buf.dtype,
                           getattr(buf, "rule", None))


def _implements(name: str, rule) -> bool:
    """Whether backend ``name`` has kernels for ``rule`` (its module's ``supports``; torch, the
    reference, runs every rule)."""
    if rule is None:
        return True
    module = importlib.import_module(f".{name}_backend", __name__)
    return getattr(module, "supports", lambda r: True)(rule)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype,
                    rule=None) -> ModuleType:
    """The backend module for one flat buffer.

    ``auto`` takes Triton on CUDA and C++ on CPU because each is the fused path of its device; it
    falls back to torch where neither applies (other devices, float64, an extension not built),
    silently, since torch gives the same results, only slower. A backend named explicitly that
    cannot run on the buffer is an error rather than a silent fallback.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    fused_ok = dtype in FUSED_DTYPES
    if name == "auto":
        if fused_ok and device.type == "cuda" and _triton_usable(device) \
                and _implements("triton", rule):
            name = "triton"
        elif fused_ok and _cpp_usable(device) and _implements("cpp", rule):
            name = "cpp"
        else:
            name = "torch"
    elif name != "torch":
        if not fused_ok:
            raise ValueError(
                f"backend={name!r} takes float32 parameters, got {dtype}; use backend='torch'"
            )
        usable = _triton_usable(device) if name == "triton" else _cpp_usable(device)
        if not usable:
            why = {
                "triton": "needs a CUDA device with triton installed (or TRITON_INTERPRET=1 on CPU)",
                "cpp": "needs CPU tensors and the compiled extension armijo_fused._C "
                "(pip install --no-build-isolation -e .)",
            }[name]
            raise RuntimeError(f"backend={name!r} cannot run on {device}: it {why}")
        if not _implements(name, rule):
            raise ValueError(f"backend={name!r} has no kernels for direction {rule.name!r} "
                             f"(rule_id {rule.rule_id}); use backend='torch' or 'auto'")
    return importlib.import_module(f".{name}_backend", __name__)
