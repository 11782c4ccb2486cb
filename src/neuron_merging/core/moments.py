"""Closed-form moments of rectified Gaussians (the data-free model of a ReLU input).

The data-free methods take the pre-activation of every channel after its batch
norm to be Gaussian, ``z_c ~ N(β_c, γ_c²)`` (batch norm standardises the
producer's output over the training data, then applies ``γ`` and ``β``), and the
consumer's input to be ``a = relu(z)``. Under that model:

* ``E[relu(z)] = m·Φ(m/s) + s·φ(m/s)`` and
  ``E[relu(z)²] = (m² + s²)·Φ(m/s) + m·s·φ(m/s)`` exactly;
* the cross moment ``E[relu(z_i)·relu(z_j)]`` of a bivariate Gaussian with
  correlation ``ρ`` (the arc-cosine kernel, with means) is one integral over
  ``u`` of ``relu(m_i + s_i·u)·E[relu(z_j) | u]``; the inner expectation is the
  closed form above, and the outer integral is computed with Gauss–Legendre
  nodes on the half-line where ``relu(m_i + s_i·u) > 0`` (truncated at 10
  standard deviations), vectorised over all pairs.

What the model assumes, and how far it holds on real networks, is measured in
``docs/quality.md`` (the marginals are close to Gaussian after BN; the channel
correlations are the hard part).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
#: Gauss–Legendre nodes of the outer integral; 48 give ~1e-9 relative error.
_NODES = 48
#: The outer integral is truncated this many standard deviations above its start.
_SPAN = 10.0


def _phi(x: Tensor) -> Tensor:
    return torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / _SQRT2))


def relu_mean(m: Tensor, s: Tensor) -> Tensor:
    """``E[relu(z)]`` for ``z ~ N(m, s²)`` (``s ≥ 0``; ``s = 0`` gives ``relu(m)``)."""
    safe = torch.where(s > 0, s, torch.ones_like(s))
    t = m / safe
    out = m * _cdf(t) + safe * _phi(t)
    return torch.where(s > 0, out, m.clamp_min(0.0))


def relu_second(m: Tensor, s: Tensor) -> Tensor:
    """``E[relu(z)²]`` for ``z ~ N(m, s²)``."""
    safe = torch.where(s > 0, s, torch.ones_like(s))
    t = m / safe
    out = (m * m + safe * safe) * _cdf(t) + m * safe * _phi(t)
    return torch.where(s > 0, out, m.clamp_min(0.0) ** 2)


def _legendre(n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(n)
    return torch.tensor(x, dtype=dtype), torch.tensor(w, dtype=dtype)


def relu_cross_moments(m: Tensor, s: Tensor, corr: Tensor) -> Tensor:
    """``E[relu(z_i)·relu(z_j)]`` for all pairs, ``z ~ N(m, diag(s)·corr·diag(s))``.

    ``m`` and ``s`` are ``(n,)``, ``corr`` is ``(n, n)`` (clamped to ``[-1, 1]``).
    Computed in float64; the diagonal is the exact :func:`relu_second`.
    """
    m64, s64 = m.to(torch.float64), s.to(torch.float64).clamp_min(1e-12)
    rho = corr.to(torch.float64).clamp(-1.0, 1.0)
    x, w = _legendre(_NODES, torch.float64)
    t0 = (-m64 / s64).clamp(min=-_SPAN)  # relu(m_i + s_i u) > 0 for u > t0
    half = 0.5 * (_SPAN - t0.clamp(max=_SPAN)).clamp_min(0.0) + 1e-12
    u = t0[:, None] + half[:, None] * (x[None, :] + 1.0)  # (n, Q) nodes per i
    weight = half[:, None] * w[None, :] * _phi(u)  # quadrature weight × density
    outer = (m64[:, None] + s64[:, None] * u).clamp_min(0.0) * weight  # (n, Q)
    # E[relu(z_j) | u] with z_j | u ~ N(m_j + s_j ρ_ij u, s_j² (1 − ρ_ij²))
    cond_m = m64[None, :, None] + s64[None, :, None] * rho[:, :, None] * u[:, None, :]
    cond_s = s64[None, :, None] * torch.sqrt((1.0 - rho * rho).clamp_min(0.0))[:, :, None]
    inner = relu_mean(cond_m, cond_s.expand_as(cond_m))  # (n_i, n_j, Q)
    out = (inner * outer[:, None, :]).sum(dim=2)
    out = 0.5 * (out + out.T)
    out.diagonal().copy_(relu_second(m64, s64))
    return out
