"""One home for each fact: a default, a path or a small helper written once, the rest refer to it."""

from __future__ import annotations

import inspect
import re

import pytest
from tests.support import REPO

from simbridge.demos.eki.cli import eki_command
from simbridge.demos.eki.driver import RunOptions
from simbridge.jobs import control
from simbridge.jobs.executors.base import Executor
from simbridge.jobs.executors.local import LocalExecutor

SOURCES = {
    path.relative_to(REPO).as_posix(): path.read_text() for path in (REPO / "src" / "simbridge").rglob("*.py")
}


@pytest.mark.parametrize(
    ("what", "pattern"),
    [
        ("the folder of shared-memory segments", r"^SHM_DIR\b.*="),
        ("the header's path inside include/", r'^HEADER\b.*=.*"shm\.h"'),
        ("the stderr writer of the log output", r"^class _Stderr\b"),
        ("the CLI's logging setup", r"structlog\.configure\(|logging\.basicConfig\("),
    ],
)
def test_written_once(what: str, pattern: str) -> None:
    homes = [name for name, text in SOURCES.items() if re.search(pattern, text, re.MULTILINE)]
    assert len(homes) == 1, f"{what} is written in {homes}"


def test_kill_grace_comes_from_config_only() -> None:
    # jobs.timeouts.kill_grace_s is the one default; the functions that use it must be told it.
    for function in (control.cancel, Executor.cancel, LocalExecutor.cancel):
        grace = inspect.signature(function).parameters["grace_s"]
        assert grace.default is inspect.Parameter.empty, function.__qualname__


def test_eki_command_defaults_are_run_options_defaults() -> None:
    defaults = RunOptions()
    names = {"output": "output_dir", "timeout": "timeout_s"}
    for param in inspect.signature(eki_command).parameters.values():
        field = names.get(param.name, param.name)
        if hasattr(defaults, field):
            assert param.default == getattr(defaults, field), param.name
