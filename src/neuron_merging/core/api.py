"""The public verbs: :func:`compress`, :func:`merge` and :func:`prune`.

One straight way through the pipeline: copy the model, record one forward pass
(:mod:`.record`), find its channel groups (:mod:`.groups`), select the kept channels
(:mod:`.select`), assign partners and scales (:mod:`.assign`), then build the smaller
model once (:mod:`.build`). Every plan is computed from the original weights before
the copy is modified; the input model is never touched.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import types
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ._copy import (
    ModelTensors,
    StateMarks,
    WorkCopy,
    aliasing_copy,
    check_finite,
    check_on_cpu,
    unshare,
)
from .approx import assign_approx
from .assign import BNStats, Workspace, assign_bn, assign_plain
from .build import GroupPlan, apply_plans
from .calibrate import calibrate
from .compensate import Extras
from .config import DEFAULT_LAMBDA, DEFAULT_THRESHOLD, MergeConfig
from .errors import ConfigError, ModelError
from .groups import (
    NOT_RUN,
    ChannelGroup,
    MergeGroup,
    SkippedLayer,
    groups_from_recording,
    listed_briefly,
    resolve_groups,
)
from .record import (
    as_inputs,
    check_recordable,
    evaluating,
    is_conv1d_transposed,
    materialise_reparametrisations,
    recorded,
)
from .report import GroupReport, MergeReport
from .select import CriterionFn, select_kept

ExampleInputs = Tensor | Sequence[Tensor] | Mapping[str, Tensor] | None
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


def _weight_rows(layer: nn.Module) -> Tensor:
    """The layer's weight as ``(out channels, inputs)`` (GPT-2's ``Conv1D`` stores it
    transposed, a transposed convolution as ``(in, out, *kernel)``)."""
    w = layer.weight.detach()
    if is_conv1d_transposed(layer):
        return w.t()
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        w = w.transpose(0, 1)
    return w.reshape(w.shape[0], -1)


def _rows(layer: nn.Module, with_bias: bool) -> Tensor:
    w = _weight_rows(layer)
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


def _effective_rows(group: ChannelGroup, modules: dict[str, nn.Module], rule: str) -> Tensor:
    """All producers' affine maps, batch norm folded in, side by side: ``(n, Σ width + 1)``.

    For producer ``F`` with batch norm, channel ``c`` computes
    ``(γ_c/σ_c)·(F_c·x − μ_c) + β_c``, i.e. the row ``[(γ_c/σ_c)·F_c | β_c − γ_c·μ_c/σ_c]``
    (``σ`` as the BN rule defines it: ``running_var`` for ``paper``, ``sqrt(var + eps)``
    for ``exact``); without batch norm it is ``[F_c | b_c]``. When every producer's
    row for ``n`` is ``s`` times its row for ``m``, so is this concatenation, and the
    plain rule (cosine similarity, norm ratio) recovers ``s`` exactly.
    """
    parts = []
    for name, bn_name in zip(group.producers, group.bns, strict=True):
        layer = modules[name]
        w = _weight_rows(layer).to(torch.float64)
        if bn_name is None:
            bias = layer.bias.detach() if layer.bias is not None else torch.zeros(w.shape[0])
            parts += [w, bias.to(torch.float64).reshape(-1, 1)]
            continue
        stats = _bn_stats(modules[bn_name], layer)
        var = stats.var.to(torch.float64)
        sigma = var if rule == "paper" else torch.sqrt(var + stats.eps)
        a = stats.gamma.to(torch.float64) / sigma
        parts += [
            w * a.unsqueeze(1),
            (stats.beta - a * stats.mean).to(torch.float64).reshape(-1, 1),
        ]
    rows = torch.cat(parts, dim=1)
    return rows.to(modules[group.producers[0]].weight.dtype)


def _selection_rows(group: ChannelGroup, modules: dict[str, nn.Module]) -> Tensor:
    """Rows the criterion scores: ``[w | b]`` of every producer (no bias when BN follows)."""
    parts = [
        _rows(modules[name], with_bias=bn is None)
        for name, bn in zip(group.producers, group.bns, strict=True)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _targets(
    config: MergeConfig,
    groups: list[ChannelGroup],
    skipped: list[SkippedLayer],
    modules: dict[str, nn.Module],
) -> list[tuple[ChannelGroup, int, int]]:
    """(group, channels, kept count) for every group that is compressed."""
    names = {g.name: g for g in groups}
    members = {p: g.name for g in groups for p in g.producers}
    reasons = {s.name: s.reason for s in skipped}
    for name in list(config.keep) + list(config.exclude):
        if name not in names:
            if name in members:
                raise ConfigError(
                    f"layer {name!r} belongs to the channel group named {members[name]!r}; "
                    "use that name"
                )
            why = f" ({reasons[name]})" if name in reasons else ""
            if name in reasons or name in modules:
                raise ConfigError(f"layer {name!r} is not a mergeable producer{why}")
            raise ConfigError(
                f"unknown layer {name!r}; mergeable producers: {', '.join(names) or 'none'}"
            )
    out = []
    for group in groups:
        if group.name in config.exclude:
            continue
        n = group.channels
        if group.name in config.keep:
            k = config.keep[group.name]
            if k > n:
                raise ConfigError(f"keep[{group.name!r}] = {k} exceeds its {n} neurons")
        else:
            k = config.kept_count(n)
            if k < 1:
                raise ConfigError(
                    f"ratio {config.ratio} leaves layer {group.name!r} with 0 of {n} neurons"
                )
        out.append((group, n, k))
    return out


#: Groups whose ``[w | b]`` rows have at most this many elements are planned
#: together with their same-shaped siblings (stacked, so one call serves them
#: all); larger groups are planned alone, where per-call overhead is negligible
#: and a stacked copy would only cost memory.
_BATCH_ELEMENTS = 1 << 20


def _plan(
    targets: list[tuple[ChannelGroup, int, int]],
    modules: dict[str, nn.Module],
    config: MergeConfig,
    criterion_fn: CriterionFn | None,
    timings: dict[str, float],
    extras: Extras | None = None,
    capable: frozenset[str] = frozenset(),
) -> list[GroupPlan]:
    """Select the kept channels of every target group and assign partners to the rest.

    ``extras`` select the kept channels of the groups named in ``capable``
    (:func:`_capable`); every other group keeps the criterion's top scores.

    Groups with the same shape (``n``, ``k``, row width, batch norm or not) are
    processed as one batch; the result is the same, group by group, as planning
    each alone. A group with one producer uses the paper's rules (no batch norm, or
    Algorithm 3 with ``bn_rule``); a group with several producers is assigned on
    their batch-norm-folded rows side by side (:func:`_effective_rows`).
    """
    buckets: dict[tuple[object, ...], list[int]] = {}
    for i, (group, n, k) in enumerate(targets):
        producer = modules[group.producer]
        bn = modules[group.bn] if group.bn is not None else None
        with_bias = bn is None and producer.bias is not None
        width = _weight_rows(producer).shape[1] + int(with_bias)
        dtypes = (producer.weight.dtype, producer.bias.dtype if with_bias else None)
        eps = float(bn.eps) if bn is not None else None
        approximate = _approximates(group, config)
        batchable = len(group.producers) == 1 and n * width <= _BATCH_ELEMENTS and not approximate
        merges = config.mode == "merge" and group.mergeable
        key = (n, k, width, dtypes, bn is None, eps, merges) if batchable else (i,)
        buckets.setdefault(key, []).append(i)
    plans: list[GroupPlan | None] = [None] * len(targets)
    workspace = Workspace()
    for members in buckets.values():
        first, n, k = targets[members[0]]
        # Rows (a copy when a bias is appended) only for this bucket, so the copies of
        # every producer are never held at once.
        batch = [_selection_rows(targets[i][0], modules) for i in members]
        rows = batch[0].unsqueeze(0) if len(batch) == 1 else torch.stack(batch)
        del batch
        b = len(members)
        t0 = time.perf_counter()
        if k == n:  # nothing to prune: no need to score
            kept = torch.arange(n).expand(b, n)
            pruned = torch.zeros(b, 0, dtype=torch.long)
        else:
            kept = select_kept(rows, k, criterion_fn or config.criterion)
            if extras is not None and all(
                targets[i][0].name in capable for i in members
            ):  # selection beyond the criterion's top scores
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
        if p and _approximates(first, config):
            assignment = _assign_approx(first, modules, kept[0], pruned[0], config.bn_rule)
            timings["assign"] += assignment.timings.get("assign", 0.0)
            partner = assignment.partner.unsqueeze(0)
            scale = assignment.scale.unsqueeze(0)
            similarity = assignment.similarity.unsqueeze(0)
        elif config.mode == "prune" or p == 0 or not first.mergeable:
            partner = torch.full((b, p), -1, dtype=torch.long)
            scale, similarity = torch.zeros(b, p), torch.zeros(b, p)
        else:
            if len(first.producers) > 1:
                effective = _effective_rows(first, modules, config.bn_rule).unsqueeze(0)
                assignment = assign_plain(effective, kept, pruned, config.threshold, workspace)
            elif first.bn is None:
                assignment = assign_plain(rows, kept, pruned, config.threshold, workspace)
            else:
                stats = _stack_stats(
                    [
                        _bn_stats(modules[targets[i][0].bn], modules[targets[i][0].producer])  # type: ignore[index]
                        for i in members
                    ]
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
                targets[i][0],
                kept[j],
                pruned[j],
                partner[j],
                scale[j],
                similarity[j],
                approximate=_approximates(targets[i][0], config),
            )
    return [plan for plan in plans if plan is not None]  # every slot is filled


def _beyond_paper(group: ChannelGroup, modules: dict[str, nn.Module]) -> bool:
    """Whether the options beyond the paper (:mod:`.compensate`, :mod:`.calibrate`) apply.

    They are written for the paper's groups: one producer (and its batch norm), one
    consumer, nothing sliced in between, merged exactly, standard weight layouts, and
    layers on ``(batch, features)`` or images (their statistics and refits read the
    channels at dimension 1).
    """
    return (
        group.simple
        and group.mergeable
        and group.standard_layout
        and not any(is_conv1d_transposed(modules[n]) for n in (group.producer, group.consumer))
    )


def _capable(
    targets: list[tuple[ChannelGroup, int, int]], modules: dict[str, nn.Module]
) -> frozenset[str]:
    """The groups that use the options beyond the paper: :func:`_beyond_paper`, and no
    layer of theirs shared with a group that prunes under the paper's options.

    Those options rewrite each of their layers whole from the original (its rows and
    its columns), so a layer whose other side another kind of group compresses (a
    consumer of a GELU group that produces a ReLU group) would lose that group's
    slicing, and the model its shapes. Demoting such a group can demote its
    neighbours in turn, so this runs to a fixed point.
    """
    capable = {g.name for g, _n, _k in targets if _beyond_paper(g, modules)}
    layers = {
        g.name: {*g.producers, *(b for b in g.bns if b), *g.consumers, *g.passthrough}
        for g, _n, _k in targets
    }
    changed = True
    while changed:
        touched: set[str] = set()
        for g, n, k in targets:
            if g.name not in capable and k < n:
                touched |= layers[g.name]
        demoted = {name for name in capable if layers[name] & touched}
        capable -= demoted
        changed = bool(demoted)
    return frozenset(capable)


def _approximates(group: ChannelGroup, config: MergeConfig) -> bool:
    """Whether ``group`` is merged approximately under ``config``."""
    return (
        config.mode == "merge"
        and config.approximate
        and not group.mergeable
        and group.activation is not None
    )


def _folded(
    name: str, bn_name: str | None, modules: dict[str, nn.Module], rule: str
) -> tuple[Tensor, Tensor | None]:
    """A producer's rows and bias as its activation sees them (batch norm folded in)."""
    layer = modules[name]
    rows = _weight_rows(layer)
    bias = layer.bias.detach() if layer.bias is not None else None
    if bn_name is None:
        return rows, bias
    stats = _bn_stats(modules[bn_name], layer)
    sigma = stats.var if rule == "paper" else torch.sqrt(stats.var + stats.eps)
    a = stats.gamma / sigma
    return rows * a.unsqueeze(1), stats.beta - a * stats.mean


