"""Beyond the paper: the hook points of selection, compensation, repair and calibration.

:func:`neuron_merging.core.api.compress` calls this module at two places when
any of the options of :class:`~neuron_merging.core.config.MergeConfig` beyond
the paper's is on (``selection``, ``compensation``, ``repair``, or calibration
data): :meth:`Extras.select` replaces a group's kept set before partners are
assigned, and :meth:`Extras.post_build` rewrites the compressed model's tensors
from the original ones after the plans were applied. Everything group-specific
is read through :func:`group_fields`, the one adapter to the group type.

The general form of every compensation is, per group, a producer row map
``alpha (k, n)`` (a selection of the kept rows, or folding's centroids), a
consumer mix ``(n, k)`` (``W' = W·mix`` per input channel) and an input shift
``δ (n,)`` whose effect ``W·δ`` goes to the consumer's bias or to the running
mean of the batch norm right after it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import lstsq
from .fold import kmeans_fold
from .record import evaluating
from .select import cover_select, get_criterion, group_scores


def group_fields(group: object) -> tuple[str, str | None, str, int]:
    """``(producer, bn, consumer, features_per_channel)`` of a group (the one adapter)."""
    features = getattr(group, "features", None)
    fpc = features[0] if features else getattr(group, "features_per_channel", None) or 1
    return group.producer, group.bn, group.consumer, int(fpc)  # type: ignore[attr-defined]


@dataclass
class Compensation:
    """How one group's consumer (and producer) are rewritten; see the module doc."""

    mix: Tensor
    delta: Tensor | None = None
    alpha: Tensor | None = None
    cov: Tensor | None = None


def _bn_sigma(bn: nn.Module) -> Tensor:
    return torch.sqrt(bn.running_var.detach().to(torch.float64) + float(bn.eps))


def _bn_gamma(bn: nn.Module) -> Tensor:
    n = bn.num_features
    w = bn.weight.detach() if bn.weight is not None else torch.ones(n)
    return w.to(torch.float64)


def _bn_beta(bn: nn.Module) -> Tensor:
    n = bn.num_features
    b = bn.bias.detach() if bn.bias is not None else torch.zeros(n)
    return b.to(torch.float64)


def merge_vectors(producer: nn.Module, bn: nn.Module | None) -> Tensor:
    """``(n, f+1)`` vectors whose positive multiples are exactly mergeable.

    Without batch norm: ``[w | b]``. With it: the effective affine row of the
    BN output, ``[γ·w/σ | β − γ·(μ − b)/σ]`` with ``σ = sqrt(var + eps)``.
    """
    w = producer.weight.detach().reshape(producer.weight.shape[0], -1).to(torch.float64)
    b = (
        producer.bias.detach().to(torch.float64)
        if producer.bias is not None
        else torch.zeros(w.shape[0], dtype=torch.float64)
    )
    if bn is None:
        return torch.cat([w, b[:, None]], dim=1)
    g, s = _bn_gamma(bn), _bn_sigma(bn)
    mu = bn.running_mean.detach().to(torch.float64) - b
    return torch.cat([w * (g / s)[:, None], (_bn_beta(bn) - g * mu / s)[:, None]], dim=1)


def consumer_columns(consumer: nn.Module, n: int, fpc: int) -> Tensor:
    """The consumer's weight as ``(out, n, taps)``: one slice per input channel."""
    w = consumer.weight.detach()
    return w.reshape(w.shape[0], n, -1)


def _colgram(cols: Tensor) -> Tensor:
    c = cols.to(torch.float64)
    return torch.einsum("onu,omu->nm", c, c)


# --------------------------------------------------------------------------- moments


class _Collect:
    """Channel mean and covariance of a tensor stream (float64, exact sums)."""

    def __init__(self) -> None:
        self.count = 0
        self.total: Tensor | None = None
        self.outer: Tensor | None = None

    def add(self, x: Tensor) -> None:
        flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).to(torch.float64)
        s, o = flat.sum(dim=1), flat @ flat.T
        self.total = s if self.total is None else self.total + s
        self.outer = o if self.outer is None else self.outer + o
        self.count += flat.shape[1]

    def moments(self) -> tuple[Tensor, Tensor]:
        assert self.total is not None and self.outer is not None
        mean = self.total / self.count
        return mean, self.outer / self.count - mean[:, None] * mean[None, :]


