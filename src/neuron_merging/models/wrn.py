"""Pre-activation Wide ResNet (WRN-40-4) for CIFAR.

Module names (``block1.layer.0.convShortcut`` ...) follow the widely used
PyTorch WRN layout the neuron-merging experiments were run with, so checkpoints
in that layout load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._registry import expand_stage_cfg, init_weights, register_model, shape_of

__all__ = ["NetworkBlock", "WideBasicBlock", "WideResNet", "wrn40_4"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class WideBasicBlock(nn.Module):
    """Pre-activation block ``bn1 → relu1 → conv1 → bn2 → relu2 → conv2`` plus shortcut.

    When the width changes, the activated input feeds both the residual branch and
    a 1x1 projection (``convShortcut``); otherwise the raw input is added back.
    ``mid`` is ``conv1``'s output width, the dimension pruning removes.
    """

    def __init__(self, in_planes: int, mid: int, out_planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(in_planes, mid, stride)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(mid, out_planes)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut: nn.Conv2d | None = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual step; the branch taken depends only on construction, so fx can trace it."""
        if self.equal_in_out:
            out = self.relu1(self.bn1(x))
            shortcut = x
        else:
            x = self.relu1(self.bn1(x))
            out = x
            assert self.convShortcut is not None
            shortcut = self.convShortcut(x)
        out = self.relu2(self.bn2(self.conv1(out)))
        out = self.conv2(out)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage: ``layer`` is a Sequential of blocks, the first one strided."""

    def __init__(self, in_planes: int, out_planes: int, mids: Sequence[int], stride: int) -> None:
        super().__init__()
        blocks = [
            WideBasicBlock(
                in_planes if i == 0 else out_planes, mid, out_planes, stride if i == 0 else 1
            )
            for i, mid in enumerate(mids)
        ]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the stage's blocks in order."""
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``: stem conv, three stages, final BN-ReLU, pool, ``fc``.

    ``cfg`` lists every block's ``mid`` width (``3 * (depth - 4) / 6`` entries);
    the default is ``mid == out_planes`` (the unpruned network).
    """

    def __init__(
        self,
        depth: int = 40,
        widen_factor: int = 4,
        num_classes: int = 10,
        cfg: Sequence[int] | None = None,
        arch: str = "wrn40_4",
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        mids = expand_stage_cfg(widths[1:] if cfg is None else cfg, [n] * 3, arch)
        self.num_classes = num_classes
        self.cfg: list[int] = mids
        self.conv1 = _conv3x3(3, widths[0])
        self.block1 = NetworkBlock(widths[0], widths[1], mids[0:n], 1)
        self.block2 = NetworkBlock(widths[1], widths[2], mids[n : 2 * n], 2)
        self.block3 = NetworkBlock(widths[2], widths[3], mids[2 * n :], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 32, 32)`` images → ``(N, classes)`` logits."""
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        x = self.avgpool(self.relu(self.bn1(x)))
        x = x.view(x.size(0), -1)
        return self.fc(x)


def _infer_cfg(state_dict: Mapping[str, torch.Tensor]) -> list[int]:
    return [
        shape_of(state_dict, f"block{stage}.layer.{block}.conv1.weight")
        for stage in (1, 2, 3)
        for block in range(6)
    ]


@register_model(
    "wrn40_4",
    default_num_classes=10,
    datasets=("cifar10", "cifar100"),
    input_shape=(3, 32, 32),
    default_cfg=lambda num_classes: [w for w in (64, 128, 256) for _ in range(6)],
    infer_cfg=_infer_cfg,
)
def wrn40_4(num_classes: int = 10, cfg: Sequence[int] | None = None) -> WideResNet:
    """WRN-40-4; ``cfg`` = 18 per-block ``conv1`` widths or 3 per-stage widths."""
    return WideResNet(depth=40, widen_factor=4, num_classes=num_classes, cfg=cfg, arch="wrn40_4")
