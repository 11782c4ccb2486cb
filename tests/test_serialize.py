"""Pickle-free save and load (:mod:`neuron_merging.serialize`).

Every compressed model is saved, loaded into a *fresh* instance of its original
architecture (built with a different seed, so nothing leaks through the
initial weights) and must give bit-identical outputs.
"""

from __future__ import annotations

import json
import pickletools
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import neuron_merging as nm
from neuron_merging import models
from neuron_merging.experiments import compression_config, example_input
from neuron_merging.serialize import MANIFEST, read_manifest

transformers = pytest.importorskip("transformers")

FORMATS = ["safetensors", "torch"]


def _weights(path: Path) -> Path:
    return path / read_manifest(path)["weights"]["file"]


def _fresh(factory: Callable[[], nn.Module], seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return factory().eval()


PAPER = {  # arch: (dataset, ratio); ratio None = VGG-16's fixed paper widths
    "lenet300": ("fashion-mnist", 0.5),
    "vgg16": ("cifar10", None),
    "resnet56": ("cifar10", 0.5),
    "wrn40_4": ("cifar10", 0.5),
}


@pytest.mark.parametrize("weights_format", FORMATS)
@pytest.mark.parametrize("arch", sorted(PAPER))
def test_paper_models_reload_exactly(tmp_path: Path, arch: str, weights_format: str) -> None:
    dataset, ratio = PAPER[arch]
    original = _fresh(lambda: models.create(arch), seed=0)
    config = compression_config(arch, dataset, "merge", "l1-norm", ratio, model=original)
    result = nm.compress(original, example_input(arch), config)
    assert result.report.params_after < result.report.params_before

    nm.save(result, tmp_path, weights_format=weights_format)
    loaded = nm.load(_fresh(lambda: models.create(arch)), tmp_path)

    x = torch.randn(3, *example_input(arch).shape[1:])
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    manifest = read_manifest(tmp_path)
    assert manifest["config"]["mode"] == "merge"
    assert manifest["report"]["params_after"] == result.report.params_after
    assert manifest["neuron_merging_version"] == nm.__version__
    assert manifest["weights"]["format"] == weights_format
    for name, module in loaded.named_modules():  # shape attributes follow the tensors
        if isinstance(module, nn.Linear):
            assert module.weight.shape == (module.out_features, module.in_features), name
        if isinstance(module, nn.Conv2d):
            assert module.weight.shape[:2] == (module.out_channels, module.in_channels), name
        if isinstance(module, nn.BatchNorm2d):
            assert module.running_mean.shape == (module.num_features,), name


def tiny_opt() -> nn.Module:
    config = transformers.OPTConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
    )
    return transformers.OPTForCausalLM(config)


def tiny_t5() -> nn.Module:
    config = transformers.T5Config(
        vocab_size=64,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        feed_forward_proj="relu",
        decoder_start_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config)


def ffn_groups(model: nn.Module) -> list[nm.MergeGroup]:
    """``fc1 → fc2`` (OPT) and ``wi → wo`` (T5) groups, found by module name."""
    names = dict(model.named_modules())
    groups = []
    for name in names:
        for first, second in (("fc1", "fc2"), ("wi", "wo")):
            if name.endswith("." + first) and name[: -len(first)] + second in names:
                groups.append(nm.MergeGroup(producer=name, consumer=name[: -len(first)] + second))
    return groups


