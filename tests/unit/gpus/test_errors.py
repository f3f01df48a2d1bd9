"""Every error a caller of simbridge.gpus can get is a SimbridgeError with the nearest builtin as
second base, and `simbridge gpus` turns each into one line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import errno
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import simbridge
from simbridge.errors import SimbridgeError
from simbridge.gpus import GpuPool, InvalidLeaseRequest, LockDirError, NoSuchGpu
from simbridge.gpus.cli import app

BAD_POOLS: list[tuple[dict[str, Any], type[Exception]]] = [
    ({"slots": "3"}, NoSuchGpu),
    ({"slots": True}, NoSuchGpu),
    ({"slots": 10**9}, NoSuchGpu),  # a loop bound: refused, never iterated
    ({"slots": 1, "poll_interval": math.nan}, InvalidLeaseRequest),
    ({"slots": 1, "poll_interval": math.inf}, InvalidLeaseRequest),
    ({"slots": 1, "poll_interval": "0.1"}, InvalidLeaseRequest),
    ({"slots": 1, "default_timeout": math.nan}, InvalidLeaseRequest),
    ({"slots": 1, "default_timeout": "1"}, InvalidLeaseRequest),
    ({"slots": 1, "lock_mode": -1}, InvalidLeaseRequest),
    ({"slots": 1, "lock_mode": 0o7777}, InvalidLeaseRequest),
    ({"slots": 1, "lock_mode": 0o444}, InvalidLeaseRequest),
    ({"slots": 1, "lock_mode": "0o600"}, InvalidLeaseRequest),
    ({"slots": 1, "lock_dir": 5}, InvalidLeaseRequest),
]


@pytest.mark.parametrize(("options", "expected"), BAD_POOLS, ids=range(len(BAD_POOLS)))
def test_bad_pool_options_are_typed(
    lock_dir: Path, options: dict[str, Any], expected: type[Exception]
) -> None:
    options.setdefault("lock_dir", lock_dir)
    with pytest.raises(expected) as caught:
        GpuPool(**options)
    assert isinstance(caught.value, SimbridgeError)
    assert isinstance(caught.value, ValueError | LookupError)


@pytest.mark.parametrize(
    "request_",
    [
        {"timeout": "1"},
        {"timeout": True},
        {"min_free_memory": "1"},
        {"min_free_memory": 1.5},
    ],
    ids=["timeout-str", "timeout-bool", "memory-str", "memory-float"],
)
def test_bad_lease_requests_are_typed(lock_dir: Path, request_: dict[str, Any]) -> None:
    pool = GpuPool(slots=1, lock_dir=lock_dir)
    with pytest.raises(InvalidLeaseRequest):
        pool.lease(**request_)
    assert pool.waiting() == 0


@pytest.mark.parametrize("pid", [0, -1, 2**64, "12", True, 1.0])
def test_record_holder_refuses_what_is_not_a_pid(lock_dir: Path, pid: Any) -> None:
    with (
        GpuPool(slots=1, lock_dir=lock_dir).lease() as lease,
        pytest.raises(InvalidLeaseRequest, match="process id"),
    ):
        lease.record_holder(pid)


def _lock_dirs_that_cannot_be_made(tmp_path: Path) -> list[tuple[Path, int]]:
    (tmp_path / "file").write_text("x")
    return [
        (tmp_path / "file" / "locks", errno.ENOTDIR),
        (tmp_path / ("x" * 300), errno.ENAMETOOLONG),
    ]


def test_a_lock_folder_that_cannot_be_created_is_lock_dir_error(tmp_path: Path) -> None:
    for path, code in _lock_dirs_that_cannot_be_made(tmp_path):
        with pytest.raises(LockDirError) as caught:
            GpuPool(slots=1, lock_dir=path)
        assert caught.value.errno == code
        assert isinstance(caught.value, OSError)
        assert str(path.name)[:20] in str(caught.value)
    with pytest.raises(InvalidLeaseRequest, match="NUL"):
        GpuPool(slots=1, lock_dir=tmp_path / "a\0b")


def _env(monkeypatch: pytest.MonkeyPatch, lock_dir: Path | str, **more: str) -> None:
    monkeypatch.setenv("SIMBRIDGE_GPUS__DISCOVERY", "slots")
    monkeypatch.setenv("SIMBRIDGE_GPUS__SLOTS", "2")
    monkeypatch.setenv("SIMBRIDGE_GPUS__LOCK_DIR", str(lock_dir))
    monkeypatch.delenv("SIMBRIDGE_CONFIG", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for key, value in more.items():
        monkeypatch.setenv(key, value)


def _one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(app, args, env={"COLUMNS": "40"})
    assert result.exit_code == 1, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error:")
    return lines[0]


def test_cli_bad_inputs_are_one_line_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    _env(monkeypatch, tmp_path / "locks")
    for path, _ in _lock_dirs_that_cannot_be_made(tmp_path):
        assert "lock folder" in _one_line_error(["--lock-dir", str(path)])
    nul = CliRunner().invoke(app, ["--lock-dir", "a\0b"])  # refused by Typer itself: a usage error
    assert nul.exit_code == 2
    assert "Traceback" not in nul.output
    assert "[brackets]" in _one_line_error(["--lock-dir", str(tmp_path / "file" / "[brackets]")])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert "CUDA_VISIBLE_DEVICES" in _one_line_error(["--json"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("SIMBRIDGE_GPUS__SLOTS", "many")
    assert "slots" in _one_line_error([])


def test_cli_in_a_real_process_never_prints_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(simbridge.__file__).resolve().parents[1]),
        "SIMBRIDGE_GPUS__DISCOVERY": "slots",
        "SIMBRIDGE_GPUS__LOCK_DIR": str(tmp_path / "file" / "locks"),
    }
    env.pop("SIMBRIDGE_CONFIG", None)
    done = subprocess.run(
        [sys.executable, "-c", "from simbridge.cli import main; main()", "gpus"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
