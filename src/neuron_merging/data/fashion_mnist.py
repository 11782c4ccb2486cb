"""Reader for FashionMNIST in the IDX format (raw or gzip-compressed).

IDX files start with a big-endian header: a magic number (2051 for 3-d uint8 image
files, 2049 for 1-d uint8 label files) followed by one 32-bit size per dimension,
then the data. Every header is checked against the file length so a truncated or
mislabelled file fails loudly instead of yielding garbage.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..core.errors import DatasetError
from ._locate import FASHION_MNIST_FILES, check_split, find_file

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
IMAGE_SIZE = 28
NUM_CLASSES = 10


#: The most data one IDX file may declare (FashionMNIST's largest is 47 MB); a
#: header claiming more is refused before anything is read or allocated.
MAX_IDX_BYTES = 1 << 28


def read_idx_bytes(path: str | os.PathLike[str]) -> bytes:
    """Return the (decompressed) bytes of an IDX file; ``.gz`` files are gunzipped.

    Reads the whole file: the readers below use :func:`read_idx` instead, which
    reads no more than the header declares.
    """
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{file}: cannot read: {exc.strerror or exc}") from exc
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file name says
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"{file}: corrupt or truncated gzip data ({exc})") from exc
    return raw


def read_idx(path: str | os.PathLike[str], magic: int, ndim: int) -> tuple[tuple[int, ...], bytes]:
    """Read an IDX file's header and then exactly the data it declares: ``(dims, data)``.

    The header is checked first, so a wrong magic number costs 16 bytes of
    reading, a raw file whose size disagrees with its header is refused from its
    size alone, and a gzip stream is decompressed only up to one byte past the
    declared size (trailing data is "too long", however much of it there is).
    """
    file = Path(path)
    header_len = 4 + 4 * ndim
    try:
        with open(file, "rb") as handle:
            compressed = handle.read(2) == b"\x1f\x8b"
            handle.seek(0)
            stream = gzip.GzipFile(fileobj=handle) if compressed else handle
            try:
                header = stream.read(header_len)
                dims = _header(header, file, magic, ndim, check_size=False)
                expected = math.prod(dims)
                if expected > MAX_IDX_BYTES:
                    raise DatasetError(
                        f"{file}: its header declares {'x'.join(map(str, dims))} = {expected} "
                        f"bytes of data, more than the {MAX_IDX_BYTES >> 20} MiB an IDX file may hold"
                    )
                if not compressed:
                    size = os.fstat(handle.fileno()).st_size
                    if size != header_len + expected:
                        _size_error(file, size, header_len + expected, dims)
                data = stream.read(expected + 1)
            except (OSError, EOFError, zlib.error) as exc:
                if isinstance(exc, OSError) and not compressed:
                    raise
                raise DatasetError(f"{file}: corrupt or truncated gzip data ({exc})") from exc
    except OSError as exc:
        raise DatasetError(f"{file}: cannot read: {exc.strerror or exc}") from exc
    if len(data) != expected:
        if len(data) > expected:
            raise DatasetError(
                f"{file}: holds more than the {header_len + expected} bytes its header declares "
                f"(dims {'x'.join(map(str, dims))}); the file is too long"
            )
        _size_error(file, header_len + len(data), header_len + expected, dims)
    return dims, data


def _size_error(file: Path, size: int, expected: int, dims: tuple[int, ...]) -> None:
    raise DatasetError(
        f"{file}: file size {size} bytes does not match its header "
        f"(dims {'x'.join(map(str, dims))} need {expected} bytes); the file is "
        f"{'truncated' if size < expected else 'too long'}"
    )


def _header(
    data: bytes, file: Path, magic: int, ndim: int, *, check_size: bool = True
) -> tuple[int, ...]:
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(
            f"{file}: truncated IDX file: {len(data)} bytes, shorter than its "
            f"{header_len}-byte header"
        )
    found = struct.unpack_from(">I", data, 0)[0]
    if found != magic:
        kind = "image" if magic == IMAGES_MAGIC else "label"
        raise DatasetError(
            f"{file}: wrong IDX magic number {found} (expected {magic} for a uint8 {kind} file)"
        )
    dims = struct.unpack_from(f">{ndim}I", data, 4)
    expected = header_len + math.prod(dims)
    if check_size and len(data) != expected:
        _size_error(file, len(data), expected, dims)
    return dims


def read_idx_images(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX3 uint8 image file into an ``(N, 1, 28, 28)`` uint8 array."""
    file = Path(path)
    (n, rows, cols), data = read_idx(file, IMAGES_MAGIC, 3)
    if (rows, cols) != (IMAGE_SIZE, IMAGE_SIZE):
        raise DatasetError(
            f"{file}: images are {rows}x{cols}, expected {IMAGE_SIZE}x{IMAGE_SIZE} for FashionMNIST"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(n, 1, rows, cols)


def read_idx_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX1 uint8 label file into an ``(N,)`` int64 array, checking the range."""
    file = Path(path)
    (n,), data = read_idx(file, LABELS_MAGIC, 1)
    labels = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    if n and int(labels.max()) >= NUM_CLASSES:
        raise DatasetError(f"{file}: label {int(labels.max())} out of range 0..{NUM_CLASSES - 1}")
    return labels


def load_fashion_mnist_arrays(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load one split from ``directory`` as ``(uint8 images (N,1,28,28), int64 labels (N,))``."""
    check_split(split)
    paths = []
    for base in FASHION_MNIST_FILES[split]:
        found = find_file(directory, base)
        if found is None:
            raise DatasetError(f"{directory}: missing {base} (or {base}.gz)")
        paths.append(found)
    images = read_idx_images(paths[0])
    labels = read_idx_labels(paths[1])
    if len(images) != len(labels):
        raise DatasetError(
            f"{paths[0]} holds {len(images)} images but {paths[1]} holds {len(labels)} "
            "labels; the counts must be equal"
        )
    return images, labels
