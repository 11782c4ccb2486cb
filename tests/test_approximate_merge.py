"""``approximate=True``: merging through GELU, SiLU, ReLU6, Hardswish and SwiGLU, end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neuron_merging as nm

ACTIVATIONS = {
    "GELU": (nn.GELU, "gelu"),
    "SiLU": (nn.SiLU, "silu"),
    "ReLU6": (nn.ReLU6, "relu6"),
    "Hardswish": (nn.Hardswish, "hardswish"),
}


class SwiGLU(nn.Module):
    """A LLaMA-style gated FFN: ``down(silu(gate(x)) · up(x))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def _error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y = reference(x)
        return float((model(x) - y).norm() / y.norm())


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_approximate_merge_beats_pruning_on_gaussian_inputs(name: str, seed: int) -> None:
    torch.manual_seed(seed)
    cls, activation = ACTIVATIONS[name]
    net = nn.Sequential(nn.Linear(16, 64), cls(), nn.Linear(64, 8)).eval()
    x = torch.randn(4000, 16, generator=torch.Generator().manual_seed(seed))
    groups, _ = nm.find_groups(net, x[:1])
    assert (groups[0].mergeable, groups[0].activation) == (False, activation)
    plain = nm.merge(net, x[:1], ratio=0.5)
    approx = nm.merge(net, x[:1], ratio=0.5, approximate=True)
    (report,) = approx.report.groups
    assert (plain.report.groups[0].method, report.method) == ("pruned", "approximate")
    assert report.merged > 0 and approx.plans[0].approximate
    assert _error(approx.model, net, x) < _error(plain.model, net, x)
    assert approx.report.params_after == plain.report.params_after


def test_swiglu_gate_and_up_are_one_group_merged_approximately() -> None:
    torch.manual_seed(0)
    net = SwiGLU(16, 64).eval()
    x = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0))
    (group,), _ = nm.find_groups(net, x[:1])
    assert (group.producers, group.consumers) == (("gate", "up"), ("down",))
    assert (group.activation, group.gate) == ("swiglu", "gate")
    plain = nm.merge(net, x[:1], ratio=0.5)
    approx = nm.merge(net, x[:1], ratio=0.5, approximate=True)
    assert approx.report.groups[0].method == "approximate"
    assert approx.model.gate.out_features == approx.model.up.out_features == 32
    assert _error(approx.model, net, x) < _error(plain.model, net, x)


def test_approximate_leaves_exact_groups_and_other_activations_alone() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 3)
    ).eval()
    x = torch.randn(1, 8)
    exact = nm.merge(net, x, ratio=0.5)
    approx = nm.merge(net, x, ratio=0.5, approximate=True)
    assert [g.method for g in approx.report.groups] == ["merged", "pruned"]  # no rule for sigmoid
    for a, b in zip(
        exact.model.state_dict().values(), approx.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_approximate_is_a_serialisable_config_option() -> None:
    config = nm.MergeConfig(approximate=True, coupled=True)
    assert nm.MergeConfig.from_dict(config.to_dict()) == config
    with pytest.raises(nm.ConfigError, match="approximate must be True or False"):
        nm.MergeConfig(approximate="yes")  # type: ignore[arg-type]
