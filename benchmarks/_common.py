"""Shared helpers of the benchmarks: machine description, medians, MACs, models."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import neuron_merging as nm
from neuron_merging.models import create

ROOT = Path(__file__).resolve().parent.parent

#: The VGG-16 widths of the paper's CIFAR-10 experiment.
VGG_PAPER_CFG: list[int | str] = [32, 64, "M", 128, 128, "M", 256, 256, 256, "M"]
VGG_PAPER_CFG += [256, 256, 256, "M", 256, 256, 256]

#: Where the authors' released checkpoints may be found (first hit wins).
CHECKPOINT_DIRS = [
    Path(os.environ.get("NM_CHECKPOINTS", "")),
    ROOT / "checkpoints",
    ROOT.parent / "shared" / "checkpoints",
]
CHECKPOINT_FILES = {
    "lenet300": "LeNet_300_100.original.300_100.bias.pth.tar",
    "resnet56": "ResNet.cifar10.original.56.pth.tar",
}


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    mem = _memory_gib()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "memory": f"{mem:.1f} GiB" if mem else "n/a",
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "neuron_merging": nm.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "load_average_1_5_15": _load(),
    }


def machine_markdown(info: dict[str, Any]) -> str:
    """The machine as a two-column Markdown table."""
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {v} |" for k, v in info.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- timing


def median(values: Sequence[float]) -> float:
    """The median (``nan`` for no values)."""
    return float(statistics.median(values)) if values else float("nan")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds one call of ``fn`` takes, and its result."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@dataclass
class SideBySide:
    """Times of two functions called alternately, and the last result of each."""

    first: list[float]
    second: list[float]
    first_result: Any
    second_result: Any

    @property
    def ratios(self) -> list[float]:
        """Per-round ``second / first`` time ratios."""
        return [b / a for a, b in zip(self.first, self.second, strict=True)]


def side_by_side(
    first: Callable[[], Any],
    second: Callable[[], Any],
    rounds: int,
    on_round: Callable[[Any, Any], None] | None = None,
) -> SideBySide:
    """Time ``first`` and ``second`` in ``rounds`` rounds, alternating which goes first.

    Alternating cancels drift (load from other processes, thermal state) between
    the two sides of a ratio. ``on_round(first_result, second_result)`` sees
    every round's results.
    """
    out = SideBySide([], [], None, None)
    for r in range(rounds):
        if r % 2 == 0:
            ta, out.first_result = timed(first)
            tb, out.second_result = timed(second)
        else:
            tb, out.second_result = timed(second)
            ta, out.first_result = timed(first)
        out.first.append(ta)
        out.second.append(tb)
        if on_round is not None:
            on_round(out.first_result, out.second_result)
    return out


def repeat_median(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return median([timed(fn)[0] for _ in range(repeats)])


def fmt_ms(seconds: float) -> str:
    """Seconds as milliseconds with sensible precision."""
    ms = seconds * 1e3
    if not np.isfinite(ms):
        return "—"
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"


def fmt_x(ratio: float) -> str:
    """A ratio as ``12.3×``."""
    if not np.isfinite(ratio):
        return "—"
    return f"{ratio:.0f}×" if ratio >= 100 else f"{ratio:.1f}×" if ratio >= 1 else f"{ratio:.2f}×"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; columns after the first are right-aligned."""
    out = ["| " + " | ".join(headers) + " |"]
    out.append("|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|")
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------- MACs


def macs(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """Multiply-accumulates of the ``Linear`` and ``Conv2d`` layers for one forward.

    Counted with forward hooks on the actual output shapes (so for the batch in
    ``inputs``): ``Linear`` costs ``in_features`` per output element, ``Conv2d``
    ``in_channels / groups · kh · kw`` per output element.
    """
    total = 0

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        else:
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    try:
        with torch.no_grad():
            model(*(inputs,) if isinstance(inputs, torch.Tensor) else inputs)
    finally:
        for h in handles:
            h.remove()
    return total


# --------------------------------------------------------------------------- models


def find_checkpoint(arch: str) -> Path | None:
    """The authors' released checkpoint of ``arch`` if it is available locally."""
    name = CHECKPOINT_FILES.get(arch)
    if name is None:
        return None
    for directory in CHECKPOINT_DIRS:
        if str(directory) and (directory / name).is_file():
            return directory / name
    return None


def plant_redundancy(model: nn.Module, seed: int = 0, noise: float = 0.3) -> nn.Module:
    """Give a randomly initialised model the redundancy of a trained one.

    In every ``Linear``/``Conv2d`` the second half of the neurons (in a random
    order) become noisy positive multiples of neurons of the first half, so a
    fraction of the pruned neurons find a similar partner, as they do in trained
    networks; batch-norm statistics are drawn at random (positive ``γ``). This
    only matters for the correctness cross-check and the fold cost: the merge
    time hardly depends on the values.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                w = m.weight.view(m.weight.shape[0], -1)
                n = w.shape[0]
                order = torch.randperm(n, generator=g)
                sources, targets = order[: n // 2], order[n // 2 :]
                src = sources[torch.randint(0, max(len(sources), 1), (len(targets),), generator=g)]
                scale = torch.rand(len(targets), 1, generator=g) + 0.5
                w[targets] = w[src] * scale + noise * w[targets]
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.05, generator=g)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model


def paper_model(arch: str, seed: int = 0) -> tuple[nn.Module, str]:
    """``arch`` with the released weights when available, else planted random weights.

    Returns the model (eval mode) and a description of its weights.
    """
    path = find_checkpoint(arch)
    if path is not None:
        from neuron_merging.checkpoint import load_model

        model, _ = load_model(path, arch=arch)
        return model.eval(), f"released checkpoint `{path.name}`"
    torch.manual_seed(seed)
    return plant_redundancy(create(arch).eval(), seed), "random init with planted redundancy"


def example_input(arch: str, batch: int = 1) -> torch.Tensor:
    """A random input batch for ``arch``."""
    shape = (1, 28, 28) if arch == "lenet300" else (3, 32, 32)
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))


def vgg_paper_keep(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """``keep={producer: width}`` for VGG-16's convolutions under the paper's cfg."""
    groups, _ = nm.find_groups(model, x)
    convs = [g.producer for g in groups if g.producer.startswith("feature.")]
    widths = [int(w) for w in VGG_PAPER_CFG if w != "M"]
    if len(convs) != len(widths):
        raise RuntimeError(f"expected {len(widths)} conv groups in VGG-16, found {len(convs)}")
    return dict(zip(convs, widths, strict=True))


def half_keep(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """``keep`` halving every VGG convolution (the smoke stand-in for the paper cfg)."""
    groups, _ = nm.find_groups(model, x)
    modules = dict(model.named_modules())
    return {
        g.producer: max(1, modules[g.producer].out_channels // 2)
        for g in groups
        if g.producer.startswith("feature.")
    }


def paper_setting(arch: str, model: nn.Module, x: torch.Tensor, ratio: float) -> dict[str, Any]:
    """The paper's ``nm.merge`` keyword arguments for ``arch``."""
    if arch == "lenet300":
        return {"ratio": ratio, "threshold": 0.45, "rounding": "round"}
    if arch == "vgg16":
        tiny = model.cfg[0] < 64  # the smoke runs' shrunken VGG
        return {
            "threshold": 0.1,
            "lam": 0.85,
            "keep": half_keep(model, x) if tiny else vgg_paper_keep(model, x),
            "exclude": ["classifier.0"],
        }
    if arch == "resnet56":
        return {"ratio": ratio, "threshold": 0.1, "lam": 0.85, "rounding": "floor"}
    raise ValueError(arch)