def _assign_approx(
    group: ChannelGroup, modules: dict[str, nn.Module], kept: Tensor, pruned: Tensor, rule: str
) -> Any:
    """Least-squares partners and scales through the group's activation (:mod:`.approx`)."""
    t0 = time.perf_counter()
    bns = dict(zip(group.producers, group.bns, strict=True))
    gate = group.gate or group.producer
    rows, bias = _folded(gate, bns[gate], modules, "exact")
    up_rows = up_bias = None
    if group.gate is not None:
        (up,) = [p for p in group.producers if p != gate]
        up_rows, up_bias = _folded(up, bns[up], modules, "exact")
    assignment = assign_approx(
        rows, bias, kept, pruned, str(group.activation), up_rows=up_rows, up_bias=up_bias
    )
    assignment.timings = {"assign": time.perf_counter() - t0}
    return assignment


def _stack_stats(stats: list[BNStats]) -> BNStats:
    """One :class:`BNStats` of ``(B, n)`` tensors from ``B`` groups' ``(n,)`` statistics."""
    return BNStats(
        torch.stack([s.gamma for s in stats]),
        torch.stack([s.beta for s in stats]),
        torch.stack([s.mean for s in stats]),
        torch.stack([s.var for s in stats]),
        stats[0].eps,
    )


