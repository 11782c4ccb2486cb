"""CIFAR VGG-16 with BatchNorm, in the layout of the neuron-merging release.

Convolutions are bias-free and each is followed by BatchNorm and ReLU; after the
last block a 2x2 average pool reduces the 2x2 map to one vector, and the
classifier is ``Linear(cfg[-1], 512) → BN → ReLU → Linear(512, classes)``. The
``feature``/``classifier`` Sequential indices are part of the checkpoint format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..core.errors import ConfigError
from ._registry import CfgItem, init_weights, register_model, shape_of, validate_widths

__all__ = ["VGG", "vgg16"]

_VGG16_CFG: list[CfgItem] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M"]
_VGG16_CFG += [512, 512, 512]
_POOL = "M"


def _normalize_cfg(cfg: Sequence[object], template: Sequence[CfgItem], arch: str) -> list[CfgItem]:
    """Validate ``cfg`` against ``template``'s pooling layout.

    Accepts the full list with ``"M"`` entries at the template's positions, or just
    the convolution widths (the pools are then re-inserted), so that pruning code
    can work on plain width lists.
    """
    pool_positions = [i for i, v in enumerate(template) if v == _POOL]
    n_convs = len(template) - len(pool_positions)
    items = list(cfg)
    if _POOL not in items and len(items) == n_convs:
        widths = validate_widths(items, n_convs, arch)
        full: list[CfgItem] = []
        it = iter(widths)
        for v in template:
            full.append(_POOL if v == _POOL else next(it))
        return full
    if len(items) != len(template):
        raise ConfigError(
            f"cfg for {arch!r} must have {len(template)} entries (with 'M' pools) "
            f"or {n_convs} conv widths, got {len(items)}"
        )
    got_pools = [i for i, v in enumerate(items) if v == _POOL]
    if got_pools != pool_positions:
        raise ConfigError(
            f"cfg for {arch!r} must have 'M' exactly at positions {pool_positions}, got {got_pools}"
        )
    widths = validate_widths([v for v in items if v != _POOL], n_convs, arch)
    it = iter(widths)
    return [_POOL if v == _POOL else next(it) for v in items]


class VGG(nn.Module):
    """VGG feature stack built from ``cfg`` plus a BN'd two-layer classifier."""

    def __init__(self, num_classes: int = 10, cfg: Sequence[CfgItem] | None = None) -> None:
        super().__init__()
        full_cfg = _normalize_cfg(_VGG16_CFG if cfg is None else cfg, _VGG16_CFG, "vgg16")
        self.num_classes = num_classes
        self.cfg: list[CfgItem] = full_cfg
        self.feature = self._make_layers(full_cfg)
        self.avgpool = nn.AvgPool2d(2)
        last = [v for v in full_cfg if v != _POOL][-1]
        self.classifier = nn.Sequential(
            nn.Linear(int(last), 512),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        init_weights(self)

    @staticmethod
    def _make_layers(cfg: Sequence[CfgItem]) -> nn.Sequential:
        layers: list[nn.Module] = []
        in_channels = 3
        for v in cfg:
            if v == _POOL:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                width = int(v)
                layers += [
                    nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                in_channels = width
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 32, 32)`` images → ``(N, classes)`` logits."""
        x = self.feature(x)
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


def _conv_indices(cfg: Sequence[CfgItem]) -> list[int]:
    """Index in ``feature`` of each convolution (3 modules per conv, 1 per pool)."""
    indices, pos = [], 0
    for v in cfg:
        if v == _POOL:
            pos += 1
        else:
            indices.append(pos)
            pos += 3
    return indices


def _infer_cfg(state_dict: Mapping[str, torch.Tensor]) -> list[CfgItem]:
    widths = iter([shape_of(state_dict, f"feature.{i}.weight") for i in _conv_indices(_VGG16_CFG)])
    return [_POOL if v == _POOL else next(widths) for v in _VGG16_CFG]


@register_model(
    "vgg16",
    default_num_classes=10,
    datasets=("cifar10", "cifar100"),
    input_shape=(3, 32, 32),
    default_cfg=lambda num_classes: list(_VGG16_CFG),
    infer_cfg=_infer_cfg,
)
def vgg16(num_classes: int = 10, cfg: Sequence[CfgItem] | None = None) -> VGG:
    """CIFAR VGG-16-BN; ``cfg`` is the 17-entry width list with ``'M'`` pools (or 13 widths)."""
    return VGG(num_classes=num_classes, cfg=cfg)
