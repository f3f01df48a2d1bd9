"""The launch wrapper's protocol, run for real on each of its three builds (compiled, perl, Python):
the report line, the token handed to the command, exit codes when the command cannot run or the
marker cannot be written, signals to the wrapper reaching the group, hostile arguments passed
through untouched; and the compiled one's refusal of arguments it cannot trust."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from tests.support import require

from simbridge.jobs.errors import LaunchTooLateError
from simbridge.jobs.executors.base import LATE_REPORT, WRAPPER_ENV, JobInfo, JobStatus, LaunchSpec
from simbridge.jobs.executors.local import (
    WRAPPER_C,
    LocalExecutor,
    read_exit_file,
    start_wrapper,
    wrapper_command,
)

END_S = 30.0  # named bound of every wait for a wrapper to end
START_S = 30.0


@pytest.fixture(params=["c", "perl", "python"])
def wrapper(request: pytest.FixtureRequest) -> str:
    if request.param == "c":
        require(os.access(WRAPPER_C, os.X_OK), "the compiled wrapper: python setup.py build_ext --inplace")
    if request.param == "perl":
        require(shutil.which("perl") is not None, "perl (Debian: perl-base)")
    return str(request.param)


def _spec(tmp: Path, *argv: str, name: str = "run-1") -> LaunchSpec:
    (tmp / "logs").mkdir(exist_ok=True)
    return LaunchSpec(token=f"sb-test-{uuid.uuid4().hex}", argv=argv, cwd=tmp, log_prefix=tmp / "logs" / name)


def _run(spec: LaunchSpec, wrapper: str) -> tuple[int, bytes]:
    """Run the wrapper of ``spec`` to its end: (its exit status, its report line)."""
    report, report_w = os.pipe()
    try:
        proc = start_wrapper(spec, report_w, wrapper=wrapper_command(wrapper))
    finally:
        os.close(report_w)
    try:
        line = b""
        while chunk := os.read(report, 64):
            line += chunk
    finally:
        os.close(report)
    return proc.wait(timeout=END_S), line


def _wait_for(path: Path, what: str) -> str:
    """The file's text once it holds a whole line (polled against START_S)."""
    end = time.monotonic() + START_S
    while not (path.exists() and path.read_text().endswith("\n")):
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {START_S}s waiting for {what}")
        time.sleep(0.01)
    return path.read_text()


def test_the_report_names_the_command_and_its_start_and_the_token_moves(tmp_path: Path, wrapper: str) -> None:
    script = 'echo "$$ $SIMBRIDGE_ATTEMPT ${SIMBRIDGE_WRAPPER-unset}" > "$0/seen"'
    spec = _spec(tmp_path, "sh", "-c", script, str(tmp_path))
    os.environ["SIMBRIDGE_ATTEMPT"] = "sb-stale-token-of-someone-else"
    try:
        status, line = _run(spec, wrapper)
    finally:
        del os.environ["SIMBRIDGE_ATTEMPT"]
    assert status == 0 and spec.exit_file.read_bytes() == b"exit 0\n"
    pid_text, start_text = line.decode().split()
    assert line.endswith(b"\n") and pid_text.isdigit() and start_text.isdigit()
    sim_pid, token, wrapper_var = (tmp_path / "seen").read_text().split()
    # The command itself (not a shell between) was started, with the token under its own name.
    assert sim_pid == pid_text and token == spec.token and wrapper_var == "unset"


def test_past_its_deadline_the_wrapper_starts_nothing_and_says_late(tmp_path: Path, wrapper: str) -> None:
    spec = _spec(tmp_path, "sh", "-c", 'echo ran > "$0/ran"', str(tmp_path))
    status, line = _run(dataclasses.replace(spec, not_after=time.time() - 0.001), wrapper)
    assert (status, line) == (75, LATE_REPORT)
    assert not (tmp_path / "ran").exists() and not spec.exit_file.exists()  # never launched
    assert b"past its deadline" in spec.stderr.read_bytes()


def test_before_its_deadline_the_command_runs_without_the_deadline(tmp_path: Path, wrapper: str) -> None:
    spec = _spec(tmp_path, "sh", "-c", 'echo "${SIMBRIDGE_NOT_AFTER-unset}" > "$0/seen"', str(tmp_path))
    status, line = _run(dataclasses.replace(spec, not_after=time.time() + 600), wrapper)
    assert status == 0 and line.endswith(b"\n") and line != LATE_REPORT
    assert (tmp_path / "seen").read_text() == "unset\n"


def test_a_deadline_that_is_no_time_is_refused(tmp_path: Path, wrapper: str) -> None:
    spec = _spec(tmp_path, "sh", "-c", 'echo ran > "$0/ran"', str(tmp_path))
    os.environ["SIMBRIDGE_NOT_AFTER"] = "1e99"  # set by hand: start_wrapper would drop it
    try:
        report, report_w = os.pipe()
        try:
            argv = [*wrapper_command(wrapper), str(spec.exit_file), str(report_w), *spec.argv]
            proc = subprocess.Popen(argv, pass_fds=(report_w,), stderr=subprocess.PIPE)
        finally:
            os.close(report_w)
        os.close(report)
        _, err = proc.communicate(timeout=END_S)
    finally:
        del os.environ["SIMBRIDGE_NOT_AFTER"]
    assert proc.returncode == 126 and b"SIMBRIDGE_NOT_AFTER" in err
    assert not (tmp_path / "ran").exists()


