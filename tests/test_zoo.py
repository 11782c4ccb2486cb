"""The architecture zoo: every model × ``coupled`` off/on, checked against exact oracles.

* every returned model runs and keeps its output shape;
* pruning equals the original with the removed channels' consumer columns zeroed;
* merging is lossless on planted duplicates in every mergeable group;
* each model has the groups and skips its architecture implies.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import neuron_merging as nm
from _zoo import ZOO, keep_first, masked_copy, merge_planted, planted, rel_error, run

NAMES = sorted(ZOO)
COUPLED = [False, True]


@pytest.fixture(autouse=True)
def _quiet_single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on the shared cores
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("coupled", COUPLED, ids=["plain", "coupled"])
@pytest.mark.parametrize("name", NAMES)
def test_compressed_models_run(name: str, coupled: bool) -> None:
    factory, x = ZOO[name]
    model = factory()
    ref = run(model, x)
    for verb in (nm.prune, nm.merge):
        result = verb(model, x, ratio=0.5, coupled=coupled)
        out = run(result.model, x)
        assert out.shape == ref.shape
        assert torch.isfinite(out).all()
        assert result.report.params_after <= result.report.params_before
        assert nm.count_parameters(result.model) == result.report.params_after
    torch.testing.assert_close(run(model, x), ref)  # the input model is untouched


@pytest.mark.parametrize("coupled", COUPLED, ids=["plain", "coupled"])
@pytest.mark.parametrize("name", NAMES)
def test_pruning_equals_masking(name: str, coupled: bool) -> None:
    factory, x = ZOO[name]
    model = factory()
    result = nm.prune(model, x, ratio=0.5, coupled=coupled)
    assert any(p.pruned.numel() for p in result.plans) or not result.plans
    expected = run(masked_copy(model, result.plans), x)
    out = run(result.model, x)
    assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()


@pytest.mark.parametrize("coupled", COUPLED, ids=["plain", "coupled"])
@pytest.mark.parametrize("name", NAMES)
def test_merging_lossless_on_planted_duplicates(name: str, coupled: bool) -> None:
    factory, x = ZOO[name]
    model, keep, _groups = planted(factory(), x, coupled)
    if not keep:
        pytest.skip(f"{name} has no mergeable group (coupled={coupled})")
    ref = run(model, x)
    result = merge_planted(model, x, keep, coupled)
    merged = {g.producer: g for g in result.report.groups if g.method == "merged"}
    assert set(merged) == set(keep)
    for name_, k in keep.items():
        assert merged[name_].kept == k
        assert merged[name_].merged == merged[name_].pruned
    err = rel_error(run(result.model, x), ref)
    assert err < 1e-5, err
    # and the planted channels matter: pruning them instead changes the output
    pruned = nm.prune(model, x, ratio=0.0, keep=keep, criterion=keep_first, coupled=coupled)
    assert rel_error(run(pruned.model, x), ref) > 1e-3


# ------------------------------------------------------------------ expected structure


def _by_name(groups):
    return {g.name: g for g in groups}


def _skips(skipped):
    return {s.name: s.reason for s in skipped}


def test_mlp_groups() -> None:
    factory, x = ZOO["mlp"]
    for coupled in COUPLED:
        groups, skipped = nm.find_groups(factory(), x, coupled=coupled)
        assert [(g.producers, g.consumers, g.mergeable) for g in groups] == [
            (("fc1",), ("fc2",), True),
            (("fc2",), ("fc3",), True),
        ]
        assert "model output" in _skips(skipped)["fc3"]


def test_vgg_groups() -> None:
    factory, x = ZOO["vgg"]
    groups, _ = nm.find_groups(factory(), x)
    g = _by_name(groups)
    assert set(g) == {"features.0.0", "features.1.0", "features.3.0", "fc1"}
    assert g["features.0.0"].bns == ("features.0.1",)
    assert g["features.3.0"].consumers == ("fc1",)
    assert g["features.3.0"].features == (4,)  # 2×2 after the second pool, flattened
    assert all(x.mergeable and not x.coupled for x in groups)


def test_resnet_bottleneck_groups() -> None:
    factory, x = ZOO["resnet_bottleneck"]
    model = factory()
    plain, skipped = nm.find_groups(model, x)
    assert len(plain) == 12 and not any(g.coupled for g in plain)
    reasons = _skips(skipped)
    assert "residual add" in reasons["layer2.0.shortcut.0"]
    assert "coupled=True" in reasons["layer2.0.shortcut.0"]
    groups, skipped = nm.find_groups(model, x, coupled=True)
    streams = [g for g in groups if g.coupled]
    assert [set(g.producers) for g in streams] == [
        {"stem.0", "layer1.0.conv3", "layer1.1.conv3"},
        {"layer2.0.conv3", "layer2.0.shortcut.0", "layer2.1.conv3"},
        {"layer3.0.conv3", "layer3.0.shortcut.0", "layer3.1.conv3"},
    ]
    assert [set(g.consumers) for g in streams] == [
        {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.shortcut.0"},
        {"layer2.1.conv1", "layer3.0.conv1", "layer3.0.shortcut.0"},
        {"layer3.1.conv1", "fc"},
    ]
    stream = streams[1]
    assert dict(zip(stream.producers, stream.bns, strict=True))["layer2.0.shortcut.0"] == (
        "layer2.0.shortcut.1"
    )
    assert all(g.mergeable for g in streams)
    assert _skips(skipped) == {"fc": "its output reaches the model output"}


def test_resnet_cifar_option_a_stream_left_intact() -> None:
    factory, x = ZOO["resnet_cifar_a"]
    for coupled in COUPLED:
        groups, skipped = nm.find_groups(factory(), x, coupled=coupled)
        reasons = _skips(skipped)
        assert "F.pad" in reasons["conv1"]
        assert "F.pad" in reasons["layer1.0.conv2"]
        assert {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv2"} <= set(reasons)
        assert {g.name for g in groups} == {
            "layer1.0.conv1",
            "layer1.1.conv1",
            "layer2.0.conv1",
            "layer2.1.conv1",
        }


def test_mobilenet_v2_groups() -> None:
    factory, x = ZOO["mobilenet_v2"]
    groups, _ = nm.find_groups(factory(), x)
    hidden = _by_name(groups)["block.expand"]
    assert hidden.consumers == ("block.project",)
    assert set(hidden.passthrough) == {"block.dw", "block.bn2"}
    assert not hidden.mergeable and "ReLU6" in hidden.reason
    groups, _ = nm.find_groups(factory(), x, coupled=True)
    stream = _by_name(groups)["stem.0"]
    assert set(stream.producers) == {"stem.0", "block.project"}
    assert set(stream.consumers) == {"block.expand", "head.0"}
    assert stream.coupled and not stream.mergeable and "ReLU6" in stream.reason


def test_densenet_concat_offsets() -> None:
    factory, x = ZOO["densenet"]
    _groups, skipped = nm.find_groups(factory(), x)
    assert "concat" in _skips(skipped)["dense1.0"]
    g = _by_name(nm.find_groups(factory(), x, coupled=True)[0])
    assert dict(zip(g["stem.0"].consumers, g["stem.0"].consumer_offsets, strict=True)) == {
        "dense1.0": 0,
        "dense2.0": 0,
        "transition": 0,
    }
    assert dict(zip(g["dense1.0"].consumers, g["dense1.0"].consumer_offsets, strict=True)) == {
        "dense2.0": 8,
        "transition": 8,
    }
    assert g["dense2.0"].consumers == ("transition",)
    assert g["dense2.0"].consumer_offsets == (12,)
    assert all(x.mergeable for x in g.values())


def test_inception_concat_offsets() -> None:
    factory, x = ZOO["inception"]
    g = _by_name(nm.find_groups(factory(), x, coupled=True)[0])
    assert set(g["stem"].consumers) == {"b1", "b2a", "b3"}
    assert [(g[b].consumers, g[b].consumer_offsets) for b in ("b1", "b2b", "b3")] == [
        (("head",), (0,)),
        (("head",), (4,)),
        (("head",), (10,)),
    ]
    assert g["b2a"].consumers == ("b2b",) and not g["b2a"].coupled


def test_se_block_is_one_coupled_group() -> None:
    factory, x = ZOO["se"]
    _, skipped = nm.find_groups(factory(), x)
    assert "conv1" in _skips(skipped)
    g = _by_name(nm.find_groups(factory(), x, coupled=True)[0])
    se = g["conv1"]
    assert set(se.producers) == {"conv1", "fc2"}
    assert set(se.consumers) == {"fc1", "conv2"}
    assert not se.mergeable
    assert "Sigmoid" in se.reason or "product" in se.reason
    assert g["fc1"].consumers == ("fc2",) and g["fc1"].mergeable


def test_se_resnet_gates_sized_by_their_maps_join_the_stream() -> None:
    """``b, c, _, _ = x.size(); fc(y).view(b, c, 1, 1).expand_as(x)``: with ``coupled`` each
    gate joins the stream it gates (pruned only); without it, gate and stream stay whole."""
    factory, x = ZOO["se_resnet"]
    groups, skipped = nm.find_groups(factory(), x)
    assert {"layer1.se.fc.2", "layer2.se.fc.2"} <= set(_skips(skipped))
    assert all(g.mergeable for g in groups)
    g = _by_name(nm.find_groups(factory(), x, coupled=True)[0])
    assert set(g["conv1"].producers) == {"conv1", "layer1.conv2", "layer1.se.fc.2"}
    assert "layer1.se.fc.0" in g["conv1"].consumers and not g["conv1"].mergeable
    assert set(g["layer2.downsample.0"].producers) == {
        "layer2.downsample.0",
        "layer2.conv2",
        "layer2.se.fc.2",
    }
    assert g["layer1.se.fc.0"].mergeable and g["layer2.se.fc.0"].mergeable


@pytest.mark.parametrize("name, mlp", [("convnext", "block.pwconv1"), ("vit", "mlp.fc1")])
def test_gelu_mlp_groups_prune_only(name: str, mlp: str) -> None:
    factory, x = ZOO[name]
    for coupled in COUPLED:
        groups, _ = nm.find_groups(factory(), x, coupled=coupled)
        g = _by_name(groups)[mlp]
        assert not g.mergeable and "GELU" in g.reason
        result = nm.merge(factory(), x, coupled=coupled)
        report = {r.producer: r for r in result.report.groups}[mlp]
        assert report.method == "pruned" and report.merged == 0 and "GELU" in report.reason


def test_convnext_stream_and_layer_scale_reasons() -> None:
    factory, x = ZOO["convnext"]
    _, skipped = nm.find_groups(factory(), x, coupled=True)
    reasons = _skips(skipped)
    assert "LayerNorm" in reasons["stem"]
    # The layer scale (gamma, a value per channel) would be sliced; the residual stream it
    # writes into reaches the next block's LayerNorm, which ends it.
    assert "LayerNorm" in reasons["block.pwconv2"]


def test_vit_attention_left_intact() -> None:
    factory, x = ZOO["vit"]
    groups, skipped = nm.find_groups(factory(), x, coupled=True)
    assert [g.name for g in groups] == ["mlp.fc1"]
    assert {"patch", "attn.qkv", "attn.proj", "mlp.fc2", "head"} == set(_skips(skipped))


def test_torchvision_style_resnet_in_place_ops() -> None:
    """In-place ReLU and ``out += identity`` (torchvision's BasicBlock) form the same streams."""
    factory, x = ZOO["resnet_torchvision"]
    groups, skipped = nm.find_groups(factory(), x, coupled=True)
    streams = [g for g in groups if g.coupled]
    assert [set(g.producers) for g in streams] == [
        {"conv1", "layer1.0.conv2", "layer1.1.conv2"},
        {"layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"},
    ]
    assert set(streams[1].consumers) == {"layer2.1.conv1", "fc"}
    assert all(g.mergeable for g in groups)
    assert _skips(skipped) == {"fc": "its output reaches the model output"}


def test_squeezenet_fire_concat() -> None:
    factory, x = ZOO["squeezenet"]
    g = _by_name(nm.find_groups(factory(), x, coupled=True)[0])
    assert set(g["features.2.squeeze"].consumers) == {
        "features.2.expand1x1",
        "features.2.expand3x3",
    }
    assert g["features.2.expand3x3"].consumers == ("features.3.squeeze",)
    assert g["features.2.expand3x3"].consumer_offsets == (6,)
    assert g["features.3.expand3x3"].consumer_offsets == (5,)


def test_face_resnet_slices_per_channel_prelus_and_merges_one_slope() -> None:
    factory, x = ZOO["face_resnet"]
    g = _by_name(nm.find_groups(factory(), x, coupled=True)[0])
    assert g["layer1.conv1"].passthrough == ("layer1.prelu",)
    assert not g["layer1.conv1"].mergeable
    assert g["layer1.conv1"].reason == "PReLU 'layer1.prelu' has a slope per channel"
    stream = g["stem.0"]  # the stem's PReLU sits on the residual stream
    assert stream.passthrough == ("stem.2", "layer1.bn1", "layer2.bn1")
    assert g["fc"].mergeable and g["fc"].bns == ("bn",)  # fc → BN → PReLU() → out
    result = nm.merge(factory(), x, ratio=0.5, coupled=True)
    model = result.model
    assert model.stem[2].weight.numel() == model.stem[0].out_channels == 4
    assert model.layer2.prelu.num_parameters == model.layer2.conv1.out_channels == 6
    assert model.act.num_parameters == 1


@pytest.mark.parametrize("name", NAMES)
def test_input_model_bitwise_untouched(name: str) -> None:
    factory, x = ZOO[name]
    model = factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nm.merge(model, x, coupled=True, bn_rule="exact")
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", NAMES)
def test_batch_one_finds_the_same_groups(name: str) -> None:
    """Batch 1 must not create shape coincidences (e.g. a channel axis mistaken for the batch)."""
    factory, x = ZOO[name]
    model = factory()
    for coupled in COUPLED:
        one = nm.find_groups(model, x[:1], coupled=coupled)[0]
        two = nm.find_groups(model, x, coupled=coupled)[0]
        assert one == two
    result = nm.prune(model, x[:1], ratio=0.5, coupled=True)
    expected = run(masked_copy(model, result.plans), x)
    assert torch.allclose(run(result.model, x), expected, atol=1e-5)


def test_keep_and_exclude_address_coupled_groups_by_first_producer() -> None:
    factory, x = ZOO["resnet_bottleneck"]
    model = factory()
    stream = "layer2.0.conv3"
    result = nm.merge(model, x, coupled=True, keep={stream: 5}, exclude=["stem.0"])
    report = {g.producer: g for g in result.report.groups}
    assert report[stream].kept == 5 and set(report[stream].producers) >= {"layer2.1.conv3"}
    assert "stem.0" not in report
    assert "excluded" in _skips(result.report.skipped)["stem.0"]
    assert result.model.layer2[1].conv3.out_channels == 5
    assert result.model.layer2[0].shortcut[0].out_channels == 5
    assert result.model.layer3[0].shortcut[0].in_channels == 5
    assert result.model.stem[0].out_channels == 8
    with pytest.raises(nm.ConfigError, match=stream):
        nm.merge(model, x, coupled=True, keep={"layer2.1.conv3": 5})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["vgg", "resnet_bottleneck", "mobilenet_v2", "densenet"])
