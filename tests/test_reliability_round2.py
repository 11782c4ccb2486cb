"""Issue 11, sections 2 to 6: outputs never destroy anything, no silent wrong results,
bounded resources, the right error class, clear messages.

Each test is named after its defect (``test_dN_...``) and uses real parts: the
CLI runs in its own process, devices are real device nodes made with
``mknod``, signals are real signals, a full disk is a real (tiny) tmpfs. The
results store (section 1) is tested in ``test_reliability_store.py`` and the
download faults in ``test_download.py``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import neuron_merging as nm
from neuron_merging import models
from neuron_merging._io import atomic_write_text, check_output_file
from neuron_merging.checkpoint import load_model, save_checkpoint
from neuron_merging.core.config import MergeConfig
from neuron_merging.core.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    ModelError,
    OutputError,
)
from neuron_merging.data import ArrayDataset, dataset_info
from neuron_merging.data.cifar import read_cifar_batch
from neuron_merging.data.fashion_mnist import read_idx_images
from neuron_merging.training import recipe_for, train

SHARED = Path(__file__).resolve().parents[2] / "shared"
LENET = SHARED / "checkpoints" / "LeNet_300_100.original.300_100.bias.pth.tar"
FMNIST = SHARED / "data" / "FashionMNIST" / "raw"
CIFAR_TEST = SHARED / "data" / "cifar-10-batches-py" / "test_batch"
needs_lenet = pytest.mark.skipif(
    not (LENET.is_file() and (FMNIST / "t10k-images-idx3-ubyte").is_file()),
    reason=f"needs {LENET} and {FMNIST}",
)
needs_cifar = pytest.mark.skipif(not CIFAR_TEST.is_file(), reason=f"needs {CIFAR_TEST}")
is_root = os.geteuid() == 0
TIMEOUT = 300
PREFIX = "neuron-merging: error: "


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEURON_MERGING")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    env.update(extra)
    return env


def _command(*args: object) -> list[str]:
    return [sys.executable, "-m", "neuron_merging.cli", *map(str, args)]


def cli(*args: object, timeout: float = TIMEOUT, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(*args), env=_env(**env), capture_output=True, text=True, timeout=timeout
    )


def error_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The single stderr line of a failed run (checked: exit code, one line, no traceback)."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    return lines[0]


@pytest.fixture
def lenet(tmp_path: Path) -> Path:
    """A private copy of the released LeNet-300-100 (with its metadata written by us)."""
    if not LENET.is_file():
        pytest.skip(f"needs {LENET}")
    model, _ = load_model(LENET, arch="lenet300")
    path = tmp_path / "lenet.pth.tar"
    save_checkpoint(path, model, acc=None, arch="lenet300", dataset="fashion-mnist")
    return path


def _compress(checkpoint: Path, output: object, *extra: object) -> list[object]:
    return ["compress", "--checkpoint", checkpoint, "-r", "0.5", "--no-eval", "--quiet",
            "--output", output, *extra]  # fmt: skip


# --------------------------------------------------------------------------- D3


@pytest.mark.skipif(not is_root, reason="mknod needs root")
def test_d3_output_onto_a_device_node_is_refused(lenet: Path, tmp_path: Path) -> None:
    """D3: a private ``mknod c 1 7`` copy of /dev/full used to become a 506 KB zip."""
    device = tmp_path / "full"
    os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 7))
    line = error_line(cli(*_compress(lenet, device, "--force")), 6)
    assert line == f"{PREFIX}{device} exists and is a character device; refusing to replace it"
    assert stat.S_ISCHR(os.lstat(device).st_mode)


def test_d3_atomic_writes_follow_symlinks_keep_the_mode_and_refuse_fifos(tmp_path: Path) -> None:
    real = tmp_path / "real.txt"
    real.write_text("old")
    real.chmod(0o640)
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    atomic_write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"  # followed: the link stays a link
    assert stat.S_IMODE(real.stat().st_mode) == 0o640  # the replaced file keeps its mode
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="is a FIFO; refusing to replace it"):
        atomic_write_text(fifo, "x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link.txt", "real.txt"]


def test_d3_a_hard_link_is_never_broken_silently(tmp_path: Path) -> None:
    target = tmp_path / "model.pth.tar"
    target.write_bytes(b"x")
    os.link(target, tmp_path / "other-name.pth.tar")
    with pytest.raises(OutputError, match="has 2 hard links; replacing it would break them"):
        check_output_file(str(target))
    check_output_file(str(target), force=True)  # --force: replaced knowingly


# --------------------------------------------------------------------------- D4


@needs_lenet
def test_d4_compress_output_equal_to_the_checkpoint_is_refused(lenet: Path, tmp_path: Path) -> None:
    """D4: compress --output == --checkpoint replaced the released LeNet with its pruned version."""
    before = lenet.read_bytes()
    alias = tmp_path / "alias.pth.tar"
    alias.symlink_to(lenet)
    for output in (lenet, alias):
        line = error_line(cli(*_compress(lenet, output, "--force")), 6)
        assert (
            line == f"{PREFIX}--output {output} is the input file {lenet}; refusing to overwrite it"
        )
    assert lenet.read_bytes() == before


def test_d4_train_refuses_an_existing_checkpoint_without_force(tmp_path: Path) -> None:
    existing = tmp_path / "trained.pth.tar"
    existing.write_bytes(b"precious")
    line = error_line(cli("train", "--arch", "lenet300", "--output", existing, "--quiet"), 6)
    assert line == f"{PREFIX}--output {existing} exists; pass --force to overwrite it"
    assert existing.read_bytes() == b"precious"


# --------------------------------------------------------------------------- D21 / D22


@needs_lenet
@pytest.mark.parametrize(
    ("output", "code", "message"),
    [
        ("", 2, "--output is empty; give a directory name"),
        (
            "{tmp}/dir.pth.tar/",
            2,
            "--output {tmp}/dir.pth.tar/ ends with '/'; give a file name, not a folder",
        ),
        (
            "{tmp}/isdir.pth.tar",
            6,
            "{tmp}/isdir.pth.tar exists and is a directory; refusing to replace it",
        ),
        (
            "{tmp}/saved",
            6,
            "--output {tmp}/saved already holds a saved model; pass --force to replace it",
        ),
    ],
    ids=["empty", "trailing slash", "existing directory", "existing saved model"],
)
def test_d21_bad_output_names_are_refused_before_any_work(
    lenet: Path, tmp_path: Path, output: str, code: int, message: str
) -> None:
    (tmp_path / "isdir.pth.tar").mkdir()
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "manifest.json").write_text("{}")
    args = ["compress", "--checkpoint", lenet, "-r", "0.5", "--quiet", "--output"]
    result = cli(*args, output.format(tmp=tmp_path))  # with evaluation: it must not start
    assert error_line(result, code) == PREFIX + message.format(tmp=tmp_path)
    assert not (tmp_path / "dir").exists()


def test_d22_reproduce_rejects_a_bad_ratio_before_training(tmp_path: Path) -> None:
    """D22: ``reproduce --ratios 1.5`` used to train a baseline first."""
    out = tmp_path / "a" / "b"
    result = cli("reproduce", "lenet300", "--ratios", "1.5", "--output", out, "--quiet")
    assert error_line(result, 2) == f"{PREFIX}ratio must be in [0, 1), got 1.5"
    assert not (tmp_path / "a").exists()


def test_d22_a_failed_run_removes_the_folders_it_created(tmp_path: Path) -> None:
    output = tmp_path / "a" / "b" / "c" / "x.pth.tar"
    missing = tmp_path / "missing.pth.tar"
    result = cli(*_compress(missing, output))
    assert error_line(result, 4) == f"{PREFIX}{missing}: checkpoint file not found"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- D20


def _as_in_a_terminal() -> None:
    """Ctrl-C reaches the child even when these tests run as a background job (which starts
    with SIGINT ignored, and a CLI must leave an inherited ignore alone)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: list[object], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        _command(*args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=cwd, preexec_fn=_as_in_a_terminal,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("signum", "code", "line"),
    [
        (signal.SIGTERM, 143, "neuron-merging: terminated"),
        (signal.SIGINT, 130, "neuron-merging: interrupted"),
    ],
    ids=["SIGTERM", "SIGINT"],
)
def test_d20_an_early_signal_gives_one_line(
    signum: int, code: int, line: str, tmp_path: Path
) -> None:
    """D20: Ctrl-C while torch was being imported printed a traceback; SIGTERM printed nothing.

    The run (a missing checkpoint) ends soon after the import; when it has already ended
    as the signal is sent (exit 4), the signal came too late and the attempt is repeated.
    """
    missing = tmp_path / "x.pth.tar"
    for _attempt in range(10):
        proc = _start(["evaluate", "--checkpoint", missing], tmp_path)
        maps = Path(f"/proc/{proc.pid}/maps")
        deadline = time.monotonic() + TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if "libtorch" in maps.read_text():
                    break  # torch's libraries are being loaded: ``import torch`` is under way
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=TIMEOUT)
        if proc.returncode == 4 and err.strip() == f"{PREFIX}{missing}: checkpoint file not found":
            continue  # it finished before the signal arrived
        assert proc.returncode == code, err
        assert err.strip().splitlines() == [line] and out == ""
        return
    pytest.fail("the run always finished before the signal arrived")


