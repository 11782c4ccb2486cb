"""Build: turn plans into a physically smaller model.

Given, for every channel group, the kept channels and the (partner, scale) of every
pruned one, this module slices every producer and its batch norm (and the layers
in between with per-channel weights: depthwise convolutions, batch norms) and
folds the pruned channels into every consumer's input dimension, at the group's
offset in that consumer's input::

    W_next'[:, m] = W_next[:, m] + Σ_{n → m} s_n · W_next[:, n]

Every plan is computed from the original weights before any module changes, so
a layer that consumes one group and produces the next is sliced on both axes
from its unmodified weight. Modules are shrunk in place on the caller's copy:
they keep their type (and any subclass behaviour), and ``in_features``,
``out_features``, ``in_channels``, ``out_channels``, ``groups``, ``nf`` and
``num_features`` are updated. Small same-shaped layers and batch norms (a deep
network's repeated blocks) are sliced and folded as one stack, with the values of
building each alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_impl

from .groups import ChannelGroup
from .record import CONVS, is_conv1d_transposed

_T = TypeVar("_T")

#: Consumer weights are folded in blocks of rows of at most this many elements
#: (8 MB of float32: within the last-level cache, and the bound on the temporary
#: scaled copies). Against 1 MB blocks, VGG-16's 512-channel convolutions fold
#: about a quarter faster (fewer, longer gathers); wide Linear layers are even.
FOLD_BLOCK_ELEMENTS = 1 << 21
#: Consumers with at least this many weights per (output, input) channel pair
#: (a 2×2 kernel) and this many weights in all are folded by gathering kernels
#: through a flat index, without copying the selected rows first; for small
#: layers the index arithmetic costs more than it saves.
_FLAT_GATHER_WIDTH = 4
_FLAT_GATHER_ELEMENTS = 1 << 17
#: Layers with at most this many weights are built together with their
#: same-shaped siblings (stacked, so one gather serves them all): a deep network
#: of narrow layers then costs a few tensor calls per shape instead of a dozen per
#: layer. The values are those of building each layer alone, bit for bit.
_BATCH_ELEMENTS = 1 << 17
#: A batch's stacked copy holds at most this many elements (16 MB of float32).
_STACK_ELEMENTS = 1 << 22


def _chunks(items: list[_T], size: int) -> list[list[_T]]:
    """``items`` in batches whose stacked copy stays within :data:`_STACK_ELEMENTS`."""
    step = max(1, _STACK_ELEMENTS // max(size, 1))
    return [items[i : i + step] for i in range(0, len(items), step)]


@dataclass
class GroupPlan:
    """What happens to one channel group.

    Attributes:
        group: the channel group.
        kept: ascending indices of the producer's kept neurons.
        pruned: ascending indices of its removed neurons.
        partner: for each pruned neuron, its partner's position in ``kept``
            (``-1``: dropped without compensation).
        scale: for each pruned neuron, the factor applied to its outgoing
            weights before they are added to the partner's.
        similarity: cosine similarity of each pruned neuron to its candidate.
        approximate: whether the scales are least-squares approximations through a
            non-homogeneous activation (:mod:`.approx`) rather than exact merges.
    """

    group: ChannelGroup
    kept: Tensor
    pruned: Tensor
    partner: Tensor
    scale: Tensor
    similarity: Tensor
    approximate: bool = False

    @property
    def merged(self) -> int:
        """Number of pruned neurons folded into a partner."""
        return int((self.partner >= 0).sum())


def _all_finite(tensor: Tensor) -> bool:
    if tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor)  # NaN propagates, ±Inf shows up as an extreme
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def fold_columns(
    weight: Tensor,
    plan: GroupPlan,
    features_per_channel: int,
    rows: Tensor | None = None,
) -> Tensor:
    """The consumer weight with pruned input channels folded into their partners.

    ``weight`` is ``(out, n·features_per_channel)`` for a Linear or
    ``(out, n, kh, kw)`` for a Conv2d; the result has ``k`` input channels and,
    when ``rows`` is given (the layer is also a producer), only those output
    rows. Rows are gathered block by block through one reused buffer (at most
    ``FOLD_BLOCK_ELEMENTS``), so the row-sliced weight is never materialised. A kept channel whose folded
    weights would overflow to Inf/NaN receives no merge: its merges are dropped
    and marked so in ``plan`` (``partner = -1``, ``scale = 0``).
    """
    n = plan.kept.numel() + plan.pruned.numel()
    width = weight[0].numel() // n if weight.shape[0] else 1
    # (out, n) for one weight per channel pair: PyTorch's index kernels are far
    # slower on a trailing dimension of size 1.
    tail = (width,) if width > 1 else ()
    blocks = weight.detach().reshape(weight.shape[0], n, *tail)
    out = weight.shape[0] if rows is None else rows.numel()
    merged = plan.partner >= 0
    count = int(merged.sum())
    any_merged = count > 0
    if count == merged.numel():  # every pruned neuron has a partner: no masking needed
        src, dst, scales = plan.pruned, plan.partner, plan.scale
    elif any_merged:
        src, dst, scales = plan.pruned[merged], plan.partner[merged], plan.scale[merged]
    if any_merged:
        scales = scales.to(blocks.dtype).view(1, -1, *(1 for _ in tail))
    folded = blocks.new_empty((out, plan.kept.numel(), *tail))
    # In blocks of output rows: a block stays in cache while index_add_ adds its
    # columns (in index order, so the sums are those of one call), and the
    # gathered rows and scaled copies stay within a fixed budget.
    step = max(1, FOLD_BLOCK_ELEMENTS // max(n * width, 1))
    if width >= _FLAT_GATHER_WIDTH and blocks.numel() >= _FLAT_GATHER_ELEMENTS:
        # Convolution kernels: gather (row, channel) kernels directly through a
        # flat index, without first copying the selected rows.
        flat = blocks.reshape(-1, width)
        first = torch.arange(out) if rows is None else rows
        for start in range(0, out, step):
            part = folded[start : start + step]
            base = first[start : start + step].unsqueeze(1) * n
            torch.index_select(flat, 0, (base + plan.kept).reshape(-1), out=part.view(-1, width))
            if any_merged:
                moved = torch.index_select(flat, 0, (base + src).reshape(-1))
                part.index_add_(1, dst, moved.view(part.shape[0], -1, width).mul_(scales))
    else:
        buffer = None if rows is None else blocks.new_empty((min(step, out), *blocks.shape[1:]))
        for start in range(0, out, step):
            part = folded[start : start + step]
            if buffer is None:  # no row selection: slice the weight itself
                source = blocks[start : start + step]
            else:
                source = buffer[: part.shape[0]]
                torch.index_select(blocks, 0, rows[start : start + step], out=source)
            torch.index_select(source, 1, plan.kept, out=part)
            if any_merged:
                part.index_add_(1, dst, torch.index_select(source, 1, src).mul_(scales))
    if any_merged and not _all_finite(folded):  # one cheap pass settles the common case
        # Scaled weights that overflow the dtype would write Inf/NaN into the model:
        # drop every merge into such a partner instead (plan updated to match).
        finite = torch.isfinite(folded)
        overflow = ~(finite.all(dim=2) if width > 1 else finite).all(dim=0)
        if bool(overflow.any()):
            original = blocks if rows is None else torch.index_select(blocks, 0, rows)
            folded[:, overflow] = original[:, plan.kept[overflow]]
            drop = (plan.partner >= 0) & overflow[plan.partner.clamp_min(0)]
            plan.partner[drop] = -1
            plan.scale[drop] = 0.0
    shape = (
        (out, plan.kept.numel() * features_per_channel)
        if weight.dim() == 2
        else (out, plan.kept.numel(), *weight.shape[2:])
    )
    return folded.reshape(shape)


def _registration_hooks() -> bool:
    """Whether global parameter/buffer registration hooks might be installed."""
    hooks = [
        getattr(_module_impl, name, None)
        for name in ("_global_parameter_registration_hooks", "_global_buffer_registration_hooks")
    ]
    return any(h is None or len(h) > 0 for h in hooks)


def _replace(module: nn.Module, name: str, value: Tensor | None, direct: bool) -> None:
    """Put ``value`` in place of ``module.<name>`` (same kind: parameter or buffer).

    With ``direct`` (no registration hooks to run), registered tensors are
    swapped in the module's own dictionaries, skipping ``nn.Module.__setattr__``.
    """
    params, buffers = module._parameters, module._buffers
    if direct and name in params:
        old = params[name]
        if value is not None and old is not None:
            params[name] = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
        return
    if direct and name in buffers:
        if value is not None and buffers[name] is not None:
            buffers[name] = value.contiguous()
        return
    old = getattr(module, name)
    if value is None or old is None:
        return
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        setattr(module, name, value.contiguous())


def _keep_rows(module: nn.Module, attrs: tuple[str, ...], index: Tensor, direct: bool) -> None:
    """Keep rows ``index`` (along the first dimension) of each of ``module``'s tensors ``attrs``."""
    for attr in attrs:
        value = getattr(module, attr)
        if value is not None:
            _replace(module, attr, torch.index_select(value.detach(), 0, index), direct)


