"""The public verbs: :func:`compress`, :func:`merge` and :func:`prune`.

The pipeline is discover (:mod:`.groups`) → select (:mod:`.criteria`) →
assign (:mod:`.partners`) → apply (:mod:`.surgery`). Every plan is computed
from the original weights before the copy is modified; the input model is
never touched.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ._copy import ModelTensors, aliasing_copy, check_finite, unshare
from .assign import BNStats, Workspace, assign_bn, assign_plain
from .build import GroupPlan, apply_plans
from .calibrate import calibrate
from .compensate import Extras
from .config import DEFAULT_LAMBDA, DEFAULT_THRESHOLD, MergeConfig
from .errors import ConfigError, ModelError
from .groups import MergeGroup, SkippedLayer, _find_groups, resolve_groups
from .report import GroupReport, MergeReport
from .select import CriterionFn, select_kept

ExampleInputs = Tensor | Sequence[Tensor] | None
GroupSpec = MergeGroup | tuple[str, str | None, str]


@dataclass
class MergeResult:
    """The outcome of :func:`merge` / :func:`prune`.

    Attributes:
        model: a new, smaller module (the input model is untouched).
        report: per-group counts, skipped layers and parameter counts.
        plans: the exact kept indices, partners and scales of every group.
    """

    model: nn.Module
    report: MergeReport
    plans: list[GroupPlan]


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _rows(layer: nn.Module, with_bias: bool) -> Tensor:
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    if with_bias and layer.bias is not None:
        w = torch.cat([w, layer.bias.detach().reshape(-1, 1)], dim=1)
    return w


def _bn_stats(bn: nn.Module, producer: nn.Module) -> BNStats:
    n = bn.num_features
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones(n)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros(n)
    if bn.running_mean is None or bn.running_var is None:
        raise ModelError("batch norm without running statistics cannot be merged")
    mean = bn.running_mean.detach()
    if producer.bias is not None:
        mean = mean - producer.bias.detach()
    return BNStats(gamma, beta, mean, bn.running_var.detach(), float(bn.eps))


def _targets(
    config: MergeConfig,
    groups: list[MergeGroup],
    skipped: list[SkippedLayer],
    modules: dict[str, nn.Module],
) -> list[tuple[MergeGroup, int, int]]:
    """(group, neurons, kept count) for every group that is compressed."""
    producers = {g.producer: g for g in groups}
    reasons = {s.name: s.reason for s in skipped}
    for name in list(config.keep) + list(config.exclude):
        if name not in producers:
            why = f" ({reasons[name]})" if name in reasons else ""
            if name in reasons or name in modules:
                raise ConfigError(f"layer {name!r} is not a mergeable producer{why}")
            raise ConfigError(
                f"unknown layer {name!r}; mergeable producers: {', '.join(producers) or 'none'}"
            )
    out = []
    for group in groups:
        if group.producer in config.exclude:
            continue
        layer = modules[group.producer]
        n = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if group.producer in config.keep:
            k = config.keep[group.producer]
            if k > n:
                raise ConfigError(f"keep[{group.producer!r}] = {k} exceeds its {n} neurons")
        else:
            k = config.kept_count(n)
            if k < 1:
                raise ConfigError(
                    f"ratio {config.ratio} leaves layer {group.producer!r} with 0 of {n} neurons"
                )
        out.append((group, n, k))
    return out


#: Groups whose ``[w | b]`` rows have at most this many elements are planned
#: together with their same-shaped siblings (stacked, so one call serves them
#: all); larger groups are planned alone, where per-call overhead is negligible
#: and a stacked copy would only cost memory.
_BATCH_ELEMENTS = 1 << 20


def _plan(
    targets: list[tuple[MergeGroup, int, int]],
    modules: dict[str, nn.Module],
    config: MergeConfig,
    criterion_fn: CriterionFn | None,
    timings: dict[str, float],
    extras: Extras | None = None,
) -> list[GroupPlan]:
    """Select the kept neurons of every target group and assign partners to the rest.

    Groups with the same shape (``n``, ``k``, row width, batch norm or not) are
    processed as one batch; the result is the same, group by group, as planning
    each alone.
    """
    buckets: dict[tuple[object, ...], list[int]] = {}
    for i, (group, n, k) in enumerate(targets):
        producer = modules[group.producer]
        bn = modules[group.bn] if group.bn is not None else None
        with_bias = bn is None and producer.bias is not None
        width = producer.weight[0].numel() + int(with_bias)
        dtypes = (producer.weight.dtype, producer.bias.dtype if with_bias else None)
        eps = float(bn.eps) if bn is not None else None
        key = (n, k, width, dtypes, bn is None, eps) if n * width <= _BATCH_ELEMENTS else (i,)
        buckets.setdefault(key, []).append(i)
    plans: list[GroupPlan | None] = [None] * len(targets)
    workspace = Workspace()
    for members in buckets.values():
        _, n, k = targets[members[0]]
        # [w | b] rows (a copy when a bias is appended) only for this bucket, so the
        # copies of every producer are never held at once.
        producers = [modules[targets[i][0].producer] for i in members]
        bns = [modules[name] if (name := targets[i][0].bn) else None for i in members]
        batch = [_rows(prod, with_bias=bn is None) for prod, bn in zip(producers, bns, strict=True)]
        rows = batch[0].unsqueeze(0) if len(batch) == 1 else torch.stack(batch)
        del batch
        b = len(members)
        t0 = time.perf_counter()
        if k == n:  # nothing to prune: no need to score
            kept = torch.arange(n).expand(b, n)
            pruned = torch.zeros(b, 0, dtype=torch.long)
        else:
            kept = select_kept(rows, k, criterion_fn or config.criterion)
            if extras is not None:  # selection beyond the criterion's top scores
                kept = torch.stack(
                    [
                        extras.select(i, rows[j], k, kept[j], criterion_fn or config.criterion)
                        for j, i in enumerate(members)
                    ]
                )
            mask = torch.ones(b, n, dtype=torch.bool)
            mask.scatter_(1, kept, False)
            pruned = mask.nonzero()[:, 1].view(b, n - k)
        timings["select"] += time.perf_counter() - t0
        p = n - k
        if config.mode == "prune" or p == 0:
            partner = torch.full((b, p), -1, dtype=torch.long)
            scale, similarity = torch.zeros(b, p), torch.zeros(b, p)
        else:
            if bns[0] is None:
                assignment = assign_plain(rows, kept, pruned, config.threshold, workspace)
            else:
                stats = _stack_stats(
                    [_bn_stats(bn, prod) for prod, bn in zip(producers, bns, strict=True)]  # type: ignore[arg-type]
                )
                assignment = assign_bn(
                    rows,
                    stats,
                    kept,
                    pruned,
                    config.threshold,
                    config.lam,
                    config.bn_rule,
                    workspace,
                )
            timings["similarity"] += assignment.timings["similarity"]
            timings["assign"] += assignment.timings["assign"]
            partner, scale, similarity = (
                assignment.partner,
                assignment.scale,
                assignment.similarity,
            )
        for j, i in enumerate(members):
            plans[i] = GroupPlan(
                targets[i][0], kept[j], pruned[j], partner[j], scale[j], similarity[j]
            )
    return [plan for plan in plans if plan is not None]  # every slot is filled


def _stack_stats(stats: list[BNStats]) -> BNStats:
    """One :class:`BNStats` of ``(B, n)`` tensors from ``B`` groups' ``(n,)`` statistics."""
    return BNStats(
        torch.stack([s.gamma for s in stats]),
        torch.stack([s.beta for s in stats]),
        torch.stack([s.mean for s in stats]),
        torch.stack([s.var for s in stats]),
        stats[0].eps,
    )