def test_cuda_model_stays_on_device(name: str) -> None:
    """A model on the GPU is compressed there (BUGS.md: suspected CPU index tensors)."""
    factory, x = ZOO[name]
    model, x = factory().cuda(), x.cuda()
    for verb in (nm.prune, nm.merge):
        result = verb(model, x, ratio=0.5, coupled=True)
        assert all(p.is_cuda for p in result.model.parameters())
        assert all(b.is_cuda for b in result.model.buffers())
        out = run(result.model, x)
        if verb is nm.prune:
            expected = run(masked_copy(model, result.plans), x)
            assert torch.allclose(out, expected, atol=1e-4)


def _out_width(layer: torch.nn.Module) -> int:
    if isinstance(layer, torch.nn.modules.conv._ConvTransposeNd):  # (in, out / groups, *k)
        return layer.weight.shape[1] * layer.groups
    if isinstance(layer, torch.nn.Linear):
        return layer.weight.shape[0]
    return layer.weight.shape[1] if type(layer).__name__ == "Conv1D" else layer.weight.shape[0]


def _in_width(layer: torch.nn.Module) -> int:
    if type(layer).__name__ == "Conv1D" or isinstance(
        layer, torch.nn.modules.conv._ConvTransposeNd
    ):
        return layer.weight.shape[0]
    return layer.weight.shape[1]