def _fold_segment(blocks: Tensor, plan: GroupPlan) -> Tensor:
    """``(out, n, K)`` consumer columns of one group → ``(out, k, K)``, pruned ones folded in."""
    folded = blocks.index_select(1, plan.kept)
    merged = plan.partner >= 0
    if bool(merged.any()):
        scales = plan.scale[merged].to(blocks.dtype).view(1, -1, 1)
        moved = blocks.index_select(1, plan.pruned[merged]) * scales
        folded.index_add_(1, plan.partner[merged], moved)
    return folded


def _drop_overflowing(folded: Tensor, plan: GroupPlan) -> bool:
    """Mark merges into partners whose folded columns are not finite as dropped."""
    if _all_finite(folded):
        return False
    bad = ~torch.isfinite(folded).reshape(folded.shape[0], folded.shape[1], -1).all(dim=2).all(
        dim=0
    )
    drop = (plan.partner >= 0) & bad[plan.partner.clamp_min(0)]
    plan.partner[drop] = -1
    plan.scale[drop] = 0.0
    return bool(drop.any())


def fold_segments(
    weight: Tensor,
    segments: list[tuple[int, GroupPlan, int]],
    rows: Tensor | None = None,
) -> Tensor:
    """The consumer weight with each group's columns folded at its offset.

    ``weight`` is ``(out, C·f)`` for a linear layer or ``(out, C, *kernel)`` for a
    convolution; ``segments`` are ``(channel offset, plan, features per channel)``;
    channels outside every segment are kept as they are. ``rows`` selects output
    rows first (the layer also produces a group). A group whose folded columns
    would overflow to Inf/NaN drops the merges concerned (``plan`` is updated).
    """
    linear = weight.dim() == 2
    f = segments[0][2] if linear else 1
    source = weight.detach() if rows is None else torch.index_select(weight.detach(), 0, rows)
    channels = source.shape[1] // f if linear else source.shape[1]
    blocks = source.reshape(source.shape[0], channels, -1)
    pieces: list[Tensor] = []
    cursor = 0
    for offset, plan, _ in sorted(segments, key=lambda item: item[0]):
        n = plan.kept.numel() + plan.pruned.numel()
        if offset > cursor:
            pieces.append(blocks[:, cursor:offset])
        part = _fold_segment(blocks[:, offset : offset + n], plan)
        if _drop_overflowing(part, plan):
            part = _fold_segment(blocks[:, offset : offset + n], plan)
        pieces.append(part)
        cursor = offset + n
    if cursor < channels:
        pieces.append(blocks[:, cursor:])
    folded = torch.cat(pieces, dim=1)
    if linear:
        return folded.reshape(folded.shape[0], -1)
    return folded.reshape(folded.shape[0], folded.shape[1], *weight.shape[2:])


