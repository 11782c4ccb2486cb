"""Fast paths give bit-identical plans and weights to the plain per-group computation.

Covers: same-shaped groups planned as one batch, the chunked ℓ1 criterion,
batched selection and assignment, the flat kernel gather of the fold, reused
scratch memory, and direct parameter swaps (with registration hooks honoured).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import neuron_merging as nm
from _factories import TinyResNet, gen, randomize_bn
from neuron_merging.core import api, build, select
from neuron_merging.core.assign import BNStats, Workspace, assign_bn, assign_plain


class Repeated(nn.Module):
    """Several same-shaped conv → BN → ReLU groups and same-shaped linear groups."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.convs = nn.ModuleList(nn.Conv2d(6, 6, 3, padding=1) for _ in range(4))
        self.bns = nn.ModuleList(nn.BatchNorm2d(6) for _ in range(4))
        self.fcs = nn.ModuleList(
            [nn.Linear(6 * 16, 12), nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 3)]
        )
        g = gen(seed)
        for bn in self.bns:
            randomize_bn(bn, g)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns, strict=True):
            x = torch.relu(bn(conv(x)))
        x = torch.flatten(x, 1)
        for fc in self.fcs[:-1]:
            x = torch.relu(fc(x))
        return self.fcs[-1](x)


def _plans_equal(a: list[build.GroupPlan], b: list[build.GroupPlan]) -> None:
    assert [p.group for p in a] == [p.group for p in b]
    for x, y in zip(a, b, strict=True):
        for field in ("kept", "pruned", "partner", "scale", "similarity"):
            assert torch.equal(getattr(x, field), getattr(y, field)), (x.group, field)


def _weights_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("criterion", ["l1-norm", "l2-norm", "l2-GM"])
@pytest.mark.parametrize("bn_rule", ["paper", "exact"])
@pytest.mark.parametrize("mode", ["merge", "prune"])
def test_batched_planning_equals_planning_each_group_alone(
    criterion: str, bn_rule: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_sizes: list[int] = []
    select = api.select_kept

    def spy(rows: torch.Tensor, keep: int, crit: object) -> torch.Tensor:
        batch_sizes.append(rows.shape[0])
        return select(rows, keep, crit)  # type: ignore[arg-type]

    monkeypatch.setattr(api, "select_kept", spy)
    for seed, (model, x) in enumerate(
        [
            (Repeated(0), torch.randn(1, 6, 4, 4)),
            (TinyResNet(channels=4, mid=6, seed=1), torch.randn(1, 3, 6, 6)),
        ]
    ):
        config = nm.MergeConfig(
            mode=mode, ratio=0.5, criterion=criterion, bn_rule=bn_rule, threshold=None
        )
        batch_sizes.clear()
        batched = nm.compress(model, x, config)
        assert max(batch_sizes) >= 2, seed  # same-shaped groups really were batched
        batch_sizes.clear()
        with monkeypatch.context() as patch:
            patch.setattr(api, "_BATCH_ELEMENTS", -1)  # every group alone
            alone = nm.compress(model, x, config)
        assert batch_sizes and set(batch_sizes) == {1}
        _plans_equal(batched.plans, alone.plans)
        _weights_equal(batched.model, alone.model)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    width=st.integers(1, 70),
    chunk=st.integers(1, 300),
    seed=st.integers(0, 2**16),
)
def test_chunked_l1_is_bit_identical(n: int, width: int, chunk: int, seed: int) -> None:
    rows = torch.randn(n, width, generator=gen(seed)) * 10 ** torch.randint(-3, 4, (n, 1))
    previous = select._L1_CHUNK_ELEMENTS
    select._L1_CHUNK_ELEMENTS = chunk
    try:
        assert torch.equal(select.l1_norm(rows), rows.abs().sum(dim=1))
    finally:
        select._L1_CHUNK_ELEMENTS = previous


def _custom(rows: torch.Tensor) -> torch.Tensor:
    return -rows[:, 0]


