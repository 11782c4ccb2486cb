"""neuron-merging: data-free structured pruning compensated by neuron merging.

The main entry points are :func:`merge` and :func:`prune` (and :func:`compress`
with a :class:`MergeConfig`). They return a :class:`MergeResult` holding a new,
physically smaller model and a report of what was done. The compression core
lives in :mod:`neuron_merging.core`; :func:`save` and :func:`load` store a
compressed model without pickle (:mod:`neuron_merging.serialize`).
"""

from . import export, hf
from .core.api import MergeResult, compress, count_parameters, merge, prune
from .core.build import GroupPlan
from .core.config import DEFAULT_LAMBDA, DEFAULT_THRESHOLD, MergeConfig
from .core.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    ModelError,
    NeuronMergingError,
    OutputError,
)
from .core.groups import ChannelGroup, MergeGroup, SkippedLayer, find_groups
from .core.report import GroupReport, MergeReport
from .core.select import available_criteria, register_criterion
from .serialize import load, read_manifest, save

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
