"""Model builders and planting helpers shared by the core-engine tests.

Everything is seeded through explicit ``torch.Generator`` objects so that a
hypothesis example (or a failing test) is reproducible from its arguments.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: float32 tolerance for "lossless" comparisons. float32 has ε ≈ 1.2e-7; the
#: merged consumer re-associates sums of at most a few hundred products and the
#: merge scales (‖w_n‖/‖w_m‖, or S* through sqrt/divisions) carry a few ulps of
#: rounding, so the expected discrepancy is ~sqrt(N)·ε·|largest term| ≲ 1e-5 of
#: the output magnitude. 1e-4 (relative, and absolute on O(1) outputs) leaves a
#: 10x margin while staying orders of magnitude below the error of dropping a
#: planted neuron (which the tests check separately where it matters).
RTOL = 1e-4
ATOL = 1e-4


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def assert_lossless(merged: Tensor, original: Tensor) -> None:
    merged, original = merged.detach(), original.detach()
    scale = max(1.0, float(original.abs().max()))
    torch.testing.assert_close(merged, original, rtol=RTOL, atol=ATOL * scale)


def keep_first(rows: Tensor) -> Tensor:
    """A criterion that keeps the lowest indices: scores n-1, n-2, ..., 0."""
    n = rows.shape[0]
    return torch.arange(n, 0, -1, dtype=torch.float64)


def state_copy(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    """Bit-for-bit equality of two state dicts (keys, shapes, dtypes, values)."""
    if a.keys() != b.keys():
        return False
    return all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and torch.equal(_bytes(a[k]), _bytes(b[k]))
        for k in a
    )


def _bytes(t: Tensor) -> Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def widths(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every width attribute of every Linear/Conv2d/BatchNorm module."""
    out: dict[str, tuple[int, ...]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features, *m.weight.shape)
        elif isinstance(m, nn.Conv2d):
            out[name] = (m.in_channels, m.out_channels, *m.weight.shape)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            out[name] = (m.num_features, *m.running_mean.shape)
    return out


def all_finite(model: nn.Module) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# --------------------------------------------------------------------------- models


def mlp(sizes: Sequence[int], seed: int = 0, bias: bool = True) -> nn.Sequential:
    """``fc1 → act1 → fc2 → act2 → ... → fcK`` with ReLU activations, eval mode."""
    torch.manual_seed(seed)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (a, b) in enumerate(itertools.pairwise(sizes), start=1):
        layers[f"fc{i}"] = nn.Linear(a, b, bias=bias)
        if i < len(sizes) - 1:
            layers[f"act{i}"] = nn.ReLU()
    return nn.Sequential(layers).eval()


def randomize_bn(bn: nn.BatchNorm1d | nn.BatchNorm2d, g: torch.Generator) -> None:
    """Non-trivial affine parameters and running statistics (γ > 0)."""
    n = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(n, generator=g) * 0.5)
        bn.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)


class ConvBNNet(nn.Module):
    """conv → bn → relu → pool → dropout → flatten → fc (one merge group, conv→Linear)."""

    def __init__(
        self,
        cin: int = 3,
        channels: int = 8,
        out: int = 5,
        size: int = 8,
        pool: str = "max",
        conv_bias: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(cin, channels, 3, padding=1, bias=conv_bias)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * (size // 2) ** 2, out)
        randomize_bn(self.bn, gen(seed + 1))
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.drop(self.pool(self.act(self.bn(self.conv(x)))))))


class LinearBNNet(nn.Module):
    """fc1 → bn (BatchNorm1d) → relu → fc2."""

    def __init__(self, fin: int = 6, hidden: int = 8, out: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(fin, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, out)
        randomize_bn(self.bn, gen(seed + 1))
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.bn(self.fc1(x))))


class Block(nn.Module):
    """Pre-activation residual block: relu → conv1 → bn1 → relu → conv2 → bn2, + identity."""

    def __init__(self, channels: int, mid: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, mid, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(F.relu(x)))
        out = self.bn2(self.conv2(F.relu(out)))
        return x + out


