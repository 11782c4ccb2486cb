#!/usr/bin/env bash
# WRN-40-4 on CIFAR-10: -t original|prune|merge -c l1-norm|l2-norm|l2-GM -r RATIO
source "$(dirname "$0")/_common.sh"
parse_args yes "$@"
run_compress wrn40_4 cifar10 WideResNet.cifar10.original.40_4.pth.tar
