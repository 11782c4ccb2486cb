"""Tests of the experiment layer: paper presets, sweeps, result tables and recipes.

Everything here runs in-process on randomly initialised models (the widths a
preset produces do not depend on the weights) or on tiny synthetic datasets, so
the whole file takes a few seconds on a CPU.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import neuron_merging as nm
from neuron_merging import models
from neuron_merging.core.config import DEFAULT_LAMBDA, DEFAULT_THRESHOLD
from neuron_merging.core.errors import ConfigError, OutputError
from neuron_merging.data import ArrayDataset, dataset_info
from neuron_merging.experiments import (
    EXPERIMENTS,
    NO_THRESHOLD,
    PAPER_SETTINGS,
    compression_config,
    current_cfg,
    example_input,
    experiment,
    record_key,
    run_one,
    run_sweep,
)
from neuron_merging.metrics import count_macs, count_parameters
from neuron_merging.reporting import CSV_FIELDS, records_to_csv, records_to_markdown
from neuron_merging.store import ResultsStore
from neuron_merging.training import RECIPES, recipe_for

# fmt: off
VGG_CIFAR10_CFG = [32, 64, "M", 128, 128, "M", 256, 256, 256, "M", 256, 256, 256, "M", 256, 256, 256]
VGG_CIFAR100_CFG = [32, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 256, "M", 256, 256, 256]
# fmt: on


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Small CPU workloads: one intra-op thread avoids OpenMP spin contention on busy machines."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _compress(arch: str, dataset: str, mode: str, ratio: float | None, **kw: Any) -> nm.MergeResult:
    torch.manual_seed(0)
    model = models.create(arch, num_classes=dataset_info(dataset).num_classes)
    config = compression_config(arch, dataset, mode, "l1-norm", ratio, model=model, **kw)
    verb = nm.prune if mode == "prune" else nm.merge
    return verb(model, example_input(arch), config=config)


# --------------------------------------------------------------------------- paper presets


@pytest.mark.parametrize("mode", ["prune", "merge"])
def test_vgg16_cifar10_paper_widths(mode: str) -> None:
    result = _compress("vgg16", "cifar10", mode, None)
    assert result.report.params_before == 14_987_722
    assert count_parameters(result.model) == result.report.params_after == 5_397_034
    assert current_cfg("vgg16", result.model) == VGG_CIFAR10_CFG
    # The classifier's hidden layer is excluded by the paper setting.
    skipped = {s.name: s.reason for s in result.report.skipped}
    assert "classifier.0" in skipped
    assert result.model.classifier[0].out_features == 512


def test_vgg16_cifar100_paper_widths() -> None:
    result = _compress("vgg16", "cifar100", "merge", None)
    assert current_cfg("vgg16", result.model) == VGG_CIFAR100_CFG
    assert result.model.classifier[-1].out_features == 100
    config = compression_config("vgg16", "cifar100", "merge", "l1-norm", None)
    assert (config.threshold, config.lam, config.rounding) == (0.1, 0.7, "floor")


def test_resnet56_half_ratio_compresses_block_conv1_only() -> None:
    result = _compress("resnet56", "cifar10", "merge", 0.5)
    assert result.report.params_before == 855_770
    assert count_parameters(result.model) == 430_826
    assert current_cfg("resnet56", result.model) == [8] * 9 + [16] * 9 + [32] * 9
    producers = [g.producer for g in result.report.groups]
    assert len(producers) == 27
    assert all(p.startswith("layer") and p.endswith(".conv1") for p in producers)
    skipped = {s.name: s.reason for s in result.report.skipped}
    assert all(reason for reason in skipped.values())
    assert "conv1" in skipped  # the stem feeds a residual add
    assert {f"layer{s}.{b}.conv2" for s in (1, 2, 3) for b in range(9)} <= set(skipped)
    assert {"layer2.0.downsample.0", "layer3.0.downsample.0"} <= set(skipped)
    assert "residual" in skipped["layer1.0.conv2"]


def test_lenet_half_ratio() -> None:
    result = _compress("lenet300", "fashion-mnist", "merge", 0.5)
    assert current_cfg("lenet300", result.model) == [150, 50]
    assert count_parameters(result.model) == 125_810
    config = compression_config("lenet300", "fashion-mnist", "merge", "l1-norm", 0.5)
    assert (config.threshold, config.rounding, dict(config.keep)) == (0.45, "round", {})


def test_wrn40_4_widths_are_floor_of_base_times_keep_times_four() -> None:
    model = models.create("wrn40_4")
    config = compression_config("wrn40_4", "cifar10", "merge", "l1-norm", 0.3, model=model)
    expected = [44] * 6 + [88] * 6 + [176] * 6
    assert list(config.keep.values()) == expected
    assert all(k.endswith(".conv1") for k in config.keep)
    result = nm.merge(model, example_input("wrn40_4"), config=config)
    assert current_cfg("wrn40_4", result.model) == expected
    # Without a model the preset builds one to read the block structure.
    assert compression_config("wrn40_4", "cifar10", "prune", "l2-GM", 0.3).keep == config.keep


def test_count_macs_lenet() -> None:
    model = models.create("lenet300")
    assert count_macs(model, example_input("lenet300")) == 784 * 300 + 300 * 100 + 100 * 10
    # Per example, whatever the batch size.
    assert count_macs(model, torch.zeros(4, 1, 28, 28)) == 266_200


# --------------------------------------------------------------------------- config rules


def test_explicit_threshold_and_lam_win_over_the_preset() -> None:
    config = compression_config(
        "vgg16", "cifar10", "merge", "l2-norm", None, threshold=0.3, lam=0.5, bn_rule="exact"
    )
    assert (config.threshold, config.lam, config.bn_rule) == (0.3, 0.5, "exact")
    assert config.criterion == "l2-norm" and config.mode == "merge"
    assert config.keep  # still the paper widths
    # threshold=None means "the preset's"; NO_THRESHOLD means "merge every pruned neuron".
    assert compression_config("resnet56", "cifar10", "merge", "l1-norm", 0.5).threshold == 0.1
    none = compression_config(
        "resnet56", "cifar10", "merge", "l1-norm", 0.5, threshold=NO_THRESHOLD
    )
    assert none.threshold is None
    with pytest.raises(ConfigError, match="threshold"):
        compression_config("resnet56", "cifar10", "merge", "l1-norm", 0.5, threshold="high")


def test_no_threshold_merges_every_pruned_neuron() -> None:
    result = _compress("lenet300", "fashion-mnist", "merge", 0.5, threshold=NO_THRESHOLD)
    assert [(g.pruned, g.merged) for g in result.report.groups] == [(150, 150), (50, 50)]


def test_preset_none_uses_library_defaults() -> None:
    config = compression_config("vgg16", "cifar10", "prune", "l1-norm", 0.25, preset="none")
    assert (config.threshold, config.lam, config.rounding) == (
        DEFAULT_THRESHOLD,
        DEFAULT_LAMBDA,
        "round",
    )
    assert dict(config.keep) == {} and config.ratio == 0.25
    # Any model/dataset pair is allowed without the paper preset ...
    compression_config("lenet300", "cifar10", "merge", "l1-norm", 0.5, preset="none")
    # ... but the fixed widths only exist in the paper preset.
    with pytest.raises(ConfigError, match="ratio is required"):
        compression_config("vgg16", "cifar10", "merge", "l1-norm", None, preset="none")


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("lenet300", "fashion-mnist", "merge", "l1-norm", 0.5), {"preset": "magic"}, "preset"),
        (("lenet300", "fashion-mnist", "original", "l1-norm", 0.5), {}, "mode"),
        (("lenet300", "cifar10", "merge", "l1-norm", 0.5), {}, "no experiment"),
        (("resnet56", "cifar10", "merge", "l1-norm", None), {}, "ratio is required"),
        (("lenet300", "fashion-mnist", "merge", "l1-norm", 1.5), {}, "ratio"),
        (("lenet300", "fashion-mnist", "merge", "l9-norm", 0.5), {}, "criterion"),
    ],
)
def test_compression_config_errors(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        compression_config(*args, **kwargs)


def test_every_paper_setting_builds_a_config() -> None:
    for arch, dataset in PAPER_SETTINGS:
        ratio = None if arch == "vgg16" else 0.5
        config = compression_config(arch, dataset, "merge", "l1-norm", ratio)
        assert config.threshold == PAPER_SETTINGS[arch, dataset].threshold


def test_experiment_registry() -> None:
    assert experiment("lenet300").ratios == tuple(i / 10 for i in range(1, 10))
    assert experiment("vgg16").ratios == (None,)
    assert all((e.arch, e.dataset) in PAPER_SETTINGS for e in EXPERIMENTS.values())
    with pytest.raises(ConfigError, match="unknown experiment"):
        experiment("alexnet")


def test_record_key_tolerates_float_noise() -> None:
    a = {"mode": "merge", "criterion": "l1-norm", "ratio": 0.1 + 0.2}
    b = {"mode": "merge", "criterion": "l1-norm", "ratio": 0.3}
    assert record_key(a) == record_key(b) == ("merge", "l1-norm", 0.3)
    assert record_key({"mode": "merge", "criterion": "l1-norm", "ratio": None})[2] is None


# --------------------------------------------------------------------------- recipes


def test_recipe_defaults_are_the_papers() -> None:
    assert recipe_for("fashion-mnist") == RECIPES["fashion-mnist"]
    cifar = recipe_for("cifar100")
    assert (cifar.epochs, cifar.lr, tuple(cifar.milestones), cifar.weight_decay) == (
        200,
        0.1,
        (100, 150),
        5e-4,
    )
    assert cifar.augment and not recipe_for("fashion-mnist").augment


@pytest.mark.parametrize(
    ("dataset", "epochs", "milestones"),
    [
        ("fashion-mnist", 60, (15, 30, 45)),
        ("fashion-mnist", 6, (1, 3, 4)),
        ("fashion-mnist", 30, (7, 15, 22)),
        ("cifar10", 20, (10, 15)),
        ("cifar10", 2, (1,)),  # deduplicated: one decay, not two
        ("cifar100", 1, (1,)),
    ],
)
def test_recipe_rescales_milestones(dataset: str, epochs: int, milestones: tuple) -> None:
    recipe = recipe_for(dataset, epochs=epochs)
    assert recipe.epochs == epochs
    assert tuple(recipe.milestones) == milestones


def test_recipe_overrides() -> None:
    recipe = recipe_for("cifar10", epochs=10, milestones=(3,), lr=0.05, batch_size=None)
    assert (recipe.epochs, tuple(recipe.milestones), recipe.lr, recipe.batch_size) == (
        10,
        (3,),
        0.05,
        128,
    )
    assert recipe.to_dict()["milestones"] == [3]
    json.dumps(recipe.to_dict())
    for bad in ({"epochs": 0}, {"epochs": 2.5}, {"lr": -1.0}, {"batch_size": 0}):
        with pytest.raises(ConfigError):
            recipe_for("cifar10", **bad)
    with pytest.raises(ConfigError, match="recipe"):
        recipe_for("imagenet")


# --------------------------------------------------------------------------- reporting


def _record(mode: str, criterion: str | None, ratio: float | None, acc: float, params: int):
    return {
        "arch": "lenet300",
        "dataset": "fashion-mnist",
        "mode": mode,
        "criterion": criterion,
        "ratio": ratio,
        "threshold": None if criterion is None else 0.45,
        "lam": None,
        "bn_rule": None,
        "preset": "paper",
        "accuracy": acc,
        "correct": int(acc * 100),
        "total": 10000,
        "loss": 0.5,
        "params": params,
        "macs": params - 410,
        "merged": 0,
        "widths": [1, 2],
    }


SYNTHETIC = [
    _record("original", None, 0.0, 89.8, 266_610),
    # Criteria deliberately out of the registry order, and one unknown criterion.
    _record("prune", "l2-GM", 0.5, 88.08, 125_810),
    _record("merge", "l2-GM", 0.5, 88.57, 125_810),
    _record("prune", "l1-norm", 0.5, 88.4, 125_810),
    _record("merge", "l1-norm", 0.5, 88.69, 125_810),
    _record("prune", "l1-norm", 0.7, 71.26, 73_690),
    _record("merge", "l1-norm", 0.7, 82.75, 73_690),
    _record("merge", "custom", 0.7, 50.0, 73_690),
]


def test_records_to_markdown() -> None:
    lines = records_to_markdown(SYNTHETIC).splitlines()
    assert lines[0] == (
        "| ratio | params | l1-norm prune | l1-norm merge | l2-GM prune | l2-GM merge "
        "| custom prune | custom merge |"
    )
    assert lines[1] == "|" + "|".join(["---:"] * 8) + "|"
    assert lines[2] == "| baseline | 266,610 | 89.80 | — | 89.80 | — | 89.80 | — |"
    assert lines[3] == "| 50% | 125,810 | 88.40 | 88.69 | 88.08 | 88.57 |  |  |"
    assert lines[4] == "| 70% | 73,690 | 71.26 | 82.75 |  |  |  | 50.00 |"
    assert len(lines) == 5


def test_records_to_markdown_single_mode_and_paper_cfg() -> None:
    records = [
        _record("original", None, 0.0, 93.5, 14_987_722),
        _record("merge", "l1-norm", None, 93.16, 5_397_034),
    ]
    lines = records_to_markdown(records).splitlines()
    assert lines[0] == "| ratio | params | l1-norm merge |"
    assert lines[2] == "| baseline | 14,987,722 | 93.50 |"
    assert lines[3] == "| paper cfg | 5,397,034 | 93.16 |"


def test_records_to_csv() -> None:
    text = records_to_csv(SYNTHETIC)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert text.splitlines()[0] == ",".join(CSV_FIELDS)
    assert len(rows) == len(SYNTHETIC)
    assert "widths" not in rows[0]  # list-valued extras are left out
    assert rows[0]["criterion"] == "" and rows[0]["mode"] == "original"  # None → empty
    assert rows[4]["accuracy"] == "88.69" and rows[4]["params"] == "125810"
    assert records_to_csv([]) == ",".join(CSV_FIELDS) + "\n"


# --------------------------------------------------------------------------- sweeps


def _tiny_fashion(n: int = 40) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(
        torch.randn(n, 1, 28, 28, generator=g),
        torch.randint(0, 10, (n,), generator=g),
        dataset_info("fashion-mnist"),
    )


def test_run_one_original_and_compressed() -> None:
    torch.manual_seed(0)
    model = models.create("lenet300")
    data = _tiny_fashion()
    original = run_one(model, "lenet300", data, None, show_progress=False)
    assert (original.params, original.macs, original.merged, original.widths) == (
        266_610,
        266_200,
        0,
        [],
    )
    assert original.model is model and original.result.total == 40
    config = compression_config("lenet300", "fashion-mnist", "merge", "l1-norm", 0.5)
    outcome = run_one(model, "lenet300", data, config, show_progress=False)
    assert outcome.widths == [150, 50] and outcome.params == 125_810
    assert outcome.macs == 784 * 150 + 150 * 50 + 50 * 10
    assert outcome.model.cfg == [150, 50]
    assert model.ip1.out_features == 300  # the input model is untouched


def test_run_sweep_writes_and_resumes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.create("lenet300")
    data = _tiny_fashion()
    seen: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"criteria": ["l2-norm", "l1-norm"], "show_progress": False}
    records = run_sweep(
        model,
        "lenet300",
        "fashion-mnist",
        data,
        ratios=[0.7, 0.5],
        output_dir=tmp_path,
        on_record=seen.append,
        **kwargs,
    )
    assert len(records) == len(seen) == 1 + 2 * 2 * 2
    keys = [record_key(r) for r in records]
    assert len(set(keys)) == len(keys)
    # Sorted: original, then by ratio, criterion, prune before merge.
    assert keys[:3] == [
        ("original", None, 0.0),
        ("prune", "l1-norm", 0.5),
        ("merge", "l1-norm", 0.5),
    ]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == records
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))) == 9

    # Resume with one more ratio: only the new configurations run.
    seen.clear()
    more = run_sweep(
        model,
        "lenet300",
        "fashion-mnist",
        data,
        ratios=[0.5, 0.7, 0.8],
        output_dir=tmp_path,
        resume=True,
        on_record=seen.append,
        **kwargs,
    )
    assert {record_key(r) for r in seen} == {
        (m, c, 0.8) for m in ("prune", "merge") for c in ("l1-norm", "l2-norm")
    }
    assert len(more) == 13
    assert all(r in more for r in records)  # the earlier records are kept as they were

    # Records of other settings are never reused by --resume, and never deleted.
    seen.clear()
    other = run_sweep(
        model,
        "lenet300",
        "fashion-mnist",
        data,
        ratios=[0.5],
        output_dir=tmp_path,
        resume=True,
        on_record=seen.append,
        bn_rule="exact",
        **kwargs,
    )
    assert len(seen) == len(other) == 5
    assert json.loads((tmp_path / "results.json").read_text()) == other
    with ResultsStore(tmp_path) as store:
        assert store.count() == 13 + 5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"criteria": ["l9"]}, ConfigError, "criterion"),
        ({"modes": ["original"]}, ConfigError, "mode"),
        ({"ratios": [1.0]}, ConfigError, "ratio"),
        ({"ratios": [-0.1]}, ConfigError, "ratio"),
    ],
)
def test_run_sweep_validates_before_running(kwargs: dict, error: type, match: str) -> None:
    args: dict[str, Any] = {"criteria": ["l1-norm"], "ratios": [0.5], "show_progress": False}
    args.update(kwargs)
    calls: list[dict[str, Any]] = []
    with pytest.raises(error, match=match):
        run_sweep(
            models.create("lenet300"),
            "lenet300",
            "fashion-mnist",
            _tiny_fashion(),
            on_record=calls.append,
            **args,
        )
    assert calls == []


def test_run_sweep_output_errors(tmp_path: Path) -> None:
    model, data = models.create("lenet300"), _tiny_fashion()
    args: dict[str, Any] = {"criteria": ["l1-norm"], "ratios": [0.5], "show_progress": False}
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        run_sweep(model, "lenet300", "fashion-mnist", data, output_dir=a_file, **args)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    with pytest.raises(OutputError, match=r"cannot migrate .* not valid JSON"):
        run_sweep(model, "lenet300", "fashion-mnist", data, output_dir=bad, resume=True, **args)
    (bad / "results.json").write_text('{"mode": "merge"}')
    with pytest.raises(OutputError, match="not a list of sweep records"):
        run_sweep(model, "lenet300", "fashion-mnist", data, output_dir=bad, resume=True, **args)
    assert (bad / "results.json").read_text() == '{"mode": "merge"}'  # left as it was


def test_count_macs_counts_every_kind_of_convolution() -> None:
    """1-D, 3-D and transposed convolutions were not counted (Conv2d and Linear only)."""
    assert count_macs(torch.nn.Conv1d(3, 8, 3), torch.zeros(1, 3, 10)) == 8 * 8 * 3 * 3
    conv3d = torch.nn.Conv3d(2, 4, 3, padding=1, groups=2)
    assert count_macs(conv3d, torch.zeros(2, 2, 3, 3, 3)) == 27 * 4 * 1 * 27
    up = torch.nn.ConvTranspose2d(8, 4, 2, stride=2)  # each input element meets 4·2·2 weights
    assert count_macs(up, torch.zeros(1, 8, 4, 4)) == 16 * 8 * 4 * 4
