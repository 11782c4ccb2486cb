"""Discovery of merge groups: residual nets, functional style, untraceable models, skips."""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neuron_merging as nm
from _factories import (
    ConvBNNet,
    FunctionalNet,
    TinyResNet,
    Untraceable,
    assert_lossless,
    gen,
    keep_first,
    mlp,
    plant_bn_duplicates,
    plant_linear_rows,
    planted_pairs,
    simple,
    state_copy,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _reasons(skipped: list[nm.SkippedLayer]) -> dict[str, str]:
    return {s.name: s.reason for s in skipped}


# ------------------------------------------------------------------ plain discovery


def test_mlp_groups_chain_through_relu() -> None:
    groups, skipped = nm.find_groups(mlp([4, 6, 5, 2]), torch.randn(1, 4))
    assert simple(groups) == [
        nm.MergeGroup("fc1", "fc2", None, 1),
        nm.MergeGroup("fc2", "fc3", None, 1),
    ]
    assert list(_reasons(skipped)) == ["fc3"]
    assert "model output" in _reasons(skipped)["fc3"]


def test_conv_bn_pool_flatten_linear_group() -> None:
    groups, skipped = nm.find_groups(ConvBNNet(3, 8, pool="avg"), torch.randn(1, 3, 8, 8))
    assert simple(groups) == [
        nm.MergeGroup("conv", "fc", "bn", 16)
    ]  # 8x8 pooled to 4x4 per channel
    assert list(_reasons(skipped)) == ["fc"]


# ------------------------------------------------------------------ residual network


def test_resnet_only_block_internal_channels_are_groups() -> None:
    model = TinyResNet(channels=4, mid=6)
    groups, skipped = nm.find_groups(model, torch.randn(1, 3, 6, 6))
    assert simple(groups) == [
        nm.MergeGroup("blocks.0.conv1", "blocks.0.conv2", "blocks.0.bn1", 1),
        nm.MergeGroup("blocks.1.conv1", "blocks.1.conv2", "blocks.1.bn1", 1),
    ]
    reasons = _reasons(skipped)
    assert set(reasons) == {"stem", "blocks.0.conv2", "blocks.1.conv2", "fc"}
    for name in ("stem", "blocks.0.conv2", "blocks.1.conv2"):
        assert "add" in reasons[name], reasons[name]
    assert "model output" in reasons["fc"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resnet_merge_is_exact_and_leaves_the_residual_stream_alone(seed: int) -> None:
    model = TinyResNet(channels=4, mid=6, seed=seed)
    g = gen(seed)
    blocks = list(model.blocks)
    plants = []
    for block in blocks:
        pairs = planted_pairs(6, 4, [0.5, 2.0], g)
        plant_bn_duplicates(block.conv1, block.bn1, pairs)
        plants.append(pairs)
    before = state_copy(model)
    x = torch.randn(4, 3, 6, 6, generator=g)

    result = nm.merge(model, x[:1], criterion=keep_first, ratio=1 / 3, bn_rule="exact")

    assert [p.partner.tolist() for p in result.plans] == [[m for _, m, _ in p] for p in plants]
    assert_lossless(result.model(x), model(x))
    new = result.model
    for block in new.blocks:
        assert (block.conv1.in_channels, block.conv1.out_channels) == (4, 4)
        assert block.bn1.num_features == 4
        assert (block.conv2.in_channels, block.conv2.out_channels) == (4, 4)
        assert block.bn2.num_features == 4
    after = new.state_dict()
    untouched = [k for k in before if k.startswith(("stem.", "fc.")) or ".bn2." in k]
    assert untouched
    for key in untouched:
        assert torch.equal(after[key], before[key]), key
    assert new.stem.out_channels == 4 and new.fc.in_features == 4
    skipped = _reasons(result.report.skipped)
    assert "add" in skipped["stem"] and "add" in skipped["blocks.0.conv2"]


# ------------------------------------------------------------------ functional style


def test_functional_model_is_discovered() -> None:
    groups, skipped = nm.find_groups(FunctionalNet(), torch.randn(1, 3, 8, 8))
    assert simple(groups) == [
        nm.MergeGroup("conv1", "conv2", None, 1),
        nm.MergeGroup("conv2", "fc1", None, 16),
        nm.MergeGroup("fc1", "fc2", None, 1),
    ]
    assert list(_reasons(skipped)) == ["fc2"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_functional_model_merges_planted_multiples_losslessly(seed: int) -> None:
    model = FunctionalNet(seed=seed)
    g = gen(seed)
    pairs = {
        "conv1": planted_pairs(6, 4, [0.5, 3.0], g),
        "conv2": planted_pairs(8, 5, [0.25, 2.0], g),
        "fc1": planted_pairs(12, 7, [1.5], g),
    }
    for name, p in pairs.items():
        plant_linear_rows(getattr(model, name), p)
    x = torch.randn(4, 3, 8, 8, generator=g)
    keep = {"conv1": 4, "conv2": 5, "fc1": 7}

    result = nm.merge(model, x[:1], criterion=keep_first, keep=keep, threshold=0.5)

    assert [p.merged for p in result.plans] == [2, 3, 5]
    m = result.model
    assert (m.conv1.out_channels, m.conv2.in_channels, m.conv2.out_channels) == (4, 4, 5)
    assert (m.fc1.in_features, m.fc1.out_features, m.fc2.in_features) == (5 * 16, 7, 7)
    assert_lossless(m(x), model(x))


# ------------------------------------------------------------------ untraceable models


def test_data_dependent_control_flow_is_recorded_as_it_runs() -> None:
    model = Untraceable(seed=3)  # branches on a tensor value: symbolic tracers give up
    pairs = [(5, 0, 0.5), (6, 2, 2.0), (7, 4, 1.0)]
    plant_linear_rows(model.fc1, pairs)
    x = torch.randn(8, 5, generator=gen(3))
    groups, _ = nm.find_groups(model, x[:1])
    assert simple(groups) == [nm.MergeGroup("fc1", "fc2", None, 1)]
    result = nm.merge(model, x[:1], criterion=keep_first, ratio=3 / 8)
    assert result.plans[0].partner.tolist() == [0, 2, 4]
    assert_lossless(result.model(x), model(x))


@pytest.mark.parametrize(
    "groups", [[nm.MergeGroup("fc1", "fc2")], [("fc1", None, "fc2")]], ids=["MergeGroup", "tuple"]
)
def test_untraceable_model_merges_with_explicit_groups(groups: list) -> None:
    model = Untraceable(seed=3)
    pairs = [(5, 0, 0.5), (6, 2, 2.0), (7, 4, 1.0)]
    plant_linear_rows(model.fc1, pairs)
    x = torch.randn(8, 5, generator=gen(3))

    result = nm.merge(model, None, groups=groups, criterion=keep_first, ratio=3 / 8)

    assert result.plans[0].partner.tolist() == [0, 2, 4]
    assert (result.model.fc1.out_features, result.model.fc2.in_features) == (5, 5)
    assert_lossless(result.model(x), model(x))
    assert result.report.skipped == []


def test_explicit_groups_infer_flatten_layout_and_match_discovery() -> None:
    model = ConvBNNet(3, 8, seed=4)
    x = torch.randn(2, 3, 8, 8, generator=gen(4))
    traced = nm.merge(model, x[:1], ratio=0.5, threshold=None, bn_rule="exact")
    explicit = nm.merge(
        model, None, groups=[("conv", "bn", "fc")], ratio=0.5, threshold=None, bn_rule="exact"
    )
    assert simple([explicit.plans[0].group]) == [nm.MergeGroup("conv", "fc", "bn", 16)]
    assert not explicit.plans[0].group.checked  # no example inputs: accepted unchecked
    for key, value in traced.model.state_dict().items():
        assert torch.equal(explicit.model.state_dict()[key], value)


@pytest.mark.parametrize(
    ("groups", "match"),
    [
        ([("fc1", None, "nope")], "not a submodule"),
        ([("act1", None, "fc2")], "not Linear/Conv"),
        ([("fc1", "fc2")], "MergeGroup or a"),
        ([("fc1", "act1", "fc2")], "not a batch norm"),
        ([("fc1", None, "fc3")], "does not fit"),
        ([("fc1", None, "fc2"), ("fc1", None, "fc3")], "two groups"),
    ],
)
def test_explicit_groups_are_validated(groups: list, match: str) -> None:
    with pytest.raises(nm.ModelError, match=match):
        nm.merge(mlp([4, 6, 5, 2]), None, groups=groups)


def test_tracing_needs_example_inputs() -> None:
    with pytest.raises(nm.ConfigError, match="example_inputs"):
        nm.merge(mlp([4, 6, 2]), None)


def test_example_inputs_of_the_wrong_shape_are_a_model_error() -> None:
    """A conv → flatten → Linear group needs shapes, so the example inputs are run."""
    with pytest.raises(nm.ModelError, match="example inputs"):
        nm.find_groups(ConvBNNet(3, 4), torch.randn(1, 5, 8, 8))


def test_model_without_groups_warns_and_returns_an_equal_copy() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = nm.merge(model, torch.randn(1, 4))
    assert any("no mergeable group" in str(w.message) for w in caught)
    assert result.model is not model and result.plans == []
    assert torch.equal(result.model[0].weight, model[0].weight)


# ------------------------------------------------------------------ skip reasons


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1))


class TwoConsumers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.b(h) + self.c(h)


class HiddenToOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.b(h), h


class ConvThen(nn.Module):
    """conv(producer) → [middle] → conv(8 → 4)."""

    def __init__(self, producer: nn.Conv2d, middle: nn.Module) -> None:
        super().__init__()
        self.producer, self.middle, self.consumer = producer, middle, nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.consumer(self.middle(self.producer(x)))


class Sigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.sigmoid(self.a(x)))


