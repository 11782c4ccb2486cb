"""Accuracy of every compensation option against the paper's merge (``make quality``).

One table per model: methods × criteria × ratios, test accuracy without
fine-tuning, parameters, and the seconds each compression took (next to the
plain merge). Models: the released LeNet-300-100 and ResNet-56 checkpoints and
the small conv net with BN trained here (``benchmarks/quality_models.py``).

Usage::

    python -m benchmarks.quality --models lenet300 resnet56 convbn \\
        --subset 2000 --calibrate 500 --out docs/quality

``--split test`` (default) evaluates on the test set, ``--split val`` on the
held-out validation split (the last 5,000 *training* images,
:func:`neuron_merging.experiments.validation_split`), where method choices are
made. ``--subset N`` evaluates on the first N images of that split (0: all);
the tables say which was used. Calibration images are a seeded random subset
of the training images outside the validation split, and no label is ever read
for them.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import neuron_merging as nm
from neuron_merging.checkpoint import load_model
from neuron_merging.data import ArrayDataset, load_dataset
from neuron_merging.experiments import (
    BEST_CALIBRATE,
    BEST_OPTIONS,
    calibration_images,
    compression_config,
    validation_split,
)
from neuron_merging.training import evaluate

from ._common import CHECKPOINT_DIRS, CHECKPOINT_FILES, ROOT

#: name → (config overrides, uses calibration data)
METHODS: dict[str, tuple[dict[str, Any], bool]] = {
    "prune (paper)": ({"mode": "prune"}, False),
    "merge (paper)": ({}, False),
    "merge + group selection": ({"selection": "group"}, False),
    "merge + cover selection": ({"selection": "cover"}, False),
    "fold": ({"compensation": "fold"}, False),
    "merge + repair mean": ({"repair": "mean"}, False),
    "merge + repair mean+var": ({"repair": "mean+var"}, False),
    "lstsq, whitened gram": (
        {"selection": "lstsq", "compensation": "lstsq", "repair": "mean+var", "gram": "whitened"},
        False,
    ),
    "best (data-free)": (dict(BEST_OPTIONS), False),
    "prune + BN reset (data)": ({"mode": "prune", "calibrate": ("bn",)}, True),
    "merge + REPAIR (data)": ({"calibrate": ("repair",)}, True),
    "merge + lstsq refit (data)": ({"calibrate": ("lstsq",)}, True),
    "best + lstsq refit (data)": (
        dict(BEST_OPTIONS, selection="lstsq", calibrate=("lstsq",)),
        True,
    ),
    "best (data)": (dict(BEST_OPTIONS, calibrate=BEST_CALIBRATE), True),
}

#: The other recipes of the development table of docs/quality.md (the runners-up
#: to ``best``), run only when named in ``--methods``.
DEVELOPMENT_METHODS: dict[str, tuple[dict[str, Any], bool]] = {
    "lstsq compensation, no repair": ({"compensation": "lstsq"}, False),
    "lstsq selection + merge + repair mean+var": (
        {"selection": "lstsq", "repair": "mean+var"},
        False,
    ),
    "lstsq selection + lstsq compensation + repair mean": (
        {"selection": "lstsq", "compensation": "lstsq", "repair": "mean"},
        False,
    ),
    "merge + block refit (data)": ({"calibrate": ("lstsq-block",)}, True),
    "merge + joint refit (data)": ({"calibrate": ("lstsq-joint",)}, True),
    "merge + flip + joint refit (data)": ({"calibrate": ("flip", "lstsq-joint")}, True),
    "merge + flip + block refit (data)": ({"calibrate": ("flip", "lstsq-block")}, True),
    "merge + flip + refit (data)": ({"calibrate": ("flip", "lstsq")}, True),
    "best + block refit (data)": (
        dict(BEST_OPTIONS, selection="lstsq", calibrate=("lstsq-block",)),
        True,
    ),
    "auto selection + joint refit (data)": (
        dict(BEST_OPTIONS, selection="auto", calibrate=("lstsq-joint",)),
        True,
    ),
    "lstsq selection + joint refit (data)": (
        dict(BEST_OPTIONS, selection="lstsq", calibrate=("lstsq-joint",)),
        True,
    ),
}

MODELS: dict[str, dict[str, Any]] = {
    "lenet300": {
        "dataset": "fashion-mnist",
        "criteria": nm.available_criteria(),
        "ratios": [0.6, 0.7, 0.8],
    },
    "resnet56": {"dataset": "cifar10", "criteria": ["l1-norm"], "ratios": [0.3, 0.5]},
    "convbn": {"dataset": "fashion-mnist", "criteria": ["l1-norm"], "ratios": [0.3, 0.5, 0.7]},
}


def _checkpoint(arch: str) -> Path:
    for folder in CHECKPOINT_DIRS:
        path = folder / CHECKPOINT_FILES[arch]
        if str(folder) and path.is_file():
            return path
    raise FileNotFoundError(f"no checkpoint for {arch} in {CHECKPOINT_DIRS}")


def load(arch: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and a batch-1 example input."""
    if arch == "convbn":
        from .quality_models import load_convbn

        return load_convbn(), torch.zeros(1, 1, 28, 28)
    from neuron_merging.experiments import example_input

    model, _ = load_model(_checkpoint(arch), arch=arch)
    return model.eval(), example_input(arch)


