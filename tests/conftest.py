"""Shared pytest configuration: the ``--slow`` option, hypothesis profiles, shared fixtures.

Tests marked ``@pytest.mark.slow`` (the marker is declared in pyproject.toml)
are skipped unless pytest runs with ``--slow``.

Hypothesis runs derandomised by default, so the suite (and CI) is reproducible;
``HYPOTHESIS_PROFILE=explore`` draws fresh random examples on every run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from neuron_merging.data import _locate

settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow", action="store_true", default=False, help="also run tests marked slow"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow test: run with --slow")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@pytest.fixture
def isolated_search_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """Keep the real environment (env vars, Debian dir, ~/.cache) out of a data test."""
    base = tmp_path_factory.mktemp("isolated")
    monkeypatch.delenv("NEURON_MERGING_DATA", raising=False)
    monkeypatch.delenv("NEURON_MERGING_MIRROR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(base / "xdg-cache"))
    monkeypatch.setattr(_locate, "_DEBIAN_DIR", base / "no-debian")
    yield base


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs, for full-disk tests (root only; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr!r}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
