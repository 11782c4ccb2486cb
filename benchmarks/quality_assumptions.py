"""How far the Gaussian model of the data-free methods holds, measured on real images.

For every block-internal ``bn1`` of ResNet-56 (or any BN producer of a model),
compares on ``N`` unlabeled training images:

* the channel correlations of the BN outputs with the two data-free estimates
  (``whitened``: signed filter cosines; ``propagated``: noise images with every
  BN renormalising): mean absolute error over the off-diagonal entries;
* the expected ReLU output ``E[relu(z)]`` of the Gaussian model
  ``z ~ N(β, γ²)`` with the measured mean: median relative error;
* the measured per-channel mean and standard deviation of ``z`` against ``β``
  and ``|γ|`` (what the model assumes the data give).

Usage: ``python -m benchmarks.quality_assumptions [--images 500]``.
"""

from __future__ import annotations

import argparse

import torch

from neuron_merging.checkpoint import load_model
from neuron_merging.core import lstsq
from neuron_merging.core.compensate import propagated_correlations
from neuron_merging.core.moments import relu_mean
from neuron_merging.experiments import calibration_images, example_input

from ._common import ROOT
from .quality import _checkpoint


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    args = p.parse_args(argv)
    model, _ = load_model(_checkpoint("resnet56"), arch="resnet56")
    model.eval()
    images = calibration_images("cifar10", args.images, args.data_dir)
    names = [n for n, _m in model.named_modules() if n.endswith(".bn1")]
    mods = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        mods[n].register_forward_hook(
            lambda _m, _a, y, n=n: seen.__setitem__(n, y.detach().clone())
        )
        for n in names
    ]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    prop = propagated_correlations(model, example_input("resnet56"), names)
    rows = []
    for n in names:
        z = seen[n].transpose(0, 1).reshape(seen[n].shape[1], -1).double()
        live = z.std(1) > 1e-6  # channels that are constant on the data have no correlation
        z = z[live]
        c = torch.corrcoef(z)
        off = ~torch.eye(c.shape[0], dtype=torch.bool)
        bn = mods[n]
        conv = mods[n.replace("bn1", "conv1")]
        w = conv.weight.detach().reshape(live.numel(), -1)
        white = lstsq.whitened_correlation(w, bn.weight.detach())[live][:, live]
        e_white = float((white - c)[off].abs().mean())
        e_prop = float((prop[n][live][:, live] - c)[off].abs().mean())
        beta, gamma = bn.bias.detach().double()[live], bn.weight.detach().double().abs()[live]
        mean_err = float((z.mean(1) - beta).abs().median())
        std_ratio = float((z.std(1) / gamma).median())
        pred = relu_mean(z.mean(1), z.std(1))
        true = z.clamp_min(0).mean(1)
        relu_err = float(((pred - true).abs() / true.clamp_min(1e-6)).median())
        rows.append((n, float(c[off].abs().mean()), e_white, e_prop, mean_err, std_ratio, relu_err))
    print(
        "| layer | mean abs corr (data) | err whitened | err propagated | median abs(mean-β) | "
        "median std/abs(γ) | median rel. err E[relu] |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.3f} |"
        )
    avg = [sum(r[i] for r in rows) / len(rows) for i in range(1, 7)]
    print("| **mean** | " + " | ".join(f"{v:.3f}" for v in avg) + " |")


if __name__ == "__main__":
    main()
