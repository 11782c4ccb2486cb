"""Download tests against a real HTTP server on 127.0.0.1 (no mocks).

The server serves gzipped copies of the shared FashionMNIST files and small CIFAR-100
tarballs written by the tests. Our gzip output differs from the official files, so
the tests pass their own checksum tables; the official table is exercised by the
checksum-mismatch path of ``load_dataset(..., download=True)``.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from neuron_merging.core.errors import DatasetError
from neuron_merging.data import (
    download_file,
    fetch_cifar,
    fetch_fashion_mnist,
    load_dataset,
)
from neuron_merging.data._download import FASHION_MNIST_MD5, KNOWN_SIZES, extract_tarball

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FMNIST_RAW = SHARED / "FashionMNIST" / "raw"
FMNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
HAVE_FMNIST = all((FMNIST_RAW / f).is_file() for f in FMNIST_FILES)
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST, reason=f"shared FashionMNIST files not found under {FMNIST_RAW}"
)


# --------------------------------------------------------------------------- fixtures


#: Every test here runs with the data search path isolated (see conftest.py).
pytestmark = pytest.mark.usefixtures("isolated_search_path")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _ShortBodyHandler(http.server.BaseHTTPRequestHandler):
    """Promises 1000 bytes, sends 10, then closes the connection."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"0123456789")
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """Run a ThreadingHTTPServer on 127.0.0.1:<free port>; yield its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("served")


@pytest.fixture(scope="module")
def server(served_dir: Path) -> Iterator[str]:
    with serve(functools.partial(_QuietHandler, directory=str(served_dir))) as url:
        yield url


@pytest.fixture(scope="module")
def gz_fmnist(served_dir: Path) -> dict[str, str]:
    """Gzip the shared FashionMNIST files into ``served_dir/fmnist``; return their MD5s."""
    if not HAVE_FMNIST:
        pytest.skip(f"shared FashionMNIST files not found under {FMNIST_RAW}")
    folder = served_dir / "fmnist"
    folder.mkdir()
    checksums = {}
    for name in FMNIST_FILES:
        packed = gzip.compress((FMNIST_RAW / name).read_bytes(), compresslevel=1)
        (folder / f"{name}.gz").write_bytes(packed)
        checksums[f"{name}.gz"] = hashlib.md5(packed).hexdigest()
    return checksums


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_cifar100_tarball(path: Path, extra: list[tarfile.TarInfo] | None = None) -> None:
    """A tar.gz in the official layout (``cifar-100-python/{train,test,meta}``), small."""
    rng = np.random.default_rng(0)
    members: dict[str, bytes] = {}
    for split, n in (("train", 12), ("test", 6)):
        labels = [int(x) for x in rng.integers(0, 100, n)]
        batch = {
            b"batch_label": f"{split} batch".encode(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": labels,
            b"coarse_labels": [lab // 5 for lab in labels],
            b"filenames": [f"{i}.png".encode() for i in range(n)],
        }
        members[f"cifar-100-python/{split}"] = pickle.dumps(batch, protocol=2)
    members["cifar-100-python/meta"] = pickle.dumps({b"fine_label_names": []}, protocol=2)
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo("cifar-100-python")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- FashionMNIST


@needs_fmnist
def test_fetch_verify_and_load(server: str, gz_fmnist: dict[str, str], tmp_path: Path) -> None:
    root = tmp_path / "root"
    folder = fetch_fashion_mnist(root, base_url=server + "fmnist/", checksums=gz_fmnist)
    assert folder == root / "FashionMNIST" / "raw"
    assert all_files(root) == sorted(f"FashionMNIST/raw/{name}" for name in gz_fmnist)
    for name, md5 in gz_fmnist.items():
        assert md5_of(folder / name) == md5
    ds = load_dataset("fashion-mnist", "test", data_dir=root)
    reference = load_dataset("fashion-mnist", "test", data_dir=SHARED)
    assert torch.equal(ds.images, reference.images)
    assert ds.labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]

    # Present with the right checksum: nothing is fetched again (this mirror is dead).
    dead = f"http://127.0.0.1:{free_port()}/"
    assert fetch_fashion_mnist(root, base_url=dead, checksums=gz_fmnist) == folder


@needs_fmnist
def test_mirror_from_environment(
    server: str, gz_fmnist: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEURON_MERGING_MIRROR", server + "fmnist")  # no trailing slash
    folder = fetch_fashion_mnist(tmp_path, checksums=gz_fmnist)
    assert len(all_files(folder)) == 4


@needs_fmnist
def test_file_url_mirror(served_dir: Path, gz_fmnist: dict[str, str], tmp_path: Path) -> None:
    folder = fetch_fashion_mnist(
        tmp_path, base_url=(served_dir / "fmnist").as_uri(), checksums=gz_fmnist
    )
    assert len(load_dataset("fashion-mnist", "test", data_dir=tmp_path)) == 10000
    assert folder.is_dir()


@needs_fmnist
def test_checksum_mismatch_deletes_download(
    server: str, gz_fmnist: dict[str, str], tmp_path: Path
) -> None:
    url = server + "fmnist/t10k-labels-idx1-ubyte.gz"
    dest = tmp_path / "dl" / "t10k-labels-idx1-ubyte.gz"
    with pytest.raises(DatasetError) as err:
        download_file(url, dest, "0" * 32)
    message = str(err.value)
    assert url in message
    assert "0" * 32 in message
    assert gz_fmnist["t10k-labels-idx1-ubyte.gz"] in message  # the actual md5
    assert all_files(tmp_path) == []


@needs_fmnist
def test_corrupted_download_leaves_nothing(
    server: str, served_dir: Path, gz_fmnist: dict[str, str], tmp_path: Path
) -> None:
    corrupt = served_dir / "corrupt"
    corrupt.mkdir(exist_ok=True)
    for name in gz_fmnist:
        target = corrupt / name
        if name == "t10k-images-idx3-ubyte.gz":
            data = bytearray((served_dir / "fmnist" / name).read_bytes())
            for pos in (100, 5000, len(data) // 2):
                data[pos] ^= 0xFF
            target.write_bytes(bytes(data))
        elif not target.exists():
            target.symlink_to(served_dir / "fmnist" / name)
    with pytest.raises(DatasetError, match="checksum mismatch") as err:
        fetch_fashion_mnist(tmp_path, base_url=server + "corrupt/", checksums=gz_fmnist)
    assert "t10k-images-idx3-ubyte.gz" in str(err.value)
    files = all_files(tmp_path)
    assert "FashionMNIST/raw/t10k-images-idx3-ubyte.gz" not in files
    assert not any(f.endswith(".part") or "/." in f for f in files), files
    # The files before it were verified and kept; the loader cannot use a half set.
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)


@needs_fmnist
def test_load_dataset_download_checks_official_md5(
    server: str, gz_fmnist: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """download=True uses the official checksums and sizes, which our re-gzipped copies fail.

    The copy is larger than the official file, so it is refused from its
    Content-Length before its body is read (D12).
    """
    monkeypatch.setenv("NEURON_MERGING_MIRROR", server + "fmnist/")
    size = KNOWN_SIZES["train-images-idx3-ubyte.gz"]
    with pytest.raises(DatasetError, match=f"but the file has {size}") as err:
        load_dataset("fashion-mnist", "test", data_dir=tmp_path, download=True)
    assert server + "fmnist/train-images-idx3-ubyte.gz" in str(err.value)
    assert all_files(tmp_path) == []


def test_http_404(server: str, tmp_path: Path) -> None:
    url = server + "does-not-exist.gz"
    with pytest.raises(DatasetError, match="404") as err:
        download_file(url, tmp_path / "x.gz", "0" * 32)
    assert url in str(err.value)
    assert all_files(tmp_path) == []


def test_unreachable_server(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/file.gz"
    with pytest.raises(DatasetError, match="failed") as err:
        download_file(url, tmp_path / "file.gz", "0" * 32, timeout=5)
    assert url in str(err.value)
    assert all_files(tmp_path) == []


def test_short_body(tmp_path: Path) -> None:
    with serve(_ShortBodyHandler) as url, pytest.raises(DatasetError) as err:
        download_file(url + "short.gz", tmp_path / "short.gz", "0" * 32, timeout=5)
    assert url in str(err.value)
    assert all_files(tmp_path) == []


def test_download_gets_the_permissions_of_a_new_file(
    server: str, served_dir: Path, tmp_path: Path
) -> None:
    """The file is written through the same temporary-file helper as every other output:
    a finished download has ``0666 & ~umask``, not the ``0600`` of a private temporary."""
    (served_dir / "plain.bin").write_bytes(b"weights")
    previous = os.umask(0o022)
    try:
        got = download_file(
            server + "plain.bin", tmp_path / "plain.bin", hashlib.md5(b"weights").hexdigest()
        )
    finally:
        os.umask(previous)
    assert got.read_bytes() == b"weights"
    assert stat.S_IMODE(got.stat().st_mode) == 0o644
    assert all_files(tmp_path) == ["plain.bin"]


def test_refuses_other_schemes(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="scheme"):
        download_file("ftp://example.invalid/x.gz", tmp_path / "x.gz", "0" * 32)


# --------------------------------------------------------------------------- CIFAR tarballs


def test_fetch_cifar100_tarball(server: str, served_dir: Path, tmp_path: Path) -> None:
    mirror = served_dir / "kriz"
    mirror.mkdir()
    archive = mirror / "cifar-100-python.tar.gz"
    write_cifar100_tarball(archive)
    folder = fetch_cifar(tmp_path, "cifar100", base_url=server + "kriz/", md5=md5_of(archive))
    assert folder == tmp_path / "cifar-100-python"
    assert all_files(tmp_path) == [
        "cifar-100-python/meta",
        "cifar-100-python/test",
        "cifar-100-python/train",
    ]
    train = load_dataset("cifar100", "train", data_dir=tmp_path)
    assert train.images.shape == (12, 3, 32, 32)
    assert len(load_dataset("cifar100", "test", data_dir=tmp_path)) == 6

    with pytest.raises(DatasetError, match="checksum mismatch"):
        fetch_cifar(tmp_path / "other", "cifar100", base_url=server + "kriz/")
    assert not (tmp_path / "other").exists() or all_files(tmp_path / "other") == []


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = 4 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_member("../escaped"), "'..'"),
        (_member("cifar-100-python/../../escaped"), "'..'"),
        (_member("/tmp/neuron-merging-absolute-escape"), "absolute"),
        (_member("cifar-100-python/link", tarfile.SYMTYPE, "/etc/passwd"), "link"),
        (_member("cifar-100-python/hard", tarfile.LNKTYPE, "cifar-100-python/train"), "link"),
        (_member("cifar-100-python/fifo", tarfile.FIFOTYPE), "special"),
        (_member("elsewhere/file"), "outside"),
    ],
)
def test_unsafe_tarball_is_refused(tmp_path: Path, member: tarfile.TarInfo, reason: str) -> None:
    archive = tmp_path / "cifar-100-python.tar.gz"
    write_cifar100_tarball(archive, extra=[member])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DatasetError, match=reason) as err:
        extract_tarball(archive, dest, "cifar-100-python")
    assert str(archive) in str(err.value)
    assert all_files(dest) == []
    assert list(dest.iterdir()) == []  # no staging folder left either
    assert not (tmp_path / "escaped").exists()
    assert not Path("/tmp/neuron-merging-absolute-escape").exists()


def test_truncated_tarball(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    write_cifar100_tarball(archive)
    archive.write_bytes(archive.read_bytes()[:200])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DatasetError, match="cannot extract"):
        extract_tarball(archive, dest, "cifar-100-python")
    assert list(dest.iterdir()) == []


def test_download_into_cache_by_default(
    server: str, served_dir: Path, isolated_search_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without data_dir or $NEURON_MERGING_DATA, download=True fills the user cache."""
    monkeypatch.setenv("NEURON_MERGING_MIRROR", server + "bad-cifar/")
    (served_dir / "bad-cifar").mkdir(exist_ok=True)
    write_cifar100_tarball(served_dir / "bad-cifar" / "cifar-100-python.tar.gz")
    cache = isolated_search_path / "xdg-cache" / "neuron-merging"
    with pytest.raises(DatasetError, match="checksum mismatch") as err:
        load_dataset("cifar100", "test", download=True)
    assert "cifar-100-python.tar.gz" in str(err.value)
    assert cache.is_dir() and all_files(cache) == []  # tried there, left nothing


