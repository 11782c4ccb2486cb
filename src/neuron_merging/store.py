"""The results store of sweeps: one SQLite database per output folder.

A sweep used to keep its records in ``results.json``, rewritten from each
sweep's own in-memory list. Two sweeps into one folder then lost each other's
records, and ``--resume`` reused records computed from another checkpoint. The
store fixes both on the standard library's embedded database:

* every record is inserted in its own transaction, and the database runs in WAL
  mode with a ``busy_timeout``, so concurrent sweeps (threads or processes)
  never lose a record;
* every record is keyed by its full **identity** (see :func:`identity`): the
  sweep **settings** (arch, dataset, SHA-256 of the checkpoint file and of the
  weights, SHA-256 of the test set, preset, requested threshold, λ, BN rule,
  package version) plus the mode, criterion, ratio and the resolved
  :class:`~neuron_merging.core.config.MergeConfig` (rounding, kept widths,
  excluded layers, ...). ``--resume`` reuses only records of identical identity;
* nothing ever deletes a record. ``results.json``, ``.csv``, ``.md`` and
  ``accuracy.png`` are exports of the records whose settings equal the current
  sweep's, written atomically while the write lock is held, so the last export
  always holds every committed record of those settings.

Schema (``PRAGMA application_id`` = :data:`APPLICATION_ID`, ``PRAGMA
user_version`` = :data:`SCHEMA_VERSION`)::

    CREATE TABLE records (
        identity      TEXT PRIMARY KEY,  -- SHA-256 of the canonical identity JSON
        settings      TEXT NOT NULL,     -- SHA-256 of the canonical settings JSON
        identity_json TEXT NOT NULL,     -- the identity itself (settings + mode, criterion, ratio, config)
        record_json   TEXT NOT NULL,     -- the record as exported to results.json (fields in order)
        created       REAL NOT NULL      -- UNIX time of the (last) insert
    );
    CREATE INDEX records_by_settings ON records (settings);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

The canonical JSON is ``json.dumps(value, sort_keys=True, separators=(",", ":"))``.
On first use in a folder that already holds a ``results.json`` (written before
the store existed), its records are validated and imported with settings that
carry ``"migrated_from": "results.json"``: their checkpoint is unknown, so they
are kept and listed (``neuron-merging results DIR``) but never reused.

Every record read back is checked: its JSON must parse, its fields must pass
:func:`validate_record` and its identity must hash to its keys; a record changed
outside neuron-merging is refused with an :class:`OutputError` naming the store and
the record, never taken as a result (nor a crash). A store this process cannot
write (a read-only file system, a folder or file without write permission) is
opened read-only (SQLite's ``mode=ro``; on a read-only file system, where SQLite
cannot create the ``-shm`` file a WAL database needs, ``immutable=1`` when no
write-ahead log holds records), so ``neuron-merging results`` still lists it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sqlite3
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .core.errors import OutputError

STORE_NAME = "results.sqlite"
#: ``PRAGMA application_id`` of a results store ("NMrs").
APPLICATION_ID = 0x4E4D7273
SCHEMA_VERSION = 1
#: How long a writer waits for another sweep's transaction, in milliseconds.
BUSY_TIMEOUT_MS = 60_000
#: A ``results.json`` larger than this is not migrated (it would be read whole).
MAX_LEGACY_BYTES = 64 << 20

_SQLITE_MAGIC = b"SQLite format 3\x00"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    identity      TEXT PRIMARY KEY,
    settings      TEXT NOT NULL,
    identity_json TEXT NOT NULL,
    record_json   TEXT NOT NULL,
    created       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_settings ON records (settings);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _busy(exc: BaseException) -> bool:
    """Whether an SQLite error is another connection's lock (transient), not a bad file."""
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc).lower()


#: The tables and indexes of :data:`_SCHEMA` (SQLite adds ``sqlite_*`` ones itself).
_OWN_NAMES = frozenset({"records", "records_by_settings", "meta"})
#: The columns of the tables of :data:`_SCHEMA`, in order.
_COLUMNS = {
    "records": ("identity", "settings", "identity_json", "record_json", "created"),
    "meta": ("key", "value"),
}

_MODES = ("original", "prune", "merge")


