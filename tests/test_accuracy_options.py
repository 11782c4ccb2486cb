"""Options beyond the paper: merge-aware selection, folding, repair, least squares, calibration."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import TypeVar

import pytest
import torch
from torch import nn

import neuron_merging as nm
from _factories import assert_lossless, gen, same_state, state_copy
from neuron_merging.core import lstsq
from neuron_merging.core.config import MergeConfig
from neuron_merging.core.moments import relu_cross_moments, relu_mean, relu_second

_Net = TypeVar("_Net", bound=nn.Module)


def _random_bn_stats(net: _Net) -> _Net:
    """``net`` in eval mode with random batch-norm statistics and affine parameters."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return net.eval()


def _conv_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 10, 3, padding=1, bias=False),
        nn.BatchNorm2d(10),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(10 * 6 * 6, 7),
    )
    return _random_bn_stats(net)


def _planted_linear(bn: bool) -> nn.Sequential:
    """12 neurons: positive multiples of 4 base neurons (exact when folded into 4)."""
    g = gen(3)
    base_w, base_b = torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
    cluster = torch.arange(12) % 4
    t = torch.rand(12, generator=g) + 0.5
    layers: list[nn.Module] = [nn.Linear(8, 12)]
    layers[0].weight.data = base_w[cluster] * t[:, None]
    layers[0].bias.data = base_b[cluster] * t
    if bn:
        norm = nn.BatchNorm1d(12)
        gamma = torch.rand(12, generator=g) + 0.5
        var = torch.rand(12, generator=g) + 0.5
        mean = torch.randn(12, generator=g)
        sigma = torch.sqrt(var + norm.eps)
        c = gamma * t / sigma  # effective row = c · base (the producer bias sits in μ − b)
        norm.running_var.copy_(var)
        norm.running_mean.copy_(mean)
        norm.weight.data = gamma
        # β − γ(μ − b)/σ must equal c · base_b': choose β accordingly
        norm.bias.data = c * base_b[cluster] + gamma * (mean - layers[0].bias.data) / sigma
        layers.append(norm)
    layers += [nn.ReLU(), nn.Linear(12, 5)]
    return nn.Sequential(*layers).eval()


@pytest.mark.parametrize("bn", [False, True])
def test_fold_is_lossless_on_planted_clusters(bn: bool) -> None:
    net = _planted_linear(bn)
    x = torch.randn(256, 8, generator=gen(1))
    cfg = MergeConfig(ratio=8 / 12, threshold=None, selection="cover", compensation="fold")
    out = nm.compress(net, x[:1], cfg)
    assert out.model[0].out_features == 4
    assert_lossless(out.model(x), net(x))
    # The paper's merge on the same clusters is lossy only through its BN rule; the
    # fold must be exact regardless of which neuron of a cluster seeded it.
    cfg2 = replace(cfg, selection="criterion", criterion="l2-norm")
    seeded = nm.compress(net, x[:1], cfg2)
    if len({int(i) % 4 for i in seeded.plans[0].kept}) == 4:  # one seed per cluster
        assert_lossless(seeded.model(x), net(x))


def test_moments_match_monte_carlo() -> None:
    g = gen(5)
    m, s = torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.3
    a = torch.randn(5, 5, generator=g)
    cov = a @ a.T + 0.5 * torch.eye(5)
    d = cov.diagonal().sqrt()
    corr = cov / d[:, None] / d[None, :]
    z = torch.distributions.MultivariateNormal(
        m.double(), (s[:, None] * corr * s[None, :]).double()
    ).sample((400_000,))
    r = z.clamp_min(0)
    # 400k samples: standard errors of these moments are below 3e-3 for O(1) values.
    torch.testing.assert_close(r.mean(0), relu_mean(m.double(), s.double()), atol=1e-2, rtol=0)
    torch.testing.assert_close(
        (r * r).mean(0), relu_second(m.double(), s.double()), atol=2e-2, rtol=0
    )
    torch.testing.assert_close(r.T @ r / len(r), relu_cross_moments(m, s, corr), atol=2e-2, rtol=0)


