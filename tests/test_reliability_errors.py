"""Every bad input gets one clear line, a documented exit code, and never runs code.

Each case below is checked twice:

* through the library: the documented exception type, with a message naming the
  argument, layer, parameter or file;
* through the command line, in a real subprocess: the documented exit code,
  nothing on stdout, no traceback, and exactly one stderr line, which for
  library errors is ``neuron-merging: error: `` followed by the library's message.

The bad files are written here (tiny LeNet/ResNet checkpoints, IDX files and
CIFAR pickles), so nothing needs the shared data. The malicious files plant a
payload that would create a marker file; the tests prove the marker never
appears. ``docs/reliability.md`` lists these cases with the messages they print.

Bad inputs already proven elsewhere are not repeated here: see the table in
``docs/reliability.md`` (``test_cli.py::test_cli_errors``, ``test_api_config.py``,
``test_core_edge_cases.py``, ``test_core_groups.py``, ``test_checkpoint.py``,
``test_data.py``).

Each command line runs in its own process, forked from one driver that imports
the CLI once (see ``run_cli``); each uses one intra-op thread.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import neuron_merging as nm
from neuron_merging import cli, models
from neuron_merging.checkpoint import load_model, save_checkpoint
from neuron_merging.core.config import MergeConfig
from neuron_merging.data import load_dataset
from neuron_merging.experiments import compression_config, example_input, run_sweep

TIMEOUT = 300
WORKERS = max(2, min(4, os.cpu_count() or 1))
PREFIX = "neuron-merging: error: "


# --------------------------------------------------------------------------- bad files


class ExecPayload:
    """Unpickling this runs ``exec(code)``: classic pickle code injection."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple:
        return (builtins.exec, (self.code,))


