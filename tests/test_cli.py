"""End-to-end tests of the ``neuron-merging`` command line and the paper's scripts.

Every test runs the real CLI in a subprocess on real files: the released LeNet
checkpoint and FashionMNIST from ``../shared`` (skipped when absent), and tiny
CIFAR-10/100 datasets written here in the official format for the CIFAR models'
smoke runs.

Most of a run's cost is starting Python and importing torch, so the commands of
all selected tests are submitted to a small thread pool when the module starts
(:func:`_start_selected_jobs`) and overlap; each test then waits for its own
results. Each subprocess uses one intra-op thread.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"
CHECKPOINTS = SHARED / "checkpoints"
LENET = CHECKPOINTS / "LeNet_300_100.original.300_100.bias.pth.tar"
SCRIPTS = REPO / "scripts"
FMNIST = DATA / "FashionMNIST" / "raw"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIMEOUT = 300
WORKERS = max(2, min(6, 2 * (os.cpu_count() or 1)))

HAVE_LENET = LENET.is_file() and (FMNIST / "t10k-images-idx3-ubyte").is_file()
HAVE_FMNIST_TRAIN = (FMNIST / "train-images-idx3-ubyte").is_file()
HAVE_BASH = shutil.which("bash") is not None

needs_lenet = pytest.mark.skipif(
    not HAVE_LENET, reason=f"needs {LENET} and the FashionMNIST test set in {FMNIST}"
)
needs_fmnist_train = pytest.mark.skipif(
    not HAVE_FMNIST_TRAIN, reason=f"needs the FashionMNIST training set in {FMNIST}"
)
needs_bash = pytest.mark.skipif(not HAVE_BASH, reason="needs bash")

Result = subprocess.CompletedProcess


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEURON_MERGING")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def cli(
    *args: object, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Result[str]:
    """Run ``python -m neuron_merging.cli ARGS`` and capture its output.

    ``str`` arguments are split into words; paths are passed whole.
    """
    words = [w for a in args for w in (a.split() if isinstance(a, str) else [str(a)])]
    command = [sys.executable, "-m", "neuron_merging.cli", *words]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=TIMEOUT, env=_env(env), cwd=cwd
    )


def script(name: str, *args: str, env: Mapping[str, str] | None = None) -> Result[str]:
    """Run one of the paper's shell scripts with this interpreter's CLI."""
    extra = {"NEURON_MERGING": f"{sys.executable} -m neuron_merging.cli", **(env or {})}
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(extra),
    )


def ok(result: Result[str]) -> Result[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def write_cifar(root: Path, name: str, train: int, test: int) -> Path:
    """A tiny CIFAR-10/100 in the official python format (protocol-2 bytes-keyed pickles)."""
    rng = np.random.default_rng(0)
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    if name == "cifar10":
        files = {f"data_batch_{i}": train for i in range(1, 6)} | {"test_batch": test}
    else:
        files = {"train": train, "test": test}
    classes = 10 if name == "cifar10" else 100
    for base, n in files.items():
        labels = [int(v) for v in rng.integers(0, classes, n)]
        batch: dict[bytes, Any] = {
            b"batch_label": f"{base} of {n}".encode(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        if name == "cifar10":
            batch[b"labels"] = labels
        else:
            batch[b"fine_labels"] = labels
            batch[b"coarse_labels"] = [v // 5 for v in labels]
        with open(folder / base, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    return root


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- job pool


class Jobs:
    """Named commands running in the pool; ``jobs[name]`` waits for one's result."""

    def __init__(self, pool: ThreadPoolExecutor, **paths: Path) -> None:
        self._pool = pool
        self._futures: dict[str, Future[Any]] = {}
        self.paths = paths

    def submit(self, name: str, job: Callable[[], Any]) -> None:
        self._futures[name] = self._pool.submit(job)

    def __contains__(self, name: str) -> bool:
        return name in self._futures

    def __getitem__(self, name: str) -> Any:
        return self._futures[name].result()


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="cli")
    yield executor
    executor.shutdown(wait=True, cancel_futures=True)


#: The job fixtures, longest chains first so that they start first.
JOB_FIXTURES = (
    "cifar_jobs",
    "cifar100_jobs",
    "sweep_jobs",
    "reproduce_jobs",
    "lenet_jobs",
    "script_jobs",
    "error_jobs",
)


