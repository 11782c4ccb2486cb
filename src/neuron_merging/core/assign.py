"""Assignment: the kept partner and scale of every pruned neuron.

Three rules are implemented, all vectorised over whole layers (and over batches
of same-shaped groups, so a network of many narrow layers costs a few calls, not
one per layer) and computed in row blocks of the pruned neurons, so the
``p × k`` similarity matrix is never materialised beyond a fixed memory budget.

* **No batch norm** (the paper's fully connected case): the partner is the kept
  row with the highest cosine similarity; the scale is ``‖w_n‖ / ‖w_m‖``.
* **Batch norm, ``rule="paper"``** (the paper's Algorithm 3, as released): the
  partner minimises ``λ·d_cos + (1-λ)·d_bias``; ``σ`` is the running *variance*.
  Faithful to the released code, this rule

  - merges candidates whose scale ``S`` is negative (negative ``γ``), although
    ReLU does not commute with negative scales;
  - picks the first kept candidate when any normalised bias distance is NaN
    (for example all candidates have the same bias distance, so min-max
    normalisation divides 0 by 0), because ``numpy.argmin`` returns the first
    NaN it meets.

  Unlike the released code it never writes a non-finite scale into the model:
  such a pruned neuron is dropped instead.
* **Batch norm, ``rule="exact"``**: ``σ = sqrt(var + eps)`` and the scale is the
  exact factor ``S*`` with which ``BN_n = S*·BN_m + B*`` when ``F_n = s·F_m``;
  the merge is lossless when ``B* = 0``. Only finite positive scales are merged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

#: Upper bound on the elements of one ``p × k`` block of any temporary.
BLOCK_ELEMENTS = 1 << 22


@dataclass
class BNStats:
    """Batch-norm parameters of producers' neurons (producer bias already folded in μ).

    Every tensor is ``(n,)`` for one group or ``(B, n)`` for a batch of groups.
    """

    gamma: Tensor
    beta: Tensor
    mean: Tensor
    var: Tensor
    eps: float


@dataclass
class Assignment:
    """Partner and scale of each pruned neuron.

    Attributes:
        partner: ``(p,)`` (or ``(B, p)`` for a batch of groups) position in the
            kept list of the partner, ``-1`` if the pruned neuron is dropped
            without compensation.
        scale: factor applied to the pruned neuron's outgoing weights before
            they are added to its partner's (0 where not merged).
        similarity: cosine similarity to the chosen candidate.
        timings: seconds spent in the similarity products and in the rest.
    """

    partner: Tensor
    scale: Tensor
    similarity: Tensor
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def merged(self) -> int:
        """How many pruned neurons were merged into a partner."""
        return int((self.partner >= 0).sum())


class Workspace:
    """Scratch memory reused by the groups of one compression call.

    Gathering the unit rows of a wide layer needs a multi-megabyte temporary;
    allocated fresh for every group it costs more in page faults than the copy
    itself. Tensors handed out under one key share memory: a key's previous
    tensor is invalid once it is taken again.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def take(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialised tensor of ``shape`` backed by the buffer ``key``.

        Each ``[b]`` slice of the result starts on a 64-byte boundary (the
        slices are padded apart): matrix-product kernels round differently for
        differently aligned operands, and a group's result must not depend on
        its position in a batch. A single group gets a plain contiguous tensor.
        """
        inner: list[int] = []  # contiguous strides of one group, innermost first
        per = 1
        for size in reversed(shape[1:]):
            inner.append(per)
            per *= size
        align = max(1, 64 // dtype.itemsize)
        stride = -(-per // align) * align if shape[0] > 1 else per
        numel = stride * shape[0]
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype)
        return buffer.as_strided(shape, (stride, *reversed(inner)))


def _batched(rows: Tensor, *index: Tensor) -> tuple[bool, Tensor, tuple[Tensor, ...]]:
    """``(rows, index...)`` as ``(B, n, f)`` and ``(B, m)``; whether they were unbatched."""
    single = rows.dim() == 2
    if single:
        return True, rows.unsqueeze(0), tuple(i.unsqueeze(0) for i in index)
    return False, rows, index


def _gather_rows(rows: Tensor, idx: Tensor, out: Tensor) -> Tensor:
    """``rows[b, idx[b]]`` for every group ``b``, written to ``out`` (``(B, m, f)``)."""
    for group, index, target in zip(rows, idx, out, strict=True):
        torch.index_select(group, 0, index, out=target)
    return out


#: Below this a row's norm may have lost its squares to underflow (float32's smallest
#: normal number is about 1e-38, the square of 1e-19).
_TINY_NORM = 1e-18


def _row_norms(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Row norms, and the same with zeros replaced by 1 (the divisor of the unit rows).

    A row whose squares overflow or underflow (entries beyond about 1e19 or below about
    1e-19 in float32) is measured again divided by its largest entry, so that an exact
    duplicate of a huge or tiny row still gets its finite norm and is merged.
    """
    norms = torch.linalg.vector_norm(rows, dim=-1)
    odd = ~torch.isfinite(norms) | (norms < _TINY_NORM)
    if bool(odd.any()):
        picked = rows[odd]
        peak = picked.abs().amax(dim=-1, keepdim=True)
        finite = torch.isfinite(peak) & (peak > 0)
        safe_peak = torch.where(finite, peak, torch.ones_like(peak))
        again = torch.linalg.vector_norm(picked / safe_peak, dim=-1) * safe_peak.squeeze(-1)
        norms = norms.clone()
        norms[odd] = torch.where(finite.squeeze(-1), again, norms[odd])
    return norms, torch.where(norms > 0, norms, torch.ones_like(norms))


def _unit(rows: Tensor, safe: Tensor, idx: Tensor, workspace: Workspace, key: str) -> Tensor:
    """The unit rows ``idx`` (a zero row stays zero), gathered before dividing.

    Only the rows asked for are materialised, never all ``n`` unit rows at once,
    and in ``workspace`` memory under ``key``.
    """
    out = workspace.take(key, (idx.shape[0], idx.shape[1], rows.shape[2]), rows.dtype)
    return _gather_rows(rows, idx, out).div_(safe.gather(1, idx).unsqueeze(2))


def _products(unit_p: Tensor, unit_k: Tensor, workspace: Workspace) -> Tensor:
    """Cosine similarities ``(B, p, k)`` of unit rows ``(B, p, f)`` and ``(B, k, f)``.

    One matrix product per group, on 64-byte aligned operands (see
    :meth:`Workspace.take`): a batched product may pick other kernels for small
    shapes and round differently, and a group's plan must not depend on the
    groups it was batched with.
    """
    b, p, k = unit_p.shape[0], unit_p.shape[1], unit_k.shape[1]
    out = workspace.take("products", (b, p, k), unit_p.dtype)
    for p_rows, k_rows, target in zip(unit_p, unit_k, out, strict=True):
        torch.mm(p_rows, k_rows.T, out=target)
    return out


def _pick(values: Tensor, choice: Tensor) -> Tensor:
    """``values[b, i, choice[b, i]]``: ``(B, p, k)`` at ``(B, p)`` → ``(B, p)``."""
    return values.gather(2, choice.unsqueeze(2)).squeeze(2)


def _first_nan_or_argmin(score: Tensor) -> Tensor:
    """Row-wise ``numpy.argmin`` semantics: the first NaN if any, else the first minimum."""
    nan = score.isnan()
    if not bool(nan.any()):
        return score.argmin(dim=-1)
    first_nan = nan.to(torch.uint8).argmax(dim=-1)
    plain = torch.where(nan, torch.full_like(score, float("inf")), score).argmin(dim=-1)
    return torch.where(nan.any(dim=-1), first_nan, plain)


def _minmax_rows(d: Tensor, valid: Tensor | None) -> Tensor:
    """Min-max normalise each row; with ``valid`` given, only over valid entries, 0 if flat."""
    if valid is None:  # paper: NaN propagates exactly as with numpy
        lo = d.amin(dim=-1, keepdim=True)
        hi = d.amax(dim=-1, keepdim=True)
        return (d - lo) / (hi - lo)
    inf = torch.full_like(d, float("inf"))
    lo = torch.where(valid, d, inf).amin(dim=-1, keepdim=True)
    hi = torch.where(valid, d, -inf).amax(dim=-1, keepdim=True)
    span = hi - lo
    ok = torch.isfinite(span) & (span > 0)
    out = (d - lo) / torch.where(ok, span, torch.ones_like(span))
    return torch.where(ok, out, torch.zeros_like(out))


def _threshold_ok(similarity: Tensor, threshold: float | None) -> Tensor:
    if threshold is None:
        return torch.ones_like(similarity, dtype=torch.bool)
    return similarity >= threshold


def _unbatch(single: bool, assignment: Assignment) -> Assignment:
    if single:
        assignment.partner = assignment.partner[0]
        assignment.scale = assignment.scale[0]
        assignment.similarity = assignment.similarity[0]
    return assignment


def assign_plain(
    rows: Tensor,
    kept: Tensor,
    pruned: Tensor,
    threshold: float | None,
    workspace: Workspace | None = None,
) -> Assignment:
    """Partners by maximum cosine similarity, scales ``‖w_n‖/‖w_m‖`` (no batch norm).

    ``rows`` is ``(n, f)`` with ``kept``/``pruned`` index vectors, or a batch of
    same-shaped groups ``(B, n, f)`` with ``(B, k)``/``(B, p)`` indices.

    A candidate with a zero-norm row can never be a partner (its scale would be
    infinite); a pruned zero row has nothing to contribute and is dropped.
    ``workspace`` lends scratch memory (pass one to reuse it across groups).
    """
    t_sim = t_rest = 0.0
    t0 = time.perf_counter()
    workspace = workspace or Workspace()
    single, rows, (kept, pruned) = _batched(rows, kept, pruned)
    norms, safe = _row_norms(rows)
    unit_k, norm_k = _unit(rows, safe, kept, workspace, "kept"), norms.gather(1, kept)
    norm_p = norms.gather(1, pruned)
    usable_k = norm_k > 0
    all_usable = bool(usable_k.all())
    b, p = pruned.shape
    partner = torch.full((b, p), -1, dtype=torch.long)
    scale = torch.zeros(b, p, dtype=rows.dtype)
    similarity = torch.zeros(b, p, dtype=rows.dtype)
    t_rest += time.perf_counter() - t0
    step = max(1, BLOCK_ELEMENTS // max(b * kept.shape[1], 1))
    with torch.no_grad():
        for start in range(0, p, step):
            t_mark = time.perf_counter()
            sl = slice(start, start + step)
            unit_p = _unit(rows, safe, pruned[:, sl], workspace, "pruned")
            t0 = time.perf_counter()
            t_rest += t0 - t_mark
            cos = _products(unit_p, unit_k, workspace)
            t1 = time.perf_counter()
            if not all_usable:
                cos.masked_fill_(~usable_k.unsqueeze(1), float("-inf"))
            best, idx = cos.max(dim=2)
            s = norm_p[:, sl] / norm_k.gather(1, idx)
            ok = _threshold_ok(best, threshold) & torch.isfinite(s) & (s > 0)
            partner[:, sl] = torch.where(ok, idx, torch.full_like(idx, -1))
            scale[:, sl] = torch.where(ok, s, torch.zeros_like(s))
            similarity[:, sl] = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
            t_sim += t1 - t0
            t_rest += time.perf_counter() - t1
    timings = {"similarity": t_sim, "assign": t_rest}
    return _unbatch(single, Assignment(partner, scale, similarity, timings))


def assign_bn(
    rows: Tensor,
    stats: BNStats,
    kept: Tensor,
    pruned: Tensor,
    threshold: float | None,
    lam: float,
    rule: str,
    workspace: Workspace | None = None,
) -> Assignment:
    """Partners and scales for a producer followed by batch norm (Algorithm 3).

    ``rows`` is ``(n, f)`` with ``(n,)`` statistics and index vectors, or a batch
    of same-shaped groups: ``(B, n, f)``, ``(B, n)`` statistics, ``(B, k)`` and
    ``(B, p)`` indices. For pruned ``n`` and kept candidate ``m`` with
    ``s = ‖F_n‖/‖F_m‖``:

    * ``paper``: ``S = s·(γ_m/γ_n)·(σ_n/σ_m)``,
      ``B = (γ_m/σ_m)·(s·(μ_n − σ_n·β_n/γ_n) − μ_m) + β_m``, with ``σ = running_var``;
    * ``exact``: ``S* = s·(γ_n/γ_m)·(σ_m/σ_n)``,
      ``B* = β_n − S*·β_m + (γ_n/σ_n)·(s·μ_m − μ_n)``, with ``σ = sqrt(var + eps)``.

    ``d_bias = |B|/S`` is min-max normalised over the candidates and the partner
    minimises ``λ·(1 − cos) + (1 − λ)·d_bias``; it is merged (with scale ``S``)
    when its cosine similarity reaches ``threshold``. ``workspace`` lends scratch
    memory (pass one to reuse it across groups).
    """
    if rule not in ("paper", "exact"):
        raise ValueError(f"unknown bn rule {rule!r}")
    t_sim = t_rest = 0.0
    t0 = time.perf_counter()
    workspace = workspace or Workspace()
    single, rows, (kept, pruned) = _batched(rows, kept, pruned)
    dtype = rows.dtype

    def per_neuron(value: Tensor) -> Tensor:
        value = value.to(dtype)
        return value.unsqueeze(0) if single else value

    norms, safe = _row_norms(rows)
    var = per_neuron(stats.var)
    sigma = var if rule == "paper" else torch.sqrt(var + stats.eps)
    gamma, beta, mu = per_neuron(stats.gamma), per_neuron(stats.beta), per_neuron(stats.mean)
    k_unit, k_norm = _unit(rows, safe, kept, workspace, "kept"), norms.gather(1, kept)
    g_k, b_k = gamma.gather(1, kept).unsqueeze(1), beta.gather(1, kept).unsqueeze(1)
    m_k, s_k = mu.gather(1, kept).unsqueeze(1), sigma.gather(1, kept).unsqueeze(1)
    k_norm = k_norm.unsqueeze(1)
    b, p = pruned.shape
    partner = torch.full((b, p), -1, dtype=torch.long)
    scale = torch.zeros(b, p, dtype=dtype)
    similarity = torch.zeros(b, p, dtype=dtype)
    t_rest += time.perf_counter() - t0
    step = max(1, BLOCK_ELEMENTS // max(b * kept.shape[1], 1))
    with torch.no_grad():
        for start in range(0, p, step):
            t_mark = time.perf_counter()
            sl = slice(start, start + step)
            idx_p = pruned[:, sl]
            unit_p = _unit(rows, safe, idx_p, workspace, "pruned")
            t0 = time.perf_counter()
            t_rest += t0 - t_mark
            cos = _products(unit_p, k_unit, workspace)
            t1 = time.perf_counter()
            g_n, b_n = gamma.gather(1, idx_p).unsqueeze(2), beta.gather(1, idx_p).unsqueeze(2)
            m_n, s_n = mu.gather(1, idx_p).unsqueeze(2), sigma.gather(1, idx_p).unsqueeze(2)
            s = norms.gather(1, idx_p).unsqueeze(2) / k_norm
            if rule == "paper":
                cos = cos.clamp(-1.0, 1.0)
                big_s = s * (g_k / g_n) * (s_n / s_k)
                big_b = (g_k / s_k) * (s * (m_n - s_n * b_n / g_n) - m_k) + b_k
                d_bias = _minmax_rows(big_b.abs() / big_s, None)
                score = lam * (1.0 - cos) + (1.0 - lam) * d_bias
                choice = _first_nan_or_argmin(score)
                chosen_scale = _pick(big_s, choice)
                usable = torch.isfinite(chosen_scale)
            else:
                big_s = s * (g_n / g_k) * (s_k / s_n)
                big_b = b_n - big_s * b_k + (g_n / s_n) * (s * m_k - m_n)
                d_raw = big_b.abs() / big_s
                valid = torch.isfinite(big_s) & (big_s > 0) & torch.isfinite(d_raw)
                d_bias = _minmax_rows(d_raw, valid)
                score = lam * (1.0 - cos) + (1.0 - lam) * d_bias
                score = torch.where(valid, score, torch.full_like(score, float("inf")))
                choice = score.argmin(dim=2)
                chosen_scale = _pick(big_s, choice)
                usable = _pick(valid, choice)
            chosen_cos = _pick(cos, choice)
            ok = usable & _threshold_ok(chosen_cos, threshold)
            partner[:, sl] = torch.where(ok, choice, torch.full_like(choice, -1))
            scale[:, sl] = torch.where(ok, chosen_scale, torch.zeros_like(chosen_scale))
            similarity[:, sl] = chosen_cos
            t_sim += t1 - t0
            t_rest += time.perf_counter() - t1
    timings = {"similarity": t_sim, "assign": t_rest}
    return _unbatch(single, Assignment(partner, scale, similarity, timings))