def _full_index(channels: int, segments: list[tuple[int, Tensor, int]]) -> Tensor:
    """Kept channel indices of a layer sliced by several groups at their offsets."""
    keep = torch.ones(channels, dtype=torch.bool)
    for offset, kept, n in segments:
        part = torch.zeros(n, dtype=torch.bool)
        part[kept] = True
        keep[offset : offset + n] = part
    return keep.nonzero().flatten()


_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _slice_bns(items: list[tuple[nn.Module, Tensor]], direct: bool) -> None:
    """Keep channels ``index`` of every ``(batch norm, index)``.

    Same-shaped tensors of all the batch norms (weights, biases and running
    statistics alike) are sliced by one gather.
    """
    buckets: dict[tuple[object, ...], list[tuple[nn.Module, str, Tensor, Tensor]]] = {}
    for bn, index in items:
        for attr in _BN_TENSORS:
            if attr in bn._parameters:
                value = bn._parameters[attr]
            elif attr in bn._buffers:
                value = bn._buffers[attr]
            else:
                value = getattr(bn, attr, None)
            if value is not None:
                key: tuple[object, ...] = (value.shape, value.dtype, index.numel())
                if value.numel() > _BATCH_ELEMENTS:
                    key = (id(value),)
                buckets.setdefault(key, []).append((bn, attr, value.detach(), index))
    for members in (c for b in buckets.values() for c in _chunks(b, b[0][2].numel())):
        sliced = gather_rows([m[2] for m in members], [m[3] for m in members])
        for (bn, attr, _, _), value in zip(members, sliced, strict=True):
            _replace(bn, attr, value, direct)
    for bn, index in items:
        bn.num_features = index.numel()


