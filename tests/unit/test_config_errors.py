"""Configuration errors through the real `simbridge` console script: one short line per bad value,
naming the file (or the environment variable), the key and the fix; exit code 2; never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from simbridge.config import load_settings
from simbridge.errors import ConfigError

SIMBRIDGE = str(Path(sys.executable).with_name("simbridge"))

# Every command, with arguments that would get it past its own parsing.
COMMANDS = [
    ["shm", "ls"],
    ["shm", "inspect", "nothing-here"],
    ["shm", "clean"],
    ["gpus"],
    ["serve", "--max-seconds", "1"],
    ["submit", "case"],
    ["status"],
    ["retry", "case"],
    ["cancel", "case"],
    ["dashboard", "--once"],
    ["demo", "blocks", "--iterations", "1"],
    ["demo", "eki", "--iterations", "0"],
]


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SIMBRIDGE_")}
    return subprocess.run(
        [SIMBRIDGE, *args],
        cwd=cwd,
        env={**full, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_config_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("simbridge: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_names_an_unknown_key_and_suggests_the_nearest(
    tmp_path: Path, command: list[str]
) -> None:
    (tmp_path / "simbridge.yaml").write_text("jobs:\n  wokers: 3\n")
    assert_config_error(run(command, tmp_path), "simbridge.yaml", "jobs.wokers", "did you mean jobs.workers?")


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "simbridge.yaml").write_text("jobs:\n  workers: [1, 2\nlog: {}\n")
    assert_config_error(run(["shm", "ls"], tmp_path), "simbridge.yaml:3:", "not valid YAML", "fix the syntax")


@pytest.mark.parametrize("text", ["- jobs\n- log\n", "just words\n", "42\n"])
def test_a_yaml_that_is_not_a_mapping_says_so(tmp_path: Path, text: str) -> None:
    (tmp_path / "simbridge.yaml").write_text(text)
    assert_config_error(run(["gpus"], tmp_path), "simbridge.yaml", "not a mapping of sections")


def test_wrong_type_names_key_value_and_default(tmp_path: Path) -> None:
    (tmp_path / "simbridge.yaml").write_text("jobs:\n  workers: many\n")
    assert_config_error(
        run(["status"], tmp_path), "simbridge.yaml", "jobs.workers", "'many'", "fix jobs.workers in", "(4)"
    )


def test_bad_environment_variable_is_named(tmp_path: Path) -> None:
    result = run(["shm", "ls"], tmp_path, SIMBRIDGE_GPUS__POLL_MS="-1")
    assert_config_error(result, "environment variable SIMBRIDGE_GPUS__POLL_MS", "gpus.poll_ms", "'-1'")


def test_unknown_key_in_an_environment_variable(tmp_path: Path) -> None:
    result = run(["shm", "ls"], tmp_path, SIMBRIDGE_MODELS__MAX_CONCURENT="3")
    assert_config_error(result, "SIMBRIDGE_MODELS__MAX_CONCURENT", "did you mean models.max_concurrent?")


def test_unknown_section_in_an_environment_variable(tmp_path: Path) -> None:
    result = run(["shm", "ls"], tmp_path, SIMBRIDGE_JBOS__WORKERS="3")
    assert_config_error(result, "SIMBRIDGE_JBOS__WORKERS", "did you mean SIMBRIDGE_JOBS__WORKERS?")


def test_section_env_var_that_is_not_json(tmp_path: Path) -> None:
    assert_config_error(run(["gpus"], tmp_path, SIMBRIDGE_JOBS="{workers"), "SIMBRIDGE_JOBS", "JSON")


def test_validator_messages_keep_their_own_fix(tmp_path: Path) -> None:
    (tmp_path / "simbridge.yaml").write_text("jobs:\n  steps: {simulate: 'run {nope}'}\n")
    assert_config_error(run(["status"], tmp_path), "simbridge.yaml", "jobs.steps.simulate", "nope")


def test_explicit_file_replaces_a_bad_default_file(tmp_path: Path) -> None:
    (tmp_path / "simbridge.yaml").write_text("jobs:\n  wokers: 3\n")
    good = tmp_path / "good.yaml"
    good.write_text("log: {level: warning}\njobs: {work_root: w, inbox: i, results: r}\n")
    # The good file is taken (no config error, exit 2); `status` then says the store is new (exit 1).
    for flag in ("-c", "--config"):
        result = run(["status", flag, str(good)], tmp_path)
        assert result.returncode == 1 and "wokers" not in result.stderr, result.stderr
        assert "not initialised" in result.stderr
    assert run(["shm", "ls"], tmp_path, SIMBRIDGE_CONFIG=str(good)).returncode == 0


def test_explicit_file_that_does_not_exist(tmp_path: Path) -> None:
    assert_config_error(run(["status", "-c", "missing.yaml"], tmp_path), "--config", "missing.yaml")
    assert_config_error(run(["shm", "ls"], tmp_path, SIMBRIDGE_CONFIG="missing.yaml"), "SIMBRIDGE_CONFIG")


def test_help_works_whatever_the_config(tmp_path: Path) -> None:
    (tmp_path / "simbridge.yaml").write_text("jobs: [\n")
    result = run(["serve", "--help"], tmp_path)
    assert result.returncode == 0 and "--until-idle" in result.stdout


def test_verbose_shows_the_traceback(tmp_path: Path) -> None:
    (tmp_path / "simbridge.yaml").write_text("jobs:\n  wokers: 3\n")
    result = run(["-v", "shm", "ls"], tmp_path)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "did you mean jobs.workers?" in result.stderr


def test_each_bad_key_gets_its_own_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "simbridge.yaml").write_text("jobs:\n  wokers: 3\n  poll_s: 0\nlog: {level: loud}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SIMBRIDGE_CONFIG", raising=False)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    lines = str(caught.value).splitlines()
    assert len(lines) == 3
    assert all(line.startswith("simbridge.yaml: ") for line in lines)
