"""Killing an attempt, with real processes: the job id is the command's own process group, a signal
death reads as a signal (never exit 128+N), a dead wrapper takes its command's group with it, and
cancel signals only processes proven ours."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.support import require

from simbridge.jobs.executors.base import JobInfo, JobRef, JobStatus, Launched, LaunchSpec
from simbridge.jobs.executors.local import (
    WRAPPER_C,
    LocalExecutor,
    group_members,
    signal_group,
    start_wrapper,
    wrapper_command,
)

# Named deadlines: every wait below polls against one of these and fails naming what it waited for.
START_S = 30.0
END_S = 30.0


def wait_for(predicate: Callable[[], object], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def dead(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def wrapper_of(pid: int) -> int:
    """The simulation's parent: its wrapper (never this test process, which it must not kill)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    parent = int(stat[stat.rindex(")") + 2 :].split()[1])
    assert parent not in {1, os.getpid()}, f"{pid} has no wrapper of its own (parent {parent})"
    return parent


class Attempt:
    """One real attempt under a LocalExecutor, with the helpers the tests need."""

    def __init__(self, executor: LocalExecutor, tmp: Path, script: str) -> None:
        self.executor = executor
        self.tmp = tmp
        self.token = f"sb-test-{uuid.uuid4().hex}"
        self.spec = LaunchSpec(
            token=self.token,
            argv=("sh", "-c", script, "sim", str(tmp)),
            cwd=tmp,
            log_prefix=tmp / "logs" / "running-1",
        )
        self.launched: Launched = executor.submit(self.spec)
        assert self.launched.pid is not None
        self.pid = self.launched.pid

    @property
    def ref(self) -> JobRef:
        return JobRef(
            token=self.token,
            log_prefix=self.spec.log_prefix,
            job_id=self.launched.job_id,
            pid=self.launched.pid,
            pid_start=self.launched.pid_start,
        )

    def poll(self, executor: LocalExecutor | None = None) -> JobInfo:
        return (executor or self.executor).poll([self.ref])[self.token]

    def ended(self, executor: LocalExecutor | None = None) -> JobInfo:
        infos: list[JobInfo] = []

        def done() -> bool:
            infos.append(self.poll(executor))
            return infos[-1].status is not JobStatus.RUNNING

        wait_for(done, timeout=END_S, what="the attempt to end")
        return infos[-1]

    def pid_file(self, name: str) -> int:
        path = self.tmp / name
        wait_for(lambda: path.exists() and path.read_text().strip(), timeout=START_S, what=f"{name}")
        return int(path.read_text())


# The three wrappers (compiled where built, perl where it exists, else Python) keep one protocol:
# every test runs on each.
@pytest.fixture(params=["c", "perl", "python"])
def wrapper(request: pytest.FixtureRequest) -> str:
    if request.param == "c":  # built by setup.py (build_ext); the executor's default
        require(os.access(WRAPPER_C, os.X_OK), "the compiled wrapper: python setup.py build_ext --inplace")
    if request.param == "perl":  # where perl is missing the Python wrapper serves, tested anyway
        require(shutil.which("perl") is not None, "perl (Debian: perl-base)")
    return str(request.param)


@pytest.fixture
def executor(wrapper: str) -> Iterator[LocalExecutor]:
    yield LocalExecutor(notify=threading.Event().set, wrapper=wrapper)


def test_job_id_is_the_commands_own_group_not_the_wrapper(executor: LocalExecutor, tmp_path: Path) -> None:
    attempt = Attempt(executor, tmp_path, 'echo $$ > "$1/sim.pid"; exec sleep 60')
    sim = attempt.pid_file("sim.pid")
    # What status shows is the simulation itself, leader of its own group; the wrapper is its parent.
    assert attempt.launched.job_id == str(sim) and attempt.pid == sim
    assert os.getpgid(sim) == sim
    wrapper = wrapper_of(sim)
    assert wrapper != os.getpid() and os.getpgid(wrapper) != sim
    assert attempt.poll().status is JobStatus.RUNNING
    assert executor.cancel(attempt.ref, grace_s=5)
    info = attempt.ended()
    assert info == JobInfo(JobStatus.KILLED, signal=signal.SIGTERM)
    assert (tmp_path / "logs" / "running-1.exit").read_bytes() == b"signal 15\n"
    assert dead(sim)  # reaped by its wrapper before the marker was written
    wait_for(lambda: dead(wrapper), timeout=END_S, what="the wrapper to exit after writing the marker")


def test_kill_9_of_the_simulation_is_a_signal_not_exit_137(executor: LocalExecutor, tmp_path: Path) -> None:
    attempt = Attempt(executor, tmp_path, 'echo $$ > "$1/sim.pid"; exec sleep 60')
    os.kill(attempt.pid_file("sim.pid"), signal.SIGKILL)
    info = attempt.ended()
    assert info.status is JobStatus.KILLED and info.signal == signal.SIGKILL
    assert info.code == -9 and info.describe() == "killed by SIGKILL"
    # A command that itself exits 137 stays an exit code.
    (tmp_path / "b").mkdir()
    info = Attempt(executor, tmp_path / "b", "exit 137").ended()
    assert info == JobInfo(JobStatus.EXITED, exit_code=137) and info.describe() == "exited 137"


def test_sigterm_to_the_simulation_is_reported_as_sigterm(executor: LocalExecutor, tmp_path: Path) -> None:
    attempt = Attempt(executor, tmp_path, 'echo $$ > "$1/sim.pid"; exec sleep 60')
    os.kill(attempt.pid_file("sim.pid"), signal.SIGTERM)
    assert attempt.ended() == JobInfo(JobStatus.KILLED, signal=signal.SIGTERM)


