r"""Stochastic Lanczos quadrature (SLQ): the eigenvalue density of a symmetric operator.

The spectral density of an n×n symmetric A with eigenvalues λ_i is
:math:`\phi(t) = \frac1n \sum_i \delta(t - \lambda_i)`. For a probe z with
:math:`\mathbb E[zz^\top] = I` and :math:`q = z / \lVert z \rVert`,
:math:`\mathbb E[q^\top g(A) q] \approx \frac1n \operatorname{tr} g(A) = \int g\,\phi`, and m
Lanczos steps from q give the Gauss quadrature :math:`q^\top g(A) q \approx \sum_k \tau_k
g(\theta_k)` (Ritz values θ_k, weights τ_k, see :func:`~.lanczos.ritz`). Averaging over P probes,

.. math::

    \phi(t) \approx \frac1P \sum_{p=1}^{P} \sum_{k=1}^{m} \tau_{pk}\,
        \mathcal N\!\left(t;\ \theta_{pk},\ \sigma^2\right)

(Gaussian broadening of width σ, Ghorbani et al. 2019). Moments need no broadening:
:math:`\int t^j \phi \approx \frac1P\sum_p\sum_k \tau_{pk}\theta_{pk}^j`, exact per probe for
j < 2m, so the first two moments estimate tr(A)/n and tr(A²)/n with only the probe's sampling
error. The extreme Ritz values converge first, so ``max θ`` is already a sharp estimate of
λ_max after a few dozen steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .lanczos import hutchinson_trace, lanczos, make_probe, power_iteration, ritz

__all__ = ["Spectrum", "slq", "estimate_spectrum"]


@dataclass
class Spectrum:
    """An SLQ estimate of one operator's spectrum (one block, or the whole model).

    Attributes:
        dim: n, the operator's size.
        nodes: Ritz values per probe (list of 1-D arrays; shorter when Lanczos ended early).
        weights: their quadrature weights (each array sums to 1).
        top_eigenvalue: the largest-magnitude eigenvalue by power iteration (None if not run).
        trace: Hutchinson's estimate of tr A (None if not run); ``trace_stderr`` its error.
        name: a label (block name).
    """

    dim: int
    nodes: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    top_eigenvalue: Optional[float] = None
    trace: Optional[float] = None
    trace_stderr: Optional[float] = None
    name: str = ""

    # -- moments and extremes -------------------------------------------------------------------
    def moment(self, k: int) -> float:
        """∫ t^k φ(t) dt ≈ tr(A^k) / n."""
        vals = [float(np.sum(w * t**k)) for t, w in zip(self.nodes, self.weights)]
        return float(np.mean(vals))

    @property
    def slq_trace(self) -> float:
        """n · ∫ t φ: the trace from the SLQ probes (the Hutchinson estimate on the same probes)."""
        return self.dim * self.moment(1)

    @property
    def ritz_max(self) -> float:
        return float(max(np.max(t) for t in self.nodes))

    @property
    def ritz_min(self) -> float:
        return float(min(np.min(t) for t in self.nodes))

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue: the larger of the top Ritz value and the power iteration's
        estimate when that one is positive (both are lower bounds up to round-off)."""
        best = self.ritz_max
        if self.top_eigenvalue is not None and self.top_eigenvalue > best:
            best = self.top_eigenvalue
        return best

    @property
    def max_abs(self) -> float:
        """max |λ| from the Ritz values (and the power iteration when run)."""
        m = max(abs(self.ritz_max), abs(self.ritz_min))
        if self.top_eigenvalue is not None:
            m = max(m, abs(self.top_eigenvalue))
        return m

    @property
    def trace_estimate(self) -> float:
        """Hutchinson's trace when computed, else the SLQ one."""
        return self.trace if self.trace is not None else self.slq_trace

    # -- the density ----------------------------------------------------------------------------
    def density(self, grid=None, *, sigma: Optional[float] = None, num_points: int = 400,
                scale: float = 1.0):
        """``(grid, φ(grid))``: the Gaussian-broadened density (integrates to ~1).

        ``scale`` divides the eigenvalues first (normalised spectra); ``grid`` defaults to the
        Ritz range padded by 5σ.
        """
        if sigma is not None and not sigma > 0:  # (a negative width gave a negative density)
            raise ValueError(f"density: sigma must be > 0, got {sigma!r}")
        if not scale > 0:
            raise ValueError(f"density: scale must be > 0, got {scale!r}")
        if grid is None and not (isinstance(num_points, int) and num_points >= 2):
            raise ValueError(f"density: num_points must be an integer >= 2, got {num_points!r}")
        nodes = [np.asarray(t, dtype=np.float64) / scale for t in self.nodes]
        if sigma is None:
            lo, hi = min(t.min() for t in nodes), max(t.max() for t in nodes)
            sigma = max(hi - lo, max(abs(lo), abs(hi)) * 1e-3, 1e-12) / 100.0
        if grid is None:
            lo, hi = min(t.min() for t in nodes), max(t.max() for t in nodes)
            grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points)
        grid = np.asarray(grid, dtype=np.float64)
        dens = np.zeros_like(grid)
        for t, w in zip(nodes, self.weights):
            z = (grid[:, None] - t[None, :]) / sigma
            dens += (np.exp(-0.5 * z * z) * w[None, :]).sum(axis=1)
        dens /= len(nodes) * sigma * math.sqrt(2 * math.pi)
        return grid, dens

    # -- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "name": self.name, "dim": self.dim,
            "nodes": [np.asarray(t).tolist() for t in self.nodes],
            "weights": [np.asarray(w).tolist() for w in self.weights],
            "top_eigenvalue": self.top_eigenvalue, "trace": self.trace,
            "trace_stderr": self.trace_stderr,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Spectrum:
        return cls(dim=int(d["dim"]), nodes=[np.asarray(t, dtype=np.float64) for t in d["nodes"]],
                   weights=[np.asarray(w, dtype=np.float64) for w in d["weights"]],
                   top_eigenvalue=d.get("top_eigenvalue"), trace=d.get("trace"),
                   trace_stderr=d.get("trace_stderr"), name=d.get("name", ""))


