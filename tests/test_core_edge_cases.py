"""Degenerate weights never put NaN/Inf into the merged model, under every rule.

Rules: the no-BN rule (producers without batch norm; ``bn_rule`` is irrelevant there
but is passed anyway), and the BN rules ``"paper"`` and ``"exact"``. In all tests the
criterion ``keep_first`` keeps neurons ``0..k-1`` so the degenerate neurons are
placed deliberately among the kept candidates and among the pruned ones.

Paper-rule specifics pinned down here (faithful to the released code):

* a negative scale ``S`` (pruned γ of the opposite sign) is merged — ReLU does not
  commute with it, so this is lossy — while ``"exact"`` never merges ``S* ≤ 0``;
* when any normalised bias distance is NaN (e.g. all candidates have the same bias
  distance, so min-max normalisation computes 0/0, or a candidate has σ = 0 or
  γ = 0), ``numpy.argmin`` semantics pick the first NaN, i.e. the first kept
  candidate when the whole row is NaN (``partner == 0`` in ``result.plans``);
* a zero running variance of a *pruned* neuron gives ``S = 0`` (merged with zero
  weight, i.e. effectively dropped); a non-finite ``S`` is never written: the pruned
  neuron is dropped instead (``partner == -1``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import neuron_merging as nm
from _factories import (
    ConvBNNet,
    LinearBNNet,
    all_finite,
    gen,
    keep_first,
    mlp,
    plant_bn_duplicates,
)

RULES = ["paper", "exact"]
KNOBS = [(None, 0.85), (0.1, 0.85), (None, 0.0), (None, 1.0)]  # (threshold, lam)


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _check_finite_result(result: nm.MergeResult, x: torch.Tensor, rule: str) -> None:
    assert all_finite(result.model)
    with torch.no_grad():
        out = result.model(x)
    assert bool(torch.isfinite(out).all())
    for plan in result.plans:
        assert bool(torch.isfinite(plan.scale).all())
        assert bool((plan.scale[plan.partner < 0] == 0).all())
        assert bool(((plan.partner >= -1) & (plan.partner < plan.kept.numel())).all())
        if rule == "exact" or plan.group.bn is None:
            assert bool((plan.scale[plan.partner >= 0] > 0).all())


# ------------------------------------------------------------------ degenerate BN models


def _producer(m: nn.Module) -> nn.Module:
    return m.conv if isinstance(m, ConvBNNet) else m.fc1


def _zero_rows(m: nn.Module) -> None:
    _producer(m).weight[[1, 5]] = 0.0  # one kept, one pruned
    if _producer(m).bias is not None:
        _producer(m).bias[[1, 5]] = 0.0


def _gamma_zero(m: nn.Module) -> None:
    m.bn.weight[[0, 6]] = 0.0


def _gamma_negative(m: nn.Module) -> None:
    m.bn.weight[[2, 4, 7]] = -m.bn.weight[[2, 4, 7]]


def _equal_bias_distances(m: nn.Module) -> None:
    m.bn.reset_parameters()
    m.bn.reset_running_stats()  # γ=1, β=0, var=1 for every channel
    if _producer(m).bias is not None:  # μ − b = 0 for every channel (bias is folded into μ)
        m.bn.running_mean.copy_(_producer(m).bias)


def _zero_var(m: nn.Module) -> None:
    m.bn.running_var[[3, 5]] = 0.0


def _everything(m: nn.Module) -> None:
    for fn in (_zero_rows, _gamma_zero, _gamma_negative, _zero_var):
        fn(m)
    m.bn.bias[[1, 2]] = 0.0


DEGENERATE: dict[str, Callable[[nn.Module], None]] = {
    "zero-norm rows": _zero_rows,
    "gamma zero": _gamma_zero,
    "gamma negative": _gamma_negative,
    "equal bias distances": _equal_bias_distances,
    "zero running var": _zero_var,
    "all at once": _everything,
}


def _bn_model(kind: str, seed: int = 0) -> tuple[nn.Module, str, torch.Tensor]:
    if kind == "conv":
        model = ConvBNNet(3, 8, conv_bias=True, seed=seed)
        return model, "conv", torch.randn(4, 3, 8, 8, generator=gen(seed))
    model = LinearBNNet(fin=5, hidden=8, seed=seed)
    return model, "fc1", torch.randn(4, 5, generator=gen(seed))


@pytest.mark.parametrize(("threshold", "lam"), KNOBS)
@pytest.mark.parametrize("keep", [4, 1], ids=["keep4", "single-kept"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", list(DEGENERATE))
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_degenerate_bn_models_stay_finite(kind, case, rule, keep, threshold, lam) -> None:
    model, name, x = _bn_model(kind)
    with torch.no_grad():
        DEGENERATE[case](model)
    result = nm.merge(
        model,
        x[:1],
        criterion=keep_first,
        keep={name: keep},
        bn_rule=rule,
        threshold=threshold,
        lam=lam,
    )
    assert result.plans[0].kept.tolist() == list(range(keep))
    _check_finite_result(result, x, rule)
    prune = nm.prune(model, x[:1], criterion=keep_first, keep={name: keep})
    assert all_finite(prune.model)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("keep", [3, 1])
def test_zero_norm_rows_without_bn(rule: str, bias: bool, keep: int) -> None:
    """A zero kept row is never a partner (infinite scale); a zero pruned row is dropped."""
    model = mlp([5, 6, 3], seed=1, bias=bias)
    with torch.no_grad():
        model.fc1.weight[[0, 4]] = 0.0
        if bias:
            model.fc1.bias[[0, 4]] = 0.0
    x = torch.randn(6, 5, generator=gen(1))
    result = nm.merge(
        model, x[:1], criterion=keep_first, keep={"fc1": keep}, bn_rule=rule, threshold=None
    )
    _check_finite_result(result, x, rule)
    plan = result.plans[0]
    assert 0 not in plan.partner.tolist()  # kept row 0 is zero
    pruned = plan.pruned.tolist()
    assert plan.partner[pruned.index(4)] == -1
    if keep == 1:  # the only candidate is the zero row: nothing can be merged
        assert plan.merged == 0


@pytest.mark.parametrize("rule", RULES)
def test_all_zero_producer(rule: str) -> None:
    model = ConvBNNet(3, 6, seed=2)
    with torch.no_grad():
        model.conv.weight.zero_()
    x = torch.randn(2, 3, 8, 8, generator=gen(2))
    result = nm.merge(model, x[:1], ratio=0.5, bn_rule=rule, threshold=None)
    _check_finite_result(result, x, rule)


# ------------------------------------------------------------------ paper-rule specifics


def _negative_gamma_model() -> tuple[ConvBNNet, torch.Tensor]:
    """Channel 3 = 2·channel 0 with γ_3 < 0 (all other γ > 0); channels 0..2 are kept."""
    model = ConvBNNet(3, 4, seed=5)
    plant_bn_duplicates(model.conv, model.bn, [(3, 0, 2.0)])
    with torch.no_grad():
        model.bn.weight[3] = -model.bn.weight[3]
    return model, torch.randn(4, 3, 8, 8, generator=gen(5))


def test_paper_rule_merges_a_negative_scale() -> None:
    model, x = _negative_gamma_model()
    result = nm.merge(
        model, x[:1], criterion=keep_first, keep={"conv": 3}, bn_rule="paper", threshold=None
    )
    plan = result.plans[0]
    assert plan.partner.tolist() != [-1]
    assert float(plan.scale[0]) < 0
    _check_finite_result(result, x, "paper")


def test_exact_rule_never_merges_a_negative_scale() -> None:
    model, x = _negative_gamma_model()
    result = nm.merge(
        model, x[:1], criterion=keep_first, keep={"conv": 3}, bn_rule="exact", threshold=None
    )
    plan = result.plans[0]
    assert plan.partner.tolist() == [-1] and plan.merged == 0
    assert result.report.groups[0].merged == 0
    pruned = nm.prune(model, x[:1], criterion=keep_first, keep={"conv": 3})
    assert torch.equal(result.model.fc.weight, pruned.model.fc.weight)


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_paper_rule_all_nan_bias_distances_pick_the_first_candidate(kind: str) -> None:
    """Identical BN statistics on every channel → every bias distance is equal → min-max
    normalisation is 0/0 = NaN for every candidate → the first kept candidate wins."""
    model, name, x = _bn_model(kind, seed=6)
    with torch.no_grad():
        _equal_bias_distances(model)
    kw = {"criterion": keep_first, "keep": {name: 4}, "threshold": None}
    paper = nm.merge(model, x[:1], bn_rule="paper", **kw).plans[0]
    assert paper.partner.tolist() == [0, 0, 0, 0]
    rows = _unit(_producer(model).weight.detach().flatten(1))
    cos = rows[4:] @ rows[:4].T
    torch.testing.assert_close(paper.similarity, cos[:, 0], rtol=1e-5, atol=1e-6)
    # with a threshold, the first candidate is kept only when similar enough
    thresholded = nm.merge(model, x[:1], bn_rule="paper", **{**kw, "threshold": 0.05}).plans[0]
    expected = [0 if c >= 0.05 else -1 for c in cos[:, 0].tolist()]
    assert thresholded.partner.tolist() == expected
    # the exact rule sees equal (zero) bias distances and picks the most similar row
    exact = nm.merge(model, x[:1], bn_rule="exact", **kw).plans[0]
    assert exact.partner.tolist() == cos.argmax(dim=1).tolist()


def test_paper_rule_zero_running_var() -> None:
    """σ = running_var = 0: a pruned neuron gets S = 0 (no contribution) and a kept
    candidate with σ = 0 makes the score row NaN (first candidate); all finite."""
    model, _, x = _bn_model("conv", seed=7)
    with torch.no_grad():
        _zero_var(model)  # channel 3 (kept) and channel 5 (pruned)
    result = nm.merge(
        model, x[:1], criterion=keep_first, keep={"conv": 4}, bn_rule="paper", threshold=None
    )
    plan = result.plans[0]
    assert plan.partner.tolist() == [0, 0, 0, 0]
    assert float(plan.scale[plan.pruned.tolist().index(5)]) == 0.0
    _check_finite_result(result, x, "paper")
    exact = nm.merge(
        model, x[:1], criterion=keep_first, keep={"conv": 4}, bn_rule="exact", threshold=None
    )
    _check_finite_result(exact, x, "exact")


def test_gamma_zero_is_never_merged_with_a_nonfinite_scale() -> None:
    model, _, x = _bn_model("conv", seed=8)
    with torch.no_grad():
        _gamma_zero(model)  # channel 0 (kept), channel 6 (pruned)
    for rule in RULES:
        plan = nm.merge(
            model, x[:1], criterion=keep_first, keep={"conv": 4}, bn_rule=rule, threshold=None
        ).plans[0]
        assert plan.partner[plan.pruned.tolist().index(6)] == -1  # S = ∞ (paper) / 0 (exact)
        if rule == "exact":
            assert 0 not in plan.partner.tolist()  # S* = ∞ with γ_m = 0


# ------------------------------------------------------------------ fuzzing


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    kind=st.sampled_from(["conv", "linear"]),
    n=st.integers(2, 10),
    rule=st.sampled_from(RULES),
    threshold=st.sampled_from([None, -1.0, 0.0, 0.1, 0.9]),
    lam=st.sampled_from([0.0, 0.5, 0.85, 1.0]),
    criterion=st.sampled_from(["l1-norm", "l2-norm", "l2-GM"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_degenerate_channels_never_produce_nonfinite_values(
    data, kind, n, rule, threshold, lam, criterion, seed
) -> None:
    if kind == "conv":
        model = ConvBNNet(2, n, out=3, conv_bias=data.draw(st.booleans()), seed=seed)
        producer, name, x = model.conv, "conv", torch.randn(3, 2, 8, 8, generator=gen(seed))
    else:
        model = LinearBNNet(fin=4, hidden=n, seed=seed)
        producer, name, x = model.fc1, "fc1", torch.randn(3, 4, generator=gen(seed))
    kinds = st.sampled_from(["ok", "zero-row", "gamma0", "gamma<0", "var0", "beta0", "copy"])
    with torch.no_grad():
        for i in range(n):
            what = data.draw(kinds)
            if what == "zero-row":
                producer.weight[i] = 0.0
            elif what == "gamma0":
                model.bn.weight[i] = 0.0
            elif what == "gamma<0":
                model.bn.weight[i] = -model.bn.weight[i]
            elif what == "var0":
                model.bn.running_var[i] = 0.0
            elif what == "beta0":
                model.bn.bias[i] = 0.0
            elif what == "copy" and i > 0:
                producer.weight[i] = producer.weight[i - 1]
                model.bn.bias[i] = model.bn.bias[i - 1]
                model.bn.running_mean[i] = model.bn.running_mean[i - 1]
    keep = data.draw(st.integers(1, n))
    result = nm.merge(
        model,
        x[:1],
        criterion=criterion,
        keep={name: keep},
        bn_rule=rule,
        threshold=threshold,
        lam=lam,
    )
    assert result.model.bn.num_features == keep
    _check_finite_result(result, x, rule)


def test_nonfinite_input_model_is_refused() -> None:
    model = mlp([3, 4, 2])
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    with pytest.raises(nm.ModelError, match="NaN or Inf"):
        nm.merge(model, torch.randn(1, 3))
    bn_model = ConvBNNet(3, 4)
    bn_model.bn.running_var[0] = float("inf")
    with pytest.raises(nm.ModelError, match="running_var"):
        nm.prune(bn_model, torch.randn(1, 3, 8, 8))


def test_keeping_every_neuron_is_the_identity() -> None:
    model, name, x = _bn_model("conv", seed=9)
    result = nm.merge(model, x[:1], keep={name: 8}, bn_rule="exact")
    assert torch.equal(result.model(x), model(x))
    assert result.report.groups[0].pruned == 0


@pytest.mark.parametrize("n", [10, 1 << 15])  # concatenated small tensors, and one large one
def test_finite_check_is_exact(n: int) -> None:
    """The finite check sums first (fast); an overflowing sum of finite values is not a NaN."""
    from neuron_merging.core._copy import check_finite

    model = nn.Linear(n, 2)
    with torch.no_grad():
        model.weight.fill_(3e38)  # every value finite, their sum overflows to +Inf
    check_finite(model)
    for bad in (float("inf"), float("-inf"), float("nan")):
        with torch.no_grad():
            model.weight[1, -1] = bad
        with pytest.raises(nm.ModelError, match="'weight' contains NaN or Inf"):
            check_finite(model)
    with torch.no_grad():  # +Inf and -Inf: their sum is NaN, still caught
        model.weight[0, 0], model.weight[1, -1] = float("inf"), float("-inf")
    with pytest.raises(nm.ModelError, match="NaN or Inf"):
        check_finite(model)


class _OnAnotherDevice(torch.Tensor):
    """Metadata of a tensor on another device, without one: only its device is ever read."""

    @staticmethod
    def __new__(cls, shape: tuple[int, ...], device: str) -> _OnAnotherDevice:
        return torch.Tensor._make_wrapper_subclass(cls, shape, device=device, dtype=torch.float32)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        raise RuntimeError(f"{func} on a placeholder tensor")


def test_model_on_an_accelerator_gets_one_clear_error() -> None:
    """Compression runs on the CPU: a model holding an accelerator tensor is refused up
    front, naming the tensor and the way out, instead of failing part-way with a
    device-mismatch error."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    net[2].register_buffer("scale", _OnAnotherDevice((3,), "cuda"))
    with pytest.raises(nm.ModelError, match=r"buffer '2\.scale' is on cuda.*model\.cpu\(\)"):
        nm.merge(net, torch.randn(2, 4), ratio=0.5)
    with pytest.raises(nm.ModelError, match="is on cuda"):
        nm.prune(net, None, groups=[nm.MergeGroup("0", "2")], ratio=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_on_a_gpu_is_refused_and_its_cpu_copy_compresses() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 4)
    with pytest.raises(nm.ModelError, match="is on cuda"):
        nm.merge(net.cuda(), x.cuda(), ratio=0.5)
    result = nm.merge(net.cpu(), x, ratio=0.5)
    on_gpu = result.model.to("cuda")
    assert torch.allclose(on_gpu(x.cuda()).cpu(), result.model(x), atol=1e-5)
