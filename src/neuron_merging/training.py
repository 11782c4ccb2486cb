"""Training and evaluation on the paper's datasets, seeded and deterministic on CPU."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import models
from ._progress import progress
from .checkpoint import load_state_dict, save_checkpoint
from .core.errors import CheckpointError, ConfigError, DatasetError, ModelError
from .data import ArrayDataset, iterate_batches, num_batches

#: The checkpoint entry :func:`train` writes next to ``state_dict``:
#: ``{"finished": bool, "epoch": int, "epochs": int, "best_epoch": int | None,
#: "max_batches": int | None}``. ``finished`` is ``False`` in every checkpoint written
#: while training runs (the best epoch so far) and ``True`` only in the one written
#: when the last epoch is done, so a run stopped part-way (SIGTERM, a crash, a
#: diverging loss) never leaves a file that passes for a trained model; see
#: :func:`require_finished`.
TRAINING_KEY = "training"

#: The most tensor elements (parameters and buffers) a model built for training may
#: hold: 2**30, 4 GiB of float32 weights (12 GiB with their gradients and SGD
#: momentum). Every registered model is under 15 million; a width typo such as
#: ``--cfg 100000000 100000000`` is refused by :func:`create_for_training` before
#: anything is allocated, instead of failing in the allocator.
MAX_TRAIN_ELEMENTS = 1 << 30


@dataclass(frozen=True)
class EvalResult:
    """Test-set outcome: ``correct`` of ``total`` examples, mean cross-entropy ``loss``."""

    correct: int
    total: int
    loss: float

    @property
    def accuracy(self) -> float:
        """Accuracy in percent."""
        return 100.0 * self.correct / self.total if self.total else 0.0

    def line(self) -> str:
        """The paper scripts' format: ``Accuracy: N/10000 (XX.XX%)``."""
        return f"Accuracy: {self.correct}/{self.total} ({self.accuracy:.2f}%)"


@dataclass(frozen=True)
class Recipe:
    """An SGD training recipe with step learning-rate decay (÷10 at each milestone)."""

    epochs: int
    lr: float
    milestones: Sequence[int]
    weight_decay: float
    batch_size: int = 128
    momentum: float = 0.9
    augment: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        data = asdict(self)
        data["milestones"] = list(self.milestones)
        return data


#: The paper's recipes: LeNet lr 0.1 ÷10 every 15 of 60 epochs, wd 1e-4; CIFAR
#: models lr 0.1 ÷10 at epochs 100 and 150 of 200, wd 5e-4, crop+flip.
RECIPES: dict[str, Recipe] = {
    "fashion-mnist": Recipe(epochs=60, lr=0.1, milestones=(15, 30, 45), weight_decay=1e-4),
    "cifar10": Recipe(epochs=200, lr=0.1, milestones=(100, 150), weight_decay=5e-4, augment=True),
    "cifar100": Recipe(epochs=200, lr=0.1, milestones=(100, 150), weight_decay=5e-4, augment=True),
}


def recipe_for(dataset: str, **overrides: Any) -> Recipe:
    """The paper recipe for ``dataset`` with ``None``-free ``overrides`` applied.

    Shortening ``epochs`` rescales the milestones proportionally, so a short run
    still decays the learning rate.
    """
    if dataset not in RECIPES:
        raise ConfigError(f"no training recipe for dataset {dataset!r}")
    base = RECIPES[dataset]
    values = {k: v for k, v in overrides.items() if v is not None}
    epochs = values.get("epochs", base.epochs)
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be a positive integer, got {epochs!r}")
    if "milestones" not in values and epochs != base.epochs:
        values["milestones"] = tuple(
            sorted({max(1, math.floor(m * epochs / base.epochs)) for m in base.milestones})
        )
    recipe = Recipe(**{**asdict(base), **values})
    if not (isinstance(recipe.lr, (int, float)) and math.isfinite(recipe.lr) and recipe.lr > 0):
        raise ConfigError(f"lr must be a positive finite number, got {recipe.lr!r}")
    if recipe.batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {recipe.batch_size!r}")
    return recipe


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and return a generator for data order, for reproducible CPU runs."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return torch.Generator().manual_seed(seed)


