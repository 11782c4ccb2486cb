"""Merge cost: against a literal reference (section 1) and on wide layers (section 2).

Section 1 times the whole ``nm.merge`` call on the paper's models next to
:func:`benchmarks.reference.reference_merge`, interleaved in the same process,
and checks that both produce the same plan. Section 2 times single wide MLP
groups against the bare ``torch.mm`` of the similarity product and measures
peak memory, one fresh subprocess per case.

Usage::

    python -m benchmarks.bench_merge [--smoke] [--out DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import neuron_merging as nm
from neuron_merging.models import create

from . import _common as C
from .reference import compare_plans, reference_merge

#: Published run times of the authors' released implementation on this machine class.
AUTHORS_SECONDS = {
    ("vgg16", "merge"): 3.3,
    ("vgg16", "prune"): 1.3,
    ("resnet56", "merge"): 0.18,
    ("lenet300", "merge"): 0.017,
}
TIMING_KEYS = ("trace", "select", "similarity", "assign", "fold", "rebuild")
CRITERIA = ("l1-norm", "l2-norm", "l2-GM")


# =========================================================================== section 1


def _section1_cases(smoke: bool) -> list[dict[str, Any]]:
    if not smoke:
        return [
            {"label": "LeNet-300-100, r=0.5", "arch": "lenet300", "ratio": 0.5},
            {"label": "VGG-16, paper cfg", "arch": "vgg16", "ratio": None},
            {"label": "ResNet-56, r=0.5", "arch": "resnet56", "ratio": 0.5},
        ]
    return [
        {"label": "LeNet (tiny), r=0.5", "arch": "lenet300", "ratio": 0.5, "cfg": [24, 12]},
        {
            "label": "VGG-16 (tiny), half widths",
            "arch": "vgg16",
            "ratio": None,
            "cfg": [8, 8, "M", 8, 8, "M", 16, 16, 16, "M", 16, 16, 16, "M", 16, 16, 16],
        },
        {"label": "ResNet-56 (tiny), r=0.5", "arch": "resnet56", "ratio": 0.5, "cfg": [4, 8, 8]},
    ]


def _build(case: dict[str, Any]) -> tuple[nn.Module, str, torch.Tensor, dict[str, Any]]:
    arch = case["arch"]
    x = C.example_input(arch)
    if "cfg" in case:  # smoke: a tiny random model of the same family
        torch.manual_seed(0)
        model = C.plant_redundancy(create(arch, cfg=case["cfg"]).eval())
        weights = "random init with planted redundancy"
    else:
        model, weights = C.paper_model(arch)
    return model, weights, x, C.paper_setting(arch, model, x, case["ratio"])


def _prune_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in kwargs.items()
        if k in ("ratio", "criterion", "rounding", "keep", "exclude")
    }


def _trace_vs_forward(model: nn.Module, x: torch.Tensor, rounds: int) -> tuple[float, float, float]:
    """Median forward pass at batch 1, median ``nm.find_groups``, median of their ratios.

    Both are timed the same way, interleaved (alternating which goes first),
    after the same warm-up, so neither side is measured with colder caches.
    """

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def discover() -> None:
        nm.find_groups(model, x)

    for _ in range(3):
        forward()
        discover()
    timed = C.side_by_side(forward, discover, rounds)
    return C.median(timed.first), C.median(timed.second), C.median(timed.ratios)


def _product_flop(model: nn.Module, plans: Sequence[Any]) -> int:
    """Multiply-adds ×2 of the similarity products: ``p × k`` dot products of weight rows."""
    modules = dict(model.named_modules())
    total = 0
    for plan in plans:
        width = 0
        for name in plan.group.producers:
            weight = modules[name].weight
            width += weight.numel() // max(weight.shape[0], 1)
        total += 2 * plan.pruned.numel() * plan.kept.numel() * width
    return total


def run_section1(smoke: bool = False, repeats: int = 9) -> list[dict[str, Any]]:
    """Time ``nm.merge``/``nm.prune`` against the literal reference, side by side."""
    rows = []
    for case in _section1_cases(smoke):
        model, weights, x, kwargs = _build(case)
        groups, _ = nm.find_groups(model, x)
        trace_rounds = 3 if smoke else 40
        fwd, discovery, trace_ratio = _trace_vs_forward(model, x, trace_rounds)
        modes = ["merge", "prune"] if case["arch"] == "vgg16" else ["merge"]
        for mode in modes:
            nm_kwargs = kwargs if mode == "merge" else _prune_kwargs(kwargs)
            verb = nm.merge if mode == "merge" else nm.prune

            def ours(verb=verb, nm_kwargs=nm_kwargs, model=model, x=x) -> nm.MergeResult:
                return verb(model, x, **nm_kwargs)

            def ref(mode=mode, model=model, groups=groups, kwargs=kwargs) -> Any:
                return reference_merge(model, groups, mode=mode, **kwargs)

            ours()  # warm-up, untimed
            ref()
            splits: list[dict[str, float]] = []
            timed = C.side_by_side(
                ref,
                ours,
                1 if smoke else repeats,
                lambda _, ours_result, out=splits: out.append(ours_result.report.timings),
            )
            t_ref, t_ours = timed.first, timed.second
            ratios = [tr / to for tr, to in zip(t_ref, t_ours, strict=True)]
            trace = [s["trace"] for s in splits]
            ref_model, ref_plans = timed.first_result
            result = timed.second_result
            problems = compare_plans(result.plans, ref_plans)
            with torch.no_grad():
                xb = C.example_input(case["arch"], batch=4)
                ours_out = result.model(xb)
                out_diff = float((ours_out - ref_model(xb)).abs().max() / ours_out.abs().max())
            rows.append(
                {
                    "label": case["label"],
                    "arch": case["arch"],
                    "mode": mode,
                    "weights": weights,
                    "params_before": result.report.params_before,
                    "params_after": result.report.params_after,
                    "merged": sum(p.merged for p in result.plans),
                    "pruned": sum(p.pruned.numel() for p in result.plans),
                    "groups": len(result.plans),
                    "pairs": sum(p.pruned.numel() * p.kept.numel() for p in result.plans),
                    "product_flop": _product_flop(model, result.plans),
                    "repeats": len(t_ours),
                    "t_ours": C.median(t_ours),
                    "t_ref": C.median(t_ref),
                    "speedup": C.median(ratios),
                    "split": {k: C.median([s[k] for s in splits]) for k in TIMING_KEYS},
                    "trace": C.median(trace),
                    "forward_b1": fwd,
                    "discovery_b1": discovery,
                    "trace_rounds": trace_rounds,
                    "trace_over_forward": trace_ratio,
                    "authors_s": None if smoke else AUTHORS_SECONDS.get((case["arch"], mode)),
                    "plans_equal": not problems,
                    "problems": problems,
                    "output_rel_diff": out_diff,
                }
            )
    return rows


# =========================================================================== section 2


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, if allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mlp(width: int, n: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(width, n), nn.ReLU(), nn.Linear(n, width)).eval()
    return C.plant_redundancy(model, seed)


def _module_mb(model: nn.Module) -> float:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def run_mlp_case(
    width: int, n: int, ratio: float, criterion: str, repeats: int, gm_floor: bool
) -> dict[str, Any]:
    """One wide MLP group ``width → n → width``: time, floor and peak memory."""
    # warm up the allocator, BLAS and the thread pool outside the measurement
    nm.merge(_mlp(64, 64), torch.randn(1, 64), ratio=ratio, criterion=criterion)
    torch.mm(torch.randn(64, 64), torch.randn(64, 64))
    model = _mlp(width, n)
    x = torch.randn(1, width)
    kwargs = {"ratio": ratio, "criterion": criterion, "threshold": 0.1}
    gc.collect()
    base = _rss_mb()
    exact_peak = _reset_peak()
    result = nm.merge(model, x, **kwargs)
    peak = _peak_mb()
    out_mb = _module_mb(result.model)
    k = result.plans[0].kept.numel()
    p = n - k
    merged = result.plans[0].merged
    del result
    gc.collect()

    f = width + 1  # rows are [w | b]
    operands = [torch.randn(p, f), torch.randn(f, k)]

    def bare_mm() -> None:
        torch.mm(*operands)

    def merge() -> dict[str, float]:
        return nm.merge(model, x, **kwargs).report.timings

    bare_mm()
    splits: list[dict[str, float]] = []
    timed = C.side_by_side(bare_mm, merge, repeats, lambda _, timings: splits.append(timings))
    t_mm, t_merge, ratios = timed.first, timed.second, timed.ratios
    operands.clear()
    t_gm = None
    if criterion == "l2-GM" and gm_floor:
        rows64 = torch.randn(n, f, dtype=torch.float64)
        t_gm = C.median([C.timed(lambda: rows64 @ rows64.T)[0] for _ in range(max(1, repeats))])
        del rows64
    return {
        "width": width,
        "n": n,
        "ratio": ratio,
        "criterion": criterion,
        "kept": k,
        "pruned": p,
        "merged": merged,
        "repeats": repeats,
        "t_merge": C.median(t_merge),
        "t_mm": C.median(t_mm),
        "merge_over_mm": C.median(ratios),
        "t_gm_mm": t_gm,
        "split": {key: C.median([s[key] for s in splits]) for key in TIMING_KEYS},
        "rss_before_mb": base,
        "peak_delta_mb": peak - base,
        "output_mb": out_mb,
        "extra_mb": peak - base - out_mb,
        "peak_method": "VmHWM reset via /proc/self/clear_refs"
        if exact_peak
        else "ru_maxrss (process lifetime peak)",
        "model_mb": _module_mb(model),
    }


def _section2_cases(smoke: bool, max_n: int, gm_max_n: int) -> list[dict[str, Any]]:
    """Repeats shrink with n so that the whole section fits in about ten minutes."""
    if smoke:
        width, sizes = 64, (32, 64)
    else:
        width, sizes = 4096, tuple(s for s in (1024, 4096, 16384) if s <= max_n)
    cases = []
    for n in sizes:
        for ratio in (0.5, 0.8):
            for criterion in CRITERIA:
                gm = criterion == "l2-GM"
                if gm and n > gm_max_n:
                    continue
                if smoke:
                    repeats = 1
                elif n > 4096:  # l2 costs exactly what l1 costs; GM takes minutes
                    repeats = 2 if criterion == "l1-norm" else 1
                else:
                    repeats = 2 if gm and n == 4096 else 3
                cases.append(
                    {
                        "width": width,
                        "n": n,
                        "ratio": ratio,
                        "criterion": criterion,
                        "repeats": repeats,
                        "gm_floor": gm and n <= 4096,
                    }
                )
    return cases


def run_section2(
    smoke: bool = False,
    max_n: int = 16384,
    gm_max_n: int = 16384,
    log: Any = None,
) -> list[dict[str, Any]]:
    """Every wide-MLP case, each in a fresh subprocess (so peak memory is its own)."""
    cases = _section2_cases(smoke, max_n, gm_max_n)
    batches = [cases] if smoke else [[c] for c in cases]  # smoke: one process for all
    rows: list[dict[str, Any]] = []
    for batch in batches:
        cmd = [sys.executable, "-m", "benchmarks.bench_merge", "--worker", json.dumps(batch)]
        cmd += ["--threads", str(torch.get_num_threads())]
        # A fixed mmap threshold stops glibc from raising it dynamically and keeping
        # freed blocks in the heap, so RSS follows live memory and the peak is honest.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}
        proc = subprocess.run(cmd, cwd=C.ROOT, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed for {batch}:\n{proc.stderr[-4000:]}")
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
                if log:
                    r = rows[-1]
                    log(
                        f"  n={r['n']} r={r['ratio']} {r['criterion']}: merge "
                        f"{C.fmt_ms(r['t_merge'])} ms, mm {C.fmt_ms(r['t_mm'])} ms, "
                        f"peak +{r['peak_delta_mb']:.0f} MB"
                    )
    return rows


def _worker(spec: str) -> None:
    for case in json.loads(spec):
        row = run_mlp_case(
            case["width"],
            case["n"],
            case["ratio"],
            case["criterion"],
            case["repeats"],
            case["gm_floor"],
        )
        print(json.dumps(row), flush=True)


# =========================================================================== rendering


def section1_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The tables of section 1."""
    head = [
        "model",
        "verb",
        "weights",
        "params",
        "merged/pruned",
        "reference",
        "nm",
        "speed-up",
        "authors' code",
        "plans equal",
        "Δ output (rel.)",
    ]
    body = []
    for r in rows:
        authors = f"{r['authors_s'] * 1e3:.0f} ms" if r["authors_s"] else "—"
        body.append(
            [
                r["label"],
                r["mode"],
                r["weights"],
                f"{r['params_before']:,} → {r['params_after']:,}",
                f"{r['merged']}/{r['pruned']}",
                f"{C.fmt_ms(r['t_ref'])} ms",
                f"{C.fmt_ms(r['t_ours'])} ms",
                f"**{C.fmt_x(r['speedup'])}**",
                authors,
                "yes" if r["plans_equal"] else "NO: " + "; ".join(r["problems"]),
                f"{r['output_rel_diff']:.0e}",
            ]
        )
    split_head = ["model", "verb", *TIMING_KEYS, "total"]
    split_body = [
        [
            r["label"],
            r["mode"],
            *[C.fmt_ms(r["split"][k]) for k in TIMING_KEYS],
            C.fmt_ms(r["t_ours"]),
        ]
        for r in rows
    ]
    trace_head = ["model", "forward pass, batch 1", "nm.find_groups", "discovery / forward"]
    trace_body = [
        [
            r["label"],
            f"{C.fmt_ms(r['forward_b1'])} ms",
            f"{C.fmt_ms(r['discovery_b1'])} ms",
            f"**{r['trace_over_forward']:.2f}**",
        ]
        for r in rows
        if r["mode"] == "merge"
    ]
    return (
        C.md_table(head, body)
        + "\n\nSplit of the `nm.merge` call (medians, ms); *total* is the whole call, "
        "the phases are `report.timings`:\n\n"
        + C.md_table(split_head, split_body)
        + f"\n\nDiscovery against a forward pass (medians over {rows[0]['trace_rounds']} "
        "interleaved rounds; the ratio is the median of the per-round ratios):\n\n"
        + C.md_table(trace_head, trace_body)
    )