def test_environment_data_dir_is_download_target(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEURON_MERGING_DATA", str(tmp_path / "env-data"))
    monkeypatch.setenv("NEURON_MERGING_MIRROR", server + "nothing-here/")
    with pytest.raises(DatasetError, match="404") as err:
        load_dataset("cifar10", "test", download=True)
    assert "cifar-10-python.tar.gz" in str(err.value)
    assert (tmp_path / "env-data").is_dir()
    assert all_files(tmp_path / "env-data") == []


# --------------------------------------------------------------------------- issue 11: D11, D12


class _TrickleHandler(http.server.BaseHTTPRequestHandler):
    """Announces 100 bytes, then sends one byte every 0.5 s: each read succeeds in time."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.5)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _ZerosHandler(http.server.BaseHTTPRequestHandler):
    """Streams zeros with no Content-Length, for as long as the client reads."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(100_000):
                self.wfile.write(b"\0" * 65536)
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_d11_a_trickling_mirror_hits_the_overall_deadline(tmp_path: Path) -> None:
    """D11: one byte every 0.5 s never trips a 2 s per-read timeout; the 1.5 s deadline does."""
    with serve(_TrickleHandler) as url:
        start = time.monotonic()
        with pytest.raises(DatasetError, match=r"not finished after 1\.5 s") as err:
            download_file(url + "slow.gz", tmp_path / "slow.gz", "0" * 32, timeout=2, deadline=1.5)
        elapsed = time.monotonic() - start
    assert "the partial file was deleted" in str(err.value)
    assert all_files(tmp_path) == []
    assert elapsed < 60  # a hang guard only: without the deadline this takes 50 s or more


def test_d12_a_download_is_cut_off_at_the_files_known_size(tmp_path: Path) -> None:
    """D12: zeros with no Content-Length used to fill a .part far beyond the real file's size."""
    name = "t10k-labels-idx1-ubyte.gz"
    with serve(_ZerosHandler) as url:
        with pytest.raises(DatasetError, match="more than the file's 5148 bytes") as err:
            download_file(url + name, tmp_path / name, FASHION_MNIST_MD5[name])
        assert "the partial file was deleted" in str(err.value)
        with pytest.raises(DatasetError, match="more than the file's 1000 bytes"):
            download_file(url + "any.bin", tmp_path / "any.bin", "0" * 32, size=1000)
    assert all_files(tmp_path) == []


def test_d12_an_announced_size_over_the_known_size_is_refused_unread(tmp_path: Path) -> None:
    refused = pytest.raises(DatasetError, match="announces 1000 bytes, but the file has 999")
    with serve(_ShortBodyHandler) as url, refused:  # announces 1000 bytes
        download_file(url + "x.gz", tmp_path / "x.gz", "0" * 32, size=999)
    assert all_files(tmp_path) == []


def test_d12_stale_part_files_of_dead_downloads_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / f".x.gz.{int(dead.stdout)}.k1ll3d.part"
    legacy = tmp_path / ".x.gz.abc123.part"  # written before pids were in the name
    live = tmp_path / f".x.gz.{os.getpid()}.other.part"  # another download, still running
    for path in (stale, legacy, live):
        path.write_bytes(b"partial")
    with serve(_ShortBodyHandler) as url, pytest.raises(DatasetError):
        download_file(url + "x.gz", tmp_path / "x.gz", "0" * 32)
    assert not stale.exists() and not legacy.exists()
    assert live.read_bytes() == b"partial"