class SystemPayload:
    """Unpickling this runs a shell command through ``os.system``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def _touch_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def _idx(path: Path, magic: int, dims: tuple[int, ...], data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(f">{1 + len(dims)}i", magic, *dims) + data)


def _fashion(folder: Path, n_images: int = 4, n_labels: int = 4) -> tuple[Path, Path]:
    images = folder / "t10k-images-idx3-ubyte"
    labels = folder / "t10k-labels-idx1-ubyte"
    _idx(images, 2051, (n_images, 28, 28), bytes(n_images * 28 * 28))
    _idx(labels, 2049, (n_labels,), bytes(n_labels))
    return images, labels


def _cifar_batch(root: Path, obj: object) -> Path:
    path = root / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


def make_bad_inputs(root: Path) -> None:
    """Write every bad file of the cases into ``root`` (also used to regenerate the docs)."""
    for folder in ("home", "cache", "nodata"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    lenet = models.create("lenet300")
    save_checkpoint(root / "good.pth.tar", lenet, acc=None, dataset="fashion-mnist")

    # Checkpoints.
    (root / "empty.pth.tar").write_bytes(b"")
    data = (root / "good.pth.tar").read_bytes()
    (root / "truncated.pth.tar").write_bytes(data[: len(data) // 2])
    wide = {k: v.clone() for k, v in lenet.state_dict().items()}
    wide["ip1.weight"] = torch.zeros(300, 3 * 32 * 32)  # a LeNet for 32x32 RGB input
    torch.save(wide, root / "wide.pth.tar")
    (root / "evil.pth.tar").write_bytes(
        pickle.dumps(ExecPayload(_touch_code(root / "pwned-pickle")))
    )
    evil = {
        "acc": 99.0,
        "state_dict": lenet.state_dict(),
        "x": SystemPayload(f"touch {root / 'pwned-torch'}"),
    }
    torch.save(evil, root / "evil-torch.pth.tar")

    # Model contents.
    nan = models.create("lenet300")
    with torch.no_grad():
        nan.ip2.weight[3, 7] = float("nan")
    save_checkpoint(root / "nan.pth.tar", nan, acc=None, dataset="fashion-mnist")
    resnet = models.create("resnet56", cfg=[4, 8, 16])
    # A CIFAR model for the CIFAR dataset rows (a LeNet does not take CIFAR images).
    save_checkpoint(root / "good-cifar.pth.tar", resnet, acc=None, dataset="cifar10")
    with torch.no_grad():
        resnet.layer2[3].bn1.running_var[1] = float("inf")
    save_checkpoint(root / "inf-bn.pth.tar", resnet, acc=None, dataset="cifar10")
    save_checkpoint(root / "degenerate.pth.tar", degenerate_resnet(), acc=None, dataset="cifar10")

    # Datasets.
    images, _ = _fashion(root / "fm-truncated")
    images.write_bytes(images.read_bytes()[:-100])
    images, _ = _fashion(root / "fm-magic")
    _idx(images, 2049, (4, 28, 28), bytes(4 * 28 * 28))
    _fashion(root / "fm-count", n_images=5, n_labels=6)
    batch = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
    path = _cifar_batch(root / "cifar-truncated", batch)
    path.write_bytes(path.read_bytes()[:-20])
    _cifar_batch(root / "cifar-evil", ExecPayload(_touch_code(root / "pwned-dataset")))

    # Output.
    (root / "a_file").write_text("a regular file, not a directory\n")


def degenerate_resnet() -> nn.Module:
    """A small ResNet-56 with zero-norm filters, γ = 0 and zero running variances."""
    torch.manual_seed(1)
    model = models.create("resnet56", cfg=[4, 8, 16]).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=g) + 0.5)
                module.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        for i, block in enumerate([*model.layer1, *model.layer2, *model.layer3]):
            block.conv1.weight[i % 2] = 0.0  # a zero-norm filter
            block.bn1.weight[1 + i % 3] = 0.0  # γ = 0
            block.bn1.running_var[(2 + i) % 4] = 0.0  # zero running variance
    return model


def _all_finite(tensors: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


# --------------------------------------------------------------------------- cases


def _lenet_input() -> torch.Tensor:
    return example_input("lenet300")


def _load(root: Path, name: str, arch: str | None = None) -> nn.Module:
    return load_model(root / name, arch=arch)[0]


@dataclass(frozen=True)
class Case:
    """One bad input.

    ``argv`` and ``line`` may use ``{root}`` (the folder of the bad files); in
    ``line``, ``...`` matches anything (text from torch or argparse that varies
    between versions). ``library`` raises the error through the Python API;
    ``cli_message`` says whether the CLI line is ``PREFIX`` + the library message.
    """

    row: str
    argv: str
    code: int
    line: str
    library: Callable[[Path], object] | None = None
    error: type[Exception] = nm.NeuronMergingError
    cli_message: bool = True
    marker: str | None = None
    extra_lines: bool = False


GOOD = "--checkpoint {root}/good.pth.tar"
COMPRESS = f"compress {GOOD} --no-eval --quiet"

CASES: dict[str, Case] = {
    # Arguments and configuration.
    "ratio outside [0, 1)": Case(
        "arguments",
        f"{COMPRESS} -r -0.1",
        2,
        PREFIX + "ratio must be in [0, 1), got -0.1",
        lambda root: nm.merge(_load(root, "good.pth.tar"), _lenet_input(), ratio=-0.1),
        nm.ConfigError,
    ),
    "ratio leaves a layer with 0 neurons": Case(
        "arguments",
        f"{COMPRESS} -t prune -r 0.999",
        2,
        PREFIX + "ratio 0.999 leaves layer 'ip1' with 0 of 300 neurons",
        lambda root: nm.prune(_load(root, "good.pth.tar"), _lenet_input(), ratio=0.999),
        nm.ConfigError,
    ),
    "unknown criterion": Case(
        "arguments",
        f"{COMPRESS} -r 0.5 -c l3-norm",
        2,
        "neuron-merging compress: error: argument -c/--criterion: invalid choice: 'l3-norm' "
        "(choose from ...) (see --help)",
        lambda root: nm.merge(nn.Linear(2, 2), criterion="l3-norm"),
        nm.ConfigError,
        cli_message=False,
    ),
    "unknown bn_rule": Case(
        "arguments",
        f"{COMPRESS} -r 0.5 --bn-rule fast",
        2,
        "neuron-merging compress: error: argument --bn-rule: invalid choice: 'fast' "
        "(choose from ...) (see --help)",
        lambda root: MergeConfig(bn_rule="fast"),
        nm.ConfigError,
        cli_message=False,
    ),
    "unknown preset": Case(
        "arguments",
        f"{COMPRESS} -r 0.5 --preset bogus",
        2,
        "neuron-merging compress: error: argument --preset: invalid choice: 'bogus' "
        "(choose from ...) (see --help)",
        lambda root: compression_config(
            "lenet300", "fashion-mnist", "merge", "l1-norm", 0.5, preset="bogus"
        ),
        nm.ConfigError,
        cli_message=False,
    ),
    "threshold outside [-1, 1]": Case(
        "arguments",
        f"{COMPRESS} -r 0.5 --threshold 1.5",
        2,
        PREFIX + "threshold must be None or in [-1, 1], got 1.5",
        lambda root: nm.merge(_load(root, "good.pth.tar"), _lenet_input(), threshold=1.5),
        nm.ConfigError,
    ),
    "λ outside [0, 1]": Case(
        "arguments",
        f"{COMPRESS} -r 0.5 --lam 1.5",
        2,
        PREFIX + "lam (λ) must be in [0, 1], got 1.5",
        lambda root: nm.merge(_load(root, "good.pth.tar"), _lenet_input(), lam=1.5),
        nm.ConfigError,
    ),
    # Model contents.
    "NaN in a weight": Case(
        "model",
        "compress --checkpoint {root}/nan.pth.tar -r 0.5 --no-eval --quiet",
        3,
        PREFIX + "parameter 'ip2.weight' contains NaN or Inf; refusing to compress",
        lambda root: nm.merge(_load(root, "nan.pth.tar"), _lenet_input()),
        nm.ModelError,
    ),
    "Inf in a batch-norm statistic": Case(
        "model",
        "compress --checkpoint {root}/inf-bn.pth.tar -r 0.5 --no-eval --quiet",
        3,
        PREFIX + "buffer 'layer2.3.bn1.running_var' contains NaN or Inf; refusing to compress",
        lambda root: nm.prune(_load(root, "inf-bn.pth.tar"), example_input("resnet56")),
        nm.ModelError,
    ),
    # Checkpoints.
    "empty checkpoint": Case(
        "checkpoint",
        "evaluate --arch lenet300 --checkpoint {root}/empty.pth.tar --quiet",
        4,
        PREFIX + "{root}/empty.pth.tar: checkpoint file is empty",
        lambda root: _load(root, "empty.pth.tar", "lenet300"),
        nm.CheckpointError,
    ),
    "truncated checkpoint": Case(
        "checkpoint",
        "evaluate --checkpoint {root}/truncated.pth.tar --quiet",
        4,
        PREFIX + "{root}/truncated.pth.tar: is truncated or not a PyTorch checkpoint (...)",
        lambda root: _load(root, "truncated.pth.tar"),
        nm.CheckpointError,
    ),
    "checkpoint of the wrong width": Case(
        "checkpoint",
        "evaluate --arch lenet300 --checkpoint {root}/wide.pth.tar --quiet",
        4,
        PREFIX + "{root}/wide.pth.tar: does not fit architecture 'lenet300': size mismatches "
        "(1): ip1.weight: file (300, 3072) vs model (300, 784)",
        lambda root: _load(root, "wide.pth.tar", "lenet300"),
        nm.CheckpointError,
    ),
    "malicious pickle checkpoint": Case(
        "checkpoint",
        "evaluate --arch lenet300 --checkpoint {root}/evil.pth.tar --quiet",
        4,
        PREFIX + "{root}/evil.pth.tar: refused as unsafe: it references Python objects "
        "(builtins.exec) that a weights-only load does not allow; nothing in it was executed. "
        "Only load it without weights_only if you fully trust its source.",
        lambda root: _load(root, "evil.pth.tar", "lenet300"),
        nm.CheckpointError,
        marker="pwned-pickle",
    ),
    "malicious torch.save checkpoint": Case(
        "checkpoint",
        "evaluate --arch lenet300 --checkpoint {root}/evil-torch.pth.tar --quiet",
        4,
        PREFIX + "{root}/evil-torch.pth.tar: refused as unsafe: it references Python objects "
        "(...system) that a weights-only load does not allow; nothing in it was executed. "
        "Only load it without weights_only if you fully trust its source.",
        lambda root: _load(root, "evil-torch.pth.tar", "lenet300"),
        nm.CheckpointError,
        marker="pwned-torch",
    ),
    # Datasets.
    "missing data directory": Case(
        "dataset",
        f"evaluate {GOOD} --dataset fashion-mnist --data-dir {{root}}/nonexistent --quiet",
        5,
        PREFIX + "fashion-mnist (test split) not found. Looked for "
        "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] in:",
        lambda root: load_dataset("fashion-mnist", "test", root / "nonexistent"),
        nm.DatasetError,
        extra_lines=True,
    ),
    "truncated IDX file": Case(
        "dataset",
        f"evaluate {GOOD} --data-dir {{root}}/fm-truncated --quiet",
        5,
        PREFIX + "{root}/fm-truncated/t10k-images-idx3-ubyte: file size 3052 bytes does not "
        "match its header (dims 4x28x28 need 3152 bytes); the file is truncated",
        lambda root: load_dataset("fashion-mnist", "test", root / "fm-truncated"),
        nm.DatasetError,
    ),
    "wrong IDX magic number": Case(
        "dataset",
        f"evaluate {GOOD} --data-dir {{root}}/fm-magic --quiet",
        5,
        PREFIX + "{root}/fm-magic/t10k-images-idx3-ubyte: wrong IDX magic number 2049 "
        "(expected 2051 for a uint8 image file)",
        lambda root: load_dataset("fashion-mnist", "test", root / "fm-magic"),
        nm.DatasetError,
    ),
    "image/label count mismatch": Case(
        "dataset",
        f"evaluate {GOOD} --data-dir {{root}}/fm-count --quiet",
        5,
        PREFIX + "{root}/fm-count/t10k-images-idx3-ubyte holds 5 images but "
        "{root}/fm-count/t10k-labels-idx1-ubyte holds 6 labels; the counts must be equal",
        lambda root: load_dataset("fashion-mnist", "test", root / "fm-count"),
        nm.DatasetError,
    ),
    "truncated pickle": Case(
        "dataset",
        "evaluate --checkpoint {root}/good-cifar.pth.tar --dataset cifar10 "
        "--data-dir {root}/cifar-truncated --quiet",
        5,
        PREFIX + "{root}/cifar-truncated/cifar-10-batches-py/test_batch: corrupt or truncated "
        "pickle (...)",
        lambda root: load_dataset("cifar10", "test", root / "cifar-truncated"),
        nm.DatasetError,
    ),
    "malicious dataset pickle": Case(
        "dataset",
        "evaluate --checkpoint {root}/good-cifar.pth.tar --dataset cifar10 "
        "--data-dir {root}/cifar-evil --quiet",
        5,
        PREFIX + "{root}/cifar-evil/cifar-10-batches-py/test_batch: refusing to load: the file "
        "tried to load the forbidden global __builtin__.exec (only numpy array data is allowed "
        "in dataset pickles)",
        lambda root: load_dataset("cifar10", "test", root / "cifar-evil"),
        nm.DatasetError,
        marker="pwned-dataset",
    ),
    # Output.
    "unwritable output directory": Case(
        "output",
        f"sweep {GOOD} --ratios 0.5 --output {{root}}/a_file/sweep --quiet",
        6,
        PREFIX + "cannot write to {root}/a_file/sweep: Not a directory",
        lambda root: run_sweep(
            _load(root, "good.pth.tar"),
            "lenet300",
            "fashion-mnist",
            None,  # type: ignore[arg-type]  # never reached
            criteria=["l1-norm"],
            ratios=[0.5],
            output_dir=root / "a_file" / "sweep",
            show_progress=False,
        ),
        nm.OutputError,
    ),
}

#: A bad model that must *succeed*: zero-norm filters, γ = 0 and zero running variances.
DEGENERATE_ARGV = (
    "compress --checkpoint {root}/degenerate.pth.tar -r 0.5 --threshold none --bn-rule paper "
    "--no-eval --quiet --output {root}/degenerate-out.pth.tar"
)


def isolated_env(root: Path) -> dict[str, str]:
    """One thread, UTF-8, and no data or checkpoint found outside ``root``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEURON_MERGING")}
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONIOENCODING="utf-8",
        HOME=str(root / "home"),
        XDG_CACHE_HOME=str(root / "cache"),
        NEURON_MERGING_DATA=str(root / "nodata"),
    )
    return env