def slq(matvec, dim: int, *, num_probes: int = 4, num_steps: int = 30,
        probe: str = "rademacher", seed: int = 0, device=None, name: str = "") -> Spectrum:
    """Ritz values and weights of ``num_probes`` Lanczos runs (full re-orthogonalisation)."""
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    gen = torch.Generator().manual_seed(seed)
    spec = Spectrum(dim=dim, name=name)
    for _ in range(num_probes):
        z = make_probe(dim, probe, gen, device)
        alpha, beta = lanczos(matvec, z, num_steps)
        theta, tau = ritz(alpha, beta)
        spec.nodes.append(theta.cpu().numpy())
        spec.weights.append(tau.cpu().numpy())
    return spec


def estimate_spectrum(op, *, num_probes: int = 4, num_steps: int = 30, probe: str = "rademacher",
                      seed: int = 0, power_iters: int = 0, power_tol: float = 1e-4,
                      trace_samples: int = 0, name: str = "") -> Spectrum:
    """SLQ on an operator with ``op.dim`` and ``op(v)`` (a :class:`~.hvp.HessianOperator`),
    plus the power-iteration top eigenvalue (``power_iters > 0``) and Hutchinson's trace
    (``trace_samples > 0``)."""
    device = getattr(op, "device", None)
    spec = slq(op, op.dim, num_probes=num_probes, num_steps=num_steps, probe=probe, seed=seed,
               device=device, name=name)
    if power_iters > 0:
        spec.top_eigenvalue, _ = power_iteration(op, op.dim, iters=power_iters, tol=power_tol,
                                                 seed=seed + 1, device=device)
    if trace_samples > 0:
        spec.trace, spec.trace_stderr = hutchinson_trace(
            op, op.dim, num_samples=trace_samples, probe=probe, seed=seed + 2, device=device)
    return spec
