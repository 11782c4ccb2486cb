"""The ``neuron-merging`` command line: a thin layer over the library.

Every deliberate error becomes one line on stderr and a documented exit code
(see :data:`EXIT_CODES`); a traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ._io import check_output_dir, check_output_file, remove_created_dirs
from .core.errors import ConfigError, NeuronMergingError, OutputError

PROG = "neuron-merging"

#: Exit status of each failure class.
EXIT_CODES: dict[str, int] = {
    "success": 0,
    "error (other)": 1,
    "bad arguments or configuration (ConfigError, usage)": 2,
    "model cannot be processed (ModelError)": 3,
    "checkpoint missing, corrupt, unsafe or mismatched (CheckpointError)": 4,
    "dataset missing or malformed (DatasetError)": 5,
    "output cannot be written (OutputError, OSError)": 6,
    "internal error (a bug: please report it)": 70,
    "interrupted (Ctrl-C)": 130,
    "terminated (SIGTERM)": 143,
}

_CHECKPOINT_ENV = "NEURON_MERGING_CHECKPOINTS"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid ratio {text!r}") from None
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid positive integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


#: torch seeds are 64-bit; larger values overflow inside torch.manual_seed.
_SEED_LIMIT = 2**63


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}") from None
    if not 0 <= value < _SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2**63), got {value}")
    return value


def _threshold(text: str) -> float | str:
    if text.lower() in ("none", "off"):
        return "none"  # experiments.NO_THRESHOLD: always merge (None would mean "the preset's")
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid threshold {text!r} (a number or 'none')"
        ) from None


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    group.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    group.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def _data_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "--dataset",
        choices=("fashion-mnist", "cifar10", "cifar100"),
        required=required,
        help="dataset (default: the architecture's paper dataset)",
    )
    parser.add_argument(
        "--data-dir",
        help="where the data lives (else $NEURON_MERGING_DATA, the Debian path, the user cache)",
    )
    parser.add_argument(
        "--download", action="store_true", help="download missing data (checksummed)"
    )


def _model_args(parser: argparse.ArgumentParser, checkpoint_required: bool) -> None:
    from .models import list_models

    parser.add_argument(
        "--arch", choices=list_models(), help="architecture (default: from the checkpoint)"
    )
    parser.add_argument(
        "--checkpoint",
        required=checkpoint_required,
        help="checkpoint: a directory saved by compress --output, an {'acc', 'state_dict'} "
        "file or a state_dict",
    )


def _compression_args(parser: argparse.ArgumentParser) -> None:
    from .core.select import available_criteria

    parser.add_argument(
        "--preset",
        choices=("paper", "none", "best"),
        default="paper",
        help="paper: the paper's threshold/λ/widths for the model (default); none: library "
        "defaults; best: the paper's widths with the most accurate compensation found "
        "(see docs/quality.md)",
    )
    parser.add_argument(
        "--calibrate",
        type=int,
        metavar="N",
        help="use N unlabeled images of the training split, outside its held-out "
        "validation part (the last 5,000); no labels, no gradients",
    )
    parser.add_argument(
        "--threshold", type=_threshold, help="cosine threshold, or 'none' to always merge"
    )
    parser.add_argument(
        "--lam", type=float, help="λ weighting cosine against bias distance (BN layers)"
    )
    parser.add_argument(
        "--bn-rule", choices=("paper", "exact"), default="paper", help="BN merge rule"
    )
    parser.add_argument(
        "--coupled",
        action="store_true",
        help="also compress coupled channels: residual streams, concats, shared inputs",
    )
    parser.add_argument(
        "--approximate",
        action="store_true",
        help="merge through GELU/SiLU/ReLU6/Hardswish/SwiGLU with least-squares scales",
    )
    parser.set_defaults(_criteria=available_criteria())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``neuron-merging``."""
    from . import __version__
    from .core.select import available_criteria
    from .experiments import EXPERIMENTS

    parser = _Parser(
        prog=PROG,
        description="Data-free pruning with neuron merging (Kim et al., NeurIPS 2020).",
        epilog="Exit codes: " + "; ".join(f"{c} {k}" for k, c in EXIT_CODES.items()),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model with the paper's recipe")
    p.add_argument("--arch", required=True, choices=sorted(_arch_names()))
    _data_args(p)
    p.add_argument("--epochs", type=int, help="epochs (default: the paper's recipe)")
    p.add_argument("--lr", type=float, help="initial learning rate (default 0.1)")
    p.add_argument("--batch-size", type=int, help="batch size (default 128)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--max-batches", type=_positive, help="limit batches per epoch (smoke runs)")
    p.add_argument(
        "--no-test",
        action="store_true",
        help="skip the per-epoch test evaluation (smoke runs); the last epoch is saved",
    )
    p.add_argument("--cfg", nargs="+", help="layer widths (compressed architecture)")
    p.add_argument("--output", required=True, help="checkpoint to write (best test accuracy)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --output")
    _common(p)

    p = sub.add_parser("evaluate", help="test accuracy of a checkpoint")
    _model_args(p, checkpoint_required=True)
    _data_args(p)
    _common(p)

    p = sub.add_parser("compress", help="prune or merge a checkpoint, evaluate it, save it")
    _model_args(p, checkpoint_required=True)
    _data_args(p)
    p.add_argument("-t", "--mode", choices=("original", "prune", "merge"), default="merge")
    p.add_argument("-c", "--criterion", choices=available_criteria(), default="l1-norm")
    p.add_argument(
        "-r", "--ratio", type=_ratio, help="pruning ratio (VGG paper preset: fixed widths)"
    )
    _compression_args(p)
    p.add_argument(
        "--output",
        help="write the compressed model here: a directory (pickle-free: manifest.json and "
        "safetensors weights); a name ending in .pth, .pth.tar or .pt writes the legacy "
        "torch checkpoint instead",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing --output")
    p.add_argument("--no-eval", action="store_true", help="skip the test-set evaluation")
    _common(p)

    p = sub.add_parser("sweep", help="criteria × ratios × {prune, merge} on one model")
    _model_args(p, checkpoint_required=True)
    _data_args(p)
    p.add_argument(
        "--criteria", nargs="+", choices=available_criteria(), default=available_criteria()
    )
    p.add_argument("--ratios", nargs="+", type=_ratio, default=[0.5])
    p.add_argument("--modes", nargs="+", choices=("prune", "merge"), default=["prune", "merge"])
    _compression_args(p)
    p.add_argument(
        "--output", required=True, help="directory for results.{json,csv,md} and accuracy.png"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip configurations of identical identity already in the results store",
    )
    _common(p)

    p = sub.add_parser("reproduce", help="run a paper experiment end to end")
    p.add_argument("experiment", choices=list(EXPERIMENTS))
    p.add_argument("--checkpoint", help="released checkpoint (default: train a baseline)")
    _data_args(p)
    p.add_argument("--output", help="results directory (default: results/<experiment>)")
    p.add_argument(
        "--criteria", nargs="+", choices=available_criteria(), default=available_criteria()
    )
    p.add_argument("--ratios", nargs="+", type=_ratio, help="override the experiment's ratios")
    p.add_argument("--epochs", type=int, help="baseline training epochs (default: the paper's)")
    p.add_argument("--max-batches", type=_positive, help="limit batches per epoch (smoke runs)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip finished configurations; reuse a baseline this folder already holds",
    )
    p.add_argument(
        "--force", action="store_true", help="train a new baseline over the one this folder holds"
    )
    _common(p)

    p = sub.add_parser("results", help="list every record in a sweep folder's results store")
    p.add_argument("directory", help="a sweep --output folder")
    _common(p)
    return parser


def _arch_names() -> list[str]:
    from .models import list_models

    return list_models()


def _default_dataset(arch: str) -> str:
    from .models import model_spec

    return model_spec(arch).datasets[0]


def _load(args: argparse.Namespace) -> tuple[Any, str, str, dict[str, Any]]:
    """Load the checkpoint; return (model, arch, dataset, metadata)."""
    from .checkpoint import load_model
    from .core.errors import CheckpointError, ConfigError
    from .data import DATASETS, dataset_info

    model, meta = load_model(args.checkpoint, arch=args.arch)
    arch = meta["arch"]
    from_file = not args.dataset and meta.get("dataset") is not None
    dataset = args.dataset or meta.get("dataset") or _default_dataset(arch)
    if from_file and dataset not in DATASETS:
        raise CheckpointError(
            f"{args.checkpoint}: its metadata names dataset {dataset!r}, which is not one of "
            f"{', '.join(DATASETS)}; pass --dataset"
        )
    classes = dataset_info(dataset).num_classes
    if meta.get("num_classes") not in (None, classes):
        raise ConfigError(
            f"{args.checkpoint} has {meta['num_classes']} classes but {dataset} has {classes}"
        )
    _check_input_shape(
        arch,
        dataset,
        f"the dataset {dataset!r} its metadata names" if from_file else None,
        args.checkpoint,
    )
    return model, arch, dataset, meta


def _check_input_shape(
    arch: str, dataset: str, origin: str | None = None, checkpoint: str | None = None
) -> None:
    """Refuse, before any work, an architecture whose input does not fit the dataset's images."""
    from .core.errors import CheckpointError
    from .data import dataset_info
    from .models import model_spec

    takes = tuple(model_spec(arch).input_shape)
    has = tuple(dataset_info(dataset).input_shape)
    if takes != has:
        shape = "x".join(map(str, takes)), "x".join(map(str, has))
        if origin is not None:
            raise CheckpointError(
                f"{checkpoint}: {arch} takes {shape[0]} inputs but {origin} has "
                f"{shape[1]} images; pass --dataset"
            )
        raise ConfigError(
            f"{arch} takes {shape[0]} inputs but {dataset} images are {shape[1]}; "
            f"use {arch} with {', '.join(model_spec(arch).datasets)}"
        )


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if args.json:
        from .store import finite_json

        print(json.dumps(finite_json(payload), indent=2, allow_nan=False))
    else:
        print(text)


def _cmd_train(args: argparse.Namespace) -> int:
    from .data import dataset_info, load_dataset
    from .training import create_for_training, recipe_for, seed_everything, train

    check_output_file(args.output, force=args.force)
    dataset = args.dataset or _default_dataset(args.arch)
    _check_input_shape(args.arch, dataset)
    cfg = _parse_cfg(args.cfg) if args.cfg else None
    seed_everything(args.seed)  # the initial weights are drawn from the seeded global RNG
    model = create_for_training(args.arch, num_classes=dataset_info(dataset).num_classes, cfg=cfg)
    recipe = recipe_for(dataset, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    train_set = load_dataset(dataset, "train", args.data_dir, args.download)
    test_set = None if args.no_test else load_dataset(dataset, "test", args.data_dir, args.download)
    start = time.perf_counter()
    result = train(
        model,
        train_set,
        test_set,
        recipe,
        seed=args.seed,
        checkpoint=args.output,
        checkpoint_meta={"dataset": dataset},
        max_batches=args.max_batches,
        show_progress=not args.quiet,
    )
    payload = {
        "arch": args.arch,
        "dataset": dataset,
        "checkpoint": args.output,
        "best_accuracy": None if result.best is None else result.best.accuracy,
        "best_epoch": None if result.best is None else result.best_epoch,
        "recipe": recipe.to_dict(),
        "seconds": round(time.perf_counter() - start, 1),
        "history": result.history,
    }
    if result.best is None:
        summary = f"trained {recipe.epochs} epoch(s) without test evaluation"
    else:
        summary = f"best epoch {result.best_epoch}: {result.best.line()}"
    _emit(args, payload, f"{summary}\nsaved {args.output}")
    return 0


def _parse_cfg(items: Sequence[str]) -> list[int | str]:
    """``--cfg`` widths: positive integers, or ``M`` (VGG max-pool)."""
    cfg: list[int | str] = []
    for item in items:
        if item == "M":
            cfg.append(item)
            continue
        try:
            value = int(item)
        except ValueError:
            raise ConfigError(
                f"--cfg: {item!r} is not a layer width (a positive integer, or M)"
            ) from None
        if value < 1:
            raise ConfigError(f"--cfg: width {value} must be at least 1")
        cfg.append(value)
    return cfg


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .experiments import example_input
    from .metrics import count_macs, count_parameters
    from .training import evaluate

    model, arch, dataset, meta = _load(args)
    test_set = load_dataset(dataset, "test", args.data_dir, args.download)
    score = evaluate(model, test_set, show_progress=not args.quiet)
    payload = {
        "arch": arch,
        "dataset": dataset,
        "checkpoint": args.checkpoint,
        "accuracy": round(score.accuracy, 2),
        "correct": score.correct,
        "total": score.total,
        "loss": score.loss,
        "params": count_parameters(model),
        "macs": count_macs(model, example_input(arch)),
        "cfg": meta.get("cfg"),
    }
    _emit(args, payload, score.line())
    return 0


def _refuse_input_as_output(output: str, checkpoint: str | None) -> None:
    """A saved-model directory is never replaced by the model compressed from it, even
    with ``--force`` (as a checkpoint file input is never overwritten)."""
    if checkpoint is None:
        return
    source = Path(checkpoint)
    if source.name == "manifest.json":
        source = source.parent
    try:
        same = os.path.samefile(source, output)
    except OSError:  # one of them does not exist
        return
    if same:
        raise OutputError(
            f"--output {output} is the input model {checkpoint}; refusing to overwrite it"
        )


def _cmd_compress(args: argparse.Namespace) -> int:
    from .checkpoint import checkpoint_mismatch, is_legacy_path, save_checkpoint, save_model
    from .core.api import compress, count_parameters
    from .data import load_dataset
    from .experiments import compression_config, current_cfg, example_input
    from .metrics import count_macs
    from .training import evaluate

    if args.output is not None and is_legacy_path(args.output):
        check_output_file(args.output, force=args.force, inputs=[args.checkpoint])
    elif args.output is not None:
        _refuse_input_as_output(args.output, args.checkpoint)
        check_output_dir(args.output, force=args.force)
    model, arch, dataset, _ = _load(args)
    payload: dict[str, Any] = {"arch": arch, "dataset": dataset, "mode": args.mode}
    report_text = ""
    result = None
    if args.mode != "original":
        config = compression_config(
            arch,
            dataset,
            args.mode,
            args.criterion,
            args.ratio,
            model=model,
            preset=args.preset,
            threshold=args.threshold,
            lam=args.lam,
            bn_rule=args.bn_rule,
            coupled=args.coupled,
            approximate=args.approximate,
        )
        calibration = None
        if args.calibrate:
            from .experiments import calibration_images

            calibration = calibration_images(dataset, args.calibrate, args.data_dir)
            if not config.calibrate:
                from dataclasses import replace

                from .experiments import BEST_CALIBRATE

                config = replace(config, calibrate=BEST_CALIBRATE)
        result = compress(model, example_input(arch), config, calibration=calibration)
        model = result.model
        model.cfg = current_cfg(arch, model)
        payload["report"] = result.report.to_dict()
        report_text = result.report.to_markdown()
    payload["params"] = count_parameters(model)
    payload["macs"] = count_macs(model, example_input(arch))
    payload["cfg"] = current_cfg(arch, model)
    if args.output is not None and is_legacy_path(args.output):  # before the evaluation
        problem = checkpoint_mismatch(
            model.state_dict(), arch, payload["cfg"], getattr(model, "num_classes", None)
        )
        if problem is not None:
            raise ConfigError(f"--output {args.output}: {problem}")
    lines = [report_text] if report_text and not args.quiet else []
    accuracy = None
    if not args.no_eval:
        test_set = load_dataset(dataset, "test", args.data_dir, args.download)
        score = evaluate(model, test_set, show_progress=not args.quiet)
        accuracy = score.accuracy
        payload.update(accuracy=round(score.accuracy, 2), correct=score.correct, total=score.total)
        lines.append(score.line())
    if args.output is not None:
        meta = {
            "acc": accuracy,
            "arch": arch,
            "cfg": payload["cfg"],
            "num_classes": getattr(model, "num_classes", None),
            "dataset": dataset,
            "extra": {"compression": payload.get("report", {}).get("config", {"mode": "original"})},
        }
        if is_legacy_path(args.output):
            save_checkpoint(args.output, model, **meta)
        else:
            save_model(args.output, result if result is not None else model, **meta)
        payload["output"] = args.output
        lines.append(f"saved {args.output}")
    _emit(args, payload, "\n".join(lines))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .experiments import check_sweep_output, run_sweep
    from .reporting import records_to_markdown

    if not args.output:
        raise ConfigError("--output is empty; give a folder")
    check_sweep_output(Path(args.output))
    model, arch, dataset, _ = _load(args)
    test_set = load_dataset(dataset, "test", args.data_dir, args.download)
    calibration = None
    if args.calibrate:
        from .experiments import calibration_images

        calibration = calibration_images(dataset, args.calibrate, args.data_dir)
    records = run_sweep(
        model,
        arch,
        dataset,
        test_set,
        criteria=args.criteria,
        ratios=args.ratios,
        modes=args.modes,
        preset=args.preset,
        threshold=args.threshold,
        lam=args.lam,
        bn_rule=args.bn_rule,
        coupled=args.coupled,
        approximate=args.approximate,
        output_dir=args.output,
        resume=args.resume,
        show_progress=not args.quiet,
        checkpoint=args.checkpoint,
        calibration=calibration,
    )
    _emit(args, {"records": records, "output": args.output}, records_to_markdown(records))
    return 0


def _cmd_results(args: argparse.Namespace) -> int:
    from .reporting import records_to_markdown
    from .store import STORE_NAME, ResultsStore, describe_settings

    folder = Path(args.directory)
    if not os.path.lexists(folder / STORE_NAME):
        raise OutputError(f"{folder}: no results store ({STORE_NAME}) here")
    with ResultsStore(folder) as store:
        groups = store.groups()
    payload = {
        "directory": str(folder),
        "groups": [{"settings": s, "records": r} for s, r in groups],
    }
    lines = []
    for settings, records in groups:
        lines.append(f"{len(records)} record(s): {describe_settings(settings)}")
        lines.append(records_to_markdown(records))
        lines.append("")
    _emit(args, payload, "\n".join(lines).rstrip() or f"{folder}: the results store is empty")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from . import models
    from .checkpoint import load_model
    from .data import dataset_info, load_dataset
    from .experiments import check_sweep_output, experiment, run_sweep
    from .reporting import records_to_markdown
    from .training import recipe_for, seed_everything, train

    exp = experiment(args.experiment)
    if args.output == "":
        raise ConfigError("--output is empty; give a folder")
    out = Path(args.output or Path("results") / exp.name)
    for r in args.ratios or ():  # validate everything before a baseline is trained
        if not 0.0 <= r < 1.0:
            raise ConfigError(f"ratio must be in [0, 1), got {r}")
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"epochs must be a positive integer, got {args.epochs!r}")
    check_sweep_output(out)
    dataset = args.dataset or exp.dataset
    _check_input_shape(exp.arch, dataset)
    test_set = load_dataset(dataset, "test", args.data_dir, args.download)
    start = time.perf_counter()
    checkpoint = args.checkpoint
    if checkpoint is None and os.environ.get(_CHECKPOINT_ENV):
        candidate = Path(os.environ[_CHECKPOINT_ENV]) / exp.checkpoint
        checkpoint = str(candidate) if candidate.is_file() else None
    trained: dict[str, Any] | None = None
    baseline = out / "baseline.pth.tar"
    if checkpoint is None and os.path.lexists(baseline):
        if args.resume:
            checkpoint = str(baseline)  # trained by an earlier run of this command
        elif not args.force:
            raise OutputError(
                f"{baseline} holds a baseline trained earlier; pass --resume to reuse it, "
                "--force to train a new one over it, or choose another --output"
            )
        else:
            check_output_file(str(baseline), force=True)
    if checkpoint is not None:
        model, _ = load_model(checkpoint, arch=exp.arch)
    else:
        seed_everything(args.seed)  # the initial weights are drawn from the seeded global RNG
        model = models.create(exp.arch, num_classes=dataset_info(dataset).num_classes)
        recipe = recipe_for(dataset, epochs=args.epochs)
        train_set = load_dataset(dataset, "train", args.data_dir, args.download)
        checkpoint = str(baseline)
        result = train(
            model,
            train_set,
            test_set,
            recipe,
            seed=args.seed,
            checkpoint=checkpoint,
            checkpoint_meta={"dataset": dataset},
            max_batches=args.max_batches,
            show_progress=not args.quiet,
        )
        model, _ = load_model(checkpoint)
        assert result.best is not None
        trained = {
            "checkpoint": checkpoint,
            "best_accuracy": result.best.accuracy,
            "best_epoch": result.best_epoch,
            "recipe": recipe.to_dict(),
        }
    ratios = tuple(args.ratios) if args.ratios else exp.ratios
    records = run_sweep(
        model,
        exp.arch,
        dataset,
        test_set,
        criteria=args.criteria,
        ratios=ratios,
        output_dir=out,
        resume=args.resume,
        show_progress=not args.quiet,
        checkpoint=checkpoint,
    )
    seconds = round(time.perf_counter() - start, 1)
    payload = {
        "experiment": exp.name,
        "checkpoint": checkpoint,
        "trained": trained,
        "output": str(out),
        "seconds": seconds,
        "records": records,
    }
    text = f"## {exp.description}\n\n{records_to_markdown(records)}\n\nwrote {out}/results.{{json,csv,md}}"
    if trained:
        text += f"\ntrained baseline: {trained['best_accuracy']:.2f}% ({checkpoint})"
    _emit(args, payload, text + f"\nwall time: {seconds:.1f} s")
    return 0


_COMMANDS = {
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "compress": _cmd_compress,
    "sweep": _cmd_sweep,
    "reproduce": _cmd_reproduce,
    "results": _cmd_results,
}


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler, so SIGTERM unwinds (and cleans up) like Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def _fail(args: argparse.Namespace | None, code: int, line: str) -> int:
    """Print the one-line error (and with ``--debug`` the traceback); undo created folders."""
    if args is not None and getattr(args, "debug", False):
        traceback.print_exc()
    print(line, file=sys.stderr)
    remove_created_dirs()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status (also used by the console script).

    SIGTERM is handled like Ctrl-C: temporary files are removed, one line is
    printed and the exit status is 143 (130 for Ctrl-C), even while torch is
    still being imported. ``--debug`` adds the traceback but keeps the code.
    """
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    args: argparse.Namespace | None = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        import torch

        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
        return _COMMANDS[args.command](args)
    except NeuronMergingError as exc:
        return _fail(args, exc.exit_code, f"{PROG}: error: {exc}")
    except Terminated:
        return _fail(None, 143, f"{PROG}: terminated")
    except KeyboardInterrupt:
        return _fail(None, 130, f"{PROG}: interrupted")
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return _fail(args, 6, f"{PROG}: error: {exc.strerror or exc}{where}")
    except Exception as exc:
        return _fail(
            args,
            70,
            f"{PROG}: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
        )


if __name__ == "__main__":
    sys.exit(main())
