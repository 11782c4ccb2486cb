"""Channel groups: the sets of channels that must be removed together.

A *channel group* is made of one or more **producers** (``nn.Linear``,
``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, GPT-2's ``Conv1D``), each optionally followed by batch norm, then only
channel-wise operations (each output channel depends on the same input channel
only), then one or more **consumers** whose input channels are those channels. It is
found in the dataflow of one real forward pass (:mod:`.record`) by propagating, for
every value, which group each of its channels belongs to:

* a producer starts a group of its output channels;
* element-wise activations, per-channel batch norm, depthwise convolution, instance
  norms and a PReLU with a slope per channel (their weights are sliced too), pooling,
  dropout, reshapes that keep channels contiguous, permutations, and maps, reductions,
  scans, splits and repeats of other dimensions carry channels through;
* a residual add, a stack (or an element-wise product, as in gated units) joins the
  groups of its operands into one, and a concat lays its inputs' groups side by side, so that
  consumers of the result absorb each group at its own offset;
* anything else — an operation not on the allow-list, the model output, hook code,
  a parameter read outside its layer, a layer called twice — ends the group, with a
  reason that names the operation.

**Pruning** a group needs only channel-wise operations. **Merging** (the paper's
compensation) also needs every operation after the producers' batch norms to be
positively homogeneous and the same on every channel, ``f(s·z) = s·f(z)`` for
``s > 0``: ReLU, LeakyReLU, a PReLU with one slope, max/avg pooling, dropout in eval mode, identity, flatten,
residual adds, concats and scalar multiples. Groups through GELU, SiLU, ReLU6,
sigmoid, depthwise convolutions, per-channel PReLU slopes, instance norms or a batch norm
that does not directly follow a producer are pruned but not merged, and say why.

Groups that join a residual add, a concat, or feed several consumers are *coupled*;
they are used only with ``coupled=True``. A group is named by its first producer in
execution order; ``keep=`` and ``exclude=`` use that name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ModelError
from .record import (
    BATCHNORMS,
    CHANNEL_NORMS,
    CONVS,
    DimSize,
    Op,
    Recording,
    Value,
    check_recordable,
    func_name,
    has_reparametrisations,
    is_conv1d_transposed,
    is_leaf,
    materialise_reparametrisations,
    recorded,
)


@dataclass(frozen=True)
class MergeGroup:
    """An explicitly named simple group: one producer → (batch norm) → one consumer.

    Attributes:
        producer: qualified name of the layer whose output neurons are pruned.
        consumer: qualified name of the layer whose input dimension absorbs them.
        bn: qualified name of the batch norm right after the producer, if any.
        features_per_channel: how many consecutive consumer input features each
            producer channel owns (``H·W`` after a flatten); ``None`` infers it.
    """

    producer: str
    consumer: str
    bn: str | None = None
    features_per_channel: int | None = None


class FirstOfEach:
    """``producer``, ``bn`` and ``consumer``: the first of ``producers``, ``bns`` and
    ``consumers`` (the only ones in a simple group), for groups and their reports."""

    producers: tuple[str, ...]
    bns: tuple[str | None, ...]
    consumers: tuple[str, ...]

    @property
    def producer(self) -> str:
        """The first producer (the group's name)."""
        return self.producers[0]

    @property
    def bn(self) -> str | None:
        """The first producer's batch norm."""
        return self.bns[0]

    @property
    def consumer(self) -> str:
        """The first consumer."""
        return self.consumers[0]


@dataclass(frozen=True)
class ChannelGroup(FirstOfEach):
    """One channel group, as found by :func:`find_groups`.

    Attributes:
        producers: qualified names of the layers writing these channels.
        bns: for each producer, the batch norm directly after it (or ``None``).
        consumers: qualified names of the layers reading these channels.
        channels: number of channels ``n``.
        mergeable: whether pruned channels can be merged (compensated) exactly
            when they are positive multiples of kept ones; else they are only pruned.
        reason: why the group is not mergeable (``None`` when it is).
        passthrough: layers in between whose per-channel weights are sliced too
            (depthwise convolutions, batch norms that do not follow a producer).
        coupled: whether the group joins a residual add, a concat or several consumers.
        consumer_offsets: for each consumer, the offset of these channels in its input.
        features: for each consumer, its input features per channel (``H·W`` after
            a flatten, else 1).
        passthrough_offsets: for each pass-through layer, the offset of these channels.
        checked: ``False`` for explicit groups accepted without example inputs.
        activation: for a group that is not mergeable only because of one activation
            directly on its producer (``"gelu"``, ``"silu"``, ``"relu6"``, ``"hardswish"``,
            or a gated unit ``"swiglu"``/``"geglu"``), its name: such a group can be
            merged approximately (``approximate=True``).
        gate: for a gated unit, the producer whose output goes through the activation.
        standard_layout: whether every producer and consumer runs on ``(batch,
            features)`` (``nn.Linear``) or on images (``nn.Conv2d`` on ``(batch, channels,
            height, width)``), the layouts that the options beyond the paper measure
            channels in; ``False`` for tokens, ``Conv1d`` and unbatched inputs.
    """

    producers: tuple[str, ...]
    bns: tuple[str | None, ...]
    consumers: tuple[str, ...]
    channels: int
    mergeable: bool = True
    reason: str | None = None
    passthrough: tuple[str, ...] = ()
    coupled: bool = False
    consumer_offsets: tuple[int, ...] = ()
    features: tuple[int, ...] = ()
    passthrough_offsets: tuple[int, ...] = ()
    checked: bool = True
    activation: str | None = None
    gate: str | None = None
    standard_layout: bool = True

    def __post_init__(self) -> None:
        if not self.consumer_offsets:
            object.__setattr__(self, "consumer_offsets", (0,) * len(self.consumers))
        if not self.features:
            object.__setattr__(self, "features", (1,) * len(self.consumers))
        if not self.passthrough_offsets:
            object.__setattr__(self, "passthrough_offsets", (0,) * len(self.passthrough))

    @property
    def name(self) -> str:
        """The group's name: its first producer."""
        return self.producers[0]

    @property
    def simple(self) -> bool:
        """One producer and one consumer at offset 0, nothing sliced in between."""
        return (
            len(self.producers) == 1
            and len(self.consumers) == 1
            and not self.passthrough
            and self.consumer_offsets == (0,)
        )


@dataclass(frozen=True)
class SkippedLayer:
    """A candidate producer that is left untouched, and why."""

    name: str
    reason: str


# ---------------------------------------------------------------- operation tables


def _random_in_forward(op: Op, key: str) -> bool:
    """Whether a recorded dropout or ``rrelu`` drew random masks or slopes (training mode).

    ``F.dropout(x, p, training)`` reaches the recorder with ``training`` as a keyword,
    ``torch.dropout(x, p, train)`` with ``train`` third, ``torch.rrelu`` with ``training``
    fourth. A dropout whose flag cannot be read counts as random.
    """
    rrelu = key.startswith("rrelu")
    position = 3 if rrelu else 2
    for name in ("training", "train"):
        if name in op.kwargs:
            return op.kwargs[name] is not False
    if len(op.args) > position:
        return op.args[position] is not False
    return not rrelu  # rrelu's default is training=False; a dropout recorded ran in training


#: Element-wise operations that commute with positive scaling and act alike on every channel.
_HOMOGENEOUS = frozenset(
    {
        "relu",
        "relu_",
        "leaky_relu",
        "leaky_relu_",
        "rrelu",
        "dropout",
        "dropout_",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "feature_dropout",
        "alpha_dropout",
        "contiguous",
        "clone",
        "detach",
        "neg",
        "negative",
        "__neg__",
        "positive",
        "__pos__",
        "to",
        "float",
        "double",
        "half",
        "bfloat16",
        "type_as",
        "abs",  # |s·z| = s·|z| for s > 0
        "abs_",
        "absolute",
    }
)

#: Casts among the operations above: homogeneous only to a floating-point type
#: (rounding aside); to an integer or ``bool`` they truncate (see :func:`_cast_target`).
_CASTS = frozenset({"to", "type_as"})


def _cast_target(op: Op, key: str) -> str | None:
    """The type a cast truncates to (``"torch.int64"``), or ``None`` for a floating-point
    type or no change of type. ``type_as`` and ``to(other)`` take another tensor's type,
    which the recording does not keep: they count as truncating."""
    if key == "type_as" or any(isinstance(a, Value) for a in op.args[1:]):
        return "another tensor's type"
    for arg in (*op.args[1:], op.kwargs.get("dtype")):
        if isinstance(arg, torch.dtype) and not arg.is_floating_point:
            return str(arg)
    return None


#: Random operations in training mode (see :func:`_random_in_forward`). In eval mode a
#: dropout returns its input, and ``rrelu`` is a leaky ReLU of fixed slope.
_RANDOM = frozenset(
    {n for n in _HOMOGENEOUS if "dropout" in n or n.startswith("rrelu")}
    | {"feature_dropout_", "alpha_dropout_", "feature_alpha_dropout", "feature_alpha_dropout_"}
    | {"rrelu_"}
)

#: Element-wise operations that act on each channel alone but do not commute with scaling.
_CHANNELWISE = {
    "gelu": "GELU",
    "silu": "SiLU",
    "silu_": "SiLU",
    "mish": "Mish",
    "sigmoid": "Sigmoid",
    "sigmoid_": "Sigmoid",
    "tanh": "Tanh",
    "tanh_": "Tanh",
    "hardtanh": "Hardtanh",
    "hardtanh_": "Hardtanh",
    "relu6": "ReLU6",
    "hardswish": "Hardswish",
    "hardswish_": "Hardswish",
    "hardsigmoid": "Hardsigmoid",
    "hardsigmoid_": "Hardsigmoid",
    "elu": "ELU",
    "elu_": "ELU",
    "selu": "SELU",
    "celu": "CELU",
    "softplus": "Softplus",
    "softsign": "Softsign",
    "logsigmoid": "LogSigmoid",
    "nan_to_num": "nan_to_num",
    "tanhshrink": "Tanhshrink",
    "softshrink": "Softshrink",
    "hardshrink": "Hardshrink",
    "threshold": "Threshold",
    "threshold_": "Threshold",
    "_threshold": "Threshold",
    "exp": "exp",
    "log": "log",
    "sqrt": "sqrt",
    "rsqrt": "rsqrt",
    "square": "square",
    "erf": "erf",
    "sin": "sin",
    "cos": "cos",
    "reciprocal": "reciprocal",
    "clamp": "clamp",
    "clamp_": "clamp",
    "clip": "clamp",
    "clip_": "clamp",
    "clamp_min": "clamp",
    "clamp_min_": "clamp",
    "clamp_max": "clamp",
    "clamp_max_": "clamp",
    "pow": "pow",
    "__pow__": "pow",
}
#: Clamps and thresholds, with the names and defaults of their bounds in argument order:
#: positively homogeneous when every bound is 0 or infinite (``clamp(min=0)`` is a ReLU,
#: ``threshold(x, 0, 0)`` too), since then ``f(s·z) = s·f(z)`` for s > 0.
_BOUNDED: dict[str, tuple[tuple[str, float | None], ...]] = {
    **dict.fromkeys(
        ("clamp", "clamp_", "clip", "clip_"), (("min", None), ("max", None))
    ),
    "clamp_min": (("min", None),),
    "clamp_min_": (("min", None),),
    "clamp_max": (("max", None),),
    "clamp_max_": (("max", None),),
    **dict.fromkeys(("hardtanh", "hardtanh_"), (("min_val", -1.0), ("max_val", 1.0))),
    **dict.fromkeys(("threshold", "threshold_", "_threshold"), (("threshold", None), ("value", None))),
}  # fmt: skip


def _homogeneous_bounds(op: Op, key: str, sized_zero: bool) -> bool:
    """Whether a clamp or threshold of :data:`_BOUNDED` has only zero or infinite bounds
    (given as plain numbers: a tensor or a size read from one may be anything; with
    ``sized_zero``, a size became a plain 0 in the pass, so a 0 may be one only there)."""
    names = _BOUNDED.get(key)
    if names is None:
        return False
    for position, (name, default) in enumerate(names, start=1):
        bound = op.args[position] if len(op.args) > position else op.kwargs.get(name, default)
        if bound is None and default is None and not key.endswith("threshold"):
            continue
        if type(bound) not in (int, float) or not (
            (bound == 0 and not sized_zero) or math.isinf(bound)
        ):
            return False
    return True


_ADD = frozenset(
    {
        "add",
        "__add__",
        "__radd__",
        "add_",
        "__iadd__",
        "sub",
        "__sub__",
        "sub_",
        "__isub__",
        "subtract",
    }
)
_MUL = frozenset({"mul", "__mul__", "__rmul__", "mul_", "__imul__", "multiply"})
_DIV = frozenset({"div", "__truediv__", "div_", "__itruediv__", "true_divide", "divide"})
_RDIV_RSUB = frozenset({"__rtruediv__", "__rsub__", "rsub", "__rdiv__"})
_POOLS = {
    "max_pool1d": 1,
    "max_pool2d": 2,
    "max_pool3d": 3,
    "max_pool1d_with_indices": 1,
    "max_pool2d_with_indices": 2,
    "avg_pool1d": 1,
    "avg_pool2d": 2,
    "avg_pool3d": 3,
    "adaptive_avg_pool1d": 1,
    "adaptive_avg_pool2d": 2,
    "adaptive_avg_pool3d": 3,
    "adaptive_max_pool1d": 1,
    "adaptive_max_pool2d": 2,
    "adaptive_max_pool3d": 3,
    "adaptive_max_pool1d_with_indices": 1,
    "adaptive_max_pool2d_with_indices": 2,
    "lp_pool1d": 1,
    "lp_pool2d": 2,
    "lp_pool3d": 3,
}
#: Linear maps that act on each channel alone, over the dimensions they name (moving,
#: mirroring or resampling positions): channel-wise and positively homogeneous, so long as
#: those dimensions do not include the channels. ``interpolate`` resamples every
#: dimension after the first two (``nn.Upsample`` runs it); the others take ``dims``.
_SPATIAL = frozenset({"interpolate", "flip", "fliplr", "flipud", "roll", "rot90"})
#: Reductions, with the names of their arguments after the input, in order. Over
#: dimensions other than the channels each output channel is its input channel's
#: reduction: channel-wise; all but :data:`_NONHOMOGENEOUS_REDUCTIONS` are positively
#: homogeneous too (a p-norm only for p ≠ 0).
_REDUCTIONS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("mean", "sum", "nanmean", "nansum", "prod"), ("dim", "keepdim", "dtype")),
    **dict.fromkeys(("amax", "amin", "max", "min", "median", "nanmedian"), ("dim", "keepdim")),
    **dict.fromkeys(("std", "var", "std_mean", "var_mean"), ("dim", "unbiased", "keepdim")),
    "aminmax": (),
    **dict.fromkeys(("quantile", "nanquantile"), ("q", "dim", "keepdim")),
    "logsumexp": ("dim", "keepdim"),
    "norm": ("p", "dim", "keepdim", "out", "dtype"),
    **dict.fromkeys(("linalg_vector_norm", "linalg_norm", "linalg_matrix_norm"),
                    ("ord", "dim", "keepdim")),
}  # fmt: skip
_NONHOMOGENEOUS_REDUCTIONS = frozenset({"var", "var_mean", "prod", "logsumexp"})
#: Reductions that return two reduced values (both follow the channels).
_PAIRED_REDUCTIONS = frozenset({"std_mean", "var_mean", "aminmax"})
#: Scans and sorts along one dimension: ``name → (argument names after the input, the
#: default dimension)``. Along a dimension other than the channels each output channel
#: is a function of its input channel alone; sorting, top-k and running maxima commute
#: with a positive scale, a running sum is linear; a running product or log-sum-exp, a
#: softmax and a normalisation (``F.normalize``) are not (:data:`_NONHOMOGENEOUS_SCANS`).
_SCANS: dict[str, tuple[tuple[str, ...], int | None]] = {
    "cumsum": (("dim", "dtype"), None),
    "cumprod": (("dim", "dtype"), None),
    "logcumsumexp": (("dim",), None),
    "cummax": (("dim",), None),
    "cummin": (("dim",), None),
    "sort": (("dim", "descending"), -1),
    "msort": ((), 0),
    "topk": (("k", "dim", "largest", "sorted"), -1),
    "kthvalue": (("k", "dim", "keepdim"), -1),
    "softmax": (("dim",), None),
    "log_softmax": (("dim",), None),
    "normalize": (("p", "dim"), 1),
}
_NONHOMOGENEOUS_SCANS = frozenset(
    {"cumprod", "logcumsumexp", "softmax", "log_softmax", "normalize"}
)
_RESHAPES = frozenset(
    {
        "view",
        "reshape",
        "flatten",
        "squeeze",
        "unsqueeze",
        "unflatten",
        "view_as",
        "reshape_as",
        "squeeze_",
        "unsqueeze_",
    }
)
_PERMUTES = frozenset(
    {
        "permute",
        "transpose",
        "swapaxes",
        "swapdims",
        "t",
        ".T",
        ".mT",
        "transpose_",
        "t_",
        "movedim",
        "moveaxis",
    }
)
_EXPANDS = frozenset({"expand", "expand_as"})
_REPEATS = frozenset({"repeat", "tile", "repeat_interleave"})
#: Selections and differences along one dimension, with the names of their arguments
#: after the input: along a dimension other than the channels, the same positions of
#: every channel, or a linear map of each channel alone (``diff``, ``Tensor.unfold``).
_SELECTIONS: dict[str, tuple[str, ...]] = {
    "narrow": ("dim", "start", "length"),
    "index_select": ("dim", "index"),
    "diff": ("n", "dim", "prepend", "append"),
    "unfold": ("dimension", "size", "step"),
}
#: Splits, with the names of their arguments after the input.
_SPLITS: dict[str, tuple[str, ...]] = {
    "chunk": ("chunks", "dim"),
    "split": ("split_size", "dim"),
    "split_with_sizes": ("split_sizes", "dim"),
    "tensor_split": ("indices_or_sections", "dim"),
    "unbind": ("dim",),
}


