r"""Approximate merging through activations that are not positively homogeneous.

Exact merging needs ``f(s·z) = s·f(z)`` (ReLU, leaky ReLU): then a pruned
neuron ``n`` whose weights are ``s`` times those of a kept ``m`` contributes
``s·f(z_m)`` and folding ``s`` into the consumer is lossless. GELU, SiLU,
ReLU6, Hardswish and gated units (SwiGLU, GeGLU) break that identity, so a
merge can only be approximate. This module gives each pruned neuron a partner
and a scale (and optionally an offset) that are optimal in the least-squares
sense under a Gaussian model of the producer's pre-activations, data-free.

**The model.** The producer's input is ``x ~ N(μ_x, diag(v_x))`` (default
``N(0, I)``; a preceding LayerNorm or batch norm gives ``μ_x``/``v_x``), so its
pre-activations ``z = W x + b`` are jointly Gaussian with

* ``E[z_i] = w_i·μ_x + b_i`` and ``Cov(z_i, z_j) = Σ_k w_ik w_jk v_k``;

for a gated unit ``a_i = f(g_i)·u_i`` the gate ``g`` and the up projection ``u``
are jointly Gaussian in the same way (their cross covariances are dot products
of gate and up rows). An elementwise unit is the case ``u ≡ 1``.

**The rule.** Merging ``n`` into ``m`` replaces the consumer's input ``a_n`` by
``s·a_m`` (and, with ``offset=True``, a constant ``t`` folded into the
consumer's bias: ``b' = b + c_n·t``). Pruning replaces it by 0. The expected
squared error of neuron ``n``'s contribution, per unit of consumer weight,
is ``E[(a_n − s·a_m − t)²]``. Minimising it gives

* without offset: ``s* = E[a_n a_m] / E[a_m²]``, residual
  ``E[a_n²]·(1 − ρ²)`` with ``ρ² = E[a_n a_m]² / (E[a_n²] E[a_m²])``;
* with offset: ``s* = Cov(a_n, a_m) / Var(a_m)``, ``t* = E[a_n] − s*·E[a_m]``,
  residual ``Var(a_n)·(1 − ρ²)`` with ``ρ`` the correlation of ``a_n`` and
  ``a_m``.

Pruning is ``s = t = 0`` with error ``E[a_n²]``, so the merge is never worse
than pruning under the model, and strictly better whenever the two
activations are correlated. The offset is only as good as the model's means:
on a real network (all-MiniLM-L6-v2, ``docs/deployment.md``) the scale-only
merge beats pruning while the offset does worse, so ``offset=False`` is the
default. The partner is the candidate with the largest
explained fraction ``ρ²``; the candidates are the ``candidates`` kept neurons
whose weight rows are most cosine-similar (for a gated unit: the mean of the
gate-row and up-row cosines, since an exact merge needs equal gate rows and
proportional up rows).

**Consistency with the paper's rule.** For ReLU with no bias and rows at angle
``θ``, ``E[relu(z_n) relu(z_m)] = σ_n σ_m (sin θ + (π − θ) cos θ) / 2π`` (the
arc-cosine kernel) and ``E[relu(z_m)²] = σ_m²/2``, so
``s* = (‖w_n‖/‖w_m‖)·(sin θ + (π − θ) cos θ)/π``: the paper's
``s = ‖w_n‖/‖w_m‖`` exactly when the rows are parallel (the lossless case), and
shrunk towards 0 as they diverge. ``s = ‖w_n‖/‖w_m‖`` stays the baseline the
tests compare with.

**Computing the moments.** With ``g_m = μ_m + σ_m t₁`` and
``g_n = μ_n + σ_n(ρ t₁ + √(1−ρ²) t₂)`` for independent standard normals
``t₁, t₂``, the conditional mean of each ``u`` given ``(t₁, t₂)`` is linear and
its conditional covariance constant, so every moment is a two-dimensional
Gaussian integral, evaluated by Gauss–Hermite quadrature (``nodes²`` points),
vectorised over all (pruned, candidate) pairs in blocks. For smooth
activations (GELU, SiLU) the quadrature converges exponentially; at the kinks
of ReLU, ReLU6 and Hardswish the moments are accurate to about 1 % with the
default 40 nodes, and since the error is quadratic around ``s*`` that costs
about ``10⁻⁴`` of the explained error. Parallel rows through a homogeneous
activation still give the exact scale (the quadrature error cancels in the
ratio).

Everything here is plain tensor code (torch only); there is no loop over
neurons.

Example::

    >>> import torch
    >>> from neuron_merging.core.approx import assign_approx
    >>> w = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    >>> w[5] = 0.5 * w[1]                        # neuron 5 is half of neuron 1
    >>> a = assign_approx(w, None, torch.arange(4), torch.tensor([4, 5]), "gelu")
    >>> int(a.partner[1])                        # merged into kept neuron 1
    1
    >>> bool(a.merge_error[1] < 0.05 * a.prune_error[1])   # nearly lossless through GELU
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .assign import Assignment

#: The activation names :func:`assign_approx` understands. ``swiglu`` and
#: ``geglu`` are gated (``f(gate)·up``, with SiLU and GELU) and need ``up_rows``.
ACTIVATIONS = ("relu", "relu6", "hardswish", "gelu", "gelu_tanh", "silu", "swiglu", "geglu")

_GATE = {"swiglu": "silu", "geglu": "gelu"}

#: Upper bound on the elements of one ``(pruned, candidates, nodes, nodes)`` block.
BLOCK_ELEMENTS = 1 << 23


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The elementwise function of activation ``name`` (the gate's, for gated units)."""
    name = _GATE.get(name, name)
    table: dict[str, Callable[[Tensor], Tensor]] = {
        "relu": torch.relu,
        "relu6": F.relu6,
        "hardswish": F.hardswish,
        "gelu": F.gelu,
        "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
        "silu": F.silu,
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}")
    return table[name]


