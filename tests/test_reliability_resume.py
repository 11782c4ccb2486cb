"""Nothing is lost: a sweep killed with SIGKILL resumes to the exact results; runs are deterministic.

* A real ``neuron-merging sweep`` (the released LeNet-300-100 on real FashionMNIST
  test images) runs in a subprocess. While it runs, every read of its
  ``results.json`` must parse (atomic writes: never half-written). Once it holds
  at least 3 but not all records, the process is killed with SIGKILL. ``--resume``
  then completes it, and the outcome must be byte-identical to an uninterrupted
  sweep run in another fresh process (results.json, .csv, .md and accuracy.png):
  complete, uniquely keyed, with no temporary files left behind.
* Two fresh ``neuron-merging compress`` processes give bit-identical weights.

The sweep evaluates on the first 2000 images of the FashionMNIST test set
(written here as IDX files), which keeps each configuration short. Skipped when
the shared checkpoint or data are absent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from neuron_merging.data.fashion_mnist import read_idx_images, read_idx_labels

SHARED = Path(__file__).resolve().parents[2] / "shared"
LENET = SHARED / "checkpoints" / "LeNet_300_100.original.300_100.bias.pth.tar"
RESNET = SHARED / "checkpoints" / "ResNet.cifar10.original.56.pth.tar"
FMNIST = SHARED / "data" / "FashionMNIST" / "raw"
IMAGES, LABELS = FMNIST / "t10k-images-idx3-ubyte", FMNIST / "t10k-labels-idx1-ubyte"
SUBSET = 2000
TIMEOUT = 600

RATIOS = [f"{r / 10:.1f}" for r in range(1, 10)]
CRITERIA = ["l1-norm", "l2-GM"]
TOTAL = 1 + len(RATIOS) * len(CRITERIA) * 2  # the original + ratios × criteria × {prune, merge}
OUTPUTS = ["accuracy.png", "results.csv", "results.json", "results.md"]
STORE = ["results.sqlite", "results.sqlite-wal", "results.sqlite-shm"]  # the store, and its WAL

pytestmark = pytest.mark.skipif(
    not (LENET.is_file() and IMAGES.is_file() and LABELS.is_file()),
    reason=f"needs {LENET} and the FashionMNIST test set in {FMNIST}",
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEURON_MERGING")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    return env


def _command(*args: object) -> list[str]:
    return [sys.executable, "-m", "neuron_merging.cli", *map(str, args)]


def _idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first SUBSET images and labels of the real FashionMNIST test set."""
    root = tmp_path_factory.mktemp("fmnist")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _idx(raw / "t10k-images-idx3-ubyte", 2051, read_idx_images(IMAGES)[:SUBSET, 0])
    _idx(raw / "t10k-labels-idx1-ubyte", 2049, read_idx_labels(LABELS)[:SUBSET])
    return root


def _sweep(data_dir: Path, output: Path, *extra: str) -> list[str]:
    return _command(
        "sweep",
        "--arch",
        "lenet300",
        "--checkpoint",
        LENET,
        "--data-dir",
        data_dir,
        "--criteria",
        *CRITERIA,
        "--ratios",
        *RATIOS,
        "--output",
        output,
        "--quiet",
        *extra,
    )


def _keys(records: list[dict]) -> list[tuple]:
    return [(r["mode"], r["criterion"], r["ratio"]) for r in records]


def _read_while_running(results: Path) -> list[dict] | None:
    """The records in ``results`` now; the file must always be complete JSON."""
    try:
        data = results.read_bytes()
    except FileNotFoundError:
        return None
    records = json.loads(data)  # never half-written: a parse error fails the test
    assert isinstance(records, list)
    return records


