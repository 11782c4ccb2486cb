"""Restricted unpickling for the official CIFAR python batches.

A pickle can name any importable callable and have it called while loading, so a
plain :func:`pickle.load` on a downloaded or shared file is arbitrary code
execution. The official CIFAR batches only need numpy's array reconstruction
machinery, so :class:`SafeUnpickler` resolves exactly those globals and refuses
everything else with a :class:`~neuron_merging.errors.DatasetError` before any
foreign code can run.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import DatasetError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode`` limited to the latin-1 round trip pickle uses.

    Python 3 writes ``bytes`` under protocol < 3 as ``_codecs.encode(text, "latin1")``;
    no other codec is needed, so no other codec (and no codec module import) is allowed.
    """
    if not isinstance(obj, str) or encoding.lower().replace("-", "").replace("_", "") not in (
        "latin1",
        "iso88591",
    ):
        raise pickle.UnpicklingError(f"forbidden _codecs.encode call with encoding {encoding!r}")
    return obj.encode("latin-1", errors)


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """numpy's protocol-5 array reconstructor, limited to plain data.

    Protocol 5 pickles an array as ``_frombuffer(buffer, dtype, shape, order)``:
    a copy of raw bytes, which runs no code. Only byte buffers, non-object
    dtypes, integer shapes and C/F order are accepted.
    """
    if isinstance(buf, pickle.PickleBuffer):
        buf = buf.raw()
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise pickle.UnpicklingError(f"_frombuffer needs a byte buffer, got {type(buf).__name__}")
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError(f"_frombuffer needs a plain data dtype, got {dtype!r}")
    if not (isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)):
        raise pickle.UnpicklingError(f"_frombuffer needs a shape of integers, got {shape!r}")
    if order not in ("C", "F"):
        raise pickle.UnpicklingError(f"_frombuffer needs order 'C' or 'F', got {order!r}")
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != len(memoryview(buf).cast("B")):
        raise pickle.UnpicklingError("_frombuffer: the buffer size does not match the shape")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy(order=order)


def _empty_bytes(*args: Any) -> bytes:
    """Python 3 pickles ``b""`` under protocol 2 as ``bytes()``; nothing else is allowed."""
    if args:
        raise pickle.UnpicklingError("forbidden bytes(...) call with arguments")
    return b""


_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals used by the official CIFAR batches.

    Allowed: ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``,
    ``numpy.ndarray``, ``numpy.dtype``, a latin-1-only ``_codecs.encode``, a checked
    ``_frombuffer`` (protocol 5 arrays) and an argument-less ``bytes()`` (an empty
    ``bytes`` under protocol 2), none of which can run code. Any other
    global raises :class:`DatasetError` naming the file and the forbidden global.
    """

    def __init__(self, file: io.BufferedIOBase | io.BytesIO, source: str = "<pickle>") -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed global; refuse all others before they are imported."""
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DatasetError(
                f"{self.source}: refusing to load: the file tried to load the forbidden "
                f"global {module}.{name} (only numpy array data is allowed in dataset pickles)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        """Refuse persistent ids, which the dataset files never use."""
        raise DatasetError(f"{self.source}: refusing to load: unexpected persistent id in pickle")


def safe_loads(data: bytes, source: str = "<pickle>") -> Any:
    """Unpickle ``data`` with :class:`SafeUnpickler`; any failure is a :class:`DatasetError`."""
    try:
        return SafeUnpickler(io.BytesIO(data), source).load()
    except DatasetError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        OverflowError,
        MemoryError,
        UnicodeError,
    ) as exc:
        raise DatasetError(
            f"{source}: corrupt or truncated pickle ({type(exc).__name__}: {exc})"
        ) from exc


def safe_load(path: str | os.PathLike[str]) -> Any:
    """Read and unpickle the file at ``path`` safely (see :class:`SafeUnpickler`)."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{file}: cannot read: {exc.strerror or exc}") from exc
    return safe_loads(data, str(file))
