"""The CLI's pickle-free output: ``compress --output DIR`` and ``evaluate --checkpoint DIR``.

Runs the CLI in-process on the released LeNet-300-100 checkpoint and the
FashionMNIST test set from ``../shared`` (skipped when absent).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from neuron_merging import read_manifest
from neuron_merging.checkpoint import load_model
from neuron_merging.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"
LENET = SHARED / "checkpoints" / "LeNet_300_100.original.300_100.bias.pth.tar"
HAVE_LENET = (
    LENET.is_file() and (DATA / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()
)

pytestmark = pytest.mark.skipif(not HAVE_LENET, reason=f"needs {LENET} and FashionMNIST in {DATA}")


def _json(capsys: pytest.CaptureFixture[str], *argv: object) -> dict:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_compress_to_directory_then_evaluate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lenet-merged"
    legacy = tmp_path / "lenet-merged.pth.tar"
    common = [
        "--arch",
        "lenet300",
        "--checkpoint",
        LENET,
        "--data-dir",
        DATA,
        "-t",
        "merge",
        "-r",
        "0.5",
        "--json",
        "-q",
    ]
    compressed = _json(capsys, "compress", *common, "--output", out)
    _json(capsys, "compress", *common, "--no-eval", "--output", legacy)
    assert compressed["output"] == str(out)

    manifest = read_manifest(out)
    assert manifest["metadata"]["arch"] == "lenet300"
    assert manifest["metadata"]["cfg"] == [150, 50]
    assert manifest["metadata"]["acc"] == pytest.approx(compressed["accuracy"])
    assert manifest["metadata"]["compression"]["threshold"] == 0.45
    assert manifest["report"]["params_after"] == compressed["params"] == 125_810
    assert manifest["modules"]["ip1"]["tensors"]["weight"] == [150, 784]

    evaluated = _json(capsys, "evaluate", "--checkpoint", out, "--data-dir", DATA, "--json", "-q")
    assert evaluated["accuracy"] == compressed["accuracy"]
    assert evaluated["cfg"] == [150, 50] and evaluated["params"] == 125_810

    new, info = load_model(out)  # both formats hold the same model
    old, _ = load_model(legacy)
    assert info["arch"] == "lenet300" and info["format"] == "safetensors"
    assert new.cfg == old.cfg == [150, 50]
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(new(x), old(x))


def test_arch_contradicting_the_save_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    argv = [
        "--arch",
        "lenet300",
        "--checkpoint",
        LENET,
        "--data-dir",
        DATA,
        "-r",
        "0.5",
        "--no-eval",
        "-q",
    ]
    assert main(["compress", *map(str, argv), "--output", str(out)]) == 0
    capsys.readouterr()
    code = main(
        ["evaluate", "--arch", "resnet56", "--checkpoint", str(out), "--data-dir", str(DATA)]
    )
    assert code == 4
    assert "records arch='lenet300'" in capsys.readouterr().err
