"""Reader for the official CIFAR-10 / CIFAR-100 "python version" batch files.

Each batch is a (Python 2, protocol 2) pickle of a dict with ``b"data"``, a uint8
``N x 3072`` array whose rows hold the 1024 red, then 1024 green, then 1024 blue
values (each plane row-major), and the labels (``b"labels"`` for CIFAR-10,
``b"fine_labels"`` for CIFAR-100). Files are unpickled with the restricted
:class:`~neuron_merging.data._safe_pickle.SafeUnpickler`, never with plain pickle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import DatasetError
from ._locate import CIFAR_FILES, canonical_name, check_split, dataset_info
from ._safe_pickle import safe_load

_LABEL_KEYS = {"cifar10": b"labels", "cifar100": b"fine_labels"}
_ROW = 3 * 32 * 32


def _get(batch: dict[Any, Any], key: bytes) -> Any:
    # Accept str keys too, for files re-pickled under Python 3 with str keys.
    if key in batch:
        return batch[key]
    return batch.get(key.decode("ascii"))


def read_cifar_batch(path: str | os.PathLike[str], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file of dataset ``name`` (``cifar10``/``cifar100``).

    Returns ``(uint8 images (N, 3, 32, 32), int64 labels (N,))``. Every structural
    problem (not a dict, missing key, wrong dtype or shape, label count or range)
    raises a :class:`DatasetError` naming the file.
    """
    name = canonical_name(name)
    if name not in _LABEL_KEYS:
        raise DatasetError(f"{name} is not a CIFAR dataset")
    file = Path(path)
    batch = safe_load(file)
    if not isinstance(batch, dict):
        raise DatasetError(f"{file}: expected a pickled dict, got {type(batch).__name__}")
    data = _get(batch, b"data")
    label_key = _LABEL_KEYS[name]
    raw_labels = _get(batch, label_key)
    if data is None or raw_labels is None:
        raise DatasetError(
            f"{file}: not a {name} batch: keys b'data' and {label_key!r} are required, "
            f"found {sorted(map(repr, batch))}"
        )
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{file}: b'data' must be a uint8 numpy array, got {kind}")
    if data.ndim != 2 or data.shape[1] != _ROW:
        raise DatasetError(f"{file}: b'data' has shape {data.shape}, expected (N, {_ROW})")
    try:
        found = np.asarray(raw_labels)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DatasetError(f"{file}: {label_key!r} is not a list of integers") from exc
    if found.size and (found.dtype == np.bool_ or not np.issubdtype(found.dtype, np.integer)):
        raise DatasetError(
            f"{file}: {label_key!r} is not a list of integers (found {found.dtype} values)"
        )
    labels = found.astype(np.int64)
    if labels.ndim != 1 or len(labels) != len(data):
        raise DatasetError(
            f"{file}: {len(data)} images but {labels.size} labels; the counts must be equal"
        )
    num_classes = dataset_info(name).num_classes
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DatasetError(
            f"{file}: labels out of range 0..{num_classes - 1} "
            f"(found {int(labels.min())}..{int(labels.max())})"
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar_arrays(directory: Path, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load ``split`` of ``name`` from ``directory`` (the ``cifar-*`` folder itself)."""
    name = canonical_name(name)
    check_split(split)
    parts = []
    for base in CIFAR_FILES[name][split]:
        file = directory / base
        if not file.is_file():
            raise DatasetError(f"{directory}: missing {name} batch file {base}")
        parts.append(read_cifar_batch(file, name))
    if len(parts) == 1:
        return parts[0]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return images, labels
