"""The one small abstract base every executor shares: submit, find again, poll all, cancel.

An executor only starts and watches commands; the store, states and retries are the pipeline's.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

# Environment variable carrying an attempt's unique token into its process tree: the local
# executor finds an orphaned attempt again by it, the way Slurm finds a job by its unique name.
TOKEN_ENV = "SIMBRIDGE_ATTEMPT"


@dataclass(frozen=True)
class LaunchSpec:
    """What to run for one attempt, and where its logs and exit-code marker go."""

    token: str
    argv: tuple[str, ...]
    cwd: Path
    log_prefix: Path
    env: Mapping[str, str] = field(default_factory=dict)
    pass_fds: tuple[int, ...] = ()

    @property
    def stdout(self) -> Path:
        """The attempt's captured standard output."""
        return self.log_prefix.with_name(self.log_prefix.name + ".out")

    @property
    def stderr(self) -> Path:
        """The attempt's captured standard error."""
        return self.log_prefix.with_name(self.log_prefix.name + ".err")

    @property
    def exit_file(self) -> Path:
        """Written (atomically) with the exit code when the command ends, even if we are gone."""
        return self.log_prefix.with_name(self.log_prefix.name + ".exit")


@dataclass(frozen=True)
class JobRef:
    """How to find a launched attempt: its token, what submit returned, and its marker."""

    token: str
    log_prefix: Path
    job_id: str | None = None
    pid: int | None = None
    pid_start: int | None = None

    @property
    def exit_file(self) -> Path:
        """Same path as :attr:`LaunchSpec.exit_file`."""
        return self.log_prefix.with_name(self.log_prefix.name + ".exit")

    @property
    def stderr(self) -> Path:
        """Same path as :attr:`LaunchSpec.stderr`."""
        return self.log_prefix.with_name(self.log_prefix.name + ".err")


@dataclass(frozen=True)
class Launched:
    """What identifies a started job: the job id shown to people, and pid + start time if local."""

    job_id: str
    pid: int | None = None
    pid_start: int | None = None


class JobStatus(enum.StrEnum):
    """What an executor knows of a job."""

    RUNNING = "RUNNING"
    EXITED = "EXITED"
    LOST = "LOST"


@dataclass(frozen=True)
class JobInfo:
    """A job's status; ``exit_code`` is set when EXITED; ``detail`` says why when LOST."""

    status: JobStatus
    exit_code: int | None = None
    detail: str = ""


class Executor(abc.ABC):
    """Where an attempt's command runs. One instance per process; thread-safe."""

    name: ClassVar[str]

    @abc.abstractmethod
    def submit(self, spec: LaunchSpec) -> Launched:
        """Start the command detached from us; raise LaunchError if it cannot start."""

    @abc.abstractmethod
    def find(self, ref: JobRef) -> Launched | None:
        """Find a job again by its token after a crash (None: it never started or is gone)."""

    @abc.abstractmethod
    def poll(self, refs: Sequence[JobRef]) -> dict[str, JobInfo]:
        """Status of many jobs in one call, keyed by token."""

    @abc.abstractmethod
    def cancel(self, ref: JobRef, *, grace_s: float) -> bool:
        """Stop a job and everything it started; True if something was signalled."""
