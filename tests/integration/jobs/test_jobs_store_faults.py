"""Database faults under a running `serve`: a held SQLite write lock, a deleted database file, a
stopped PostgreSQL server. Passing faults are waited out (backoff, one log line per change of
state, never a failed beam); a lost database stops serve with a clear message; reads never need
the write lock; --max-seconds holds while the store fails."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest
from tests.integration.jobs.jobs_fixtures import REPO, JobsEnv, PgServer, wait_for

from simbridge.jobs.states import BeamState
from simbridge.jobs.store import Store

pytestmark = pytest.mark.integration

SIMULATE = 'echo "$1" >> "$2/launches"\nsleep "$3"\nprintf "%s" "$1" > raw\n'


def _setup(env: JobsEnv, *, sleep_s: float, beams: int) -> list[str]:
    (env.root / "sim.sh").write_text(SIMULATE)
    env.configure(steps={"simulate": f"sh {{config_dir}}/sim.sh {{beam_id}} {{config_dir}} {sleep_s}"})
    names = [f"b{i:02d}" for i in range(beams)]
    env.make_case("case", {b: {"plan.json": "{}"} for b in names})
    return names


def _serve(env: JobsEnv, log: IO[bytes], *args: str) -> subprocess.Popen[bytes]:
    child_env = {**os.environ, "SIMBRIDGE_CONFIG": str(env.config_path), "COLUMNS": "200"}
    child_env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), child_env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-m", "simbridge.jobs", "serve", *args],
        cwd=env.root,
        env=child_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _launches(env: JobsEnv) -> list[str]:
    path = env.root / "launches"
    return sorted(path.read_text().split()) if path.exists() else []


def _db_file(env: JobsEnv) -> Path:
    return Path(env.db_url.split("///", 1)[1])


@contextmanager
def _write_lock(env: JobsEnv) -> Iterator[None]:
    """Another process's view: a connection holding SQLite's write lock until the block ends."""
    conn = sqlite3.connect(_db_file(env), isolation_level=None, timeout=60)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def _check_all_ran_once(env: JobsEnv, names: list[str]) -> None:
    [case] = env.status()
    assert case["state"] == "COMPLETED", case
    assert _launches(env) == names, "a simulation ran twice or not at all"
    with Store(url=env.db_url) as store:
        assert all(b.state is BeamState.COMPLETED for b in store.beams())
        assert store.open_attempts() == []


def test_a_held_sqlite_write_lock_is_waited_out_and_fails_no_beam(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    # The first run exits 75 (transient): the beam then waits out its backoff in QUEUED with
    # nothing in flight, and the lock is taken during that wait, so the relaunch (a step on the
    # thread pool) is what meets it.
    (env.root / "sim.sh").write_text(
        'echo "$1" >> "$2/launches"\n'
        'if [ ! -e "$2/retried" ]; then touch "$2/retried"; exit 75; fi\n'
        "printf ok > raw\n"
    )
    env.configure(
        steps={"simulate": "sh {config_dir}/sim.sh {beam_id} {config_dir}"},
        retry={"backoff_initial_s": 3.0},
    )
    env.make_case("case", {"b00": {"plan.json": "{}"}})
    log_path = env.root / "serve.log"

    def backing_off() -> bool:
        try:
            with Store(url=env.db_url, migrate=False) as store:
                return any(b.state is BeamState.QUEUED and b.not_before for b in store.beams())
        except Exception:
            return False

    with open(log_path, "wb") as log:
        proc = _serve(env, log, "--until-idle", "--max-seconds", "300")
        try:
            wait_for(backing_off, timeout=120, what="the beam to back off after its transient exit")
            with _write_lock(env):
                # Held until serve met it (the relaunch, or the loop): then released.
                wait_for(
                    lambda: any(e in log_path.read_text() for e in ("store_unavailable", "step_crashed")),
                    timeout=120,
                    what="serve to meet the held write lock",
                )
            assert proc.wait(timeout=300) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    text = log_path.read_text()
    assert "beam_failed" not in text and "Traceback" not in text, text
    assert text.count("jobs.store_unavailable") <= 3, text  # per change of state, not per try
    [case] = env.status()
    assert case["state"] == "COMPLETED", case
    assert _launches(env) == ["b00", "b00"]  # the transient try and the one that succeeded


def test_status_never_waits_for_the_write_lock(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    _setup(env, sleep_s=0, beams=1)
    env.cli("submit", str(env.inbox / "case"))
    with _write_lock(env):
        out = env.cli("status", "--json", check=False, timeout=120)
    # Before: opening the store migrated, so status waited for the lock and then failed.
    assert out.returncode == 0, out.stderr
    assert '"case"' in out.stdout


def test_status_without_a_database_says_so_and_creates_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("SIMBRIDGE_CONFIG", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-m", "simbridge.jobs", "status"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 1, out
    assert "not initialised; run `simbridge serve`" in " ".join(out.stderr.split()), out.stderr
    assert list(tmp_path.iterdir()) == [], "status created files"


def test_a_deleted_database_stops_serve_with_a_clear_message(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    _setup(env, sleep_s=2.0, beams=2)
    log_path = env.root / "serve.log"
    db = _db_file(env)
    with open(log_path, "wb") as log:
        proc = _serve(env, log, "--max-seconds", "300")
        try:
            wait_for(lambda: len(_launches(env)) == 2, timeout=120, what="the simulations to start")
            for leftover in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                leftover.unlink(missing_ok=True)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    text = log_path.read_text()
    assert rc == 1, text
    assert "was deleted while this process had it open" in " ".join(text.split()), text
    assert "Traceback" not in text and "KeyError" not in text, text
    assert not db.exists(), "serve re-created an empty database"


def test_max_seconds_holds_while_the_store_fails(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    _setup(env, sleep_s=0.5, beams=2)
    log_path = env.root / "serve.log"
    with open(log_path, "wb") as log:
        proc = _serve(env, log, "--max-seconds", "8")
        try:
            wait_for(lambda: len(_launches(env)) >= 1, timeout=120, what="a simulation to start")
            with _write_lock(env):
                # The lock outlives --max-seconds: serve must give up waiting for it and exit.
                rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
    text = log_path.read_text()
    assert rc == 0, text
    assert "store_unavailable" in text and "Traceback" not in text, text


def test_a_stopped_postgresql_is_waited_out(sqlite_env: JobsEnv, pg_server: PgServer) -> None:
    env = sqlite_env
    env.db_url = pg_server.new_database()
    names = _setup(env, sleep_s=1.0, beams=3)
    log_path = env.root / "serve.log"
    with open(log_path, "wb") as log:
        proc = _serve(env, log, "--until-idle", "--max-seconds", "300")
        try:
            wait_for(lambda: len(_launches(env)) == 3, timeout=120, what="the simulations to start")
            pg_server.stop()
            stopped_at = time.monotonic()
            try:
                wait_for(
                    lambda: "store_unavailable" in log_path.read_text(),
                    timeout=60,
                    what="serve to notice the stopped server",
                )
                # Down long enough for every simulation to end while nobody could record it.
                wait_for(
                    lambda: all((p / "raw").exists() for p in (env.work / "remote" / "case").iterdir()),
                    timeout=60,
                    what="the simulations to end",
                )
                # The outage itself: long enough for many tries of every kind to fail.
                wait_for(lambda: time.monotonic() - stopped_at > 8, timeout=30, what="an 8 s outage")
            finally:
                pg_server.start()
            assert proc.wait(timeout=300) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    text = log_path.read_text()
    assert "Traceback" not in text and "beam_failed" not in text, text
    # One line per change of state, not one per try (before: one a second, and tracebacks).
    assert text.count("jobs.store_unavailable") <= 3, text
    assert len(text.splitlines()) < 40, text
    _check_all_ran_once(env, names)