@pytest.fixture(scope="module", autouse=True)
def _start_selected_jobs(request: pytest.FixtureRequest) -> None:
    """Submit the commands of every selected test of this module up front, so they overlap."""
    wanted = {
        name
        for item in request.session.items
        if getattr(item, "module", None) is request.module
        for name in getattr(item, "fixturenames", ())
    }
    for name in JOB_FIXTURES:
        if name in wanted:
            request.getfixturevalue(name)


# --------------------------------------------------------------------------- compress/evaluate


@pytest.fixture(scope="module")
def lenet_jobs(pool: ThreadPoolExecutor, tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    out = tmp_path_factory.mktemp("lenet") / "x.pth.tar"
    jobs = Jobs(pool, output=out)
    if not HAVE_LENET:
        return jobs

    def round_trip() -> tuple[Result[str], Result[str]]:
        compressed = cli(
            "compress --arch lenet300 --checkpoint",
            LENET,
            "--data-dir",
            DATA,
            "-t merge -c l1-norm -r 0.5 --output",
            out,
        )
        return compressed, cli("evaluate --checkpoint", out, "--data-dir", DATA, "--quiet")

    jobs.submit("round_trip", round_trip)
    jobs.submit(
        "json",
        lambda: cli("evaluate --arch lenet300 --checkpoint", LENET, "--data-dir", DATA, "--json"),
    )
    return jobs


@needs_lenet
def test_compress_prints_accuracy_and_report(lenet_jobs: Jobs) -> None:
    result = ok(lenet_jobs["round_trip"][0])
    lines = result.stdout.splitlines()
    assert "Accuracy: 8869/10000 (88.69%)" in lines
    assert lines[-1] == f"saved {lenet_jobs.paths['output']}"
    assert "266,610 → 125,810 parameters" in result.stdout
    assert "| ip1 | — | ip2 | 300 | 150 | 150 |" in result.stdout
    assert result.stderr == ""


@needs_lenet
def test_evaluate_reads_arch_from_saved_metadata(lenet_jobs: Jobs) -> None:
    ok(lenet_jobs["round_trip"][0])
    result = ok(lenet_jobs["round_trip"][1])
    assert result.stdout == "Accuracy: 8869/10000 (88.69%)\n"


@needs_lenet
def test_saved_checkpoint_loads_weights_only(lenet_jobs: Jobs) -> None:
    ok(lenet_jobs["round_trip"][0])
    saved = load_checkpoint(lenet_jobs.paths["output"])
    assert {"acc", "state_dict", "arch", "cfg", "num_classes", "dataset"} <= set(saved)
    assert saved["arch"] == "lenet300" and saved["cfg"] == [150, 50]
    assert saved["num_classes"] == 10 and saved["dataset"] == "fashion-mnist"
    assert saved["acc"] == pytest.approx(88.69)
    assert saved["state_dict"]["ip1.weight"].shape == (150, 784)
    assert saved["state_dict"]["ip2.weight"].shape == (50, 150)
    assert saved["compression"]["mode"] == "merge"
    assert saved["compression"]["threshold"] == 0.45


@needs_lenet
def test_json_output(lenet_jobs: Jobs) -> None:
    payload = json.loads(ok(lenet_jobs["json"]).stdout)
    assert payload["arch"] == "lenet300" and payload["dataset"] == "fashion-mnist"
    assert (payload["accuracy"], payload["correct"], payload["total"]) == (89.8, 8980, 10000)
    assert payload["params"] == 266_610
    assert payload["macs"] == 784 * 300 + 300 * 100 + 100 * 10
    assert payload["cfg"] == [300, 100]
    assert payload["loss"] > 0


# --------------------------------------------------------------------------- sweep


SWEEP_GOLDENS = {  # ratio: (l1-norm prune, l1-norm merge), the paper's Table 1
    0.5: (88.40, 88.69),
    0.6: (85.17, 86.92),
    0.7: (71.26, 82.75),
}
SWEEP_ARGS = "--criteria l1-norm l2-norm l2-GM --ratios 0.5 0.6 0.7"


@pytest.fixture(scope="module")
def sweep_jobs(pool: ThreadPoolExecutor, tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    tmp = tmp_path_factory.mktemp("sweep")
    out, resumed = tmp / "out", tmp / "resumed"
    jobs = Jobs(pool, out=out, resumed=resumed)
    if not HAVE_LENET:
        return jobs

    def sweep_then_resume() -> dict[str, Any]:
        sweep = cli(
            "sweep --arch lenet300 --dataset fashion-mnist --checkpoint",
            LENET,
            SWEEP_ARGS,
            "--output",
            out,
            "--quiet",
            env={"NEURON_MERGING_DATA": str(DATA)},
        )
        if sweep.returncode != 0:
            return {"sweep": sweep}
        # Resume a copy whose first record is marked in the store: a recomputation would
        # undo the mark. results.json is an export of the store, so it shows the mark too.
        shutil.copytree(out, resumed)
        records = json.loads((resumed / "results.json").read_text())
        records[0]["loss"] = 123.0
        with sqlite3.connect(resumed / "results.sqlite") as db:
            rows = db.execute("SELECT identity, record_json FROM records").fetchall()
            for identity, text in rows:
                stored = json.loads(text)
                if stored["mode"] == records[0]["mode"] == "original":
                    stored["loss"] = 123.0
                    db.execute(
                        "UPDATE records SET record_json = ? WHERE identity = ?",
                        (json.dumps(stored), identity),
                    )
        db.close()
        (resumed / "results.json").write_text(json.dumps(records, indent=2) + "\n")
        before = (resumed / "results.json").read_bytes()
        resume = cli(
            "sweep --arch lenet300 --checkpoint",
            LENET,
            "--data-dir",
            DATA,
            SWEEP_ARGS,
            "--output",
            resumed,
            "--resume --json",
        )
        return {"sweep": sweep, "resume": resume, "before": before, "marked": records}

    jobs.submit("sweep", sweep_then_resume)
    return jobs


@needs_lenet
def test_sweep_results(sweep_jobs: Jobs) -> None:
    result = ok(sweep_jobs["sweep"]["sweep"])
    out = sweep_jobs.paths["out"]
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 1 + 3 * 3 * 2
    fields = {"arch", "dataset", "mode", "criterion", "ratio", "threshold", "accuracy"}
    for record in records:
        assert fields | {"params", "macs"} <= set(record)
        assert (record["arch"], record["dataset"]) == ("lenet300", "fashion-mnist")
        assert record["mode"] in ("original", "prune", "merge")
    index = {(r["mode"], r["criterion"], r["ratio"]): r for r in records}
    assert len(index) == len(records)  # uniquely keyed
    original = index["original", None, 0.0]
    assert (original["accuracy"], original["params"], original["macs"]) == (89.8, 266_610, 266_200)
    assert original["threshold"] is None
    for ratio, (pruned, merged) in SWEEP_GOLDENS.items():
        assert index["prune", "l1-norm", ratio]["accuracy"] == pruned
        assert index["merge", "l1-norm", ratio]["accuracy"] == merged
        for criterion in ("l1-norm", "l2-norm", "l2-GM"):
            assert index["merge", criterion, ratio]["threshold"] == 0.45
            assert index["merge", criterion, ratio]["params"] < original["params"]
    assert index["merge", "l1-norm", 0.5]["params"] == 125_810
    # The table printed on stdout is the one written to results.md.
    assert result.stdout == (out / "results.md").read_text()
    assert "| 50% | 125,810 | 88.40 | 88.69 |" in result.stdout


@needs_lenet
def test_sweep_files(sweep_jobs: Jobs) -> None:
    ok(sweep_jobs["sweep"]["sweep"])
    out = sweep_jobs.paths["out"]
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert len(rows) == 19
    assert {"mode", "criterion", "ratio", "accuracy", "params", "macs"} <= set(rows[0])
    assert (out / "accuracy.png").read_bytes()[:8] == PNG_MAGIC
    # No temporary files are left behind (results.sqlite is the store the files are exported from).
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy.png",
        "results.csv",
        "results.json",
        "results.md",
        "results.sqlite",
    ]


@needs_lenet
def test_sweep_resume_runs_nothing_new(sweep_jobs: Jobs) -> None:
    runs = sweep_jobs["sweep"]
    ok(runs["sweep"])
    result = ok(runs["resume"])
    assert (sweep_jobs.paths["resumed"] / "results.json").read_bytes() == runs["before"]
    assert json.loads(result.stdout)["records"] == runs["marked"]


# --------------------------------------------------------------------------- reproduce


@pytest.fixture(scope="module")
def reproduce_jobs(pool: ThreadPoolExecutor, tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    tmp = tmp_path_factory.mktemp("reproduce")
    released, trained = tmp / "released", tmp / "trained"
    jobs = Jobs(pool, released=released, trained=trained, cwd=tmp)
    if HAVE_LENET:
        jobs.submit(
            "released",
            lambda: cli(
                "reproduce lenet300 --checkpoint",
                LENET,
                "--data-dir",
                DATA,
                "--output",
                released,
                "--ratios 0.5 0.8 --criteria l1-norm --quiet",
            ),
        )
    if HAVE_LENET and HAVE_FMNIST_TRAIN:
        jobs.submit(
            "trained",
            lambda: cli(
                "reproduce lenet300 --epochs 1 --max-batches 5 --ratios 0.5 --criteria l1-norm",
                "--output",
                trained,
                "--quiet",
                env={"NEURON_MERGING_DATA": str(DATA)},
                cwd=tmp,
            ),
        )
    return jobs


@needs_lenet
def test_reproduce_with_released_checkpoint(reproduce_jobs: Jobs) -> None:
    text = ok(reproduce_jobs["released"]).stdout
    assert text.startswith("## LeNet-300-100 on FashionMNIST")
    assert "| ratio | params | l1-norm prune | l1-norm merge |" in text
    assert "| baseline | 266,610 | 89.80 | — |" in text
    assert "| 50% | 125,810 | 88.40 | 88.69 |" in text
    assert "| 80% | 48,530 | 66.76 | 80.02 |" in text
    released = reproduce_jobs.paths["released"]
    assert len(json.loads((released / "results.json").read_text())) == 5
    assert (released / "accuracy.png").read_bytes()[:8] == PNG_MAGIC
    assert not (released / "baseline.pth.tar").exists()


@needs_lenet
@needs_fmnist_train
def test_reproduce_trains_a_baseline(reproduce_jobs: Jobs) -> None:
    text = ok(reproduce_jobs["trained"]).stdout
    trained = reproduce_jobs.paths["trained"]
    assert "trained baseline: " in text and str(trained / "baseline.pth.tar") in text
    baseline = load_checkpoint(trained / "baseline.pth.tar")
    assert baseline["arch"] == "lenet300" and baseline["dataset"] == "fashion-mnist"
    assert baseline["state_dict"]["ip1.weight"].shape == (300, 784)
    assert 10.0 < baseline["acc"] <= 100.0  # five batches already beat chance
    records = json.loads((trained / "results.json").read_text())
    assert [(r["mode"], r["ratio"]) for r in records] == [
        ("original", 0.0),
        ("prune", 0.5),
        ("merge", 0.5),
    ]
    assert records[0]["accuracy"] == round(baseline["acc"], 2)
    assert (trained / "results.md").is_file() and (trained / "results.csv").is_file()
    assert not (reproduce_jobs.paths["cwd"] / "results").exists()  # --output was honoured


# --------------------------------------------------------------------------- CIFAR models


CIFAR_PARAMS = {  # arch: (compress arguments, params after) — the paper's widths
    "vgg16": ("", 5_397_034),
    "wrn40_4": ("-r 0.5", 4_499_802),
    "resnet56": ("-r 0.5", 430_826),
}


@pytest.fixture(scope="module")
def cifar_jobs(pool: ThreadPoolExecutor, tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    tmp = tmp_path_factory.mktemp("cifar")
    data = write_cifar(tmp / "data", "cifar10", train=2, test=4)
    jobs = Jobs(pool, tmp=tmp)

    def chain(arch: str) -> dict[str, Any]:
        trained, compressed = tmp / f"{arch}.pth.tar", tmp / f"{arch}m.pth.tar"
        # VGG skips the per-epoch test evaluation (too slow on the real test set on a CPU).
        no_test = "--no-test" if arch == "vgg16" else ""
        train = cli(
            "train --arch",
            arch,
            "--dataset cifar10 --epochs 1 --max-batches 2 --batch-size 4 --json",
            no_test,
            "--data-dir",
            data,
            "--output",
            trained,
        )
        if train.returncode != 0:
            return {"train": train}
        compress = cli(
            "compress --checkpoint",
            trained,
            "--dataset cifar10 -t merge -c l1-norm --no-eval --json",
            CIFAR_PARAMS[arch][0],
            "--output",
            compressed,
        )
        return {"train": train, "compress": compress, "trained": trained, "out": compressed}

    for arch in CIFAR_PARAMS:
        jobs.submit(arch, lambda a=arch: chain(a))
    return jobs


@pytest.mark.parametrize("arch", list(CIFAR_PARAMS))
def test_cifar_train_then_compress(cifar_jobs: Jobs, arch: str) -> None:
    runs = cifar_jobs[arch]
    trained = json.loads(ok(runs["train"]).stdout)
    assert trained["arch"] == arch and trained["dataset"] == "cifar10"
    assert trained["recipe"]["epochs"] == 1 and trained["recipe"]["batch_size"] == 4
    assert len(trained["history"]) == 1
    saved = load_checkpoint(runs["trained"])
    assert saved["arch"] == arch and saved["dataset"] == "cifar10"
    if arch == "vgg16":  # --no-test: no evaluation, the last epoch is saved
        assert trained["best_accuracy"] is None and saved["acc"] is None
        assert "test_acc" not in trained["history"][0]
    else:
        assert trained["best_epoch"] == 1 and trained["best_accuracy"] == saved["acc"]
        assert trained["history"][0]["test_acc"] == saved["acc"]

    payload = json.loads(ok(runs["compress"]).stdout)
    assert payload["params"] == CIFAR_PARAMS[arch][1]
    assert payload["macs"] > 0 and "accuracy" not in payload
    compressed = load_checkpoint(runs["out"])
    assert compressed["cfg"] == payload["cfg"] and compressed["acc"] is None
    assert compressed["arch"] == arch and compressed["num_classes"] == 10


@pytest.fixture(scope="module")
def cifar100_jobs(pool: ThreadPoolExecutor, tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    tmp = tmp_path_factory.mktemp("cifar100")
    env = {
        "NEURON_MERGING_DATA": str(write_cifar(tmp / "data", "cifar100", train=4, test=6)),
        "NEURON_MERGING_CHECKPOINTS": str(tmp / "checkpoints"),
    }
    jobs = Jobs(pool, checkpoint=tmp / "checkpoints" / "VGG.cifar100.original.pth.tar")
    if not HAVE_BASH:
        return jobs

    def train_then_compress() -> tuple[Result[str], Result[str] | None]:
        args = ("--epochs", "1", "--max-batches", "1", "--quiet")
        train = script("VGG16_CIFAR100_train.sh", *args, env=env)
        if train.returncode != 0:
            return train, None
        return train, script("VGG16_CIFAR100.sh", "-t", "merge", "-c", "l1-norm", env=env)

    jobs.submit("scripts", train_then_compress)
    return jobs


@needs_bash
def test_vgg16_cifar100_scripts(cifar100_jobs: Jobs) -> None:
    train, compress = cifar100_jobs["scripts"]
    assert ok(train).stdout.startswith("best epoch 1: Accuracy: ")
    saved = load_checkpoint(cifar100_jobs.paths["checkpoint"])
    assert (saved["arch"], saved["dataset"], saved["num_classes"]) == ("vgg16", "cifar100", 100)

    lines = ok(compress).stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("Accuracy: ") and lines[0].endswith("%)")
    correct, total = lines[0].split()[1].split("/")
    assert int(total) == 6 and 0 <= int(correct) <= 6


# --------------------------------------------------------------------------- paper scripts


@pytest.fixture(scope="module")
def script_jobs(pool: ThreadPoolExecutor) -> Jobs:
    jobs = Jobs(pool)
    if not (HAVE_LENET and HAVE_BASH):
        return jobs
    env = {"NEURON_MERGING_CHECKPOINTS": str(CHECKPOINTS), "NEURON_MERGING_DATA": str(DATA)}
    name = "LeNet_300_100_FashionMNIST.sh"
    commands = {
        "merge": ("-t", "merge", "-c", "l1-norm", "-r", "0.5"),
        "original": ("-t", "original"),
        "bad": ("-t", "fuse", "-c", "l1-norm", "-r", "0.5"),
        "no ratio": ("-t", "prune"),
    }
    for key, args in commands.items():
        jobs.submit(key, lambda a=args: script(name, *a, env=env))
    return jobs


@needs_lenet
@needs_bash
def test_lenet_paper_script(script_jobs: Jobs) -> None:
    assert ok(script_jobs["merge"]).stdout == "Accuracy: 8869/10000 (88.69%)\n"
    assert ok(script_jobs["original"]).stdout == "Accuracy: 8980/10000 (89.80%)\n"


@needs_lenet
@needs_bash
def test_lenet_paper_script_usage(script_jobs: Jobs) -> None:
    for key in ("bad", "no ratio"):
        result = script_jobs[key]
        assert result.returncode == 2
        assert result.stdout == ""
        assert "usage: LeNet_300_100_FashionMNIST.sh -t original|prune|merge" in result.stderr
    assert "unknown -t fuse" in script_jobs["bad"].stderr
    assert "-r RATIO is required" in script_jobs["no ratio"].stderr


# --------------------------------------------------------------------------- errors


ERROR_CASES = {  # name: (exit code, text the first stderr line must contain)
    "missing checkpoint": (4, "not found"),
    "corrupt checkpoint": (4, "corrupt.pth.tar"),
    "wrong architecture": (4, "does not fit architecture 'resnet56'"),
    "unknown criterion": (2, "invalid choice: 'l9-norm'"),
    "ratio out of range": (2, "ratio must be in [0, 1), got 1.5"),
    "missing dataset": (5, "fashion-mnist (test split) not found"),
    "unwritable output": (6, "cannot write to"),
}
NEEDS_LENET = {
    "wrong architecture",
    "unknown criterion",
    "ratio out of range",
    "missing dataset",
    "unwritable output",
}


@pytest.fixture(scope="module")
def error_jobs(pool: ThreadPoolExecutor, tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    tmp = tmp_path_factory.mktemp("errors")
    corrupt = tmp / "corrupt.pth.tar"
    corrupt.write_bytes(np.random.default_rng(1).bytes(4096))
    a_file = tmp / "a_file"
    a_file.write_text("not a directory")
    empty = {name: tmp / name for name in ("home", "cache", "data")}
    for folder in empty.values():
        folder.mkdir()
    no_data = {
        "HOME": str(empty["home"]),
        "XDG_CACHE_HOME": str(empty["cache"]),
        "NEURON_MERGING_DATA": str(empty["data"]),
    }
    jobs = Jobs(pool, **empty)
    lenet = ("--arch lenet300 --checkpoint", LENET)
    commands: dict[str, tuple[tuple[object, ...], dict[str, str] | None]] = {
        "missing checkpoint": (("evaluate --checkpoint", tmp / "missing.pth.tar"), None),
        "corrupt checkpoint": (("evaluate --arch lenet300 --checkpoint", corrupt), None),
        "wrong architecture": (("evaluate --arch resnet56 --checkpoint", LENET), None),
        "unknown criterion": (("compress", *lenet, "-c l9-norm -r 0.5"), None),
        "ratio out of range": (("compress", *lenet, "-r 1.5 --no-eval"), None),
        "missing dataset": (("evaluate", *lenet, "--data-dir", Path("/nonexistent")), no_data),
        "unwritable output": (
            ("compress", *lenet, "-r 0.5 --no-eval --output", a_file / "sub" / "x.pth.tar"),
            None,
        ),
        "debug": (("evaluate --debug --checkpoint", tmp / "missing.pth.tar"), None),
    }
    for name, (args, env) in commands.items():
        if LENET.is_file() or name not in NEEDS_LENET:
            jobs.submit(name, lambda a=args, e=env: cli(*a, "--quiet", env=e))
    return jobs


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_cli_errors(error_jobs: Jobs, case: str) -> None:
    if case not in error_jobs:
        pytest.skip(f"needs {LENET}")
    if case == "missing dataset" and Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("the Debian package dataset-fashion-mnist is installed")
    code, text = ERROR_CASES[case]
    result = error_jobs[case]
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("neuron-merging")
    assert ": error: " in lines[0]
    assert text in lines[0]
    if case == "missing dataset":  # the message lists every place it looked
        for folder in ("/nonexistent", error_jobs.paths["data"], error_jobs.paths["cache"]):
            assert any(str(folder) in line for line in lines[1:]), folder
        assert "--download" in result.stderr
    else:
        assert len(lines) == 1, result.stderr


def test_debug_shows_the_traceback(error_jobs: Jobs) -> None:
    result = error_jobs["debug"]
    assert result.returncode == 4  # --debug keeps the exit code of the error class (D25)
    assert "Traceback (most recent call last)" in result.stderr
    assert "CheckpointError" in result.stderr and "not found" in result.stderr


def test_threshold_none_means_always_merge() -> None:
    """``--threshold none`` must not fall back to the preset's threshold (in-process: no run)."""
    from neuron_merging.cli import build_parser
    from neuron_merging.experiments import compression_config

    base = ["compress", "--checkpoint", "x.pth.tar", "-r", "0.5"]
    for extra, expected in (
        ([], 0.45),
        (["--threshold", "none"], None),
        (["--threshold", "0.2"], 0.2),
    ):
        args = build_parser().parse_args([*base, *extra])
        config = compression_config(
            "lenet300", "fashion-mnist", "merge", "l1-norm", args.ratio, threshold=args.threshold
        )
        assert config.threshold == expected