@pytest.mark.parametrize("criterion", ["l1-norm", "l2-norm", "l2-GM", _custom])
def test_batched_selection_equals_per_group_selection(criterion: object) -> None:
    rows = torch.randn(5, 9, 7, generator=gen(3))
    rows[1, 4] = rows[1, 2]  # a tie
    batched = select.select_kept(rows, 4, criterion)  # type: ignore[arg-type]
    for b in range(5):
        assert torch.equal(batched[b], select.select_kept(rows[b], 4, criterion))  # type: ignore[arg-type]


def test_batched_custom_criterion_with_a_wrong_shape_is_a_config_error() -> None:
    with pytest.raises(nm.ConfigError, match=r"expected \(9,\)"):
        select.select_kept(torch.randn(2, 9, 3), 4, lambda rows: rows.sum())


def _bn_stats(b: int, n: int, seed: int) -> BNStats:
    g = gen(seed)
    return BNStats(
        torch.rand(b, n, generator=g) + 0.5,
        torch.randn(b, n, generator=g),
        torch.randn(b, n, generator=g),
        torch.rand(b, n, generator=g) + 0.1,
        1e-5,
    )


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 4),
    n=st.integers(2, 12),
    f=st.integers(1, 20),
    rule=st.sampled_from(["none", "paper", "exact"]),
    seed=st.integers(0, 2**16),
)
def test_batched_assignment_equals_per_group_assignment(
    b: int, n: int, f: int, rule: str, seed: int
) -> None:
    g = gen(seed)
    rows = torch.randn(b, n, f, generator=g)
    k = max(1, n // 2)
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])
    kept = order[:, :k].sort(dim=1).values
    pruned = order[:, k:].sort(dim=1).values
    stats = _bn_stats(b, n, seed)
    workspace = Workspace()

    def run(r: torch.Tensor, s: BNStats | None, kk: torch.Tensor, pp: torch.Tensor):
        if rule == "none":
            return assign_plain(r, kk, pp, 0.0, workspace)
        return assign_bn(r, s, kk, pp, 0.0, 0.85, rule, workspace)  # type: ignore[arg-type]

    batched = run(rows, stats, kept, pruned)
    for i in range(b):
        one = BNStats(stats.gamma[i], stats.beta[i], stats.mean[i], stats.var[i], stats.eps)
        alone = run(rows[i], one, kept[i], pruned[i])
        for field in ("partner", "scale", "similarity"):
            assert torch.equal(getattr(batched, field)[i], getattr(alone, field)), field


def test_workspace_reuses_buffers_and_aligns_each_group() -> None:
    ws = Workspace()
    small = ws.take("a", (2, 3), torch.float32)
    again = ws.take("a", (2, 2), torch.float32)
    assert again.data_ptr() == small.data_ptr()
    big = ws.take("a", (5, 7, 3), torch.float32)
    assert big.shape == (5, 7, 3)
    for group in big:
        assert group.is_contiguous() and group.data_ptr() % 64 == 0
    assert ws.take("b", (1, 5, 3), torch.float64).is_contiguous()
    assert ws.take("b", (2, 2), torch.float64).dtype == torch.float64


