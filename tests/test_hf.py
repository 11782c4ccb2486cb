"""Hugging Face reload: ``nm.hf.save_pretrained`` → ``from_pretrained`` of the same class.

Models are built from tiny configs (never from a hub) and their ReLU FFNs are
merged through explicit groups (``fc1 → fc2``, ``wi → wo``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import neuron_merging as nm

transformers = pytest.importorskip("transformers")


def opt() -> nn.Module:
    return transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=2,
            ffn_dim=32,
            num_attention_heads=2,
            max_position_embeddings=32,
            word_embed_proj_dim=16,
        )
    )


def t5() -> nn.Module:
    return transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=64,
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            feed_forward_proj="relu",
            decoder_start_token_id=0,
        )
    )


def m2m100() -> nn.Module:
    return transformers.M2M100ForConditionalGeneration(
        transformers.M2M100Config(
            vocab_size=64,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=24,
            max_position_embeddings=32,
            activation_function="relu",
            decoder_start_token_id=2,
        )
    )


def ffn_groups(model: nn.Module) -> list[nm.MergeGroup]:
    names = dict(model.named_modules())
    out = []
    for name in names:
        for first, second in (("fc1", "fc2"), ("wi", "wo")):
            consumer = name[: -len(first)] + second
            if name.endswith("." + first) and consumer in names:
                out.append(nm.MergeGroup(producer=name, consumer=consumer))
    return out


def _seeded(factory: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return factory().eval()


def _logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        return model(input_ids=ids).logits


CASES = {"opt": (opt, "ffn_dim"), "t5": (t5, "d_ff"), "m2m100": (m2m100, "encoder_ffn_dim")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_pretrained_then_from_pretrained_gives_the_same_outputs(
    tmp_path: Path, name: str
) -> None:
    factory, field = CASES[name]
    original = _seeded(factory)
    old_width = getattr(original.config, field)
    result = nm.merge(original, groups=ffn_groups(original), ratio=0.25, threshold=None)
    assert result.report.params_after < result.report.params_before

    nm.hf.save_pretrained(result, tmp_path)
    loaded = type(original).from_pretrained(tmp_path).eval()
    assert getattr(loaded.config, field) == round(old_width * 0.75)
    assert getattr(original.config, field) == old_width  # the input model keeps its config
    assert torch.equal(_logits(loaded), _logits(result.model))


def test_without_the_update_from_pretrained_fails(tmp_path: Path) -> None:
    """The bug this module fixes: the stale ``ffn_dim`` cannot hold the smaller weights."""
    original = _seeded(opt)
    result = nm.merge(original, groups=ffn_groups(original), ratio=0.25, threshold=None)
    result.model.save_pretrained(tmp_path)  # config.ffn_dim is still 32
    with pytest.raises(RuntimeError, match="mismatched_sizes"):
        transformers.OPTForCausalLM.from_pretrained(tmp_path)


def test_plain_save_pretrained_works_after_update_config(tmp_path: Path) -> None:
    original = _seeded(m2m100)
    result = nm.merge(original, groups=ffn_groups(original), ratio=0.5, threshold=None)
    config = nm.hf.update_config(result)
    assert (config.encoder_ffn_dim, config.decoder_ffn_dim) == (16, 12)  # one field each
    result.model.save_pretrained(tmp_path)
    loaded = transformers.M2M100ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded), _logits(result.model))


def test_non_uniform_widths_are_refused_with_the_way_out() -> None:
    original = _seeded(opt)
    groups = ffn_groups(original)
    keep = {groups[0].producer: 10}  # layer 0 keeps 10, layer 1 the ratio's 16
    result = nm.merge(original, groups=groups, ratio=0.5, keep=keep, threshold=None)
    with pytest.raises(nm.ConfigError, match="differ between layers") as info:
        nm.hf.update_config(result)
    message = str(info.value)
    assert "layers.0.fc1: 10" in message and "layers.1.fc1: 16" in message
    assert "same ratio" in message and "nm.save" in message
    assert result.model.config.ffn_dim == 32  # nothing was changed


def test_gpt2_conv1d_width_and_unset_n_inner() -> None:
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    assert config.n_inner is None  # means 4·n_embd
    model = transformers.GPT2LMHeadModel(config)
    assert nm.hf.ffn_widths(model) == {
        "n_inner": {"transformer.h.0.mlp.c_fc": 64, "transformer.h.1.mlp.c_fc": 64}
    }
    assert nm.hf.update_config(model).n_inner == 64


def test_unknown_config_class_and_non_hf_model() -> None:
    class OtherConfig(transformers.PretrainedConfig):
        model_type = "other-nm-test"

    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = OtherConfig()

    with pytest.raises(nm.ConfigError, match="no FFN width field is known for OtherConfig"):
        nm.hf.update_config(Other())
    with pytest.raises(nm.ConfigError, match="no Hugging Face config"):
        nm.hf.update_config(nn.Linear(2, 2))
    bare = _seeded(opt)
    bare.model.decoder.layers[0].fc1 = nn.Identity()
    bare.model.decoder.layers[1].fc1 = nn.Identity()
    with pytest.raises(nm.ModelError, match="no layer of OPTForCausalLM matches"):
        nm.hf.update_config(bare)


def test_module_doctest_runs() -> None:
    import doctest

    results = doctest.testmod(nm.hf, verbose=False)
    assert results.attempted > 0 and results.failed == 0


def _bert_classifier() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, hidden_act="relu",
                     num_labels=3)  # fmt: skip
    return BertForSequenceClassification(cfg).eval()


def test_a_config_that_cannot_describe_the_model_is_refused(tmp_path: Path) -> None:
    """The tanh pooler of a classification head is a group too: compressed, its width is
    no longer ``hidden_size``, and ``from_pretrained`` failed (or, with
    ``ignore_mismatched_sizes=True``, silently re-initialised pooler and classifier)."""
    from transformers import BertForSequenceClassification

    model = _bert_classifier()
    ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    result = nm.merge(model, {"input_ids": ids}, ratio=0.5)
    assert "bert.pooler.dense" in {g.producers[0] for g in result.report.groups}
    with pytest.raises(nm.ConfigError, match=r"cannot describe the compressed model: bert\.pooler"):
        nm.hf.save_pretrained(result, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    result = nm.merge(model, {"input_ids": ids}, ratio=0.5, exclude=["bert.pooler.dense"])
    nm.hf.save_pretrained(result, tmp_path / "saved")
    back = BertForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    assert torch.equal(back(input_ids=ids).logits, result.model(input_ids=ids).logits)
