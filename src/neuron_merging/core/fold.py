"""Folding: k-means of a group's neurons in the merge's distance, each cluster → one neuron.

Re-derived from the description of Model Folding (Wang et al., ICLR 2025). Each
neuron ``n`` of a producer is a vector ``v_n`` whose positive multiples are
exactly mergeable (see :func:`neuron_merging.core.lstsq.merge_vectors`: the
``[w | b]`` row without batch norm, the effective affine row
``[γ·w/σ | β − γ·μ/σ]`` with it). Spherical k-means clusters the unit vectors
(cosine distance, the merge's own distance); each cluster ``m`` is replaced by
its centroid ``c_m`` (the mean of its members' vectors) and every member by
``s_n·c_m`` with the least-squares scale ``s_n = v_n·c_m / ‖c_m‖²``. The
consumer's column of ``m`` becomes ``Σ_n s_n·W[:, n]``. When each cluster holds
positive multiples of one vector, ``s_n·c_m = v_n`` and the fold is lossless
(ReLU commutes with positive scales).

Everything is vectorised over neurons; only the Lloyd iterations loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Fold:
    """A folding of ``n`` neurons into ``k``.

    Attributes:
        assign: ``(n,)`` cluster of every neuron.
        alpha: ``(k, n)`` centroid coefficients (``c_m = Σ_n alpha[m, n]·v_n``).
        scale: ``(n,)`` factor of each neuron's consumer column in its cluster's
            column (0: the neuron is dropped, e.g. it points away from its centroid).
        seeds: ``(k,)`` the neuron each cluster was seeded with (for reports).
    """

    assign: Tensor
    alpha: Tensor
    scale: Tensor
    seeds: Tensor


def _unit(v: Tensor) -> Tensor:
    norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
    return v / torch.where(norm > 0, norm, torch.ones_like(norm))


def kmeans_fold(
    vectors: Tensor,
    seeds: Tensor,
    *,
    iters: int = 30,
    threshold: float | None = None,
) -> Fold:
    """Fold the ``(n, f)`` ``vectors`` into ``k = len(seeds)`` clusters (float64).

    The clusters are seeded with the neurons ``seeds`` (the kept set of the
    configured selection, so folding composes with every criterion and
    selection and is deterministic), then refined by at most ``iters`` Lloyd
    steps of spherical k-means; a seed never leaves its cluster, so none is
    empty. A member whose cosine to its centroid is below ``threshold`` (or not
    positive) gets scale 0 and is left out of the centroid.
    """
    v = vectors.to(torch.float64)
    n, k = v.shape[0], seeds.numel()
    unit = _unit(v)
    centers = unit[seeds].clone()
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = (unit @ centers.T).argmax(dim=1)
        new[seeds] = torch.arange(k)  # a seed never leaves its cluster: none is empty
        if torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros(k, v.shape[1], dtype=torch.float64).index_add_(0, assign, unit)
        centers = _unit(sums)
    cos = (unit * centers[assign]).sum(dim=1)
    limit = 0.0 if threshold is None else max(float(threshold), 0.0)
    member = (cos > limit) | (torch.arange(n).unsqueeze(1) == seeds).any(dim=1)
    ones = torch.ones(int(member.sum()), dtype=torch.float64)
    count = torch.zeros(k, dtype=torch.float64).index_add_(0, assign[member], ones)
    alpha = torch.zeros(k, n, dtype=torch.float64)
    idx = member.nonzero().squeeze(1)
    alpha[assign[idx], idx] = 1.0 / count[assign[idx]]
    centroid = alpha @ v
    c = centroid[assign]
    scale = (v * c).sum(dim=1) / (c * c).sum(dim=1).clamp_min(1e-300)
    scale = torch.where(member & (scale > 0), scale, torch.zeros_like(scale))
    return Fold(assign, alpha, scale, seeds)
