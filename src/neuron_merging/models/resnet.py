"""CIFAR ResNet-56 in the (unusual) block layout of the neuron-merging release.

Each block applies ReLU to its *input* and has no ReLU after the residual add;
the stem is conv+BN without ReLU and the head applies one final ReLU before
pooling. This is what the released ``ResNet.cifar10.original.56.pth.tar`` was
trained with, and it keeps every pruned convolution (a block's ``conv1``) directly
followed by BN and ReLU, which neuron merging needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._registry import expand_stage_cfg, init_weights, register_model, shape_of

__all__ = ["BasicBlock", "ResNet", "resnet56"]

_STAGE_PLANES = (16, 32, 64)
_STAGE_STRIDES = (1, 2, 2)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a BatchNorm always follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """``relu(x) → conv1 → bn1 → relu → conv2 → bn2``, plus the (projected) activated input.

    ``mid`` is the width of ``conv1``'s output, the dimension pruning removes.
    """

    def __init__(
        self,
        inplanes: int,
        mid: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        # Not in-place: the block input is the previous block's output, which
        # forward hooks (activation statistics, tests) may still hold on to.
        self.relu_in = nn.ReLU()
        self.conv1 = conv3x3(inplanes, mid, stride)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(mid, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activated residual step; note there is no ReLU after the addition."""
        x = self.relu_in(x)
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return out + residual


class ResNet(nn.Module):
    """CIFAR ResNet with three stages of ``BasicBlock`` (16, 32, 64 planes).

    ``cfg`` lists the ``mid`` width of every block (``3 * blocks_per_stage``
    entries); the default is ``mid == planes``.
    """

    def __init__(
        self,
        depth: int = 56,
        num_classes: int = 10,
        cfg: Sequence[int] | None = None,
        arch: str = "resnet56",
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        blocks = [n] * len(_STAGE_PLANES)
        mids = expand_stage_cfg(_STAGE_PLANES if cfg is None else cfg, blocks, arch)
        self.num_classes = num_classes
        self.cfg: list[int] = mids
        self.inplanes = 16
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(_STAGE_PLANES[0], mids[0:n], _STAGE_STRIDES[0])
        self.layer2 = self._make_layer(_STAGE_PLANES[1], mids[n : 2 * n], _STAGE_STRIDES[1])
        self.layer3 = self._make_layer(_STAGE_PLANES[2], mids[2 * n :], _STAGE_STRIDES[2])
        self.relu = nn.ReLU()
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(_STAGE_PLANES[-1], num_classes)
        init_weights(self)

    def _make_layer(self, planes: int, mids: Sequence[int], stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, mids[0], planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, mid, planes) for mid in mids[1:]]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 32, 32)`` images → ``(N, classes)`` logits."""
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(self.relu(x))
        x = x.view(x.size(0), -1)
        return self.fc(x)


def _infer_cfg(state_dict: Mapping[str, torch.Tensor]) -> list[int]:
    return [
        shape_of(state_dict, f"layer{stage}.{block}.conv1.weight")
        for stage in (1, 2, 3)
        for block in range(9)
    ]


@register_model(
    "resnet56",
    default_num_classes=10,
    datasets=("cifar10", "cifar100"),
    input_shape=(3, 32, 32),
    default_cfg=lambda num_classes: [p for p in _STAGE_PLANES for _ in range(9)],
    infer_cfg=_infer_cfg,
)
def resnet56(num_classes: int = 10, cfg: Sequence[int] | None = None) -> ResNet:
    """ResNet-56; ``cfg`` = 27 per-block ``conv1`` widths or 3 per-stage widths."""
    return ResNet(depth=56, num_classes=num_classes, cfg=cfg, arch="resnet56")