def config_for(
    arch: str, dataset: str, criterion: str, ratio: float, over: dict[str, Any]
) -> nm.MergeConfig:
    """The paper's config (library defaults for the conv net) with ``over`` applied."""
    over = dict(over)
    mode = over.pop("mode", "merge")
    if arch == "convbn":
        base = nm.MergeConfig(ratio=ratio, criterion=criterion, mode=mode)
    else:
        base = compression_config(arch, dataset, mode, criterion, ratio)
    return replace(base, **over)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    records: list[dict[str, Any]] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.methods:
        known = {**METHODS, **DEVELOPMENT_METHODS}
        unknown = [m for m in args.methods if m not in known]
        if unknown:
            raise SystemExit(f"unknown method(s): {unknown}; choose from {list(known)}")
        methods = {k: known[k] for k in args.methods}
    else:
        methods = dict(METHODS)
    for arch in args.models:
        spec = MODELS[arch]
        model, example = load(arch)
        test = (
            validation_split(spec["dataset"], args.data_dir)
            if args.split == "val"
            else load_dataset(spec["dataset"], "test", args.data_dir)
        )
        if args.subset:
            test = ArrayDataset(test.images[: args.subset], test.labels[: args.subset], test.info)
        calib = (
            calibration_images(spec["dataset"], args.calibrate, args.data_dir)
            if args.calibrate
            else None
        )
        base = evaluate(model, test, show_progress=False).accuracy
        records.append(
            {
                "model": arch,
                "method": "original",
                "accuracy": round(base, 2),
                "params": nm.count_parameters(model),
                "test_images": len(test),
                "split": args.split,
            }
        )
        ratios = args.ratios or spec["ratios"]
        criteria = args.criteria or spec["criteria"]
        for ratio in ratios:
            for criterion in criteria:
                for name, (over, data) in methods.items():
                    if data and calib is None:
                        continue
                    cfg = config_for(arch, spec["dataset"], criterion, ratio, over)
                    t0 = time.perf_counter()
                    res = nm.compress(model, example, cfg, calibration=calib if data else None)
                    seconds = time.perf_counter() - t0
                    acc = evaluate(res.model, test, show_progress=False).accuracy
                    rec = {
                        "model": arch,
                        "method": name,
                        "criterion": criterion,
                        "ratio": ratio,
                        "accuracy": round(acc, 2),
                        "params": nm.count_parameters(res.model),
                        "seconds": round(seconds, 2),
                        "calibration": len(calib) if data and calib is not None else 0,
                        "test_images": len(test),
                        "split": args.split,
                        "config": cfg.to_dict(),
                        "notes": list(res.report.notes),
                    }
                    records.append(rec)
                    print(
                        f"{arch} r={ratio} {criterion} {name}: {acc:.2f} ({seconds:.1f}s)",
                        flush=True,
                    )
                    (out / "quality.json").write_text(json.dumps(records, indent=1) + "\n")
    write_tables(records, out)
    return records


