"""The `simbridge` console script itself: every command answers through the real entry point, errors
are one line and an exit code, and the example configuration loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.support import REPO
from typer.testing import CliRunner

from simbridge.cli import app
from simbridge.config import load_settings
from simbridge.errors import SimbridgeError
from simbridge.shm import Block

SIMBRIDGE = str(Path(sys.executable).with_name("simbridge"))
COMMANDS = ["shm", "demo", "gpus", "serve", "submit", "status", "retry", "cancel", "dashboard"]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder with its own config: slots instead of GPUs, SQLite, inbox and results inside it."""
    (tmp_path / "simbridge.yaml").write_text(
        "gpus: {discovery: slots, slots: 2, lock_dir: locks}\n"
        "jobs:\n  inbox: inbox\n  results: results\n  work_root: work\n  poll_s: 0.05\n"
        "  steps: {simulate: \"sh -c 'cat plan.json > raw'\"}\n"
    )
    (tmp_path / "inbox").mkdir()
    return tmp_path


def sb(folder: Path, *args: str, check: bool = True) -> Any:
    """``simbridge ARGS`` run in ``folder`` in this process (Typer's runner, the same app object as
    the console script); :func:`script` runs the console script itself."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for name in [k for k in os.environ if k.startswith("SIMBRIDGE_")]:
            patch.delenv(name)
        result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    if check:
        assert result.exit_code == 0, (args, result.stdout, result.stderr, result.exception)
    return result


def script(folder: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMBRIDGE_")}
    result = subprocess.run(
        [SIMBRIDGE, *args],
        cwd=folder,
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check:
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


def test_help_lists_every_command_and_each_answers_help(folder: Path) -> None:
    top = script(folder, "--help").stdout
    for name in COMMANDS:
        assert name in top
    for args in (["shm", "ls"], ["shm", "inspect"], ["shm", "diff"], ["demo", "blocks"], ["demo", "eki"]):
        assert "Usage" in sb(folder, *args, "--help").stdout
    for name in COMMANDS[2:]:
        assert "Usage" in sb(folder, name, "--help").stdout


def test_shm_commands_through_the_entry_point(folder: Path, block_name: str) -> None:
    include = Path(sb(folder, "shm", "include").stdout.strip())
    assert (include / "simbridge" / "shm.h").is_file()
    with Block.create(block_name, (3,), np.float32) as block:
        block.publish(np.arange(3, dtype=np.float32))
        listed = json.loads(sb(folder, "shm", "ls", "--json").stdout)
        assert block_name in [b["name"] for b in listed]
        assert "latest iteration" in sb(folder, "shm", "inspect", block_name).stdout
    missing = script(folder, "shm", "inspect", block_name, check=False)
    # An error is one line on stderr; stdout stays for results.
    assert missing.returncode == 1 and missing.stdout == ""
    assert len(missing.stderr.strip().splitlines()) == 1 and block_name in missing.stderr
    assert "0 transfer(s) matched" in sb(folder, "shm", "diff", str(folder)).stdout
    assert "stale block(s) removed" in sb(folder, "shm", "clean").stdout


def test_gpus_through_the_entry_point(folder: Path) -> None:
    data = json.loads(sb(folder, "gpus", "--json").stdout)
    assert [g["index"] for g in data["gpus"]] == [0, 1]
    assert "lock folder" in sb(folder, "gpus").stdout


def test_jobs_commands_and_dashboard_through_the_entry_point(folder: Path) -> None:
    case = folder / "source" / "case-a"
    (case / "b1").mkdir(parents=True)
    (case / "b1" / "plan.json").write_text('{"beam": 1}')
    assert "1 beam(s) b1" in sb(folder, "submit", str(case)).stdout
    [view] = json.loads(sb(folder, "status", "--json").stdout)
    assert view["case"] == "case-a"
    # serve installs signal handlers: a process of its own.
    assert "COMPLETED" in script(folder, "serve", "--until-idle", "--max-seconds", "60").stdout
    assert (folder / "results" / "case-a" / "b1" / "raw").read_text() == '{"beam": 1}'
    assert "b1" in sb(folder, "status", "case-a").stdout
    assert "case-a" in sb(folder, "dashboard", "--once").stdout
    assert "retrying 0 beam(s)" in sb(folder, "retry", "case-a").stdout
    assert "cancelled 0 beam(s)" in sb(folder, "cancel", "case-a").stdout
    unknown = sb(folder, "status", "nope", check=False)
    assert unknown.exit_code == 1 and "Traceback" not in unknown.stderr


def test_demo_blocks_through_the_entry_point(folder: Path) -> None:
    out = script(folder, "demo", "blocks", "--iterations", "3").stdout
    assert "median round trip" in out and "over 3 iterations" in out and "NO" not in out


def test_a_command_error_stays_one_line_on_a_narrow_terminal(folder: Path) -> None:
    name = "a-case-name-long-enough-to-wrap-" * 3
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        result = CliRunner().invoke(app, ["status", name], env={"COLUMNS": "40"})
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_usage_errors_exit_2(folder: Path) -> None:
    result = script(folder, "shm", "nope", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.fixture
def failing_command() -> Iterator[str]:
    """A command, mounted for one test, from which library errors escape unhandled."""

    def boom(kind: str) -> None:
        if kind == "simbridge":
            raise SimbridgeError("the block is gone\nsecond line of detail")
        if kind == "bug":
            raise KeyError("oops")
        raise PermissionError(13, "Permission denied", "/dev/shm/x")

    app.command("boom-for-test")(boom)
    try:
        yield "boom-for-test"
    finally:
        app.registered_commands.pop()


def test_an_error_escaping_a_command_is_one_line(
    failing_command: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SIMBRIDGE_CONFIG", raising=False)
    result = CliRunner().invoke(app, [failing_command, "simbridge"])
    assert result.exit_code == 1
    assert result.stderr == "simbridge: error: the block is gone\n"
    result = CliRunner().invoke(app, [failing_command, "os"])
    assert result.exit_code == 1
    assert result.stderr.startswith("simbridge: error: [Errno 13] Permission denied")
    result = CliRunner().invoke(app, [failing_command, "bug"])
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "simbridge: error: unexpected KeyError: 'oops' (a bug in simbridge; run with -v"
    )
    assert len(result.stderr.splitlines()) == 1
    verbose = CliRunner().invoke(app, ["-v", failing_command, "simbridge"])
    assert verbose.exit_code == 1 and "Traceback" in verbose.stderr


def test_the_mqi_example_config_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SIMBRIDGE_CONFIG", raising=False)
    settings = load_settings(config=REPO / "examples" / "mqi" / "simbridge.yaml")
    assert (
        settings.jobs.steps.simulate is not None
        and "{config_dir}/dose_sim.py" in settings.jobs.steps.simulate
    )
    assert settings.gpus.discovery == "slots"
    for script in ("preprocess.py", "dose_sim.py", "postprocess.py"):
        assert (REPO / "examples" / "mqi" / script).is_file()


def test_demo_eki_failure_is_one_line_on_stderr(folder: Path) -> None:
    # A "model" that exits at once (no compiler needed): the demo names it, on stderr, in one line.
    result = sb(folder, "demo", "eki", "--model", "/bin/false", "--iterations", "1", "-o", "out", check=False)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "forward model" in errors[0] and "exit status 1" in errors[0]
    assert "error" not in result.stdout
