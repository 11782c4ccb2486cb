"""MergeConfig validation and serialisation, criteria registry, API plumbing, doctests."""

from __future__ import annotations

import doctest
import json
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import neuron_merging as nm
import neuron_merging.core.api
from _factories import ConvBNNet, assert_lossless, keep_first, mlp, plant_linear_rows, same_state
from neuron_merging.core.config import BN_RULES, MODES, ROUNDINGS


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({"ratio": "0.5"}, "ratio"),
        ({"ratio": True}, "ratio"),
        ({"criterion": "l3-norm"}, "criterion"),
        ({"bn_rule": "approx"}, "bn_rule"),
        ({"rounding": "ceil"}, "rounding"),
        ({"mode": "distil"}, "mode"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": -1.01}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": "high"}, "threshold"),
        ({"lam": 1.1}, "lam"),
        ({"lam": -0.1}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"keep": {"fc1": 0}}, "keep"),
        ({"keep": {"fc1": -2}}, "keep"),
        ({"keep": {"fc1": 2.5}}, "keep"),
        ({"keep": [("fc1", 2)]}, "keep"),
        ({"exclude": "fc1"}, "exclude"),
    ],
)
def test_invalid_config_values_raise_config_error(kwargs: dict, match: str) -> None:
    with pytest.raises(nm.ConfigError, match=match):
        nm.MergeConfig(**kwargs)


@pytest.mark.parametrize("verb", [nm.merge, nm.prune])
def test_verbs_validate_their_arguments(verb) -> None:
    model, x = mlp([4, 8, 2]), torch.randn(1, 4)
    with pytest.raises(nm.ConfigError, match="ratio"):
        verb(model, x, ratio=1.0)
    with pytest.raises(nm.ConfigError, match="criterion"):
        verb(model, x, criterion="nope")
    with pytest.raises(nm.ConfigError, match="model"):
        verb("not a model", x)


def test_merge_specific_arguments_are_validated() -> None:
    model, x = mlp([4, 8, 2]), torch.randn(1, 4)
    with pytest.raises(nm.ConfigError, match="threshold"):
        nm.merge(model, x, threshold=1.01)
    with pytest.raises(nm.ConfigError, match="lam"):
        nm.merge(model, x, lam=2.0)
    with pytest.raises(nm.ConfigError, match="bn_rule"):
        nm.merge(model, x, bn_rule="released")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"keep": {"fc1": 9}}, r"keep\['fc1'\] = 9 exceeds its 8 neurons"),
        ({"keep": {"fc9": 2}}, r"unknown layer 'fc9'.*fc1"),
        ({"exclude": ["fc9"]}, r"unknown layer 'fc9'"),
        ({"keep": {"fc2": 1}}, r"'fc2' is not a mergeable producer.*model output"),
        ({"exclude": ["act1"]}, r"'act1' is not a mergeable producer"),
        ({"ratio": 0.95}, r"ratio 0.95 leaves layer 'fc1' with 0 of 8 neurons"),
        ({"ratio": 0.9, "rounding": "floor"}, r"leaves layer 'fc1' with 0 of 8"),
        ({"keep": {"fc1": 0}}, r"keep\['fc1'\] must be a positive integer"),
    ],
)
def test_layer_specific_config_errors_name_the_layer(kwargs: dict, pattern: str) -> None:
    with pytest.raises(nm.ConfigError, match=pattern):
        nm.merge(mlp([4, 8, 2]), torch.randn(1, 4), **kwargs)


def test_config_error_is_a_value_error_and_library_error() -> None:
    with pytest.raises(ValueError):
        nm.MergeConfig(ratio=2)
    assert issubclass(nm.ConfigError, nm.NeuronMergingError)
    assert issubclass(nm.ModelError, nm.NeuronMergingError)


@pytest.mark.parametrize(
    ("n", "ratio", "rounding", "expected"),
    [
        (8, 0.5, "round", 4),
        (7, 0.5, "round", 4),
        (7, 0.5, "floor", 3),
        (10, 0.33, "round", 7),
        (10, 0.33, "floor", 6),
        (3, 0.0, "floor", 3),
        (16, 0.25, "round", 12),
    ],
)
def test_kept_count(n: int, ratio: float, rounding: str, expected: int) -> None:
    assert nm.MergeConfig(ratio=ratio, rounding=rounding).kept_count(n) == expected


