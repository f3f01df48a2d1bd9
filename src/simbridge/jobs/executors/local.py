"""The local executor: each attempt is a process group on this machine, detached from us.

A small wrapper (the compiled ``simbridge-wrapper`` built from ``wrapper.c``, else its perl twin
``wrapper.pl``, else ``wrapper.py``; one protocol) runs the argv (never parsed by a shell) as the
leader of a process group of its own and writes ``exit N`` or ``signal N`` to a marker file,
so an attempt that outlives a killed orchestrator is still found (by its token in
``/proc/PID/environ``) and its result still collected. The group leader's pid is the job id;
cancel and timeouts signal the group's processes, each proven ours (same group, our token)
through a pidfd before the signal. If the wrapper dies while the command runs, the command's
group is killed before the attempt is reported lost: nothing keeps running unseen while a retry
starts in the same folder.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from simbridge.jobs.errors import LaunchError, LaunchTooLateError
from simbridge.jobs.executors.base import (
    LATE_REPORT,
    NOT_AFTER_ENV,
    TOKEN_ENV,
    WRAPPER_ENV,
    Executor,
    JobInfo,
    JobRef,
    JobStatus,
    Launched,
    LaunchSpec,
)
from simbridge.logs import get_logger
from simbridge.processes import end_text, proc_start_time, proc_stat

log = get_logger(__name__)

WRAPPER = Path(__file__).with_name("wrapper.py")
# Its twins (same protocol), fastest first: every launch pays the wrapper's start while holding its
# GPU. CPU of a launch of /usr/bin/true measured here (wrapper and command): compiled 1.8 ms, perl
# 3.4 ms, Python 10.5 ms. The compiled one is built by setup.py (build_ext) next to its source.
WRAPPER_C = Path(__file__).with_name("simbridge-wrapper")
WRAPPER_PERL = Path(__file__).with_name("wrapper.pl")
WRAPPER_KINDS = ("c", "perl", "python")
_WRAPPER_ENV_B = WRAPPER_ENV.encode()
_TOKEN_ENV_B = TOKEN_ENV.encode()
_NOT_AFTER_ENV_B = NOT_AFTER_ENV.encode()
_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
# How long a launch waits for the wrapper to report the command's group (a Python start-up:
# milliseconds when idle, seconds on a machine under heavy load).
REPORT_TIMEOUT_S = 60.0
# How long the executor waits for a group it SIGKILLed (the wrapper died) to be gone.
KILL_WAIT_S = 10.0
_POLL_S = 0.05  # each look at a group scans /proc: not too often


def _alive(pid: int, pid_start: int | None) -> bool:
    info = proc_start_time(pid)
    if info is None or info[1] in {"Z", "X"}:
        return False
    return pid_start is None or info[0] == pid_start


def _carries(pid: int, var: str, token: str) -> bool:
    """Whether the process's environment holds ``var=token``."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return b"\x00" + f"{var}={token}".encode() + b"\x00" in b"\x00" + env + b"\x00"


def read_exit_file(path: Path) -> JobInfo | None:
    """How the command ended, from the wrapper's marker; None if there is none (yet, or torn).

    ``exit N`` and ``signal N``; a bare ``N`` (the marker of earlier versions) is an exit code.
    """
    try:
        text = path.read_bytes()
    except OSError:
        return None
    if not text.endswith(b"\n"):
        return None  # not whole: never a wrong code
    kind, _, number = text.strip().partition(b" ")
    if not number:
        kind, number = b"exit", kind
    try:
        value = int(number)
    except ValueError:
        return None
    if kind == b"signal":
        return JobInfo(JobStatus.KILLED, signal=value)
    return JobInfo(JobStatus.EXITED, exit_code=value) if kind == b"exit" else None


def find_by_token(token: str, *, var: str = TOKEN_ENV) -> int | None:
    """The live process-group leader whose environment carries ``var=token``, if any."""
    for pid in _pids():
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pid and _carries(pid, var, token) and _alive(pid, None):
                return pid
    return None


