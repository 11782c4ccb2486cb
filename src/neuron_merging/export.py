"""Verified export of (compressed) models: ``torch.export``, ONNX and ``torch.jit.trace``.

A compressed model is an ordinary module with smaller layers, so the standard
exporters apply; :func:`verify_export` runs each of them and compares the
exported program's outputs with the eager model's, so a deployment pipeline
can check the round trip instead of assuming it.

ONNX is written by PyTorch's ``torch.export``-based exporter when ``onnxscript``
is installed (the default exporter since PyTorch 2.9), and otherwise by the
TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``), which
PyTorch has deprecated. The ONNX file is run with ``onnxruntime``. Both are
optional dependencies (the ``export`` extra).

Example::

    >>> import torch, neuron_merging as nm
    >>> from neuron_merging.export import verify_export
    >>> net = torch.nn.Sequential(
    ...     torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    >>> small = nm.merge(net, torch.randn(1, 8), ratio=0.5).model
    >>> checks = verify_export(small, torch.randn(4, 8), formats=("torch.export", "jit.trace"))
    >>> [(c.format, c.ok) for c in checks.values()]
    [('torch.export', True), ('jit.trace', True)]
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import io
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ._io import resolve_target, temporary_prefix
from .core.errors import ConfigError, OutputError

__all__ = [
    "FORMATS",
    "ExportCheck",
    "default_onnx_exporter",
    "export_onnx",
    "tensor_outputs",
    "verify_export",
]

#: The formats :func:`verify_export` knows, in the order it runs them.
FORMATS = ("torch.export", "onnx", "jit.trace")

Inputs = Tensor | Sequence[Tensor]


@dataclass
class ExportCheck:
    """The outcome of exporting a model to one format and running it.

    Attributes:
        format: ``"torch.export"``, ``"onnx"`` or ``"jit.trace"``.
        ok: exported, ran, and ``max_abs_diff <= atol * max(1, max_abs_output)``.
        max_abs_diff: the largest absolute output difference (``None`` if it
            did not run).
        max_abs_output: the largest absolute eager output (the scale of the
            difference: float32 rounding grows with it).
        seconds: export plus one run.
        detail: how it was exported (for ONNX, which exporter).
        error: why it failed, if it did.
    """

    format: str
    ok: bool
    max_abs_diff: float | None
    seconds: float
    max_abs_output: float = 0.0
    detail: str = ""
    error: str | None = None


class _TensorOutputs(nn.Module):
    """``model`` with its outputs flattened to a tuple of tensors (exporters need that)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        return tensor_outputs(self.model(*inputs))


def tensor_outputs(output: Any) -> tuple[Tensor, ...]:
    """Every tensor in ``output`` (a tensor, tuple, dict or Hugging Face ``ModelOutput``)."""
    return tuple(leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, Tensor))


def _as_tuple(inputs: Inputs) -> tuple[Tensor, ...]:
    if isinstance(inputs, Tensor):
        return (inputs,)
    out = tuple(inputs)
    if not all(isinstance(t, Tensor) for t in out):
        raise ConfigError("example inputs must be a tensor or a sequence of tensors")
    return out


def default_onnx_exporter() -> str:
    """The ONNX exporter :func:`export_onnx` uses by default: ``"dynamo"`` or ``"torchscript"``.

    ``"dynamo"`` (``torch.onnx.export(..., dynamo=True)``) needs ``onnxscript``;
    without it the deprecated TorchScript-based exporter is the only one that runs.
    """
    return "dynamo" if importlib.util.find_spec("onnxscript") is not None else "torchscript"


def export_onnx(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | Path,
    *,
    exporter: str = "auto",
) -> Path:
    """Write ``model`` (outputs flattened to tensors) as ONNX to ``path``.

    ``exporter`` is ``"dynamo"``, ``"torchscript"`` or ``"auto"`` (see
    :func:`default_onnx_exporter`). Returns ``path``. The exporter writes into a
    temporary folder beside ``path``; only a complete export replaces ``path`` (and the
    external-data files it refers to), so a failed one (a full disk, an interrupt)
    leaves an earlier file as it was. A folder or a device as ``path``, and failed
    writes, are :class:`~neuron_merging.OutputError`.
    """
    if exporter == "auto":
        exporter = default_onnx_exporter()
    if exporter not in ("dynamo", "torchscript"):
        raise ConfigError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")
    inputs = _as_tuple(example_inputs)
    target = resolve_target(path)
    directory = target.parent if str(target.parent) else Path(".")
    wrapped = _TensorOutputs(model)
    wrapped.train(model.training)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=temporary_prefix(target)) as tmp:
            staged = Path(tmp) / target.name  # the same name: external data refer to it
            with warnings.catch_warnings():
                # The TorchScript exporter's deprecation notice is the reason
                # default_onnx_exporter() prefers the dynamo one; it carries no information
                # about this model.
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX.*")
                warnings.simplefilter("ignore", torch.jit.TracerWarning)  # verify_export checks
                torch.onnx.export(
                    wrapped, inputs, str(staged), dynamo=exporter == "dynamo", verbose=False
                )
            written = sorted(Path(tmp).iterdir(), key=lambda p: p == staged)  # the model last
            for part in written:
                with open(part, "rb+") as handle:
                    os.fsync(handle.fileno())
            for part in written:
                os.replace(part, directory / part.name)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"No space left on device ({path})") from exc
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return target


