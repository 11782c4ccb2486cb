"""Record: the dataflow of one real forward pass on the example inputs.

Discovery runs the model once, for real, under a :class:`torch.overrides.TorchFunctionMode`
that sees every torch function, tensor method, operator and tensor attribute
(``.T``, ``.data``, ...) called on the way, and with every module's ``forward`` wrapped
for the pass: the wrappers name the module that runs each operation, and record the
layers whose channels can be pruned (``nn.Linear``, ``nn.Conv1d/2d/3d``, batch
norm and GPT-2's ``Conv1D``) as single operations. Because the code runs
for real, data-dependent control flow, ``transformers`` models, ``nn.DataParallel``,
``torch.compile`` wrappers and ``torch.fx.GraphModule``\\ s all work; symbolic tracing
(``torch.fx``, a proxy tracer) fails on the first of them and was replaced by this
recorder. ``torch.export`` was the alternative: it lowers the model to ATen
operations, loses the module structure this package edits, and refuses much ordinary
Python code, so it analyses fewer models, at several times the cost of a forward pass.

Values are identified by tensor object and version counter, so an in-place operation
(``relu_``, ``+=``) creates a new value, and a write into a tensor whose storage is
shared with another live recorded tensor (a view, ``.data``) is flagged: the storages
are compared at the write, which is rare. A tensor without a version counter (made
under ``torch.inference_mode``) that a call returns after taking it counts as written in
place by that call. Tensors are not kept alive (that would grow
the memory of a forward pass to that of every activation at once): a weak reference
forgets a tensor's value when it is freed, before its id can be reused. PyTorch keeps a tensor's Python object alive as long as any C++ reference to
the tensor exists, so a freed object can never come back. Everything the
recording cannot prove harmless is reported, never ignored: parameters read outside
their own layer's call (tied or functional weights), hooks, and layers called more
than once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import operator
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .errors import ConfigError, ModelError


def is_conv1d_transposed(module: nn.Module) -> bool:
    """Whether ``module`` is GPT-2's ``Conv1D`` (a linear layer storing ``(in, out)`` weights).

    ``transformers`` is not imported: its class is recognised by name, module and layout.
    """
    cls = type(module)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__.startswith("transformers")
        and isinstance(getattr(module, "weight", None), Tensor)
        and module.weight.dim() == 2
        and getattr(module, "nf", None) == module.weight.shape[1]
    )


#: Convolutions (transposed ones store their weight as ``(in, out, *kernel)``).
CONVS: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
#: Batch norms.
BATCHNORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)
#: Norms that normalise each channel (or group of channels) over positions.
CHANNEL_NORMS: tuple[type[nn.Module], ...] = (
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
)
#: Layers recorded as one operation each: their parameters are what compression edits.
LEAF_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, *CONVS, *BATCHNORMS, nn.PReLU, *CHANNEL_NORMS)


def is_leaf(module: nn.Module) -> bool:
    """Whether ``module`` is recorded as a single operation.

    Only layers that run their class's own ``forward`` qualify: a subclass that
    overrides it, or an instance whose ``forward`` was replaced (monkeypatching,
    adapter hooks), is code to record like any other.
    """
    if "forward" in module.__dict__:
        return False
    cls = type(module)
    if cls.__name__ == "Conv1D" and is_conv1d_transposed(module):  # decided per instance
        return True
    known = _LEAF_CLASSES.get(cls)
    if (
        known is None
        or known[0] is not cls.forward
        or (known[1] is not None and known[1] is not cls._conv_forward)  # type: ignore[attr-defined]
    ):  # met first, or its forward was patched since
        known = _LEAF_CLASSES[cls] = (
            cls.forward,
            getattr(cls, "_conv_forward", None),
            _leaf_class(cls),
        )
    return known[2]


#: Per class met so far: its ``forward`` and ``_conv_forward`` when it was met, and whether
#: it runs a leaf layer's own forward (see :func:`is_leaf`).
_LEAF_CLASSES: dict[type, tuple[Any, Any, bool]] = {}


def _leaf_class(cls: type) -> bool:
    for base in LEAF_TYPES:
        if issubclass(cls, base) and cls.forward is base.forward:
            conv = getattr(base, "_conv_forward", None)
            return conv is None or cls._conv_forward is conv
    return False


#: Tensor methods and attributes that read metadata only; they are not data uses. Sizes
#: (``size``, ``numel``, ...) are handled apart; numbers that follow from them (``stride``,
#: ``nbytes``) are data uses, since a channel count could be read back from them.
_METADATA = frozenset(
    {
        "size",
        "dim",
        "ndimension",
        "numel",
        "shape",
        "ndim",
        "dtype",
        "device",
        "is_cuda",
        "is_floating_point",
        "is_complex",
        "is_contiguous",
        "layout",
        "requires_grad",
        "is_leaf",
        "grad_fn",
        "element_size",
        "is_sparse",
        "is_quantized",
        "is_meta",
        "names",
        "__len__",
        "__format__",
        "__repr__",
        "get_device",
        "data_ptr",
        "storage_offset",
        "_version",
        "__hash__",
        "is_nested",
        "is_cpu",
        "is_mkldnn",
        "is_xpu",
        "is_mps",
        "itemsize",
        "is_inference",
        "is_signed",
        "is_sparse_csr",
        "dim_order",
    }
)


#: In-place writes that leave the version counter as it was (``apply_`` and ``map_`` run
#: a Python function on each element; ``resize_`` to the same size changes nothing the
#: counter sees): their result is recorded as a new value of theirs, never as their
#: input returned unchanged.
_UNVERSIONED_WRITES = frozenset({"apply_", "map_", "map2_", "resize_", "resize_as_"})

_NAMES: dict[Any, str] = {}


def func_name(func: Any) -> str:
    """A short readable name of a recorded function: ``"relu"``, ``".T"``, ``"add"``."""
    try:
        return _NAMES[func]
    except (KeyError, TypeError):
        pass
    name = _func_name(func)
    with contextlib.suppress(TypeError):  # unhashable callables are not cached
        _NAMES[func] = name
    return name


_KINDS: dict[Any, tuple[str, str]] = {}
_SIZES = frozenset({"size", ".shape", "numel", "nelement", "__len__"})


def _kind(func: Any) -> tuple[str, str]:
    """``(name, kind)`` of a torch function: kind ``meta``, ``size``, ``shape`` or ``op``."""
    try:
        return _KINDS[func]
    except (KeyError, TypeError):
        pass
    name = func_name(func)
    if name in _SIZES:
        kind = "size"
    elif name.lstrip(".") in _METADATA:
        kind = "meta"
    else:
        kind = "shape" if name in _SHAPE_ARGUMENTS else "op"
    with contextlib.suppress(TypeError):
        _KINDS[func] = (name, kind)
    return name, kind


def _func_name(func: Any) -> str:
    name = getattr(func, "__name__", None)
    if name == "__get__":  # a tensor attribute such as .T or .data
        owner = getattr(func, "__self__", None)
        return "." + str(getattr(owner, "__name__", "attribute"))
    if name is None:
        return type(func).__name__
    return name


#: Functions that may take a recorded dimension size as an argument: they only reshape
#: their input, and the group analysis checks the size asked for the channel dimension
#: (``check_target_size``), so a size read from a value and passed on stays consistent
#: after pruning. ``expand`` is checked the same way, of a group's tensor or of any other
#: (whose sizes must not be a channel count). Factories (``torch.zeros(b, c)``) are not
#: among them: a tensor they make as wide as a group (zero channels concatenated to it)
#: would follow the pruned width where the analysis counts a fixed one.
_SHAPE_ARGUMENTS = frozenset({"view", "reshape", "flatten", "unflatten", "size", "expand"})


class DimSize(int):
    """A dimension's size read from a recorded value (``x.shape[1]``, ``x.size(1)``).

    It behaves as the plain ``int``; arithmetic, comparisons and conversions on it,
    or passing it to a torch function other than a reshape, are noted, because a
    size that is a group's channel count changes when the group is pruned
    (``y / h.shape[-1]`` would change value). Conversions done in C without Python's
    number protocol (``numpy.sqrt(size)``) cannot be seen.
    """

    def __new__(
        cls, size: int, note: Callable[[str], None], source: tuple[Value, int | None] | None = None
    ) -> DimSize:
        obj = super().__new__(cls, size)
        obj._note = note  # type: ignore[attr-defined]
        obj.source = source  # type: ignore[attr-defined]  # (value, dimension) it was read from
        return obj

    def _used(self, what: str) -> None:
        self._note(what)  # type: ignore[attr-defined]

    __hash__ = int.__hash__

    def __reduce__(self) -> tuple[type, tuple[int]]:
        return int, (int.__int__(self),)  # stored sizes pickle and copy as plain ints

    def __copy__(self) -> int:
        return int.__int__(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> int:
        return int.__int__(self)


#: Arithmetic whose integer result is itself a size (``x.shape[0] - 1``): it comes back as
#: one, noting its uses as the size it was computed from, so that a number that depends on
#: the example's sizes (zero at batch 1, say) is not taken for a constant.
_DERIVED = frozenset(
    {
        "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__floordiv__",
        "__rfloordiv__", "__mod__", "__rmod__", "__neg__", "__pos__", "__abs__", "__pow__",
        "__rpow__", "__lshift__", "__rshift__", "__and__", "__or__", "__xor__", "__invert__",
        "__round__", "__trunc__", "__floor__", "__ceil__",
    }
)  # fmt: skip


def _noting(name: str) -> Callable[..., Any]:
    plain = getattr(int, name)
    by_float = getattr(float, name, None)  # what Python falls back to for a float operand
    derived = name in _DERIVED

    def method(self: DimSize, *args: Any) -> Any:
        self._used(f"Python {name.strip('_')}")
        for other in args:  # h.shape[2] + h.shape[1]: the size on the right is used too
            if isinstance(other, DimSize):
                other._used(f"Python {name.strip('_')}")
        result = plain(self, *args)
        if result is NotImplemented and len(args) == 1 and type(args[0]) is float and by_float:
            result = by_float(float(int.__int__(self)), args[0])  # x.shape[0] - 1.0
        if derived and type(result) is int:
            return DimSize(result, self._note)  # type: ignore[attr-defined]
        if type(result) in (int, float) and result == 0:  # float(x.shape[0] - 1) at batch 1
            recorder = getattr(_RECORDING, "recorder", None)
            if recorder is not None:
                recorder.zero_from_size = True
        return result

    method.__name__ = name
    return method


for _name in (
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__pow__",
    "__rpow__", "__neg__", "__float__", "__lshift__", "__rshift__", "__divmod__", "__int__",
    "__index__", "__bool__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "__and__", "__or__", "__xor__", "__abs__", "__round__", "__trunc__", "__pos__",
    "__invert__", "__floor__", "__ceil__", "bit_length", "bit_count", "conjugate", "to_bytes",
    "as_integer_ratio",
):  # fmt: skip
    setattr(DimSize, _name, _noting(_name))


def _noting_value(name: str) -> property:
    def read(self: DimSize) -> int:
        self._used(f"Python .{name}")
        return int.__int__(self)

    return property(read)


for _name in ("real", "numerator"):  # what fractions.Fraction and numbers.Integral read
    setattr(DimSize, _name, _noting_value(_name))


@dataclass(eq=False, slots=True)
class Value:
    """One tensor value of the recorded forward pass (a tensor object at one version).

    Attributes:
        shape: its shape.
        producer: the operation that created it (``None`` for inputs, parameters and
            tensors made outside the recording).
        users: operations that read it, in order.
        param: ``"module.attr"`` when it is a parameter or buffer of the model.
        is_input: whether it is one of the example inputs.
    """

    shape: tuple[int, ...]
    producer: Op | None = None
    users: list[Op] = field(default_factory=list)
    param: str | None = None
    is_input: bool = False
    clobbered: bool = False
    tensor_id: int = 0

    def __repr__(self) -> str:
        origin = self.producer.describe() if self.producer else (self.param or "external")
        return f"Value({list(self.shape)} from {origin})"


@dataclass(eq=False, slots=True)
class Op:
    """One recorded operation: a leaf layer's call or a torch function call.

    ``args``/``kwargs`` are the call's arguments with every tensor replaced by its
    :class:`Value`; ``outputs`` are the values it returned (in flattening order).
    """

    index: int
    kind: str  # "module" or "function"
    target: Any  # the module's qualified name, or the function
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[Value]
    owner: str  # qualified name of the innermost module running this op ("" = the model)
    owner_type: str
    inplace: bool = False
    small_owner: bool = False  # the owner is a module without submodules (an activation)
    _inputs: list[Value] | None = None

    @property
    def name(self) -> str:
        """The function's name (``"relu"``) or the module's qualified name."""
        return self.target if self.kind == "module" else func_name(self.target)

    def inputs(self) -> list[Value]:
        """Every :class:`Value` among the arguments, in order."""
        if self._inputs is None:
            found: list[Value] = []
            _collect(self.args, found)
            _collect(self.kwargs, found)
            self._inputs = found
        return self._inputs

    def describe(self) -> str:
        """How a user would name this operation in a message."""
        if self.kind == "module":
            return f"{self.owner_type} {self.target!r}"
        name = func_name(self.target)
        if self.owner and self.owner_type and not self.owner_type[0].islower():
            return f"{name} (in {self.owner_type} {self.owner!r})"
        return name


def _collect(value: Any, out: list[Value]) -> None:
    if isinstance(value, Value):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect(item, out)
    elif isinstance(value, dict):
        for item in value.values():
            _collect(item, out)


_FLAT = frozenset(
    {Tensor, nn.Parameter, int, float, bool, str, type(None), torch.dtype, torch.device}
)


def flatten_tensors(
    value: Any,
    out: list[Tensor],
    depth: int = 0,
    opaque: list[str] | None = None,
    *,
    sizes: list[DimSize] | None = None,
) -> list[Tensor]:
    """Every tensor in a nest of tuples, lists, mappings, dataclasses and plain objects.

    ``opaque`` collects what may hold tensors that cannot be looked at without running
    it: iterators (a generator) and callables (``functools.partial(torch.clone, h)``);
    ``sizes`` collects the recorded sizes (:class:`DimSize`) among them.
    """
    if type(value) in (tuple, list) and all(type(v) in _FLAT for v in value):
        out.extend(v for v in value if isinstance(v, Tensor))
        return out
    if depth > 32 or isinstance(value, (str, bytes, int, float, bool, type(None), nn.Module)):
        if sizes is not None and type(value) is DimSize:
            sizes.append(value)
        return out
    if isinstance(value, Tensor):
        out.append(value)
        return out
    deeper = depth + 1
    if isinstance(value, Mapping):
        for item in value.values():
            flatten_tensors(item, out, deeper, opaque, sizes=sizes)
        if sizes is not None:  # {h.shape[1]: ...}
            flatten_tensors(list(value.keys()), out, deeper, opaque, sizes=sizes)
    elif isinstance(value, slice):
        if sizes is not None:  # slice(0, h.shape[1])
            flatten_tensors([value.start, value.stop, value.step], out, deeper, sizes=sizes)
    elif isinstance(value, (list, tuple, set, frozenset, Sequence, AbstractSet)):
        for item in value:  # a deque or any other registered sequence or set too
            flatten_tensors(item, out, deeper, opaque, sizes=sizes)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            flatten_tensors(getattr(value, item.name, None), out, deeper, opaque, sizes=sizes)
    elif opaque is not None and (callable(value) or isinstance(value, Iterator)):
        opaque.append(type(value).__name__)
    elif not callable(value):
        for item in getattr(value, "__dict__", {}).values():
            flatten_tensors(item, out, deeper, opaque, sizes=sizes)
        for cls in type(value).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                if isinstance(slot, str) and slot not in ("__dict__", "__weakref__"):
                    flatten_tensors(getattr(value, slot, None), out, deeper, opaque, sizes=sizes)
    return out


@dataclass
class Recording:
    """The dataflow of one forward pass.

    Attributes:
        ops: every recorded operation, in execution order.
        inputs: the example inputs' values.
        outputs: the values of every tensor in the model's output.
        calls: how many times each leaf layer was called.
        taints: per leaf layer, why its parameters cannot be edited safely (a read
            outside its own call, sharing with another layer, a hook).
        modules: the model's modules by qualified name.
        hooked: modules carrying user forward hooks or pre-hooks, with a description.
        size_uses: sizes read from values and then used as numbers (see :class:`DimSize`).
        clobbered: values made stale by an in-place write through another alias.
        unseen: why, for each tensor that code the recording cannot see made or wrote
            (see :meth:`_Recorder.unseen_use`): that code may have read any value or
            weight of the model.
        batch_statistics: batch norms that ran in training mode (normalising with the
            batch's statistics: their forward, or code before it, switched them back).
        zero_from_size: whether a size became a plain number 0 (``float(x.shape[0] - 1)``
            at batch 1): a constant 0 may then be one only in the example.
    """

    ops: list[Op]
    inputs: list[Value]
    outputs: list[Value]
    calls: dict[str, int]
    taints: dict[str, str]
    modules: dict[str, nn.Module]
    hooked: dict[str, str]
    size_uses: list[tuple[Value, int | None, str]] = field(default_factory=list)
    clobbered: list[Value] = field(default_factory=list)
    unseen: list[str] = field(default_factory=list)
    batch_statistics: set[str] = field(default_factory=set)
    zero_from_size: bool = False

    def release(self) -> None:
        """Empty the recording once it is used, freeing its values and operations at once.

        Values and operations point at each other (producer, users, arguments), so a
        dropped recording would otherwise wait for the cyclic garbage collector, whose
        passes over a large model's objects cost more than the recording itself.
        """
        for op in self.ops:
            op.args, op.kwargs, op.outputs, op._inputs = (), {}, [], None
        for values in (self.ops, self.inputs, self.outputs, self.size_uses, self.clobbered):
            values.clear()


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: recording and analysis allocate many small
    objects, all freed by reference counting after :meth:`Recording.release`."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


_SCALARS = frozenset({int, float, bool, str, type(None), DimSize})
_AS_IS = _FLAT | _SCALARS


def _all_passed_as_is(args: Iterable[Any]) -> bool:
    """Whether every call argument is a tensor or holds none (``(768,)``, ``eps=1e-5``)."""
    for arg in args:
        kind = type(arg)
        if kind in _AS_IS:
            continue
        if kind is not tuple and kind is not list:
            return False
        for item in arg:
            if type(item) not in _SCALARS:
                return False
    return True


_NO_KWARGS: Mapping[str, Any] = MappingProxyType({})


@contextlib.contextmanager
def recorded(
    model: nn.Module,
    example_inputs: Any,
    modules: dict[str, nn.Module] | None = None,
    checked: bool = False,
) -> Iterator[Recording]:
    """:func:`record`, as a context whose recording is released when it ends, all with
    the cyclic collector paused (see :meth:`Recording.release`)."""
    with collection_paused():
        recording = record(model, example_inputs, modules, checked)
        try:
            yield recording
        finally:
            recording.release()


#: The version of a tensor without a version counter (made under ``torch.inference_mode``).
#: Such a tensor returned by a call that took it may have been written in place: it is
#: recorded as a new value of that call, never as the input returned unchanged.
_NO_VERSION = -1


class _Ref(weakref.ref):
    """A weak reference to a recorded tensor, with the tensor's id."""

    __slots__ = ("tensor_id",)  # set by the creator: no Python-level constructor
    tensor_id: int


_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)

