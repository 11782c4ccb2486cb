"""Compress a small OPT decoder and ship it: pickle-free save/load, Hugging Face reload, export.

Run with ``python examples/deploy.py`` (needs the ``hf`` and ``export`` extras).
The model is built from a tiny config with random weights; nothing is
downloaded. Until discovery traces transformers, the FFN groups are named
explicitly.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import transformers

import neuron_merging as nm
from neuron_merging.export import verify_export


def build() -> transformers.OPTForCausalLM:
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=128,
        hidden_size=32,
        word_embed_proj_dim=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        use_cache=False,
    )
    return transformers.OPTForCausalLM(config).eval()


def main() -> None:
    model = build()
    layers = model.config.num_hidden_layers
    groups = [
        nm.MergeGroup(
            producer=f"model.decoder.layers.{i}.fc1", consumer=f"model.decoder.layers.{i}.fc2"
        )
        for i in range(layers)
    ]
    result = nm.merge(model, groups=groups, ratio=0.5, threshold=None)
    print(result.report)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "nm"
        nm.save(result, folder)  # manifest.json + safetensors, no pickle
        loaded = nm.load(build(), folder)  # a fresh instance of the original architecture
        with torch.no_grad():
            same = torch.equal(loaded(input_ids=ids).logits, expected)
        print(f"nm.save → nm.load: identical outputs: {same}")

        hf_folder = Path(tmp) / "hf"
        nm.hf.save_pretrained(result, hf_folder)  # config.ffn_dim updated to 32
        reloaded = transformers.OPTForCausalLM.from_pretrained(hf_folder).eval()
        with torch.no_grad():
            same = torch.equal(reloaded(input_ids=ids).logits, expected)
        print(f"save_pretrained → from_pretrained (ffn_dim={reloaded.config.ffn_dim}): {same}")

    for check in verify_export(
        result.model, ids, check_inputs=torch.randint(0, 128, (2, 9))
    ).values():
        status = f"max |Δ| {check.max_abs_diff:.1e}" if check.ok else f"failed: {check.error}"
        print(f"{check.format:>12}: {status} ({check.detail})")


if __name__ == "__main__":
    main()