def _run(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
        return model(input_ids=ids).logits


@pytest.mark.parametrize("weights_format", FORMATS)
@pytest.mark.parametrize("factory", [tiny_opt, tiny_t5], ids=["opt", "t5"])
def test_transformers_reload_exactly(
    tmp_path: Path, factory: Callable[[], nn.Module], weights_format: str
) -> None:
    original = _fresh(factory, seed=0)
    groups = ffn_groups(original)
    assert len(groups) >= 2
    result = nm.merge(original, groups=groups, ratio=0.5, threshold=None)
    nm.save(result, tmp_path, weights_format=weights_format)
    loaded = nm.load(_fresh(factory), tmp_path)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_run(loaded, ids), _run(result.model, ids))
    assert loaded.lm_head.weight.shape == result.model.lm_head.weight.shape
    for group in groups:
        assert dict(loaded.named_modules())[group.producer].out_features == 16
    manifest = read_manifest(tmp_path)
    assert manifest["model_config"]["vocab_size"] == 64  # the HF config travels along


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path: Path) -> None:
    original = _fresh(tiny_opt, seed=0)
    assert original.lm_head.weight is original.model.decoder.embed_tokens.weight
    result = nm.merge(original, groups=ffn_groups(original), ratio=0.25, threshold=None)
    nm.save(result, tmp_path)
    manifest = read_manifest(tmp_path)
    assert manifest["aliases"] == {"lm_head.weight": "model.decoder.embed_tokens.weight"}
    loaded = nm.load(_fresh(tiny_opt), tmp_path)
    assert loaded.lm_head.weight is loaded.model.decoder.embed_tokens.weight
    torch.testing.assert_close(loaded.lm_head.weight, result.model.lm_head.weight, rtol=0, atol=0)


def _shrink_rows(layer: nn.Module, keep: int, attrs: dict[str, int]) -> None:
    """Hand-made compression of a layer without nm.merge (resizing must not rely on it)."""
    with torch.no_grad():
        for key, tensor in list(layer._parameters.items()):
            if tensor is not None:
                layer._parameters[key] = nn.Parameter(tensor[:keep].clone())
        for key, tensor in list(layer._buffers.items()):
            if tensor is not None and tensor.dim() > 0:
                layer._buffers[key] = tensor[:keep].clone()
    for attr, value in attrs.items():
        setattr(layer, attr, value)


def test_gpt2_conv1d_and_layer_norm_resize_generically(tmp_path: Path) -> None:
    """GPT-2's ``Conv1D`` (weight ``(nx, nf)``) and a LayerNorm are resized from the manifest."""
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, n_inner=32
    )

    def factory() -> nn.Module:
        return transformers.GPT2LMHeadModel(config)

    model = _fresh(factory, seed=0)
    mlp = model.transformer.h[0].mlp
    with torch.no_grad():  # keep 20 of the 32 hidden units: c_fc columns, c_proj rows
        mlp.c_fc.weight = nn.Parameter(mlp.c_fc.weight[:, :20].clone())
        mlp.c_fc.bias = nn.Parameter(mlp.c_fc.bias[:20].clone())
        mlp.c_fc.nf = 20
        mlp.c_proj.weight = nn.Parameter(mlp.c_proj.weight[:20].clone())
        if hasattr(mlp.c_proj, "nx"):
            mlp.c_proj.nx = 20
    nm.save(model, tmp_path)
    loaded = nm.load(_fresh(factory), tmp_path)
    assert loaded.transformer.h[0].mlp.c_fc.nf == 20
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

    ln = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    ln[0] = nn.Linear(4, 3)
    _shrink_rows(ln[1], 3, {"normalized_shape": (3,)})
    ln[2] = nn.Linear(3, 2)
    nm.save(ln, tmp_path / "ln")
    back = nm.load(
        nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)), tmp_path / "ln"
    )
    assert back[1].normalized_shape == (3,)
    x = torch.randn(5, 4)
    assert torch.equal(back(x), ln(x))


def test_depthwise_conv_groups_follow_the_manifest(tmp_path: Path) -> None:
    """A MobileNet-style depthwise conv keeps ``groups == channels`` after resizing."""

    def block(c: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, c, 1),
            nn.BatchNorm2d(c),
            nn.Conv2d(c, c, 3, padding=1, groups=c),
            nn.Conv1d(1, 1, 1),  # an unrelated layer that stays as it is
        )

    small = block(5).eval()
    nm.save(small, tmp_path)
    loaded = nm.load(block(8).eval(), tmp_path)
    assert loaded[2].groups == loaded[2].in_channels == loaded[2].out_channels == 5
    assert loaded[1].num_features == 5
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(loaded[:3](x), small[:3](x))


# --------------------------------------------------------------------------- safety and errors


def _lenet_save(path: Path, weights_format: str = "safetensors") -> nm.MergeResult:
    original = _fresh(lambda: models.create("lenet300"), seed=0)
    result = nm.merge(original, example_input("lenet300"), ratio=0.5)
    nm.save(result, path, weights_format=weights_format)
    return result