def _oriented(layer: nn.Module) -> Tensor:
    """The layer's weight with output channels first: GPT-2's ``Conv1D`` stores it
    transposed, and a transposed convolution as ``(in, out, *kernel)``. Applied to the
    new weight, it turns it back (a transposition is its own inverse)."""
    return _orient(layer, layer.weight.detach())


def _orient(layer: nn.Module, weight: Tensor) -> Tensor:
    if is_conv1d_transposed(layer):
        return weight.t()
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        return weight.transpose(0, 1)
    return weight


def _whole(weight: Tensor, segments: list[tuple[int, GroupPlan, int]]) -> bool:
    """Whether one group's columns span the consumer's whole input."""
    if len(segments) != 1 or segments[0][0] != 0:
        return False
    _, plan, f = segments[0]
    n = plan.kept.numel() + plan.pruned.numel()
    return n * (f if weight.dim() == 2 else 1) == weight.shape[1]


def gather_rows(tensors: list[Tensor], index: list[Tensor]) -> list[Tensor]:
    """``tensors[b][index[b]]`` (rows along dim 0) of same-shaped tensors, by one gather.

    Each result is a contiguous slice of one new tensor; the values are those of
    ``torch.index_select`` on each tensor alone.
    """
    if len(tensors) == 1:
        return [torch.index_select(tensors[0], 0, index[0])]
    stacked = torch.stack(tensors)
    b, n = stacked.shape[0], stacked.shape[1]
    flat = stacked.view(b * n, -1)
    batch = torch.arange(b).unsqueeze(1)
    picked = torch.index_select(flat, 0, (torch.stack(index) + batch * n).reshape(-1))
    return list(picked.view(b, -1, *stacked.shape[2:]).unbind(0))