def test_defaults_are_the_paper_values() -> None:
    cfg = nm.MergeConfig()
    assert (cfg.ratio, cfg.criterion, cfg.bn_rule, cfg.rounding, cfg.mode) == (
        0.5,
        "l1-norm",
        "paper",
        "round",
        "merge",
    )
    assert cfg.threshold == nm.DEFAULT_THRESHOLD == 0.1
    assert cfg.lam == nm.DEFAULT_LAMBDA == 0.85


# ------------------------------------------------------------------ serialisation

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._", min_size=1, max_size=12)
configs = st.builds(
    nm.MergeConfig,
    ratio=st.floats(0.0, 1.0, exclude_max=True),
    criterion=st.sampled_from(["l1-norm", "l2-norm", "l2-GM"]),
    threshold=st.none() | st.floats(-1.0, 1.0),
    lam=st.floats(0.0, 1.0),
    bn_rule=st.sampled_from(BN_RULES),
    rounding=st.sampled_from(ROUNDINGS),
    keep=st.dictionaries(names, st.integers(1, 10_000), max_size=4),
    exclude=st.lists(names, max_size=4),
    mode=st.sampled_from(MODES),
)


@settings(max_examples=50, deadline=None)
@given(cfg=configs)
def test_config_round_trips_through_dict_and_json(cfg: nm.MergeConfig) -> None:
    data = cfg.to_dict()
    assert isinstance(data["keep"], dict) and isinstance(data["exclude"], list)
    assert nm.MergeConfig.from_dict(data) == cfg
    assert nm.MergeConfig.from_dict(json.loads(json.dumps(data))) == cfg
    assert nm.MergeConfig.from_dict(data).to_dict() == data


def test_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(nm.ConfigError, match=r"unknown MergeConfig field.*speed"):
        nm.MergeConfig.from_dict({"ratio": 0.5, "speed": "fast"})


def test_from_dict_validates_values() -> None:
    with pytest.raises(nm.ConfigError, match="bn_rule"):
        nm.MergeConfig.from_dict({**nm.MergeConfig().to_dict(), "bn_rule": "nope"})


def test_report_records_the_config() -> None:
    result = nm.merge(mlp([4, 8, 2]), torch.randn(1, 4), ratio=0.25, threshold=None, lam=0.5)
    cfg = nm.MergeConfig.from_dict(result.report.config)
    assert (cfg.ratio, cfg.threshold, cfg.lam, cfg.mode) == (0.25, None, 0.5, "merge")


# ------------------------------------------------------------------ criteria


def test_builtin_criteria_are_available() -> None:
    assert {"l1-norm", "l2-norm", "l2-GM"} <= set(nm.available_criteria())


@pytest.mark.parametrize(
    ("criterion", "kept"),
    [
        ("l1-norm", [0, 2]),  # ℓ1: 6, 4, 5, 1.5
        ("l2-norm", [0, 1]),  # ℓ2: sqrt(18)≈4.24, 4, sqrt(13)≈3.6, 1.5
    ],
)
def test_norm_criteria_select_the_largest_rows(criterion: str, kept: list[int]) -> None:
    model = mlp([2, 4, 1], bias=False)
    with torch.no_grad():
        model.fc1.weight.copy_(torch.tensor([[3.0, 3.0], [4.0, 0.0], [2.0, 3.0], [1.5, 0.0]]))
    result = nm.prune(model, torch.randn(1, 2), keep={"fc1": 2}, criterion=criterion)
    assert result.plans[0].kept.tolist() == kept


def test_geometric_median_criterion_prunes_the_most_central_rows() -> None:
    model = mlp([2, 5, 1], bias=False)
    rows = [[0.0, 0.0], [10.0, 0.0], [-10.0, 0.0], [0.0, 10.0], [0.0, -10.0]]
    with torch.no_grad():
        model.fc1.weight.copy_(torch.tensor(rows))
    result = nm.prune(model, torch.randn(1, 2), keep={"fc1": 4}, criterion="l2-GM")
    assert result.plans[0].pruned.tolist() == [0]  # the centre is the most replaceable