def test_torch_fallback_is_a_plain_tensor_dict(tmp_path: Path) -> None:
    _lenet_save(tmp_path, "torch")
    weights = _weights(tmp_path)
    data = torch.load(weights, weights_only=True)
    assert isinstance(data, dict) and all(torch.is_tensor(v) for v in data.values())
    with zipfile.ZipFile(weights) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    imported = {
        arg for op, arg, _ in pickletools.genops(pickled) if op.name in ("GLOBAL", "STACK_GLOBAL")
    }
    assert all(str(name).startswith(("torch", "collections")) for name in imported if name)


def test_safetensors_file_holds_no_pickle(tmp_path: Path) -> None:
    _lenet_save(tmp_path)
    raw = _weights(tmp_path).read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert set(header) - {"__metadata__"} == {k for k in models.create("lenet300").state_dict()}
    assert b"\x80\x02" not in raw[:16]  # no pickle protocol marker where torch.save puts one


def test_wrong_architecture_is_a_checkpoint_error(tmp_path: Path) -> None:
    _lenet_save(tmp_path)
    other = models.create("resnet56")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(nm.CheckpointError, match="saved from a LeNet300, not a ResNet"):
        nm.load(other, tmp_path)
    after = other.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # untouched


def test_same_class_other_structure_is_refused(tmp_path: Path) -> None:
    _lenet_save(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["modules"]["extra"] = manifest["modules"]["ip3"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(nm.CheckpointError, match="modules in the file but not the model: extra"):
        nm.load(models.create("lenet300"), tmp_path)


def test_changed_module_type_or_rank_is_refused(tmp_path: Path) -> None:
    nm.save(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), tmp_path)
    with pytest.raises(nm.CheckpointError, match="is a Conv1d but the file has a Linear"):
        nm.load(nn.Sequential(nn.Conv1d(4, 6, 1), nn.ReLU(), nn.Linear(6, 2)), tmp_path)
    with pytest.raises(nm.CheckpointError, match="holds"):
        nm.load(nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 2)), tmp_path)


