"""Triton kernels of armijo_fused (installed as ``armijo_fused.kernels``)."""
