"""``--preset best`` and ``--calibrate N`` end to end on the released LeNet checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
LENET = SHARED / "checkpoints" / "LeNet_300_100.original.300_100.bias.pth.tar"
DATA = SHARED / "data"
RAW = DATA / "FashionMNIST" / "raw"

pytestmark = pytest.mark.skipif(
    not (LENET.is_file() and (RAW / "train-images-idx3-ubyte").is_file()),
    reason="needs the released LeNet checkpoint and FashionMNIST (train and test) in ../shared",
)


def _cli(*words: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEURON_MERGING")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "neuron_merging.cli", *words]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    return json.loads(out.stdout)


def test_compress_best_and_calibrate(tmp_path: Path) -> None:
    common = [
        "compress",
        "--arch",
        "lenet300",
        "--checkpoint",
        str(LENET),
        "--data-dir",
        str(DATA),
        "-r",
        "0.7",
    ]
    paper = _cli(*common, "-t", "merge", "--json", "-q")
    best = _cli(*common, "-t", "merge", "--preset", "best", "--json", "-q")
    calib = _cli(
        *common,
        "-t",
        "merge",
        "--preset",
        "best",
        "--calibrate",
        "200",
        "--json",
        "-q",
        "--output",
        str(tmp_path / "small.pth.tar"),
    )
    assert paper["params"] == best["params"] == calib["params"]  # same widths as the paper
    assert best["report"]["config"]["selection"] == "lstsq"
    from neuron_merging.experiments import BEST_CALIBRATE

    assert calib["report"]["config"]["calibrate"] == list(BEST_CALIBRATE)
    assert calib["report"]["config"]["selection"] == "lstsq"
    # LeNet has no batch norm: without data, best keeps the paper's merge (never below it)
    assert best["accuracy"] >= paper["accuracy"] - 0.2
    assert calib["accuracy"] > paper["accuracy"]
    assert (tmp_path / "small.pth.tar").is_file()


def test_sweep_best_with_calibration(tmp_path: Path) -> None:
    out = _cli(
        "sweep",
        "--arch",
        "lenet300",
        "--checkpoint",
        str(LENET),
        "--data-dir",
        str(DATA),
        "--preset",
        "best",
        "--calibrate",
        "100",
        "--ratios",
        "0.8",
        "--criteria",
        "l1-norm",
        "--modes",
        "merge",
        "--output",
        str(tmp_path / "sweep"),
        "--json",
        "-q",
    )
    merged = [r for r in out["records"] if r["mode"] == "merge"]
    assert len(merged) == 1 and merged[0]["calibration"] == 100 and merged[0]["preset"] == "best"
    assert (tmp_path / "sweep" / "results.json").is_file()


def test_calibration_images_avoid_the_validation_split() -> None:
    """Calibration draws only from training images outside the held-out validation split."""
    import torch

    from neuron_merging.data import load_dataset
    from neuron_merging.experiments import (
        VALIDATION_SIZE,
        calibration_images,
        calibration_indices,
        validation_split,
    )

    train = load_dataset("fashion-mnist", "train", DATA)
    val = validation_split("fashion-mnist", DATA)
    assert len(val) == VALIDATION_SIZE
    assert torch.equal(val.images, train.images[-VALIDATION_SIZE:])
    assert torch.equal(val.labels, train.labels[-VALIDATION_SIZE:])
    idx = calibration_indices(len(train), 3000)
    assert idx.unique().numel() == 3000  # without replacement
    assert int(idx.max()) < len(train) - VALIDATION_SIZE  # never a validation image
    assert torch.equal(calibration_images("fashion-mnist", 3000, DATA), train.images[idx])
    assert torch.equal(calibration_indices(len(train), 3000), idx)  # seeded
    from neuron_merging import ConfigError

    with pytest.raises(ConfigError, match="validation split"):
        calibration_indices(len(train), len(train) - VALIDATION_SIZE + 1)
    # A small training split holds out a tenth of itself.
    small = calibration_indices(200, 180)
    assert int(small.max()) < 180 and small.unique().numel() == 180
    with pytest.raises(ConfigError, match=r"exceeds the 180 training images .*the last 20\)"):
        calibration_indices(200, 181)