def test_inconsistent_manifest_is_refused(tmp_path: Path) -> None:
    _lenet_save(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["modules"]["ip1"]["attrs"]["out_features"] = 7  # disagrees with the tensors
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(nm.CheckpointError, match="inconsistent layer shapes: ip1"):
        nm.load(models.create("lenet300"), tmp_path)
    manifest["modules"]["ip1"]["tensors"]["weight"] = [150, "x"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(nm.CheckpointError, match="is not a shape"):
        nm.load(models.create("lenet300"), tmp_path)


def test_tampered_or_missing_files_are_checkpoint_errors(tmp_path: Path) -> None:
    _lenet_save(tmp_path)
    weights = _weights(tmp_path)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(nm.CheckpointError, match="checksum"):
        nm.load(models.create("lenet300"), tmp_path)
    weights.unlink()
    with pytest.raises(nm.CheckpointError, match="weights file not found"):
        nm.load(models.create("lenet300"), tmp_path)
    with pytest.raises(nm.CheckpointError, match=r"no manifest\.json"):
        nm.load(models.create("lenet300"), tmp_path / "nowhere")

    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["weights"]["file"] = "../escape.safetensors"
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(nm.CheckpointError, match="no valid weights file"):
        nm.load(models.create("lenet300"), tmp_path)
    manifest["format_version"] = 99
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(nm.CheckpointError, match="newer"):
        nm.load(models.create("lenet300"), tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(nm.CheckpointError, match="cannot read the manifest"):
        nm.load(models.create("lenet300"), tmp_path)


def test_resave_replaces_atomically_and_cleans_up(tmp_path: Path) -> None:
    first = _lenet_save(tmp_path, "torch")
    old_weights = _weights(tmp_path)
    # An interrupted save leaves a new weights file but the old manifest: still loadable.
    (tmp_path / "weights-0123456789abcdef.safetensors").write_bytes(b"partial")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(nm.load(models.create("lenet300"), tmp_path)(x), first.model(x))
    second = nm.prune(_fresh(lambda: models.create("lenet300"), 0), example_input("lenet300"))
    nm.save(second, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    # The stray file is named by no manifest, so it is not the save's to remove (hole 1).
    stray = "weights-0123456789abcdef.safetensors"
    assert files == sorted([MANIFEST, _weights(tmp_path).name, stray])
    assert not old_weights.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    with torch.no_grad():
        assert torch.equal(nm.load(models.create("lenet300"), tmp_path)(x), second.model(x))


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(nm.ConfigError, match="weights_format"):
        nm.save(nn.Linear(2, 2), tmp_path, weights_format="pickle")
    with pytest.raises(nm.ConfigError, match=r"MergeResult or an nn\.Module"):
        nm.save({"weight": torch.ones(1)}, tmp_path)
    with pytest.raises(nm.ConfigError, match="JSON"):
        nm.save(nn.Linear(2, 2), tmp_path, metadata={"when": object()})
    (tmp_path / "file").write_text("x")
    with pytest.raises(nm.OutputError):
        nm.save(nn.Linear(2, 2), tmp_path / "file")


def test_module_doctest_runs() -> None:
    import doctest

    import neuron_merging.serialize

    results = doctest.testmod(neuron_merging.serialize, verbose=False)
    assert results.attempted > 0 and results.failed == 0


def test_serialize_benchmark_smoke() -> None:
    import sys

    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks import bench_serialize

    rows = bench_serialize.run(smoke=True, repeats=1)
    assert {r["model"].split()[0] for r in rows} >= {"lenet300", "resnet56", "OPT"}
    for row in rows:
        assert row["st_identical"] and row["pt_identical"], row["model"]
        assert 0 < row["st_bytes"] < 1.1 * row["pickle_bytes"] + row["manifest_bytes"]
    assert "| lenet300 r=0.5 |" in bench_serialize.table(rows)


@pytest.mark.parametrize("weights_format", FORMATS)
def test_half_precision_round_trips_bit_for_bit(tmp_path: Path, weights_format: str) -> None:
    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2)).to(torch.bfloat16)

    result = nm.merge(net().float(), torch.randn(1, 6), ratio=0.5, threshold=None)
    small = result.model.to(torch.bfloat16)
    nm.save(small, tmp_path, weights_format=weights_format)
    loaded = nm.load(net(), tmp_path)
    assert loaded[0].weight.dtype == torch.bfloat16 and loaded[0].out_features == 6
    for key, value in small.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize(
    "factory", [lambda: models.create("resnet56"), tiny_opt], ids=["resnet56", "opt"]
)
def test_a_fresh_model_on_the_meta_device_loads_without_initialising(
    tmp_path: Path, factory: Callable[[], nn.Module]
) -> None:
    original = _fresh(factory, seed=0)
    groups = ffn_groups(original) or None
    if groups is None:
        result = nm.merge(original, example_input("resnet56"), ratio=0.5)
    else:
        result = nm.merge(original, groups=groups, ratio=0.5, threshold=None)
    nm.save(result, tmp_path)
    with torch.device("meta"):
        fresh = factory().eval()
    loaded = nm.load(fresh, tmp_path)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    if groups is None:
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(loaded(x), result.model(x))
    else:
        assert loaded.lm_head.weight is loaded.model.decoder.embed_tokens.weight
        ids = torch.randint(0, 64, (2, 7))
        assert torch.equal(_run(loaded, ids), _run(result.model, ids))


def test_meta_model_with_unsaved_buffers_is_refused(tmp_path: Path) -> None:
    class WithScratch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.register_buffer("scratch", torch.zeros(3), persistent=False)

    nm.save(WithScratch(), tmp_path)
    with torch.device("meta"):
        fresh = WithScratch()
    with pytest.raises(nm.ConfigError, match="non-persistent buffers: scratch"):
        nm.load(fresh, tmp_path)


# =========================================================================== reliability (issue 13)
# Holes found by /tmp/probe13: a save never removes files it did not write, concurrent
# saves into one folder always leave one complete save, non-UTF-8 folders round-trip,
# metadata JSON cannot write fails before anything is written, a full disk is an
# OutputError that keeps the previous save, and a hostile manifest is a CheckpointError.
# Real files, real processes and (as root) a real tiny tmpfs; no mocks.

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402


def _small(seed: int, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3)).eval()


def _same_outputs(a: nn.Module, b: nn.Module) -> bool:
    x = torch.randn(4, 8)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_h13_save_never_removes_files_it_did_not_write(tmp_path: Path) -> None:
    """Hole 1: saving into a folder holding the user's ``weights-*`` files deleted them."""
    folder = tmp_path / "out"
    folder.mkdir()
    mine = {
        "weights-final.pt": b"precious",
        "weights-epoch10.safetensors": b"precious",
        "weights-0123456789abcdef.pt": b"looks like ours, is not named by any manifest",
        "notes.txt": b"keep",
    }
    for name, data in mine.items():
        (folder / name).write_bytes(data)
    nm.save(_small(0), folder)
    first = _weights(folder).name
    nm.save(_small(1), folder, weights_format="torch")  # replaces the first save
    files = _listing(folder)
    assert {k: files[k] for k in mine} == mine  # every file of the user intact
    assert set(files) == {*mine, MANIFEST, _weights(folder).name}
    assert first not in files  # the replaced save's own weights file is removed
    assert _same_outputs(nm.load(_small(5), folder), _small(1))

    # A file at the very name this save would write, with other content, is refused.
    probe = tmp_path / "probe"
    nm.save(_small(2), probe)
    clash = folder / _weights(probe).name
    clash.write_bytes(b"the user's file")
    with pytest.raises(nm.OutputError, match="refusing to replace it"):
        nm.save(_small(2), folder)
    assert clash.read_bytes() == b"the user's file"
    assert _same_outputs(nm.load(_small(5), folder), _small(1))  # previous save intact
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


_SAVER = """
import sys, time, torch
from pathlib import Path
from torch import nn
import neuron_merging as nm
folder, seed, go = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
torch.manual_seed(seed)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
while not go.exists():
    time.sleep(0.001)
for i in range(int(sys.argv[4])):
    with torch.no_grad():
        model[0].bias[0] = seed * 1000 + i  # new content, so a new weights file, every save
    nm.save(model, folder, weights_format=("safetensors", "torch")[i % 2])
"""


def test_h13_concurrent_saves_into_one_folder_leave_one_complete_save(tmp_path: Path) -> None:
    """Hole 2: each concurrent save's cleanup deleted the other's fresh weights file."""
    folder, go = tmp_path / "out", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    savers = [
        subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(folder), str(seed), str(go), "25"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2, 3)
    ]
    try:
        go.touch()
        loads = 0
        while any(p.poll() is None for p in savers):
            if (folder / MANIFEST).exists():
                nm.load(_small(9), folder)  # a reader never sees a half-replaced save
                loads += 1
            time.sleep(0.005)
        errors = [p.stderr.read() for p in savers if p.stderr is not None]
    finally:
        for p in savers:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert [p.returncode for p in savers] == [0, 0, 0], errors
    assert loads > 0
    loaded = nm.load(_small(9), folder)
    last = {s * 1000 + 24.0 for s in (1, 2, 3)}
    assert float(loaded[0].bias.detach()[0]) in last  # one saver's last save, whole
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST, _weights(folder).name])


