"""Safe file output: checked targets, atomic writes, and cleanup of our own leftovers.

Every output is written to a temporary file ``.NAME.<pid>.XXXX.tmp`` in the
target's folder, fsynced and renamed over ``NAME``, so a crash or kill never
leaves a half-written file. The temporary name carries the writer's process id,
so a later run removes only the leftovers of processes that are gone
(:func:`remove_stale_temporaries`), never another live run's file.

An existing target must be a regular file: a device, FIFO, socket or directory
is refused, never replaced. A symlink is followed (the file it points to is
replaced and the link stays). The mode of a replaced file is kept.

A folder that several writers share (a :func:`neuron_merging.save` directory) is
serialised with :func:`locked_dir`, an ``flock`` on the folder itself, which
leaves no lock file behind; :func:`create_dirs` and :func:`remove_dirs` create
and take away again exactly the folders one failed write made.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .core.errors import ConfigError, OutputError

#: Folders created by :func:`ensure_writable_dir` in this process (deepest last).
_CREATED_DIRS: list[Path] = []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _strerror(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "No space left on device"
    return exc.strerror or str(exc)


def resolve_target(path: str | os.PathLike[str]) -> Path:
    """The file a write to ``path`` replaces: symlinks followed; refuses non-regular files."""
    target = Path(path)
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    try:
        info = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):  # the folder check reports the latter
        return target
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {_strerror(exc)}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise OutputError(f"{path} exists and is {_kind(info.st_mode)}; refusing to replace it")
    return target


def check_output_file(
    path: str,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    option: str = "--output",
) -> None:
    """Validate a file ``--output`` before any work, so a run never fails at the end.

    Refuses an empty name, a name ending in ``/``, an existing target that is not
    a regular file (after following symlinks), the same file as one of ``inputs``
    (same inode), a file with other hard links, and (unless ``force``) any
    existing file. Then checks that its folder is writable.
    """
    if not path:
        raise ConfigError(f"{option} is empty; give a file name")
    if path.endswith(("/", os.sep)):
        raise ConfigError(f"{option} {path} ends with '/'; give a file name, not a folder")
    target = resolve_target(path)
    if os.path.lexists(target):
        info = os.stat(target)
        for source in inputs:
            if source is not None and os.path.exists(source) and os.path.samefile(source, target):
                raise OutputError(
                    f"{option} {path} is the input file {source}; refusing to overwrite it"
                )
        if info.st_nlink > 1 and not force:
            raise OutputError(
                f"{option} {path} has {info.st_nlink} hard links; replacing it would break "
                "them (pass --force to replace it anyway)"
            )
        if not force:
            raise OutputError(f"{option} {path} exists; pass --force to overwrite it")
    ensure_writable_dir(target)


def check_output_dir(path: str, *, force: bool = False, option: str = "--output") -> None:
    """Validate a model directory ``--output`` (:func:`neuron_merging.save`) before any work.

    Refuses an empty name, an existing target that is not a directory, and (unless
    ``force``) a directory that already holds a saved model; then checks that the
    directory can be created and written.
    """
    if not path:
        raise ConfigError(f"{option} is empty; give a directory name")
    target = Path(path)
    if target.exists() and not target.is_dir():
        mode = os.stat(target).st_mode
        if not stat.S_ISREG(mode):
            raise OutputError(f"{path} exists and is {_kind(mode)}; refusing to replace it")
        raise OutputError(
            f"{option} {path} exists and is not a directory; a compressed model is saved as a "
            "directory (or give a name ending in .pth.tar for a checkpoint file)"
        )
    if (target / "manifest.json").exists() and not force:
        raise OutputError(
            f"{option} {path} already holds a saved model; pass --force to replace it"
        )
    ensure_writable_dir(target / "manifest.json")


def ensure_writable_dir(path: str | os.PathLike[str]) -> None:
    """Fail early, with :class:`OutputError`, if files cannot be created in ``path``'s folder.

    Folders it creates are remembered, so :func:`remove_created_dirs` can take
    them away again when the run fails.
    """
    directory = Path(path).parent if str(Path(path).parent) else Path(".")
    missing: list[Path] = []
    probe = directory
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _CREATED_DIRS.extend(reversed(missing))
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".nm-write-test."):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write to {directory}: {_strerror(exc)}") from exc


def remove_created_dirs() -> None:
    """Remove the (still empty) folders :func:`ensure_writable_dir` created, deepest first."""
    while _CREATED_DIRS:
        with contextlib.suppress(OSError):
            _CREATED_DIRS.pop().rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(directory: Path, names: Iterable[str], suffix: str = ".tmp") -> None:
    """Delete ``.NAME.<pid>.XXXX<suffix>`` files whose writer process is gone.

    Files of a live process (another run writing right now) are never touched.
    A name without a process id (written before ids were added) is stale by
    definition of the old scheme and removed too.
    """
    for name in names:
        prefix = f".{name}."
        for stale in directory.glob(f"{prefix}*{suffix}"):
            middle = stale.name[len(prefix) : -len(suffix)].split(".")
            if len(middle) >= 2 and middle[0].isdigit() and _alive(int(middle[0])):
                continue
            with contextlib.suppress(OSError):
                stale.unlink()


def temporary_prefix(target: Path) -> str:
    """The prefix of our temporary files for ``target``: ``.NAME.<pid>.``."""
    return f".{target.name}.{os.getpid()}."


_DEFERRED = (signal.SIGINT, signal.SIGTERM)

#: What :func:`defer_signals` replaced: ``(previous handlers, signals that arrived)``.
Deferred = tuple[list[tuple[int, Any]], list[int]]


def defer_signals() -> Deferred | None:
    """Hold SIGINT and SIGTERM back: their Python handlers run at :func:`restore_signals`.

    Both raise in Python code (Ctrl-C, and the CLI's SIGTERM handler): one arriving
    between a temporary file's creation and the ``try`` that removes it would leave it
    behind. Call this before creating it, and :func:`restore_signals` first thing inside
    that ``try``. Python runs signal handlers in the main thread only, and whichever
    thread the kernel delivers a signal to, so the handlers themselves are swapped for
    one that notes the signal (in other threads there is nothing to hold back).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    arrived: list[int] = []

    def note(signum: int, frame: Any) -> None:
        arrived.append(signum)

    previous = []
    for signum in _DEFERRED:
        handler = signal.getsignal(signum)
        if handler is not None:  # None: set outside Python, and cannot be put back
            previous.append((signum, signal.signal(signum, note)))
    return previous, arrived


def mkstemp_held(directory: Path, prefix: str, suffix: str) -> tuple[int, Path, Deferred | None]:
    """``tempfile.mkstemp`` with SIGINT and SIGTERM held back (see :func:`defer_signals`).

    Returns the file's descriptor and path, and what to pass to :func:`restore_signals`
    first thing inside the ``try`` that removes the file on failure. If the file cannot
    be made, the signals are restored and the ``OSError`` propagates.
    """
    deferred = defer_signals()
    try:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    except BaseException:
        restore_signals(deferred)
        raise
    return fd, Path(name), deferred


def restore_signals(deferred: Deferred | None) -> None:
    """Undo :func:`defer_signals`: the signals that arrived meanwhile are raised now."""
    if deferred is None:
        return
    previous, arrived = deferred
    for signum, handler in previous:
        signal.signal(signum, handler)
    for signum in arrived:
        signal.raise_signal(signum)


@contextlib.contextmanager
def temporary_file(
    target: Path, mode: int | None = None, suffix: str = ".tmp"
) -> Iterator[tuple[int, Path]]:
    """A new temporary file for ``target``, in its directory: ``(descriptor, path)``.

    The file is named ``.NAME.<pid>.XXXX<suffix>`` (so :func:`remove_stale_temporaries` knows
    its writer), gets permission bits ``mode`` (default ``0666 & ~umask``, as a new file
    would), and is removed when the block ends unless the caller renamed it; the
    descriptor is the caller's to close. SIGINT and SIGTERM wait while it is made (see
    :func:`mkstemp_held`). A file that cannot be made is an :class:`OutputError`.
    """
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp, deferred = mkstemp_held(directory, temporary_prefix(target), suffix)
    except OSError as exc:
        raise OutputError(f"cannot write to {directory}: {_strerror(exc)}") from exc
    try:
        restore_signals(deferred)  # a signal that waited is raised here
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
        yield fd, tmp
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success fsync and rename it over ``path``.

    A leftover temporary file of ``path`` from a writer that is gone (killed with
    SIGKILL mid-write) is removed first.

    ``path`` may be a symlink (the file it points to is replaced); an existing
    non-regular file is refused. A replaced file keeps its permission bits; a new
    one gets ``0666 & ~umask``.
    """
    if mode not in ("w", "wb"):
        raise ValueError("atomic_open supports modes 'w' and 'wb' only")
    target = resolve_target(path)
    directory = target.parent if str(target.parent) else Path(".")
    try:
        keep_mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        keep_mode = 0o666 & ~_umask()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(directory, [target.name])  # a killed earlier write's leftover
    except OSError as exc:
        raise OutputError(f"cannot write to {directory}: {_strerror(exc)}") from exc
    try:
        with temporary_file(target, keep_mode) as (fd, tmp):
            with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OutputError(f"No space left on device ({path})") from exc
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_save(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], None]) -> None:
    """Call ``writer(handle)`` on a binary temp file, then atomically move it to ``path``.

    A writer that fails because the disk is full (torch reports this as a
    ``RuntimeError`` from its zip writer) is reported as :class:`OutputError`
    ``No space left on device (PATH)``.
    """
    try:
        with atomic_open(path, "wb") as handle:
            try:
                writer(handle)
            except RuntimeError as exc:
                if _disk_full(handle):
                    raise OutputError(f"No space left on device ({path})") from exc
                raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OutputError(f"No space left on device ({path})") from exc
        raise


def _disk_full(handle: IO[bytes]) -> bool:
    """Whether writing to ``handle`` fails now with ENOSPC (torch's error hides the errno)."""
    try:
        handle.write(b"\0" * 65536)
        handle.flush()
        os.fsync(handle.fileno())
    except OSError as exc:
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return False


def write_failure(fd: int, error: BaseException | None = None) -> str | None:
    """Why writing to the file ``fd`` failed (``"No space left on device"``), or ``None``.

    safetensors and torch report a failed write as their own exception types with the
    errno folded into the message. Appending a block at the end of the file and
    fsyncing it tells, with a real errno, whether the file system refuses to write
    now; safetensors truncates its file on failure (freeing the space), so the
    ``(os error N)`` its message ends with is read from ``error`` too. Only for a
    temporary file that is about to be removed.
    """
    try:
        os.lseek(fd, 0, os.SEEK_END)
        os.write(fd, b"\0" * 65536)
        os.fsync(fd)
    except OSError as exc:
        return _strerror(exc)
    found = re.search(r"\(os error (\d+)\)", str(error)) if error is not None else None
    if found is not None:
        return _strerror(OSError(int(found.group(1)), os.strerror(int(found.group(1)))))
    return None


def create_dirs(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; the folders this call created, deepest last.

    Each level is made with its own ``mkdir``, so a folder that another process
    creates at the same moment is not counted as ours (and :func:`remove_dirs`
    leaves it alone).
    """
    missing: list[Path] = []
    probe = directory
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    created: list[Path] = []
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except FileExistsError:
            continue
        except BaseException:
            remove_dirs(created)
            raise
        created.append(folder)
    return created


def remove_dirs(created: list[Path]) -> None:
    """Remove the folders :func:`create_dirs` returned, deepest first, if they are still empty."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def locked_dir(directory: Path, *, shared: bool = False) -> Iterator[bool]:
    """Hold an ``flock`` on ``directory`` itself for the block; yields whether it is still there.

    Writers take it exclusively (``shared=False``) for a whole save, so two saves into
    one folder run one after the other and neither removes what the other wrote;
    readers take it shared, so a save never replaces a manifest between a reader's
    reading it and its weights. Locking the folder (not a lock file in it) leaves
    nothing behind. The block gets ``False`` when the folder was removed or replaced
    while this process waited (a failed save removes a folder it created); the caller
    then starts again. Where the platform or file system cannot lock a folder the
    block runs unlocked (``True``).
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield True
        return
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. a folder that can be written but not read: run unlocked
        yield True
        return
    try:
        with contextlib.suppress(OSError):  # a file system without flock (network mounts)
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            here = os.stat(directory)
        except OSError:
            here = None
        held = os.fstat(fd)
        yield here is not None and (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)
    finally:
        os.close(fd)  # releases the lock


def strerror(exc: OSError) -> str:
    """The message of an ``OSError`` for a one-line error (``"No space left on device"``)."""
    return _strerror(exc)