def _gaussian_chain(seed: int) -> tuple[nn.Sequential, torch.Tensor]:
    """x ~ N(0, I) → Linear → BN (exact statistics) → ReLU → Linear: the repair's model holds."""
    g = gen(seed)
    net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    w = net[0].weight.data
    net[1].running_mean.copy_(net[0].bias.data)  # E[w·x + b] = b
    net[1].running_var.copy_((w * w).sum(1))  # Var = ‖w‖² for white x
    net[1].weight.data = torch.rand(16, generator=g) + 0.5
    net[1].bias.data = torch.randn(16, generator=g)
    return net.eval(), torch.randn(200_000, 6, generator=g)


@pytest.mark.parametrize("mode", ["prune", "merge"])
def test_mean_repair_is_exact_under_its_model(mode: str) -> None:
    net, x = _gaussian_chain(7)
    cfg = MergeConfig(ratio=0.5, mode=mode, repair="mean", gram="whitened")
    plain = nm.compress(net, x[:1], replace(cfg, repair="none")).model
    fixed = nm.compress(net, x[:1], cfg).model
    with torch.no_grad():
        y, y_plain, y_fixed = net(x), plain(x), fixed(x)
    # Monte Carlo: the standard error of a mean over 200k samples is std/447 (< 0.01
    # here); the corrected expectation must agree within 4 standard errors.
    se = (y - y_fixed).std(0) / len(x) ** 0.5
    assert bool(((y - y_fixed).mean(0).abs() <= 4 * se + 1e-4).all())
    assert float((y - y_plain).mean(0).abs().max()) > 10 * float(se.max())


def test_lstsq_whitened_is_exact_where_input_is_white() -> None:
    """With white inputs the whitened Gram is the truth: least squares beats the merge."""
    net, x = _gaussian_chain(8)
    base = MergeConfig(ratio=0.5, threshold=None, bn_rule="exact", gram="whitened")
    merged = nm.compress(net, x[:1], replace(base, repair="mean")).model
    fitted = nm.compress(net, x[:1], replace(base, compensation="lstsq", repair="mean")).model
    with torch.no_grad():
        y = net(x)
        e_merge = float((merged(x) - y).pow(2).mean())
        e_fit = float((fitted(x) - y).pow(2).mean())
    assert e_fit < e_merge