def _pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def group_members(pgid: int, token: str) -> list[int]:
    """Live processes of group ``pgid`` that carry the attempt's token: the ones we may signal."""
    if pgid <= 1:
        return []
    found = []
    for pid in _pids():
        if pid <= 1:
            continue
        info = proc_stat(pid)
        if info is None or info[3] != pgid or info[1] in {"Z", "X"}:
            continue
        if _carries(pid, TOKEN_ENV, token):
            found.append(pid)
    return found


def signal_group(pgid: int, token: str, sig: int) -> int:
    """Send ``sig`` to every process of group ``pgid`` proven ours; how many got it.

    Each is pinned by a pidfd before its group and token are checked, and signalled through that
    pidfd: a pid reused meanwhile is never signalled (where pidfds are missing, os.kill right
    after the check). Never a pid <= 1; a process that cleared its environment is not ours to kill.
    """
    sent = 0
    for pid in group_members(pgid, token):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        except (AttributeError, OSError):
            fd = -1
        try:
            info = proc_stat(pid)
            if info is None or info[3] != pgid or not _carries(pid, TOKEN_ENV, token):
                continue
            if fd >= 0:
                signal.pidfd_send_signal(fd, sig)
            else:
                os.kill(pid, sig)
            sent += 1
        except ProcessLookupError:
            continue
        finally:
            if fd >= 0:
                os.close(fd)
    return sent


