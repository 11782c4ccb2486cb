"""The light symbolic tracer: same groups as torch.fx, fallbacks, and no leftover state."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neuron_merging as nm
from _factories import ConvBNNet, FunctionalNet, TinyResNet, Untraceable, mlp
from neuron_merging.core import _trace
from neuron_merging.core import groups as groups_mod
from neuron_merging.models import create, list_models, model_spec

# ----------------------------------------------------------------------------- models


class TwoInputs(nn.Module):
    """Two example inputs, a keyword default, and a shape-preserving reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)
        self.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
        h = F.relu(self.fc1(x + y)).reshape(x.size(0), 8)
        return self.fc2(h) * scale


class VarArgs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)
        self.eval()

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(xs[0] - xs[1])))


class Unpacking(nn.Module):
    """Unpacks a traced value: the light tracer refuses, torch.fx can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return self.fc2(F.relu(self.fc1(torch.cat([b, a], dim=1))))


class NoMetaKernel(nn.Module):
    """conv → flatten → linear, plus an operation with no meta implementation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count = torch.nonzero(x).shape[0]
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1)) + count


class Attributes(nn.Module):
    """Parameters used directly, tensor attributes, methods, operators, indexing."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 6)
        self.fc3 = nn.Linear(6, 4)
        self.gain = nn.Parameter(torch.ones(4))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.fc1(x).relu())
        h = F.linear(h, self.fc3.weight, self.fc3.bias)
        return (-h)[:, : x.shape[1] - 1] * self.gain + 1.0


def _registry_cases() -> list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]]:
    cases = []
    small = {"vgg16": [4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8], "resnet56": [4, 4, 8]}
    for name in list_models():
        spec = model_spec(name)
        kwargs = {} if small.get(name) is None else {"cfg": small[name]}
        cases.append((name, lambda n=name, k=kwargs: create(n, **k).eval(), (1, *spec.input_shape)))
    return cases


CASES = [
    *_registry_cases(),
    ("mlp", lambda: mlp([4, 6, 5, 2]), (1, 4)),
    ("conv-bn-avg", lambda: ConvBNNet(3, 8, pool="avg"), (1, 3, 8, 8)),
    ("conv-bn-max", lambda: ConvBNNet(3, 8, pool="max"), (1, 3, 8, 8)),
    ("functional", FunctionalNet, (2, 3, 8, 8)),
    ("tiny-resnet", lambda: TinyResNet(channels=4, mid=6), (1, 3, 6, 6)),
    ("attributes", Attributes, (3, 5)),
    ("unpacking", Unpacking, (2, 4)),
    ("no-meta", NoMetaKernel, (1, 2, 5, 5)),
]


def _fx_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> _trace.Graph:
        raise _trace.TraceError("forced torch.fx")

    monkeypatch.setattr(_trace, "trace", refuse)


@pytest.mark.parametrize(("name", "build", "shape"), CASES, ids=[c[0] for c in CASES])
def test_groups_equal_those_found_with_torch_fx(
    name: str,
    build: Callable[[], nn.Module],
    shape: tuple[int, ...],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = build()
    x = torch.randn(*shape)
    light = nm.find_groups(model, x)
    with monkeypatch.context() as patch:
        _fx_only(patch)
        fx = nm.find_groups(model, x)
    assert light == fx
    assert light[0], "every case has at least one group"


@pytest.mark.parametrize(
    ("model", "inputs"),
    [
        (TwoInputs(), (torch.randn(2, 6), torch.randn(2, 6))),
        (VarArgs(), (torch.randn(2, 4), torch.randn(2, 4))),
    ],
    ids=["two inputs and a default", "*args"],
)
def test_several_inputs_are_traced_by_the_light_tracer(
    model: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> None:
    graph = _trace.trace(model, len(inputs))
    assert [n.op for n in graph.nodes].count("placeholder") == 2
    groups, _ = nm.find_groups(model, inputs)
    assert groups == [nm.MergeGroup("fc1", "fc2", None, 1)]
    shapes = _trace.run(model, graph, inputs, meta=True)
    real = _trace.run(model, graph, inputs, meta=False)
    assert shapes == real


def test_unpacking_falls_back_to_torch_fx() -> None:
    model = Unpacking()
    with pytest.raises(_trace.TraceError, match="iterated or unpacked"):
        _trace.trace(model, 1)
    groups, _ = nm.find_groups(model, torch.randn(2, 4))
    assert groups == [nm.MergeGroup("fc1", "fc2", None, 1)]


def test_shapes_fall_back_to_a_real_run_without_meta_kernels() -> None:
    model = NoMetaKernel()
    x = torch.randn(1, 2, 5, 5)
    graph = _trace.trace(model, 1)
    with pytest.raises(Exception):  # noqa: B017 - whatever the meta dispatcher raises
        _trace.run(model, graph, [x], meta=True)
    groups, _ = nm.find_groups(model, x)
    assert groups == [nm.MergeGroup("conv", "fc", None, 25)]


def test_meta_shapes_equal_real_shapes_on_every_registered_model() -> None:
    for name, build, shape in _registry_cases():
        model = build()
        x = torch.randn(*shape)
        graph = _trace.trace(model, 1)
        assert _trace.run(model, graph, [x], meta=True) == _trace.run(
            model, graph, [x], meta=False
        ), name


def _no_tracing_state(model: nn.Module) -> bool:
    return all("_compiled_call_impl" not in m.__dict__ for m in model.modules())


def test_tracing_leaves_no_state_behind_even_when_it_fails() -> None:
    call = nn.Module.__call__
    model = Untraceable()
    x = torch.randn(3, 5)
    before = model(x)
    with pytest.raises(_trace.TraceError):
        _trace.trace(model, 1)
    assert _no_tracing_state(model) and nn.Module.__call__ is call
    with pytest.raises(nm.ModelError, match="cannot trace"):
        nm.find_groups(model, x)
    assert _no_tracing_state(model) and nn.Module.__call__ is call
    assert torch.equal(model(x), before)


def test_class_level_interception_gives_the_same_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    model = TinyResNet(channels=4, mid=6)
    x = torch.randn(1, 3, 6, 6)
    expected = nm.find_groups(model, x)
    monkeypatch.setattr(_trace, "_instance_hooks_work", lambda leaves: False)
    call = nn.Module.__call__
    assert nm.find_groups(model, x) == expected
    assert nn.Module.__call__ is call


def test_a_compiled_call_hook_already_set_is_restored() -> None:
    model = mlp([4, 6, 2])
    marker = model.fc1.__dict__["_compiled_call_impl"] = model.fc1._call_impl
    assert nm.find_groups(model, torch.randn(1, 4))[0] == [nm.MergeGroup("fc1", "fc2", None, 1)]
    assert model.fc1.__dict__["_compiled_call_impl"] is marker


def test_graph_records_operators_and_attributes() -> None:
    graph = _trace.trace(Attributes(), 1)
    ops = [(n.op, getattr(n.target, "__name__", n.target)) for n in graph.nodes]
    assert ("call_module", "fc1") in ops
    assert ("call_method", "relu") in ops
    assert ("call_function", "linear") in ops
    assert ("call_function", "neg") in ops
    assert ("call_function", "getitem") in ops
    assert ("call_function", "getattr") in ops
    for node in graph.nodes:
        for source in node.all_input_nodes:
            assert node in source.users


def test_groups_module_still_exposes_the_fx_shape_trace() -> None:
    gm = groups_mod.trace(mlp([4, 6, 2]), (torch.randn(1, 4),))
    shapes = [n.meta["tensor_meta"].shape for n in gm.graph.nodes if "tensor_meta" in n.meta]
    assert torch.Size([1, 6]) in shapes
