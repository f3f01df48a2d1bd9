"""The status watcher of one Slurm cluster: one ``squeue`` per interval for all of its jobs.

Asking per job costs the controller one RPC each (sites ban that); so the watcher asks once for
all of the user's jobs, finished ones included (``--states=all``), and no more often than the
cluster's ``poll_s``. Jobs that left the queue are asked of ``sacct`` when the cluster keeps
accounting, else of ``scontrol show job``; exit markers read from the cluster (one command for
all of them) are the final word on how a command ended.
"""

from __future__ import annotations

import base64
import binascii
import shlex
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from simbridge.jobs.errors import RemoteError, SchedulerError
from simbridge.jobs.executors.base import JobInfo, JobStatus
from simbridge.jobs.executors.slurm_parse import (
    SACCT_FIELDS,
    SQUEUE_FORMAT,
    SlurmJob,
    parse_marker,
    parse_sacct,
    parse_scontrol_jobs,
    parse_squeue,
)
from simbridge.jobs.transport.base import CommandResult, CommandRunner
from simbridge.logs import get_logger

log = get_logger(__name__)

TAIL_BYTES = 4096
_MAX_READ = 16 << 20  # what one read-many command may print before we call it garbage


def checked(result: CommandResult, what: str) -> str:
    """The command's stdout as text, or SchedulerError with its stderr."""
    if not result.ok:
        err = result.stderr.decode(errors="replace").strip() or result.stdout.decode(errors="replace")
        raise SchedulerError(f"{what} failed (exit {result.exit_status}): {err[:500]}")
    return result.stdout.decode(errors="replace")


@dataclass(frozen=True)
class Snapshot:
    """One look at the queue: the jobs by id, when it was taken, or why it failed."""

    jobs: dict[str, SlurmJob]
    at: float
    error: str = ""


class QueueWatcher:
    """Caches one ``squeue`` of all our jobs for at least ``interval_s`` (thread-safe)."""

    def __init__(self, *, runner: CommandRunner, interval_s: float, timeout_s: float) -> None:
        self._runner = runner
        self._interval = interval_s
        self._timeout = timeout_s
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self.calls = 0  # squeue calls made (for tests and benchmarks)

    def invalidate(self) -> None:
        """Forget the cached look: the next :meth:`look` asks again (after a submit or cancel)."""
        with self._lock:
            self._snapshot = None

    def look(self) -> tuple[Snapshot, bool]:
        """The current snapshot and whether it is fresh (taken by this call)."""
        with self._lock:
            snap = self._snapshot
            if snap is not None and time.monotonic() - snap.at < self._interval:
                return snap, False
            command = f"squeue --me --noheader --array --states=all --format={shlex.quote(SQUEUE_FORMAT)}"
            self.calls += 1
            try:
                jobs = parse_squeue(checked(self._runner.run(command, timeout_s=self._timeout), "squeue"))
                snap = Snapshot(jobs, time.monotonic())
            except (SchedulerError, RemoteError) as exc:
                # The controller restarting, or the link down: no verdict from the queue now.
                log.warning("slurm.squeue_failed", error=str(exc)[:300])
                snap = Snapshot({}, time.monotonic(), error=str(exc)[:300])
            self._snapshot = snap
            return snap, True


def ended_jobs(
    runner: CommandRunner, ids: Sequence[str], *, accounting: bool, timeout_s: float
) -> dict[str, SlurmJob]:
    """How jobs that are no longer pending or running ended: sacct, else scontrol (one call)."""
    if not ids:
        return {}
    try:
        if accounting:
            command = (
                "sacct --noheader --parsable2 --allocations --duplicates "
                f"--format={SACCT_FIELDS} --jobs={shlex.quote(','.join(ids))}"
            )
            return parse_sacct(checked(runner.run(command, timeout_s=timeout_s), "sacct"))
        text = checked(runner.run("scontrol --oneliner show job", timeout_s=timeout_s), "scontrol show job")
        return parse_scontrol_jobs(text)
    except (SchedulerError, RemoteError) as exc:
        log.warning("slurm.history_failed", error=str(exc)[:300])
        return {}


def read_many(
    runner: CommandRunner, paths: Sequence[str], *, limit: int, timeout_s: float
) -> list[bytes | None]:
    """The last ``limit`` bytes of each file (None: missing), in one command for all of them.

    The paths travel on stdin (one per line; ours never hold a newline); each answer is a
    ``+``/``-`` byte (found or not), the length, a newline and the bytes.
    """
    if not paths:
        return []
    if any("\n" in p or "\x00" in p for p in paths):
        raise SchedulerError("a remote path holds a newline or NUL; refused")
    script = (
        "while IFS= read -r f; do "
        'if [ -f "$f" ]; then d=$(tail -c ' + str(int(limit)) + ' -- "$f" | base64 -w0); '
        'printf "+%s\\n" "$d"; else printf -- "-\\n"; fi; done'
    )
    stdin = ("\n".join(paths) + "\n").encode()
    text = checked(runner.run(script, timeout_s=timeout_s, stdin=stdin), "reading markers")
    if len(text) > _MAX_READ:
        raise SchedulerError(f"reading {len(paths)} file(s) printed {len(text)} bytes; refused")
    lines = text.split("\n")
    out: list[bytes | None] = []
    for i in range(len(paths)):
        line = lines[i] if i < len(lines) else ""
        if line.startswith("+"):
            try:
                out.append(base64.b64decode(line[1:], validate=True))
            except (binascii.Error, ValueError):
                out.append(None)
        else:
            out.append(None)
    return out


