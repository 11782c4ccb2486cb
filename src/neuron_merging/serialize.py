"""Pickle-free saving and loading of compressed models.

:func:`save` writes a directory holding

* ``manifest.json``: every module's parameter/buffer shapes and shape
  attributes (``in_features``, ``out_channels``, ``num_features``,
  ``normalized_shape``, ``nf``, ...), the compression config and report, the
  package version, tied-weight aliases, a checksum of the weights file and any
  JSON metadata the caller adds;
* the weights: ``weights-<hash>.safetensors`` when the optional
  ``safetensors`` package is installed, else ``weights-<hash>.pt``, a plain
  tensor state dict that ``torch.load(..., weights_only=True)`` reads.

:func:`load` takes a *fresh* instance of the original architecture (built the
way the user built the model before compressing it), resizes every module whose
shapes the manifest changes and loads the weights. Nothing in the directory is
ever unpickled or executed: the manifest is JSON, the weights are safetensors
(or a weights-only tensor dict), and only tensor shapes and integer shape
attributes are taken from the file. Resizing is generic: a module's tensors are
reallocated at the recorded shapes and its recorded shape attributes are set;
the layers PyTorch ships (Linear, ConvNd, BatchNorm, LayerNorm, GroupNorm,
Embedding, PReLU) and GPT-2-style ``Conv1D`` layers are then checked for consistency.

The write is atomic: the weights file is named by its content hash and the
manifest, renamed into place last, is the commit point. An interrupted save
leaves the previous save readable. Only after the commit is the weights file
that the *replaced* manifest named removed; a save never removes any other file
(a user's own ``weights-*`` files in the folder included). The folder is
``flock``-ed for the whole save (and shared while :func:`load` reads it), so
concurrent saves into one folder run one after the other and always leave one
complete save. The manifest is serialised before anything is written, and a
failed save (a full disk is an :class:`OutputError`) leaves no file behind.
Folder names need not be UTF-8.

Example::

    >>> import tempfile, torch, neuron_merging as nm
    >>> def net():
    ...     torch.manual_seed(0)
    ...     return torch.nn.Sequential(
    ...         torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> result = nm.merge(net(), torch.randn(1, 8), ratio=0.5, threshold=None)
    >>> folder = tempfile.mkdtemp()
    >>> nm.save(result, folder)
    >>> model = nm.load(net(), folder)
    >>> model[0].out_features, model[2].in_features
    (8, 8)
    >>> x = torch.randn(4, 8)
    >>> torch.equal(model(x), result.model(x))
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._io import (
    atomic_write_text,
    create_dirs,
    locked_dir,
    remove_dirs,
    remove_stale_temporaries,
    strerror,
    temporary_file,
    write_failure,
)
from .core.errors import CheckpointError, ConfigError, OutputError

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "load", "read_manifest", "save"]

#: The ``format`` field of every manifest.
FORMAT = "neuron-merging"
#: Bumped when the layout changes incompatibly; :func:`load` refuses newer versions.
FORMAT_VERSION = 1
#: The manifest's file name inside a saved directory.
MANIFEST = "manifest.json"

#: Attributes that describe a layer's tensor shapes, recorded for every module
#: and set from the manifest on a module whose tensors it resizes.
SHAPE_ATTRIBUTES = (
    "in_features",
    "out_features",
    "in1_features",
    "in2_features",
    "in_channels",
    "out_channels",
    "groups",
    "num_features",
    "num_channels",
    "num_groups",
    "num_parameters",
    "normalized_shape",
    "num_embeddings",
    "embedding_dim",
    "nf",
    "nx",
)

_WEIGHT_SUFFIX = {"safetensors": ".safetensors", "torch": ".pt"}
#: The name of every weights file :func:`save` writes; the only files it ever removes.
_WEIGHTS_NAME = re.compile(r"weights-[0-9a-f]{16}\.(?:safetensors|pt)")

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- helpers


def _safetensors() -> Any | None:
    try:
        import safetensors.torch as st
    except ImportError:
        return None
    return st


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The module's own parameters and persistent buffers (what its state dict holds)."""
    for name, tensor in module._parameters.items():
        if tensor is not None:
            yield name, tensor
    for name, tensor in module._buffers.items():
        if tensor is not None and name not in module._non_persistent_buffers_set:
            yield name, tensor


