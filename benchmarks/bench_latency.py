"""Section 3: is the compressed model really faster?

Measures CPU inference latency of the original, pruned and merged models with
``torch.utils.benchmark.Timer`` at batch 1 and at a larger batch, next to the
ratio of multiply-accumulates. Pruned and merged models have the same shapes
(merging changes only values), so they should run equally fast; both are real,
physically smaller modules, not masked ones.

Usage::

    python -m benchmarks.bench_latency [--smoke] [--out DIR] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.benchmark import Timer

import neuron_merging as nm
from neuron_merging.models import create

from . import _common as C

VARIANTS = ("original", "pruned", "merged")


def _cases(smoke: bool) -> list[dict[str, Any]]:
    if smoke:
        return [
            {"label": "LeNet (tiny), r=0.5", "arch": "lenet300", "ratio": 0.5, "batch": 8,
             "cfg": [24, 12]},
            {"label": "VGG-16 (tiny), paper cfg / 8", "arch": "vgg16", "ratio": None,
             "batch": 2, "cfg": [8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 64, 64, 64, "M",
                                 64, 64, 64]},
        ]  # fmt: skip
    return [
        {"label": "LeNet-300-100, r=0.5", "arch": "lenet300", "ratio": 0.5, "batch": 256},
        {"label": "LeNet-300-100, r=0.8", "arch": "lenet300", "ratio": 0.8, "batch": 256},
        {"label": "VGG-16, paper cfg", "arch": "vgg16", "ratio": None, "batch": 32},
        {"label": "ResNet-56, r=0.5", "arch": "resnet56", "ratio": 0.5, "batch": 32},
    ]


def _variants(case: dict[str, Any]) -> dict[str, nn.Module]:
    arch = case["arch"]
    x = C.example_input(arch)
    if "cfg" in case:
        torch.manual_seed(0)
        model = C.plant_redundancy(create(arch, cfg=case["cfg"]).eval())
    else:
        model, _ = C.paper_model(arch)
    kwargs = C.paper_setting(arch, model, x, case["ratio"])
    prune_kwargs = {k: v for k, v in kwargs.items() if k not in ("threshold", "lam")}
    return {
        "original": model.eval(),
        "pruned": nm.prune(model, x, **prune_kwargs).model.eval(),
        "merged": nm.merge(model, x, **kwargs).model.eval(),
    }


def _latency(model: nn.Module, x: torch.Tensor, min_run_time: float, threads: int) -> float:
    timer = Timer(
        stmt="with torch.no_grad():\n    model(x)",
        globals={"model": model, "x": x, "torch": torch},
        num_threads=threads,
    )
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def _breakdown(
    model: nn.Module, x: torch.Tensor, threads: int, blocks: int, min_time: float
) -> dict[str, float]:
    """Seconds per forward pass inside ``Conv2d``/``Linear`` modules and outside them.

    Forward hooks read the clock around every convolution and linear layer (the
    operators that carry the MACs); *other* is the rest of the forward pass:
    batch norm, activations, pooling, residual adds, reshapes, dispatch. Medians
    over ``blocks`` blocks of forward passes lasting at least ``min_time``
    seconds each, with ``threads`` intra-op threads, after a warm-up.
    """
    inside = [0.0]
    started: list[float] = []

    def before(module: nn.Module, args: object) -> None:
        started.append(time.perf_counter())

    def after(module: nn.Module, args: object, output: object) -> None:
        inside[0] += time.perf_counter() - started.pop()

    handles = []
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    kernel, other = [], []
    try:
        with torch.no_grad():
            model(x)
            t0 = time.perf_counter()
            model(x)
            repeats = max(3, math.ceil(min_time / max(time.perf_counter() - t0, 1e-6)))
            for _ in range(blocks):
                inside[0] = 0.0
                t0 = time.perf_counter()
                for _ in range(repeats):
                    model(x)
                total = time.perf_counter() - t0
                kernel.append(inside[0] / repeats)
                other.append((total - inside[0]) / repeats)
    finally:
        torch.set_num_threads(previous)
        for handle in handles:
            handle.remove()
    return {"kernel": C.median(kernel), "other": C.median(other)}


def thread_settings() -> list[int]:
    """1 thread, and torch's current setting if that is more."""
    current = torch.get_num_threads()
    return [1] if current <= 1 else [1, current]