@needs_lenet
def test_d20_sigterm_during_saves_leaves_no_temporary_file(lenet: Path, tmp_path: Path) -> None:
    """D20: SIGTERM during a save left ``.NAME.XXXX.tmp`` files behind."""
    data = tmp_path / "data"
    (data / "FashionMNIST").mkdir(parents=True)
    (data / "FashionMNIST" / "raw").symlink_to(FMNIST)
    out = tmp_path / "sweep"
    ratios = [f"{r / 100:.2f}" for r in range(5, 95, 5)]
    proc = _start(["sweep", "--checkpoint", lenet, "--data-dir", data, "--ratios", *ratios,
                   "--criteria", "l1-norm", "--output", out, "--quiet"], tmp_path)  # fmt: skip
    deadline = time.monotonic() + TIMEOUT
    while not (out / "results.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)  # the sweep has started saving, one set of files per record
    proc.send_signal(signal.SIGTERM)
    out_text, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "neuron-merging: terminated" and out_text == ""
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    json.loads((out / "results.json").read_text())  # what was saved is complete


@pytest.mark.parametrize("writer", ["atomic_write_text", "serialize._write_json"])
def test_d20_signal_as_the_temporary_file_is_made_leaves_nothing(
    writer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """D20: a Ctrl-C arriving just after the temporary file was created, before the code
    that removes it on failure was entered, left ``.NAME.XXXX.tmp`` behind."""
    from neuron_merging import _io, serialize

    real = tempfile.mkstemp

    def mkstemp_then_signal(*args: Any, **kwargs: Any) -> tuple[int, str]:
        made = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # a real signal, at the worst moment
        return made

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_signal)
    target = tmp_path / "out.json"
    done = threading.Event()  # another thread, which the kernel may hand the signal to
    other = threading.Thread(target=done.wait)
    other.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            if writer == "atomic_write_text":
                _io.atomic_write_text(target, "{}")
            else:
                serialize._write_json(target, {})
    finally:
        done.set()
        other.join()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- D6 / D7


@pytest.mark.parametrize("lr", ["nan", "inf", "-inf"])
def test_d6_a_non_finite_learning_rate_is_refused(lr: str, tmp_path: Path) -> None:
    """D6: ``train --lr nan`` used to write a checkpoint of NaN tensors with exit 0."""
    output = tmp_path / "x.pth.tar"
    result = cli("train", "--arch", "lenet300", f"--lr={lr}", "--output", output, "--quiet")
    assert error_line(result, 2) == f"{PREFIX}lr must be a positive finite number, got {float(lr)}"
    assert not output.exists()


@pytest.mark.parametrize("value", ["0", "-3"])
def test_d6_max_batches_below_one_is_refused(value: str, tmp_path: Path) -> None:
    result = cli("train", "--arch", "lenet300", "--max-batches", value, "--output", tmp_path / "x")
    line = error_line(result, 2)
    assert line.endswith(f"argument --max-batches: must be at least 1, got {value} (see --help)")


def test_d6_a_diverging_loss_stops_training_with_a_clear_error(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(
        torch.randn(64, 1, 28, 28, generator=g) * 1e3,
        torch.randint(0, 10, (64,), generator=g),
        dataset_info("fashion-mnist"),
    )
    torch.manual_seed(0)
    model = models.create("lenet300", cfg=[20, 10])
    recipe = recipe_for("fashion-mnist", epochs=3, lr=1e30, batch_size=16)
    with pytest.raises(ModelError, match=r"training diverged: the loss is (nan|inf) at epoch 1"):
        train(model, data, None, recipe, checkpoint=tmp_path / "x.pth.tar", show_progress=False)
    assert not (tmp_path / "x.pth.tar").exists()


@needs_lenet
def test_d7_an_empty_dataset_is_refused(lenet: Path, tmp_path: Path) -> None:
    """D7: 0 images were scored ``0/0 (0.00%)`` with exit 0."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-images-idx3-ubyte").write_bytes(np.array([2051, 0, 28, 28], ">i4").tobytes())
    (raw / "t10k-labels-idx1-ubyte").write_bytes(np.array([2049, 0], ">i4").tobytes())
    result = cli("evaluate", "--checkpoint", lenet, "--data-dir", tmp_path, "--quiet")
    assert error_line(result, 5) == f"{PREFIX}{raw}: the test split of fashion-mnist holds 0 images"


# --------------------------------------------------------------------------- D8 / D19


def _lenet_state(**change: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = models.create("lenet300").state_dict()
    for key, fn in change.items():
        state[key] = fn(state[key])
    return state


@pytest.mark.parametrize(
    ("name", "convert", "message"),
    [
        (
            "int64",
            lambda t: t.to(torch.int64),
            "tensor 'ip1.weight' is int64; weights must be floating point",
        ),
        (
            "uint8",
            lambda t: t.to(torch.uint8),
            "tensor 'ip1.weight' is uint8; weights must be floating point",
        ),
        (
            "bool",
            lambda t: t.to(torch.bool),
            "tensor 'ip1.weight' is bool; weights must be floating point",
        ),
        (
            "complex64",
            lambda t: t.to(torch.complex64),
            "tensor 'ip1.weight' is complex64; weights must be floating point",
        ),
        (
            "meta",
            lambda t: torch.empty_like(t, device="meta"),
            "tensor 'ip1.weight' is on the meta device: the file holds its shape but no data",
        ),
        (
            "sparse",
            lambda t: t.to_sparse(),
            "tensor 'ip1.weight' is sparse_coo; only dense tensors are supported",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else "",
)
def test_d8_d19_checkpoint_tensors_of_the_wrong_kind_are_refused(
    name: str, convert: Any, message: str, tmp_path: Path
) -> None:
    """D8: int/bool weights evaluated at 10 %; D19: meta/sparse tensors got a 7-line message."""
    path = tmp_path / f"{name}.pth"
    torch.save(_lenet_state(**{"ip1.weight": convert}), path)
    with pytest.raises(CheckpointError) as err:
        load_model(path, arch="lenet300")
    assert str(err.value) == f"{path}: {message}"
    result = cli("evaluate", "--arch", "lenet300", "--checkpoint", path)
    assert error_line(result, 4) == f"{PREFIX}{path}: {message}"  # no torch warning either


def _cifar_batch(labels: list[Any], n: int = 3) -> dict[bytes, Any]:
    return {b"data": np.zeros((n, 3072), np.uint8), b"labels": labels}


def test_d8_non_integer_cifar_labels_are_refused(tmp_path: Path) -> None:
    """D8: CIFAR labels 3.7 were truncated to 3."""
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(_cifar_batch([3.7, 1, 2]), protocol=2))
    with pytest.raises(DatasetError, match=r"is not a list of integers \(found float64 values\)"):
        read_cifar_batch(path, "cifar10")


@needs_lenet
@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        (
            "imagenet",
            "its metadata names dataset 'imagenet', which is not one of fashion-mnist, cifar10, cifar100; pass --dataset",
        ),
        (
            "cifar10",
            "lenet300 takes 1x28x28 inputs but the dataset 'cifar10' its metadata names has 3x32x32 images; pass --dataset",
        ),
    ],
    ids=["unknown dataset", "wrong dataset"],
)
def test_d14_d19_a_bad_dataset_in_the_metadata_says_so(
    dataset: str, message: str, tmp_path: Path
) -> None:
    model, _ = load_model(LENET, arch="lenet300")
    path = tmp_path / "meta.pth.tar"
    save_checkpoint(path, model, acc=None, arch="lenet300", dataset=dataset)
    assert error_line(cli("evaluate", "--checkpoint", path), 4) == f"{PREFIX}{path}: {message}"


# --------------------------------------------------------------------------- D9


@pytest.mark.parametrize(
    ("n", "ratio", "kept"),
    [(100, 0.8, 20), (100, 0.9, 10), (10, 0.9, 1), (5, 0.8, 1), (64, 0.7, 19)],
)
def test_d9_floor_rounding_is_exact(n: int, ratio: float, kept: int) -> None:
    """D9: float error kept 19 of 100 at r = 0.8 and raised "0 neurons" for 10 at 0.9."""
    assert MergeConfig(ratio=ratio, rounding="floor").kept_count(n) == kept


def test_d9_ten_neurons_at_ninety_percent_keep_one() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
    result = nm.merge(net, torch.zeros(1, 4), ratio=0.9, rounding="floor", threshold=None)
    assert result.model[0].out_features == 1


# --------------------------------------------------------------------------- D10


_HIGH_WATER = """import atexit, sys
def _report_peak():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                sys.stderr.write("\\nVmHWM " + line.split()[1] + "\\n")
atexit.register(_report_peak)
"""


def _peak_rss_mib(code: str) -> tuple[int, str, float]:
    """Run ``code`` in a fresh interpreter; return (exit code, stderr, its peak RSS in MiB).

    The peak is the interpreter's own ``VmHWM`` (reset by ``exec``), read at exit: the
    child's ``ru_maxrss`` would also count the pytest process it was forked from.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _HIGH_WATER + code], env=_env(), stderr=subprocess.PIPE, text=True
    )
    lines = proc.stderr.splitlines()
    peaks = [int(line.split()[1]) for line in lines if line.startswith("VmHWM ")]
    err = "\n".join(line for line in lines if not line.startswith("VmHWM "))
    return proc.returncode, err, (peaks[-1] / 1024 if peaks else float("inf"))


@needs_lenet
def test_d10_a_huge_cfg_in_the_metadata_is_refused_before_building(tmp_path: Path) -> None:
    """D10: ``cfg: [600000, 100]`` in a 1 MB checkpoint took 2.3 GB before "does not fit"."""
    model, _ = load_model(LENET, arch="lenet300")
    path = tmp_path / "huge-cfg.pth.tar"
    with pytest.raises(ConfigError, match="cannot describe"):  # never written by us
        save_checkpoint(path, model, acc=None, arch="lenet300", cfg=[600000, 100])
    payload = {"acc": None, "state_dict": model.state_dict(), "arch": "lenet300"}
    torch.save({**payload, "cfg": [600000, 100], "num_classes": 10}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert str(err.value) == (
        f"{path}: its metadata's cfg 600000, 100 does not match the widths of its tensors 300, 100"
    )
    code = f"from neuron_merging.checkpoint import load_model\nload_model({str(path)!r})"
    rc, stderr, peak = _peak_rss_mib(code)
    assert rc == 1 and "does not match the widths" in stderr
    assert peak < 1024, f"peak RSS {peak:.0f} MiB"  # the model of the metadata is 2.3 GB


def _gzip_with_trailing_zeros(path: Path, head: bytes, zeros: int) -> None:
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip container
    with open(path, "wb") as out:
        out.write(packer.compress(head))
        block = bytes(1 << 24)
        for _ in range(zeros // len(block)):
            out.write(packer.compress(block))
        out.write(packer.flush())


@pytest.mark.slow
def test_d10_a_gzip_with_gigabytes_of_trailing_zeros_is_refused_in_bounded_memory(
    tmp_path: Path,
) -> None:
    """D10: a valid header and 3 GiB of trailing zeros reached 6.55 GB before "too long"."""
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    images = np.zeros((10000, 28, 28), np.uint8)
    _gzip_with_trailing_zeros(
        path, np.array([2051, 10000, 28, 28], ">i4").tobytes() + images.tobytes(), 3 << 30
    )
    code = f"from neuron_merging.data.fashion_mnist import read_idx_images\nread_idx_images({str(path)!r})"
    rc, stderr, peak = _peak_rss_mib(code)
    assert rc == 1 and "the file is too long" in stderr, stderr
    assert peak < 1024, f"peak RSS {peak:.0f} MiB"


def test_d10_trailing_data_in_a_gzip_is_too_long(tmp_path: Path) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    head = np.array([2051, 2, 28, 28], ">i4").tobytes() + bytes(2 * 784)
    path.write_bytes(gzip.compress(head + bytes(10_000)))
    with pytest.raises(DatasetError) as err:
        read_idx_images(path)
    assert str(err.value) == (
        f"{path}: holds more than the 1584 bytes its header declares (dims 2x28x28); the file is too long"
    )


def test_d10_a_2_gib_idx_with_a_wrong_magic_is_refused_unread(tmp_path: Path) -> None:
    """D10: a 2 GiB IDX file was read whole to reject its magic number."""
    path = tmp_path / "t10k-images-idx3-ubyte"
    with open(path, "wb") as out:
        out.write(np.array([2049, 10000, 28, 28], ">i4").tobytes())
        out.truncate(2 << 30)  # sparse: 2 GiB on paper, no disk space used
    code = f"from neuron_merging.data.fashion_mnist import read_idx_images\nread_idx_images({str(path)!r})"
    rc, stderr, peak = _peak_rss_mib(code)
    assert rc == 1 and "wrong IDX magic number 2049 (expected 2051" in stderr, stderr
    assert peak < 1024, f"peak RSS {peak:.0f} MiB"


# --------------------------------------------------------------------------- D13


@needs_lenet
def test_d13_a_full_disk_is_an_output_error(lenet: Path, tiny_disk: Path) -> None:
    """D13: a full disk gave exit 70 ``RuntimeError: [enforce fail at inline_container.cc]``."""
    output = tiny_disk / "x.pth.tar"
    assert (
        error_line(cli(*_compress(lenet, output)), 6)
        == f"{PREFIX}No space left on device ({output})"
    )
    assert sorted(p.name for p in tiny_disk.iterdir()) == []


# --------------------------------------------------------------------------- D14 / D15


@needs_lenet
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("evaluate", "--arch", "lenet300", "--checkpoint", LENET, "--dataset", "cifar10"),
            "lenet300 takes 1x28x28 inputs but cifar10 images are 3x32x32; use lenet300 with fashion-mnist",
        ),
        (
            ("train", "--arch", "vgg16", "--dataset", "fashion-mnist", "--output", "{tmp}/x"),
            "vgg16 takes 3x32x32 inputs but fashion-mnist images are 1x28x28; use vgg16 with cifar10, cifar100",
        ),
    ],
    ids=["evaluate lenet300 on cifar10", "train vgg16 on fashion-mnist"],
)
def test_d14_an_architecture_that_does_not_fit_the_dataset(
    args: tuple[object, ...], message: str, tmp_path: Path
) -> None:
    """D14: these gave exit 70 with a shape error from inside the model."""
    words = [str(a).format(tmp=tmp_path) for a in args]
    assert error_line(cli(*words), 2) == PREFIX + message


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ("--cfg", "10", "abc"),
            f"{PREFIX}--cfg: 'abc' is not a layer width (a positive integer, or M)",
        ),
        (
            ("--cfg", "10.5", "5"),
            f"{PREFIX}--cfg: '10.5' is not a layer width (a positive integer, or M)",
        ),
        (
            ("--seed", str(2**70)),
            f"neuron-merging train: error: argument --seed: seed must be in [0, 2**63), got {2**70} (see --help)",
        ),
    ],
    ids=["cfg abc", "cfg 10.5", "seed 2**70"],
)
def test_d15_bad_numbers_are_configuration_errors(
    extra: tuple[str, ...], message: str, tmp_path: Path
) -> None:
    result = cli("train", "--arch", "lenet300", "--output", tmp_path / "x.pth.tar", *extra)
    assert result.returncode == 2 and result.stderr.strip() == message, result.stderr