_POSITIONAL_DIMS = frozenset(
    {*_PERMUTES, "squeeze", "unsqueeze", "squeeze_", "unsqueeze_", "flatten", "flip"}
)
_FIRST_DIM = frozenset({"unflatten", "stack", "cat", "concat", "concatenate"})
#: Operations that take dimension indices (beside sizes and counts, which may vary).
_DIM_TAKING = frozenset(
    {
        *_POSITIONAL_DIMS,
        *_FIRST_DIM,
        "roll",
        "rot90",
        "repeat_interleave",
        *_SCANS,
        *_REDUCTIONS,
        *_SPLITS,
        *_SELECTIONS,
    }
)


def _holds_size(value: Any) -> bool:
    if isinstance(value, DimSize):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, DimSize) for v in value)


def _dims_from_sizes(op: Op, key: str) -> bool:
    """Whether ``op`` takes a dimension index computed from a size read from a tensor
    (``h.cumsum(x.size(0))``): it names one dimension at the example's batch size and
    another at other batch sizes, so what the analysis saw does not hold."""
    args, kwargs = op.args, op.kwargs
    if key in _POSITIONAL_DIMS:
        dims: list[Any] = [*args[1:], *kwargs.values()]
    elif key in _FIRST_DIM:
        dims = [*args[1:2], kwargs.get("dim"), kwargs.get("axis")]
    elif key in ("roll", "rot90"):
        dims = [*args[2:3], kwargs.get("dims")]
    else:
        names: tuple[str, ...] = (
            _SCANS[key][0]
            if key in _SCANS
            else _REDUCTIONS.get(key)
            or _SPLITS.get(key)
            or _SELECTIONS.get(key)
            or ("repeats", "dim")
        )
        given = dict(zip(names, args[1:], strict=False)) | kwargs
        dims = [given.get(name) for name in ("dim", "dimension", "axis", "dims")]
    return any(_holds_size(d) for d in dims)


def _display(op: Op, fallback: str) -> str:
    """The operation's type as a user knows it: its activation module's class, else ``fallback``.

    An operation run directly by a module without submodules (``nn.ReLU6``,
    ``GELUActivation``) is named by that module's class.
    """
    return op.owner_type if getattr(op, "small_owner", False) else fallback


# ---------------------------------------------------------------- channel spaces


class _Space:
    """Union-find node: a set of ``n`` channels that are pruned together.

    A plain slotted class: one is made per producer call, and literal empty lists are
    cheaper than a dataclass's default factories.
    """

    __slots__ = (
        "activations",
        "bns",
        "broken",
        "consumers",
        "coupled",
        "gated",
        "layout",
        "modules_seen",
        "n",
        "nonhomogeneous",
        "order",
        "parent",
        "passthrough",
        "producers",
        "reasons",
    )  # fmt: skip

    def __init__(self, n: int, order: int, producers: list[str] | None = None) -> None:
        self.n = n
        self.order = order
        self.parent: _Space | None = None
        self.producers: list[str] = producers if producers is not None else []
        self.bns: dict[str, str] = {}
        self.consumers: list[tuple[str, int, int]] = []  # name, offset, features
        self.passthrough: list[tuple[str, int]] = []
        self.broken: str | None = None
        self.nonhomogeneous: str | None = None
        self.layout = True  # every layer reads and writes (batch, features) or images
        self.coupled: list[str] = []
        self.modules_seen: set[str] = set()
        self.reasons: list[str] = []  # every non-homogeneous operation
        self.activations: list[tuple[str, str]] = []  # (activation, producer)
        self.gated: list[tuple[str, str, str]] = []  # (activation, gate, up)

    def root(self) -> _Space:
        node = self
        while node.parent is not None:
            node = node.parent
        if node is not self:
            self.parent = node
        return node


