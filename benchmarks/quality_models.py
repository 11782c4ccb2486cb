"""The extra model of the quality benchmark: a small conv net with BN on FashionMNIST.

Trained once here with :func:`train_convbn` (seeded, about two minutes on 2
CPU cores) and committed as ``benchmarks/assets/convbn_fmnist.pt`` (a plain
state dict), so the benchmark never depends on retraining. It is not one of the
paper's models: it exists so that no method is tuned to the two released
checkpoints only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

ASSET = Path(__file__).resolve().parent / "assets" / "convbn_fmnist.pt"


class ConvBN(nn.Module):
    """conv(1→32)-BN-ReLU-pool, conv(32→64)-BN-ReLU-pool, conv(64→64)-BN-ReLU, Linear(64·7·7→10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(64 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1, 28, 28)`` → ``(N, 10)`` logits."""
        return self.classifier(torch.flatten(self.features(x), 1))


def load_convbn(path: Path = ASSET) -> ConvBN:
    """The committed checkpoint, in eval mode."""
    model = ConvBN()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def train_convbn(data_dir: str, out: Path = ASSET, epochs: int = 3, seed: int = 0) -> float:
    """Seeded recipe: SGD(0.05, momentum 0.9, wd 5e-4), batch 128, cosine LR, no augmentation."""
    from neuron_merging.data import iterate_batches, load_dataset
    from neuron_merging.training import evaluate

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    train = load_dataset("fashion-mnist", "train", data_dir)
    test = load_dataset("fashion-mnist", "test", data_dir)
    model = ConvBN()
    steps = epochs * ((len(train) + 127) // 128)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
    for _ in range(epochs):
        model.train()
        for images, labels in iterate_batches(train, 128, shuffle=True, generator=gen):
            opt.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            opt.step()
            sched.step()
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return evaluate(model, test, show_progress=False).accuracy


if __name__ == "__main__":
    import sys

    print(
        f"test accuracy {train_convbn(sys.argv[1] if len(sys.argv) > 1 else '../shared/data'):.2f}"
    )
