"""Safe checkpoint reading and writing.

Checkpoints are read with ``torch.load(..., weights_only=True)`` only, so a file
can never run code while being loaded: anything that is not tensors and plain
containers is refused. Three on-disk formats are understood:

* a directory written by :func:`save_model`: :func:`neuron_merging.save`'s
  pickle-free layout (``manifest.json`` + safetensors weights) with the
  registry metadata (``arch``, ``num_classes``, ``cfg``, ``dataset``, ``acc``)
  in the manifest;
* the authors' release format ``{"acc": float, "state_dict": {...}}``, to which
  :func:`save_checkpoint` adds ``arch``, ``cfg``, ``num_classes`` and ``dataset``
  (plain Python values only, so the result still loads under ``weights_only``);
* a bare state dict (every value a tensor).

``module.`` prefixes left by ``nn.DataParallel`` are stripped. Every failure is a
:class:`~neuron_merging.errors.CheckpointError` whose message names the file.
"""

from __future__ import annotations

import io
import numbers
import os
import pickle
import pickletools
import stat
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from . import models
from ._io import atomic_save
from .core.errors import CheckpointError, ConfigError
from .serialize import is_saved_model, read_manifest

__all__ = [
    "METADATA_KEYS",
    "infer_cfg",
    "infer_num_classes",
    "is_legacy_path",
    "load_model",
    "load_saved_model",
    "load_state_dict",
    "save_checkpoint",
    "save_model",
]

METADATA_KEYS = ("acc", "arch", "cfg", "num_classes", "dataset")
"""Keys :func:`save_checkpoint` writes next to ``state_dict``."""

_PREFIX = "module."
_LIST_LIMIT = 8
_GET_OPCODES = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- reading


def _one_pickle_globals(stream: IO[bytes]) -> list[str]:
    """``module.name`` of every global one pickle imports; raises if it is malformed.

    Only disassembles (``pickletools.genops``), never executes. Names that
    ``STACK_GLOBAL`` takes from the memo are tracked on a best-effort basis.
    """
    names: list[str] = []
    strings: list[str] = []
    memo: dict[int, object] = {}
    last: object = None
    for opcode, arg, _pos in pickletools.genops(stream):
        op = opcode.name
        if op in ("GLOBAL", "INST") and isinstance(arg, str):
            names.append(arg.replace(" ", "."))
        elif op == "STACK_GLOBAL":
            names.append(".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>")
        elif op == "MEMOIZE":
            memo[len(memo)] = last
        elif op in _PUT_OPCODES and isinstance(arg, int):
            memo[arg] = last
        elif op in _GET_OPCODES and isinstance(arg, int):
            arg = memo.get(arg)
        if isinstance(arg, str) and op not in ("GLOBAL", "INST"):
            strings.append(arg)
        if op not in _PUT_OPCODES and op != "MEMOIZE":
            last = arg
    return names


def _pickle_globals(stream: IO[bytes]) -> list[str] | None:
    """Globals imported by the pickles at the start of ``stream``.

    The legacy torch format stores several pickles back to back followed by raw
    tensor bytes, so complete pickles are scanned until one fails to parse.
    Returns ``None`` when not even the first pickle is well formed (random
    bytes, truncation).
    """
    found: list[str] = []
    complete = 0
    while True:
        try:
            found += _one_pickle_globals(stream)
        except Exception:
            return found if complete else None
        complete += 1
        if not stream.read(1):
            return found
        stream.seek(-1, io.SEEK_CUR)