def test_the_executor_reports_a_late_wrapper_as_never_launched(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "sh", "-c", 'echo ran > "$0/ran"', str(tmp_path))
    with pytest.raises(LaunchTooLateError, match="past its deadline"):
        LocalExecutor().submit(dataclasses.replace(spec, not_after=time.time() - 0.001))
    assert not (tmp_path / "ran").exists() and not spec.exit_file.exists()


def test_a_command_not_found_is_127_and_not_runnable_126(tmp_path: Path, wrapper: str) -> None:
    spec = _spec(tmp_path, "simbridge-no-such-command-here", name="missing")
    status, line = _run(spec, wrapper)
    assert status == 127 and spec.exit_file.read_bytes() == b"exit 127\n"
    assert line.split()[0].isdigit()  # the executor still learns the (short-lived) group
    assert b"cannot run" in spec.stderr.read_bytes()
    not_exec = tmp_path / "not-executable"
    not_exec.write_text("#!/bin/sh\ntrue\n")
    not_exec.chmod(0o644)
    spec = _spec(tmp_path, str(not_exec), name="noexec")
    status, _ = _run(spec, wrapper)
    assert status == 126 and spec.exit_file.read_bytes() == b"exit 126\n"


def test_a_marker_that_cannot_be_written_is_125(tmp_path: Path, wrapper: str) -> None:
    # The command makes the marker's temporary name a folder: no write can take it (not even root's).
    exit_file = _spec(tmp_path, "true").exit_file
    spec = _spec(tmp_path, "sh", "-c", 'mkdir "$0"', str(exit_file) + ".tmp")
    status, _ = _run(spec, wrapper)
    assert status == 125 and not spec.exit_file.exists()
    assert b"cannot write the exit marker" in spec.stderr.read_bytes()


def test_a_signal_death_is_a_signal_in_the_marker_and_128_plus_n(tmp_path: Path, wrapper: str) -> None:
    spec = _spec(tmp_path, "sh", "-c", "kill -USR1 $$")
    status, _ = _run(spec, wrapper)
    assert status == 128 + signal.SIGUSR1
    assert spec.exit_file.read_bytes() == f"signal {int(signal.SIGUSR1)}\n".encode()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_the_wrapper_reaches_the_whole_group(tmp_path: Path, wrapper: str, signum: int) -> None:
    # Leader and a child of it each say which signal reached them, then end. The child runs in
    # the foreground: a background one of a non-interactive shell ignores SIGINT for good.
    traps = 'for s in TERM INT HUP; do trap "echo $s > \\"$0/$1\\"; exit 0" $s; done; echo up > "$0/$1.up"'
    script = f"{traps}; while :; do sleep 0.05; done"
    child = f"{traps}; sh -c '{script}' \"$0\" child; while :; do sleep 0.05; done"
    spec = _spec(tmp_path, "sh", "-c", child, str(tmp_path), "leader")
    report, report_w = os.pipe()
    proc = start_wrapper(spec, report_w, wrapper=wrapper_command(wrapper))
    os.close(report_w)
    os.read(report, 64)
    os.close(report)
    _wait_for(tmp_path / "leader.up", "the leader to trap the signals")
    _wait_for(tmp_path / "child.up", "the child to trap the signals")
    proc.send_signal(signum)
    assert proc.wait(timeout=END_S) == 0
    name = signal.Signals(signum).name[3:]
    assert (tmp_path / "leader").read_text() == f"{name}\n"
    assert (tmp_path / "child").read_text() == f"{name}\n"


HOSTILE = (
    "with space",
    'it\'s "quoted"',
    "new\nline",
    "ünïcødé ✓ 日本",
    "$(touch pwned); `touch pwned`",
    "",
    "-",
    "*",
    "a\\b",
)


def test_hostile_arguments_and_paths_reach_the_command_untouched(tmp_path: Path, wrapper: str) -> None:
    folder = tmp_path / "a b'c\"d\nü ✓"
    folder.mkdir()
    executor = LocalExecutor(wrapper=wrapper)
    script = 'for a in "$@"; do printf "%s\\0" "$a"; done > args'
    spec = LaunchSpec(
        token=f"sb-test-{uuid.uuid4().hex}",
        argv=("sh", "-c", script, "sim", *HOSTILE),
        cwd=folder,
        log_prefix=folder / "logs" / "run 'x'\n1",
    )
    launched = executor.submit(spec)
    assert launched.job_id == str(launched.pid)
    _wait_for(spec.exit_file, "the hostile-named attempt's marker")
    assert read_exit_file(spec.exit_file) == JobInfo(JobStatus.EXITED, exit_code=0)
    assert (folder / "args").read_bytes().split(b"\0")[:-1] == [a.encode() for a in HOSTILE]
    assert not (folder / "pwned").exists() and not (tmp_path / "pwned").exists()


