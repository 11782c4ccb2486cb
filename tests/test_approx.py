"""Approximate merging through non-homogeneous activations (:mod:`neuron_merging.core.approx`).

The property test draws random producers (weights, biases, and for SwiGLU/GeGLU
up projections) and random Gaussian inputs, and checks that merging with the
least-squares rule leaves a smaller expected error than pruning, for every
activation, with and without the bias offset. The error is the expected
squared error of each pruned neuron's contribution, summed: the expected
output error over random consumer weights (independent columns, so the cross
terms vanish). It is estimated by Monte Carlo on paired samples, and "smaller"
allows three standard errors of the paired difference.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuron_merging.core.approx import (
    ACTIVATIONS,
    activation_fn,
    assign_approx,
    norm_ratio_scale,
)

GATED = {"swiglu", "geglu"}
SAMPLES = 20_000


def producer(n: int, d: int, scale: float, bias: float, gated: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g, dtype=torch.float64) * scale / math.sqrt(d)
    b = torch.randn(n, generator=g, dtype=torch.float64) * bias
    u = (
        torch.randn(n, d, generator=g, dtype=torch.float64) * scale / math.sqrt(d)
        if gated
        else None
    )
    return w, b, u, g


def split(w: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    n = w.shape[0]
    k = max(1, min(n - 1, round(n * (1 - ratio))))
    kept = w.norm(dim=1).argsort(descending=True)[:k].sort().values  # l2-norm criterion
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    return kept, mask.nonzero().squeeze(1)


def activations(act, w, b, u, x):
    a = activation_fn(act)(x @ w.T + b)
    return a * (x @ u.T) if u is not None else a


def errors(act, w, b, u, kept, pruned, result, x):
    """Per-sample summed squared errors of pruning and of the merge, ``(samples,)`` each."""
    a = activations(act, w, b, u, x)
    a_n = a[:, pruned]
    ok = result.partner >= 0
    approx = torch.zeros_like(a_n)
    approx[:, ok] = a[:, kept[result.partner[ok]]] * result.scale[ok].to(a.dtype) + result.offset[
        ok
    ].to(a.dtype)
    return (a_n**2).sum(1), ((a_n - approx) ** 2).sum(1)


@settings(max_examples=25, deadline=None)
@given(
    act=st.sampled_from(ACTIVATIONS),
    n=st.integers(4, 24),
    d=st.integers(2, 12),
    ratio=st.sampled_from([0.25, 0.5, 0.75]),
    scale=st.floats(0.3, 4.0),
    bias=st.floats(0.0, 1.5),
    offset=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_approximate_merge_beats_pruning_in_expectation(
    act: str, n: int, d: int, ratio: float, scale: float, bias: float, offset: bool, seed: int
) -> None:
    w, b, u, g = producer(n, d, scale, bias, act in GATED, seed)
    kept, pruned = split(w, ratio)
    result = assign_approx(w, b, kept, pruned, act, up_rows=u, offset=offset)
    # under the model the merge can only help, neuron by neuron
    assert torch.all(result.merge_error <= result.prune_error * (1 + 1e-9) + 1e-12)
    x = torch.randn(SAMPLES, d, generator=g, dtype=torch.float64)
    prune_err, merge_err = errors(act, w, b, u, kept, pruned, result, x)
    gain = prune_err - merge_err
    stderr = float(gain.std()) / math.sqrt(SAMPLES)
    assert float(gain.mean()) > -3 * stderr - 1e-12, (float(gain.mean()), stderr)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_clearly_closer_than_pruning_and_than_the_norm_ratio_baseline(act: str) -> None:
    """A fixed, typical layer: the merge recovers a good share of what pruning loses."""
    w, b, u, g = producer(48, 16, 2.0, 0.5, act in GATED, seed=7)
    kept, pruned = split(w, 0.5)
    x = torch.randn(SAMPLES, 16, generator=g, dtype=torch.float64)
    result = assign_approx(w, b, kept, pruned, act, up_rows=u, offset=True)
    prune_err, merge_err = errors(act, w, b, u, kept, pruned, result, x)
    assert merge_err.mean() < 0.95 * prune_err.mean()
    predicted = float(result.merge_error.sum() / result.prune_error.sum())
    assert predicted == pytest.approx(float(merge_err.mean() / prune_err.mean()), abs=0.03)

    # the paper's scale ‖w_n‖/‖w_m‖ on the cosine partner, for comparison
    cosine = assign_approx(w, b, kept, pruned, act, up_rows=u, candidates=1)
    baseline = type(cosine)(
        cosine.partner,
        norm_ratio_scale(w, kept, pruned, cosine.partner),
        cosine.similarity,
        offset=torch.zeros(pruned.numel()),
    )
    _, base_err = errors(act, w, b, u, kept, pruned, baseline, x)
    assert merge_err.mean() < base_err.mean()


def test_relu_scale_is_the_arc_cosine_rule_and_the_paper_rule_when_parallel() -> None:
    w = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    kept, pruned = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    result = assign_approx(w, None, kept, pruned, "relu", candidates=3)
    m = kept[result.partner]
    theta = torch.nn.functional.cosine_similarity(w[pruned], w[m]).clamp(-1, 1).acos()
    closed = (
        (w[pruned].norm(dim=1) / w[m].norm(dim=1))
        * (theta.sin() + (math.pi - theta) * theta.cos())
        / math.pi
    )
    torch.testing.assert_close(result.scale, closed, rtol=0.03, atol=0)  # quadrature at the kink

    parallel = w.clone()
    parallel[3] = 2.5 * parallel[1]  # relu(2.5 z) = 2.5 relu(z): exact, the paper's scale
    exact = assign_approx(parallel, None, kept, pruned, "relu", candidates=3)
    assert int(exact.partner[0]) == 1
    assert float(exact.scale[0]) == pytest.approx(2.5, rel=1e-9)
    assert float(exact.merge_error[0]) == pytest.approx(0.0, abs=1e-9)


def test_swiglu_equal_gates_and_proportional_ups_merge_exactly() -> None:
    g = torch.Generator().manual_seed(5)
    gate = torch.randn(6, 8, generator=g, dtype=torch.float64)
    up = torch.randn(6, 8, generator=g, dtype=torch.float64)
    gate[4], up[4] = gate[2], -0.7 * up[2]  # silu(g)·(−0.7 u): a negative scale is fine here
    kept, pruned = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5])
    result = assign_approx(gate, None, kept, pruned, "swiglu", up_rows=up)
    assert int(result.partner[0]) == 2
    assert float(result.scale[0]) == pytest.approx(-0.7, rel=1e-6)
    assert float(result.explained[0]) == pytest.approx(1.0, abs=1e-6)


def test_input_statistics_enter_as_whitened_rows() -> None:
    """``x ~ N(μ, diag(v))`` is the same as rows scaled by √v and bias + w·μ."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(10, 4, generator=g, dtype=torch.float64)
    b = torch.randn(10, generator=g, dtype=torch.float64)
    mean = torch.randn(4, generator=g, dtype=torch.float64)
    var = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    kept, pruned = torch.arange(5), torch.arange(5, 10)
    a = assign_approx(w, b, kept, pruned, "gelu", input_mean=mean, input_var=var, offset=True)
    z = assign_approx(w * var.sqrt(), b + w @ mean, kept, pruned, "gelu", offset=True)
    assert torch.equal(a.partner, z.partner)
    torch.testing.assert_close(a.scale, z.scale)
    torch.testing.assert_close(a.offset, z.offset)


