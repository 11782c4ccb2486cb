"""The results store (issue 11, section 1): sweeps cannot lose or mix records.

* D1: ``--resume`` reuses only records of identical identity (another checkpoint,
  threshold, λ, BN rule or preset is recomputed).
* D2: concurrent sweeps into one folder, in separate processes, keep every record.
* D4: a sweep without ``--resume`` into a folder holding results keeps them.
* D16: a corrupt ``results.json`` is refused with one line, and nothing is rewritten.
* D11 (first part): a FIFO as ``results.json`` (or as the store) is refused at once.
* D23: a NaN loss is exported as ``null``; ``results.json`` stays valid JSON.

The CLI tests run the real ``neuron-merging`` in subprocesses on the released
LeNet-300-100 and the first 2000 real FashionMNIST test images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import neuron_merging as nm
from neuron_merging import models
from neuron_merging.checkpoint import load_model, save_checkpoint
from neuron_merging.core.errors import OutputError
from neuron_merging.data import ArrayDataset, dataset_info
from neuron_merging.data.fashion_mnist import read_idx_images, read_idx_labels
from neuron_merging.experiments import record_key, run_sweep
from neuron_merging.store import STORE_NAME, ResultsStore

SHARED = Path(__file__).resolve().parents[2] / "shared"
LENET = SHARED / "checkpoints" / "LeNet_300_100.original.300_100.bias.pth.tar"
FMNIST = SHARED / "data" / "FashionMNIST" / "raw"
IMAGES, LABELS = FMNIST / "t10k-images-idx3-ubyte", FMNIST / "t10k-labels-idx1-ubyte"
HAVE_LENET = LENET.is_file() and IMAGES.is_file() and LABELS.is_file()
needs_lenet = pytest.mark.skipif(not HAVE_LENET, reason=f"needs {LENET} and {FMNIST}")
SUBSET = 2000
TIMEOUT = 600
RATIOS = [f"{r / 10:.1f}" for r in range(1, 10)]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEURON_MERGING")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    return env


def _cli(*args: object, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "neuron_merging.cli", *map(str, args)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("neuron-merging: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def _idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first SUBSET images and labels of the real FashionMNIST test set."""
    if not HAVE_LENET:
        pytest.skip("needs the shared FashionMNIST data")
    root = tmp_path_factory.mktemp("fmnist")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _idx(raw / "t10k-images-idx3-ubyte", 2051, read_idx_images(IMAGES)[:SUBSET, 0])
    _idx(raw / "t10k-labels-idx1-ubyte", 2049, read_idx_labels(LABELS)[:SUBSET])
    return root


def _sweep_args(checkpoint: Path, data_dir: Path, output: Path, *extra: object) -> list[object]:
    return [
        "sweep",
        "--arch",
        "lenet300",
        "--checkpoint",
        checkpoint,
        "--data-dir",
        data_dir,
        "--output",
        output,
        "--quiet",
        *extra,
    ]


def _tiny(n: int = 16, scale: float = 1.0) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(
        torch.randn(n, 1, 28, 28, generator=g) * scale,
        torch.randint(0, 10, (n,), generator=g),
        dataset_info("fashion-mnist"),
    )


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.create("lenet300", cfg=[20, 10])


# --------------------------------------------------------------------------- D1


@needs_lenet
def test_d1_resume_with_another_checkpoint_recomputes(data_dir: Path, tmp_path: Path) -> None:
    """D1: the resumed baseline row used to show the first checkpoint's 266,610 parameters."""
    model, _ = load_model(LENET, arch="lenet300")
    merged = nm.merge(model, torch.zeros(1, 1, 28, 28), ratio=0.5, threshold=0.45).model
    other = tmp_path / "lenet-150-50.pth.tar"
    save_checkpoint(
        other, merged, acc=None, arch="lenet300", cfg=[150, 50], dataset="fashion-mnist"
    )

    shared, fresh = tmp_path / "shared", tmp_path / "fresh"
    args = ("--criteria", "l1-norm", "--ratios", "0.5")
    first = _cli(*_sweep_args(LENET, data_dir, shared, *args))
    assert first.returncode == 0, first.stderr
    resumed = _cli(*_sweep_args(other, data_dir, shared, *args, "--resume", "--json"))
    assert resumed.returncode == 0, resumed.stderr
    reference = _cli(*_sweep_args(other, data_dir, fresh, *args, "--json"))
    assert reference.returncode == 0, reference.stderr

    resumed_records = json.loads(resumed.stdout)["records"]
    fresh_records = json.loads(reference.stdout)["records"]
    baseline = next(r for r in resumed_records if r["mode"] == "original")
    assert baseline["params"] == 125_810  # the checkpoint passed now, not the first one
    assert resumed_records == fresh_records
    assert json.loads((shared / "results.json").read_text()) == fresh_records
    # The first checkpoint's records are still stored, under their own settings.
    listing = _cli("results", shared, "--json")
    assert listing.returncode == 0, listing.stderr
    groups = json.loads(listing.stdout)["groups"]
    assert sorted(len(g["records"]) for g in groups) == [3, 3]
    assert {g["records"][0]["params"] for g in groups} == {266_610, 125_810}


