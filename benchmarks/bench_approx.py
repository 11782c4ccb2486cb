"""Approximate merging vs pruning on random Gaussian inputs, per activation.

Usage::

    python -m benchmarks.bench_approx [--seeds N] [--samples N] [--out FILE.md]

For random producers (48 neurons, 16 inputs, weights ``N(0, 4/16)``, biases
``N(0, 0.25)``; SwiGLU/GeGLU with random up projections), half the neurons are
pruned by l2 norm and each rule's error is measured by Monte Carlo on
``x ~ N(0, I)``: the expected squared error of the pruned neurons'
contributions, summed (the output error averaged over random consumers),
relative to pruning's. Columns: the least-squares merge of
:mod:`neuron_merging.core.approx` without and with the bias offset, what its
Gaussian model predicts, and the paper's ``‖w_n‖/‖w_m‖`` on the cosine partner.
Means over ``--seeds`` layers.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from neuron_merging.core.approx import (
    ACTIVATIONS,
    ApproxAssignment,
    activation_fn,
    assign_approx,
    norm_ratio_scale,
)

from . import _common as C


def _layer(act: str, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    n, d = 48, 16
    w = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 / math.sqrt(d)
    b = torch.randn(n, generator=g, dtype=torch.float64) * 0.5
    u = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 / math.sqrt(d)
    kept = w.norm(dim=1).argsort(descending=True)[: n // 2].sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    return w, b, (u if act in ("swiglu", "geglu") else None), kept, mask.nonzero().squeeze(1), g


def _error(act: str, w, b, u, kept, pruned, rule: ApproxAssignment, x: torch.Tensor) -> float:
    a = activation_fn(act)(x @ w.T + b)
    if u is not None:
        a = a * (x @ u.T)
    a_n = a[:, pruned]
    ok = rule.partner >= 0
    approx = torch.zeros_like(a_n)
    approx[:, ok] = a[:, kept[rule.partner[ok]]] * rule.scale[ok] + rule.offset[ok]
    return float(((a_n - approx) ** 2).sum(1).mean())


def run(seeds: int, samples: int) -> list[dict[str, float | str]]:
    """One row per activation: errors relative to pruning, means over ``seeds`` layers."""
    rows = []
    for act in ACTIVATIONS:
        totals = {"merge": 0.0, "merge+offset": 0.0, "predicted": 0.0, "norm-ratio": 0.0}
        for seed in range(seeds):
            w, b, u, kept, pruned, g = _layer(act, seed)
            x = torch.randn(samples, w.shape[1], generator=g, dtype=torch.float64)
            p = pruned.numel()
            none = ApproxAssignment(
                torch.full((p,), -1), torch.zeros(p), torch.zeros(p), offset=torch.zeros(p)
            )
            prune = _error(act, w, b, u, kept, pruned, none, x)
            plain = assign_approx(w, b, kept, pruned, act, up_rows=u)
            shifted = assign_approx(w, b, kept, pruned, act, up_rows=u, offset=True)
            cosine = assign_approx(w, b, kept, pruned, act, up_rows=u, candidates=1)
            paper = ApproxAssignment(
                cosine.partner,
                norm_ratio_scale(w, kept, pruned, cosine.partner),
                cosine.similarity,
                offset=torch.zeros(p, dtype=torch.float64),
            )
            totals["merge"] += _error(act, w, b, u, kept, pruned, plain, x) / prune
            totals["merge+offset"] += _error(act, w, b, u, kept, pruned, shifted, x) / prune
            totals["predicted"] += float(shifted.merge_error.sum() / shifted.prune_error.sum())
            totals["norm-ratio"] += _error(act, w, b, u, kept, pruned, paper, x) / prune
        rows.append({"activation": act, **{k: v / seeds for k, v in totals.items()}})
    return rows


def table(rows: Sequence[dict[str, float | str]]) -> str:
    """Markdown: error relative to pruning (1.00) per activation and rule."""
    return C.md_table(
        [
            "activation",
            "prune",
            "LS merge",
            "LS merge + offset",
            "model's prediction (+ offset)",
            "‖w_n‖/‖w_m‖ (paper)",
        ],
        [
            [
                r["activation"],
                "1.00",
                f"{r['merge']:.3f}",
                f"{r['merge+offset']:.3f}",
                f"{r['predicted']:.3f}",
                f"{r['norm-ratio']:.3f}",
            ]
            for r in rows
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--out", help="also write the Markdown table here")
    args = parser.parse_args(argv)
    text = table(run(args.seeds, args.samples))
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
