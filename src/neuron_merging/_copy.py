"""Private helpers of :mod:`neuron_merging.api`: the finite-value check and a cheap model copy.

The copy shares tensor storage with the input until surgery replaces the
tensors it changes; :func:`unshare` then clones whatever is still shared, so
the returned model never aliases the caller's.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ModelError

#: Tensors smaller than this are checked together, concatenated, by :func:`check_finite`.
_FINITE_SMALL = 1 << 14


def _finite(flat: Tensor) -> bool:
    """Whether a 1-D floating tensor holds no NaN or Inf (one pass, no temporary)."""
    if flat.numel() == 0:
        return True
    lo, hi = torch.aminmax(flat)  # NaN propagates, ±Inf shows up as an extreme
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite(model: nn.Module) -> None:
    named = [
        (kind, name, tensor.detach())
        for kind, items in (
            ("parameter", model.named_parameters()),
            ("buffer", model.named_buffers()),
        )
        for name, tensor in items
        if tensor.is_floating_point()
    ]
    small: dict[torch.dtype, list[Tensor]] = {}
    ok = True
    for _, _, tensor in named:
        if tensor.numel() < _FINITE_SMALL:
            small.setdefault(tensor.dtype, []).append(tensor.reshape(-1))
        elif not _finite(tensor.reshape(-1)):
            ok = False
            break
    if ok:
        ok = all(_finite(torch.cat(group)) for group in small.values())
    if ok:
        return
    for kind, name, tensor in named:  # slow path: name the first offender
        if not bool(torch.isfinite(tensor).all()):
            raise ModelError(f"{kind} {name!r} contains NaN or Inf; refusing to compress")


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


def _copy_value(value: Any, memo: dict[int, Any]) -> Any:
    kind = type(value)
    if kind in _ATOMIC:
        return value
    if kind in _CONTAINERS and not value:
        return kind()
    if kind is tuple and all(type(v) in _ATOMIC for v in value):
        return value
    return copy.deepcopy(value, memo)


def _copy_tensor(tensor: Tensor | None, memo: dict[int, Any]) -> Tensor | None:
    if tensor is None:
        return None
    done = memo.get(id(tensor))
    return done if done is not None else copy.deepcopy(tensor, memo)


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
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state: dict[str, Any] = {}
    for key, value in module.__dict__.items():
        if key == "_modules":
            state[key] = type(value)(
                (n, None if m is None else _copy_module(m, memo)) for n, m in value.items()
            )
        elif key in ("_parameters", "_buffers"):
            state[key] = type(value)((n, _copy_tensor(t, memo)) for n, t in value.items())
        else:
            state[key] = _copy_value(value, memo)
    new.__setstate__(state)  # as copy.deepcopy does
    return new


def aliasing_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose plain parameters and buffers still share its data.

    Copying the data of every tensor up front is wasted for the tensors surgery
    replaces anyway (producers, consumers, batch norms), and doubles the peak
    memory of wide layers. :func:`unshare` must run on the result before it is
    returned, so that no tensor of the output aliases the input model.
    """
    memo: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.__dict__:
            continue  # tensors carrying Python attributes are copied the usual way
        if type(tensor) is nn.Parameter:
            memo[id(tensor)] = nn.Parameter(tensor.detach(), requires_grad=tensor.requires_grad)
        elif type(tensor) is torch.Tensor:
            memo[id(tensor)] = tensor.detach()
    return _copy_module(model, memo)


def _storage_key(tensor: Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError):  # storage-less tensor subclasses
        return None


def unshare(copied: nn.Module, original: nn.Module) -> None:
    """Clone every parameter or buffer of ``copied`` that still shares ``original``'s data."""
    shared = {_storage_key(t) for t in (*original.parameters(), *original.buffers())}
    shared.discard(None)
    clones: dict[int, Tensor] = {}
    with torch.no_grad():
        for module in copied.modules():
            for param in module._parameters.values():
                if param is not None and _storage_key(param) in shared:
                    param.data = param.data.clone()
            for name, buf in module._buffers.items():
                if buf is not None and (id(buf) in clones or _storage_key(buf) in shared):
                    if id(buf) not in clones:
                        clones[id(buf)] = buf.clone()
                    module._buffers[name] = clones[id(buf)]
