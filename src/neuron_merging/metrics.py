"""Model cost metrics: parameters and multiply-accumulates (MACs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .core.api import count_parameters

__all__ = ["count_macs", "count_parameters"]


def count_macs(model: nn.Module, example_inputs: Tensor | Sequence[Tensor]) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on ``example_inputs``, per example.

    Counts ``nn.Linear`` and ``nn.Conv2d`` layers (the layers merging shrinks);
    batch norm, activations and pooling are negligible and ignored.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() > 0 else 1
    total = 0

    def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups
            per_output *= module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * per_output

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total // max(batch, 1)
