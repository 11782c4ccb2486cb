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

from .groups import MergeGroup

#: Upper bound on the elements of one temporary block of scaled consumer columns.
FOLD_BLOCK_ELEMENTS = 1 << 22


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


def fold_columns(weight: Tensor, plan: GroupPlan, features_per_channel: int) -> Tensor:
    """The consumer weight with pruned input channels folded into their partners.

    ``weight`` is ``(out, n·features_per_channel)`` for a Linear or
    ``(out, n, kh, kw)`` for a Conv2d; the result has ``k`` input channels.
    """
    out = weight.shape[0]
    n = plan.kept.numel() + plan.pruned.numel()
    blocks = weight.detach().reshape(out, n, -1)
    folded = blocks[:, plan.kept]  # advanced indexing: already a fresh tensor
    merged = plan.partner >= 0
    if bool(merged.any()):
        src, dst = plan.pruned[merged], plan.partner[merged]
        scales = plan.scale[merged].to(blocks.dtype)
        # In chunks of pruned channels, so the scaled copies stay within a fixed
        # budget; index_add_ accumulates in index order either way.
        step = max(1, FOLD_BLOCK_ELEMENTS // max(out * blocks.shape[2], 1))
        for start in range(0, src.numel(), step):
            sl = slice(start, start + step)
            sources = blocks[:, src[sl]]
            sources.mul_(scales[sl].view(1, -1, 1))
            folded.index_add_(1, dst[sl], sources)
    shape = (
        (out, plan.kept.numel() * features_per_channel)
        if weight.dim() == 2
        else (out, plan.kept.numel(), *weight.shape[2:])
    )
    return folded.reshape(shape)


def _replace(module: nn.Module, name: str, value: Tensor | None) -> None:
    old = getattr(module, name)
    if value is None or old is None:
        return
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        setattr(module, name, value.contiguous())


def apply_plans(model: nn.Module, plans: Sequence[GroupPlan]) -> None:
    """Shrink ``model`` in place according to ``plans`` (computed on its weights)."""
    modules = dict(model.named_modules())
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
                weight = fold_columns(weight, cols[name], group.features_per_channel or 1)
            if name in rows:
                weight = weight[rows[name]]
            new_weights[name] = weight
        for name, weight in new_weights.items():
            layer = modules[name]
            _replace(layer, "weight", weight)
            if name in rows and layer.bias is not None:
                _replace(layer, "bias", layer.bias.detach()[rows[name]])
            if isinstance(layer, nn.Linear):
                layer.out_features, layer.in_features = weight.shape[0], weight.shape[1]
            else:
                layer.out_channels, layer.in_channels = weight.shape[0], weight.shape[1]
        for plan in plans:
            if plan.group.bn is None:
                continue
            bn = modules[plan.group.bn]
            for attr in ("weight", "bias", "running_mean", "running_var"):
                value = getattr(bn, attr)
                if value is not None:
                    _replace(bn, attr, value.detach()[plan.kept])
            bn.num_features = plan.kept.numel()
