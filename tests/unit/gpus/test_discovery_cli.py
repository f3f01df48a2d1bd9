"""Discovery (NVML or configured slots) and the `simbridge gpus` command, run through Typer."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simbridge.config import GpuSettings, Settings
from simbridge.gpus import (
    GpuPool,
    NoSuchGpu,
    NvmlSource,
    NvmlUnavailable,
    SlotSource,
    discover_gpus,
    open_source,
)
from simbridge.gpus.cli import app


def _nvml_or_reason() -> tuple[NvmlSource | None, str]:
    try:
        return NvmlSource(), ""
    except NvmlUnavailable as exc:
        return None, str(exc)


def test_nvml_source_reads_real_gpus_or_says_why_not(not_run_here: Callable[[str], None]) -> None:
    # Runs the real NVML path: on a GPU machine it reads the boards, here it must fail cleanly.
    source, reason = _nvml_or_reason()
    if source is None:
        not_run_here(f"reading real GPUs through NVML: {reason}")
        assert "NVML" in reason or "nvidia-ml-py" in reason
        return
    with source:
        info = source.read(0)
        assert info.source == "nvml"
        assert info.memory_total is not None and info.memory_total > 0
        assert info.uuid is not None and info.uuid.startswith(("GPU-", "MIG-"))
        with pytest.raises(NoSuchGpu):
            source.read(source.count())


def test_discovery_nvml_explicit_fails_loudly_without_a_driver(not_run_here: Callable[[str], None]) -> None:
    source, _ = _nvml_or_reason()
    if source is not None:
        not_run_here("failing without a driver: this machine has NVML and a GPU")
        source.close()
        gpus = discover_gpus(GpuSettings(discovery="nvml"))
        assert gpus and all(g.source == "nvml" for g in gpus)
        return
    with pytest.raises(NvmlUnavailable) as caught:
        open_source(GpuSettings(discovery="nvml"))
    assert isinstance(caught.value, RuntimeError)
    assert caught.value.__cause__ is not None


def test_auto_discovery_falls_back_to_configured_slots(not_run_here: Callable[[str], None]) -> None:
    source, _ = _nvml_or_reason()
    gpus = discover_gpus(Settings(gpus=GpuSettings(discovery="auto", slots=3)))
    if source is not None:
        not_run_here("the fallback to slots: this machine has NVML and a GPU")
        source.close()
        assert all(g.source == "nvml" for g in gpus)
        return
    assert [g.index for g in gpus] == [0, 1, 2]
    assert all(g.source == "slots" and g.memory_total is None for g in gpus)
    fallback = open_source(GpuSettings(discovery="auto", slots=2))
    assert isinstance(fallback, SlotSource)
    assert "NVML absent" in fallback.note


def test_slots_discovery_never_asks_nvml() -> None:
    source = open_source(GpuSettings(discovery="slots", slots=5))
    assert isinstance(source, SlotSource)
    assert source.count() == 5
    assert source.read(4).name == "slot 4"
    with pytest.raises(NoSuchGpu, match=r"slots 0\.\.4"):
        source.read(5)


def _settings_env(monkeypatch: pytest.MonkeyPatch, lock_dir: Path, slots: int) -> None:
    monkeypatch.setenv("SIMBRIDGE_GPUS__DISCOVERY", "slots")
    monkeypatch.setenv("SIMBRIDGE_GPUS__SLOTS", str(slots))
    monkeypatch.setenv("SIMBRIDGE_GPUS__LOCK_DIR", str(lock_dir))
    monkeypatch.delenv("SIMBRIDGE_CONFIG", raising=False)
    monkeypatch.chdir(lock_dir.parent)


def test_cli_table_shows_each_slot_and_its_holder(monkeypatch: pytest.MonkeyPatch, lock_dir: Path) -> None:
    _settings_env(monkeypatch, lock_dir, slots=3)
    pool = GpuPool(slots=3, lock_dir=lock_dir)
    with pool.lease():
        result = CliRunner().invoke(app, [], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "slot 0" in result.output and "slot 2" in result.output
    assert str(os.getpid()) in result.output
    assert result.output.count("free") == 2
    assert "0 lease(s) waiting" in result.output


def test_cli_json_and_lock_dir_option(monkeypatch: pytest.MonkeyPatch, lock_dir: Path) -> None:
    _settings_env(monkeypatch, lock_dir, slots=2)
    other = lock_dir.parent / "other"
    with GpuPool(slots=2, lock_dir=other).lease(2):
        result = CliRunner().invoke(app, ["--json", "--lock-dir", str(other)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [row["held"] for row in data["gpus"]] == [True, True]
    assert data["waiting"] == 0
    assert all(row["memory_total"] is None for row in data["gpus"])


def test_cli_reports_bad_setup_as_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("not a folder")
    _settings_env(monkeypatch, target, slots=1)
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 1
    assert "not a folder" in result.output


def test_cli_json_stays_clean_when_discovery_logs(monkeypatch: pytest.MonkeyPatch, lock_dir: Path) -> None:
    _settings_env(monkeypatch, lock_dir, slots=2)
    monkeypatch.setenv("SIMBRIDGE_GPUS__DISCOVERY", "auto")
    result = CliRunner().invoke(app, ["--json", "--verbose"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # logs went to stderr, not into the JSON
    assert len(data["gpus"]) >= 1


def test_real_nvml_pool_locks_by_uuid_or_says_why_not(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real NVML path of UUID-keyed locks and MIG enumeration: exercised where a GPU exists.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    source, reason = _nvml_or_reason()
    if source is None:
        assert "NVML" in reason or "nvidia-ml-py" in reason
        return
    with GpuPool(source=source, lock_dir=lock_dir) as pool, pool.lease(timeout=0) as lease:
        (gpu,) = lease.gpus
        assert gpu.uuid is not None and gpu.uuid.startswith(("GPU-", "MIG-"))
        assert lease.env["CUDA_VISIBLE_DEVICES"] == gpu.uuid
        assert (lock_dir / f"{gpu.uuid}.lock").exists()
        assert gpu.memory_free is not None
        if gpu.uuid.startswith("MIG-"):
            assert gpu.parent_uuid is not None and gpu.parent_uuid.startswith("GPU-")
