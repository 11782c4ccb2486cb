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


#: Elements of the reused ``|rows|`` buffer of :func:`l1_norm` (1 MB of float32:
#: it stays in cache, and a fresh multi-megabyte temporary would cost more in
#: page faults than the arithmetic).
_L1_CHUNK_ELEMENTS = 1 << 18


def l1_norm(rows: Tensor) -> Tensor:
    """Score = ℓ1 norm of each row (Li et al., "Pruning Filters for Efficient ConvNets").

    Computed in blocks of whole rows through one small reused buffer; each row's
    sum is the same as ``rows.abs().sum(dim=1)``, bit for bit.
    """
    n = rows.shape[0]
    width = rows[0].numel() if n else 1
    chunk = max(1, _L1_CHUNK_ELEMENTS // max(width, 1))
    if n <= chunk:
        return rows.abs().sum(dim=1)
    out = torch.empty(n, dtype=rows.dtype, device=rows.device)
    buffer = torch.empty(chunk, width, dtype=rows.dtype, device=rows.device)
    for start in range(0, n, chunk):
        part = rows[start : start + chunk]
        block = buffer[: part.shape[0]]
        torch.abs(part, out=block)
        torch.sum(block, dim=1, out=out[start : start + chunk])
    return out


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


#: Criteria that score each row on its own, so a batch of groups can be scored in one call.
_ROWWISE: tuple[CriterionFn, ...] = (l1_norm, l2_norm)


def _scores(rows: Tensor, fn: CriterionFn) -> Tensor:
    """``(B, n)`` scores of ``(B, n, f)`` rows, one call for row-wise criteria."""
    b, n = rows.shape[0], rows.shape[1]
    if any(fn is rowwise for rowwise in _ROWWISE):
        return fn(rows.reshape(b * n, -1)).view(b, n)
    scores = []
    for group in rows:
        out = fn(group)
        if not isinstance(out, Tensor):
            raise ConfigError(
                f"criterion returned a {type(out).__name__}; it must return a tensor of {n} scores"
            )
        if out.shape != (n,):
            raise ConfigError(
                f"criterion returned scores of shape {tuple(out.shape)}, expected ({n},)"
            )
        scores.append(out)
    return torch.stack(scores)


def select_kept(rows: Tensor, keep: int, criterion: str | CriterionFn) -> Tensor:
    """Indices (ascending) of the ``keep`` rows with the highest criterion scores.

    ``rows`` is one group's ``(n, f)`` rows, giving ``(keep,)`` indices, or a
    batch of same-shaped groups ``(B, n, f)``, giving ``(B, keep)``; each group
    is scored on its own. Ties are broken towards the lower index, so the
    choice is deterministic.
    """
    fn = get_criterion(criterion) if isinstance(criterion, str) else criterion
    single = rows.dim() == 2
    batch = rows.detach().unsqueeze(0) if single else rows.detach()
    n = batch.shape[1]
    if not 0 < keep <= n:
        raise ConfigError(f"cannot keep {keep} of {n} neurons")
    scores = torch.nan_to_num(_scores(batch, fn).to(torch.float64), nan=float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
    kept = torch.sort(order, dim=1).values
    return kept[0] if single else kept


# ----------------------------------------------------------------- merge-aware selection


def _mean_normalised(score: Tensor) -> Tensor:
    s = torch.nan_to_num(score.to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0)
    mean = s.abs().mean()
    return s / mean if float(mean) > 0 else s


def group_scores(
    rows: Tensor, columns: Tensor, bn_scale: Tensor | None, criterion: str | CriterionFn
) -> Tensor:
    """Group importance: producer rows + BN scale + consumer columns (each mean-normalised).

    The criterion scores the producer's rows and, the same way, each neuron's
    consumer columns (``(n, out·taps)``); with batch norm, ``|γ|/σ`` is added,
    the factor by which BN scales the neuron's output. This is the group
    importance of Torch-Pruning (Fang et al., 2023) with any criterion.
    """
    fn = get_criterion(criterion) if isinstance(criterion, str) else criterion
    total = _mean_normalised(fn(rows)) + _mean_normalised(fn(columns))
    if bn_scale is not None:
        total = total + _mean_normalised(bn_scale.abs())
    return total


def top_k(scores: Tensor, keep: int) -> Tensor:
    """Ascending indices of the ``keep`` highest scores (ties towards the lower index)."""
    s = torch.nan_to_num(scores.to(torch.float64), nan=float("-inf"))
    order = torch.sort(s, descending=True, stable=True).indices[:keep]
    return torch.sort(order).values


def cover_select(vectors: Tensor, keep: int, weights: Tensor) -> Tensor:
    """Kept set by a greedy weighted k-medoids cover in the merge's cosine distance.

    Each neuron ``n`` is a vector whose positive multiples merge exactly into it
    (see :func:`neuron_merging.core.compensate.merge_vectors`); the distance is
    ``d = 1 − cos`` (``≥ 1`` for negative cosines, which cannot be merged). The
    greedy facility-location rule adds, ``keep`` times, the neuron that most
    lowers ``Σ_n w_n·min_{m ∈ K} d(n, m)`` (a kept neuron costs 0), with
    ``weights`` the criterion's scores, so important neurons are kept or well
    covered. Each step is one vectorised ``(n, n)`` reduction.
    """
    v = vectors.to(torch.float64)
    norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
    unit = v / torch.where(norm > 0, norm, torch.ones_like(norm))
    dist = (1.0 - unit @ unit.T).clamp_min(0.0)
    dist.fill_diagonal_(0.0)
    w = torch.nan_to_num(weights.to(torch.float64), nan=0.0).clamp_min(0.0)
    w = w / w.mean() if float(w.mean()) > 0 else torch.ones_like(w)
    n = v.shape[0]
    best = torch.full((n,), 2.0, dtype=torch.float64)  # cost of an uncovered neuron
    chosen = torch.zeros(n, dtype=torch.bool)
    for _ in range(keep):
        gain = (w[:, None] * (best[:, None] - dist).clamp_min(0.0)).sum(dim=0)
        gain[chosen] = -1.0
        c = int(torch.argmax(gain))
        chosen[c] = True
        best = torch.minimum(best, dist[:, c])
    return chosen.nonzero().squeeze(1)
