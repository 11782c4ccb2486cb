"""Private helpers of :mod:`neuron_merging.api`: the finite-value check and a cheap model copy.

The copy's tensors are copy-on-write clones of the input's: they share its data until
surgery replaces them or anything writes them; :func:`unshare` then gives whatever is
still shared data of its own, so the returned model never aliases the caller's, and no
write while compressing reaches it.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ModelError

#: Tensors smaller than this are checked together, concatenated, by :func:`check_finite`.
_FINITE_SMALL = 1 << 16


def _finite(flat: Tensor) -> bool:
    """Whether a 1-D floating tensor holds no NaN or Inf (one pass, no temporary).

    A sum is finite only if every term is (NaN and ±Inf propagate), and it is about
    three times faster than ``aminmax``; a non-finite sum may still be an overflow of
    finite values, so that case is decided by the extremes.
    """
    if flat.numel() == 0:
        return True
    if bool(torch.isfinite(flat.sum())):
        return True
    lo, hi = torch.aminmax(flat)  # NaN propagates, ±Inf shows up as an extreme
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


@dataclass
class ModelTensors:
    """The distinct parameters and buffers of a model, found in one walk of its modules."""

    params: list[Tensor]
    buffers: list[Tensor]

    @classmethod
    def of(cls, model: nn.Module, modules: Iterable[nn.Module] | None = None) -> ModelTensors:
        """Walk ``model`` once (a tensor shared by several modules is listed once).

        ``modules`` are ``model.modules()`` if the caller has them.
        """
        seen: set[int] = set()
        params: list[Tensor] = []
        buffers: list[Tensor] = []
        for module in model.modules() if modules is None else modules:
            for bucket, values in ((params, module._parameters), (buffers, module._buffers)):
                for tensor in values.values():
                    if tensor is not None and id(tensor) not in seen:
                        seen.add(id(tensor))
                        bucket.append(tensor)
        return cls(params, buffers)

    def parameter_count(self) -> int:
        """Number of scalar parameters."""
        return sum(p.numel() for p in self.params)


def _values(tensor: Tensor) -> Tensor:
    """The values a tensor holds: a sparse tensor's stored ones, an opaque one densely."""
    tensor = tensor.detach()
    if tensor.layout == torch.strided:
        return tensor
    if tensor.layout == torch.sparse_coo:
        return tensor._values()
    if tensor.layout in (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
        return tensor.values()
    return tensor.to_dense()


def check_finite(model: nn.Module, tensors: ModelTensors | None = None) -> None:
    """Raise :class:`ModelError` naming the first parameter or buffer holding NaN or Inf.

    ``tensors`` is ``ModelTensors.of(model)`` if the caller has it.
    """
    tensors = tensors or ModelTensors.of(model)
    small: dict[torch.dtype, list[Tensor]] = {}
    ok = True
    with torch.no_grad():  # views without autograd bookkeeping
        for tensor in (*tensors.params, *tensors.buffers):
            if not tensor.is_floating_point():
                continue
            flat = _values(tensor).reshape(-1)
            if flat.numel() < _FINITE_SMALL:
                small.setdefault(flat.dtype, []).append(flat)
            elif not _finite(flat):
                ok = False
                break
        if ok:
            ok = all(_finite(torch.cat(group)) for group in small.values())
    if ok:
        return
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in items:  # slow path: name the first offender
            if tensor.is_floating_point() and not bool(torch.isfinite(_values(tensor)).all()):
                raise ModelError(f"{kind} {name!r} contains NaN or Inf; refusing to compress")


def check_on_cpu(model: nn.Module, tensors: ModelTensors) -> None:
    """Raise :class:`ModelError` naming the first parameter or buffer not on the CPU.

    Compression is built and tested for CPU tensors; a model on an accelerator would fail
    part-way with a raw device-mismatch error (meta tensors are refused earlier, with their
    own message).
    """
    if all(t.is_cpu or t.is_meta for t in (*tensors.params, *tensors.buffers)):
        return
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in items:
            if not (tensor.is_cpu or tensor.is_meta):
                raise ModelError(
                    f"{kind} {name!r} is on {tensor.device}; compression runs on the CPU: pass "
                    "model.cpu() and CPU example inputs, then move result.model back with "
                    ".to(device)"
                )


_ATOMIC = frozenset({int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device})
_CONTAINERS = frozenset({dict, OrderedDict, set, list})
_MODULE_COPY_HOOKS = ("__deepcopy__", "__reduce_ex__", "__reduce__", "__getstate__")
_PLAIN_MODULE_CLASSES: dict[type, bool] = {}


def _plain_module_class(cls: type) -> bool:
    """Whether ``cls`` copies like ``nn.Module`` (``__setstate__`` may differ: it is called)."""
    plain = _PLAIN_MODULE_CLASSES.get(cls)
    if plain is None:
        plain = all(
            getattr(cls, hook, None) is getattr(nn.Module, hook, None)
            for hook in _MODULE_COPY_HOOKS
        )
        _PLAIN_MODULE_CLASSES[cls] = plain
    return plain


def _copy_tensor(tensor: Tensor | None, memo: dict[int, Any]) -> Tensor | None:
    if tensor is None:
        return None
    done = memo.get(id(tensor))
    return done if done is not None else _deepcopy(tensor, memo, "a tensor of the model")


def _deepcopy(value: Any, memo: dict[int, Any], where: str) -> Any:
    """``copy.deepcopy(value, memo)``, with a :class:`ModelError` for what cannot be copied."""
    try:
        return copy.deepcopy(value, memo)
    except Exception as exc:  # whatever a user's __deepcopy__ or __reduce__ raises
        raise ModelError(
            f"{where} ({type(value).__name__}) cannot be copied ({type(exc).__name__}: {exc}); "
            "compression works on a copy of the model and never changes the given one, so "
            "everything the model holds must be copyable with copy.deepcopy"
        ) from exc


def _copy_module(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy`` for a module tree, without its generic per-object overhead.

    Modules whose class customises copying or pickling are handed to
    ``copy.deepcopy`` (with the same ``memo``); so are all non-trivial attribute
    values. Parameters and buffers come from ``memo`` when they are in it.
    """
    done = memo.get(id(module))
    if done is not None:
        return done
    cls = type(module)
    if not _plain_module_class(cls):
        return _deepcopy(module, memo, cls.__name__)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = module.__dict__.copy()
    # As nn.Module.__getstate__ (so copy.deepcopy) does: a module.compile() wrapper is
    # bound to the original module and would run it, not the copy.
    state.pop("_compiled_call_impl", None)
    for key, value in state.items():  # values are replaced in place; keys do not change
        kind = type(value)
        if kind in _ATOMIC:
            continue
        if kind in _CONTAINERS and not value:  # most of a module's state: empty hook dicts
            state[key] = kind()
        elif key == "_modules":
            state[key] = kind(
                (n, None if m is None else _copy_module(m, memo)) for n, m in value.items()
            )
        elif key == "_parameters" or key == "_buffers":
            state[key] = kind((n, _copy_tensor(t, memo)) for n, t in value.items())
        elif isinstance(value, Tensor) and not value.is_leaf:
            # Computed by a forward pre-hook (torch.nn.utils.prune, legacy weight_norm)
            # and not recomputed since: a copy of its values, as the hook would give.
            state[key] = value.detach().clone()
        elif not (kind is tuple and _ATOMIC.issuperset(map(type, value))):
            state[key] = _deepcopy(value, memo, f"{cls.__name__}.{key}")
    if cls.__setstate__ is nn.Module.__setstate__:
        new.__dict__.update(state)  # what it does for a complete state, minus the checks
    else:
        new.__setstate__(state)  # as copy.deepcopy does
    return new


#: PyTorch's copy-on-write clone (``torch._lazy_clone``, PyTorch 2.3 and later): the clone
#: shares its source's data until either is written, when the writer gets its own copy.
_LAZY_CLONE = getattr(torch, "_lazy_clone", None)


def _private(data: Tensor) -> Tensor:
    """A tensor with ``data``'s values that no write can share with it: copy-on-write where
    PyTorch can (memory it allocated itself), a copy otherwise (``torch.from_numpy``,
    ``share_memory()``, a memory-mapped checkpoint)."""
    if _LAZY_CLONE is not None:
        try:
            return _LAZY_CLONE(data)
        except (RuntimeError, NotImplementedError):
            pass
    return data.clone()


@dataclass
class WorkCopy:
    """:func:`aliasing_copy`'s copy, and where the original's tensors kept their data."""

    model: nn.Module
    storage_keys: frozenset[int]


def aliasing_copy(model: nn.Module, tensors: ModelTensors | None = None) -> WorkCopy:
    """A deep copy of ``model`` whose plain parameters and buffers are copy-on-write clones.

    Copying the data of every tensor up front is wasted for the tensors surgery
    replaces anyway (producers, consumers, batch norms), and doubles the peak
    memory of wide layers; so each clone shares its original's data until one of them
    is written. The model's forward may write its own state (running statistics it
    keeps, a weight it clamps): such a write, during the recorded pass, goes to the copy
    only, never to the caller's model. Tensors that share storage in the original share
    it in the copy too. :func:`unshare` must run on the result before it is returned, so
    that no tensor of the output shares data with the input model.
    """
    tensors = tensors or ModelTensors.of(model)
    memo: dict[int, Any] = {}
    keys: set[int] = set()
    clones: dict[int, Tensor] = {}  # storage key -> the private clone of its first tensor
    every = [
        t
        for t in (*tensors.params, *tensors.buffers)
        if not t.__dict__ and type(t) in (nn.Parameter, torch.Tensor)
    ]  # tensor subclasses and tensors with attributes are copied the usual way
    # Every key before any clone: looking a storage up once it is copy-on-write would
    # give the original a copy of its own.
    storage_keys = [_storage_key(t) for t in every]
    with torch.no_grad():
        for tensor, key in zip(every, storage_keys, strict=True):
            kind = type(tensor)
            data = tensor.detach()
            first = clones.get(key) if key is not None else None
            if first is None:
                data = _private(data)
                if key is not None:
                    keys.add(key)
                    clones[key] = data
            else:  # a view of the same storage: a view of the same clone
                data = first.as_strided(data.size(), data.stride(), data.storage_offset())
            if kind is nn.Parameter:
                data = nn.Parameter(data, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = data
    copied = _copy_module(model, memo)
    originals = {id(m) for m in model.modules()}
    for name, module in copied.named_modules():
        if id(module) in originals:  # its class's __deepcopy__ returned it, say
            raise ModelError(
                f"module {name or type(model).__name__!r} ({type(module).__name__}) copies as "
                "itself: compression changes its copy, so it would change the given model; "
                "give its class a __deepcopy__ that returns a new module"
            )
    return WorkCopy(copied, frozenset(keys))


_IS_COW = getattr(torch._C, "_is_cow_tensor", None)


def _cow_flags(tensors: list[Tensor]) -> list[bool]:
    """Whether each tensor is a copy-on-write clone not yet written (nor its data pointer
    taken); all ``False`` on PyTorch without copy-on-write tensors."""
    if _IS_COW is None:
        return [False] * len(tensors)
    try:
        return list(map(_IS_COW, tensors))
    except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse)
        return [_is_cow(t) for t in tensors]


def _is_cow(tensor: Tensor) -> bool:
    try:
        return bool(_IS_COW(tensor))  # type: ignore[misc]
    except (RuntimeError, NotImplementedError):
        return False


class StateMarks:
    """What a forward pass may write in a model: every module's attributes, and every
    parameter and buffer (whether a copy-on-write clone is still unwritten, which also sees
    writes through ``.data``, NumPy or the storage; the version counter of the others).

    :meth:`written` names the modules whose state changed since the marks were taken.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.attributes = [tuple(m.__dict__.values()) for m in modules.values()]
        self.owners = []
        self.tensors = []
        for (name, m), values in zip(modules.items(), self.attributes, strict=True):
            for registered in (m._parameters, m._buffers):
                for t in registered.values() if registered else ():
                    if t is not None:
                        self.owners.append(name)
                        self.tensors.append(t)
            for t in values:  # tensors held as plain attributes (``self.scale``)
                if isinstance(t, Tensor):
                    self.owners.append(name)
                    self.tensors.append(t)
        self.versions = [t._version for t in self.tensors]
        self.cow = _cow_flags(self.tensors)

    def written(self) -> list[str]:
        """The modules whose attributes were rebound or whose tensors were written."""
        versions = [t._version for t in self.tensors]
        names = {
            name
            for name, was_cow, is_cow, before, now in zip(
                self.owners, self.cow, _cow_flags(self.tensors), self.versions, versions,
                strict=True,
            )
            if (was_cow and not is_cow) or before != now
        }  # fmt: skip
        for (name, module), before in zip(self.modules.items(), self.attributes, strict=True):
            now = tuple(module.__dict__.values())
            try:  # element by element, identical objects first: all of them, normally
                same = now == before
            except Exception:  # a rebound value whose == raises (a tensor): changed
                same = False
            if not same:
                names.add(name)
        return [name for name in self.modules if name in names]


def _storage_key(tensor: Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError):  # storage-less tensor subclasses
        return None


def unshare(copied: nn.Module, storage_keys: frozenset[int]) -> ModelTensors:
    """Give every parameter or buffer of ``copied`` still on the original's storage (see
    :attr:`WorkCopy.storage_keys`) data of its own.

    Returns the distinct parameters and buffers of ``copied`` afterwards. Looking up a
    copy-on-write clone's storage gives it its own copy of the data, as a write would.
    """
    shared = storage_keys
    clones: dict[int, Tensor] = {}
    seen: set[int] = set()
    result = ModelTensors([], [])
    with torch.no_grad():
        for module in copied.modules():
            for param in module._parameters.values():
                if param is None or id(param) in seen:
                    continue
                if _storage_key(param) in shared:
                    param.data = param.data.clone()
                seen.add(id(param))
                result.params.append(param)
            for name, buf in module._buffers.items():
                if buf is None:
                    continue
                if id(buf) in clones or _storage_key(buf) in shared:
                    if id(buf) not in clones:
                        clones[id(buf)] = buf.clone()
                    buf = module._buffers[name] = clones[id(buf)]
                if id(buf) not in seen:
                    seen.add(id(buf))
                    result.buffers.append(buf)
    return result