def _work_copy(
    model: nn.Module, tensors: ModelTensors
) -> tuple[WorkCopy, dict[str, nn.Module], list[str]]:
    """A copy of ``model`` to record and build on, its modules, and notes on what changed:
    re-parametrised layers hold their plain weights in it."""
    copied = aliasing_copy(model, tensors)
    modules = dict(copied.model.named_modules())
    notes = materialise_reparametrisations(copied.model, modules)
    if notes:  # their parametrization containers are gone
        modules = dict(copied.model.named_modules())
    return copied, modules, notes


def _warn_given_written(
    model: nn.Module, tensors: ModelTensors, versions: list[int], notes: list[str]
) -> None:
    """Warn, and note, when the recorded pass wrote the given model's own tensors: code
    that refers to the model itself (a hook closing over it), which no copy redirects."""
    written = {
        id(t)
        for t, v in zip((*tensors.params, *tensors.buffers), versions, strict=True)
        if t._version != v
    }
    if not written:
        return
    names = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if id(t) in written]
    notes.append(
        f"code run by the model's forward wrote into the given model's own state "
        f"({', '.join(names)}): it refers to that model itself (a hook or function closing "
        "over it), so the copy that compression records could not take the write"
    )
    warnings.warn(notes[-1], stacklevel=4)


