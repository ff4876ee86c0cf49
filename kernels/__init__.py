"""Triton kernels of armijo_fused (installed as ``armijo_fused.kernels``).

No ``from __future__ import annotations`` in these modules: it turns ``BLOCK_SIZE: tl.constexpr``
into the string ``"tl.constexpr"``, which Triton 3.0's interpreter does not take for a constexpr
(it then passed every tile size as a runtime value and ``tl.arange`` refused it).
"""
