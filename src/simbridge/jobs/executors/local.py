"""The local executor: each attempt is a process group on this machine, detached from us.

A tiny ``sh`` wrapper runs the argv (never parsed by the shell) and writes the exit code to a marker
file (whole once it ends in a newline), so an attempt that outlives a killed orchestrator is still
found (by its token in ``/proc/PID/environ``) and its result still collected.
Cancel and timeouts signal the whole group.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from simbridge.jobs.errors import LaunchError
from simbridge.jobs.executors.base import (
    TOKEN_ENV,
    Executor,
    JobInfo,
    JobRef,
    JobStatus,
    Launched,
    LaunchSpec,
)
from simbridge.logs import get_logger

log = get_logger(__name__)

# $1 is the marker path; "$@" is the command, passed as argv so the shell never parses it.
# The marker is written in place by one write() of "CODE\n" (printf is a shell builtin: no extra
# process, unlike a `mv` of a temporary file); a reader takes it only once the newline is there,
# so a half-written marker reads as "not yet", never as a wrong code.
_WRAPPER = 'm=$1; shift; "$@"; c=$?; printf "%s\\n" "$c" > "$m"; exit "$c"'


def proc_start_time(pid: int) -> tuple[int, str] | None:
    """(start time in clock ticks since boot, state letter) of a live pid, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and ')': split after its last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[19]), fields[0]


def _alive(pid: int, pid_start: int | None) -> bool:
    info = proc_start_time(pid)
    if info is None or info[1] in {"Z", "X"}:
        return False
    return pid_start is None or info[0] == pid_start


def read_exit_file(path: Path) -> int | None:
    """The exit code written by the wrapper, or None if there is none (yet, or not whole)."""
    try:
        text = path.read_bytes()
    except OSError:
        return None
    if not text.endswith(b"\n"):
        return None  # still being written (or torn by a kill mid-write: the process tells)
    try:
        return int(text)
    except ValueError:
        return None


def find_by_token(token: str) -> int | None:
    """The process-group leader whose environment carries ``SIMBRIDGE_ATTEMPT=token``, if any."""
    needle = f"{TOKEN_ENV}={token}".encode() + b"\x00"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes() + b"\x00"
            if b"\x00" + needle in b"\x00" + env and os.getpgid(pid) == pid and _alive(pid, None):
                return pid
        except OSError:
            continue
    return None