def test_flat_kernel_gather_equals_row_slicing(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Repeated(5)
    x = torch.randn(1, 6, 4, 4)
    config = nm.MergeConfig(ratio=0.5, threshold=None, bn_rule="exact")
    monkeypatch.setattr(build, "_FLAT_GATHER_ELEMENTS", 0)
    monkeypatch.setattr(build, "FOLD_BLOCK_ELEMENTS", 100)  # several blocks per layer
    flat = nm.compress(model, x, config)
    monkeypatch.setattr(build, "_FLAT_GATHER_WIDTH", 10**9)
    sliced = nm.compress(model, x, config)
    _plans_equal(flat.plans, sliced.plans)
    _weights_equal(flat.model, sliced.model)


def test_parameter_registration_hooks_still_run() -> None:
    seen: list[str] = []

    def hook(module: nn.Module, name: str, param: torch.Tensor) -> None:
        seen.append(name)

    handle = nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        result = nm.merge(Repeated(2), torch.randn(1, 6, 4, 4), ratio=0.5)
    finally:
        handle.remove()
    assert "weight" in seen
    assert result.model.convs[0].weight.shape[0] == 3


class Twins(nn.Module):
    """Two identical-shaped Linear → ReLU → Linear chains, so their layers are built as one batch."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2 = nn.Linear(3, 2, bias=False), nn.Linear(2, 2)
        self.b1, self.b2 = nn.Linear(3, 2, bias=False), nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a2(torch.relu(self.a1(x))) + self.b2(torch.relu(self.b1(x)))


@pytest.mark.parametrize("threshold", [None, 0.3])
@pytest.mark.parametrize("mode", ["merge", "prune"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("stack_limit", [None, 700])
def test_batched_build_equals_building_each_layer_alone(
    threshold: float | None,
    mode: str,
    seed: int,
    stack_limit: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same-shaped layers and batch norms are sliced and folded as one stack, bit for bit.

    ``Repeated`` has convolutions and linear layers that both consume one group
    and produce the next (row selection and fold at once); ``TinyResNet`` has
    producer-only and consumer-only convolutions. A threshold leaves some pruned
    neurons without a partner inside a batch. With ``stack_limit``, batches are
    split so that no stacked copy exceeds it.
    """
    batches: list[int] = []
    fold_batch, gather_rows = build.fold_batch, build.gather_rows
    if stack_limit is not None:
        monkeypatch.setattr(build, "_STACK_ELEMENTS", stack_limit)

    def stacked(tensors: list[torch.Tensor]) -> None:
        batches.append(len(tensors))
        assert stack_limit is None or sum(t.numel() for t in tensors) <= stack_limit

    def fold_spy(weights: list[torch.Tensor], *args: object) -> object:
        stacked(weights)
        return fold_batch(weights, *args)  # type: ignore[arg-type]

    def rows_spy(tensors: list[torch.Tensor], index: list[torch.Tensor]) -> list[torch.Tensor]:
        stacked(tensors)
        return gather_rows(tensors, index)

    for model, x in [
        (Repeated(seed), torch.randn(1, 6, 4, 4)),
        (TinyResNet(channels=4, mid=6, seed=seed), torch.randn(1, 3, 6, 6)),
    ]:
        config = nm.MergeConfig(mode=mode, ratio=0.5, threshold=threshold, bn_rule="exact")
        with monkeypatch.context() as patch:
            patch.setattr(build, "fold_batch", fold_spy)
            patch.setattr(build, "gather_rows", rows_spy)
            batches.clear()
            batched = nm.compress(model, x, config)
            assert max(batches) >= 2  # layers really were built together
            patch.setattr(build, "_BATCH_ELEMENTS", -1)  # every layer alone
            batches.clear()
            alone = nm.compress(model, x, config)
            assert set(batches) <= {1}
        _plans_equal(batched.plans, alone.plans)
        _weights_equal(batched.model, alone.model)
        if threshold is not None and mode == "merge":
            assert any(bool((p.partner < 0).any()) for p in batched.plans)


def test_batched_fold_that_overflows_drops_those_merges_layer_by_layer() -> None:
    """One chain of a batch would fold to Inf: only its merge is dropped, the twin merges.

    In chain ``a`` the pruned neuron is parallel to a kept one of norm 1e-20
    (scale 1e20) and its consumer column holds 1e30; chain ``b`` is harmless.
    """
    model = Twins().eval()
    with torch.no_grad():
        model.a1.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [1e-20, 2e-20, 3e-20]]))
        model.a2.weight.copy_(torch.tensor([[1e30, 1.0], [1.0, 1.0]]))
        model.b1.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]]))
        model.b2.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))

    def keep_second(rows: torch.Tensor) -> torch.Tensor:
        return torch.tensor([0.0, 1.0])

    result = nm.merge(
        model, torch.randn(1, 3), keep={"a1": 1, "b1": 1}, criterion=keep_second, threshold=0
    )
    plans = {p.group.name: p for p in result.plans}
    assert plans["a1"].partner.tolist() == [-1] and plans["a1"].scale.tolist() == [0.0]
    assert plans["b1"].partner.tolist() == [0] and plans["b1"].scale.tolist() == [0.5]
    assert torch.equal(result.model.a2.weight, model.a2.weight[:, 1:])
    assert torch.equal(result.model.b2.weight, torch.tensor([[2.5], [5.5]]))
    assert all(bool(torch.isfinite(t).all()) for t in result.model.state_dict().values())
