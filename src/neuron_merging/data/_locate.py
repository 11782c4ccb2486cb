"""Dataset registry and on-disk discovery.

This module knows, for every supported dataset, its shape and normalisation
statistics (:class:`DatasetInfo`), which files make up each split, the folder
layouts a data root may use, and the order in which data roots are searched.
It does no reading or downloading itself, so every other module of the
subpackage can import it without cycles.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ConfigError, DatasetError

DATASETS: tuple[str, ...] = ("fashion-mnist", "cifar10", "cifar100")
"""Canonical names of the supported datasets."""

SPLITS: tuple[str, ...] = ("train", "test")
"""Names of the supported splits."""

ENV_DATA = "NEURON_MERGING_DATA"
"""Environment variable naming a data root, searched after an explicit ``data_dir``."""

_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the four ``*.gz`` files.

A module constant (read at call time) so tests can point it at a temporary folder.
"""

_CACHE_SUBDIR = "neuron-merging"

_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about one dataset.

    Attributes:
        name: canonical dataset name (one of :data:`DATASETS`).
        num_classes: number of target classes.
        input_shape: ``(C, H, W)`` of one image.
        mean: per-channel mean used for normalisation (on the ``[0, 1]`` scale).
        std: per-channel standard deviation used for normalisation.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


_INFO: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, (1, 28, 28), (0.5,), (0.5,)),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), _CIFAR_MEAN, _CIFAR_STD),
    "cifar100": DatasetInfo("cifar100", 100, (3, 32, 32), _CIFAR_MEAN, _CIFAR_STD),
}

# Files (base names, without an optional ``.gz``) of each FashionMNIST split: (images, labels).
FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Sub-folder holding the official python batches, and the batch files of each split.
CIFAR_DIRS: dict[str, str] = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "cifar10": {
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": ("test_batch",),
    },
    "cifar100": {"train": ("train",), "test": ("test",)},
}


def canonical_name(name: str) -> str:
    """Return the canonical dataset name for ``name``.

    Case and ``_`` versus ``-`` are ignored (``"Fashion_MNIST"`` is accepted), so that
    command-line spellings do not matter. Unknown names raise :class:`DatasetError`
    listing the valid ones.
    """
    if not isinstance(name, str):
        raise DatasetError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    if key in _INFO:
        return key
    raise DatasetError(f"unknown dataset {name!r}; valid names are: {', '.join(DATASETS)}")


def check_split(split: str) -> str:
    """Validate ``split`` (``"train"`` or ``"test"``) and return it."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; valid splits are: {', '.join(SPLITS)}")
    return split


def dataset_info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of dataset ``name`` (see :func:`canonical_name`)."""
    return _INFO[canonical_name(name)]


def user_cache_dir() -> Path:
    """Per-user cache root: ``$XDG_CACHE_HOME/neuron-merging`` or ``~/.cache/neuron-merging``.

    Following the XDG base-directory spec, a relative ``$XDG_CACHE_HOME`` is ignored.
    """
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / _CACHE_SUBDIR


def split_files(name: str, split: str | None) -> tuple[str, ...]:
    """Base names of the files that must exist for ``split`` (all splits when ``None``)."""
    splits = SPLITS if split is None else (check_split(split),)
    if name == "fashion-mnist":
        return tuple(f for s in splits for f in FASHION_MNIST_FILES[s])
    return tuple(f for s in splits for f in CIFAR_FILES[name][s])


def expand(path: str | os.PathLike[str], source: str) -> Path:
    """``path`` with ``~`` / ``~user`` expanded; an unknown user is a :class:`ConfigError`."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        user = str(path).split("/", 1)[0]
        raise ConfigError(
            f"{source} {str(path)!r}: cannot expand {user!r} (no such user or no home directory)"
        ) from None


def is_data_file(path: Path) -> bool:
    """Whether ``path`` is a regular file we can read; ``False`` only if it does not exist.

    A file that exists but cannot be read, a name that is too long or a folder
    we may not enter is a :class:`DatasetError` naming the path, not "not found".
    """
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(info.st_mode):
        return False
    if not os.access(path, os.R_OK):
        raise DatasetError(f"{path}: exists but is not readable (permission denied)")
    return True


def find_file(directory: Path, base: str) -> Path | None:
    """Return ``directory/base`` or ``directory/base.gz`` (raw preferred), or ``None``."""
    for candidate in (directory / base, directory / f"{base}.gz"):
        if is_data_file(candidate):
            return candidate
    return None


def layouts(name: str, root: Path) -> list[Path]:
    """Folders below ``root`` that may directly hold the files of ``name``, in search order."""
    if name == "fashion-mnist":
        return [root / "FashionMNIST" / "raw", root / "fashion-mnist", root]
    return [root / CIFAR_DIRS[name]]


def _holds(name: str, directory: Path, split: str | None) -> bool:
    files = split_files(name, split)
    if name == "fashion-mnist":
        return all(find_file(directory, f) is not None for f in files)
    # The CIFAR python batches are never gzipped individually.
    return all(is_data_file(directory / f) for f in files)


def default_download_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Root that downloads go to: ``data_dir``, else ``$NEURON_MERGING_DATA``, else the cache."""
    if data_dir is not None:
        return expand(data_dir, "--data-dir")
    env = os.environ.get(ENV_DATA, "")
    if env:
        return expand(env, f"${ENV_DATA}")
    return user_cache_dir()


