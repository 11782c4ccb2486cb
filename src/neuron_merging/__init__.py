"""neuron-merging: data-free structured pruning compensated by neuron merging.

The main entry points are :func:`merge` and :func:`prune` (and :func:`compress`
with a :class:`MergeConfig`). They return a :class:`MergeResult` holding a new,
physically smaller model and a report of what was done. The compression core
lives in :mod:`neuron_merging.core`; :func:`save` and :func:`load` store a
compressed model without pickle (:mod:`neuron_merging.serialize`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .core.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    ModelError,
    NeuronMergingError,
    OutputError,
)

if TYPE_CHECKING:
    from .core.api import MergeResult, compress, count_parameters, merge, prune
    from .core.build import GroupPlan
    from .core.config import DEFAULT_LAMBDA, DEFAULT_THRESHOLD, MergeConfig
    from .core.groups import ChannelGroup, MergeGroup, SkippedLayer, find_groups
    from .core.report import GroupReport, MergeReport
    from .core.select import available_criteria, register_criterion
    from .serialize import load, read_manifest, save

# The torch-backed names are imported on first use, so ``import neuron_merging.cli``
# stays light and the CLI can handle Ctrl-C or SIGTERM while torch is still loading.
_LAZY: dict[str, str] = {
    "MergeResult": ".core.api",
    "compress": ".core.api",
    "count_parameters": ".core.api",
    "merge": ".core.api",
    "prune": ".core.api",
    "GroupPlan": ".core.build",
    "DEFAULT_LAMBDA": ".core.config",
    "DEFAULT_THRESHOLD": ".core.config",
    "MergeConfig": ".core.config",
    "ChannelGroup": ".core.groups",
    "MergeGroup": ".core.groups",
    "SkippedLayer": ".core.groups",
    "find_groups": ".core.groups",
    "GroupReport": ".core.report",
    "MergeReport": ".core.report",
    "available_criteria": ".core.select",
    "register_criterion": ".core.select",
    "save": ".serialize",
    "load": ".serialize",
    "read_manifest": ".serialize",
}
#: Subpackages imported on first use: ``nm.export``, ``nm.hf``.
_LAZY_MODULES = ("export", "hf")


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_MODULES))


__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LAMBDA",
    "DEFAULT_THRESHOLD",
    "ChannelGroup",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "GroupPlan",
    "GroupReport",
    "MergeConfig",
    "MergeGroup",
    "MergeReport",
    "MergeResult",
    "ModelError",
    "NeuronMergingError",
    "OutputError",
    "SkippedLayer",
    "__version__",
    "available_criteria",
    "compress",
    "count_parameters",
    "export",
    "find_groups",
    "hf",
    "load",
    "merge",
    "prune",
    "read_manifest",
    "register_criterion",
    "save",
]