# --------------------------------------------------------------------------- D17 / D18


@needs_lenet
def test_d17_a_tilde_user_that_cannot_be_expanded(lenet: Path) -> None:
    """D17: ``~nosuchuser`` in --data-dir or $NEURON_MERGING_DATA gave exit 70."""
    result = cli("evaluate", "--checkpoint", lenet, "--data-dir", "~nosuchuser42/data")
    assert error_line(result, 2) == (
        f"{PREFIX}--data-dir '~nosuchuser42/data': cannot expand '~nosuchuser42' "
        "(no such user or no home directory)"
    )
    result = cli("evaluate", "--checkpoint", lenet, NEURON_MERGING_DATA="~nosuchuser42")
    assert error_line(result, 2) == (
        f"{PREFIX}$NEURON_MERGING_DATA '~nosuchuser42': cannot expand '~nosuchuser42' "
        "(no such user or no home directory)"
    )


@needs_lenet
def test_d18_over_long_input_names_are_input_errors(lenet: Path, tmp_path: Path) -> None:
    """D18: these were reported as exit 6, "output cannot be written"."""
    long = tmp_path / ("x" * 300)
    result = cli("evaluate", "--arch", "lenet300", "--checkpoint", long)
    assert error_line(result, 4) == f"{PREFIX}{long}: cannot read checkpoint: File name too long"
    result = cli("evaluate", "--checkpoint", lenet, "--data-dir", long)
    assert error_line(result, 5).startswith(
        f"{PREFIX}{long}/FashionMNIST/raw/t10k-images-idx3-ubyte: cannot read: File name too long"
    )


