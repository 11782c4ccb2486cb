"""Hypothesis: random DAGs of linear/conv blocks (ReLU/GELU/LeakyReLU/ReLU6/SiLU/clamp(min=0)/abs,
BN, depthwise convs, residual adds, concats, scalar multiples, maps of positions (flips, rolls,
resampling, indexing, flattening and splitting back, masks, reductions, scans and sorts, splits,
stacks, repeats, differences), several consumers per
value).

Properties, for ``coupled`` off and on:

* pruning equals the original with the removed channels' consumer columns zeroed;
* merging is lossless on duplicates planted in every mergeable group;
* nothing raises except a :class:`neuron_merging.NeuronMergingError`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import neuron_merging as nm
from _zoo import masked_copy, merge_planted, planted, run

FAST_EXAMPLES = 30
SLOW_EXAMPLES = 300
ACTS = ("relu", "relu", "leaky", "none", "gelu", "relu6", "silu", "clamp0", "abs")
SCALES = (0.5, 2.0, -1.0)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass(frozen=True)
class Spec:
    mode: str  # "conv" (B, C, 5, 5), "linear" (B, C) or "seq" (B, T, C): channels last
    steps: tuple[tuple, ...]
    seed: int
    flatten: bool = False


@st.composite
def dags(draw) -> Spec:
    mode = draw(st.sampled_from(["conv", "linear", "seq"]))
    widths: list[int] = []
    steps: list[tuple] = []

    def layer(src: int, out: int | None = None) -> None:
        out = draw(st.integers(1, 6)) if out is None else out
        steps.append(
            (
                "layer",
                src,
                out,
                draw(st.booleans()),  # batch norm
                draw(st.sampled_from(ACTS)),
                draw(st.sampled_from([1, 3])),  # kernel (conv mode)
                draw(st.booleans()),  # bias
            )
        )
        widths.append(out)

    layer(-1)  # the stem reads the input
    for _ in range(draw(st.integers(1, 7))):
        kinds = ["layer", "layer", "dw", "add", "add", "cat", "cat", "scale", "gate", "pool", "bn"]
        kinds += ["bcast", "move"]
        kind = draw(st.sampled_from(kinds))
        src = draw(st.integers(0, len(widths) - 1))
        if kind in ("dw", "pool") and mode == "seq":
            kind = "tconv"  # transpose → Conv1d → transpose back
        if kind in ("dw", "pool") and mode == "linear":
            kind = "layer"
        if kind == "layer":
            layer(src)
        elif kind == "tconv":
            steps.append(("tconv", src, draw(st.integers(1, 6)), draw(st.sampled_from(ACTS))))
            widths.append(steps[-1][2])
        elif kind == "dw":
            steps.append(("dw", src, draw(st.booleans()), draw(st.sampled_from(ACTS))))
            widths.append(widths[src])
        elif kind in ("add", "gate"):
            same = [i for i, w in enumerate(widths) if w == widths[src] and i != src]
            if not same:  # a residual branch: a layer of the same width first
                layer(draw(st.integers(0, len(widths) - 1)), widths[src])
                same = [len(widths) - 1]
            steps.append((kind, src, draw(st.sampled_from(same))))
            widths.append(widths[src])
        elif kind in ("pool", "bn"):
            steps.append((kind, src))
            widths.append(widths[src])
        elif kind == "cat":
            other = draw(st.integers(-1, len(widths) - 1))  # -1: the raw input (3 channels)
            steps.append(("cat", src, other))
            widths.append(widths[src] + (3 if other < 0 else widths[other]))
        elif kind == "bcast" and mode == "conv":  # h + pooled(other): broadcast over H, W
            same = [i for i, w in enumerate(widths) if w == widths[src]]
            steps.append(("bcast", src, draw(st.sampled_from(same))))
            widths.append(widths[src])
        elif kind == "scale":
            steps.append(("scale", src, draw(st.sampled_from(SCALES))))
            widths.append(widths[src])
        elif kind == "move":
            steps.append(("move", src, draw(st.integers(0, len(_MOVES[mode]) - 1))))
            widths.append(widths[src])
    if draw(st.booleans()):  # the last value is read by one more layer before the head
        layer(len(widths) - 1)
    flatten = mode == "conv" and draw(st.booleans())  # flatten (25 features per channel)
    return Spec(mode, tuple(steps), draw(st.integers(0, 2**16)), flatten)


#: Maps of positions that leave every value's shape as it is, per mode (channels at dim 1
#: for "conv", last otherwise).
_MOVES = {
    "conv": (
        lambda h: h.flip(-1),
        lambda h: torch.roll(h, (1, -1), (2, 3)),
        lambda h: torch.rot90(h, 1, (2, 3)),
        lambda h: F.avg_pool2d(F.interpolate(h, scale_factor=2, mode="bilinear"), 2),
        lambda h: h[:, :, None][:, :, 0],
        lambda h: h[..., None, :][..., -1, :],
        lambda h: h.flatten(1).unflatten(1, (-1, 5, 5)),
        lambda h: h.flatten(1).view(h.size(0), h.size(1), 25).view_as(h),
        lambda h: h.masked_fill(torch.arange(25).view(1, 1, 5, 5) % 3 == 0, 0.0),
        lambda h: h.std((2, 3), keepdim=True) * torch.ones(1, 1, 5, 5),
        lambda h: torch.linalg.vector_norm(h, 1, dim=(2, 3), keepdim=True) * torch.ones(5, 5),
        lambda h: h.flatten(2).median(-1, keepdim=True).values[..., None] * torch.ones(5, 5),
        lambda h: h.cumsum(2).sort(dim=-1, descending=True).values,
        lambda h: torch.cummax(h, 3).values.flatten(2).topk(5).values[..., None] * torch.ones(5),
        lambda h: torch.cat(h.split(2, dim=2)[::-1], 2),
        lambda h: torch.stack(h.unbind(-1), -1),
        lambda h: torch.where(torch.arange(5).view(1, 1, 5, 1) % 2 == 0, h, 0.0),
        lambda h: h.repeat(1, 1, 2, 1)[:, :, 3:8],
        lambda h: torch.cat([h.narrow(2, 0, 1), h.diff(dim=2)], 2),
    ),
    "seq": (
        lambda h: h.flip(1),
        lambda h: torch.roll(h, 1, 1),
        lambda h: h[:, None][:, 0],
        lambda h: F.interpolate(h.transpose(1, 2), scale_factor=2, mode="linear")[
            ..., ::2
        ].transpose(1, 2),
        lambda h: h[None][0],
        lambda h: h.flip(0),
        lambda h: h.masked_fill(torch.arange(h.size(1)).view(1, -1, 1) % 2 == 0, 0.0),
        lambda h: h.norm(dim=1, keepdim=True) * torch.ones(1, h.size(1), 1),
        lambda h: h.cumsum(1).sort(1).values,
        lambda h: torch.cat(h.chunk(2, 1)[::-1], 1),
        lambda h: h.where(torch.arange(h.size(1)).view(1, -1, 1) % 3 != 0, 0),
    ),
    "linear": (
        lambda h: h[None][0],
        lambda h: h[:, None][:, 0],
        lambda h: h.flip(0),
        lambda h: h[..., None][..., 0],
    ),
}


def _act(name: str, x: Tensor) -> Tensor:
    if name == "relu":
        return F.relu(x)
    if name == "leaky":
        return F.leaky_relu(x, 0.1)
    if name == "gelu":
        return F.gelu(x)
    if name == "relu6":
        return F.relu6(x)
    if name == "silu":
        return F.silu(x)
    if name == "clamp0":
        return x.clamp(min=0)
    if name == "abs":
        return x.abs()
    return x


class DagNet(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        torch.manual_seed(spec.seed)
        self.spec = spec
        conv = spec.mode == "conv"
        self.dim = 1 if spec.mode == "conv" else -1
        widths: list[int] = []
        self.layers = nn.ModuleDict()
        self.norms = nn.ModuleDict()
        for i, step in enumerate(spec.steps):
            kind, src = step[0], step[1]
            cin = 3 if src < 0 else widths[src]
            if kind == "layer":
                _, _, out, bn, _, k, bias = step
                self.layers[str(i)] = (
                    nn.Conv2d(cin, out, k, padding=k // 2, bias=bias)
                    if conv
                    else nn.Linear(cin, out, bias=bias)
                )
                if bn:
                    self.norms[str(i)] = nn.BatchNorm2d(out) if conv else nn.BatchNorm1d(out)
                widths.append(out)
            elif kind == "tconv":
                self.layers[str(i)] = nn.Conv1d(cin, step[2], 3, padding=1)
                widths.append(step[2])
            elif kind == "dw":
                self.layers[str(i)] = nn.Conv2d(cin, cin, 3, padding=1, groups=cin)
                if step[2]:
                    self.norms[str(i)] = nn.BatchNorm2d(cin)
                widths.append(cin)
            elif kind == "cat":
                widths.append(cin + (3 if step[2] < 0 else widths[step[2]]))
            elif kind == "bn":
                self.norms[str(i)] = nn.BatchNorm2d(cin) if conv else nn.BatchNorm1d(cin)
                widths.append(cin)
            else:
                widths.append(cin)
        self.head = nn.Linear(widths[-1] * (25 if spec.flatten else 1), 3)
        g = torch.Generator().manual_seed(spec.seed + 1)
        with torch.no_grad():
            for bn in self.norms.values():
                n = bn.num_features
                bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(n, generator=g) * 0.5)
                bn.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        nodes: list[Tensor] = []
        for i, step in enumerate(self.spec.steps):
            kind, src = step[0], step[1]
            h = x if src < 0 else nodes[src]
            key = str(i)
            if kind == "tconv":
                h = _act(step[3], self.layers[key](h.transpose(1, 2)).transpose(1, 2))
            elif kind in ("layer", "dw"):
                h = self.layers[key](h)
                if key in self.norms and self.spec.mode == "seq":
                    h = self.norms[key](h.transpose(1, 2)).transpose(1, 2)
                elif key in self.norms:
                    h = self.norms[key](h)
                h = _act(step[4] if kind == "layer" else step[3], h)
            elif kind == "add":
                h = h + nodes[step[2]]
            elif kind == "gate":
                h = h * torch.sigmoid(nodes[step[2]])
            elif kind == "pool":
                h = F.max_pool2d(h, 3, 1, 1)
            elif kind == "bn" and self.spec.mode == "seq":
                h = self.norms[key](h.permute(0, 2, 1)).permute(0, 2, 1)
            elif kind == "bn":
                h = self.norms[key](h)
            elif kind == "cat":
                h = torch.cat([h, x if step[2] < 0 else nodes[step[2]]], self.dim)
            elif kind == "bcast":
                h = h + F.adaptive_avg_pool2d(nodes[step[2]], 1)
            elif kind == "move":
                h = _MOVES[self.spec.mode][step[2]](h)
            else:
                h = h * step[2]
            nodes.append(h)
        h = nodes[-1]
        if self.spec.flatten:
            h = h.flatten(1)
        elif self.spec.mode == "conv":
            h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        elif self.spec.mode == "seq":
            h = h.mean(1)
        return self.head(h)


def _input(spec: Spec) -> Tensor:
    shape = {"conv": (2, 3, 5, 5), "linear": (2, 3), "seq": (2, 4, 3)}[spec.mode]
    return torch.randn(*shape, generator=torch.Generator().manual_seed(spec.seed + 2))


def _close(out: Tensor, ref: Tensor, tol: float) -> bool:
    scale = max(1.0, float(ref.abs().max()))
    return bool((out - ref).abs().max() <= tol * scale)


def check(spec: Spec, coupled: bool, ratio: float) -> None:
    model, x = DagNet(spec), _input(spec)
    ref = run(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            result = nm.prune(model, x, ratio=ratio, coupled=coupled)
        except nm.NeuronMergingError:
            result = None
        if result is not None:
            out = run(result.model, x)
            want = run(masked_copy(model, result.plans), x)
            assert out.shape == ref.shape
            assert _close(out, want, 1e-5), ("prune != mask", (out - want).abs().max())
            # every other group excluded: shared pass-through layers are sliced per group
            names = [p.group.name for p in result.plans]
            exclude = names[spec.seed % 2 :: 2]
            partial = nm.prune(model, x, ratio=ratio, coupled=coupled, exclude=exclude)
            assert not {p.group.name for p in partial.plans} & set(exclude)
            out = run(partial.model, x)
            want = run(masked_copy(model, partial.plans), x)
            assert _close(out, want, 1e-5), ("prune != mask (exclude)", (out - want).abs().max())
        twin, keep, groups = planted(model, x, coupled)
        if not keep:
            return
        planted_ref = run(twin, x)
        result = merge_planted(twin, x, keep, coupled)
        merged = {g.producer: g.merged for g in result.report.groups}
        assert all(merged[name] == groups_n - k for name, k, groups_n in _sizes(groups, keep))
        out = run(result.model, x)
        assert _close(out, planted_ref, 1e-5), ("merge lossy", (out - planted_ref).abs().max())


def _sizes(groups: list, keep: dict[str, int]) -> list[tuple[str, int, int]]:
    return [(g.name, keep[g.name], g.channels) for g in groups if g.name in keep]


_SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


@settings(max_examples=FAST_EXAMPLES, **_SETTINGS)
@given(spec=dags(), coupled=st.booleans(), ratio=st.sampled_from([0.25, 0.5, 0.75]))
def test_dag_fuzz(spec: Spec, coupled: bool, ratio: float) -> None:
    check(spec, coupled, ratio)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES, **_SETTINGS)
@given(spec=dags(), coupled=st.booleans(), ratio=st.sampled_from([0.25, 0.5, 0.75]))
def test_dag_fuzz_slow(spec: Spec, coupled: bool, ratio: float) -> None:
    check(spec, coupled, ratio)


def _adversarial(model: nn.Module, kind: str, seed: int) -> None:
    """Zero rows, negative/positive duplicates, γ = 0 or tiny variances, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.shape[0] > 1:
                rows = m.weight.view(m.weight.shape[0], -1)
                n = rows.shape[0]
                i, j = torch.randint(0, n, (2,), generator=g).tolist()
                if kind == "zeros":
                    rows[i] = 0
                    if m.bias is not None:
                        m.bias[i] = 0
                elif kind == "dups":
                    rows[i] = (-2.0 if j % 2 else 3.0) * rows[j]
                elif kind == "tiny":
                    rows[i] *= 1e-30
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                i = int(torch.randint(0, n, (1,), generator=g))
                if kind == "zeros":
                    m.weight[i] = 0.0
                elif kind == "tiny":
                    m.running_var[i] = 1e-12


@settings(max_examples=FAST_EXAMPLES, **_SETTINGS)
@given(
    spec=dags(),
    kind=st.sampled_from(["zeros", "dups", "tiny"]),
    coupled=st.booleans(),
    bn_rule=st.sampled_from(["paper", "exact"]),
    ratio=st.sampled_from([0.25, 0.5, 0.75]),
)
def test_dag_fuzz_adversarial_weights(
    spec: Spec, kind: str, coupled: bool, bn_rule: str, ratio: float
) -> None:
    """Degenerate weights: a NeuronMergingError or a model with finite, same-shaped outputs."""
    model, x = DagNet(spec), _input(spec)
    _adversarial(model, kind, spec.seed)
    ref = run(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for threshold in (None, 0.1):
            try:
                result = nm.merge(
                    model, x, ratio=ratio, coupled=coupled, bn_rule=bn_rule, threshold=threshold
                )
            except nm.NeuronMergingError:
                continue
            out = run(result.model, x)
            assert out.shape == ref.shape
            if bool(torch.isfinite(ref).all()):
                assert bool(torch.isfinite(out).all())