def _unwritten(
    found: list[ChannelGroup], skipped: list[SkippedLayer], written: set[str]
) -> tuple[list[ChannelGroup], list[SkippedLayer]]:
    """The groups none of whose producers, batch norms and consumers the recorded pass
    wrote (their plans would be made from values that the given model does not hold); the
    others are skipped."""
    keep, out = [], list(skipped)
    for group in found:
        # What a plan is made from (a layer sliced in between is sliced whatever it holds)
        layers = {*group.producers, *(b for b in group.bns if b), *group.consumers}
        hit = sorted(layers & written)
        if hit:
            out.append(SkippedLayer(group.name, f"{hit[0]} is written while the model runs"))
        else:
            keep.append(group)
    return keep, out


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
        model: any module that runs on ``example_inputs``; its channel groups are
            found by :func:`~neuron_merging.core.groups.find_groups`.
        example_inputs: a tensor, a tuple of tensors or a mapping of keyword inputs
            that ``model`` accepts (batch 1 is enough); the model runs once on them.
            May be ``None`` when ``groups`` is given: those are then unchecked.
        config: the compression settings.
        groups: explicit simple groups; validated against the recorded forward pass
            when ``example_inputs`` are given.
        criterion_fn: a custom criterion overriding ``config.criterion``.
        calibration: optional unlabeled inputs (a tensor or tuple of tensors
            ``model`` accepts, batch first). No labels and no gradients are
            used: they give measured moments to ``selection``/``compensation``/
            ``repair`` and run the ``config.calibrate`` steps.

    Returns:
        A :class:`MergeResult` with the new model, its report and the plans.
    """
    if not isinstance(config, MergeConfig):
        raise ConfigError(
            f"config must be a MergeConfig, got {type(config).__name__} "
            "(MergeConfig.from_dict builds one from a mapping)"
        )
    if config.selection == "auto":
        return _compress_auto(model, example_inputs, config, groups, criterion_fn, calibration)
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
    original = dict(model.named_modules())
    check_recordable(model, original)  # TorchScript, lazy and meta-device models: a clear error
    if example_inputs is not None:
        as_inputs(example_inputs)  # a clear error for inputs of the wrong kind, before any work
    tensors = ModelTensors.of(model, original.values())
    check_on_cpu(model, tensors)
    check_finite(model, tensors)
    t0 = time.perf_counter()
    copied, modules, notes = _work_copy(model, tensors)
    work = copied.model
    shared = [
        name or type(model).__name__
        for name, m in original.items()
        if isinstance(m.__dict__.get("forward"), (types.FunctionType, functools.partial))
    ]
    if shared:
        notes.append(
            f"the forward of {', '.join(shared)} is a function set on the instance: the returned "
            "model shares it, and whatever it refers to, with the original (as with "
            "copy.deepcopy)"
        )
    if any(m.__dict__.get("_compiled_call_impl") is not None for m in original.values()):
        notes.append(
            "module.compile() is not carried over to the result (as with copy.deepcopy): "
            "call .compile() on the returned model"
        )
    training = [name or type(model).__name__ for name, m in original.items() if m.training]
    if training:
        notes.append(
            f"{len(training)} of the model's modules are in training mode ({training[0]} among "
            "them): the model is compressed as it runs in eval mode (batch norms with their "
            "running statistics, dropout off), for which merging is exact; the returned model "
            "keeps each module's mode, so call .eval() on it for inference"
        )
    modes = contextlib.ExitStack()  # the copy runs in eval mode until it is returned
    modes.enter_context(evaluating(work, modules.values()))
    timings["rebuild"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    if example_inputs is None:
        if groups is None:
            raise ConfigError("example_inputs are required to analyse the model (or pass groups=)")
        found, skipped = resolve_groups(work, groups), []
    else:
        given = [t._version for t in (*tensors.params, *tensors.buffers)]
        marks = StateMarks(modules)
        with recorded(work, example_inputs, modules, checked=True) as recording:
            found, skipped = groups_from_recording(recording, config.coupled)
            if groups is not None:
                simple = (
                    (found, skipped) if not config.coupled else groups_from_recording(recording)
                )
                found = resolve_groups(work, groups, simple)
                skipped = []
        _warn_given_written(model, tensors, given, notes)
        written = marks.written()
        if written:  # the returned model is built from the given model's state instead
            found, skipped = _unwritten(found, skipped, set(written))
            modes.close()
            copied, modules, _ = _work_copy(model, tensors)
            work = copied.model
            modes = contextlib.ExitStack()
            modes.enter_context(evaluating(work, modules.values()))
            notes.append(
                f"the model's forward writes its own state "
                f"({listed_briefly(written) or type(model).__name__}): "
                "the returned model is built from the model as given, not as the recorded "
                "pass left it; groups whose layers' tensors it wrote are left intact"
            )
    timings["trace"] = time.perf_counter() - t0
    targets = _targets(config, found, skipped, modules)
    extras = None
    if config.beyond_paper or calibration is not None:
        # Their passes over the original run a copy of it too: a forward that writes its
        # own state writes that copy, never the given model.
        reference = aliasing_copy(model, tensors).model
        if calibration is not None:
            _check_calibration(reference, calibration)
        extras = Extras(config, reference, example_inputs, [t[0] for t in targets], calibration)

    capable = _capable(targets, modules) if extras is not None else frozenset()
    with torch.no_grad():
        plans = _plan(targets, modules, config, criterion_fn, timings, extras, capable)
    if not found:
        warnings.warn(
            f"{type(model).__name__} has no mergeable group; returning an unchanged copy",
            stacklevel=2,
        )
    not_run = [s.name for s in skipped if s.reason == NOT_RUN]
    if not_run and plans:
        notes.append(
            f"{listed_briefly(not_run)} did not run on the example inputs: the result is analysed for the path "
            "they take; inputs that run those layers may feed them pruned channels and fail "
            "(give example inputs that run every layer)"
        )
        warnings.warn(notes[-1], stacklevel=3)
    t0 = time.perf_counter()
    apply_plans(work, plans, modules)
    timings["fold"] = time.perf_counter() - t0
    if extras is not None:
        t0 = time.perf_counter()
        rewritten = [p for p in plans if p.group.name in capable]
        if len(rewritten) < len(plans):
            notes.append(
                f"selection, compensation, repair and calibration apply to single-producer "
                f"groups of Linear layers on (batch, features) and Conv2d layers on images, "
                f"without layers in between, whose layers no other group prunes: "
                f"{len(plans) - len(rewritten)} "
                "other group(s) used the options of the paper"
            )
        extras.post_build(modules, rewritten)
        timings["compensate"] = time.perf_counter() - t0
        if calibration is not None and config.calibrate:
            t0 = time.perf_counter()
            calibrate(
                reference,
                work,
                extras.groups,
                rewritten,
                calibration,
                config.calibrate,
                config.ridge,
                extras.folded,
            )
            timings["calibrate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    modes.close()  # each module back in its own mode
    result_tensors = unshare(work, copied.storage_keys)
    timings["rebuild"] += time.perf_counter() - t0
    timings["total"] = sum(timings.values())

    excluded = [
        SkippedLayer(g.name, "excluded by the user") for g in found if g.name in config.exclude
    ]
    report = MergeReport(
        mode=config.mode,
        config=config.to_dict(),
        groups=[GroupReport.of(p, config.mode) for p in plans],
        skipped=skipped + excluded,
        params_before=tensors.parameter_count(),
        params_after=result_tensors.parameter_count(),
        timings=timings,
        notes=notes,
    )
    return MergeResult(work, report, plans)


#: The selections ``selection="auto"`` chooses between when calibration data is given.
AUTO_SELECTIONS: tuple[str, ...] = ("criterion", "lstsq")


def _output_tensors(out: object) -> list[Tensor]:
    """Every floating-point tensor in a model output (a tensor, or nested tuples/lists/dicts)."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for v in out.values() for t in _output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _output_tensors(v)]
    return []


