"""Tests of safe checkpoint loading/saving, against the authors' released files."""

from __future__ import annotations

import builtins
import os
import pickle
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from neuron_merging import models
from neuron_merging.checkpoint import (
    infer_cfg,
    infer_num_classes,
    load_model,
    load_state_dict,
    save_checkpoint,
)
from neuron_merging.core.errors import CheckpointError, ConfigError

CHECKPOINTS = Path(__file__).resolve().parents[2] / "shared" / "checkpoints"
LENET_FILE = CHECKPOINTS / "LeNet_300_100.original.300_100.bias.pth.tar"
RESNET_FILE = CHECKPOINTS / "ResNet.cifar10.original.56.pth.tar"

needs_lenet = pytest.mark.skipif(not LENET_FILE.is_file(), reason=f"{LENET_FILE} not present")
needs_resnet = pytest.mark.skipif(not RESNET_FILE.is_file(), reason=f"{RESNET_FILE} not present")

VGG_SMALL = [32, 64, "M", 128, 128, "M", 256, 256, 256, "M", 256, 256, 256, "M", 256, 256, 256]
COMPRESSED = {
    "lenet300": [150, 50],
    "vgg16": VGG_SMALL,
    "resnet56": [3, 5, 7] * 3 + [10] * 9 + [20, 30, 40] * 3,
    "wrn40_4": [32, 48, 64, 16, 8, 64, 100, 128, 64, 32, 16, 8, 256, 1, 2, 3, 4, 5],
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny CPU batches: one intra-op thread avoids OpenMP spin contention on busy machines."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_input(name: str, batch: int = 2) -> torch.Tensor:
    shape = models.model_spec(name).input_shape
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))


def randomize_bn_stats(model: torch.nn.Module) -> None:
    """Give BatchNorm non-trivial running stats so a wrong load would change outputs."""
    gen = torch.Generator().manual_seed(7)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)


# --------------------------------------------------------------------------- released files


@needs_lenet
def test_released_lenet_loads_strictly() -> None:
    state_dict, meta = load_state_dict(LENET_FILE)
    model = models.create("lenet300")
    assert set(state_dict) == set(model.state_dict())
    model.load_state_dict(state_dict, strict=True)
    assert meta["acc"] == pytest.approx(89.8)

    loaded, info = load_model(LENET_FILE, arch="lenet300")
    assert not loaded.training
    assert info["acc"] == pytest.approx(89.8)
    assert info["arch"] == "lenet300" and info["num_classes"] == 10
    assert info["cfg"] == [300, 100]
    assert torch.equal(loaded.ip2.weight, state_dict["ip2.weight"])


@needs_resnet
def test_released_resnet_loads_strictly() -> None:
    state_dict, meta = load_state_dict(RESNET_FILE)
    model = models.create("resnet56")
    assert set(state_dict) == set(model.state_dict())
    model.load_state_dict(state_dict, strict=True)
    assert meta["acc"] == pytest.approx(93.88)

    loaded, info = load_model(RESNET_FILE, arch="resnet56")
    assert info["acc"] == pytest.approx(93.88)
    assert info["cfg"] == [16] * 9 + [32] * 9 + [64] * 9
    with torch.no_grad():
        out = loaded(random_input("resnet56"))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", models.list_models())
def test_compressed_cfg_round_trip_through_metadata(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.create(name, num_classes=7, cfg=COMPRESSED[name])
    randomize_bn_stats(model)
    model.eval()
    path = tmp_path / "ckpt.pth.tar"
    save_checkpoint(path, model, acc=12.5, dataset="cifar10", extra={"ratio": 0.5})

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["arch"] == name and raw["num_classes"] == 7 and raw["cfg"] == model.cfg

    loaded, info = load_model(path)
    assert info["acc"] == 12.5 and info["dataset"] == "cifar10" and info["ratio"] == 0.5
    assert info["arch"] == name and info["cfg"] == model.cfg
    x = random_input(name)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("name", models.list_models())
def test_plain_state_dict_infers_cfg_and_classes(name: str, tmp_path: Path) -> None:
    model = models.create(name, num_classes=100, cfg=COMPRESSED[name]).eval()
    randomize_bn_stats(model)
    state_dict = model.state_dict()
    assert infer_cfg(name, state_dict) == model.cfg
    assert infer_num_classes(state_dict) == 100

    path = tmp_path / "plain.pth"
    torch.save(state_dict, path)
    loaded, info = load_model(path, arch=name)
    assert info["cfg"] == model.cfg and info["num_classes"] == 100
    x = random_input(name)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_module_prefix_is_stripped(tmp_path: Path) -> None:
    model = models.create("lenet300", cfg=[20, 10])
    path = tmp_path / "dp.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    state_dict, meta = load_state_dict(path)
    assert meta == {}
    assert set(state_dict) == set(model.state_dict())
    loaded, _ = load_model(path, arch="lenet300")
    assert torch.equal(loaded.ip1.weight, model.ip1.weight)


def test_save_accepts_a_state_dict_and_is_atomic(tmp_path: Path) -> None:
    model = models.create("lenet300", cfg=[20, 10])
    path = tmp_path / "sub" / "ckpt.pth"
    save_checkpoint(path, model.state_dict(), acc=None, arch="lenet300", cfg=[20, 10])
    assert os.listdir(path.parent) == ["ckpt.pth"]
    _, meta = load_state_dict(path)
    assert meta == {"acc": None, "arch": "lenet300", "cfg": [20, 10], "num_classes": None,
                    "dataset": None}  # fmt: skip
    loaded, info = load_model(path)
    assert info["num_classes"] == 10
    assert torch.equal(loaded.ip3.weight, model.ip3.weight)


def test_save_rejects_values_that_would_need_unpickling_code(tmp_path: Path) -> None:
    model = models.create("lenet300", cfg=[20, 10])
    with pytest.raises(ConfigError, match="extra"):
        save_checkpoint(tmp_path / "a.pth", model, acc=1.0, extra={"obj": object()})
    with pytest.raises(ConfigError, match="reserved"):
        save_checkpoint(tmp_path / "b.pth", model, acc=1.0, extra={"arch": "vgg16"})
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="not found") as info:
        load_state_dict(path)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty") as info:
        load_state_dict(path)
    assert str(path) in str(info.value)