#: The tensors every leaf layer registers (possibly as ``None``) and compression edits.
_LEAF_TENSORS = ("weight", "bias")
_LEAF_TENSORS_BN = ("weight", "bias", "running_mean", "running_var")
_LEAF_TENSORS_PRELU = ("weight",)


def _owned(module: nn.Module) -> list[tuple[str, Tensor | None]]:
    """A leaf layer's registered tensors, its submodules' included (``None`` entries too)."""
    if module._modules:
        return [*module.named_parameters(recurse=True), *module.named_buffers(recurse=True)]
    return [*module._parameters.items(), *module._buffers.items()]  # without the generic walk


#: Per module class and attribute count, the attributes that held tensors (or lists,
#: tuples or dicts of them), or ``None`` (a cache filled later), when first met: plain
#: module attributes are read only there, not by walking every module's ``__dict__`` on
#: every pass. A tensor read from an attribute that held none of these then counts as
#: unseen: a group is left intact that need not be, never the other way round.
_TENSOR_ATTRS: dict[tuple[type, int], tuple[str, ...]] = {}
_REGISTERED = frozenset({"_parameters", "_buffers"})


def _tensors_in(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, Tensor)]
    if isinstance(value, dict):
        return [v for v in value.values() if isinstance(v, Tensor)]
    return []


