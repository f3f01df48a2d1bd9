"""Killing the simulation, through the real dispatcher: the job id shown is the simulation's own
process group, a signal death is named (never exit 137) and retried as `retry_lost` promises, a
killed wrapper never leaves its simulation running beside a retry, and a failed beam shows its
tries and why it failed."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from tests.integration.jobs.jobs_fixtures import JobsEnv, serving, wait_for

from simbridge.config import Settings
from simbridge.jobs.dispatcher import Dispatcher
from simbridge.jobs.states import BeamState

pytestmark = pytest.mark.integration

SIM = "sh {config_dir}/sim.sh {beam_id} {config_dir}"
# Named deadlines of the waits below.
START_S = 60.0
SETTLE_S = 60.0
# The second launch checks, as it starts, that nothing of the first one still runs.
RETRIED_SIM = """
echo "$$" >> "$2/launches"
if [ -e "$2/once" ]; then
  for pid in $(cat "$2/launches" "$2/child.pid" 2>/dev/null); do
    [ "$pid" = "$$" ] && continue
    state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)
    case "$state" in ""|Z|X) ;; *) echo "$pid still runs" >> "$2/overlap" ;; esac
  done
  echo ok > raw
  exit 0
fi
touch "$2/once"
sleep 120 & echo $! > "$2/child.pid"
wait
"""


def _launches(env: JobsEnv) -> list[int]:
    path = env.root / "launches"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _one_beam(env: JobsEnv, script: str, **jobs: object) -> Settings:
    (env.root / "sim.sh").write_text(script)
    settings = env.configure(steps={"simulate": SIM}, **jobs)
    env.make_case("c1", {"b1": {"plan.json": "{}"}})
    return settings


def _until(dispatcher: Dispatcher, state: BeamState, what: str) -> None:
    wait_for(lambda: dispatcher.store.beams()[0].state is state, timeout=SETTLE_S, what=what)


def _first_run(env: JobsEnv, dispatcher: Dispatcher) -> int:
    wait_for(
        lambda: (env.root / "child.pid").exists() and dispatcher.store.beams()[0].hpc_job_id is not None,
        timeout=START_S,
        what="the first simulation to run",
    )
    [sim] = _launches(env)
    return sim


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_simulation_is_named_and_retried(sqlite_env: JobsEnv, signum: int) -> None:
    env = sqlite_env
    settings = _one_beam(env, RETRIED_SIM, retry={"backoff_initial_s": 0})
    with serving(settings) as dispatcher:
        sim = _first_run(env, dispatcher)
        # What people see is the simulation itself, the leader of its own process group.
        [beam] = env.status()[0]["beams"]
        assert beam["job_id"] == str(sim) and os.getpgid(sim) == sim
        os.kill(sim, signum)
        _until(dispatcher, BeamState.COMPLETED, "the killed simulation to be retried and complete")
        [beam_row] = dispatcher.store.beams()
        first = next(a for a in dispatcher.store.attempts(beam_row.id) if a.step is BeamState.RUNNING)
        events = [e.reason for e in dispatcher.store.events(beam_id=beam_row.id)]
    name = signal.Signals(signum).name
    assert first.exit_code == -signum and first.outcome == "transient"
    assert any(f"running killed by {name}; transient, retry 2/3" in r for r in events), events
    assert not any("exited 137" in r or "exited 143" in r for r in events), events
    assert len(_launches(env)) == 2 and not (env.root / "overlap").exists()


def test_a_killed_simulation_not_retried_says_so(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    settings = _one_beam(env, RETRIED_SIM, retry={"retry_lost": False})
    with serving(settings) as dispatcher:
        os.kill(_first_run(env, dispatcher), signal.SIGKILL)
        _until(dispatcher, BeamState.FAILED, "the beam to fail")
    [beam] = env.status()[0]["beams"]
    assert beam["signal"] == "SIGKILL" and beam["exit_code"] is None and beam["tries"] == 1
    assert beam["last_error"].startswith("running killed by SIGKILL")
    row = next(line for line in env.cli("status", "c1").stdout.splitlines() if "b1" in line)
    assert "killed by SIGKILL" in row and "exited 137" not in row


def test_a_killed_wrapper_never_leaves_its_simulation_beside_a_retry(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    settings = _one_beam(env, RETRIED_SIM, retry={"backoff_initial_s": 0})
    with serving(settings) as dispatcher:
        sim = _first_run(env, dispatcher)
        wrapper = _parent(sim)
        assert wrapper not in {1, os.getpid()}
        os.kill(wrapper, signal.SIGKILL)
        _until(dispatcher, BeamState.COMPLETED, "the attempt to be found lost, retried and complete")
        [beam] = dispatcher.store.beams()
        events = [e.reason for e in dispatcher.store.events(beam_id=beam.id)]
    assert not (env.root / "overlap").exists(), (env.root / "overlap").read_text()
    assert len(_launches(env)) == 2
    assert any(f"its process group {sim} was killed" in r for r in events), events


def test_a_failed_beam_shows_its_tries_and_why(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    script = 'echo "$$" >> "$2/launches"\necho starting >&2\necho "license server unreachable" >&2\nexit 75\n'
    settings = _one_beam(env, script, retry={"backoff_initial_s": 0, "max_attempts": 3})
    with Dispatcher(settings=settings) as dispatcher:
        assert dispatcher.run(until_idle=True, max_s=SETTLE_S), "dispatcher did not become idle"
    assert len(_launches(env)) == 3
    [beam] = env.status()[0]["beams"]
    assert beam["state"] == "FAILED" and beam["tries"] == 3 and beam["exit_code"] == 75
    first_line = beam["last_error"].splitlines()[0]
    assert first_line == "running exited 75: license server unreachable"
    row = next(line for line in env.cli("status", "c1").stdout.splitlines() if "b1" in line)
    cells = [cell.strip() for cell in row.split("│")]
    assert cells[1:3] == ["b1", "FAILED"] and cells[4].isdigit() and cells[5] == "3", cells
    assert cells[7].startswith("running exited 75: license server unreachable"), cells