@needs_lenet
def test_truncated_file(tmp_path: Path) -> None:
    data = LENET_FILE.read_bytes()
    path = tmp_path / "half.pth.tar"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is truncated or not a PyTorch checkpoint") as info:
        load_state_dict(path)
    assert str(path) in str(info.value)


def test_truncated_zip_file(tmp_path: Path) -> None:
    full = tmp_path / "full.pth"
    torch.save(models.create("lenet300").state_dict(), full)
    data = full.read_bytes()
    path = tmp_path / "half.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is truncated or not a PyTorch checkpoint"):
        load_state_dict(path)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "random.pth"
    path.write_bytes(random.Random(seed).randbytes(4096))
    with pytest.raises(CheckpointError, match="is truncated or not a PyTorch checkpoint") as info:
        load_state_dict(path)
    assert str(path) in str(info.value)


@needs_resnet
def test_wrong_architecture_lists_keys() -> None:
    with pytest.raises(CheckpointError) as info:
        load_model(RESNET_FILE, arch="lenet300")
    message = str(info.value)
    assert str(RESNET_FILE) in message
    assert "missing keys" in message and "ip1.weight" in message
    assert "unexpected keys" in message and "conv1.weight" in message
    assert "more)" in message  # the long unexpected-key list is truncated
    assert len(message) < 2000


def test_size_mismatch_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "small.pth"
    torch.save(models.create("lenet300", cfg=[150, 50]).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"size mismatches.*ip1\.weight"):
        load_model(path, arch="lenet300", cfg=[300, 100])


def test_metadata_conflict_and_missing_arch(tmp_path: Path) -> None:
    model = models.create("lenet300", cfg=[20, 10])
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, model, acc=1.0)
    with pytest.raises(CheckpointError, match="arch"):
        load_model(path, arch="resnet56")
    plain = tmp_path / "plain.pth"
    torch.save(model.state_dict(), plain)
    with pytest.raises(CheckpointError, match="lenet300"):
        load_model(plain)


@pytest.mark.parametrize(
    "content",
    [[1, 2, 3], {"a": 1}, {"state_dict": [torch.zeros(1)]}, {}],
    ids=["list", "dict-of-ints", "bad-state-dict", "empty-dict"],
)
def test_not_a_state_dict(tmp_path: Path, content: object) -> None:
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=r"state dict|empty") as info:
        load_state_dict(path)
    assert str(path) in str(info.value)


class _ExecPayload:
    """Unpickling this runs ``exec`` of ``code`` (classic pickle code injection)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple:
        return (builtins.exec, (self.code,))


class _SystemPayload:
    """Unpickling this runs a shell command via ``os.system``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    payload = pickle.dumps(_ExecPayload(f"open({str(marker)!r}, 'w').close()"))
    # Positive control: an ordinary unpickle really does run the payload.
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "evil.pth"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match="unsafe") as info:
        load_state_dict(path)
    assert str(path) in str(info.value) and "builtins.exec" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_malicious_torch_save_is_refused_without_running(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth.tar"
    evil = {
        "acc": 99.0,
        "state_dict": {"w": torch.zeros(2)},
        "x": _SystemPayload(f"touch {marker}"),
    }
    torch.save(evil, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match="refused as unsafe") as info:
        load_model(path, arch="lenet300")
    assert str(path) in str(info.value) and "system" in str(info.value)
    assert not marker.exists()
