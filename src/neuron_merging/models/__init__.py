"""Model registry: build the paper's networks by name.

>>> from neuron_merging import models
>>> net = models.create("resnet56", num_classes=10, cfg=[8, 16, 32])
>>> models.list_models()
['lenet300', 'resnet56', 'vgg16', 'wrn40_4']

Every model exposes ``arch``, ``num_classes`` and ``cfg`` (its layer widths), so a
pruned network can be saved and rebuilt with ``create(arch, num_classes, cfg)``.
State-dict keys match the authors' released checkpoints exactly.
"""

from __future__ import annotations

from . import lenet, resnet, vgg, wrn  # noqa: F401  (import registers the models)
from ._registry import CfgItem, ModelSpec, create, list_models, model_spec, register_model
from .lenet import LeNet300
from .resnet import ResNet
from .vgg import VGG
from .wrn import WideResNet

__all__ = [
    "VGG",
    "CfgItem",
    "LeNet300",
    "ModelSpec",
    "ResNet",
    "WideResNet",
    "create",
    "list_models",
    "model_spec",
    "register_model",
]
