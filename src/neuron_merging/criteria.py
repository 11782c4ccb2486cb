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
_GM_BLOCK_ELEMENTS = 1 << 23
#: Rows are converted to float64 all at once up to this many elements (256 MB);
#: beyond it, in chunks of ``_GM_CHUNK_ELEMENTS``, so memory stays bounded.
_GM_WHOLE_ELEMENTS = 1 << 25
_GM_CHUNK_ELEMENTS = 1 << 22


#: Upper bound on the elements of the temporary ``|rows|`` block of :func:`l1_norm`.
_L1_CHUNK_ELEMENTS = 1 << 22


def l1_norm(rows: Tensor) -> Tensor:
    """Score = ℓ1 norm of each row (Li et al., "Pruning Filters for Efficient ConvNets").

    Computed in blocks of rows, so the temporary ``|rows|`` stays small.
    """
    width = rows[0].numel() if rows.shape[0] else 1
    chunk = max(1, _L1_CHUNK_ELEMENTS // max(width, 1))
    if rows.shape[0] <= chunk:
        return rows.abs().sum(dim=1)
    return torch.cat([part.abs().sum(dim=1) for part in rows.split(chunk)])


def l2_norm(rows: Tensor) -> Tensor:
    """Score = ℓ2 norm of each row."""
    return torch.linalg.vector_norm(rows, dim=1)


def l2_geometric_median(rows: Tensor) -> Tensor:
    """Score = sum of Euclidean distances to every other row (FPGM).

    Rows nearest the geometric median have the smallest sums and are the most
    replaceable, so they are pruned first. Distances are computed in float64 as
    ``‖a‖² + ‖b‖² − 2·a·b``, one block of rows at a time, so the ``n × n`` matrix
    is never held. For large layers (more than ``_GM_WHOLE_ELEMENTS`` weights)
    the float64 copy of the rows is not held either: each block is compared with
    chunks of the others, converted on the fly, and the temporaries stay within
    about 150 MB for any ``n``.
    """
    n = rows.shape[0]
    width = rows[0].numel() if n else 1
    whole = n * width <= _GM_WHOLE_ELEMENTS
    chunk = max(1, n) if whole else max(1, _GM_CHUNK_ELEMENTS // max(width, 1))
    block = max(1, _GM_BLOCK_ELEMENTS // max(n, 1))
    x64 = rows.to(torch.float64) if whole else None

    def as64(start: int, stop: int) -> Tensor:
        return x64[start:stop] if x64 is not None else rows[start:stop].to(torch.float64)

    sq = torch.empty(n, dtype=torch.float64, device=rows.device)
    for start in range(0, n, chunk):
        x = as64(start, start + chunk)
        sq[start : start + chunk] = (x * x).sum(dim=1)
    sums = torch.empty(n, dtype=torch.float64, device=rows.device)
    buffer = torch.empty(min(block, n), n, dtype=torch.float64, device=rows.device)
    for start in range(0, n, block):
        part = as64(start, start + block)
        d2 = buffer[: part.shape[0]]
        for c0 in range(0, n, chunk):
            cols = slice(c0, c0 + chunk)
            prod = part @ as64(c0, c0 + chunk).T
            torch.add(sq[start : start + block, None], sq[None, cols], out=d2[:, cols])
            d2[:, cols].sub_(prod.mul_(2.0))
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