SKIP_CASES = [
    ("concat", Concat(), (1, 4), "a", "concat"),
    ("second consumer", TwoConsumers(), (1, 4), "a", "read by 2 layers (coupled channels"),
    ("model output", HiddenToOutput(), (1, 4), "a", "model output"),
    (
        "grouped conv",
        ConvThen(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU()),
        (1, 4, 5, 5),
        "producer",
        "grouped convolution (groups=2)",
    ),
    (
        "depthwise conv on the input",
        ConvThen(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU()),
        (1, 8, 5, 5),
        "producer",
        "grouped convolution (groups=8)",
    ),
]

#: Channel-wise but not positively homogeneous: pruned, never merged, and the report says why.
PRUNE_ONLY_CASES = [
    ("sigmoid", Sigmoid(), (1, 4), "a", "Sigmoid is not positively homogeneous"),
    (
        "gelu",
        ConvThen(nn.Conv2d(4, 8, 3, padding=1), nn.GELU()),
        (1, 4, 5, 5),
        "producer",
        "GELU is not positively homogeneous",
    ),
    (
        "bn after relu",
        ConvThen(nn.Conv2d(4, 8, 3, padding=1), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(8))),
        (1, 4, 5, 5),
        "producer",
        "does not directly follow a producer",
    ),
    (
        "depthwise in between",
        ConvThen(
            nn.Conv2d(4, 8, 1), nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8))
        ),
        (1, 4, 5, 5),
        "producer",
        "depthwise convolution 'middle.1' has per-channel filters",
    ),
]