@lru_cache(maxsize=8)
def _hermite(nodes: int) -> tuple[Tensor, Tensor]:
    """Gauss–Hermite nodes and weights for ``E[h(t)]``, ``t ~ N(0, 1)`` (weights sum to 1).

    Golub–Welsch: the nodes are the eigenvalues of the Jacobi matrix of the
    probabilists' Hermite polynomials (off-diagonal ``√k``), the weights the
    squared first components of its eigenvectors.
    """
    k = torch.arange(1, nodes, dtype=torch.float64).sqrt()
    jacobi = torch.diag(k, 1) + torch.diag(k, -1)
    t, vectors = torch.linalg.eigh(jacobi)
    w = vectors[0] ** 2
    return t, w / w.sum()


@dataclass
class ApproxAssignment(Assignment):
    """:class:`~.assign.Assignment` plus what an approximate merge needs and reports.

    Attributes:
        offset: ``(p,)`` constant to add, times the pruned neuron's consumer
            weights, to the consumer's bias (zeros unless ``offset=True``).
        explained: ``(p,)`` fraction of the pruned neuron's expected squared
            contribution (its variance with ``offset=True``) that the merge
            recovers, ``ρ²`` in the module notes; 0 where not merged.
        prune_error: ``(p,)`` ``E[a_n²]``: the expected squared error of pruning.
        merge_error: ``(p,)`` the expected squared error after the merge
            (equal to ``prune_error`` where not merged).
    """

    offset: Tensor = field(default_factory=lambda: torch.zeros(0))
    explained: Tensor = field(default_factory=lambda: torch.zeros(0))
    prune_error: Tensor = field(default_factory=lambda: torch.zeros(0))
    merge_error: Tensor = field(default_factory=lambda: torch.zeros(0))