@pytest.mark.parametrize(
    "change",
    [
        {"threshold": 0.9},
        {"threshold": "none"},
        {"lam": 0.5},
        {"bn_rule": "exact"},
        {"preset": "none"},
    ],
    ids=lambda c: next(iter(c)) + "=" + str(next(iter(c.values()))),
)
def test_d1_resume_with_other_settings_recomputes_everything(
    change: dict[str, Any], tmp_path: Path
) -> None:
    model, data = _model(), _tiny()
    base: dict[str, Any] = {"criteria": ["l1-norm"], "ratios": [0.5], "show_progress": False}
    first = run_sweep(model, "lenet300", "fashion-mnist", data, output_dir=tmp_path, **base)
    ran: list[dict[str, Any]] = []
    again = run_sweep(
        model,
        "lenet300",
        "fashion-mnist",
        data,
        output_dir=tmp_path,
        resume=True,
        on_record=ran.append,
        **base,
        **change,
    )
    assert len(ran) == len(again) == 3  # nothing reused from the other settings
    same: list[dict[str, Any]] = []
    run_sweep(
        model, "lenet300", "fashion-mnist", data, output_dir=tmp_path, resume=True,
        on_record=same.append, **base,
    )  # fmt: skip
    assert same == []  # identical settings are reused
    with ResultsStore(tmp_path) as store:
        assert store.count() == len(first) + len(again)


def test_d1_resume_with_another_test_set_recomputes(tmp_path: Path) -> None:
    model = _model()
    args: dict[str, Any] = {"criteria": ["l1-norm"], "ratios": [0.5], "show_progress": False}
    run_sweep(model, "lenet300", "fashion-mnist", _tiny(16), output_dir=tmp_path, **args)
    ran: list[dict[str, Any]] = []
    run_sweep(
        model, "lenet300", "fashion-mnist", _tiny(8), output_dir=tmp_path, resume=True,
        on_record=ran.append, **args,
    )  # fmt: skip
    assert [r["total"] for r in ran] == [8, 8, 8]


# --------------------------------------------------------------------------- D2 / D4


@needs_lenet
def test_d2_four_concurrent_sweeps_keep_every_record(data_dir: Path, tmp_path: Path) -> None:
    """D2: two concurrent sweeps used to end with 19 of 37 records; now four keep all 74."""
    out = tmp_path / "out"
    runs = [
        ("--criteria", "l1-norm"),
        ("--criteria", "l2-norm"),
        ("--criteria", "l2-GM"),
        ("--criteria", "l1-norm", "--threshold", "none"),  # other settings, same folder
    ]
    procs = []
    for i, extra in enumerate(runs):
        command = _sweep_args(LENET, data_dir, out, "--ratios", *RATIOS, *extra)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "neuron_merging.cli", *map(str, command)],
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        if i == 0:
            time.sleep(2)  # as in the report: the others start while the first is writing
    for proc in procs:
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err

    with ResultsStore(out) as store:
        groups = store.groups()
    counts = sorted(len(records) for _, records in groups)
    # 3 criteria × 9 ratios × 2 modes + one shared original; and 9 × 2 + 1 of the other settings.
    assert counts == [19, 55]
    for _, records in groups:
        keys = [(r["mode"], r["criterion"], r["ratio"]) for r in records]
        assert len(set(keys)) == len(keys)
    exported = json.loads((out / "results.json").read_text())
    assert len(exported) in (19, 55)  # the settings of whichever sweep exported last
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_d4_sweep_without_resume_keeps_earlier_records(tmp_path: Path) -> None:
    """D4: a second sweep without --resume used to turn 19 records into 2 (+ original)."""
    model, data = _model(), _tiny()
    ratios = [r / 10 for r in range(1, 10)]
    first = run_sweep(
        model, "lenet300", "fashion-mnist", data, criteria=["l1-norm"], ratios=ratios,
        output_dir=tmp_path, show_progress=False,
    )  # fmt: skip
    assert len(first) == 19
    second = run_sweep(
        model, "lenet300", "fashion-mnist", data, criteria=["l2-norm"], ratios=[0.5],
        output_dir=tmp_path, show_progress=False,
    )  # fmt: skip
    assert len(second) == 21 and all(r in second for r in first)
    assert json.loads((tmp_path / "results.json").read_text()) == second


