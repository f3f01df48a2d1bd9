"""The jobs section of the one config model: defaults, template checks, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from simbridge.config import load_settings
from simbridge.errors import ConfigError
from simbridge.jobs.pipeline import render


def test_defaults_use_sqlite_under_the_work_root(tmp_path: Path) -> None:
    s = load_settings(jobs={"work_root": str(tmp_path)})
    assert s.jobs.db_url() == f"sqlite:///{tmp_path.resolve()}/simbridge.db"
    assert s.jobs.executor == "local"


@pytest.mark.parametrize(
    ("steps", "needle"),
    [
        ({"simulate": "run {nope}"}, "unknown field"),
        ({"simulate": "run 'unclosed"}, "cannot split"),
        ({"prepare": "   "}, "empty command"),
        ({"outputs": ["../escape"]}, "inside the beam folder"),
    ],
)
def test_bad_steps_name_the_key(steps: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        load_settings(jobs={"steps": steps})
    assert "jobs.steps" in str(info.value)


def test_bad_database_url_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"jobs\.database_url"):
        load_settings(jobs={"database_url": "mysql://x"})


def test_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIMBRIDGE_JOBS__RETRY__MAX_ATTEMPTS", "7")
    monkeypatch.setenv("SIMBRIDGE_JOBS__STEPS__SIMULATE", "sim {beam_id}")
    s = load_settings()
    assert s.jobs.retry.max_attempts == 7
    assert s.jobs.steps.simulate == "sim {beam_id}"


def test_backoff_is_exponential_and_capped() -> None:
    r = load_settings(jobs={"retry": {"backoff_initial_s": 1, "backoff_max_s": 5}}).jobs.retry
    assert [r.backoff_s(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 5, 5]


def test_render_never_lets_a_field_split_or_reach_a_shell() -> None:
    hostile = "x; rm -rf / $(id) 'q'"
    argv = render("sim --beam {beam_id} --out {work_dir}/raw", {"beam_id": hostile, "work_dir": "/w d"})
    assert argv == ("sim", "--beam", hostile, "--out", "/w d/raw")
