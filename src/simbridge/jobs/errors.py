"""The errors of simbridge.jobs: one tree under :class:`JobsError`, each also its nearest builtin.

Foreign errors (SQLAlchemy, subprocess, OSError from copies) are translated here at the boundary.
"""

from __future__ import annotations

from simbridge.errors import SimbridgeError


class JobsError(SimbridgeError):
    """Base class of every error raised on purpose by simbridge.jobs."""


class IllegalTransitionError(JobsError, ValueError):
    """Raised when a beam is asked to move between two states that states.py does not connect."""


class StaleStateError(JobsError, RuntimeError):
    """Raised when a beam's stored state is no longer the one a caller acted on."""


class BadNameError(JobsError, ValueError):
    """Raised when a case or beam name cannot be used even after safe mapping (empty, '.', '..')."""


class CaseRejectedError(JobsError, ValueError):
    """Raised when a case folder cannot be taken: missing, empty, unreadable or already taken."""


class NotFoundError(JobsError, LookupError):
    """Raised when a case or beam named on the command line is not in the store."""


class StoreError(JobsError, RuntimeError):
    """Raised when the database cannot be reached, migrated or written; says which URL."""


class StepFailedError(JobsError, RuntimeError):
    """Raised by a pipeline step that failed; ``transient`` says whether a retry may help."""

    def __init__(self, message: str, *, transient: bool, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.exit_code = exit_code


class TransferError(JobsError, OSError):
    """Raised when a transport cannot copy a file to or from the executor's host."""


class LaunchError(JobsError, OSError):
    """Raised when an executor cannot start a command (missing program, no fork)."""


class LaunchTooLateError(LaunchError):
    """Raised when the launch wrapper refused to start a command past its deadline (the lease it
    was launched under may be someone else's by now): nothing ran, so it is no failed try."""


class JobsConfigError(JobsError, ValueError):
    """Raised when the jobs configuration lacks something a command needs (e.g. steps.simulate)."""


class StoreUnavailableError(StoreError):
    """Raised when the database is there but cannot answer now (locked, restarting, unreachable)."""


class StoreNotInitialisedError(StoreError):
    """Raised when a command that only reads finds no jobs schema (or no database) at the URL."""


class StoreLostError(StoreError):
    """Raised when the database vanished under a running process (file deleted/replaced, schema gone)."""


class OrchestratorBusyError(JobsError, RuntimeError):
    """Raised when `serve` starts on a database whose orchestrator lease another live serve holds."""


class LeaseLostError(JobsError, RuntimeError):
    """Raised by a fenced write when this serve no longer holds the orchestrator lease."""


class UnsafeFileError(TransferError):
    """Raised when a copy meets a symbolic link, a special file or a tree past its limits."""


class ChecksumError(TransferError):
    """Raised when a transferred file's sha256 differs from its source's, even after one re-fetch."""


class RemoteError(JobsError, OSError):
    """Base of the errors of a remote host reached over SSH; the message names the host."""


class HostUnreachableError(RemoteError, ConnectionError):
    """Raised when the host cannot be reached (refused, timed out, name unknown, connection dropped)."""


class HostKeyError(RemoteError, ConnectionError):
    """Raised when the host's key is unknown or changed; the message carries its fingerprint."""


class AuthError(RemoteError, PermissionError):
    """Raised when the host refuses our user or key."""


class RemotePermissionError(RemoteError, PermissionError):
    """Raised when a remote file or folder may not be read or written."""


class RemoteDiskFullError(RemoteError):
    """Raised when the remote file system is full (ENOSPC / EDQUOT)."""


class RemotePathError(RemoteError, ValueError):
    """Raised when a remote path would leave the cluster's remote_root."""


class SchedulerError(JobsError, RuntimeError):
    """Raised when the scheduler refuses or fails a command (sbatch, squeue, scancel)."""


class RunScriptError(JobsError, ValueError):
    """Raised when a run.sh cannot be rendered: a bad template field, env name, GPU id or command."""


class GpuAssignmentError(JobsError, RuntimeError):
    """Raised when a remote host's GPUs cannot be counted or assigned (discovery failed, none listed)."""