@pytest.mark.parametrize("weights_format", FORMATS)
def test_h13_a_non_utf8_folder_round_trips(tmp_path: Path, weights_format: str) -> None:
    """Hole 3: a save into a non-UTF-8 folder succeeded but could never be loaded."""
    folder = tmp_path / os.fsdecode(b"m\xff\xfe")
    try:
        folder.mkdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes only UTF-8 names")
    folder.rmdir()
    nm.save(_small(0), folder, weights_format=weights_format)
    nm.save(_small(1), folder, weights_format=weights_format)  # a resave cleans up too
    assert read_manifest(folder)["weights"]["format"] == weights_format
    assert _same_outputs(nm.load(_small(5), folder), _small(1))
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST, _weights(folder).name])


def _deep(levels: int) -> list[object]:
    deep: list[object] = []
    for _ in range(levels):
        deep = [deep]
    return deep


@pytest.mark.parametrize(
    "metadata", [{"a": 10**5000}, {"a": _deep(5000)}], ids=["huge-int", "deep"]
)
def test_h13_metadata_json_cannot_write_fails_before_anything_is_written(
    tmp_path: Path, metadata: dict[str, object]
) -> None:
    """Hole 4: raw ValueError/RecursionError, after an orphan weights file was written."""
    new = tmp_path / "new" / "save"
    with pytest.raises(nm.ConfigError, match="JSON"):
        nm.save(_small(0), new, metadata=metadata)
    assert not (tmp_path / "new").exists()  # not even the folder was created
    old = tmp_path / "old"
    nm.save(_small(1), old)
    before = _listing(old)
    with pytest.raises(nm.ConfigError, match="JSON"):
        nm.save(_small(2), old, metadata=metadata)
    assert _listing(old) == before
    assert _same_outputs(nm.load(_small(5), old), _small(1))


