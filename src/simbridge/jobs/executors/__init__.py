"""Executors: where an attempt's command runs, chosen by name from ``jobs.executor``."""

from __future__ import annotations

from simbridge.jobs.errors import JobsConfigError
from simbridge.jobs.executors.base import Executor, JobInfo, JobRef, JobStatus, Launched, LaunchSpec
from simbridge.jobs.executors.local import LocalExecutor

_BACKENDS: dict[str, type[Executor]] = {LocalExecutor.name: LocalExecutor}


def make_executor(name: str) -> Executor:
    """The executor called ``name`` (``local``; ``slurm`` comes with the SSH transport)."""
    try:
        return _BACKENDS[name]()
    except KeyError:
        raise JobsConfigError(f"jobs.executor={name!r} is unknown; use one of {sorted(_BACKENDS)}") from None


__all__ = [
    "Executor",
    "JobInfo",
    "JobRef",
    "JobStatus",
    "LaunchSpec",
    "Launched",
    "LocalExecutor",
    "make_executor",
]