@pytest.mark.parametrize(
    ("model", "shape", "layer", "reason"),
    [case[1:] for case in PRUNE_ONLY_CASES],
    ids=[case[0] for case in PRUNE_ONLY_CASES],
)
def test_prune_only_groups_are_pruned_exactly_and_never_merged(
    model: nn.Module, shape: tuple[int, ...], layer: str, reason: str
) -> None:
    model.eval()
    x = torch.randn(*shape, generator=gen(1))
    groups, _ = nm.find_groups(model, x)
    (group,) = [g for g in groups if g.producer == layer]
    assert not group.mergeable and reason in str(group.reason)
    merged = nm.merge(model, x, ratio=0.5, threshold=None)
    (report,) = [g for g in merged.report.groups if g.producer == layer]
    assert (report.method, report.merged, report.reason) == ("pruned", 0, group.reason)
    pruned = nm.prune(model, x, ratio=0.5)
    for a, b in zip(
        merged.model.state_dict().values(), pruned.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)  # merge falls back to plain pruning
    # pruning equals the original with the removed channels' consumer columns zeroed
    plan = pruned.plans[0]
    masked = copy.deepcopy(model)
    consumer = dict(masked.named_modules())[plan.group.consumer]
    with torch.no_grad():
        consumer.weight[:, plan.pruned] = 0
    torch.testing.assert_close(pruned.model(x), masked(x), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*no mergeable group")
@pytest.mark.parametrize(
    ("model", "shape", "layer", "reason"),
    [case[1:] for case in SKIP_CASES],
    ids=[case[0] for case in SKIP_CASES],
)
def test_skip_reasons(model: nn.Module, shape: tuple[int, ...], layer: str, reason: str) -> None:
    model.eval()
    x = torch.randn(*shape)
    groups, skipped = nm.find_groups(model, x)
    assert layer not in {g.producer for g in groups}
    reasons = _reasons(skipped)
    assert reason in reasons[layer], reasons[layer]
    result = nm.merge(model, x, ratio=0.5)  # skipped layers are left intact
    assert _reasons(result.report.skipped)[layer] == reasons[layer]
    before, after = dict(model.named_modules())[layer], dict(result.model.named_modules())[layer]
    assert torch.equal(before.weight, after.weight)
    with pytest.raises(nm.ConfigError, match=re.escape(reason)):
        nm.merge(model, x, keep={layer: 1})


def test_bn_directly_after_producer_is_part_of_the_group() -> None:
    model = ConvThen(nn.Conv2d(4, 8, 3, padding=1), nn.Sequential(nn.BatchNorm2d(8), nn.ReLU()))
    groups, _ = nm.find_groups(model.eval(), torch.randn(1, 4, 5, 5))
    assert simple(groups) == [nm.MergeGroup("producer", "consumer", "middle.0", 1)]


def test_leaky_relu_dropout_identity_and_adaptive_pool_are_transparent() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.LeakyReLU(0.1),
        nn.Dropout2d(0.2),
        nn.Identity(),
        nn.AdaptiveMaxPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 2),
    ).eval()
    x = torch.randn(3, 3, 7, 7, generator=gen(0))
    plant_linear_rows(model[0], [(4, 0, 0.5), (5, 1, 3.0)])
    groups, _ = nm.find_groups(model, x[:1])
    assert simple(groups) == [nm.MergeGroup("0", "6", None, 4)]
    result = nm.merge(model, x[:1], criterion=keep_first, keep={"0": 4})
    assert result.plans[0].partner.tolist() == [0, 1]
    assert_lossless(result.model(x), model(x))
