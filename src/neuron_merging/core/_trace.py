"""A light symbolic tracer: the dataflow graph of a model's ``forward``.

Discovery needs only which operation consumes which value. ``torch.fx`` records
that too, but every ``Tracer.trace`` call pays a fixed toll: it patches module
globals for auto-wrapping, names each node, searches the parameters on every
attribute access. On a small model that toll is tens of times the model's
own forward pass at batch 1. This tracer records the same graph (the same ``op``/``target``
conventions as ``torch.fx``: ``placeholder``, ``call_module``,
``call_function``, ``call_method``, ``get_attr``, ``output``) with a proxy that
has only ``__torch_function__``, the Python operators and attribute access.

Anything it does not understand raises :class:`TraceError`; callers then fall
back to ``torch.fx`` (see :func:`from_fx`), so no model traceable by ``torch.fx``
is lost.

Shapes are computed separately and only on demand (:func:`run`): the
graph is first run on ``meta`` tensors, which costs microseconds per operation
and no arithmetic, and on the real example inputs only if that fails.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

META = torch.device("meta")


class TraceError(Exception):
    """The light tracer cannot follow this ``forward``."""


class Node:
    """One operation of a :class:`Graph` (the subset of ``torch.fx.Node`` discovery reads)."""

    __slots__ = ("args", "inputs", "kwargs", "op", "target", "users")

    def __init__(
        self,
        op: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        inputs: dict[Node, None],
    ) -> None:
        self.op = op
        self.target = target
        self.args = args
        self.kwargs = kwargs
        self.inputs = inputs
        self.users: dict[Node, None] = {}

    @property
    def all_input_nodes(self) -> list[Node]:
        """The distinct nodes this one reads, in order of first appearance."""
        return list(self.inputs)

    def __repr__(self) -> str:
        return f"Node({self.op}, {self.target!r})"


class Graph:
    """Nodes in execution order; ``placeholder`` nodes take the example inputs in order."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []

    def add(
        self,
        op: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        inputs: dict[Node, None] | None = None,
    ) -> Node:
        """Append a node; ``inputs`` (the nodes inside ``args``/``kwargs``) is found if omitted."""
        if inputs is None:
            found: dict[Node, None] = {}
            map_nodes((args, kwargs), lambda node: found.setdefault(node, None))
            inputs = found
        node = Node(op, target, args, kwargs, inputs)
        for source in inputs:
            source.users[node] = None
        self.nodes.append(node)
        return node


def map_nodes(value: Any, fn: Callable[[Node], Any]) -> Any:
    """``value`` with every :class:`Node` inside (tuples, lists, dicts, slices) replaced by ``fn(node)``."""
    kind = type(value)
    if kind is Node:
        return fn(value)
    if kind in (tuple, list):
        return kind(map_nodes(item, fn) for item in value)
    if kind is dict:
        return {key: map_nodes(item, fn) for key, item in value.items()}
    if kind is slice:
        return slice(
            map_nodes(value.start, fn), map_nodes(value.stop, fn), map_nodes(value.step, fn)
        )
    return value


# --------------------------------------------------------------------------- tracing


_ATOMS = frozenset({int, float, bool, str, type(None), torch.dtype, torch.device})