def _shape_attrs(module: nn.Module) -> dict[str, Any]:
    """The module's integer shape attributes (tuples as lists)."""
    out: dict[str, Any] = {}
    for attr in SHAPE_ATTRIBUTES:
        value = getattr(module, attr, None)
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            out[attr] = value
        elif isinstance(value, (tuple, list)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            out[attr] = list(value)
    return out


def _type_name(module: nn.Module) -> str:
    return type(module).__qualname__


def _jsonable(value: Any, where: str) -> Any:
    """``value`` as plain JSON data; :class:`ConfigError` for anything else."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where} has a non-string key {key!r}")
            out[key] = _jsonable(item, f"{where}[{key!r}]")
        return out
    if hasattr(value, "item") and callable(value.item):  # numpy / 0-d tensor scalars
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            return _jsonable(value.item(), where)
    raise ConfigError(f"{where} is a {type(value).__name__}, which JSON cannot hold")


def _model_config(model: nn.Module) -> dict[str, Any] | None:
    """A Hugging Face style ``model.config`` as JSON data, if the model has one."""
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return None
    try:
        return _jsonable(json.loads(json.dumps(to_dict(), default=str)), "config")
    except (TypeError, ValueError, RecursionError, ConfigError):
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- saving


def _unique_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict without repeats: ``(tensors, aliases)``.

    A tensor registered under several names (tied weights) is stored once and the
    other names are recorded as aliases of the first. Tensors that merely share
    storage (views of a common base) are stored as separate contiguous copies.
    """
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    storages: set[tuple[int, int]] = set()
    for key, value in model.state_dict(keep_vars=True).items():
        if not torch.is_tensor(value):
            raise ConfigError(f"state dict entry {key!r} is not a tensor")
        if id(value) in seen:
            aliases[key] = seen[id(value)]
            continue
        seen[id(value)] = key
        tensor = value.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        if tensor.numel():
            storage = (tensor.untyped_storage().data_ptr(), tensor.device.index or 0)
            if storage in storages or not tensor.is_contiguous():
                tensor = tensor.clone(memory_format=torch.contiguous_format)
            storages.add((tensor.untyped_storage().data_ptr(), tensor.device.index or 0))
        tensors[key] = tensor
    return tensors, aliases


def _module_records(model: nn.Module) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules(remove_duplicate=True):
        own = dict(_own_tensors(module))
        if not own:
            continue
        records[name] = {
            "type": _type_name(module),
            "tensors": {key: list(tensor.shape) for key, tensor in own.items()},
            "attrs": _shape_attrs(module),
        }
    return records


def _json_data(value: Any, where: str) -> Any:
    """:func:`_jsonable`, with data nested too deeply to walk as a :class:`ConfigError`."""
    try:
        return _jsonable(value, where)
    except RecursionError as exc:
        raise ConfigError(f"{where} is nested too deeply to be saved as JSON") from exc


def _manifest_text(manifest: Mapping[str, Any]) -> str:
    """The manifest as JSON text; :class:`ConfigError` for data JSON cannot write.

    Run before anything is written, so a manifest that cannot be serialised (an
    integer over Python's 4300-digit string limit, data nested too deeply) fails
    the save with nothing on disk.
    """
    try:
        return json.dumps(manifest, indent=1, allow_nan=False) + "\n"
    except RecursionError as exc:
        raise ConfigError("the manifest (metadata=?) is nested too deeply for JSON") from exc
    except ValueError as exc:  # e.g. an int beyond sys.get_int_max_str_digits()
        raise ConfigError(f"the manifest (metadata=?) cannot be written as JSON: {exc}") from exc


def _write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (see :func:`_manifest_text`)."""
    atomic_write_text(path, _manifest_text(data))


def _is_utf8(path: Path) -> bool:
    """Whether ``path`` is valid UTF-8 (safetensors' file functions refuse any other name)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in the name, kept as surrogates
        return False
    return True


def _named_weights(manifest: Mapping[str, Any] | None) -> str | None:
    """The weights file name a manifest of ours records, or ``None`` if it records none.

    Only a name of the form :func:`save` writes (``weights-<16 hex><suffix>``, no
    folder part) counts, so a tampered manifest can never make a save remove any
    other file.
    """
    info = manifest.get("weights") if isinstance(manifest, Mapping) else None
    name = info.get("file") if isinstance(info, Mapping) else None
    if isinstance(name, str) and _WEIGHTS_NAME.fullmatch(name):
        return name
    return None


def _current_weights(directory: Path) -> str | None:
    """The weights file the save now in ``directory`` uses (``None``: no readable save)."""
    try:
        return _named_weights(read_manifest(directory / MANIFEST))
    except CheckpointError:
        return None


def _write_weights(
    fd: int, tmp: Path, tensors: dict[str, Tensor], weights_format: str, directory: Path
) -> None:
    """Write ``tensors`` to the temporary file ``tmp`` (open as ``fd``, which this closes).

    safetensors is written by path when the path is UTF-8 (streamed from the
    tensors' memory) and from bytes otherwise. A write the file system refuses (a
    full disk, a quota) is an :class:`OutputError`, whatever exception the writer
    raised.
    """
    handle = os.fdopen(fd, "wb")
    try:
        try:
            if weights_format == "safetensors":
                st = _safetensors()
                assert st is not None  # checked by save()
                if _is_utf8(tmp):
                    st.save_file(tensors, str(tmp), metadata={"format": FORMAT})
                else:
                    handle.write(st.save(tensors, metadata={"format": FORMAT}))
            else:
                torch.save(tensors, handle)
            handle.flush()
            os.fsync(handle.fileno())
        except OSError as exc:
            raise OutputError(f"cannot write to {directory}: {strerror(exc)}") from exc
        except Exception as exc:  # SafetensorError / RuntimeError hide the errno
            reason = write_failure(handle.fileno(), exc)
            if reason is None:
                raise
            raise OutputError(f"cannot write to {directory}: {reason}") from exc
    finally:
        with contextlib.suppress(OSError):  # a failed flush of what is left: already reported
            handle.close()


def _place_weights(tmp: Path, target: Path, digest: str, current: str | None) -> bool:
    """Move the finished temporary weights ``tmp`` to ``target``; whether this created it.

    ``target`` is named by the content hash, so an existing file there normally
    holds these very weights: the current save's file (replaced by the fresh copy,
    which repairs a damaged one) or a byte-identical file (kept as it is). A file
    there with other content is not ours and is refused, never replaced.
    """
    if os.path.lexists(target):
        if target.name == current:
            os.replace(tmp, target)
            return False
        if target.is_file() and not target.is_symlink() and _sha256(target) == digest:
            return False
        raise OutputError(f"{target} exists and is not a file of this save; refusing to replace it")
    os.replace(tmp, target)
    return True


def _commit(
    directory: Path, manifest: dict[str, Any], tensors: dict[str, Tensor], weights_format: str
) -> None:
    """Write the weights and the manifest into ``directory``, which the caller holds locked.

    The new weights file is placed first, the manifest renamed over the old one
    second (the commit point), and only then is the weights file that the
    *replaced* manifest named removed. No other file is ever removed: not a
    user's own ``weights-*`` file, not a file whose manifest cannot be read. If the
    manifest cannot be written, the weights file this save placed is removed again
    and the previous save is untouched.
    """
    suffix = _WEIGHT_SUFFIX[weights_format]
    remove_stale_temporaries(directory, ["weights" + suffix])  # a killed save's leftover
    current = _current_weights(directory)
    with temporary_file(directory / ("weights" + suffix)) as (fd, tmp):
        _write_weights(fd, tmp, tensors, weights_format, directory)
        digest = _sha256(tmp)
        name = f"weights-{digest[:16]}{suffix}"
        manifest["weights"] = {
            "file": name,
            "format": weights_format,
            "sha256": digest,
            "bytes": tmp.stat().st_size,
        }
        created = _place_weights(tmp, directory / name, digest, current)
    try:
        _fsync_dir(directory)
        _write_json(directory / MANIFEST, manifest)
        _fsync_dir(directory)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                (directory / name).unlink()
        raise
    if current is not None and current != name:  # the replaced save's weights, now unused
        with contextlib.suppress(OSError):
            (directory / current).unlink()


def save(
    result: Any,
    path: PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    weights_format: str = "auto",
) -> None:
    """Save a compressed model (or any module) to the directory ``path``, pickle-free.

    Args:
        result: a :class:`~neuron_merging.MergeResult` (its model, config and
            report are saved) or a plain ``nn.Module``.
        path: the directory to write (created if needed). A previous save there
            is replaced atomically and its weights file (the one its manifest
            names) removed; no other file in the directory is touched. Saves
            into the same directory from several processes or threads run one
            after the other (the directory is ``flock``-ed), so the result is
            always one complete save.
        metadata: extra JSON data stored in the manifest under ``"metadata"``.
        weights_format: ``"safetensors"``, ``"torch"`` (a weights-only state
            dict) or ``"auto"`` (safetensors when installed).

    Raises:
        ConfigError: bad ``weights_format``, safetensors requested but not
            installed, or metadata JSON cannot hold (checked before anything
            is written).
        OutputError: the directory cannot be written (a full disk included).
            A failed save leaves no file behind (and removes the folders it
            created); a previous save there stays loadable.
    """
    from . import __version__

    if isinstance(result, nn.Module):
        model, report = result, None
    elif isinstance(getattr(result, "model", None), nn.Module):
        model, report = result.model, getattr(result, "report", None)
    else:
        raise ConfigError(f"expected a MergeResult or an nn.Module, got {type(result).__name__}")
    st = _safetensors()
    if weights_format == "auto":
        weights_format = "safetensors" if st is not None else "torch"
    if weights_format not in _WEIGHT_SUFFIX:
        raise ConfigError(
            f"weights_format must be 'auto', 'safetensors' or 'torch', got {weights_format!r}"
        )
    if weights_format == "safetensors" and st is None:
        raise ConfigError("weights_format='safetensors' needs the safetensors package")

    report_dict = report.to_dict() if report is not None else None
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "neuron_merging_version": __version__,
        "torch_version": torch.__version__,
        "model_type": _type_name(model),
        "config": None if report_dict is None else _json_data(report_dict.get("config"), "config"),
        "report": None if report_dict is None else _json_data(report_dict, "report"),
        "model_config": _model_config(model),
        "metadata": _json_data(dict(metadata or {}), "metadata"),
        "modules": _module_records(model),
    }
    tensors, aliases = _unique_tensors(model)
    manifest["aliases"] = aliases
    manifest["weights"] = {"file": "", "format": weights_format, "sha256": "0" * 64, "bytes": 0}
    _manifest_text(manifest)  # fails here, before anything is written, if JSON cannot hold it

    directory = Path(path)
    for _ in range(3):  # again if a failed concurrent save removed the folder meanwhile
        try:
            created = create_dirs(directory)
        except OSError as exc:
            raise OutputError(f"cannot write to {directory}: {strerror(exc)}") from exc
        if not directory.is_dir():
            raise OutputError(f"cannot write to {directory}: not a directory")
        try:
            with locked_dir(directory) as still_there:
                if still_there:
                    _commit(directory, manifest, tensors, weights_format)
                    return
        except OSError as exc:
            remove_dirs(created)
            raise OutputError(f"cannot write to {directory}: {strerror(exc)}") from exc
        except BaseException:
            remove_dirs(created)
            raise
    raise OutputError(f"cannot write to {directory}: it was removed while this save waited")


# --------------------------------------------------------------------------- loading


def _manifest_path(path: PathLike) -> Path:
    target = Path(path)
    if target.is_dir():
        target = target / MANIFEST
    if not target.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} found (not a neuron-merging save)")
    return target