class _Recorder(TorchFunctionMode):
    """Builds a :class:`Recording` while the model runs."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.modules = modules
        self.values: dict[int, tuple[int, Value]] = {}  # tensor id -> (version, its value)
        self.alive: dict[int, _Ref] = {}  # tensor id -> weak reference that forgets it
        self.pinned: list[Tensor] = []  # tensors without weak references stay alive
        self.ops: list[Op] = []
        self.stack: list[tuple[str, str, nn.Module]] = []  # (name, class name, module)
        self.calls: dict[str, int] = {}
        self.taints: dict[str, str] = {}
        self.leaf: nn.Module | None = None  # the leaf layer being called
        self.size_uses: list[tuple[Value, int | None, str]] = []
        self.clobbered: list[Value] = []  # values made stale by an in-place write elsewhere
        self.shaping = 0
        self.sized = False  # whether any DimSize was handed out
        self.sized_in: list[nn.Module] = []  # modules whose code read sizes
        self.params: dict[int, tuple[str, str]] = {}  # tensor id -> (leaf name, attribute)
        self.module_tensors: dict[int, str] = {}  # other modules' tensors: id -> "name.attr"
        self.counter = itertools.count()
        self.hooked: dict[str, str] = {}  # modules with user hooks, described
        self.watching = False  # whether the model is running (tensors seen are its own)
        self.unseen: list[str] = []
        self.batch_statistics: set[str] = set()  # batch norms called in training mode
        self.zero_from_size = False  # a size became a plain number 0 (see DimSize)
        # Each leaf's tensors as the pass starts, and every other tensor of the model's
        # modules (see unseen_use): held, so that their ids stay theirs.
        self.owned: list[tuple[str, nn.Module, list[tuple[str, Tensor | None]]]] = []
        self.leaves: set[int] = set()  # ids of the leaf layers
        # The parameter and buffer dictionaries of the leaves without submodules, and
        # their items as the pass starts: check_owned compares them in one sweep.
        self.flat: list[dict[str, Any]] = []
        self.snapshot: list[tuple[str, Tensor | None]] = []
        self.nested: list[tuple[str, nn.Module, list[tuple[str, Tensor | None]]]] = []
        held: list[Tensor] = []
        plain: list[Tensor] = []  # tensors in plain attributes (lists, dicts, attributes)
        params = self.params
        attributes = _TENSOR_ATTRS
        taints = self.taints
        flat, snapshot = self.flat, self.snapshot
        for name, module in modules.items():
            state = module.__dict__
            if state["_forward_pre_hooks"] or state["_forward_hooks"]:
                self.hooked[name] = _hook_description(name, module)
            key = (type(module), len(state))
            names = attributes.get(key)
            if names is None:
                names = attributes[key] = tuple(
                    k
                    for k, v in state.items()
                    if k not in _REGISTERED and (v is None or _tensors_in(v))
                )
            for attr in names:
                found = _tensors_in(state.get(attr))
                held += found
                plain += found
            registered, buffers = state["_parameters"], state["_buffers"]
            if not is_leaf(module):
                for table in (registered, buffers):
                    for attr, t in table.items():
                        if t is not None:
                            held.append(t)
                            self.module_tensors.setdefault(
                                id(t), f"{name}.{attr}" if name else attr
                            )
                continue
            self.leaves.add(id(module))
            edited = (
                _LEAF_TENSORS_BN
                if isinstance(module, (*BATCHNORMS, nn.modules.instancenorm._InstanceNorm))
                else _LEAF_TENSORS_PRELU
                if isinstance(module, nn.PReLU)
                else _LEAF_TENSORS
            )
            for attr in edited:
                if attr not in registered and attr not in buffers:
                    taints.setdefault(
                        name,
                        f"{attr} of {name} is not a registered parameter or buffer "
                        "(a plain attribute can be replaced by any code)",
                    )
            if state["_modules"]:
                owned = _owned(module)
                self.nested.append((name, module, owned))
            else:
                owned = [*registered.items(), *buffers.items()]
                flat += (registered, buffers)
                snapshot += owned
            self.owned.append((name, module, owned))
            for attr, tensor in owned:
                if tensor is None:
                    continue
                previous = params.get(id(tensor))
                if previous is not None and previous[0] != name:
                    why = f"{attr} of {name} is shared with {previous[0]} (tied weights)"
                    taints.setdefault(name, why)
                    taints.setdefault(
                        previous[0],
                        f"{previous[1]} of {previous[0]} is shared with {name} (tied weights)",
                    )
                else:
                    params[id(tensor)] = (name, attr)
        self.held = held
        self.held_ids = held_ids = {id(t) for t in held}
        module_tensors = self.module_tensors
        for tensor in plain:  # a module's tensor also in a plain attribute keeps its old size
            name = module_tensors.get(id(tensor))
            if name is not None:
                taints.setdefault(name, f"{name} is also held in a plain attribute")
        for tensor_id in held_ids.intersection(params):  # a leaf's tensor held elsewhere too
            name, attr = params[tensor_id]
            taints.setdefault(
                name,
                f"{attr} of {name} is also held outside it (in an nn.ParameterList, "
                "another module or an attribute), which would keep the old size",
            )

    def check_owned(self) -> None:
        """Leaf layers whose tensors were replaced while the model ran (a weight set anew
        in ``forward``): the next call would undo their compression."""
        now: list[tuple[str, Tensor | None]] = []
        for tensors in self.flat:
            now += tensors.items()
        before = self.snapshot
        same = (
            len(now) == len(before)
            and all(map(operator.is_, map(_SECOND, now), map(_SECOND, before)))
            and all(map(operator.eq, map(_FIRST, now), map(_FIRST, before)))
        )
        for name, module, owned in self.nested if same else self.owned:
            now = _owned(module)
            if len(now) == len(owned) and all(
                a == b and t is u for (a, t), (b, u) in zip(now, owned, strict=True)
            ):
                continue
            before = dict(owned)
            attr = next(
                (a for a, t in now if a not in before or before[a] is not t),
                next((a for a in before if a not in dict(now)), "a tensor"),
            )
            self.taints.setdefault(
                name, f"{attr} of {name} is replaced while the model runs (set anew in forward)"
            )

    # -- values
    def value(self, tensor: Tensor) -> Value:
        try:
            version = tensor._version
        except (RuntimeError, AttributeError):  # inference tensors have no version counter
            version = _NO_VERSION
        found = self.values.get(id(tensor))
        if found is not None and found[0] == version:
            return found[1]
        owner = self.params.get(id(tensor))
        value = Value(
            tuple(tensor.shape),
            param=f"{owner[0]}.{owner[1]}" if owner else self.module_tensors.get(id(tensor)),
        )
        if self.watching and (
            found is not None or (owner is None and id(tensor) not in self.held_ids)
        ):
            self.unseen_use(found is not None, tensor)
        self._store(version, tensor, value)
        return value

    def unseen_use(self, written: bool, tensor: Tensor | None = None) -> None:
        """The model uses a tensor that no recorded call made (``written``: one that no
        recorded call wrote in place at its current version), and that was not an input,
        a parameter, buffer or tensor attribute of a module as the pass started.

        So code the recording cannot see ran: ``torch.func`` transforms, DLPack, another
        thread, code under ``torch._C.DisableTorchFunction``, legacy constructors
        (``torch.Tensor([...])``) and ``torch.from_numpy``, which no mode sees, or a tensor
        kept outside the model (a global, a closure) was read. Such code may have read any
        value or weight (a weight of a layer that runs later too), so every group is left
        intact (:class:`~neuron_merging.core.groups` breaks them).
        """
        where = self.owner()
        place = f"{where[1]}.forward" if where[0] else "forward"
        if written:
            why = (
                f"{place} uses a tensor written in place where the recording cannot see "
                "(code with torch functions disabled, a thread, DLPack), which may have read "
                "any value or weight"
            )
        elif isinstance(tensor, nn.Parameter):
            why = (
                f"{place} uses a parameter that is not registered in the model (a layer kept "
                "in a plain Python list or dict?), which compression can neither see nor edit: "
                "hold layers in nn.ModuleList or nn.ModuleDict"
            )
        else:
            why = (
                f"{place} uses a tensor that no recorded call made (from torch.func, DLPack, a "
                "thread, torch.Tensor(...) or from_numpy, code with torch functions disabled, "
                "or a global), which may have read any value or weight: make constants with "
                "torch.tensor or register them as buffers"
            )
        self.unseen.append(why)

    def _store(self, version: int, tensor: Tensor, value: Value) -> None:
        """``value`` is now ``tensor``'s current value (earlier versions are never read again)."""
        tensor_id = value.tensor_id = id(tensor)
        self.values[tensor_id] = (version, value)
        if tensor_id not in self.alive:
            try:
                ref = self.alive[tensor_id] = _Ref(tensor, self._freed)
                ref.tensor_id = tensor_id
            except TypeError:  # no weak references: the id stays taken while it lives
                self.pinned.append(tensor)

    def _freed(self, ref: _Ref) -> None:
        """A recorded tensor was freed: forget its value before its id can be reused."""
        tensor_id = ref.tensor_id
        if self.alive.get(tensor_id) is ref:
            del self.alive[tensor_id]
            self.values.pop(tensor_id, None)

    def wrap(self, obj: Any, depth: int = 0) -> Any:
        """``obj`` with every tensor replaced by its value."""
        if isinstance(obj, Tensor):
            return self.value(obj)
        if type(obj) is tuple and not any(isinstance(o, (Tensor, list, tuple, dict)) for o in obj):
            return obj
        if depth > 8:
            return obj
        if isinstance(obj, (list, tuple)):
            return (
                type(obj)(self.wrap(o, depth + 1) for o in obj)
                if type(obj)
                in (
                    list,
                    tuple,
                )
                else [self.wrap(o, depth + 1) for o in obj]
            )
        if isinstance(obj, dict):
            return {k: self.wrap(v, depth + 1) for k, v in obj.items()}
        return obj

    def owner(self) -> tuple[str, str]:
        stack = self.stack
        return (stack[-1][0], stack[-1][1]) if stack else ("", "")

    def add_op(
        self,
        kind: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        inputs: list[Tensor],
        result: Any,
        values: list[Value] | None = None,
    ) -> None:
        """Record one call whose (wrapped) arguments are ``args``/``kwargs``.

        ``values`` are the :class:`Value`\\ s among them, when the caller has them.
        """
        if type(result) is Tensor and values is not None:  # the common case, in one pass
            result_id = id(result)
            try:
                version = result._version
            except (RuntimeError, AttributeError):
                version = _NO_VERSION
            found = self.values.get(result_id)
            if found is not None and found[0] == version != _NO_VERSION:
                return  # returned an input unchanged
            inplace = False
            for t in inputs:
                if id(t) == result_id:
                    inplace = True
            stack = self.stack
            owner, owner_type = (stack[-1][0], stack[-1][1]) if stack else ("", "")
            value = Value(tuple(result.shape))
            op = Op(
                next(self.counter), kind, target, args, kwargs, [value], owner, owner_type,
                inplace, False, values,
            )  # fmt: skip
            value.producer = op
            for v in values:
                v.users.append(op)
            if inplace:
                self._clobber(result)
            self._store(version, result, value)
            self.ops.append(op)
            return
        outs = [result] if type(result) is Tensor else flatten_tensors(result, [])
        for t in (*inputs, *outs):  # a subclass made in forward (as_subclass) runs hidden code
            if (
                type(t) is not Tensor
                and type(t) is not nn.Parameter
                and _computes_otherwise(type(t))
            ):
                self.unseen.append(
                    f"forward computes with a {type(t).__name__}, a tensor subclass that runs "
                    "its own code for torch calls, which the recording cannot see"
                )
                break
        in_ids = (id(inputs[0]),) if len(inputs) == 1 else {id(t) for t in inputs}
        new: list[tuple[int, Tensor]] = []
        inplace = False
        values_of = self.values
        for t in outs:
            try:
                version = t._version
            except (RuntimeError, AttributeError):
                version = _NO_VERSION
            found = values_of.get(id(t))
            if found is not None and found[0] == version != _NO_VERSION:
                continue  # returned an input unchanged (dropout in eval, .to(same dtype))
            if id(t) in in_ids:
                inplace = True
            new.append((version, t))
        for t in inputs:  # written in place by a call that returns something else
            found = values_of.get(id(t))
            if (
                found is not None
                and found[0] != _NO_VERSION
                and found[0] != t._version
                and all(t is not o for o in outs)
            ):
                inplace = True
                new.append((t._version, t))
        if not new and outs:
            return  # nothing new was computed: the call is an identity
        owner, owner_type = self.owner()
        op = Op(next(self.counter), kind, target, args, kwargs, [], owner, owner_type, inplace)
        op._inputs = values
        for value in op.inputs():
            value.users.append(op)
        for version, t in new:
            value = Value(tuple(t.shape), producer=op)
            if inplace and id(t) in in_ids:
                self._clobber(t)
            self._store(version, t, value)
            op.outputs.append(value)
        self.ops.append(op)

    def _clobber(self, tensor: Tensor) -> None:
        """An in-place write into ``tensor``: the value of every other live tensor on its
        storage (a view, ``.data``) is stale.

        Writes in place are rare and few recorded tensors are alive at once, so they
        are compared here rather than every value's storage being tracked.
        """
        ptr = _storage_ptr(tensor)
        if not ptr:
            return
        # A snapshot first: a tensor can be freed while the list is built (by a profiler's
        # or tracer's callback, or another thread), and its weak reference's callback then
        # removes it from ``alive``.
        live = [(ref.tensor_id, ref()) for ref in list(self.alive.values())]
        live += [(id(t), t) for t in self.pinned]
        for tensor_id, other in live:
            if other is None or tensor_id == id(tensor) or _storage_ptr(other) != ptr:
                continue
            found = self.values.get(tensor_id)
            if found is not None and not found[1].clobbered:
                found[1].clobbered = True
                self.clobbered.append(found[1])

    # -- torch functions
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or _NO_KWARGS
        if self.leaf is not None:  # inside a leaf layer (the mode is normally off there)
            return func(*args, **kwargs)
        name, kind = _kind(func)
        if kind == "meta":
            return func(*args, **kwargs)
        if kind == "size":
            result = func(*args, **kwargs)
            if args:
                dim = args[1] if len(args) > 1 else kwargs.get("dim")
                sizes = self.sizes(args[0], result, dim)
                if name == "__len__" and isinstance(sizes, DimSize):
                    sizes._used("len()")  # len() hands Python a plain int
                return sizes
            return result
        shaping = kind == "shape"
        if self.sized:
            self.note_sizes(name, shaping, (*args, *kwargs.values()))
        values: list[Value] | None
        if _all_passed_as_is(args) and (
            not kwargs or _all_passed_as_is(kwargs.values())
        ):  # the common case (``relu(x, inplace=False)``): tensors and plain values only
            tensors = []
            values = []
            wrapped: list[Any] = []
            for a in args:
                if isinstance(a, Tensor):
                    value = self.value(a)
                    tensors.append(a)
                    values.append(value)
                    a = value
                wrapped.append(a)
            wrapped_args: Any = tuple(wrapped)
            wrapped_kwargs: dict[str, Any] = {}
            for k, a in kwargs.items():
                if isinstance(a, Tensor):
                    value = self.value(a)
                    tensors.append(a)
                    values.append(value)
                    a = value
                wrapped_kwargs[k] = a
        else:
            tensors = flatten_tensors(list(args), [])
            flatten_tensors(kwargs, tensors)
            wrapped_args, wrapped_kwargs, values = (
                self.wrap(tuple(args)),
                self.wrap(dict(kwargs)),
                None,
            )
        params = self.params
        for t in tensors:
            if id(t) in params:
                self.taint_read(t, name)
        if shaping:
            self.shaping += 1  # sizes passed on to a reshape: their conversions are harmless
        try:
            result = func(*args, **kwargs)
        finally:
            if shaping:
                self.shaping -= 1
        if name in _UNVERSIONED_WRITES and isinstance(result, Tensor):
            self.values.pop(id(result), None)  # written in place: a new value, recorded so
        self.add_op("function", func, wrapped_args, wrapped_kwargs, tensors, result, values)
        return result

    @staticmethod
    def note_sizes(name: str, shaping: bool, args: tuple[Any, ...]) -> None:
        """Sizes passed to ``name`` (itself, in a list or tuple, or in a slice: C reads an
        int subclass's value directly) are used as numbers. A reshape's sizes are checked
        by the group analysis instead, except a layer's width (``fc.out_features``), which
        does not say what tensor it was read from."""
        for arg in args:
            if type(arg) in _FLAT:  # a tensor, a plain number, None: the common case
                continue
            for item in arg if isinstance(arg, (list, tuple)) else (arg,):
                if isinstance(item, slice):
                    for part in (item.start, item.stop, item.step):
                        if isinstance(part, DimSize):
                            part._used(f"in a slice passed to {name}")
                elif isinstance(item, DimSize) and (not shaping or item.source is None):
                    item._used(f"passed to {name}")

    def taint_read(self, tensor: Tensor, name: str) -> None:
        """Parameter ``tensor`` of a leaf layer is read by ``name`` outside that layer's call."""
        owner = self.params.get(id(tensor))
        if owner is not None:
            where = self.owner()
            place = f"{where[1]}.forward" if where[0] else "forward"
            self.taints.setdefault(
                owner[0], f"{owner[1]} of {owner[0]} also read by {name} in {place}"
            )

    def sizes(self, tensor: Any, result: Any, dim: Any) -> Any:
        """``result`` of a size query, with sizes that note their use (see :class:`DimSize`)."""
        if not isinstance(tensor, Tensor):
            return result
        held = self.module_tensors.get(id(tensor)) if self.module_tensors else None
        if held is not None:  # its sizes may be used as numbers: it is never sliced
            self.taints.setdefault(held, f"the sizes of {held} are read in forward")
        try:
            version = tensor._version
        except (RuntimeError, AttributeError):
            version = _NO_VERSION
        found = self.values.get(id(tensor))
        owner = self.params.get(id(tensor))
        # A layer's weight or bias: pruning changes its sizes too. Its sizes carry no
        # source, so that they are noted wherever they go, a reshape's sizes included.
        value: Value | None = None
        if owner is not None:
            where = self.owner()
            place = f"{where[1]}.forward" if where[0] else "forward"

            def note(d: int | None) -> Callable[[str], None]:
                def record_use(what: str) -> None:
                    self.taints.setdefault(
                        owner[0],
                        f"the size of {owner[1]} of {owner[0]} is used as a number in {place} "
                        f"({what}), and pruning changes it",
                    )

                return record_use

        elif (
            found is None
            or found[0] != version
            or (found[1].producer is None and not found[1].is_input)
        ):
            return result
        else:
            value = found[1]

            def note(d: int | None) -> Callable[[str], None]:
                def record_use(what: str) -> None:
                    if not self.shaping:
                        self.size_uses.append((value, d, what))

                return record_use

        self.sized = True
        if self.stack:
            self.sized_in.append(self.stack[-1][2])
        if isinstance(result, torch.Size):
            return torch.Size(
                DimSize(n, note(i), None if value is None else (value, i))
                for i, n in enumerate(result)
            )
        if isinstance(result, int) and not isinstance(result, bool):
            d = dim if isinstance(dim, int) else (0 if dim is None and len(tensor.shape) else None)
            if dim is None:  # numel() or len(): every dimension, or the first
                d = None if result == tensor.numel() and tensor.dim() != 1 else 0
            return DimSize(result, note(d), None if value is None else (value, d))
        return result

    # -- module calls
    #
    # While recording, every module of the model has an instance ``forward`` that wraps
    # its own: ``nn.Module.__call__`` runs the module's hooks around it as usual, so
    # user hook code is recorded like the rest of the model's code, and modules take
    # PyTorch's fast call path (global module hooks would send every call down the
    # slow one). A module's wrapper names it as the owner of the operations it runs;
    # a leaf layer's wrapper turns the mode off for the call and records it as one
    # operation.
    def tracking(self, name: str, module: nn.Module, forward: Callable[..., Any]) -> Any:
        """``forward`` of a module that is not a leaf, naming it as the owner inside."""
        stack = self.stack
        entry = (name, type(module).__name__, module)
        direct = (
            _DIRECT.get(type(module))
            if "forward" not in module.__dict__ and _unpatched(module)
            else None
        )
        if direct is not None:  # the one call its forward makes, recorded as it would be
            record_call = self.__torch_function__

            def called(*args: Any, **kwargs: Any) -> Any:
                stack.append(entry)
                try:
                    if len(args) != 1 or kwargs or type(args[0]) is not Tensor:
                        return forward(*args, **kwargs)
                    func, call_args, call_kwargs = direct(module, args[0])
                    with _DISABLE_TORCH_FUNCTION():
                        return record_call(func, _TENSOR_TYPES, call_args, call_kwargs)
                finally:
                    stack.pop()

            called.__wrapped__ = forward  # type: ignore[attr-defined]
            return called

        def tracked(*args: Any, **kwargs: Any) -> Any:
            stack.append(entry)
            try:
                return forward(*args, **kwargs)
            finally:
                stack.pop()

        tracked.__wrapped__ = forward  # type: ignore[attr-defined]  # inspect.signature
        return tracked

    def hooking(self, name: str, module: nn.Module) -> list[Any]:
        """Hooks naming ``module`` as the owner from before its user's pre-hooks to after
        its user's forward hooks, so that operations run by hook code are the hooked
        module's (see :class:`Recording`'s ``hooked``)."""
        stack = self.stack
        entry = (name, type(module).__name__, module)

        def push(module: nn.Module, args: Any) -> None:
            stack.append(entry)

        def pop(module: nn.Module, args: Any, output: Any) -> None:
            if stack and stack[-1] is entry:
                stack.pop()

        return [
            module.register_forward_pre_hook(push, prepend=True),
            module.register_forward_hook(pop, always_call=True),
        ]

    def leaf_call(self, name: str, module: nn.Module, forward: Callable[..., Any]) -> Any:
        """``forward`` of leaf layer ``module``, recorded as one operation.

        Its registered tensors must be the ones it holds as the pass starts: a call with
        others swapped in (``torch.func.functional_call``) computes with tensors that
        compression does not edit, and its module is left intact.
        """
        calls = self.calls
        direct = _DIRECT_LEAVES.get(type(module)) if _unpatched(module) else None
        norm = isinstance(module, BATCHNORMS)
        state = module.__dict__
        held = [  # the tensors compression edits, as they are when the pass starts
            (registered, attr, registered[attr])
            for registered in (state["_parameters"], state["_buffers"])
            for attr in _LEAF_TENSORS_BN
            if registered.get(attr) is not None
        ]

        def leaf(*args: Any, **kwargs: Any) -> Any:
            if self.leaf is not None:  # a leaf layer run by another one's forward
                return forward(*args, **kwargs)
            for registered, attr, tensor in held:
                if registered.get(attr) is not tensor:
                    self.taints.setdefault(
                        name,
                        f"{attr} of {name} is replaced while the model runs (set anew in "
                        "forward, or swapped for its call by torch.func.functional_call)",
                    )
            self.leaf = module
            if norm and module.training:  # switched back while the model ran
                self.batch_statistics.add(name)
            try:
                with _DISABLE_TORCH_FUNCTION():
                    if not kwargs and len(args) == 1 and type(args[0]) is Tensor:
                        output = None if direct is None else direct(module, args[0])
                        if output is None:
                            output = forward(args[0])
                        calls[name] = calls.get(name, 0) + 1
                        value = self.value(args[0])
                        self.add_op("module", name, (value,), {}, [args[0]], output, [value])
                    else:
                        output = forward(*args, **kwargs)
                        calls[name] = calls.get(name, 0) + 1
                        tensors = flatten_tensors(list(args), [])
                        flatten_tensors(kwargs, tensors)
                        self.add_op(
                            "module", name, self.wrap(args), self.wrap(kwargs), tensors, output
                        )
            finally:
                self.leaf = None
            return output

        leaf.__wrapped__ = forward  # type: ignore[attr-defined]
        return leaf

    def width_read(self, name: str, attr: str) -> Callable[[str], None]:
        """What notes a use of layer ``name``'s ``attr`` (``fc1.out_features``) as a number
        outside the layer's own call: pruning changes it, so the layer is left intact."""

        def note(what: str) -> None:
            if self.watching and self.leaf is None:
                where = self.owner()
                place = f"{where[1]}.forward" if where[0] else "forward"
                self.taints.setdefault(
                    name,
                    f"{attr} of {name} is used as a number in {place} ({what}), and pruning "
                    "changes it",
                )

        return note

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Every module's ``forward`` wrapped (see above) inside; restored at the end.

        Modules compiled in place (``module.compile()``) run their eager code inside, so
        that their operations are recorded rather than hidden in compiled code.
        """
        leaves = self.leaves
        placed: list[tuple[nn.Module, Any, Any]] = []  # module, wrapper, instance forward
        handles = []
        compiled: list[tuple[nn.Module, Any]] = []  # module.compile(): run eagerly here
        widths: list[tuple[dict[str, Any], str, int, DimSize]] = []  # state, attribute, n, size
        try:
            for name, module in self.modules.items():
                state = module.__dict__
                if state.get("_compiled_call_impl") is not None:
                    compiled.append((module, state["_compiled_call_impl"]))
                    state["_compiled_call_impl"] = None
                leaf = id(module) in leaves
                if leaf:
                    key = (type(module), len(state))
                    names = _WIDTHS_OF.get(key)
                    if names is None:
                        names = _WIDTHS_OF[key] = tuple(a for a in _WIDTHS if a in state)
                    for attr in names:
                        n = state.get(attr)
                        if type(n) is int:
                            size = state[attr] = DimSize(n, self.width_read(name, attr))
                            widths.append((state, attr, n, size))
                if name in self.hooked:
                    handles.extend(self.hooking(name, module))
                    if not leaf:
                        continue
                own = module.__dict__.get("forward", _NONE)
                forward = module.forward
                make = self.leaf_call if leaf else self.tracking
                wrapper = make(name, module, forward)
                module.__dict__["forward"] = wrapper
                placed.append((module, wrapper, own))
            if widths:
                self.sized = True
            yield
        finally:
            for state, attr, n, size in widths:
                if state.get(attr) is size:
                    state[attr] = n
            for handle in handles:
                handle.remove()
            for module, call in compiled:
                module.__dict__["_compiled_call_impl"] = call
            for module, wrapper, own in placed:
                if module.__dict__.get("forward") is wrapper:
                    if own is _NONE:
                        del module.__dict__["forward"]
                    else:
                        module.__dict__["forward"] = own


_NONE = object()
_TENSOR_TYPES = (Tensor,)
#: The sizes a smaller model's layers get anew (``build.py``): while recording they note
#: their uses as numbers, as sizes read from tensors do.
#: The attributes of _WIDTHS that a leaf class sets, by (class, number of attributes).
_WIDTHS_OF: dict[tuple[type, int], tuple[str, ...]] = {}
_WIDTHS = (
    "in_features", "out_features", "in_channels", "out_channels", "groups", "nf", "num_features",
    "num_parameters", "num_channels", "num_groups",
)  # fmt: skip


def _linear(module: Any, x: Tensor) -> Tensor | None:
    return F.linear(x, module.weight, module.bias)


def _conv(conv: Callable[..., Tensor]) -> Callable[[Any, Tensor], Tensor | None]:
    def call(module: Any, x: Tensor) -> Tensor | None:
        if module.padding_mode != "zeros":
            return None
        return conv(
            x, module.weight, module.bias, module.stride, module.padding, module.dilation,
            module.groups,
        )  # fmt: skip

    return call


def _batch_norm(dims: tuple[int, ...]) -> Callable[[Any, Tensor], Tensor | None]:
    def call(module: Any, x: Tensor) -> Tensor | None:
        mean, var = module.running_mean, module.running_var
        if module.training or mean is None or var is None or x.dim() not in dims:
            return None  # batch statistics, or the forward's error for a wrong input
        momentum = 0.0 if module.momentum is None else module.momentum
        return F.batch_norm(x, mean, var, module.weight, module.bias, False, momentum, module.eps)

    return call


#: Leaf layers whose forward, on one tensor, is what these compute (their torch call,
#: for the settings a recording meets): the recorder runs them directly, skipping the
#: forward's Python frames and attribute lookups, a few microseconds per layer (a batch
#: norm's forward is mostly Python). For other settings (padding modes, batch
#: statistics) they return ``None`` and the forward runs. ``tests/test_soundness.py``
#: checks that the outputs are identical.
_DIRECT_LEAVES: dict[type, Callable[[Any, Tensor], Tensor | None]] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv(F.conv1d),
    nn.Conv2d: _conv(F.conv2d),
    nn.Conv3d: _conv(F.conv3d),
    nn.BatchNorm1d: _batch_norm((2, 3)),
    nn.BatchNorm2d: _batch_norm((4,)),
    nn.BatchNorm3d: _batch_norm((5,)),
    nn.PReLU: lambda module, x: F.prelu(x, module.weight),
}

#: Modules whose class's ``forward`` is a single torch function call on its input: the
#: call the torch-function mode would receive (function, arguments, keyword arguments, as
#: that function's ``handle_torch_function`` passes them), for the recorder to record
#: directly. Going through the forward, the functional wrapper and torch's Python
#: dispatch to the mode costs several microseconds per call, much of a small model's
#: recording; the recording is the same (``tests/test_soundness.py`` compares the two
#: for every entry). Subclasses and instances with their own ``forward`` run as usual.
_DIRECT: dict[type, Callable[[Any, Tensor], tuple[Any, tuple[Any, ...], dict[str, Any]]]] = {
    nn.ReLU: lambda m, x: (F.relu, (x,), {"inplace": m.inplace}),
    nn.ReLU6: lambda m, x: (
        F.hardtanh, (x,), {"min_val": m.min_val, "max_val": m.max_val, "inplace": m.inplace}
    ),
    nn.Hardtanh: lambda m, x: (
        F.hardtanh, (x,), {"min_val": m.min_val, "max_val": m.max_val, "inplace": m.inplace}
    ),
    nn.LeakyReLU: lambda m, x: (
        F.leaky_relu, (x,), {"negative_slope": m.negative_slope, "inplace": m.inplace}
    ),
    nn.GELU: lambda m, x: (F.gelu, (x,), {"approximate": m.approximate}),
    nn.SiLU: lambda m, x: (F.silu, (x,), {"inplace": m.inplace}),
    nn.Hardswish: lambda m, x: (F.hardswish, (x,), {"inplace": m.inplace}),
    nn.Sigmoid: lambda m, x: (torch.sigmoid, (x,), {}),
    nn.Tanh: lambda m, x: (torch.tanh, (x,), {}),
    nn.Dropout: lambda m, x: (
        F.dropout, (x,), {"p": m.p, "training": m.training, "inplace": m.inplace}
    ),
    nn.LayerNorm: lambda m, x: (
        F.layer_norm,
        (x, m.normalized_shape),
        {"weight": m.weight, "bias": m.bias, "eps": m.eps},
    ),
}  # fmt: skip

#: The ``forward`` (and ``_conv_forward``) of every class above as this module was imported:
#: a class patched since (``nn.ReLU.forward = ...``) runs its new code, recorded as usual.
_FORWARDS = {
    cls: (cls.forward, getattr(cls, "_conv_forward", None)) for cls in (*_DIRECT, *_DIRECT_LEAVES)
}


def _unpatched(module: nn.Module) -> bool:
    """Whether ``module``'s class still has the forward the tables above were written for."""
    cls = type(module)
    known = _FORWARDS.get(cls)
    return (
        known is not None
        and cls.forward is known[0]
        and getattr(cls, "_conv_forward", None) is known[1]
    )


