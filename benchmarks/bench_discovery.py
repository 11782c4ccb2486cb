"""Discovery cost: one recorded forward pass against the forward pass itself, and torch.export.

For each model, at batch 1, the forward pass and ``nm.find_groups`` are timed side by
side (interleaved, alternating which goes first, after the same warm-up); the ratio is
the median of the per-round ratios. ``torch.export.export`` (the alternative recorder
considered for discovery) is timed on the same models, and on a ``transformers`` model
whether it succeeds at all.

Usage::

    python -m benchmarks.bench_discovery [--rounds N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import neuron_merging as nm
from neuron_merging.core import record as record_module
from neuron_merging.core.record import record

from . import _common as C


class _NoOpMode(torch.overrides.TorchFunctionMode):
    """A torch-function mode that only forwards every call: the recorder's interception
    without its bookkeeping."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


def _intercepted(model: nn.Module, call: Callable[[], Any]) -> None:
    """``call()`` under a no-op mode, with every module's ``forward`` wrapped by a no-op
    wrapper: the floor of any recorder built on them (every torch function goes through
    Python, every module call through one more Python function)."""
    modules = list(model.modules())
    for module in modules:
        forward = module.forward

        def wrapper(*args: Any, _forward: Callable[..., Any] = forward, **kwargs: Any) -> Any:
            return _forward(*args, **kwargs)

        module.__dict__["forward"] = wrapper
    try:
        with torch.no_grad(), _NoOpMode():
            call()
    finally:
        for module in modules:
            del module.__dict__["forward"]


class _Skeleton(record_module._Recorder):
    """The recorder with its bookkeeping switched off: its forward wrappers, leaf switching
    and setup, but no operation or value is recorded."""

    def add_op(self, *args: Any, **kwargs: Any) -> None:
        pass

    def leaf_call(self, name: str, module: nn.Module, forward: Callable[..., Any]) -> Any:
        def leaf(*args: Any, **kwargs: Any) -> Any:
            with record_module._DISABLE_TORCH_FUNCTION():
                return forward(*args, **kwargs)

        return leaf

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


def _skeleton(model: nn.Module, x: Any) -> None:
    """``record(model, x)`` run by :class:`_Skeleton`."""
    real = record_module._Recorder
    record_module._Recorder = _Skeleton  # type: ignore[misc]
    try:
        record(model, x)
    finally:
        record_module._Recorder = real  # type: ignore[misc]


class _Block(nn.Module):
    """A pre-norm ViT block: multi-head self-attention and a GELU MLP, with residuals."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A small Vision Transformer for 32×32 images (patch 4, 6 blocks of width 192)."""

    def __init__(self, dim: int = 192, depth: int = 6, heads: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 65, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, 4 * dim) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def _models() -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    out = []
    for arch, label in (
        ("lenet300", "LeNet-300-100"),
        ("vgg16", "VGG-16"),
        ("resnet56", "ResNet-56"),
    ):
        model, _ = C.paper_model(arch)
        out.append((label, model.eval(), C.example_input(arch)))
    out.append(("ViT (6 blocks, width 192)", ViT().eval(), C.example_input("vgg16")))
    return out


def _export_seconds(model: nn.Module, x: Any) -> float | str:
    def run() -> None:
        torch.export.export(
            model,
            (x,) if isinstance(x, torch.Tensor) else (),
            kwargs=None if isinstance(x, torch.Tensor) else x,
        )

    try:
        return C.repeat_median(run, 3, warmup=1)
    except Exception as exc:  # report, do not hide, what torch.export refuses
        return f"fails ({type(exc).__name__})"


def _jit_trace_seconds(model: nn.Module, x: Any) -> float | str:
    """``torch.jit.trace`` (PyTorch's C++ recorder), for comparison only."""
    import warnings

    def run() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(x, torch.Tensor):
                torch.jit.trace(model, x, check_trace=False)
            else:
                torch.jit.trace(model, example_kwarg_inputs=x, check_trace=False, strict=False)

    try:
        return C.repeat_median(run, 3, warmup=1)
    except Exception as exc:  # report, do not hide, what the tracer refuses
        return f"fails ({type(exc).__name__})"


def _transformers_case() -> tuple[str, nn.Module, dict[str, torch.Tensor]] | None:
    try:
        from transformers import BertConfig, BertModel
    except ImportError:
        return None
    config = BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=32,
    )  # fmt: skip
    model = BertModel(config).eval()
    return "BERT (transformers, 2 layers)", model, {"input_ids": torch.randint(0, 100, (1, 16))}