def is_saved_model(path: PathLike) -> bool:
    """Whether ``path`` is a directory (or manifest) written by :func:`save`."""
    target = Path(path)
    try:
        return (target / MANIFEST).is_file() if target.is_dir() else target.name == MANIFEST
    except OSError:  # e.g. a name too long: the checkpoint loader reports it
        return False


def read_manifest(path: PathLike) -> dict[str, Any]:
    """The manifest of the save at ``path`` (its directory or its ``manifest.json``).

    Raises :class:`CheckpointError` when it is missing, not JSON (nested too
    deeply included), not a neuron-merging manifest, or of a newer format version.
    """
    file = _manifest_path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except RecursionError as exc:
        raise CheckpointError(f"{file}: cannot read the manifest (nested too deeply)") from exc
    except (OSError, ValueError) as exc:  # ValueError: bad UTF-8 or JSON, an int too long
        raise CheckpointError(f"{file}: cannot read the manifest ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a neuron-merging manifest")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: format version {version!r} is newer than this neuron-merging "
            f"understands ({FORMAT_VERSION}); upgrade neuron-merging"
        )
    for key, kind in (("modules", dict), ("weights", dict), ("aliases", dict)):
        if not isinstance(data.get(key), kind):
            raise CheckpointError(f"{file}: the manifest's {key!r} entry is missing or malformed")
    return data


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise CheckpointError(f"{where} is not a shape: {value!r}")
    return tuple(value)


