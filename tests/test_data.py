"""Tests of the dataset subpackage on real files: readers, search order, safety, batching."""

from __future__ import annotations

import builtins
import codecs
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neuron_merging.core.errors import ConfigError, DatasetError
from neuron_merging.data import (
    DATASETS,
    ArrayDataset,
    DatasetInfo,
    _locate,
    crop_flip,
    dataset_info,
    denormalize,
    iterate_batches,
    load_dataset,
    normalize_uint8,
    num_batches,
    pad_value,
    random_crop_flip,
    resolve_data_dir,
)
from neuron_merging.data._safe_pickle import safe_load, safe_loads

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FMNIST_RAW = SHARED / "FashionMNIST" / "raw"
CIFAR10_DIR = SHARED / "cifar-10-batches-py"
FMNIST_TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

needs_fmnist = pytest.mark.skipif(
    not all((FMNIST_RAW / f).is_file() for f in FMNIST_TEST_FILES),
    reason=f"shared FashionMNIST files not found under {FMNIST_RAW}",
)
needs_cifar10 = pytest.mark.skipif(
    not (CIFAR10_DIR / "test_batch").is_file(),
    reason=f"shared CIFAR-10 files not found under {CIFAR10_DIR}",
)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


# --------------------------------------------------------------------------- helpers


#: Every test here runs with the data search path isolated (see conftest.py).
pytestmark = pytest.mark.usefixtures("isolated_search_path")


def write_idx_images(path: Path, images: np.ndarray, magic: int = 2051) -> None:
    """Write uint8 ``(N, H, W)`` images as an IDX3 file."""
    n, h, w = images.shape
    path.write_bytes(struct.pack(">4i", magic, n, h, w) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray, magic: int = 2049) -> None:
    """Write uint8 ``(N,)`` labels as an IDX1 file."""
    path.write_bytes(struct.pack(">2i", magic, len(labels)) + labels.astype(np.uint8).tobytes())