def _channels(x: Tensor, n: int) -> Tensor:
    """A consumer input as ``(N, n, rest)`` channels."""
    return x.reshape(x.shape[0], n, -1)


def _call(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on example inputs: a tensor, a sequence of positional inputs, or a
    mapping of keyword inputs (as :func:`neuron_merging.compress` accepts them)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*_inputs(inputs))


def _inputs(data: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return (data,) if isinstance(data, Tensor) else tuple(data)


def _batches(data: tuple[Tensor, ...], size: int) -> list[tuple[Tensor, ...]]:
    n = data[0].shape[0]
    return [tuple(d[i : i + size] for d in data) for i in range(0, n, size)]


def measured_moments(
    model: nn.Module,
    data: Tensor | Sequence[Tensor],
    consumers: dict[str, int],
    batch: int = 250,
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{consumer: (mean, cov)}`` of each consumer's ``n`` input channels on ``data``."""
    modules = dict(model.named_modules())
    stats = {name: _Collect() for name in consumers}
    handles = []
    for name, n in consumers.items():

        def hook(_m: nn.Module, args: tuple[Tensor, ...], name: str = name, n: int = n) -> None:
            stats[name].add(_channels(args[0], n).transpose(1, 2).reshape(-1, n, 1))

        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), evaluating(model):
            for part in _batches(_inputs(data), batch):
                model(*part)
    finally:
        for h in handles:
            h.remove()
    return {name: s.moments() for name, s in stats.items()}


def propagated_correlations(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    bns: Sequence[str],
    *,
    batch: int = 64,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Correlations of the named BN outputs on noise images, every BN renormalising.

    Gaussian noise of the example inputs' shape goes through ``model`` while each
    batch norm normalises with the noise batch's own statistics (forward hooks;
    the model is not modified), so every channel has its data-set mean ``β`` and
    scale ``γ`` and the correlations come from the weights alone. No data.
    (Producers without batch norm get no estimate: nothing fixes their scale, and
    noise statistics measured for LeNet-300-100 made selection worse.)
    """
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)

    def like(e: Any) -> Any:
        if not isinstance(e, Tensor) or e.dim() == 0:
            return e
        if e.is_floating_point():
            return torch.randn((batch, *e.shape[1:]), generator=gen, dtype=e.dtype)
        return e.expand(batch, *e.shape[1:])

    if isinstance(example_inputs, Mapping):  # keyword inputs, in the order given
        noise: Any = {key: like(value) for key, value in example_inputs.items()}
    else:
        noise = tuple(like(e) for e in _inputs(example_inputs))
    wanted = set(bns)
    out: dict[str, Tensor] = {}
    handles = []
    for name, m in modules.items():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue

        def hook(mod: nn.Module, args: tuple[Tensor, ...], _o: Tensor, name: str = name) -> Tensor:
            y = F.batch_norm(args[0], None, None, mod.weight, mod.bias, True, 0.0, mod.eps)
            if name in wanted:
                flat = y.detach().transpose(0, 1).reshape(y.shape[1], -1).to(torch.float64)
                flat = flat - flat.mean(dim=1, keepdim=True)
                cov = flat @ flat.T
                d = cov.diagonal().clamp_min(1e-300).sqrt()
                out[name] = cov / d[:, None] / d[None, :]
            return y

        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), evaluating(model):
            _call(model, noise)
    finally:
        for h in handles:
            h.remove()
    return out


def successor_bns(
    model: nn.Module, example_inputs: Tensor | Sequence[Tensor] | None, consumers: Sequence[str]
) -> dict[str, str]:
    """``{consumer: bn}`` for consumers whose output goes straight into a batch norm."""
    if example_inputs is None:
        return {}
    modules = dict(model.named_modules())
    outputs: dict[int, str] = {}
    keep_alive: list[Tensor] = []
    found: dict[str, str] = {}
    handles = []
    for name in consumers:

        def out_hook(_m: nn.Module, _a: object, o: Tensor, name: str = name) -> None:
            outputs[id(o)] = name
            keep_alive.append(o)  # ids stay unique while the forward runs

        handles.append(modules[name].register_forward_hook(out_hook))
    for name, m in modules.items():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):

            def bn_hook(_m: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
                src = outputs.get(id(args[0]))
                if src is not None:
                    found.setdefault(src, name)

            handles.append(m.register_forward_pre_hook(bn_hook))
    try:
        with torch.no_grad(), evaluating(model):
            _call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return found


# ------------------------------------------------------------------------ the hooks


class Extras:
    """The state of one compression call with options beyond the paper's.

    Args:
        config: the :class:`~neuron_merging.core.config.MergeConfig`.
        original: the caller's (unmodified) model.
        example_inputs: tracing inputs (shape of the noise images, successor BNs).
        groups: the target groups, in plan order.
        calibration: unlabeled inputs, or ``None`` for the data-free methods.
    """

    def __init__(
        self,
        config: object,
        original: nn.Module,
        example_inputs: Tensor | Sequence[Tensor] | None,
        groups: Sequence[object],
        calibration: Tensor | Sequence[Tensor] | None = None,
    ) -> None:
        self.config = config
        self.original = original
        self.modules = dict(original.named_modules())
        self.example_inputs = example_inputs
        self.groups = list(groups)
        self.index = {group_fields(g)[0]: i for i, g in enumerate(self.groups)}
        self.calibration = calibration
        self._moments: dict[int, tuple[Tensor, Tensor] | None] | None = None
        #: producers whose rows were replaced by folding's centroids
        self.folded: frozenset[str] = frozenset()

    # ---- moments of every group's consumer input -------------------------------
    def moments(self, i: int) -> tuple[Tensor, Tensor] | None:
        """``(E[a], Cov(a))`` of group ``i``'s consumer input channels, or ``None``.

        Measured on the calibration data when there is some; otherwise from the
        Gaussian model when the producer has batch norm; otherwise unknown.
        """
        if self._moments is None:
            self._moments = self._all_moments()
        return self._moments[i]

    def _all_moments(self) -> dict[int, tuple[Tensor, Tensor] | None]:
        cfg = self.config
        fields = [group_fields(g) for g in self.groups]
        out: dict[int, tuple[Tensor, Tensor] | None] = {}
        if self.calibration is not None:
            n_of = {f[2]: self.modules[f[0]].weight.shape[0] for f in fields}
            measured = measured_moments(self.original, self.calibration, n_of)
            return {i: measured[f[2]] for i, f in enumerate(fields)}
        bns = [f[1] for f in fields if f[1] is not None]
        corr: dict[str, Tensor] = {}
        if cfg.gram == "propagated" and bns and self.example_inputs is not None:  # type: ignore[attr-defined]
            corr = propagated_correlations(
                self.original,
                self.example_inputs,
                bns,
                seed=cfg.seed,  # type: ignore[attr-defined]
            )
        for i, (prod, bn_name, _cons, _f) in enumerate(fields):
            if bn_name is None:  # no BN: nothing fixes the scale of the pre-activations
                out[i] = None
                continue
            bn = self.modules[bn_name]
            g, var = _bn_gamma(bn), bn.running_var.detach().to(torch.float64)
            scale = g.abs() * torch.sqrt(var / (var + float(bn.eps)))
            r = corr.get(bn_name)
            if r is None:
                r = lstsq.whitened_correlation(
                    self.modules[prod].weight.detach().reshape(g.numel(), -1), g
                )
            out[i] = lstsq.gaussian_moments(_bn_beta(bn), scale, r)
        return out

    # ---- selection ---------------------------------------------------------------
    def select(self, i: int, rows: Tensor, keep: int, default: Tensor, criterion: object) -> Tensor:
        """Group ``i``'s kept set under ``config.selection`` (``default``: the criterion's)."""
        how = self.config.selection  # type: ignore[attr-defined]
        n = rows.shape[0]
        if how == "criterion" or keep >= n:
            return default
        prod, bn_name, cons, fpc = group_fields(self.groups[i])
        producer, bn = self.modules[prod], self.modules[bn_name] if bn_name else None
        cols = consumer_columns(self.modules[cons], n, fpc)
        fn = get_criterion(criterion) if isinstance(criterion, str) else criterion
        if how == "group":
            bn_scale = _bn_gamma(bn) / _bn_sigma(bn) if bn is not None else None
            flat = cols.transpose(0, 1).reshape(n, -1)
            from .select import top_k

            return top_k(group_scores(rows, flat, bn_scale, fn), keep)
        if how == "cover":
            return cover_select(
                merge_vectors(producer, bn), keep, self._cover_weights(fn, rows, cols)
            )
        if how == "lstsq":
            mom = self.moments(i)
            if mom is None:  # no batch norm and no data: nothing to estimate C with
                return default
            return lstsq.lstsq_select(mom[1], _colgram(cols), keep)
        raise ValueError(f"unknown selection {how!r} (auto is resolved by compress)")

    @staticmethod
    def _cover_weights(fn: object, rows: Tensor, cols: Tensor) -> Tensor:
        """Importance weights of the cover: the criterion's scores of the producer rows."""
        return fn(rows).to(torch.float64)  # type: ignore[operator]

    # ---- compensation --------------------------------------------------------------
    def compensation(self, i: int, plan: object) -> Compensation:
        """The :class:`Compensation` of group ``i`` under the config."""
        cfg = self.config
        kept, pruned = plan.kept, plan.pruned  # type: ignore[attr-defined]
        n = kept.numel() + pruned.numel()
        prod, bn_name, _c, _f = group_fields(self.groups[i])
        merge = cfg.mode == "merge"  # type: ignore[attr-defined]
        alpha = None
        mom = None
        if cfg.compensation in ("lstsq",) or cfg.repair != "none":  # type: ignore[attr-defined]
            mom = self.moments(i)
        if merge and cfg.compensation == "fold":  # type: ignore[attr-defined]
            bn = self.modules[bn_name] if bn_name else None
            fold = kmeans_fold(
                merge_vectors(self.modules[prod], bn),
                kept,
                threshold=cfg.threshold,  # type: ignore[attr-defined]
            )
            alpha = fold.alpha
            mix = torch.zeros(n, kept.numel(), dtype=torch.float64)
            mix[torch.arange(n), fold.assign] = fold.scale
            delta = None
            if mom is not None and cfg.repair != "none":  # type: ignore[attr-defined]
                mean = mom[0]
                pos = fold.scale > 0
                est = torch.zeros(kept.numel(), dtype=torch.float64)
                w = alpha * pos.to(torch.float64)[None, :]
                est = (w * torch.where(pos, mean / fold.scale.clamp_min(1e-300), 0.0)).sum(1)
                est = est / w.sum(1).clamp_min(1e-300)
                delta = mean - mix @ est
            cov = mom[1] if mom is not None and cfg.repair == "mean+var" else None  # type: ignore[attr-defined]
            return Compensation(mix, delta, alpha, cov)
        if merge and cfg.compensation == "lstsq" and mom is not None:  # type: ignore[attr-defined]
            mix, delta = lstsq.solve_mix(mom[1], mom[0], kept, cfg.ridge)  # type: ignore[attr-defined]
            if cfg.repair == "none":  # type: ignore[attr-defined]
                delta = None
        else:
            mix = lstsq.mix_from_partners(n, kept, pruned, plan.partner, plan.scale)  # type: ignore[attr-defined]
            delta = None
            if mom is not None and cfg.repair != "none":  # type: ignore[attr-defined]
                delta = mom[0] - mix @ mom[0][kept]
        cov = mom[1] if mom is not None and cfg.repair == "mean+var" else None  # type: ignore[attr-defined]
        return Compensation(mix, delta, alpha, cov)

    def post_build(self, work: dict[str, nn.Module], plans: Sequence[object]) -> None:
        """Rewrite the compressed model's tensors from the original's under the config."""
        comps = {}
        for plan in plans:
            i = self.index[group_fields(plan.group)[0]]  # type: ignore[attr-defined]
            if plan.pruned.numel() == 0:  # type: ignore[attr-defined]
                continue
            comps[i] = (plan, self.compensation(i, plan))
        self.folded = frozenset(
            group_fields(self.groups[i])[0] for i, (_p, c) in comps.items() if c.alpha is not None
        )
        consumers = [group_fields(self.groups[i])[2] for i in comps]
        succ = successor_bns(self.original, self.example_inputs, consumers)
        apply_compensations(self.modules, work, self.groups, comps, succ)