def test_lstsq_select_matches_brute_force_downdate() -> None:
    g = gen(2)
    a = torch.randn(7, 7, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.1 * torch.eye(7, dtype=torch.float64)
    b = torch.randn(7, 5, generator=g, dtype=torch.float64)
    gram = b @ b.T

    def error(keep: list[int]) -> float:
        kk = torch.tensor(keep)
        mix, _ = lstsq.solve_mix(cov, torch.zeros(7, dtype=torch.float64), kk, ridge=0.0)
        resid = torch.eye(7, dtype=torch.float64) - torch.zeros(7, 7, dtype=torch.float64)
        resid = resid.clone()
        resid[:, kk] -= mix  # a − mix·a_K as a linear map of a
        return float(torch.trace(gram @ resid @ cov @ resid.T))

    first = lstsq.lstsq_select(cov, gram, 6)
    best = min(itertools.combinations(range(7), 6), key=lambda k: error(list(k)))
    assert first.tolist() == list(best)
    chosen = lstsq.lstsq_select(cov, gram, 3)
    assert error(chosen.tolist()) <= error([0, 1, 2]) + 1e-9 or chosen.numel() == 3


OPTIONS = [
    {"selection": s, "compensation": c, "repair": r}
    for s in ("criterion", "group", "cover", "lstsq")
    for c in ("merge", "fold", "lstsq")
    for r in ("none", "mean", "mean+var")
]


def _check_deterministic_and_finite(cfg: MergeConfig, calibration: torch.Tensor | None) -> None:
    net = _conv_net()
    x = torch.randn(1, 3, 6, 6)
    data = torch.randn(32, 3, 6, 6, generator=gen(4))
    a = nm.compress(net, x, cfg, calibration=calibration).model
    b = nm.compress(net, x, cfg, calibration=calibration).model
    assert same_state(state_copy(a), state_copy(b)), cfg
    assert all(torch.isfinite(t).all() for t in a.state_dict().values()), cfg
    assert torch.isfinite(a(data)).all(), cfg


def test_best_recipe_is_deterministic_and_finite() -> None:
    opts = {"selection": "lstsq", "compensation": "lstsq", "repair": "mean+var"}
    _check_deterministic_and_finite(MergeConfig(ratio=0.5, **opts), None)
    data = torch.randn(24, 3, 6, 6, generator=gen(8))
    _check_deterministic_and_finite(MergeConfig(ratio=0.5, calibrate=("lstsq",), **opts), data)


def test_every_option_is_deterministic_and_finite() -> None:
    for opts in OPTIONS:
        _check_deterministic_and_finite(MergeConfig(ratio=0.5, **opts), None)


@pytest.mark.parametrize("criterion", nm.available_criteria())
@pytest.mark.parametrize("bn_rule", ["paper", "exact"])
@pytest.mark.parametrize("mode", ["merge", "prune"])
def test_options_compose_with_every_criterion_and_bn_rule(
    criterion: str, bn_rule: str, mode: str
) -> None:
    base = MergeConfig(ratio=0.5, criterion=criterion, bn_rule=bn_rule, mode=mode)
    for opts in (
        {"selection": "group"},
        {"selection": "cover", "compensation": "fold", "repair": "mean"},
        {"selection": "lstsq", "compensation": "lstsq", "repair": "mean+var"},
    ):
        _check_deterministic_and_finite(replace(base, **opts), None)
    data = torch.randn(24, 3, 6, 6, generator=gen(8))
    cal = replace(base, selection="lstsq", calibrate=("lstsq", "repair", "bn"))
    _check_deterministic_and_finite(cal, data)
    steps = ("flip", "lstsq-joint", "lstsq-block", "repair", "bn")
    _check_deterministic_and_finite(replace(base, selection="lstsq", calibrate=steps), data)
    _check_residual_deterministic_and_finite(replace(base, calibrate=steps))


def test_calibration_uses_no_labels_and_no_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _conv_net()
    data = torch.randn(40, 3, 6, 6, generator=gen(6))

    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("calibration must not compute gradients")

    monkeypatch.setattr(torch.Tensor, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    cfg = MergeConfig(
        ratio=0.5, selection="lstsq", compensation="lstsq", calibrate=("lstsq", "repair", "bn")
    )
    before = state_copy(net)
    out = nm.compress(net, data[:1], cfg, calibration=data)  # inputs only: no labels exist
    assert same_state(before, state_copy(net))  # the input model is untouched
    assert all(p.grad is None for p in out.model.parameters())
    assert all(p.grad is None for p in net.parameters())
    # calibration reduces the output error on held-out inputs of the same distribution
    held = torch.randn(200, 3, 6, 6, generator=gen(9))
    plain = nm.compress(net, data[:1], MergeConfig(ratio=0.5)).model
    with torch.no_grad():
        ref = net(held)
        assert float((out.model(held) - ref).pow(2).mean()) < float(
            (plain(held) - ref).pow(2).mean()
        )


def test_defaults_keep_the_paper_path() -> None:
    net = _conv_net()
    x = torch.randn(1, 3, 6, 6)
    cfg = MergeConfig(ratio=0.5)
    assert not cfg.beyond_paper
    out = nm.compress(net, x, cfg)
    assert "compensate" not in out.report.timings


def test_config_round_trip_and_errors() -> None:
    cfg = MergeConfig(
        selection="lstsq",
        compensation="fold",
        gram="whitened",
        repair="mean+var",
        ridge=0.01,
        seed=3,
        calibrate=("lstsq", "bn"),
    )
    assert MergeConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (
        {"selection": "magic"},
        {"compensation": "x"},
        {"gram": "y"},
        {"repair": "z"},
        {"ridge": -1.0},
        {"ridge": float("nan")},
        {"seed": 1.5},
        {"calibrate": "lstsq"},
        {"calibrate": ("nope",)},
    ):
        with pytest.raises(nm.ConfigError):
            MergeConfig(**bad)


# ----------------------------------------------------- calibration: block target, producers, flip


class _Block(nn.Module):
    """A pre-activated residual block (the released ResNet-56 layout): ``bn2(conv2(..)) + x``."""

    def __init__(self, c: int, mid: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, mid, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x)
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x


class _ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = _Block(8, 12)
        self.b2 = _Block(8, 12)
        self.head = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b2(self.b1(self.stem(x)))).flatten(1))


