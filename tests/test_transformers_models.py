"""``transformers`` models from tiny configs (no downloads): FFNs found automatically.

OPT (``fc1 → fc2``) and T5 with ``feed_forward_proj="relu"`` (``wi → wo``) merge
losslessly on planted duplicates; the GELU FFNs of BERT, GPT-2 (``Conv1D``) and ViT and
LLaMA's SwiGLU are pruned (exactly: pruning equals masking) and never merged.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import neuron_merging as nm
from _zoo import HF_ZOO, hf_bert, hf_gpt2, keep_first, masked_copy, planted, rel_error, run

pytest.importorskip("transformers")

NAMES = sorted(HF_ZOO)

#: name → (producer suffixes, consumer suffix, mergeable, words in the reason)
FFN = {
    "hf_opt": ((".fc1",), ".fc2", True, ()),
    "hf_t5": ((".wi",), ".wo", True, ()),
    "hf_bert": ((".intermediate.dense",), ".output.dense", False, ("GELU",)),
    "hf_gpt2": ((".mlp.c_fc",), ".mlp.c_proj", False, ("GELU",)),
    "hf_vit": ((".fc1",), ".fc2", False, ("GELU",)),
    "hf_llama": ((".gate_proj", ".up_proj"), ".down_proj", False, ("SiLU", "product")),
}
LAYERS = {"hf_opt": 2, "hf_t5": 4, "hf_bert": 2, "hf_gpt2": 2, "hf_vit": 2, "hf_llama": 2}


@pytest.fixture(autouse=True)
def _quiet_single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def models() -> dict:
    return {name: factory() for name, (factory, _) in HF_ZOO.items()}


@pytest.mark.parametrize("name", NAMES)
def test_ffn_groups_found(name: str, models: dict) -> None:
    _, x = HF_ZOO[name]
    producers, consumer, mergeable, words = FFN[name]
    for coupled in (False, True):
        groups, _ = nm.find_groups(models[name], x, coupled=coupled)
        ffn = [g for g in groups if g.consumer.endswith(consumer)]
        assert len(ffn) == LAYERS[name], groups
        for g in ffn:
            assert len(g.producers) == len(producers)
            assert all(p.endswith(s) for p, s in zip(g.producers, producers, strict=True))
            assert g.consumers == (g.consumer,)
            assert g.mergeable == mergeable
            if not mergeable:
                assert any(w in g.reason for w in words), g.reason


@pytest.mark.parametrize("coupled", [False, True], ids=["plain", "coupled"])
@pytest.mark.parametrize("name", NAMES)
def test_pruning_equals_masking(name: str, coupled: bool, models: dict) -> None:
    _, x = HF_ZOO[name]
    model = models[name]
    result = nm.prune(model, x, ratio=0.5, coupled=coupled)
    assert result.plans and all(p.pruned.numel() for p in result.plans)
    out, expected = run(result.model, x), run(masked_copy(model, result.plans), x)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()


@pytest.mark.parametrize("name", NAMES)
def test_merge_runs_and_never_merges_nonhomogeneous(name: str, models: dict) -> None:
    _, x = HF_ZOO[name]
    model = models[name]
    result = nm.merge(model, x, ratio=0.5, threshold=None)
    assert run(result.model, x).shape == run(model, x).shape
    assert result.report.params_after < result.report.params_before
    mergeable = FFN[name][2]
    for g in result.report.groups:
        if mergeable:
            assert g.method == "merged" and g.merged == g.pruned
        else:
            assert g.method == "pruned" and g.merged == 0
            assert any(w in g.reason for w in FFN[name][3]), g.reason


@pytest.mark.parametrize("name", ["hf_opt", "hf_t5"])
def test_relu_ffn_merges_losslessly(name: str, models: dict) -> None:
    _, x = HF_ZOO[name]
    model, keep, _ = planted(models[name], x, coupled=False)
    assert len(keep) == LAYERS[name]
    ref = run(model, x)
    result = nm.merge(model, x, ratio=0.0, keep=keep, criterion=keep_first, threshold=None)
    assert all(g.merged == g.pruned == 16 for g in result.report.groups)
    assert rel_error(run(result.model, x), ref) < 1e-5
    pruned = nm.prune(model, x, ratio=0.0, keep=keep, criterion=keep_first)
    assert rel_error(run(pruned.model, x), ref) > 1e-4


def test_gpt2_conv1d_shapes(models: dict) -> None:
    _, x = HF_ZOO["hf_gpt2"]
    result = nm.prune(models["hf_gpt2"], x, ratio=0.5)
    mlp = result.model.transformer.h[0].mlp
    assert mlp.c_fc.weight.shape == (16, 32) and mlp.c_fc.nf == 32  # 64 → 32
    assert mlp.c_fc.bias.shape == (32,)
    assert mlp.c_proj.weight.shape == (32, 16)


def test_llama_swiglu_prunes_both_projections(models: dict) -> None:
    _, x = HF_ZOO["hf_llama"]
    result = nm.merge(models["hf_llama"], x, ratio=0.5, threshold=None)
    mlp = result.model.model.layers[0].mlp
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == 16
    assert mlp.down_proj.in_features == 16


class _Conv1DChain(torch.nn.Module):
    """GPT-2 ``Conv1D`` layers: a (4→8), b (8→6), c (6→8), d (8→3)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(10)
        self.a, self.b, self.c, self.d = Conv1D(8, 4), Conv1D(6, 8), Conv1D(8, 6), Conv1D(3, 8)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu = torch.nn.functional.relu
        return self.d(relu(self.c(relu(self.b(relu(self.a(x)))))))


