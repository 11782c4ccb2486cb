"""Files and options: holes found by a hostile-input probe of the CLI, checkpoints and
exports. Each test fails on the code before its fix; the CLI runs in its own process
and a full disk is a real (tiny) tmpfs, as in ``test_reliability_round2.py``.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import neuron_merging as nm
from neuron_merging import models
from neuron_merging.checkpoint import load_model, save_checkpoint
from neuron_merging.core.config import MergeConfig
from neuron_merging.core.errors import CheckpointError, ConfigError, OutputError
from test_reliability_round2 import LENET, _compress, cli, error_line, lenet  # noqa: F401

RESNET = LENET.parent / "ResNet.cifar10.original.56.pth.tar"


def test_compress_never_replaces_the_saved_model_it_reads(lenet: Path, tmp_path: Path) -> None:  # noqa: F811
    """``--checkpoint DIR --output DIR --force`` replaced the input save (exit 0), though a
    checkpoint file input is never overwritten; a symlink to it is the same folder."""
    saved = tmp_path / "m"
    assert cli(*_compress(lenet, saved)).returncode == 0
    before = (saved / "manifest.json").read_bytes()
    link = tmp_path / "link"
    link.symlink_to(saved)
    for output in (saved, link):
        result = cli(*_compress(saved, output, "--force"))
        assert "is the input model" in error_line(result, 6)
    assert (saved / "manifest.json").read_bytes() == before


def test_a_checkpoint_file_that_could_not_be_read_back_is_refused(tmp_path: Path) -> None:
    """``--coupled`` prunes ResNet-56's residual streams, which a cfg cannot describe: the
    ``.pth.tar`` was written (exit 0) and every later load failed with exit 4."""
    if not RESNET.is_file():
        pytest.skip(f"needs {RESNET}")
    output = tmp_path / "r.pth.tar"
    result = cli("compress", "--arch", "resnet56", "--checkpoint", RESNET, "-r", "0.5",
                 "--coupled", "--no-eval", "--quiet", "--output", output)  # fmt: skip
    line = error_line(result, 2)
    assert "cannot describe this model's widths" in line and "as a directory" in line
    assert not output.exists()


def test_save_checkpoint_refuses_tensors_its_cfg_cannot_rebuild(tmp_path: Path) -> None:
    model = models.create("lenet300")
    state = model.state_dict()
    state["ip1.bias"] = torch.zeros(7)
    with pytest.raises(ConfigError, match="cannot describe"):
        save_checkpoint(tmp_path / "x.pth.tar", state, acc=None, arch="lenet300", cfg=[300, 100])
    assert not (tmp_path / "x.pth.tar").exists()
    with pytest.raises(ConfigError, match="acc must be a number"):
        save_checkpoint(tmp_path / "y.pth.tar", model, acc="abc")  # type: ignore[arg-type]


def _flip_a_tensor_byte(source: Path, target: Path) -> None:
    with zipfile.ZipFile(source) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    data = bytearray(source.read_bytes())
    name, extra = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name + extra + 5] ^= 0x40
    target.write_bytes(data)


def test_a_flipped_byte_in_a_zip_checkpoint_is_reported(lenet: Path, tmp_path: Path) -> None:  # noqa: F811
    """``torch.load`` does not check the zip's CRC-32s: a flipped tensor byte loaded."""
    bad = tmp_path / "flip.pth.tar"
    _flip_a_tensor_byte(lenet, bad)
    with pytest.raises(CheckpointError, match=r"checksum of .* does not match"):
        load_model(bad)
    line = error_line(cli("compress", "--checkpoint", bad, "-r", "0.3", "--no-eval"), 4)
    assert "checksum" in line


def test_num_classes_that_contradict_the_classifier_are_refused(tmp_path: Path) -> None:
    """``num_classes=10**12`` in the metadata built the model first: a 400 TB allocation
    and exit 70. Checked against the classifier before anything is built."""
    state = models.create("lenet300").state_dict()
    path = tmp_path / "c.pth.tar"
    torch.save({"state_dict": state, "arch": "lenet300", "num_classes": 10**12}, path)
    with pytest.raises(CheckpointError, match="num_classes 1000000000000 does not match the 10"):
        load_model(path)
    assert "does not match" in error_line(cli("compress", "--checkpoint", path, "--no-eval"), 4)


def test_bad_config_values_are_config_errors() -> None:
    """These raised ``ValueError``/``AttributeError``/``TypeError`` from deep inside."""
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        MergeConfig(seed=2**80)
    with pytest.raises(ConfigError, match="config must be a MergeConfig"):
        nm.compress(net, torch.randn(2, 8), {"ratio": 0.5})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="expects a mapping"):
        MergeConfig.from_dict([1])  # type: ignore[arg-type]


def _small() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    return net, torch.randn(1, 64)


def test_export_onnx_refuses_folders_and_creates_missing_ones(tmp_path: Path) -> None:
    from neuron_merging.export import export_onnx

    pytest.importorskip("onnx")
    net, x = _small()
    with pytest.raises(OutputError, match="exists and is a directory"):
        export_onnx(net, x, tmp_path, exporter="torchscript")
    path = export_onnx(net, x, tmp_path / "new" / "m.onnx", exporter="torchscript")
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == ["m.onnx"]


def test_export_onnx_on_a_full_disk_keeps_the_earlier_file(tiny_disk: Path) -> None:
    """A full disk gave a raw ``OSError``, a partial file, and the earlier export lost."""
    from neuron_merging.export import export_onnx

    pytest.importorskip("onnx")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)).eval()  # 0.5 MB
    target = tiny_disk / "model.onnx"
    target.write_bytes(b"an earlier export")
    with pytest.raises(OutputError, match="No space left on device"):
        export_onnx(net, torch.randn(1, 256), target, exporter="torchscript")
    assert target.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["model.onnx"]


def test_train_refuses_widths_too_large_to_allocate(tmp_path: Path) -> None:
    """``--cfg 100000000 100000000`` failed in the allocator (exit 70)."""
    result = cli("train", "--arch", "lenet300", "--cfg", "100000000", "100000000",
                 "--output", tmp_path / "t.pth.tar")  # fmt: skip
    assert "more than the 1,073,741,824 a model may have for training" in error_line(result, 2)