@pytest.mark.skipif(is_root, reason="root reads files of mode 000")
def test_d18_an_unreadable_data_file_is_not_reported_as_missing(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"x")
        (raw / name).chmod(0)
    from neuron_merging.data import load_dataset

    with pytest.raises(DatasetError, match="exists but is not readable"):
        load_dataset("fashion-mnist", "test", tmp_path)


# --------------------------------------------------------------------------- D23 / D25


@needs_lenet
def test_d23_json_output_has_null_for_nan(tmp_path: Path) -> None:
    """D23: ``--json`` printed ``"loss": NaN``, which is not JSON."""
    model, _ = load_model(LENET, arch="lenet300")
    with torch.no_grad():
        model.ip3.weight.mul_(3e38)  # logits overflow to ±inf: the loss is NaN
    path = tmp_path / "overflow.pth.tar"
    save_checkpoint(path, model, acc=None, dataset="fashion-mnist")
    data = tmp_path / "data"
    (data / "FashionMNIST").mkdir(parents=True)
    (data / "FashionMNIST" / "raw").symlink_to(FMNIST)
    result = cli("evaluate", "--checkpoint", path, "--data-dir", data, "--json", "--quiet")
    assert result.returncode == 0, result.stderr

    def refuse(constant: str) -> None:
        raise AssertionError(f"stdout holds {constant}, which is not JSON")

    assert json.loads(result.stdout, parse_constant=refuse)["loss"] is None