def _whiten(
    rows: Tensor, bias: Tensor | None, mean: Tensor | None, var: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Rows and means of the pre-activations under ``x ~ N(mean, diag(var))``."""
    rows = rows.detach().to(torch.float64).reshape(rows.shape[0], -1)
    mu = torch.zeros(rows.shape[0], dtype=torch.float64)
    if bias is not None:
        mu = mu + bias.detach().to(torch.float64)
    if mean is not None:
        mu = mu + rows @ mean.detach().to(torch.float64).reshape(-1)
    if var is not None:
        rows = rows * var.detach().to(torch.float64).reshape(1, -1).clamp_min(0).sqrt()
    return rows, mu


def _self_moments(
    f: Callable[[Tensor], Tensor],
    mu_g: Tensor,
    sd_g: Tensor,
    mu_u: Tensor,
    beta: Tensor,
    var_u: Tensor,
    t: Tensor,
    w: Tensor,
) -> tuple[Tensor, Tensor]:
    """``E[a]`` and ``E[a²]`` of ``a = f(g)·u`` per neuron (1-D quadrature)."""
    fg = f(mu_g.unsqueeze(-1) + sd_g.unsqueeze(-1) * t)  # (n, Q)
    u_mean = mu_u.unsqueeze(-1) + beta.unsqueeze(-1) * t
    u_resid = (var_u - beta**2).clamp_min(0).unsqueeze(-1)
    first = (w * fg * u_mean).sum(-1)
    second = (w * fg**2 * (u_resid + u_mean**2)).sum(-1)
    return first, second


def _up_factor(
    g_rows: Tensor,
    u_rows: Tensor,
    idx_n: Tensor,
    kept: Tensor,
    top: Tensor,
    sd_g: Tensor,
    mu_u: Tensor,
    cov_ug_self: Tensor,
    rho: Tensor,
    t1: Tensor,
    t2: Tensor,
) -> Tensor:
    """``E[u_n u_m | t₁, t₂]`` on the quadrature grid, ``(b, c, Q, Q)`` (gated units).

    ``E[u | t₁, t₂] = μ_u + α₁·t₁ + α₂·t₂`` and the residual covariance ``R`` is
    constant (module notes); the cross covariances come from ``(b, k)`` products
    gathered at the candidates ``top``.
    """
    idx_m = kept[top]
    b, c = top.shape

    def pairs(left: Tensor, right: Tensor) -> Tensor:
        return (left[idx_n] @ right[kept].T).gather(1, top)

    ug_nm, gu_nm, uu_nm = pairs(u_rows, g_rows), pairs(g_rows, u_rows), pairs(u_rows, u_rows)
    rho_perp = (1 - rho**2).clamp_min(0).sqrt()
    perp_ok = rho_perp > 1e-7
    safe_perp = torch.where(perp_ok, rho_perp, torch.ones_like(rho_perp))
    sd_m, sd_n = sd_g[idx_m], sd_g[idx_n].unsqueeze(1).expand(b, c)
    safe_m = torch.where(sd_m > 0, sd_m, torch.ones_like(sd_m))
    safe_n = torch.where(sd_n > 0, sd_n, torch.ones_like(sd_n))

    def alphas(cov_with_m: Tensor, cov_with_n: Tensor) -> tuple[Tensor, Tensor]:
        a1 = cov_with_m / safe_m
        a2 = torch.where(perp_ok, (cov_with_n / safe_n - rho * a1) / safe_perp, 0.0)
        return a1, a2

    a1_m, a2_m = alphas(cov_ug_self[idx_m], gu_nm)  # u_m against g_m, g_n
    a1_n, a2_n = alphas(ug_nm, cov_ug_self[idx_n].unsqueeze(1).expand(b, c))
    resid = uu_nm - a1_m * a1_n - a2_m * a2_n

    def grid(mu: Tensor, a1: Tensor, a2: Tensor) -> Tensor:
        return mu[..., None, None] + a1[..., None, None] * t1 + a2[..., None, None] * t2

    u_m = grid(mu_u[idx_m], a1_m, a2_m)
    u_n = grid(mu_u[idx_n].unsqueeze(1).expand(b, c), a1_n, a2_n)
    return resid[..., None, None] + u_m * u_n


def _assign_one(
    rows: Tensor,
    bias: Tensor | None,
    kept: Tensor,
    pruned: Tensor,
    activation: str,
    *,
    up_rows: Tensor | None = None,
    up_bias: Tensor | None = None,
    input_mean: Tensor | None = None,
    input_var: Tensor | None = None,
    candidates: int = 8,
    offset: bool = False,
    threshold: float | None = None,
    nodes: int = 40,
) -> ApproxAssignment:
    """One group of :func:`assign_approx` (``rows`` ``(n, f)``, index vectors)."""
    t_start = time.perf_counter()
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
    gated = activation in _GATE
    if gated != (up_rows is not None):
        raise ValueError(
            f"{activation} {'needs' if gated else 'takes no'} up_rows "
            f"({'a gated unit f(gate)·up' if gated else 'an elementwise unit'})"
        )
    if rows.dim() < 2 or kept.dim() != 1 or pruned.dim() != 1:
        raise ValueError("rows must be (n, f) with kept/pruned index vectors (or a batch)")
    f = activation_fn(activation)
    dtype = rows.dtype if rows.is_floating_point() else torch.float32
    k, p = kept.numel(), pruned.numel()
    g_rows, mu_g = _whiten(rows, bias, input_mean, input_var)
    n = g_rows.shape[0]
    if gated:
        u_rows, mu_u = _whiten(up_rows, up_bias, input_mean, input_var)  # type: ignore[arg-type]
    else:
        u_rows, mu_u = None, torch.ones(n, dtype=torch.float64)
    sd_g = g_rows.norm(dim=1)
    safe_sd = torch.where(sd_g > 0, sd_g, torch.ones_like(sd_g))
    unit_g = g_rows / safe_sd.unsqueeze(1)
    if u_rows is not None:
        sd_u = u_rows.norm(dim=1)
        unit_u = u_rows / torch.where(sd_u > 0, sd_u, torch.ones_like(sd_u)).unsqueeze(1)
        cov_ug_self = (u_rows * g_rows).sum(1)  # Cov(u_i, g_i)
        beta = cov_ug_self / safe_sd
        var_u = sd_u**2
    else:
        beta = torch.zeros(n, dtype=torch.float64)
        var_u = torch.zeros(n, dtype=torch.float64)

    t, w = _hermite(nodes)
    mean_a, second_a = _self_moments(f, mu_g, sd_g, mu_u, beta, var_u, t, w)
    var_a = (second_a - mean_a**2).clamp_min(0)

    partner = torch.full((p,), -1, dtype=torch.long)
    scale = torch.zeros(p, dtype=dtype)
    shift = torch.zeros(p, dtype=dtype)
    similarity = torch.zeros(p, dtype=dtype)
    explained = torch.zeros(p, dtype=torch.float64)
    prune_error = second_a[pruned].clone()
    merge_error = prune_error.clone()
    if p == 0 or k == 0:
        timings = {"similarity": 0.0, "assign": time.perf_counter() - t_start}
        return ApproxAssignment(
            partner, scale, similarity, timings, shift, explained, prune_error, merge_error
        )

    c = max(1, min(candidates, k))
    t1 = t.view(1, 1, -1, 1)
    t2 = t.view(1, 1, 1, -1)
    w2 = (w.view(-1, 1) * w.view(1, -1)).view(1, 1, nodes, nodes)
    step = max(1, BLOCK_ELEMENTS // (c * nodes * nodes))
    t_sim = 0.0
    for start in range(0, p, step):
        idx_n = pruned[start : start + step]
        b = idx_n.numel()
        t0 = time.perf_counter()
        cos_g = unit_g[idx_n] @ unit_g[kept].T  # (b, k)
        score = cos_g
        if u_rows is not None:
            score = 0.5 * (cos_g + unit_u[idx_n] @ unit_u[kept].T)
        t_sim += time.perf_counter() - t0
        top = score.topk(c, dim=1).indices  # positions in kept, (b, c)
        idx_m = kept[top]  # (b, c)
        rho = cos_g.gather(1, top).clamp(-1.0, 1.0)
        rho_perp = (1 - rho**2).clamp_min(0).sqrt()
        sd_m, sd_n = sd_g[idx_m], sd_g[idx_n].unsqueeze(1).expand(b, c)
        g_m = mu_g[idx_m].unsqueeze(-1).unsqueeze(-1) + sd_m.unsqueeze(-1).unsqueeze(-1) * t1
        g_n = mu_g[idx_n].view(b, 1, 1, 1) + sd_n.unsqueeze(-1).unsqueeze(-1) * (
            rho.unsqueeze(-1).unsqueeze(-1) * t1 + rho_perp.unsqueeze(-1).unsqueeze(-1) * t2
        )
        prod = f(g_m) * f(g_n)  # (b, c, Q, Q)
        if u_rows is not None:
            prod = prod * _up_factor(
                g_rows, u_rows, idx_n, kept, top, sd_g, mu_u, cov_ug_self, rho, t1, t2
            )
        cross = (w2 * prod).sum((-1, -2))  # E[a_n a_m], (b, c)

        e_m, e_n = mean_a[idx_m], mean_a[idx_n].unsqueeze(1)
        if offset:
            num = cross - e_n * e_m
            den_m, den_n = var_a[idx_m], var_a[idx_n].unsqueeze(1)
        else:
            num = cross
            den_m, den_n = second_a[idx_m], second_a[idx_n].unsqueeze(1)
        usable = (den_m > 1e-12 * den_m.amax().clamp_min(1e-300)) & (den_n > 0)
        frac = torch.where(usable, num**2 / (den_m * den_n).clamp_min(1e-300), 0.0).clamp(0, 1)
        best_frac, choice = frac.max(dim=1)
        pick = choice.unsqueeze(1)
        s = (num / torch.where(usable, den_m, torch.ones_like(den_m))).gather(1, pick).squeeze(1)
        off = (
            (e_n.squeeze(1) - s * e_m.gather(1, pick).squeeze(1)) if offset else torch.zeros_like(s)
        )
        ok = (best_frac > 0) & torch.isfinite(s) & torch.isfinite(off)
        if threshold is not None:
            ok &= best_frac >= threshold
        sl = slice(start, start + b)
        partner[sl] = torch.where(ok, top.gather(1, pick).squeeze(1), -1)
        scale[sl] = torch.where(ok, s, 0.0).to(dtype)
        shift[sl] = torch.where(ok, off, 0.0).to(dtype)
        similarity[sl] = rho.gather(1, pick).squeeze(1).to(dtype)
        explained[sl] = torch.where(ok, best_frac, 0.0)
        base = var_a[idx_n] if offset else second_a[idx_n]
        merged_err = base * (1 - best_frac)
        merge_error[sl] = torch.where(ok, merged_err, prune_error[sl])
    timings = {"similarity": t_sim, "assign": time.perf_counter() - t_start - t_sim}
    return ApproxAssignment(
        partner, scale, similarity, timings, shift, explained, prune_error, merge_error
    )


def assign_approx(
    rows: Tensor,
    bias: Tensor | None,
    kept: Tensor,
    pruned: Tensor,
    activation: str,
    *,
    up_rows: Tensor | None = None,
    up_bias: Tensor | None = None,
    input_mean: Tensor | None = None,
    input_var: Tensor | None = None,
    candidates: int = 8,
    offset: bool = False,
    threshold: float | None = None,
    nodes: int = 40,
) -> ApproxAssignment:
    """Partners and least-squares scales for merging through ``activation`` (see the module notes).

    Args:
        rows: ``(n, f)`` producer weight rows (a conv's kernels, flattened); for
            a gated unit, the gate projection's rows. For a producer followed by
            batch norm, pass the BN-folded rows and bias (``w·γ/σ``,
            ``(b − μ)·γ/σ + β``): the activation sees the normalised values.
            A batch of same-shaped groups is ``(B, n, f)`` with ``(B, k)`` and
            ``(B, p)`` indices (and ``(B, n)`` biases, ``(B, n, f)`` up rows);
            each group is computed on its own, the results stacked.
        bias: ``(n,)`` producer bias, or ``None``.
        kept: ``(k,)`` indices of the kept neurons.
        pruned: ``(p,)`` indices of the pruned neurons.
        activation: one of :data:`ACTIVATIONS`.
        up_rows: ``(n, f)`` rows of the up projection (gated units only).
        up_bias: ``(n,)`` its bias, or ``None``.
        input_mean: ``(f,)`` mean of the producer's input (default 0), one per
            flattened input feature (for a conv, repeat a per-channel value
            over the kernel positions); shared by a batch of groups.
        input_var: ``(f,)`` per-feature variance of the input (default 1).
        candidates: how many most cosine-similar kept neurons are scored per
            pruned neuron (1: the cosine partner, as for exact merging).
        offset: also fit a constant folded into the consumer's bias.
        threshold: merge only when the explained fraction reaches it (default:
            whenever it is positive, i.e. the merge beats pruning under the model).
        nodes: Gauss–Hermite nodes per dimension.

    Returns:
        An :class:`ApproxAssignment`: ``partner`` (position in ``kept``, ``-1``
        for dropped), ``scale``, ``offset``, ``similarity`` (cosine of the
        chosen rows), ``explained``, and the expected errors of pruning and of
        the merge. ``explained`` and the errors are float64; ``scale``,
        ``offset`` and ``similarity`` have the rows' dtype.
    """
    options = {
        "input_mean": input_mean,
        "input_var": input_var,
        "candidates": candidates,
        "offset": offset,
        "threshold": threshold,
        "nodes": nodes,
    }
    if kept.dim() != 2:
        return _assign_one(
            rows, bias, kept, pruned, activation, up_rows=up_rows, up_bias=up_bias, **options
        )
    parts = [
        _assign_one(
            rows[i],
            None if bias is None else bias[i],
            kept[i],
            pruned[i],
            activation,
            up_rows=None if up_rows is None else up_rows[i],
            up_bias=None if up_bias is None else up_bias[i],
            **options,
        )
        for i in range(kept.shape[0])
    ]
    timings = {key: sum(part.timings[key] for part in parts) for key in ("similarity", "assign")}

    def stack(name: str) -> Tensor:
        return torch.stack([getattr(part, name) for part in parts])

    return ApproxAssignment(
        stack("partner"),
        stack("scale"),
        stack("similarity"),
        timings,
        stack("offset"),
        stack("explained"),
        stack("prune_error"),
        stack("merge_error"),
    )


def norm_ratio_scale(rows: Tensor, kept: Tensor, pruned: Tensor, partner: Tensor) -> Tensor:
    """The paper's scale ``‖w_n‖/‖w_m‖`` for given partners (the baseline), 0 where dropped."""
    norms = rows.detach().reshape(rows.shape[0], -1).norm(dim=1)
    m = kept[partner.clamp_min(0)]
    s = norms[pruned] / norms[m].clamp_min(torch.finfo(norms.dtype).tiny)
    return torch.where(partner >= 0, s, torch.zeros_like(s))