def _union(a: _Space, b: _Space, why: str | None) -> _Space:
    ra, rb = a.root(), b.root()
    if ra is rb:
        return ra
    if rb.order < ra.order:
        ra, rb = rb, ra
    rb.parent = ra
    ra.producers += rb.producers
    ra.bns.update(rb.bns)
    ra.consumers += rb.consumers
    ra.passthrough += rb.passthrough
    ra.broken = ra.broken or rb.broken
    ra.nonhomogeneous = ra.nonhomogeneous or rb.nonhomogeneous
    ra.layout = ra.layout and rb.layout
    ra.coupled += rb.coupled
    ra.modules_seen |= rb.modules_seen
    ra.reasons += rb.reasons
    ra.activations += rb.activations
    ra.gated += rb.gated
    if why and why not in ra.coupled:
        ra.coupled.append(why)
    return ra


class _Info:
    """Which groups a value's channels belong to.

    ``segments`` lay the channel axis out as consecutive blocks, each a whole group
    (``_Space``) or ``None`` for channels that cannot be pruned; ``axis`` is the
    channel dimension and ``block`` how many consecutive elements of it each channel
    owns (``H·W`` after a channel-major flatten). Never changed once made.
    """

    __slots__ = ("axis", "block", "segments", "width")

    def __init__(
        self, segments: tuple[tuple[_Space | None, int], ...], axis: int, block: int = 1
    ) -> None:
        self.segments = segments
        self.axis = axis
        self.block = block
        self.width = segments[0][1] if len(segments) == 1 else sum(n for _, n in segments)

    def spaces(self) -> list[_Space]:
        return [s.root() for s, _ in self.segments if s is not None]

    def single(self) -> bool:
        return len(self.segments) == 1