def _set(module: nn.Module, name: str, value: Tensor) -> None:
    old = getattr(module, name)
    value = value.to(old.dtype).contiguous()
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(module, name, value)


def apply_compensations(
    original: dict[str, nn.Module],
    work: dict[str, nn.Module],
    groups: Sequence[object],
    comps: dict[int, tuple[object, Compensation]],
    successors: dict[str, str],
) -> None:
    """Recompute every touched layer of ``work`` from ``original`` (see the module doc).

    Per layer: the consumer mix on its input channels, then the shift ``W·δ``
    (and the variance ratio) on its outputs, then the producer's row map. The
    shift goes into the producer's own BN mean or bias when the layer is a
    producer of another group, else into the consumer's bias, else into the
    running mean of its successor batch norm; with none of them it is dropped.
    """
    as_consumer: dict[str, tuple[int, object, Compensation]] = {}
    as_producer: dict[str, tuple[int, object, Compensation]] = {}
    for i, (plan, comp) in comps.items():
        prod, _bn, cons, _f = group_fields(groups[i])
        as_producer[prod] = (i, plan, comp)
        as_consumer[cons] = (i, plan, comp)
    with torch.no_grad():
        for name in set(as_consumer) | set(as_producer):
            layer = original[name]
            w = layer.weight.detach().to(torch.float64)
            out_ch = w.shape[0]
            shift = torch.zeros(out_ch, dtype=torch.float64)
            ratio: Tensor | None = None
            if name in as_consumer:
                i, plan, comp = as_consumer[name]
                n = comp.mix.shape[0]
                cols = w.reshape(out_ch, n, -1)
                new_cols = torch.einsum("onu,nk->oku", cols, comp.mix)
                if comp.delta is not None:
                    shift = torch.einsum("onu,n->o", cols, comp.delta)
                if comp.cov is not None:
                    kept = plan.kept  # type: ignore[attr-defined]
                    v_old = torch.einsum("onu,nm,omu->o", cols, comp.cov, cols)
                    ckk = comp.cov[kept][:, kept]
                    v_new = torch.einsum("oku,kl,olu->o", new_cols, ckk, new_cols)
                    ratio = torch.where(v_old > 0, v_new / v_old.clamp_min(1e-300), 1.0)
                    ratio = ratio.clamp(1e-3, 1e3)
                w = new_cols.reshape(out_ch, -1, *layer.weight.shape[2:])
                if layer.weight.dim() == 2:
                    w = w.reshape(out_ch, -1)
            bias = layer.bias.detach().to(torch.float64) if layer.bias is not None else None
            if name in as_producer:
                j, pplan, pcomp = as_producer[name]
                _p, bn_name, _c, _f = group_fields(groups[j])
                kept = pplan.kept  # type: ignore[attr-defined]
                if bn_name is not None:
                    bn_o, bn_w = original[bn_name], work[bn_name]
                    mean = bn_o.running_mean.detach().to(torch.float64) - shift
                    var = bn_o.running_var.detach().to(torch.float64)
                    if ratio is not None:
                        var = var * ratio
                    gamma, beta = _bn_gamma(bn_o), _bn_beta(bn_o)
                    if pcomp.alpha is None:
                        for attr, val in (("running_mean", mean), ("running_var", var)):
                            _set(bn_w, attr, val[kept])
                        rows = w[kept]
                        bias_new = bias[kept] if bias is not None else None
                    else:
                        eps = float(bn_o.eps)
                        sigma = torch.sqrt(var + eps)
                        mu = mean - (bias if bias is not None else 0.0)
                        r = pcomp.alpha * (gamma / sigma)[None, :]
                        rows = r @ w.reshape(out_ch, -1)
                        rows = rows.reshape(-1, *w.shape[1:])
                        k = rows.shape[0]
                        _set(bn_w, "running_mean", torch.zeros(k, dtype=torch.float64))
                        _set(bn_w, "running_var", torch.full((k,), 1.0 - eps, dtype=torch.float64))
                        if bn_w.weight is not None:
                            _set(bn_w, "weight", torch.ones(k, dtype=torch.float64))
                        if bn_w.bias is not None:
                            _set(bn_w, "bias", pcomp.alpha @ (beta - gamma * mu / sigma))
                        bias_new = torch.zeros(k, dtype=torch.float64) if bias is not None else None
                else:
                    b = None if bias is None else bias + shift
                    if pcomp.alpha is None:
                        rows, bias_new = w[kept], (b[kept] if b is not None else None)
                    else:
                        rows = (pcomp.alpha @ w.reshape(out_ch, -1)).reshape(-1, *w.shape[1:])
                        bias_new = pcomp.alpha @ b if b is not None else None
                w = rows
                if bias_new is not None:
                    _set(work[name], "bias", bias_new)
            else:
                if bias is not None:
                    _set(work[name], "bias", bias + shift)
                elif name in successors:
                    bn_o, bn_w = original[successors[name]], work[successors[name]]
                    _set(bn_w, "running_mean", bn_o.running_mean.detach().double() - shift)
                    if ratio is not None:
                        _set(bn_w, "running_var", bn_o.running_var.detach().double() * ratio)
            _set(work[name], "weight", w)
