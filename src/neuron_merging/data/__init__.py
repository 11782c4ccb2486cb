"""Datasets: FashionMNIST, CIFAR-10 and CIFAR-100 as normalised in-memory tensors.

No torchvision: the readers parse the official file formats directly (IDX for
FashionMNIST, the python pickle batches for CIFAR, through a restricted unpickler),
find the files through a fixed search order (:func:`resolve_data_dir`), can download
and checksum them (:mod:`._download`), and batch them with vectorised augmentation.

Typical use::

    ds = load_dataset("cifar10", "train", download=True)
    for images, labels in iterate_batches(ds, 128, shuffle=True, augment=True, generator=g):
        ...
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..core.errors import ConfigError, DatasetError
from ._download import (
    download_dataset,
    download_file,
    fetch_cifar,
    fetch_fashion_mnist,
)
from ._locate import (
    DATASETS,
    SPLITS,
    DatasetInfo,
    canonical_name,
    check_split,
    dataset_info,
    default_download_root,
    locate,
    missing_message,
    resolve_data_dir,
    user_cache_dir,
)
from .cifar import load_cifar_arrays
from .fashion_mnist import load_fashion_mnist_arrays
from .transforms import crop_flip, denormalize, normalize_uint8, pad_value, random_crop_flip

__all__ = [
    "DATASETS",
    "SPLITS",
    "ArrayDataset",
    "DatasetInfo",
    "crop_flip",
    "dataset_info",
    "denormalize",
    "download_dataset",
    "download_file",
    "fetch_cifar",
    "fetch_fashion_mnist",
    "iterate_batches",
    "load_dataset",
    "normalize_uint8",
    "num_batches",
    "pad_value",
    "random_crop_flip",
    "resolve_data_dir",
    "user_cache_dir",
]


@dataclass(eq=False)
class ArrayDataset:
    """A whole dataset split held in memory.

    Attributes:
        images: ``(N, C, H, W)`` float32 tensor, already normalised with the dataset's
            mean/std.
        labels: ``(N,)`` int64 class indices.
        info: the :class:`DatasetInfo` the images were normalised with, if known; the
            augmentation uses its mean/std to pad with the value of a raw black pixel.
    """

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo | None = None

    def __post_init__(self) -> None:
        """Check that images and labels are consistent, so errors surface at construction."""
        if self.images.ndim != 4 or not self.images.is_floating_point():
            raise DatasetError(
                f"images must be a float (N, C, H, W) tensor, got {self.images.dtype} "
                f"of shape {tuple(self.images.shape)}"
            )
        if self.labels.ndim != 1 or self.labels.is_floating_point() or self.labels.is_complex():
            raise DatasetError(
                f"labels must be an integer (N,) tensor, got {self.labels.dtype} "
                f"of shape {tuple(self.labels.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise DatasetError(
                f"{len(self.images)} images but {len(self.labels)} labels; counts must be equal"
            )

    def __len__(self) -> int:
        """Number of examples."""
        return int(self.images.shape[0])


def load_dataset(
    name: str,
    split: str = "test",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> ArrayDataset:
    """Load one split of a dataset as a normalised :class:`ArrayDataset`.

    Args:
        name: one of :data:`DATASETS` (case and ``_``/``-`` are ignored).
        split: ``"train"`` or ``"test"``.
        data_dir: a data root searched first (see :func:`resolve_data_dir`).
        download: when the files are found nowhere, download them (with checksum
            verification) into ``data_dir``, else ``$NEURON_MERGING_DATA``, else the user
            cache, instead of failing.

    Returns:
        FashionMNIST as ``(N, 1, 28, 28)`` with ``(x/255 - 0.5)/0.5``; CIFAR-10/100 as
        ``(N, 3, 32, 32)`` normalised with mean ``(0.4914, 0.4822, 0.4465)`` and std
        ``(0.2023, 0.1994, 0.2010)``. CIFAR-100 labels are the 100 fine labels.

    Raises:
        DatasetError: unknown name/split, data missing (message lists every place looked),
            malformed files, or a failed download.
    """
    name = canonical_name(name)
    check_split(split)
    folder = locate(name, data_dir, split)
    if folder is None:
        if not download:
            raise DatasetError(missing_message(name, split, data_dir))
        root = default_download_root(data_dir)
        download_dataset(name, root)
        folder = resolve_data_dir(name, root, split)
    info = dataset_info(name)
    if name == "fashion-mnist":
        images, labels = load_fashion_mnist_arrays(folder, split)
    else:
        images, labels = load_cifar_arrays(folder, name, split)
    if len(labels) == 0:
        raise DatasetError(f"{folder}: the {split} split of {name} holds 0 images")
    return ArrayDataset(
        images=normalize_uint8(images, info.mean, info.std),
        labels=torch.from_numpy(labels.astype("int64", copy=False)),
        info=info,
    )


def num_batches(ds: ArrayDataset, batch_size: int) -> int:
    """Number of batches :func:`iterate_batches` yields (the last one may be smaller)."""
    _check_batch_size(batch_size)
    return math.ceil(len(ds) / batch_size)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")


def iterate_batches(
    ds: ArrayDataset,
    batch_size: int,
    shuffle: bool = False,
    augment: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` batches of ``ds`` in order, or shuffled.

    Args:
        ds: the dataset.
        batch_size: examples per batch; the final batch holds the remainder.
        shuffle: visit the examples in a random permutation drawn from ``generator``.
        augment: apply the CIFAR training augmentation to each batch: random crop of the
            original size from the image zero-padded by 4 (padding in normalised space
            uses ``(0 - mean) / std``, i.e. a raw black pixel) and a random horizontal flip
            with probability 0.5 (see :func:`random_crop_flip`).
        generator: CPU generator for the permutation and the augmentation; the same seed
            gives identical batches. ``None`` uses torch's global RNG.
    """
    _check_batch_size(batch_size)
    n = len(ds)
    order: torch.Tensor | None = None
    if shuffle:
        rng_device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=rng_device).to(ds.images.device)
    fill: tuple[float, ...] = ()
    if augment:
        info = ds.info if ds.info is not None else dataset_info("cifar10")
        channels = ds.images.shape[1]
        # Unknown statistics for this channel count: pad with zeros.
        same = len(info.mean) == channels
        fill = pad_value(info.mean, info.std) if same else (0.0,) * channels
    for start in range(0, n, batch_size):
        if order is None:
            images = ds.images[start : start + batch_size]
            labels = ds.labels[start : start + batch_size]
        else:
            index = order[start : start + batch_size]
            images = ds.images[index]
            labels = ds.labels[index]
        if augment:
            images = random_crop_flip(images, padding=4, fill=fill, generator=generator)
        yield images, labels