def _search_plan(
    name: str, data_dir: str | os.PathLike[str] | None
) -> list[tuple[str, list[Path]]]:
    """The (source description, folders to check) pairs, in search order."""
    plan: list[tuple[str, list[Path]]] = []
    if data_dir is not None:
        plan.append(
            ("explicit data_dir / --data-dir", layouts(name, expand(data_dir, "--data-dir")))
        )
    env = os.environ.get(ENV_DATA, "")
    if env:
        plan.append((f"${ENV_DATA}", layouts(name, expand(env, f"${ENV_DATA}"))))
    else:
        plan.append((f"${ENV_DATA} (not set)", []))
    if name == "fashion-mnist":
        plan.append(("Debian package dataset-fashion-mnist", [Path(_DEBIAN_DIR)]))
    plan.append(("user cache", layouts(name, user_cache_dir())))
    return plan


def missing_message(name: str, split: str | None, data_dir: str | os.PathLike[str] | None) -> str:
    """Build the "dataset not found" message: every place looked, and how to get the data."""
    wanted = split_files(name, split)
    suffix = "[.gz]" if name == "fashion-mnist" else ""
    what = f"{name} ({split} split)" if split else name
    lines = [f"{what} not found. Looked for {', '.join(w + suffix for w in wanted)} in:"]
    for source, folders in _search_plan(name, data_dir):
        if not folders:
            lines.append(f"  - {source}")
        for folder in folders:
            lines.append(f"  - {folder}  ({source})")
    lines.append("To get the data:")
    lines.append(
        "  - pass --download (load_dataset(..., download=True)) to fetch it into --data-dir, "
        f"${ENV_DATA}, or {user_cache_dir()}"
    )
    if name == "fashion-mnist":
        lines.append(
            f"  - or: sudo apt-get install dataset-fashion-mnist (installs to {_DEBIAN_DIR})"
        )
    lines.append(
        f"  - or put the files in a folder and set {ENV_DATA}=<folder> or pass --data-dir <folder>"
    )
    return "\n".join(lines)


def locate(
    name: str, data_dir: str | os.PathLike[str] | None = None, split: str | None = None
) -> Path | None:
    """Return the first folder (in search order) holding the files of ``split``, or ``None``."""
    name = canonical_name(name)
    for _source, folders in _search_plan(name, data_dir):
        for folder in folders:
            if _holds(name, folder, split):
                return folder
    return None


def resolve_data_dir(
    name: str, data_dir: str | os.PathLike[str] | None = None, split: str | None = None
) -> Path:
    """Find the folder that directly holds the files of dataset ``name``.

    Search order: 1. ``data_dir``; 2. ``$NEURON_MERGING_DATA``; 3. the Debian folder
    ``/usr/share/datasets/fashion-mnist`` (FashionMNIST only); 4. the user cache
    (:func:`user_cache_dir`). Within each root the accepted layouts are, for
    FashionMNIST, ``<root>/FashionMNIST/raw``, ``<root>/fashion-mnist`` and ``<root>``
    (raw IDX or ``.gz`` files); for CIFAR-10 ``<root>/cifar-10-batches-py`` and for
    CIFAR-100 ``<root>/cifar-100-python``. The first folder holding every file of
    ``split`` (of both splits when ``split`` is ``None``) wins.

    Raises:
        DatasetError: if no folder qualifies; the message lists every place looked and
            how to obtain the data.
    """
    name = canonical_name(name)
    if split is not None:
        check_split(split)
    found = locate(name, data_dir, split)
    if found is None:
        raise DatasetError(missing_message(name, split, data_dir))
    return found
