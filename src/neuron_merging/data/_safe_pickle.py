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


_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals used by the official CIFAR batches.

    Allowed: ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``,
    ``numpy.ndarray``, ``numpy.dtype`` and a latin-1-only ``_codecs.encode``. Any other
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
