"""Print the architecture table of issue 9's closing note: ``python tests/zoo_table.py``.

For every zoo model (and the ``transformers`` models): groups found with ``coupled``
off / on (how many merged, how many only pruned), parameters before → after at
ratio 0.5 (``nm.merge`` defaults) with ``coupled`` off and on, and the relative output
error of prune and of merge on planted duplicates (``coupled=True``, ``bn_rule="exact"``,
duplicates planted in every mergeable group, everything else kept). ``|prune−mask|``
is the largest difference between ``nm.prune`` and the masking oracle (should be ~0).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import neuron_merging as nm
from _zoo import HF_ZOO, ZOO, keep_first, masked_copy, planted, rel_error, run


def _groups(model, x, coupled: bool) -> str:
    groups, _ = nm.find_groups(model, x, coupled=coupled)
    merged = sum(g.mergeable for g in groups)
    return f"{len(groups)} ({merged}m/{len(groups) - merged}p)"


def _params(model, x, coupled: bool) -> str:
    try:
        result = nm.merge(model, x, ratio=0.5, coupled=coupled)
    except nm.NeuronMergingError as exc:
        return f"error: {exc}"[:30]
    return f"{result.report.params_after:,}"


def _planted_errors(model, x) -> tuple[str, str]:
    twin, keep, _ = planted(model, x, coupled=True)
    if not keep:
        return "—", "—"
    ref = run(twin, x)
    kwargs = {"ratio": 0.0, "keep": keep, "criterion": keep_first, "coupled": True}
    pruned = nm.prune(twin, x, **kwargs)
    merged = nm.merge(twin, x, threshold=None, bn_rule="exact", **kwargs)
    return (
        f"{rel_error(run(pruned.model, x), ref):.2e}",
        f"{rel_error(run(merged.model, x), ref):.1e}",
    )


def _mask_error(model, x) -> str:
    try:
        result = nm.prune(model, x, ratio=0.5, coupled=True)
        out = run(result.model, x)
    except Exception as exc:  # an engine bug shows in the table instead of stopping it
        return f"{type(exc).__name__}"
    return f"{float((out - run(masked_copy(model, result.plans), x)).abs().max()):.0e}"


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    header = (
        "model",
        "groups (off)",
        "groups (coupled)",
        "params",
        "r=0.5 off",
        "r=0.5 coupled",
        "prune err",
        "merge err",
        "|prune-mask|",
    )
    rows = [header]
    registry = dict(ZOO)
    try:
        import transformers  # noqa: F401

        registry.update(HF_ZOO)
    except ImportError:  # pragma: no cover
        pass
    for name, (factory, x) in registry.items():
        model = factory()
        errors = _planted_errors(model, x)
        rows.append(
            (
                name,
                _groups(model, x, False),
                _groups(model, x, True),
                f"{nm.count_parameters(model):,}",
                _params(model, x, False),
                _params(model, x, True),
                *errors,
                _mask_error(model, x),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print(
        "\ngroups: total (m = merged, p = pruned only); params after nm.merge(ratio=0.5);"
        "\nprune/merge err: max relative output error on planted duplicates (coupled=True)."
    )


if __name__ == "__main__":
    main()