def test_sweep_killed_mid_way_resumes_to_identical_results(data_dir: Path, tmp_path: Path) -> None:
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    log = (tmp_path / "reference.log").open("w")
    uninterrupted = subprocess.Popen(
        _sweep(data_dir, reference), env=_env(), stdout=log, stderr=subprocess.STDOUT
    )
    victim = subprocess.Popen(
        _sweep(data_dir, killed),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    seen: list[dict] | None = None
    reads = 0
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline and victim.poll() is None:
            seen = _read_while_running(killed / "results.json")
            reads += seen is not None
            if seen is not None and 3 <= len(seen) < TOTAL:
                os.kill(victim.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        rc = victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
    stderr = victim.stderr.read().decode() if victim.stderr else ""
    assert rc == -signal.SIGKILL, f"the sweep was not killed mid-way (exit {rc}): {stderr}"

    # What the killed run left: complete JSON holding only finished, unique configurations.
    partial = json.loads((killed / "results.json").read_text())
    assert 3 <= len(partial) < TOTAL and reads >= 1
    assert len(set(_keys(partial))) == len(partial)
    assert partial[0]["mode"] == "original"
    leftovers = {p.name for p in killed.iterdir()} - set(OUTPUTS) - set(STORE)
    assert all(n.startswith(".") and n.endswith(".tmp") for n in leftovers), leftovers
    # A kill during a write leaves its temporary file (named after the dead writer's
    # pid); plant one so the cleanup is always tested.
    (killed / f".results.json.{victim.pid}.k1ll3d.tmp").write_text('[{"mode": "orig')

    resumed = subprocess.run(
        _sweep(data_dir, killed, "--resume"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert uninterrupted.wait(timeout=TIMEOUT) == 0, (tmp_path / "reference.log").read_text()
    log.close()

    final = json.loads((killed / "results.json").read_text())
    assert len(final) == TOTAL
    assert len(set(_keys(final))) == TOTAL
    assert all(record in final for record in partial)  # finished work was kept as it was
    # No temporary files remain (accuracy.png exists only where matplotlib is installed).
    outputs = sorted(p.name for p in reference.iterdir() if p.name not in STORE)
    assert set(OUTPUTS) - {"accuracy.png"} <= set(outputs) <= set(OUTPUTS)
    assert sorted(p.name for p in killed.iterdir() if p.name not in STORE) == outputs
    # Identical to the uninterrupted run in another fresh process (determinism, too).
    for name in outputs:
        assert (killed / name).read_bytes() == (reference / name).read_bytes(), name


def _compress(checkpoint: Path, arch: str, output: Path, *extra: str) -> list[str]:
    return _command(
        "compress",
        "--arch",
        arch,
        "--checkpoint",
        checkpoint,
        "--no-eval",
        "--quiet",
        "--output",
        output,
        *extra,
    )


def _runs(checkpoint: Path, arch: str, tmp_path: Path, *extra: str) -> list[Path]:
    """Compress ``checkpoint`` twice, in two fresh processes at once; return both outputs."""
    outputs = [tmp_path / f"{arch}-{i}.pth.tar" for i in (1, 2)]
    procs = [
        subprocess.Popen(
            _compress(checkpoint, arch, out, *extra),
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outputs
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
    return outputs


def _assert_bit_identical(first: Path, second: Path) -> None:
    a = torch.load(first, map_location="cpu", weights_only=True)
    b = torch.load(second, map_location="cpu", weights_only=True)
    assert a.keys() == b.keys()
    assert {k: v for k, v in a.items() if k != "state_dict"} == {
        k: v for k, v in b.items() if k != "state_dict"
    }
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, key
        assert torch.equal(sa[key], sb[key]), key
        # Bit-identical, not just equal (NaN-free and -0.0 == 0.0 would hide differences).
        assert sa[key].numpy().tobytes() == sb[key].numpy().tobytes(), key


def test_compress_is_bit_identical_in_fresh_processes(tmp_path: Path) -> None:
    first, second = _runs(LENET, "lenet300", tmp_path, "-t", "merge", "-c", "l2-GM", "-r", "0.6")
    _assert_bit_identical(first, second)


@pytest.mark.skipif(not RESNET.is_file(), reason=f"needs {RESNET}")
def test_compress_with_batch_norm_is_bit_identical_in_fresh_processes(tmp_path: Path) -> None:
    extra = ("-t", "merge", "-c", "l1-norm", "-r", "0.5", "--bn-rule", "exact")
    first, second = _runs(RESNET, "resnet56", tmp_path, *extra)
    _assert_bit_identical(first, second)


# --------------------------------------------------------------------------- atomic writes


_KILL_MID_WRITE = r"""
import os, signal, sys
from neuron_merging._io import atomic_save

def writer(handle):
    handle.write(b"half of a new checkpoint")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)

atomic_save(sys.argv[1], writer)
"""


def test_a_write_killed_midway_leaves_the_previous_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "model.pth.tar"
    target.write_bytes(b"the previous, complete checkpoint")
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_MID_WRITE, str(target)], env=_env(), timeout=TIMEOUT
    )
    assert killed.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"the previous, complete checkpoint"
    # Only the temporary file (next to the target) holds the partial write.
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert [p.read_bytes() for p in leftovers] == [b"half of a new checkpoint"]
    assert leftovers[0].name.startswith(".model.pth.tar.") and leftovers[0].suffix == ".tmp"


def test_atomic_write_fsyncs_a_temporary_file_in_the_same_directory_then_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from neuron_merging import _io

    calls: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src: str, dst: object) -> None:
        calls.append(("replace", (Path(src), Path(str(dst)))))
        real_replace(src, dst)

    monkeypatch.setattr(_io.os, "fsync", fsync)
    monkeypatch.setattr(_io.os, "replace", replace)
    target = tmp_path / "results.json"
    _io.atomic_write_text(target, "[]\n")
    (op1, synced), (op2, (src, dst)) = calls
    assert (op1, op2) == ("fsync", "replace")
    assert synced == src and src.parent == tmp_path and dst == target
    assert target.read_text() == "[]\n" and sorted(tmp_path.iterdir()) == [target]


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    from neuron_merging._io import atomic_save

    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def failing(handle: object) -> None:
        handle.write(b"partial")  # type: ignore[attr-defined]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_save(target, failing)
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]


# --------------------------------------------------------------------------- unique keys


def test_repeated_ratios_and_criteria_give_uniquely_keyed_results(tmp_path: Path) -> None:
    """Regression: ``--ratios 0.5 0.5`` or a repeated criterion used to duplicate records."""
    from neuron_merging import models
    from neuron_merging.data import ArrayDataset, dataset_info
    from neuron_merging.experiments import record_key, run_sweep

    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(
        torch.randn(8, 1, 28, 28, generator=g),
        torch.randint(0, 10, (8,), generator=g),
        dataset_info("fashion-mnist"),
    )
    torch.manual_seed(0)
    records = run_sweep(
        models.create("lenet300", cfg=[20, 10]),
        "lenet300",
        "fashion-mnist",
        data,
        criteria=["l1-norm", "l1-norm"],
        ratios=[0.5, 0.5, 0.5 + 1e-12],
        modes=["merge", "merge", "prune"],
        output_dir=tmp_path,
        show_progress=False,
    )
    keys = [record_key(r) for r in records]
    assert len(keys) == len(set(keys)) == 3  # original, prune and merge at 0.5
    assert json.loads((tmp_path / "results.json").read_text()) == records


# =========================================================================== probe 13: an
# interrupted baseline, and models too large to train (appended; the tests above are unchanged)
#
# * SIGTERM while `reproduce` trained its baseline left DIR/baseline.pth.tar holding the best
#   epoch so far, with nothing marking it unfinished; `--resume` reused it silently (exit 0,
#   trained=null) and reported the paper's table on an under-trained model. `train` now writes
#   `training={"finished": False, ...}` into every checkpoint it writes while training and
#   `"finished": True` only into the final one; a sweep on an unfinished one is refused (exit 4).
# * `train --cfg 100000000 100000000` died in the allocator (exit 70); the training layer now
#   refuses a model over MAX_TRAIN_ELEMENTS before allocating it (create_for_training).

import re  # noqa: E402

import neuron_merging as nm  # noqa: E402
from neuron_merging import models  # noqa: E402
from neuron_merging.checkpoint import load_model  # noqa: E402
from neuron_merging.data import ArrayDataset, dataset_info, load_dataset  # noqa: E402
from neuron_merging.experiments import run_sweep  # noqa: E402
from neuron_merging.training import (  # noqa: E402
    MAX_TRAIN_ELEMENTS,
    create_for_training,
    evaluate,
    recipe_for,
    require_finished,
    train,
    training_state,
)

TRAIN_IMAGES = FMNIST / "train-images-idx3-ubyte"
TRAIN_LABELS = FMNIST / "train-labels-idx1-ubyte"
needs_train_split = pytest.mark.skipif(
    not (TRAIN_IMAGES.is_file() and TRAIN_LABELS.is_file()),
    reason=f"needs the FashionMNIST training split in {FMNIST}",
)
TRAIN_SUBSET = 3000


@pytest.fixture(scope="module")
def train_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first TRAIN_SUBSET training and SUBSET test images of the real FashionMNIST."""
    if not (TRAIN_IMAGES.is_file() and TRAIN_LABELS.is_file()):
        pytest.skip("needs the FashionMNIST training split")
    root = tmp_path_factory.mktemp("fmnist_train")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _idx(raw / "t10k-images-idx3-ubyte", 2051, read_idx_images(IMAGES)[:SUBSET, 0])
    _idx(raw / "t10k-labels-idx1-ubyte", 2049, read_idx_labels(LABELS)[:SUBSET])
    _idx(raw / "train-images-idx3-ubyte", 2051, read_idx_images(TRAIN_IMAGES)[:TRAIN_SUBSET, 0])
    _idx(raw / "train-labels-idx1-ubyte", 2049, read_idx_labels(TRAIN_LABELS)[:TRAIN_SUBSET])
    return root


def _splits(root: Path) -> tuple[ArrayDataset, ArrayDataset]:
    return load_dataset("fashion-mnist", "train", root), load_dataset("fashion-mnist", "test", root)


def _one_error_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("neuron-merging: error: "), result.stderr
    return lines[0]


class _Stop(Exception):
    """Raised from ``on_epoch`` to stop training part-way, as a crash would."""


def test_p13_a_checkpoint_of_an_interrupted_training_is_marked_and_refused(
    train_data_dir: Path, tmp_path: Path
) -> None:
    train_set, test_set = _splits(train_data_dir)
    checkpoint = tmp_path / "baseline.pth.tar"

    def stop(epoch: int, record: dict[str, float]) -> None:
        if epoch == 2:
            raise _Stop

    torch.manual_seed(0)
    with pytest.raises(_Stop):
        train(
            models.create("lenet300"), train_set, test_set, recipe_for("fashion-mnist", epochs=4),
            checkpoint=checkpoint, checkpoint_meta={"dataset": "fashion-mnist"},
            max_batches=5, show_progress=False, on_epoch=stop,
        )  # fmt: skip
    entry = training_state(checkpoint)
    assert entry is not None and entry["finished"] is False
    assert entry["epochs"] == 4 and 1 <= entry["epoch"] <= 2 and entry["max_batches"] == 5
    load_model(checkpoint)  # still a loadable model (the best epoch so far) ...
    with pytest.raises(nm.CheckpointError, match="an unfinished training checkpoint"):
        require_finished(checkpoint)  # ... but never taken for a trained one
    out = tmp_path / "sweep"
    with pytest.raises(nm.CheckpointError, match=r"written after epoch [12] of 4"):
        run_sweep(
            load_model(checkpoint)[0], "lenet300", "fashion-mnist", test_set,
            criteria=["l1-norm"], ratios=[0.5], output_dir=out, checkpoint=checkpoint,
            show_progress=False,
        )  # fmt: skip
    assert not out.exists()  # refused before any work


def test_p13_the_finished_checkpoint_holds_the_best_epoch_and_is_marked_finished(
    train_data_dir: Path, tmp_path: Path
) -> None:
    """The best epoch is not the last here (the weights are zeroed after epoch 1): the final
    write must still hold epoch 1's weights, now marked finished."""
    train_set, test_set = _splits(train_data_dir)
    checkpoint = tmp_path / "baseline.pth.tar"

    def ruin(epoch: int, record: dict[str, float]) -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()

    torch.manual_seed(0)
    model = models.create("lenet300")
    result = train(
        model, train_set, test_set, recipe_for("fashion-mnist", epochs=3),
        checkpoint=checkpoint, checkpoint_meta={"dataset": "fashion-mnist"},
        max_batches=5, show_progress=False, on_epoch=ruin,
    )  # fmt: skip
    assert result.best is not None and result.best_epoch == 1
    entry = training_state(checkpoint)
    assert entry == {"finished": True, "epoch": 3, "epochs": 3, "best_epoch": 1, "max_batches": 5}
    require_finished(checkpoint)
    loaded, meta = load_model(checkpoint)
    assert meta["acc"] == result.best.accuracy and meta["dataset"] == "fashion-mnist"
    assert evaluate(loaded, test_set, show_progress=False).correct == result.best.correct


def test_p13_checkpoints_without_the_training_entry_pass(tmp_path: Path) -> None:
    """The released checkpoints (and any file `train` did not write) carry no entry."""
    assert training_state(LENET) is None
    require_finished(LENET)


@needs_train_split
def test_p13_reproduce_resume_never_reuses_an_interrupted_baseline(
    train_data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "rep"
    baseline = out / "baseline.pth.tar"
    args = ["reproduce", "lenet300", "--data-dir", train_data_dir, "--ratios", "0.5"]
    args += ["--criteria", "l1-norm", "--quiet", "--output", out, "--max-batches", "5"]
    victim = subprocess.Popen(
        _command(*args, "--epochs", "200"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not baseline.exists() and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        victim.send_signal(signal.SIGTERM)  # while it trains: after epoch 1's checkpoint
        rc = victim.wait(timeout=120)
    finally:
        if victim.poll() is None:
            victim.kill()
    stderr = victim.stderr.read().decode() if victim.stderr else ""
    assert rc == 143, (rc, stderr)
    entry = training_state(baseline)
    assert entry is not None and entry["finished"] is False and entry["epoch"] < 200
    before = baseline.read_bytes()

    resumed = subprocess.run(
        _command(*args, "--epochs", "200", "--resume", "--json"),
        env=_env(), capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    line = _one_error_line(resumed, 4)
    assert line == (
        f"neuron-merging: error: {baseline}: an unfinished training checkpoint (written after "
        f"epoch {entry['epoch']} of 200; the run that trained it was stopped), not a trained "
        "model; finish the training first (reproduce: --force trains a new baseline)"
    )
    assert baseline.read_bytes() == before
    assert not (out / "results.sqlite").exists()  # refused before the sweep began

    forced = subprocess.run(
        _command(*args, "--epochs", "2", "--force", "--json"),
        env=_env(), capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["trained"] is not None
    assert training_state(baseline) == {
        "finished": True, "epoch": 2, "epochs": 2,
        "best_epoch": json.loads(forced.stdout)["trained"]["best_epoch"], "max_batches": 5,
    }  # fmt: skip
    reused = subprocess.run(
        _command(*args, "--epochs", "2", "--resume", "--json"),
        env=_env(), capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert reused.returncode == 0, reused.stderr
    assert json.loads(reused.stdout)["trained"] is None  # a finished baseline is reused


@pytest.mark.parametrize(
    ("cfg", "num_classes", "message"),
    [
        ([100_000_000, 100_000_000], None, "holds 10,000,079,600,000,010 parameters and buffers"),
        ([10**20, 5], None, "its sizes are too large"),
        ([300, 100], 10**12, "parameters and buffers, more than the 1,073,741,824"),
    ],
)
def test_p13_a_model_too_large_to_train_is_refused_before_allocating(
    cfg: list[int], num_classes: int | None, message: str
) -> None:
    with pytest.raises(nm.ConfigError, match=re.escape(message)):
        create_for_training("lenet300", num_classes=num_classes, cfg=cfg)


def test_p13_create_for_training_builds_what_models_create_builds() -> None:
    """Same seed, same weights (the meta-device size check draws nothing from the RNG)."""
    for arch, cfg in (("lenet300", [30, 20]), ("resnet56", None)):
        torch.manual_seed(7)
        expected = models.create(arch, cfg=cfg).state_dict()
        torch.manual_seed(7)
        built = create_for_training(arch, cfg=cfg)
        assert built.state_dict().keys() == expected.keys()
        assert all(torch.equal(built.state_dict()[k], v) for k, v in expected.items())
        assert sum(p.numel() for p in built.parameters()) < MAX_TRAIN_ELEMENTS


def test_p13_train_refuses_a_model_over_the_limit_before_training(tmp_path: Path) -> None:
    with torch.device("meta"):  # shapes only: nothing allocated
        huge = models.create("lenet300", cfg=[100_000_000, 100_000_000])
    data = ArrayDataset(
        torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long), dataset_info("fashion-mnist")
    )
    checkpoint = tmp_path / "x.pth.tar"
    with pytest.raises(nm.ConfigError, match="more than the 1,073,741,824 a model may have"):
        train(huge, data, None, recipe_for("fashion-mnist", epochs=1), checkpoint=checkpoint,
              show_progress=False)  # fmt: skip
    assert list(tmp_path.iterdir()) == []