def _res_net(seed: int = 0) -> _ResNet:
    torch.manual_seed(seed)
    net = _ResNet()
    return _random_bn_stats(net)


def _check_residual_deterministic_and_finite(cfg: MergeConfig) -> None:
    net = _res_net()
    data = torch.randn(32, 3, 6, 6, generator=gen(4))
    a = nm.compress(net, data[:1], cfg, calibration=data).model
    b = nm.compress(net, data[:1], cfg, calibration=data).model
    assert same_state(state_copy(a), state_copy(b)), cfg
    assert all(torch.isfinite(t).all() for t in a.state_dict().values()), cfg
    assert torch.isfinite(a(data)).all(), cfg


def _block_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(model, n).register_forward_hook(
            lambda _m, _a, o, n=n: out.__setitem__(n, o.detach())
        )
        for n in ("b1", "b2")
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def test_residual_parents_are_found_by_the_probe() -> None:
    from neuron_merging.core.calibrate import residual_parents
    from neuron_merging.core.compensate import successor_bns

    net, data = _res_net(), torch.randn(4, 3, 6, 6, generator=gen(1))
    succ = successor_bns(net, data[:1], ["b1.conv2", "b2.conv2", "b1.conv1"])
    assert succ == {"b1.conv2": "b1.bn2", "b2.conv2": "b2.bn2", "b1.conv1": "b1.bn1"}
    with torch.no_grad():
        found = residual_parents(net, (data,), list(succ), succ)
    # conv1's BN output goes through a ReLU and conv2 before the sum: not additive.
    assert found == {"b1.conv2": "b1", "b2.conv2": "b2"}
    seq = _conv_net()  # conv → BN → ReLU in a Sequential: nothing additive
    x = torch.randn(4, 3, 6, 6, generator=gen(2))
    s2 = successor_bns(seq, x[:1], ["3"])
    with torch.no_grad():
        assert residual_parents(seq, (x,), ["3"], s2) == {}


def test_block_refit_minimises_the_block_output_error() -> None:
    """With the same inputs, the block-target refit's block output is the least-squares best."""
    net = _res_net()
    data = torch.randn(96, 3, 6, 6, generator=gen(3))
    base = MergeConfig(ratio=0.5, ridge=1e-9)
    ref = _block_outputs(net, data)["b1"]
    errors = {}
    for steps in (("lstsq",), ("lstsq-block",)):
        model = nm.compress(net, data[:1], replace(base, calibrate=steps), calibration=data).model
        errors[steps[0]] = float((_block_outputs(model, data)["b1"] - ref).pow(2).mean())
    assert errors["lstsq-block"] < errors["lstsq"]
    # and on held-out inputs the whole network is closer to the original
    held = torch.randn(400, 3, 6, 6, generator=gen(5))
    with torch.no_grad():
        y = net(held)
        out = {
            s: float(
                nm.compress(net, data[:1], replace(base, calibrate=(s,)), calibration=data)
                .model(held)
                .sub(y)
                .pow(2)
                .mean()
            )
            for s in ("lstsq", "lstsq-block")
        }
    assert out["lstsq-block"] < out["lstsq"]