# Not the perl wrapper: it keeps its inherited descriptors (loading POSIX would cost each launch).
@pytest.mark.parametrize("wrapper", ["c", "python"])
def test_the_wrapper_keeps_no_descriptor_of_ours_while_the_command_runs(tmp_path: Path, wrapper: str) -> None:
    require(wrapper != "c" or os.access(WRAPPER_C, os.X_OK), "the compiled wrapper (build_ext --inplace)")
    spec = _spec(tmp_path, "sh", "-c", 'echo up > "$0/up"; sleep 60', str(tmp_path))
    lease_r, lease_w = os.pipe()  # stands for a GPU lease's lock: the command must keep it
    spec = LaunchSpec(**{**spec.__dict__, "pass_fds": (lease_w,)})
    report, report_w = os.pipe()
    proc = start_wrapper(spec, report_w, wrapper=wrapper_command(wrapper))
    os.close(report_w)
    os.close(lease_w)
    pid = int(os.read(report, 64).split()[0])
    os.close(report)
    try:
        _wait_for(tmp_path / "up", "the command to start")
        # The wrapper drops its copies right after its report, while the command already runs:
        # polled (bounded), not read once, or a command quicker than that step would fail it.
        end = time.monotonic() + START_S
        while (held := sorted(int(fd) for fd in os.listdir(f"/proc/{proc.pid}/fd"))) != [0, 1, 2]:
            assert time.monotonic() < end, f"the wrapper still holds descriptors {held} after {START_S}s"
            time.sleep(0.01)
        assert str(lease_w) in os.listdir(f"/proc/{pid}/fd")
    finally:
        os.killpg(pid, signal.SIGKILL)
        proc.wait(timeout=END_S)
        os.close(lease_r)


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["{exit}"],
        ["{exit}", "{fd}"],
        ["", "{fd}", "touch", "{ran}"],
        ["{exit}", "x", "touch", "{ran}"],
        ["{exit}", "-{fd}", "touch", "{ran}"],
        ["{exit}", "+{fd}", "touch", "{ran}"],
        ["{exit}", "{fd} ", "touch", "{ran}"],
        ["{exit}", "", "touch", "{ran}"],
        ["{exit}", "1", "touch", "{ran}"],
        ["{exit}", "99999999999999999999", "touch", "{ran}"],
        ["{exit}", "4095", "touch", "{ran}"],  # a number, but no open descriptor
        ["{exit}", "{fd}", "", "{ran}"],
        ["{long}", "{fd}", "touch", "{ran}"],
    ],
)
def test_the_compiled_wrapper_refuses_arguments_it_cannot_trust(tmp_path: Path, args: list[str]) -> None:
    require(os.access(WRAPPER_C, os.X_OK), "the compiled wrapper: python setup.py build_ext --inplace")
    # {fd} is open (and inherited) in the wrapper: only the argument named in each case is at fault.
    read_fd, write_fd = os.pipe()
    fields = {"exit": str(tmp_path / "x.exit"), "ran": str(tmp_path / "ran"), "long": "/" + "a" * 5000}
    fields["fd"] = str(write_fd)
    try:
        result = subprocess.run(
            [str(WRAPPER_C), *(a.format(**fields) for a in args)],
            env={**os.environ, WRAPPER_ENV: "sb-test"},
            cwd=tmp_path,
            capture_output=True,
            timeout=END_S,
            check=False,
            pass_fds=(write_fd,),
        )
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert result.returncode == 126, result
    assert result.stderr.startswith(b"simbridge: ") and result.stderr.count(b"\n") == 1
    assert not (tmp_path / "ran").exists() and not (tmp_path / "x.exit").exists()


def test_the_compiled_wrapper_refuses_a_token_too_long(tmp_path: Path) -> None:
    require(os.access(WRAPPER_C, os.X_OK), "the compiled wrapper: python setup.py build_ext --inplace")
    read_fd, write_fd = os.pipe()
    try:
        result = subprocess.run(
            [str(WRAPPER_C), str(tmp_path / "x.exit"), str(write_fd), "touch", str(tmp_path / "ran")],
            env={**os.environ, WRAPPER_ENV: "t" * 10_000},
            capture_output=True,
            timeout=END_S,
            check=False,
            pass_fds=(write_fd,),
        )
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert result.returncode == 126 and b"SIMBRIDGE_WRAPPER" in result.stderr
    assert not (tmp_path / "ran").exists()


def test_the_executor_takes_the_compiled_wrapper_when_built(tmp_path: Path) -> None:
    require(os.access(WRAPPER_C, os.X_OK), "the compiled wrapper: python setup.py build_ext --inplace")
    assert wrapper_command() == (str(WRAPPER_C),)
    with pytest.raises(Exception, match="unknown launch wrapper"):
        wrapper_command("bash")
