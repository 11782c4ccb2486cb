"""Exception hierarchy.

Every error the library raises on purpose derives from :class:`NeuronMergingError`,
so callers (and the CLI) can tell "your input is wrong" apart from a bug. Each
subclass carries a distinct CLI exit code.
"""

from __future__ import annotations


class NeuronMergingError(Exception):
    """Base class of all errors raised deliberately by neuron-merging."""

    exit_code: int = 1


class ConfigError(NeuronMergingError, ValueError):
    """An argument or configuration value is invalid (ratio, criterion, keep=, ...)."""

    exit_code = 2


class ModelError(NeuronMergingError):
    """The model cannot be processed: non-finite weights, untraceable graph, bad groups."""

    exit_code = 3


class CheckpointError(NeuronMergingError):
    """A checkpoint file is missing, corrupt, unsafe or for another architecture."""

    exit_code = 4


class DatasetError(NeuronMergingError):
    """A dataset is missing, malformed, or failed its checksum."""

    exit_code = 5


class OutputError(NeuronMergingError):
    """An output file or directory cannot be written."""

    exit_code = 6