def test_producer_refit_matches_the_kept_rows() -> None:
    """After ``lstsq-joint`` the second producer's kept outputs are closer to the original's."""
    net = _res_net()
    data = torch.randn(96, 3, 6, 6, generator=gen(6))
    base = MergeConfig(ratio=0.5, ridge=1e-9)

    def conv1_error(steps: tuple[str, ...]) -> float:
        res = nm.compress(net, data[:1], replace(base, calibrate=steps), calibration=data)
        kept = next(p.kept for p in res.plans if p.group.producer == "b2.conv1")
        got: dict[str, torch.Tensor] = {}
        for name, model in (("ref", net), ("new", res.model)):
            h = model.b2.conv1.register_forward_hook(
                lambda _m, _a, o, name=name: got.__setitem__(name, o.detach())
            )
            with torch.no_grad():
                model(data)
            h.remove()
        # pre-BN outputs: compare after each model's own BN mean (the intercept lives there)
        mo = net.b2.bn1.running_mean[kept].view(1, -1, 1, 1)
        mn = res.model.b2.bn1.running_mean.view(1, -1, 1, 1)
        return float(((got["new"] - mn) - (got["ref"][:, kept] - mo)).pow(2).mean())

    # least squares on the compressed model's own inputs; the unrefit rows are one candidate
    assert conv1_error(("lstsq-joint",)) < 0.9 * conv1_error(())


def test_flip_step_is_the_mirrored_data() -> None:
    net = _res_net()
    data = torch.randn(24, 3, 6, 6, generator=gen(7))
    cfg = MergeConfig(ratio=0.5, calibrate=("flip", "lstsq-block"))
    a = nm.compress(net, data[:1], cfg, calibration=data).model
    both = torch.cat([data, data.flip(-1)])
    b = nm.compress(net, data[:1], replace(cfg, calibrate=("lstsq-block",)), calibration=both).model
    assert same_state(state_copy(a), state_copy(b))


def test_auto_selection_keeps_the_closer_candidate() -> None:
    """``selection="auto"``: lstsq without data; with data, the lower calibration output error."""
    from neuron_merging.core.api import calibration_error

    net = _res_net()
    data = torch.randn(48, 3, 6, 6, generator=gen(12))
    base = MergeConfig(ratio=0.5, compensation="lstsq", repair="mean+var", calibrate=("lstsq",))
    free = nm.compress(net, data[:1], replace(base, selection="auto"))
    lsq = nm.compress(net, data[:1], replace(base, selection="lstsq"))
    assert same_state(state_copy(free.model), state_copy(lsq.model))
    assert free.report.config["selection"] == "auto"
    auto = nm.compress(net, data[:1], replace(base, selection="auto"), calibration=data)
    errors = {}
    for how in ("criterion", "lstsq"):
        res = nm.compress(net, data[:1], replace(base, selection=how), calibration=data)
        errors[how] = (calibration_error(net, res.model, data), state_copy(res.model))
    chosen = min(errors, key=lambda h: errors[h][0])
    assert same_state(state_copy(auto.model), errors[chosen][1])
    assert calibration_error(net, auto.model, data) == min(e for e, _s in errors.values())
    assert any(f"chose {chosen}" in n for n in auto.report.notes)


@pytest.mark.parametrize(
    "options, calibrated",
    [
        ({"selection": "lstsq"}, False),
        ({"compensation": "lstsq"}, False),
        ({"repair": "mean+var"}, False),
        ({}, True),
        ({"calibrate": ("bn",)}, True),
    ],
)
def test_options_leave_a_training_mode_model_untouched(options: dict, calibrated: bool) -> None:
    """The passes over the caller's model (moments, correlations, successor batch norms,
    calibration) run it in eval mode: a model left in training mode keeps its batch-norm
    statistics and its modes, and is compressed as its eval-mode self is."""
    x = torch.randn(16, 3, 6, 6, generator=gen(19))
    calibration = x if calibrated else None
    cfg = MergeConfig(ratio=0.5, **options)
    expected = nm.compress(_conv_net(4), x[:1], cfg, calibration=calibration).model
    net = _conv_net(4).train()
    before = state_copy(net)
    result = nm.compress(net, x[:1], cfg, calibration=calibration).model
    assert same_state(state_copy(net), before)
    assert all(m.training for m in net.modules())
    assert same_state(state_copy(result.eval()), state_copy(expected))


