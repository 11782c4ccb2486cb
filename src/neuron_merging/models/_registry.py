"""Private infrastructure behind :mod:`neuron_merging.models`.

Model families register a factory with :func:`register_model`; everything else
(the CLI, checkpoint loading, the pruning code) builds networks by name through
:func:`create`, so a model is described in exactly one place. Besides the
factory, a registration records what the checkpoint loader needs to rebuild a
*compressed* network from a bare state dict: how the per-layer widths (``cfg``)
default, and how to read them back off tensor shapes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from ..core.errors import ConfigError

__all__ = [
    "CfgItem",
    "ModelSpec",
    "create",
    "expand_stage_cfg",
    "init_weights",
    "list_models",
    "model_spec",
    "register_model",
    "shape_of",
    "validate_widths",
]

CfgItem = int | str
"""One entry of a width configuration: a channel/unit count, or ``"M"`` (VGG max-pool)."""

_Factory = TypeVar("_Factory", bound=Callable[..., nn.Module])


def _no_default_cfg(num_classes: int) -> list[CfgItem]:
    return []


@dataclass(frozen=True)
class ModelSpec:
    """Static description of a registered architecture.

    ``input_shape`` is the per-sample shape ``(C, H, W)`` the network expects and
    ``datasets`` the dataset names it is meant for. The callables are kept out of
    ``repr``/equality so two specs compare by their description only.
    """

    name: str
    default_num_classes: int
    datasets: tuple[str, ...]
    input_shape: tuple[int, ...]
    factory: Callable[..., nn.Module] = field(repr=False, compare=False)
    default_cfg_fn: Callable[[int], list[CfgItem]] = field(
        default=_no_default_cfg, repr=False, compare=False
    )
    infer_cfg_fn: Callable[[Mapping[str, torch.Tensor]], list[CfgItem]] | None = field(
        default=None, repr=False, compare=False
    )

    def default_cfg(self, num_classes: int | None = None) -> list[CfgItem]:
        """Return the uncompressed width configuration (a fresh list, safe to mutate)."""
        n = self.default_num_classes if num_classes is None else num_classes
        return list(self.default_cfg_fn(n))

    def infer_cfg(self, state_dict: Mapping[str, torch.Tensor]) -> list[CfgItem]:
        """Read the width configuration off the tensor shapes of ``state_dict``.

        This is what lets a compressed checkpoint saved without metadata be rebuilt.
        Raises :class:`ConfigError` when a tensor the architecture needs is missing.
        """
        if self.infer_cfg_fn is None:
            raise ConfigError(f"model {self.name!r} cannot infer its cfg from a state dict")
        return list(self.infer_cfg_fn(state_dict))


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    default_num_classes: int,
    datasets: Sequence[str],
    input_shape: Sequence[int],
    default_cfg: Callable[[int], list[CfgItem]] | None = None,
    infer_cfg: Callable[[Mapping[str, torch.Tensor]], list[CfgItem]] | None = None,
) -> Callable[[_Factory], _Factory]:
    """Decorator registering ``factory(num_classes=..., cfg=...) -> nn.Module`` under ``name``.

    The factory is returned unchanged, so it stays directly callable. ``default_cfg``
    maps a class count to the uncompressed widths; ``infer_cfg`` reads widths off a
    state dict (both optional for models without a width configuration).
    Registering a name twice is an error rather than a silent override.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError("model name must be a non-empty string")

    def decorator(factory: _Factory) -> _Factory:
        if name in _REGISTRY:
            raise ConfigError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(
            name=name,
            default_num_classes=int(default_num_classes),
            datasets=tuple(datasets),
            input_shape=tuple(int(d) for d in input_shape),
            factory=factory,
            default_cfg_fn=default_cfg or _no_default_cfg,
            infer_cfg_fn=infer_cfg,
        )
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """Return the :class:`ModelSpec` of ``name``; :class:`ConfigError` lists valid names."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        valid = ", ".join(list_models()) or "(none registered)"
        raise ConfigError(f"unknown model {name!r}; valid names: {valid}") from None


def _check_num_classes(num_classes: object) -> int:
    if isinstance(num_classes, bool):
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    try:
        n = operator.index(num_classes)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}") from None
    if n <= 0:
        raise ConfigError(f"num_classes must be a positive integer, got {n}")
    return n


def create(
    name: str,
    num_classes: int | None = None,
    cfg: Sequence[CfgItem] | None = None,
) -> nn.Module:
    """Build the registered model ``name``.

    ``num_classes`` defaults to the spec's ``default_num_classes``; ``cfg`` (layer
    widths, see each model) defaults to the uncompressed network. The returned
    module carries ``arch``, ``num_classes`` and ``cfg`` attributes so it can be
    saved and re-created later. Invalid arguments raise :class:`ConfigError`.
    """
    spec = model_spec(name)
    n = spec.default_num_classes if num_classes is None else _check_num_classes(num_classes)
    if cfg is not None and (isinstance(cfg, (str, bytes)) or not isinstance(cfg, Sequence)):
        raise ConfigError(f"cfg for {name!r} must be a list of widths, got {cfg!r}")
    model = spec.factory(num_classes=n, cfg=None if cfg is None else list(cfg))
    model.arch = name
    return model


def _width(value: object, arch: str, position: int) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"cfg[{position}] for {arch!r} must be a positive integer, got {value!r}")
    try:
        width = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(
            f"cfg[{position}] for {arch!r} must be a positive integer, got {value!r}"
        ) from None
    if width <= 0:
        raise ConfigError(f"cfg[{position}] for {arch!r} must be a positive integer, got {width}")
    return width


def validate_widths(cfg: Sequence[object], expected_len: int, arch: str) -> list[int]:
    """Check ``cfg`` holds exactly ``expected_len`` positive integers; return them as ints."""
    if len(cfg) != expected_len:
        raise ConfigError(f"cfg for {arch!r} must have {expected_len} widths, got {len(cfg)}")
    return [_width(v, arch, i) for i, v in enumerate(cfg)]


def expand_stage_cfg(
    cfg: Sequence[object], blocks_per_stage: Sequence[int], arch: str
) -> list[int]:
    """Accept either one width per block or one width per stage (broadcast to its blocks)."""
    total = sum(blocks_per_stage)
    if len(cfg) == len(blocks_per_stage):
        per_stage = validate_widths(cfg, len(blocks_per_stage), arch)
        return [w for w, n in zip(per_stage, blocks_per_stage, strict=True) for _ in range(n)]
    if len(cfg) == total:
        return validate_widths(cfg, total, arch)
    raise ConfigError(
        f"cfg for {arch!r} must have {total} per-block widths or "
        f"{len(blocks_per_stage)} per-stage widths, got {len(cfg)}"
    )


def shape_of(state_dict: Mapping[str, Any], key: str, dim: int = 0) -> int:
    """``state_dict[key].shape[dim]``, raising :class:`ConfigError` if the key is absent."""
    try:
        tensor = state_dict[key]
    except KeyError:
        raise ConfigError(f"state dict has no {key!r}") from None
    if not isinstance(tensor, torch.Tensor) or tensor.dim() <= dim:
        raise ConfigError(f"state dict entry {key!r} is not a tensor with a dimension {dim}")
    return int(tensor.shape[dim])


def init_weights(model: nn.Module) -> None:
    """Deterministic (given the torch seed) He initialisation shared by all families.

    Convolutions get Kaiming-normal weights (fan-out, ReLU gain) as in the ResNet
    and WRN papers, BatchNorm starts as identity (weight 1, bias 0), and Linear
    layers keep PyTorch's default (uniform) weight init with a zero bias.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
