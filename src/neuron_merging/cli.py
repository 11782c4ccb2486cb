"""The ``neuron-merging`` command line: a thin layer over the library.

Every deliberate error becomes one line on stderr and a documented exit code
(see :data:`EXIT_CODES`); a traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ._io import ensure_writable_dir
from .core.errors import NeuronMergingError

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
        help="checkpoint file ({'acc', 'state_dict'} or a state_dict)",
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
        help="use N unlabeled images of the training split (no labels, no gradients)",
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batches", type=int, help="limit batches per epoch (smoke runs)")
    p.add_argument(
        "--no-test",
        action="store_true",
        help="skip the per-epoch test evaluation (smoke runs); the last epoch is saved",
    )
    p.add_argument("--cfg", nargs="+", help="layer widths (compressed architecture)")
    p.add_argument("--output", required=True, help="checkpoint to write (best test accuracy)")
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
    p.add_argument("--output", help="write the compressed checkpoint here")
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
        "--resume", action="store_true", help="skip configurations already in results.json"
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
    p.add_argument("--max-batches", type=int, help="limit batches per epoch (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
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
    from .core.errors import ConfigError
    from .data import dataset_info

    model, meta = load_model(args.checkpoint, arch=args.arch)
    arch = meta["arch"]
    dataset = args.dataset or meta.get("dataset") or _default_dataset(arch)
    classes = dataset_info(dataset).num_classes
    if meta.get("num_classes") not in (None, classes):
        raise ConfigError(
            f"{args.checkpoint} has {meta['num_classes']} classes but {dataset} has {classes}"
        )
    return model, arch, dataset, meta


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(text)


def _cmd_train(args: argparse.Namespace) -> int:
    from . import models
    from .data import dataset_info, load_dataset
    from .training import recipe_for, seed_everything, train

    ensure_writable_dir(args.output)
    dataset = args.dataset or _default_dataset(args.arch)
    cfg = [v if v == "M" else int(v) for v in args.cfg] if args.cfg else None
    seed_everything(args.seed)  # the initial weights are drawn from the seeded global RNG
    model = models.create(args.arch, num_classes=dataset_info(dataset).num_classes, cfg=cfg)
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


def _cmd_compress(args: argparse.Namespace) -> int:
    from .checkpoint import save_checkpoint
    from .core.api import compress, count_parameters
    from .data import load_dataset
    from .experiments import compression_config, current_cfg, example_input
    from .metrics import count_macs
    from .training import evaluate

    if args.output:
        ensure_writable_dir(args.output)
    model, arch, dataset, _ = _load(args)
    payload: dict[str, Any] = {"arch": arch, "dataset": dataset, "mode": args.mode}
    report_text = ""
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
    lines = [report_text] if report_text and not args.quiet else []
    accuracy = None
    if not args.no_eval:
        test_set = load_dataset(dataset, "test", args.data_dir, args.download)
        score = evaluate(model, test_set, show_progress=not args.quiet)
        accuracy = score.accuracy
        payload.update(accuracy=round(score.accuracy, 2), correct=score.correct, total=score.total)
        lines.append(score.line())
    if args.output:
        save_checkpoint(
            args.output,
            model,
            acc=accuracy,
            arch=arch,
            cfg=payload["cfg"],
            num_classes=getattr(model, "num_classes", None),
            dataset=dataset,
            extra={"compression": payload.get("report", {}).get("config", {"mode": "original"})},
        )
        payload["output"] = args.output
        lines.append(f"saved {args.output}")
    _emit(args, payload, "\n".join(lines))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .experiments import run_sweep
    from .reporting import records_to_markdown

    ensure_writable_dir(Path(args.output) / "results.json")
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
        output_dir=args.output,
        resume=args.resume,
        show_progress=not args.quiet,
        calibration=calibration,
    )
    _emit(args, {"records": records, "output": args.output}, records_to_markdown(records))
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from . import models
    from .checkpoint import load_model
    from .data import dataset_info, load_dataset
    from .experiments import experiment, run_sweep
    from .reporting import records_to_markdown
    from .training import recipe_for, seed_everything, train

    exp = experiment(args.experiment)
    out = Path(args.output or Path("results") / exp.name)
    ensure_writable_dir(out / "results.json")
    dataset = args.dataset or exp.dataset
    test_set = load_dataset(dataset, "test", args.data_dir, args.download)
    start = time.perf_counter()
    checkpoint = args.checkpoint
    if checkpoint is None and os.environ.get(_CHECKPOINT_ENV):
        candidate = Path(os.environ[_CHECKPOINT_ENV]) / exp.checkpoint
        checkpoint = str(candidate) if candidate.is_file() else None
    trained: dict[str, Any] | None = None
    if checkpoint is not None:
        model, _ = load_model(checkpoint, arch=exp.arch)
    else:
        seed_everything(args.seed)  # the initial weights are drawn from the seeded global RNG
        model = models.create(exp.arch, num_classes=dataset_info(dataset).num_classes)
        recipe = recipe_for(dataset, epochs=args.epochs)
        train_set = load_dataset(dataset, "train", args.data_dir, args.download)
        checkpoint = str(out / "baseline.pth.tar")
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
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status (also used by the console script)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
        return _COMMANDS[args.command](args)
    except NeuronMergingError as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if args.debug:
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"{PROG}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 6
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"{PROG}: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 70


if __name__ == "__main__":
    sys.exit(main())
