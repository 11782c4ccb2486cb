#!/usr/bin/env bash
# ResNet-56 on CIFAR-10: -t original|prune|merge -c l1-norm|l2-norm|l2-GM -r RATIO
source "$(dirname "$0")/_common.sh"
parse_args yes "$@"
run_compress resnet56 cifar10 ResNet.cifar10.original.56.pth.tar
