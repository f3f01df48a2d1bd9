"""The NVML code path, run against a FAKE NVML library (this machine has no GPU and no driver).

The fake stands in for the driver only: it answers the same nvml* calls with fixed boards and
raises nvidia-ml-py's real NVMLError classes. Everything above it (NvmlSource, discovery, the pool,
the CLI) is the real code that runs on a GPU machine.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pynvml
import pytest
from tests.unit.gpus.nvml_fake import fake_nvml
from typer.testing import CliRunner

from simbridge.config import GpuSettings
from simbridge.gpus import GpuPool, NoSuchGpu, NvmlSource, NvmlUnavailable, discover_gpus, open_source
from simbridge.gpus.cli import app

GIB = 2**30


BOARDS = [
    {"name": b"NVIDIA A100-SXM4-80GB", "uuid": b"GPU-aaaa", "total": 80 * GIB, "free": 70 * GIB, "util": 3},
    {"name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-bbbb", "total": 80 * GIB, "free": 5 * GIB, "util": None},
]


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    fake = fake_nvml([dict(board) for board in BOARDS])
    monkeypatch.setitem(__import__("sys").modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def test_nvml_source_reads_boards(nvml: types.ModuleType) -> None:
    with NvmlSource() as source:
        assert source.count() == 2
        assert source.note == "NVML, driver 550.54.15"
        first, second = source.read(0), source.read(1)
        with pytest.raises(NoSuchGpu, match=r"0\.\.1"):
            source.read(2)
    assert (first.name, first.uuid, first.source) == ("NVIDIA A100-SXM4-80GB", "GPU-aaaa", "nvml")
    assert (first.memory_total, first.memory_free, first.utilization) == (80 * GIB, 70 * GIB, 3)
    assert second.name == "NVIDIA A100-SXM4-80GB"  # str and bytes answers both read
    assert second.utilization is None  # "not supported" is unknown, not an error
    assert nvml.state == {"inits": 1, "shutdowns": 1}


def test_auto_discovery_prefers_nvml(nvml: types.ModuleType) -> None:
    gpus = discover_gpus(GpuSettings(discovery="auto", slots=7))
    assert [g.index for g in gpus] == [0, 1]
    assert all(g.source == "nvml" for g in gpus)


def test_driver_not_loaded_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = fake_nvml(BOARDS, init_error=pynvml.NVMLError)
    monkeypatch.setitem(__import__("sys").modules, "pynvml", broken)
    with pytest.raises(NvmlUnavailable, match="driver"):
        open_source(GpuSettings(discovery="nvml"))
    assert open_source(GpuSettings(discovery="auto", slots=2)).kind == "slots"


def test_no_boards_is_nvml_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    empty = fake_nvml([])
    monkeypatch.setitem(__import__("sys").modules, "pynvml", empty)
    with pytest.raises(NvmlUnavailable, match="sees no GPU"):
        NvmlSource()
    assert empty.state["shutdowns"] == 1  # type: ignore[attr-defined]


def test_pool_on_nvml_sets_device_order_and_honours_memory(nvml: types.ModuleType, lock_dir: Path) -> None:
    with GpuPool(source=NvmlSource(), lock_dir=lock_dir) as pool:
        with pool.lease(min_free_memory=40 * GIB) as lease:
            assert lease.indices == (0,)
            # UUIDs name the same GPU in every view (container, cgroup, parent's CUDA_VISIBLE_DEVICES).
            assert lease.env == {"CUDA_VISIBLE_DEVICES": "GPU-aaaa", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        nvml.nvmlDeviceGetHandleByIndex(1)["free"] = 60 * GIB  # type: ignore[attr-defined]
        with pool.lease(2, min_free_memory=40 * GIB, timeout=0) as both:
            assert both.indices == (0, 1)
            assert both.env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa,GPU-bbbb"


def test_cli_shows_memory_and_utilisation(
    nvml: types.ModuleType, monkeypatch: pytest.MonkeyPatch, lock_dir: Path
) -> None:
    monkeypatch.setenv("SIMBRIDGE_GPUS__DISCOVERY", "nvml")
    monkeypatch.setenv("SIMBRIDGE_GPUS__LOCK_DIR", str(lock_dir))
    monkeypatch.delenv("SIMBRIDGE_CONFIG", raising=False)
    monkeypatch.chdir(lock_dir.parent)
    table = CliRunner().invoke(app, [], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    assert "NVIDIA A100-SXM4-80GB" in table.output
    assert "10.0 / 80.0 GiB" in table.output
    assert "3 %" in table.output
    assert "driver 550.54.15" in table.output
    data = json.loads(CliRunner().invoke(app, ["--json"]).stdout)
    assert [row["uuid"] for row in data["gpus"]] == ["GPU-aaaa", "GPU-bbbb"]
    assert data["gpus"][1]["utilization"] is None


@pytest.mark.parametrize("visible", ["1", "GPU-bbbb", " 1 ,"])
def test_pool_stays_inside_the_gpus_a_parent_gave_us(
    nvml: types.ModuleType, monkeypatch: pytest.MonkeyPatch, lock_dir: Path, visible: str
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with GpuPool(source=NvmlSource(), lock_dir=lock_dir) as pool:
        assert [g.index for g in pool.gpus] == [1]
        with pool.lease() as lease:
            assert lease.env["CUDA_VISIBLE_DEVICES"] == "GPU-bbbb"  # the physical GPU, by UUID


@pytest.mark.parametrize("visible", ["", "7", "GPU-zzzz", "GPU-"])
def test_bad_cuda_visible_devices_is_no_such_gpu(
    nvml: types.ModuleType, monkeypatch: pytest.MonkeyPatch, lock_dir: Path, visible: str
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(NoSuchGpu, match="CUDA_VISIBLE_DEVICES"):
        GpuPool(source=NvmlSource(), lock_dir=lock_dir)