@pytest.mark.parametrize("coupled", COUPLED, ids=["plain", "coupled"])
@pytest.mark.parametrize("name", NAMES)
def test_report_plans_and_widths_agree(name: str, coupled: bool) -> None:
    factory, x = ZOO[name]
    model = factory()
    before = dict(model.named_modules())
    result = nm.merge(model, x, ratio=0.5, coupled=coupled, threshold=None)
    after = dict(result.model.named_modules())
    removed_in: dict[str, int] = {}
    for plan, report in zip(result.plans, result.report.groups, strict=True):
        g = plan.group
        assert report.producers == g.producers and report.consumers == g.consumers
        assert report.kept + report.pruned == report.neurons == g.channels
        assert report.method == ("merged" if g.mergeable else "pruned")
        assert (report.reason is None) == g.mergeable
        assert report.merged == (report.pruned if g.mergeable else 0)
        kept, pruned = plan.kept.tolist(), plan.pruned.tolist()
        assert kept == sorted(kept) and pruned == sorted(pruned)
        assert sorted(kept + pruned) == list(range(g.channels))
        for producer in g.producers:
            assert _out_width(after[producer]) == len(kept)
        for bn in g.bns:
            if bn is not None:
                assert after[bn].num_features == len(kept)
        for consumer, f in zip(g.consumers, g.features, strict=True):
            removed_in[consumer] = removed_in.get(consumer, 0) + len(pruned) * f
    for consumer, removed in removed_in.items():
        assert _in_width(after[consumer]) == _in_width(before[consumer]) - removed


