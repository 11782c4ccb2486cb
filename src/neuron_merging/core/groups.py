"""Discovery: find every merge group in a model.

A *merge group* is a producer (``nn.Linear`` or ``nn.Conv2d``, optionally
followed by batch norm), then only channel-wise, positively homogeneous
operations, then exactly one consumer (``nn.Linear`` or ``nn.Conv2d``). Merging
pruned neurons of the producer into kept ones and folding the scales into the
consumer is exact for positive multiples because ``f(s·z) = s·f(z)`` for every
operation in between.

Groups are found in the dataflow graph of the model's ``forward``, recorded by
the light tracer of :mod:`._trace` (or by :mod:`torch.fx` when that tracer
cannot follow the code). Example inputs give the tensor shapes needed to check
that a flatten keeps each channel's features contiguous; they are computed on
the ``meta`` device, without arithmetic, and only when a decision needs them. A
producer whose output reaches anything else (a residual add, a concat, a second
consumer, the model output) is left intact and reported. Models that cannot be
traced can name their groups explicitly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from . import _trace
from .errors import ModelError

_PRODUCERS = (nn.Linear, nn.Conv2d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_ELEMENTWISE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
_POOL_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.dropout, torch.nn.functional.relu_}
_POOL_FUNCTIONS = {
    F.max_pool1d,
    F.max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "contiguous", "clone"}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_METADATA_METHODS = {"size", "dim"}


@dataclass(frozen=True)
class MergeGroup:
    """One producer → (batch norm) → channel-wise ops → consumer chain.

    Attributes:
        producer: qualified name of the ``nn.Linear``/``nn.Conv2d`` whose output
            neurons are pruned and merged.
        consumer: qualified name of the layer whose input dimension absorbs them.
        bn: qualified name of the batch norm right after the producer, if any.
        features_per_channel: how many consecutive consumer input features each
            producer channel owns (``H·W`` when a flatten sits between a conv and
            a Linear, otherwise 1). ``None`` lets :func:`resolve_groups` infer it.
    """

    producer: str
    consumer: str
    bn: str | None = None
    features_per_channel: int | None = None


@dataclass(frozen=True)
class SkippedLayer:
    """A candidate producer that is left untouched, and why."""

    name: str
    reason: str


class _FxTracer(fx.Tracer):
    """An fx tracer that also traces through modules created inside ``forward``."""

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            self.path_of_module(m)
        except NameError:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


def _symbolic_trace(
    model: nn.Module, num_inputs: int, modules: dict[str, nn.Module]
) -> _trace.Graph:
    """The dataflow graph of ``model``: the light tracer, else ``torch.fx``."""
    try:
        return _trace.trace(model, num_inputs, modules)
    except Exception:  # anything the light tracer cannot follow: torch.fx may
        pass
    try:
        return _trace.from_fx(_FxTracer().trace(model))
    except Exception as exc:  # fx raises many unrelated exception types
        raise ModelError(
            f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else exc!r}); pass the merge groups "
            "explicitly, e.g. groups=[nm.MergeGroup(producer='fc1', bn=None, consumer='fc2')]"
        ) from exc


def _run_failed(model: nn.Module, exc: Exception) -> ModelError:
    return ModelError(
        f"running {type(model).__name__} on the example inputs failed "
        f"({type(exc).__name__}: {exc}); check their shapes and dtypes"
    )


def trace(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Symbolically trace ``model`` with ``torch.fx`` and annotate every node with its shape."""
    graph = _FxTracer().trace(model)
    gm = fx.GraphModule(model, graph)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:  # the user's forward may raise anything
        raise _run_failed(model, exc) from exc
    return gm


class _Shapes:
    """Tensor shapes of graph nodes, computed on first request by one run of the graph.

    Most merge groups (conv → conv, linear → linear) are decided from module
    types alone; shapes are computed only when a reshape or a conv → linear
    boundary needs them. The graph is first run on ``meta`` tensors (shapes
    only, no arithmetic); if some operation has no meta implementation, it is
    run once on the real example inputs.
    """

    def __init__(self, model: nn.Module, graph: _trace.Graph, inputs: Sequence[Any]) -> None:
        self._model, self._graph, self._inputs = model, graph, inputs
        self._shapes: dict[_trace.Node, tuple[int, ...]] | None = None

    def __call__(self, node: _trace.Node) -> tuple[int, ...] | None:
        if self._shapes is None:
            with torch.no_grad():
                try:
                    self._shapes = _trace.run(self._model, self._graph, self._inputs, meta=True)
                except Exception:  # no meta kernel, data-dependent code, ...: run for real
                    try:
                        self._shapes = _trace.run(
                            self._model, self._graph, self._inputs, meta=False
                        )
                    except Exception as exc:  # the user's forward may raise anything
                        raise _run_failed(self._model, exc) from exc
        return self._shapes.get(node)


def _is_metadata_use(user: _trace.Node) -> bool:
    if user.op == "call_method" and user.target in _METADATA_METHODS:
        return True
    return user.op == "call_function" and user.target is getattr


