#!/usr/bin/env bash
# LeNet-300-100 on FashionMNIST: -t original|prune|merge -c l1-norm|l2-norm|l2-GM -r RATIO
source "$(dirname "$0")/_common.sh"
parse_args yes "$@"
run_compress lenet300 fashion-mnist LeNet_300_100.original.300_100.bias.pth.tar
