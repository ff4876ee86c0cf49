r"""Lanczos, power iteration and Hutchinson's estimator on a symmetric operator (float64).

All three only need ``matvec(v) -> A v`` on flat float64 vectors of length ``dim``.

**Lanczos** with a unit start vector :math:`q_1` builds an orthonormal basis
:math:`Q_m = [q_1, \dots, q_m]` of the Krylov space :math:`\mathcal K_m(A, q_1)` in which
:math:`Q_m^\top A Q_m = T_m` is tridiagonal:

.. math::

    w = A q_j - \beta_{j-1} q_{j-1}, \quad \alpha_j = q_j^\top w, \quad
    w \leftarrow w - \alpha_j q_j, \quad \beta_j = \lVert w \rVert, \quad q_{j+1} = w / \beta_j .

In floating point the q_j lose orthogonality as Ritz values converge (ghost eigenvalues), so
every new w is re-orthogonalised against all previous q's, twice (classical Gram–Schmidt
applied twice is as accurate as modified Gram–Schmidt and runs as two matrix-vector products).
This keeps m vectors of length n in memory: 8·n·m bytes.

**Power iteration** :math:`v \leftarrow A v / \lVert A v \rVert` converges to the eigenvector of
the eigenvalue of largest magnitude at the rate :math:`|\lambda_2 / \lambda_1|`; the Rayleigh
quotient :math:`v^\top A v` estimates it (signed).

**Hutchinson**: for a probe z with :math:`\mathbb E[z z^\top] = I` (Rademacher ±1 or standard
Gaussian), :math:`\mathbb E[z^\top A z] = \operatorname{tr} A`. With Rademacher probes the
variance is :math:`2 \sum_{i \ne j} A_{ij}^2`, with Gaussian :math:`2 \lVert A \rVert_F^2`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["lanczos", "ritz", "power_iteration", "hutchinson_trace", "make_probe"]

MatVec = Callable[[Tensor], Tensor]


def make_probe(dim: int, kind: str, generator: torch.Generator, device=None) -> Tensor:
    """A random float64 vector with E[z zᵀ] = I: ``"rademacher"`` (±1) or ``"gaussian"``."""
    if kind == "rademacher":
        z = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int64)
        z = z.to(torch.float64).mul_(2).sub_(1)
    elif kind == "gaussian":
        z = torch.randn(dim, generator=generator, dtype=torch.float64)
    else:
        raise ValueError(f"invalid probe: {kind!r} (choose 'rademacher' or 'gaussian')")
    return z.to(device) if device is not None else z


def lanczos(matvec: MatVec, v0: Tensor, num_steps: int, *, reorthogonalize: bool = True,
            tol: float = 1e-10) -> tuple[Tensor, Tensor]:
    """``num_steps`` Lanczos steps from ``v0``; returns the diagonal α (m) and off-diagonal β (m-1).

    Stops early (m < num_steps) when β_j <= tol · ‖A‖ (estimate): the Krylov space is invariant
    and the Ritz values are exact eigenvalues.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    n = v0.numel()
    m = min(num_steps, n)
    q = v0.to(torch.float64).flatten()
    norm = float(q.norm())
    if norm == 0.0 or not math.isfinite(norm):
        raise ValueError("the Lanczos start vector must be nonzero and finite")
    q = q / norm
    basis = torch.empty((m, n), dtype=torch.float64, device=q.device)
    alphas, betas = [], []
    beta, q_prev, scale = 0.0, None, 0.0
    for j in range(m):
        basis[j] = q
        w = matvec(q).to(torch.float64)
        if not torch.isfinite(w).all():
            raise FloatingPointError("the Hessian-vector product is not finite")
        alpha = float(q @ w)
        w = w - alpha * q
        if q_prev is not None:
            w = w - beta * q_prev
        if reorthogonalize:
            for _ in range(2):
                w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        alphas.append(alpha)
        beta = float(w.norm())
        scale = max(scale, abs(alpha), beta)
        if j == m - 1 or beta <= tol * max(scale, 1e-300):
            break
        betas.append(beta)
        q_prev, q = q, w / beta
    return (torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64))


def ritz(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    r"""Ritz values θ_k (eigenvalues of T) and Gauss quadrature weights τ_k = (e_1ᵀ y_k)².

    For a unit start vector q, :math:`q^\top g(A) q \approx \sum_k \tau_k g(\theta_k)`, exact
    for polynomials of degree < 2m (Golub–Meurant); the weights sum to 1.
    """
    t = torch.diag(alpha)
    if beta.numel():
        t = t + torch.diag(beta, 1) + torch.diag(beta, -1)
    vals, vecs = torch.linalg.eigh(t)
    return vals, vecs[0].square()


def power_iteration(matvec: MatVec, dim: int, *, iters: int = 100, tol: float = 1e-5,
                    seed: int = 0, device=None) -> tuple[float, int]:
    """The eigenvalue of largest magnitude (signed Rayleigh quotient) and the iterations used.

    Stops when the Rayleigh quotient changes by less than ``tol`` relative to its size.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    gen = torch.Generator().manual_seed(seed)
    v = make_probe(dim, "gaussian", gen, device)
    v = v / v.norm()
    eig, it = 0.0, 0
    for it in range(1, iters + 1):
        w = matvec(v).to(torch.float64)
        new = float(v @ w)
        norm = float(w.norm())
        if norm == 0.0:
            return 0.0, it
        v = w / norm
        if it > 1 and abs(new - eig) <= tol * max(abs(new), 1e-30):
            eig = new
            break
        eig = new
    return eig, it


def hutchinson_trace(matvec: MatVec, dim: int, *, num_samples: int = 16,
                     probe: str = "rademacher", seed: int = 0, device=None,
                     generator: Optional[torch.Generator] = None) -> tuple[float, float]:
    """Hutchinson's estimate of tr A and its standard error (std of the samples / √samples)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    gen = generator or torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(num_samples):
        z = make_probe(dim, probe, gen, device)
        samples.append(float(z @ matvec(z).to(torch.float64)))
    s = torch.tensor(samples, dtype=torch.float64)
    err = float(s.std() / math.sqrt(num_samples)) if num_samples > 1 else math.inf
    return float(s.mean()), err