def canonical_json(value: Any) -> str:
    """The one JSON text of ``value`` that identities are hashed from."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _record_json(record: Mapping[str, Any]) -> str:
    """A record as stored: its fields in their order (as exported), NaN and Inf as null."""
    return json.dumps(finite_json(dict(record)), separators=(",", ":"), allow_nan=False)


def _digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or ±Inf float replaced by ``None`` (valid JSON ``null``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def identity(
    settings: Mapping[str, Any],
    mode: str,
    criterion: str | None,
    ratio: float | None,
    config: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The full identity of one record: the sweep settings plus what varies inside a sweep."""
    return {
        "settings": dict(settings),
        "mode": mode,
        "criterion": criterion,
        "ratio": None if ratio is None else float(ratio),
        "config": None if config is None else dict(config),
    }


def _refuse(path: Path, why: str) -> OutputError:
    return OutputError(f"{path}: {why}; not a neuron-merging results store")


def _writable(path: Path) -> bool:
    """Whether this process may write ``path`` and create files next to it (``-wal``, ``-shm``).

    ``os.access`` answers ``False`` on a read-only file system even for root.
    """
    folder = path.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    return not os.path.lexists(path) or os.access(path, os.W_OK)


def _read_only_fs(folder: Path) -> bool:
    """Whether ``folder`` lies on a file system mounted read-only (nobody can write it)."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _cannot_open(exc: sqlite3.Error) -> bool:
    """Whether SQLite could not open a file (``SQLITE_CANTOPEN``), rather than read a bad one."""
    name = getattr(exc, "sqlite_errorname", "")
    return name == "SQLITE_CANTOPEN" or "unable to open" in str(exc).lower()


def check_store_file(path: Path) -> bool:
    """Check that ``path`` can be opened as a store without blocking; ``True`` if it exists.

    A FIFO, a device or a directory is refused from ``stat`` alone (no open, so a
    FIFO cannot block us), and a regular file must be empty or start with the
    SQLite header.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise OutputError(f"{path}: cannot open the results store: {exc.strerror}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise _refuse(path, "is not a regular file")
    if info.st_size == 0:
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise OutputError(f"{path}: cannot read the results store: {exc.strerror}") from exc
    if head != _SQLITE_MAGIC:
        raise _refuse(path, "is not an SQLite database")
    return True


class ResultsStore:
    """The records of every sweep run into one folder (see the module docstring).

    Use as a context manager, or call :meth:`close`. Every method that writes runs
    in its own transaction. ``read_only=None`` (the default) opens a store this
    process cannot write read-only (see the module docstring), ``True`` always
    does; a read-only store refuses every write with an :class:`OutputError`.
    """

    def __init__(self, directory: str | os.PathLike[str], *, read_only: bool | None = None) -> None:
        self.directory = Path(directory)
        self.path = self.directory / STORE_NAME
        exists = check_store_file(self.path)
        writable = _writable(self.path)
        self.read_only = (exists and not writable) if read_only is None else bool(read_only)
        #: Set for a read-only store that holds no tables yet (an empty file).
        self._empty = False
        if self.read_only:
            if not exists:
                raise OutputError(f"{self.path}: no results store to read")
            self._db = self._open_read_only()
            try:
                self._setup_read_only()
            except BaseException:
                self._db.close()
                raise
            return
        if not writable:
            why = "is not writable" if self.directory.is_dir() else "is not a folder"
            raise OutputError(
                f"{self.path}: cannot create the results store: {self.directory} {why}"
            )
        try:
            self._db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise OutputError(f"{self.path}: cannot open the results store: {exc}") from exc
        try:
            deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
            while True:
                try:
                    self._setup()
                    break
                except sqlite3.OperationalError as exc:  # only busy errors get here
                    if (
                        not _busy(exc) or time.monotonic() > deadline
                    ):  # a lock held this long is not a race
                        raise OutputError(f"{self.path}: {exc}") from exc
                    time.sleep(0.01)  # another sweep is creating the store or changing its mode
        except BaseException:
            self._db.close()
            raise

    def _open_read_only(self) -> sqlite3.Connection:
        """Connect without writing: ``mode=ro``, else ``immutable=1`` where that is safe.

        A WAL database needs its ``-shm`` file; where SQLite cannot create it (a
        read-only file system), ``immutable=1`` reads the database file alone, which
        is only complete when no write-ahead log holds records, and only safe when
        nobody can write the file meanwhile (the file system is read-only).
        """
        uri = self.path.resolve().as_uri()
        db = None
        try:
            db = sqlite3.connect(
                f"{uri}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None
            )
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # WAL: needs -shm
            return db
        except sqlite3.Error as exc:
            if db is not None:
                db.close()
            if not _cannot_open(exc):
                raise _refuse(self.path, f"is corrupt ({exc})") from exc
            first = exc
        wal = Path(f"{self.path}-wal")
        try:
            wal_bytes = os.stat(wal).st_size
        except FileNotFoundError:
            wal_bytes = 0
        except OSError as exc:
            raise OutputError(
                f"{wal}: cannot read the results store's log: {exc.strerror}"
            ) from exc
        if not _read_only_fs(self.directory):
            raise OutputError(
                f"{self.path}: cannot open the results store read-only ({first}); "
                f"it cannot be written here and SQLite cannot create its {STORE_NAME}-shm"
            )
        if wal_bytes:
            raise OutputError(
                f"{self.path}: cannot read the results store on this read-only file system: "
                f"its write-ahead log {wal.name} holds records that SQLite can only read with a "
                f"{STORE_NAME}-shm file it cannot create here; copy the folder to writable storage"
            )
        try:
            return sqlite3.connect(
                f"{uri}?mode=ro&immutable=1",
                uri=True,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
            )
        except sqlite3.Error as exc:
            raise OutputError(
                f"{self.path}: cannot open the results store read-only: {exc}"
            ) from exc

    def _check_header(self) -> set[str]:
        """Refuse another application's database or a newer schema; return the table names."""
        app_id = self._db.execute("PRAGMA application_id").fetchone()[0]
        names = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master")}
        # Without our id, only our own tables may be there: another sweep is creating
        # the store right now (its tables can be read a moment after its id was).
        foreign = {n for n in names if n not in _OWN_NAMES and not n.startswith("sqlite_")}
        if app_id not in (0, APPLICATION_ID) or (app_id == 0 and foreign):
            raise _refuse(self.path, "is an SQLite database of another application")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise OutputError(
                f"{self.path}: results store schema {version} is newer than this "
                f"version understands ({SCHEMA_VERSION}); upgrade neuron-merging"
            )
        for table, expected in _COLUMNS.items():
            if table in names:
                found = tuple(str(r[1]) for r in self._db.execute(f"PRAGMA table_info({table})"))
                if found != expected:
                    raise _refuse(
                        self.path,
                        f"has a {table!r} table with the columns ({', '.join(found)}), "
                        f"not ({', '.join(expected)})",
                    )
        return names

    def _setup_read_only(self) -> None:
        """The checks of :meth:`_setup`, without any write."""
        try:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            names = self._check_header()
            missing = {"records", "meta"} - names
            if missing == {"records", "meta"} and not names:
                self._empty = True  # an empty file: a store nobody wrote to yet
            elif missing:
                raise _refuse(self.path, f"has no {' or '.join(sorted(missing))} table")
        except sqlite3.DatabaseError as exc:
            raise _refuse(self.path, f"is corrupt ({exc})") from exc

    def _setup(self) -> None:
        try:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._check_header()
            self._db.execute("PRAGMA journal_mode = WAL")
            with self._transaction():
                for statement in _SCHEMA.strip().split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            if _busy(exc):
                raise  # retried by __init__
            raise _refuse(self.path, f"is corrupt ({exc})") from exc

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``: takes the write lock at once, rolls back on error."""
        if self.read_only:
            raise OutputError(
                f"{self.path}: the results store is read-only here; nothing can be written to it"
            )
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise OutputError(f"{self.path}: results store is locked or unwritable: {exc}") from exc
        try:
            yield
        except sqlite3.Error as exc:  # a full disk, a corrupt page, ...
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise OutputError(f"{self.path}: cannot write to the results store: {exc}") from exc
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise OutputError(f"{self.path}: cannot commit to the results store: {exc}") from exc

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the write lock (e.g. while exporting, so exports are never stale)."""
        with self._transaction():
            yield

    # ------------------------------------------------------------------ records

    def put(
        self,
        ident: Mapping[str, Any],
        record: Mapping[str, Any],
        *,
        then: Any = None,
    ) -> None:
        """Insert (or replace, same identity) one record; call ``then()`` before committing.

        ``then`` runs inside the transaction, under the write lock: the exports are
        written there, so no other sweep can commit in between.
        """
        payload = _record_json(record)
        ident_json = canonical_json(ident)
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?)",
                (
                    hashlib.sha256(ident_json.encode()).hexdigest(),
                    _digest(ident["settings"]),
                    ident_json,
                    payload,
                    time.time(),
                ),
            )
            if then is not None:
                then()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a query; an SQLite failure (a corrupt page, an I/O error) is an :class:`OutputError`."""
        if self._empty:
            return []
        try:
            return self._db.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            raise OutputError(f"{self.path}: cannot read the results store: {exc}") from exc

    def _parse_row(
        self, key: Any, settings_key: Any, ident_json: Any, record_json: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(identity, record)`` of one stored row, checked; :class:`OutputError` names the row.

        A row neuron-merging wrote always passes; one changed outside it (text
        that is not JSON, a record without ``mode``, an identity that does not
        hash to its key) is refused rather than read as a result.
        """
        label = f"record {str(key)[:12]}"

        def bad(why: str) -> OutputError:
            return OutputError(
                f"{self.path}: {label} is malformed: {why}; the store was changed outside "
                "neuron-merging (remove or repair that record)"
            )

        def parse(text: Any, column: str) -> Any:
            if not isinstance(text, str):
                raise bad(f"its {column} is a {type(text).__name__}, not JSON text")
            try:
                return json.loads(text)
            except (ValueError, RecursionError) as exc:
                detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
                raise bad(f"its {column} is not valid JSON ({detail})") from None

        ident = parse(ident_json, "identity_json")
        if not (
            isinstance(ident, dict)
            and isinstance(ident.get("settings"), dict)
            and {"mode", "criterion", "ratio", "config"} <= ident.keys()
        ):
            raise bad("its identity_json is not an identity (settings, mode, criterion, ratio)")
        ratio = ident["ratio"]
        label += f" ({ident['mode']} {ident['criterion'] or ''} r={ratio})".replace("  ", " ")
        try:
            expected_key = hashlib.sha256(canonical_json(ident).encode()).hexdigest()
            expected_settings = _digest(ident["settings"])
        except (TypeError, ValueError, RecursionError):
            raise bad("its identity cannot be hashed") from None
        if key != expected_key or settings_key != expected_settings:
            raise bad("its identity does not hash to its keys")
        record = parse(record_json, "record_json")
        try:
            validate_record(record, "the record")
        except OutputError as exc:
            raise bad(str(exc)) from None
        if record["mode"] != ident["mode"] or record.get("criterion") != ident["criterion"]:
            raise bad("its record's mode or criterion differs from its identity's")
        record.setdefault("criterion", None)
        record.setdefault("ratio", None)
        return ident, record

    def has(self, ident: Mapping[str, Any]) -> bool:
        """Whether a record of exactly this identity is stored (and well formed)."""
        key = hashlib.sha256(canonical_json(ident).encode()).hexdigest()
        rows = self._rows(
            "SELECT identity, settings, identity_json, record_json FROM records WHERE identity = ?",
            (key,),
        )
        for row in rows:
            self._parse_row(*row)
        return bool(rows)

    def records(self, settings: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Every stored record whose settings equal ``settings``, each checked."""
        rows = self._rows(
            "SELECT identity, settings, identity_json, record_json FROM records "
            "WHERE settings = ? ORDER BY identity",
            (_digest(dict(settings)),),
        )
        return [self._parse_row(*row)[1] for row in rows]

    def groups(self) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """``(settings, records)`` for every distinct settings in the store, each record checked."""
        found: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        for row in self._rows(
            "SELECT identity, settings, identity_json, record_json FROM records "
            "ORDER BY created, identity"
        ):
            ident, record = self._parse_row(*row)
            found.setdefault(row[1], (ident["settings"], []))[1].append(record)
        return list(found.values())

    def count(self) -> int:
        """Number of stored records."""
        rows = self._rows("SELECT COUNT(*) FROM records")
        return int(rows[0][0]) if rows else 0

    def meta(self, key: str) -> str | None:
        """A value of the ``meta`` table."""
        rows = self._rows("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    # ------------------------------------------------------------------ migration

    def migrate_legacy(self, legacy: Path) -> int:
        """Import ``legacy`` (a pre-store ``results.json``) once; return the records imported.

        Every record is validated before anything is written; one bad record
        refuses the whole file with an :class:`OutputError`, so the folder is left
        exactly as it was.
        """
        if self.meta("migrated") is not None or self.count():
            return 0
        records = read_legacy_results(legacy)
        with self._transaction():
            for record in records:
                settings = {
                    "migrated_from": "results.json",
                    **{
                        k: record.get(k)
                        for k in ("arch", "dataset", "preset", "threshold", "lam", "bn_rule")
                    },
                }
                ident = identity(
                    settings, record["mode"], record.get("criterion"), record.get("ratio"), None
                )
                ident_json = canonical_json(ident)
                self._db.execute(
                    "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?)",
                    (
                        hashlib.sha256(ident_json.encode()).hexdigest(),
                        _digest(settings),
                        ident_json,
                        _record_json(record),
                        time.time(),
                    ),
                )
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('migrated', ?)",
                (f"{len(records)} records from {legacy}",),
            )
        return len(records)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_record(record: Any, where: str) -> dict[str, Any]:
    """Check one sweep record's fields and types; raise :class:`OutputError` naming the field."""
    if not isinstance(record, dict):
        raise OutputError(f"{where} is a {type(record).__name__}, not a record")
    for key in ("arch", "dataset", "mode", "accuracy", "params"):
        if key not in record:
            raise OutputError(f"{where} has no {key!r}")
    if record["mode"] not in _MODES:
        raise OutputError(f"{where}: 'mode' is {record['mode']!r}, not one of {', '.join(_MODES)}")
    for key in ("arch", "dataset"):
        if not isinstance(record[key], str):
            raise OutputError(f"{where}: {key!r} is {record[key]!r}, not a string")
    criterion = record.get("criterion")
    if criterion is None and record["mode"] != "original":
        raise OutputError(f"{where}: a {record['mode']} record needs a 'criterion'")
    if criterion is not None and not isinstance(criterion, str):
        raise OutputError(f"{where}: 'criterion' is {criterion!r}, not a string")
    ratio = record.get("ratio")
    if ratio is not None and not (_number(ratio) and 0.0 <= ratio < 1.0):
        raise OutputError(f"{where}: 'ratio' is {ratio!r}, not a number in [0, 1) or null")
    if not (_number(record["accuracy"]) and 0.0 <= record["accuracy"] <= 100.0):
        raise OutputError(f"{where}: 'accuracy' is {record['accuracy']!r}, not a percentage")
    for key in ("params", "macs", "correct", "total", "merged"):
        value = record.get(key)
        if (key == "params" or value is not None) and not (
            isinstance(value, int) and not isinstance(value, bool) and value >= 0
        ):
            raise OutputError(f"{where}: {key!r} is {value!r}, not a non-negative integer")
    return record


def read_legacy_results(path: Path) -> list[dict[str, Any]]:
    """Read and validate a ``results.json`` list of records without blocking or exhausting memory.

    A FIFO or device is refused from ``stat`` (never opened), a file over
    :data:`MAX_LEGACY_BYTES` is refused unread, and deeply nested JSON is a
    parse error, not a crash.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise OutputError(f"cannot migrate {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise OutputError(f"cannot migrate {path}: it is not a regular file")
    if info.st_size > MAX_LEGACY_BYTES:
        raise OutputError(
            f"cannot migrate {path}: {info.st_size} bytes is over the "
            f"{MAX_LEGACY_BYTES >> 20} MiB limit of a results file"
        )
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise OutputError(f"cannot migrate {path}: {exc.strerror or exc}") from exc
    except (ValueError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise OutputError(f"cannot migrate {path}: not valid JSON ({detail})") from exc
    if not isinstance(data, list):
        raise OutputError(f"cannot migrate {path}: not a list of sweep records")
    return [validate_record(r, f"cannot migrate {path}: record {i}") for i, r in enumerate(data)]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_settings(settings: Mapping[str, Any]) -> str:
    """One line naming the settings of a group of records (for ``neuron-merging results``)."""
    keys: Sequence[str] = (
        "arch",
        "dataset",
        "preset",
        "threshold",
        "lam",
        "bn_rule",
        "checkpoint_sha256",
        "version",
        "migrated_from",
    )
    parts = []
    for key in keys:
        if key in settings and settings[key] is not None:
            value = settings[key]
            if key.endswith("sha256"):
                value = str(value)[:12]
            parts.append(f"{key}={value}")
    return " ".join(parts)