def read_endings(
    runner: CommandRunner, items: Sequence[tuple[str, str, bool]], *, timeout_s: float
) -> list[tuple[bytes | None, bytes | None]]:
    """For each ``(exit marker, stderr, ended)``: the marker's line and the stderr's last
    :data:`TAIL_BYTES` bytes when the marker says other than ``exit 0`` (or, for a job Slurm says
    ended, when there is no marker); None where a file is missing or not read. One command for all.

    Each answer line is ``M<TAB>T``: ``-`` (none) or ``+`` and the marker's line / the tail in base64.
    """
    if not items:
        return []
    if any("\n" in p or "\x00" in p for f, e, _ in items for p in (f, e)):
        raise SchedulerError("a remote path holds a newline or NUL; refused")
    # Bash builtins only for the markers (no process per file: 500 markers cost one shell);
    # a marker is one whole line (``read`` fails on a line without its newline: torn, unread).
    script = (
        "while IFS= read -r f && IFS= read -r e && IFS= read -r ended; do "
        'm=-; t=-; if [ -f "$f" ] && IFS= read -r line < "$f"; then m="+$line"; fi; '
        'if { [ "$m" != - ] && [ "$m" != "+exit 0" ]; } || { [ "$m" = - ] && [ "$ended" = 1 ]; }; then '
        f'[ -f "$e" ] && t=+$(tail -c {TAIL_BYTES} -- "$e" | base64 -w0); fi; '
        'printf \'%s\\t%s\\n\' "$m" "$t"; done'
    )
    stdin = "".join(f"{f}\n{e}\n{int(ended)}\n" for f, e, ended in items).encode()
    text = checked(runner.run(script, timeout_s=timeout_s, stdin=stdin), "reading markers")
    if len(text) > _MAX_READ:
        raise SchedulerError(f"reading {len(items)} marker(s) printed {len(text)} bytes; refused")
    lines = text.split("\n")
    out: list[tuple[bytes | None, bytes | None]] = []
    for i in range(len(items)):
        marker, _, tail = (lines[i] if i < len(lines) else "").rpartition("\t")
        data = (marker[1:] + "\n").encode() if marker.startswith("+") else None
        out.append((data, _b64(tail)))
    return out


def _b64(field: str) -> bytes | None:
    if not field.startswith("+"):
        return None
    try:
        return base64.b64decode(field[1:], validate=True)
    except (binascii.Error, ValueError):
        return None


def marker_info(data: bytes | None) -> JobInfo | None:
    """EXITED/KILLED from an exit marker's bytes; None if there is none (yet) or it is garbage."""
    if data is None:
        return None
    parsed = parse_marker(data)
    if parsed is None:
        return None
    kind, value = parsed
    if kind == "signal":
        return JobInfo(JobStatus.KILLED, signal=value)
    return JobInfo(JobStatus.EXITED, exit_code=value)


# Slurm's end states that name why a job was ended for it, and the signal it was ended with.
_KILLED_BY = {
    "TIMEOUT": signal.SIGTERM,
    "CANCELLED": signal.SIGTERM,
    "OUT_OF_MEMORY": signal.SIGKILL,
}
_REASONS = {
    "TIMEOUT": "hit its Slurm time limit",
    "OUT_OF_MEMORY": "ran out of memory (Slurm OUT_OF_MEMORY)",
    "NODE_FAIL": "its node failed (Slurm NODE_FAIL)",
    "PREEMPTED": "was preempted by Slurm",
    "CANCELLED": "was cancelled in Slurm (scancel)",
    "BOOT_FAIL": "its node failed to boot (Slurm BOOT_FAIL)",
    "DEADLINE": "missed its Slurm deadline",
    "REVOKED": "was revoked by Slurm (federation)",
}


def scheduler_info(job: SlurmJob, requeue: frozenset[str]) -> JobInfo:
    """What an ended job's Slurm record says when it left no marker (named failures kept)."""
    state = job.state
    transient = state in requeue if state in _REASONS or state == "FAILED" else None
    if state in _KILLED_BY:
        return JobInfo(
            JobStatus.KILLED,
            signal=int(_KILLED_BY[state]),
            scheduler_state=state,
            reason=state,
            transient=transient,
            detail=_REASONS[state],
        )
    if state in _REASONS:
        return JobInfo(
            JobStatus.LOST,
            detail=f"job {job.job_id} {_REASONS[state]}",
            scheduler_state=state,
            reason=state,
            transient=transient,
        )
    if job.signal:
        return JobInfo(JobStatus.KILLED, signal=job.signal, scheduler_state=state, reason=job.reason)
    if job.exit_code is not None:
        return JobInfo(JobStatus.EXITED, exit_code=job.exit_code, scheduler_state=state, reason=job.reason)
    return JobInfo(
        JobStatus.LOST,
        detail=f"job {job.job_id} ended {state} without an exit code or marker",
        scheduler_state=state,
        reason=job.reason,
    )