def _scan_globals(path: Path) -> list[str] | None:
    """Globals referenced by the checkpoint's pickle (see :func:`_pickle_globals`)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return None
                return _pickle_globals(io.BytesIO(archive.read(member)))
        with path.open("rb") as handle:
            return _pickle_globals(handle)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return None


def _corrupt(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(f"{path}: is truncated or not a PyTorch checkpoint ({detail})")


def _torch_load(path: Path) -> Any:
    """``torch.load`` under ``weights_only=True``, with failures classified.

    A weights-only refusal of a well-formed pickle that imports Python objects is
    reported as unsafe; anything unreadable is reported as truncated/corrupt. A zip
    checkpoint (``torch.save``'s format since PyTorch 1.6) has a CRC-32 per member, which
    ``torch.load`` does not check: they are checked first, so a flipped byte in a tensor
    is reported rather than loaded.
    """
    _check_crcs(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = exc
    except Exception as exc:  # torch raises many types on corrupt input
        raise _corrupt(path, _describe(exc)) from exc

    names = _scan_globals(path)
    if names:
        suspicious = [n for n in names if not n.startswith(("torch.", "collections.", "_codecs."))]
        shown = _truncated_list(sorted(set(suspicious or names)))
        raise CheckpointError(
            f"{path}: refused as unsafe: it references Python objects ({shown}) that a "
            "weights-only load does not allow; nothing in it was executed. Only load it "
            "without weights_only if you fully trust its source."
        ) from refused
    raise _corrupt(path, _describe(refused.__context__ or refused)) from refused


def _check_crcs(path: Path) -> None:
    """Refuse a zip checkpoint with a member whose CRC-32 does not match its bytes."""
    try:
        if not zipfile.is_zipfile(path):
            return  # the legacy format (the authors' checkpoints) has no checksums
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as exc:
        raise _corrupt(path, _describe(exc)) from exc
    if bad is not None:
        raise _corrupt(path, f"the checksum of {bad} does not match its bytes")


def _describe(exc: BaseException) -> str:
    """First line of an exception, prefixed with its type, for error messages."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if len(first) > 200:  # keep whole sentences rather than stopping mid-word
        end = first.rfind(". ", 0, 200)
        first = first[: end + 1] if end > 0 else first[:200] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _truncated_list(items: Sequence[str], limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown


def _strip_prefix(state_dict: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = key
        while new_key.startswith(_PREFIX):
            new_key = new_key[len(_PREFIX) :]
        if new_key in out:
            raise CheckpointError(f"{path}: duplicate key {new_key!r} after stripping 'module.'")
        out[new_key] = value
    return out


def _as_state_dict(obj: object, path: Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: {what} is a {type(obj).__name__}, not a state dict")
    if not obj:
        raise CheckpointError(f"{path}: {what} is empty")
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise CheckpointError(
            f"{path}: {what} is not a state dict; non-tensor entries: {_truncated_list(bad)}"
        )
    for key, value in obj.items():
        if value.is_meta:
            raise CheckpointError(
                f"{path}: tensor {key!r} is on the meta device: the file holds its shape but no data"
            )
        if value.layout != torch.strided:
            raise CheckpointError(
                f"{path}: tensor {key!r} is {str(value.layout).removeprefix('torch.')}; "
                "only dense tensors are supported"
            )
    return _strip_prefix(obj, path)


def _check_dtypes(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse file tensors whose kind differs from the model's (int weights, complex, ...)."""
    for key, expected in model.state_dict().items():
        value = state_dict.get(key)
        if value is None:
            continue
        if expected.is_floating_point() and not value.is_floating_point():
            raise CheckpointError(
                f"{path}: tensor {key!r} is {str(value.dtype).removeprefix('torch.')}; "
                "weights must be floating point"
            )
        if not expected.is_floating_point() and (value.is_floating_point() or value.is_complex()):
            raise CheckpointError(
                f"{path}: tensor {key!r} is {str(value.dtype).removeprefix('torch.')}; "
                f"expected {str(expected.dtype).removeprefix('torch.')}"
            )


def load_state_dict(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint safely; return ``(state_dict, metadata)``.

    ``metadata`` holds every entry of the file other than ``state_dict`` (e.g.
    ``acc``, and ``arch``/``cfg``/``num_classes``/``dataset`` when written by
    :func:`save_checkpoint`); it is empty for a bare state dict. Tensors are on
    the CPU and ``module.`` prefixes are removed.

    Raises :class:`CheckpointError` for a missing, empty, truncated or corrupt
    file, for a file refused as unsafe (it would need to run code), and for
    content that is not a state dict.
    """
    file = Path(path)
    try:
        info = os.stat(file)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: checkpoint file not found") from None
    except OSError as exc:  # a name too long, a folder we may not enter, ...
        raise CheckpointError(f"{file}: cannot read checkpoint: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{file}: is not a regular file")
    size = info.st_size
    if size == 0:
        raise CheckpointError(f"{file}: checkpoint file is empty")
    if not os.access(file, os.R_OK):
        raise CheckpointError(f"{file}: checkpoint file is not readable (permission denied)")

    obj = _torch_load(file)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        state_dict = _as_state_dict(obj["state_dict"], file, "its 'state_dict' entry")
        metadata = {str(k): v for k, v in obj.items() if k != "state_dict"}
        return state_dict, metadata
    return _as_state_dict(obj, file, "the loaded object"), {}


# --------------------------------------------------------------------------- inference


def infer_cfg(arch: str, state_dict: Mapping[str, torch.Tensor]) -> list[models.CfgItem]:
    """Layer widths of ``arch`` as stored in ``state_dict`` (for compressed checkpoints).

    Raises :class:`ConfigError` for an unknown ``arch`` and :class:`CheckpointError`
    when ``state_dict`` lacks a tensor the architecture needs.
    """
    spec = models.model_spec(arch)
    try:
        return spec.infer_cfg(_strip_prefix(state_dict, Path("<state_dict>")))
    except ConfigError as exc:
        raise CheckpointError(
            f"cannot infer the cfg of {arch!r} from the state dict: {exc}"
        ) from exc


def infer_num_classes(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """Output count of the last Linear layer (the last 2-D weight), or ``None`` if there is none.

    Every registered model ends in a Linear classifier, and state dicts keep
    module order, so this is the classifier's row count.
    """
    last = None
    for key, value in state_dict.items():
        if key.endswith("weight") and torch.is_tensor(value) and value.dim() == 2:
            last = value
    return None if last is None else int(last.shape[0])


def _resolve(
    name: str, from_file: Any, from_arg: Any, path: Path, *, normalize: Any = None
) -> tuple[Any, bool]:
    """Pick a value from file metadata (preferred) or argument; reject a disagreement."""
    if from_file is None:
        return from_arg, False
    if from_arg is not None:
        left = normalize(from_file) if normalize else from_file
        right = normalize(from_arg) if normalize else from_arg
        if left != right:
            raise CheckpointError(
                f"{path}: the file records {name}={from_file!r} but {name}={from_arg!r} was requested"
            )
    return from_file, True


def _key_report(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Describe missing/unexpected keys and shape mismatches, or ``None`` if it all fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_truncated_list(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_truncated_list(unexpected)}")
    if mismatched:
        parts.append(f"size mismatches ({len(mismatched)}): {_truncated_list(mismatched)}")
    return "; ".join(parts) or None


def load_model(
    path: PathLike,
    arch: str | None = None,
    num_classes: int | None = None,
    cfg: Sequence[models.CfgItem] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a registered model from a checkpoint and load it with ``strict=True``.

    ``arch``, ``num_classes`` and ``cfg`` come from the file's metadata when it
    has them (an argument that contradicts the file is an error), else from the
    arguments, else they are inferred: ``num_classes`` from the classifier's
    shape and ``cfg`` from the layer shapes, so compressed checkpoints without
    metadata load too. ``arch`` has no fallback and must then be passed.

    Returns the model in eval mode and the file's metadata, completed with the
    ``arch``, ``num_classes`` and ``cfg`` actually used. A checkpoint of another
    architecture raises :class:`CheckpointError` listing missing/unexpected keys
    and shape mismatches.
    A directory written by :func:`save_model` (``manifest.json`` + pickle-free
    weights) is read with :func:`load_saved_model` instead.
    """
    file = Path(path)
    if is_saved_model(file):
        return load_saved_model(file, arch=arch, num_classes=num_classes, cfg=cfg)
    state_dict, metadata = load_state_dict(file)

    arch, arch_from_file = _resolve("arch", metadata.get("arch"), arch, file)
    if arch is None:
        raise CheckpointError(
            f"{file}: the checkpoint does not record its architecture; pass arch= (--arch on the command line) "
            f"(one of: {', '.join(models.list_models())})"
        )
    try:
        spec = models.model_spec(arch)
    except ConfigError as exc:
        if arch_from_file:
            raise CheckpointError(f"{file}: {exc}") from exc
        raise

    n_classes, classes_from_file = _resolve(
        "num_classes", metadata.get("num_classes"), num_classes, file
    )
    inferred = infer_num_classes(state_dict)
    if n_classes is None:
        n_classes = inferred or spec.default_num_classes
    elif classes_from_file and inferred is not None and n_classes != inferred:
        # Checked before the model is built: a huge count would allocate gigabytes first.
        raise CheckpointError(
            f"{file}: its metadata's num_classes {n_classes} does not match the "
            f"{inferred} outputs of its classifier"
        )

    file_cfg = metadata.get("cfg")
    if file_cfg is not None and not isinstance(file_cfg, (list, tuple)):
        raise CheckpointError(f"{file}: its 'cfg' entry is a {type(file_cfg).__name__}, not a list")
    chosen_cfg, cfg_from_file = _resolve(
        "cfg", None if file_cfg is None else list(file_cfg), cfg, file, normalize=list
    )
    try:
        shapes_cfg = spec.infer_cfg(state_dict)
    except ConfigError:
        shapes_cfg = None  # keys absent: build the default and report the key mismatch
    if chosen_cfg is None:
        chosen_cfg = shapes_cfg
    elif cfg_from_file and shapes_cfg is not None and list(chosen_cfg) != list(shapes_cfg):
        # Checked before the model is built: a huge cfg would allocate gigabytes first.
        raise CheckpointError(
            f"{file}: its metadata's cfg {_truncated_list([str(c) for c in chosen_cfg])} does not "
            f"match the widths of its tensors {_truncated_list([str(c) for c in shapes_cfg])}"
        )

    try:
        model = models.create(arch, num_classes=n_classes, cfg=chosen_cfg)
    except ConfigError as exc:
        user_supplied = (num_classes is not None and not classes_from_file) or (
            cfg is not None and not cfg_from_file
        )
        if user_supplied:
            raise
        raise CheckpointError(f"{file}: cannot build {arch!r} from it: {exc}") from exc

    report = _key_report(model, state_dict)
    if report is not None:
        raise CheckpointError(f"{file}: does not fit architecture {arch!r}: {report}")
    _check_dtypes(model, state_dict, file)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # pragma: no cover - _key_report catches these first
        raise CheckpointError(f"{file}: does not fit architecture {arch!r}: {exc}") from exc
    model.eval()

    info = dict(metadata)
    info.update(arch=arch, num_classes=n_classes, cfg=list(getattr(model, "cfg", chosen_cfg) or []))
    return model, info


# --------------------------------------------------------------------------- writing


def _plain(value: Any, where: str) -> Any:
    """Check ``value`` only holds types ``weights_only`` loading accepts; return a copy."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise ConfigError(f"{where} has a non-string key {k!r}")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if hasattr(value, "item") and callable(value.item):  # numpy / 0-d scalars
        try:
            item = value.item()
        except (TypeError, ValueError):
            item = None
        if isinstance(item, (bool, int, float, str)):
            return item
    raise ConfigError(
        f"{where} is a {type(value).__name__}; checkpoints may only hold tensors, numbers, "
        "strings, None, lists, tuples and dicts"
    )


def save_checkpoint(
    path: PathLike,
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    *,
    acc: float | None,
    arch: str | None = None,
    cfg: Sequence[models.CfgItem] | None = None,
    num_classes: int | None = None,
    dataset: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Atomically write ``{'acc', 'state_dict', 'arch', 'cfg', 'num_classes', 'dataset'}``.

    The layout extends the authors' release format, so their tooling can still
    read it, and records what :func:`load_model` needs to rebuild the network.
    For a module from :func:`neuron_merging.models.create`, ``arch``, ``cfg`` and
    ``num_classes`` default to its own attributes. ``extra`` adds more entries.
    Only tensors and plain Python values are written, so the file reloads under
    ``weights_only=True``; anything else raises :class:`ConfigError`.
    """
    if isinstance(model_or_state_dict, nn.Module):
        module = model_or_state_dict
        while isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
        arch = arch if arch is not None else getattr(module, "arch", None)
        cfg = cfg if cfg is not None else getattr(module, "cfg", None)
        num_classes = (
            num_classes if num_classes is not None else getattr(module, "num_classes", None)
        )
        raw_state = module.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        raw_state = model_or_state_dict
    else:
        raise ConfigError(
            f"expected an nn.Module or a state dict, got {type(model_or_state_dict).__name__}"
        )
    state_dict: dict[str, torch.Tensor] = {}
    for key, value in raw_state.items():
        if not (isinstance(key, str) and torch.is_tensor(value)):
            raise ConfigError(f"state dict entry {key!r} is not a tensor")
        while key.startswith(_PREFIX):
            key = key[len(_PREFIX) :]
        state_dict[key] = value.detach().cpu()

    if arch is not None and not isinstance(arch, str):
        raise ConfigError(f"arch must be a string, got {arch!r}")
    if acc is not None and (isinstance(acc, bool) or not isinstance(acc, numbers.Real)):
        raise ConfigError(f"acc must be a number or None, got {acc!r}")
    if arch is not None and arch in models.list_models():
        problem = checkpoint_mismatch(state_dict, arch, cfg, num_classes)
        if problem is not None:
            raise ConfigError(f"{path}: {problem}")
    if dataset is not None and not isinstance(dataset, str):
        raise ConfigError(f"dataset must be a string, got {dataset!r}")
    payload: dict[str, Any] = {
        "acc": None if acc is None else float(acc),
        "state_dict": state_dict,
        "arch": arch,
        "cfg": None if cfg is None else _plain(list(cfg), "cfg"),
        "num_classes": None if num_classes is None else int(num_classes),
        "dataset": dataset,
    }
    for key, value in (extra or {}).items():
        if not isinstance(key, str):
            raise ConfigError(f"extra key {key!r} must be a string")
        if key in payload:
            raise ConfigError(f"extra key {key!r} clashes with a reserved checkpoint key")
        payload[key] = _plain(value, f"extra[{key!r}]")

    atomic_save(path, lambda handle: torch.save(payload, handle))


# --------------------------------------------------------------------------- pickle-free format

#: Output names that keep the legacy ``torch.save`` checkpoint (the authors' format).
LEGACY_SUFFIXES = (".pth", ".pt", ".tar")


def checkpoint_mismatch(
    state_dict: Mapping[str, torch.Tensor],
    arch: str,
    cfg: Sequence[models.CfgItem] | None,
    num_classes: int | None,
) -> str | None:
    """Why a checkpoint file of these tensors would not load back, or ``None``.

    :func:`load_model` rebuilds a checkpoint file's model from its ``arch``, ``cfg``
    (inferred from the shapes when absent) and ``num_classes``. A cfg lists each
    layer's width, not every tensor's: the residual streams of a ResNet compressed with
    ``coupled=True`` have no entry, and such a file would be written but never read
    back. The rebuilt model is made on the meta device (no memory for its tensors).
    """
    spec = models.model_spec(arch)
    if cfg is None:
        try:
            cfg = spec.infer_cfg(state_dict)
        except ConfigError:
            cfg = None
    try:
        with torch.device("meta"):
            rebuilt = models.create(
                arch, num_classes=num_classes or spec.default_num_classes, cfg=cfg
            )
    except ConfigError as exc:
        return f"it would not rebuild {arch!r}: {exc}"
    expected = rebuilt.state_dict()
    differ = [
        f"{key}: {tuple(value.shape)} vs {tuple(expected[key].shape)} rebuilt"
        for key, value in state_dict.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if not differ and _key_report(rebuilt, state_dict) is None:
        return None
    shown = f"{len(differ)} tensors differ, e.g. {differ[0]}" if differ else "its keys differ"
    return (
        f"a checkpoint file rebuilds {arch!r} from its cfg, which cannot describe this "
        f"model's widths ({shown}); save it as a directory instead (a name without "
        f"{', '.join(LEGACY_SUFFIXES)})"
    )


def is_legacy_path(path: PathLike) -> bool:
    """Whether ``path`` names a legacy checkpoint file (``.pth``, ``.pth.tar``, ``.pt``)."""
    return Path(path).suffix in LEGACY_SUFFIXES


def save_model(
    path: PathLike,
    result_or_model: Any,
    *,
    acc: float | None,
    arch: str,
    num_classes: int,
    cfg: Sequence[models.CfgItem] | None = None,
    dataset: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Save a registry model with :func:`neuron_merging.save`, plus what rebuilding it needs.

    ``result_or_model`` is a :class:`~neuron_merging.MergeResult` or a module.
    The manifest's ``metadata`` records ``arch``, ``num_classes``, ``cfg``,
    ``dataset``, ``acc`` and ``extra``; :func:`load_saved_model` reads it back.
    """
    from .serialize import save

    models.model_spec(arch)  # an unknown arch is a ConfigError before anything is written
    metadata: dict[str, Any] = {
        "acc": None if acc is None else float(acc),
        "arch": arch,
        "num_classes": int(num_classes),
        "cfg": None if cfg is None else list(cfg),
        "dataset": dataset,
    }
    for key, value in (extra or {}).items():
        if key in metadata:
            raise ConfigError(f"extra key {key!r} clashes with a reserved metadata key")
        metadata[key] = value
    save(result_or_model, path, metadata=metadata)


def _manifest_classes(manifest: Mapping[str, Any]) -> int | None:
    """The output count of the last layer with a 2-D weight that a manifest records (the
    classifier of every registered model), or ``None``."""
    modules = manifest.get("modules")
    last = None
    for record in modules.values() if isinstance(modules, dict) else ():
        tensors = record.get("tensors") if isinstance(record, dict) else None
        shape = tensors.get("weight") if isinstance(tensors, dict) else None
        if isinstance(shape, list) and len(shape) == 2 and type(shape[0]) is int:
            last = shape[0]
    return last


def load_saved_model(
    path: PathLike,
    arch: str | None = None,
    num_classes: int | None = None,
    cfg: Sequence[models.CfgItem] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a registry model saved by :func:`save_model` (or :func:`neuron_merging.save`).

    A fresh, uncompressed instance of the architecture is created and
    :func:`neuron_merging.load` resizes it from the manifest; ``arch`` and
    ``num_classes`` come from the manifest's metadata (an argument that
    contradicts it is an error) or from the arguments. ``cfg`` is only checked
    against the loaded widths. Returns the model in eval mode and the metadata.
    """
    from .serialize import load

    file = Path(path)
    manifest = read_manifest(file)
    metadata = manifest.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{file}: the manifest's metadata is not a mapping")
    arch, _ = _resolve("arch", metadata.get("arch"), arch, file)
    if arch is None:
        raise CheckpointError(
            f"{file}: the save does not record its architecture; pass arch= (--arch on the "
            f"command line) (one of: {', '.join(models.list_models())})"
        )
    try:
        spec = models.model_spec(arch)
    except ConfigError as exc:
        raise CheckpointError(f"{file}: {exc}") from exc
    n_classes, from_file = _resolve("num_classes", metadata.get("num_classes"), num_classes, file)
    if n_classes is None:
        n_classes = spec.default_num_classes
    recorded = _manifest_classes(manifest)
    if from_file and recorded is not None and n_classes != recorded:
        # Checked before the fresh instance is built: a huge count would allocate first.
        raise CheckpointError(
            f"{file}: its metadata's num_classes {n_classes} does not match the {recorded} "
            "outputs of its classifier"
        )
    model = models.create(arch, num_classes=n_classes)
    load(model, file)
    model.eval()
    widths = spec.infer_cfg(model.state_dict())
    if cfg is not None and list(cfg) != widths:
        raise CheckpointError(
            f"{file}: the saved widths are {widths}, not the requested {list(cfg)}"
        )
    model.cfg = widths
    info = dict(metadata)
    info.update(arch=arch, num_classes=n_classes, cfg=widths, format=manifest["weights"]["format"])
    return model, info