def _describe(node: _trace.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return {"add": "a residual add", "cat": "a concat"}.get(name, f"function {name!r}")
    if node.op == "call_method":
        return f"method .{node.target}()"
    return node.op


def find_groups(
    model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor
) -> tuple[list[MergeGroup], list[SkippedLayer]]:
    """Find every merge group of ``model`` by tracing it with ``example_inputs``.

    Returns the groups (in graph order) and the candidate producers that were
    left intact, each with the reason. ``model`` should be in eval mode.

    The graph comes from symbolic tracing; ``example_inputs`` are run through it
    (once, on the ``meta`` device, so only shapes are computed) only when a
    decision needs tensor shapes, i.e. a reshape or a convolution feeding a
    linear layer. Models made of convolution → convolution and linear → linear
    chains are never executed.
    """
    return _find_groups(model, example_inputs, dict(model.named_modules()))


def _find_groups(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    modules: dict[str, nn.Module],
) -> tuple[list[MergeGroup], list[SkippedLayer]]:
    """:func:`find_groups` with ``dict(model.named_modules())`` already at hand."""
    inputs = (
        (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    )
    graph = _symbolic_trace(model, len(inputs), modules)
    shape = _Shapes(model, graph, inputs)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    groups: list[MergeGroup] = []
    skipped: list[SkippedLayer] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _PRODUCERS):
            continue
        outcome = _follow(node, modules, calls, shape)
        if isinstance(outcome, MergeGroup):
            groups.append(outcome)
        else:
            skipped.append(SkippedLayer(str(node.target), outcome))
    return groups, skipped


ShapeFn = Callable[[_trace.Node], tuple[int, ...] | None]


def _follow(
    start: _trace.Node, modules: dict[str, nn.Module], calls: Counter[Any], shape: ShapeFn
) -> MergeGroup | str:
    """Walk from a producer to its consumer; return the group or the reason it is not one."""
    name = str(start.target)
    producer = modules[name]
    if calls[name] > 1:
        return "module is called more than once"
    if isinstance(producer, nn.Conv2d) and producer.groups != 1:
        return "grouped or depthwise convolution is not supported as a producer"
    channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    is_conv = isinstance(producer, nn.Conv2d)
    bn: str | None = None
    flattened_spatial: int | None = None
    cur = start
    while True:
        users = [u for u in cur.users if not _is_metadata_use(u)]
        if any(u.op == "output" for u in users):
            return "its output reaches the model output"
        if len(users) != 1:
            used_by = ", ".join(_describe(u) for u in users)
            return f"its output is used by {len(users)} operations ({used_by})"
        user = users[0]
        if user.args[:1] != (cur,) or any(
            a is cur for a in list(user.args[1:]) + list(user.kwargs.values())
        ):
            what = _describe(user)
            if what.startswith("a "):  # a residual add or a concat
                return f"its output reaches {what}"
            return f"its output feeds {what} in a position other than the data input"
        mod = modules.get(str(user.target)) if user.op == "call_module" else None
        stateful = isinstance(mod, (*_PRODUCERS, *_BATCHNORMS))
        if stateful and calls[str(user.target)] > 1:
            return f"{_describe(user)} is called more than once"
        if isinstance(mod, _BATCHNORMS):
            if cur is not start or bn is not None:
                return f"batch norm {user.target!r} does not directly follow the producer"
            if mod.num_features != channels:
                return f"batch norm {user.target!r} has {mod.num_features} features, not {channels}"
            bn = str(user.target)
        elif isinstance(mod, _PRODUCERS):
            return _consumer_group(
                name, bn, str(user.target), mod, channels, is_conv, cur, flattened_spatial, shape
            )
        elif _is_elementwise(user, mod):
            pass
        elif _is_pool(user, mod):
            if not is_conv or flattened_spatial is not None:
                return f"{_describe(user)} pools over a non-spatial dimension"
        elif _is_reshape(user, mod):
            verdict = _check_reshape(cur, user, channels, is_conv, shape)
            if isinstance(verdict, str):
                return verdict
            if verdict is not None:
                flattened_spatial = verdict
        else:
            return f"its output passes through {_describe(user)}, which is not a channel-wise positively homogeneous operation"
        cur = user


def _is_elementwise(node: _trace.Node, mod: nn.Module | None) -> bool:
    if mod is not None:
        return isinstance(mod, _ELEMENTWISE_MODULES)
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _ELEMENTWISE_METHODS


def _is_pool(node: _trace.Node, mod: nn.Module | None) -> bool:
    if mod is not None:
        return isinstance(mod, _POOL_MODULES)
    return node.op == "call_function" and node.target in _POOL_FUNCTIONS


def _is_reshape(node: _trace.Node, mod: nn.Module | None) -> bool:
    if mod is not None:
        return isinstance(mod, nn.Flatten)
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS
    if node.op == "call_function":
        return node.target in (torch.flatten, torch.reshape)
    return False


def _check_reshape(
    src: _trace.Node, node: _trace.Node, channels: int, is_conv: bool, shape: ShapeFn
) -> int | str | None:
    """Accept a reshape that keeps channels contiguous; return the features per channel.

    Returns ``None`` for a shape-preserving reshape, an ``int`` for a channel-major
    flatten ``(N, C, *S) → (N, C·prod(S))``, or a reason string otherwise.
    """
    before, after = shape(src), shape(node)
    if before is None or after is None:
        return f"{_describe(node)} has unknown shapes"
    if before == after:
        return None
    if is_conv and len(before) >= 3 and before[1] == channels and len(after) == 2:
        spatial = 1
        for d in before[2:]:
            spatial *= d
        if after == (before[0], channels * spatial):
            return spatial
    return f"{_describe(node)} reshapes {list(before)} to {list(after)}, mixing channels"


def _consumer_group(
    producer: str,
    bn: str | None,
    consumer: str,
    mod: nn.Module,
    channels: int,
    is_conv: bool,
    cur: _trace.Node,
    flattened_spatial: int | None,
    shape: ShapeFn,
) -> MergeGroup | str:
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1:
            return f"consumer {consumer!r} is a grouped convolution"
        if not is_conv or flattened_spatial is not None or mod.in_channels != channels:
            return f"consumer {consumer!r} does not take the producer's channels as input channels"
        return MergeGroup(producer, consumer, bn, 1)
    assert isinstance(mod, nn.Linear)
    spatial = 1
    if is_conv:
        if flattened_spatial is None:
            dims = shape(cur)
            if not (dims is not None and len(dims) == 2):
                return f"consumer {consumer!r} is applied to a non-channel dimension"
        spatial = flattened_spatial or 1
    if mod.in_features != channels * spatial:
        return f"consumer {consumer!r} has {mod.in_features} inputs, expected {channels * spatial}"
    return MergeGroup(producer, consumer, bn, spatial)


def resolve_groups(
    model: nn.Module, groups: Sequence[MergeGroup | tuple[str, str | None, str]]
) -> list[MergeGroup]:
    """Validate explicitly named groups against ``model`` and infer their layout.

    Each entry is a :class:`MergeGroup` or a ``(producer, bn, consumer)`` tuple.
    The caller asserts that only channel-wise positively homogeneous operations
    sit between producer and consumer; shapes and types are checked here.
    """
    named = dict(model.named_modules())
    resolved: list[MergeGroup] = []
    seen_producers: set[str] = set()
    seen_consumers: set[str] = set()
    for entry in groups:
        if isinstance(entry, MergeGroup):
            group = entry
        else:
            try:
                producer, bn, consumer = entry
            except (TypeError, ValueError):
                raise ModelError(
                    f"group {entry!r} must be a MergeGroup or a (producer, bn, consumer) tuple"
                ) from None
            group = MergeGroup(producer, consumer, bn)
        for role, qual in (
            ("producer", group.producer),
            ("consumer", group.consumer),
            ("bn", group.bn),
        ):
            if qual is not None and qual not in named:
                raise ModelError(f"group {role} {qual!r} is not a submodule of the model")
        prod, cons = named[group.producer], named[group.consumer]
        if not isinstance(prod, _PRODUCERS):
            raise ModelError(
                f"producer {group.producer!r} is a {type(prod).__name__}, not Linear/Conv2d"
            )
        if not isinstance(cons, _PRODUCERS):
            raise ModelError(
                f"consumer {group.consumer!r} is a {type(cons).__name__}, not Linear/Conv2d"
            )
        for conv, role in ((prod, "producer"), (cons, "consumer")):
            if isinstance(conv, nn.Conv2d) and conv.groups != 1:
                raise ModelError(f"{role} {getattr(group, role)!r} is a grouped convolution")
        if group.producer in seen_producers or group.consumer in seen_consumers:
            raise ModelError(
                f"layer {group.producer!r} or {group.consumer!r} appears in two groups"
            )
        seen_producers.add(group.producer)
        seen_consumers.add(group.consumer)
        channels = prod.out_features if isinstance(prod, nn.Linear) else prod.out_channels
        if group.bn is not None:
            bn = named[group.bn]
            if not isinstance(bn, _BATCHNORMS) or bn.num_features != channels:
                raise ModelError(f"bn {group.bn!r} is not a batch norm over {channels} features")
        inputs = cons.in_features if isinstance(cons, nn.Linear) else cons.in_channels
        spatial = group.features_per_channel
        if spatial is None:
            spatial = inputs // channels if inputs % channels == 0 else 0
        if (
            spatial < 1
            or inputs != channels * spatial
            or (isinstance(cons, nn.Conv2d) and spatial != 1)
        ):
            raise ModelError(
                f"consumer {group.consumer!r} has {inputs} inputs, which does not fit "
                f"producer {group.producer!r} with {channels} channels"
            )
        resolved.append(MergeGroup(group.producer, group.consumer, group.bn, spatial))
    return resolved


__all__ = ["MergeGroup", "SkippedLayer", "find_groups", "resolve_groups", "trace"]