class TinyResNet(nn.Module):
    """stem → Block → Block → relu → global average pool → fc."""

    def __init__(self, channels: int = 4, mid: int = 6, classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(Block(channels, mid), Block(channels, mid))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)
        g = gen(seed + 1)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                randomize_bn(m, g)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(F.relu(x)), 1))


class FunctionalNet(nn.Module):
    """Written with F.relu / F.max_pool2d / x.view(x.size(0), -1) / torch.flatten."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 4)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        x = x.view(x.size(0), -1)
        x = F.relu(self.fc1(x))
        return self.fc2(torch.flatten(x, 1))


class Untraceable(nn.Module):
    """Data-dependent Python control flow: torch.fx cannot trace it."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 3)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.fc1(x))
        if x.sum() > 0:
            h = h * 2.0
        return self.fc2(h)


# --------------------------------------------------------------------------- planting


def plant_linear_rows(
    layer: nn.Linear | nn.Conv2d, pairs: Sequence[tuple[int, int, float]]
) -> None:
    """Make row ``n`` (weight *and* bias) exactly ``s`` times row ``m`` for each (n, m, s)."""
    with torch.no_grad():
        for n, m, s in pairs:
            layer.weight[n] = s * layer.weight[m]
            if layer.bias is not None:
                layer.bias[n] = s * layer.bias[m]


def plant_bn_duplicates(
    producer: nn.Linear | nn.Conv2d,
    bn: nn.BatchNorm1d | nn.BatchNorm2d,
    pairs: Sequence[tuple[int, int, float]],
) -> None:
    """Make ``BN_n = S*·BN_m`` exactly, so the exact rule merges ``n`` into ``m`` losslessly.

    The producer's weights get ``F_n = s·F_m`` (its bias stays arbitrary: it is folded
    into μ), and ``β_n`` is chosen so that
    ``B* = β_n − S*·β_m + (γ_n/σ_n)·(s·μ'_m − μ'_n) = 0`` with ``σ = sqrt(var + eps)``
    and ``μ' = μ − b``. Computed in float64, then stored in float32.
    """
    with torch.no_grad():
        bias = (
            producer.bias.double()
            if producer.bias is not None
            else torch.zeros(bn.num_features, dtype=torch.float64)
        )
        for n, m, s in pairs:
            producer.weight[n] = s * producer.weight[m]
            gamma = bn.weight.double()
            sigma = torch.sqrt(bn.running_var.double() + bn.eps)
            mu = bn.running_mean.double() - bias
            big_s = s * (gamma[n] / gamma[m]) * (sigma[m] / sigma[n])
            beta_n = big_s * bn.bias.double()[m] - (gamma[n] / sigma[n]) * (s * mu[m] - mu[n])
            bn.bias[n] = beta_n.float()


def planted_pairs(
    n: int, k: int, scales: Sequence[float], g: torch.Generator
) -> list[tuple[int, int, float]]:
    """For every pruned index ``k..n-1`` a random kept partner in ``0..k-1`` and a scale."""
    partners = torch.randint(0, k, (n - k,), generator=g).tolist()
    return [(k + i, partners[i], float(scales[i % len(scales)])) for i in range(n - k)]


def normalise_rows_l1(layer: nn.Linear | nn.Conv2d, lo: float, hi: float, g: torch.Generator):
    """Rescale every ``[w | b]`` row so its ℓ1 norm lies in ``[lo, hi]``."""
    with torch.no_grad():
        w = layer.weight.view(layer.weight.shape[0], -1)
        rows = w.abs().sum(1) + (layer.bias.abs() if layer.bias is not None else 0.0)
        target = lo + (hi - lo) * torch.rand(w.shape[0], generator=g)
        factor = target / rows
        w.mul_(factor[:, None])
        if layer.bias is not None:
            layer.bias.mul_(factor)


def params_linear(fin: int, fout: int, bias: bool = True) -> int:
    return fin * fout + (fout if bias else 0)


def params_conv(cin: int, cout: int, k: int, bias: bool) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def simple(groups: list) -> list:
    r"""Channel groups as ``MergeGroup``\ s (producer, consumer, bn, features), for comparisons."""
    import neuron_merging as nm

    return [nm.MergeGroup(g.producer, g.consumer, g.bn, g.features[0]) for g in groups]