def write_small_fmnist(folder: Path, n: int = 6, label: int = 0, both_splits: bool = True) -> None:
    """A tiny but valid FashionMNIST folder whose labels are all ``label``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(label)
    splits = [("t10k", n)] + ([("train", n + 1)] if both_splits else [])
    for prefix, count in splits:
        write_idx_images(
            folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28))
        )
        write_idx_labels(folder / f"{prefix}-labels-idx1-ubyte", np.full(count, label))


def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int], cifar100: bool) -> None:
    """Write a batch in the official python format (protocol-2 pickle of a bytes-keyed dict)."""
    n = len(data)
    batch: dict[bytes, object] = {
        b"batch_label": b"testing batch 1 of 1",
        b"data": data.astype(np.uint8),
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(n)],
    }
    if cifar100:
        batch[b"fine_labels"] = labels
        batch[b"coarse_labels"] = [lab // 5 for lab in labels]
    else:
        batch[b"labels"] = labels
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(batch, handle, protocol=2)


def write_small_cifar100(root: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write ``<root>/cifar-100-python/{train,test}``; return the raw data written."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in (("train", 20), ("test", 10)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 100, n)]
        write_cifar_batch(root / "cifar-100-python" / split, data, labels, cifar100=True)
        written[split] = (data, labels)
    return written


@pytest.fixture(scope="module")
def fmnist_test() -> ArrayDataset:
    if not all((FMNIST_RAW / f).is_file() for f in FMNIST_TEST_FILES):
        pytest.skip(f"shared FashionMNIST files not found under {FMNIST_RAW}")
    return load_dataset("fashion-mnist", "test", data_dir=SHARED)


@pytest.fixture(scope="module")
def cifar10_test() -> ArrayDataset:
    if not (CIFAR10_DIR / "test_batch").is_file():
        pytest.skip(f"shared CIFAR-10 files not found under {CIFAR10_DIR}")
    return load_dataset("cifar10", "test", data_dir=SHARED)


# --------------------------------------------------------------------------- registry


def test_dataset_info() -> None:
    assert DATASETS == ("fashion-mnist", "cifar10", "cifar100")
    fm = dataset_info("fashion-mnist")
    assert fm == DatasetInfo("fashion-mnist", 10, (1, 28, 28), (0.5,), (0.5,))
    assert dataset_info("cifar10").input_shape == (3, 32, 32)
    c100 = dataset_info("cifar100")
    assert c100.num_classes == 100
    assert c100.mean == CIFAR_MEAN
    assert c100.std == CIFAR_STD
    assert dataset_info("Fashion_MNIST") == fm
    with pytest.raises(DatasetError) as err:
        dataset_info("mnist")
    for name in DATASETS:
        assert name in str(err.value)


def test_unknown_split() -> None:
    with pytest.raises(DatasetError, match="split"):
        load_dataset("cifar10", "validation")


# --------------------------------------------------------------------------- FashionMNIST


def test_fashion_mnist_test_split(fmnist_test: ArrayDataset) -> None:
    ds = fmnist_test
    assert len(ds) == 10000
    assert ds.images.shape == (10000, 1, 28, 28)
    assert ds.images.dtype == torch.float32
    assert ds.labels.dtype == torch.int64
    assert ds.labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.images.mean().item() == pytest.approx((0.2868 - 0.5) / 0.5, abs=2e-4)
    assert ds.images.min().item() == -1.0
    assert ds.images.max().item() == 1.0


@needs_fmnist
def test_fashion_mnist_train_split() -> None:
    ds = load_dataset("fashion-mnist", "train", data_dir=SHARED)
    assert ds.images.shape == (60000, 1, 28, 28)
    assert ds.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert ds.images.mean().item() == pytest.approx((0.2860 - 0.5) / 0.5, abs=2e-4)


@needs_fmnist
def test_fashion_mnist_gzip_variant(tmp_path: Path, fmnist_test: ArrayDataset) -> None:
    folder = tmp_path / "fashion-mnist"  # the "<root>/fashion-mnist/<files>" layout
    folder.mkdir()
    for name in FMNIST_TEST_FILES:
        data = (FMNIST_RAW / name).read_bytes()
        (folder / f"{name}.gz").write_bytes(gzip.compress(data, compresslevel=1))
    assert resolve_data_dir("fashion-mnist", tmp_path, split="test") == folder
    ds = load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert torch.equal(ds.images, fmnist_test.images)
    assert torch.equal(ds.labels, fmnist_test.labels)


@needs_fmnist
@pytest.mark.parametrize("layout", ["FashionMNIST/raw", "fashion-mnist", "."])
def test_fashion_mnist_layouts(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / layout
    folder.mkdir(parents=True, exist_ok=True)
    for name in FMNIST_TEST_FILES:
        (folder / name).symlink_to(FMNIST_RAW / name)
    assert resolve_data_dir("fashion-mnist", tmp_path, split="test") == folder
    ds = load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert len(ds) == 10000


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_test_split(cifar10_test: ArrayDataset) -> None:
    ds = cifar10_test
    assert ds.images.shape == (10000, 3, 32, 32)
    assert ds.images.dtype == torch.float32
    assert ds.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    raw = denormalize(ds.images, CIFAR_MEAN, CIFAR_STD)
    channel_mean = raw.mean(dim=(0, 2, 3)).tolist()
    assert channel_mean == pytest.approx([0.4942, 0.4851, 0.4504], abs=2e-4)
    # Exactly the 0..255 grid after undoing the normalisation.
    pixels = raw[:500] * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)


def test_cifar10_plane_layout(cifar10_test: ArrayDataset) -> None:
    """Rows of b'data' are 1024 R, 1024 G, 1024 B values, each plane row-major."""
    batch = safe_load(CIFAR10_DIR / "test_batch")
    data = batch[b"data"]
    assert batch[b"filenames"][0] == b"domestic_cat_s_000907.png"
    first = torch.from_numpy(data[0].reshape(3, 32, 32).astype(np.float32))
    restored = denormalize(cifar10_test.images[:1], CIFAR_MEAN, CIFAR_STD)[0] * 255
    assert torch.allclose(restored, first, atol=1e-3)
    # Green plane of image 0, row 5, column 7 is byte 1024 + 5 * 32 + 7.
    assert restored[1, 5, 7].round().item() == data[0, 1024 + 5 * 32 + 7]


def test_cifar100_reader_and_pipeline(tmp_path: Path) -> None:
    written = write_small_cifar100(tmp_path)
    for split in ("train", "test"):
        ds = load_dataset("cifar100", split, data_dir=tmp_path)
        data, labels = written[split]
        assert ds.images.shape == (len(data), 3, 32, 32)
        assert ds.labels.tolist() == labels
        expected = normalize_uint8(data.reshape(-1, 3, 32, 32), CIFAR_MEAN, CIFAR_STD)
        assert torch.equal(ds.images, expected)
        assert ds.info is not None and ds.info.num_classes == 100
    ds = load_dataset("cifar100", "train", data_dir=tmp_path)
    g = torch.Generator().manual_seed(3)
    batches = list(iterate_batches(ds, 8, shuffle=True, augment=True, generator=g))
    assert [len(y) for _, y in batches] == [8, 8, 4]
    assert all(x.shape[1:] == (3, 32, 32) for x, _ in batches)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(written["train"][1])


def test_cifar_label_out_of_range(tmp_path: Path) -> None:
    data = np.zeros((2, 3072), np.uint8)
    write_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch", data, [0, 10], False)
    with pytest.raises(DatasetError, match="out of range"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_cifar_wrong_structure(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(DatasetError, match="expected a pickled dict") as err:
        load_dataset("cifar10", "test", data_dir=tmp_path)
    assert "test_batch" in str(err.value)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}))
    with pytest.raises(DatasetError, match="b'labels'"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    write_cifar_batch(folder / "test_batch", np.zeros((3, 3072), np.uint8), [1, 2], False)
    with pytest.raises(DatasetError, match="counts must be equal"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


# --------------------------------------------------------------------------- search order


def test_search_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_search_path: Path
) -> None:
    explicit = tmp_path / "explicit"
    env_root = tmp_path / "env"
    debian = tmp_path / "debian"
    cache = isolated_search_path / "xdg-cache" / "neuron-merging"
    write_small_fmnist(explicit, label=1)  # <root>/<files>
    write_small_fmnist(env_root / "fashion-mnist", label=2)
    write_small_fmnist(debian, label=3)  # Debian puts the files directly there
    write_small_fmnist(cache / "FashionMNIST" / "raw", label=4)
    monkeypatch.setenv("NEURON_MERGING_DATA", str(env_root))
    monkeypatch.setattr(_locate, "_DEBIAN_DIR", debian)

    def loaded_label(data_dir: Path | None) -> int:
        return int(load_dataset("fashion-mnist", "test", data_dir=data_dir).labels[0])

    assert resolve_data_dir("fashion-mnist", explicit) == explicit
    assert loaded_label(explicit) == 1
    assert resolve_data_dir("fashion-mnist") == env_root / "fashion-mnist"
    assert loaded_label(None) == 2
    # An explicit folder without the data falls through to the next place.
    assert loaded_label(tmp_path / "empty") == 2
    monkeypatch.delenv("NEURON_MERGING_DATA")
    assert resolve_data_dir("fashion-mnist") == debian
    assert loaded_label(None) == 3
    monkeypatch.setattr(_locate, "_DEBIAN_DIR", tmp_path / "gone")
    assert resolve_data_dir("fashion-mnist") == cache / "FashionMNIST" / "raw"
    assert loaded_label(None) == 4


def test_debian_dir_only_for_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    debian = tmp_path / "debian"
    write_small_cifar100(debian)
    (debian / "cifar-100-python").rename(debian / "cifar-10-batches-py")
    monkeypatch.setattr(_locate, "_DEBIAN_DIR", debian)
    with pytest.raises(DatasetError) as err:
        resolve_data_dir("cifar10")
    assert str(debian) not in str(err.value)
    assert "apt-get" not in str(err.value)


def test_split_only_requires_its_files(tmp_path: Path) -> None:
    write_small_fmnist(tmp_path, both_splits=False)
    assert len(load_dataset("fashion-mnist", "test", data_dir=tmp_path)) == 6
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
        load_dataset("fashion-mnist", "train", data_dir=tmp_path)
    with pytest.raises(DatasetError):
        resolve_data_dir("fashion-mnist", tmp_path)  # all splits required when split=None


def test_missing_data_lists_every_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_search_path: Path
) -> None:
    explicit = tmp_path / "mine"
    env_root = tmp_path / "from-env"
    monkeypatch.setenv("NEURON_MERGING_DATA", str(env_root))
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion-mnist", "test", data_dir=explicit)
    message = str(err.value)
    cache = isolated_search_path / "xdg-cache" / "neuron-merging"
    for place in (
        explicit / "FashionMNIST" / "raw",
        explicit / "fashion-mnist",
        env_root / "FashionMNIST" / "raw",
        env_root / "fashion-mnist",
        _locate._DEBIAN_DIR,
        cache / "FashionMNIST" / "raw",
        cache,
    ):
        assert str(place) in message
    for hint in ("--download", "apt-get install dataset-fashion-mnist", "NEURON_MERGING_DATA"):
        assert hint in message
    assert "--data-dir" in message

    monkeypatch.delenv("NEURON_MERGING_DATA")
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar100", "train")
    message = str(err.value)
    assert str(cache / "cifar-100-python") in message
    assert "NEURON_MERGING_DATA (not set)" in message
    assert "--download" in message


# --------------------------------------------------------------------------- malformed IDX


def _fmnist_pair(folder: Path, n_images: int = 4, n_labels: int = 4) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    images = folder / "t10k-images-idx3-ubyte"
    labels = folder / "t10k-labels-idx1-ubyte"
    write_idx_images(images, np.zeros((n_images, 28, 28), np.uint8))
    write_idx_labels(labels, np.zeros(n_labels, np.uint8))
    return images, labels


def test_truncated_idx(tmp_path: Path) -> None:
    images, _ = _fmnist_pair(tmp_path)
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="truncated") as err:
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert str(images) in str(err.value)
    images.write_bytes(b"\x00\x00\x08")
    with pytest.raises(DatasetError, match="header"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)


def test_idx_trailing_bytes(tmp_path: Path) -> None:
    _, labels = _fmnist_pair(tmp_path)
    labels.write_bytes(labels.read_bytes() + b"\x00")
    with pytest.raises(DatasetError, match="too long") as err:
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert str(labels) in str(err.value)


def test_wrong_magic(tmp_path: Path) -> None:
    images, labels = _fmnist_pair(tmp_path)
    write_idx_images(images, np.zeros((4, 28, 28), np.uint8), magic=2049)
    with pytest.raises(DatasetError, match="magic number 2049") as err:
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert str(images) in str(err.value)
    _fmnist_pair(tmp_path)
    write_idx_labels(labels, np.zeros(4, np.uint8), magic=2051)
    with pytest.raises(DatasetError, match="magic") as err:
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert str(labels) in str(err.value)


def test_wrong_image_size(tmp_path: Path) -> None:
    images, _ = _fmnist_pair(tmp_path)
    write_idx_images(images, np.zeros((4, 27, 28), np.uint8))
    with pytest.raises(DatasetError, match="27x28"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)


def test_count_mismatch(tmp_path: Path) -> None:
    images, labels = _fmnist_pair(tmp_path, n_images=5, n_labels=6)
    with pytest.raises(DatasetError, match="counts must be equal") as err:
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert str(images) in str(err.value) and str(labels) in str(err.value)


def test_label_out_of_range(tmp_path: Path) -> None:
    _, labels = _fmnist_pair(tmp_path)
    write_idx_labels(labels, np.array([0, 1, 10, 2]))
    with pytest.raises(DatasetError, match="out of range"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)


def test_truncated_gzip(tmp_path: Path) -> None:
    images, _ = _fmnist_pair(tmp_path)
    packed = gzip.compress(images.read_bytes())
    images.unlink()
    gz = tmp_path / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DatasetError, match="gzip") as err:
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert str(gz) in str(err.value)


# --------------------------------------------------------------------------- pickles


def test_truncated_pickle(tmp_path: Path) -> None:
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_cifar_batch(path, np.zeros((4, 3072), np.uint8), [0, 1, 2, 3], cifar100=False)
    assert len(load_dataset("cifar10", "test", data_dir=tmp_path)) == 4
    full = path.read_bytes()
    for cut in (len(full) // 2, len(full) - 1, 3):
        path.write_bytes(full[:cut])
        with pytest.raises(DatasetError, match="truncated") as err:
            load_dataset("cifar10", "test", data_dir=tmp_path)
        assert str(path) in str(err.value)


class _SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_SystemPayload, _ExecPayload])
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused(tmp_path: Path, payload: type, protocol: int) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir()
    evil = {b"data": payload(marker), b"labels": [0]}
    path.write_bytes(pickle.dumps(evil, protocol=protocol))
    with pytest.raises(DatasetError, match="forbidden global") as err:
        load_dataset("cifar10", "test", data_dir=tmp_path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    with pytest.raises(DatasetError, match="forbidden global"):
        safe_load(path)
    assert not marker.exists()


def test_safe_pickle_restricts_codecs(tmp_path: Path) -> None:
    class Rot13:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (codecs.encode, ("abc", "rot13"))

    with pytest.raises(DatasetError):
        safe_loads(pickle.dumps(Rot13(), protocol=2), "x.pkl")
    # The latin-1 round trip used for bytes under protocol 2 is allowed.
    assert safe_loads(pickle.dumps(b"\x00\xff", protocol=2)) == b"\x00\xff"


@needs_cifar10
def test_official_meta_loads_safely() -> None:
    meta = safe_load(CIFAR10_DIR / "batches.meta")
    assert meta[b"label_names"][0] == b"airplane"


# --------------------------------------------------------------------------- batching


def test_array_dataset_validation() -> None:
    with pytest.raises(DatasetError, match="counts must be equal"):
        ArrayDataset(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(DatasetError):
        ArrayDataset(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64))
    assert len(ArrayDataset(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.int64))) == 3


def _toy_dataset(n: int = 10) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return ArrayDataset(
        normalize_uint8(raw, CIFAR_MEAN, CIFAR_STD),
        torch.arange(n, dtype=torch.int64),
        dataset_info("cifar10"),
    )


def test_iterate_batches_plain() -> None:
    ds = _toy_dataset(10)
    assert num_batches(ds, 4) == 3
    assert num_batches(ds, 10) == 1
    batches = list(iterate_batches(ds, 4))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 32, 32)] * 2 + [(2, 3, 32, 32)]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(10))
    assert torch.equal(torch.cat([x for x, _ in batches]), ds.images)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError):
            list(iterate_batches(ds, bad))  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            num_batches(ds, bad)  # type: ignore[arg-type]


def test_shuffle_is_seeded_permutation() -> None:
    ds = _toy_dataset(10)

    def order(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return torch.cat([y for _, y in iterate_batches(ds, 3, shuffle=True, generator=g)]).tolist()

    assert sorted(order(0)) == list(range(10))
    assert order(0) == order(0)
    assert order(0) != order(1)
    g = torch.Generator().manual_seed(0)
    for x, y in iterate_batches(ds, 3, shuffle=True, generator=g):
        assert torch.equal(x, ds.images[y])  # images stay paired with their labels


def test_augmentation_deterministic() -> None:
    ds = _toy_dataset(16)

    def run(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        return list(iterate_batches(ds, 5, shuffle=True, augment=True, generator=g))

    first, second, other = run(7), run(7), run(8)
    assert len(first) == num_batches(ds, 5) == 4
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert x1.shape[1:] == (3, 32, 32)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))


def test_crop_flip_identity_and_flip() -> None:
    ds = _toy_dataset(6)
    x = ds.images
    centre = torch.full((6, 2), 4, dtype=torch.long)
    no_flip = torch.zeros(6, dtype=torch.bool)
    assert torch.equal(crop_flip(x, centre, no_flip, padding=4, fill=-9.0), x)
    assert torch.equal(crop_flip(x, centre, ~no_flip, padding=4, fill=-9.0), x.flip(-1))
    mixed = torch.tensor([True, False, True, False, False, True])
    out = crop_flip(x, centre, mixed, padding=4)
    assert torch.equal(out[mixed], x[mixed].flip(-1))
    assert torch.equal(out[~mixed], x[~mixed])


def test_crop_matches_zero_padding_before_normalisation() -> None:
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
    offsets = torch.randint(0, 9, (8, 2), generator=g)
    offsets[0] = torch.tensor([0, 0])
    offsets[1] = torch.tensor([8, 8])
    flip = torch.rand(8, generator=g) < 0.5
    normed = normalize_uint8(raw, CIFAR_MEAN, CIFAR_STD)
    fill = pad_value(CIFAR_MEAN, CIFAR_STD)
    out = crop_flip(normed, offsets, flip, padding=4, fill=fill)
    # Reference: zero-pad the raw image, crop and flip it, then normalise.
    padded = F.pad(raw, (4, 4, 4, 4), value=0)
    expected = []
    for i in range(8):
        top, left = offsets[i].tolist()
        crop = padded[i : i + 1, :, top : top + 32, left : left + 32]
        expected.append(crop.flip(-1) if flip[i] else crop)
    reference = normalize_uint8(torch.cat(expected), CIFAR_MEAN, CIFAR_STD)
    assert torch.allclose(out, reference, atol=1e-5)
    # Offset (0, 0): the image moves down-right by 4, the border is a black pixel.
    if not flip[0]:
        assert torch.equal(out[0, :, 4:, 4:], normed[0, :, :28, :28])
    assert torch.allclose(out[0, :, :4, :], torch.tensor(fill).view(3, 1, 1).expand(3, 4, 32))


def test_random_crop_flip_uses_generator_in_documented_order() -> None:
    ds = _toy_dataset(12)
    g1 = torch.Generator().manual_seed(5)
    offsets = torch.randint(0, 9, (12, 2), generator=g1)
    flip = torch.rand(12, generator=g1) < 0.5
    g2 = torch.Generator().manual_seed(5)
    out = random_crop_flip(ds.images, padding=4, fill=0.0, generator=g2)
    assert torch.equal(out, crop_flip(ds.images, offsets, flip, padding=4, fill=0.0))
    assert len({tuple(o) for o in offsets.tolist()}) > 1  # drawn per image


def test_crop_flip_rejects_bad_arguments() -> None:
    x = torch.zeros(2, 3, 8, 8)
    ok = torch.zeros(2, dtype=torch.bool)
    with pytest.raises(ConfigError):
        crop_flip(x, torch.full((2, 2), 9), ok, padding=4)
    with pytest.raises(ConfigError):
        crop_flip(x, torch.zeros(3, 2), ok, padding=4)
    with pytest.raises(ConfigError):
        crop_flip(x, torch.zeros(2, 2), ok, padding=4, fill=(0.0, 1.0))


def test_augment_fashion_mnist_pads_with_black(fmnist_test: ArrayDataset) -> None:
    small = ArrayDataset(fmnist_test.images[:64], fmnist_test.labels[:64], fmnist_test.info)
    g = torch.Generator().manual_seed(0)
    (x, _), *_ = iterate_batches(small, 64, augment=True, generator=g)
    assert x.shape == (64, 1, 28, 28)
    assert x.min().item() >= -1.0 and x.max().item() <= 1.0
