"""Discovery cost of this checkout against an earlier commit, measured in one process.

Run-to-run noise on a shared machine (±15 %) hides changes of a few per cent, so the
package as it was at ``--against`` is extracted with ``git archive``, imported under
another name, and its ``find_groups`` is timed interleaved with this checkout's and with
the forward pass, on the models of :mod:`benchmarks.bench_discovery`.

Usage::

    python -m benchmarks.ab_discovery --against REV [--rounds N]
"""

from __future__ import annotations

import argparse
import importlib
import io
import random
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import neuron_merging as nm

from . import _common as C
from .bench_discovery import _models

_BASE = "neuron_merging_base"


def _import_at(rev: str, where: Path) -> Any:
    """The ``neuron_merging`` package of commit ``rev``, imported as :data:`_BASE`."""
    archive = subprocess.run(
        ["git", "-C", str(C.ROOT), "archive", rev, "src/neuron_merging"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(where, filter="data")
    package = where / _BASE
    (where / "src" / "neuron_merging").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\bneuron_merging\b", _BASE, path.read_text()))
    sys.path.insert(0, str(where))
    return importlib.import_module(_BASE)


def _ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def run(rev: str, rounds: int) -> list[dict[str, Any]]:
    """One row per model: both discovery costs over the forward pass, and their ratio."""
    with tempfile.TemporaryDirectory() as tmp:
        base = _import_at(rev, Path(tmp))
        try:
            return [_compare(base, label, model, x, rounds) for label, model, x in _models()]
        finally:
            sys.path.remove(tmp)


def _compare(base: Any, label: str, model: Any, x: Any, rounds: int) -> dict[str, Any]:
    def forward() -> None:
        with torch.no_grad():
            model(x)

    calls: dict[str, Callable[[], Any]] = {
        "forward": forward,
        "base": lambda: base.find_groups(model, x),
        "this": lambda: nm.find_groups(model, x),
    }
    for call in calls.values():
        call()
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    # A shuffled order each round: with a fixed rotation, the call in the middle always
    # followed the same kinds of call, which biased identical code by about 2 %.
    order = random.Random(0)
    names = list(calls)
    for _ in range(rounds):
        order.shuffle(names)
        for name, call in ((n, calls[n]) for n in names):
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {
        "model": label,
        "base_ratio": _ratio(times, "base", "forward"),
        "this_ratio": _ratio(times, "this", "forward"),
        "this_over_base": _ratio(times, "this", "base"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD", help="the earlier commit (default HEAD)")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    rows = run(args.against, args.rounds)
    print(
        f"{torch.get_num_threads()} thread(s), {args.rounds} interleaved rounds, medians of "
        f"per-round ratios; base = {args.against}\n"
    )
    print("| model | base / forward | this / forward | this / base |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['base_ratio']:.2f} | {r['this_ratio']:.2f} "
            f"| **{r['this_over_base']:.3f}** |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