def fold_batch(
    weights: list[Tensor],
    plans: list[GroupPlan],
    features_per_channel: int,
    rows: list[Tensor] | None = None,
) -> list[Tensor] | None:
    """:func:`fold_columns` of same-shaped consumers with same-shaped plans, in one pass.

    The stacked weights are gathered through flat indices of their
    ``(row, channel)`` kernels, channel by channel. The
    values are those of folding each alone: the same products, added to each
    partner in the same order (a pruned neuron without a partner adds zeros).
    ``None`` when a folded weight is not finite: :func:`fold_columns`, layer by
    layer, then decides which merges to drop.
    """
    b = len(weights)
    k = plans[0].kept.numel()
    n = k + plans[0].pruned.numel()
    stacked = torch.stack(weights)
    rows_in = stacked.shape[1]
    out = rows_in if rows is None else rows[0].numel()
    kernels = stacked.view(b * rows_in * n, -1)  # one row per (layer, row, channel)
    batch = torch.arange(b).view(b, 1, 1)
    # Flat (layer, row) of every output row, laid out (layer, 1, row): the gathers
    # below come out channel-major, so the fold adds whole channels at once.
    if rows is None:
        first = torch.arange(out).view(1, 1, out) + batch * rows_in
    else:
        first = (torch.stack(rows) + batch.view(b, 1) * rows_in).unsqueeze(1)

    def gather(channels: Tensor) -> Tensor:  # (B, m) → (B·m, out·width), channel-major
        flat = torch.index_select(kernels, 0, (channels.unsqueeze(2) + first * n).reshape(-1))
        return flat.view(b * channels.shape[1], -1)

    folded = gather(torch.stack([plan.kept for plan in plans]))
    partner = torch.stack([plan.partner for plan in plans])
    merged = partner >= 0
    if bool(merged.any()):
        scale = torch.stack([plan.scale for plan in plans]).to(stacked.dtype)
        scale = torch.where(merged, scale, torch.zeros_like(scale))
        moved = gather(torch.stack([plan.pruned for plan in plans])).mul_(scale.view(-1, 1))
        folded.index_add_(0, (partner.clamp_min(0) + batch.view(b, 1) * k).reshape(-1), moved)
        if not _all_finite(folded):
            return None
    folded = folded.view(b, k, out, -1).transpose(1, 2).contiguous()
    shape = (
        (out, k * features_per_channel)
        if weights[0].dim() == 2
        else (out, k, *weights[0].shape[2:])
    )
    return [part.view(shape) for part in folded.unbind(0)]


def _new_weights(
    modules: dict[str, nn.Module],
    rows: dict[str, Tensor],
    cols: dict[str, list[tuple[int, GroupPlan, int]]],
) -> dict[str, Tensor]:
    """The new weight of every producer and consumer (output channels first)."""
    weights = {name: _oriented(modules[name]) for name in {*rows, *cols}}
    buckets: dict[tuple[object, ...], list[str]] = {}
    for name, weight in weights.items():
        segments = cols.get(name)
        key: tuple[object, ...] = (name,)
        if weight.numel() <= _BATCH_ELEMENTS and (segments is None or _whole(weight, segments)):
            index = rows.get(name)
            key = (weight.shape, weight.dtype, None if index is None else index.numel())
            if segments is not None:
                plan, f = segments[0][1], segments[0][2]
                key += (plan.kept.numel(), plan.pruned.numel(), f)
        buckets.setdefault(key, []).append(name)
    new_weights: dict[str, Tensor] = {}
    for names in (c for b in buckets.values() for c in _chunks(b, weights[b[0]].numel())):
        segments = cols.get(names[0])
        built: list[Tensor] | None = None
        if len(names) > 1 and segments is None:
            built = gather_rows([weights[n] for n in names], [rows[n] for n in names])
        elif len(names) > 1:
            index = [rows[n] for n in names] if names[0] in rows else None
            plans = [cols[n][0][1] for n in names]
            built = fold_batch([weights[n] for n in names], plans, segments[0][2], index)
        if built is None:  # alone, or a batch whose fold overflowed
            built = []
            for name in names:
                weight, segments = weights[name], cols.get(name)
                if segments is None:
                    built.append(torch.index_select(weight, 0, rows[name]))
                elif _whole(weight, segments):
                    built.append(
                        fold_columns(weight, segments[0][1], segments[0][2], rows.get(name))
                    )
                else:
                    built.append(fold_segments(weight, segments, rows.get(name)))
        for name, weight in zip(names, built, strict=True):
            new_weights[name] = _orient(modules[name], weight)
    return new_weights


