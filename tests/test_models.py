"""Tests of the model registry and the four paper architectures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.fx
from torch import nn

from neuron_merging import models
from neuron_merging.core.errors import ConfigError

VGG_SMALL = [32, 64, "M", 128, 128, "M", 256, 256, 256, "M", 256, 256, 256, "M", 256, 256, 256]

# (arch, cfg, expected parameter count with 10 classes)
PARAM_COUNTS = [
    ("lenet300", None, 266_610),
    ("lenet300", [150, 50], 125_810),
    ("vgg16", None, 14_987_722),
    ("vgg16", VGG_SMALL, 5_397_034),
    ("resnet56", None, 855_770),
    ("resnet56", [8, 16, 32], 430_826),
    ("wrn40_4", None, 8_949_210),
]

# A compressed cfg per model, used to check that widths really are configurable.
COMPRESSED = {
    "lenet300": [150, 50],
    "vgg16": VGG_SMALL,
    "resnet56": [8, 16, 32],
    "wrn40_4": [32, 64, 128],
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny CPU batches: one intra-op thread avoids OpenMP spin contention on busy machines."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def random_input(name: str, batch: int = 2) -> torch.Tensor:
    shape = models.model_spec(name).input_shape
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))


def test_registry_lists_the_paper_models() -> None:
    assert models.list_models() == ["lenet300", "resnet56", "vgg16", "wrn40_4"]


def test_every_registered_model_has_a_param_count_and_compressed_cfg() -> None:
    covered = {name for name, cfg, _ in PARAM_COUNTS if cfg is None}
    assert covered == set(models.list_models())
    assert set(COMPRESSED) == set(models.list_models())


@pytest.mark.parametrize(("name", "cfg", "expected"), PARAM_COUNTS)
def test_param_counts(name: str, cfg: list | None, expected: int) -> None:
    assert n_params(models.create(name, num_classes=10, cfg=cfg)) == expected


@pytest.mark.parametrize("name", models.list_models())
def test_spec_describes_the_model(name: str) -> None:
    spec = models.model_spec(name)
    assert spec.name == name
    assert spec.default_num_classes == 10
    assert spec.datasets
    assert len(spec.input_shape) == 3
    model = models.create(name)
    assert model.arch == name
    assert model.num_classes == spec.default_num_classes
    assert model.cfg == spec.default_cfg(10)
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("name", models.list_models())
def test_forward_shape_in_eval_mode(name: str) -> None:
    model = models.create(name).eval()
    with torch.no_grad():
        out = model(random_input(name, batch=2))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", models.list_models())
def test_num_classes_sets_the_classifier(name: str) -> None:
    model = models.create(name, num_classes=100, cfg=COMPRESSED[name]).eval()
    assert model.num_classes == 100
    with torch.no_grad():
        assert model(random_input(name, batch=2)).shape == (2, 100)


@pytest.mark.parametrize("name", models.list_models())
def test_fx_trace_matches_eager(name: str) -> None:
    model = models.create(name, cfg=COMPRESSED[name]).eval()
    traced = torch.fx.symbolic_trace(model)
    x = random_input(name)
    with torch.no_grad():
        assert torch.equal(traced(x.clone()), model(x.clone()))


@pytest.mark.parametrize("name", models.list_models())
def test_cfg_attribute_recreates_the_same_shapes(name: str) -> None:
    model = models.create(name, cfg=COMPRESSED[name])
    again = models.create(name, cfg=model.cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in again.state_dict().items()}
    assert models.model_spec(name).infer_cfg(model.state_dict()) == model.cfg


@pytest.mark.parametrize("name", models.list_models())
def test_init_is_deterministic_under_a_seed(name: str) -> None:
    torch.manual_seed(123)
    a = models.create(name, cfg=COMPRESSED[name]).state_dict()
    torch.manual_seed(123)
    b = models.create(name, cfg=COMPRESSED[name]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_model_keys_follow_the_release_layout() -> None:
    assert list(models.create("lenet300").state_dict()) == [
        f"ip{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")
    ]
    vgg = models.create("vgg16").state_dict()
    assert "feature.0.weight" in vgg and "feature.1.num_batches_tracked" in vgg
    assert "feature.3.weight" in vgg and "feature.2.weight" not in vgg
    assert {"classifier.0.weight", "classifier.1.running_var", "classifier.3.bias"} <= set(vgg)
    resnet = models.create("resnet56").state_dict()
    assert "layer2.0.downsample.0.weight" in resnet and "layer3.0.downsample.1.bias" in resnet
    assert not any(k.startswith("layer1.0.downsample") for k in resnet)
    assert "layer3.8.conv2.weight" in resnet and "fc.weight" in resnet
    wrn = models.create("wrn40_4").state_dict()
    for stage in (1, 2, 3):
        assert f"block{stage}.layer.0.convShortcut.weight" in wrn
        assert f"block{stage}.layer.1.convShortcut.weight" not in wrn
        assert f"block{stage}.layer.5.bn2.running_mean" in wrn
    assert {"conv1.weight", "bn1.weight", "fc.weight"} <= set(wrn)
    assert not any(k.startswith("block") and "layer.6" in k for k in wrn)


def test_resnet_per_stage_cfg_expands_to_blocks() -> None:
    model = models.create("resnet56", cfg=[8, 16, 32])
    assert model.cfg == [8] * 9 + [16] * 9 + [32] * 9
    assert model.layer2[3].conv1.out_channels == 16
    assert model.layer2[3].conv2.out_channels == 32


def test_wrn_per_stage_cfg_expands_to_blocks() -> None:
    model = models.create("wrn40_4", cfg=[32, 64, 128])
    assert model.cfg == [32] * 6 + [64] * 6 + [128] * 6
    assert model.block3.layer[5].conv1.out_channels == 128
    assert model.block3.layer[5].conv2.out_channels == 256


def test_vgg_accepts_bare_conv_widths() -> None:
    bare = [v for v in VGG_SMALL if v != "M"]
    assert models.create("vgg16", cfg=bare).cfg == VGG_SMALL


def test_resnet_block_does_not_modify_its_input() -> None:
    """Hooks on a block's output must see what the block produced, not its successor's ReLU."""
    model = models.create("resnet56", cfg=[8, 16, 32]).eval()
    seen: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen["ref"] = output
        seen["copy"] = output.clone()

    model.layer1[0].register_forward_hook(hook)
    with torch.no_grad():
        model(random_input("resnet56"))
    assert (seen["copy"] < 0).any()
    assert torch.equal(seen["ref"], seen["copy"])


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match=r"lenet300.*resnet56.*vgg16.*wrn40_4"):
        models.create("resnet9000")
    with pytest.raises(ConfigError, match="unknown model"):
        models.model_spec("nope")


@pytest.mark.parametrize(
    ("name", "cfg"),
    [
        ("lenet300", [300]),
        ("lenet300", [300, 100, 50]),
        ("lenet300", [0, 100]),
        ("lenet300", [-3, 100]),
        ("lenet300", [300.0, 100]),
        ("lenet300", [True, 100]),
        ("lenet300", "300,100"),
        ("resnet56", [16] * 26),
        ("resnet56", [16, 32]),
        ("resnet56", [16, 0, 64]),
        ("wrn40_4", [64] * 17),
        ("wrn40_4", [64, 128, -1]),
        ("vgg16", VGG_SMALL[:-1]),
        ("vgg16", ["M", *VGG_SMALL[1:]]),
        ("vgg16", [0 if v == 32 else v for v in VGG_SMALL]),
        ("vgg16", ["x" if v == "M" else v for v in VGG_SMALL]),
    ],
)
def test_bad_cfg_is_a_config_error(name: str, cfg: object) -> None:
    with pytest.raises(ConfigError):
        models.create(name, cfg=cfg)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, True, "10"])
def test_bad_num_classes_is_a_config_error(num_classes: object) -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        models.create("lenet300", num_classes=num_classes)  # type: ignore[arg-type]


def test_registering_a_name_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="already registered"):
        models.register_model(
            "lenet300", default_num_classes=10, datasets=("x",), input_shape=(1, 28, 28)
        )(lambda num_classes, cfg: nn.Identity())
    assert models.list_models() == ["lenet300", "resnet56", "vgg16", "wrn40_4"]