def _valid_size(value: Any, like: Any) -> bool:
    """Whether ``value`` is a size of the same kind as ``like`` (an int, or a list of ints)."""

    def size(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if isinstance(like, int):
        return size(value)
    return isinstance(value, list) and len(value) == len(like) and all(size(v) for v in value)


@dataclass
class _Change:
    module: nn.Module
    name: str
    tensors: dict[str, tuple[int, ...]]
    attrs: dict[str, Any]


def _expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a layer's shape attributes imply (empty for unknown layer types)."""
    if isinstance(module, nn.Linear):
        return {"weight": (module.out_features, module.in_features), "bias": (module.out_features,)}
    if isinstance(module, nn.modules.conv._ConvNd):
        # weight (out, in/groups, *kernel); transposed (in, out/groups, *kernel)
        first, second = (
            (module.in_channels, module.out_channels)
            if module.transposed
            else (module.out_channels, module.in_channels)
        )
        return {
            "weight": (first, second // module.groups, *module.kernel_size),
            "bias": (module.out_channels,),
        }
    if isinstance(module, nn.modules.batchnorm._NormBase):
        n = (module.num_features,)
        return {"weight": n, "bias": n, "running_mean": n, "running_var": n}
    if isinstance(module, nn.LayerNorm):
        shape = tuple(module.normalized_shape)
        return {"weight": shape, "bias": shape}
    if isinstance(module, nn.PReLU):
        return {"weight": (module.num_parameters,)}
    if isinstance(module, nn.GroupNorm):
        return {"weight": (module.num_channels,), "bias": (module.num_channels,)}
    if isinstance(module, nn.Embedding):
        return {"weight": (module.num_embeddings, module.embedding_dim)}
    nf, nx = getattr(module, "nf", None), getattr(module, "nx", None)
    if isinstance(nf, int):  # GPT-2 style Conv1D: y = x @ W + b with W (nx, nf)
        weight = module._parameters.get("weight")
        rows = nx if isinstance(nx, int) else (weight.shape[0] if weight is not None else 0)
        return {"weight": (rows, nf), "bias": (nf,)}
    return {}


def _check_layer(module: nn.Module, name: str) -> str | None:
    """Why the resized ``module``'s shape attributes disagree with its tensors, or ``None``."""
    own = dict(_own_tensors(module))
    problems = [
        f"{key} {tuple(own[key].shape)} but its attributes imply {shape}"
        for key, shape in _expected_shapes(module).items()
        if key in own and tuple(own[key].shape) != shape
    ]
    groups = getattr(module, "groups", None)
    if isinstance(module, nn.modules.conv._ConvNd) and (
        module.in_channels % module.groups or module.out_channels % module.groups
    ):
        problems.append(f"channels {module.in_channels}/{module.out_channels} vs groups={groups}")
    return f"{name}: {'; '.join(problems)}" if problems else None


def _plan_changes(
    model: nn.Module, manifest: dict[str, Any], weights: Mapping[str, Tensor], where: Path
) -> list[_Change]:
    """Compare the fresh ``model`` to the manifest; every difference that resizing fixes.

    Every recorded shape must be the shape of that tensor in the weights file, so
    a manifest can never make :func:`_apply_changes` allocate more (or other)
    than the file holds: a huge recorded shape is a :class:`CheckpointError`,
    not an allocation failure.
    """
    recorded: dict[str, Any] = manifest["modules"]
    live = {
        name: module
        for name, module in model.named_modules(remove_duplicate=True)
        if any(True for _ in _own_tensors(module))
    }
    missing = sorted(set(recorded) - set(live))
    extra = sorted(set(live) - set(recorded))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"modules in the file but not the model: {', '.join(missing[:8])}")
        if extra:
            parts.append(f"modules in the model but not the file: {', '.join(extra[:8])}")
        raise CheckpointError(f"{where}: does not fit the model: {'; '.join(parts)}")
    changes: list[_Change] = []
    problems: list[str] = []
    for name, module in live.items():
        entry = recorded[name]
        if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict):
            raise CheckpointError(f"{where}: malformed manifest entry for module {name!r}")
        if entry.get("type") != _type_name(module):
            problems.append(
                f"{name} is a {_type_name(module)} but the file has a {entry.get('type')}"
            )
            continue
        own = dict(_own_tensors(module))
        if set(own) != set(entry["tensors"]):
            problems.append(
                f"{name} holds {sorted(own)} but the file has {sorted(entry['tensors'])}"
            )
            continue
        shapes = {
            key: _shape(value, f"{where}: {name}.{key}") for key, value in entry["tensors"].items()
        }
        mismatched = False
        for key, shape in shapes.items():
            stored = weights.get(f"{name}.{key}" if name else key)
            if stored is None:
                problems.append(f"{name}.{key} is not in the weights file")
                mismatched = True
            elif tuple(stored.shape) != shape:
                problems.append(
                    f"{name}.{key} is {list(shape)} in the manifest but "
                    f"{list(stored.shape)} in the weights file"
                )
                mismatched = True
        if mismatched:
            continue
        resized = {key: s for key, s in shapes.items() if tuple(own[key].shape) != s}
        for key, tensor in own.items():
            if key in resized and tensor.dim() != len(shapes[key]):
                problems.append(
                    f"{name}.{key} has {tensor.dim()} dimensions but the file has {len(shapes[key])}"
                )
        attrs = entry.get("attrs") or {}
        if not isinstance(attrs, dict):
            raise CheckpointError(f"{where}: malformed attributes for module {name!r}")
        current = _shape_attrs(module)
        differing = {}
        for attr, value in attrs.items():
            if attr not in current:
                problems.append(f"{name} has no shape attribute {attr!r}")
            elif value != current[attr]:
                if not _valid_size(value, current[attr]):
                    problems.append(f"{name}.{attr} = {value!r} is not a valid size")
                else:
                    differing[attr] = value
        if differing and not resized:
            problems.append(
                f"{name}: the file changes {', '.join(differing)} but none of its tensors"
            )
        if resized:
            changes.append(_Change(module, name, resized, differing))
    if problems:
        shown = "; ".join(problems[:8]) + (
            f"; ... ({len(problems) - 8} more)" if len(problems) > 8 else ""
        )
        raise CheckpointError(f"{where}: does not fit the model: {shown}")
    return changes


