"""The merge itself: lossless on planted multiples, ratio 0, merge vs prune, sizes, purity."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import neuron_merging as nm
from _factories import (
    ConvBNNet,
    LinearBNNet,
    TinyResNet,
    all_finite,
    assert_lossless,
    gen,
    keep_first,
    mlp,
    normalise_rows_l1,
    params_conv,
    params_linear,
    plant_bn_duplicates,
    plant_linear_rows,
    planted_pairs,
    same_state,
    state_copy,
    widths,
)

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
scales = st.lists(st.floats(0.2, 5.0), min_size=1, max_size=6)


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _check_plan(plan: nm.GroupPlan, pairs: list[tuple[int, int, float]], k: int) -> None:
    """The plan keeps 0..k-1 and merges each planted n into its planted m with scale ≈ S."""
    assert plan.kept.tolist() == list(range(k))
    assert plan.pruned.tolist() == [n for n, _, _ in pairs]
    assert plan.partner.tolist() == [m for _, m, _ in pairs]
    assert plan.merged == len(pairs)
    assert bool((plan.scale > 0).all())


# ------------------------------------------------------------------ lossless merging


@SETTINGS
@given(
    fin=st.integers(2, 10),
    h1=st.integers(2, 24),
    h2=st.integers(2, 16),
    out=st.integers(1, 5),
    frac1=st.floats(0.1, 0.9),
    frac2=st.floats(0.1, 0.9),
    s=scales,
    threshold=st.sampled_from([None, 0.1, 0.99]),
    seed=st.integers(0, 2**16),
)
def test_mlp_planted_positive_multiples_merge_losslessly(
    fin, h1, h2, out, frac1, frac2, s, threshold, seed
) -> None:
    """Rows [w|b] that are positive multiples of kept rows are merged without any loss.

    Both hidden layers carry planted multiples at once; fc2 is a consumer of fc1's
    group and the producer of its own, so this also checks that folding columns
    into fc2 keeps its planted rows proportional.
    """
    k1 = max(1, min(h1 - 1, round(h1 * frac1)))
    k2 = max(1, min(h2 - 1, round(h2 * frac2)))
    model = mlp([fin, h1, h2, out], seed=seed)
    g = gen(seed)
    pairs1 = planted_pairs(h1, k1, s, g)
    pairs2 = planted_pairs(h2, k2, s, g)
    plant_linear_rows(model.fc1, pairs1)
    plant_linear_rows(model.fc2, pairs2)
    x = torch.randn(16, fin, generator=g)

    result = nm.merge(
        model, x[:1], criterion=keep_first, keep={"fc1": k1, "fc2": k2}, threshold=threshold
    )

    _check_plan(result.plans[0], pairs1, k1)
    _check_plan(result.plans[1], pairs2, k2)
    for (_, _, scale), got in zip(pairs1, result.plans[0].scale.tolist(), strict=True):
        assert got == pytest.approx(scale, rel=1e-5)
    assert result.model.fc1.out_features == k1
    assert result.model.fc2.in_features == k1
    assert result.model.fc2.out_features == k2
    assert result.model.fc3.in_features == k2
    assert_lossless(result.model(x), model(x))


@SETTINGS
@given(
    fin=st.integers(2, 10),
    hidden=st.integers(3, 24),
    frac=st.floats(0.3, 0.9),
    s=st.lists(st.floats(0.05, 0.45), min_size=1, max_size=4),
    use_ratio=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_l1_selection_prunes_small_planted_multiples_losslessly(
    fin, hidden, frac, s, use_ratio, seed
) -> None:
    """With the default l1-norm criterion, small multiples (s < 0.5, ℓ1 of base rows in
    [1, 2]) are exactly the pruned neurons, so the merge is lossless."""
    k = max(1, min(hidden - 1, round(hidden * frac)))
    model = mlp([fin, hidden, 3], seed=seed)
    g = gen(seed)
    normalise_rows_l1(model.fc1, 1.0, 2.0, g)
    pairs = planted_pairs(hidden, k, s, g)
    plant_linear_rows(model.fc1, pairs)
    x = torch.randn(16, fin, generator=g)
    how = {"ratio": (hidden - k) / hidden} if use_ratio else {"keep": {"fc1": k}}

    result = nm.merge(model, x[:1], **how)

    _check_plan(result.plans[0], pairs, k)
    assert result.model.fc1.out_features == k
    assert_lossless(result.model(x), model(x))


@SETTINGS
@given(
    cin=st.integers(1, 3),
    channels=st.integers(2, 12),
    frac=st.floats(0.1, 0.9),
    pool=st.sampled_from(["max", "avg"]),
    conv_bias=st.booleans(),
    s=scales,
    lam=st.floats(0.0, 1.0),
    threshold=st.sampled_from([None, 0.1, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_cnn_bn_exact_rule_planted_multiples_merge_losslessly(
    cin, channels, frac, pool, conv_bias, s, lam, threshold, seed
) -> None:
    """conv → BN → ReLU → pool → dropout → flatten → Linear with F_n = s·F_m and B* = 0.

    BN has non-trivial γ, β, running mean and variance; the conv bias (when present)
    is folded into μ by the library and is deliberately left arbitrary here.
    """
    k = max(1, min(channels - 1, round(channels * frac)))
    model = ConvBNNet(cin, channels, out=4, pool=pool, conv_bias=conv_bias, seed=seed)
    g = gen(seed)
    pairs = planted_pairs(channels, k, s, g)
    plant_bn_duplicates(model.conv, model.bn, pairs)
    x = torch.randn(8, cin, 8, 8, generator=g)

    result = nm.merge(
        model,
        x[:1],
        criterion=keep_first,
        keep={"conv": k},
        bn_rule="exact",
        lam=lam,
        threshold=threshold,
    )

    _check_plan(result.plans[0], pairs, k)
    m = result.model
    assert (m.conv.out_channels, m.bn.num_features, m.fc.in_features) == (k, k, k * 16)
    assert_lossless(m(x), model(x))


@SETTINGS
@given(
    hidden=st.integers(2, 16),
    frac=st.floats(0.1, 0.9),
    s=scales,
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_linear_bn1d_exact_rule_planted_multiples_merge_losslessly(
    hidden, frac, s, lam, seed
) -> None:
    k = max(1, min(hidden - 1, round(hidden * frac)))
    model = LinearBNNet(fin=5, hidden=hidden, out=3, seed=seed)
    g = gen(seed)
    pairs = planted_pairs(hidden, k, s, g)
    plant_bn_duplicates(model.fc1, model.bn, pairs)
    x = torch.randn(16, 5, generator=g)

    result = nm.merge(model, x[:1], criterion=keep_first, keep={"fc1": k}, bn_rule="exact", lam=lam)

    _check_plan(result.plans[0], pairs, k)
    assert result.report.groups[0].bn == "bn"
    assert_lossless(result.model(x), model(x))


def test_dropping_a_planted_neuron_is_far_from_lossless() -> None:
    """Sanity check of the tolerance: pruning alone misses it by orders of magnitude."""
    model = ConvBNNet(3, 8, out=4, seed=3)
    pairs = [(6, 1, 2.0), (7, 4, 3.0)]
    plant_bn_duplicates(model.conv, model.bn, pairs)
    x = torch.randn(8, 3, 8, 8, generator=gen(3))
    kw = {"criterion": keep_first, "keep": {"conv": 6}}
    merged = nm.merge(model, x[:1], bn_rule="exact", threshold=None, **kw).model
    pruned = nm.prune(model, x[:1], **kw).model
    ref = model(x)
    assert_lossless(merged(x), ref)
    assert float((pruned(x) - ref).detach().abs().max()) > 1e-2


# ------------------------------------------------------------------ ratio 0 / merge == prune


def _models_and_inputs() -> list[tuple[str, nn.Module, torch.Tensor]]:
    return [
        ("mlp", mlp([6, 10, 8, 3], seed=1), torch.randn(4, 6, generator=gen(1))),
        ("convbn", ConvBNNet(3, 8, seed=2, conv_bias=True), torch.randn(4, 3, 8, 8)),
        ("linearbn", LinearBNNet(seed=3), torch.randn(4, 6, generator=gen(3))),
        ("resnet", TinyResNet(seed=4), torch.randn(2, 3, 6, 6, generator=gen(4))),
    ]


@pytest.mark.parametrize("bn_rule", ["paper", "exact"])
@pytest.mark.parametrize("case", range(4))
def test_ratio_zero_is_the_identity(case: int, bn_rule: str) -> None:
    _, model, x = _models_and_inputs()[case]
    before = state_copy(model)
    result = nm.merge(model, x[:1], ratio=0.0, bn_rule=bn_rule, threshold=None)
    assert same_state(result.model.state_dict(), before)
    assert torch.equal(result.model(x), model(x))
    assert result.report.params_after == result.report.params_before
    assert result.plans and all(p.pruned.numel() == 0 for p in result.plans)
    assert all(g.pruned == g.merged == 0 for g in result.report.groups)


@pytest.mark.parametrize("bn_rule", ["paper", "exact"])
@pytest.mark.parametrize("case", range(4))
def test_merge_with_threshold_one_equals_prune(case: int, bn_rule: str) -> None:
    """threshold > 1 is rejected by validation; threshold=1.0 is equivalent on random
    (never parallel) rows because every cosine similarity is strictly below 1."""
    _, model, x = _models_and_inputs()[case]
    merged = nm.merge(model, x[:1], ratio=0.5, threshold=1.0, bn_rule=bn_rule)
    pruned = nm.prune(model, x[:1], ratio=0.5)
    assert all(p.merged == 0 and bool((p.partner == -1).all()) for p in merged.plans)
    assert all(bool((p.similarity < 1.0).all()) for p in merged.plans)
    assert [p.kept.tolist() for p in merged.plans] == [p.kept.tolist() for p in pruned.plans]
    assert same_state(merged.model.state_dict(), pruned.model.state_dict())
    assert torch.equal(merged.model(x), pruned.model(x))
    assert merged.report.mode == "merge" and pruned.report.mode == "prune"


# ------------------------------------------------------------------ merge beats prune


def _err(model: nn.Module, ref: torch.Tensor, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((model(x) - ref) ** 2).mean())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hidden=st.integers(6, 24),
    s=st.lists(st.floats(0.3, 3.0), min_size=1, max_size=4),
    s_small=st.lists(st.floats(0.05, 0.4), min_size=1, max_size=4),
    noise=st.floats(1e-4, 5e-2),
    seed=st.integers(0, 2**16),
)
def test_merge_error_not_above_prune_error_mlp_near_duplicates(
    hidden, s, s_small, noise, seed
) -> None:
    """Noisy copies (relative noise ≤ 5%) of kept rows are pruned (by index, or by ℓ1 with small copies of rows
    whose ℓ1 norms lie in [1, 2]); merging them must not do worse than dropping them."""
    k = hidden // 2
    x = torch.randn(64, 8, generator=gen(seed))
    for criterion, factors in ((keep_first, s), ("l1-norm", s_small)):
        model = mlp([8, hidden, 4], seed=seed)
        g = gen(seed + 1)
        normalise_rows_l1(model.fc1, 1.0, 2.0, g)
        pairs = planted_pairs(hidden, k, factors, g)
        plant_linear_rows(model.fc1, pairs)
        with torch.no_grad():  # relative noise: n = s·(m + noise·|m|·ε)
            w, b = model.fc1.weight, model.fc1.bias
            for n, m, f in pairs:
                size = float(w[m].abs().mean())
                w[n] += f * noise * size * torch.randn(8, generator=g)
                b[n] += f * noise * size * float(torch.randn(1, generator=g))
        ref = model(x)
        kw = {"criterion": criterion, "keep": {"fc1": k}}
        merged = nm.merge(model, x[:1], threshold=0.1, **kw)
        pruned = nm.prune(model, x[:1], **kw)
        assert merged.plans[0].kept.tolist() == list(range(k))
        assert _err(merged.model, ref, x) <= _err(pruned.model, ref, x)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    channels=st.integers(4, 12),
    s=st.lists(st.floats(0.3, 3.0), min_size=1, max_size=4),
    noise=st.floats(1e-4, 2e-2),
    lam=st.floats(0.5, 1.0),  # with a small λ the partner is chosen by bias distance alone
    seed=st.integers(0, 2**16),
)
def test_merge_error_not_above_prune_error_cnn_bn_near_duplicates(
    channels, s, noise, lam, seed
) -> None:
    k = channels // 2
    model = ConvBNNet(3, channels, out=4, seed=seed)
    g = gen(seed)
    plant_bn_duplicates(model.conv, model.bn, planted_pairs(channels, k, s, g))
    with torch.no_grad():
        model.conv.weight[k:] += noise * torch.randn(model.conv.weight[k:].shape, generator=g)
    x = torch.randn(16, 3, 8, 8, generator=g)
    ref = model(x)
    kw = {"criterion": keep_first, "keep": {"conv": k}}
    merged = nm.merge(model, x[:1], threshold=0.1, lam=lam, bn_rule="exact", **kw).model
    pruned = nm.prune(model, x[:1], **kw).model
    assert _err(merged, ref, x) <= _err(pruned, ref, x)


# ------------------------------------------------------------------ sizes and purity


@pytest.mark.parametrize(
    ("rounding", "k1", "k2"),
    [("round", 4, 6), ("floor", 3, 5)],  # 7·0.5 = 3.5 → 4 | 3 ;  11·0.5 = 5.5 → 6 | 5
)
def test_mlp_parameter_counts_shrink_exactly(rounding: str, k1: int, k2: int) -> None:
    model = mlp([10, 7, 11, 4], seed=0)
    result = nm.merge(model, torch.randn(1, 10), ratio=0.5, rounding=rounding)
    expected = params_linear(10, k1) + params_linear(k1, k2) + params_linear(k2, 4)
    before = params_linear(10, 7) + params_linear(7, 11) + params_linear(11, 4)
    m = result.model
    assert result.report.params_before == before == nm.count_parameters(model)
    assert result.report.params_after == expected == nm.count_parameters(m)
    assert result.report.compression == pytest.approx(1 - expected / before)
    assert (m.fc1.in_features, m.fc1.out_features) == (10, k1)
    assert (m.fc2.in_features, m.fc2.out_features) == (k1, k2)
    assert (m.fc3.in_features, m.fc3.out_features) == (k2, 4)
    assert m.fc2.weight.shape == (k2, k1) and m.fc2.bias.shape == (k2,)
    assert [(g.neurons, g.kept, g.pruned) for g in result.report.groups] == [
        (7, k1, 7 - k1),
        (11, k2, 11 - k2),
    ]


def test_cnn_parameter_counts_and_widths_shrink_exactly() -> None:
    model = ConvBNNet(3, 8, out=5, conv_bias=True, seed=0)
    result = nm.merge(model, torch.randn(1, 3, 8, 8), ratio=0.25)  # keep round(6.0) = 6
    m = result.model
    expected = params_conv(3, 6, 3, True) + 2 * 6 + params_linear(6 * 16, 5)
    before = params_conv(3, 8, 3, True) + 2 * 8 + params_linear(8 * 16, 5)
    assert result.report.params_before == before == nm.count_parameters(model)
    assert result.report.params_after == expected == nm.count_parameters(m)
    assert (m.conv.in_channels, m.conv.out_channels) == (3, 6)
    assert m.conv.weight.shape == (6, 3, 3, 3) and m.conv.bias.shape == (6,)
    assert m.bn.num_features == 6
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(m.bn, name).shape == (6,)
    assert (m.fc.in_features, m.fc.out_features) == (96, 5)
    assert m(torch.randn(2, 3, 8, 8)).shape == (2, 5)


@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("verb", ["merge", "prune"])
def test_input_model_is_never_mutated(case: int, verb: str) -> None:
    _, model, x = _models_and_inputs()[case]
    model.train()  # the caller's modes must survive too, and be the result's
    next(iter(model.children())).eval()
    before, shapes = state_copy(model), widths(model)
    modes = {name: m.training for name, m in model.named_modules()}
    fn = nm.merge if verb == "merge" else nm.prune
    result = fn(model, x[:1], ratio=0.5)
    assert result.model is not model
    assert same_state(model.state_dict(), before)
    assert widths(model) == shapes
    assert widths(result.model) != shapes
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: m.training for name, m in result.model.named_modules()} == modes
    assert all(
        a is not b for a, b in zip(model.parameters(), result.model.parameters(), strict=False)
    )
    # no tensor of the result may alias the input, not even those of untouched layers
    with torch.no_grad():
        for t in (*result.model.parameters(), *result.model.buffers()):
            t.add_(1)
    assert same_state(model.state_dict(), before)


@pytest.mark.parametrize("bn_rule", ["paper", "exact"])
def test_two_merges_are_bit_identical(bn_rule: str) -> None:
    for _, model, x in _models_and_inputs():
        a = nm.merge(model, x[:1], ratio=0.5, bn_rule=bn_rule, criterion="l2-GM")
        b = nm.merge(model, x[:1], ratio=0.5, bn_rule=bn_rule, criterion="l2-GM")
        assert same_state(a.model.state_dict(), b.model.state_dict())
        for pa, pb in zip(a.plans, b.plans, strict=True):
            for field in ("kept", "pruned", "partner", "scale", "similarity"):
                assert torch.equal(getattr(pa, field), getattr(pb, field))


def test_plans_come_from_the_original_weights() -> None:
    """fc2 is a consumer (its columns get folded) and a producer; its plan must be
    the one computed on its original rows, i.e. the same as when fc1 is excluded."""
    model = mlp([6, 12, 10, 3], seed=5)
    x = torch.randn(1, 6)
    full = nm.merge(model, x, ratio=0.5, threshold=None)
    alone = nm.merge(model, x, ratio=0.5, threshold=None, exclude=["fc1"])
    a, b = full.plans[1], alone.plans[0]
    assert a.group.producer == b.group.producer == "fc2"
    for field in ("kept", "pruned", "partner", "scale", "similarity"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert [s.name for s in alone.report.skipped if "excluded" in s.reason] == ["fc1"]
    assert alone.model.fc1.out_features == 12


def test_merge_folds_exactly_the_documented_formula() -> None:
    """W_next'[:, m] = W_next[:, m] + Σ s_n W_next[:, n] on the kept columns."""
    model = mlp([5, 8, 3], seed=7)
    result = nm.merge(model, torch.randn(1, 5), ratio=0.5, threshold=None)
    plan = result.plans[0]
    w = model.fc2.weight.detach()
    expected = w[:, plan.kept].clone()
    for n, m, s in zip(plan.pruned, plan.partner, plan.scale, strict=True):
        if m >= 0:
            expected[:, m] += s * w[:, n]
    torch.testing.assert_close(result.model.fc2.weight, expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(result.model.fc1.weight, model.fc1.weight[plan.kept])
    assert torch.equal(result.model.fc1.bias, model.fc1.bias[plan.kept])
    assert torch.equal(result.model.fc2.bias, model.fc2.bias)


def test_report_describes_the_run() -> None:
    model = ConvBNNet(3, 8, seed=1)
    result = nm.merge(model, torch.randn(1, 3, 8, 8), ratio=0.5, threshold=None)
    report = result.report
    assert report.mode == "merge"
    (group,) = report.groups
    assert (group.producer, group.bn, group.consumer) == ("conv", "bn", "fc")
    assert (group.neurons, group.kept, group.pruned) == (8, 4, 4)
    assert group.merged == result.plans[0].merged
    assert [s.name for s in report.skipped] == ["fc"]
    assert "model output" in report.skipped[0].reason
    assert {"trace", "select", "similarity", "assign", "fold", "rebuild", "total"} <= set(
        report.timings
    )
    assert all(v >= 0 for v in report.timings.values())
    data = json.loads(json.dumps(report.to_dict()))
    assert data["groups"][0]["producers"] == ["conv"]
    assert data["config"]["ratio"] == 0.5
    md = report.to_markdown()
    assert "| conv | bn | fc | 8 | 4 | 4 |" in md and "model output" in md


def test_prune_drops_columns_without_compensation() -> None:
    model = mlp([5, 8, 3], seed=2)
    result = nm.prune(model, torch.randn(1, 5), ratio=0.5)
    plan = result.plans[0]
    assert plan.merged == 0 and result.report.groups[0].merged == 0
    assert torch.equal(result.model.fc2.weight, model.fc2.weight[:, plan.kept])
    assert all_finite(result.model)


def test_wide_mlp_smoke() -> None:
    """A 4096→2048→10 MLP: the vectorised path runs once and yields the right shapes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 2048), nn.ReLU(), nn.Linear(2048, 10)).eval()
    result = nm.merge(model, torch.randn(1, 4096), ratio=0.5)
    m = result.model
    assert m[0].weight.shape == (1024, 4096) and m[0].bias.shape == (1024,)
    assert m[2].weight.shape == (10, 1024)
    assert result.report.groups[0].pruned == 1024
    out = m(torch.randn(3, 4096))
    assert out.shape == (3, 10) and bool(torch.isfinite(out).all())
