"""A serve paused between writing a launch intent and launching, replaced meanwhile, and woken up:
the new holder judged the attempt "never started" and ran it; the old one must not run it again.
The lease is proven still ours right before each launch (a fenced transaction), so it stops there.
Paused after that proof, before the fork: the launch wrapper gets the lease's validity end and,
past it, starts nothing (reported as never launched).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from tests.integration.jobs.jobs_fixtures import REPO, JobsEnv, wait_for

from simbridge.jobs.executors.base import WRAPPER_ENV
from simbridge.jobs.executors.local import find_by_token
from simbridge.jobs.store import Store
from simbridge.jobs.store.schema import attempts, orchestrator

pytestmark = pytest.mark.integration

LEASE_S = 2.0
# Named bounds of the waits below.
PAUSE_S = 60.0
SERVE_S = 120.0
SIM = 'echo "$1" >> "$2/launches"\nprintf ok > raw\n'

# The serve under test, stopped by itself (SIGSTOP) at the first launch, right after its intent.
PAUSING_SERVE = """
import os, runpy, signal, sys, threading
from simbridge.jobs import attempts

MARKER, HOOK = sys.argv[1], sys.argv[2]

def pause():
    setattr(attempts, HOOK, None)  # once
    with open(MARKER, "w") as marker:
        marker.write("paused\\n")
    # To this very thread: it stops on its way out of the call. A kill() of the process would
    # let it run on (past the lease check, into the launch) until another thread took the stop.
    signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)

setattr(attempts, HOOK, pause)
sys.argv = ["simbridge", "serve", "--max-seconds", "120"]
runpy.run_module("simbridge.jobs", run_name="__main__")
"""


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def _heartbeat_age(env: JobsEnv) -> float:
    with Store(url=env.db_url, migrate=False) as store, store.read() as conn:
        row = conn.execute(sa.select(orchestrator).where(orchestrator.c.id == 1)).one()
    return time.time() - (row.heartbeat_at or 0.0)


def _tokens(env: JobsEnv) -> list[str]:
    with Store(url=env.db_url, migrate=False) as store, store.read() as conn:
        return [row.token for row in conn.execute(sa.select(attempts.c.token))]


@pytest.mark.parametrize(
    "hook",
    [
        "BEFORE_LAUNCH_HOOK",  # stopped by the lease check in the pipeline
        "AFTER_LEASE_CHECK_HOOK",  # past that check: stopped by the launch wrapper's deadline
    ],
)
def test_a_serve_paused_inside_a_launch_and_replaced_never_launches_it(
    sqlite_env: JobsEnv, hook: str
) -> None:
    env = sqlite_env
    (env.root / "sim.sh").write_text(SIM)
    (env.root / "pausing_serve.py").write_text(PAUSING_SERVE)
    env.configure(
        steps={"simulate": "sh {config_dir}/sim.sh {beam_id} {config_dir}"},
        orchestrator_lease_s=LEASE_S,
        retry={"backoff_initial_s": 0},
    )
    env.make_case("c1", {"b1": {"plan.json": "{}"}})
    child_env = {**os.environ, "SIMBRIDGE_CONFIG": str(env.config_path), "COLUMNS": "200"}
    child_env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), child_env.get("PYTHONPATH", "")])
    marker = env.root / "paused"
    with open(env.root / "first.log", "wb") as first_log:
        first = subprocess.Popen(
            [sys.executable, str(env.root / "pausing_serve.py"), str(marker), hook],
            cwd=env.root, env=child_env, stdout=first_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for(
                lambda: marker.exists() and _state(first.pid) == "T",
                timeout=PAUSE_S,
                what="the first serve to stop itself inside its launch",
            )
            wait_for(
                lambda: _heartbeat_age(env) > LEASE_S * 1.5,
                timeout=PAUSE_S,
                what="the paused serve's lease to expire",
            )
            # The replacement finds the intent with no process behind it and runs the beam.
            second = env.cli("serve", "--until-idle", "--max-seconds", str(SERVE_S), timeout=SERVE_S + 60)
            assert second.returncode == 0
            assert (env.root / "launches").read_text().split() == ["b1"]
            first.send_signal(signal.SIGCONT)
            assert first.wait(timeout=SERVE_S) == 1, (env.root / "first.log").read_text()
        finally:
            first.send_signal(signal.SIGCONT)
            if first.poll() is None:
                first.send_signal(signal.SIGTERM)
                first.wait(timeout=SERVE_S)
    # Whatever the first serve may have started has ended before the count is taken.
    for token in _tokens(env):
        wait_for(
            lambda t=token: find_by_token(t) is None and find_by_token(t, var=WRAPPER_ENV) is None,
            timeout=SERVE_S,
            what=f"attempt {token} to have no process left",
        )
    log_text = (env.root / "first.log").read_text()
    assert (env.root / "launches").read_text().split() == ["b1"], f"the simulation ran twice:\n{log_text}"
    [case] = env.status()
    assert case["state"] == "COMPLETED", case
    assert "orchestrator lease" in log_text, log_text
    if hook == "AFTER_LEASE_CHECK_HOOK":
        # The first serve did fork its wrapper, which refused to start the command.
        late = [p for p in env.root.rglob("*.err") if b"past its deadline" in p.read_bytes()]
        assert late, f"no wrapper refused a late start:\n{log_text}"


# A serve that keeps its lease but reaches the wrapper only after the deadline it proved (a long
# stall after the check): the wrapper starts nothing, and the serve's next look finds an intent
# with no process, closes it as never started and launches again. Not a failed try.
LATE_SERVE = """
import runpy, sys, time
from simbridge.jobs import attempts