def test_d2_concurrent_sweeps_in_one_process_keep_every_record(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    model, data = _model(), _tiny()

    def sweep(criterion: str) -> list[dict[str, Any]]:
        return run_sweep(
            model, "lenet300", "fashion-mnist", data, criteria=[criterion],
            ratios=[0.3, 0.5, 0.7], output_dir=tmp_path, show_progress=False,
        )  # fmt: skip

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(sweep, ["l1-norm", "l2-norm", "l2-GM"]))
    exported = json.loads((tmp_path / "results.json").read_text())
    assert len(exported) == 1 + 3 * 3 * 2
    assert len({record_key(r) for r in exported}) == len(exported)


# --------------------------------------------------------------------------- D16


_GOOD = {
    "arch": "lenet300",
    "dataset": "fashion-mnist",
    "mode": "merge",
    "criterion": "l1-norm",
    "ratio": 0.5,
    "accuracy": 80.0,
    "params": 100,
}


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


CORRUPT = {
    "ratio abc": (json.dumps([{**_GOOD, "ratio": "abc"}]), "record 0: 'ratio' is 'abc'"),
    "missing accuracy": (
        json.dumps([{k: v for k, v in _GOOD.items() if k != "accuracy"}]),
        "record 0 has no 'accuracy'",
    ),
    "missing params": (
        json.dumps([_GOOD, {k: v for k, v in _GOOD.items() if k != "params"}]),
        "record 1 has no 'params'",
    ),
    "mixed-type criteria": (
        json.dumps([_GOOD, {**_GOOD, "criterion": 3}]),
        "record 1: 'criterion' is 3, not a string",
    ),
    "100000-deep JSON": (_deep(100_000), "not valid JSON (nested too deeply)"),
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_d16_corrupt_results_are_refused_and_left_as_they_were(name: str, tmp_path: Path) -> None:
    text, message = CORRUPT[name]
    (tmp_path / "results.json").write_text(text)
    (tmp_path / "results.csv").write_text("old csv\n")
    with pytest.raises(OutputError, match="cannot migrate") as info:
        run_sweep(
            _model(), "lenet300", "fashion-mnist", _tiny(), criteria=["l1-norm"],
            ratios=[0.5], output_dir=tmp_path, resume=True, show_progress=False,
        )  # fmt: skip
    assert message in str(info.value)
    assert (tmp_path / "results.json").read_text() == text
    assert (tmp_path / "results.csv").read_text() == "old csv\n"
    assert not (tmp_path / "results.md").exists()


@needs_lenet
@pytest.mark.parametrize("name", ["ratio abc", "100000-deep JSON"])
def test_d16_corrupt_results_through_the_cli(name: str, data_dir: Path, tmp_path: Path) -> None:
    text, message = CORRUPT[name]
    (tmp_path / "results.json").write_text(text)
    result = _cli(*_sweep_args(LENET, data_dir, tmp_path, "--resume", "--ratios", "0.5"))
    line = _one_line_error(result, 6)
    assert line == f"neuron-merging: error: cannot migrate {tmp_path / 'results.json'}: " + (
        message
        if name != "ratio abc"
        else "record 0: 'ratio' is 'abc', not a number in [0, 1) or null"
    )
    assert (tmp_path / "results.json").read_text() == text
    assert not (tmp_path / "results.md").exists() and not (tmp_path / "results.csv").exists()


def test_a_valid_legacy_results_json_is_migrated_and_listed(tmp_path: Path) -> None:
    legacy = [
        {**_GOOD, "mode": "original", "criterion": None, "ratio": 0.0, "params": 7},
        _GOOD,
    ]
    (tmp_path / "results.json").write_text(json.dumps(legacy))
    run_sweep(
        _model(), "lenet300", "fashion-mnist", _tiny(), criteria=["l1-norm"], ratios=[0.5],
        output_dir=tmp_path, resume=True, show_progress=False,
    )  # fmt: skip
    with ResultsStore(tmp_path) as store:
        groups = store.groups()
    migrated = [r for s, r in groups if s.get("migrated_from") == "results.json"]
    assert migrated == [legacy]  # kept as it was, never reused
    assert len(json.loads((tmp_path / "results.json").read_text())) == 3


# --------------------------------------------------------------------------- D11 / invalid stores


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_d11_fifo_results_json_is_refused_without_blocking(tmp_path: Path) -> None:
    _fifo(tmp_path / "results.json")
    with pytest.raises(OutputError, match="is a FIFO; refusing to replace it"):
        run_sweep(
            _model(), "lenet300", "fashion-mnist", _tiny(), criteria=["l1-norm"],
            ratios=[0.5], output_dir=tmp_path, resume=True, show_progress=False,
        )  # fmt: skip


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "text file", "other sqlite"])
def test_a_store_that_is_not_ours_is_refused(kind: str, tmp_path: Path) -> None:
    import sqlite3

    store = tmp_path / STORE_NAME
    if kind == "fifo":
        _fifo(store)
    elif kind == "/dev/zero":
        store.symlink_to("/dev/zero")
    elif kind == "text file":
        store.write_text("hello\n")
    else:
        with sqlite3.connect(store) as db:
            db.execute("CREATE TABLE t (x)")
    expected = {
        "fifo": "is not a regular file",
        "/dev/zero": "is not a regular file",
        "text file": "is not an SQLite database",
        "other sqlite": "is an SQLite database of another application",
    }[kind]
    with pytest.raises(OutputError, match=expected):
        ResultsStore(tmp_path)


