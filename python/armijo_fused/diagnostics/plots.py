"""PNG plots of the diagnostics (matplotlib's Agg renderer; pyplot and its global state unused).

- :func:`plot_spectra`: one panel per block, the SLQ density on a log scale with λ_max marked;
- :func:`plot_heterogeneity`: the matrix of pairwise Jensen–Shannon distances;
- :func:`plot_step_sizes`: accepted step size per block over the steps, with 1/λ_max per block
  (the largest stable gradient-descent step of a quadratic is 2/λ_max) as dashed lines;
- :func:`plot_grad_norms`: histogram of the gradient norms with the suggested clipping threshold.

Each returns the path it wrote.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

import numpy as np

__all__ = ["plot_spectra", "plot_heterogeneity", "plot_step_sizes", "plot_grad_norms"]

PathLike = Union[str, Path]


def _figure(w, h):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # matplotlib is an optional dependency
        raise ImportError("the diagnostics plots need matplotlib: pip install matplotlib") from e
    return Figure(figsize=(w, h), dpi=100)


def _save(fig, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_spectra(spectra: Mapping, path: PathLike, *, ncols: int = 4) -> Path:
    """Density of every block's Hessian spectrum (log scale), λ_max as a red dotted line."""
    names = list(spectra)
    if not names:
        raise ValueError("plot_spectra needs at least one spectrum")
    ncols = min(ncols, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = _figure(3.2 * ncols, 2.4 * nrows)
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        s = spectra[name]
        grid, dens = s.density()
        ax.semilogy(grid, np.maximum(dens, 1e-8 * max(dens.max(), 1e-300)), lw=1)
        ax.axvline(s.lambda_max, color="r", ls=":", lw=1)
        ax.set_title(f"{name} (n={s.dim})", fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_xlabel("eigenvalue", fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_heterogeneity(het, path: PathLike) -> Path:
    """The pairwise Jensen–Shannon distances between block spectra (0 = same density)."""
    k = len(het.names)
    size = max(4.0, 0.35 * k + 2.5)
    fig = _figure(size + 1, size)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(het.matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    fs = 7 if k <= 16 else 5
    ax.set_xticklabels(het.names, rotation=90, fontsize=fs)
    ax.set_yticklabels(het.names, fontsize=fs)
    ax.set_title(f"JS distance, score {het.score:.3f} ({het.normalize})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, path)


def block_lambda(lambda_max: dict, name: str):
    """λ_max of the spectra's block that a telemetry block ``name`` is: the same name, or the
    name without the `` (group k)`` the recorder adds where one layer spans several param
    groups (a weight-decay / no-decay split); None when no spectrum matches."""
    if name in lambda_max:
        return lambda_max[name]
    return lambda_max.get(re.sub(r" \(group \d+\)$", "", name))


def plot_step_sizes(telemetry, path: PathLike, *,
                    lambda_max: Optional[Mapping[str, float]] = None) -> Path:
    """Accepted step size per block (log scale) and 1/λ_max of the same block (dashed)."""
    if len(telemetry) == 0:
        raise ValueError("no steps recorded")
    fig = _figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    steps = telemetry.column("step")
    for i, (name, eta) in enumerate(telemetry.step_sizes().items()):
        color = f"C{i % 10}"
        ok = np.isfinite(eta) & (eta > 0)
        ax.semilogy(steps[ok], eta[ok], color=color, lw=1, label=name)
        lam = block_lambda(lambda_max or {}, name)
        if lam is not None and lam > 0:
            ax.axhline(1.0 / lam, color=color, ls="--", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("step size η (dashed: 1/λ_max)")
    if len(telemetry.block_names) <= 16:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def plot_grad_norms(telemetry, path: PathLike, *, percentile: float = 90.0,
                    threshold: Optional[float] = None) -> Path:
    """Histogram of the gradient norms; the suggested clip (percentile) and a given threshold."""
    g = telemetry.grad_norms
    g = g[np.isfinite(g)]
    if g.size == 0:
        raise ValueError("no finite gradient norm recorded")
    fig = _figure(6, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(g, bins=min(50, max(5, g.size // 4)), color="C0", alpha=0.8)
    clip = float(np.percentile(g, percentile))
    ax.axvline(clip, color="C1", ls="--", label=f"p{percentile:g} = {clip:.3g}")
    if threshold is not None:
        ax.axvline(threshold, color="C3", ls=":", label=f"threshold {threshold:g}")
    ax.set_xlabel("gradient norm")
    ax.set_ylabel("steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
