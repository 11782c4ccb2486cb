"""Merge a small VGG-style CNN and a ResNet-style network; print the reports.

Run with ``python examples/demo.py``. Uses random weights with planted
near-duplicate filters, so merging visibly beats plain pruning.
"""

from __future__ import annotations

import torch
from torch import nn

import neuron_merging as nm


class TinyVGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for width in (32, "M", 64, "M", 64):
            if width == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(cin, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(),
                ]
                cin = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(Block(width), Block(width))
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def plant_duplicates(model: nn.Module) -> None:
    """Make every second output filter a noisy positive multiple of its neighbour."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight.shape[0] > 16:
                w = module.weight
                w[1::2] = 1.5 * w[0::2] + 0.05 * torch.randn_like(w[0::2])
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    for model in (TinyVGG(), TinyResNet()):
        plant_duplicates(model)
        model.eval()
        merged = nm.merge(model, x[:1], ratio=0.5, bn_rule="exact", threshold=0.1)
        pruned = nm.prune(model, x[:1], ratio=0.5)
        with torch.no_grad():
            ref = model(x)
            err_m = (merged.model(x) - ref).norm() / ref.norm()
            err_p = (pruned.model(x) - ref).norm() / ref.norm()
        print(f"## {type(model).__name__}\n")
        print(merged.report.to_markdown())
        print(f"\nrelative output error: merge {err_m:.4f}, prune {err_p:.4f}\n")


if __name__ == "__main__":
    main()
