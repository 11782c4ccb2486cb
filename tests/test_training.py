"""Training is seeded end to end: the same seed gives bit-identical weights in fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

pytestmark = pytest.mark.skipif(
    not (DATA / "FashionMNIST").is_dir(), reason="FashionMNIST not in ../shared/data"
)


def _train(out: Path, seed: int) -> dict[str, torch.Tensor]:
    cmd = [
        sys.executable, "-m", "neuron_merging.cli", "train", "--arch", "lenet300",
        "--data-dir", str(DATA), "--epochs", "1", "--max-batches", "20", "--no-test",
        "--seed", str(seed), "--output", str(out), "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return torch.load(out, map_location="cpu", weights_only=True)["state_dict"]


def test_same_seed_gives_identical_weights_across_processes(tmp_path: Path) -> None:
    first = _train(tmp_path / "a.pth.tar", seed=3)
    second = _train(tmp_path / "b.pth.tar", seed=3)
    other = _train(tmp_path / "c.pth.tar", seed=4)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["ip1.weight"], other["ip1.weight"])


def test_paper_recipe_trains_lenet_to_at_least_89_3_percent(tmp_path: Path) -> None:
    """The full 60-epoch LeNet-300-100 recipe (about a minute on 2 cores)."""
    out = tmp_path / "lenet.pth.tar"
    cmd = [
        sys.executable, "-m", "neuron_merging.cli", "train", "--arch", "lenet300",
        "--data-dir", str(DATA), "--seed", "0", "--output", str(out), "--quiet",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr
    checkpoint = torch.load(out, map_location="cpu", weights_only=True)
    assert checkpoint["acc"] >= 89.3
