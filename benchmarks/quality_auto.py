"""What ``selection="auto"`` sees: each candidate's output error on the calibration images.

For each ratio, the model is compressed with the ``best`` recipe and the given
calibration steps, once with the criterion's selection ("merge") and once with
the greedy least-squares selection ("best"), on the same N calibration images;
each line prints :func:`neuron_merging.core.api.calibration_error` (the mean
squared difference of the outputs, the original's as reference: the quantity
``auto`` minimises), the KL divergence of the softmax outputs and the fraction
of images whose top class agrees with the original's. No labels are read.

Usage::

    python -m benchmarks.quality_auto --model resnet56 --ratios 0.5 --steps lstsq-joint
"""

from __future__ import annotations

import argparse
import time

import torch

import neuron_merging as nm
from neuron_merging.core.api import calibration_error
from neuron_merging.experiments import BEST_OPTIONS, calibration_images

from ._common import ROOT
from .quality import MODELS, config_for, load


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(MODELS), default="lenet300")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.5])
    p.add_argument("--criterion", default="l1-norm")
    p.add_argument("--steps", nargs="+", default=["lstsq-joint"])
    p.add_argument("--calibrate", type=int, default=500)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dataset = MODELS[args.model]["dataset"]
    model, example = load(args.model)
    cal = calibration_images(dataset, args.calibrate, args.data_dir)
    with torch.no_grad():
        ref = torch.cat([model(cal[i : i + 250]) for i in range(0, len(cal), 250)])
    for ratio in args.ratios:
        for name, selection in (("merge", "criterion"), ("best", "lstsq")):
            over = dict(BEST_OPTIONS, selection=selection, calibrate=tuple(args.steps))
            if name == "merge":  # the paper's merge as the start of the refit
                over = {"selection": "criterion", "calibrate": tuple(args.steps)}
            cfg = config_for(args.model, dataset, args.criterion, ratio, over)
            t0 = time.perf_counter()
            small = nm.compress(model, example, cfg, calibration=cal).model
            mse = calibration_error(model, small, cal)
            with torch.no_grad():
                out = torch.cat([small(cal[i : i + 250]) for i in range(0, len(cal), 250)])
            kl = torch.nn.functional.kl_div(
                out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="batchmean"
            )
            agree = (out.argmax(1) == ref.argmax(1)).double().mean()
            print(
                f"{args.model} r={ratio} {name} ({selection}) {'+'.join(args.steps)}: "
                f"mse={mse:.4f} kl={float(kl):.4f} agree={float(agree):.4f} "
                f"({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
