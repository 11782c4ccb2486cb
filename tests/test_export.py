"""Verified export of compressed models (:mod:`neuron_merging.export`).

Each model of ``benchmarks/bench_export.py`` (the paper's networks at their
presets, a MobileNet-style CNN, an OPT decoder) is exported uncompressed first:
when that fails, the compressed test is skipped with the reason, since it is
not the compression that breaks the export. Then the compressed model must
export and its outputs must match eager PyTorch within ``1e-4`` (scaled by the
output magnitude above 1), on inputs other than the traced ones.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from neuron_merging.export import FORMATS, export_onnx, verify_export

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
bench_export = importlib.import_module("benchmarks.bench_export")

HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None
HAVE_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None
SLOW = {"vgg16", "resnet56"}  # about 15 and 40 s for every format on two cores


def _formats() -> list[Any]:
    out: list[Any] = []
    for fmt in FORMATS:
        if fmt == "onnx":
            out.append(pytest.param(("onnx", "torchscript"), id="onnx-torchscript"))
            out.append(pytest.param(("onnx", "dynamo"), id="onnx-dynamo"))
        else:
            out.append(pytest.param((fmt, "auto"), id=fmt))
    return out


_CACHE: dict[str, tuple[Any, Any, Any]] = {}


def _models(name: str) -> tuple[Any, Any, Any]:
    if name not in _CACHE:
        case = bench_export.cases()[name]
        torch.manual_seed(0)
        original = case.build().eval()
        _CACHE[name] = (case, original, case.compress(original).eval())
    return _CACHE[name]


@pytest.mark.parametrize("fmt", _formats())
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in bench_export.cases()],
)
def test_compressed_model_exports_and_matches(name: str, fmt: tuple[str, str]) -> None:
    if name == "opt":
        pytest.importorskip("transformers")
    kind, exporter = fmt
    if kind == "onnx" and not HAVE_ORT:
        pytest.skip("onnxruntime is not installed")
    if exporter == "dynamo" and not HAVE_ONNXSCRIPT:
        pytest.skip("onnxscript is not installed: torch.onnx.export(dynamo=True) needs it")
    case, original, compressed = _models(name)
    assert sum(p.numel() for p in compressed.parameters()) < sum(
        p.numel() for p in original.parameters()
    )
    kwargs = {"check_inputs": case.inputs(2), "onnx_exporter": exporter}
    before = verify_export(original, case.inputs(1), (kind,), **kwargs)[kind]
    if not before.ok:
        pytest.skip(f"the uncompressed {case.name} does not export to {kind}: {before.error}")
    after = verify_export(compressed, case.inputs(1), (kind,), **kwargs)[kind]
    assert after.error is None, after.error
    assert after.ok, f"max |Δ| {after.max_abs_diff} at output scale {after.max_abs_output}"
    assert after.max_abs_diff is not None and after.max_abs_diff <= 1e-4 * max(
        1.0, after.max_abs_output
    )


def test_a_failed_export_is_reported_not_raised() -> None:
    class DataDependent(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return x
            return -x

    check = verify_export(DataDependent(), torch.randn(5), ("torch.export",))["torch.export"]
    assert not check.ok and check.max_abs_diff is None
    assert check.error and check.error.split(":")[0]


def test_a_wrong_export_is_caught() -> None:
    class InputBakedIn(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * float(x.sum())  # jit.trace freezes the Python float

    check = verify_export(
        InputBakedIn(), torch.ones(3), ("jit.trace",), check_inputs=torch.full((3,), 2.0)
    )["jit.trace"]
    assert check.error is None and not check.ok
    assert check.max_abs_diff == pytest.approx(6.0)


def test_export_onnx_writes_a_checkable_file(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    path = export_onnx(net, torch.randn(2, 4), tmp_path / "m.onnx", exporter="torchscript")
    onnx.checker.check_model(onnx.load(str(path)))
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(net, torch.randn(2, 4), tmp_path / "x.onnx", exporter="tflite")
    with pytest.raises(ValueError, match="unknown export format"):
        verify_export(net, torch.randn(2, 4), ("tflite",))


def test_module_doctest_runs() -> None:
    import doctest

    import neuron_merging.export

    results = doctest.testmod(neuron_merging.export, verbose=False)
    assert results.attempted > 0 and results.failed == 0
