"""Selection: which neurons of a producer are kept.

A criterion maps the producer's weight rows ``(n, f)`` (one row per output
neuron or filter) to ``n`` scores; the neurons with the highest scores are kept.
Criteria are pluggable through :func:`register_criterion`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .errors import ConfigError

CriterionFn = Callable[[Tensor], Tensor]

#: Upper bound on the elements of one temporary distance block (float64).
_GM_BLOCK_ELEMENTS = 1 << 24


def l1_norm(rows: Tensor) -> Tensor:
    """Score = ℓ1 norm of each row (Li et al., "Pruning Filters for Efficient ConvNets")."""
    return rows.abs().sum(dim=1)


def l2_norm(rows: Tensor) -> Tensor:
    """Score = ℓ2 norm of each row."""
    return torch.linalg.vector_norm(rows, dim=1)


def l2_geometric_median(rows: Tensor) -> Tensor:
    """Score = sum of Euclidean distances to every other row (FPGM).

    Rows nearest the geometric median have the smallest sums and are the most
    replaceable, so they are pruned first. The ``n × n`` distance matrix is
    computed in row blocks, so memory stays bounded for wide layers.
    """
    x = rows.to(torch.float64)
    n = x.shape[0]
    sq = (x * x).sum(dim=1)
    block = max(1, _GM_BLOCK_ELEMENTS // max(n, 1))
    sums = torch.empty(n, dtype=torch.float64, device=x.device)
    for start in range(0, n, block):
        part = x[start : start + block]
        d2 = sq[start : start + block, None] + sq[None, :] - 2.0 * (part @ x.T)
        sums[start : start + block] = d2.clamp_min_(0.0).sqrt_().sum(dim=1)
    return sums


_CRITERIA: dict[str, CriterionFn] = {
    "l1-norm": l1_norm,
    "l2-norm": l2_norm,
    "l2-GM": l2_geometric_median,
}


def register_criterion(name: str, fn: CriterionFn, *, overwrite: bool = False) -> None:
    """Make ``fn`` available as ``criterion=name``.

    ``fn(rows)`` receives the ``(n, f)`` weight rows (``[w | b]`` for a producer
    with bias and no batch norm) and returns ``n`` scores; higher is kept.
    """
    if not overwrite and name in _CRITERIA:
        raise ConfigError(f"criterion {name!r} is already registered")
    _CRITERIA[name] = fn


def available_criteria() -> list[str]:
    """Names accepted as ``criterion=``."""
    return list(_CRITERIA)


def get_criterion(name: str) -> CriterionFn:
    """Look up a registered criterion by name."""
    try:
        return _CRITERIA[name]
    except KeyError:
        raise ConfigError(
            f"unknown criterion {name!r}; choose one of {', '.join(_CRITERIA)}"
        ) from None


def select_kept(rows: Tensor, keep: int, criterion: str | CriterionFn) -> Tensor:
    """Indices (ascending) of the ``keep`` rows with the highest criterion scores.

    Ties are broken towards the lower index, so the choice is deterministic.
    """
    fn = get_criterion(criterion) if isinstance(criterion, str) else criterion
    n = rows.shape[0]
    if not 0 < keep <= n:
        raise ConfigError(f"cannot keep {keep} of {n} neurons")
    scores = fn(rows.detach())
    if scores.shape != (n,):
        raise ConfigError(
            f"criterion returned scores of shape {tuple(scores.shape)}, expected ({n},)"
        )
    scores = torch.nan_to_num(scores.to(torch.float64), nan=float("-inf"))
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    return torch.sort(order).values