class _Analysis:
    """Propagates channel groups through a :class:`Recording`."""

    def __init__(self, rec: Recording) -> None:
        self.rec = rec
        self.info: dict[int, _Info] = {}  # id(Value) -> info
        self.spaces: list[_Space] = []
        self.space_of_output: dict[int, _Space] = {}  # id(Value) of a producer output
        self.producer_of_value: dict[int, str] = {}
        self.normalised: dict[int, str] = {}  # batch-norm output -> its producer
        self.activated: dict[int, tuple[str, str]] = {}  # act(producer output) -> (act, producer)
        # (op, a, b, reason): a size or shape taken from group a for group b's channels,
        # sound once a and b are one coupled group, which a later op may make them
        self.same_later: list[tuple[Op, _Info, _Info, str]] = []

    # -- helpers
    def zero(self, constant: Any) -> bool:
        """Whether a plain number is 0 wherever the model runs: a size that became a plain
        number 0 in the pass (``float(x.shape[0] - 1)`` at batch 1) may make any 0 suspect."""
        kind = type(constant)
        return (
            kind in (int, float, bool)
            and constant == 0
            and (kind is bool or not self.rec.zero_from_size)
        )

    def get(self, value: Any) -> _Info | None:
        return self.info.get(id(value)) if isinstance(value, Value) else None

    def set(self, value: Value, info: _Info | None) -> None:
        if info is not None:
            self.info[id(value)] = info

    def break_info(self, info: _Info | None, reason: str) -> None:
        if info is None:
            return
        for space in info.spaces():
            if space.broken is None:
                space.broken = reason

    def break_all(self, op: Op, reason: str) -> None:
        for value in op.inputs():
            self.break_info(self.get(value), reason)

    def break_spaces(self, reason: str) -> None:
        """Every group is left intact, with ``reason``."""
        for space in self.spaces:
            root = space.root()
            if root.broken is None:
                root.broken = reason

    def nonhomogeneous(self, info: _Info, reason: str) -> None:
        for space in info.spaces():
            if space.nonhomogeneous is None:
                space.nonhomogeneous = reason
            space.reasons.append(reason)

    def touch(self, info: _Info | None, module: str) -> None:
        if info is not None and module:
            for space in info.spaces():
                space.modules_seen.add(module)

    # -- the walk
    def run(self) -> None:
        modules = self.rec.modules
        hooked = self.rec.hooked
        small: dict[str, bool] = {}  # owner -> whether it has no submodules
        get = self.info.get
        module_op, function_op = self.module_op, self.function_op
        for op in self.rec.ops:
            inputs = op._inputs if op._inputs is not None else op.inputs()
            infos = [get(id(v)) for v in inputs]  # inputs are all Values
            live = infos.count(None) != len(infos)
            is_module = op.kind == "module"
            if not live and not is_module:
                key = func_name(op.target)
                if key in _RESHAPES or key == "expand":  # a table sized by a channel count
                    self.sizes_elsewhere(op, _target_sizes(op), None)
                continue
            owner_name = op.owner
            if owner_name and live:
                found = small.get(owner_name)
                if found is None:
                    owner = modules.get(owner_name)
                    found = small[owner_name] = owner is not None and not any(
                        m is not None for m in owner._modules.values()
                    )
                op.small_owner = found
                if owner_name in hooked:
                    for info in infos:
                        self.break_info(info, hooked[owner_name])
            if is_module:
                module_op(op, modules[op.target])
            else:
                function_op(op)
        for op, a, b, reason in self.same_later:
            if not self.same_channels(a, b):
                self.break_all(op, reason)
                self.break_info(a, reason)  # its channel count sizes another group
        if self.rec.unseen:  # unseen code may have read any value or weight
            self.break_spaces(self.rec.unseen[0])
        for value in self.rec.outputs:
            self.break_info(self.get(value), "its output reaches the model output")
        for value, dim, what in self.rec.size_uses:
            info = self.get(value)
            if info is not None and (dim is None or dim % max(len(value.shape), 1) == info.axis):
                self.break_info(
                    info, f"its channel count (.shape/.size()) is used as a number ({what})"
                )
        for value in self.rec.clobbered:  # values written in place through an alias
            self.break_info(
                self.get(value), "its output is written in place through a view or alias"
            )

    # -- leaf layers
    def module_op(self, op: Op, module: nn.Module) -> None:
        name = op.target
        data = op.args[0] if op.args else None
        info = self.get(data)
        inputs = op.inputs()
        if len(inputs) != 1 or inputs[0] is not data:
            for value in inputs:
                if value is not data:
                    self.break_info(
                        self.get(value),
                        f"it is passed to {type(module).__name__} {name!r} as a non-data argument",
                    )
        rec = self.rec
        calls = rec.calls.get(name, 1)
        taint = rec.taints.get(name) or rec.hooked.get(name) if rec.taints or rec.hooked else None
        if calls > 1:
            taint = (
                taint
                or f"{type(module).__name__} {name!r} is called {calls} times (shared weights)"
            )
        out = op.outputs[0] if op.outputs else None
        if isinstance(module, BATCHNORMS):
            self.batch_norm(op, module, info, out, taint)
            return
        if isinstance(module, nn.PReLU):
            self.prelu(op, module, info, out, taint)
            return
        if isinstance(module, CHANNEL_NORMS):
            self.channel_norm(op, module, info, out, taint)
            return
        is_conv = isinstance(module, CONVS)
        groups = module.groups if is_conv else 1
        if is_conv and groups > 1:
            if groups == module.in_channels == module.out_channels and info is not None:
                self.depthwise(op, module, info, out, taint)
                return
            why = f"{type(module).__name__} {name!r} is a grouped convolution (groups={groups})"
            self.break_info(info, why)
            if out is not None:
                space = self.new_space(out, module, name, is_conv)
                space.broken = why
            return
        if info is not None:
            self.consume(op, module, name, info, is_conv, taint)
        if out is not None:
            space = self.new_space(out, module, name, is_conv)
            if taint:
                space.broken = taint

    def new_space(self, out: Value, module: nn.Module, name: str, is_conv: bool) -> _Space:
        if isinstance(module, nn.Linear):
            n = module.out_features
        elif is_conv1d_transposed(module):
            n = module.weight.shape[1]
        else:
            n = module.out_channels
        space = _Space(n, len(self.spaces), producers=[name])
        space.modules_seen.add(name)
        self.spaces.append(space)
        axis = _conv_axis(module, len(out.shape)) if is_conv else len(out.shape) - 1
        if len(out.shape) <= axis or out.shape[axis] != n:
            space.broken = f"{name!r} has an output of unexpected shape {list(out.shape)}"
        space.layout = _standard_layout(module, len(out.shape))
        self.set(out, _Info(((space, n),), axis))
        self.space_of_output[id(out)] = space
        self.producer_of_value[id(out)] = name
        return space

    def consume(
        self, op: Op, module: nn.Module, name: str, info: _Info, is_conv: bool, taint: str | None
    ) -> None:
        ndim = len(op.args[0].shape)
        if is_conv:
            fits = (
                info.axis == _conv_axis(module, ndim)
                and info.block == 1
                and info.width == module.in_channels
            )
        else:
            inputs = module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]
            fits = info.axis == ndim - 1 and info.width * info.block == inputs
        if not fits:
            self.break_info(
                info, f"{type(module).__name__} {name!r} reads a dimension other than its channels"
            )
            return
        if taint:
            self.break_info(info, taint)
        standard = _standard_layout(module, ndim)
        offset = 0
        for space, length in info.segments:
            if space is not None:
                root = space.root()
                root.consumers.append((name, offset, info.block))
                root.modules_seen.add(name)
                root.layout = root.layout and standard
            offset += length

    def batch_norm(
        self, op: Op, module: nn.Module, info: _Info | None, out: Value | None, taint: str | None
    ) -> None:
        if info is None or out is None:
            return
        name = op.target
        if info.axis != 1 or info.block != 1 or info.width != module.num_features:
            self.break_info(
                info, f"batch norm {name!r} normalises a dimension other than the channels"
            )
            return
        if taint:
            self.break_info(info, taint)
        data = op.args[0]
        producer = self.producer_of_value.get(id(data))
        space = self.space_of_output.get(id(data))
        buffers = module._buffers
        training = name in self.rec.batch_statistics
        stats = (
            buffers.get("running_mean") is not None
            and buffers.get("running_var") is not None
            and not training
        )
        if (
            producer is not None
            and space is not None
            and len(data.users) == 1
            and producer not in space.root().bns
            and stats
        ):
            root = space.root()
            root.bns[producer] = name
            root.modules_seen.add(name)
            self.set(out, info)
            self.normalised[id(out)] = producer
            return
        self.slice_through(info, name)
        why = (
            f"batch norm {name!r} runs in training mode in forward, with batch statistics"
            if training
            else f"batch norm {name!r} uses batch statistics"
            if not stats
            else f"batch norm {name!r} does not directly follow a producer (per-channel affine)"
        )
        self.nonhomogeneous(info, why)
        self.set(out, info)

    def channel_norm(
        self, op: Op, module: nn.Module, info: _Info | None, out: Value | None, taint: str | None
    ) -> None:
        """An instance norm, or a group norm with one channel per group: each channel is
        normalised over its own positions, and its affine weights (and running statistics)
        are sliced with it. Normalising undoes any scale, so the group is pruned only. A
        group norm with several channels per group mixes them."""
        if info is None or out is None:
            return
        name, kind = op.target, type(module).__name__
        if isinstance(module, nn.GroupNorm):
            channels, axis = module.num_channels, 1
            if module.num_groups != channels:
                per = channels // max(module.num_groups, 1)
                self.break_info(info, f"{kind} {name!r} normalises {per} channels together")
                return
        else:
            channels = module.num_features
            axis = _conv_axis(module, len(op.args[0].shape))
        if info.axis != axis or info.block != 1 or info.width != channels:
            self.break_info(info, f"{kind} {name!r} normalises a dimension other than the channels")
            return
        why = f"{kind} {name!r} normalises each channel, which is not positively homogeneous"
        self.sliced(info, name, taint, why, out)

    def depthwise(
        self, op: Op, module: nn.Module, info: _Info, out: Value | None, taint: str | None
    ) -> None:
        name = op.target
        if info.axis != _conv_axis(module, len(op.args[0].shape)) or info.block != 1:
            self.break_info(
                info, f"depthwise convolution {name!r} reads a dimension other than its channels"
            )
            return
        why = f"depthwise convolution {name!r} has per-channel filters"
        self.sliced(info, name, taint, why, out)

    def sliced(
        self, info: _Info, name: str, taint: str | None, why: str, out: Value | None
    ) -> None:
        """Layer ``name`` has a weight per channel: sliced with them, pruned only."""
        if taint:
            self.break_info(info, taint)
        self.slice_through(info, name)
        self.nonhomogeneous(info, why)
        if out is not None:
            self.set(out, info)

    def prelu(
        self, op: Op, module: nn.Module, info: _Info | None, out: Value | None, taint: str | None
    ) -> None:
        """``nn.PReLU``: one slope for every channel of the group is positively homogeneous
        (``prelu_a(s·z) = s·prelu_a(z)``, the same ``a`` for a channel and its partner);
        a slope per channel is sliced with them, and a merged channel would take its
        partner's slope, so that group is pruned only."""
        if info is None or out is None:
            return
        name = op.target
        if module.weight.numel() == 1 or info.axis != 1:  # the slopes do not follow channels
            own = self.rec.taints.get(name) or self.rec.hooked.get(name)  # calls do not matter
            if own:
                self.break_info(info, own)
            self.set(out, info)
            return
        if info.block != 1:
            self.break_info(
                info, f"PReLU {name!r} has a slope per element of channel-major flattened features"
            )
            return
        self.sliced(info, name, taint, f"PReLU {name!r} has a slope per channel", out)

    def slice_through(self, info: _Info, name: str) -> None:
        offset = 0
        for space, length in info.segments:
            if space is not None:
                root = space.root()
                root.passthrough.append((name, offset))
                root.modules_seen.add(name)
            offset += length

    # -- torch functions
    def function_op(self, op: Op) -> None:
        key = func_name(op.target)
        out = op.outputs[0] if op.outputs else None
        data = op.args[0] if op.args else None
        info = self.get(data)
        others = [v for v in op.inputs() if v is not data]
        if info is not None and key not in _CASTS:
            for arg in (*op.args[1:], *op.kwargs.values()):
                if isinstance(arg, torch.dtype) and not arg.is_floating_point:
                    self.nonhomogeneous(
                        info, f"{key} computes in {arg}, which is not positively homogeneous"
                    )
        try:
            if key in _DIM_TAKING and _dims_from_sizes(op, key):
                raise _Break(
                    f"{key} takes its dimension from a size read from a tensor "
                    "(x.size(0) is 1 in the example), which names another dimension at "
                    "another batch size"
                )
            if key in _HOMOGENEOUS or key in _CHANNELWISE:
                self.elementwise(op, key, info, others, out)
            elif key in _ADD or key in _MUL or key in _DIV or key in _RDIV_RSUB:
                self.binary(op, key)
            elif key in _POOLS:
                self.pool(op, _POOLS[key], info, others)
            elif key in _SPATIAL:
                self.spatial(op, key, info, others, out)
            elif key in _REDUCTIONS:
                self.reduction(op, key, info, others, out)
            elif key in _SCANS:
                self.scan(op, key, info, others, out)
            elif key in _RESHAPES:
                self.reshape(op, info, others, out)
            elif key in _PERMUTES:
                self.permute(op, key, info, others, out)
            elif key in _EXPANDS:
                self.expand(op, key, info, others, out)
            elif key in _REPEATS:
                self.repeat(op, key, info, others, out)
            elif key in _SPLITS:
                self.split(op, key, info, others)
            elif key in _SELECTIONS:
                self.select(op, key, info, others, out)
            elif key == "cat" or key == "concat" or key == "concatenate":
                self.cat(op, out)
            elif key == "stack":
                self.stack(op, out)
            elif key == "pad":
                self.pad(op, info, others, out)
            elif key in ("masked_fill", "masked_fill_"):
                self.masked_fill(op, info, out)
            elif key == "where":
                self.where(op, out)
            elif key == "__getitem__":
                self.getitem(op, info, out)
            else:
                self.break_all(op, self.not_channelwise(op))
        except _Break as exc:
            self.break_all(op, str(exc))
        except (TypeError, ValueError, IndexError, KeyError, AttributeError, StopIteration):
            self.break_all(op, self.not_channelwise(op))  # arguments of an unexpected form

    def not_channelwise(self, op: Op) -> str:
        raw = func_name(op.target)
        what = _display(op, raw)
        if raw == ".data":
            return "its output is read through .data (an untracked alias)"
        if raw == "item" or raw == "tolist":
            return f"its output is read by .{raw}()"
        if raw in ("linear", "conv1d", "conv2d", "matmul", "bmm", "mm", "einsum", "__matmul__"):
            return f"its output is read by {what} in forward, not by a layer"
        if raw == "layer_norm":
            return (
                f"its output reaches {_display(op, 'LayerNorm')}, which normalises across channels"
            )
        if raw in ("chunk", "split", "unbind", "tensor_split"):
            return f"its output is split ({raw}), so only part of the channels reach each use"
        return f"its output passes through {what}, which is not a channel-wise operation"

    def elementwise(
        self, op: Op, key: str, info: _Info | None, others: list[Value], out: Value | None
    ) -> None:
        if info is None:
            self.break_all(op, self.not_channelwise(op))
            return
        for value in others:  # e.g. pow(x, tensor), clamp(x, tensor)
            if self.get(value) is not None or math.prod(value.shape) != 1:
                raise _Break(
                    f"its output passes through {func_name(op.target)} with a tensor argument"
                )
        if key in _CASTS:
            target = _cast_target(op, key)
            if target is not None:
                self.nonhomogeneous(
                    info, f"{key} casts to {target}, which is not positively homogeneous"
                )
        if key in _RANDOM and _random_in_forward(op, key):
            self.nonhomogeneous(
                info,
                f"{key} runs in training mode in forward: each channel gets its own random "
                "mask or slope, and merged channels would share one",
            )
        if key in _CHANNELWISE and not _homogeneous_bounds(op, key, self.rec.zero_from_size):
            shown = _display(op, _CHANNELWISE[key])
            if key == "hardtanh" and shown == "Hardtanh":
                shown = "Hardtanh (ReLU6)"
            self.nonhomogeneous(info, f"{shown} is not positively homogeneous")
            activation = _approximable(op, key)
            producer = self.direct_producer(op.args[0])
            if activation is not None and producer is not None and out is not None:
                self.activated[id(out)] = (activation, producer)
                for space in info.spaces():
                    space.activations.append((activation, producer))
        if out is not None:
            self.set(out, info)

    def direct_producer(self, value: Any) -> str | None:
        """The producer whose output (or batch norm output) ``value`` is, read only once."""
        if not isinstance(value, Value) or len(value.users) != 1:
            return None
        return self.producer_of_value.get(id(value)) or self.normalised.get(id(value))

    def binary(self, op: Op, key: str) -> None:
        """``x ± y``, ``x · y``, ``x / y`` with tensors, scalars or broadcast constants."""
        out = op.outputs[0] if op.outputs else None
        if out is None:
            return
        operands = [op.kwargs["input"]] if "input" in op.kwargs else []
        operands += op.args[: 2 - len(operands)]
        if "other" in op.kwargs:  # torch.add(h, other=0.7)
            operands.append(op.kwargs["other"])
        tensors = [a for a in operands if isinstance(a, Value)]
        inputs = op.inputs()
        if len(inputs) != len(tensors) and [v for v in inputs if not any(v is t for t in tensors)]:
            raise _Break(
                f"its output passes through {func_name(op.target)} with extra tensor arguments"
            )
        out_ndim = len(out.shape)
        infos = [
            self.aligned(info, len(v.shape), out_ndim)
            for v in tensors
            if (info := self.get(v)) is not None
        ]
        constants = [v for v in tensors if self.get(v) is None]
        # Any operand that is not a tensor and not a plain zero shifts: True, a NumPy
        # scalar, a complex number, and any size, which may be zero only in the example
        # (``x.shape[0] - 1``; never compared, which would note a use).
        shifts = [a for a in operands if not isinstance(a, Value) and not self.zero(a)]
        is_add = key in _ADD
        result = infos[0]
        for other in infos[1:]:
            result = self.join(result, other, "a residual add" if is_add else None, op)
        sliced = None
        for value in constants:
            if sliced is None and self.per_channel_parameter(result, value, out_ndim):
                sliced = value.param
                continue
            self.against_constant(result, value, out_ndim, op)
        name = func_name(op.target)
        if key in _RDIV_RSUB:
            why = f"{name} is not positively homogeneous"
        elif is_add:
            shifted = constants or shifts
            why = "adding a constant is not positively homogeneous" if shifted else None
        elif len(infos) > 1:
            why = "an element-wise product of two layers' outputs is not positively homogeneous"
            if len(tensors) == 2 and key in _MUL:
                self.note_gate(tensors, result)
        elif key in _DIV and self.get(operands[0]) is None:
            why = "division by a layer's output is not positively homogeneous"
        elif key in _DIV and (
            op.kwargs.get("rounding_mode") is not None
            or (len(op.args) > 2 and op.args[2] is not None)
        ):
            mode = op.kwargs.get("rounding_mode", op.args[2] if len(op.args) > 2 else None)
            why = f"division with rounding_mode={mode!r} is not positively homogeneous"
        else:
            why = None  # scaling by a constant is linear
        if sliced is not None:  # checked last: it names the parameter
            why = f"parameter {sliced} holds a value per channel (sliced with them)"
        if why is not None:
            self.nonhomogeneous(result, why)
        self.set(out, result)

    def note_gate(self, tensors: list[Value], info: _Info) -> None:
        """``act(gate(x)) · up(x)``: remember the gated unit for approximate merging."""
        for a, b in ((tensors[0], tensors[1]), (tensors[1], tensors[0])):
            gate = self.activated.get(id(a)) if len(a.users) == 1 else None
            up = self.direct_producer(b)
            if gate is not None and up is not None and gate[0] in _GATED:
                for space in info.spaces():
                    space.gated.append((_GATED[gate[0]], gate[1], up))
                return

    def aligned(self, info: _Info, ndim: int, out_ndim: int) -> _Info:
        if ndim == out_ndim:
            return info
        return _Info(info.segments, info.axis + (out_ndim - ndim), info.block)

    def per_channel_parameter(self, info: _Info, value: Value, out_ndim: int) -> bool:
        """A parameter or buffer of a module other than a leaf layer, with one value per
        channel and size 1 elsewhere (``h * self.gamma``, ``h + self.bias`` of shape
        ``(C, 1, 1)``), read by this operation only and held under one name: it is sliced
        with the channels, like a depthwise filter (pruned only: each channel's own value
        would not follow it into its partner). Whether it is."""
        name, shape = value.param, value.shape
        dim = info.axis - (out_ndim - len(shape))
        if name is None or dim < 0 or info.block != 1 or len(value.users) != 1:
            return False
        if shape[dim] != info.width or any(n != 1 for i, n in enumerate(shape) if i != dim):
            return False
        owner_name, _, attr = name.rpartition(".")
        owner = self.rec.modules.get(owner_name)
        if (
            owner is None
            or is_leaf(owner)
            or owner_name in self.rec.hooked
            or name in self.rec.taints  # its sizes are read
            or attr in owner._non_persistent_buffers_set  # not saved, so never resized
        ):
            return False
        tensor = owner._parameters.get(attr)
        if tensor is None:
            tensor = owner._buffers.get(attr)
        if tensor is None or not _held_once(self.rec.modules, tensor):
            return False
        offset = 0
        for space, length in info.segments:
            if space is not None:
                root = space.root()
                root.passthrough.append((name, offset))
                root.modules_seen.add(owner_name)
            offset += length
        return True

    def against_constant(self, info: _Info, value: Value, out_ndim: int, op: Op) -> None:
        """A tensor not made of prunable channels, broadcast against ``info``'s channels."""
        shape = value.shape
        offset = out_ndim - len(shape)
        dim = info.axis - offset
        if dim < 0 or shape[dim] == 1:
            return  # the same value for every channel
        what = f"a tensor of shape {list(shape)}"
        if value.param:
            what = f"parameter {value.param}"
        raise _Break(
            f"its output is combined ({func_name(op.target)}) with {what}, channel by channel"
        )

    def join(self, a: _Info, b: _Info, why: str | None, op: Op) -> _Info:
        if a.axis != b.axis or a.block != b.block:
            raise _Break(f"{func_name(op.target)} combines channels along different dimensions")
        if len(a.segments) != len(b.segments) or any(
            x[1] != y[1] for x, y in zip(a.segments, b.segments, strict=True)
        ):
            raise _Break(f"{func_name(op.target)} combines differently laid out channels")
        for (sa, _), (sb, _) in zip(a.segments, b.segments, strict=True):
            if sa is not None and sb is not None:
                _union(sa, sb, why if sa.root() is not sb.root() else None)
            elif sa is not None or sb is not None:
                raise _Break(
                    f"its output is combined ({func_name(op.target)}) with channels that cannot be pruned"
                )
        return a

    def pool(self, op: Op, dims: int, info: _Info | None, others: list[Value]) -> None:
        out = op.outputs[0] if op.outputs else None
        if info is None or out is None:
            self.break_all(op, self.not_channelwise(op))
            return
        ndim = len(op.args[0].shape)
        if info.axis >= ndim - dims or info.block != 1 or others:
            raise _Break(f"{_display(op, func_name(op.target))} pools over the channel dimension")
        self.unused_indices(op, info, "max pooling (return_indices=True)")
        self.set(out, info)

    def unused_indices(self, op: Op, info: _Info, what: str) -> None:
        """The indices a call returns beside its values hold positions, not values that
        scale with their channel, one per channel: any use of them ends the group (an
        unpooling layer, ``idx.float()``). They carry the group's channels, so that their
        sizes read as numbers, or their return as a model output, end it too."""
        for value in op.outputs[1:]:
            if value.users:
                raise _Break(f"the indices of {what} are used")
            self.set(value, info)

    def spatial(
        self, op: Op, key: str, info: _Info | None, others: list[Value], out: Value | None
    ) -> None:
        """A map of positions (:data:`_SPATIAL`), kept when it leaves the channels alone."""
        if info is None or out is None or others or len(op.outputs) != 1:
            self.break_all(op, self.not_channelwise(op))
            return
        ndim = len(op.args[0].shape)
        if key == "interpolate":
            dims: Any = range(2, ndim)
        elif key in ("fliplr", "flipud"):
            dims = [1 if key == "fliplr" else 0]
        elif key == "flip" and len(op.args) > 2:  # y.flip(3, 1): the dimensions as varargs
            dims = op.args[1:]
        else:
            position = {"flip": 1, "roll": 2, "rot90": 2}[key]
            default = [0, 1] if key == "rot90" else None
            dims = op.args[position] if len(op.args) > position else op.kwargs.get("dims", default)
            if isinstance(dims, int):
                dims = [dims]
        shown = _display(op, func_name(op.target))
        if dims is None:  # roll without dims: the flattened tensor is rolled
            raise _Break(f"its output is rolled as one flat sequence ({shown}), mixing channels")
        touched = {d % ndim for d in dims}
        if info.axis in touched:
            raise _Break(f"{shown} moves values along the channel dimension")
        if out.shape[info.axis] != op.args[0].shape[info.axis]:
            raise _Break(f"{shown} changes the size of the channel dimension")
        self.set(out, info)

    def reduction(
        self, op: Op, key: str, info: _Info | None, others: list[Value], out: Value | None
    ) -> None:
        if info is None or out is None or others:
            self.break_all(op, self.not_channelwise(op))
            return
        ndim = len(op.args[0].shape)
        given = dict(zip(_REDUCTIONS[key], op.args[1:], strict=False)) | op.kwargs
        if key in ("std", "var", "std_mean", "var_mean") and isinstance(given.get("dim"), bool):
            given = {"unbiased": given["dim"], **op.kwargs}  # std(x, False): every dimension
        if "axis" in given:  # NumPy's spelling, which torch accepts
            given["dim"] = given.pop("axis")
        if key == "linalg_matrix_norm":
            given.setdefault("dim", (-2, -1))
        dim, keepdim = given.get("dim"), given.get("keepdim", False)
        if (
            dim is None
            or isinstance(dim, Value)
            or not isinstance(keepdim, bool)
            or (isinstance(dim, (list, tuple)) and not dim)  # dim=(): every dimension too
        ):
            raise _Break(f"its output is reduced over every dimension ({key})")
        dims = {d % ndim for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
        if info.axis in dims or info.block != 1:
            raise _Break(f"its output is reduced over the channels ({key})")
        axis = info.axis if keepdim else info.axis - sum(1 for d in dims if d < info.axis)
        new = _Info(info.segments, axis, info.block)
        if key in ("max", "min", "median", "nanmedian") and len(op.outputs) > 1:
            self.unused_indices(op, new, f"{key}(dim)")  # (values, indices)
        if key in _PAIRED_REDUCTIONS:
            for value in op.outputs[1:]:
                self.set(value, new)
        order = given.get("p", given.get("ord", 2))
        if key in _NONHOMOGENEOUS_REDUCTIONS or (
            key in ("norm", "linalg_vector_norm", "linalg_norm")
            and (isinstance(order, Value) or order == 0)
        ):
            self.nonhomogeneous(
                new, f"{key} over {_shown_dims(dims)} is not positively homogeneous"
            )
        self.set(out, new)

    def scan(
        self, op: Op, key: str, info: _Info | None, others: list[Value], out: Value | None
    ) -> None:
        """A scan or sort along one dimension (:data:`_SCANS`), kept when that dimension is
        not the channels. The indices that ``sort``, ``topk`` and ``cummax`` return beside
        their values must go unused, as with max pooling."""
        if info is None or out is None or others:
            self.break_all(op, self.not_channelwise(op))
            return
        names, default = _SCANS[key]
        given = dict(zip(names, op.args[1:], strict=False)) | op.kwargs
        dim, ndim = given.get("dim", default), len(op.args[0].shape)
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise _Break(f"{key} is given its dimension in an unexpected form")
        if dim % max(ndim, 1) == info.axis or info.block != 1:
            raise _Break(f"its output is ordered or accumulated along the channels ({key})")
        keepdim = given.get("keepdim", key != "kthvalue")
        if not isinstance(keepdim, bool):
            raise _Break(f"{key} is given keepdim in an unexpected form")
        axis = info.axis - (not keepdim and dim % ndim < info.axis)
        new = _Info(info.segments, axis, info.block)
        if out.shape[axis] != op.args[0].shape[info.axis]:
            raise _Break(f"{key} changes the size of the channel dimension")
        self.unused_indices(op, new, key)
        if key in _NONHOMOGENEOUS_SCANS:
            self.nonhomogeneous(new, f"{key} is not positively homogeneous")
        self.set(out, new)

    def masked_fill(self, op: Op, info: _Info | None, out: Value | None) -> None:
        """``h.masked_fill(mask, value)`` with a mask made outside the groups and the same
        for every channel (padded tokens or positions): channel-wise, and positively
        homogeneous when the value is 0."""
        mask = op.args[1] if len(op.args) > 1 else op.kwargs.get("mask")
        fill = op.args[2] if len(op.args) > 2 else op.kwargs.get("value")
        if info is None or out is None or not isinstance(mask, Value) or self.get(mask):
            self.break_all(op, self.not_channelwise(op))
            return
        if isinstance(fill, Value) and self.get(fill) is not None:
            raise _Break("its output fills its own masked entries (masked_fill)")
        info = self.aligned(info, len(op.args[0].shape), len(out.shape))  # a wider mask
        self.against_constant(info, mask, len(out.shape), op)
        if not self.zero(fill):
            self.nonhomogeneous(
                info, "masked_fill with a value other than 0 is not positively homogeneous"
            )
        self.set(out, info)

    def where(self, op: Op, out: Value | None) -> None:
        """``torch.where(mask, h, 0)``, ``torch.where(mask, 0, h)`` or ``h.where(mask, 0)``:
        a ``masked_fill`` of ``h`` with a number, by the same rules (a mask made outside the
        groups and the same for every channel; positively homogeneous when the number is
        0). A 0-dim tensor (``torch.tensor(0.)``) fills every channel alike too, but its value
        is not recorded: pruned only. Any other tensor as the second operand ends the group."""
        names = ("condition", "input", "other")
        if op.target is not torch.where:  # the method: self is the input
            names = ("input", "condition", "other")
        given = dict(zip(names, op.args, strict=False)) | op.kwargs
        mask, a, b = given.get("condition"), given.get("input"), given.get("other")
        info, fill = self.get(a), b
        if info is None:
            info, fill, a = self.get(b), a, b
        if (
            info is None
            or out is None
            or not isinstance(mask, Value)
            or self.get(mask) is not None
            or not isinstance(a, Value)
        ):
            self.break_all(op, self.not_channelwise(op))
            return
        constant = isinstance(fill, Value) and not fill.shape and self.get(fill) is None
        if not constant and (isinstance(fill, Value) or type(fill) not in (int, float, bool)):
            raise _Break("its output is combined (where) with another tensor")
        info = self.aligned(info, len(a.shape), len(out.shape))  # a wider mask
        self.against_constant(info, mask, len(out.shape), op)
        if constant or not self.zero(fill):  # a 0-dim tensor's value is not recorded
            self.nonhomogeneous(
                info, "where with a value other than 0 is not positively homogeneous"
            )
        self.set(out, info)

    def reshape(self, op: Op, info: _Info | None, others: list[Value], out: Value | None) -> None:
        target = _target_sizes(op)
        if info is None or out is None:
            self.sizes_elsewhere(op, target, None)
            self.break_all(op, self.not_channelwise(op))
            return
        before, after = op.args[0].shape, out.shape
        new = _reshaped(before, after, info)
        if new is None:
            raise _Break(
                f"{func_name(op.target)} reshapes {list(before)} to {list(after)}, mixing channels"
            )
        self.check_target_size(op, new, others, target)
        self.sizes_elsewhere(op, target, new.axis)
        self.set(out, new)

    def channel_count_of(self, size: Any) -> _Info | None:
        """The group whose channel count ``size`` was read as (``x.size(1)``), if any."""
        if not isinstance(size, DimSize) or size.source is None:
            return None
        value, dim = size.source
        info = self.get(value)
        if info is None or dim is None or dim % max(len(value.shape), 1) != info.axis:
            return None
        return info

    def sizes_elsewhere(
        self, op: Op, target: tuple[tuple[Any, ...], int] | None, channel: int | None
    ) -> None:
        """A group's channel count asked for as the size of another dimension of a reshape,
        or of a reshape of a tensor outside the groups (``table.view(-1, c)``), follows
        pruning where nothing else does: it ends that group."""
        if target is None:
            return
        sizes, first = target
        for position, size in enumerate(sizes, first):
            info = self.channel_count_of(size) if position != channel else None
            self.break_info(
                info,
                f"its channel count (.shape/.size()) sizes another dimension in "
                f"{func_name(op.target)}",
            )

    def check_target_size(
        self,
        op: Op,
        new: _Info,
        others: list[Value],
        target: tuple[tuple[Any, ...], int] | None,
    ) -> None:
        """A reshape's requested size of the channel dimension must follow the channels.

        A number written into the target shape (``view(-1, 128)``, ``reshape(b, 8, 1, 1)``)
        keeps its value after pruning and breaks the smaller model, so the channel
        dimension must be requested as ``-1``, as a size read from the channel dimension of
        a value of the same group (``x.size(1)``), or by ``view_as`` a tensor of the group.
        """
        key = func_name(op.target)
        if key in ("view_as", "reshape_as", "expand_as"):
            other = others[0] if others else None
            self.same_channels_at_end(
                op,
                self.get(other),
                new,
                f"{key} takes its shape from a tensor whose channels are not this group's",
            )
            return
        if target is None:
            if key == "unflatten":
                raise _Break("its output is unflattened with sizes of an unexpected form")
            return  # flatten, squeeze, unsqueeze, a dtype view: no sizes are given
        sizes, first = target
        if not first <= new.axis < first + len(sizes):
            if key == "unflatten":
                return  # the channel dimension is not the one unflattened
            requested: Any = -1
        else:
            requested = sizes[new.axis - first]
        # A DimSize notes every comparison or conversion as a use: read it with int's own.
        if isinstance(requested, DimSize):
            counted = self.channel_count_of(requested)
            if counted is not None and self.same_layout(counted, new):
                self.same_channels_at_end(
                    op,
                    counted,
                    new,
                    f"{key} asks for another group's channel count as the size of the channel "
                    "dimension",
                )
                return
        elif requested == -1:
            return
        made = " (computed from sizes)" if isinstance(requested, DimSize) else ""
        self.break_info(  # a channel count (of another layout) that would follow pruning
            self.channel_count_of(requested),
            f"its channel count sizes the channels of another tensor in {key}",
        )
        raise _Break(
            f"{key} asks for {int.__int__(requested)}{made} as the size of the channel "
            "dimension, which pruning changes (use -1, flatten, or the channel dimension's "
            "size as read from the tensor)"
        )

    @staticmethod
    def same_layout(a: _Info | None, b: _Info) -> bool:
        """Whether ``a`` lays out as many channels as ``b``, in the same blocks and segments."""
        if a is None or a.block != b.block or len(a.segments) != len(b.segments):
            return False
        return all(
            n == m and (s is None) == (t is None)
            for (s, n), (t, m) in zip(a.segments, b.segments, strict=True)
        )

    @classmethod
    def same_channels(cls, a: _Info | None, b: _Info) -> bool:
        """Whether ``a`` lays out the same groups' channels as ``b``, in the same blocks."""
        return cls.same_layout(a, b) and all(
            s is None or s.root() is t.root()
            for (s, _), (t, _) in zip(a.segments, b.segments, strict=True)  # type: ignore[union-attr]
        )

    def same_channels_at_end(self, op: Op, a: _Info | None, b: _Info, reason: str) -> None:
        """``b``'s channels sized by ``a``'s (``s.view(b, c, 1, 1)`` with ``c`` read from the
        tensor ``s`` then gates): sound when they are the same groups, which an op after this
        one may make them (the gate's product couples them), so it is checked at the end."""
        if not self.same_layout(a, b):
            raise _Break(reason)
        self.same_later.append((op, a, b, reason))  # type: ignore[arg-type]

    def permute(
        self, op: Op, key: str, info: _Info | None, others: list[Value], out: Value | None
    ) -> None:
        if info is None or out is None:
            self.break_all(op, self.not_channelwise(op))
            return
        ndim = len(op.args[0].shape)
        a = info.axis
        order = list(range(ndim))  # the input dimension each output dimension takes
        if key in ("t", "t_", ".T"):
            order.reverse()
        elif key == ".mT":
            order[-2:] = order[:-3:-1]
        elif key == "permute":
            dims = (
                op.args[1:]
                if len(op.args) > 2 or not isinstance(op.args[1], (list, tuple))
                else op.args[1]
            )
            order = [d % ndim for d in dims]
        elif key in ("movedim", "moveaxis"):
            given = dict(zip(("source", "destination"), op.args[1:], strict=False)) | op.kwargs
            source, destination = given["source"], given["destination"]
            if isinstance(source, int):
                source, destination = [source], [destination]
            moved = {d % ndim: s % ndim for s, d in zip(source, destination, strict=True)}
            rest = iter(d for d in range(ndim) if d not in moved.values())
            order = [moved[d] if d in moved else next(rest) for d in range(ndim)]
        else:
            d0, d1 = (
                (op.args[1] % ndim, op.args[2] % ndim)
                if len(op.args) > 2
                else (op.kwargs["dim0"] % ndim, op.kwargs["dim1"] % ndim)
            )
            order[d0], order[d1] = d1, d0
        axis = order.index(a)
        if info.block != 1 and axis != a:
            raise _Break(f"{key} moves flattened channels")
        # A dimension of size 1 moved from before the channels to behind them may be the
        # batch of a batch-1 example: a reshape that looks channel-preserving there would
        # mix the samples of a larger batch (h.t().reshape(b, -1)). A larger dimension
        # moved so (tokens before a Conv1d) shows any such mixing in the example itself.
        shape = op.args[0].shape
        if any(shape[d] == 1 for d in set(range(a)) - set(order[:axis])):
            raise _Break(
                f"{key} moves a dimension of size 1 from before the channels to behind them "
                "(the batch, perhaps), which a later reshape could mix with the channels"
            )
        self.set(out, _Info(info.segments, axis, info.block))

    def expand(
        self, op: Op, key: str, info: _Info | None, others: list[Value], out: Value | None
    ) -> None:
        """A broadcast view (``s.expand_as(x)``, ``s.expand(-1, -1, h, w)``): each channel's
        values are repeated over positions, never over channels. The channel dimension's size
        must follow pruning, by the same rule as a reshape's."""
        if info is None or out is None or (key == "expand" and others):
            self.break_all(op, self.not_channelwise(op))
            return
        before, after = op.args[0].shape, out.shape
        new = _Info(info.segments, info.axis + len(after) - len(before), info.block)
        if after[new.axis] != before[info.axis]:
            raise _Break(f"{key} repeats the channels")
        target = _target_sizes(op)
        if key == "expand" and target is None:
            raise _Break(f"{key} is given sizes of an unexpected form")
        self.check_target_size(op, new, others, target)
        self.sizes_elsewhere(op, target, new.axis)
        self.set(out, new)

    def repeat(
        self, op: Op, key: str, info: _Info | None, others: list[Value], out: Value | None
    ) -> None:
        """``repeat``/``tile`` (leading dimensions may be added) and ``repeat_interleave``
        along one dimension: kept when every channel appears once, its values repeated over
        other dimensions only. A repeat count read from a size ends that size's group (a size
        used as a number)."""
        if info is None or out is None or others:
            self.break_all(op, self.not_channelwise(op))
            return
        before = op.args[0].shape
        if key == "repeat_interleave":
            given = dict(zip(("repeats", "dim"), op.args[1:], strict=False)) | op.kwargs
            dim = given.get("dim")
            if dim is None or isinstance(dim, bool) or not isinstance(dim, int):
                raise _Break("its output is flattened and repeated (repeat_interleave)")
            if dim % len(before) == info.axis:
                raise _Break("its channels are repeated (repeat_interleave)")
        new = self.aligned(info, len(before), len(out.shape))
        if out.shape[new.axis] != before[info.axis]:
            raise _Break(f"its channels are repeated ({key})")
        self.set(out, new)

    def select(
        self, op: Op, key: str, info: _Info | None, others: list[Value], out: Value | None
    ) -> None:
        """``narrow``, ``index_select`` (an index made outside the groups), ``diff`` or
        ``Tensor.unfold`` (windows, as a new last dimension) along a dimension other than
        the channels (:data:`_SELECTIONS`)."""
        method = key != "unfold" or op.target is torch.Tensor.unfold  # not F.unfold (im2col)
        if info is None or out is None or not method:
            self.break_all(op, self.not_channelwise(op))
            return
        given = dict(zip(_SELECTIONS[key], op.args[1:], strict=False)) | op.kwargs
        before = op.args[0].shape
        dim = given.get("dimension" if key == "unfold" else "dim", -1 if key == "diff" else None)
        if isinstance(dim, bool) or not isinstance(dim, int) or not before:
            raise _Break(f"{key} is given its dimension in an unexpected form")
        if dim % len(before) == info.axis:
            raise _Break(f"{key} selects or combines values along the channel dimension")
        index = given.get("index") if key == "index_select" else None
        if any(v is not index for v in others) or self.get(index) is not None:
            raise _Break(f"its output passes through {key} with a tensor argument")
        if out.shape[info.axis] != before[info.axis]:
            raise _Break(f"{key} changes the size of the channel dimension")
        self.set(out, info)

    def split(self, op: Op, key: str, info: _Info | None, others: list[Value]) -> None:
        """A split along a dimension other than the channels (tokens, rows, the batch):
        every piece holds every channel, so each is a value of the group. A split of the
        channels ends it (only part of them would reach each use)."""
        if info is None or not op.outputs or others:
            self.break_all(op, self.not_channelwise(op))
            return
        given = dict(zip(_SPLITS[key], op.args[1:], strict=False)) | op.kwargs
        before, dim = op.args[0].shape, given.get("dim", 0)
        if isinstance(dim, bool) or not isinstance(dim, int) or not before:
            raise _Break(f"{key} is given its dimension in an unexpected form")
        if dim % len(before) == info.axis:
            raise _Break(self.not_channelwise(op))
        axis = info.axis - (key == "unbind" and dim % len(before) < info.axis)
        new = _Info(info.segments, axis, info.block)
        for value in op.outputs:
            if value.shape[axis] != before[info.axis]:
                raise _Break(f"{key} changes the size of the channel dimension")
            self.set(value, new)

    def cat(self, op: Op, out: Value | None) -> None:
        tensors = op.args[0] if op.args else op.kwargs.get("tensors")
        dim = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim", 0)
        if out is None or not isinstance(tensors, (list, tuple)):
            self.break_all(op, self.not_channelwise(op))
            return
        ndim = len(out.shape)
        dim %= ndim
        infos = [self.get(t) for t in tensors]
        axis = next(i.axis for i in infos if i is not None)
        if dim == axis:
            segments: list[tuple[_Space | None, int]] = []
            for t, i in zip(tensors, infos, strict=True):
                if i is not None and (i.axis != axis or i.block != 1):
                    raise _Break("a concat mixes channels along different dimensions")
                segments += list(i.segments) if i is not None else [(None, t.shape[dim])]
            result = _Info(tuple(segments), axis)
            for space in result.spaces():
                if "a concat" not in space.coupled:
                    space.coupled.append("a concat")
            self.set(out, result)
            return
        result = None
        for i in infos:
            if i is None:
                raise _Break(
                    f"its output is concatenated (along dim {dim}) with a tensor that cannot be pruned"
                )
            result = i if result is None else self.join(result, i, "a concat", op)
        self.set(out, result)

    def stack(self, op: Op, out: Value | None) -> None:
        """``torch.stack`` along a new dimension: each input's channels stay where they are,
        so inputs of several groups are pruned as one (like a residual add)."""
        tensors = op.args[0] if op.args else op.kwargs.get("tensors")
        dim = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim", 0)
        if out is None or not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            self.break_all(op, self.not_channelwise(op))
            return
        result = None
        for t in tensors:
            info = self.get(t)
            if info is None:
                raise _Break("its output is stacked with a tensor that cannot be pruned")
            result = info if result is None else self.join(result, info, "a stack", op)
        if result is None:
            return
        axis = result.axis + (dim % len(out.shape) <= result.axis)
        self.set(out, _Info(result.segments, axis, result.block))

    def pad(self, op: Op, info: _Info | None, others: list[Value], out: Value | None) -> None:
        if info is None or out is None or others:
            self.break_all(op, self.not_channelwise(op))
            return
        ndim = len(op.args[0].shape)
        pad = op.args[1] if len(op.args) > 1 else op.kwargs.get("pad")
        # A size read as a pad (``x.shape[0] - 1``) may be zero only in the example.
        padded = {ndim - 1 - i // 2 for i, p in enumerate(pad) if isinstance(p, DimSize) or p}
        owner = f" in {op.owner_type}" if op.owner_type else ""
        if info.axis in padded:
            raise _Break(
                f"its output is zero-padded along the channels (F.pad{owner}, an option-A shortcut); the stream is left intact"
            )
        mode = op.args[2] if len(op.args) > 2 else op.kwargs.get("mode", "constant")
        value = op.args[3] if len(op.args) > 3 else op.kwargs.get("value", None)
        if mode == "constant" and value is not None and not self.zero(value):
            self.nonhomogeneous(
                info, "padding with a non-zero constant is not positively homogeneous"
            )
        self.set(out, info)

    def getitem(self, op: Op, info: _Info | None, out: Value | None) -> None:
        if info is None or out is None:
            self.break_all(op, self.not_channelwise(op))
            return
        index = op.args[1] if len(op.args) > 1 else None
        items = index if isinstance(index, tuple) else (index,)
        ndim = len(op.args[0].shape)
        if any(i is Ellipsis for i in items):
            at = items.index(Ellipsis)
            named = sum(1 for i in items if i is not None and i is not Ellipsis)
            items = items[:at] + (slice(None),) * (ndim - named) + items[at + 1 :]
        # Slices keep a dimension, integers drop one and None adds one: each must leave
        # the channel dimension whole, and the channels then sit at ``axis`` of the output.
        position, axis = 0, info.axis
        for item in items:
            if item is None:
                if position <= info.axis:
                    axis += 1
                continue
            whole = isinstance(item, slice) and item.start is item.stop is item.step is None
            plain = type(item) is int or isinstance(item, DimSize)  # never compared (a use)
            if not (isinstance(item, slice) or plain) or position >= ndim:
                raise _Break("its output is indexed (x[...]) in a way that selects channels")
            if position == info.axis and plain:
                raise _Break("its output is indexed (x[...]) in a way that selects channels")
            if position == info.axis and not whole:
                raise _Break("its output is sliced along the channels")
            if plain and position < info.axis:
                axis -= 1
            position += 1
        if len(out.shape) <= axis or out.shape[axis] != op.args[0].shape[info.axis]:
            raise _Break("its output is indexed (x[...]) in a way that selects channels")
        self.set(out, _Info(info.segments, axis, info.block))


_GATED = {"silu": "swiglu", "gelu": "geglu"}


def _approximable(op: Op, key: str) -> str | None:
    """The activation's name for approximate merging (:mod:`.approx`), if it has a rule."""
    if key == "gelu":
        approximate = op.kwargs.get("approximate", op.args[1] if len(op.args) > 1 else "none")
        return "gelu_tanh" if approximate == "tanh" else "gelu"
    if key in ("silu", "silu_", "hardswish", "hardswish_", "relu6"):
        return key.rstrip("_")
    if key in ("hardtanh", "hardtanh_"):
        low = op.kwargs.get("min_val", op.args[1] if len(op.args) > 1 else -1.0)
        high = op.kwargs.get("max_val", op.args[2] if len(op.args) > 2 else 1.0)
        return "relu6" if (low, high) == (0.0, 6.0) else None
    return None


def _approximation(space: _Space) -> tuple[str | None, str | None]:
    """(activation, gate) when the space's only non-homogeneity is one approximable unit."""
    if space.passthrough:
        return None, None
    if len(space.producers) == 1 and len(space.activations) == 1 and len(space.reasons) == 1:
        return space.activations[0][0], None
    if len(space.producers) == 2 and len(space.gated) == 1 and len(space.reasons) == 2:
        activation, gate, up = space.gated[0]
        if {gate, up} == set(space.producers):
            return activation, gate
    return None, None


def _shown_dims(dims: set[int]) -> str:
    return ("dimension " if len(dims) == 1 else "dimensions ") + ", ".join(map(str, sorted(dims)))


class _Break(Exception):
    """An operation ends the groups of its inputs (the message says why)."""


def _target_sizes(op: Op) -> tuple[tuple[Any, ...], int] | None:
    """The sizes a ``view``/``reshape``/``unflatten``/``expand`` asks for, and the output
    dimension of the first; ``None`` when it takes none (``flatten``, a dtype view)."""
    key = func_name(op.target)
    if key in ("view", "reshape", "expand"):
        sizes = op.args[1:] or tuple(op.kwargs.get(k) for k in ("shape", "size") if k in op.kwargs)
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = tuple(sizes[0])
        if not sizes or not all(isinstance(n, int) for n in sizes):
            return None
        return tuple(sizes), 0
    if key == "unflatten":
        dim = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim")
        sizes = op.args[2] if len(op.args) > 2 else op.kwargs.get("sizes")
        if not isinstance(dim, int) or not isinstance(sizes, (list, tuple)):
            return None
        return tuple(sizes), dim % len(op.args[0].shape)
    return None


def _reshaped(before: Sequence[int], after: Sequence[int], info: _Info) -> _Info | None:
    """``info`` after a reshape from ``before`` to ``after``, or ``None`` if channels are mixed.

    The channel dimension survives when some dimension of ``after`` holds exactly
    the same elements: the product of the dimensions before it is unchanged, and it
    is the channel dimension itself or the channel dimension merged with the
    dimensions right after it (a channel-major flatten: each channel then owns a
    block of consecutive features). A channel-major dimension may also be split
    again, its first part a whole number of elements per channel (``unflatten(1, (c,
    h, w))`` after ``flatten(1)``). Size-1 dimensions make several positions
    equivalent; the channel's own position is preferred, else the last one.
    """
    a = info.axis
    prefix, channel = math.prod(before[:a]), before[a]
    options: list[tuple[int, int]] = []  # (dimension of after, elements per channel there)
    # The channel dimension never moves to the front: with batch 1 that position
    # would be accepted for a reshape that mixes channels across the batch.
    for a2 in range(1 if a > 0 else 0, len(after)):
        if math.prod(after[:a2]) != prefix:
            continue
        merged = channel
        for j in range(a + 1, len(before) + 1):
            if merged == after[a2] and math.prod(after[a2 + 1 :]) == math.prod(before[j:]):
                options.append((a2, info.block * (merged // channel if channel else 1)))
                break
            if j == len(before) or merged > after[a2]:
                break
            merged *= before[j]
        if info.block > 1 and after[a2] < channel and after[a2] % info.width == 0:
            block = after[a2] // info.width  # of each channel's elements, this many per index
            split, j = after[a2], a2
            for j in range(a2 + 1, len(after)):
                split *= after[j]
                if split >= channel:
                    break
            if (
                split == channel
                and info.block % block == 0
                and math.prod(after[j + 1 :]) == math.prod(before[a + 1 :])
            ):
                options.append((a2, block))
    for a2, block in options:
        if a2 == a:
            return _Info(info.segments, a2, block)
    if options:
        a2, block = options[-1]
        return _Info(info.segments, a2, block)
    return None


# ---------------------------------------------------------------- public entry points


def _needs_coupled(space: _Space) -> str | None:
    if space.coupled:
        return space.coupled[0]
    if len({c[0] for c in space.consumers}) > 1:
        return f"{len({c[0] for c in space.consumers})} layers"
    return None


#: Why a layer that did not run on the example inputs is left intact.
NOT_RUN = (
    "it did not run on the example inputs (a branch or code path they do not take), "
    "so what it reads was not analysed"
)


def groups_from_recording(
    rec: Recording, coupled: bool = False
) -> tuple[list[ChannelGroup], list[SkippedLayer]]:
    """The channel groups of a recorded forward pass, and the producers left intact."""
    analysis = _Analysis(rec)
    analysis.run()
    groups: list[ChannelGroup] = []
    skipped: list[SkippedLayer] = []
    seen: set[int] = set()
    reported: set[str] = set()
    hooked = rec.hooked
    for space in analysis.spaces:
        root = space.root()
        if id(root) in seen:
            continue
        seen.add(id(root))
        if hooked and root.broken is None:
            for name in (*root.modules_seen, "*"):
                if name in hooked:
                    root.broken = hooked[name]
                    break
        reason = root.broken
        if reason is None and not root.consumers:
            reason = "its output is not read by any prunable layer"
        why = _needs_coupled(root) if reason is None else None
        if reason is None and not coupled and why is not None:
            reason = (
                f"its output reaches {why}"
                if why.startswith("a ")
                else f"its output is read by {why}"
            ) + " (coupled channels: pass coupled=True to prune them jointly)"
        if reason is not None:
            for name in [*root.producers, *(p[0] for p in root.passthrough)]:
                if name not in reported:
                    reported.add(name)
                    skipped.append(SkippedLayer(name, reason))
            continue
        consumers = root.consumers
        activation, gate = _approximation(root) if root.nonhomogeneous else (None, None)
        groups.append(
            ChannelGroup(
                producers=tuple(root.producers),
                bns=tuple(root.bns.get(p) for p in root.producers),
                consumers=tuple(c[0] for c in consumers),
                channels=root.n,
                mergeable=root.nonhomogeneous is None,
                reason=root.nonhomogeneous,
                passthrough=tuple(p[0] for p in root.passthrough),
                coupled=why is not None,
                consumer_offsets=tuple(c[1] for c in consumers),
                features=tuple(c[2] for c in consumers),
                passthrough_offsets=tuple(p[1] for p in root.passthrough),
                activation=activation,
                gate=gate,
                standard_layout=root.layout,
            )
        )
    calls = rec.calls
    for name, module in rec.modules.items():
        if name in reported or name in calls or not _is_producer(module):
            continue
        if is_leaf(module):
            skipped.append(SkippedLayer(name, NOT_RUN))
        else:
            skipped.append(SkippedLayer(name, _own_forward(module)))
    if len(skipped) > 1:
        order = {name: i for i, name in enumerate(rec.modules)}
        skipped.sort(key=lambda s: order.get(s.name, 0))
    return groups, skipped


def find_groups(
    model: nn.Module, example_inputs: Any, coupled: bool = False
) -> tuple[list[ChannelGroup], list[SkippedLayer]]:
    """Find every channel group of ``model`` from one forward pass on ``example_inputs``.

    Returns the groups (in execution order of their first producer) and the
    producers left intact, each with the reason. ``model`` itself runs once under
    ``torch.no_grad()``, with every module in eval mode as compression runs it (each
    module's own mode is restored); state that its forward writes (running statistics
    it keeps, a batch norm it switches to training mode) is written, as by a call of the
    model, with a warning naming what it wrote in place (writes through ``.data``, NumPy
    or the storage leave no trace to see). ``nm.prune`` and ``nm.merge`` run a copy.
    ``example_inputs`` is a tensor, a tuple of
    tensors, or a mapping of keyword inputs (e.g. ``{"input_ids": ids}``).

    Example::

        >>> import torch, neuron_merging as nm
        >>> net = torch.nn.Sequential(
        ...     torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
        >>> groups, skipped = nm.find_groups(net, torch.randn(1, 8))
        >>> groups[0].producers, groups[0].consumers, groups[0].mergeable
        (('0',), ('2',), False)
        >>> groups[0].reason
        'GELU is not positively homogeneous'
        >>> skipped[0].reason
        'its output reaches the model output'
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    checked = has_reparametrisations(modules)
    if checked:  # analyse what compress analyses: the plain weights
        from ._copy import aliasing_copy

        check_recordable(model, modules)
        model = aliasing_copy(model).model
        materialise_reparametrisations(model)
        modules = dict(model.named_modules())
    # A forward may write its own state: the caller's, here, unless it was copied above.
    state = [
        t
        for m in ([] if checked else modules.values())
        for registered in (m._parameters, m._buffers)
        if registered
        for t in registered.values()
        if t is not None
    ]
    versions = [t._version for t in state]
    with recorded(model, example_inputs, modules, checked) as recording:
        found = groups_from_recording(recording, coupled)
    written = {id(t) for t, v in zip(state, versions, strict=True) if t._version != v}
    for name in () if checked else recording.batch_statistics:  # their kernels' writes
        stats = (modules[name]._buffers.get(k) for k in ("running_mean", "running_var"))
        written |= {id(t) for t in stats if t is not None}
    if written:
        _warn_written(model, written)
    return found


def listed_briefly(names: Sequence[str], limit: int = 3) -> str:
    """``"a, b, c and 2 more"``: the first ``limit`` names, and how many others."""
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def _warn_written(model: nn.Module, written: set[int]) -> None:
    """Warn that the model's forward wrote into its own parameters or buffers."""
    import warnings

    names = [
        name for name, t in (*model.named_parameters(), *model.named_buffers()) if id(t) in written
    ]
    shown = listed_briefly(names)
    warnings.warn(
        f"the forward of {type(model).__name__} writes into its own state ({shown}), and "
        "find_groups ran it once, as a call of the model would; nm.prune and nm.merge never "
        "write the model they are given",
        stacklevel=3,
    )


def _standard_layout(module: nn.Module, ndim: int) -> bool:
    """Whether a layer runs on ``(batch, features)`` (``nn.Linear``) or on
    ``(batch, channels, height, width)`` (``nn.Conv2d``): the layouts the options beyond
    the paper measure channels in."""
    return ndim == 2 if type(module) is nn.Linear else ndim == 4 and isinstance(module, nn.Conv2d)


def _conv_axis(module: nn.Module, ndim: int) -> int:
    """The channel dimension of a convolution's input or output of ``ndim`` dimensions:
    0 for an unbatched one (``(C, L)`` for ``Conv1d``), else 1."""
    return 0 if ndim == _conv_dims(module) + 1 else 1


def _conv_dims(module: nn.Module) -> int:
    """The number of spatial dimensions of a convolution (or instance norm)."""
    if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d, nn.InstanceNorm1d)):
        return 1
    return 3 if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d, nn.InstanceNorm3d)) else 2


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if is_conv1d_transposed(module):
        return module.weight.shape[1]
    return module.out_channels


def _in_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    if is_conv1d_transposed(module):
        return module.weight.shape[0]
    return module.in_channels


def _held_once(modules: dict[str, nn.Module], tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is registered under one name only in the model."""
    count = 0
    for module in modules.values():
        for registered in (module._parameters, module._buffers):
            count += sum(1 for t in registered.values() if t is tensor)
    return count == 1


def _own_forward(module: nn.Module) -> str:
    """Why a layer of a prunable kind is no candidate: it runs code of its own (a subclass
    overriding ``forward``, as ``transformers``' ``FalconLinear``, or a forward replaced on
    the instance, as adapters do), which is recorded as that code, not as one layer."""
    kind = type(module).__name__
    base = next(b for b in (nn.Linear, *CONVS) if isinstance(module, b))
    if "forward" in module.__dict__:
        return f"{kind} has its forward replaced on the instance, so it is recorded as code, not as one layer"
    return (
        f"{kind} overrides {base.__name__}.forward, so its calls are recorded as the code it "
        "runs, not as one layer"
    )


def _is_producer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, *CONVS)) or is_conv1d_transposed(module)


def resolve_groups(
    model: nn.Module,
    groups: Sequence[MergeGroup | tuple[str, str | None, str]],
    found: tuple[list[ChannelGroup], list[SkippedLayer]] | None = None,
) -> list[ChannelGroup]:
    """Validate explicitly named groups and turn them into :class:`ChannelGroup`\\ s.

    Each entry is a :class:`MergeGroup` or a ``(producer, bn, consumer)`` tuple. With
    ``found`` (the groups discovered from a recording, coupled or not) every entry
    must match a discovered simple group, and takes its mergeability; otherwise the
    reason discovery gave is raised. Without it (no example inputs) the caller
    asserts that only channel-wise positively homogeneous operations sit between
    producer and consumer: shapes and types are checked, the rest is unchecked.
    """
    named = dict(model.named_modules())
    resolved: list[ChannelGroup] = []
    seen: set[str] = set()
    discovered = {g.producer: g for g in found[0]} if found else {}
    reasons = {s.name: s.reason for s in found[1]} if found else {}
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
        for role, module in (("producer", prod), ("consumer", cons)):
            if not _is_producer(module):
                raise ModelError(
                    f"{role} {getattr(group, role)!r} is a {type(module).__name__}, not Linear/Conv"
                )
            if isinstance(module, CONVS) and module.groups != 1:
                raise ModelError(f"{role} {getattr(group, role)!r} is a grouped convolution")
        if group.producer in seen or group.consumer in seen - {group.producer}:
            raise ModelError(
                f"layer {group.producer!r} or {group.consumer!r} appears in two groups"
            )
        seen.add(group.producer)
        channels = _out_channels(prod)
        if group.bn is not None:
            bn = named[group.bn]
            if not isinstance(bn, BATCHNORMS) or bn.num_features != channels:
                raise ModelError(f"bn {group.bn!r} is not a batch norm over {channels} features")
        inputs = _in_channels(cons)
        spatial = group.features_per_channel
        if spatial is None:
            spatial = inputs // channels if inputs % channels == 0 else 0
        is_conv = isinstance(cons, CONVS)
        if spatial < 1 or inputs != channels * spatial or (is_conv and spatial != 1):
            raise ModelError(
                f"consumer {group.consumer!r} has {inputs} inputs, which does not fit "
                f"producer {group.producer!r} with {channels} channels"
            )
        if found is not None:
            match = discovered.get(group.producer)
            if match is None:
                why = reasons.get(
                    group.producer, "it is not a producer in the recorded forward pass"
                )
                raise ModelError(
                    f"explicit group {group.producer!r} → {group.consumer!r} is unsound: {why}"
                )
            if not match.simple or match.consumer != group.consumer or match.bn != group.bn:
                raise ModelError(
                    f"explicit group {group.producer!r} → {group.consumer!r} (bn {group.bn!r}) does "
                    f"not match the recorded forward pass: {group.producer!r} feeds "
                    f"{', '.join(match.consumers)} (bn {match.bn!r})"
                    + (", through other layers" if match.passthrough else "")
                )
            resolved.append(match)
            continue
        resolved.append(
            ChannelGroup(
                (group.producer,),
                (group.bn,),
                (group.consumer,),
                channels,
                consumer_offsets=(0,),
                features=(spatial,),
                checked=False,
            )
        )
    return resolved


__all__ = [
    "ChannelGroup",
    "MergeGroup",
    "SkippedLayer",
    "find_groups",
    "groups_from_recording",
    "resolve_groups",
]
