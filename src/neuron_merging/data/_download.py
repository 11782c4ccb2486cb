"""Download and verify the datasets (urllib only), and unpack tarballs safely.

Every download streams into a temporary file next to its destination while its MD5
is computed; only a file with the expected checksum is renamed into place, so an
interrupted or corrupted transfer never leaves a partial file that later looks like
data. Tarballs are extracted member by member, refusing absolute paths, ``..``,
links and anything outside the expected top folder.

The upstream base URLs can be replaced by a mirror: pass ``base_url`` or set
``$NEURON_MERGING_MIRROR``; the mirror must serve the upstream file names
(``train-images-idx3-ubyte.gz``, ``cifar-10-python.tar.gz``, ...) directly under it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath

from ..core.errors import DatasetError, OutputError
from ._locate import CIFAR_DIRS, canonical_name, expand

ENV_MIRROR = "NEURON_MERGING_MIRROR"

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
CIFAR_ARCHIVES: dict[str, tuple[str, str]] = {
    "cifar10": ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}

#: Byte size of every official file: a download is cut off as soon as it exceeds it.
KNOWN_SIZES: dict[str, int] = {
    "train-images-idx3-ubyte.gz": 26_421_880,
    "train-labels-idx1-ubyte.gz": 29_515,
    "t10k-images-idx3-ubyte.gz": 4_422_102,
    "t10k-labels-idx1-ubyte.gz": 5_148,
    "cifar-10-python.tar.gz": 170_498_071,
    "cifar-100-python.tar.gz": 169_001_437,
}

_OFFICIAL_MD5: dict[str, str] = {
    **FASHION_MNIST_MD5,
    **{name: md5 for name, md5 in CIFAR_ARCHIVES.values()},
}

#: Default overall deadline of one download, in seconds (the per-read timeout
#: alone never trips on a mirror that trickles a byte every few seconds).
DEFAULT_DEADLINE = 3600.0

_CHUNK = 1 << 20
_ALLOWED_SCHEMES = ("http", "https", "file")

ProgressCallback = Callable[[int, int | None], None]
"""Called as ``progress(bytes_so_far, total_bytes_or_None)`` while downloading."""


def file_md5(path: str | os.PathLike[str]) -> str:
    """Hex MD5 of the file at ``path``, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _base_url(base_url: str | None, default: str) -> str:
    base = base_url or os.environ.get(ENV_MIRROR, "") or default
    return base if base.endswith("/") else base + "/"


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    md5: str,
    *,
    timeout: float = 60.0,
    progress: ProgressCallback | None = None,
    size: int | None = None,
    deadline: float = DEFAULT_DEADLINE,
) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying its MD5.

    The body is streamed into a temporary file ``.NAME.<pid>.XXXX.part`` in
    ``dest``'s folder, fsynced, checked against ``md5`` and only then renamed to
    ``dest``. On any failure (HTTP error, network error, short read, checksum
    mismatch) the temporary file is deleted and a :class:`DatasetError` naming
    the URL is raised; ``dest`` is left untouched. ``timeout`` bounds each read,
    ``deadline`` the whole download (seconds), and ``size`` (default: the known
    size of an official file fetched with its official MD5) the bytes accepted: a larger Content-Length
    is refused at once, and a body that grows past it is cut off. Stale
    ``.part`` files of dead processes are removed first.
    """
    from .._io import remove_stale_temporaries, temporary_file

    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in _ALLOWED_SCHEMES:
        raise DatasetError(
            f"refusing to download {url!r}: scheme must be one of {_ALLOWED_SCHEMES}"
        )
    target = Path(dest)
    official = _OFFICIAL_MD5.get(target.name)
    known = KNOWN_SIZES.get(target.name) if official == md5.lower() else None
    limit = size if size is not None else known
    started = time.monotonic()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target.parent, [target.name], suffix=".part")
    except OSError as exc:
        raise DatasetError(
            f"cannot write the download of {url} to {target.parent}: {exc.strerror or exc}"
        ) from exc
    try:
        # the temporary file is removed on any failure, and SIGINT/SIGTERM wait while it is made
        with temporary_file(target, suffix=".part") as (fd, tmp):
            digest = hashlib.md5(usedforsecurity=False)
            with os.fdopen(fd, "wb") as out:
                try:
                    request = urllib.request.Request(url, headers={"User-Agent": "neuron-merging"})
                    with urllib.request.urlopen(request, timeout=timeout) as response:
                        length = response.headers.get("Content-Length")
                        total = int(length) if length and length.isdigit() else None
                        if total is not None and limit is not None and total > limit:
                            raise DatasetError(
                                f"download of {url} refused: the server announces {total} bytes, "
                                f"but the file has {limit}"
                            )
                        received = 0
                        while chunk := response.read1(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            received += len(chunk)
                            if limit is not None and received > limit:
                                raise DatasetError(
                                    f"download of {url} stopped: more than the file's {limit} bytes "
                                    "arrived (a wrong or hostile mirror?); the partial file was deleted"
                                )
                            if time.monotonic() - started > deadline:
                                raise DatasetError(
                                    f"download of {url} stopped: not finished after {deadline:g} s "
                                    f"({received} bytes received); the partial file was deleted"
                                )
                            if progress is not None:
                                progress(received, total)
                except urllib.error.HTTPError as exc:
                    exc.close()  # an HTTPError holds the open response socket
                    raise DatasetError(
                        f"download of {url} failed: HTTP {exc.code} {exc.reason}"
                    ) from exc
                except urllib.error.URLError as exc:
                    raise DatasetError(f"download of {url} failed: {exc.reason}") from exc
                except (OSError, ValueError) as exc:  # resets, timeouts, IncompleteRead
                    raise DatasetError(f"download of {url} failed: {exc!r}") from exc
                if total is not None and received != total:
                    raise DatasetError(
                        f"download of {url} is incomplete: got {received} of {total} bytes"
                    )
                out.flush()
                os.fsync(out.fileno())
            actual = digest.hexdigest()
            if actual.lower() != md5.lower():
                raise DatasetError(
                    f"checksum mismatch for {url}: expected md5 {md5.lower()}, got {actual}; "
                    "the download was deleted (corrupt transfer or a wrong mirror?)"
                )
            try:
                os.replace(tmp, target)
            except OSError as exc:
                raise DatasetError(f"cannot move the download to {target}: {exc.strerror}") from exc
    except OutputError as exc:  # the temporary file could not be made
        raise DatasetError(f"cannot write the download of {url}: {exc}") from exc
    return target


def ensure_file(
    url: str,
    dest: str | os.PathLike[str],
    md5: str,
    *,
    timeout: float = 60.0,
    progress: ProgressCallback | None = None,
) -> Path:
    """Like :func:`download_file`, but skip the download when ``dest`` already has ``md5``."""
    target = Path(dest)
    if target.is_file() and file_md5(target) == md5.lower():
        return target
    return download_file(url, target, md5, timeout=timeout, progress=progress)


def fetch_fashion_mnist(
    root: str | os.PathLike[str],
    base_url: str | None = None,
    checksums: Mapping[str, str] | None = None,
    *,
    timeout: float = 60.0,
    progress: ProgressCallback | None = None,
) -> Path:
    """Download the four FashionMNIST ``.gz`` files into ``<root>/FashionMNIST/raw``.

    ``base_url`` (else ``$NEURON_MERGING_MIRROR``, else the upstream S3 site) is the folder
    URL serving the files; ``checksums`` maps file name to MD5 (default: the official
    ones). Files already present with the right MD5 are not fetched again. Returns the
    folder holding the files; the ``.gz`` files are read directly by the loader.
    """
    base = _base_url(base_url, FASHION_MNIST_URL)
    table = dict(FASHION_MNIST_MD5 if checksums is None else checksums)
    folder = expand(root, "download root") / "FashionMNIST" / "raw"
    for filename in FASHION_MNIST_MD5:
        if filename not in table:
            raise DatasetError(f"no checksum given for {filename}")
        ensure_file(
            base + filename, folder / filename, table[filename], timeout=timeout, progress=progress
        )
    return folder


def _safe_member_path(member: tarfile.TarInfo, top: str, archive: Path) -> PurePosixPath | None:
    """Validate one tar member; return its path relative to ``top`` (``None`` for ``top``)."""
    name = member.name
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or path.is_absolute() or ":" in name.split("/")[0]:
        raise DatasetError(f"{archive}: refusing member with an absolute path: {name!r}")
    if ".." in path.parts or "\\" in name:
        raise DatasetError(f"{archive}: refusing member with '..' or '\\' in its path: {name!r}")
    if not (member.isfile() or member.isdir()):
        kind = "link" if (member.issym() or member.islnk()) else "special file"
        raise DatasetError(f"{archive}: refusing {kind} member {name!r}")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts or parts[0] != top:
        raise DatasetError(f"{archive}: member {name!r} is outside the expected folder {top}/")
    rest = parts[1:]
    return PurePosixPath(*rest) if rest else None


def extract_tarball(
    archive: str | os.PathLike[str], root: str | os.PathLike[str], top: str
) -> Path:
    """Safely extract ``archive`` (a tar, optionally gzipped) whose members all lie in ``top/``.

    Members are validated first (no absolute paths, no ``..``, no links or devices,
    nothing outside ``top``), then regular files are written to a temporary folder in
    ``root`` and moved into ``root/top`` one by one with atomic renames. Returns
    ``root/top``.
    """
    archive = Path(archive)
    dest_root = Path(root)
    target = dest_root / top
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            plan = [(m, _safe_member_path(m, top, archive)) for m in members]
            staging = Path(tempfile.mkdtemp(prefix=f".{top}.", suffix=".partial", dir=dest_root))
            try:
                written: list[PurePosixPath] = []
                for member, rel in plan:
                    if rel is None or not member.isfile():
                        continue
                    source = tar.extractfile(member)
                    if source is None:  # pragma: no cover - isfile() members always have data
                        raise DatasetError(f"{archive}: cannot read member {member.name!r}")
                    out_path = staging.joinpath(*rel.parts)
                    out_path.parent.mkdir(parents=True, exist_ok=True)
                    with source, open(out_path, "wb") as out:
                        shutil.copyfileobj(source, out, _CHUNK)
                        out.flush()
                        os.fsync(out.fileno())
                    written.append(rel)
                for rel in written:
                    final = target.joinpath(*rel.parts)
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staging.joinpath(*rel.parts), final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except DatasetError:
        raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DatasetError(f"{archive}: cannot extract: {exc}") from exc
    return target


def fetch_cifar(
    root: str | os.PathLike[str],
    name: str = "cifar10",
    base_url: str | None = None,
    md5: str | None = None,
    *,
    timeout: float = 60.0,
    progress: ProgressCallback | None = None,
    keep_archive: bool = False,
) -> Path:
    """Download and unpack the CIFAR-10/100 python tarball into ``root``.

    ``base_url`` (else ``$NEURON_MERGING_MIRROR``, else the Toronto site) serves the
    upstream archive name; ``md5`` overrides the official archive checksum. The archive
    is verified, extracted safely into ``<root>/cifar-10-batches-py`` (or
    ``cifar-100-python``) and deleted unless ``keep_archive``. Returns that folder.
    """
    name = canonical_name(name)
    if name not in CIFAR_ARCHIVES:
        raise DatasetError(f"{name} is not a CIFAR dataset")
    filename, official = CIFAR_ARCHIVES[name]
    folder = expand(root, "download root")
    archive = ensure_file(
        _base_url(base_url, CIFAR_URL) + filename,
        folder / filename,
        md5 or official,
        timeout=timeout,
        progress=progress,
    )
    target = extract_tarball(archive, folder, CIFAR_DIRS[name])
    if not keep_archive:
        with contextlib.suppress(OSError):
            archive.unlink()
    return target


def download_dataset(
    name: str,
    root: str | os.PathLike[str],
    base_url: str | None = None,
    *,
    timeout: float = 60.0,
    progress: ProgressCallback | None = None,
) -> Path:
    """Download dataset ``name`` into ``root`` with the official checksums.

    Returns the folder that directly holds the data files.
    """
    name = canonical_name(name)
    if name == "fashion-mnist":
        return fetch_fashion_mnist(root, base_url, timeout=timeout, progress=progress)
    return fetch_cifar(root, name, base_url, timeout=timeout, progress=progress)
