"""A zoo of small random-init architectures, and the oracles that check compression on them.

No torchvision: every model is defined here, tiny (widths ≤ 32, inputs 8×8 or 16×16),
in eval mode, with randomised batch-norm statistics so that folding them is exercised.

:data:`ZOO` maps a name to ``(factory, example_input)``; :data:`HF_ZOO` does the same
for ``transformers`` models built from tiny configs (imported lazily).

Oracles:

* :func:`masked_copy`: the original model with the removed channels' consumer input
  columns zeroed, derived from ``result.plans`` (what pruning must equal exactly);
* :func:`plant_duplicates`: in every mergeable group, channels ``k..n-1`` become
  positive multiples of kept channels ``0..k-1`` in every producer (batch norm included),
  so merging with ``keep_first`` and ``bn_rule="exact"`` must be lossless.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import neuron_merging as nm

BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.modules.instancenorm._InstanceNorm)


def _seed_bns(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BNS):
                n = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.5)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
    return model.eval()


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 10)
        self.fc3 = nn.Linear(10, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class VGG(nn.Module):
    """conv-BN-ReLU ×3 with max pools, flatten, Linear-ReLU-Dropout-Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _cbr(3, 8), _cbr(8, 8), nn.MaxPool2d(2), _cbr(8, 12), nn.MaxPool2d(2)
        )
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(12 * 2 * 2, 16)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(F.relu(self.fc1(self.flatten(self.features(x))))))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class BottleneckResNet(nn.Module):
    """stem → 2 stages of 2 bottlenecks (the first with a projection shortcut) → pool → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8)
        self.layer1 = nn.Sequential(Bottleneck(8, 2), Bottleneck(8, 2))  # 8 → 8: identity
        self.layer2 = nn.Sequential(Bottleneck(8, 3, 2), Bottleneck(12, 3))  # projection
        self.layer3 = nn.Sequential(Bottleneck(12, 4, 2), Bottleneck(16, 4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class BasicBlockA(nn.Module):
    """CIFAR ResNet basic block with an option-A (zero-padding) shortcut."""

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = stride != 1 or cin != planes
        self.extra = planes - cin

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad:
            e = self.extra // 2
            short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, e, self.extra - e))
        else:
            short = x
        return F.relu(out + short)


class CifarResNetA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(BasicBlockA(4, 4), BasicBlockA(4, 4))
        self.layer2 = nn.Sequential(BasicBlockA(4, 8, 2), BasicBlockA(8, 8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int) -> None:
        super().__init__()
        h = c * expand
        self.expand = nn.Conv2d(c, h, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(h)
        self.dw = nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False)
        self.bn2 = nn.BatchNorm2d(h)
        self.project = nn.Conv2d(h, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.act1 = nn.ReLU6()
        self.act2 = nn.ReLU6()

    def forward(self, x: Tensor) -> Tensor:
        h = self.act1(self.bn1(self.expand(x)))
        h = self.act2(self.bn2(self.dw(h)))
        return x + self.bn3(self.project(h))


class MobileNetV2Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6()
        )
        self.block = InvertedResidual(8, 3)
        self.head = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.fc = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.block(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class DenseNetBlock(nn.Module):
    """stem, two dense layers (conv-BN-ReLU, concatenated), a 1×1 transition, pool, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8)
        self.dense1 = _cbr(8, 4)
        self.dense2 = _cbr(12, 4)
        self.transition = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.dense1(x)], 1)
        x = torch.cat([x, self.dense2(x)], 1)
        x = F.avg_pool2d(F.relu(self.transition(x)), 2)
        return self.fc(x.flatten(1))


class InceptionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b2a = nn.Conv2d(8, 4, 1)
        self.b2b = nn.Conv2d(4, 6, 3, padding=1)
        self.b3 = nn.Conv2d(8, 3, 1)
        self.head = nn.Conv2d(13, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))
        y1 = F.relu(self.b1(x))
        y2 = F.relu(self.b2b(F.relu(self.b2a(x))))
        y3 = F.relu(self.b3(F.max_pool2d(x, 3, 1, 1)))
        x = F.relu(self.head(torch.cat([y1, y2, y3], dim=1)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SEBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, 4)
        self.fc2 = nn.Linear(4, 8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        s = F.adaptive_avg_pool2d(x, 1).flatten(1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        x = x * s.view(s.shape[0], s.shape[1], 1, 1)
        x = F.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: Tensor) -> Tensor:
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, 2)
        self.block = ConvNeXtBlock(8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block(self.stem(x))
        return self.head(self.norm(x.mean((-2, -1))))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class MlpGELU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViT(nn.Module):
    def __init__(self, dim: int = 16, patch: int = 4, size: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, 2)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MlpGELU(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return self.head(self.norm(x)[:, 0])


class BasicBlockTV(nn.Module):
    """torchvision's BasicBlock: in-place ReLU and ``out += identity``."""

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNetTV(nn.Module):
    """torchvision-style ResNet-10ish: stem, max pool, 2 stages of 2 basic blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlockTV(6, 6), BasicBlockTV(6, 6))
        self.layer2 = nn.Sequential(BasicBlockTV(6, 10, 2), BasicBlockTV(10, 10))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(10, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.squeeze(x))
        return torch.cat([self.act(self.expand1x1(x)), self.act(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            Fire(8, 4, 6, 6),
            Fire(12, 4, 5, 5),
        )
        self.classifier = nn.Sequential(  # (no final ReLU: tiny random nets output zeros)
            nn.Dropout(0.5), nn.Conv2d(10, 3, 1), nn.AdaptiveAvgPool2d(1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def _prelu(slopes: int) -> nn.PReLU:
    act = nn.PReLU(slopes)
    nn.init.uniform_(act.weight, -0.2, 0.5)  # distinct slopes, a negative one likely
    return act


class IRBlock(nn.Module):
    """ArcFace-style improved residual block: BN → conv → BN → PReLU (a slope per
    channel) → strided conv → BN, plus an identity or projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.prelu = _prelu(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.down is None else self.down(x))


class FaceResNet(nn.Module):
    """Face-recognition style ResNet: conv-BN-PReLU stem, two IR blocks, and an embedding
    head fc → BN → PReLU with one slope → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  _prelu(8))  # fmt: skip
        self.layer1 = IRBlock(8, 8, 1)
        self.layer2 = IRBlock(8, 12, 2)
        self.fc = nn.Linear(12 * 4 * 4, 16)
        self.bn = nn.BatchNorm1d(16)
        self.act = _prelu(1)
        self.out = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer2(self.layer1(self.stem(x)))
        return self.out(self.act(self.bn(self.fc(h.flatten(1)))))


class SELayer(nn.Module):
    """The common SENet gate: sizes read from the maps it gates, ``view(b, c, 1, 1)`` and
    ``expand_as``."""

    def __init__(self, channel: int, reduction: int = 2) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channel // reduction, channel, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y.expand_as(x)


class SEBasicBlock(BasicBlockTV):
    """SE-ResNet basic block: the gate scales the residual branch before the add."""

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__(cin, planes, stride)
        self.se = SELayer(planes)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(out + identity)


class SEResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = SEBasicBlock(8, 8)
        self.layer2 = SEBasicBlock(8, 12, 2)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class Video3D(nn.Module):
    """A small 3-D CNN for clips: conv-BN-ReLU, max pooling over time and space, a
    depthwise 3-D convolution and an instance norm inside a residual block, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm3d(8)
        self.conv1 = nn.Conv3d(8, 12, 1)
        self.dw = nn.Conv3d(12, 12, 3, padding=1, groups=12)
        self.norm = nn.InstanceNorm3d(12, affine=True)
        self.conv2 = nn.Conv3d(12, 8, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool3d(F.relu(self.bn(self.stem(x))), 2)
        r = F.relu(self.norm(self.dw(F.relu(self.conv1(h)))))
        h = F.relu(h + self.bn2(self.conv2(r)))
        return self.fc(h.mean((2, 3, 4)))


class UNet(nn.Module):
    """A two-level U-Net: a strided encoder, a ``ConvTranspose2d`` decoder (and a depthwise
    transposed convolution), a skip concat and a per-pixel head."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.enc2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(12, 8, 2, stride=2)
        self.dw = nn.ConvTranspose2d(8, 8, 3, padding=1, groups=8)
        self.dec = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = F.relu(self.bn1(self.enc1(x)))
        u = F.relu(self.dw(F.relu(self.up(F.relu(self.enc2(e1))))))
        return self.head(F.relu(self.dec(torch.cat([u, e1], 1))))


def _make(cls: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        torch.manual_seed(seed)
        return _seed_bns(cls(), seed + 1)

    factory.__name__ = cls.__name__
    return factory


def _x(*shape: int, seed: int = 123) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


#: name → (factory, example input)
ZOO: dict[str, tuple[Callable[[], nn.Module], Any]] = {
    "mlp": (_make(MLP, 0), _x(2, 6)),
    "vgg": (_make(VGG, 1), _x(2, 3, 8, 8)),
    "resnet_bottleneck": (_make(BottleneckResNet, 2), _x(2, 3, 8, 8)),
    "resnet_cifar_a": (_make(CifarResNetA, 3), _x(2, 3, 8, 8)),
    "mobilenet_v2": (_make(MobileNetV2Block, 4), _x(2, 3, 8, 8)),
    "densenet": (_make(DenseNetBlock, 5), _x(2, 3, 8, 8)),
    "inception": (_make(InceptionBlock, 6), _x(2, 3, 8, 8)),
    "se": (_make(SEBlock, 7), _x(2, 3, 8, 8)),
    "convnext": (_make(ConvNeXt, 8), _x(2, 3, 8, 8)),
    "vit": (_make(ViT, 9), _x(2, 3, 8, 8)),
    "resnet_torchvision": (_make(ResNetTV, 10), _x(2, 3, 8, 8)),
    "squeezenet": (_make(SqueezeNet, 11), _x(2, 3, 8, 8)),
    "face_resnet": (_make(FaceResNet, 12), _x(2, 3, 8, 8)),
    "se_resnet": (_make(SEResNet, 13), _x(2, 3, 8, 8)),
    "video3d": (_make(Video3D, 14), _x(2, 3, 4, 8, 8)),
    "unet": (_make(UNet, 15), _x(2, 3, 8, 8)),
}


# ------------------------------------------------------------------ transformers models


def _hf_ids(vocab: int = 50, length: int = 6) -> Tensor:
    return torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(7))


def hf_opt() -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=32,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return OPTForCausalLM(cfg).eval()


def hf_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=50,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        feed_forward_proj="relu",
        decoder_start_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return T5ForConditionalGeneration(cfg).eval()


def hf_bert(seed: int = 0, **config: Any) -> nn.Module:
    """A tiny BERT; ``config`` overrides the defaults (e.g. ``hidden_act="relu"``)."""
    from transformers import BertConfig, BertModel

    defaults: dict[str, Any] = dict(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return BertModel(BertConfig(**{**defaults, **config})).eval()


def hf_gpt2(seed: int = 0, **config: Any) -> nn.Module:
    """A tiny GPT-2 with its ``Conv1D`` layers; ``config`` overrides the defaults."""
    from transformers import GPT2Config, GPT2LMHeadModel

    defaults: dict[str, Any] = dict(
        vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32, attn_implementation="eager"
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{**defaults, **config})).eval()


def hf_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
        num_channels=3,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return ViTModel(cfg, add_pooling_layer=False).eval()


HF_ZOO: dict[str, tuple[Callable[[], nn.Module], Any]] = {
    "hf_opt": (hf_opt, {"input_ids": _hf_ids()}),
    "hf_t5": (hf_t5, {"input_ids": _hf_ids(), "decoder_input_ids": _hf_ids(length=4)}),
    "hf_bert": (hf_bert, {"input_ids": _hf_ids()}),
    "hf_gpt2": (hf_gpt2, {"input_ids": _hf_ids()}),
    "hf_llama": (hf_llama, {"input_ids": _hf_ids()}),
    "hf_vit": (hf_vit, {"pixel_values": _x(2, 3, 8, 8)}),
}


# ------------------------------------------------------------------------------ oracles


def run(model: nn.Module, x: Any) -> Tensor:
    """The model's main output as one float tensor (first tensor of a HF output)."""
    with torch.no_grad():
        if isinstance(x, Mapping):
            out = model(**x)
        elif isinstance(x, tuple):
            out = model(*x)
        else:
            out = model(x)
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, Mapping):
        out = tuple(out.values())
    return next(t for t in out if isinstance(t, Tensor))


def is_transposed(layer: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: weight stored ``(in, out)``."""
    return type(layer).__name__ == "Conv1D"


def is_transposed_conv(layer: nn.Module) -> bool:
    """``nn.ConvTranspose1d/2d/3d``: weight stored ``(in, out / groups, *kernel)``."""
    return isinstance(layer, nn.modules.conv._ConvTransposeNd)


def masked_copy(model: nn.Module, plans: list[Any]) -> nn.Module:
    """``model`` with every pruned channel's consumer input columns set to zero."""
    masked = copy.deepcopy(model)
    modules = dict(masked.named_modules())
    with torch.no_grad():
        for plan in plans:
            g = plan.group
            pruned = plan.pruned.tolist()
            for name, offset, f in zip(g.consumers, g.consumer_offsets, g.features, strict=True):
                w = modules[name].weight
                for c in pruned:
                    lo, hi = (offset + c) * f, (offset + c + 1) * f
                    if is_transposed(modules[name]):
                        w[lo:hi, :] = 0
                    elif is_transposed_conv(modules[name]):
                        w[offset + c] = 0
                    elif w.dim() == 2:
                        w[:, lo:hi] = 0
                    else:
                        w[:, offset + c] = 0
    return masked


def _rows(layer: nn.Module) -> Tensor:
    if is_transposed_conv(layer):
        return layer.weight.transpose(0, 1)
    return layer.weight.t() if is_transposed(layer) else layer.weight


def plant_group(
    model: nn.Module, group: Any, scales: tuple[float, ...] = (0.5, 0.3, 0.8, 0.6)
) -> int:
    """Make channels ``k..n-1`` of ``group`` positive multiples of ``0..k-1`` in every producer.

    Weights and bias scale by ``s``; a producer's batch norm gets another variance
    ``var_n = 1.7·var_m + 0.1`` with ``γ_n/σ_n = γ_m/σ_m`` (``σ = sqrt(var + eps)``),
    ``μ_n = s·μ_m`` and ``β_n = s·β_m``, so ``BN_n = s·BN_m`` (only the exact BN rule
    recovers the scale: the paper's rule divides by ``var``).
    Returns ``k``, the number of channels to keep (with :func:`keep_first`).
    """
    modules = dict(model.named_modules())
    n = group.channels
    k = math.ceil(n / 2)
    with torch.no_grad():
        for producer, bn_name in zip(group.producers, group.bns, strict=True):
            layer = modules[producer]
            w = _rows(layer)
            for i, dst in enumerate(range(k, n)):
                src, s = i % k, scales[i % len(scales)]
                w[dst] = s * w[src]
                if layer.bias is not None:
                    layer.bias[dst] = s * layer.bias[src]
                if bn_name is not None:
                    bn = modules[bn_name]
                    # a different variance, γ rescaled so that γ/σ is the same
                    var = bn.running_var[src].double()
                    new_var = 1.7 * var + 0.1 if bn.weight is not None else var
                    ratio = torch.sqrt((new_var + bn.eps) / (var + bn.eps))
                    bn.running_var[dst] = new_var.float()
                    bn.running_mean[dst] = s * bn.running_mean[src]
                    if bn.weight is not None:
                        bn.weight[dst] = (bn.weight[src].double() * ratio).float()
                        bn.bias[dst] = s * bn.bias[src]
    return k


def keep_first(rows: Tensor) -> Tensor:
    """Criterion keeping the lowest indices."""
    return torch.arange(rows.shape[0], 0, -1, dtype=torch.float64)


def planted(model: nn.Module, x: Any, coupled: bool) -> tuple[nn.Module, dict[str, int], list]:
    """A copy of ``model`` with duplicates planted in every mergeable group, and ``keep=``."""
    model = copy.deepcopy(model)
    groups, _ = nm.find_groups(model, x, coupled=coupled)
    keep = {g.name: plant_group(model, g) for g in groups if g.mergeable}
    return model, keep, groups


def merge_planted(
    model: nn.Module, x: Any, keep: dict[str, int], coupled: bool = False
) -> nm.MergeResult:
    """Merge a :func:`planted` copy back to its distinct neurons (exact BN rule, no threshold)."""
    return nm.merge(
        model,
        x,
        ratio=0.0,
        keep=keep,
        criterion=keep_first,
        threshold=None,
        bn_rule="exact",
        coupled=coupled,
    )


def rel_error(out: Tensor, ref: Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