def _apply_changes(changes: list[_Change], model: nn.Module, where: Path) -> None:
    """Reallocate the resized tensors (keeping ties) and set the shape attributes."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for bucket in (module._parameters, module._buffers):
            for key, tensor in bucket.items():
                if tensor is not None:
                    holders.setdefault(id(tensor), []).append((module, key))
    replaced: dict[int, tuple[Tensor, Tensor]] = {}  # id(old) -> (old, new)
    try:  # every tensor is allocated before the model is touched
        for change in changes:
            module = change.module
            for key, shape in change.tensors.items():
                bucket = module._parameters if key in module._parameters else module._buffers
                old = bucket[key]
                assert old is not None
                if id(old) in replaced:
                    continue
                fresh = torch.empty(shape, dtype=old.dtype, device=old.device)
                new: Tensor = (
                    nn.Parameter(fresh, requires_grad=old.requires_grad)
                    if isinstance(old, nn.Parameter)
                    else fresh
                )
                replaced[id(old)] = (old, new)
    except (RuntimeError, MemoryError) as exc:
        raise CheckpointError(f"{where}: cannot allocate the saved tensors ({exc})") from exc
    for old, new in replaced.values():
        for owner, owner_key in holders[id(old)]:
            if owner_key in owner._parameters and owner._parameters[owner_key] is old:
                owner._parameters[owner_key] = new  # type: ignore[assignment]
            else:
                owner._buffers[owner_key] = new
    for change in changes:
        module = change.module
        for attr, value in change.attrs.items():
            current = getattr(module, attr)
            setattr(module, attr, tuple(value) if isinstance(current, tuple) else value)
    problems = [p for c in changes if (p := _check_layer(c.module, c.name)) is not None]
    if problems:
        raise CheckpointError(f"{where}: inconsistent layer shapes: {'; '.join(problems[:8])}")


def _read_weights(directory: Path, manifest: dict[str, Any]) -> dict[str, Tensor]:
    info = manifest["weights"]
    name, kind = info.get("file"), info.get("format")
    if (
        not isinstance(name, str)
        or Path(name).name != name
        or name in ("", ".", "..")
        or kind not in _WEIGHT_SUFFIX
    ):
        raise CheckpointError(f"{directory}: the manifest names no valid weights file")
    file = directory / name
    if not file.is_file():
        raise CheckpointError(f"{file}: weights file not found")
    expected = info.get("sha256")
    if isinstance(expected, str) and _sha256(file) != expected:
        raise CheckpointError(f"{file}: checksum does not match the manifest (corrupt or altered)")
    try:
        if kind == "safetensors":
            st = _safetensors()
            if st is None:
                raise CheckpointError(
                    f"{file}: reading safetensors weights needs the safetensors package "
                    "(pip install safetensors)"
                )
            # load_file refuses a path that is not UTF-8: read such a file as bytes
            tensors = st.load_file(str(file)) if _is_utf8(file) else st.load(file.read_bytes())
        else:
            with file.open("rb") as handle:
                tensors = torch.load(handle, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # both readers raise many types on corrupt input
        raise CheckpointError(
            f"{file}: cannot read the weights ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in tensors.items()
    ):
        raise CheckpointError(f"{file}: is not a dictionary of tensors")
    return tensors


def load(model: nn.Module, path: PathLike) -> nn.Module:
    """Load the save at ``path`` into ``model``, a fresh instance of the original architecture.

    Every module whose shapes the manifest changes is resized in place, then the
    weights are loaded with ``strict=True``: the model must have exactly the
    saved modules and tensors. The model's train/eval mode is left as it is.
    Nothing from the file is unpickled or executed.

    A model built on the ``meta`` device (``with torch.device("meta"): ...``)
    skips the cost of initialising weights that are overwritten anyway: the
    loaded tensors are assigned in place of the meta ones (on the CPU) and tied
    weights are tied again. Non-persistent buffers are not in the file, so a
    model that has any must be built on a real device.

    Returns:
        ``model`` itself, now holding the compressed weights.

    Raises:
        CheckpointError: the save is missing, corrupt, of a newer format, or
            does not fit ``model`` (another class, other modules, types, tensor
            names or ranks); ``model`` is not modified in that case unless the
            weights themselves fail to load.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    file = _manifest_path(path)
    directory = file.parent
    with locked_dir(directory, shared=True):  # no save replaces the files while we read them
        manifest = read_manifest(file)
        saved_type = manifest.get("model_type")
        if saved_type is not None and saved_type != _type_name(model):
            raise CheckpointError(
                f"{directory}: was saved from a {saved_type}, not a {_type_name(model)}; pass a "
                "fresh instance of the architecture that was compressed"
            )
        weights = _read_weights(directory, manifest)
    for alias, source in manifest["aliases"].items():
        if not isinstance(source, str) or source not in weights:
            raise CheckpointError(f"{directory}: alias {alias!r} names a missing tensor {source!r}")
        weights[alias] = weights[source]
    on_meta = _meta_tensors(model)
    if on_meta:
        unsaved = [name for name in on_meta if name not in weights]
        if unsaved:
            raise ConfigError(
                f"{type(model).__name__} is on the meta device but {len(unsaved)} of its tensors "
                f"are not saved (non-persistent buffers: {', '.join(unsaved[:6])}); build it on "
                "a real device"
            )
    changes = _plan_changes(model, manifest, weights, directory)
    _apply_changes(changes, model, directory)
    try:
        model.load_state_dict(weights, strict=True, assign=bool(on_meta))
    except RuntimeError as exc:
        raise CheckpointError(f"{directory}: the weights do not fit the model: {exc}") from exc
    if on_meta:
        _retie(model, manifest["aliases"])
    return model


def _meta_tensors(model: nn.Module) -> list[str]:
    """Qualified names of the model's parameters and buffers on the meta device."""
    found = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        for bucket in (module._parameters, module._buffers):
            for key, tensor in bucket.items():
                if tensor is not None and tensor.is_meta:
                    found.append(f"{prefix}.{key}" if prefix else key)
    return found


def _retie(model: nn.Module, aliases: Mapping[str, str]) -> None:
    """Make every alias the very tensor of its source again (``assign=True`` loads copies)."""
    for alias, source in aliases.items():
        owner_name, _, key = alias.rpartition(".")
        source_name, _, source_key = source.rpartition(".")
        owner = model.get_submodule(owner_name)
        holder = model.get_submodule(source_name)
        bucket = "_parameters" if key in owner._parameters else "_buffers"
        getattr(owner, bucket)[key] = getattr(holder, bucket)[source_key]
