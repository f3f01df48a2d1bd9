"""The one small abstract base every executor shares: submit, find again, poll all, cancel.

An executor only starts and watches commands; the store, states and retries are the pipeline's.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from simbridge.processes import end_text

# Environment variable carrying an attempt's unique token into its process tree: the local
# executor finds an orphaned attempt again by it, the way Slurm finds a job by its unique name.
TOKEN_ENV = "SIMBRIDGE_ATTEMPT"
# The same token as the local wrapper carries it (not in TOKEN_ENV, so the wrapper is never taken
# for the command's group); the wrapper hands it on to the command as TOKEN_ENV.
WRAPPER_ENV = "SIMBRIDGE_WRAPPER"
# The local wrapper's deadline (epoch seconds): past it, the wrapper starts nothing (the lease the
# launch was proven under may have passed to another serve) and reports LATE_REPORT instead.
NOT_AFTER_ENV = "SIMBRIDGE_NOT_AFTER"
LATE_REPORT = b"late\n"


def log_file(prefix: Path, suffix: str) -> Path:
    """An attempt's file next to its log prefix: ``.out``, ``.err``, ``.exit``."""
    return prefix.with_name(prefix.name + suffix)


@dataclass(frozen=True)
class LaunchSpec:
    """What to run for one attempt, and where its logs and exit-code marker go."""

    token: str
    argv: tuple[str, ...]
    cwd: Path
    log_prefix: Path
    env: Mapping[str, str] = field(default_factory=dict)
    pass_fds: tuple[int, ...] = ()
    # Epoch seconds after which the command must not start (the orchestrator lease's validity
    # end, see Store.check_lease); None: no deadline. Executors that cannot enforce it ignore it.
    not_after: float | None = None

    @property
    def stdout(self) -> Path:
        """The attempt's captured standard output."""
        return log_file(self.log_prefix, ".out")

    @property
    def stderr(self) -> Path:
        """The attempt's captured standard error."""
        return log_file(self.log_prefix, ".err")

    @property
    def exit_file(self) -> Path:
        """Written (atomically) with how the command ended, even if we are gone."""
        return log_file(self.log_prefix, ".exit")


@dataclass(frozen=True)
class JobRef:
    """How to find a launched attempt: its token, what submit returned, and its marker.

    For the local executor ``pid`` is the command's process-group leader (its group id) and
    ``pid_start`` that leader's start time, which proves a pid is still ours before a signal.
    """

    token: str
    log_prefix: Path
    job_id: str | None = None
    pid: int | None = None
    pid_start: int | None = None

    @property
    def exit_file(self) -> Path:
        """Same path as :attr:`LaunchSpec.exit_file`."""
        return log_file(self.log_prefix, ".exit")

    @property
    def stderr(self) -> Path:
        """Same path as :attr:`LaunchSpec.stderr`."""
        return log_file(self.log_prefix, ".err")


@dataclass(frozen=True)
class Launched:
    """What identifies a started job: the job id shown to people, and pid + start time if local."""

    job_id: str
    pid: int | None = None
    pid_start: int | None = None


class JobStatus(enum.StrEnum):
    """What an executor knows of a job."""

    RUNNING = "RUNNING"
    EXITED = "EXITED"  # ended by itself, with an exit code
    KILLED = "KILLED"  # ended by a signal (never reported as exit 128+N)
    LOST = "LOST"  # gone without a word of how it ended


@dataclass(frozen=True)
class JobInfo:
    """A job's status: ``exit_code`` when EXITED, ``signal`` when KILLED, ``detail`` when LOST.

    A scheduler's executor adds what its scheduler says: ``scheduler_state`` (Slurm's PENDING,
    RUNNING, TIMEOUT, ...), ``reason`` (why it waits: Priority, Resources; or the named failure:
    TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, PREEMPTED, ...), ``transient`` (the executor's retry
    policy for that reason; None: the pipeline's own rules decide) and ``log_tail`` (the end of
    the job's stderr, fetched from the host it ran on).
    """

    status: JobStatus
    exit_code: int | None = None
    signal: int | None = None
    detail: str = ""
    scheduler_state: str = ""
    reason: str = ""
    transient: bool | None = None
    log_tail: str = ""

    @property
    def code(self) -> int | None:
        """The return code as stored: the exit code, or minus the signal number (Popen's way)."""
        if self.status is JobStatus.KILLED and self.signal is not None:
            return -self.signal
        return self.exit_code if self.status is JobStatus.EXITED else None

    def describe(self) -> str:
        """``exited 3``, ``killed by SIGKILL``, or why it was lost."""
        named = f" ({self.reason})" if self.reason else ""
        if self.status in {JobStatus.EXITED, JobStatus.KILLED}:
            return end_text(self.code) + named
        if self.status is JobStatus.LOST:
            detail = self.detail or "process lost"
            return detail if self.reason in detail else detail + named
        if self.scheduler_state:
            return self.scheduler_state.lower() + (f" ({self.reason})" if self.reason else "")
        return "running"


class Executor(abc.ABC):
    """Where an attempt's command runs. One instance per process; thread-safe.

    ``name`` is what attempts record (``local``, or a cluster's name from config).
    """

    name: str

    @abc.abstractmethod
    def submit(self, spec: LaunchSpec) -> Launched:
        """Start the command detached from us; raise LaunchError if it cannot start."""

    @abc.abstractmethod
    def find(self, ref: JobRef) -> Launched | None:
        """Find a job again by its token after a crash (None: it never started or is gone)."""

    @abc.abstractmethod
    def poll(self, refs: Sequence[JobRef]) -> dict[str, JobInfo]:
        """Status of many jobs in one call, keyed by token.

        EXITED with its code, KILLED with its signal (never as exit 128+N), LOST only once
        nothing of the job runs any more (a retry must never start beside it).
        """

    @abc.abstractmethod
    def cancel(self, ref: JobRef, *, grace_s: float) -> bool:
        """Stop a job and everything it started; True if something was signalled.

        Only processes proven to be the job's are signalled, never a pid <= 1.
        """