def test_d25_debug_keeps_the_exit_code(tmp_path: Path) -> None:
    """D25: ``--debug`` turned every exit code into 1."""
    missing = tmp_path / "missing.pth.tar"
    result = cli("evaluate", "--arch", "lenet300", "--checkpoint", missing, "--debug")
    assert result.returncode == 4
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"{PREFIX}{missing}: checkpoint file not found"


# --------------------------------------------------------------------------- D24


def _net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: nm.merge(_net(), 5),
            ConfigError,
            "example_inputs must be a tensor, a tuple of tensors or a mapping of keyword inputs, got int",
        ),
        (
            lambda: nm.merge(_net(), torch.zeros(1, 4), exclude=5),
            ConfigError,
            "exclude must be a list of layer names, got 5",
        ),
        (
            lambda: nm.merge(_net(), torch.zeros(1, 4), exclude="0"),
            ConfigError,
            "exclude must be a list of layer names, not a single string (use exclude=['0'])",
        ),
        (
            lambda: nm.prune(_net(), torch.zeros(1, 4), criterion=lambda rows: [1.0] * len(rows)),
            ConfigError,
            "criterion returned a list; it must return a tensor of 8 scores",
        ),
        (
            lambda: nm.merge(_net().to("meta"), torch.zeros(1, 4)),
            ModelError,
            "parameter '0.weight' is on the meta device (it holds no data); load real weights before compressing",
        ),
    ],
    ids=["example_inputs=5", "exclude=5", "exclude='0'", "criterion returns a list", "meta model"],
)
def test_d24_bad_library_input_raises_neuron_merging_errors(
    call: Any, error: type, message: str
) -> None:
    with pytest.raises(error) as err:
        call()
    assert str(err.value) == message