PAST_S = float(sys.argv[1])

def stall():
    attempts.AFTER_LEASE_CHECK_HOOK = None  # once
    # The deadline is at most half the lease TTL after the check, which just passed.
    deadline = time.time() + PAST_S
    while time.time() < deadline:
        time.sleep(0.05)

attempts.AFTER_LEASE_CHECK_HOOK = stall
sys.argv = ["simbridge", "serve", "--until-idle", "--max-seconds", "120"]
runpy.run_module("simbridge.jobs", run_name="__main__")
"""


def test_a_launch_past_its_deadline_is_never_launched_and_runs_once_later(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    (env.root / "sim.sh").write_text(SIM)
    (env.root / "late_serve.py").write_text(LATE_SERVE)
    env.configure(
        steps={"simulate": "sh {config_dir}/sim.sh {beam_id} {config_dir}"},
        orchestrator_lease_s=LEASE_S,
        retry={"backoff_initial_s": 0, "max_attempts": 1},  # a counted try would fail the beam
    )
    env.make_case("c1", {"b1": {"plan.json": "{}"}})
    child_env = {**os.environ, "SIMBRIDGE_CONFIG": str(env.config_path), "COLUMNS": "200"}
    child_env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), child_env.get("PYTHONPATH", "")])
    serve = subprocess.run(
        [sys.executable, str(env.root / "late_serve.py"), str(LEASE_S / 2 + 0.2)],
        cwd=env.root, env=child_env, capture_output=True, text=True, timeout=SERVE_S + 60, check=False,
    )  # fmt: skip
    assert serve.returncode == 0, serve.stdout + serve.stderr
    assert (env.root / "launches").read_text().split() == ["b1"]
    late = [p for p in env.root.rglob("*.err") if b"past its deadline" in p.read_bytes()]
    assert late, serve.stdout + serve.stderr
    [case] = env.status()
    assert case["state"] == "COMPLETED", case
    with Store(url=env.db_url, migrate=False) as store, store.read() as conn:
        outcomes = [
            row.outcome for row in conn.execute(sa.select(attempts.c.outcome).order_by(attempts.c.id))
        ]
    assert outcomes == ["unlaunched", "ok"]
