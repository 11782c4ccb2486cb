#!/usr/bin/env bash
# Train the VGG-16 CIFAR-100 baseline with the paper's recipe (200 epochs; a GPU run).
# Extra arguments go to `neuron-merging train` (e.g. --epochs 1 --max-batches 2 for a smoke run).
source "$(dirname "$0")/_common.sh"
mkdir -p "$NEURON_MERGING_CHECKPOINTS"
"${NM[@]}" train --arch vgg16 --dataset cifar100 \
  --output "$NEURON_MERGING_CHECKPOINTS/VGG.cifar100.original.pth.tar" "$@"