def compress(
    model: nn.Module,
    example_inputs: ExampleInputs,
    config: MergeConfig,
    *,
    groups: Sequence[GroupSpec] | None = None,
    criterion_fn: CriterionFn | None = None,
    calibration: Tensor | Sequence[Tensor] | None = None,
) -> MergeResult:
    """Prune (``config.mode="prune"``) or merge (``"merge"``) ``model``.

    Args:
        model: any module built from ``nn.Linear``/``nn.Conv2d`` producers whose
            groups can be found by :func:`~neuron_merging.core.groups.find_groups`.
        example_inputs: a tensor or tuple of tensors ``model`` accepts (batch 1 is
            enough); used only for tracing. May be ``None`` when ``groups`` is given.
        config: the compression settings.
        groups: explicit merge groups, for models ``torch.fx`` cannot trace.
        criterion_fn: a custom criterion overriding ``config.criterion``.
        calibration: optional unlabeled inputs (a tensor or tuple of tensors
            ``model`` accepts, batch first). No labels and no gradients are
            used: they give measured moments to ``selection``/``compensation``/
            ``repair`` and run the ``config.calibrate`` steps.

    Returns:
        A :class:`MergeResult` with the new model, its report and the plans.
    """
    timings = {
        "trace": 0.0,
        "select": 0.0,
        "similarity": 0.0,
        "assign": 0.0,
        "fold": 0.0,
        "rebuild": 0.0,
    }
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors = ModelTensors.of(model)
    check_finite(model, tensors)
    t0 = time.perf_counter()
    work = aliasing_copy(model, tensors)
    modules = dict(work.named_modules())
    training = [m for m in modules.values() if m.training]
    if training:
        work.eval()
    timings["rebuild"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    if groups is not None:
        found, skipped = resolve_groups(work, groups), []
    else:
        if example_inputs is None:
            raise ConfigError("example_inputs are required to trace the model (or pass groups=)")
        found, skipped = _find_groups(work, example_inputs, modules)
    timings["trace"] = time.perf_counter() - t0
    targets = _targets(config, found, skipped, modules)
    extras = None
    if config.beyond_paper or calibration is not None:
        extras = Extras(config, model, example_inputs, [t[0] for t in targets], calibration)

    with torch.no_grad():
        plans = _plan(targets, modules, config, criterion_fn, timings, extras)
    if not found:
        warnings.warn(
            f"{type(model).__name__} has no mergeable group; returning an unchanged copy",
            stacklevel=2,
        )
    t0 = time.perf_counter()
    apply_plans(work, plans, modules)
    timings["fold"] = time.perf_counter() - t0
    if extras is not None:
        t0 = time.perf_counter()
        extras.post_build(modules, plans)
        timings["compensate"] = time.perf_counter() - t0
        if calibration is not None and config.calibrate:
            t0 = time.perf_counter()
            calibrate(
                model,
                work,
                extras.groups,
                plans,
                calibration,
                config.calibrate,
                config.ridge,
                extras.folded,
            )
            timings["calibrate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for module in training:  # each module back in its own mode
        module.training = True
    result_tensors = unshare(work, tensors)
    timings["rebuild"] += time.perf_counter() - t0
    timings["total"] = sum(timings.values())

    group_reports = [
        GroupReport(
            p.group.producer,
            p.group.bn,
            p.group.consumer,
            p.kept.numel() + p.pruned.numel(),
            p.kept.numel(),
            p.pruned.numel(),
            p.merged,
        )
        for p in plans
    ]
    excluded = [
        SkippedLayer(g.producer, "excluded by the user")
        for g in found
        if g.producer in config.exclude
    ]
    report = MergeReport(
        mode=config.mode,
        config=config.to_dict(),
        groups=group_reports,
        skipped=skipped + excluded,
        params_before=tensors.parameter_count(),
        params_after=result_tensors.parameter_count(),
        timings=timings,
    )
    return MergeResult(work, report, plans)


def _config(
    config: MergeConfig | None, mode: str, criterion: str | CriterionFn, **kwargs: Any
) -> tuple[MergeConfig, CriterionFn | None]:
    fn = None if isinstance(criterion, str) else criterion
    name = criterion if isinstance(criterion, str) else "l1-norm"
    if config is not None:
        return replace(config, mode=mode), fn
    return MergeConfig(mode=mode, criterion=name, **kwargs), fn


def merge(
    model: nn.Module,
    example_inputs: ExampleInputs = None,
    *,
    ratio: float = 0.5,
    criterion: str | CriterionFn = "l1-norm",
    threshold: float | None = DEFAULT_THRESHOLD,
    lam: float = DEFAULT_LAMBDA,
    bn_rule: str = "paper",
    rounding: str = "round",
    keep: Mapping[str, int] | None = None,
    exclude: Sequence[str] | None = None,
    groups: Sequence[GroupSpec] | None = None,
    config: MergeConfig | None = None,
) -> MergeResult:
    """Remove ``ratio`` of every group's neurons and merge them into kept ones.

    Each pruned neuron is folded into its most similar kept neuron (its partner)
    and the consumer's weights absorb the scale, so the smaller model stays close
    to the original without data or fine-tuning. See :class:`MergeConfig` for the
    meaning of every argument; ``config`` overrides them all.

    Example::

        >>> import torch, neuron_merging as nm
        >>> net = torch.nn.Sequential(
        ...     torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        >>> result = nm.merge(net, torch.randn(1, 8), ratio=0.5, threshold=None)
        >>> result.model[0].out_features, result.model[2].in_features
        (8, 8)
        >>> net[0].out_features  # the input model is untouched
        16
    """
    cfg, fn = _config(
        config,
        "merge",
        criterion,
        ratio=ratio,
        threshold=threshold,
        lam=lam,
        bn_rule=bn_rule,
        rounding=rounding,
        keep=dict(keep or {}),
        exclude=tuple(exclude or ()),
    )
    return compress(model, example_inputs, cfg, groups=groups, criterion_fn=fn)


def prune(
    model: nn.Module,
    example_inputs: ExampleInputs = None,
    *,
    ratio: float = 0.5,
    criterion: str | CriterionFn = "l1-norm",
    rounding: str = "round",
    keep: Mapping[str, int] | None = None,
    exclude: Sequence[str] | None = None,
    groups: Sequence[GroupSpec] | None = None,
    config: MergeConfig | None = None,
) -> MergeResult:
    """Remove ``ratio`` of every group's neurons without compensation.

    The same selection as :func:`merge`, but pruned neurons are simply dropped;
    this is the baseline merging is measured against.

    Example::

        >>> import torch, neuron_merging as nm
        >>> net = torch.nn.Sequential(
        ...     torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        >>> nm.prune(net, torch.randn(1, 8), ratio=0.25).report.params_after
        147
    """
    cfg, fn = _config(
        config,
        "prune",
        criterion,
        ratio=ratio,
        rounding=rounding,
        keep=dict(keep or {}),
        exclude=tuple(exclude or ()),
    )
    return compress(model, example_inputs, cfg, groups=groups, criterion_fn=fn)