@pytest.mark.parametrize("weights_format", FORMATS)
def test_h13_a_full_disk_is_an_output_error_and_keeps_the_previous_save(
    tiny_disk: Path, weights_format: str
) -> None:
    """Hole 5: a full disk raised a raw SafetensorError / RuntimeError (CLI exit 70)."""
    big = nn.Sequential(nn.Linear(256, 400))  # ~400 KiB of weights: more than the disk holds
    fresh = tiny_disk / "fresh" / "save"
    with pytest.raises(nm.OutputError, match=r"^cannot write to .*: No space left on device$"):
        nm.save(big, fresh, weights_format=weights_format)
    assert list(tiny_disk.iterdir()) == []  # no file, and the folders it made are gone

    kept = tiny_disk / "kept"
    nm.save(_small(1), kept, weights_format=weights_format)
    before = _listing(kept)
    with pytest.raises(nm.OutputError, match="No space left on device"):
        nm.save(big, kept, weights_format=weights_format)
    assert _listing(kept) == before
    assert _same_outputs(nm.load(_small(5), kept), _small(1))


_LENET = Path(__file__).resolve().parents[2] / "shared" / "checkpoints"
_LENET = _LENET / "LeNet_300_100.original.300_100.bias.pth.tar"


def test_h13_cli_compress_to_a_full_disk_exits_6(tiny_disk: Path) -> None:
    """Hole 5 through the CLI: ``compress --output DIR`` on a full disk is exit 6, one line."""
    if not _LENET.is_file():
        pytest.skip(f"needs {_LENET}")
    output = tiny_disk / "cli"
    done = subprocess.run(
        [sys.executable, "-m", "neuron_merging.cli", "compress", "--arch", "lenet300",
         "--checkpoint", str(_LENET), "-r", "0.5", "--no-eval", "--quiet",
         "--output", str(output)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 6, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"neuron-merging: error: cannot write to {output}: No space left on device"
    ]
    assert list(tiny_disk.iterdir()) == []


def test_h13_hostile_manifests_are_checkpoint_errors(tmp_path: Path) -> None:
    """Hole 6: 200k-deep JSON or a huge recorded shape raised RecursionError/RuntimeError."""
    nm.save(_small(1), tmp_path)
    good = (tmp_path / MANIFEST).read_text()
    manifest = json.loads(good)
    manifest["modules"]["0"]["tensors"]["weight"] = [2**40, 2**40]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    fresh = _small(5)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(nm.CheckpointError, match=r"0\.weight is \[1099511627776, 1099511627776\]"):
        nm.load(fresh, tmp_path)
    assert fresh[0].out_features == 16  # untouched
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())

    (tmp_path / MANIFEST).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(nm.CheckpointError, match="nested too deeply"):
        read_manifest(tmp_path)
    with pytest.raises(nm.CheckpointError, match="nested too deeply"):
        nm.load(_small(5), tmp_path)
    (tmp_path / MANIFEST).write_text('{"format": "neuron-merging", "x": ' + "9" * 5000 + "}")
    with pytest.raises(nm.CheckpointError, match="cannot read the manifest"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(good)
    assert _same_outputs(nm.load(_small(5), tmp_path), _small(1))
