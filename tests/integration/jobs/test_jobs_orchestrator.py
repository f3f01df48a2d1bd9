"""One orchestrator per database: two or three `serve` processes on one store (SQLite and PostgreSQL).

The first serve takes the orchestrator lease; the others are refused with a message naming the
holder; every step of every beam runs exactly once. A holder killed with SIGKILL is replaced at
once (its pid is dead on this host); a silent holder elsewhere after the TTL; a holder paused past
the TTL and replaced stops when it wakes up, writing nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

import pytest
import sqlalchemy as sa
from tests.integration.jobs.jobs_fixtures import REPO, JobsEnv, wait_for

from simbridge.jobs.dispatcher import Dispatcher
from simbridge.jobs.errors import LeaseLostError, OrchestratorBusyError, StaleStateError
from simbridge.jobs.states import BeamState
from simbridge.jobs.store import Store
from simbridge.jobs.store.schema import orchestrator

pytestmark = pytest.mark.integration

BEAMS = [f"beam_{i}" for i in range(6)]
PREPARE = 'echo "$1" >> "$2/prepares"\ncp "$3/plan.json" plan.json\n'
SIMULATE = 'echo "$1" >> "$2/launches"\nsleep "$3"\nprintf "%s" "$1" > raw\n'
POSTPROCESS = 'echo "$1" >> "$2/posts"\n'


def _setup(env: JobsEnv, *, sleep_s: float = 0.3, prepare: bool = True, **jobs: Any) -> None:
    (env.root / "prepare.sh").write_text(PREPARE)
    (env.root / "sim.sh").write_text(SIMULATE)
    (env.root / "post.sh").write_text(POSTPROCESS)
    steps = {
        "simulate": f"sh {{config_dir}}/sim.sh {{beam_id}} {{config_dir}} {sleep_s}",
        "postprocess": "sh {config_dir}/post.sh {beam_id} {config_dir}",
    }
    if prepare:
        steps["prepare"] = "sh {config_dir}/prepare.sh {beam_id} {config_dir} {beam_dir}"
    env.configure(workers=4, max_preparing=2, steps=steps, **jobs)


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


def _lines(env: JobsEnv, name: str) -> list[str]:
    path = env.root / name
    return sorted(path.read_text().split()) if path.exists() else []


def _holder(env: JobsEnv) -> Any:
    with Store(url=env.db_url, migrate=False) as store, store.read() as conn:
        return conn.execute(sa.select(orchestrator).where(orchestrator.c.id == 1)).one()


def _held_by(env: JobsEnv, pid: int) -> bool:
    try:
        row = _holder(env)
    except Exception:  # not created yet: the serve is still starting
        return False
    return row.holder is not None and row.pid == pid


def _all_ended(env: JobsEnv) -> bool:
    try:
        cases = env.status()
    except AssertionError:
        return False
    ended = {"COMPLETED", "FAILED", "PARTIAL", "CANCELLED"}
    return bool(cases) and all(c["state"] in ended for c in cases)


def _check_each_step_once(env: JobsEnv, *, prepare: bool = True) -> None:
    [case] = env.status()
    assert case["state"] == "COMPLETED", case
    if prepare:
        assert _lines(env, "prepares") == BEAMS, "a beam was prepared twice or not at all"
    assert _lines(env, "launches") == BEAMS, "a simulation ran twice or not at all"
    assert _lines(env, "posts") == BEAMS, "a beam was postprocessed twice or not at all"
    with Store(url=env.db_url) as store:
        assert store.open_attempts() == []
        for beam in store.beams():
            assert beam.state is BeamState.COMPLETED
            ran = [a.step for a in store.attempts(beam.id) if a.outcome != "unlaunched"]
            steps = [BeamState.RUNNING, BeamState.POSTPROCESSING]
            assert ran == ([BeamState.PREPARING, *steps] if prepare else steps)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


@pytest.mark.parametrize("serves", [2, 3])
def test_several_serves_on_one_database_one_runs_the_others_are_refused(env: JobsEnv, serves: int) -> None:
    _setup(env)
    env.make_case("case", {b: {"plan.json": "{}"} for b in BEAMS})
    logs = [open(env.root / f"serve{i}.log", "wb") for i in range(serves)]  # noqa: SIM115
    procs = [_serve(env, log, "--max-seconds", "300") for log in logs]
    try:
        wait_for(
            lambda: sum(p.poll() is not None for p in procs) >= serves - 1,
            timeout=120,
            what=f"{serves - 1} of {serves} serves to be refused",
        )
        winners = [p for p in procs if p.poll() is None]
        assert len(winners) == 1, [p.returncode for p in procs]
        wait_for(lambda: _all_ended(env), timeout=180, what="the case to end")
        assert _stop(winners[0]) == 0
    finally:
        for proc in procs:
            _stop(proc)
        for log in logs:
            log.close()
    winner = winners[0]
    for proc, log in zip(procs, logs, strict=True):
        if proc is winner:
            continue
        text = Path(log.name).read_text()
        assert proc.returncode == 1, text
        assert "another `simbridge serve` holds the jobs database" in text, text
        assert f"pid {winner.pid} since" in text, text  # names the holder: host, pid, since
        assert "Traceback" not in text
    _check_each_step_once(env)


def test_serve_killed_with_sigkill_is_replaced_at_once(env: JobsEnv) -> None:
    _setup(env, sleep_s=1.0)
    env.make_case("case", {b: {"plan.json": "{}"} for b in BEAMS})
    with open(env.root / "serve.log", "wb") as log:
        first = _serve(env, log)
        try:
            wait_for(lambda: bool(_lines(env, "launches")), timeout=120, what="a simulation to start")
            assert _held_by(env, first.pid)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
    # Same host, dead pid: no need to wait out the TTL (30 s by default).
    out = env.cli("serve", "--until-idle", "--max-seconds", "180")
    assert "taken_over" in out.stderr or "lease_taken_over" in out.stderr, out.stderr
    _check_each_step_once(env)


def _forge_holder(env: JobsEnv, *, at: float) -> None:
    """The lease as a serve on another host holds it, last renewed at ``at``."""
    with Store(url=env.db_url) as store, store.tx() as conn:
        conn.execute(
            sa.update(orchestrator)
            .where(orchestrator.c.id == 1)
            .values(holder="serve-elsewhere", host="node-17", pid=4242, started_at=at, heartbeat_at=at)
        )


def test_a_silent_holder_on_another_host_is_replaced_after_the_ttl(env: JobsEnv) -> None:
    _setup(env, orchestrator_lease_s=2.0)
    env.make_case("case", {b: {"plan.json": "{}"} for b in BEAMS})
    # The holder renews its lease while the second serve starts (a CLI start can take longer
    # than the 2 s TTL on a loaded machine: it must meet a live holder, not an expired one).
    _forge_holder(env, at=time.time())
    refusing = threading.Event()

    def renew() -> None:
        while not refusing.wait(0.2):
            _forge_holder(env, at=time.time())

    renewer = threading.Thread(target=renew)
    renewer.start()
    try:
        refused = env.cli("serve", "--until-idle", "--max-seconds", "60", check=False)
    finally:
        refusing.set()
        renewer.join(timeout=30)
    assert refused.returncode == 1, refused.stderr
    assert "host node-17 pid 4242 since" in refused.stderr, refused.stderr
    assert _lines(env, "prepares") == []
    # Nobody renews the lease now: once it is older than the TTL, the next serve takes over.
    silent_at = time.time()
    wait_for(lambda: time.time() - silent_at > 2.0, timeout=10, what="the silent lease to expire")
    env.cli("serve", "--until-idle", "--max-seconds", "180")
    _check_each_step_once(env)


def test_a_paused_holder_that_was_replaced_stops_without_writing(env: JobsEnv) -> None:
    # No prepare: once every simulation runs, nothing else is in flight when the holder pauses.
    env.slots = len(BEAMS)
    _setup(env, sleep_s=3.0, prepare=False, orchestrator_lease_s=2.0)
    env.make_case("case", {b: {"plan.json": "{}"} for b in BEAMS})
    with open(env.root / "first.log", "wb") as first_log, open(env.root / "second.log", "wb") as second_log:
        first = _serve(env, first_log)
        second = None
        try:
            wait_for(lambda: _lines(env, "launches") == BEAMS, timeout=120, what="every simulation to start")
            first.send_signal(signal.SIGSTOP)
            paused_at = time.time()
            wait_for(lambda: time.time() - paused_at > 2.5, timeout=10, what="the paused lease to expire")
            second = _serve(env, second_log, "--until-idle", "--max-seconds", "180")
            wait_for(lambda: _held_by(env, second.pid), timeout=60, what="the second serve to take over")
            first.send_signal(signal.SIGCONT)
            assert first.wait(timeout=60) == 1
            assert second.wait(timeout=180) == 0
        finally:
            first.send_signal(signal.SIGCONT)
            _stop(first)
            if second is not None:
                _stop(second)
    text = (env.root / "first.log").read_text()
    assert "lost the orchestrator lease" in text or "no longer holds the orchestrator lease" in text, text
    _check_each_step_once(env, prepare=False)


def test_a_holder_stopped_inside_a_transaction_does_not_block_the_takeover(
    sqlite_env: JobsEnv, pg_server: Any
) -> None:
    # PostgreSQL: a serve stopped (SIGSTOP, a debugger) while its heartbeat's transaction holds
    # the lease row would block the takeover's UPDATE for ever; the server ends such a session
    # after IDLE_IN_TRANSACTION_S and the new serve goes on.
    env = JobsEnv(root=sqlite_env.root, db_url=pg_server.new_database())
    _setup(env, orchestrator_lease_s=2.0)
    env.make_case("case", {b: {"plan.json": "{}"} for b in BEAMS})
    _forge_holder(env, at=time.time() - 60)  # expired long ago: only the row lock holds it
    locked, done = threading.Event(), threading.Event()
    ended: list[BaseException] = []

    def stopped_holder() -> None:
        try:
            with Store(url=env.db_url) as store, store.tx() as conn:
                conn.execute(sa.select(orchestrator).where(orchestrator.c.id == 1).with_for_update())
                locked.set()
                done.wait(timeout=120)  # silent inside the transaction, as a stopped process is
        except Exception as exc:  # the server ended the session: the commit fails
            ended.append(exc)

    holder = threading.Thread(target=stopped_holder)
    holder.start()
    try:
        assert locked.wait(timeout=30)
        env.cli("serve", "--until-idle", "--max-seconds", "120", timeout=150)
    finally:
        done.set()
        holder.join(timeout=30)
    assert ended, "the stopped holder's transaction was not ended by the server"
    _check_each_step_once(env)


def test_a_dispatcher_that_lost_its_lease_writes_nothing(env: JobsEnv) -> None:
    settings = env.configure(steps={"simulate": "true"})
    with Dispatcher(settings=settings) as dispatcher:
        with pytest.raises(OrchestratorBusyError, match=f"pid {os.getpid()} since"):
            Dispatcher(settings=settings)  # a second orchestrator, even in the same process
        with Store(url=env.db_url) as other, other.tx() as conn:  # taken over meanwhile
            conn.execute(sa.update(orchestrator).where(orchestrator.c.id == 1).values(holder="serve-other"))
        with pytest.raises(LeaseLostError, match="no longer holds the orchestrator lease"):
            dispatcher.store.add_event(reason="written after the lease was lost")
        with pytest.raises(LeaseLostError):
            dispatcher.run(max_s=60)
    with Store(url=env.db_url) as store:
        assert [e.reason for e in store.events()] == []
        assert _holder(env).holder == "serve-other"  # a lost lease is not freed on close


def test_open_attempt_is_safe_without_the_lease_on_postgresql(sqlite_env: JobsEnv, pg_server: Any) -> None:
    # Defence in depth: two writers (no lease between them) racing to launch the same beams;
    # the beam row lock taken by open_attempt lets exactly one launch each beam.
    url = pg_server.new_database()
    names = [f"b{i}" for i in range(40)]
    with Store(url=url) as first, Store(url=url) as second:
        first.add_case(key="c", name="c", source="/s", root="/r", beams_=[(n, n, f"/r/{n}") for n in names])
        ids = [b.id for b in first.beams()]
        wins: list[int] = []
        lock = threading.Lock()

        def launch(store: Store, barrier: threading.Barrier, beam_id: int) -> None:
            barrier.wait(timeout=30)
            try:
                store.open_attempt(
                    beam_id,
                    expected=BeamState.PENDING,
                    target=BeamState.PREPARING,
                    token=f"t-{uuid.uuid4().hex}",
                    executor="local",
                    work_dir="/w",
                    deadline=time.time() + 60,
                )
            except StaleStateError:
                return
            with lock:
                wins.append(beam_id)

        for beam_id in ids:
            barrier = threading.Barrier(2)
            threads = [threading.Thread(target=launch, args=(s, barrier, beam_id)) for s in (first, second)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
        assert sorted(wins) == ids, "a beam was launched twice (or not at all)"
        assert all(len(first.attempts(i)) == 1 for i in ids)