def apply_plans(
    model: nn.Module,
    plans: Sequence[GroupPlan],
    modules: dict[str, nn.Module] | None = None,
) -> None:
    """Shrink ``model`` in place according to ``plans`` (computed on its weights).

    ``modules`` is ``dict(model.named_modules())`` if the caller has it.
    """
    if modules is None:
        modules = dict(model.named_modules())
    plans = [plan for plan in plans if plan.pruned.numel() > 0]  # the rest change nothing
    rows: dict[str, Tensor] = {}
    cols: dict[str, list[tuple[int, GroupPlan, int]]] = {}
    slices: dict[str, list[tuple[int, Tensor, int]]] = {}
    bns: dict[str, Tensor] = {}
    for plan in plans:
        group = plan.group
        for producer, bn in zip(group.producers, group.bns, strict=True):
            rows[producer] = plan.kept
            if bn is not None:
                bns[bn] = plan.kept
        for name, offset in zip(group.passthrough, group.passthrough_offsets, strict=True):
            slices.setdefault(name, []).append((offset, plan.kept, group.channels))
        for name, offset, f in zip(
            group.consumers, group.consumer_offsets, group.features, strict=True
        ):
            cols.setdefault(name, []).append((offset, plan, f))
    with torch.no_grad():
        before = [plan.partner._version for plan in plans]  # bumped where merges are dropped
        new_weights = _new_weights(modules, rows, cols)
        if [plan.partner._version for plan in plans] != before:  # overflow: fold again
            new_weights = _new_weights(modules, rows, cols)
        direct = not _registration_hooks()
        for name, weight in new_weights.items():
            layer = modules[name]
            transposed = is_conv1d_transposed(layer)  # decided before the weight changes
            _replace(layer, "weight", weight, direct)
            if name in rows and layer.bias is not None:
                _replace(
                    layer, "bias", torch.index_select(layer.bias.detach(), 0, rows[name]), direct
                )
            if isinstance(layer, nn.Linear):
                layer.out_features, layer.in_features = weight.shape[0], weight.shape[1]
            elif transposed:  # GPT-2's Conv1D: weight (nx, nf)
                layer.nf = weight.shape[1]
                if isinstance(getattr(layer, "nx", None), int):
                    layer.nx = weight.shape[0]
            elif isinstance(layer, nn.modules.conv._ConvTransposeNd):  # (in, out, *kernel)
                layer.in_channels, layer.out_channels = weight.shape[0], weight.shape[1]
            else:
                layer.out_channels, layer.in_channels = weight.shape[0], weight.shape[1]
        _slice_bns([(modules[name], kept) for name, kept in bns.items()], direct)
        for name, segments in slices.items():
            if name not in modules:  # "module.attr": a parameter or buffer, a value per channel
                owner, _, attr = name.rpartition(".")
                tensor = getattr(modules[owner], attr)
                dim = next(i for i, n in enumerate(tensor.shape) if n != 1)
                index = _full_index(tensor.shape[dim], segments)
                _replace(
                    modules[owner], attr, torch.index_select(tensor.detach(), dim, index), direct
                )
                continue
            layer = modules[name]
            if isinstance(layer, CONVS):  # depthwise: one filter per channel
                index = _full_index(layer.out_channels, segments)
                _keep_rows(layer, ("weight", "bias"), index, direct)
                layer.in_channels = layer.out_channels = layer.groups = index.numel()
            elif isinstance(layer, nn.PReLU):  # a slope per channel
                index = _full_index(layer.num_parameters, segments)
                _keep_rows(layer, ("weight",), index, direct)
                layer.num_parameters = index.numel()
            elif isinstance(layer, nn.GroupNorm):  # one channel per group
                index = _full_index(layer.num_channels, segments)
                _keep_rows(layer, ("weight", "bias"), index, direct)
                layer.num_channels = layer.num_groups = index.numel()
            else:
                _slice_bns([(layer, _full_index(layer.num_features, segments))], direct)