def evaluate(
    model: nn.Module,
    dataset: ArrayDataset,
    *,
    batch_size: int = 500,
    show_progress: bool = True,
    desc: str = "evaluate",
) -> EvalResult:
    """Top-1 accuracy and mean loss of ``model`` on ``dataset`` (eval mode, no grad)."""
    was_training = model.training
    if len(dataset) == 0:
        raise DatasetError("the test set holds 0 images; there is nothing to evaluate")
    model.eval()
    correct, loss_sum = 0, 0.0
    bar = progress(
        iterate_batches(dataset, batch_size),
        enabled=show_progress,
        total=num_batches(dataset, batch_size),
        desc=desc,
        unit="batch",
    )
    seen = 0
    with torch.no_grad():
        for images, labels in bar:
            logits = model(images)
            loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=1) == labels).sum())
            seen += len(labels)
            bar.set_postfix(acc=f"{100.0 * correct / seen:.2f}%")
    model.train(was_training)
    return EvalResult(correct, len(dataset), loss_sum / max(len(dataset), 1))


def _check_size(elements: int, what: str) -> None:
    if elements > MAX_TRAIN_ELEMENTS:
        raise ConfigError(
            f"{what} holds {elements:,} parameters and buffers, more than the "
            f"{MAX_TRAIN_ELEMENTS:,} a model may have for training; check the widths"
        )


def _elements(model: nn.Module) -> int:
    return sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())


def create_for_training(
    arch: str,
    num_classes: int | None = None,
    cfg: Sequence[models.CfgItem] | None = None,
) -> nn.Module:
    """:func:`neuron_merging.models.create`, refusing a model too large to train first.

    The network is built once on PyTorch's ``meta`` device (shapes, no memory, and
    no draw from the global random generator, so the seeded initial weights are
    those :func:`~neuron_merging.models.create` gives) and its size checked against
    :data:`MAX_TRAIN_ELEMENTS`; only then is it built for real. A width or class
    count too large to build at all (beyond 64-bit sizes) is a :class:`ConfigError`
    too, never an allocator error.
    """
    what = f"{arch} with cfg {list(cfg)}" if cfg is not None else arch
    if num_classes is not None:
        what += f" and {num_classes} classes"
    try:
        with torch.device("meta"):
            shape_only = models.create(arch, num_classes=num_classes, cfg=cfg)
    except ConfigError:
        raise
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ConfigError(f"cannot build {what}: its sizes are too large ({first})") from exc
    _check_size(_elements(shape_only), what)
    del shape_only
    return models.create(arch, num_classes=num_classes, cfg=cfg)


def training_state(path: str | Path) -> dict[str, Any] | None:
    """The :data:`TRAINING_KEY` entry of a checkpoint file, or ``None`` when it has none.

    Checkpoints not written by :func:`train` (the released ones, bare state dicts)
    have none. A saved-model directory is not read (training never writes one) and
    gives ``None``. Unreadable files raise :class:`CheckpointError`.
    """
    file = Path(path)
    if file.is_dir():
        return None
    _, metadata = load_state_dict(file)
    entry = metadata.get(TRAINING_KEY)
    return dict(entry) if isinstance(entry, Mapping) else None


def require_finished(path: str | Path) -> None:
    """Refuse (:class:`CheckpointError`) a checkpoint :func:`train` wrote before its last epoch.

    Such a file holds the best epoch *so far* of a run that was stopped (SIGTERM,
    a crash, a diverging loss); taking it for a trained model would report
    results of an under-trained one. Checkpoints without the entry pass.
    """
    entry = training_state(path)
    if entry is None or entry.get("finished") is True:
        return
    done, total = entry.get("epoch"), entry.get("epochs")
    when = f"after epoch {done} of {total}" if done is not None and total is not None else ""
    raise CheckpointError(
        f"{path}: an unfinished training checkpoint (written {when or 'while training'}; "
        "the run that trained it was stopped), not a trained model; finish the training "
        "first (reproduce: --force trains a new baseline)"
    )


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def _write_checkpoint(
    path: str | Path,
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    acc: float | None,
    meta: Mapping[str, Any],
    entry: dict[str, Any],
) -> None:
    """Atomically write ``state`` with ``model``'s arch/cfg/num_classes, ``meta`` and ``entry``."""
    module = _unwrap(model)
    kwargs: dict[str, Any] = {
        "arch": getattr(module, "arch", None),
        "cfg": getattr(module, "cfg", None),
        "num_classes": getattr(module, "num_classes", None),
        **meta,
    }
    extra = dict(kwargs.pop("extra", None) or {})
    if TRAINING_KEY in extra:
        raise ConfigError(f"checkpoint_meta's extra may not set {TRAINING_KEY!r}; train writes it")
    extra[TRAINING_KEY] = entry
    save_checkpoint(path, state, acc=acc, extra=extra, **kwargs)