class _Tracer:
    def __init__(self) -> None:
        self.graph = Graph()

    def unwrap(self, value: Any, inputs: dict[Node, None]) -> Any:
        """``value`` with every proxy replaced by its node (also added to ``inputs``)."""
        kind = type(value)
        if kind is _Proxy:
            inputs[value.node] = None
            return value.node
        if kind is tuple or kind is list:
            out = []
            for item in value:
                if type(item) is _Proxy:
                    inputs[item.node] = None
                    out.append(item.node)
                elif type(item) in _ATOMS:
                    out.append(item)
                else:
                    out.append(self.unwrap(item, inputs))
            return out if kind is list else tuple(out)
        if kind is _Attribute:
            node = value.materialise()
            inputs[node] = None
            return node
        if kind is dict:
            return {key: self.unwrap(item, inputs) for key, item in value.items()}
        if kind is slice:
            return slice(
                self.unwrap(value.start, inputs),
                self.unwrap(value.stop, inputs),
                self.unwrap(value.step, inputs),
            )
        return value

    def record(self, op: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Proxy:
        inputs: dict[Node, None] = {}
        node = self.graph.add(
            op, target, self.unwrap(args, inputs), self.unwrap(kwargs, inputs), inputs
        )
        return _Proxy(self, node)


class _Proxy:
    """A traced value: every torch function, method or operator applied to it is recorded."""

    __slots__ = ("node", "tracer")
    __hash__ = object.__hash__

    def __init__(self, tracer: _Tracer, node: Node | None) -> None:
        self.tracer = tracer
        self.node = node

    @classmethod
    def __torch_function__(
        cls,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        tracer = _find_tracer((args, kwargs))
        if _is_tensor_method(func):
            return tracer.record("call_method", func.__name__, args, kwargs or {})
        return tracer.record("call_function", func, args, kwargs or {})

    def __getattr__(self, name: str) -> _Attribute:
        if name.startswith("__"):  # protocols (copy, pickle, numpy) are not tensor attributes
            raise AttributeError(name)
        return _Attribute(self, name)

    def __bool__(self) -> bool:
        raise TraceError("a traced value is used in Python control flow")

    def __iter__(self) -> Any:
        raise TraceError("a traced value is iterated or unpacked")

    def __len__(self) -> int:
        raise TraceError("len() of a traced value")

    def __index__(self) -> int:
        raise TraceError("a traced value is used as a Python integer")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TraceError("a traced value is called")


class _Attribute(_Proxy):
    """``proxy.name``: a method call when called, a ``getattr`` node when used as a value."""

    __slots__ = ("name", "owner")

    def __init__(self, owner: _Proxy, name: str) -> None:
        super().__init__(owner.tracer, None)
        self.owner, self.name = owner, name

    def materialise(self) -> Node:
        if self.node is None:
            self.node = self.tracer.record(
                "call_function", getattr, (self.owner, self.name), {}
            ).node
        return self.node

    def __getattr__(self, name: str) -> _Attribute:
        if name.startswith("__"):
            raise AttributeError(name)
        self.materialise()
        return _Attribute(self, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.tracer.record("call_method", self.name, (self.owner, *args), kwargs)


_TENSOR_METHOD: dict[Any, bool] = {}


def _is_tensor_method(func: Any) -> bool:
    """``torch.overrides.is_tensor_method_or_property``, memoised (it resets warning filters)."""
    known = _TENSOR_METHOD.get(func)
    if known is None:
        known = _TENSOR_METHOD[func] = torch.overrides.is_tensor_method_or_property(func)
    return known


def _find_tracer(value: Any) -> _Tracer:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Proxy):
            return item.tracer
        if isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    raise TraceError("no traced value among the arguments")


def _binary(op: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def forward(self: _Proxy, other: Any) -> Any:
        return self.tracer.record("call_function", op, (self, other), {})

    def reflected(self: _Proxy, other: Any) -> Any:
        return self.tracer.record("call_function", op, (other, self), {})

    return forward, reflected  # type: ignore[return-value]


def _unary(op: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def apply(self: _Proxy) -> Any:
        return self.tracer.record("call_function", op, (self,), {})

    return apply


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul"):
    _fwd, _rev = _binary(getattr(operator, _name))  # type: ignore[misc]
    setattr(_Proxy, f"__{_name}__", _fwd)
    setattr(_Proxy, f"__r{_name}__", _rev)
for _name in ("and_", "or_", "xor", "lshift", "rshift"):
    _fwd, _rev = _binary(getattr(operator, _name))  # type: ignore[misc]
    _dunder = _name.rstrip("_")
    setattr(_Proxy, f"__{_dunder}__", _fwd)
    setattr(_Proxy, f"__r{_dunder}__", _rev)
for _name in ("eq", "ne", "lt", "le", "gt", "ge", "getitem"):
    setattr(_Proxy, f"__{_name}__", _binary(getattr(operator, _name))[0])  # type: ignore[index]
for _name in ("neg", "pos", "invert", "abs"):
    setattr(_Proxy, f"__{_name}__", _unary(getattr(operator, _name)))


def _is_leaf(module: nn.Module) -> bool:
    """``torch.fx``'s default: built-in ``torch.nn`` modules are leaves, except ``Sequential``."""
    home = type(module).__module__
    return (home.startswith("torch.nn") or home.startswith("torch.ao.nn")) and not isinstance(
        module, nn.Sequential
    )


_SIGNATURES: dict[Callable[..., Any], list[inspect.Parameter]] = {}


def _parameters(forward: Callable[..., Any]) -> list[inspect.Parameter]:
    params = _SIGNATURES.get(forward)
    if params is None:
        params = _SIGNATURES[forward] = list(inspect.signature(forward).parameters.values())[1:]
    return params


def _placeholders(tracer: _Tracer, forward: Callable[..., Any], count: int) -> list[Any]:
    """Positional arguments for ``forward``: one proxy per example input, in order.

    A ``*args`` parameter gets one placeholder per remaining input, named
    ``args[i]`` (unlike ``torch.fx``'s single ``*args`` placeholder).
    """
    args: list[Any] = []
    for param in _parameters(forward):
        if len(args) == count:
            break
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            args.append(tracer.record("placeholder", param.name, (), {}))
        elif param.kind is param.VAR_POSITIONAL:
            for i in range(count - len(args)):
                args.append(tracer.record("placeholder", f"{param.name}[{i}]", (), {}))
        else:
            break
    if len(args) != count:
        raise TraceError(f"forward does not take {count} positional inputs")
    return args


def _instance_hooks_work(leaves: list[nn.Module]) -> bool:
    """Whether calls to ``leaves`` can be intercepted per instance, without patching a class.

    ``nn.Module.__call__`` runs ``self._compiled_call_impl`` when it is set (the
    hook ``Module.compile`` uses). Setting it on an instance is a dictionary
    write; assigning ``nn.Module.__call__`` instead invalidates the attribute
    caches of every module class, which alone costs more than tracing a small
    model.
    """
    call = getattr(nn.Module, "_wrapped_call_impl", None)
    return (
        call is not None
        and nn.Module.__call__ is call
        and hasattr(nn.Module, "_compiled_call_impl")
        and all(type(m).__call__ is call for m in leaves)
    )


def trace(
    root: nn.Module, num_inputs: int, named_modules: dict[str, nn.Module] | None = None
) -> Graph:
    """Record the graph of ``root.forward`` called with ``num_inputs`` traced positional inputs.

    ``named_modules`` is ``dict(root.named_modules())`` if the caller has it.
    Raises :class:`TraceError` (or whatever ``forward`` raises) when the
    function cannot be traced symbolically.
    """
    tracer = _Tracer()
    if named_modules is None:
        named_modules = dict(root.named_modules())
    leaves = {path: m for path, m in named_modules.items() if path and _is_leaf(m)}
    forward = type(root).forward
    inputs = _placeholders(tracer, forward, num_inputs)

    def recorder(path: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            return tracer.record("call_module", path, args, kwargs)

        return call

    if _instance_hooks_work(list(leaves.values())):
        saved = [(m, m.__dict__.get("_compiled_call_impl")) for m in leaves.values()]
        for path, module in leaves.items():
            module.__dict__["_compiled_call_impl"] = recorder(path)
        try:
            out = forward(root, *inputs)
        finally:
            for module, previous in saved:
                if previous is None:
                    module.__dict__.pop("_compiled_call_impl", None)
                else:
                    module.__dict__["_compiled_call_impl"] = previous
    else:
        paths = {id(m): path for path, m in leaves.items()}
        original_call = nn.Module.__call__

        def call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            path = paths.get(id(module))
            if path is not None:
                return tracer.record("call_module", path, args, kwargs)
            return original_call(module, *args, **kwargs)

        nn.Module.__call__ = call  # type: ignore[method-assign]
        try:
            out = forward(root, *inputs)
        finally:
            nn.Module.__call__ = original_call  # type: ignore[method-assign]
    done: dict[Node, None] = {}
    tracer.graph.add("output", "output", (tracer.unwrap(out, done),), {}, done)
    return tracer.graph


def from_fx(graph: fx.Graph) -> Graph:
    """The same graph as a light :class:`Graph` (for models only ``torch.fx`` can trace)."""
    light = Graph()
    mapping: dict[fx.Node, Node] = {}
    for node in graph.nodes:
        args = fx.node.map_arg(node.args, mapping.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, mapping.__getitem__)
        target = node.target
        if node.op == "placeholder":
            target = str(target)
            default = args[0] if args else inspect.Parameter.empty
            args = () if default is inspect.Parameter.empty else (default,)
        mapping[node] = light.add(node.op, target, tuple(args), dict(kwargs))
    return light


# --------------------------------------------------------------------------- shapes


def _fetch_attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(META) if value.device != META else value
    if type(value) in (tuple, list):
        return type(value)(_to_meta(item) for item in value)
    if type(value) is dict:
        return {key: _to_meta(item) for key, item in value.items()}
    return value


#: Modules whose output has their input's shape (batch norm in eval mode included).
_SHAPE_PRESERVING = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Identity,
)


def _call_module_meta(module: nn.Module, args: Any, kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` on meta tensors; the common layers take shortcuts.

    PyTorch's generic meta path for a module with parameters (``functional_call``,
    Python decompositions of batch norm) costs milliseconds; convolutions and
    linear layers call their meta kernels directly instead, and shape-preserving
    layers return their input.
    """
    if not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor):
        x = args[0]
        kind = type(module)
        if kind in _SHAPE_PRESERVING:
            return x
        if kind is nn.Conv2d and module.padding_mode == "zeros":
            return F.conv2d(
                x,
                module.weight.to(META),
                None,
                module.stride,
                module.padding,  # type: ignore[arg-type]
                module.dilation,
                module.groups,
            )
        if kind is nn.Linear:
            return F.linear(x, module.weight.to(META))
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    if not tensors:
        return module(*args, **kwargs)
    meta = {name: t.to(META) for name, t in tensors.items()}
    return torch.func.functional_call(module, meta, tuple(args), kwargs)


def run(
    model: nn.Module, graph: Graph, inputs: Sequence[Any], *, meta: bool
) -> dict[Node, tuple[int, ...]]:
    """Execute ``graph`` on ``inputs``; return the shape of every tensor-valued node.

    With ``meta=True`` every tensor (inputs, constants, parameters) is moved to
    the ``meta`` device first, so only shapes are computed. Values are freed
    after their last use.
    """
    modules = dict(model.named_modules())
    last_use: dict[Node, Node] = {}
    for node in graph.nodes:
        for source in node.all_input_nodes:
            last_use[source] = node
    dead_after: dict[Node, list[Node]] = {}
    for source, user in last_use.items():
        dead_after.setdefault(user, []).append(source)
    env: dict[Node, Any] = {}
    shapes: dict[Node, tuple[int, ...]] = {}
    pending = list(inputs)
    convert = _to_meta if meta else (lambda v: v)

    def load(value: Any) -> Any:
        return convert(map_nodes(value, env.__getitem__))

    for node in graph.nodes:
        op = node.op
        if op == "placeholder":
            target = str(node.target)
            if target.startswith("**"):  # torch.fx's placeholder for **kwargs
                value: Any = {}
            elif target.startswith("*"):  # torch.fx's placeholder for *args
                value, pending = list(pending), []
            elif pending:
                value = pending.pop(0)
            elif node.args:
                value = node.args[0]
            else:
                raise TypeError(f"missing example input for argument {target!r}")
            value = convert(value)
        elif op == "get_attr":
            value = convert(_fetch_attr(model, str(node.target)))
        elif op == "call_function":
            value = node.target(*load(node.args), **load(node.kwargs))
        elif op == "call_method":
            obj, *rest = load(node.args)
            value = getattr(obj, str(node.target))(*rest, **load(node.kwargs))
        elif op == "call_module":
            module = modules[str(node.target)]
            args, kwargs = load(node.args), load(node.kwargs)
            value = _call_module_meta(module, args, kwargs) if meta else module(*args, **kwargs)
        else:  # output
            break
        env[node] = value
        if isinstance(value, torch.Tensor):
            shapes[node] = tuple(value.shape)
        for dead in dead_after.get(node, ()):
            env.pop(dead, None)
    return shapes
