"""Shared fixtures of the GPU-plane unit tests, including the one fake: a GPU source."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from simbridge.gpus import GpuInfo, NoSuchGpu
from simbridge.gpus.discovery import SourceKind


class FakeGpuSource:
    """A FAKE GPU source (no GPU on this machine): fixed names and totals, free memory set by tests.

    It stands in for NVML only where a real GPU would be needed; the pool code under test is real.
    """

    kind: SourceKind = "fake"
    note = "fake GPUs for tests"

    def __init__(self, totals: list[int]) -> None:
        self.totals = list(totals)
        self.free = list(totals)
        self.closed = False

    def count(self) -> int:
        return len(self.totals)

    def read(self, index: int) -> GpuInfo:
        if not 0 <= index < len(self.totals):
            raise NoSuchGpu(f"fake GPU {index} does not exist")
        return GpuInfo(
            index=index,
            name=f"Fake GPU {index}",
            uuid=f"GPU-fake-{index}",
            memory_total=self.totals[index],
            memory_free=self.free[index],
            utilization=7,
            source="fake",
        )

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_gpus() -> type[FakeGpuSource]:
    """The FakeGpuSource class (a fixture, so test modules need no package imports)."""
    return FakeGpuSource


@pytest.fixture(autouse=True)
def _default_logging() -> Iterator[None]:
    # The CLI configures structlog for its process; put back what was there for the next test.
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(autouse=True)
def _no_inherited_gpu_view(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pools stay inside the CUDA_VISIBLE_DEVICES they are started with (slots too): a GPU
    # machine or CI runner that sets it must not shrink the pools these tests build.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture
def lock_dir(tmp_path: Path) -> Path:
    return tmp_path / "locks"