def _max_diff(got: Sequence[Any], want: Sequence[Tensor]) -> float:
    if len(got) != len(want):
        raise RuntimeError(f"{len(got)} outputs instead of {len(want)}")
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        a = torch.as_tensor(a)
        if tuple(a.shape) != tuple(b.shape):
            raise RuntimeError(f"output shape {tuple(a.shape)} instead of {tuple(b.shape)}")
        if b.numel():
            worst = max(worst, float((a.to(torch.float64) - b.to(torch.float64)).abs().max()))
    return worst


def _run_format(
    fmt: str,
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    check: tuple[Tensor, ...],
    work: Path,
    exporter: str,
) -> tuple[list[Any], str]:
    wrapped = _TensorOutputs(model)
    wrapped.train(model.training)
    if fmt == "torch.export":
        program = torch.export.export(wrapped, inputs)
        return list(program.module()(*check)), f"torch {torch.__version__}"
    if fmt == "jit.trace":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(wrapped, inputs, strict=False, check_trace=False)
        return list(traced(*check)), "strict=False"
    if fmt == "onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            raise RuntimeError("onnxruntime is not installed (pip install onnxruntime)")
        import onnxruntime

        exporter = default_onnx_exporter() if exporter == "auto" else exporter
        file = export_onnx(model, inputs, work / "model.onnx", exporter=exporter)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(
            str(file), options, providers=["CPUExecutionProvider"]
        )
        names = [i.name for i in session.get_inputs()]
        if len(names) > len(check):
            raise RuntimeError(f"the ONNX graph wants {len(names)} inputs, {len(check)} given")
        feed = {name: t.detach().cpu().numpy() for name, t in zip(names, check, strict=False)}
        return list(session.run(None, feed)), f"{exporter} exporter, onnxruntime"
    raise ConfigError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")


def verify_export(
    model: nn.Module,
    example_inputs: Inputs,
    formats: Sequence[str] = FORMATS,
    *,
    check_inputs: Inputs | None = None,
    atol: float = 1e-4,
    onnx_exporter: str = "auto",
) -> dict[str, ExportCheck]:
    """Export ``model`` to each of ``formats``, run it, compare with the eager outputs.

    Args:
        model: the module (put it in eval mode first for inference exports).
        example_inputs: what the exporters trace with.
        formats: any of :data:`FORMATS`.
        check_inputs: inputs of the same shapes to compare on (default: the
            example inputs); other values than the traced ones catch a trace
            that baked an input in.
        atol: the largest output difference that counts as equal, for outputs of
            magnitude up to 1; larger outputs scale it by their largest
            magnitude (float32 rounding is relative).
        onnx_exporter: ``"dynamo"``, ``"torchscript"`` or ``"auto"`` (see
            :func:`default_onnx_exporter`).

    Returns:
        One :class:`ExportCheck` per format, in ``formats`` order. A format
        that fails to export or run is reported (``ok=False`` with ``error``),
        not raised.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown export format(s) {unknown}; choose from {', '.join(FORMATS)}")
    inputs = _as_tuple(example_inputs)
    check = inputs if check_inputs is None else _as_tuple(check_inputs)
    with torch.no_grad():
        want = tensor_outputs(model(*check))
    scale = max(
        (float(t.abs().max()) for t in want if t.numel() and t.is_floating_point()), default=0.0
    )
    results: dict[str, ExportCheck] = {}
    with tempfile.TemporaryDirectory(prefix="nm-export.") as tmp:
        for fmt in formats:
            t0 = time.perf_counter()
            try:
                with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
                    got, detail = _run_format(fmt, model, inputs, check, Path(tmp), onnx_exporter)
                diff = _max_diff(got, want)
            except Exception as exc:  # every exporter raises its own types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                results[fmt] = ExportCheck(
                    fmt,
                    False,
                    None,
                    time.perf_counter() - t0,
                    scale,
                    error=f"{type(exc).__name__}: {first[:300]}",
                )
                continue
            ok = diff <= atol * max(1.0, scale)
            results[fmt] = ExportCheck(fmt, ok, diff, time.perf_counter() - t0, scale, detail)
    return results