@needs_lenet
def test_d11_fifo_results_json_through_the_cli(data_dir: Path, tmp_path: Path) -> None:
    """D11: ``--resume`` on a FIFO results.json used to hang forever (hang guard: 120 s)."""
    _fifo(tmp_path / "results.json")
    result = _cli(*_sweep_args(LENET, data_dir, tmp_path, "--resume"), timeout=120)
    line = _one_line_error(result, 6)
    assert line == (
        f"neuron-merging: error: {tmp_path / 'results.json'} exists and is a FIFO; "
        "refusing to replace it"
    )


# --------------------------------------------------------------------------- D23


def test_d23_nan_loss_is_exported_as_null(tmp_path: Path) -> None:
    data = _tiny(scale=3e38)  # the logits overflow to inf, so the loss is NaN
    records = run_sweep(
        _model(), "lenet300", "fashion-mnist", data, criteria=["l1-norm"], ratios=[0.5],
        output_dir=tmp_path, show_progress=False,
    )  # fmt: skip
    assert any(r["loss"] is None for r in records)

    def refuse(constant: str) -> None:
        raise AssertionError(f"results.json holds {constant}, which is not JSON")

    json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)


def test_d2_stores_opened_while_another_creates_them(tmp_path: Path) -> None:
    """Opening a store while another thread creates it used to read its id before the
    creator's commit and its tables after: 'an SQLite database of another application'."""
    import threading

    from neuron_merging.store import ResultsStore

    errors: list[BaseException] = []
    for round_ in range(30):
        folder = tmp_path / str(round_)
        folder.mkdir()
        start = threading.Barrier(6)

        def open_store(folder: Path = folder, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                ResultsStore(folder).close()
            except BaseException as exc:  # collected: a thread's failure must fail the test
                errors.append(exc)

        threads = [threading.Thread(target=open_store) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


# =========================================================================== probe 13: malformed
# records and read-only stores (appended; the tests above are unchanged)
#
# * A results store changed outside neuron-merging (a record whose JSON does not parse, a record
#   without 'mode', an identity that does not hash to its key) made `results DIR` and
#   `sweep --resume` exit 70 (JSONDecodeError / KeyError). It is now refused with one line naming
#   the store and the record, exit 6, before any work, and the store is left as it was.
# * A valid store on a read-only file system was reported as "is corrupt (unable to open database
#   file)"; it is now opened read-only and listed.

import contextlib  # noqa: E402
import re  # noqa: E402
import sqlite3  # noqa: E402
import subprocess as _subprocess  # noqa: E402
from collections.abc import Iterator  # noqa: E402

_TAMPER = {
    "record_json not JSON": "UPDATE records SET record_json = '{bad'",
    "record without mode": "UPDATE records SET record_json = json_remove(record_json, '$.mode')",
    "record_json a number": "UPDATE records SET record_json = 42",
    "record_json a blob": "UPDATE records SET record_json = X'7B7D'",
    "identity_json not JSON": "UPDATE records SET identity_json = '[[['",
    "identity without settings": (
        "UPDATE records SET identity_json = json_remove(identity_json, '$.settings')"
    ),
    "identity changed": (
        "UPDATE records SET identity_json = json_set(identity_json, '$.settings.lam', 0.123)"
    ),
}
_TAMPER_MESSAGE = {
    "record_json not JSON": "its record_json is not valid JSON (Expecting property name",
    "record without mode": "the record has no 'mode'",
    "record_json a number": "the record is a int, not a record",
    "record_json a blob": "its record_json is a bytes, not JSON text",
    "identity_json not JSON": "its identity_json is not valid JSON",
    "identity without settings": "its identity_json is not an identity",
    "identity changed": "its identity does not hash to its keys",
}


def _small_store(folder: Path) -> None:
    run_sweep(
        _model(), "lenet300", "fashion-mnist", _tiny(), criteria=["l1-norm"], ratios=[0.5],
        modes=["prune"], output_dir=folder, show_progress=False,
    )  # fmt: skip


def _rows(store: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(store)) as db:
        return db.execute("SELECT * FROM records ORDER BY identity").fetchall()


def _tamper(folder: Path, statement: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(folder / STORE_NAME)) as db:
        db.execute(statement)
        db.commit()
    return _rows(folder / STORE_NAME)


@pytest.mark.parametrize("name", list(_TAMPER))
def test_p13_a_malformed_record_is_refused_by_every_reader(name: str, tmp_path: Path) -> None:
    _small_store(tmp_path)
    before = _tamper(tmp_path, _TAMPER[name])
    exports = {n: (tmp_path / n).read_bytes() for n in ("results.json", "results.csv")}
    with ResultsStore(tmp_path) as store, pytest.raises(OutputError) as info:
        store.groups()  # what `results DIR` lists
    message = str(info.value)
    assert message.startswith(f"{tmp_path / STORE_NAME}: record ")
    assert " is malformed: " in message and _TAMPER_MESSAGE[name] in message
    assert message.endswith(
        "the store was changed outside neuron-merging (remove or repair that record)"
    )
    with pytest.raises(OutputError, match=re.escape(_TAMPER_MESSAGE[name])):
        run_sweep(  # the records of its own settings are read before any work
            _model(), "lenet300", "fashion-mnist", _tiny(), criteria=["l1-norm"],
            ratios=[0.5], modes=["prune"], output_dir=tmp_path, resume=True,
            show_progress=False,
        )  # fmt: skip
    assert _rows(tmp_path / STORE_NAME) == before  # nothing written, nothing lost
    assert {n: (tmp_path / n).read_bytes() for n in exports} == exports


@pytest.mark.parametrize("name", ["record_json not JSON", "record without mode"])
def test_p13_results_cli_refuses_a_malformed_record_with_exit_6(name: str, tmp_path: Path) -> None:
    _small_store(tmp_path)
    _tamper(tmp_path, _TAMPER[name])
    line = _one_line_error(_cli("results", tmp_path), 6)
    assert line.startswith(f"neuron-merging: error: {tmp_path / STORE_NAME}: record ")
    assert _TAMPER_MESSAGE[name] in line
    assert "changed outside neuron-merging" in line


@needs_lenet
def test_p13_sweep_resume_cli_refuses_a_malformed_record_with_exit_6(
    data_dir: Path, tmp_path: Path
) -> None:
    args = _sweep_args(LENET, data_dir, tmp_path, "--criteria", "l1-norm", "--ratios", "0.5")
    args += ["--modes", "prune"]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr
    before = _tamper(tmp_path, _TAMPER["record_json not JSON"])
    line = _one_line_error(_cli(*args, "--resume"), 6)
    assert "is malformed: its record_json is not valid JSON" in line
    assert _rows(tmp_path / STORE_NAME) == before


def test_p13_a_legacy_record_without_a_ratio_is_listed(tmp_path: Path) -> None:
    """A migrated record may lack 'ratio' (it is optional in results.json); listing it used to
    raise a raw KeyError in the table code."""
    legacy = [{**_GOOD, "mode": "original", "criterion": None, "params": 7}]
    legacy.append({k: v for k, v in _GOOD.items() if k != "ratio"})
    (tmp_path / "results.json").write_text(json.dumps(legacy))
    with ResultsStore(tmp_path) as store:
        assert store.migrate_legacy(tmp_path / "results.json") == 2
    result = _cli("results", tmp_path)
    assert result.returncode == 0, result.stderr


def test_p13_a_store_of_another_layout_is_refused(tmp_path: Path) -> None:
    from neuron_merging.store import APPLICATION_ID

    with contextlib.closing(sqlite3.connect(tmp_path / STORE_NAME)) as db:
        db.execute("CREATE TABLE records (identity TEXT, other TEXT)")
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.commit()
    with pytest.raises(OutputError, match=r"has a 'records' table with the columns \(identity"):
        ResultsStore(tmp_path)
    line = _one_line_error(_cli("results", tmp_path), 6)
    assert "not a neuron-merging results store" in line


def test_p13_a_store_opened_read_only_lists_and_refuses_writes(tmp_path: Path) -> None:
    _small_store(tmp_path)
    before = _rows(tmp_path / STORE_NAME)
    with ResultsStore(tmp_path, read_only=True) as store:
        assert store.read_only
        assert [len(records) for _, records in store.groups()] == [2]
        with pytest.raises(OutputError, match="the results store is read-only here"):
            store.put({"settings": {}, "mode": "original"}, dict(_GOOD, mode="original"))
    assert _rows(tmp_path / STORE_NAME) == before


def test_p13_an_empty_store_file_read_only_is_an_empty_store(tmp_path: Path) -> None:
    (tmp_path / STORE_NAME).write_bytes(b"")
    with ResultsStore(tmp_path, read_only=True) as store:
        assert store.groups() == [] and store.count() == 0 and store.meta("migrated") is None


@contextlib.contextmanager
def _read_only_mount(tmp_path: Path, *files: Path) -> Iterator[Path]:
    """A tmpfs holding ``files`` in ``sw/``, remounted read-only (needs root)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    made = _subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {made.stderr.decode().strip()}")
    try:
        (mount / "sw").mkdir()
        for file in files:
            (mount / "sw" / file.name).write_bytes(file.read_bytes())
        _subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield mount / "sw"
    finally:
        _subprocess.run(["umount", str(mount)], check=True)


needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounts a read-only tmpfs (root)"
)


@needs_root
def test_p13_results_lists_a_store_on_a_read_only_file_system(tmp_path: Path) -> None:
    source = tmp_path / "source"
    _small_store(source)
    listed = _cli("results", source, "--json")
    assert listed.returncode == 0, listed.stderr
    with _read_only_mount(tmp_path, source / STORE_NAME) as folder:
        assert not os.access(folder, os.W_OK)
        result = _cli("results", folder, "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["groups"] == json.loads(listed.stdout)["groups"]
        assert sorted(p.name for p in folder.iterdir()) == [STORE_NAME]


@needs_root
def test_p13_a_read_only_store_with_unmerged_log_is_refused_not_misread(tmp_path: Path) -> None:
    """Records still in the write-ahead log are invisible to ``immutable=1``: the store must be
    refused (saying why), never listed without them."""
    source = tmp_path / "source"
    _small_store(source)
    with contextlib.closing(sqlite3.connect(source / STORE_NAME, isolation_level=None)) as db:
        db.execute("PRAGMA wal_autocheckpoint = 0")
        db.execute("UPDATE records SET created = created + 1")  # lands in results.sqlite-wal
        wal = source / f"{STORE_NAME}-wal"
        assert wal.stat().st_size > 0
        with _read_only_mount(tmp_path, source / STORE_NAME, wal) as folder:
            line = _one_line_error(_cli("results", folder), 6)
    assert "read-only file system" in line and "write-ahead log" in line
    assert "corrupt" not in line
