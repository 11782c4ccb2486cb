#!/usr/bin/env bash
# VGG-16 on CIFAR-100 with the paper's fixed widths: -t original|prune|merge -c l1-norm|l2-norm|l2-GM
source "$(dirname "$0")/_common.sh"
parse_args "" "$@"
run_compress vgg16 cifar100 VGG.cifar100.original.pth.tar
