"""Model cost metrics: parameters and multiply-accumulates (MACs)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .core.api import count_parameters

__all__ = ["count_macs", "count_parameters"]


def count_macs(model: nn.Module, example_inputs: Tensor | Sequence[Tensor]) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on ``example_inputs``, per example.

    Counts ``nn.Linear`` layers and convolutions of every kind (1-3-D, transposed; the
    layers merging shrinks); batch norm, activations and pooling are negligible and
    ignored.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() > 0 else 1
    total = 0

    def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, nn.modules.conv._ConvNd):
            kernel = math.prod(module.kernel_size)
            if module.transposed:  # every input element is spread over a kernel of outputs
                total += args[0].numel() * module.out_channels // module.groups * kernel
            else:
                total += output.numel() * (module.in_channels // module.groups) * kernel

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
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