# --------------------------------------------------------------------------- D26


@needs_cifar
def test_d26_a_cifar_batch_repickled_with_protocol_5_loads(tmp_path: Path) -> None:
    """D26: protocol 5 was refused as "forbidden global numpy._core.numeric._frombuffer"."""
    images, labels = read_cifar_batch(CIFAR_TEST, "cifar10")
    with open(CIFAR_TEST, "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")  # the genuine file, trusted here
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(batch, protocol=5))
    again, again_labels = read_cifar_batch(path, "cifar10")
    assert np.array_equal(again, images) and np.array_equal(again_labels, labels)


@pytest.mark.parametrize("protocol", [2, 5])
def test_d26_an_empty_batch_is_not_called_an_attack(protocol: int, tmp_path: Path) -> None:
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((0, 3072), np.uint8), b"labels": [],
                                   b"batch_label": b""}, protocol=protocol))  # fmt: skip
    images, labels = read_cifar_batch(path, "cifar10")
    assert images.shape == (0, 3, 32, 32) and labels.shape == (0,)


def test_d26_code_execution_is_still_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("true",))

    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=5))
    with pytest.raises(DatasetError, match=r"forbidden global posix\.system"):
        read_cifar_batch(path, "cifar10")


def test_d12_a_killed_writes_temporary_file_is_removed_by_the_next_write(tmp_path: Path) -> None:
    """D12/D20: stale temp files of a dead writer are cleaned; a live writer's are left alone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / f".model.pth.tar.{int(dead.stdout)}.k1ll3d.tmp"
    live = tmp_path / f".model.pth.tar.{os.getpid()}.inflight.tmp"
    for path in (stale, live):
        path.write_bytes(b"partial")
    atomic_write_text(tmp_path / "model.pth.tar", "done")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "model.pth.tar"]


@needs_lenet
def test_reproduce_never_retrains_over_a_baseline_it_holds(tmp_path: Path) -> None:
    """A second ``reproduce`` into a folder with a trained baseline used to overwrite it."""
    out = tmp_path / "out"
    out.mkdir()
    baseline = out / "baseline.pth.tar"
    shutil.copyfile(LENET, baseline)
    before = baseline.read_bytes()
    args = ["reproduce", "lenet300", "--output", out, "--data-dir", FMNIST.parent.parent]
    args += ["--ratios", "0.5", "--criteria", "l1-norm", "--quiet"]
    result = cli(*args)
    assert error_line(result, 6) == (
        f"{PREFIX}{baseline} holds a baseline trained earlier; pass --resume to reuse it, "
        "--force to train a new one over it, or choose another --output"
    )
    assert baseline.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["baseline.pth.tar"]
    result = cli(*args, "--resume")  # reused: no training, the sweep runs on it
    assert result.returncode == 0, result.stderr
    assert "| baseline | 266,610 | 89.80 | — |" in result.stdout
    assert "| 50% | 125,810 | 88.40 | 88.69 |" in result.stdout
    assert baseline.read_bytes() == before
    if (FMNIST / "train-images-idx3-ubyte").exists() or (
        FMNIST / "train-images-idx3-ubyte.gz"
    ).exists():
        result = cli(*args, "--force", "--epochs", "1", "--max-batches", "2")
        assert result.returncode == 0, result.stderr
        assert baseline.read_bytes() != before  # a new baseline, trained on purpose


def test_d12_a_killed_saves_weights_temporary_is_removed_by_the_next_save(tmp_path: Path) -> None:
    """The serializer's weights file is written through the same temporary files as every
    other write: a dead saver's leftover goes at the next save, a live writer's stays."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    out = tmp_path / "saved"
    out.mkdir()
    stale = out / f".weights.safetensors.{int(dead.stdout)}.k1ll3d.tmp"
    live = out / f".weights.safetensors.{os.getpid()}.inflight.tmp"
    for path in (stale, live):
        path.write_bytes(b"partial")
    nm.save(nm.merge(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
                     torch.randn(1, 4), ratio=0.5), out)  # fmt: skip
    names = sorted(p.name for p in out.iterdir())
    assert live.name in names and stale.name not in names
    assert not [n for n in names if n.endswith(".tmp") and n != live.name]