def _split_name(record: dict[str, Any]) -> str:
    """How a table names the images it was evaluated on."""
    return "validation" if record.get("split") == "val" else "test"


def write_tables(records: list[dict[str, Any]], out: Path) -> None:
    """quality.md (one table per model, split and image count) and accuracy_vs_params.png."""
    lines: list[str] = []

    def where(r: dict[str, Any]) -> tuple[str, str, int]:
        return r["model"], r.get("split", "test"), r["test_images"]

    for key in dict.fromkeys(where(r) for r in records):
        arch = key[0]
        same = [r for r in records if where(r) == key]
        rows = [r for r in same if r["method"] != "original"]
        orig = next(r for r in same if r["method"] == "original")
        cols = sorted({(r["ratio"], r["criterion"]) for r in rows})
        lines += [
            f"### {arch} (original {orig['accuracy']:.2f} %, {orig['params']:,} parameters, "
            f"{orig['test_images']} {_split_name(orig)} images)",
            "",
        ]
        head = (
            "| method | "
            + " | ".join(f"r={r} {c}" for r, c in cols)
            + " | seconds (r="
            + f"{cols[-1][0]}) |"
        )
        lines += [head, "|" + "---|" * (len(cols) + 2)]
        for method in dict.fromkeys(r["method"] for r in rows):
            cells = []
            sec = ""
            for ratio, crit in cols:
                hit = [
                    r
                    for r in rows
                    if r["method"] == method and r["ratio"] == ratio and r["criterion"] == crit
                ]
                cells.append(f"{hit[0]['accuracy']:.2f}" if hit else "")
                if hit and (ratio, crit) == cols[-1]:
                    sec = f"{hit[0]['seconds']:.1f}"
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {sec} |")
        params = sorted({(r["ratio"], r["params"]) for r in rows})
        lines += ["", "Parameters: " + ", ".join(f"r={r}: {p:,}" for r, p in params), ""]
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    archs = list(dict.fromkeys(r["model"] for r in records))
    fig, axes = plt.subplots(1, len(archs), figsize=(5 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        rows = [r for r in records if r["model"] == arch and r["method"] != "original"]
        split = rows[0].get("split", "test") if rows else "test"
        rows = [r for r in rows if r.get("split", "test") == split]
        crit = rows[0]["criterion"] if rows else None
        colours = plt.cm.tab20.colors
        for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
            pts = sorted(
                (r["params"], r["accuracy"])
                for r in rows
                if r["method"] == method and r["criterion"] == crit
            )
            ax.plot(
                [p for p, _ in pts],
                [a for _, a in pts],
                marker="o",
                label=method,
                color=colours[i % 20],
            )
        ax.set_title(f"{arch} ({crit})")
        ax.set_xlabel("parameters")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_params.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--methods", nargs="+", help="subset of method names")
    p.add_argument("--ratios", nargs="+", type=float)
    p.add_argument("--criteria", nargs="+")
    p.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="evaluate on the test set or the held-out validation split (last 5,000 train images)",
    )
    p.add_argument("--subset", type=int, default=2000, help="first N images of the split (0: all)")
    p.add_argument("--calibrate", type=int, default=500, help="unlabeled training images (0: none)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "docs" / "quality"))
    p.add_argument(
        "--combine", nargs="+", help="only write the tables of these quality.json files into --out"
    )
    args = p.parse_args(argv)
    if args.combine:
        records = [r for f in args.combine for r in json.loads(Path(f).read_text())]
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_tables(records, Path(args.out))
        return
    run(args)


if __name__ == "__main__":
    main()
