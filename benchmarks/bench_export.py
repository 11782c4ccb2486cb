"""The export table: model × format, maximum output difference to eager PyTorch.

Usage::

    python -m benchmarks.bench_export [--models NAME ...] [--out FILE.md]

Every model is exported uncompressed first and then compressed, to
``torch.export``, ONNX (run with onnxruntime; the ``torch.export``-based
exporter when ``onnxscript`` is installed, else the TorchScript-based one, and
both with ``--both-onnx``) and ``torch.jit.trace``. The outputs are compared on
inputs other than the traced ones. The tests in ``tests/test_export.py`` use
the same cases.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import neuron_merging as nm
from neuron_merging import models
from neuron_merging.checkpoint import load_model
from neuron_merging.experiments import compression_config, example_input
from neuron_merging.export import FORMATS, ExportCheck, default_onnx_exporter, verify_export

from . import _common as C


class _Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus an identity or 1×1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + self.shortcut(x))


class CoupledResNet(nn.Module):
    """A small ResNet whose residual streams ``coupled=True`` compresses jointly."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))
        self.blocks = nn.Sequential(
            _Block(width, width, 1), _Block(width, 2 * width, 2), _Block(2 * width, 2 * width, 1)
        )
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MobileNetStyle(nn.Module):
    """A small MobileNet-style CNN: depthwise-separable ReLU6 blocks, a ReLU head.

    The depthwise convolutions carry their input's channel group (sliced with it,
    pruned, not merged: ReLU6); the 1×1 head conv (→ BN → ReLU → global pool) and the
    hidden classifier layer are merged.
    """

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()

        def separable(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                nn.ReLU6(inplace=True),
                nn.Conv2d(cin, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU6(inplace=True),
            ]

        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU6(inplace=True),
            *separable(width, 2 * width, 1),
            *separable(2 * width, 4 * width, 2),
            nn.Conv2d(4 * width, 8 * width, 1, bias=False),
            nn.BatchNorm2d(8 * width),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8 * width, 4 * width)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.fc2(self.relu(self.fc1(x)))


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial batch-norm statistics, as after training."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))
    return model


def _opt() -> nn.Module:
    import transformers

    config = transformers.OPTConfig(
        vocab_size=128,
        hidden_size=32,
        word_embed_proj_dim=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        use_cache=False,
    )
    return transformers.OPTForCausalLM(config)


@dataclass
class Case:
    """One model of the export table."""

    name: str
    build: Callable[[], nn.Module]
    compress: Callable[[nn.Module], nn.Module]
    inputs: Callable[[int], torch.Tensor]  # seed → an input batch


def _checkpoint(arch: str) -> Path | None:
    """The authors' released checkpoint of ``arch`` if it is on disk."""
    for folder in C.CHECKPOINT_DIRS:
        file = folder / C.CHECKPOINT_FILES.get(arch, "-")
        if str(folder) and file.is_file():
            return file
    return None


def _trained_or_random(arch: str) -> nn.Module:
    """The released checkpoint when it is on disk, else a seeded random init."""
    file = _checkpoint(arch)
    if file is not None:
        return load_model(file, arch=arch)[0]
    torch.manual_seed(0)
    return _randomize_bn(models.create(arch), 0)


def _paper(arch: str, dataset: str, ratio: float | None) -> Case:
    def compress(model: nn.Module) -> nn.Module:
        config = compression_config(arch, dataset, "merge", "l1-norm", ratio, model=model)
        return nm.compress(model, example_input(arch), config).model

    shape = tuple(example_input(arch).shape[1:])
    label = "paper widths" if ratio is None else f"r={ratio}"
    weights = "released weights" if _checkpoint(arch) else "random init"
    return Case(
        f"{arch} ({label}, {weights})",
        lambda: _trained_or_random(arch),
        compress,
        lambda seed: torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed)),
    )


def _opt_compress(model: nn.Module) -> nn.Module:
    names = dict(model.named_modules())
    groups = [
        nm.MergeGroup(producer=n, consumer=n[:-3] + "fc2")
        for n in names
        if n.endswith(".fc1") and n[:-3] + "fc2" in names
    ]
    return nm.merge(model, groups=groups, ratio=0.5, threshold=None).model