@dataclass
class TrainResult:
    """Best test accuracy, its epoch, and the per-epoch history."""

    best: EvalResult | None
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def train(
    model: nn.Module,
    train_set: ArrayDataset,
    test_set: ArrayDataset | None,
    recipe: Recipe,
    *,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    checkpoint_meta: dict[str, Any] | None = None,
    max_batches: int | None = None,
    show_progress: bool = True,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` with SGD + momentum and step decay; keep the best test checkpoint.

    The checkpoint (``{'acc', 'state_dict', ...}``) is written atomically each time
    the test accuracy improves, with ``training={"finished": False, ...}`` (see
    :data:`TRAINING_KEY`); when the last epoch is done the best model is written
    once more with ``"finished": True``. So a run stopped part-way leaves a file that
    :func:`require_finished` refuses, never one that passes for a trained model.
    Without a test set the last epoch's model is written at the end. ``max_batches``
    limits every epoch, for smoke runs. A model over :data:`MAX_TRAIN_ELEMENTS` is
    refused with a :class:`ConfigError` before training.
    """
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ConfigError(f"max_batches must be a positive integer, got {max_batches!r}")
    if len(train_set) == 0:
        raise DatasetError("the training set holds 0 images; there is nothing to train on")
    _check_size(_elements(model), f"the {type(_unwrap(model)).__name__} model")
    meta = dict(checkpoint_meta or {})
    last = recipe.epochs

    def entry(epoch: int, finished: bool) -> dict[str, Any]:
        best = result.best_epoch if result.best is not None else None
        return {
            "finished": finished,
            "epoch": epoch,
            "epochs": last,
            "best_epoch": best,
            "max_batches": max_batches,
        }

    best_state: dict[str, torch.Tensor] | None = None  # the best epoch's weights, if not the last
    generator = seed_everything(seed)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(recipe.milestones), gamma=0.1
    )
    result = TrainResult(best=None, best_epoch=-1)
    per_epoch = num_batches(train_set, recipe.batch_size)
    if max_batches is not None:
        per_epoch = min(per_epoch, max_batches)
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        bar = progress(
            total=per_epoch,
            enabled=show_progress,
            desc=f"epoch {epoch}/{recipe.epochs}",
            unit="batch",
        )
        seen = correct = 0
        loss_sum = 0.0
        batches = iterate_batches(
            train_set, recipe.batch_size, shuffle=True, augment=recipe.augment, generator=generator
        )
        for step, (images, labels) in enumerate(batches):
            if step >= per_epoch:
                break
            optimizer.zero_grad(set_to_none=True)
            logits = model(images)
            loss = nn.functional.cross_entropy(logits, labels)
            value = loss.item()
            if not math.isfinite(value):
                raise ModelError(
                    f"training diverged: the loss is {value} at epoch {epoch}, batch "
                    f"{step + 1} (try a smaller --lr); nothing was saved for this epoch"
                )
            loss.backward()
            optimizer.step()
            seen += len(labels)
            loss_sum += value * len(labels)
            correct += int((logits.argmax(dim=1) == labels).sum())
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100.0 * correct / seen:.2f}%")
        bar.close()
        scheduler.step()
        record = {
            "epoch": float(epoch),
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": 100.0 * correct / max(seen, 1),
        }
        if test_set is not None:
            score = evaluate(model, test_set, show_progress=show_progress, desc="test")
            record.update(test_loss=score.loss, test_acc=score.accuracy)
            if result.best is None or score.correct > result.best.correct:
                result.best, result.best_epoch = score, epoch
                if checkpoint is not None:
                    state = _unwrap(model).state_dict()
                    _write_checkpoint(
                        checkpoint, model, state, score.accuracy, meta, entry(epoch, epoch == last)
                    )
                    best_state = (
                        None if epoch == last else {k: v.detach().clone() for k, v in state.items()}
                    )
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, record)
    if checkpoint is not None:
        if test_set is None:
            _write_checkpoint(
                checkpoint, model, _unwrap(model).state_dict(), None, meta, entry(last, True)
            )
        elif best_state is not None and result.best is not None:
            # The best epoch was not the last: its file said "unfinished"; now it is final.
            _write_checkpoint(
                checkpoint, model, best_state, result.best.accuracy, meta, entry(last, True)
            )
    return result