def test_conv1d_producers_of_equal_width() -> None:
    """BUGS.md #7: groups a and c have 8 channels each but 4 and 6 inputs."""
    net, x = _Conv1DChain(), torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    result = nm.prune(net, x, ratio=0.5)
    assert [g.producer for g in result.report.groups] == ["a", "b", "c"]
    expected = run(masked_copy(net, result.plans), x)
    assert torch.allclose(run(result.model, x), expected, atol=1e-5)
    copy_, keep, _ = planted(net, x, coupled=False)
    merged = nm.merge(copy_, x, ratio=0.0, keep=keep, criterion=keep_first, threshold=None)
    assert rel_error(run(merged.model, x), run(copy_, x)) < 1e-5


def _relu_variant(kind: str) -> torch.nn.Module:
    if kind == "bert":
        return hf_bert(seed=11, hidden_act="relu", attn_implementation=None)
    return hf_gpt2(seed=11, activation_function="relu", attn_implementation=None)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_relu_variants_merge_losslessly(kind: str) -> None:
    """BERT / GPT-2 (Conv1D fold) with ``relu`` FFNs: mergeable, lossless on duplicates."""
    x = HF_ZOO["hf_bert"][1]
    model, keep, groups = planted(_relu_variant(kind), x, coupled=False)
    assert len(keep) == 2 and all(g.mergeable for g in groups)
    result = nm.merge(model, x, ratio=0.0, keep=keep, criterion=keep_first, threshold=None)
    assert all(g.merged == g.pruned > 0 for g in result.report.groups)
    assert rel_error(run(result.model, x), run(model, x)) < 1e-5


def test_explicit_bert_gelu_group_is_pruned_not_merged(models: dict) -> None:
    """Issue 9: a BERT group through GELU was reported "merged 128/128" and changed the FFN."""
    _, x = HF_ZOO["hf_bert"]
    model = models["hf_bert"]
    group = nm.MergeGroup("encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense")
    result = nm.merge(model, x, groups=[group], threshold=None)
    (report,) = result.report.groups
    assert report.method == "pruned" and report.merged == 0 and "GELU" in report.reason
    expected = run(masked_copy(model, result.plans), x)
    assert torch.allclose(run(result.model, x), expected, atol=1e-5)