def cases() -> dict[str, Case]:
    """The export table's models, by short name."""
    out = {
        "lenet300": _paper("lenet300", "fashion-mnist", 0.5),
        "vgg16": _paper("vgg16", "cifar10", None),
        "resnet56": _paper("resnet56", "cifar10", 0.5),
        "mobilenet": Case(
            "MobileNet-style (r=0.5)",
            lambda: _randomize_bn(MobileNetStyle(), 0),
            lambda m: nm.merge(m, torch.randn(1, 3, 32, 32), ratio=0.5, threshold=None).model,
            lambda seed: torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)),
        ),
        "resnet-coupled": Case(
            "ResNet, coupled streams (r=0.5)",
            lambda: _randomize_bn(CoupledResNet(), 0),
            lambda m: (
                nm.merge(
                    m, torch.randn(1, 3, 32, 32), ratio=0.5, threshold=None, coupled=True
                ).model
            ),
            lambda seed: torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)),
        ),
        "opt": Case(
            "OPT decoder (fc1→fc2 r=0.5)",
            _opt,
            _opt_compress,
            lambda seed: torch.randint(
                0, 128, (2, 9), generator=torch.Generator().manual_seed(seed)
            ),
        ),
    }
    return out


def run_case(
    case: Case, formats: Sequence[str] = FORMATS, onnx_exporter: str = "auto"
) -> dict[str, Any]:
    """Export ``case`` before and after compression; the checks of both."""
    torch.manual_seed(0)
    original = case.build().eval()
    compressed = case.compress(original).eval()
    params = (nm.count_parameters(original), nm.count_parameters(compressed))
    checks: dict[str, dict[str, ExportCheck]] = {}
    for label, model in (("original", original), ("compressed", compressed)):
        checks[label] = verify_export(
            model,
            case.inputs(1),
            formats,
            check_inputs=case.inputs(2),
            onnx_exporter=onnx_exporter,
        )
    return {"case": case, "params": params, "checks": checks}


def _cell(check: ExportCheck) -> str:
    if check.max_abs_diff is None:
        return f"fails: {check.error}"
    mark = "" if check.ok else " **> tol**"
    return f"{check.max_abs_diff:.1e}{mark}"


def _scale(checks: dict[str, ExportCheck]) -> str:
    return f"{max(c.max_abs_output for c in checks.values()):.3g}"


def table(results: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Markdown: one row per model, max |Δ| of the compressed model per format.

    ``max abs output`` is the largest eager output magnitude; a difference
    passes when it is at most ``1e-4 · max(1, max abs output)``.

    ``columns`` are ``(heading, key)`` pairs, the key naming a format in the
    results (``"onnx@dynamo"`` for an extra ONNX exporter run).
    """
    rows = []
    for r in results:
        cells = []
        for _, key in columns:
            original, compressed = r["checks"]["original"][key], r["checks"]["compressed"][key]
            if original.ok:
                cells.append(_cell(compressed))
            elif original.error:
                cells.append(f"uncompressed fails: {original.error}")
            else:
                cells.append(f"uncompressed off by {original.max_abs_diff:.1e}")
        params = f"{r['params'][0]:,} → {r['params'][1]:,}"
        rows.append([r["case"].name, params, _scale(r["checks"]["compressed"]), *cells])
    return C.md_table(["model", "params", "max abs output", *(h for h, _ in columns)], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(cases()), default=list(cases()))
    parser.add_argument(
        "--both-onnx", action="store_true", help="run the dynamo and TorchScript ONNX exporters"
    )
    parser.add_argument("--out", help="also write the Markdown table (and .json) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    default = default_onnx_exporter()
    columns = [("torch.export", "torch.export"), (f"ONNX ({default})", "onnx")]
    extra = "torchscript" if default == "dynamo" else "dynamo"
    if args.both_onnx:
        columns.append((f"ONNX ({extra})", "onnx@" + extra))
    columns.append(("jit.trace", "jit.trace"))
    results = []
    for name in args.models:
        case = cases()[name]
        result = run_case(case)
        if args.both_onnx:
            more = run_case(case, ("onnx",), onnx_exporter=extra)
            for label in ("original", "compressed"):
                result["checks"][label]["onnx@" + extra] = more["checks"][label]["onnx"]
        results.append(result)
        print(f"  {case.name}: done", file=sys.stderr)
    text = table(results, columns)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        raw = [
            {
                "model": r["case"].name,
                "params": r["params"],
                "checks": {
                    label: {k: vars(c) for k, c in checks.items()}
                    for label, checks in r["checks"].items()
                },
            }
            for r in results
        ]
        out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