# Code the mode cannot see, made visible for the pass. TorchScript code runs in its own
# interpreter, which no torch-function mode sees: a scripted function reading a value would
# go unrecorded (a tensor result would still show as unseen, a Python number would not).
# While any recording runs, calls of TorchScript functions and methods go through a wrapper
# that records them as one operation each, and ``torch._C.DisableTorchFunction`` (the
# switch that turns modes off) through one that notes its use, both on the recording
# thread and outside leaf layers. The wrappers are installed by the first recording to
# start and removed by the last to end, so recordings in several threads never undo each
# other's.
_HIDDEN_LOCK = threading.Lock()
_HIDDEN_ORIGINALS: list[tuple[Any, str, Any]] = []  # (owner, attribute, original)
_HIDDEN_USERS = 0
_RECORDING = threading.local()  # .recorder: the recorder running on this thread
_DISABLE_TORCH_FUNCTION = torch._C.DisableTorchFunction  # the recorder's own switch


def _active() -> _Recorder | None:
    """The recorder running on this thread, if it is inside the model and not a leaf."""
    recorder = getattr(_RECORDING, "recorder", None)
    if recorder is not None and recorder.watching and recorder.leaf is None:
        return recorder
    return None


def _script_call(original: Any) -> Callable[..., Any]:
    def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        recorder = _active()
        if recorder is not None and torch._C._is_torch_function_mode_enabled():
            return recorder.__torch_function__(_Scripted(original, fn), (), args, kwargs)
        return original(fn, *args, **kwargs)

    return call