def test_threshold_edge_cases_and_errors() -> None:
    w = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kept, pruned = torch.arange(4), torch.arange(4, 8)
    every = assign_approx(w, None, kept, pruned, "silu")
    none = assign_approx(w, None, kept, pruned, "silu", threshold=1.01)
    assert (none.partner == -1).all() and (none.scale == 0).all()
    assert torch.equal(none.merge_error, none.prune_error)
    assert (every.partner >= 0).any()
    nothing = assign_approx(w, None, torch.arange(8), torch.zeros(0, dtype=torch.long), "gelu")
    assert nothing.partner.numel() == 0
    with pytest.raises(ValueError, match="unknown activation"):
        assign_approx(w, None, kept, pruned, "tanh")
    with pytest.raises(ValueError, match="needs up_rows"):
        assign_approx(w, None, kept, pruned, "swiglu")
    with pytest.raises(ValueError, match="takes no up_rows"):
        assign_approx(w, None, kept, pruned, "gelu", up_rows=w)
    dead = w.clone()
    dead[0] = 0  # a zero row with a very negative bias: a dead ReLU is never a partner
    bias = torch.zeros(8, dtype=torch.float64)
    bias[0] = -50.0
    result = assign_approx(dead, bias, kept, pruned, "relu")
    assert not (result.partner == 0).any()


def test_a_batch_of_groups_equals_each_group_alone() -> None:
    g = torch.Generator().manual_seed(9)
    rows = torch.randn(3, 10, 4, generator=g, dtype=torch.float64)
    up = torch.randn(3, 10, 4, generator=g, dtype=torch.float64)
    kept = torch.stack([torch.randperm(10, generator=g)[:6].sort().values for _ in range(3)])
    pruned = torch.stack(
        [torch.tensor([i for i in range(10) if i not in set(k.tolist())]) for k in kept]
    )
    batch = assign_approx(rows, None, kept, pruned, "swiglu", up_rows=up, offset=True)
    assert batch.partner.shape == (3, 4) and batch.offset.shape == (3, 4)
    for i in range(3):
        one = assign_approx(rows[i], None, kept[i], pruned[i], "swiglu", up_rows=up[i], offset=True)
        assert torch.equal(batch.partner[i], one.partner)
        assert torch.equal(batch.scale[i], one.scale)
        assert torch.equal(batch.offset[i], one.offset)


def test_module_doctest_runs() -> None:
    import doctest

    import neuron_merging.core.approx

    results = doctest.testmod(neuron_merging.core.approx, verbose=False)
    assert results.attempted > 0 and results.failed == 0
