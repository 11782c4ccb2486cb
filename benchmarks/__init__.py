"""Benchmarks of neuron-merging: merge cost, scaling on wide layers, latency.

Run everything with ``make bench`` (``python -m benchmarks.run_all``); every
script also takes ``--smoke`` for a tiny, one-repeat version.
"""
