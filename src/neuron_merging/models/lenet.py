"""LeNet-300-100: the fully connected baseline of the neuron-merging paper (FashionMNIST).

Layer names ``ip1``/``ip2``/``ip3`` follow the released checkpoints
(``LeNet_300_100.original.300_100.bias.pth.tar``) so they load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._registry import init_weights, register_model, shape_of, validate_widths

__all__ = ["LeNet300", "lenet300"]

_DEFAULT_CFG = [300, 100]


class LeNet300(nn.Module):
    """784 → cfg[0] → cfg[1] → classes MLP with ReLU, every Linear with a bias.

    ``cfg`` holds the two hidden widths; pruning shrinks them, and the model is
    rebuilt from ``self.cfg``.
    """

    def __init__(self, num_classes: int = 10, cfg: Sequence[int] | None = None) -> None:
        super().__init__()
        widths = validate_widths(_DEFAULT_CFG if cfg is None else cfg, 2, "lenet300")
        self.num_classes = num_classes
        self.cfg: list[int] = widths
        self.ip1 = nn.Linear(28 * 28, widths[0])
        self.relu1 = nn.ReLU(inplace=True)
        self.ip2 = nn.Linear(widths[0], widths[1])
        self.relu2 = nn.ReLU(inplace=True)
        self.ip3 = nn.Linear(widths[1], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten ``(N, 1, 28, 28)`` (or ``(N, 784)``) input and return ``(N, classes)`` logits."""
        x = torch.flatten(x, 1)
        x = self.relu1(self.ip1(x))
        x = self.relu2(self.ip2(x))
        return self.ip3(x)


def _infer_cfg(state_dict: Mapping[str, torch.Tensor]) -> list[int]:
    return [shape_of(state_dict, "ip1.weight"), shape_of(state_dict, "ip2.weight")]


@register_model(
    "lenet300",
    default_num_classes=10,
    datasets=("fashion-mnist",),
    input_shape=(1, 28, 28),
    default_cfg=lambda num_classes: list(_DEFAULT_CFG),
    infer_cfg=_infer_cfg,
)
def lenet300(num_classes: int = 10, cfg: Sequence[int] | None = None) -> LeNet300:
    """LeNet-300-100; ``cfg=[h1, h2]`` sets the hidden widths (default ``[300, 100]``)."""
    return LeNet300(num_classes=num_classes, cfg=cfg)