def _disabling(*args: Any, **kwargs: Any) -> Any:
    recorder = _active()
    if recorder is not None:
        where = recorder.owner()
        place = f"{where[1]}.forward" if where[0] else "forward"
        recorder.unseen.append(
            f"{place} turns torch functions off (torch._C.DisableTorchFunction), so what it "
            "computes there, which may read any value or weight, is not recorded"
        )
    return _DISABLE_TORCH_FUNCTION(*args, **kwargs)


@contextlib.contextmanager
def _hidden_code_recorded(recorder: _Recorder) -> Iterator[None]:
    """TorchScript calls and ``DisableTorchFunction`` on this thread seen by ``recorder``."""
    global _HIDDEN_USERS
    with _HIDDEN_LOCK:
        if _HIDDEN_USERS == 0:
            for cls in (torch._C.ScriptFunction, torch._C.ScriptMethod):
                original = cls.__dict__.get("__call__")
                if original is not None:
                    _HIDDEN_ORIGINALS.append((cls, "__call__", original))
                    cls.__call__ = _script_call(original)
            _HIDDEN_ORIGINALS.append((torch._C, "DisableTorchFunction", _DISABLE_TORCH_FUNCTION))
            torch._C.DisableTorchFunction = _disabling
        _HIDDEN_USERS += 1
    previous = getattr(_RECORDING, "recorder", None)
    _RECORDING.recorder = recorder
    try:
        yield
    finally:
        _RECORDING.recorder = previous
        with _HIDDEN_LOCK:
            _HIDDEN_USERS -= 1
            if _HIDDEN_USERS == 0:
                for owner, attr, original in _HIDDEN_ORIGINALS:
                    setattr(owner, attr, original)
                _HIDDEN_ORIGINALS.clear()


