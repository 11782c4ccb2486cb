"""Keep the benchmarks from rotting: a smoke run of every script, and the reference oracle.

No timing is asserted here; the smoke run only checks that every benchmark runs
end to end and writes its tables, and that the engine's plans equal those of the
literal reference implementation (``benchmarks/reference.py``).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

import neuron_merging as nm

ROOT = Path(__file__).resolve().parent.parent


def _bench(name: str) -> ModuleType:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"benchmarks.{name}")


# --------------------------------------------------------------------------- smoke run


def test_every_benchmark_runs_in_smoke_mode(tmp_path: Path) -> None:
    run_all = _bench("run_all")
    docs, raw = tmp_path / "docs", tmp_path / "raw"
    run_all.main(["--smoke", "--out-dir", str(docs), "--raw-dir", str(raw)])

    text = (docs / "benchmarks.md").read_text()
    for heading in ("## Machine", "## Targets", "## 1. ", "## 2. ", "## 3. "):
        assert heading in text
    assert "| torch |" in text and "| torch threads |" in text
    assert "| model | verb | weights |" in text  # section 1
    assert "| n | ratio | criterion |" in text  # section 2
    assert "l2-GM" in text
    assert "| model | threads | batch | MACs / sample |" in text  # section 3
    assert "| model | threads | batch | conv/linear original → merged |" in text
    assert (docs / "merge_scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(docs.glob(".*.tmp"))  # atomic writes leave no temporaries

    merge = json.loads((raw / "bench_merge.json").read_text())
    s1 = merge["section1"]
    assert {r["arch"] for r in s1} == {"lenet300", "vgg16", "resnet56"}
    for row in s1:
        assert row["plans_equal"], (row["label"], row["mode"], row["problems"])
        assert row["output_rel_diff"] < 1e-4
        assert row["params_after"] < row["params_before"]
        assert set(row["split"]) == {"trace", "select", "similarity", "assign", "fold", "rebuild"}
        assert row["discovery_b1"] > 0 and row["forward_b1"] > 0
        assert row["trace_over_forward"] > 0
    assert "| model | forward pass, batch 1 | nm.find_groups | discovery / forward |" in text
    s2 = merge["section2"]
    assert {r["criterion"] for r in s2} == {"l1-norm", "l2-norm", "l2-GM"}
    assert {r["ratio"] for r in s2} == {0.5, 0.8}
    for row in s2:
        assert row["t_merge"] > 0 and row["t_mm"] > 0 and row["peak_delta_mb"] >= 0

    latency = json.loads((raw / "bench_latency.json").read_text())
    s3 = latency["section3"]
    assert {r["batch"] == 1 for r in s3} == {True, False}
    for row in s3:
        assert set(row["latency"]) == {"original", "pruned", "merged"}
        assert row["threads"] >= 1
        if row["large_batch"]:
            for part in row["breakdown"].values():
                assert part["kernel"] > 0 and part["other"] > 0
        assert row["macs"]["merged"] == row["macs"]["pruned"] < row["macs"]["original"]


# --------------------------------------------------------------------------- reference oracle


def _planted(model: nn.Module, seed: int, negative_gamma: bool = False) -> nn.Module:
    common = _bench("_common")
    common.plant_redundancy(model, seed)
    if negative_gamma:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight[::3] *= -1.0
    return model.eval()


def _mlp(bias: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(12, 16, bias=bias),
        nn.ReLU(),
        nn.Linear(16, 10, bias=bias),
        nn.ReLU(),
        nn.Linear(10, 3, bias=bias),
    )
    return _planted(model, seed)


class _ConvBN(nn.Module):
    """conv (with bias, so μ ← μ − b matters) → BN → ReLU → conv → BN → ReLU → flatten → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 10, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(10)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(10 * 2 * 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(torch.flatten(x, 1))


def _cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = _planted(_ConvBN(), seed, negative_gamma=True)
    with torch.no_grad():
        model.conv1.bias.normal_(0.0, 0.2)
    return model


CASES = {
    "mlp-bias": (lambda: _mlp(True, 1), (1, 12)),
    "mlp-nobias": (lambda: _mlp(False, 2), (1, 12)),
    "cnn-bn": (lambda: _cnn(3), (1, 3, 4, 4)),
}


@pytest.mark.parametrize("ratio", [0.3, 0.6])
@pytest.mark.parametrize("bn_rule", ["paper", "exact"])
@pytest.mark.parametrize("criterion", ["l1-norm", "l2-norm", "l2-GM"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_engine_plans_equal_the_literal_reference(
    case: str, criterion: str, bn_rule: str, ratio: float
) -> None:
    reference = _bench("reference")
    factory, shape = CASES[case]
    model = factory()
    x = torch.randn(*shape)
    kwargs = {"ratio": ratio, "criterion": criterion, "bn_rule": bn_rule, "lam": 0.85}
    kwargs["threshold"] = 0.3 if case.startswith("mlp") else 0.1
    result = nm.merge(model, x, **kwargs)
    groups, _ = nm.find_groups(model, x)
    ref_model, ref_plans = reference.reference_merge(model, groups, **kwargs)

    assert reference.compare_plans(result.plans, ref_plans) == []
    assert sum(p.merged for p in result.plans) > 0  # the case exercises merging
    xb = torch.randn(5, *shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(result.model(xb), ref_model(xb), rtol=1e-4, atol=1e-5)


def test_reference_prune_mode_and_threshold_none() -> None:
    reference = _bench("reference")
    model, x = _cnn(4), torch.randn(1, 3, 4, 4)
    groups, _ = nm.find_groups(model, x)
    pruned = nm.prune(model, x, ratio=0.5)
    _, ref_plans = reference.reference_merge(model, groups, ratio=0.5, mode="prune")
    assert reference.compare_plans(pruned.plans, ref_plans) == []
    merged = nm.merge(model, x, ratio=0.5, threshold=None, bn_rule="exact")
    _, ref_plans = reference.reference_merge(
        model, groups, ratio=0.5, threshold=None, bn_rule="exact"
    )
    assert reference.compare_plans(merged.plans, ref_plans) == []


def test_compare_plans_reports_a_difference() -> None:
    reference = _bench("reference")
    model, x = _mlp(True, 5), torch.randn(1, 12)
    groups, _ = nm.find_groups(model, x)
    result = nm.merge(model, x, ratio=0.5, threshold=None)
    _, ref_plans = reference.reference_merge(model, groups, ratio=0.5, threshold=None)
    ref_plans[0].scale = ref_plans[0].scale * 1.01
    problems = reference.compare_plans(result.plans, ref_plans)
    assert len(problems) == 1 and "scales differ" in problems[0]


def test_ab_discovery_compares_against_an_earlier_commit() -> None:
    """The in-process comparison imports the package of another commit under another
    name, and times both side by side."""
    import shutil
    import subprocess

    if (
        shutil.which("git") is None
        or subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True
        ).returncode
    ):
        pytest.skip("needs a git checkout")
    ab = _bench("ab_discovery")
    rows = ab.run("HEAD", 3)
    assert [r["model"] for r in rows][:3] == ["LeNet-300-100", "VGG-16", "ResNet-56"]
    assert sys.modules[ab._BASE].find_groups is not nm.find_groups
    for row in rows:  # no bound on the ratios: timings are noisy (docs/benchmarks.md)
        assert row["base_ratio"] > 0 and row["this_ratio"] > 0
        assert math.isfinite(row["this_over_base"]) and row["this_over_base"] > 0