@pytest.mark.parametrize(
    "name, producer, consumer",
    [
        ("hf_llama", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"),
        ("hf_opt", "model.decoder.layers.0.fc2", "model.decoder.layers.1.fc1"),
        ("hf_opt", "model.decoder.layers.0.self_attn.out_proj", "model.decoder.layers.0.fc1"),
    ],
)
def test_explicit_unsound_transformer_groups_refused(
    name: str, producer: str, consumer: str, models: dict
) -> None:
    """Issue 9: SwiGLU and residual-add/LayerNorm groups were accepted and crashed."""
    _, x = HF_ZOO[name]
    with pytest.raises(nm.ModelError, match=r"unsound|does not match"):
        nm.merge(models[name], x, groups=[nm.MergeGroup(producer, consumer)])


@pytest.mark.parametrize("name", ["hf_opt", "hf_gpt2", "hf_t5"])
def test_tied_embeddings_stay_tied_and_unshared(name: str, models: dict) -> None:
    _, x = HF_ZOO[name]
    model = models[name]
    result = nm.merge(model, x, ratio=0.5)
    new = result.model
    assert new.get_input_embeddings().weight is new.get_output_embeddings().weight
    old = model.get_input_embeddings().weight
    assert new.get_input_embeddings().weight.data_ptr() != old.data_ptr()
    assert nm.count_parameters(new) == result.report.params_after


def _more(name: str) -> torch.nn.Module:
    import transformers as T

    common = {
        "vocab_size": 50,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 32,
    }
    torch.manual_seed(0)
    if name == "bart":
        cfg = T.BartConfig(
            vocab_size=50,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=32,
            activation_function="relu",
        )
        return T.BartModel(cfg).eval()
    if name == "distilbert":
        cfg = T.DistilBertConfig(
            vocab_size=50,
            dim=16,
            n_layers=2,
            n_heads=2,
            hidden_dim=32,
            max_position_embeddings=32,
            activation="relu",
        )
        return T.DistilBertModel(cfg).eval()
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=1, **common)).eval()
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=1, **common)).eval()
    if name == "phi":
        return T.PhiForCausalLM(T.PhiConfig(**common)).eval()
    return T.RobertaModel(T.RobertaConfig(**common)).eval()


@pytest.mark.parametrize(
    "name, mergeable",
    [
        ("bart", True),
        ("mistral", False),
        pytest.param("distilbert", True, marks=pytest.mark.slow),
        pytest.param("qwen2", False, marks=pytest.mark.slow),
        pytest.param("phi", False, marks=pytest.mark.slow),
        pytest.param("roberta", False, marks=pytest.mark.slow),
    ],
)
def test_more_architectures(name: str, mergeable: bool) -> None:
    """Two FFN groups each; ReLU ones merge losslessly, the rest prune exactly."""
    x = HF_ZOO["hf_bert"][1]
    model = _more(name)
    groups, _ = nm.find_groups(model, x, coupled=True)
    assert len(groups) == 2 and all(g.mergeable == mergeable for g in groups)
    result = nm.prune(model, x, ratio=0.5, coupled=True)
    assert torch.allclose(run(result.model, x), run(masked_copy(model, result.plans), x), atol=1e-5)
    if mergeable:
        twin, keep, _ = planted(model, x, coupled=True)
        merged = nm.merge(twin, x, ratio=0.0, keep=keep, criterion=keep_first, threshold=None)
        assert rel_error(run(merged.model, x), run(twin, x)) < 1e-5


def test_wav2vec2_feature_extractor_group_norm_is_sliced() -> None:
    """Wav2Vec2's first feature-extractor conv is followed by ``GroupNorm(C, C)`` (one
    channel per group): the group goes through it, its weights sliced, pruned only."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="group",
    )
    model = Wav2Vec2Model(cfg).eval()
    x = torch.randn(2, 400, generator=torch.Generator().manual_seed(1))
    groups = {g.name: g for g in nm.find_groups(model, x)[0]}
    conv = groups["feature_extractor.conv_layers.0.conv"]
    assert conv.passthrough == ("feature_extractor.conv_layers.0.layer_norm",)
    assert not conv.mergeable and "GroupNorm" in conv.reason
    result = nm.prune(model, x, ratio=0.5)
    norm = result.model.feature_extractor.conv_layers[0].layer_norm
    assert norm.num_channels == norm.num_groups == norm.weight.numel() == 4
    fresh = torch.randn(3, 400)
    assert rel_error(run(result.model, fresh), run(masked_copy(model, result.plans), fresh)) < 1e-5


def test_gpt2_conv1d_consumer_keeps_nx_in_step_and_reloads(tmp_path, models: dict) -> None:
    """The consumer ``Conv1D`` (``mlp.c_proj``) got its narrower weight but kept its old
    ``nx``: ``nm.load`` into a fresh GPT-2 then refused every save (``attributes imply``)."""
    _, x = HF_ZOO["hf_gpt2"]
    result = nm.merge(models["hf_gpt2"], x, ratio=0.5)
    proj = result.model.transformer.h[0].mlp.c_proj
    assert proj.nx == proj.weight.shape[0] < 64
    nm.save(result, tmp_path / "gpt2")
    back = nm.load(HF_ZOO["hf_gpt2"][0](), tmp_path / "gpt2")
    assert torch.equal(run(back, x), run(result.model, x))
