"""Surgery: turn plans into a physically smaller model.

Given, for every merge group, the kept neurons and the (partner, scale) of every
pruned one, this module slices the producer and its batch norm and folds the
pruned neurons into the consumer's input dimension::

    W_next'[:, m] = W_next[:, m] + Σ_{n → m} s_n · W_next[:, n]

Every plan is computed from the original weights before any module changes, so
a layer that consumes one group and produces the next is sliced on both axes
from its unmodified weight. Modules are shrunk in place on the caller's copy:
they keep their type (and any subclass behaviour), and ``in_features``,
``out_features``, ``in_channels``, ``out_channels`` and ``num_features`` are
updated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_impl

from .groups import MergeGroup

#: Consumer weights are folded in blocks of rows of at most this many elements
#: (small enough to stay in cache; also bounds the temporary scaled copies).
FOLD_BLOCK_ELEMENTS = 1 << 18
#: Consumers with at least this many weights per (output, input) channel pair
#: (a 2×2 kernel) and this many weights in all are folded by gathering kernels
#: through a flat index, without copying the selected rows first; for small
#: layers the index arithmetic costs more than it saves.
_FLAT_GATHER_WIDTH = 4
_FLAT_GATHER_ELEMENTS = 1 << 17


@dataclass
class GroupPlan:
    """What happens to one merge group.

    Attributes:
        group: the producer → consumer chain.
        kept: ascending indices of the producer's kept neurons.
        pruned: ascending indices of its removed neurons.
        partner: for each pruned neuron, its partner's position in ``kept``
            (``-1``: dropped without compensation).
        scale: for each pruned neuron, the factor applied to its outgoing
            weights before they are added to the partner's.
        similarity: cosine similarity of each pruned neuron to its candidate.
    """

    group: MergeGroup
    kept: Tensor
    pruned: Tensor
    partner: Tensor
    scale: Tensor
    similarity: Tensor

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
    rows. Rows are gathered block by block through one small buffer, so the
    row-sliced weight is never materialised. A kept channel whose folded
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
    cols: dict[str, GroupPlan] = {}
    for plan in plans:
        rows[plan.group.producer] = plan.kept
        cols[plan.group.consumer] = plan
    with torch.no_grad():
        new_weights: dict[str, Tensor] = {}
        for name in set(rows) | set(cols):
            weight = modules[name].weight.detach()
            if name in cols:
                group = cols[name].group
                weight = fold_columns(
                    weight, cols[name], group.features_per_channel or 1, rows.get(name)
                )
            else:
                weight = torch.index_select(weight, 0, rows[name])
            new_weights[name] = weight
        direct = not _registration_hooks()
        for name, weight in new_weights.items():
            layer = modules[name]
            _replace(layer, "weight", weight, direct)
            if name in rows and layer.bias is not None:
                _replace(
                    layer, "bias", torch.index_select(layer.bias.detach(), 0, rows[name]), direct
                )
            if isinstance(layer, nn.Linear):
                layer.out_features, layer.in_features = weight.shape[0], weight.shape[1]
            else:
                layer.out_channels, layer.in_channels = weight.shape[0], weight.shape[1]
        for plan in plans:
            if plan.group.bn is None:
                continue
            bn = modules[plan.group.bn]
            for attr in ("weight", "bias", "running_mean", "running_var"):
                if attr in bn._parameters:
                    value = bn._parameters[attr]
                elif attr in bn._buffers:
                    value = bn._buffers[attr]
                else:
                    value = getattr(bn, attr, None)
                if value is not None:
                    _replace(bn, attr, torch.index_select(value.detach(), 0, plan.kept), direct)
            bn.num_features = plan.kept.numel()