class _GeluThenRelu(nn.Module):
    """fc1 → GELU → fc2 → ReLU → fc3: fc2 reads a group the options cannot rewrite (GELU,
    pruned only) and produces one they could."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(nn.functional.gelu(self.fc1(x)))))


BEYOND = [
    {"selection": "group"},
    {"selection": "cover"},
    {"compensation": "fold"},
    {"compensation": "lstsq"},
    {"repair": "mean"},
    {"selection": "lstsq", "compensation": "lstsq", "repair": "mean+var"},
]


@pytest.mark.parametrize("opts", BEYOND, ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
def test_a_layer_shared_with_a_group_of_the_paper_keeps_the_paper_options(opts: dict) -> None:
    """The options rewrite a group's layers whole: a layer that a pruned-only group also
    slices (fc2's input columns) would lose that slicing (the model failed on its first
    forward), so fc2's group uses the paper's options, as the note says."""
    net, x = _GeluThenRelu(), torch.randn(5, 4, generator=gen(1))
    result = nm.compress(net, x, MergeConfig(ratio=0.5, **opts))
    paper = nm.compress(net, x, MergeConfig(ratio=0.5))
    assert same_state(state_copy(result.model), state_copy(paper.model))
    assert any("2 other group(s) used the options of the paper" in n for n in result.report.notes)
    assert result.model(torch.randn(7, 4)).shape == (7, 3)


@pytest.mark.parametrize("name", ["resnet_bottleneck", "densenet", "inception", "resnet_cifar_a"])
@pytest.mark.parametrize("opts", BEYOND, ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
def test_options_with_coupled_groups_give_a_model_that_runs(name: str, opts: dict) -> None:
    from _zoo import ZOO, run

    make, x = ZOO[name]
    net = make()
    result = nm.compress(net, x, MergeConfig(ratio=0.5, coupled=True, **opts))
    for layer in result.model.modules():
        if isinstance(layer, nn.Conv2d):
            assert layer.weight.shape[:2] == (layer.out_channels, layer.in_channels // layer.groups)
    out = run(result.model, x)
    assert out.shape == run(net, x).shape and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "config",
    [
        MergeConfig(calibrate=("lstsq",)),
        MergeConfig(calibrate=("bn",)),
        MergeConfig(selection="lstsq", compensation="lstsq", repair="mean+var"),
    ],
    ids=["lstsq", "bn", "lstsq-selection"],
)
def test_calibration_with_a_non_finite_sample_is_refused(config: MergeConfig) -> None:
    """One NaN pixel made every refit NaN (the returned model output NaN on clean inputs)
    or raised an internal assertion of ``torch.linalg.lstsq``."""
    net = _conv_net()
    images = torch.randn(4, 3, 6, 6, generator=gen(2))
    images[2, 1, 3, 3] = float("nan")
    with pytest.raises(nm.ConfigError, match="calibration contains NaN or Inf"):
        nm.compress(net, torch.randn(1, 3, 6, 6), config, calibration=images)


@pytest.mark.parametrize(
    "calibration, words",
    [
        (torch.randn(4, 3, 6, 6).double(), "Input type"),
        ([torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)], "positional"),  # two batches
        (torch.randn(4, 5, 6, 6), "expected input"),
    ],
    ids=["float64", "a list of batches", "wrong channels"],
)
def test_calibration_inputs_the_model_cannot_run_are_a_model_error(calibration, words) -> None:
    """They raised raw RuntimeError/TypeError from inside the calibration steps."""
    net = _conv_net()
    with pytest.raises(nm.ModelError, match="on the calibration inputs failed") as caught:
        nm.compress(
            net, torch.randn(1, 3, 6, 6), MergeConfig(calibrate=("lstsq",)), calibration=calibration
        )
    assert words in str(caught.value)


def test_calibration_that_is_not_tensors_is_a_config_error() -> None:
    for calibration, words in (((), "empty"), (("images",), "must be a tensor")):
        with pytest.raises(nm.ConfigError, match=words):
            nm.compress(
                _conv_net(), torch.randn(1, 3, 6, 6), MergeConfig(), calibration=calibration
            )


class _Tokens(nn.Module):
    """fc1 → relu → fc2 on ``(batch, tokens, features)``, or the same with ``Conv1d``."""

    def __init__(self, conv1d: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv1d = conv1d
        if conv1d:
            self.a, self.b = nn.Conv1d(3, 8, 3, padding=1), nn.Conv1d(8, 4, 3, padding=1)
        else:
            self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 4)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))).mean(-1 if self.conv1d else 1)


@pytest.mark.parametrize("conv1d", [False, True], ids=["tokens", "conv1d"])
@pytest.mark.parametrize("steps", [("lstsq",), ("lstsq-joint",), ("repair",)])
def test_options_beyond_the_paper_keep_to_the_layouts_they_measure(
    conv1d: bool, steps: tuple[str, ...]
) -> None:
    """Their statistics and refits read channels at dimension 1 of ``(batch, features)``
    or of images: on tokens or a ``Conv1d`` they raised a raw ``RuntimeError`` (or, with as
    many tokens as channels, would have refit on the wrong axis). Such groups keep the
    paper's options, and the report says so."""
    net = _Tokens(conv1d)
    shape = (3, 10) if conv1d else (5, 3)
    x, data = torch.randn(2, *shape, generator=gen(1)), torch.randn(40, *shape, generator=gen(2))
    cfg = MergeConfig(ratio=0.5, calibrate=steps, selection="group")
    result = nm.compress(net, x, cfg, calibration=data)
    assert any("Conv2d layers on images" in note for note in result.report.notes)
    paper = nm.compress(net, x, MergeConfig(ratio=0.5))
    fresh = torch.randn(3, *shape)
    assert torch.equal(result.model(fresh), paper.model(fresh))


