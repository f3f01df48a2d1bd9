"""Logging: the library is silent unless the application configures `logging`; the CLI configures it
once, from log.level and log.format, for every command."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.support import REPO

# A program that uses each plane as a library would, and prints nothing itself.
LIBRARY_USER = textwrap.dedent(
    """
    import numpy as np
    from simbridge.config import load_settings
    from simbridge.gpus import GpuPool
    from simbridge.jobs.store import Store
    from simbridge.models import ModelManager
    from simbridge.shm import Block

    settings = load_settings()
    with Block.create(NAME, (4,), np.float64) as block:
        block.publish(np.arange(4.0))
        with Block.open(NAME, timeout=5) as reader:
            assert reader.read(timeout=5).array.sum() == 6.0
    with GpuPool.from_settings(settings) as pool, pool.lease(timeout=5) as lease:
        assert lease.indices
    with ModelManager(cuda_available=lambda: False) as manager:
        manager.register("m", lambda ctx: {"device": ctx.device}, idle_unload=None)
        with manager.use("m") as model:
            assert model["device"] == "cpu"
    with Store(url=DB_URL):
        pass
    """
)


def _run_library_user(
    tmp_path: Path, block_name: str, prologue: str = ""
) -> subprocess.CompletedProcess[str]:
    db_url = "sqlite:///" + str(tmp_path / "jobs.db")
    script = f"{prologue}NAME = {block_name!r}\nDB_URL = {db_url!r}\n" + LIBRARY_USER
    env = {
        **os.environ,
        "SIMBRIDGE_GPUS__DISCOVERY": "slots",
        "SIMBRIDGE_GPUS__SLOTS": "2",
        "SIMBRIDGE_GPUS__LOCK_DIR": str(tmp_path / "locks"),
    }
    env.pop("SIMBRIDGE_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=tmp_path,  # no ./simbridge.yaml here
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_library_writes_nothing_on_stdout_or_stderr(tmp_path: Path, block_name: str) -> None:
    result = _run_library_user(tmp_path, block_name)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == ""


def test_library_events_reach_an_application_that_configures_logging(tmp_path: Path, block_name: str) -> None:
    # Through the standard machinery: a plain basicConfig sees the events as key=value lines.
    setup = (
        "import logging, sys\n"
        "logging.basicConfig(stream=sys.stdout, level=logging.DEBUG, format='%(name)s %(message)s')\n"
    )
    result = _run_library_user(tmp_path, block_name, prologue=setup)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("simbridge.shm ") and f"name='{block_name}'" in line for line in lines), lines
    assert any(line.startswith("simbridge.models.") and "models.loaded" in line for line in lines), lines


def test_no_library_module_builds_its_own_structlog_logger() -> None:
    # One home for the log setup: every module takes its logger from simbridge.logs.
    offenders = [
        str(path.relative_to(REPO))
        for path in (REPO / "src" / "simbridge").rglob("*.py")
        if path.name != "logs.py"
        and ("structlog.get_logger" in path.read_text() or "structlog.configure" in path.read_text())
    ]
    assert offenders == []


# ---- the command line ---------------------------------------------------------------------------


# The `simbridge` entry point, on a machine where NVML is absent whatever this one has: then
# `gpus` with discovery=auto logs one info event (gpus.nvml_absent) and falls back to slots.
NO_NVML_SIMBRIDGE = "import sys; sys.modules['pynvml'] = None; from simbridge.cli import main; main()"


def _simbridge(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env}
    full.pop("SIMBRIDGE_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-c", NO_NVML_SIMBRIDGE, *args],
        check=False,
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _serve_folder(tmp_path: Path, log: str) -> Path:
    (tmp_path / "simbridge.yaml").write_text(
        "jobs:\n  steps: {simulate: \"sh -c 'echo > raw'\"}\n  inbox: inbox\n  work_root: work\n"
        "  results: results\n  poll_s: 0.05\ngpus: {discovery: slots, lock_dir: locks}\n" + log
    )
    beam = tmp_path / "inbox" / "case-1" / "b1"
    beam.mkdir(parents=True)
    (beam / "plan.json").write_text("{}")
    (beam.parent / "READY").touch()
    return tmp_path


@pytest.mark.parametrize("level", ["info", "warning"])
def test_serve_honours_log_level(tmp_path: Path, level: str) -> None:
    folder = _serve_folder(tmp_path, f"log: {{level: {level}, format: json}}\n")
    result = _simbridge(["serve", "--until-idle", "--max-seconds", "60"], folder)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    infos = [e["event"] for e in events if e["level"] == "info"]
    if level == "info":
        assert "jobs.case_taken" in infos, result.stderr
    else:
        assert infos == [], infos


@pytest.mark.parametrize("level", ["info", "warning"])
def test_gpus_honours_log_level(tmp_path: Path, level: str) -> None:
    (tmp_path / "simbridge.yaml").write_text(
        f"log: {{level: {level}, format: json}}\ngpus: {{discovery: auto, slots: 2, lock_dir: locks}}\n"
    )
    result = _simbridge(["gpus", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)  # stdout is the JSON document alone
    events = [json.loads(line) for line in result.stderr.splitlines()]
    if level == "info":
        assert [e["event"] for e in events] == ["gpus.nvml_absent"], result.stderr
    else:
        assert events == []


def test_json_format_gives_one_object_per_line_on_stderr(tmp_path: Path) -> None:
    (tmp_path / "simbridge.yaml").write_text("log: {level: debug, format: json}\n")
    result = _simbridge(["gpus"], tmp_path, SIMBRIDGE_GPUS__LOCK_DIR=str(tmp_path / "locks"))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines
    for line in lines:
        event = json.loads(line)
        assert {"event", "level", "timestamp"} <= event.keys()


def test_console_format_and_verbose_flag(tmp_path: Path) -> None:
    (tmp_path / "simbridge.yaml").write_text("log: {level: error}\n")
    quiet = _simbridge(["gpus"], tmp_path, SIMBRIDGE_GPUS__LOCK_DIR=str(tmp_path / "locks"))
    loud = _simbridge(["-v", "gpus"], tmp_path, SIMBRIDGE_GPUS__LOCK_DIR=str(tmp_path / "locks"))
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert quiet.stderr == ""
    assert "info" in loud.stderr and "gpus.nvml_absent" in loud.stderr  # rendered for a person


def test_configuring_twice_keeps_one_handler() -> None:
    from simbridge.config import LogSettings
    from simbridge.logs import configure_logging

    configure_logging(LogSettings())
    configure_logging(LogSettings(format="json"))
    ours = [h for h in logging.getLogger().handlers if type(h).__name__ == "_CliHandler"]
    assert len(ours) == 1


def test_json_lines_carry_the_exception_and_format_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    from simbridge.config import LogSettings
    from simbridge.logs import configure_logging, get_logger

    configure_logging(LogSettings(format="json", level="info"))
    log = get_logger("simbridge.test")
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.exception("jobs.step_crashed", beam=3)
    log.info("case %s taken", "c1", beams=2)
    log.debug("below the level")
    logging.getLogger("alembic.runtime").warning("a foreign %s", "warning")
    logging.getLogger("alembic.runtime").info("a foreign info, below warning")
    # The pool's traceback for a vanished server: the store reports that fault itself.
    logging.getLogger("sqlalchemy.pool").error("Exception during reset or similar")
    captured = capsys.readouterr()
    assert captured.out == ""
    crashed, taken, foreign = (json.loads(line) for line in captured.err.splitlines())
    assert crashed["event"] == "jobs.step_crashed" and crashed["beam"] == 3 and crashed["level"] == "error"
    assert "ZeroDivisionError: division by zero" in crashed["exception"]
    assert taken == {**taken, "event": "case c1 taken", "beams": 2, "level": "info"}
    assert foreign == {**foreign, "event": "a foreign warning", "logger": "alembic.runtime"}


def test_the_cli_turns_python_warnings_into_log_lines() -> None:
    # A library's RuntimeWarning (watchdog re-adding a watch) would otherwise be free text on stderr.
    code = textwrap.dedent(
        """
        import warnings
        from simbridge.config import LogSettings
        from simbridge.logs import configure_logging
        configure_logging(LogSettings(format="json"))
        warnings.warn("a watch was added twice", RuntimeWarning)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert result.returncode == 0 and result.stdout == "", result.stderr
    [line] = result.stderr.splitlines()
    event = json.loads(line)
    assert event["level"] == "warning" and event["logger"] == "py.warnings"
    assert "RuntimeWarning: a watch was added twice" in event["event"]