@dataclass(frozen=True)
class _Scripted:
    """A TorchScript function or method as a recorded function (one per function, so
    that name caches stay small)."""

    call: Any
    fn: Any

    @property
    def __name__(self) -> str:  # type: ignore[override]
        name = getattr(self.fn, "name", None) or type(self.fn).__name__
        return f"TorchScript function {name}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(self.fn, *args, **kwargs)


def _storage_ptr(tensor: Tensor) -> int:
    """Where ``tensor``'s storage starts (0 for tensors without one)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return 0


#: Classes of PyTorch's own re-parametrisations that live in forward pre-hooks.
def _known_reparam_hooks() -> tuple[type, ...]:
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return (BasePruningMethod, WeightNorm, SpectralNorm)


def materialise_reparametrisations(
    model: nn.Module, modules: dict[str, nn.Module] | None = None
) -> list[str]:
    """Replace PyTorch re-parametrisations of leaf layers by their current plain weights.

    ``torch.nn.utils.parametrize`` parametrisations (``parametrizations.weight_norm``,
    ``spectral_norm``, ``orthogonal``, ...) and the legacy hook-based ones
    (``torch.nn.utils.prune`` masks, ``weight_norm``, ``spectral_norm``) compute the
    weight from other tensors on every call; compressing them means compressing the
    weight they compute now. Runs on the caller's private copy (``modules`` is
    ``dict(model.named_modules())`` if the caller has it); returns one line per
    layer changed, for the report.
    """
    known = _known_reparam_hooks()
    notes: list[str] = []
    for name, module in (modules if modules is not None else dict(model.named_modules())).items():
        if not _reparametrised(module, known):
            continue
        if _parametrized(module):
            # parametrize swaps the class for a generated subclass of the original one;
            # that class is shared with the caller's model, so it is left as it is.
            lists = module.parametrizations
            with torch.no_grad(), evaluating(lists):  # the weight as the model runs in eval
                values = {attr: getattr(module, attr).detach().clone() for attr in lists}
            grads = {  # a frozen layer stays frozen
                attr: all(p.requires_grad for p in lists[attr].parameters(recurse=False))
                for attr in lists
            }
            kinds = {attr: ", ".join(type(p).__name__ for p in lists[attr]) for attr in lists}
            module.__class__ = type(module).__bases__[0]
            del module._modules["parametrizations"]
            for attr, value in values.items():
                module._parameters[attr] = nn.Parameter(value, requires_grad=grads[attr])
                notes.append(f"{name}: {attr} parametrization ({kinds[attr]}) materialised")
        for key, hook in list(module._forward_pre_hooks.items()):
            if not isinstance(hook, known):
                continue
            attr = getattr(hook, "name", "weight")
            with torch.no_grad():  # the weight the hook would compute for the next call
                if hasattr(hook, "apply_mask"):
                    value = hook.apply_mask(module)
                elif type(hook).__name__ == "SpectralNorm":
                    value = hook.compute_weight(module, do_power_iteration=False)
                else:
                    value = hook.compute_weight(module)
                value = value.detach().clone()
            module._forward_pre_hooks.pop(key, None)
            for hooks in (module._state_dict_hooks, module._load_state_dict_pre_hooks):
                for hook_key, other in list(hooks.items()):
                    target = getattr(other, "hook", other)
                    if "SpectralNorm" in type(target).__name__:
                        hooks.pop(hook_key)
            for extra in (f"{attr}_orig", f"{attr}_mask", f"{attr}_g", f"{attr}_v", f"{attr}_u"):
                module._parameters.pop(extra, None)
                module._buffers.pop(extra, None)
            if attr in module.__dict__:
                del module.__dict__[attr]
            module._parameters.pop(attr, None)
            module.register_parameter(attr, nn.Parameter(value))
            notes.append(f"{name}: {attr} {type(hook).__name__} hook materialised")
    return notes


def _parametrized(module: nn.Module) -> bool:
    """``parametrize.is_parametrized``, without a failing attribute lookup per module."""
    found = module._modules.get("parametrizations")
    return isinstance(found, nn.ModuleDict) and len(found) > 0


def _reparametrised(module: nn.Module, known: tuple[type, ...]) -> bool:
    return (
        bool(module._modules or module._forward_pre_hooks)
        and (isinstance(module, LEAF_TYPES) or is_conv1d_transposed(module))
        and (
            _parametrized(module)
            or any(isinstance(h, known) for h in module._forward_pre_hooks.values())
        )
    )


def has_reparametrisations(modules: dict[str, nn.Module]) -> bool:
    """Whether any leaf layer is re-parametrised (see :func:`materialise_reparametrisations`)."""
    known = _known_reparam_hooks()
    return any(_reparametrised(m, known) for m in modules.values())


def _hook_description(name: str, module: nn.Module) -> str:
    kinds = []
    if module._forward_pre_hooks:
        kinds.append("forward pre-hook")
    if module._forward_hooks:
        kinds.append("forward hook")
    return f"a {' and a '.join(kinds)} on {name or 'the model'}"


_SEQUENCES = (tuple, list, torch.Size)


def _plain(value: Any) -> Any:
    kind = type(value)
    if kind is not DimSize and kind not in _SEQUENCES:
        return value
    if kind is DimSize:
        return int.__int__(value)
    if type(value) in (tuple, list) and any(isinstance(v, DimSize) for v in value):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, torch.Size) and any(isinstance(v, DimSize) for v in value):
        return torch.Size(int.__int__(v) for v in value)
    return value


def _scrub_sizes(modules: Iterable[nn.Module]) -> None:
    """Sizes a forward pass stored on the modules that read them (``self.n = x.shape[1]``),
    or on the model, become plain ints."""
    for module in modules:
        for key, value in list(vars(module).items()):
            plain = _plain(value)
            if plain is not value:
                module.__dict__[key] = plain


def check_recordable(model: nn.Module, modules: dict[str, nn.Module] | None = None) -> None:
    """Raise :class:`ModelError` for models the recorder cannot run soundly.

    ``modules`` is ``dict(model.named_modules())`` if the caller has it.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError(
            f"{type(model).__name__} is a TorchScript module; pass the original nn.Module"
        )
    lazy = (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)
    plain = (Tensor, nn.Parameter)  # neither lazy: no metaclass instance check needed
    for prefix, module in (modules if modules is not None else dict(model.named_modules())).items():
        if isinstance(module, torch.jit.ScriptModule):
            raise ModelError(
                f"submodule {prefix!r} is a TorchScript module, whose operations cannot be "
                "recorded; use its original nn.Module"
            )
        for kind, tensors in (("parameter", module._parameters), ("buffer", module._buffers)):
            if not tensors:
                continue
            for attr, tensor in tensors.items():
                if tensor is None or (type(tensor) in plain and not tensor.is_meta):
                    continue
                name = f"{prefix}.{attr}" if prefix else attr
                if isinstance(tensor, lazy):
                    raise ModelError(
                        f"{kind} {name!r} is an uninitialised lazy parameter; run the model "
                        "once on real inputs before compressing it"
                    )
                if tensor.is_meta:
                    raise ModelError(
                        f"{kind} {name!r} is on the meta device (it holds no data); "
                        "load real weights before compressing"
                    )
                if tensor.device.type == "cpu" and _computes_otherwise(type(tensor)):
                    # (tensors elsewhere get the device's own error, which says what to do)
                    raise ModelError(_subclass_message(f"{kind} {name!r}", tensor))