def _check_calibration(model: nn.Module, calibration: Tensor | Sequence[Tensor]) -> None:
    """Refuse calibration inputs the compression could not use: a NaN or Inf in them
    would make every refit non-finite, and inputs the model cannot run on would fail deep
    inside a calibration step. Runs ``model`` (a private copy) once on the first sample."""
    data = (calibration,) if isinstance(calibration, Tensor) else tuple(calibration)
    if not data:
        raise ConfigError("calibration is empty: give a tensor or a tuple of tensors")
    for i, t in enumerate(data):
        what = "calibration" if len(data) == 1 else f"calibration input {i}"
        if not isinstance(t, Tensor):
            raise ConfigError(f"{what} must be a tensor, got {type(t).__name__}")
        if t.dim() == 0 or t.shape[0] == 0:
            raise ConfigError(f"{what} has no samples (shape {list(t.shape)}); batch first")
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise ConfigError(f"{what} contains NaN or Inf")
    try:
        with torch.no_grad(), evaluating(model):
            model(*(t[:1] for t in data))
    except Exception as exc:
        raise ModelError(
            f"running {type(model).__name__} on the calibration inputs failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); give a "
            "tensor (or a tuple of tensors, one per positional input) the model accepts, "
            "batch first"
        ) from exc


def calibration_error(
    original: nn.Module, compressed: nn.Module, calibration: Tensor | Sequence[Tensor]
) -> float:
    """Mean squared difference of the two models' outputs on the calibration inputs.

    Label-free (the original's outputs are the reference), in evaluation mode and
    without gradients, batch by batch; ``inf`` when the outputs hold no float tensor.
    """
    data = (calibration,) if isinstance(calibration, Tensor) else tuple(calibration)
    total, count = 0.0, 0
    with evaluating(original), evaluating(compressed), torch.no_grad():
        for i in range(0, data[0].shape[0], 250):
            part = tuple(d[i : i + 250] for d in data)
            ref, got = _output_tensors(original(*part)), _output_tensors(compressed(*part))
            for a, b in zip(ref, got, strict=True):
                total += float((a.double() - b.double()).pow(2).sum())
                count += a.numel()
    return total / count if count else math.inf