def _mb(value: float) -> str:
    text = f"{value:.0f}"
    return "0" if text == "-0" else text


def section2_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The tables of section 2 (norm criteria, then l2-GM)."""
    norm = [r for r in rows if r["criterion"] != "l2-GM"]
    gm = [r for r in rows if r["criterion"] == "l2-GM"]
    head = [
        "n",
        "ratio",
        "criterion",
        "p × k × f",
        "nm.merge",
        "torch.mm",
        "merge / mm",
        "similarity",
        "select",
        "fold",
        "rebuild",
        "peak +MB",
        "output MB",
        "extra MB",
    ]

    def line(r: dict[str, Any]) -> list[Any]:
        return [
            r["n"],
            r["ratio"],
            r["criterion"],
            f"{r['pruned']}×{r['kept']}×{r['width'] + 1}",
            f"{C.fmt_ms(r['t_merge'])} ms",
            f"{C.fmt_ms(r['t_mm'])} ms",
            f"**{r['merge_over_mm']:.2f}**",
            C.fmt_ms(r["split"]["similarity"]),
            C.fmt_ms(r["split"]["select"]),
            C.fmt_ms(r["split"]["fold"]),
            C.fmt_ms(r["split"]["rebuild"]),
            _mb(r["peak_delta_mb"]),
            _mb(r["output_mb"]),
            _mb(r["extra_mb"]),
        ]

    out = C.md_table(head, [line(r) for r in norm])
    if gm:
        gm_head = [
            "n",
            "ratio",
            "nm.merge",
            "select (GM)",
            "similarity mm",
            "n×n float64 mm",
            "merge / (both mm)",
            "peak +MB",
            "extra MB",
        ]
        gm_body = []
        for r in gm:
            floor = r["t_mm"] + (r["t_gm_mm"] or float("nan"))
            gm_body.append(
                [
                    r["n"],
                    r["ratio"],
                    f"{C.fmt_ms(r['t_merge'])} ms",
                    f"{C.fmt_ms(r['split']['select'])} ms",
                    f"{C.fmt_ms(r['t_mm'])} ms",
                    f"{C.fmt_ms(r['t_gm_mm'])} ms" if r["t_gm_mm"] else "not run",
                    C.fmt_x(r["t_merge"] / floor) if r["t_gm_mm"] else "—",
                    _mb(r["peak_delta_mb"]),
                    _mb(r["extra_mb"]),
                ]
            )
        out += "\n\n**l2-GM** (an n × n distance computation in float64, chunked):\n\n"
        out += C.md_table(gm_head, gm_body)
    return out


def scaling_plot(rows: Sequence[dict[str, Any]]) -> bytes:
    """Log-log plot of merge time against n (PNG bytes)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    styles = {"l1-norm": "o-", "l2-norm": "s-", "l2-GM": "^-"}
    for ratio, color in ((0.5, "tab:blue"), (0.8, "tab:orange")):
        for criterion, style in styles.items():
            pts = sorted(
                (r["n"], r["t_merge"])
                for r in rows
                if r["ratio"] == ratio and r["criterion"] == criterion
            )
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    style,
                    color=color,
                    alpha=0.8,
                    label=f"nm.merge {criterion}, r={ratio}",
                )
        by_n: dict[int, list[float]] = {}
        for r in rows:
            if r["ratio"] == ratio:
                by_n.setdefault(r["n"], []).append(r["t_mm"])
        floor = sorted((n, C.median(ts)) for n, ts in by_n.items())
        if floor:
            ax.plot(
                *zip(*floor, strict=True),
                "k--" if ratio == 0.5 else "k:",
                label=f"bare torch.mm p×f·f×k, r={ratio}",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("neurons n in the group (4096 → n → 4096)")
    ax.set_ylabel("seconds (median)")
    ax.set_title("Merge time of one wide MLP group")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# =========================================================================== main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run sections 1 and 2; write ``bench_merge.json`` (and the plot) to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--out", type=Path, default=C.ROOT / "build" / "bench")
    parser.add_argument("--repeats", type=int, default=9, help="section 1 repeats")
    parser.add_argument("--max-n", type=int, default=16384, help="largest n in section 2")
    parser.add_argument("--gm-max-n", type=int, default=16384, help="largest n for l2-GM")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        _worker(args.worker)
        return {}

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log("section 1: merge cost against the literal reference")
    s1 = run_section1(args.smoke, args.repeats)
    for r in s1:
        log(
            f"  {r['label']} {r['mode']}: ref {C.fmt_ms(r['t_ref'])} ms, nm "
            f"{C.fmt_ms(r['t_ours'])} ms, {C.fmt_x(r['speedup'])}, equal={r['plans_equal']}"
        )
    log("section 2: wide MLP groups")
    s2 = run_section2(args.smoke, args.max_n, args.gm_max_n, log)
    results = {"machine": C.machine_info(), "smoke": args.smoke, "section1": s1, "section2": s2}
    from neuron_merging._io import atomic_write_bytes, atomic_write_text

    atomic_write_text(args.out / "bench_merge.json", json.dumps(results, indent=1))
    atomic_write_bytes(args.out / "merge_scaling.png", scaling_plot(s2))
    return results


if __name__ == "__main__":
    main()