@pytest.mark.parametrize(
    "conv",
    [
        {"padding": "same"},
        {"padding": "valid", "dilation": 2},
        {"padding": 1, "padding_mode": "reflect"},
        {"padding": (1, 0), "padding_mode": "circular"},
        {"kernel_size": 4, "padding": "same", "padding_mode": "replicate"},
    ],
    ids=["same", "valid", "reflect", "circular", "even kernel, same, replicate"],
)
def test_lstsq_refit_pads_as_the_layer_does(conv: dict) -> None:
    """With nothing pruned, the refit of a consumer reproduces it: its regressors are the
    patches the layer sees. ``"same"``/``"valid"`` raised a ``TypeError`` and reflect or
    circular padding were unfolded as zeros (a silently worse refit)."""
    torch.manual_seed(5)
    kernel = conv.pop("kernel_size", 3)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, kernel, **conv)
    ).eval()
    x, data = torch.randn(2, 3, 6, 6, generator=gen(1)), torch.randn(60, 3, 6, 6, generator=gen(2))
    cfg = MergeConfig(ratio=0.0, calibrate=("lstsq",), threshold=None, ridge=1e-9)
    refit = nm.compress(net, x, cfg, calibration=data).model
    fresh = torch.randn(3, 3, 6, 6, generator=gen(3))
    assert (refit(fresh) - net(fresh)).abs().max() < 1e-4


@pytest.mark.parametrize(
    "option",
    [{"selection": "lstsq"}, {"selection": "cover"}, {"compensation": "lstsq"},
     {"repair": "mean+var"}],
)  # fmt: skip
def test_options_beyond_the_paper_take_keyword_example_inputs(option: dict) -> None:
    """A mapping of keyword example inputs (documented) was called as ``model("x")`` by the
    options' own passes: a raw ``TypeError``. It gives what positional inputs give."""

    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _conv_net(4)

        def forward(self, *, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model, x = Keyword().eval(), torch.randn(2, 3, 6, 6, generator=gen(5))
    cfg = MergeConfig(ratio=0.5, **option)
    by_name = nm.compress(model, {"x": x}, cfg).model
    positional = nm.compress(model.net, x, cfg).model
    fresh = torch.randn(3, 3, 6, 6, generator=gen(6))
    assert torch.equal(by_name(x=fresh), positional(fresh))
