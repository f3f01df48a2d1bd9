"""Which physical GPU a lock stands for: UUIDs across views, MIG instances, slots under a parent's
CUDA_VISIBLE_DEVICES, unreadable GPUs, and memory read at grant (FAKE NVML where a GPU is needed).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
from tests.unit.gpus.nvml_fake import GIB, board, fake_nvml, mig

from simbridge.config import GpuSettings, Settings
from simbridge.gpus import (
    GpuPool,
    LeaseTimeout,
    NoSuchGpu,
    NvmlSource,
    NvmlUnavailable,
    SlotSource,
    discover_gpus,
    open_source,
)

FOUR = ["GPU-0000", "GPU-1111", "GPU-2222", "GPU-3333"]


def _source(monkeypatch: pytest.MonkeyPatch, boards: list[dict[str, Any]], **options: Any) -> NvmlSource:
    fake = fake_nvml(boards)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return NvmlSource(**options)


@pytest.fixture(autouse=True)
def _no_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_two_views_of_the_same_gpus_never_share_one(monkeypatch: pytest.MonkeyPatch, lock_dir: Path) -> None:
    # A container (or cgroup) that shows only GPUs 2 and 3 numbers them 0 and 1.
    host = GpuPool(source=_source(monkeypatch, [board(u) for u in FOUR]), lock_dir=lock_dir)
    container = GpuPool(source=_source(monkeypatch, [board(u) for u in FOUR[2:]]), lock_dir=lock_dir)
    with container.lease(2, timeout=0) as inside:
        assert inside.indices == (0, 1)
        assert [g.uuid for g in inside.gpus] == FOUR[2:]
        with pytest.raises(LeaseTimeout):
            host.lease(3, timeout=0)
        with host.lease(2, timeout=0) as outside:
            assert [g.uuid for g in outside.gpus] == FOUR[:2]
            assert outside.env["CUDA_VISIBLE_DEVICES"] == "GPU-0000,GPU-1111"
    assert (lock_dir / "GPU-2222.lock").exists()


def test_cuda_visible_devices_views_overlap_by_uuid(monkeypatch: pytest.MonkeyPatch, lock_dir: Path) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2")
    left = GpuPool(source=_source(monkeypatch, [board(u) for u in FOUR]), lock_dir=lock_dir)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-2222,3")
    right = GpuPool(source=_source(monkeypatch, [board(u) for u in FOUR]), lock_dir=lock_dir)
    assert [g.uuid for g in left.gpus] == FOUR[1:3]
    assert [g.uuid for g in right.gpus] == FOUR[2:]
    with left.lease(2, timeout=0), pytest.raises(LeaseTimeout):
        right.lease(2, timeout=0)


def test_slot_pool_stays_inside_the_parents_cuda_visible_devices(
    monkeypatch: pytest.MonkeyPatch, lock_dir: Path
) -> None:
    parent = GpuPool(slots=4, lock_dir=lock_dir)
    with parent.lease(2, timeout=0) as given:  # slots 0 and 1
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # what the child's parent gave it
        child = GpuPool(slots=4, lock_dir=lock_dir)
        assert [g.index for g in child.gpus] == [2, 3]
        with child.lease(timeout=0) as lease:
            assert lease.env["CUDA_VISIBLE_DEVICES"] == "2"
            assert not set(lease.indices) & set(given.indices)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
        with pytest.raises(NoSuchGpu, match="CUDA_VISIBLE_DEVICES"):
            GpuPool(slots=4, lock_dir=lock_dir)


def test_an_unreadable_gpu_outside_cuda_visible_devices_is_ignored(
    monkeypatch: pytest.MonkeyPatch, lock_dir: Path
) -> None:
    boards = [board("GPU-0000", lost=True), board("GPU-1111")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with GpuPool(source=_source(monkeypatch, boards), lock_dir=lock_dir) as pool:
        assert [g.uuid for g in pool.gpus] == ["GPU-1111"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1111")
    with GpuPool(source=_source(monkeypatch, boards), lock_dir=lock_dir) as pool:
        assert [g.uuid for g in pool.gpus] == ["GPU-1111"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(NvmlUnavailable, match="GPU 0"):  # explicit NVML, GPU 0 wanted: loud
        GpuPool(source=_source(monkeypatch, boards), lock_dir=lock_dir)


def test_auto_discovery_skips_an_unreadable_gpu_and_falls_back_when_none_is_left(
    monkeypatch: pytest.MonkeyPatch, lock_dir: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([board("GPU-0000", lost=True), board("GPU-1111")]))
    settings = Settings(gpus=GpuSettings(discovery="auto", slots=3, lock_dir=lock_dir))
    assert [g.uuid for g in discover_gpus(settings)] == ["GPU-1111"]
    with GpuPool.from_settings(settings) as pool:
        assert [g.uuid for g in pool.gpus] == ["GPU-1111"]
        with pool.lease(timeout=0) as lease:
            assert lease.env["CUDA_VISIBLE_DEVICES"] == "GPU-1111"
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([board("GPU-0000", lost=True)]))
    fallback = open_source(GpuSettings(discovery="auto", slots=3))
    assert isinstance(fallback, SlotSource)
    with pytest.raises(NvmlUnavailable, match="could read none"):
        open_source(GpuSettings(discovery="nvml"))


def test_lease_reports_memory_read_at_grant(monkeypatch: pytest.MonkeyPatch, lock_dir: Path) -> None:
    source = _source(monkeypatch, [board("GPU-0000", total=80 * GIB, free=70 * GIB)])
    pool = GpuPool(source=source, lock_dir=lock_dir)
    fake: types.ModuleType = sys.modules["pynvml"]  # type: ignore[assignment]
    fake.boards[0]["free"] = 3 * GIB  # type: ignore[attr-defined]
    with pool.lease(timeout=0) as lease:
        assert lease.gpus[0].memory_free == 3 * GIB
    assert pool.gpus[0].memory_free == 70 * GIB  # the pool's own view stays as built


def test_mig_instances_are_enumerated_and_leased_by_their_uuid(
    monkeypatch: pytest.MonkeyPatch, lock_dir: Path
) -> None:
    boards = [
        board("GPU-mig0", migs=[mig("MIG-aaaa", slot=0), mig("MIG-bbbb", slot=3)]),
        board("GPU-1111"),
    ]
    source = _source(monkeypatch, boards)
    assert source.count() == 3
    first = source.read(0)
    assert (first.uuid, first.parent_uuid, first.nvml_index) == ("MIG-aaaa", "GPU-mig0", 0)
    assert first.memory_total == 10 * GIB and first.utilization is None
    assert source.read(2).uuid == "GPU-1111"
    pool = GpuPool(source=source, lock_dir=lock_dir)
    with pool.lease(3, timeout=0) as lease:
        assert lease.env["CUDA_VISIBLE_DEVICES"] == "MIG-aaaa,MIG-bbbb,GPU-1111"
        assert (lock_dir / "MIG-bbbb.lock").exists()
    # A parent that names the MIG board gives its instances; one that names an instance, just it.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-mig0")
    assert [g.uuid for g in GpuPool(source=_source(monkeypatch, boards), lock_dir=lock_dir).gpus] == [
        "MIG-aaaa",
        "MIG-bbbb",
    ]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-bbbb")
    only = GpuPool(source=_source(monkeypatch, boards), lock_dir=lock_dir)
    assert [g.uuid for g in only.gpus] == ["MIG-bbbb"]
    with pool.lease(timeout=0) as other, only.lease(timeout=0) as mine:
        assert other.gpus[0].uuid == "MIG-aaaa"  # the same instance is never leased twice
        assert mine.gpus[0].uuid == "MIG-bbbb"


def test_a_mig_reconfigured_under_the_pool_is_refused(
    monkeypatch: pytest.MonkeyPatch, lock_dir: Path
) -> None:
    boards = [board("GPU-mig0", migs=[mig("MIG-aaaa", slot=0)])]
    pool = GpuPool(source=_source(monkeypatch, boards), lock_dir=lock_dir)
    boards[0]["migs"][0]["uuid"] = "MIG-cccc"  # destroyed and re-created: a new instance
    with pytest.raises(NvmlUnavailable, match="is now MIG-cccc"):
        pool.lease(timeout=0)
    boards[0]["migs"][0]["uuid"] = "MIG-aaaa"
    with pool.lease(timeout=0):
        pass


def test_undecodable_names_and_uuids_from_the_driver_are_typed(
    monkeypatch: pytest.MonkeyPatch, lock_dir: Path
) -> None:
    boards = [board("GPU-0000", name=b"\xff\xfeA100"), board(b"GPU-\xff\xfe"), board("GPU-2\n22")]
    source = _source(monkeypatch, boards, skip_unreadable=True)
    assert source.read(0).name.endswith("A100")
    for index in (1, 2):
        with pytest.raises(NvmlUnavailable):
            source.read(index)
    assert [g.uuid for g in GpuPool(source=source, lock_dir=lock_dir).gpus] == ["GPU-0000"]