def test_registered_criterion_is_used_by_name() -> None:
    nm.register_criterion("test-keep-first", keep_first, overwrite=True)
    assert "test-keep-first" in nm.available_criteria()
    with pytest.raises(nm.ConfigError, match="already registered"):
        nm.register_criterion("test-keep-first", keep_first)
    model = mlp([4, 8, 3], seed=1)
    plant_linear_rows(model.fc1, [(5, 0, 0.3), (6, 1, 4.0), (7, 2, 1.0)])
    x = torch.randn(8, 4)
    result = nm.merge(model, x[:1], keep={"fc1": 5}, criterion="test-keep-first", threshold=0.9)
    assert result.plans[0].kept.tolist() == [0, 1, 2, 3, 4]
    assert result.plans[0].partner.tolist() == [0, 1, 2]
    assert result.report.config["criterion"] == "test-keep-first"
    assert_lossless(result.model(x), model(x))
    cfg = nm.MergeConfig(criterion="test-keep-first", keep={"fc1": 5}, threshold=0.9)
    via_config = nm.compress(model, x[:1], cfg)
    assert same_state(via_config.model.state_dict(), result.model.state_dict())


def test_register_criterion_overwrite_replaces_it() -> None:
    nm.register_criterion("test-flip", keep_first, overwrite=True)
    nm.register_criterion("test-flip", lambda rows: -keep_first(rows), overwrite=True)
    result = nm.prune(mlp([3, 6, 2]), torch.randn(1, 3), keep={"fc1": 2}, criterion="test-flip")
    assert result.plans[0].kept.tolist() == [4, 5]


def test_callable_criterion_and_bad_criteria() -> None:
    model, x = mlp([3, 6, 2]), torch.randn(1, 3)
    result = nm.prune(model, x, ratio=0.5, criterion=lambda rows: -keep_first(rows))
    assert result.plans[0].kept.tolist() == [3, 4, 5]
    assert result.report.config["criterion"] == "l1-norm"  # the name slot keeps its default
    with pytest.raises(nm.ConfigError, match="shape"):
        nm.prune(model, x, criterion=lambda rows: rows.sum())

    def nan_first_two(rows: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros(rows.shape[0])
        scores[:2] = float("nan")
        return scores

    nan_scores = nm.prune(model, x, keep={"fc1": 2}, criterion=nan_first_two)
    assert nan_scores.plans[0].kept.tolist() == [2, 3]  # NaN scores are never preferred


def test_criterion_sees_bias_only_without_bn() -> None:
    seen: list[tuple[int, ...]] = []

    def spy(rows: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(rows.shape))
        return keep_first(rows)

    nm.prune(mlp([3, 6, 2]), torch.randn(1, 3), criterion=spy)
    nm.prune(ConvBNNet(3, 4, conv_bias=True), torch.randn(1, 3, 8, 8), criterion=spy)
    assert seen == [(6, 4), (4, 27)]  # [w | b] for fc1; conv rows without bias (BN follows)


# ------------------------------------------------------------------ compress / config=


def test_compress_merge_and_prune_agree() -> None:
    model, x = ConvBNNet(3, 8, seed=3), torch.randn(2, 3, 8, 8)
    kw = {"ratio": 0.5, "threshold": 0.2, "lam": 0.7, "bn_rule": "exact", "criterion": "l2-norm"}
    via_merge = nm.merge(model, x[:1], **kw)
    via_compress = nm.compress(model, x[:1], nm.MergeConfig(**kw))
    assert same_state(via_merge.model.state_dict(), via_compress.model.state_dict())
    via_config = nm.merge(model, x[:1], ratio=0.1, config=nm.MergeConfig(**kw, mode="prune"))
    assert via_config.report.mode == "merge"  # the verb decides the mode
    assert same_state(via_config.model.state_dict(), via_merge.model.state_dict())
    pruned = nm.prune(model, x[:1], config=nm.MergeConfig(**kw))
    direct = nm.compress(model, x[:1], nm.MergeConfig(**kw, mode="prune"))
    assert pruned.report.mode == "prune"
    assert same_state(pruned.model.state_dict(), direct.model.state_dict())


def test_exclude_leaves_a_group_intact() -> None:
    model = mlp([4, 8, 6, 2], seed=2)
    result = nm.merge(model, torch.randn(1, 4), ratio=0.5, exclude=["fc2"])
    assert [g.producer for g in result.report.groups] == ["fc1"]
    assert result.model.fc2.out_features == 6 and result.model.fc2.in_features == 4
    assert torch.equal(result.model.fc3.weight, model.fc3.weight)
    assert ("fc2", "excluded by the user") in [(s.name, s.reason) for s in result.report.skipped]


# ------------------------------------------------------------------ docstrings


def test_api_docstring_examples_run() -> None:
    torch.manual_seed(0)
    results = doctest.testmod(neuron_merging.core.api, verbose=False)
    assert results.attempted >= 6
    assert results.failed == 0
