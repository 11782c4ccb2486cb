"""Result tables and plots for sweeps: Markdown, CSV and an accuracy-vs-ratio figure."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._io import atomic_open
from .core.select import available_criteria

CSV_FIELDS = (
    "arch",
    "dataset",
    "mode",
    "criterion",
    "ratio",
    "threshold",
    "lam",
    "bn_rule",
    "preset",
    "accuracy",
    "correct",
    "total",
    "loss",
    "params",
    "macs",
    "merged",
)


def _ratio_label(ratio: float | None) -> str:
    return "paper cfg" if ratio is None else f"{100 * ratio:.0f}%"


def _criteria_order(records: Sequence[dict[str, Any]]) -> list[str]:
    known = available_criteria()
    found = set(r["criterion"] for r in records)
    return [c for c in known if c in found] + sorted(found - set(known))


def records_to_markdown(records: Sequence[dict[str, Any]]) -> str:
    """The paper-style table: one row per ratio, prune/merge columns per criterion."""
    originals = [r for r in records if r["mode"] == "original"]
    rest = [r for r in records if r["mode"] != "original"]
    criteria = _criteria_order(rest)
    modes = [m for m in ("prune", "merge") if any(r["mode"] == m for r in rest)]
    ratios = list(dict.fromkeys(r["ratio"] for r in rest))
    header = ["ratio", "params"] + [f"{c} {m}" for c in criteria for m in modes]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    if originals:
        o = originals[0]
        cells = ["baseline", f"{o['params']:,}"] + [
            f"{o['accuracy']:.2f}" if m == "prune" or len(modes) == 1 else "—"
            for _ in criteria
            for m in modes
        ]
        lines.append("| " + " | ".join(cells) + " |")
    index = {(r["mode"], r["criterion"], r["ratio"]): r for r in rest}
    for ratio in ratios:
        params = next((r["params"] for r in rest if r["ratio"] == ratio), None)
        cells = [_ratio_label(ratio), f"{params:,}" if params is not None else ""]
        for c in criteria:
            for m in modes:
                rec = index.get((m, c, ratio))
                cells.append(f"{rec['accuracy']:.2f}" if rec else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def records_to_csv(records: Sequence[dict[str, Any]]) -> str:
    """All records as CSV with a fixed column order."""
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for record in records:
        writer.writerow({k: record.get(k) for k in CSV_FIELDS})
    return buffer.getvalue()


def plot_accuracy(records: Sequence[dict[str, Any]], path: str | Path) -> bool:
    """Accuracy against ratio: prune dashed, merge solid, one colour per criterion.

    Returns ``False`` (and writes nothing) when matplotlib is not installed,
    since plotting is an optional extra.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rest = [r for r in records if r["mode"] != "original" and r["ratio"] is not None]
    if not rest:
        return False
    criteria = _criteria_order(rest)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, criterion in enumerate(criteria):
        for mode, style in (("prune", "--"), ("merge", "-")):
            points = sorted(
                (r["ratio"], r["accuracy"])
                for r in rest
                if r["criterion"] == criterion and r["mode"] == mode
            )
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(
                    [100 * x for x in xs],
                    ys,
                    style,
                    marker="o",
                    markersize=3,
                    color=colours[i % len(colours)],
                    label=f"{criterion} {mode}",
                )
    for original in (r for r in records if r["mode"] == "original"):
        ax.axhline(original["accuracy"], color="grey", linewidth=0.8, label="baseline")
    first = rest[0]
    ax.set_title(f"{first['arch']} on {first['dataset']}")
    ax.set_xlabel("pruning ratio (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)
    return True
