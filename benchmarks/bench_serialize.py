"""Save/load sizes and times: :func:`neuron_merging.save` / :func:`neuron_merging.load` vs ``torch.save``.

Usage::

    python -m benchmarks.bench_serialize [--smoke] [--repeats N] [--out FILE.md]

For each compressed model (the paper's networks at their presets, and an OPT
decoder built from a config with its ``fc1 → fc2`` FFNs merged through explicit
groups) it measures, as medians over ``--repeats`` runs:

* ``torch.save(model)``: the whole pickled module, and ``torch.load`` of it
  (``weights_only=False``: it unpickles code references, which is what the
  pickle-free format avoids);
* ``nm.save`` with safetensors weights, and with the ``torch`` weights-only
  fallback; ``nm.load`` into a fresh instance (its construction is timed
  separately, since ``torch.load`` of a whole module needs none), and the
  two together for an instance built on the meta device (no initialisation).

Sizes are bytes on disk (the manifest included for ``nm.save``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import neuron_merging as nm
from neuron_merging import models
from neuron_merging.experiments import compression_config, example_input

from . import _common as C


def _opt(hidden: int, layers: int, ffn: int, vocab: int) -> Callable[[], nn.Module]:
    import transformers

    config = transformers.OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        word_embed_proj_dim=hidden,
        num_hidden_layers=layers,
        ffn_dim=ffn,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=128,
    )
    return lambda: transformers.OPTForCausalLM(config).eval()


def _ffn_groups(model: nn.Module) -> list[nm.MergeGroup]:
    names = dict(model.named_modules())
    return [
        nm.MergeGroup(producer=name, consumer=name[:-3] + "fc2")
        for name in names
        if name.endswith(".fc1") and name[:-3] + "fc2" in names
    ]


def cases(smoke: bool) -> list[tuple[str, Callable[[], nn.Module], Callable[[nn.Module], Any]]]:
    """(label, fresh-model factory, compress function) of every benchmarked model."""
    out: list[tuple[str, Callable[[], nn.Module], Callable[[nn.Module], Any]]] = []
    paper = [("lenet300", "fashion-mnist", 0.5), ("resnet56", "cifar10", 0.5)]
    if not smoke:
        paper += [("vgg16", "cifar10", None), ("wrn40_4", "cifar10", 0.5)]
    for arch, dataset, ratio in paper:

        def compress(model: nn.Module, arch: str = arch, ds: str = dataset, r: Any = ratio) -> Any:
            config = compression_config(arch, ds, "merge", "l1-norm", r, model=model)
            return nm.compress(model, example_input(arch), config)

        label = f"{arch} (paper preset)" if ratio is None else f"{arch} r={ratio}"
        out.append((label, lambda arch=arch: models.create(arch).eval(), compress))
    try:
        import transformers  # noqa: F401
    except ImportError:
        return out
    size = (64, 2, 256, 512) if smoke else (512, 6, 2048, 16384)
    factory = _opt(*size)

    def merge_opt(model: nn.Module) -> Any:
        return nm.merge(model, groups=_ffn_groups(model), ratio=0.5, threshold=None)

    out.append((f"OPT h={size[0]} L={size[1]} ffn={size[2]}→{size[2] // 2}", factory, merge_opt))
    return out


def _bytes(path: Path) -> int:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


KEYS = {"safetensors": "st", "torch": "pt"}


def measure(
    label: str,
    factory: Callable[[], nn.Module],
    compress: Callable[[nn.Module], Any],
    repeats: int,
    work: Path,
) -> dict[str, Any]:
    """One row: sizes and median times of every way of saving and loading ``label``."""
    torch.manual_seed(0)
    result = compress(factory())
    model = result.model
    whole = work / "whole.pt"
    row: dict[str, Any] = {"model": label, "params": nm.count_parameters(model)}
    row["pickle_save_s"] = C.repeat_median(lambda: torch.save(model, whole), repeats)
    row["pickle_bytes"] = _bytes(whole)
    row["pickle_load_s"] = C.repeat_median(lambda: torch.load(whole, weights_only=False), repeats)
    reference = model.state_dict()
    for fmt, key in KEYS.items():
        folder = work / fmt
        row[f"{key}_save_s"] = C.repeat_median(
            lambda folder=folder, fmt=fmt: nm.save(result, folder, weights_format=fmt), repeats
        )
        row[f"{key}_bytes"] = _bytes(folder)
        row["manifest_bytes"] = (folder / "manifest.json").stat().st_size
        construct, load = [], []
        for _ in range(repeats + 1):  # the first round warms up
            t_fresh, fresh = C.timed(factory)
            t_load, loaded = C.timed(lambda fresh=fresh, folder=folder: nm.load(fresh, folder))
            construct.append(t_fresh)
            load.append(t_load)
        row["construct_s"] = C.median(construct[1:])
        row[f"{key}_load_s"] = C.median(load[1:])
        state = loaded.state_dict()
        row[f"{key}_identical"] = state.keys() == reference.keys() and all(
            torch.equal(state[k], v) for k, v in reference.items()
        )
    construct, load = [], []
    for _ in range(repeats + 1):  # a fresh instance on the meta device: nothing initialised
        with torch.device("meta"):
            t_fresh, fresh = C.timed(factory)
        t_load, loaded = C.timed(lambda fresh=fresh: nm.load(fresh, work / "safetensors"))
        construct.append(t_fresh)
        load.append(t_load)
    row["meta_construct_s"] = C.median(construct[1:])
    row["meta_load_s"] = C.median(load[1:])
    state = loaded.state_dict()
    row["meta_identical"] = all(torch.equal(state[k], v) for k, v in reference.items())
    return row


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table of :func:`run`'s rows."""

    def mb(n: int) -> str:
        return f"{n / 1e6:.2f}"

    body = [
        [
            r["model"],
            f"{r['params']:,}",
            mb(r["pickle_bytes"]),
            mb(r["st_bytes"]),
            mb(r["pt_bytes"]),
            f"{r['manifest_bytes'] / 1e3:.1f}",
            C.fmt_ms(r["pickle_save_s"]),
            C.fmt_ms(r["st_save_s"]),
            C.fmt_ms(r["pt_save_s"]),
            C.fmt_ms(r["pickle_load_s"]),
            C.fmt_ms(r["st_load_s"]),
            C.fmt_ms(r["pt_load_s"]),
            C.fmt_ms(r["construct_s"]),
            C.fmt_ms(r["meta_construct_s"] + r["meta_load_s"]),
            "yes" if r["st_identical"] and r["pt_identical"] and r["meta_identical"] else "**no**",
        ]
        for r in rows
    ]
    headers = ["model", "params", "torch.save(model) MB", "nm.save st MB", "nm.save pt MB"]
    headers += ["manifest kB", "torch.save ms", "nm.save st ms", "nm.save pt ms"]
    headers += ["torch.load ms", "nm.load st ms", "nm.load pt ms", "fresh instance ms"]
    headers += ["meta instance + nm.load st ms"]
    headers += ["reload identical"]
    return C.md_table(headers, body)


def run(smoke: bool, repeats: int) -> list[dict[str, Any]]:
    """Measure every case of :func:`cases`."""
    rows = []
    work = Path(tempfile.mkdtemp(prefix="nm-bench-serialize."))
    try:
        for label, factory, compress in cases(smoke):
            rows.append(measure(label, factory, compress, repeats, work))
            print(f"  {label}: done", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small models, one repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="also write the Markdown table (and .json) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args.smoke, 1 if args.smoke else args.repeats)
    text = table(rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