def _compress_auto(
    model: nn.Module,
    example_inputs: ExampleInputs,
    config: MergeConfig,
    groups: Sequence[GroupSpec] | None,
    criterion_fn: CriterionFn | None,
    calibration: Tensor | Sequence[Tensor] | None,
) -> MergeResult:
    """``selection="auto"``: ``lstsq`` without data; with data, the better of both.

    With calibration inputs, the whole compression (selection, compensation,
    repair and the ``calibrate`` steps) runs once per selection of
    :data:`AUTO_SELECTIONS`, and the result whose outputs on those inputs are
    closest to the original's (:func:`calibration_error`) is kept; ties go to
    the first. No labels: the reference is the original model's own output.
    """
    if calibration is None:
        res = compress(
            model, example_inputs, replace(config, selection="lstsq"),
            groups=groups, criterion_fn=criterion_fn,
        )  # fmt: skip
        res.report.config["selection"] = "auto"
        res.report.notes.append("selection=auto without calibration data: lstsq")
        return res
    tried: list[tuple[float, str, MergeResult]] = []
    reference: nn.Module | None = None  # run in the model's place: it may write its state
    for how in AUTO_SELECTIONS:
        res = compress(
            model, example_inputs, replace(config, selection=how),
            groups=groups, criterion_fn=criterion_fn, calibration=calibration,
        )  # fmt: skip
        if reference is None:  # once compress has checked the model
            reference = aliasing_copy(model).model
        tried.append((calibration_error(reference, res.model, calibration), how, res))
    _err, how, best = min(tried, key=lambda t: t[0])  # min keeps the first of equal errors
    best.report.config["selection"] = "auto"
    others = ", ".join(f"{h} {e:.6g}" for e, h, _r in tried)
    best.report.notes.append(f"selection=auto chose {how} (calibration output MSE: {others})")
    best.report.timings["auto"] = (
        sum(r.report.timings["total"] for _e, _h, r in tried) - (best.report.timings["total"])
    )
    return best


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
    coupled: bool = False,
    approximate: bool = False,
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
        exclude=_names(exclude),
        coupled=coupled,
        approximate=approximate,
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
    coupled: bool = False,
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
        exclude=_names(exclude),
        coupled=coupled,
    )
    return compress(model, example_inputs, cfg, groups=groups, criterion_fn=fn)


def _names(exclude: Sequence[str] | None) -> Sequence[str]:
    """``exclude`` as given; a single string is left for :class:`MergeConfig` to refuse."""
    if exclude is None:
        return ()
    if isinstance(exclude, str) or not isinstance(exclude, Iterable):
        return exclude  # refused by MergeConfig with a clear message
    return tuple(exclude)