def test_sigterm_to_the_wrapper_stops_the_whole_group(executor: LocalExecutor, tmp_path: Path) -> None:
    attempt = Attempt(executor, tmp_path, 'sleep 60 & echo $! > "$1/child.pid"; wait')
    child = attempt.pid_file("child.pid")
    os.kill(wrapper_of(attempt.pid), signal.SIGTERM)
    assert attempt.ended().status is JobStatus.KILLED
    wait_for(lambda: dead(child), timeout=END_S, what="the simulation's child to end with its group")


@pytest.mark.parametrize("watcher", ["the launching executor", "a restarted executor"])
def test_kill_9_of_the_wrapper_kills_the_group_before_it_is_lost(
    executor: LocalExecutor, tmp_path: Path, watcher: str, wrapper: str
) -> None:
    attempt = Attempt(executor, tmp_path, 'sleep 60 & echo $! > "$1/child.pid"; wait')
    child = attempt.pid_file("child.pid")
    # One that did not start it (after a restart) tells a live wrapper from a dead one too.
    other = LocalExecutor(wrapper=wrapper) if watcher == "a restarted executor" else None
    assert attempt.poll(other).status is JobStatus.RUNNING
    os.kill(wrapper_of(attempt.pid), signal.SIGKILL)
    info = attempt.ended(other)
    assert info.status is JobStatus.LOST
    assert f"process group {attempt.pid} was killed" in info.detail
    # Lost is said only once nothing of it runs: a retry never starts beside the old simulation.
    assert dead(attempt.pid) and dead(child)
    assert not (tmp_path / "logs" / "running-1.exit").exists()


def test_cancel_signals_only_processes_proven_ours(executor: LocalExecutor, tmp_path: Path) -> None:
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        # A recorded pid that is now someone else's (same group id, no token of ours): untouched.
        ref = JobRef(token="sb-not-this-one", log_prefix=tmp_path / "x", pid=stranger.pid, pid_start=None)
        assert not executor.cancel(ref, grace_s=0)
        assert stranger.poll() is None
        assert signal_group(1, "sb-not-this-one", 0) == 0 and group_members(1, "sb-not-this-one") == []
        assert not executor.cancel(JobRef(token="t", log_prefix=tmp_path / "y", pid=1), grace_s=0)
    finally:
        stranger.kill()
        stranger.wait(timeout=END_S)


def test_cancel_kills_a_group_that_ignores_sigterm(executor: LocalExecutor, tmp_path: Path) -> None:
    attempt = Attempt(executor, tmp_path, 'trap "" TERM; echo $$ > "$1/sim.pid"; sleep 60 & wait; sleep 60')
    sim = attempt.pid_file("sim.pid")
    assert executor.cancel(attempt.ref, grace_s=0.2)
    assert dead(sim) and group_members(sim, attempt.token) == []
    assert attempt.ended() == JobInfo(JobStatus.KILLED, signal=signal.SIGKILL)


def test_what_the_command_leaves_in_its_group_ends_with_it(executor: LocalExecutor, tmp_path: Path) -> None:
    attempt = Attempt(executor, tmp_path, 'sleep 60 & echo $! > "$1/child.pid"; exit 0')
    child = attempt.pid_file("child.pid")
    assert attempt.ended() == JobInfo(JobStatus.EXITED, exit_code=0)
    wait_for(lambda: dead(child), timeout=END_S, what="the leftover child to be killed with its group")


def test_a_restart_right_after_a_launch_finds_the_command_the_wrapper_starts(
    tmp_path: Path, wrapper: str
) -> None:
    # As if the orchestrator died right after starting the wrapper: the wrapper has not started
    # the command yet (held stopped here), and a restarted executor looks for it by its token.
    token = f"sb-test-{uuid.uuid4().hex}"
    spec = LaunchSpec(token=token, argv=("sleep", "60"), cwd=tmp_path, log_prefix=tmp_path / "running-1")
    report, report_w = os.pipe()
    proc = start_wrapper(spec, report_w, wrapper=wrapper_command(wrapper))
    os.close(report_w)
    os.kill(proc.pid, signal.SIGSTOP)
    found: list[Launched | None] = []

    def find() -> None:
        found.append(LocalExecutor().find(JobRef(token, spec.log_prefix)))

    finder = threading.Thread(target=find)
    finder.start()
    # Not a synchronisation: the fixed code waits as long as the wrapper lives (or finds the
    # command, if the wrapper started it before it was stopped); this only bounds how long the
    # wrong answer (None, "never started", at once) is given to show.
    finder.join(timeout=0.5)
    os.kill(proc.pid, signal.SIGCONT)
    finder.join(timeout=START_S)
    pid = int(os.read(report, 64).split()[0])
    os.close(report)
    signal_group(pid, token, signal.SIGKILL)
    proc.wait(timeout=END_S)
    assert found != [None], "a wrapper yet to start its command was taken for 'never started'"
    assert found and found[0] is not None and found[0].pid == pid


def test_a_launcher_gone_before_the_report_still_gets_the_end_written(tmp_path: Path, wrapper: str) -> None:
    # The orchestrator killed while its wrapper starts: nobody reads the report. The wrapper must
    # not die of it (SIGPIPE), or the command's end is never written and it would run again.
    spec = LaunchSpec(
        token=f"sb-test-{uuid.uuid4().hex}", argv=("true",), cwd=tmp_path, log_prefix=tmp_path / "p-1"
    )
    report, report_w = os.pipe()
    proc = start_wrapper(spec, report_w, wrapper=wrapper_command(wrapper))
    os.close(report_w)
    os.close(report)
    assert proc.wait(timeout=END_S) == 0, f"the wrapper died ({proc.returncode})"
    assert spec.exit_file.read_bytes() == b"exit 0\n"