class LocalExecutor(Executor):
    """Runs attempts as detached process groups on this host."""

    name = "local"

    def __init__(self, *, notify: Callable[[], None] | None = None, wrapper: str | None = None) -> None:
        self._wrapper = wrapper_command(wrapper)
        # Called (from a waiter thread) whenever one of our children exits, so a dispatcher can
        # react at once instead of at its next poll.
        self._notify = notify
        # Our own children (the wrappers, by token), so we can reap them (no zombies) and learn
        # at once when one dies.
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._reaper = _Reaper(notify) if notify is not None else None

    def submit(self, spec: LaunchSpec) -> Launched:
        """Start ``spec.argv`` under the wrapper with logs to files; the job id is its group."""
        spec.log_prefix.parent.mkdir(parents=True, exist_ok=True)
        spec.exit_file.unlink(missing_ok=True)
        report, report_w = os.pipe()
        try:
            proc = start_wrapper(spec, report_w, wrapper=self._wrapper)
        except OSError as exc:
            os.close(report)
            raise LaunchError(f"cannot start {spec.argv[0]!r} in {spec.cwd}: {exc}") from exc
        finally:
            os.close(report_w)
        # Watched before anyone else can see (and so reap) it: its pid cannot be reused meanwhile.
        if self._reaper is not None:
            self._reaper.watch(proc)
        with self._lock:
            self._children[spec.token] = proc
        try:
            pgid, start = _read_report(report, proc, spec)
        finally:
            os.close(report)
        return Launched(job_id=str(pgid), pid=pgid, pid_start=start)

    def find(self, ref: JobRef) -> Launched | None:
        """Find the command's group by recorded leader (if still the same process) or by token.

        A wrapper still starting its command (we were killed right after launching it) is waited
        for, bounded: answering "never started" then would launch the command a second time.
        """
        if ref.pid is not None and ref.pid > 1 and _alive(ref.pid, ref.pid_start):
            return Launched(job_id=str(ref.pid), pid=ref.pid, pid_start=ref.pid_start)
        deadline = time.monotonic() + REPORT_TIMEOUT_S
        while (pid := find_by_token(ref.token)) is None:
            if find_by_token(ref.token, var=WRAPPER_ENV) is None or time.monotonic() > deadline:
                return None  # no wrapper: the command never started, or ended (see its marker)
            time.sleep(_POLL_S)
        info = proc_start_time(pid)
        return Launched(job_id=str(pid), pid=pid, pid_start=info[0] if info else None)

    def poll(self, refs: Sequence[JobRef]) -> dict[str, JobInfo]:
        """EXITED or KILLED once the marker exists; RUNNING while the wrapper lives; else LOST.

        A wrapper gone without a marker leaves a command nobody watches: its group is killed
        before the attempt is reported lost, so a retry never runs beside it.
        """
        result: dict[str, JobInfo] = {}
        for ref in refs:
            ended = read_exit_file(ref.exit_file)
            if ended is None:
                alive, why = self._wrapper_alive(ref)
                if alive:
                    result[ref.token] = JobInfo(JobStatus.RUNNING)
                    continue
                # The wrapper writes the marker before it exits: look again, then it is lost.
                ended = read_exit_file(ref.exit_file)
                if ended is None:
                    result[ref.token] = self._lost(ref, why())
                    continue
            self._reap(ref.token)
            result[ref.token] = ended
        return result

    def _wrapper_alive(self, ref: JobRef) -> tuple[bool, Callable[[], str]]:
        """Whether the attempt's wrapper lives, and (lazily: polls are hot) why it is gone."""
        with self._lock:
            proc = self._children.get(ref.token)
        if proc is not None:
            rc = proc.poll()
            return (
                rc is None,
                lambda: f"lost: its wrapper ended ({end_text(rc)}) before writing how the command ended",
            )

        def why() -> str:
            return "lost: its wrapper is gone and never wrote how the command ended"

        # Not our child (we restarted): the wrapper is the command's parent while both live.
        leader = proc_stat(ref.pid) if ref.pid is not None and ref.pid > 1 else None
        if leader is not None and leader[1] not in {"Z", "X"} and leader[0] == ref.pid_start:
            return _carries(leader[2], WRAPPER_ENV, ref.token), why
        return find_by_token(ref.token, var=WRAPPER_ENV) is not None, why

    def _lost(self, ref: JobRef, why: str) -> JobInfo:
        pgid = ref.pid if ref.pid is not None else find_by_token(ref.token)
        if pgid is not None and group_members(pgid, ref.token):
            signal_group(pgid, ref.token, signal.SIGKILL)
            if not _wait_gone(pgid, ref.token, KILL_WAIT_S):
                # Never report it lost (and so relaunch beside it) while it still runs.
                log.warning("attempt group survives SIGKILL; still watching it", pgid=pgid, token=ref.token)
                return JobInfo(JobStatus.RUNNING)
            why += f"; its process group {pgid} was killed"
        self._reap(ref.token)
        return JobInfo(JobStatus.LOST, detail=why)

    def _reap(self, token: str) -> None:
        with self._lock:
            proc = self._children.pop(token, None)
        if proc is not None:
            proc.poll()

    def cancel(self, ref: JobRef, *, grace_s: float) -> bool:
        """SIGTERM the attempt's process group, then SIGKILL after ``grace_s``."""
        pgid = ref.pid if ref.pid is not None and ref.pid > 1 else find_by_token(ref.token)
        if pgid is None or not signal_group(pgid, ref.token, signal.SIGTERM):
            self._reap_when_ended(ref)
            return False
        if not _wait_gone(pgid, ref.token, grace_s):
            log.warning("attempt ignored SIGTERM; sending SIGKILL", token=ref.token, pgid=pgid)
            signal_group(pgid, ref.token, signal.SIGKILL)
            _wait_gone(pgid, ref.token, KILL_WAIT_S)
        self._reap_when_ended(ref)
        return True

    def _reap_when_ended(self, ref: JobRef) -> None:
        # Our wrapper writes the marker as soon as its command ends: let it finish (bounded).
        with self._lock:
            proc = self._children.get(ref.token)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=KILL_WAIT_S)
        self._reap(ref.token)


_chosen: set[str] = set()  # the wrappers already named in the log (once each per process)