def run_section3(smoke: bool = False, rounds: int = 5, min_run_time: float = 0.3) -> list[dict]:
    """Latency of every variant at batch 1 and the case's large batch (medians), per thread count."""
    if smoke:
        rounds, min_run_time = 1, 0.01
    rows = []
    for case in _cases(smoke):
        models = _variants(case)
        base = C.example_input(case["arch"])
        macs = {name: C.macs(m, base) for name, m in models.items()}
        params = {name: nm.count_parameters(m) for name, m in models.items()}
        for threads, batch in [(t, b) for t in thread_settings() for b in (1, case["batch"])]:
            x = C.example_input(case["arch"], batch)
            for m in models.values():  # warm-up
                with torch.no_grad():
                    m(x)
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for rnd in range(rounds):
                order = VARIANTS[rnd % 3 :] + VARIANTS[: rnd % 3]  # rotate to cancel drift
                for name in order:
                    times[name].append(_latency(models[name], x, min_run_time, threads))
            speedup = {
                name: C.median([o / t for o, t in zip(times["original"], times[name], strict=True)])
                for name in ("pruned", "merged")
            }
            mac_ratio = macs["original"] / macs["merged"]
            large = batch == case["batch"]
            blocks, block_time = (1, 0.001) if smoke else (5, 0.1)
            breakdown = (
                {
                    name: _breakdown(models[name], x, threads, blocks, block_time)
                    for name in ("original", "merged")
                }
                if large
                else None
            )
            rows.append(
                {
                    "label": case["label"],
                    "arch": case["arch"],
                    "threads": threads,
                    "batch": batch,
                    "large_batch": large,
                    "breakdown": breakdown,
                    "breakdown_blocks": blocks,
                    "breakdown_block_s": block_time,
                    "rounds": rounds,
                    "latency": {name: C.median(t) for name, t in times.items()},
                    "macs": macs,
                    "params": params,
                    "mac_ratio": mac_ratio,
                    "speedup_pruned": speedup["pruned"],
                    "speedup_merged": speedup["merged"],
                    "efficiency": speedup["merged"] / mac_ratio,
                }
            )
    return rows


def section3_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The latency table."""
    head = [
        "model",
        "threads",
        "batch",
        "MACs / sample",
        "MAC ratio",
        "original",
        "pruned",
        "merged",
        "speed-up (pruned)",
        "speed-up (merged)",
        "speed-up / MAC ratio",
    ]
    body = []
    for r in rows:
        lat = r["latency"]
        body.append(
            [
                r["label"],
                r["threads"],
                r["batch"],
                f"{r['macs']['original'] / 1e6:.2f}M → {r['macs']['merged'] / 1e6:.2f}M",
                C.fmt_x(r["mac_ratio"]),
                f"{C.fmt_ms(lat['original'])} ms",
                f"{C.fmt_ms(lat['pruned'])} ms",
                f"{C.fmt_ms(lat['merged'])} ms",
                C.fmt_x(r["speedup_pruned"]),
                f"**{C.fmt_x(r['speedup_merged'])}**",
                f"{r['efficiency']:.2f}",
            ]
        )
    table = C.md_table(head, body)
    split_head = [
        "model",
        "threads",
        "batch",
        "conv/linear original → merged",
        "conv/linear speed-up",
        "other ops original → merged",
        "other ops share of merged",
    ]
    split_body = []
    blocks = rows[0]["breakdown_blocks"] if rows else 0
    block_s = rows[0]["breakdown_block_s"] if rows else 0.0
    for r in rows:
        if not r["breakdown"]:
            continue
        o, m = r["breakdown"]["original"], r["breakdown"]["merged"]
        split_body.append(
            [
                r["label"],
                r["threads"],
                r["batch"],
                f"{C.fmt_ms(o['kernel'])} → {C.fmt_ms(m['kernel'])} ms",
                C.fmt_x(o["kernel"] / m["kernel"]) if m["kernel"] > 0 else "—",
                f"{C.fmt_ms(o['other'])} → {C.fmt_ms(m['other'])} ms",
                f"{100 * m['other'] / max(m['kernel'] + m['other'], 1e-12):.0f} %",
            ]
        )
    return (
        table + "\n\nWhere the time goes at the larger batch (forward hooks read the clock around "
        "every `Conv2d` and `Linear` module, which carry the MACs; *other* is the rest of the "
        "forward pass: batch norm, activations, pooling, residual adds, reshapes, dispatch; "
        f"per pass, medians over {blocks} block(s) of passes of at least {block_s:g} s "
        "each):\n\n" + C.md_table(split_head, split_body)
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run section 3; write ``bench_latency.json`` to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    parser.add_argument("--out", type=Path, default=C.ROOT / "build" / "bench")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("section 3: latency", file=sys.stderr, flush=True)
    rows = run_section3(args.smoke, args.rounds, args.min_run_time)
    for r in rows:
        print(
            f"  {r['label']} b={r['batch']} threads={r['threads']}: "
            f"{C.fmt_x(r['speedup_merged'])} "
            f"(MAC ratio {C.fmt_x(r['mac_ratio'])})",
            file=sys.stderr,
            flush=True,
        )
    results = {"machine": C.machine_info(), "smoke": args.smoke, "section3": rows}
    from neuron_merging._io import atomic_write_text

    atomic_write_text(args.out / "bench_latency.json", json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
