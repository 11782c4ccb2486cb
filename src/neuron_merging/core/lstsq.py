"""Least-squares compensation: a dense mix of the kept channels replaces the pruned ones.

The consumer sees ``a`` (the ``n`` channels of the producer after its
channel-wise ops). Keeping ``K`` and writing every channel as
``a ≈ mix·a_K + δ`` turns the consumer's weight into ``W' = W·mix`` (per input
channel) and moves ``W·δ`` into the consumer's bias or the running mean of the
batch norm after it. The best ``mix`` in mean square is the regression of the
pruned channels on the kept ones::

    mix_K = I,   mix_P = C_PK (C_KK + ridge·diag(C_KK))⁻¹,   δ = E[a] − mix·E[a_K]

with ``C`` the covariance of ``a`` (the same solution minimises the consumer's
output error for any consumer weights when the spatial correlations of ``a``
are the same for every channel pair). The paper's merge is the sparse special
case ``mix[pruned_j, partner_j] = scale_j`` with ``δ = 0``; the mean repair is
the case ``mix`` = the merge's, ``δ = E[a] − mix·E[a_K]``.

``C`` and ``E[a]`` come from data when the caller passes calibration images, or
from the Gaussian model of :mod:`.moments` without data: ``z ~ N(β, diag(γ)·R·diag(γ))``
after batch norm, with the correlation ``R`` either

* ``"whitened"``: the cosines of the producer's filters signed by ``γ`` (the
  producer's input taken as white noise), or
* ``"propagated"``: measured on the network's own response to Gaussian noise
  images in which every batch norm normalises with the statistics of the noise
  batch, so each channel keeps its data-set mean and scale (``β``, ``γ``)
  and the correlations come from the network's weights acting on the
  correlated channels of the layer before.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .moments import relu_cross_moments, relu_mean


def gaussian_moments(beta: Tensor, scale: Tensor, corr: Tensor) -> tuple[Tensor, Tensor]:
    """``(E[a], Cov(a))`` of ``a = relu(z)``, ``z ~ N(beta, diag(scale)·corr·diag(scale))``.

    A negative ``scale`` (negative ``γ``) flips the sign of its channel's
    correlations; the caller passes ``|γ|`` and signs ``corr`` accordingly.
    """
    mean = relu_mean(beta.to(torch.float64), scale.to(torch.float64).abs())
    second = relu_cross_moments(beta, scale.abs(), corr)
    return mean, second - mean[:, None] * mean[None, :]


def whitened_correlation(rows: Tensor, gamma: Tensor) -> Tensor:
    """Correlation of BN outputs when the producer's input is white: signed filter cosines."""
    r = rows.to(torch.float64)
    norm = torch.linalg.vector_norm(r, dim=1).clamp_min(1e-300)
    cos = (r @ r.T) / norm[:, None] / norm[None, :]
    sign = torch.sign(gamma.to(torch.float64))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    out = cos * sign[:, None] * sign[None, :]
    out.diagonal().fill_(1.0)
    return out


def solve_mix(cov: Tensor, mean: Tensor, kept: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """``(mix (n, k), δ (n,))`` of the regression of every channel on the kept ones.

    ``ridge`` is relative to the mean diagonal of ``C_KK`` (1e-3: a thousandth
    of the average kept-channel variance), so it is scale-free; the normal
    equations are solved in float64 by Cholesky.
    """
    c = cov.to(torch.float64)
    k = kept.numel()
    ckk = c[kept][:, kept]
    lift = ridge * float(ckk.diagonal().mean().clamp_min(1e-300))
    system = ckk + lift * torch.eye(k, dtype=torch.float64)
    rhs = c[:, kept]  # (n, k): C_{:,K}
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        coef = torch.linalg.lstsq(system, rhs.T).solution.T
    else:
        coef = torch.cholesky_solve(rhs.T, chol).T  # (n, k)
    mix = coef
    mix[kept] = torch.eye(k, dtype=torch.float64)
    delta = mean.to(torch.float64) - mix @ mean.to(torch.float64)[kept]
    return mix, delta


def mix_from_partners(
    n: int, kept: Tensor, pruned: Tensor, partner: Tensor, scale: Tensor
) -> Tensor:
    """The paper's merge as a dense ``(n, k)`` mix (one entry per merged pruned neuron)."""
    k = kept.numel()
    mix = torch.zeros(n, k, dtype=torch.float64)
    mix[kept, torch.arange(k)] = 1.0
    ok = partner >= 0
    mix[pruned[ok], partner[ok]] = scale[ok].to(torch.float64)
    return mix


def lstsq_select(cov: Tensor, colgram: Tensor, k: int, start: Tensor | None = None) -> Tensor:
    """Kept set by greedy backward elimination of the least-squares compensation error.

    With ``G`` the Gram of the consumer's columns (``G_pq = Σ W[:, p]·W[:, q]``
    over outputs and kernel positions) and ``C`` the input covariance, the error
    left after the best mix on ``K`` is ``tr(G·C) − tr(C_KK⁻¹·(C·G·C)_KK)``.
    Starting from every channel (or ``start``), the channel whose removal lowers
    the explained part least is dropped, one at a time, all candidates scored in
    one batched solve. Returns ascending indices.
    """
    c = cov.to(torch.float64)
    n = c.shape[0]
    a = c @ colgram.to(torch.float64) @ c
    lift = 1e-6 * float(c.diagonal().mean().clamp_min(1e-300))
    keep = torch.arange(n) if start is None else start.clone()
    while keep.numel() > k:
        m = keep.numel()
        ckk = c[keep][:, keep] + lift * torch.eye(m, dtype=torch.float64)
        akk = a[keep][:, keep]
        # Remove candidate j: explained(K\j) = explained(K) − (x_j^T A x_j ...) via the
        # inverse: for S = C_KK⁻¹, tr(S_{-j} A_{-j}) = tr(S A) − (e_j^T S A S e_j)/S_jj.
        s = torch.linalg.inv(ckk)
        sas = s @ akk @ s
        loss = sas.diagonal() / s.diagonal().clamp_min(1e-300)
        drop = int(torch.argmin(loss))
        keep = torch.cat([keep[:drop], keep[drop + 1 :]])
    return torch.sort(keep).values
