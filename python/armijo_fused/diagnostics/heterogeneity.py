r"""Block heterogeneity: how different the Hessian spectra of a model's blocks are.

Zhang et al. (2024, "Why Transformers Need Adam: A Hessian Perspective") observe that the diagonal
Hessian blocks of a transformer have very different spectra, those of a CNN / MLP similar ones,
and that this is where a single step size (SGD) fails and per-block step sizes help. The score:

1. every block's density φ_b (SLQ, Gaussian-broadened) is evaluated on one common grid and
   normalised to a probability vector :math:`p_b` (``normalize`` first rescales the eigenvalues:
   ``"none"`` keeps them raw, ``"max_abs"`` divides block b's by its own max |λ| so only the
   *shape* of the spectra is compared);
2. the Jensen–Shannon distance between two blocks is

   .. math::

       d_{JS}(p, q) = \sqrt{\tfrac12 \mathrm{KL}(p \,\|\, m) + \tfrac12 \mathrm{KL}(q \,\|\, m)},
       \qquad m = \tfrac12 (p + q),

   with base-2 logarithms, so :math:`0 \le d_{JS} \le 1` and it is a metric;
3. the heterogeneity score is the mean of :math:`d_{JS}` over all pairs of blocks.

Two cheap proxies come along: the spread of the per-block top eigenvalue and of the trace per
dimension :math:`\operatorname{tr}(H_{bb}) / n_b` — the standard deviation of their log10 over
blocks (blocks whose value is not positive are left out of the log).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .slq import Spectrum

__all__ = ["Heterogeneity", "heterogeneity", "js_distance"]


def js_distance(p, q) -> float:
    """Jensen–Shannon distance (base 2, in [0, 1]) of two nonnegative vectors (normalised here)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"js_distance needs vectors of one shape, got {p.shape} and {q.shape}")
    if not (np.isfinite(p).all() and np.isfinite(q).all()):  # (NaN read as "identical": 0.0)
        raise ValueError("js_distance needs finite vectors")
    if (p < 0).any() or (q < 0).any() or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("js_distance needs nonnegative vectors with positive mass")
    p, q = p / p.sum(), q / q.sum()
    s = p + q

    def kl(a):  # KL(a || m) with m = s / 2, written as a·log2(2a / s): no underflow of m
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(2.0 * a[nz] / s[nz])))

    return math.sqrt(min(1.0, max(0.0, 0.5 * kl(p) + 0.5 * kl(q))))


@dataclass
class Heterogeneity:
    """The score, the pairwise distance matrix and the proxies."""

    score: float
    names: list
    matrix: np.ndarray
    normalize: str
    grid: np.ndarray
    densities: np.ndarray  # (blocks, grid points), each row sums to 1
    top_eigenvalues: dict = field(default_factory=dict)
    trace_per_dim: dict = field(default_factory=dict)
    top_spread: float = float("nan")
    trace_spread: float = float("nan")

    def to_dict(self) -> dict:
        return {
            "score": self.score, "names": list(self.names), "matrix": self.matrix.tolist(),
            "normalize": self.normalize, "top_eigenvalues": self.top_eigenvalues,
            "trace_per_dim": self.trace_per_dim, "top_spread": self.top_spread,
            "trace_spread": self.trace_spread,
        }


def _log_spread(values) -> float:
    logs = [math.log10(v) for v in values if v > 0 and math.isfinite(v)]
    return float(np.std(logs)) if len(logs) >= 2 else float("nan")


def heterogeneity(spectra: Mapping[str, Spectrum], *, normalize: str = "max_abs",
                  num_points: int = 512, sigma: float = 0.05) -> Heterogeneity:
    """Mean pairwise Jensen–Shannon distance between the blocks' spectral densities.

    Args:
        spectra: ``{block: Spectrum}`` (from :func:`~.spectra.block_spectra`), at least 2.
        normalize ("none" | "max_abs"): rescale each block's eigenvalues before comparing:
            raw, or by the block's own max |λ| (default: "max_abs").
        num_points (int): grid points (default: 512).
        sigma (float): Gaussian broadening as a fraction of the common grid's half-width
            max |λ| over all (rescaled) blocks; wide enough that a few dozen Ritz values per
            block make a smooth density (default: 0.05).
    """
    if normalize not in ("none", "max_abs"):
        raise ValueError(f"invalid normalize: {normalize!r} (choose 'none' or 'max_abs')")
    names = list(spectra)
    if len(names) < 2:
        raise ValueError(f"heterogeneity needs at least 2 blocks, got {len(names)}")
    if not 0 < sigma < 1:
        raise ValueError(f"sigma must be in (0, 1) (a fraction of the grid), got {sigma}")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"num_points must be an int >= 2 (the density's grid), got "
                         f"{num_points!r}")
    scales = []
    for n in names:
        s = spectra[n].max_abs if normalize == "max_abs" else 1.0
        scales.append(s if s > 0 else 1.0)  # an all-zero block stays a spike at 0
    half = max(max(abs(spectra[n].ritz_min), abs(spectra[n].ritz_max)) / sc
               for n, sc in zip(names, scales))
    half = half if half > 0 else 1.0
    width = sigma * half
    grid = np.linspace(-half - 4 * width, half + 4 * width, num_points)
    dens = np.stack([spectra[n].density(grid, sigma=width, scale=sc)[1]
                     for n, sc in zip(names, scales)])
    dens = np.maximum(dens, 0.0)
    dens /= dens.sum(axis=1, keepdims=True)
    k = len(names)
    mat = np.zeros((k, k))
    for i in range(k):
        for j in range(i + 1, k):
            mat[i, j] = mat[j, i] = js_distance(dens[i], dens[j])
    score = float(mat[np.triu_indices(k, 1)].mean())
    tops = {n: spectra[n].lambda_max for n in names}
    tpd = {n: spectra[n].trace_estimate / spectra[n].dim for n in names}
    return Heterogeneity(
        score=score, names=names, matrix=mat, normalize=normalize, grid=grid, densities=dens,
        top_eigenvalues=tops, trace_per_dim=tpd, top_spread=_log_spread(tops.values()),
        trace_spread=_log_spread(tpd.values()),
    )