#: Runs each command line in its own forked process: a fresh interpreter per command
#: would spend most of the time importing torch, so one driver process imports the
#: CLI once and forks a child per command. Each child runs ``neuron_merging.cli.main``
#: exactly as the console script does (``sys.exit(main())``), with its own stdout and
#: stderr files, and its exit status is the command's. At most WORKERS run at once.
_DRIVER = r"""
import json, os, sys, traceback
import neuron_merging.cli as cli
import neuron_merging.core.api, neuron_merging.checkpoint, neuron_merging.data
import neuron_merging.experiments, neuron_merging.training

jobs, workers = json.load(sys.stdin), int(sys.argv[1])
running, codes = {}, {}

def reap():
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)

for name, argv, out, err in jobs:
    while len(running) >= workers:
        reap()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
            os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            try:
                code = cli.main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    running[pid] = name
while running:
    reap()
json.dump(codes, sys.stdout)
"""


def run_cli(commands: Mapping[str, str], root: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run ``neuron-merging ARGV`` for every ``{name: argv}`` (``{root}`` substituted)."""
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    jobs = [
        (name, argv.format(root=root).split(), str(logs / f"{i}.out"), str(logs / f"{i}.err"))
        for i, (name, argv) in enumerate(commands.items())
    ]
    driver = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(WORKERS)],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=isolated_env(root),
    )
    assert driver.returncode == 0, driver.stderr
    codes = json.loads(driver.stdout)
    return {
        name: subprocess.CompletedProcess(
            argv,
            codes[name],
            Path(out).read_text(encoding="utf-8"),
            Path(err).read_text(encoding="utf-8"),
        )
        for name, argv, out, err in jobs
    }


def line_pattern(line: str, root: Path) -> re.Pattern[str]:
    """``line`` with ``{root}`` substituted and ``...`` matching anything."""
    parts = line.replace("{root}", str(root)).split("...")
    return re.compile(".*".join(re.escape(p) for p in parts), re.DOTALL)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bad-inputs")
    make_bad_inputs(folder)
    return folder


@pytest.fixture(scope="module")
def runs(root: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """The result of every command line of this module (run together, see ``run_cli``)."""
    commands = {"degenerate": DEGENERATE_ARGV} | {name: c.argv for name, c in CASES.items()}
    return run_cli(commands, root)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_through_the_library(root: Path, name: str) -> None:
    case = CASES[name]
    assert case.library is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(case.error) as info:
            case.library(root)
    assert type(info.value).exit_code == case.code
    message = str(info.value)
    if case.cli_message:
        assert line_pattern(case.line.removeprefix(PREFIX), root).fullmatch(
            message.splitlines()[0]
        ), message
    if case.marker:
        assert not (root / case.marker).exists(), "the payload ran"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_through_the_cli(
    root: Path, runs: dict[str, subprocess.CompletedProcess[str]], name: str
) -> None:
    case = CASES[name]
    result = runs[name]
    assert result.returncode == case.code, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines, "no message on stderr"
    assert line_pattern(case.line, root).fullmatch(lines[0]), lines[0]
    if case.extra_lines:  # only the dataset search lists the places it looked, one per line
        assert all(line.startswith(("  - ", "To get the data:")) for line in lines[1:]), lines
        assert str(root / "nonexistent") in result.stderr
    else:
        assert len(lines) == 1, result.stderr
    if case.marker:
        assert not (root / case.marker).exists(), "the payload ran"


def test_the_planted_payloads_really_run_when_unpickled_naively(tmp_path: Path) -> None:
    """Positive control: the payloads of the malicious files do execute under plain pickle."""
    marker = tmp_path / "exec"
    pickle.loads(pickle.dumps(ExecPayload(_touch_code(marker))))
    assert marker.exists()
    marker = tmp_path / "system"
    assert pickle.loads(pickle.dumps(SystemPayload(f"touch {marker}"))) == 0
    assert marker.exists()


def test_degenerate_batch_norm_and_zero_filters_compress_to_a_finite_model(
    root: Path, runs: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    """Zero-norm filters, γ = 0 and zero running_var under bn_rule="paper": exit 0, all finite."""
    result = runs["degenerate"]
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = root / "degenerate-out.pth.tar"
    assert "saved" in result.stdout
    model, meta = load_model(out)
    assert _all_finite(model.state_dict())
    assert meta["cfg"] != degenerate_resnet().cfg  # it was really compressed
    with torch.no_grad():
        y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10) and bool(torch.isfinite(y).all())


# --------------------------------------------------------------------------- library only


def test_merge_whose_folded_weights_would_overflow_is_dropped() -> None:
    """A merge scale times a huge consumer weight overflows float32: it must not write Inf.

    Regression test for a bug found by ``test_fuzz.py``: the pruned neuron is
    parallel to a kept one whose norm is 1e-20 (scale 1e20) and its consumer
    column holds 1e30, so the folded weight would be Inf. The merge is dropped
    instead (``partner == -1``) and the report counts it as not merged.
    """
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.ReLU(), nn.Linear(2, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [1e-20, 2e-20, 3e-20]]))
        model[2].weight.copy_(torch.tensor([[1e30, 1.0], [1.0, 1.0]]))

    def keep_second(rows: torch.Tensor) -> torch.Tensor:
        return torch.tensor([0.0, 1.0])

    result = nm.merge(model, torch.randn(1, 3), keep={"0": 1}, criterion=keep_second, threshold=0)
    assert result.plans[0].partner.tolist() == [-1]
    assert result.plans[0].scale.tolist() == [0.0]
    assert result.report.groups[0].merged == 0
    assert _all_finite(result.model.state_dict())
    assert torch.equal(result.model[2].weight, model[2].weight[:, 1:])


def test_unexpected_exception_is_an_internal_error_with_exit_70(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bug (any non-NeuronMergingError) is one line with exit 70, asking for --debug."""

    def boom(args: object) -> int:
        raise KeyError("oops")

    monkeypatch.setitem(cli._COMMANDS, "evaluate", boom)
    assert cli.main(["evaluate", "--checkpoint", "x.pth.tar"]) == 70
    err = capsys.readouterr().err
    assert err == (
        "neuron-merging: internal error: KeyError: 'oops' (rerun with --debug for the traceback)\n"
    )


def test_os_error_is_an_output_error_with_exit_6(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full_disk(args: object) -> int:
        raise OSError(28, "No space left on device", "/results/results.json")

    monkeypatch.setitem(cli._COMMANDS, "evaluate", full_disk)
    assert cli.main(["evaluate", "--checkpoint", "x.pth.tar"]) == 6
    err = capsys.readouterr().err
    assert err == "neuron-merging: error: No space left on device (/results/results.json)\n"


def test_every_error_class_has_its_documented_exit_code() -> None:
    codes = {
        nm.ConfigError: 2,
        nm.ModelError: 3,
        nm.CheckpointError: 4,
        nm.DatasetError: 5,
        nm.OutputError: 6,
    }
    for cls, code in codes.items():
        assert issubclass(cls, nm.NeuronMergingError) and cls.exit_code == code
    assert sorted(cli.EXIT_CODES.values()) == [0, 1, 2, 3, 4, 5, 6, 70, 130, 143]
