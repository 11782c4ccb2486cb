"""A deliberately literal implementation of the paper's algorithms.

This module is a *baseline* and an *oracle*, not a library: it transcribes the
selection criteria, Algorithm 2 (merging without batch norm) and Algorithm 3
(merging with batch norm) one neuron and one (pruned, kept) pair at a time, in
Python with numpy float64 scalars, the way a direct reading of the paper would.
Nothing is vectorised across neurons; each pair costs a few numpy calls. It is
derived from the equations, not from any released code.

It is used two ways:

* as a correctness oracle: :func:`compare_plans` checks that the plans of
  :func:`neuron_merging.merge` (kept indices, partners, scales) equal the ones
  computed here;
* as a speed baseline: :func:`reference_merge` also builds the compressed model
  by a literal column-by-column fold, so its run time is comparable to a whole
  ``nm.merge`` call.

Conventions shared with the engine (they are choices the paper leaves open):

* rows are the producer's flattened weights, with the bias appended as one more
  column (``[w | b]``) when no batch norm follows; with batch norm the rows are
  the weights alone and the producer bias is folded into the running mean
  (``μ ← μ − b``) before any score is computed;
* the kept neurons are the ``k`` highest scores, ties to the lower index;
* the cosine similarity of a zero row is 0; a zero kept row is never a partner
  without batch norm (its scale would be infinite), a pruned zero row is dropped;
* ``bn_rule="paper"``: ``σ`` is the running *variance*,
  ``S = s·(γ_m/γ_n)·(σ_n/σ_m)``, ``B = (γ_m/σ_m)·(s·(μ_n − σ_n·β_n/γ_n) − μ_m) + β_m``,
  the cosine is clipped to ``[-1, 1]``, the min-max normalisation lets NaN
  through and the argmin follows numpy (the first NaN wins); a partner whose
  scale is not finite is dropped;
* ``bn_rule="exact"``: ``σ = sqrt(var + eps)``, ``S* = s·(γ_n/γ_m)·(σ_m/σ_n)``,
  ``B* = β_n − S*·β_m + (γ_n/σ_n)·(s·μ_m − μ_n)``; only finite positive ``S*``
  (with a finite ``|B*|/S*``) are candidates, the min-max runs over those only
  and a flat range normalises to 0.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from neuron_merging import MergeGroup
from neuron_merging.core.build import GroupPlan

__all__ = [
    "RefPlan",
    "compare_plans",
    "kept_counts",
    "reference_merge",
    "select_reference",
]


@dataclass
class RefPlan:
    """The reference's plan for one group, in the engine's format (numpy arrays)."""

    producer: str
    bn: str | None
    consumer: str
    kept: np.ndarray
    pruned: np.ndarray
    partner: np.ndarray
    scale: np.ndarray
    similarity: np.ndarray


# --------------------------------------------------------------------------- selection


def _l1(rows: np.ndarray) -> list[float]:
    return [float(np.sum(np.abs(rows[i]))) for i in range(rows.shape[0])]


def _l2(rows: np.ndarray) -> list[float]:
    return [float(math.sqrt(np.dot(rows[i], rows[i]))) for i in range(rows.shape[0])]


def _geometric_median(rows: np.ndarray) -> list[float]:
    n = rows.shape[0]
    scores = []
    for i in range(n):
        total = 0.0
        for j in range(n):
            diff = rows[i] - rows[j]
            total += math.sqrt(np.dot(diff, diff))
        scores.append(total)
    return scores


_SCORES = {"l1-norm": _l1, "l2-norm": _l2, "l2-GM": _geometric_median}


def select_reference(rows: np.ndarray, keep: int, criterion: str) -> np.ndarray:
    """Ascending indices of the ``keep`` highest-scoring rows (ties → lower index)."""
    scores = _SCORES[criterion](rows)
    scores = [-math.inf if math.isnan(s) else s for s in scores]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return np.array(sorted(order[:keep]), dtype=np.int64)


# --------------------------------------------------------------------------- assignment


def _cosine(a: np.ndarray, b: np.ndarray, norm_a: float, norm_b: float) -> float:
    if norm_a == 0.0 or norm_b == 0.0:
        return 0.0
    return float(np.dot(a, b)) / (norm_a * norm_b)


def _algorithm2(
    rows: np.ndarray, kept: np.ndarray, pruned: np.ndarray, threshold: float | None
) -> tuple[list[int], list[float], list[float]]:
    """Merging without batch norm: the most similar kept row, scale ‖w_n‖/‖w_m‖."""
    norms = [math.sqrt(np.dot(rows[i], rows[i])) for i in range(rows.shape[0])]
    partners, scales, sims = [], [], []
    for n in pruned:
        best_cos, best_j = -math.inf, -1
        for j, m in enumerate(kept):
            if norms[m] == 0.0:
                continue
            cos = _cosine(rows[n], rows[m], norms[n], norms[m])
            if cos > best_cos:
                best_cos, best_j = cos, j
        sims.append(best_cos if math.isfinite(best_cos) else 0.0)
        if best_j < 0:
            partners.append(-1)
            scales.append(0.0)
            continue
        s = norms[n] / norms[kept[best_j]]
        ok = (threshold is None or best_cos >= threshold) and math.isfinite(s) and s > 0
        partners.append(best_j if ok else -1)
        scales.append(s if ok else 0.0)
    return partners, scales, sims


def _algorithm3(
    rows: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    mu: np.ndarray,
    var: np.ndarray,
    eps: float,
    kept: np.ndarray,
    pruned: np.ndarray,
    threshold: float | None,
    lam: float,
    rule: str,
) -> tuple[list[int], list[float], list[float]]:
    """Merging with batch norm: minimise λ·(1 − cos) + (1 − λ)·minmax(|B|/S)."""
    f64 = np.float64
    norms = [f64(math.sqrt(np.dot(rows[i], rows[i]))) for i in range(rows.shape[0])]
    sigma = [f64(v) if rule == "paper" else f64(math.sqrt(v + eps)) for v in var]
    partners, scales, sims = [], [], []
    for n in pruned:
        g_n, b_n, m_n, s_n = f64(gamma[n]), f64(beta[n]), f64(mu[n]), sigma[n]
        cos_l, big_s_l, dist_l, valid_l = [], [], [], []
        for m in kept:
            g_m, b_m, m_m, s_m = f64(gamma[m]), f64(beta[m]), f64(mu[m]), sigma[m]
            cos = f64(_cosine(rows[n], rows[m], float(norms[n]), float(norms[m])))
            s = norms[n] / norms[m]
            if rule == "paper":
                cos = min(max(cos, f64(-1.0)), f64(1.0))
                big_s = s * (g_m / g_n) * (s_n / s_m)
                big_b = (g_m / s_m) * (s * (m_n - s_n * b_n / g_n) - m_m) + b_m
                dist = abs(big_b) / big_s
                valid = True
            else:
                big_s = s * (g_n / g_m) * (s_m / s_n)
                big_b = b_n - big_s * b_m + (g_n / s_n) * (s * m_m - m_n)
                dist = abs(big_b) / big_s
                valid = bool(np.isfinite(big_s) and big_s > 0 and np.isfinite(dist))
            cos_l.append(cos)
            big_s_l.append(big_s)
            dist_l.append(dist)
            valid_l.append(valid)

        # min-max normalisation of the bias distance over the candidates
        if rule == "paper":
            lo, hi = dist_l[0], dist_l[0]
            for d in dist_l:
                if np.isnan(d) or np.isnan(lo):
                    lo = hi = f64("nan")
                    continue
                lo, hi = min(lo, d), max(hi, d)
            norm_d = [(d - lo) / (hi - lo) for d in dist_l]
        else:
            lo, hi = f64(math.inf), f64(-math.inf)
            for d, ok in zip(dist_l, valid_l, strict=True):
                if ok:
                    lo, hi = min(lo, d), max(hi, d)
            span = hi - lo
            flat = not (np.isfinite(span) and span > 0)
            norm_d = [f64(0.0) if flat else (d - lo) / span for d in dist_l]

        choice, best = 0, f64(math.inf)
        for j in range(len(kept)):
            score = lam * (1.0 - cos_l[j]) + (1.0 - lam) * norm_d[j]
            if rule == "exact" and not valid_l[j]:
                score = f64(math.inf)
            if np.isnan(score):  # numpy.argmin: the first NaN wins
                choice = j
                break
            if score < best:
                choice, best = j, score
        usable = bool(np.isfinite(big_s_l[choice])) if rule == "paper" else valid_l[choice]
        ok = usable and (threshold is None or cos_l[choice] >= threshold)
        partners.append(choice if ok else -1)
        scales.append(float(big_s_l[choice]) if ok else 0.0)
        sims.append(float(cos_l[choice]))
    return partners, scales, sims


# --------------------------------------------------------------------------- driver


def kept_counts(
    model: nn.Module,
    groups: Sequence[MergeGroup],
    ratio: float,
    rounding: str = "round",
    keep: Mapping[str, int] | None = None,
    exclude: Sequence[str] = (),
) -> dict[str, int]:
    """How many neurons each compressed producer keeps (``keep`` overrides ``ratio``)."""
    modules = dict(model.named_modules())
    out = {}
    for g in groups:
        if g.producer in exclude:
            continue
        layer = modules[g.producer]
        n = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if keep and g.producer in keep:
            out[g.producer] = keep[g.producer]
        else:
            exact = n * (1.0 - ratio)
            out[g.producer] = int(exact) if rounding == "floor" else round(exact)
    return out


def _numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy().astype(np.float64)


def _plan_group(
    modules: Mapping[str, nn.Module],
    group: MergeGroup,
    k: int,
    criterion: str,
    threshold: float | None,
    lam: float,
    bn_rule: str,
    mode: str,
) -> RefPlan:
    producer = modules[group.producer]
    weight = _numpy(producer.weight)
    bias = _numpy(producer.bias)
    n = weight.shape[0]
    rows = weight.reshape(n, -1)
    if group.bn is None and bias is not None:
        rows = np.concatenate([rows, bias.reshape(n, 1)], axis=1)
    kept = select_reference(rows, k, criterion)
    kept_set = set(kept.tolist())
    pruned = np.array([i for i in range(n) if i not in kept_set], dtype=np.int64)
    if mode == "prune" or len(pruned) == 0:
        p = len(pruned)
        partners, scales, sims = [-1] * p, [0.0] * p, [0.0] * p
    elif group.bn is None:
        partners, scales, sims = _algorithm2(rows, kept, pruned, threshold)
    else:
        bn = modules[group.bn]
        ones, zeros = np.ones(n), np.zeros(n)
        gamma = _numpy(bn.weight) if bn.weight is not None else ones
        beta = _numpy(bn.bias) if bn.bias is not None else zeros
        mu = _numpy(bn.running_mean)
        if bias is not None:
            mu = np.array([mu[i] - bias[i] for i in range(n)])
        var = _numpy(bn.running_var)
        partners, scales, sims = _algorithm3(
            rows, gamma, beta, mu, var, float(bn.eps), kept, pruned, threshold, lam, bn_rule
        )
    return RefPlan(
        group.producer,
        group.bn,
        group.consumer,
        kept,
        pruned,
        np.array(partners, dtype=np.int64),
        np.array(scales, dtype=np.float64),
        np.array(sims, dtype=np.float64),
    )


def _set(module: nn.Module, name: str, value: np.ndarray) -> None:
    old = getattr(module, name)
    tensor = torch.from_numpy(np.ascontiguousarray(value)).to(old.dtype)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        setattr(module, name, tensor)


def _literal_fold(model: nn.Module, plans: Sequence[RefPlan]) -> None:
    """Shrink ``model`` in place: fold pruned consumer columns one by one, then slice."""
    modules = dict(model.named_modules())
    originals = {name: _numpy(m.weight) for name, m in modules.items() if hasattr(m, "weight")}
    new_weight: dict[str, np.ndarray] = {}
    for plan in plans:  # consumer columns (inputs), from the original weights
        w = originals[plan.consumer]
        out = w.shape[0]
        n = len(plan.kept) + len(plan.pruned)
        cols = w.reshape(out, n, -1).copy()
        for j, src in enumerate(plan.pruned):
            if plan.partner[j] >= 0:
                dst = plan.kept[plan.partner[j]]
                cols[:, dst, :] += plan.scale[j] * cols[:, src, :]
        cols = cols[:, plan.kept, :]
        new_weight[plan.consumer] = (
            cols.reshape(out, -1)
            if w.ndim == 2
            else cols.reshape(out, len(plan.kept), *w.shape[2:])
        )
    for plan in plans:  # producer rows (outputs), bias and batch norm
        w = new_weight.get(plan.producer, originals[plan.producer])
        new_weight[plan.producer] = w[plan.kept]
        producer = modules[plan.producer]
        if producer.bias is not None:
            _set(producer, "bias", _numpy(producer.bias)[plan.kept])
        if plan.bn is not None:
            bn = modules[plan.bn]
            for attr in ("weight", "bias", "running_mean", "running_var"):
                if getattr(bn, attr) is not None:
                    _set(bn, attr, _numpy(getattr(bn, attr))[plan.kept])
            bn.num_features = len(plan.kept)
    for name, w in new_weight.items():
        layer = modules[name]
        _set(layer, "weight", w)
        if isinstance(layer, nn.Linear):
            layer.out_features, layer.in_features = w.shape[0], w.shape[1]
        else:
            layer.out_channels, layer.in_channels = w.shape[0], w.shape[1]


def reference_merge(
    model: nn.Module,
    groups: Sequence[MergeGroup],
    *,
    ratio: float = 0.5,
    criterion: str = "l1-norm",
    threshold: float | None = 0.1,
    lam: float = 0.85,
    bn_rule: str = "paper",
    rounding: str = "round",
    keep: Mapping[str, int] | None = None,
    exclude: Sequence[str] = (),
    mode: str = "merge",
) -> tuple[nn.Module, list[RefPlan]]:
    """Compress ``model`` literally; return the new model and the per-group plans.

    ``groups`` are the merge groups (from :func:`neuron_merging.find_groups`);
    discovery is not part of the reference, so its time is not counted.
    """
    with np.errstate(all="ignore"):
        counts = kept_counts(model, groups, ratio, rounding, keep, exclude)
        modules = dict(model.named_modules())
        plans = [
            _plan_group(modules, g, counts[g.producer], criterion, threshold, lam, bn_rule, mode)
            for g in groups
            if g.producer in counts
        ]
        new = copy.deepcopy(model)
        with torch.no_grad():
            _literal_fold(new, plans)
    return new, plans


def compare_plans(
    ours: Sequence[GroupPlan], ref: Sequence[RefPlan], *, rtol: float = 1e-4
) -> list[str]:
    """Differences between engine and reference plans (an empty list means equal).

    Kept indices, pruned indices and partners must be identical; scales equal to
    ``rtol`` (the engine works in float32, the reference in float64).
    """
    problems: list[str] = []
    if len(ours) != len(ref):
        return [f"{len(ours)} engine plans vs {len(ref)} reference plans"]
    for a, b in zip(ours, ref, strict=True):
        name = a.group.producer
        if name != b.producer:
            problems.append(f"group order differs: {name} vs {b.producer}")
            continue
        if not np.array_equal(a.kept.numpy(), b.kept):
            problems.append(f"{name}: kept indices differ")
            continue
        if not np.array_equal(a.pruned.numpy(), b.pruned):
            problems.append(f"{name}: pruned indices differ")
            continue
        partner = a.partner.numpy()
        if not np.array_equal(partner, b.partner):
            bad = int((partner != b.partner).sum())
            problems.append(f"{name}: {bad} of {len(partner)} partners differ")
            continue
        scale = a.scale.double().numpy()
        if not np.allclose(scale, b.scale, rtol=rtol, atol=0.0):
            worst = float(np.max(np.abs(scale - b.scale) / np.maximum(np.abs(b.scale), 1e-30)))
            problems.append(f"{name}: scales differ (max relative error {worst:.2e})")
    return problems