def wrapper_command(kind: str | None = None) -> tuple[str, ...]:
    """How to run the wrapper: ``c`` (the default where it was built), ``perl`` or ``python``.

    With no ``kind``, the first that can run here, in that order; an explicit ``kind`` that cannot
    run here is a :class:`LaunchError`.
    """
    if kind is not None and kind not in WRAPPER_KINDS:
        raise LaunchError(f"unknown launch wrapper {kind!r}; one of {', '.join(WRAPPER_KINDS)}")
    command: tuple[str, ...]
    if kind in {None, "c"} and os.access(WRAPPER_C, os.X_OK) and WRAPPER_C.is_file():
        command, chosen = (str(WRAPPER_C),), "c"
    elif kind == "c":
        raise LaunchError(
            f"the compiled launch wrapper {WRAPPER_C} is missing or not executable; build it "
            "with `python setup.py build_ext --inplace` (or reinstall simbridge)"
        )
    elif kind in {None, "perl"} and (perl := shutil.which("perl")) is not None:
        command, chosen = (perl, str(WRAPPER_PERL)), "perl"
    elif kind == "perl":
        raise LaunchError("the perl wrapper was asked for but there is no perl on PATH")
    else:
        # -I -S: no user site, no PYTHON* variables, no site import: a few milliseconds to start.
        command, chosen = (sys.executable, "-I", "-S", str(WRAPPER)), "python"
    if chosen not in _chosen:
        _chosen.add(chosen)
        log.debug("jobs.launch_wrapper", kind=chosen, command=" ".join(command))
    return command


def start_wrapper(
    spec: LaunchSpec, report_fd: int, *, wrapper: tuple[str, ...] | None = None
) -> subprocess.Popen[bytes]:
    """Start the wrapper of ``spec`` in a session of its own; it reports on ``report_fd``."""
    # Bytes throughout, and plain descriptors for the logs: every launch pays this on the
    # orchestrator's own thread, and a str environment is decoded here only to be encoded again.
    env = {**os.environb, **{os.fsencode(k): os.fsencode(v) for k, v in spec.env.items()}}
    env[_WRAPPER_ENV_B] = os.fsencode(spec.token)
    env.pop(_TOKEN_ENV_B, None)  # the wrapper hands the token on; it must not carry one itself
    if spec.not_after is None:
        env.pop(_NOT_AFTER_ENV_B, None)  # an inherited deadline is none of this launch's
    else:
        env[_NOT_AFTER_ENV_B] = b"%.6f" % spec.not_after
    argv = [*(wrapper or wrapper_command()), str(spec.exit_file), str(report_fd), *spec.argv]
    out = os.open(spec.stdout, _LOG_FLAGS, 0o644)
    try:
        err = os.open(spec.stderr, _LOG_FLAGS, 0o644)
        try:
            return subprocess.Popen(
                argv,
                cwd=spec.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                # Own session: a kill of the orchestrator (or its terminal) leaves it running.
                start_new_session=True,
                pass_fds=(*spec.pass_fds, report_fd),
            )
        finally:
            os.close(err)
    finally:
        os.close(out)


def _read_report(fd: int, proc: subprocess.Popen[bytes], spec: LaunchSpec) -> tuple[int, int]:
    """The ``PID START`` line the wrapper writes once the command's group exists."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + REPORT_TIMEOUT_S
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            raise LaunchError(
                f"the wrapper of {spec.argv[0]!r} did not report its process within "
                f"{REPORT_TIMEOUT_S:g}s (machine overloaded?); it was killed"
            )
        if not poller.poll(left * 1000):
            continue
        chunk = os.read(fd, 64)
        if not chunk:
            proc.wait(timeout=REPORT_TIMEOUT_S)
            raise LaunchError(
                f"the wrapper of {spec.argv[0]!r} {end_text(proc.returncode)} before starting it; "
                f"see {spec.stderr}"
            )
        data += chunk
    if data == LATE_REPORT:
        proc.wait(timeout=REPORT_TIMEOUT_S)
        raise LaunchTooLateError(
            f"the wrapper of {spec.argv[0]!r} did not start it: past its deadline (the "
            "orchestrator lease it was launched under may have passed to another serve)"
        )
    pid, start = (int(word) for word in data.split())
    return pid, start


def _wait_gone(pgid: int, token: str, timeout_s: float) -> bool:
    """Wait until no process of the group carries our token; False if some still do."""
    deadline = time.monotonic() + timeout_s
    while group_members(pgid, token):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
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