@pytest.mark.parametrize("coupled", COUPLED, ids=["plain", "coupled"])
@pytest.mark.parametrize("name", NAMES)
def test_every_layer_is_grouped_or_skipped_with_a_reason(name: str, coupled: bool) -> None:
    factory, x = ZOO[name]
    model = factory()
    groups, skipped = nm.find_groups(model, x, coupled=coupled)
    layers = {
        n
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))
    }
    grouped = {p for g in groups for p in (*g.producers, *g.passthrough)}
    reasons = _skips(skipped)
    assert layers <= grouped | set(reasons), layers - grouped - set(reasons)
    assert all(reason and reason.strip() for reason in reasons.values())
    assert not grouped & {s.name for s in skipped if s.name in {g.name for g in groups}}


def test_video3d_groups() -> None:
    """``Conv3d``/``BatchNorm3d`` are producers and batch norms like their 2-D kind; a
    depthwise ``Conv3d`` and an ``InstanceNorm3d`` are sliced (pruned only)."""
    factory, x = ZOO["video3d"]
    g = _by_name(nm.find_groups(factory(), x, coupled=True)[0])
    assert g["stem"].producers == ("stem", "conv2") and g["stem"].bns == ("bn", "bn2")
    assert g["stem"].mergeable and set(g["stem"].consumers) == {"conv1", "fc"}
    assert g["conv1"].passthrough == ("dw", "norm") and not g["conv1"].mergeable
    result = nm.prune(factory(), x, ratio=0.5, coupled=True)
    assert result.model.dw.groups == result.model.norm.num_features == 6


def test_unet_transposed_convolutions(tmp_path) -> None:
    """``ConvTranspose2d`` stores its weight as ``(in, out, kh, kw)``: as a consumer its
    input channels are rows, as a producer its output channels are columns; a depthwise one
    is sliced. The compressed model saves and loads into a fresh instance."""
    factory, x = ZOO["unet"]
    g = _by_name(nm.find_groups(factory(), x, coupled=True)[0])
    assert g["enc2"].consumers == ("up",) and g["enc2"].mergeable
    assert g["up"].consumers == ("dec",) and g["up"].passthrough == ("dw",)
    assert g["enc1"].consumers == ("enc2", "dec") and g["enc1"].consumer_offsets == (0, 8)
    result = nm.merge(factory(), x, ratio=0.5, coupled=True)
    up, dw = result.model.up, result.model.dw
    assert (up.in_channels, up.out_channels, tuple(up.weight.shape[:2])) == (6, 4, (6, 4))
    assert dw.groups == dw.in_channels == dw.out_channels == 4
    nm.save(result, tmp_path / "unet")
    fresh = torch.randn(3, 3, 8, 8)
    assert torch.equal(nm.load(factory(), tmp_path / "unet")(fresh), result.model(fresh))