class LocalExecutor(Executor):
    """Runs attempts as detached process groups on this host."""

    name = "local"

    def __init__(self, *, notify: Callable[[], None] | None = None) -> None:
        # Called (from a waiter thread) whenever one of our children exits, so a dispatcher can
        # react at once instead of at its next poll.
        self._notify = notify
        # Our own children, so we can reap them (no zombies) and learn a signal death quickly.
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._reaper = _Reaper(notify) if notify is not None else None

    def submit(self, spec: LaunchSpec) -> Launched:
        """Start ``spec.argv`` in its own session with logs to files; the marker tells the end."""
        spec.log_prefix.parent.mkdir(parents=True, exist_ok=True)
        spec.exit_file.unlink(missing_ok=True)
        env = {**os.environ, **spec.env, TOKEN_ENV: spec.token}
        try:
            with open(spec.stdout, "ab") as out, open(spec.stderr, "ab") as err:
                proc = subprocess.Popen(
                    [
                        "/bin/sh",
                        "-c",
                        _WRAPPER,
                        "simbridge-attempt",
                        str(spec.exit_file),
                        *spec.argv,
                    ],
                    cwd=spec.cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    # Own session: a kill of the orchestrator (or its terminal) leaves it running,
                    # and cancel can signal the whole group at once.
                    start_new_session=True,
                    pass_fds=spec.pass_fds,
                )
        except OSError as exc:
            raise LaunchError(f"cannot start {spec.argv[0]!r} in {spec.cwd}: {exc}") from exc
        # Watched before anyone else can see (and so reap) it: its pid cannot be reused meanwhile.
        if self._reaper is not None:
            self._reaper.watch(proc)
        with self._lock:
            self._children[spec.token] = proc
        info = proc_start_time(proc.pid)
        return Launched(job_id=str(proc.pid), pid=proc.pid, pid_start=info[0] if info else None)

    def find(self, ref: JobRef) -> Launched | None:
        """Find the attempt's process by recorded pid (if still the same process) or by token."""
        if ref.pid is not None and _alive(ref.pid, ref.pid_start):
            return Launched(job_id=str(ref.pid), pid=ref.pid, pid_start=ref.pid_start)
        pid = find_by_token(ref.token)
        if pid is None:
            return None
        info = proc_start_time(pid)
        return Launched(job_id=str(pid), pid=pid, pid_start=info[0] if info else None)

    def poll(self, refs: Sequence[JobRef]) -> dict[str, JobInfo]:
        """EXITED once the marker exists; LOST if the process is gone without one."""
        result: dict[str, JobInfo] = {}
        for ref in refs:
            code = read_exit_file(ref.exit_file)
            if code is not None:
                self._reap(ref.token)
                result[ref.token] = JobInfo(JobStatus.EXITED, exit_code=code)
                continue
            with self._lock:
                proc = self._children.get(ref.token)
            if proc is not None:
                rc = proc.poll()
                running = rc is None
            else:
                rc = None
                running = ref.pid is not None and _alive(ref.pid, ref.pid_start)
            if running:
                result[ref.token] = JobInfo(JobStatus.RUNNING)
                continue
            # Gone: the marker may have landed between our two looks.
            code = read_exit_file(ref.exit_file)
            self._reap(ref.token)
            if code is not None:
                result[ref.token] = JobInfo(JobStatus.EXITED, exit_code=code)
            else:
                why = f"signal {-rc}" if rc is not None and rc < 0 else "no exit code written"
                result[ref.token] = JobInfo(JobStatus.LOST, detail=f"process vanished ({why})")
        return result

    def _reap(self, token: str) -> None:
        with self._lock:
            proc = self._children.pop(token, None)
        if proc is not None:
            proc.poll()

    def cancel(self, ref: JobRef, *, grace_s: float) -> bool:
        """SIGTERM the attempt's process group, then SIGKILL after ``grace_s``."""
        found = self.find(ref)
        if found is None or found.pid is None:
            return False
        pgid = found.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with self._lock:
                proc = self._children.get(ref.token)
            if proc is not None:
                proc.poll()
            if not _group_alive(pgid):
                break
            time.sleep(0.05)
        else:
            log.warning("attempt ignored SIGTERM; sending SIGKILL", token=ref.token, pgid=pgid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        self._reap(ref.token)
        return True


class _Reaper:
    """One thread that waits for all our children at once (pidfds in an epoll set).

    It reaps each child as it ends and calls ``notify`` once per wake-up: one thread for every
    child instead of one thread started (and switched to) per launch. Where pidfds or epoll are
    missing, each child is waited for on a thread of its own.
    """

    def __init__(self, notify: Callable[[], None]) -> None:
        self._notify = notify
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._epoll = select.epoll() if hasattr(os, "pidfd_open") and hasattr(select, "epoll") else None
        if self._epoll is not None:
            reaper = threading.Thread(target=self._run, args=(self._epoll,), name="sb-child-reaper")
            reaper.daemon = True
            reaper.start()

    def watch(self, proc: subprocess.Popen[bytes]) -> None:
        epoll, fd = self._epoll, None
        if epoll is not None:
            with contextlib.suppress(OSError):  # no pidfds in this kernel
                fd = os.pidfd_open(proc.pid)
        if epoll is None or fd is None:  # wait for this one on a thread of its own
            threading.Thread(target=self._wait_one, args=(proc,), name="sb-child-wait", daemon=True).start()
            return
        with self._lock:
            self._procs[fd] = proc
        # epoll_ctl takes effect even while the reaper sits in epoll_wait: no wake-up needed.
        epoll.register(fd, select.EPOLLIN)

    def _wait_one(self, proc: subprocess.Popen[bytes]) -> None:
        proc.wait()
        self._notify()

    def _run(self, epoll: select.epoll) -> None:
        while True:
            events = epoll.poll()
            for fd, _ in events:
                with self._lock:
                    proc = self._procs.pop(fd, None)
                with contextlib.suppress(OSError):
                    epoll.unregister(fd)
                os.close(fd)
                if proc is not None:
                    proc.poll()  # reap it (no zombie); a poll from another thread is harmless
            if events:
                self._notify()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) succeeds on zombies too: look for a member that is not one.
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            pid = int(entry.name)
            try:
                if os.getpgid(pid) == pgid and _alive(pid, None):
                    return True
            except OSError:
                continue
    return False