def _computes_otherwise(cls: type) -> bool:
    """Whether tensors of class ``cls`` run code of their own for torch calls
    (``__torch_function__`` or ``__torch_dispatch__``): code that runs inside the calls the
    recorder sees, and may compute anything (flip a weight's rows, reorder channels)."""
    function = getattr(cls, "__torch_function__", None)
    dispatch = getattr(cls, "__torch_dispatch__", None)
    return getattr(function, "__func__", function) not in _PLAIN_TORCH_FUNCTIONS or getattr(
        dispatch, "__func__", dispatch
    ) is not getattr(Tensor.__torch_dispatch__, "__func__", Tensor.__torch_dispatch__)


_PLAIN_TORCH_FUNCTIONS = (
    Tensor.__torch_function__.__func__,  # type: ignore[attr-defined]
    torch._C._disabled_torch_function_impl,
)


def _subclass_message(what: str, tensor: Tensor) -> str:
    return (
        f"{what} is a {type(tensor).__name__}, a tensor subclass that runs its own code "
        "for torch calls (__torch_function__ or __torch_dispatch__), which the recording "
        "cannot see; compress the model with plain tensors"
    )


def _check_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse example inputs of a tensor subclass that runs its own code for torch calls
    (see :func:`_computes_otherwise`): what it computes is hidden from the recording."""
    tensors = flatten_tensors(list(args), [])
    flatten_tensors(kwargs, tensors)
    for tensor in tensors:
        if type(tensor) is not Tensor and _computes_otherwise(type(tensor)):
            raise ModelError(_subclass_message("an example input", tensor))


def as_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` from a tensor, a sequence of them, or a mapping of keyword inputs."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs), {}
    raise ConfigError(
        "example_inputs must be a tensor, a tuple of tensors or a mapping of keyword inputs, "
        f"got {type(example_inputs).__name__}"
    )


@contextlib.contextmanager
def evaluating(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> Iterator[None]:
    """``model`` in eval mode inside (``model.eval()``, so that modules overriding
    ``train`` see it), each module's own mode restored at the end.

    Passes over a caller's model run so, as compression runs every module: a batch norm in
    training mode would update its running statistics and normalise with batch ones.
    ``modules`` are ``model.modules()`` if the caller has them.
    """
    modes = [(m, m.training) for m in (model.modules() if modules is None else modules)]
    if any(training for _, training in modes):
        model.eval()
    try:
        yield
    finally:
        for m, training in modes:  # nn.Module.__setattr__ is slow: only where it changed
            if m.training is not training:
                m.training = training


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose Python ``forward`` runs for the recording.

    ``torch.compile`` wrappers are unwrapped (their compiled code would hide the
    operations), and so is ``nn.DataParallel``, which computes its module's forward:
    with several devices it would run copies of the modules in worker threads, which
    the recording must not miss or mix up.
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
            model = inner
        elif type(model) is nn.DataParallel:
            model = model.module
        else:
            return model


def _runs_unrecorded(
    model: nn.Module,
    runner: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    modules: dict[str, nn.Module],
) -> bool:
    """Whether the model runs on the inputs without the recorder (asked once recording
    failed, so that the error says which of the two is at fault)."""
    try:
        with torch.no_grad(), evaluating(model, modules.values()):
            runner(*args, **kwargs)
    except Exception:  # the user's forward may raise anything
        return False
    return True


def record(
    model: nn.Module,
    example_inputs: Any,
    modules: dict[str, nn.Module] | None = None,
    checked: bool = False,
) -> Recording:
    """Run ``model`` once on ``example_inputs`` (under ``no_grad``) and record its dataflow.

    Every module runs in eval mode for the pass; each one's mode is restored after it.
    ``modules`` is ``dict(model.named_modules())`` if the caller has it; ``checked`` says the caller has already run
    :func:`check_recordable` on it, or on the model it is a copy of. Errors raised by
    the model become :class:`ModelError`.
    """
    modules = modules if modules is not None else dict(model.named_modules())
    if not checked:
        check_recordable(model, modules)
    args, kwargs = as_inputs(example_inputs)
    _check_inputs(args, kwargs)
    from torch.nn.modules import module as module_impl

    recorder = _Recorder(modules)
    hooked = recorder.hooked
    if getattr(module_impl, "_global_forward_hooks", None) or getattr(
        module_impl, "_global_forward_pre_hooks", None
    ):
        hooked.setdefault("*", "a global forward hook")
    runner = unwrap(model)
    try:
        with (
            collection_paused(),
            torch.no_grad(),
            evaluating(model, modules.values()),
            recorder.installed(),
            _hidden_code_recorded(recorder),
        ):
            inputs = [recorder.value(t) for t in flatten_tensors([args, kwargs], [])]
            for value in inputs:
                value.is_input = True
            recorder.watching = True
            with recorder:
                output = runner(*args, **kwargs)
    except Exception as exc:  # the user's forward may raise anything
        what = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        if _runs_unrecorded(model, runner, args, kwargs, modules):
            raise ModelError(
                f"{type(model).__name__} runs on the example inputs but not while it is "
                f"recorded ({what}); code that needs to own the whole call, such as "
                "torch.cond outside torch.compile, cannot be recorded, nor code that "
                "requires type(size) is int (sizes and layer widths are int subclasses "
                "while recording)"
            ) from exc
        raise ModelError(
            f"running {type(model).__name__} on the example inputs failed ({what}); "
            "check their shapes and dtypes"
        ) from exc
    opaque: list[str] = []
    sizes: list[DimSize] = []
    outputs = [recorder.value(t) for t in flatten_tensors(output, [], 0, opaque, sizes=sizes)]
    for size in sizes:  # a channel count returned as a number changes when pruned
        size._used("returned in the model's output")
    if opaque:
        recorder.unseen.append(
            f"the model's output holds a {opaque[0]}, which may return any value when "
            "called or iterated: return tensors in tuples, lists, dicts or dataclasses"
        )
    recorder.watching = False
    recorder.alive.clear()  # no callbacks once the recording is done
    recorder.check_owned()
    if recorder.sized:
        _scrub_sizes({id(m): m for m in (model, *recorder.sized_in)}.values())
    return Recording(
        recorder.ops,
        inputs,
        outputs,
        recorder.calls,
        recorder.taints,
        modules,
        hooked,
        recorder.size_uses,
        recorder.clobbered,
        recorder.unseen,
        recorder.batch_statistics,
        recorder.zero_from_size,
    )


__all__ = [
    "BATCHNORMS",
    "CHANNEL_NORMS",
    "CONVS",
    "LEAF_TYPES",
    "DimSize",
    "Op",
    "Recording",
    "Value",
    "as_inputs",
    "check_recordable",
    "collection_paused",
    "evaluating",
    "flatten_tensors",
    "func_name",
    "has_reparametrisations",
    "is_conv1d_transposed",
    "is_leaf",
    "materialise_reparametrisations",
    "record",
    "recorded",
    "unwrap",
]
