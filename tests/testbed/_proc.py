"""Process plumbing of the testbed: free ports, pidfiles, waits with a named deadline, log tails.

Everything here works from files alone (pidfiles, /proc), so `down DIR` in a fresh process can stop
what `up DIR` started in another one."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


class TestbedError(RuntimeError):
    """A part of the loopback testbed did not start, answer or stop in time."""

    __test__ = False  # not a pytest test class despite the name


# Ports below Linux's ephemeral range (32768-60999 by default): an outgoing connection never takes
# them, and several testbeds started at once on this host draw from 12000 values.
_PORT_RANGE = (20000, 32000)


def free_port(*, taken: Iterable[int] = ()) -> int:
    """A TCP port nobody listens on now (on every address: slurmctld and slurmd bind 0.0.0.0)."""
    avoid = set(taken)
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(*_PORT_RANGE)
        if port in avoid:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
            return port
    raise TestbedError(f"no free TCP port in {_PORT_RANGE} after 200 tries")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts a TCP connection on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def listening(pid: int, port: int) -> bool:
    """True when process `pid` itself holds a listening TCP socket on `port`. Unlike a connect, this
    is never fooled by another program that took the port first (it would accept too)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # local_address is HEXADDR:HEXPORT; state 0A is LISTEN; field 9 is the socket's inode.
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    if not inodes:
        return False
    try:
        links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    except OSError:
        return False
    return any(link.startswith("socket:[") and link[8:-1] in inodes for link in links)


def tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log file, or a note that it does not exist."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"--- {path}: (no such file)"
    last = text.splitlines()[-lines:]
    return f"--- {path} (last {len(last)} lines):\n" + "\n".join(last)


def wait_for(
    what: str,
    ready: Callable[[], bool],
    *,
    timeout_s: float,
    logs: Sequence[Path] = (),
    alive: Callable[[], bool] | None = None,
    interval_s: float = 0.05,
) -> None:
    """Poll `ready` until it is true; past the deadline (or once `alive` says the daemon died) raise
    with `what` and the tail of each log, so the reason is in the error, not in a file to hunt."""
    deadline = time.monotonic() + timeout_s
    while True:
        if ready():
            return
        died = alive is not None and not alive()
        if died or time.monotonic() > deadline:
            why = "its process exited" if died else f"not within {timeout_s:g} s"
            shown = "\n".join(tail(log) for log in logs)
            raise TestbedError(f"testbed: {what}: {why}\n{shown}".rstrip())
        time.sleep(interval_s)


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone: it only waits for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name, which is in parentheses and may itself hold spaces.
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")


def read_pid(pidfile: Path) -> int | None:
    """The pid in a pidfile, checked to be a plausible process id; None when absent or malformed."""
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    pid = int(text)
    return pid if 1 < pid < 2**22 else None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    """Every process below `pid` in the parent tree (read from /proc, children first)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def start_daemon(
    argv: Sequence[str], *, pidfile: Path, log: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """Start a daemon in the foreground of its own session, output appended to `log`, and record
    its pid in `pidfile` at once (not when the daemon gets round to it)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    pidfile.write_text(f"{proc.pid}\n")
    return proc


def stop_pidfile(pidfile: Path, *, comm: str, timeout_s: float = 15.0, sig: int = signal.SIGTERM) -> None:
    """Stop the process named in `pidfile` (only if its command name starts with `comm`, so a reused
    pid is never hit), escalate to SIGKILL at the deadline, then remove the pidfile."""
    pid = read_pid(pidfile)
    if pid is not None and pid_alive(pid) and _comm(pid).startswith(comm):
        kill_and_wait(pid, what=f"{comm} (pid {pid}, {pidfile})", timeout_s=timeout_s, sig=sig)
    pidfile.unlink(missing_ok=True)


def kill_and_wait(pid: int, *, what: str, timeout_s: float, sig: int = signal.SIGTERM) -> None:
    """Send `sig`, wait for the exit, SIGKILL when the deadline passes; raise if even that fails."""
    if pid <= 1:
        raise TestbedError(f"testbed: refusing to signal pid {pid} ({what})")
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    _reap(pid)
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 5.0
            sig = signal.SIGKILL
            if not _wait_gone(pid, deadline):
                raise TestbedError(f"testbed: {what} still runs 5 s after SIGKILL")
            return
        time.sleep(0.02)
        _reap(pid)


def _wait_gone(pid: int, deadline: float) -> bool:
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
        _reap(pid)
    return True


def _reap(pid: int) -> None:
    # A daemon this very process started stays a zombie until waited for; reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
