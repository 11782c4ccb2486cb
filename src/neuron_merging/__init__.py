"""neuron-merging: data-free structured pruning compensated by neuron merging."""

from .errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    ModelError,
    NeuronMergingError,
    OutputError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "ModelError",
    "NeuronMergingError",
    "OutputError",
    "__version__",
]