def run(rounds: int) -> list[dict[str, Any]]:
    """One row per model: forward, discovery, their ratio, and torch.export."""
    rows = []
    cases: list[tuple[str, nn.Module, Any]] = list(_models())
    extra = _transformers_case()
    if extra is not None:
        cases.append(extra)
    for label, model, x in cases:
        call: Callable[[], Any]
        if isinstance(x, dict):
            call = lambda model=model, x=x: model(**x)  # noqa: E731
        else:
            call = lambda model=model, x=x: model(x)  # noqa: E731

        def forward(call: Callable[[], Any] = call) -> None:
            with torch.no_grad():
                call()

        def discover(model: nn.Module = model, x: Any = x) -> None:
            nm.find_groups(model, x)

        def recorded(model: nn.Module = model, x: Any = x) -> None:
            record(model, x)

        def floor(model: nn.Module = model, call: Callable[[], Any] = call) -> None:
            _intercepted(model, call)

        def skeleton(model: nn.Module = model, x: Any = x) -> None:
            _skeleton(model, x)

        for _ in range(3):
            forward()
            discover()
            recorded()
            floor()
            skeleton()
        timed = C.side_by_side(forward, discover, rounds)
        timed_record = C.side_by_side(forward, recorded, rounds)
        timed_floor = C.side_by_side(forward, floor, rounds)
        timed_skeleton = C.side_by_side(forward, skeleton, rounds)
        groups, _ = nm.find_groups(model, x)
        export = _export_seconds(model, x)
        traced = _jit_trace_seconds(model, x)
        fwd = C.median(timed.first)
        rows.append(
            {
                "model": label,
                "forward_ms": 1e3 * fwd,
                "discovery_ms": 1e3 * C.median(timed.second),
                "ratio": C.median(timed.ratios),
                "record_ratio": C.median(timed_record.ratios),
                "floor_ratio": C.median(timed_floor.ratios),
                "skeleton_ratio": C.median(timed_skeleton.ratios),
                "export_ms": 1e3 * export if isinstance(export, float) else export,
                "export_ratio": export / fwd if isinstance(export, float) else None,
                "jit_trace_ratio": traced / fwd if isinstance(traced, float) else traced,
                "groups": len(groups),
            }
        )
    return rows


def to_markdown(rows: list[dict[str, Any]], rounds: int) -> str:
    """The discovery table."""
    lines = [
        f"Batch 1, {torch.get_num_threads()} thread(s), medians over {rounds} interleaved rounds "
        "(ratio: median of per-round ratios); `torch.export.export` and `torch.jit.trace`: "
        "median of 3 calls. "
        "*Recording* is `core.record.record` alone (the rest of discovery is the group "
        "analysis); *recorder without bookkeeping* is `record` with its operation and value "
        "bookkeeping switched off (its forward wrappers, leaf switching and setup remain); "
        "*interception floor* is the forward pass under a no-op torch-function mode with every "
        "module's forward wrapped by a no-op wrapper, what any recorder built on them costs "
        "before it records anything.",
        "",
        "| model | forward pass | nm.find_groups | discovery / forward | recording / forward "
        "| recorder without bookkeeping / forward | interception floor / forward "
        "| torch.export | export / forward | torch.jit.trace / forward | groups |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        export = r["export_ms"]
        shown = f"{export:.1f} ms" if isinstance(export, float) else export
        ratio = f"{r['export_ratio']:.0f}×" if r["export_ratio"] else "—"
        jit = r["jit_trace_ratio"]
        traced = f"{jit:.0f}×" if isinstance(jit, float) else jit
        lines.append(
            f"| {r['model']} | {r['forward_ms']:.2f} ms | {r['discovery_ms']:.2f} ms "
            f"| **{r['ratio']:.2f}** | {r['record_ratio']:.2f} | {r['skeleton_ratio']:.2f} "
            f"| {r['floor_ratio']:.2f} "
            f"| {shown} | {ratio} | {traced} | {r['groups']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = run(args.rounds)
    print(to_markdown(rows, args.rounds))
    if args.out is not None:
        args.out.write_text(
            json.dumps(rows, indent=2, default=lambda v: None if math.isnan(v) else v)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
